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

#include "lb.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

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
	/* For a reset: the segment's flags, sequence numbers and payload length. */
	__u32 seq;
	__u32 ack_seq;
	__u16 payload;
	__u8 tcp_flags;  /* TCP_FLAG_* bits of byte 13 */
};

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

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
		f->payload = bpf_ntohs(ip->tot_len) - sizeof(struct iphdr);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return -1;
		__builtin_memcpy(f->tuple.src, &ip6->saddr, 16);
		__builtin_memcpy(f->tuple.dst, &ip6->daddr, 16);
		f->tuple.family = KPX_FAMILY_V6;
		proto = ip6->nexthdr;
		f->l4_off = ETH_HLEN + sizeof(struct ipv6hdr);
		f->payload = bpf_ntohs(ip6->payload_len);
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
		f->seq = bpf_ntohl(th->seq);
		f->ack_seq = bpf_ntohl(th->ack_seq);
		f->tcp_flags = ((__u8 *)th)[13];
		f->payload -= th->doff * 4;
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


static __always_inline __u16 csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* The pseudo-header's partial sum for an L4 segment of `len` bytes going from `src` to `dst`. */
static __always_inline __s64 pseudo_sum(const struct flow *f, const __u8 *src, const __u8 *dst,
					__u8 proto, __u16 len)
{
	if (f->tuple.family == KPX_FAMILY_V4) {
		__u32 ph[3];

		__builtin_memcpy(&ph[0], src, 4);
		__builtin_memcpy(&ph[1], dst, 4);
		ph[2] = bpf_htonl(((__u32)proto << 16) | len);
		return bpf_csum_diff(0, 0, ph, sizeof(ph), 0);
	} else {
		__u32 ph[10];

		__builtin_memcpy(&ph[0], src, 16);
		__builtin_memcpy(&ph[4], dst, 16);
		ph[8] = bpf_htonl(len);
		ph[9] = bpf_htonl(proto);
		return bpf_csum_diff(0, 0, ph, sizeof(ph), 0);
	}
}

/* Writes a fresh IP header from `src` to `dst` carrying `len` bytes of `proto`, and swaps the
 * Ethernet addresses so the packet goes back where it came from. */
static __always_inline int write_l2_l3(struct __sk_buff *skb, const struct flow *f,
				       const __u8 *src, const __u8 *dst, __u8 proto, __u16 len)
{
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return -1;
	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0))
		return -1;
	if (f->tuple.family == KPX_FAMILY_V4) {
		struct iphdr ip = {};

		ip.version = 4;
		ip.ihl = 5;
		ip.tot_len = bpf_htons(sizeof(ip) + len);
		ip.ttl = 64;
		ip.protocol = proto;
		__builtin_memcpy(&ip.saddr, src, 4);
		__builtin_memcpy(&ip.daddr, dst, 4);
		ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0));
		return bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) ? -1 : 0;
	} else {
		struct ipv6hdr ip6 = {};

		ip6.version = 6;
		ip6.payload_len = bpf_htons(len);
		ip6.nexthdr = proto;
		ip6.hop_limit = 64;
		__builtin_memcpy(&ip6.saddr, src, 16);
		__builtin_memcpy(&ip6.daddr, dst, 16);
		return bpf_skb_store_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6), 0) ? -1 : 0;
	}
}

static __always_inline __u32 l3_len(const struct flow *f)
{
	return f->tuple.family == KPX_FAMILY_V4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
}

/* Answers a TCP segment with a reset from the Service address (as iptables' REJECT
 * --reject-with tcp-reset does), sent back out of the interface it came in on. */
static __always_inline int reject_tcp(struct __sk_buff *skb, const struct flow *f)
{
	struct tcphdr th = {};
	__s64 sum;

	if (f->tcp_flags & TCPF_RST)
		return TC_ACT_SHOT;
	th.source = f->tuple.dport;
	th.dest = f->tuple.sport;
	th.doff = 5;
	th.rst = 1;
	if (f->tcp_flags & TCPF_ACK) {
		th.seq = bpf_htonl(f->ack_seq);
	} else {
		th.ack = 1;
		th.ack_seq = bpf_htonl(f->seq + f->payload + !!(f->tcp_flags & TCPF_SYN) +
				       !!(f->tcp_flags & TCPF_FIN));
	}
	sum = pseudo_sum(f, f->tuple.dst, f->tuple.src, IPPROTO_TCP, sizeof(th));
	th.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&th, sizeof(th), sum));
	if (bpf_skb_change_tail(skb, ETH_HLEN + l3_len(f) + sizeof(th), 0))
		return TC_ACT_SHOT;
	if (write_l2_l3(skb, f, f->tuple.dst, f->tuple.src, IPPROTO_TCP, sizeof(th)))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + l3_len(f), &th, sizeof(th), 0))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* Answers any other packet with an ICMP (v6) port unreachable quoting its IP header and the
 * first 8 bytes after it, as iptables' default REJECT does. */
static __always_inline int reject_icmp(struct __sk_buff *skb, const struct flow *f)
{
	/* ICMP header (8) + quoted IP header + 8 bytes, as 32-bit words for the checksum. */
	__u32 msg[(8 + sizeof(struct ipv6hdr) + 8) / 4] = {};
	__u32 quoted = l3_len(f) + 8;
	__u32 len = 8 + quoted;
	__u8 *icmp = (__u8 *)msg;
	__s64 sum = 0;

	if (bpf_skb_change_tail(skb, ETH_HLEN + quoted, 0))
		return TC_ACT_SHOT;
	if (f->tuple.family == KPX_FAMILY_V4) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &msg[2], sizeof(struct iphdr) + 8))
			return TC_ACT_SHOT;
		icmp[0] = 3;  /* destination unreachable */
		icmp[1] = 3;  /* port unreachable */
	} else {
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &msg[2], sizeof(struct ipv6hdr) + 8))
			return TC_ACT_SHOT;
		icmp[0] = 1;  /* destination unreachable */
		icmp[1] = 4;  /* port unreachable */
		sum = pseudo_sum(f, f->tuple.dst, f->tuple.src, IPPROTO_ICMPV6, len);
	}
	if (bpf_skb_adjust_room(skb, l3_len(f) + 8, BPF_ADJ_ROOM_MAC, 0))
		return TC_ACT_SHOT;
	if (f->tuple.family == KPX_FAMILY_V4) {
		((__u16 *)msg)[1] = csum_fold(bpf_csum_diff(0, 0, msg, 8 + sizeof(struct iphdr) + 8, 0));
		if (write_l2_l3(skb, f, f->tuple.dst, f->tuple.src, IPPROTO_ICMP, len))
			return TC_ACT_SHOT;
		if (bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct iphdr), msg,
					8 + sizeof(struct iphdr) + 8, 0))
			return TC_ACT_SHOT;
	} else {
		((__u16 *)msg)[1] = csum_fold(bpf_csum_diff(0, 0, msg, sizeof(msg), sum));
		if (write_l2_l3(skb, f, f->tuple.dst, f->tuple.src, IPPROTO_ICMPV6, len))
			return TC_ACT_SHOT;
		if (bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct ipv6hdr), msg, sizeof(msg), 0))
			return TC_ACT_SHOT;
	}
	return bpf_redirect(skb->ifindex, 0);
}

/* A reply of a load-balanced flow: its source becomes the Service frontend again, and a
 * masqueraded flow's destination the client again. */
static __always_inline int reverse_nat(struct __sk_buff *skb, struct flow *f)
{
	struct kpx_ct_value *ct = bpf_map_lookup_elem(&kpx_ct, &f->tuple);
	__u8 front[16], client[16];
	__be16 front_port, client_port;
	__u32 flags;

	if (!ct || !(ct->flags & KPX_CT_F_REPLY))
		return -1;
	ct->last_seen_ns = bpf_ktime_get_ns();
	__builtin_memcpy(front, ct->front_addr, 16);
	__builtin_memcpy(client, ct->nat_addr, 16);
	front_port = ct->front_port;
	client_port = ct->nat_port;
	flags = ct->flags;
	if (rewrite(skb, f, 0, front, front_port))
		return TC_ACT_SHOT;
	if ((flags & KPX_CT_F_SNAT) && rewrite(skb, f, 1, client, client_port))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

/* A source port for a masqueraded flow whose reply tuple is not taken: the client's own port
 * if it is free, else a few random ones. 0 if none is. */
static __always_inline __be16 snat_port(const struct flow *f, const struct kpx_backend *backend,
					const __u8 *nat_addr)
{
	struct kpx_ct_key reply = {};
	__be16 port = f->tuple.sport;
	int attempt;

	__builtin_memcpy(reply.src, backend->addr, 16);
	__builtin_memcpy(reply.dst, nat_addr, 16);
	reply.sport = backend->port;
	reply.proto = f->tuple.proto;
	reply.family = f->tuple.family;
	for (attempt = 0; attempt < 4; attempt++) {
		reply.dport = port;
		if (!bpf_map_lookup_elem(&kpx_ct, &reply))
			return port;
		port = bpf_htons(32768 + bpf_get_prandom_u32() % 28000);
	}
	return 0;
}

/*
 * A new TCP connection (a SYN) that is not for a Service may reuse the tuple of a balanced
 * flow that ended: its replies must not be taken for that flow's and reverse-NATed. The reply
 * entry they would match is removed.
 */
static __always_inline void forget_old_flow(const struct flow *f)
{
	struct kpx_ct_key reply_key = {};
	struct kpx_ct_value *old;

	if (f->tuple.proto != IPPROTO_TCP || (f->tcp_flags & (TCPF_SYN | TCPF_ACK)) != TCPF_SYN)
		return;
	__builtin_memcpy(reply_key.src, f->tuple.dst, 16);
	__builtin_memcpy(reply_key.dst, f->tuple.src, 16);
	reply_key.sport = f->tuple.dport;
	reply_key.dport = f->tuple.sport;
	reply_key.proto = f->tuple.proto;
	reply_key.family = f->tuple.family;
	old = bpf_map_lookup_elem(&kpx_ct, &reply_key);
	if (old && (old->flags & KPX_CT_F_REPLY))
		bpf_map_delete_elem(&kpx_ct, &reply_key);
}

/* Whether the reply entry of the forward flow `ct` exists for `backend`. */
static __always_inline int reply_matches(const struct flow *f, const struct kpx_ct_value *ct,
					 const struct kpx_backend *backend)
{
	struct kpx_ct_key reply_key = {};
	struct kpx_ct_value *reply;
	int snat = !!(ct->flags & KPX_CT_F_SNAT);

	__builtin_memcpy(reply_key.src, backend->addr, 16);
	__builtin_memcpy(reply_key.dst, snat ? ct->nat_addr : f->tuple.src, 16);
	reply_key.sport = backend->port;
	reply_key.dport = snat ? ct->nat_port : f->tuple.sport;
	reply_key.proto = f->tuple.proto;
	reply_key.family = f->tuple.family;
	reply = bpf_map_lookup_elem(&kpx_ct, &reply_key);
	return reply && (reply->flags & KPX_CT_F_REPLY) && reply->backend_id == ct->backend_id;
}

static __always_inline int load_balance(struct __sk_buff *skb, struct flow *f)
{
	struct kpx_service_value *svc;
	struct kpx_backend *backend = 0;
	struct kpx_ct_value *ct;
	__u64 now = bpf_ktime_get_ns();
	__u8 nat_addr[16] = {};
	__be16 nat_port = 0;
	int snat = 0;
	int pod = from_pod_network(f->tuple.src, f->tuple.family);

	svc = lookup_service(f->tuple.dst, f->tuple.dport, f->tuple.proto, f->tuple.family, pod);
	if (!svc) {
		forget_old_flow(f);
		return TC_ACT_OK;
	}

	ct = bpf_map_lookup_elem(&kpx_ct, &f->tuple);
	if (ct && !(ct->flags & KPX_CT_F_REPLY) && ct->service_id == svc->id) {
		backend = bpf_map_lookup_elem(&kpx_backends, &ct->backend_id);
		/* The flow's reply entry must still name this backend: a backend id freed and
		 * given to another endpoint, or an evicted reply entry, makes it a new flow. */
		if (backend && !reply_matches(f, ct, backend))
			backend = 0;
		if (backend) {
			ct->last_seen_ns = now;
			snat = !!(ct->flags & KPX_CT_F_SNAT);
			__builtin_memcpy(nat_addr, ct->nat_addr, 16);
			nat_port = ct->nat_port;
		}
	}
	if (!backend) {
		struct kpx_ct_value forward = {}, reply = {};
		struct kpx_ct_key reply_key = {};
		__u32 backend_id;

		/* loadBalancerSourceRanges come before any route, the reject of a Service
		 * without endpoints included (kube-proxy's firewall chain runs first). */
		if (!source_admitted(svc, f->tuple.src, f->tuple.family))
			return TC_ACT_SHOT;
		if (svc->count == 0) {
			if (svc->flags & KPX_SVC_F_DROP)
				return TC_ACT_SHOT;
			if (f->tuple.proto == IPPROTO_TCP)
				return reject_tcp(skb, f);
			return reject_icmp(skb, f);
		}
		backend_id = pick_backend(f->tuple.src, f->tuple.family, svc, bpf_get_prandom_u32(),
					  &backend);
		if (!backend_id || !backend)
			return TC_ACT_SHOT;
		/* Masquerade what the frontend model says for this source (outside clients of an
		 * externalTrafficPolicy: Cluster frontend, off-cluster clients of a cluster IP, pods
		 * with --masquerade-all) and a pod reaching itself, whose reply would otherwise never
		 * leave it. */
		if ((svc->flags & (pod ? KPX_SVC_F_MASQ_PODS : KPX_SVC_F_MASQUERADE)) ||
		    !__builtin_memcmp(backend->addr, f->tuple.src, 16)) {
			snat = node_address(f->tuple.family, nat_addr);
			if (snat) {
				nat_port = snat_port(f, backend, nat_addr);
				if (!nat_port)
					return TC_ACT_SHOT;
			}
		}
		forward.last_seen_ns = now;
		forward.backend_id = backend_id;
		forward.service_id = svc->id;
		if (snat) {
			forward.flags = KPX_CT_F_SNAT;
			__builtin_memcpy(forward.nat_addr, nat_addr, 16);
			forward.nat_port = nat_port;
		}
		if (bpf_map_update_elem(&kpx_ct, &f->tuple, &forward, BPF_ANY))
			return TC_ACT_SHOT;
		/* The reply comes from the backend to the client (or to the masquerade address). */
		__builtin_memcpy(reply_key.src, backend->addr, 16);
		__builtin_memcpy(reply_key.dst, snat ? nat_addr : f->tuple.src, 16);
		reply_key.sport = backend->port;
		reply_key.dport = snat ? nat_port : f->tuple.sport;
		reply_key.proto = f->tuple.proto;
		reply_key.family = f->tuple.family;
		reply.last_seen_ns = now;
		reply.backend_id = backend_id;
		reply.service_id = svc->id;
		reply.flags = KPX_CT_F_REPLY | (snat ? KPX_CT_F_SNAT : 0);
		__builtin_memcpy(reply.front_addr, f->tuple.dst, 16);
		reply.front_port = f->tuple.dport;
		__builtin_memcpy(reply.nat_addr, f->tuple.src, 16);
		reply.nat_port = f->tuple.sport;
		if (bpf_map_update_elem(&kpx_ct, &reply_key, &reply, BPF_ANY))
			return TC_ACT_SHOT;
	}
	if (rewrite(skb, f, 1, backend->addr, backend->port))
		return TC_ACT_SHOT;
	if (snat && rewrite(skb, f, 0, nat_addr, nat_port))
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
