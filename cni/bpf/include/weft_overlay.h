/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The overlay's map layouts, declared once and mirrored by #[repr(C)] types in
 * cni/datapath/src/overlay.rs (a test there checks the sizes).
 *
 *   weft_overlay4: LPM trie, remote pod CIDR (IPv4) -> the remote node's underlay address
 *   weft_overlay6: LPM trie, remote pod CIDR (IPv6) -> the remote node's underlay address
 *
 * The agent writes one entry per pod CIDR of every other node (from the Nodes' spec.podCIDRs
 * and InternalIPs); the program on the VXLAN device's egress reads them.
 */
#ifndef WEFT_OVERLAY_H
#define WEFT_OVERLAY_H

#include <linux/types.h>

/* LPM keys: prefix length in bits, then the address in network order. */
struct weft_overlay_key4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct weft_overlay_key6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* The tunnel endpoint: an IPv4 (family 4, first 4 bytes of addr) or IPv6 (family 6)
 * underlay address, network order. */
struct weft_overlay_remote {
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

/* The MAC every node's overlay device carries (locally administered, "weft" in the middle).
 * The device is NOARP: the kernel fills the inner destination MAC with the device's own
 * address; the program writes this one anyway, so that the receiving device, which has the
 * same address, takes the frame as its own (PACKET_HOST) whatever the sender's neighbour
 * table says. */
#define WEFT_OVERLAY_MAC { 0x0e, 0x77, 0x65, 0x66, 0x74, 0x01 }
/* The inner source MAC the program writes: anything but WEFT_OVERLAY_MAC, which the
 * receiving VXLAN driver would take for its own frame looping back and drop. */
#define WEFT_OVERLAY_SRC_MAC { 0x0e, 0x77, 0x65, 0x66, 0x74, 0x02 }

#define WEFT_OVERLAY_MAX_ENTRIES 16384

#endif
