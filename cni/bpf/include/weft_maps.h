/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Weft datapath ABI: every map key and value, the flow event, and the constants
 * both sides agree on. This header is the single source of truth for those
 * layouts; cni/datapath/src/abi.rs mirrors each struct with #[repr(C)] and a
 * test there compares sizes and field offsets against the BTF that clang emits
 * for the compiled object.
 *
 * Byte order, field by field:
 *   - addresses are always in network byte order (as on the wire);
 *   - weft_policy{4,6}_key.ep_id is network byte order (LPM tries compare key
 *     bytes most-significant first; the ep_id/direction/proto bytes are always
 *     inside the matched prefix, so the choice only has to be consistent);
 *   - conntrack ports are network byte order (copied from the packet);
 *   - port ranges in policy values and ports in flow events are host order;
 *   - everything else is host order.
 *
 * Changing a layout changes the object hash: Datapath::open then replaces the
 * programs, and replaces any pinned map whose key/value size no longer fits.
 */
#ifndef WEFT_MAPS_H
#define WEFT_MAPS_H

#include <linux/types.h>

/* weft_endpoint.flags */
#define WEFT_EP_INGRESS_ISOLATED 1u
#define WEFT_EP_EGRESS_ISOLATED 2u

/* Directions, from the pod's point of view. */
#define WEFT_DIR_INGRESS 0 /* into the pod: tc egress on the host veth  */
#define WEFT_DIR_EGRESS 1  /* out of the pod: tc ingress on the host veth */

/* Policy key proto: 6, 17, 132, or this for every other protocol. */
#define WEFT_PROTO_ANY 0

#define WEFT_MAX_PORT_RANGES 32

/* LPM prefix bits that always match: ep_id (32) + direction, proto, pad (32). */
#define WEFT_POLICY_FIXED_PREFIX 64

/* Map sizes. Changing one makes the pinned map incompatible (it is recreated). */
#define WEFT_ENDPOINTS_MAX 16384
#define WEFT_POLICY_MAX 65536
#define WEFT_CT_MAX 131072
#define WEFT_COUNTERS_MAX 16384
#define WEFT_DROPS_MAX 32768
#define WEFT_ENDPOINT_ADDRS_MAX WEFT_ENDPOINTS_MAX
#define WEFT_SOURCE_DROPS_MAX WEFT_ENDPOINTS_MAX

/* Addresses recorded per family and endpoint (weft_endpoint_addrs). */
#define WEFT_EP_MAX_ADDRS 4
#define WEFT_FLOWS_RINGBUF_BYTES (256 * 1024)

/* Flow event verdicts. */
#define WEFT_VERDICT_ALLOWED 1
#define WEFT_VERDICT_DENIED 2

/* Flow event reasons: why the verdict is what it is. */
#define WEFT_REASON_NOT_ISOLATED 0  /* direction not isolated: allowed, policy 0 */
#define WEFT_REASON_POLICY 1        /* a policy entry's port range matched */
#define WEFT_REASON_NO_PEER 2       /* no policy entry covers the peer address */
#define WEFT_REASON_NO_PORT 3       /* the peer's entry has no range with this port */
#define WEFT_REASON_UNPARSEABLE 4   /* headers could not be parsed (fail safe: deny) */
#define WEFT_REASON_SPOOFED_SOURCE 5 /* from_pod: the source is not the endpoint's address */

/* Conntrack value flags. */
#define WEFT_CT_FIN_ORIG 1u  /* FIN seen from the connection's originator */
#define WEFT_CT_FIN_REPLY 2u /* FIN seen from the replier */
#define WEFT_CT_RST 4u       /* RST seen either way */

/* weft_endpoints: key = host-veth ifindex (__u32). */
struct weft_endpoint {
	__u32 ep_id;
	__u32 flags; /* WEFT_EP_*_ISOLATED */
};

/*
 * weft_endpoint_addrs: key = host-veth ifindex (__u32), like weft_endpoints.
 * The endpoint's own addresses: from_pod drops IPv4/IPv6 packets whose source
 * is none of them (IPv6 link-local and :: excepted). No entry: not checked.
 * A separate map (not inside weft_endpoint) so that adding it did not change
 * weft_endpoints' layout: pinned maps of an older build keep their contents.
 */
struct weft_endpoint_addrs {
	__u8 count4; /* addr4[0..count4] are valid, <= WEFT_EP_MAX_ADDRS */
	__u8 count6; /* addr6[0..count6] are valid, <= WEFT_EP_MAX_ADDRS */
	__u8 pad[2];
	__u8 addr4[WEFT_EP_MAX_ADDRS][4];
	__u8 addr6[WEFT_EP_MAX_ADDRS][16];
};

/* weft_policy4: LPM trie, prefixlen = WEFT_POLICY_FIXED_PREFIX + CIDR length. */
struct weft_policy4_key {
	__u32 prefixlen;
	__u32 ep_id; /* network byte order */
	__u8 direction;
	__u8 proto;
	__u16 pad;
	__u8 addr[4];
};

/* weft_policy6: as weft_policy4, IPv6 addresses. */
struct weft_policy6_key {
	__u32 prefixlen;
	__u32 ep_id; /* network byte order */
	__u8 direction;
	__u8 proto;
	__u16 pad;
	__u8 addr[16];
};

struct weft_port_range {
	__u16 lo; /* host byte order, inclusive */
	__u16 hi; /* host byte order, inclusive */
	__u32 policy;
};

/*
 * The value of both policy tries. The entry for a prefix must hold every range
 * allowed for addresses in it, including ranges of covering shorter prefixes:
 * the datapath only consults the longest matching prefix. count == 0 is a hole
 * (ipBlock except). With proto WEFT_PROTO_ANY ports are ignored: count > 0
 * allows and ranges[0].policy decides.
 */
struct weft_policy_value {
	__u32 count;
	struct weft_port_range ranges[WEFT_MAX_PORT_RANGES];
};

/*
 * weft_ct: LRU hash. One entry per (endpoint, direction, tuple) of an allowed
 * new connection, as seen at that check point. IPv4 addresses use the first 4
 * bytes of saddr/daddr, the rest zero. ICMP echo uses the identifier as both
 * ports.
 */
struct weft_ct_key {
	__u32 ep_id;
	__u8 direction;
	__u8 proto;  /* IP protocol number */
	__u8 family; /* 4 or 6 */
	__u8 pad;
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport; /* network byte order */
	__u16 dport; /* network byte order */
};

struct weft_ct_value {
	__u64 created_ns;   /* bpf_ktime_get_boot_ns() */
	__u64 last_seen_ns; /* refreshed at most once a second */
	__u32 policy;       /* the deciding policy id (0: not isolated) */
	__u32 flags;        /* WEFT_CT_* */
};

/* weft_counters: per-CPU hash, key = policy id (__u32). */
struct weft_policy_counters {
	__u64 allowed_conns;   /* new connections this policy allowed */
	__u64 allowed_packets; /* packets of those connections, both ways */
};

/* weft_drops: per-CPU hash; value = denied new connections (__u64). */
struct weft_drop_key {
	__u32 ep_id;
	__u8 direction;
	__u8 pad[3];
};

/*
 * weft_source_drops: per-CPU hash, key = ep_id (__u32), value = packets from_pod
 * dropped because their source was not the endpoint's (__u64).
 */

/* weft_flows: ring buffer of these, one per new-connection decision. */
struct weft_flow_event {
	__u64 ts_ns; /* bpf_ktime_get_boot_ns() (CLOCK_BOOTTIME) */
	__u32 ep_id;
	__u32 policy;
	__u8 direction;
	__u8 verdict; /* WEFT_VERDICT_* */
	__u8 proto;
	__u8 family; /* 4 or 6 */
	__u16 sport; /* host byte order */
	__u16 dport; /* host byte order */
	__u8 saddr[16];
	__u8 daddr[16];
	__u8 reason; /* WEFT_REASON_* */
	__u8 pad[7];
};

/*
 * Services (kube-proxy replacement), lib/lb.h. Byte order: addresses and
 * ports in these maps are network byte order (as on the wire); ids, counts,
 * flags and timeouts host order.
 */
#define WEFT_LB_SVC_MAX 65536      /* frontends: (address, port, protocol) */
#define WEFT_LB_MAX_BACKENDS 128   /* ready endpoints per frontend */
#define WEFT_LB_CT_MAX 262144      /* two entries per translated connection */
#define WEFT_LB_AFFINITY_MAX 65536 /* (frontend, client) pairs */
#define WEFT_LB_SNAT_MAX 131072    /* two entries per source-NATed NodePort connection */

/*
 * NodePort source NAT (externalTrafficPolicy: Cluster, a backend on another
 * node): the ports the node's address takes for it, above Linux's default
 * ephemeral range (net.ipv4.ip_local_port_range 32768-60999), so no socket of
 * the node itself holds the same tuple. The agent warns when the node's range
 * overlaps.
 */
#define WEFT_SNAT_PORT_MIN 61000
#define WEFT_SNAT_PORT_MAX 65535

/*
 * Hairpin: a pod that reaches itself through a Service sees the connection
 * come from this address (its own address would never leave the pod, so the
 * reply could not be translated back). Cilium uses the same IPv4 address.
 */
#define WEFT_HAIRPIN_V4 { 169, 254, 42, 1 }
#define WEFT_HAIRPIN_V6 { 0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xa9, 0xfe, 0x2a, 0x01 }

/* weft_lb_svc.flags */
#define WEFT_LB_F_AFFINITY 1u /* sessionAffinity ClientIP */
#define WEFT_LB_F_NODEPORT 2u /* a NodePort frontend (node address), not a ClusterIP */

/* weft_lb_backend.flags */
#define WEFT_LB_BE_REMOTE 1u /* on another node: NodePort connections to it are source-NATed */

/* weft_lb_ct_key.dir */
#define WEFT_LB_CT_FORWARD 0 /* client → frontend, as the client sent it */
#define WEFT_LB_CT_REVERSE 1 /* backend → client, as the backend answers */

/* weft_lb_svc: hash, one entry per frontend. IPv4 in the first 4 bytes. */
struct weft_lb_svc_key {
	__u8 family; /* 4 or 6 */
	__u8 proto;  /* 6 or 17 */
	__u16 port;  /* network byte order */
	__u8 addr[16];
};

struct weft_lb_backend {
	__u8 addr[16];
	__u16 port;  /* network byte order */
	__u16 flags; /* WEFT_LB_BE_* */
};

/*
 * The whole backend set is inside the value, so one map update replaces it
 * atomically: a lookup sees the old or the new set, never an empty one in
 * between. count == 0: the Service exists but has no ready endpoint (refused).
 */
struct weft_lb_svc {
	__u32 svc_id; /* the agent's id of the frontend (affinity keys) */
	__u16 count;  /* backends[0..count] are valid, <= WEFT_LB_MAX_BACKENDS */
	__u16 flags;  /* WEFT_LB_F_* */
	__u32 affinity_timeout_s;
	__u32 pad;
	struct weft_lb_backend backends[WEFT_LB_MAX_BACKENDS];
};

/*
 * weft_lb_ct: LRU hash, two entries per translated connection: FORWARD keyed
 * by the tuple the client sent (value: the backend), REVERSE keyed by the
 * tuple the backend answers with (value: the frontend the reply must come
 * from).
 */
struct weft_lb_ct_key {
	__u8 family;
	__u8 proto;
	__u8 dir; /* WEFT_LB_CT_* */
	__u8 pad;
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport; /* network byte order */
	__u16 dport; /* network byte order */
};

struct weft_lb_ct_value {
	__u64 created_ns;
	__u64 last_seen_ns; /* refreshed at most once a second */
	__u8 addr[16];      /* FORWARD: the backend; REVERSE: the frontend address */
	__u16 port;         /* network byte order */
	__u16 pad;
	__u32 svc_id;
	__u32 flags; /* WEFT_CT_* (FIN/RST seen on this entry's direction) */
	__u32 pad2;
};

/*
 * weft_lb_snat: LRU hash, two entries per NodePort connection forwarded to a
 * backend on another node with the node's address as its source (the
 * backend's reply must come back through this node to be translated back).
 * Keys are weft_lb_ct_keys: FORWARD the tuple the client sent, REVERSE the
 * tuple the backend answers with (backend → node address:nat port).
 */
struct weft_lb_snat_value {
	__u64 created_ns;
	__u64 last_seen_ns;  /* refreshed at most once a second */
	__u8 addr[16];       /* FORWARD: the backend; REVERSE: the client */
	__u8 nat_addr[16];   /* FORWARD: the source the backend sees; REVERSE: the frontend */
	__u16 port;          /* FORWARD: the backend's port; REVERSE: the client's */
	__u16 nat_port;      /* FORWARD: the allocated source port; REVERSE: the nodePort */
	__u32 svc_id;
	__u32 flags;         /* WEFT_CT_* (FIN/RST seen on this entry's direction) */
	__u32 pad;
};

/* weft_lb_affinity: LRU hash, sessionAffinity ClientIP. */
struct weft_lb_affinity_key {
	__u32 svc_id;
	__u8 family;
	__u8 pad[3];
	__u8 client[16];
};

struct weft_lb_affinity_value {
	__u64 last_seen_ns;
	struct weft_lb_backend backend;
	__u32 pad;
};

/* weft_lb_stats: per-CPU hash, key = svc_id. */
struct weft_lb_stats {
	__u64 conns;   /* new connections translated */
	__u64 refused; /* new connections refused: no ready endpoint (or, NodePort
			 * source NAT, no free port: dropped) */
};

#endif /* WEFT_MAPS_H */
