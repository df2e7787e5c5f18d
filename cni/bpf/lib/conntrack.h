/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracking: one weft_ct entry per allowed new connection and check
 * point. A packet whose tuple has an entry at its check point is established;
 * one whose reversed tuple has an entry at the opposite direction of the same
 * endpoint is a reply; anything else is a new connection (TCP included: a
 * non-SYN packet of an unknown flow is judged like a SYN).
 *
 * Entries live until LRU eviction or until last_seen is older than a timeout:
 * TCP 1 h, TCP after RST or FIN both ways 10 s, everything else 60 s. An
 * expired entry is treated as absent (the connection is judged anew).
 */
#ifndef WEFT_LIB_CONNTRACK_H
#define WEFT_LIB_CONNTRACK_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "weft_maps.h"
#include "maps.h"
#include "parse.h"

#define WEFT_NSEC_PER_SEC 1000000000ULL
#define WEFT_CT_TIMEOUT_TCP_NS (3600 * WEFT_NSEC_PER_SEC)
#define WEFT_CT_TIMEOUT_CLOSING_NS (10 * WEFT_NSEC_PER_SEC)
#define WEFT_CT_TIMEOUT_OTHER_NS (60 * WEFT_NSEC_PER_SEC)
/* last_seen is written at most this often per entry (cache lines stay shared). */
#define WEFT_CT_REFRESH_NS WEFT_NSEC_PER_SEC

#define WEFT_CT_CLOSED(flags)                                                            \
	(((flags) & WEFT_CT_RST) ||                                                      \
	 ((flags) & (WEFT_CT_FIN_ORIG | WEFT_CT_FIN_REPLY)) ==                            \
		 (WEFT_CT_FIN_ORIG | WEFT_CT_FIN_REPLY))

static __always_inline int weft_ct_live(const struct weft_ct_value *v, __u8 proto, __u64 now)
{
	__u64 timeout = WEFT_CT_TIMEOUT_OTHER_NS;
	__u64 seen = v->last_seen_ns;

	if (proto == IPPROTO_TCP)
		timeout = WEFT_CT_CLOSED(v->flags) ? WEFT_CT_TIMEOUT_CLOSING_NS
						   : WEFT_CT_TIMEOUT_TCP_NS;
	/* Another CPU may have refreshed it after we read the clock. */
	if (seen >= now)
		return 1;
	return now - seen <= timeout;
}

static __always_inline void weft_ct_key_fill(struct weft_ct_key *k, __u32 ep_id, __u8 dir,
					     __u8 family, __u8 proto, const __u8 *saddr,
					     const __u8 *daddr, __u16 sport, __u16 dport)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->ep_id = ep_id;
	k->direction = dir;
	k->proto = proto;
	k->family = family;
	__builtin_memcpy(k->saddr, saddr, 16);
	__builtin_memcpy(k->daddr, daddr, 16);
	k->sport = sport;
	k->dport = dport;
}

/* The same connection seen from the other direction of the same endpoint. */
static __always_inline void weft_ct_key_reverse(struct weft_ct_key *k)
{
	__u8 tmp[16];
	__u16 port = k->sport;

	__builtin_memcpy(tmp, k->saddr, 16);
	__builtin_memcpy(k->saddr, k->daddr, 16);
	__builtin_memcpy(k->daddr, tmp, 16);
	k->sport = k->dport;
	k->dport = port;
	k->direction ^= 1;
}

/* A live entry for k, or NULL. */
static __always_inline struct weft_ct_value *weft_ct_find(const struct weft_ct_key *k, __u64 now)
{
	struct weft_ct_value *v = bpf_map_lookup_elem(&weft_ct, k);

	if (v && weft_ct_live(v, k->proto, now))
		return v;
	return NULL;
}

/* Per-packet upkeep of a live entry: last_seen, and TCP close tracking. */
static __always_inline void weft_ct_touch(struct weft_ct_value *v, const struct weft_pkt *pkt,
					  int reply, __u64 now)
{
	if (now > v->last_seen_ns + WEFT_CT_REFRESH_NS)
		v->last_seen_ns = now;
	if (pkt->proto != IPPROTO_TCP)
		return;
	/* Racing CPUs may lose a bit: the entry then just keeps the 1 h timeout. */
	if ((pkt->tcp_flags & WEFT_TCP_RST) && !(v->flags & WEFT_CT_RST))
		v->flags |= WEFT_CT_RST;
	if (pkt->tcp_flags & WEFT_TCP_FIN) {
		__u32 bit = reply ? WEFT_CT_FIN_REPLY : WEFT_CT_FIN_ORIG;

		if (!(v->flags & bit))
			v->flags |= bit;
	}
}

static __always_inline void weft_ct_create(const struct weft_ct_key *k, __u32 policy,
					   const struct weft_pkt *pkt, __u64 now)
{
	struct weft_ct_value v = {
		.created_ns = now,
		.last_seen_ns = now,
		.policy = policy,
		.flags = 0,
	};

	if (pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & WEFT_TCP_RST))
		v.flags = WEFT_CT_RST;
	/* Full LRU: the least recently used entry is evicted; nothing to handle. */
	bpf_map_update_elem(&weft_ct, k, &v, BPF_ANY);
}

#endif /* WEFT_LIB_CONNTRACK_H */
