use serde_json::json;

use super::*;

fn svc(spec: serde_json::Value) -> Service {
    serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": spec}),
    )
    .expect("service")
}

fn check(spec: serde_json::Value) -> Vec<String> {
    let network = ServiceNetwork::default();
    let mut s = svc(spec);
    default_service(&mut s, &network);
    validate_service(&s, None, &network)
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn invalid_services_name_the_field() {
    let errs = check(json!({"ports": [{"port": 0, "targetPort": 80}]}));
    assert_eq!(
        errs,
        ["spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive"]
    );
    let errs = check(json!({"ports": [{"port": 70000, "targetPort": 80}]}));
    assert_eq!(
        errs,
        ["spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive"]
    );
    let errs = check(json!({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}));
    assert_eq!(errs, ["spec.ports[1].name: Duplicate value: \"a\""]);
    let errs = check(json!({"ports": [{"port": 80, "protocol": "FOO"}]}));
    assert_eq!(errs, ["spec.ports[0].protocol: Unsupported value: \"FOO\": supported values: \"SCTP\", \"TCP\", \"UDP\""]);
    let errs = check(json!({"clusterIP": "1.2.3.4", "ports": [{"port": 80}]}));
    assert_eq!(errs, ["spec.clusterIPs[0]: Invalid value: \"1.2.3.4\": failed to allocate IP 1.2.3.4: provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12"]);
    let errs = check(json!({"ports": [{"port": 80}, {"port": 81}]}));
    assert_eq!(
        errs,
        [
            "spec.ports[0].name: Required value",
            "spec.ports[1].name: Required value"
        ]
    );
    let errs = check(json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}));
    assert_eq!(errs, ["spec.ports[0].nodePort: Invalid value: 80: provided port is not in the valid range. The range of valid ports is 30000-32767"]);
    assert!(
        check(json!({"clusterIP": "None"})).is_empty(),
        "headless needs no ports"
    );
}

#[test]
fn defaults_and_allocation() {
    let network = ServiceNetwork::default();
    let mut allocator = Allocator::new(network.clone());
    let mut s = svc(
        json!({"type": "NodePort", "ports": [{"port": 80, "targetPort": 0}, {"port": 80, "protocol": "UDP", "name": "u"}], "sessionAffinity": "ClientIP"}),
    );
    s.spec
        .as_mut()
        .expect("spec")
        .ports
        .as_mut()
        .expect("ports")[0]
        .name = Some("t".into());
    default_service(&mut s, &network);
    assert!(validate_service(&s, None, &network).is_empty());
    let held = allocate(&mut s, None, &mut allocator).expect("allocate");
    let spec = s.spec.as_ref().expect("spec");
    assert_eq!(held.ips.len(), 1);
    assert_eq!(held.ports.len(), 2);
    assert_eq!(
        spec.cluster_ip,
        spec.cluster_ips.as_ref().and_then(|v| v.first().cloned())
    );
    assert_eq!(spec.ip_families.as_deref(), Some(&["IPv4".to_string()][..]));
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
    let affinity = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    assert_eq!(affinity, Some(10800));
    let ports = spec.ports.as_ref().expect("ports");
    assert_eq!(ports[0].target_port, Some(IntOrString::Int(80)));
    assert_eq!(ports[1].protocol.as_deref(), Some("UDP"));

    // The same ClusterIP requested again is refused by the allocator, and nothing leaks.
    let ip = spec.cluster_ip.clone().expect("ip");
    let mut twin = svc(json!({"clusterIP": ip, "ports": [{"port": 80}]}));
    default_service(&mut twin, &network);
    let errs = allocate(&mut twin, None, &mut allocator).expect_err("must be refused");
    assert!(
        errs[0]
            .to_string()
            .ends_with("provided IP is already allocated"),
        "{}",
        errs[0]
    );
    assert_eq!(allocator.ips_in_use(), 1);
}

#[test]
fn updates_keep_allocations_and_refuse_a_new_cluster_ip() {
    let network = ServiceNetwork::default();
    let mut allocator = Allocator::new(network.clone());
    let mut old = svc(json!({"type": "NodePort", "ports": [{"port": 80}]}));
    default_service(&mut old, &network);
    allocate(&mut old, None, &mut allocator).expect("allocate");
    let mut new = svc(json!({"type": "NodePort", "ports": [{"port": 80}]}));
    preserve_allocations(&mut new, &old);
    default_service(&mut new, &network);
    assert!(validate_service(&new, Some(&old), &network).is_empty());
    let taken = allocate(&mut new, Some(&old), &mut allocator).expect("allocate");
    assert_eq!(taken, Held::default(), "nothing new was taken");
    assert_eq!(Held::of(&new), Held::of(&old));

    let mut moved = new.clone();
    moved.spec.as_mut().expect("spec").cluster_ips = Some(vec!["10.96.0.99".into()]);
    moved.spec.as_mut().expect("spec").cluster_ip = Some("10.96.0.99".into());
    let errs: Vec<String> = validate_service(&moved, Some(&old), &network)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errs,
        ["spec.clusterIPs[0]: Invalid value: [\"10.96.0.99\"]: may not change once set"]
    );
}
