// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Socket-level Service load balancing for the node's clients (attached to the node's cgroup):
 * the backend is chosen once, when the socket connects (or per datagram for unconnected UDP),
 * and the socket talks to it directly, so no packet ever carries the Service address and
 * nothing is translated per packet. getpeername and recvmsg show the application the Service
 * address it asked for.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "lb.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define ECONNREFUSED 111
#define EPERM 1
/* From <sys/socket.h>, which is not for the BPF target. */
#define SOCK_STREAM 1
#define SOCK_DGRAM 2

/* The address a sock_addr context asks for, as the maps hold addresses. Context fields are
 * read one 32-bit word at a time, as the verifier requires. */
static __always_inline void user_addr(struct bpf_sock_addr *ctx, __u8 family, __u32 *out)
{
	out[0] = out[1] = out[2] = out[3] = 0;
	if (family == KPX_FAMILY_V4) {
		out[0] = ctx->user_ip4;
	} else {
		out[0] = ctx->user_ip6[0];
		out[1] = ctx->user_ip6[1];
		out[2] = ctx->user_ip6[2];
		out[3] = ctx->user_ip6[3];
	}
}

static __always_inline void set_user_addr(struct bpf_sock_addr *ctx, __u8 family,
					  const __u8 *addr, __be16 port)
{
	__u32 words[4];

	__builtin_memcpy(words, addr, 16);
	if (family == KPX_FAMILY_V4) {
		ctx->user_ip4 = words[0];
	} else {
		ctx->user_ip6[0] = words[0];
		ctx->user_ip6[1] = words[1];
		ctx->user_ip6[2] = words[2];
		ctx->user_ip6[3] = words[3];
	}
	ctx->user_port = port;
}

/*
 * The source a node's socket will send from, as loadBalancerSourceRanges judge it: the address
 * it is bound to, else the node's address of the family (kpx_config). An unbound socket gets
 * its source from the route only after this hook, and a sock_addr program cannot look routes
 * up; the node's address is what the frontend model assumes the node sends from.
 */
static __always_inline void node_source(struct bpf_sock_addr *ctx, __u8 family, __u32 *out)
{
	struct bpf_sock *sk = ctx->sk;

	out[0] = out[1] = out[2] = out[3] = 0;
	if (sk) {
		if (family == KPX_FAMILY_V4) {
			out[0] = sk->src_ip4;
		} else {
			out[0] = sk->src_ip6[0];
			out[1] = sk->src_ip6[1];
			out[2] = sk->src_ip6[2];
			out[3] = sk->src_ip6[3];
		}
	}
	if (!(out[0] | out[1] | out[2] | out[3]))
		node_address(family, (__u8 *)out);
}

static __always_inline __u8 sock_proto(struct bpf_sock_addr *ctx)
{
	if (ctx->type == SOCK_STREAM)
		return IPPROTO_TCP;
	if (ctx->type == SOCK_DGRAM)
		return IPPROTO_UDP;
	return 0;
}

/*
 * connect and sendmsg: a Service address becomes one of its backends. A connecting socket
 * gets a random backend; unconnected UDP keeps one per socket (hashed from its cookie), so a
 * client's datagrams form one flow. A Service without endpoints refuses at once.
 */
static __always_inline int translate(struct bpf_sock_addr *ctx, __u8 family, int per_socket)
{
	struct kpx_sock_rev_key rkey = {};
	struct kpx_sock_rev_value front = {};
	struct kpx_service_value *svc;
	struct kpx_backend *backend = 0;
	__u32 addr[4], client[4] = {};
	__be16 port = (__be16)ctx->user_port;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u64 netns = bpf_get_netns_cookie(ctx);
	__u8 proto = sock_proto(ctx);
	int node = node_socket(netns);
	__u32 hash;

	if (!proto)
		return 1;
	user_addr(ctx, family, addr);
	/* The node's own sockets, and pods' when pods can be told apart, are internal clients. */
	svc = lookup_service((__u8 *)addr, port, proto, family, node || pods_known(family));
	if (!svc)
		return 1;
	if (svc->flags & KPX_SVC_F_SOURCE_RANGES) {
		__u32 source[4];

		/* A pod's source is its own address, which this hook cannot know yet: its packets
		 * are left to the tc program, which judges them at the node's end of its veth. */
		if (!node)
			return 1;
		/* The node's connect (or sendmsg) fails at once with EPERM, what a sock_addr
		 * program's refusal gives: a UDP send dropped in netfilter's OUTPUT fails so too,
		 * where a TCP connect would time out; never ECONNREFUSED, which says "no
		 * endpoints" (the README's known limits). */
		node_source(ctx, family, source);
		if (!source_admitted(svc, (__u8 *)source, family)) {
			bpf_set_retval(-EPERM);
			return 0;
		}
	}
	/* A pod whose traffic must be masqueraded is left to the tc program, which rewrites its
	 * packets' source: a socket cannot be given another source address here. */
	if (!node && (svc->flags & KPX_SVC_F_MASQ_PODS))
		return 1;
	if (svc->count == 0) {
		if (svc->flags & KPX_SVC_F_DROP) {
			/* Endpoints exist, none for this client: a pod's packets are dropped by the
			 * tc program, as a forwarding node drops them; the node's own connect fails
			 * with EPERM, as a packet dropped in netfilter's OUTPUT makes it fail. */
			if (!node)
				return 1;
			bpf_set_retval(-EPERM);
			return 0;
		}
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	/* Session affinity per network namespace: the client's address is not known yet. */
	__builtin_memcpy(client, &netns, sizeof(netns));
	hash = per_socket ? (__u32)(cookie ^ (cookie >> 32)) * 2654435761u : bpf_get_prandom_u32();
	if (!pick_backend((__u8 *)client, 0, svc, hash, &backend) || !backend)
		return 1;
	rkey.cookie = cookie;
	__builtin_memcpy(rkey.addr, backend->addr, 16);
	rkey.port = backend->port;
	rkey.family = family;
	__builtin_memcpy(front.addr, addr, 16);
	front.port = port;
	front.family = family;
	bpf_map_update_elem(&kpx_sock_rev, &rkey, &front, BPF_ANY);
	set_user_addr(ctx, family, backend->addr, backend->port);
	return 1;
}

/* getpeername and recvmsg: a backend this socket was sent to shows as the Service. */
static __always_inline int restore(struct bpf_sock_addr *ctx, __u8 family)
{
	struct kpx_sock_rev_key rkey = {};
	struct kpx_sock_rev_value *front;
	__u32 addr[4];

	user_addr(ctx, family, addr);
	rkey.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rkey.addr, addr, 16);
	rkey.port = (__be16)ctx->user_port;
	rkey.family = family;
	front = bpf_map_lookup_elem(&kpx_sock_rev, &rkey);
	if (front)
		set_user_addr(ctx, family, front->addr, front->port);
	return 1;
}

SEC("cgroup/connect4")
int kpx_connect4(struct bpf_sock_addr *ctx)
{
	return translate(ctx, KPX_FAMILY_V4, 0);
}

SEC("cgroup/connect6")
int kpx_connect6(struct bpf_sock_addr *ctx)
{
	return translate(ctx, KPX_FAMILY_V6, 0);
}

SEC("cgroup/sendmsg4")
int kpx_sendmsg4(struct bpf_sock_addr *ctx)
{
	return translate(ctx, KPX_FAMILY_V4, 1);
}

SEC("cgroup/sendmsg6")
int kpx_sendmsg6(struct bpf_sock_addr *ctx)
{
	return translate(ctx, KPX_FAMILY_V6, 1);
}

SEC("cgroup/recvmsg4")
int kpx_recvmsg4(struct bpf_sock_addr *ctx)
{
	return restore(ctx, KPX_FAMILY_V4);
}

SEC("cgroup/recvmsg6")
int kpx_recvmsg6(struct bpf_sock_addr *ctx)
{
	return restore(ctx, KPX_FAMILY_V6);
}

SEC("cgroup/getpeername4")
int kpx_getpeername4(struct bpf_sock_addr *ctx)
{
	return restore(ctx, KPX_FAMILY_V4);
}

SEC("cgroup/getpeername6")
int kpx_getpeername6(struct bpf_sock_addr *ctx)
{
	return restore(ctx, KPX_FAMILY_V6);
}
