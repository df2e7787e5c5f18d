/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Source address validation on from_pod (Cilium: "invalid source ip"): a pod
 * may only send from its own addresses, or a forged source would borrow
 * another pod's standing in ingress policy and conntrack. The endpoint's
 * addresses are in weft_endpoint_addrs[ifindex]. No entry there: not checked
 * (an endpoint of an older agent, before the new one recorded its addresses).
 * IPv6 link-local (fe80::/10) and unspecified (::, duplicate address
 * detection) sources always pass: neighbour discovery and MLD need them.
 */
#ifndef WEFT_LIB_SOURCE_H
#define WEFT_LIB_SOURCE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "weft_maps.h"
#include "maps.h"
#include "parse.h"

static __always_inline int weft_src_exempt6(const __u8 *s)
{
	__u64 hi, lo;

	if (s[0] == 0xfe && (s[1] & 0xc0) == 0x80)
		return 1; /* fe80::/10 */
	__builtin_memcpy(&hi, s, 8);
	__builtin_memcpy(&lo, s + 8, 8);
	return (hi | lo) == 0; /* :: */
}

/* Is pkt's source one of a's addresses? */
static __always_inline int weft_src_recorded(const struct weft_endpoint_addrs *a,
					     const struct weft_pkt *pkt)
{
	int i;

	if (pkt->family == 4) {
		__u32 s, x;

		__builtin_memcpy(&s, pkt->saddr, 4);
#pragma unroll
		for (i = 0; i < WEFT_EP_MAX_ADDRS; i++) {
			if (i >= a->count4)
				return 0;
			__builtin_memcpy(&x, a->addr4[i], 4);
			if (x == s)
				return 1;
		}
		return 0;
	} else {
		__u64 s0, s1, x0, x1;

		__builtin_memcpy(&s0, pkt->saddr, 8);
		__builtin_memcpy(&s1, pkt->saddr + 8, 8);
#pragma unroll
		for (i = 0; i < WEFT_EP_MAX_ADDRS; i++) {
			if (i >= a->count6)
				return 0;
			__builtin_memcpy(&x0, a->addr6[i], 8);
			__builtin_memcpy(&x1, a->addr6[i] + 8, 8);
			if (x0 == s0 && x1 == s1)
				return 1;
		}
		return 0;
	}
}

/*
 * May a packet with this (parsed) IP header leave the pod on interface
 * ifindex? pkt->family is 4 or 6 (the IP header was read).
 */
static __always_inline int weft_src_allowed(__u32 ifindex, const struct weft_pkt *pkt)
{
	const struct weft_endpoint_addrs *a;

	a = bpf_map_lookup_elem(&weft_endpoint_addrs, &ifindex);
	if (!a)
		return 1; /* nothing recorded: not checked */
	if (pkt->family == 6 && weft_src_exempt6(pkt->saddr))
		return 1;
	return weft_src_recorded(a, pkt);
}

#endif /* WEFT_LIB_SOURCE_H */
