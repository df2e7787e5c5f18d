/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Packet parsing: Ethernet → IPv4/IPv6 (extension headers walked, bounded) →
 * the connection tuple. Headers are copied with bpf_skb_load_bytes, which
 * also works when they are not in the linear part of the skb and keeps the
 * verifier's view simple (no packet-pointer revalidation).
 */
#ifndef WEFT_LIB_PARSE_H
#define WEFT_LIB_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef IPPROTO_SCTP
#define IPPROTO_SCTP 132
#endif
#define WEFT_IPPROTO_ICMPV6 58
#define WEFT_IPPROTO_HOPOPTS 0
#define WEFT_IPPROTO_ROUTING 43
#define WEFT_IPPROTO_FRAGMENT 44
#define WEFT_IPPROTO_AH 51
#define WEFT_IPPROTO_DSTOPTS 60

/* Extension headers walked before giving up (fail safe: unparseable). */
#define WEFT_IPV6_MAX_EXT_HDRS 6

#define WEFT_TCP_FIN 0x01
#define WEFT_TCP_SYN 0x02
#define WEFT_TCP_RST 0x04
#define WEFT_TCP_ACK 0x10

enum weft_parse_result {
	WEFT_PARSE_OK,      /* tuple complete */
	WEFT_PARSE_PASS,    /* not ours to judge: non-IP, IPv6 ND/MLD, non-first fragment */
	WEFT_PARSE_RELATED, /* ICMP error: tuple (ports 0) and the embedded tuple filled */
	WEFT_PARSE_BAD,     /* truncated or unparseable headers */
};

/* The tuple of a packet as it travels. Addresses and ports in network order. */
struct weft_pkt {
	__u8 family; /* 4 or 6 */
	__u8 proto;
	__u8 tcp_flags;
	__u8 inner_proto; /* WEFT_PARSE_RELATED: the embedded packet's protocol */
	__u16 sport;
	__u16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
	/* WEFT_PARSE_RELATED: the embedded (offending) packet's tuple, as it travelled. */
	__u16 inner_sport;
	__u16 inner_dport;
	__u8 inner_saddr[16];
	__u8 inner_daddr[16];
	/* Where the L4 header starts (from the Ethernet header), once parsed that far. */
	__u32 l4off;
};

struct weft_ip4 {
	__u8 ver_ihl;
	__u8 tos;
	__u16 tot_len;
	__u16 id;
	__u16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__u16 check;
	__u8 saddr[4];
	__u8 daddr[4];
};

struct weft_ip6 {
	__u32 ver_tc_flow;
	__u16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

struct weft_ip6_opt {
	__u8 nexthdr;
	__u8 hdrlen;
};

struct weft_ip6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__u16 frag_off;
	__u32 id;
};

/* The first 14 bytes of TCP (ports, seq, ack, offset, flags). */
struct weft_tcp_head {
	__u16 sport;
	__u16 dport;
	__u32 seq;
	__u32 ack;
	__u8 doff;
	__u8 flags;
};

struct weft_ports {
	__u16 sport;
	__u16 dport;
};

struct weft_icmp_head {
	__u8 type;
	__u8 code;
	__u16 csum;
	__u16 id;
	__u16 seq;
};

#define WEFT_IP4_OFFSET_MASK 0x1fff
#define WEFT_IP6_OFFSET_MASK 0xfff8

#define WEFT_ICMP_ECHOREPLY 0
#define WEFT_ICMP_DEST_UNREACH 3
#define WEFT_ICMP_SOURCE_QUENCH 4
#define WEFT_ICMP_ECHO 8
#define WEFT_ICMP_TIME_EXCEEDED 11
#define WEFT_ICMP_PARAMETERPROB 12

#define WEFT_ICMP6_DEST_UNREACH 1
#define WEFT_ICMP6_PKT_TOOBIG 2
#define WEFT_ICMP6_TIME_EXCEED 3
#define WEFT_ICMP6_PARAMPROB 4
#define WEFT_ICMP6_ECHO_REQUEST 128
#define WEFT_ICMP6_ECHO_REPLY 129
#define WEFT_ICMP6_MLD_QUERY 130
#define WEFT_ICMP6_ND_REDIRECT 137
#define WEFT_ICMP6_MLD2_REPORT 143

static __always_inline int weft_is_echo(__u8 family, __u8 type)
{
	if (family == 4)
		return type == WEFT_ICMP_ECHO || type == WEFT_ICMP_ECHOREPLY;
	return type == WEFT_ICMP6_ECHO_REQUEST || type == WEFT_ICMP6_ECHO_REPLY;
}

static __always_inline int weft_is_icmp_error(__u8 family, __u8 type)
{
	if (family == 4)
		return type == WEFT_ICMP_DEST_UNREACH || type == WEFT_ICMP_SOURCE_QUENCH ||
		       type == WEFT_ICMP_TIME_EXCEEDED || type == WEFT_ICMP_PARAMETERPROB;
	return type >= WEFT_ICMP6_DEST_UNREACH && type <= WEFT_ICMP6_PARAMPROB;
}

static __always_inline int weft_is_icmp_proto(__u8 proto)
{
	return proto == IPPROTO_ICMP || proto == WEFT_IPPROTO_ICMPV6;
}

/*
 * Ports (or the echo identifier as both ports) of an L4 header at off.
 * Returns 0 on success, <0 when the header is truncated. Protocols without
 * ports leave them 0.
 */
static __always_inline int weft_parse_ports(struct __sk_buff *skb, __u32 off, __u8 family,
					    __u8 proto, __u16 *sport, __u16 *dport)
{
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP) {
		struct weft_ports p;

		if (bpf_skb_load_bytes(skb, off, &p, sizeof(p)) < 0)
			return -1;
		*sport = p.sport;
		*dport = p.dport;
		return 0;
	}
	if (weft_is_icmp_proto(proto)) {
		struct weft_icmp_head h;

		if (bpf_skb_load_bytes(skb, off, &h, sizeof(h)) < 0)
			return -1;
		if (weft_is_echo(family, h.type)) {
			*sport = h.id;
			*dport = h.id;
		}
	}
	return 0;
}

/*
 * The IPv4 or IPv6 packet embedded in an ICMP error at off: its tuple goes
 * into pkt->inner_*. Returns 0 when it could be read, <0 otherwise. The
 * embedded packet's own extension headers are not walked: an error about such
 * a packet is just not recognised as related.
 */
static __always_inline int weft_parse_inner(struct __sk_buff *skb, __u32 off,
					    struct weft_pkt *pkt)
{
	__u32 l4off;

	if (pkt->family == 4) {
		struct weft_ip4 ip;
		__u32 ihl;

		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
			return -1;
		ihl = ip.ver_ihl & 0x0f;
		if ((ip.ver_ihl >> 4) != 4 || ihl < 5)
			return -1;
		pkt->inner_proto = ip.protocol;
		__builtin_memcpy(pkt->inner_saddr, ip.saddr, 4);
		__builtin_memcpy(pkt->inner_daddr, ip.daddr, 4);
		l4off = off + ihl * 4;
	} else {
		struct weft_ip6 ip6;

		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return -1;
		if ((bpf_ntohl(ip6.ver_tc_flow) >> 28) != 6)
			return -1;
		pkt->inner_proto = ip6.nexthdr;
		__builtin_memcpy(pkt->inner_saddr, ip6.saddr, 16);
		__builtin_memcpy(pkt->inner_daddr, ip6.daddr, 16);
		l4off = off + sizeof(ip6);
	}
	return weft_parse_ports(skb, l4off, pkt->family, pkt->inner_proto, &pkt->inner_sport,
				&pkt->inner_dport);
}

/* The L4 part, common to both families. l4off is where the L4 header starts. */
static __always_inline int weft_parse_l4(struct __sk_buff *skb, __u32 l4off, struct weft_pkt *pkt)
{
	pkt->l4off = l4off;
	if (pkt->proto == IPPROTO_TCP) {
		struct weft_tcp_head th;

		if (bpf_skb_load_bytes(skb, l4off, &th, sizeof(th)) < 0)
			return WEFT_PARSE_BAD;
		pkt->sport = th.sport;
		pkt->dport = th.dport;
		pkt->tcp_flags = th.flags;
		return WEFT_PARSE_OK;
	}
	if (weft_is_icmp_proto(pkt->proto)) {
		struct weft_icmp_head h;

		if (bpf_skb_load_bytes(skb, l4off, &h, sizeof(h)) < 0)
			return WEFT_PARSE_BAD;
		/* IPv6 neighbour discovery and MLD keep the link alive: never policy. */
		if (pkt->family == 6 &&
		    ((h.type >= WEFT_ICMP6_MLD_QUERY && h.type <= WEFT_ICMP6_ND_REDIRECT) ||
		     h.type == WEFT_ICMP6_MLD2_REPORT))
			return WEFT_PARSE_PASS;
		if (weft_is_echo(pkt->family, h.type)) {
			pkt->sport = h.id;
			pkt->dport = h.id;
			return WEFT_PARSE_OK;
		}
		if (weft_is_icmp_error(pkt->family, h.type) &&
		    weft_parse_inner(skb, l4off + sizeof(h), pkt) == 0)
			return WEFT_PARSE_RELATED;
		return WEFT_PARSE_OK; /* other ICMP: protocol only, ports 0 */
	}
	if (weft_parse_ports(skb, l4off, pkt->family, pkt->proto, &pkt->sport, &pkt->dport) < 0)
		return WEFT_PARSE_BAD;
	return WEFT_PARSE_OK;
}

static __always_inline int weft_parse_ipv4(struct __sk_buff *skb, struct weft_pkt *pkt)
{
	struct weft_ip4 ip;
	__u32 ihl;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return WEFT_PARSE_BAD;
	ihl = ip.ver_ihl & 0x0f;
	if ((ip.ver_ihl >> 4) != 4 || ihl < 5)
		return WEFT_PARSE_BAD;
	pkt->family = 4;
	pkt->proto = ip.protocol;
	__builtin_memcpy(pkt->saddr, ip.saddr, 4);
	__builtin_memcpy(pkt->daddr, ip.daddr, 4);
	/*
	 * Non-first fragments carry no L4 header. They pass: the first fragment
	 * carries the ports and is judged, and without it the receiver cannot
	 * reassemble the rest (Linux discards overlapping fragments).
	 */
	if (bpf_ntohs(ip.frag_off) & WEFT_IP4_OFFSET_MASK)
		return WEFT_PARSE_PASS;
	return weft_parse_l4(skb, ETH_HLEN + ihl * 4, pkt);
}

static __always_inline int weft_parse_ipv6(struct __sk_buff *skb, struct weft_pkt *pkt)
{
	struct weft_ip6 ip6;
	__u32 off = ETH_HLEN + sizeof(struct weft_ip6);
	__u8 nexthdr;
	int i;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
		return WEFT_PARSE_BAD;
	if ((bpf_ntohl(ip6.ver_tc_flow) >> 28) != 6)
		return WEFT_PARSE_BAD;
	pkt->family = 6;
	__builtin_memcpy(pkt->saddr, ip6.saddr, 16);
	__builtin_memcpy(pkt->daddr, ip6.daddr, 16);
	nexthdr = ip6.nexthdr;

#pragma unroll
	for (i = 0; i < WEFT_IPV6_MAX_EXT_HDRS; i++) {
		if (nexthdr == WEFT_IPPROTO_HOPOPTS || nexthdr == WEFT_IPPROTO_ROUTING ||
		    nexthdr == WEFT_IPPROTO_DSTOPTS || nexthdr == WEFT_IPPROTO_AH) {
			struct weft_ip6_opt opt;
			__u8 cur = nexthdr;

			if (bpf_skb_load_bytes(skb, off, &opt, sizeof(opt)) < 0)
				return WEFT_PARSE_BAD;
			nexthdr = opt.nexthdr;
			if (nexthdr == WEFT_IPPROTO_HOPOPTS) /* only valid first */
				return WEFT_PARSE_BAD;
			/* AH counts 4-byte units minus 2; the others 8-byte units minus 1. */
			if (cur == WEFT_IPPROTO_AH)
				off += ((__u32)opt.hdrlen + 2) << 2;
			else
				off += ((__u32)opt.hdrlen + 1) << 3;
		} else if (nexthdr == WEFT_IPPROTO_FRAGMENT) {
			struct weft_ip6_frag frag;

			if (bpf_skb_load_bytes(skb, off, &frag, sizeof(frag)) < 0)
				return WEFT_PARSE_BAD;
			if (bpf_ntohs(frag.frag_off) & WEFT_IP6_OFFSET_MASK)
				return WEFT_PARSE_PASS; /* non-first fragment: see IPv4 */
			nexthdr = frag.nexthdr;
			off += sizeof(frag);
		} else {
			break;
		}
	}
	/* Still an extension header after the bound: fail safe. */
	if (nexthdr == WEFT_IPPROTO_HOPOPTS || nexthdr == WEFT_IPPROTO_ROUTING ||
	    nexthdr == WEFT_IPPROTO_DSTOPTS || nexthdr == WEFT_IPPROTO_AH ||
	    nexthdr == WEFT_IPPROTO_FRAGMENT)
		return WEFT_PARSE_BAD;
	pkt->proto = nexthdr;
	return weft_parse_l4(skb, off, pkt);
}

static __always_inline int weft_parse(struct __sk_buff *skb, struct weft_pkt *pkt)
{
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return weft_parse_ipv4(skb, pkt);
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return weft_parse_ipv6(skb, pkt);
	return WEFT_PARSE_PASS; /* ARP and other non-IP traffic */
}

#endif /* WEFT_LIB_PARSE_H */
