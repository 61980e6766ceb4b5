/* Built for the host by build.rs: prints the size and field offsets of every struct in
 * kpx_maps.h, which src/layout.rs's test compares with the Rust mirrors. */
#include <stddef.h>
#include <stdio.h>

#include "kpx_maps.h"

#define SIZE(s) printf(#s " SIZE %zu\n", sizeof(struct s))
#define FIELD(s, f) printf(#s " %s %zu\n", #f, offsetof(struct s, f))

int main(void)
{
	SIZE(kpx_service_key);
	FIELD(kpx_service_key, addr);
	FIELD(kpx_service_key, port);
	FIELD(kpx_service_key, proto);
	FIELD(kpx_service_key, family);
	SIZE(kpx_service_value);
	FIELD(kpx_service_value, id);
	FIELD(kpx_service_value, count);
	FIELD(kpx_service_value, flags);
	FIELD(kpx_service_value, affinity_timeout);
	SIZE(kpx_slot_key);
	FIELD(kpx_slot_key, service_id);
	FIELD(kpx_slot_key, slot);
	SIZE(kpx_backend);
	FIELD(kpx_backend, addr);
	FIELD(kpx_backend, port);
	FIELD(kpx_backend, family);
	FIELD(kpx_backend, flags);
	SIZE(kpx_rev_nat);
	FIELD(kpx_rev_nat, addr);
	FIELD(kpx_rev_nat, port);
	FIELD(kpx_rev_nat, family);
	FIELD(kpx_rev_nat, name);
	SIZE(kpx_affinity_key);
	FIELD(kpx_affinity_key, client);
	FIELD(kpx_affinity_key, service_id);
	FIELD(kpx_affinity_key, family);
	SIZE(kpx_affinity_value);
	FIELD(kpx_affinity_value, last_used_ns);
	FIELD(kpx_affinity_value, backend_id);
	SIZE(kpx_ct_key);
	FIELD(kpx_ct_key, src);
	FIELD(kpx_ct_key, dst);
	FIELD(kpx_ct_key, sport);
	FIELD(kpx_ct_key, dport);
	FIELD(kpx_ct_key, proto);
	FIELD(kpx_ct_key, family);
	SIZE(kpx_ct_value);
	FIELD(kpx_ct_value, last_seen_ns);
	FIELD(kpx_ct_value, backend_id);
	FIELD(kpx_ct_value, service_id);
	FIELD(kpx_ct_value, flags);
	FIELD(kpx_ct_value, front_port);
	FIELD(kpx_ct_value, nat_port);
	FIELD(kpx_ct_value, front_addr);
	FIELD(kpx_ct_value, nat_addr);
	SIZE(kpx_config);
	FIELD(kpx_config, node_ip4);
	FIELD(kpx_config, node_ip6);
	SIZE(kpx_clients);
	FIELD(kpx_clients, node_netns);
	FIELD(kpx_clients, pod_net4);
	FIELD(kpx_clients, pod_net6);
	FIELD(kpx_clients, pod_prefix4);
	FIELD(kpx_clients, pod_prefix6);
	SIZE(kpx_node_addr);
	FIELD(kpx_node_addr, addr);
	FIELD(kpx_node_addr, family);
	SIZE(kpx_sock_rev_key);
	FIELD(kpx_sock_rev_key, cookie);
	FIELD(kpx_sock_rev_key, addr);
	FIELD(kpx_sock_rev_key, port);
	FIELD(kpx_sock_rev_key, family);
	SIZE(kpx_sock_rev_value);
	FIELD(kpx_sock_rev_value, addr);
	FIELD(kpx_sock_rev_value, port);
	FIELD(kpx_sock_rev_value, family);
	SIZE(kpx_src_range4_key);
	FIELD(kpx_src_range4_key, prefixlen);
	FIELD(kpx_src_range4_key, service_id);
	FIELD(kpx_src_range4_key, addr);
	SIZE(kpx_src_range6_key);
	FIELD(kpx_src_range6_key, prefixlen);
	FIELD(kpx_src_range6_key, service_id);
	FIELD(kpx_src_range6_key, addr);
	return 0;
}
