/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The overlay's maps (layouts in weft_overlay.h), declared once: the VXLAN
 * device's program reads them to pick the tunnel endpoint, the NodePort
 * programs to tell whether an address is a pod on another node behind the
 * overlay. Both objects use the same pins (<pin_dir>/overlay/).
 */
#ifndef WEFT_LIB_OVERLAY_MAPS_H
#define WEFT_LIB_OVERLAY_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "weft_overlay.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct weft_overlay_key4);
	__type(value, struct weft_overlay_remote);
	__uint(max_entries, WEFT_OVERLAY_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_overlay4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct weft_overlay_key6);
	__type(value, struct weft_overlay_remote);
	__uint(max_entries, WEFT_OVERLAY_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_overlay6 SEC(".maps");

#endif /* WEFT_LIB_OVERLAY_MAPS_H */
