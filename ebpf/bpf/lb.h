/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The maps every kpx program shares, and the Service lookup and backend choice both the tc
 * program and the socket programs make. Each object defines the same maps; the loader pins
 * them by name under the instance's bpffs directory, so the objects (and a restarted proxy)
 * share one set.
 */
#ifndef KPX_LB_H
#define KPX_LB_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "kpx_maps.h"

/* Sizes are defaults: the loader sets each from the proxy's configuration. */
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

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct kpx_config);
	__uint(max_entries, 1);
} kpx_config SEC(".maps");

/* A digest of the programs whose links are pinned beside the maps (written by user space; a
 * proxy carrying other programs replaces the links). Read by no program. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} kpx_version SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct kpx_clients);
	__uint(max_entries, 1);
} kpx_clients SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct kpx_node_addr);
	__type(value, __u8);
	__uint(max_entries, 256);
} kpx_node_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct kpx_sock_rev_key);
	__type(value, struct kpx_sock_rev_value);
	__uint(max_entries, 262144);
} kpx_sock_rev SEC(".maps");

/* Sizes are defaults here too; BPF_F_NO_PREALLOC is required of LPM tries. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct kpx_src_range4_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
} kpx_src_range4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct kpx_src_range6_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
} kpx_src_range6 SEC(".maps");

/* The frontend `addr:port/proto` belongs to: an exact VIP, else a NodePort when `addr` is one
 * of the node's addresses; for an `internal` client, the frontend's internal-scope entry when
 * it has one. */
static __always_inline struct kpx_service_value *lookup_service(const __u8 *addr, __be16 port,
								__u8 proto, __u8 family,
								int internal)
{
	struct kpx_service_key key = {};
	struct kpx_node_addr local = {};
	struct kpx_service_value *svc, *inner;

	__builtin_memcpy(key.addr, addr, 16);
	key.port = port;
	key.proto = proto;
	key.family = family;
	svc = bpf_map_lookup_elem(&kpx_services, &key);
	if (!svc) {
		__builtin_memcpy(local.addr, addr, 16);
		local.family = family;
		if (!bpf_map_lookup_elem(&kpx_node_addrs, &local))
			return 0;
		__builtin_memset(key.addr, 0, 16);
		svc = bpf_map_lookup_elem(&kpx_services, &key);
		if (!svc || !(svc->flags & KPX_SVC_F_NODEPORT))
			return 0;
	}
	if (!internal || !(svc->flags & KPX_SVC_F_INTERNAL))
		return svc;
	key.family = family | KPX_SCOPE_INTERNAL;
	inner = bpf_map_lookup_elem(&kpx_services, &key);
	return inner ? inner : svc;
}

/*
 * Whether a new connection from `src` may use frontend `svc`: always, unless the frontend is
 * flagged KPX_SVC_F_SOURCE_RANGES (loadBalancerSourceRanges); then only when `src` lies in
 * one of the networks kept under the frontend's id. Established flows are not asked again.
 */
static __always_inline int source_admitted(const struct kpx_service_value *svc, const __u8 *src,
					   __u8 family)
{
	if (!(svc->flags & KPX_SVC_F_SOURCE_RANGES))
		return 1;
	if (family == KPX_FAMILY_V4) {
		struct kpx_src_range4_key key = {
			.prefixlen = KPX_SRC_RANGE_ID_BITS + 32,
			.service_id = svc->id,
		};

		__builtin_memcpy(key.addr, src, 4);
		return bpf_map_lookup_elem(&kpx_src_range4, &key) != 0;
	} else {
		struct kpx_src_range6_key key = {
			.prefixlen = KPX_SRC_RANGE_ID_BITS + 128,
			.service_id = svc->id,
		};

		__builtin_memcpy(key.addr, src, 16);
		return bpf_map_lookup_elem(&kpx_src_range6, &key) != 0;
	}
}

/* Whether `addr` is inside the pod network of its family (kpx_clients). */
static __always_inline int from_pod_network(const __u8 *addr, __u8 family)
{
	__u32 zero = 0;
	struct kpx_clients *clients = bpf_map_lookup_elem(&kpx_clients, &zero);
	const __u8 *net;
	__u8 prefix;
	int i;

	if (!clients)
		return 0;
	prefix = family == KPX_FAMILY_V4 ? clients->pod_prefix4 : clients->pod_prefix6;
	net = family == KPX_FAMILY_V4 ? clients->pod_net4 : clients->pod_net6;
	if (!prefix)
		return 0;
#pragma unroll
	for (i = 0; i < 16; i++) {
		__u8 bits = prefix >= 8 * (i + 1) ? 8 : (prefix > 8 * i ? prefix - 8 * i : 0);
		__u8 mask = bits ? (__u8)(0xff << (8 - bits)) : 0;

		if ((addr[i] & mask) != (net[i] & mask))
			return 0;
	}
	return 1;
}

/* The node's address of `family` (kpx_config: the masquerade source); 0 when there is none. */
static __always_inline int node_address(__u8 family, __u8 *out)
{
	__u32 zero = 0;
	struct kpx_config *config = bpf_map_lookup_elem(&kpx_config, &zero);
	__u8 *ip;
	__u32 any = 0;
	int i;

	if (!config)
		return 0;
	ip = family == KPX_FAMILY_V4 ? config->node_ip4 : config->node_ip6;
	__builtin_memcpy(out, ip, 16);
	for (i = 0; i < 16; i++)
		any |= out[i];
	return any != 0;
}

/* Whether pods of `family` can be told apart (a pod network is configured). */
static __always_inline int pods_known(__u8 family)
{
	__u32 zero = 0;
	struct kpx_clients *clients = bpf_map_lookup_elem(&kpx_clients, &zero);

	if (!clients)
		return 0;
	return family == KPX_FAMILY_V4 ? clients->pod_prefix4 != 0 : clients->pod_prefix6 != 0;
}

/* Whether the calling socket is in the node's own network namespace. */
static __always_inline int node_socket(__u64 netns)
{
	__u32 zero = 0;
	struct kpx_clients *clients = bpf_map_lookup_elem(&kpx_clients, &zero);

	return clients && clients->node_netns == netns;
}

/*
 * The backend for a new flow of `client` (an address, or a socket's netns cookie): its previous
 * one under session affinity, else slot `hash % count + 1`. Returns the backend id, 0 if none.
 */
static __always_inline __u32 pick_backend(const __u8 *client, __u8 family,
					  const struct kpx_service_value *svc, __u32 hash,
					  struct kpx_backend **backend)
{
	struct kpx_affinity_key akey = {};
	struct kpx_slot_key skey = {};
	__u64 now = bpf_ktime_get_ns();
	__u32 *id;

	if (svc->count == 0)
		return 0;
	if (svc->affinity_timeout) {
		struct kpx_affinity_value *seen;

		__builtin_memcpy(akey.client, client, 16);
		akey.service_id = svc->id;
		akey.family = family;
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
	skey.slot = hash % svc->count + 1;
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

#endif /* KPX_LB_H */
