/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The maps, declared once. Every map is pinned by name (LIBBPF_PIN_BY_NAME)
 * under the loader's pin directory (default /sys/fs/bpf/weft/), so an agent
 * restart reuses them and no policy is dropped. Layouts: include/weft_maps.h.
 */
#ifndef WEFT_LIB_MAPS_H
#define WEFT_LIB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "weft_maps.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); /* host-veth ifindex */
	__type(value, struct weft_endpoint);
	__uint(max_entries, WEFT_ENDPOINTS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); /* host-veth ifindex */
	__type(value, struct weft_endpoint_addrs);
	__uint(max_entries, WEFT_ENDPOINT_ADDRS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_endpoint_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct weft_policy4_key);
	__type(value, struct weft_policy_value);
	__uint(max_entries, WEFT_POLICY_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_policy4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct weft_policy6_key);
	__type(value, struct weft_policy_value);
	__uint(max_entries, WEFT_POLICY_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_policy6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct weft_ct_key);
	__type(value, struct weft_ct_value);
	__uint(max_entries, WEFT_CT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, __u32); /* policy id */
	__type(value, struct weft_policy_counters);
	__uint(max_entries, WEFT_COUNTERS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, struct weft_drop_key);
	__type(value, __u64); /* denied new connections */
	__uint(max_entries, WEFT_DROPS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, __u32); /* ep_id */
	__type(value, __u64); /* packets dropped for a spoofed source */
	__uint(max_entries, WEFT_SOURCE_DROPS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_source_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, WEFT_FLOWS_RINGBUF_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64); /* flow events dropped because weft_flows was full */
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_flow_lost SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct weft_lb_svc_key);
	__type(value, struct weft_lb_svc);
	__uint(max_entries, WEFT_LB_SVC_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct weft_lb_ct_key);
	__type(value, struct weft_lb_ct_value);
	__uint(max_entries, WEFT_LB_CT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct weft_lb_affinity_key);
	__type(value, struct weft_lb_affinity_value);
	__uint(max_entries, WEFT_LB_AFFINITY_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb_affinity SEC(".maps");

/*
 * Per-CPU scratch space for the translation entries the programs write: the
 * pods' programs would exceed the 512-byte BPF stack with them on it.
 */
struct weft_lb_scratch {
	struct weft_lb_ct_key k;
	struct weft_lb_ct_value v;
	struct weft_lb_affinity_key ak;
	struct weft_lb_affinity_value av;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct weft_lb_scratch);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct weft_lb_ct_key);
	__type(value, struct weft_lb_snat_value);
	__uint(max_entries, WEFT_LB_SNAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb_snat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, __u32); /* svc_id */
	__type(value, struct weft_lb_stats);
	__uint(max_entries, WEFT_LB_SVC_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb_stats SEC(".maps");

#endif /* WEFT_LIB_MAPS_H */
