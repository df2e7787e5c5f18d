/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The program on the node's VXLAN device (weft_vxlan, external / collect_md mode), tc egress:
 * the kernel routes a packet for another node's pod CIDR to the device; this program finds the
 * node that owns the destination (longest prefix match over the remote pod CIDRs) and sets
 * the tunnel key (remote underlay address, VNI), which the VXLAN driver encapsulates with.
 * A destination no node owns is dropped here: the external-mode driver would drop it anyway,
 * without saying why. No address is rewritten but the inner MACs (see WEFT_OVERLAY_MAC
 * and WEFT_OVERLAY_SRC_MAC): pod-to-pod traffic is never NATed.
 *
 * Like bpf_lxc.c, one thin entry point; the helpers are small and inline.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "weft_overlay.h"
#include "lib/overlay_maps.h"

/* The VNI every node uses (set by the agent before loading: .rodata). */
volatile const __u32 weft_overlay_vni = 1;

/* Offsets of the destination address in the IPv4 and IPv6 headers. */
#define WEFT_IPV4_DADDR_OFF (ETH_HLEN + 16)
#define WEFT_IPV6_DADDR_OFF (ETH_HLEN + 24)

/* The remote node for the packet's destination, or NULL. */
static __always_inline struct weft_overlay_remote *weft_overlay_lookup(struct __sk_buff *skb)
{
	__u16 proto = bpf_ntohs(skb->protocol);

	if (proto == ETH_P_IP) {
		struct weft_overlay_key4 k = { .prefixlen = 32 };

		if (bpf_skb_load_bytes(skb, WEFT_IPV4_DADDR_OFF, k.addr, sizeof(k.addr)) < 0)
			return NULL;
		return bpf_map_lookup_elem(&weft_overlay4, &k);
	}
	if (proto == ETH_P_IPV6) {
		struct weft_overlay_key6 k = { .prefixlen = 128 };

		if (bpf_skb_load_bytes(skb, WEFT_IPV6_DADDR_OFF, k.addr, sizeof(k.addr)) < 0)
			return NULL;
		return bpf_map_lookup_elem(&weft_overlay6, &k);
	}
	return NULL;
}

static __always_inline int weft_overlay_set_key(struct __sk_buff *skb,
						 const struct weft_overlay_remote *r)
{
	struct bpf_tunnel_key key = {};
	__u64 flags = 0;

	key.tunnel_id = weft_overlay_vni;
	key.tunnel_ttl = 64;
	if (r->family == 4) {
		__u32 a;

		__builtin_memcpy(&a, r->addr, 4);
		/* remote_ipv4 is in host order; the map holds network order. */
		key.remote_ipv4 = bpf_ntohl(a);
	} else if (r->family == 6) {
		__builtin_memcpy(key.remote_ipv6, r->addr, 16);
		flags = BPF_F_TUNINFO_IPV6;
	} else {
		return -1;
	}
	return bpf_skb_set_tunnel_key(skb, &key, sizeof(key), flags);
}

SEC("classifier")
int to_overlay(struct __sk_buff *skb)
{
	/* Destination, then source: one store of both. */
	__u8 macs[2 * ETH_ALEN] = { 0x0e, 0x77, 0x65, 0x66, 0x74, 0x01,
				    0x0e, 0x77, 0x65, 0x66, 0x74, 0x02 };
	struct weft_overlay_remote *r = weft_overlay_lookup(skb);

	if (!r)
		return TC_ACT_SHOT;
	if (weft_overlay_set_key(skb, r) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Apache-2.0";
