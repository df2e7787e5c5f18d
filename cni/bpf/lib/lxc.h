/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The check point on a pod's host-side veth, top to bottom:
 *   endpoint lookup (unmanaged interface: pass)
 *   → from_pod: source address check (not the endpoint's: drop, see source.h)
 *   → parse (non-IP, IPv6 ND/MLD, non-first fragments: pass; unparseable:
 *     deny when the direction is isolated)
 *   → from_pod: service translation (lb.h): a TCP/UDP packet to a frontend
 *     (ClusterIP:port) is judged from here on as going to its backend; a
 *     frontend without ready backends: refused (RST, ICMP port unreachable);
 *     a pod given itself as the backend, and its answers: hairpinned back
 *     into the pod (weft_lb_hairpin), not judged by policy
 *   → conntrack (established or reply: pass; ICMP error about a tracked
 *     connection: pass)
 *   → policy decision for the new connection
 *   → conntrack entry (when allowed), counters, flow event, verdict
 *   → passed: from_pod rewrites a translated packet to its backend (and
 *     records a new translation); to_pod rewrites a backend's reply back to
 *     the frontend.
 */
#ifndef WEFT_LIB_LXC_H
#define WEFT_LIB_LXC_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "weft_maps.h"
#include "maps.h"
#include "parse.h"
#include "policy.h"
#include "conntrack.h"
#include "flows.h"
#include "source.h"
#include "lb.h"

/*
 * Allowed packets go on to whatever runs after us (TC_ACT_UNSPEC is tcx's
 * TCX_NEXT, and the packet passes when nothing else runs); denied ones drop.
 */
#define WEFT_PASS TC_ACT_UNSPEC
#define WEFT_DROP TC_ACT_SHOT

/* Does the ICMP error in pkt refer to a connection tracked at (ep_id, dir)? */
static __always_inline int weft_ct_related(struct weft_ct_key *k, __u32 ep_id, __u8 dir,
					   const struct weft_pkt *pkt, __u64 now)
{
	struct weft_ct_value *v;

	/* About a packet of the connection that travelled the other way... */
	weft_ct_key_fill(k, ep_id, dir ^ 1, pkt->family, pkt->inner_proto, pkt->inner_saddr,
			 pkt->inner_daddr, pkt->inner_sport, pkt->inner_dport);
	v = weft_ct_find(k, now);
	if (v) {
		weft_count_allowed(v->policy, 0);
		return 1;
	}
	/* ...or about a reply that travelled the other way. */
	weft_ct_key_reverse(k);
	v = weft_ct_find(k, now);
	if (v) {
		weft_count_allowed(v->policy, 0);
		return 1;
	}
	return 0;
}

/*
 * A packet that passed: from_pod puts a translated one on its way to the
 * backend (recording a new translation first), to_pod gives a backend's reply
 * its frontend back. A packet that cannot be rewritten is dropped: sent on
 * half-translated it would only confuse both ends.
 */
static __always_inline int weft_lxc_pass(struct __sk_buff *skb, __u8 dir,
					 const struct weft_pkt *pkt,
					 const struct weft_lb_nat *nat, int reply, __u64 now)
{
	if (dir == WEFT_DIR_EGRESS && nat->active) {
		if (nat->fresh)
			weft_lb_commit(pkt, nat, now);
		if (weft_lb_dnat(skb, pkt, nat) < 0)
			return WEFT_DROP;
	} else if (dir == WEFT_DIR_INGRESS && reply) {
		if (weft_lb_reverse(skb, pkt, now) < 0)
			return WEFT_DROP;
	}
	return WEFT_PASS;
}

static __always_inline int weft_lxc_handle(struct __sk_buff *skb, __u8 dir)
{
	__u32 ifindex = skb->ifindex;
	struct weft_endpoint *ep;
	struct weft_decision d = {};
	struct weft_pkt pkt = {};
	struct weft_lb_nat nat = {};
	struct weft_ct_key k;
	struct weft_ct_value *v;
	__u32 ep_id;
	int isolated, parsed, syn_only;
	__u64 now;

	ep = bpf_map_lookup_elem(&weft_endpoints, &ifindex);
	if (!ep)
		return WEFT_PASS; /* not a managed endpoint */
	ep_id = ep->ep_id;
	isolated = ep->flags &
		   (dir == WEFT_DIR_INGRESS ? WEFT_EP_INGRESS_ISOLATED : WEFT_EP_EGRESS_ISOLATED);

	parsed = weft_parse(skb, &pkt);
	/*
	 * Every IP packet the pod sends, whatever the parse found beyond the IP
	 * header (ND, fragments, bad L4 too), before conntrack: a forged tuple
	 * never gets an entry. family == 0: not IP, or no IP header to read.
	 */
	if (dir == WEFT_DIR_EGRESS && pkt.family && !weft_src_allowed(ifindex, &pkt)) {
		d.reason = WEFT_REASON_SPOOFED_SOURCE;
		weft_count_spoofed(ep_id);
		weft_flow_emit(ep_id, dir, &pkt, &d, bpf_ktime_get_boot_ns());
		return WEFT_DROP;
	}
	if (parsed == WEFT_PARSE_PASS)
		return WEFT_PASS;
	now = bpf_ktime_get_boot_ns();
	if (parsed == WEFT_PARSE_BAD) {
		if (!isolated)
			return WEFT_PASS;
		d.reason = WEFT_REASON_UNPARSEABLE;
		weft_count_denied(ep_id, dir);
		weft_flow_emit(ep_id, dir, &pkt, &d, now);
		return WEFT_DROP;
	}
	if (parsed == WEFT_PARSE_RELATED && weft_ct_related(&k, ep_id, dir, &pkt, now)) {
		/* An error about a translated connection names the frontend again. */
		if (dir == WEFT_DIR_INGRESS && weft_lb_reverse_icmp(skb, &pkt, now) < 0)
			return WEFT_DROP;
		return WEFT_PASS;
	}

	/*
	 * Services: from here on a connection to a frontend is the connection to
	 * its backend (Kubernetes judges egress policy against the backend).
	 */
	if (dir == WEFT_DIR_EGRESS && parsed == WEFT_PARSE_OK) {
		int lb, act;

		if (weft_lb_hairpin_reply(skb, &pkt, now, &act))
			return act;
		lb = weft_lb_lookup(&pkt, &nat, now, 0);
		if (lb == WEFT_LB_REFUSE)
			return weft_lb_refuse(skb, &pkt);
		if (lb == WEFT_LB_XLATE && weft_lb_is_client(&nat.be, &pkt)) {
			nat.hairpin = 1;
			if (nat.fresh)
				weft_lb_commit(&pkt, &nat, now);
			return weft_lb_hairpin(skb, &pkt, &nat);
		}
	}

	/* Established: this tuple was allowed at this check point. */
	weft_ct_key_fill(&k, ep_id, dir, pkt.family, pkt.proto, pkt.saddr, pkt.daddr, pkt.sport,
			 pkt.dport);
	v = weft_ct_find(&k, now);
	syn_only = pkt.proto == IPPROTO_TCP &&
		   (pkt.tcp_flags & (WEFT_TCP_SYN | WEFT_TCP_ACK)) == WEFT_TCP_SYN;
	/* A new SYN on a closed connection's tuple is a new connection. */
	if (v && !(syn_only && WEFT_CT_CLOSED(v->flags))) {
		weft_ct_touch(v, &pkt, 0, now);
		weft_count_allowed(v->policy, 0);
		return weft_lxc_pass(skb, dir, &pkt, &nat, 0, now);
	}

	/* Reply: the reversed tuple was allowed the other way. */
	weft_ct_key_reverse(&k);
	v = weft_ct_find(&k, now);
	if (v) {
		weft_ct_touch(v, &pkt, 1, now);
		weft_count_allowed(v->policy, 0);
		return weft_lxc_pass(skb, dir, &pkt, &nat, 1, now);
	}
	weft_ct_key_reverse(&k);

	/* New connection. */
	weft_policy_decide(ep_id, dir, isolated, &pkt, &d);
	weft_flow_emit(ep_id, dir, &pkt, &d, now);
	if (!d.allowed) {
		weft_count_denied(ep_id, dir);
		/* An expired entry for this tuple would only linger until LRU eviction. */
		bpf_map_delete_elem(&weft_ct, &k);
		return WEFT_DROP;
	}
	/*
	 * Always tracked, also when not isolated: the replies then pass an
	 * isolated other direction.
	 */
	weft_ct_create(&k, d.policy, &pkt, now);
	weft_count_allowed(d.policy, 1);
	return weft_lxc_pass(skb, dir, &pkt, &nat, 0, now);
}

#endif /* WEFT_LIB_LXC_H */
