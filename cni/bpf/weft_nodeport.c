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
 * A backend on another node (WEFT_LB_BE_REMOTE: externalTrafficPolicy
 * Cluster, Kubernetes' default) is reached with source NAT: the connection
 * leaves with the frontend's node address and a port of the SNAT range as its
 * source (weft_lb_snat), so the backend answers through this node, which
 * gives the answer the frontend back and sends it to the client. Both
 * directions of such a connection are forwarded here, past the stack
 * (weft_np_forward: into the overlay device when the backend is a pod behind
 * it, else out of this interface to the next hop the kernel's neighbour table
 * gives; bpf_fib_lookup would need a GPL-compatible program license). A local
 * backend keeps the client's address
 * (the answer passes to_netdev). Local Services get only local backends.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "weft_maps.h"
#include "lib/lb.h"
#include "lib/overlay_maps.h"

/*
 * The overlay (VXLAN) device's ifindex when the node routes pods through it
 * (set by the agent before loading: .rodata); 0: direct routing.
 */
volatile const __u32 weft_tunnel_ifindex = 0;

/* Is addr a pod on another node, reached through the overlay device? */
static __always_inline int weft_np_behind_overlay(__u8 family, const __u8 *addr)
{
	if (family == 4) {
		struct weft_overlay_key4 k = { .prefixlen = 32 };

		__builtin_memcpy(k.addr, addr, 4);
		return bpf_map_lookup_elem(&weft_overlay4, &k) != NULL;
	} else {
		struct weft_overlay_key6 k = { .prefixlen = 128 };

		__builtin_memcpy(k.addr, addr, 16);
		return bpf_map_lookup_elem(&weft_overlay6, &k) != NULL;
	}
}

/*
 * Sends a source-NATed packet on toward dst, past the stack (see lib/lb.h):
 * into the overlay device, whose program sets the tunnel, or out of this
 * interface with the next hop's MAC from the kernel's routes and neighbours
 * (bpf_redirect_neigh).
 */
static __always_inline int weft_np_forward(struct __sk_buff *skb, __u8 family, const __u8 *dst)
{
	__u32 tunnel = weft_tunnel_ifindex;

	if (tunnel && weft_np_behind_overlay(family, dst))
		return bpf_redirect(tunnel, 0);
	return bpf_redirect_neigh(skb->ifindex, NULL, 0, 0);
}

SEC("classifier")
int from_netdev(struct __sk_buff *skb)
{
	struct weft_pkt pkt = {};
	struct weft_lb_nat nat = {};
	__u8 dst[16] = {};
	__u64 now;
	int lb, r;

	if (weft_parse(skb, &pkt) != WEFT_PARSE_OK)
		return TC_ACT_UNSPEC;
	now = bpf_ktime_get_boot_ns();
	r = weft_lb_snat_reply(skb, &pkt, now, dst);
	if (r)
		return r < 0 ? TC_ACT_SHOT : weft_np_forward(skb, pkt.family, dst);
	lb = weft_lb_lookup(&pkt, &nat, now, 1);
	if (lb == WEFT_LB_NONE)
		return TC_ACT_UNSPEC;
	if (lb == WEFT_LB_REFUSE) {
		if (weft_lb_refusal(skb, &pkt) < 0)
			return TC_ACT_SHOT;
		return bpf_redirect(skb->ifindex, 0); /* back out where it came in */
	}
	if (nat.fresh) {
		r = weft_lb_snat_established(skb, &pkt, &nat, now, dst);
		if (r)
			return r < 0 ? TC_ACT_SHOT : weft_np_forward(skb, pkt.family, dst);
		if (nat.be.flags & WEFT_LB_BE_REMOTE) {
			if (weft_lb_snat_new(skb, &pkt, &nat, now) < 0)
				return TC_ACT_SHOT;
			return weft_np_forward(skb, pkt.family, nat.be.addr);
		}
		weft_lb_commit(&pkt, &nat, now);
	}
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
