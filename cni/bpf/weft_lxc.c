/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The programs on a pod's host-side veth (tc clsact / tcx), in the spirit of
 * Cilium's bpf_lxc.c. Two thin entry points; the logic is in lib/lxc.h.
 *
 *   from_pod: tc ingress on the host veth = packets leaving the pod
 *             = the pod's egress policy.
 *   to_pod:   tc egress on the host veth = packets entering the pod
 *             = the pod's ingress policy.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "weft_maps.h"
#include "lib/lxc.h"

SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	return weft_lxc_handle(skb, WEFT_DIR_EGRESS);
}

SEC("classifier")
int to_pod(struct __sk_buff *skb)
{
	return weft_lxc_handle(skb, WEFT_DIR_INGRESS);
}

/*
 * Never called: keeps struct weft_flow_event in the object's BTF (ring buffer
 * records have no map value type), so the layout test in
 * cni/datapath/src/abi.rs can check the Rust mirror against it.
 */
__attribute__((noinline, used)) int weft_btf_flow_event(struct weft_flow_event *e)
{
	return e != 0;
}

char _license[] SEC("license") = "Apache-2.0";
