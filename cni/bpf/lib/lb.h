/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Services in the datapath (the kube-proxy replacement), in the spirit of
 * Cilium's lib/lb.h: a frontend (ClusterIP or node address, port, protocol)
 * is translated to one of its ready backends for a new connection, every
 * later packet of the connection goes to the same backend, and the backend's
 * replies get the frontend back as their source.
 *
 *   from_pod: weft_lb_lookup (before conntrack and policy, so egress policy
 *             judges the backend, as Kubernetes does) → verdict → on pass
 *             weft_lb_commit (FORWARD + REVERSE entries, affinity) and
 *             weft_lb_dnat (the packet's destination rewritten).
 *   to_pod:   a reply that passed the reply check → weft_lb_reverse (its
 *             source rewritten back to the frontend).
 *   no ready backend: weft_lb_refuse turns the packet into a TCP RST or an
 *             ICMP/ICMPv6 port unreachable (UDP) and hands it straight back into
 *             the pod (bpf_redirect_peer): connect() fails with ECONNREFUSED at
 *             once, UDP sockets see the error, nothing is blackholed.
 *
 * Only TCP and UDP are translated. A meshed pod's app never reaches here with
 * a ClusterIP destination: the pod's own iptables REDIRECT sends it to the
 * sidecar first, and the sidecar connects to pod addresses itself.
 */
#ifndef WEFT_LIB_LB_H
#define WEFT_LIB_LB_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "weft_maps.h"
#include "maps.h"
#include "parse.h"
#include "conntrack.h"

enum weft_lb_result {
	WEFT_LB_NONE,   /* not a service connection */
	WEFT_LB_XLATE,  /* translated: pkt now carries the backend, nat the frontend */
	WEFT_LB_REFUSE, /* a frontend without ready backends */
};

/* What a translated connection needs until the verdict is in. */
struct weft_lb_nat {
	__u8 active;  /* the packet goes to a frontend */
	__u8 fresh;   /* a new translation: entries to write once the packet passes */
	__u8 hairpin; /* the backend is the client itself (see weft_lb_hairpin) */
	__u8 pad;
	__u16 svc_port; /* the frontend port, network byte order */
	__u16 pad2;
	__u32 svc_id;
	__u32 svc_flags;
	__u32 affinity_timeout_s;
	__u8 svc_addr[16]; /* the frontend address */
	struct weft_lb_backend be;
};

/* TCP checksum at +16, UDP at +6 of the L4 header. */
#define WEFT_TCP_CSUM_OFF 16
#define WEFT_UDP_CSUM_OFF 6
#define WEFT_IP4_CSUM_OFF (ETH_HLEN + 10)
#define WEFT_IP4_SADDR_OFF (ETH_HLEN + 12)
#define WEFT_IP4_DADDR_OFF (ETH_HLEN + 16)
#define WEFT_IP6_SADDR_OFF (ETH_HLEN + 8)
#define WEFT_IP6_DADDR_OFF (ETH_HLEN + 24)

/* A FORWARD entry the client closed (FIN or RST) is replaced by a new SYN. */
#define WEFT_LB_CT_CLOSED(flags) ((flags) & (WEFT_CT_FIN_ORIG | WEFT_CT_RST))

static __always_inline void weft_lb_ct_key_fill(struct weft_lb_ct_key *k, __u8 family, __u8 proto,
						__u8 dir, const __u8 *saddr, const __u8 *daddr,
						__u16 sport, __u16 dport)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->family = family;
	k->proto = proto;
	k->dir = dir;
	__builtin_memcpy(k->saddr, saddr, 16);
	__builtin_memcpy(k->daddr, daddr, 16);
	k->sport = sport;
	k->dport = dport;
}

/* The address a pod reaching itself through a Service sees as the client. */
static __always_inline void weft_lb_hairpin_addr(__u8 family, __u8 *out)
{
	const __u8 v4[4] = WEFT_HAIRPIN_V4;
	const __u8 v6[16] = WEFT_HAIRPIN_V6;

	__builtin_memset(out, 0, 16);
	if (family == 4)
		__builtin_memcpy(out, v4, 4);
	else
		__builtin_memcpy(out, v6, 16);
}

static __always_inline int weft_lb_addr_eq(const __u8 *a, const __u8 *b)
{
	__u64 a0, a1, b0, b1;

	__builtin_memcpy(&a0, a, 8);
	__builtin_memcpy(&a1, a + 8, 8);
	__builtin_memcpy(&b0, b, 8);
	__builtin_memcpy(&b1, b + 8, 8);
	return a0 == b0 && a1 == b1;
}

/*
 * Is a translation entry (weft_lb_ct, weft_lb_snat) last seen at `seen` with
 * these WEFT_CT_* flags still live?
 */
static __always_inline int weft_lb_live(__u64 seen, __u32 flags, __u8 proto, __u64 now)
{
	__u64 timeout = WEFT_CT_TIMEOUT_OTHER_NS;

	if (proto == IPPROTO_TCP)
		/* Either side's FIN or a RST: closing (each entry sees one side). */
		timeout = (flags & (WEFT_CT_RST | WEFT_CT_FIN_ORIG | WEFT_CT_FIN_REPLY))
				  ? WEFT_CT_TIMEOUT_CLOSING_NS
				  : WEFT_CT_TIMEOUT_TCP_NS;
	if (seen >= now)
		return 1;
	return now - seen <= timeout;
}

static __always_inline int weft_lb_ct_live(const struct weft_lb_ct_value *v, __u8 proto,
					   __u64 now)
{
	return weft_lb_live(v->last_seen_ns, v->flags, proto, now);
}

/* A packet of a translation entry's direction: last seen, FIN and RST. */
static __always_inline void weft_lb_touch(__u64 *last_seen, __u32 *flags,
					  const struct weft_pkt *pkt, int reply, __u64 now)
{
	if (now > *last_seen + WEFT_CT_REFRESH_NS)
		*last_seen = now;
	if (pkt->proto != IPPROTO_TCP)
		return;
	if ((pkt->tcp_flags & WEFT_TCP_RST) && !(*flags & WEFT_CT_RST))
		*flags |= WEFT_CT_RST;
	if (pkt->tcp_flags & WEFT_TCP_FIN) {
		__u32 bit = reply ? WEFT_CT_FIN_REPLY : WEFT_CT_FIN_ORIG;

		if (!(*flags & bit))
			*flags |= bit;
	}
}

static __always_inline void weft_lb_ct_touch(struct weft_lb_ct_value *v,
					     const struct weft_pkt *pkt, int reply, __u64 now)
{
	weft_lb_touch(&v->last_seen_ns, &v->flags, pkt, reply, now);
}

static __always_inline void weft_lb_count(__u32 svc_id, int refused)
{
	struct weft_lb_stats init = {
		.conns = refused ? 0 : 1,
		.refused = refused ? 1 : 0,
	};
	struct weft_lb_stats *s = bpf_map_lookup_elem(&weft_lb_stats, &svc_id);

	if (!s) {
		if (bpf_map_update_elem(&weft_lb_stats, &svc_id, &init, BPF_NOEXIST) == 0)
			return;
		s = bpf_map_lookup_elem(&weft_lb_stats, &svc_id);
		if (!s)
			return;
	}
	if (refused)
		s->refused++;
	else
		s->conns++;
}

static __always_inline int weft_lb_same_backend(const struct weft_lb_backend *a,
						const struct weft_lb_backend *b)
{
	return weft_lb_addr_eq(a->addr, b->addr) && a->port == b->port;
}

/* Is be still one of svc's backends? (An affinity must not outlive its endpoint.) */
static __always_inline int weft_lb_has_backend(const struct weft_lb_svc *svc, __u32 count,
					       const struct weft_lb_backend *be)
{
	__u32 i;

	for (i = 0; i < WEFT_LB_MAX_BACKENDS; i++) {
		if (i >= count)
			return 0;
		if (weft_lb_same_backend(&svc->backends[i], be))
			return 1;
	}
	return 0;
}

/* Is backend b the client's own address? */
static __always_inline int weft_lb_is_client(const struct weft_lb_backend *b,
					     const struct weft_pkt *pkt)
{
	return weft_lb_addr_eq(b->addr, pkt->saddr);
}

/* A backend for a new connection: the client's affinity if it holds, else random. */
static __always_inline void weft_lb_pick(const struct weft_lb_svc *svc,
					 const struct weft_pkt *pkt, struct weft_lb_nat *nat,
					 __u64 now)
{
	__u32 count = svc->count;
	__u32 idx;

	if (count > WEFT_LB_MAX_BACKENDS)
		count = WEFT_LB_MAX_BACKENDS;
	if (svc->flags & WEFT_LB_F_AFFINITY) {
		struct weft_lb_affinity_key ak = {};
		struct weft_lb_affinity_value *av;
		__u64 timeout = (__u64)svc->affinity_timeout_s * WEFT_NSEC_PER_SEC;

		ak.svc_id = svc->svc_id;
		ak.family = pkt->family;
		__builtin_memcpy(ak.client, pkt->saddr, 16);
		av = bpf_map_lookup_elem(&weft_lb_affinity, &ak);
		if (av && (av->last_seen_ns >= now || now - av->last_seen_ns <= timeout) &&
		    weft_lb_has_backend(svc, count, &av->backend)) {
			nat->be = av->backend;
			return;
		}
	}
	idx = bpf_get_prandom_u32() % count;
	idx &= WEFT_LB_MAX_BACKENDS - 1; /* idx < count <= MAX already; for the verifier */
	/*
	 * Hairpin: a pod whose connection would go to itself gets the next backend
	 * instead (its reply would never leave the pod, so the connection could not
	 * be reverse-translated). Only a Service whose sole backend is the client
	 * itself still fails.
	 */
	if (count > 1 && weft_lb_is_client(&svc->backends[idx], pkt)) {
		idx = (idx + 1) % count;
		idx &= WEFT_LB_MAX_BACKENDS - 1;
	}
	nat->be = svc->backends[idx];
}

/* Puts the backend into the tuple the rest of the check point judges. */
static __always_inline void weft_lb_to_backend(struct weft_pkt *pkt, const struct weft_lb_nat *nat)
{
	__builtin_memcpy(pkt->daddr, nat->be.addr, 16);
	pkt->dport = nat->be.port;
}

/*
 * from_pod, before conntrack and policy: is this a connection to a frontend?
 * WEFT_LB_XLATE: pkt's destination is now the backend and nat says how to
 * rewrite the packet once it passes; WEFT_LB_REFUSE: no ready backend.
 */
static __always_inline int weft_lb_lookup(struct weft_pkt *pkt, struct weft_lb_nat *nat, __u64 now,
					  int nodeport_only)
{
	struct weft_lb_ct_key ck;
	struct weft_lb_ct_value *cv;
	struct weft_lb_svc_key sk = {};
	struct weft_lb_svc *svc;
	int syn_only;

	if (pkt->proto != IPPROTO_TCP && pkt->proto != IPPROTO_UDP)
		return WEFT_LB_NONE;

	/* A connection already translated keeps its backend. */
	weft_lb_ct_key_fill(&ck, pkt->family, pkt->proto, WEFT_LB_CT_FORWARD, pkt->saddr,
			    pkt->daddr, pkt->sport, pkt->dport);
	cv = bpf_map_lookup_elem(&weft_lb_ct, &ck);
	syn_only = pkt->proto == IPPROTO_TCP &&
		   (pkt->tcp_flags & (WEFT_TCP_SYN | WEFT_TCP_ACK)) == WEFT_TCP_SYN;
	if (cv && weft_lb_ct_live(cv, pkt->proto, now) &&
	    !(syn_only && WEFT_LB_CT_CLOSED(cv->flags))) {
		weft_lb_ct_touch(cv, pkt, 0, now);
		nat->active = 1;
		nat->svc_id = cv->svc_id;
		nat->svc_port = pkt->dport;
		__builtin_memcpy(nat->svc_addr, pkt->daddr, 16);
		__builtin_memcpy(nat->be.addr, cv->addr, 16);
		nat->be.port = cv->port;
		weft_lb_to_backend(pkt, nat);
		return WEFT_LB_XLATE;
	}

	sk.family = pkt->family;
	sk.proto = pkt->proto;
	sk.port = pkt->dport;
	__builtin_memcpy(sk.addr, pkt->daddr, 16);
	svc = bpf_map_lookup_elem(&weft_lb_svc, &sk);
	if (!svc || (nodeport_only && !(svc->flags & WEFT_LB_F_NODEPORT)))
		return WEFT_LB_NONE;
	if (svc->count == 0) {
		weft_lb_count(svc->svc_id, 1);
		return WEFT_LB_REFUSE;
	}
	nat->active = 1;
	nat->fresh = 1;
	nat->svc_id = svc->svc_id;
	nat->svc_flags = svc->flags;
	nat->affinity_timeout_s = svc->affinity_timeout_s;
	nat->svc_port = pkt->dport;
	__builtin_memcpy(nat->svc_addr, pkt->daddr, 16);
	weft_lb_pick(svc, pkt, nat, now);
	weft_lb_to_backend(pkt, nat);
	return WEFT_LB_XLATE;
}

static __always_inline void weft_lb_remember(const struct weft_pkt *pkt,
					     const struct weft_lb_nat *nat, __u64 now);

/*
 * A new translated connection passed: FORWARD and REVERSE entries, the
 * client's affinity, the counter. pkt carries the backend as destination.
 */
static __always_inline void weft_lb_commit(const struct weft_pkt *pkt,
					   const struct weft_lb_nat *nat, __u64 now)
{
	__u32 zero = 0;
	struct weft_lb_scratch *s = bpf_map_lookup_elem(&weft_lb_scratch, &zero);

	if (!s)
		return;
	__builtin_memset(&s->v, 0, sizeof(s->v));
	s->v.created_ns = now;
	s->v.last_seen_ns = now;
	s->v.svc_id = nat->svc_id;
	if (pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & WEFT_TCP_RST))
		s->v.flags = WEFT_CT_RST;
	/* The reverse entry first: a reply can only come once the packet left. */
	weft_lb_ct_key_fill(&s->k, pkt->family, pkt->proto, WEFT_LB_CT_REVERSE, nat->be.addr,
			    pkt->saddr, nat->be.port, pkt->sport);
	/* The backend answers the client, or the hairpin address. */
	if (nat->hairpin)
		weft_lb_hairpin_addr(pkt->family, s->k.daddr);
	__builtin_memcpy(s->v.addr, nat->svc_addr, 16);
	s->v.port = nat->svc_port;
	bpf_map_update_elem(&weft_lb_ct, &s->k, &s->v, BPF_ANY);

	weft_lb_ct_key_fill(&s->k, pkt->family, pkt->proto, WEFT_LB_CT_FORWARD, pkt->saddr,
			    nat->svc_addr, pkt->sport, nat->svc_port);
	__builtin_memcpy(s->v.addr, nat->be.addr, 16);
	s->v.port = nat->be.port;
	bpf_map_update_elem(&weft_lb_ct, &s->k, &s->v, BPF_ANY);
	weft_lb_remember(pkt, nat, now);
}

/* A new connection to nat's backend: the client's affinity, the counter. */
static __always_inline void weft_lb_remember(const struct weft_pkt *pkt,
					     const struct weft_lb_nat *nat, __u64 now)
{
	__u32 zero = 0;
	struct weft_lb_scratch *s;

	if (nat->svc_flags & WEFT_LB_F_AFFINITY) {
		s = bpf_map_lookup_elem(&weft_lb_scratch, &zero);
		if (s) {
			__builtin_memset(&s->ak, 0, sizeof(s->ak));
			__builtin_memset(&s->av, 0, sizeof(s->av));
			s->ak.svc_id = nat->svc_id;
			s->ak.family = pkt->family;
			__builtin_memcpy(s->ak.client, pkt->saddr, 16);
			s->av.last_seen_ns = now;
			s->av.backend = nat->be;
			bpf_map_update_elem(&weft_lb_affinity, &s->ak, &s->av, BPF_ANY);
		}
	}
	weft_lb_count(nat->svc_id, 0);
}

/*
 * Rewrites one address and port of the packet (dst: the destination, else
 * the source) with the checksums fixed incrementally: the IPv4 header's, and
 * TCP's or UDP's over the pseudo header (a UDP checksum of 0, "none", stays
 * 0). Returns 0, or <0 when the packet could not be written.
 */
static __always_inline int weft_lb_rewrite(struct __sk_buff *skb, const struct weft_pkt *pkt,
					   int dst, const __u8 *from, const __u8 *to,
					   __u16 from_port, __u16 to_port)
{
	__u32 l4 = pkt->l4off;
	__u32 csum_off = l4 + (pkt->proto == IPPROTO_TCP ? WEFT_TCP_CSUM_OFF : WEFT_UDP_CSUM_OFF);
	__u64 mangled = pkt->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (pkt->family == 4) {
		__u32 o, n;

		__builtin_memcpy(&o, from, 4);
		__builtin_memcpy(&n, to, 4);
		if (o != n) {
			if (bpf_l4_csum_replace(skb, csum_off, o, n,
						BPF_F_PSEUDO_HDR | mangled | sizeof(n)) < 0)
				return -1;
			if (bpf_l3_csum_replace(skb, WEFT_IP4_CSUM_OFF, o, n, sizeof(n)) < 0)
				return -1;
			if (bpf_skb_store_bytes(skb, dst ? WEFT_IP4_DADDR_OFF : WEFT_IP4_SADDR_OFF,
						&n, sizeof(n), 0) < 0)
				return -1;
		}
	} else {
		__u8 f[16], t[16];
		__s64 diff;

		__builtin_memcpy(f, from, 16);
		__builtin_memcpy(t, to, 16);
		diff = bpf_csum_diff((__be32 *)f, 16, (__be32 *)t, 16, 0);
		if (diff < 0)
			return -1;
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff,
					BPF_F_PSEUDO_HDR | BPF_F_IPV6 | mangled) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, dst ? WEFT_IP6_DADDR_OFF : WEFT_IP6_SADDR_OFF, t,
					16, 0) < 0)
			return -1;
	}
	if (from_port != to_port) {
		if (bpf_l4_csum_replace(skb, csum_off, from_port, to_port,
					mangled | sizeof(to_port)) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, l4 + (dst ? 2 : 0), &to_port, sizeof(to_port), 0) < 0)
			return -1;
	}
	return 0;
}

/*
 * from_pod, after the verdict: the packet to the frontend goes to the backend.
 * pkt carries the backend, nat the frontend the client addressed.
 */
static __always_inline int weft_lb_dnat(struct __sk_buff *skb, const struct weft_pkt *pkt,
					const struct weft_lb_nat *nat)
{
	return weft_lb_rewrite(skb, pkt, 1, nat->svc_addr, nat->be.addr, nat->svc_port,
			       nat->be.port);
}

/*
 * to_pod, a reply that passed: when it answers a translated connection, its
 * source becomes the frontend again. Returns <0 when rewriting failed.
 */
static __always_inline int weft_lb_reverse(struct __sk_buff *skb, const struct weft_pkt *pkt,
					   __u64 now)
{
	struct weft_lb_ct_key k;
	struct weft_lb_ct_value *v;
	__u8 addr[16];
	__u16 port;

	if (pkt->proto != IPPROTO_TCP && pkt->proto != IPPROTO_UDP)
		return 0;
	weft_lb_ct_key_fill(&k, pkt->family, pkt->proto, WEFT_LB_CT_REVERSE, pkt->saddr,
			    pkt->daddr, pkt->sport, pkt->dport);
	v = bpf_map_lookup_elem(&weft_lb_ct, &k);
	if (!v || !weft_lb_ct_live(v, pkt->proto, now))
		return 0;
	weft_lb_ct_touch(v, pkt, 1, now);
	__builtin_memcpy(addr, v->addr, 16);
	port = v->port;
	return weft_lb_rewrite(skb, pkt, 0, pkt->saddr, addr, pkt->sport, port);
}

/*
 * to_pod, an ICMP error that passed as related (PMTU, port unreachable)
 * about a translated connection: the embedded packet is the client's as it
 * left toward the backend, which the client's socket (connected to the
 * frontend) would not recognise. Its destination becomes the frontend again,
 * and so does the error's source when the backend itself sent it. Checksums:
 * the embedded IPv4 header's and the ICMP/ICMPv6 one; the embedded L4
 * checksum is left alone (the kernel does not check it in an error).
 * Returns 0 (nothing to do, or rewritten), <0 when rewriting failed.
 */
static __always_inline int weft_lb_reverse_icmp(struct __sk_buff *skb,
						const struct weft_pkt *pkt, __u64 now)
{
	struct weft_lb_ct_key k;
	struct weft_lb_ct_value *v;
	__u32 csum = pkt->l4off + 2; /* ICMP and ICMPv6 checksums */
	__u32 inner = pkt->l4off + 8;
	__u32 inner_l4, daddr_off;
	__u8 front[16];
	__u16 front_port;

	if (pkt->inner_proto != IPPROTO_TCP && pkt->inner_proto != IPPROTO_UDP)
		return 0;
	weft_lb_ct_key_fill(&k, pkt->family, pkt->inner_proto, WEFT_LB_CT_REVERSE,
			    pkt->inner_daddr, pkt->inner_saddr, pkt->inner_dport,
			    pkt->inner_sport);
	v = bpf_map_lookup_elem(&weft_lb_ct, &k);
	if (!v || !weft_lb_ct_live(v, pkt->inner_proto, now))
		return 0;
	__builtin_memcpy(front, v->addr, 16);
	front_port = v->port;
	if (pkt->family == 4) {
		__u8 ver_ihl;
		__u16 old_check, new_check;
		__u32 from, to;

		if (bpf_skb_load_bytes(skb, inner, &ver_ihl, 1) < 0 ||
		    bpf_skb_load_bytes(skb, inner + 10, &old_check, 2) < 0)
			return -1;
		inner_l4 = inner + (ver_ihl & 0x0f) * 4;
		daddr_off = inner + 16;
		__builtin_memcpy(&from, pkt->inner_daddr, 4);
		__builtin_memcpy(&to, front, 4);
		/* The embedded header's checksum, then the ICMP one over both changes. */
		if (bpf_l3_csum_replace(skb, inner + 10, from, to, 4) < 0 ||
		    bpf_skb_load_bytes(skb, inner + 10, &new_check, 2) < 0 ||
		    bpf_l4_csum_replace(skb, csum, old_check, new_check, 2) < 0 ||
		    bpf_l4_csum_replace(skb, csum, from, to, 4) < 0 ||
		    bpf_skb_store_bytes(skb, daddr_off, &to, 4, 0) < 0)
			return -1;
		/* The backend itself answered: the error comes from the frontend. */
		if (weft_lb_addr_eq(pkt->saddr, pkt->inner_daddr)) {
			__builtin_memcpy(&from, pkt->saddr, 4);
			if (bpf_l3_csum_replace(skb, WEFT_IP4_CSUM_OFF, from, to, 4) < 0 ||
			    bpf_skb_store_bytes(skb, WEFT_IP4_SADDR_OFF, &to, 4, 0) < 0)
				return -1;
		}
	} else {
		__u8 f[16], t[16];
		__s64 diff;

		inner_l4 = inner + sizeof(struct weft_ip6);
		daddr_off = inner + 24;
		__builtin_memcpy(f, pkt->inner_daddr, 16);
		__builtin_memcpy(t, front, 16);
		diff = bpf_csum_diff((__be32 *)f, 16, (__be32 *)t, 16, 0);
		if (diff < 0 || bpf_l4_csum_replace(skb, csum, 0, diff, 0) < 0 ||
		    bpf_skb_store_bytes(skb, daddr_off, t, 16, 0) < 0)
			return -1;
		/* ICMPv6's checksum covers the source address too (pseudo header). */
		if (weft_lb_addr_eq(pkt->saddr, pkt->inner_daddr)) {
			if (bpf_l4_csum_replace(skb, csum, 0, diff, BPF_F_PSEUDO_HDR) < 0 ||
			    bpf_skb_store_bytes(skb, WEFT_IP6_SADDR_OFF, t, 16, 0) < 0)
				return -1;
		}
	}
	/* The embedded destination port (2 bytes into the embedded L4 header). */
	if (front_port != pkt->inner_dport &&
	    (bpf_l4_csum_replace(skb, csum, pkt->inner_dport, front_port, 2) < 0 ||
	     bpf_skb_store_bytes(skb, inner_l4 + 2, &front_port, 2, 0) < 0))
		return -1;
	return 0;
}

/* The folded one's complement of a bpf_csum_diff sum. */
static __always_inline __u16 weft_csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

struct weft_icmp_err_head {
	__u8 type;
	__u8 code;
	__u16 csum;
	__u32 unused;
};

/* An ICMP port unreachable about an IPv4 packet, from after the Ethernet header. */
struct weft_icmp4_err {
	struct weft_ip4 ip;
	struct weft_icmp_err_head icmp;
	struct weft_ip4 inner;  /* the refused packet's header (no options) */
	__u8 inner_l4[8];       /* and its first 8 bytes of L4: ports, TCP sequence */
};

/* An ICMPv6 port unreachable about an IPv6 packet, from after the Ethernet header. */
struct weft_icmp6_err {
	struct weft_ip6 ip;
	struct weft_icmp_err_head icmp;
	struct weft_ip6 inner;
	__u8 inner_l4[8];
};

/* The ICMPv6 checksum's pseudo header. */
struct weft_ip6_pseudo {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 len;  /* network byte order */
	__u32 next; /* network byte order: 58 */
};

#define WEFT_ICMP_PORT_UNREACH 3
#define WEFT_ICMP6_PORT_UNREACH 4

static __always_inline int weft_lb_swap_macs(struct __sk_buff *skb)
{
	__u8 eth[ETH_HLEN], mac[ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, eth, sizeof(eth)) < 0)
		return -1;
	__builtin_memcpy(mac, eth, ETH_ALEN);
	__builtin_memcpy(eth, eth + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(eth + ETH_ALEN, mac, ETH_ALEN);
	return bpf_skb_store_bytes(skb, 0, eth, sizeof(eth), 0);
}

/* The packet becomes the answer r (IP header on): MACs swapped, trimmed, written. */
static __always_inline int weft_lb_answer(struct __sk_buff *skb, const void *r, __u32 len)
{
	if (weft_lb_swap_macs(skb) < 0)
		return -1;
	if (bpf_skb_change_tail(skb, ETH_HLEN + len, 0) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, ETH_HLEN, r, len, 0);
}

static __always_inline int weft_lb_refuse4(struct __sk_buff *skb, const struct weft_pkt *pkt)
{
	struct weft_icmp4_err r = {};

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &r.inner, sizeof(r.inner)) < 0)
		return -1;
	if ((r.inner.ver_ihl & 0x0f) != 5 || pkt->l4off != ETH_HLEN + sizeof(r.inner))
		return -1; /* IPv4 options: not answered */
	if (bpf_skb_load_bytes(skb, pkt->l4off, r.inner_l4, sizeof(r.inner_l4)) < 0)
		return -1;
	r.ip.ver_ihl = 0x45;
	r.ip.tot_len = bpf_htons(sizeof(r));
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	__builtin_memcpy(r.ip.saddr, r.inner.daddr, 4);
	__builtin_memcpy(r.ip.daddr, r.inner.saddr, 4);
	r.ip.check = weft_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r.ip, sizeof(r.ip), 0));
	r.icmp.type = WEFT_ICMP_DEST_UNREACH;
	r.icmp.code = WEFT_ICMP_PORT_UNREACH;
	r.icmp.csum = weft_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r.icmp,
						   sizeof(r) - sizeof(r.ip), 0));
	return weft_lb_answer(skb, &r, sizeof(r));
}

static __always_inline int weft_lb_refuse6(struct __sk_buff *skb, const struct weft_pkt *pkt)
{
	struct weft_icmp6_err r = {};
	struct weft_ip6_pseudo ph = {};
	__s64 sum;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &r.inner, sizeof(r.inner)) < 0)
		return -1;
	if (pkt->l4off != ETH_HLEN + sizeof(r.inner))
		return -1; /* extension headers: not answered */
	if (bpf_skb_load_bytes(skb, pkt->l4off, r.inner_l4, sizeof(r.inner_l4)) < 0)
		return -1;
	r.ip.ver_tc_flow = bpf_htonl(0x60000000);
	r.ip.payload_len = bpf_htons(sizeof(r) - sizeof(r.ip));
	r.ip.nexthdr = WEFT_IPPROTO_ICMPV6;
	r.ip.hop_limit = 64;
	__builtin_memcpy(r.ip.saddr, r.inner.daddr, 16);
	__builtin_memcpy(r.ip.daddr, r.inner.saddr, 16);
	r.icmp.type = WEFT_ICMP6_DEST_UNREACH;
	r.icmp.code = WEFT_ICMP6_PORT_UNREACH;
	__builtin_memcpy(ph.saddr, r.ip.saddr, 16);
	__builtin_memcpy(ph.daddr, r.ip.daddr, 16);
	ph.len = bpf_htonl(sizeof(r) - sizeof(r.ip));
	ph.next = bpf_htonl(WEFT_IPPROTO_ICMPV6);
	sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	if (sum < 0)
		return -1;
	r.icmp.csum = weft_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r.icmp,
						   sizeof(r) - sizeof(r.ip), (__u32)sum));
	return weft_lb_answer(skb, &r, sizeof(r));
}

/* A TCP header without options. */
struct weft_tcp_hdr {
	__u16 sport;
	__u16 dport;
	__u32 seq;
	__u32 ack;
	__u8 doff; /* data offset in the high 4 bits */
	__u8 flags;
	__u16 window;
	__u16 csum;
	__u16 urg;
};

/*
 * The RST answering a TCP segment (RFC 9293 3.10.7.1): to a segment with ACK,
 * seq = its ACK; else seq 0 and ACK = its seq + 1 for a SYN. Fills th; the
 * checksum is the caller's.
 */
static __always_inline int weft_lb_rst_hdr(struct __sk_buff *skb, const struct weft_pkt *pkt,
					   struct weft_tcp_hdr *th)
{
	struct weft_tcp_head in;

	if (bpf_skb_load_bytes(skb, pkt->l4off, &in, sizeof(in)) < 0)
		return -1;
	__builtin_memset(th, 0, sizeof(*th));
	th->sport = in.dport;
	th->dport = in.sport;
	th->doff = 5 << 4;
	if (in.flags & WEFT_TCP_ACK) {
		th->seq = in.ack;
		th->flags = WEFT_TCP_RST;
	} else {
		th->ack = bpf_htonl(bpf_ntohl(in.seq) + ((in.flags & WEFT_TCP_SYN) ? 1 : 0));
		th->flags = WEFT_TCP_RST | WEFT_TCP_ACK;
	}
	return 0;
}

struct weft_rst4 {
	struct weft_ip4 ip;
	struct weft_tcp_hdr tcp;
};

struct weft_rst6 {
	struct weft_ip6 ip;
	struct weft_tcp_hdr tcp;
};

static __always_inline int weft_lb_rst4(struct __sk_buff *skb, const struct weft_pkt *pkt)
{
	struct weft_rst4 r = {};
	__u32 ph[3];
	__s64 sum;

	if (weft_lb_rst_hdr(skb, pkt, &r.tcp) < 0)
		return -1;
	r.ip.ver_ihl = 0x45;
	r.ip.tot_len = bpf_htons(sizeof(r));
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_TCP;
	__builtin_memcpy(r.ip.saddr, pkt->daddr, 4);
	__builtin_memcpy(r.ip.daddr, pkt->saddr, 4);
	r.ip.check = weft_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r.ip, sizeof(r.ip), 0));
	__builtin_memcpy(&ph[0], r.ip.saddr, 4);
	__builtin_memcpy(&ph[1], r.ip.daddr, 4);
	ph[2] = bpf_htonl((IPPROTO_TCP << 16) | sizeof(r.tcp));
	sum = bpf_csum_diff(0, 0, (__be32 *)ph, sizeof(ph), 0);
	if (sum < 0)
		return -1;
	r.tcp.csum = weft_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r.tcp, sizeof(r.tcp),
						  (__u32)sum));
	return weft_lb_answer(skb, &r, sizeof(r));
}

static __always_inline int weft_lb_rst6(struct __sk_buff *skb, const struct weft_pkt *pkt)
{
	struct weft_rst6 r = {};
	struct weft_ip6_pseudo ph = {};
	__s64 sum;

	if (weft_lb_rst_hdr(skb, pkt, &r.tcp) < 0)
		return -1;
	r.ip.ver_tc_flow = bpf_htonl(0x60000000);
	r.ip.payload_len = bpf_htons(sizeof(r.tcp));
	r.ip.nexthdr = IPPROTO_TCP;
	r.ip.hop_limit = 64;
	__builtin_memcpy(r.ip.saddr, pkt->daddr, 16);
	__builtin_memcpy(r.ip.daddr, pkt->saddr, 16);
	__builtin_memcpy(ph.saddr, r.ip.saddr, 16);
	__builtin_memcpy(ph.daddr, r.ip.daddr, 16);
	ph.len = bpf_htonl(sizeof(r.tcp));
	ph.next = bpf_htonl(IPPROTO_TCP);
	sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	if (sum < 0)
		return -1;
	r.tcp.csum = weft_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r.tcp, sizeof(r.tcp),
						  (__u32)sum));
	return weft_lb_answer(skb, &r, sizeof(r));
}

/*
 * A new connection to a frontend without ready backends: the packet becomes
 * the answer refusing it and the caller sends it back where it came from. TCP
 * gets a RST (a SYN_SENT socket takes it even while connect() holds the socket
 * lock: the segment waits in the socket's backlog, where an ICMP error would
 * only be a soft error until the SYN is retransmitted); UDP an ICMP / ICMPv6
 * port unreachable. <0: not answered (IPv4 options, IPv6 extension headers).
 */
static __always_inline int weft_lb_refusal(struct __sk_buff *skb, const struct weft_pkt *pkt)
{
	if (pkt->proto == IPPROTO_TCP)
		return pkt->family == 4 ? weft_lb_rst4(skb, pkt) : weft_lb_rst6(skb, pkt);
	return pkt->family == 4 ? weft_lb_refuse4(skb, pkt) : weft_lb_refuse6(skb, pkt);
}

/*
 * from_pod: the refusal goes straight back into the pod (the veth peer's
 * ingress: it does not pass to_pod, it is our own answer). A packet that
 * cannot be answered is dropped.
 */
static __always_inline int weft_lb_refuse(struct __sk_buff *skb, const struct weft_pkt *pkt)
{
	if (weft_lb_refusal(skb, pkt) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_peer(skb->ifindex, 0);
}

/*
 * Hairpin, from_pod: the pod's connection to a Service was given the pod
 * itself as its backend (it is the Service's only ready endpoint; the
 * caller recorded a new translation with nat->hairpin set). The
 * packet goes straight back into the pod with the backend as destination and
 * WEFT_HAIRPIN_V4/V6 as source: the pod's own address would make the answer
 * stay inside the pod, where nothing could give it the frontend back. Such a
 * connection is not judged by policy: a pod reaching itself is not a
 * connection between two pods (kube-proxy likewise masquerades hairpin
 * traffic to the node, which policy always allows).
 */
static __always_inline int weft_lb_hairpin(struct __sk_buff *skb, const struct weft_pkt *pkt,
				     const struct weft_lb_nat *nat)
{
	__u8 hp[16];

	weft_lb_hairpin_addr(pkt->family, hp);
	if (weft_lb_dnat(skb, pkt, nat) < 0 ||
	    weft_lb_rewrite(skb, pkt, 0, pkt->saddr, hp, pkt->sport, pkt->sport) < 0 ||
	    weft_lb_swap_macs(skb) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_peer(skb->ifindex, 0);
}

/*
 * Hairpin, from_pod: the pod answering a hairpin connection (to the hairpin
 * address) gets it back from the frontend, into the pod again. Returns 1
 * with *act set when pkt was such an answer, 0 otherwise.
 */
static __always_inline int weft_lb_hairpin_reply(struct __sk_buff *skb,
						 const struct weft_pkt *pkt, __u64 now, int *act)
{
	struct weft_lb_scratch *s;
	struct weft_lb_ct_value *v;
	__u8 hp[16], front[16];
	__u16 front_port;
	__u32 zero = 0;

	if (pkt->proto != IPPROTO_TCP && pkt->proto != IPPROTO_UDP)
		return 0;
	weft_lb_hairpin_addr(pkt->family, hp);
	if (!weft_lb_addr_eq(pkt->daddr, hp))
		return 0;
	s = bpf_map_lookup_elem(&weft_lb_scratch, &zero);
	if (!s)
		return 0;
	weft_lb_ct_key_fill(&s->k, pkt->family, pkt->proto, WEFT_LB_CT_REVERSE, pkt->saddr, hp,
			    pkt->sport, pkt->dport);
	v = bpf_map_lookup_elem(&weft_lb_ct, &s->k);
	if (!v || !weft_lb_ct_live(v, pkt->proto, now))
		return 0;
	weft_lb_ct_touch(v, pkt, 1, now);
	__builtin_memcpy(front, v->addr, 16);
	front_port = v->port;
	*act = TC_ACT_SHOT;
	if (weft_lb_rewrite(skb, pkt, 0, pkt->saddr, front, pkt->sport, front_port) < 0 ||
	    weft_lb_rewrite(skb, pkt, 1, hp, pkt->saddr, pkt->dport, pkt->dport) < 0 ||
	    weft_lb_swap_macs(skb) < 0)
		return 1;
	*act = bpf_redirect_peer(skb->ifindex, 0);
	return 1;
}

/* Random ports tried for a new source-NATed connection before giving up. */
#define WEFT_SNAT_TRIES 16

/*
 * NodePort source NAT (externalTrafficPolicy: Cluster), from_netdev: a new
 * connection whose backend is on another node leaves with the frontend's node
 * address and a free port of WEFT_SNAT_PORT_MIN..MAX as its source, so the
 * backend answers through this node. Writes the REVERSE entry (claiming the
 * port: BPF_NOEXIST, or an expired holder) and the FORWARD one. Returns the
 * port (network byte order), or 0 when none was free.
 */
static __always_inline __u16 weft_lb_snat_create(const struct weft_pkt *pkt,
						 const struct weft_lb_nat *nat, __u64 now)
{
	struct weft_lb_ct_key k;
	struct weft_lb_snat_value v = {
		.created_ns = now,
		.last_seen_ns = now,
		.svc_id = nat->svc_id,
	};
	struct weft_lb_snat_value *old;
	__u16 port = 0;
	__u32 i;

	__builtin_memcpy(v.addr, pkt->saddr, 16);
	v.port = pkt->sport;
	__builtin_memcpy(v.nat_addr, nat->svc_addr, 16);
	v.nat_port = nat->svc_port;
	for (i = 0; i < WEFT_SNAT_TRIES; i++) {
		__u16 cand = bpf_htons(WEFT_SNAT_PORT_MIN +
				       bpf_get_prandom_u32() %
					       (WEFT_SNAT_PORT_MAX - WEFT_SNAT_PORT_MIN + 1));

		weft_lb_ct_key_fill(&k, pkt->family, pkt->proto, WEFT_LB_CT_REVERSE, nat->be.addr,
				    nat->svc_addr, nat->be.port, cand);
		if (bpf_map_update_elem(&weft_lb_snat, &k, &v, BPF_NOEXIST) == 0) {
			port = cand;
			break;
		}
		old = bpf_map_lookup_elem(&weft_lb_snat, &k);
		if (old && !weft_lb_live(old->last_seen_ns, old->flags, pkt->proto, now) &&
		    bpf_map_update_elem(&weft_lb_snat, &k, &v, BPF_ANY) == 0) {
			port = cand;
			break;
		}
	}
	if (!port)
		return 0;
	weft_lb_ct_key_fill(&k, pkt->family, pkt->proto, WEFT_LB_CT_FORWARD, pkt->saddr,
			    nat->svc_addr, pkt->sport, nat->svc_port);
	__builtin_memcpy(v.addr, nat->be.addr, 16);
	v.port = nat->be.port;
	v.nat_port = port;
	bpf_map_update_elem(&weft_lb_snat, &k, &v, BPF_ANY);
	return port;
}

/* The client's packet with the backend as destination and the node's address as source. */
static __always_inline int weft_lb_snat_out(struct __sk_buff *skb, const struct weft_pkt *pkt,
					    const __u8 *front, __u16 front_port,
					    const __u8 *be, __u16 be_port, __u16 nat_port)
{
	if (weft_lb_rewrite(skb, pkt, 1, front, be, front_port, be_port) < 0 ||
	    weft_lb_rewrite(skb, pkt, 0, pkt->saddr, front, pkt->sport, nat_port) < 0)
		return -1;
	return 0;
}

/*
 * The source-NATed packets below have one of the node's own addresses as
 * their source: the stack would drop them as martians, so the caller sends
 * them on itself, toward `dst` (the backend, or the client).
 */

/*
 * from_netdev, a packet to a NodePort frontend (pkt's destination already
 * replaced by a candidate backend, nat holding the frontend): a later packet
 * of a source-NATed connection is rewritten the same way. Returns 1 (dst:
 * the backend), 0 when it is not one, <0 when it could not be rewritten.
 */
static __always_inline int weft_lb_snat_established(struct __sk_buff *skb,
						    const struct weft_pkt *pkt,
						    const struct weft_lb_nat *nat, __u64 now,
						    __u8 *dst)
{
	struct weft_lb_ct_key k;
	struct weft_lb_snat_value *v;
	__u8 nat_addr[16];
	__u16 be_port, nat_port;
	int syn_only;

	weft_lb_ct_key_fill(&k, pkt->family, pkt->proto, WEFT_LB_CT_FORWARD, pkt->saddr,
			    nat->svc_addr, pkt->sport, nat->svc_port);
	v = bpf_map_lookup_elem(&weft_lb_snat, &k);
	if (!v || !weft_lb_live(v->last_seen_ns, v->flags, pkt->proto, now))
		return 0;
	syn_only = pkt->proto == IPPROTO_TCP &&
		   (pkt->tcp_flags & (WEFT_TCP_SYN | WEFT_TCP_ACK)) == WEFT_TCP_SYN;
	if (syn_only && WEFT_LB_CT_CLOSED(v->flags))
		return 0; /* a new connection on a closed one's tuple */
	weft_lb_touch(&v->last_seen_ns, &v->flags, pkt, 0, now);
	__builtin_memcpy(dst, v->addr, 16);
	__builtin_memcpy(nat_addr, v->nat_addr, 16);
	be_port = v->port;
	nat_port = v->nat_port;
	if (weft_lb_snat_out(skb, pkt, nat_addr, nat->svc_port, dst, be_port, nat_port) < 0)
		return -1;
	return 1;
}

/*
 * from_netdev: a new connection to a backend on another node (see
 * weft_lb_snat_create), rewritten. Returns 0 (the destination is
 * nat->be.addr), <0 when no port was free or rewriting failed.
 */
static __always_inline int weft_lb_snat_new(struct __sk_buff *skb, const struct weft_pkt *pkt,
					    const struct weft_lb_nat *nat, __u64 now)
{
	__u16 port = weft_lb_snat_create(pkt, nat, now);

	if (!port) {
		weft_lb_count(nat->svc_id, 1);
		return -1;
	}
	weft_lb_remember(pkt, nat, now);
	return weft_lb_snat_out(skb, pkt, nat->svc_addr, nat->svc_port, nat->be.addr,
				nat->be.port, port);
}

/*
 * from_netdev: a backend's answer to a source-NATed connection (to a port of
 * the SNAT range) gets the frontend as source and the client as destination.
 * Returns 1 (dst: the client), 0 when it is not one, <0 when it could not be
 * rewritten.
 */
static __always_inline int weft_lb_snat_reply(struct __sk_buff *skb, const struct weft_pkt *pkt,
					      __u64 now, __u8 *dst)
{
	struct weft_lb_ct_key k;
	struct weft_lb_snat_value *v;
	__u8 front[16];
	__u16 client_port, front_port;

	if (pkt->proto != IPPROTO_TCP && pkt->proto != IPPROTO_UDP)
		return 0;
	if (bpf_ntohs(pkt->dport) < WEFT_SNAT_PORT_MIN)
		return 0;
	weft_lb_ct_key_fill(&k, pkt->family, pkt->proto, WEFT_LB_CT_REVERSE, pkt->saddr,
			    pkt->daddr, pkt->sport, pkt->dport);
	v = bpf_map_lookup_elem(&weft_lb_snat, &k);
	if (!v || !weft_lb_live(v->last_seen_ns, v->flags, pkt->proto, now))
		return 0;
	weft_lb_touch(&v->last_seen_ns, &v->flags, pkt, 1, now);
	__builtin_memcpy(dst, v->addr, 16);
	__builtin_memcpy(front, v->nat_addr, 16);
	client_port = v->port;
	front_port = v->nat_port;
	if (weft_lb_rewrite(skb, pkt, 0, pkt->saddr, front, pkt->sport, front_port) < 0 ||
	    weft_lb_rewrite(skb, pkt, 1, pkt->daddr, dst, pkt->dport, client_port) < 0)
		return -1;
	return 1;
}

#endif /* WEFT_LIB_LB_H */
