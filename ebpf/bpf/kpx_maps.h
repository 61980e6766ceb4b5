/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every map key and value the kpx BPF programs share with user space. The Rust mirrors live
 * in src/layout.rs; a test compares their sizes and field offsets with what the C compiler
 * makes of this file (build.rs prints them), so the two cannot drift apart.
 *
 * Addresses are 16 bytes for both families: IPv4 uses the first 4 bytes, the rest is zero.
 * Ports are in network byte order, as they appear in packets and socket addresses.
 */
#ifndef KPX_MAPS_H
#define KPX_MAPS_H

#include <linux/types.h>

#define KPX_FAMILY_V4 4
#define KPX_FAMILY_V6 6

/* kpx_services value flags */
#define KPX_SVC_F_NODEPORT (1 << 0)    /* key address is zero: any local address */
#define KPX_SVC_F_EXTERNAL (1 << 1)    /* external or load-balancer IP */
#define KPX_SVC_F_LOCAL_ONLY (1 << 2)  /* externalTrafficPolicy/internalTrafficPolicy: Local */
#define KPX_SVC_F_MASQUERADE (1 << 3)  /* traffic from outside must be source-NATed */
#define KPX_SVC_F_DROP (1 << 4)        /* endpoints exist, none for this traffic: drop, no reject */
#define KPX_SVC_F_MASQ_PODS (1 << 5)   /* traffic from pods must be source-NATed too */
#define KPX_SVC_F_INTERNAL (1 << 6)    /* the node and pods use this key's internal-scope entry */
#define KPX_SVC_F_SOURCE_RANGES (1 << 7) /* new connections only from kpx_src_range4/6 */

/*
 * The frontend model gives each frontend a route per source of traffic (pods, the node,
 * outside). Most frontends route every source alike and have one entry. One whose internal
 * clients (the node, and pods when they can be told apart) go elsewhere than outside clients
 * (externalTrafficPolicy: Local: outside clients reach this node's endpoints, internal ones
 * all) has a second entry under the same key with KPX_SCOPE_INTERNAL or'ed into `family`,
 * and KPX_SVC_F_INTERNAL on the first. (Cilium keeps a scope byte in its key; ours has no
 * spare byte, and a changed key size would make pinned maps of an earlier version unusable.)
 */
#define KPX_SCOPE_INTERNAL 0x80

/* kpx_ct value flags */
#define KPX_CT_F_REPLY (1 << 0)        /* reply direction: rewrite the source back */
#define KPX_CT_F_SNAT (1 << 1)         /* the flow's source was rewritten to nat_addr:nat_port */

/* A Service frontend: VIP (or zero for NodePorts), port, protocol. */
struct kpx_service_key {
	__u8 addr[16];
	__be16 port;
	__u8 proto;   /* IPPROTO_TCP, IPPROTO_UDP */
	__u8 family;  /* KPX_FAMILY_V4 or KPX_FAMILY_V6, | KPX_SCOPE_INTERNAL for the internal entry */
};

/*
 * count is written last when a Service is added or grows, and first when it shrinks: a packet
 * never picks a slot whose backend is not in place yet.
 */
struct kpx_service_value {
	__u32 id;                /* service id: slots, reverse NAT and affinity use it */
	__u16 count;             /* backend slots 1..=count; 0 means no endpoints: reject */
	__u16 flags;             /* KPX_SVC_F_* */
	__u32 affinity_timeout;  /* seconds; 0 means no session affinity */
};

struct kpx_slot_key {
	__u32 service_id;
	__u32 slot;  /* 1..=count */
};

struct kpx_backend {
	__u8 addr[16];
	__be16 port;
	__u8 family;
	__u8 flags;
};

/* service id → its frontend and the Service port it belongs to (`kpx-proxy dump` reads them
 * back from the kernel) */
#define KPX_NAME_LEN 108
struct kpx_rev_nat {
	__u8 addr[16];
	__be16 port;
	__u8 family;
	__u8 pad;
	char name[KPX_NAME_LEN];  /* namespace/name:port/PROTOCOL, NUL-padded */
};

struct kpx_affinity_key {
	__u8 client[16];
	__u32 service_id;
	__u8 family;
	__u8 pad[3];
};

struct kpx_affinity_value {
	__u64 last_used_ns;  /* bpf_ktime_get_ns() */
	__u32 backend_id;
	__u32 pad;
};

/* One direction of a load-balanced flow, as it appears on the wire. */
struct kpx_ct_key {
	__u8 src[16];
	__u8 dst[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

struct kpx_ct_value {
	__u64 last_seen_ns;
	__u32 backend_id;     /* forward: where the flow goes */
	__u32 service_id;
	__u32 flags;          /* KPX_CT_F_* */
	__be16 front_port;    /* reply: the frontend the client addressed, restored as source */
	__be16 nat_port;
	__u8 front_addr[16];
	/* With KPX_CT_F_SNAT: forward, the source the flow was given; reply, the client's
	 * original address and port, restored as the destination. */
	__u8 nat_addr[16];
};

/* The node, as the programs need it: the source for masquerade and hairpin, per family. */
struct kpx_config {
	__u8 node_ip4[16];
	__u8 node_ip6[16];
};

/*
 * How the programs tell the sources of traffic apart (kpx_clients, one entry): a socket in the
 * node's own network namespace is the node; a packet from inside the pod network (kube-proxy's
 * --cluster-cidr local-traffic detector) is a pod's; anything else is from outside. Without a
 * pod network of a family, pods of that family count as outside clients, as in kube-proxy.
 */
struct kpx_clients {
	__u64 node_netns;       /* bpf_get_netns_cookie() of the node's namespace */
	__u8 pod_net4[16];
	__u8 pod_net6[16];
	__u8 pod_prefix4;       /* 0: no IPv4 pod network */
	__u8 pod_prefix6;       /* 0: no IPv6 pod network */
	__u8 pad[6];
};

/* A local address NodePorts answer on (kpx_node_addrs key; the value is unused). */
struct kpx_node_addr {
	__u8 addr[16];
	__u8 family;
	__u8 pad[3];
};

/* Socket LB: which Service a socket's backend stands for (recvmsg, getpeername). */
struct kpx_sock_rev_key {
	__u64 cookie;      /* bpf_get_socket_cookie() */
	__u8 addr[16];     /* the backend */
	__be16 port;
	__u8 family;
	__u8 pad[5];
};

struct kpx_sock_rev_value {
	__u8 addr[16];     /* the Service frontend */
	__be16 port;
	__u8 family;
	__u8 pad;
};

/*
 * loadBalancerSourceRanges (kpx_src_range4, kpx_src_range6: LPM tries, value unused): a
 * frontend flagged KPX_SVC_F_SOURCE_RANGES admits a new connection only from a source inside
 * one of its networks; a flagged frontend with none admits nobody. The service id leads the
 * key and is always matched whole (prefixlen = 32 + the network's prefix), so one trie holds
 * every frontend's ranges and a lookup never strays into another frontend's. Each family has
 * its own trie, as Cilium's LB4_SRC_RANGE/LB6_SRC_RANGE, so IPv4 keys stay small. (A frontend
 * with an internal-scope entry has its ranges under both entries' ids.)
 */
#define KPX_SRC_RANGE_ID_BITS 32

struct kpx_src_range4_key {
	__u32 prefixlen;   /* KPX_SRC_RANGE_ID_BITS + the network's prefix length */
	__u32 service_id;
	__u8 addr[4];      /* the network, host bits zero */
};

struct kpx_src_range6_key {
	__u32 prefixlen;
	__u32 service_id;
	__u8 addr[16];
};

#endif /* KPX_MAPS_H */
