/* SPDX-License-Identifier: Apache-2.0 */
/*
 * NodePort on the node's external (underlay) interface, in the spirit of
 * Cilium's bpf_host.c: a connection from outside to NodeIP:nodePort is
 * translated to a backend on this node, and the backend's replies leave with
 * NodeIP:nodePort as their source again. The logic is lib/lb.h's, shared with
 * the pods' programs (same pinned maps).
 *
 *   from_netdev: tc ingress of the external interface: a TCP/UDP packet to a
 *                NodePort frontend (WEFT_LB_F_NODEPORT) → its backend
 *                (destination rewritten; the client's address is kept, so the
 *                backend sees who connected); no backend: ICMP port
 *                unreachable back out of the interface.
 *   to_netdev:   tc egress of the external interface: a backend's reply to a
 *                translated connection gets the frontend back as its source.
 *
 * Backends are this node's pods only (externalTrafficPolicy: Local): without a
 * source NAT, a reply from a pod on another node would reach the client
 * directly with the wrong source. The writer puts only local endpoints into a
 * NodePort frontend.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "weft_maps.h"
#include "lib/lb.h"

SEC("classifier")
int from_netdev(struct __sk_buff *skb)
{
	struct weft_pkt pkt = {};
	struct weft_lb_nat nat = {};
	__u64 now;
	int lb;

	if (weft_parse(skb, &pkt) != WEFT_PARSE_OK)
		return TC_ACT_UNSPEC;
	now = bpf_ktime_get_boot_ns();
	lb = weft_lb_lookup(&pkt, &nat, now, 1);
	if (lb == WEFT_LB_NONE)
		return TC_ACT_UNSPEC;
	if (lb == WEFT_LB_REFUSE) {
		if (weft_lb_refusal(skb, &pkt) < 0)
			return TC_ACT_SHOT;
		return bpf_redirect(skb->ifindex, 0); /* back out where it came in */
	}
	if (nat.fresh)
		weft_lb_commit(&pkt, &nat, now);
	if (weft_lb_dnat(skb, &pkt, &nat) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_UNSPEC;
}

SEC("classifier")
int to_netdev(struct __sk_buff *skb)
{
	struct weft_pkt pkt = {};

	if (weft_parse(skb, &pkt) != WEFT_PARSE_OK)
		return TC_ACT_UNSPEC;
	if (weft_lb_reverse(skb, &pkt, bpf_ktime_get_boot_ns()) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_UNSPEC;
}

char _license[] SEC("license") = "Apache-2.0";
