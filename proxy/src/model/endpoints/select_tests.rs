//! `select` as a table: each row an endpoint set, a Service's needs and this node's place, and
//! what kube-proxy's `CategorizeEndpoints` (`pkg/proxy/topology.go`) returns for it. Endpoints
//! are written `name:flags`, flags from `r` ready, `s` serving, `t` terminating, `l` local,
//! `z=a|b` zone hints, `n=x|y` node hints.

use std::net::{IpAddr, Ipv4Addr};

use super::*;

fn endpoint(i: usize, spec: &str) -> Endpoint {
    let mut e = Endpoint {
        ip: IpAddr::V4(Ipv4Addr::new(198, 18, 0, i as u8 + 1)),
        port: 80,
        ready: false,
        serving: false,
        terminating: false,
        local: false,
        hints: Hints::default(),
    };
    for flag in spec.split(',').filter(|f| !f.is_empty()) {
        match flag {
            "r" => e.ready = true,
            "s" => e.serving = true,
            "t" => e.terminating = true,
            "l" => e.local = true,
            _ if flag.starts_with("z=") => {
                let zones = flag[2..].split('|').map(String::from).collect();
                e.hints = Hints::new(zones, e.hints.nodes().to_vec());
            }
            _ if flag.starts_with("n=") => {
                let nodes = flag[2..].split('|').map(String::from).collect();
                e.hints = Hints::new(e.hints.zones().to_vec(), nodes);
            }
            other => panic!("unknown flag {other:?}"),
        }
    }
    e
}

/// The endpoints' indexes in `set`, as text: `[0 2]`.
fn names(all: &[Endpoint], set: &[Endpoint]) -> String {
    let found: Vec<String> = set
        .iter()
        .map(|e| {
            all.iter()
                .position(|a| a == e)
                .map_or("?".to_string(), |i| i.to_string())
        })
        .collect();
    format!("[{}]", found.join(" "))
}

const CLUSTER: Uses = Uses {
    cluster: true,
    local: false,
};
const LOCAL: Uses = Uses {
    cluster: false,
    local: true,
};
const BOTH: Uses = Uses {
    cluster: true,
    local: true,
};

/// (why, endpoints, uses, zone, expected "cluster local any").
type Row = (
    &'static str,
    &'static [&'static str],
    Uses,
    &'static str,
    &'static str,
);

#[test]
fn select_follows_categorize_endpoints() {
    #[rustfmt::skip]
    let rows: &[Row] = &[
        // --- conditions, the serving-terminating fallback (CategorizeEndpoints) ---
        ("no endpoints: nothing, and none usable", &[], BOTH, "", "[] [] false"),
        ("ready ones only while any is ready", &["r,s", "s,t", "r,s,l"], CLUSTER, "", "[0 2] [] true"),
        ("none ready: serving-and-terminating ones", &["s,t", "t", "s"], CLUSTER, "", "[0] [] true"),
        // The issue-16 finding: endpoints exist but none is usable, so `any` is false and
        // the backends reject instead of dropping.
        ("none ready or serving-terminating: not any", &["", "t", "s"], BOTH, "", "[] [] false"),
        ("local policy: this node's ready ones", &["r,s,l", "r,s"], LOCAL, "", "[] [0] true"),
        ("local policy: this node's serving-terminating ones when none of its is ready", &["s,t,l", "r,s"], LOCAL, "", "[] [0] true"),
        ("local policy, nothing usable here: any still counts the others", &["r,s", "l"], LOCAL, "", "[] [] true"),
        ("local and cluster fall back independently", &["s,t,l", "r,s"], BOTH, "", "[1] [0] true"),
        // --- UsesClusterEndpoints / UsesLocalEndpoints ---
        ("a Service using only cluster endpoints has no local set", &["r,s,l"], CLUSTER, "", "[0] [] true"),
        ("a Service using only local endpoints has no cluster set", &["r,s,l", "r,s"], LOCAL, "", "[] [0] true"),
        // --- topologyModeFromHints / availableForTopology ---
        ("zone hints for this zone narrow the cluster set", &["r,z=a", "r,z=b", "r,z=a"], CLUSTER, "a", "[0 2] [] true"),
        ("no endpoint hinted for this zone: all", &["r,z=b", "r,z=b"], CLUSTER, "a", "[0 1] [] true"),
        ("one ready endpoint without hints: all", &["r,z=a", "r"], CLUSTER, "a", "[0 1] [] true"),
        ("unready endpoints without hints do not count", &["r,z=a", "r,z=b", "s,t"], CLUSTER, "a", "[0] [] true"),
        ("node without a zone label: all", &["r,z=a", "r,z=b"], CLUSTER, "", "[0 1] [] true"),
        ("an endpoint may be hinted for several zones", &["r,z=a|b", "r,z=b"], CLUSTER, "a", "[0] [] true"),
        ("node hints for this node win over zone hints", &["r,z=a,n=n1", "r,z=a,n=n2"], CLUSTER, "a", "[0] [] true"),
        ("no endpoint for this node: zone hints", &["r,z=a,n=n2", "r,z=b,n=n3"], CLUSTER, "a", "[0] [] true"),
        ("no endpoint for this node or zone: all", &["r,z=b,n=n2", "r,z=c,n=n3"], CLUSTER, "a", "[0 1] [] true"),
        ("node hints not on every ready endpoint: zone hints", &["r,z=a,n=n1", "r,z=b"], CLUSTER, "a", "[0] [] true"),
        ("topology does not narrow the local set", &["r,l,z=b", "r,z=a"], BOTH, "a", "[1] [0] true"),
        ("no ready endpoint: topology is not used and terminating ones serve", &["s,t,z=b", "s,t,z=a"], CLUSTER, "a", "[0 1] [] true"),
    ];
    for (why, specs, uses, zone, expected) in rows {
        let all: Vec<Endpoint> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| endpoint(i, s))
            .collect();
        let got = select(&all, *uses, Place { node: "n1", zone });
        let text = format!(
            "{} {} {}",
            names(&all, &got.cluster),
            names(&all, &got.local),
            got.any
        );
        assert_eq!(&text, expected, "{why}");
    }
}

#[test]
fn uses_follows_the_traffic_policies_and_external_reachability() {
    let mut port = crate::model::ServicePort {
        name: crate::model::ServicePortName {
            service: crate::model::NamespacedName::new("ns", "web"),
            port: String::new(),
            protocol: crate::model::Protocol::Tcp,
        },
        cluster_ips: vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))],
        port: 80,
        node_port: None,
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        source_ranges: Vec::new(),
        source_ranges_given: false,
        affinity_seconds: None,
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: None,
    };
    assert_eq!(Uses::of(&port), CLUSTER, "Cluster/Cluster");
    port.internal_policy_local = true;
    assert_eq!(Uses::of(&port), LOCAL, "internal Local, not external");
    let local_one = endpoint(0, "r,l");
    let all = [local_one.clone(), endpoint(1, "r")];
    let selected = select(&all, Uses::of(&port), Place::default());
    assert_eq!(selected.internal(&port), std::slice::from_ref(&local_one));
    port.node_port = Some(30080);
    assert_eq!(
        Uses::of(&port),
        BOTH,
        "internal Local, external Cluster: outside traffic needs cluster endpoints"
    );
    let selected = select(&all, Uses::of(&port), Place::default());
    assert_eq!(selected.internal(&port), std::slice::from_ref(&local_one));
    assert_eq!(
        selected.external(&port),
        all,
        "external Cluster: every endpoint"
    );
    port.internal_policy_local = false;
    port.external_policy_local = true;
    assert_eq!(
        Uses::of(&port),
        BOTH,
        "external Local: pods short-circuit to cluster endpoints"
    );
    let selected = select(&all, Uses::of(&port), Place::default());
    assert_eq!(selected.internal(&port), all);
    assert_eq!(selected.external(&port), [local_one]);
}
