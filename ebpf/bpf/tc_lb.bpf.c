// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Per-packet Service load balancing at tc: for traffic that socket-level load balancing cannot
 * see (pods' packets forwarded through the node, NodePorts and external IPs from outside).
 *
 * One program serves both directions. A packet whose tuple is the reply of a load-balanced
 * flow gets its source rewritten back to the Service frontend (reverse NAT); any other packet
 * to a Service frontend gets a backend (the flow's, from conntrack, else a new choice, sticky
 * with session affinity) and its destination rewritten (DNAT). Everything else passes.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "kpx_maps.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Sizes are defaults: the loader sets each from the proxy's configuration, and pins the
 * maps under the instance's bpffs directory (a restarted proxy adopts them). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct kpx_service_key);
	__type(value, struct kpx_service_value);
	__uint(max_entries, 65536);
} kpx_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct kpx_slot_key);
	__type(value, __u32);
	__uint(max_entries, 1048576);
} kpx_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct kpx_backend);
	__uint(max_entries, 262144);
} kpx_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct kpx_rev_nat);
	__uint(max_entries, 65536);
} kpx_rev_nat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct kpx_affinity_key);
	__type(value, struct kpx_affinity_value);
	__uint(max_entries, 262144);
} kpx_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct kpx_ct_key);
	__type(value, struct kpx_ct_value);
	__uint(max_entries, 262144);
} kpx_ct SEC(".maps");

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#define IP6_SRC_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define IP6_DST_OFF (ETH_HLEN + offsetof(struct ipv6hdr, daddr))
/* Source and destination ports sit at the same offsets in TCP and UDP headers. */
#define L4_SPORT 0
#define L4_DPORT 2

struct flow {
	struct kpx_ct_key tuple;
	__u32 l4_off;
	__u32 csum_off;  /* the L4 checksum, from the start of the packet */
};

/* Fills `f` for an unfragmented TCP or UDP packet without IP options or extension headers;
 * returns -1 for anything else (which passes untouched). */
static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u8 proto;

	if ((void *)(eth + 1) > end)
		return -1;
	__builtin_memset(f, 0, sizeof(*f));
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->ihl != 5)
			return -1;
		if (ip->frag_off & bpf_htons(0x3fff))
			return -1;
		__builtin_memcpy(f->tuple.src, &ip->saddr, 4);
		__builtin_memcpy(f->tuple.dst, &ip->daddr, 4);
		f->tuple.family = KPX_FAMILY_V4;
		proto = ip->protocol;
		f->l4_off = ETH_HLEN + sizeof(struct iphdr);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return -1;
		__builtin_memcpy(f->tuple.src, &ip6->saddr, 16);
		__builtin_memcpy(f->tuple.dst, &ip6->daddr, 16);
		f->tuple.family = KPX_FAMILY_V6;
		proto = ip6->nexthdr;
		f->l4_off = ETH_HLEN + sizeof(struct ipv6hdr);
	} else {
		return -1;
	}
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = data + f->l4_off;

		if ((void *)(th + 1) > end)
			return -1;
		f->tuple.sport = th->source;
		f->tuple.dport = th->dest;
		f->csum_off = f->l4_off + offsetof(struct tcphdr, check);
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *uh = data + f->l4_off;

		if ((void *)(uh + 1) > end)
			return -1;
		f->tuple.sport = uh->source;
		f->tuple.dport = uh->dest;
		f->csum_off = f->l4_off + offsetof(struct udphdr, check);
	} else {
		return -1;
	}
	f->tuple.proto = proto;
	return 0;
}

/*
 * Rewrites the source (dst == 0) or destination address and port of the packet to `addr` and
 * `port`, fixing the IPv4 header checksum and the L4 checksum (its pseudo-header covers the
 * addresses). A UDP checksum of zero means "none" and stays zero (BPF_F_MARK_MANGLED_0).
 */
static __always_inline int rewrite(struct __sk_buff *skb, const struct flow *f, int dst,
				   const __u8 *addr, __be16 port)
{
	__u64 l4_flags = f->tuple.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	const __u8 *old_addr = dst ? f->tuple.dst : f->tuple.src;
	__be16 old_port = dst ? f->tuple.dport : f->tuple.sport;
	__u32 port_off = f->l4_off + (dst ? L4_DPORT : L4_SPORT);

	if (f->tuple.family == KPX_FAMILY_V4) {
		__be32 old_ip, new_ip;

		__builtin_memcpy(&old_ip, old_addr, 4);
		__builtin_memcpy(&new_ip, addr, 4);
		if (bpf_l4_csum_replace(skb, f->csum_off, old_ip, new_ip,
					BPF_F_PSEUDO_HDR | l4_flags | sizeof(new_ip)))
			return -1;
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip, new_ip, sizeof(new_ip)))
			return -1;
		if (bpf_skb_store_bytes(skb, dst ? IP_DST_OFF : IP_SRC_OFF, &new_ip, 4, 0))
			return -1;
	} else {
		__u32 old_ip[4], new_ip[4];
		__s64 diff;

		__builtin_memcpy(old_ip, old_addr, 16);
		__builtin_memcpy(new_ip, addr, 16);
		diff = bpf_csum_diff(old_ip, 16, new_ip, 16, 0);
		if (diff < 0)
			return -1;
		if (bpf_l4_csum_replace(skb, f->csum_off, 0, diff, BPF_F_PSEUDO_HDR | l4_flags))
			return -1;
		if (bpf_skb_store_bytes(skb, dst ? IP6_DST_OFF : IP6_SRC_OFF, new_ip, 16, 0))
			return -1;
	}
	if (old_port != port) {
		if (bpf_l4_csum_replace(skb, f->csum_off, old_port, port, l4_flags | sizeof(port)))
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &port, sizeof(port), 0))
			return -1;
	}
	return 0;
}

/* The backend for a new flow: the client's previous one under session affinity, else a
 * uniformly random slot. */
static __always_inline __u32 pick_backend(const struct flow *f, const struct kpx_service_value *svc,
					  struct kpx_backend **backend)
{
	struct kpx_affinity_key akey = {};
	struct kpx_slot_key skey = {};
	__u64 now = bpf_ktime_get_ns();
	__u32 *id;

	if (svc->affinity_timeout) {
		struct kpx_affinity_value *seen;

		__builtin_memcpy(akey.client, f->tuple.src, 16);
		akey.service_id = svc->id;
		akey.family = f->tuple.family;
		seen = bpf_map_lookup_elem(&kpx_affinity, &akey);
		if (seen && now - seen->last_used_ns < (__u64)svc->affinity_timeout * 1000000000ULL) {
			*backend = bpf_map_lookup_elem(&kpx_backends, &seen->backend_id);
			if (*backend) {
				seen->last_used_ns = now;
				return seen->backend_id;
			}
		}
	}
	skey.service_id = svc->id;
	skey.slot = bpf_get_prandom_u32() % svc->count + 1;
	id = bpf_map_lookup_elem(&kpx_slots, &skey);
	if (!id)
		return 0;
	*backend = bpf_map_lookup_elem(&kpx_backends, id);
	if (!*backend)
		return 0;
	if (svc->affinity_timeout) {
		struct kpx_affinity_value value = { .last_used_ns = now, .backend_id = *id };

		bpf_map_update_elem(&kpx_affinity, &akey, &value, BPF_ANY);
	}
	return *id;
}

/* A reply of a load-balanced flow: its source becomes the Service frontend again. */
static __always_inline int reverse_nat(struct __sk_buff *skb, struct flow *f)
{
	struct kpx_ct_value *ct = bpf_map_lookup_elem(&kpx_ct, &f->tuple);
	struct kpx_rev_nat *front;

	if (!ct || !(ct->flags & KPX_CT_F_REPLY))
		return -1;
	front = bpf_map_lookup_elem(&kpx_rev_nat, &ct->service_id);
	if (!front)
		return -1;
	ct->last_seen_ns = bpf_ktime_get_ns();
	if (rewrite(skb, f, 0, front->addr, front->port))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

static __always_inline int load_balance(struct __sk_buff *skb, struct flow *f)
{
	struct kpx_service_key key = {};
	struct kpx_service_value *svc;
	struct kpx_backend *backend = 0;
	struct kpx_ct_value *ct;
	__u64 now = bpf_ktime_get_ns();
	__u32 backend_id;

	__builtin_memcpy(key.addr, f->tuple.dst, 16);
	key.port = f->tuple.dport;
	key.proto = f->tuple.proto;
	key.family = f->tuple.family;
	svc = bpf_map_lookup_elem(&kpx_services, &key);
	if (!svc)
		return TC_ACT_OK;
	if (svc->count == 0)
		return TC_ACT_SHOT;

	ct = bpf_map_lookup_elem(&kpx_ct, &f->tuple);
	if (ct && !(ct->flags & KPX_CT_F_REPLY)) {
		backend = bpf_map_lookup_elem(&kpx_backends, &ct->backend_id);
		if (backend) {
			ct->last_seen_ns = now;
			backend_id = ct->backend_id;
		}
	}
	if (!backend) {
		struct kpx_ct_value forward = {}, reply = {};
		struct kpx_ct_key reply_key = {};

		backend_id = pick_backend(f, svc, &backend);
		if (!backend_id || !backend)
			return TC_ACT_SHOT;
		forward.last_seen_ns = now;
		forward.backend_id = backend_id;
		forward.service_id = svc->id;
		if (bpf_map_update_elem(&kpx_ct, &f->tuple, &forward, BPF_ANY))
			return TC_ACT_SHOT;
		/* The reply comes from the backend to the client. */
		__builtin_memcpy(reply_key.src, backend->addr, 16);
		__builtin_memcpy(reply_key.dst, f->tuple.src, 16);
		reply_key.sport = backend->port;
		reply_key.dport = f->tuple.sport;
		reply_key.proto = f->tuple.proto;
		reply_key.family = f->tuple.family;
		reply.last_seen_ns = now;
		reply.backend_id = backend_id;
		reply.service_id = svc->id;
		reply.flags = KPX_CT_F_REPLY;
		if (bpf_map_update_elem(&kpx_ct, &reply_key, &reply, BPF_ANY))
			return TC_ACT_SHOT;
	}
	if (rewrite(skb, f, 1, backend->addr, backend->port))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

SEC("classifier")
int kpx_tc_lb(struct __sk_buff *skb)
{
	struct flow f;
	int verdict;

	if (parse(skb, &f))
		return TC_ACT_OK;
	verdict = reverse_nat(skb, &f);
	if (verdict >= 0)
		return verdict;
	return load_balance(skb, &f);
}
