/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The policy decision for a new connection at one check point (endpoint,
 * direction): the longest prefix in weft_policy{4,6} for (endpoint, direction,
 * protocol, peer address), then the first port range containing the
 * destination port.
 */
#ifndef WEFT_LIB_POLICY_H
#define WEFT_LIB_POLICY_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "weft_maps.h"
#include "maps.h"
#include "parse.h"

struct weft_decision {
	__u32 policy;
	__u8 allowed;
	__u8 reason; /* WEFT_REASON_* */
};

/* TCP, UDP and SCTP are matched by port; every other protocol by WEFT_PROTO_ANY. */
static __always_inline __u8 weft_policy_proto(__u8 proto)
{
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP)
		return proto;
	return WEFT_PROTO_ANY;
}

static __always_inline struct weft_policy_value *
weft_policy_find(__u32 ep_id, __u8 dir, __u8 lproto, const struct weft_pkt *pkt)
{
	/* The peer: the destination of what leaves the pod, the source of what enters. */
	const __u8 *peer = dir == WEFT_DIR_EGRESS ? pkt->daddr : pkt->saddr;

	if (pkt->family == 4) {
		struct weft_policy4_key k = {
			.prefixlen = WEFT_POLICY_FIXED_PREFIX + 32,
			.ep_id = bpf_htonl(ep_id),
			.direction = dir,
			.proto = lproto,
			.pad = 0,
		};

		__builtin_memcpy(k.addr, peer, 4);
		return bpf_map_lookup_elem(&weft_policy4, &k);
	} else {
		struct weft_policy6_key k = {
			.prefixlen = WEFT_POLICY_FIXED_PREFIX + 128,
			.ep_id = bpf_htonl(ep_id),
			.direction = dir,
			.proto = lproto,
			.pad = 0,
		};

		__builtin_memcpy(k.addr, peer, 16);
		return bpf_map_lookup_elem(&weft_policy6, &k);
	}
}

static __always_inline void weft_policy_decide(__u32 ep_id, __u8 dir, int isolated,
					       const struct weft_pkt *pkt,
					       struct weft_decision *d)
{
	struct weft_policy_value *v;
	__u8 lproto;
	__u32 count;
	__u16 port;
	__u32 i;

	d->policy = 0;
	d->allowed = 0;
	if (!isolated) {
		d->allowed = 1;
		d->reason = WEFT_REASON_NOT_ISOLATED;
		return;
	}
	lproto = weft_policy_proto(pkt->proto);
	v = weft_policy_find(ep_id, dir, lproto, pkt);
	if (!v) {
		d->reason = WEFT_REASON_NO_PEER;
		return;
	}
	count = v->count;
	if (lproto == WEFT_PROTO_ANY) {
		if (count > 0) {
			d->allowed = 1;
			d->policy = v->ranges[0].policy;
			d->reason = WEFT_REASON_POLICY;
		} else {
			d->reason = WEFT_REASON_NO_PORT;
		}
		return;
	}
	port = bpf_ntohs(pkt->dport);
	/* A bounded loop (the verifier walks it; clang cannot unroll its two exits). */
	for (i = 0; i < WEFT_MAX_PORT_RANGES; i++) {
		if (i >= count)
			break;
		if (port >= v->ranges[i].lo && port <= v->ranges[i].hi) {
			d->allowed = 1;
			d->policy = v->ranges[i].policy;
			d->reason = WEFT_REASON_POLICY;
			return;
		}
	}
	d->reason = WEFT_REASON_NO_PORT;
}

#endif /* WEFT_LIB_POLICY_H */
