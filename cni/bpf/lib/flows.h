/* SPDX-License-Identifier: Apache-2.0 */
/*
 * What the agent observes: per-policy counters (weft_counters), denied new
 * connections per endpoint and direction (weft_drops), packets dropped for a
 * spoofed source per endpoint (weft_source_drops), and one flow event per
 * new-connection decision or spoofed packet (weft_flows; weft_flow_lost counts the events that
 * found the ring full).
 */
#ifndef WEFT_LIB_FLOWS_H
#define WEFT_LIB_FLOWS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "weft_maps.h"
#include "maps.h"
#include "parse.h"
#include "policy.h"

/* Counts one allowed packet under policy, and a new connection if new_conn. */
static __always_inline void weft_count_allowed(__u32 policy, int new_conn)
{
	struct weft_policy_counters *c = bpf_map_lookup_elem(&weft_counters, &policy);

	if (!c) {
		struct weft_policy_counters init = {
			.allowed_conns = new_conn ? 1 : 0,
			.allowed_packets = 1,
		};

		if (bpf_map_update_elem(&weft_counters, &policy, &init, BPF_NOEXIST) == 0)
			return;
		/* Another CPU created it first: count into that. */
		c = bpf_map_lookup_elem(&weft_counters, &policy);
		if (!c)
			return; /* map full: not counted */
	}
	/* Per-CPU values: no other CPU writes this one. */
	if (new_conn)
		c->allowed_conns++;
	c->allowed_packets++;
}

static __always_inline void weft_count_denied(__u32 ep_id, __u8 dir)
{
	struct weft_drop_key k = {
		.ep_id = ep_id,
		.direction = dir,
	};
	__u64 one = 1;
	__u64 *n;

	n = bpf_map_lookup_elem(&weft_drops, &k);
	if (n) {
		(*n)++;
		return;
	}
	if (bpf_map_update_elem(&weft_drops, &k, &one, BPF_NOEXIST) == 0)
		return;
	n = bpf_map_lookup_elem(&weft_drops, &k);
	if (n)
		(*n)++;
}

/* One packet of ep_id dropped for a source address that is not the endpoint's. */
static __always_inline void weft_count_spoofed(__u32 ep_id)
{
	__u64 one = 1;
	__u64 *n;

	n = bpf_map_lookup_elem(&weft_source_drops, &ep_id);
	if (n) {
		(*n)++;
		return;
	}
	if (bpf_map_update_elem(&weft_source_drops, &ep_id, &one, BPF_NOEXIST) == 0)
		return;
	n = bpf_map_lookup_elem(&weft_source_drops, &ep_id);
	if (n)
		(*n)++;
}

static __always_inline void weft_flow_emit(__u32 ep_id, __u8 dir, const struct weft_pkt *pkt,
					   const struct weft_decision *d, __u64 now)
{
	struct weft_flow_event *e;

	e = bpf_ringbuf_reserve(&weft_flows, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&weft_flow_lost, &zero);

		if (lost)
			(*lost)++;
		return;
	}
	e->ts_ns = now;
	e->ep_id = ep_id;
	e->policy = d->policy;
	e->direction = dir;
	e->verdict = d->allowed ? WEFT_VERDICT_ALLOWED : WEFT_VERDICT_DENIED;
	e->proto = pkt->proto;
	e->family = pkt->family;
	e->sport = bpf_ntohs(pkt->sport);
	e->dport = bpf_ntohs(pkt->dport);
	__builtin_memcpy(e->saddr, pkt->saddr, 16);
	__builtin_memcpy(e->daddr, pkt->daddr, 16);
	e->reason = d->reason;
	__builtin_memset(e->pad, 0, sizeof(e->pad));
	bpf_ringbuf_submit(e, 0);
}

#endif /* WEFT_LIB_FLOWS_H */
