//! The cases, as data. Addresses: node n1 is 198.18.0.10 and 198.18.1.10 (and 2001:2::10);
//! the pod network is 198.18.128.0/17 (2001:2:0:8000::/49): pods on n1 are 198.18.128.x,
//! on n2 198.18.129.x; Service addresses are 198.19.x; outside clients 198.19.255.1 and
//! 2001:2:0:1::99.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::{ip, Case, From, Node, Outcome, Probe, Seen, NODE_IP4, NODE_IP6};
use crate::model::Protocol;

const CIDR4: &str = "198.18.128.0/17";
const CIDR6: &str = "2001:2:0:8000::/49";
/// The node's second IPv4 address (outside the `--nodeport-addresses` of one case).
pub const NODE_IP4_B: &str = "198.18.1.10";

const POD: &str = "198.18.128.3";
const REMOTE_POD: &str = "198.18.129.5";
const OUTSIDE: &str = "198.19.255.1";
const OUTSIDE6: &str = "2001:2:0:1::99";
const LOCAL_EP: &str = "198.18.128.2";
const REMOTE_EP: &str = "198.18.129.2";

fn service(name: &str, spec: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": "ns"}, "spec": spec})
}

/// A LoadBalancer Service with its ingress IPs; `"IP/Proxy"` gives that ingress `ipMode: Proxy`.
fn lb_service(name: &str, spec: Value, ingress: &[&str]) -> Value {
    let ingress: Vec<Value> = ingress
        .iter()
        .map(|i| match i.strip_suffix("/Proxy") {
            Some(ip) => json!({"ip": ip, "ipMode": "Proxy"}),
            None => json!({"ip": i, "ipMode": "VIP"}),
        })
        .collect();
    json!({"metadata": {"name": name, "namespace": "ns"}, "spec": spec,
           "status": {"loadBalancer": {"ingress": ingress}}})
}

/// An endpoint: address, node, and (ready, serving, terminating).
type Ep = (&'static str, &'static str, (bool, bool, bool));

const READY: (bool, bool, bool) = (true, true, false);

fn slice(service: &str, family: &str, endpoints: &[Ep], ports: Value) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(addr, node, (ready, serving, terminating))| {
            json!({"addresses": [addr], "nodeName": node,
                   "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
        })
        .collect();
    json!({
        "metadata": {"name": format!("{service}-{}", family.to_lowercase()), "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": family, "endpoints": endpoints, "ports": ports,
    })
}

/// A slice whose endpoints carry zone hints (as the EndpointSlice controller writes them for
/// `trafficDistribution: PreferClose`): address, node, zone.
fn hinted_slice(service: &str, endpoints: &[(&str, &str, &str)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(addr, node, zone)| {
            json!({"addresses": [addr], "nodeName": node, "zone": zone,
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "hints": {"forZones": [{"name": zone}]}})
        })
        .collect();
    json!({
        "metadata": {"name": format!("{service}-ipv4"), "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": http(),
    })
}

fn http() -> Value {
    json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
}

fn both() -> Vec<Ep> {
    vec![(LOCAL_EP, "n1", READY), (REMOTE_EP, "n2", READY)]
}

fn reach(endpoints: &[&str], seen: Seen) -> Outcome {
    Outcome::Reach {
        endpoints: endpoints
            .iter()
            .map(|e| e.to_string())
            .collect::<BTreeSet<_>>(),
        seen,
        affinity: None,
    }
}

fn eps(ips: &[&str], port: u16) -> Vec<String> {
    ips.iter()
        .map(|i| {
            if i.contains(':') {
                format!("[{i}]:{port}")
            } else {
                format!("{i}:{port}")
            }
        })
        .collect()
}

fn to(from: From, address: &str, port: u16, want: Outcome) -> Probe {
    Probe {
        from,
        to: ip(address),
        port,
        protocol: Protocol::Tcp,
        want,
    }
}

fn udp(from: From, address: &str, port: u16, want: Outcome) -> Probe {
    Probe {
        protocol: Protocol::Udp,
        ..to(from, address, port, want)
    }
}

fn with_cidr() -> Node {
    Node {
        cluster_cidrs: vec![CIDR4, CIDR6],
        ..Node::default()
    }
}

/// Every case.
pub fn all() -> Vec<Case> {
    let all_eps = eps(&[LOCAL_EP, REMOTE_EP], 8080);
    let all_eps: Vec<&str> = all_eps.iter().map(String::as_str).collect();
    let local_ep = eps(&[LOCAL_EP], 8080);
    let local_ep: Vec<&str> = local_ep.iter().map(String::as_str).collect();
    let remote_ep = eps(&[REMOTE_EP], 8080);
    let remote_ep: Vec<&str> = remote_ep.iter().map(String::as_str).collect();
    let cluster_ip = "198.19.0.10";
    let external_ip = "198.19.64.10";
    let lb_ip = "198.19.65.10";
    let web = |spec: Value| service("web", spec);
    let web_slice = |endpoints: Vec<Ep>| slice("web", "IPv4", &endpoints, http());
    let node_port_spec = |policy: &str| {
        json!({"type": "NodePort", "clusterIP": cluster_ip, "externalIPs": [external_ip],
               "externalTrafficPolicy": policy,
               "ports": [{"name": "http", "port": 80, "nodePort": 30080}]})
    };

    vec![
        Case {
            name: "cluster IP: pods keep their address, the node and off-cluster clients are masqueraded",
            services: vec![web(json!({"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80}]}))],
            slices: vec![web_slice(both())],
            node: with_cidr(),
            probes: vec![
                to(From::Pod(POD), cluster_ip, 80, reach(&all_eps, Seen::Client)),
                to(From::RemotePod(REMOTE_POD), cluster_ip, 80, reach(&all_eps, Seen::Client)),
                to(From::Node, cluster_ip, 80, reach(&all_eps, Seen::Node)),
                to(From::Outside(OUTSIDE), cluster_ip, 80, reach(&all_eps, Seen::Node)),
                to(From::Pod(POD), cluster_ip, 81, Outcome::NotAService),
                udp(From::Pod(POD), cluster_ip, 80, Outcome::NotAService),
            ],
        },
        Case {
            name: "NodePort (externalTrafficPolicy Cluster): every client masqueraded, on every node address",
            services: vec![web(node_port_spec("Cluster"))],
            slices: vec![web_slice(both())],
            node: with_cidr(),
            probes: vec![
                to(From::Outside(OUTSIDE), NODE_IP4, 30080, reach(&all_eps, Seen::Node)),
                to(From::Outside(OUTSIDE), NODE_IP4_B, 30080, reach(&all_eps, Seen::Node)),
                to(From::Pod(POD), NODE_IP4, 30080, reach(&all_eps, Seen::Node)),
                to(From::RemotePod(REMOTE_POD), NODE_IP4, 30080, reach(&all_eps, Seen::Node)),
                to(From::Node, NODE_IP4, 30080, reach(&all_eps, Seen::Node)),
                to(From::Outside(OUTSIDE), NODE_IP4, 30081, Outcome::NotAService),
                to(From::Outside(OUTSIDE), cluster_ip, 80, reach(&all_eps, Seen::Node)),
            ],
        },
        Case {
            name: "external IP (externalTrafficPolicy Cluster): masqueraded from everywhere",
            services: vec![web(json!({"clusterIP": cluster_ip, "externalIPs": [external_ip],
                                      "ports": [{"name": "http", "port": 80}]}))],
            slices: vec![web_slice(both())],
            node: with_cidr(),
            probes: vec![
                to(From::Outside(OUTSIDE), external_ip, 80, reach(&all_eps, Seen::Node)),
                to(From::Pod(POD), external_ip, 80, reach(&all_eps, Seen::Node)),
                to(From::Node, external_ip, 80, reach(&all_eps, Seen::Node)),
                to(From::Outside(OUTSIDE), external_ip, 81, Outcome::NotAService),
            ],
        },
        Case {
            name: "load-balancer IP (externalTrafficPolicy Cluster), and one with ipMode Proxy not programmed",
            services: vec![lb_service(
                "web",
                json!({"type": "LoadBalancer", "clusterIP": cluster_ip,
                       "ports": [{"name": "http", "port": 80, "nodePort": 30090}]}),
                &[lb_ip, "198.19.65.11/Proxy"],
            )],
            slices: vec![web_slice(both())],
            node: with_cidr(),
            probes: vec![
                to(From::Outside(OUTSIDE), lb_ip, 80, reach(&all_eps, Seen::Node)),
                // ipMode Proxy: the load balancer itself proxies to the node; not programmed.
                to(From::Outside(OUTSIDE), "198.19.65.11", 80, Outcome::NotAService),
                to(From::Pod(POD), lb_ip, 80, reach(&all_eps, Seen::Node)),
                to(From::Outside(OUTSIDE), NODE_IP4, 30090, reach(&all_eps, Seen::Node)),
            ],
        },
        Case {
            name: "loadBalancerSourceRanges: only sources in the ranges reach the load-balancer IP (pods and the node too); the NodePort and cluster IP stay open",
            services: vec![lb_service(
                "web",
                // Host bits and padding as kube-apiserver lets them through.
                json!({"type": "LoadBalancer", "clusterIP": cluster_ip,
                       "loadBalancerSourceRanges": [" 198.19.255.0/24 ", "198.18.128.3/32", "2001:db8::/32"],
                       "ports": [{"name": "http", "port": 80, "nodePort": 30090}]}),
                &[lb_ip],
            )],
            slices: vec![web_slice(both())],
            node: with_cidr(),
            probes: vec![
                to(From::Outside(OUTSIDE), lb_ip, 80, reach(&all_eps, Seen::Node)),
                to(From::Outside("198.19.254.1"), lb_ip, 80, Outcome::Drop),
                to(From::Pod(POD), lb_ip, 80, reach(&all_eps, Seen::Node)),
                to(From::RemotePod(REMOTE_POD), lb_ip, 80, Outcome::Drop),
                // The ranges do not take in the node's address: the node is refused too.
                to(From::Node, lb_ip, 80, Outcome::Drop),
                to(From::Outside("198.19.254.1"), NODE_IP4, 30090, reach(&all_eps, Seen::Node)),
                to(From::Outside("198.19.254.1"), cluster_ip, 80, reach(&all_eps, Seen::Node)),
            ],
        },
        Case {
            name: "loadBalancerSourceRanges with externalTrafficPolicy Local: the ranges first, then local endpoints; a range taking in the node admits the node",
            services: vec![lb_service(
                "web",
                json!({"type": "LoadBalancer", "clusterIP": cluster_ip, "externalTrafficPolicy": "Local",
                       "loadBalancerSourceRanges": ["198.19.255.0/24", "198.18.0.0/24"],
                       "ports": [{"name": "http", "port": 80, "nodePort": 30090}]}),
                &[lb_ip],
            )],
            slices: vec![web_slice(both())],
            node: with_cidr(),
            probes: vec![
                to(From::Outside(OUTSIDE), lb_ip, 80, reach(&local_ep, Seen::Client)),
                to(From::Outside("198.19.254.1"), lb_ip, 80, Outcome::Drop),
                to(From::Node, lb_ip, 80, reach(&all_eps, Seen::Node)),
                to(From::Pod(POD), lb_ip, 80, Outcome::Drop),
            ],
        },
        Case {
            name: "loadBalancerSourceRanges, none readable: nobody reaches the load-balancer IP (closed, not open); no endpoints: the ranges still come first",
            services: vec![
                lb_service(
                    "web",
                    json!({"type": "LoadBalancer", "clusterIP": cluster_ip,
                           "loadBalancerSourceRanges": ["not-a-cidr"],
                           "ports": [{"name": "http", "port": 80, "nodePort": 30090}]}),
                    &[lb_ip],
                ),
                lb_service(
                    "empty",
                    json!({"type": "LoadBalancer", "clusterIP": "198.19.0.31",
                           "loadBalancerSourceRanges": ["198.19.255.0/24"],
                           "ports": [{"name": "http", "port": 80, "nodePort": 30091}]}),
                    &["198.19.65.12"],
                ),
            ],
            slices: vec![web_slice(both())],
            node: with_cidr(),
            probes: vec![
                to(From::Outside(OUTSIDE), lb_ip, 80, Outcome::Drop),
                to(From::Pod(POD), lb_ip, 80, Outcome::Drop),
                to(From::Outside(OUTSIDE), "198.19.65.12", 80, Outcome::Reject),
                to(From::Outside("198.19.254.1"), "198.19.65.12", 80, Outcome::Drop),
            ],
        },
        Case {
            name: "loadBalancerSourceRanges of the whole family (0.0.0.0/0) admit every source, beside a narrow range",
            services: vec![lb_service(
                "web",
                json!({"type": "LoadBalancer", "clusterIP": cluster_ip,
                       "loadBalancerSourceRanges": ["198.19.255.0/24", "0.0.0.0/0"],
                       "ports": [{"name": "http", "port": 80, "nodePort": 30090}]}),
                &[lb_ip],
            )],
            slices: vec![web_slice(both())],
            node: with_cidr(),
            probes: vec![
                to(From::Outside("198.19.254.1"), lb_ip, 80, reach(&all_eps, Seen::Node)),
                to(From::Pod(POD), lb_ip, 80, reach(&all_eps, Seen::Node)),
                to(From::Node, lb_ip, 80, reach(&all_eps, Seen::Node)),
            ],
        },
        Case {
            name: "multiport: each port and protocol its own endpoints",
            services: vec![web(json!({"clusterIP": cluster_ip, "ports": [
                {"name": "http", "port": 80},
                {"name": "dns", "port": 53, "protocol": "UDP"}]}))],
            slices: vec![slice("web", "IPv4", &both(), json!([
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"}]))],
            node: with_cidr(),
            probes: vec![
                to(From::Pod(POD), cluster_ip, 80, reach(&all_eps, Seen::Client)),
                udp(From::Pod(POD), cluster_ip, 53, reach(&["198.18.128.2:5353", "198.18.129.2:5353"], Seen::Client)),
                to(From::Pod(POD), cluster_ip, 53, Outcome::NotAService),
            ],
        },
        Case {
            name: "no endpoints: rejected from everywhere, on every frontend",
            services: vec![web(node_port_spec("Cluster"))],
            slices: vec![],
            node: with_cidr(),
            probes: vec![
                to(From::Pod(POD), cluster_ip, 80, Outcome::Reject),
                to(From::Node, cluster_ip, 80, Outcome::Reject),
                to(From::Outside(OUTSIDE), cluster_ip, 80, Outcome::Reject),
                to(From::Outside(OUTSIDE), NODE_IP4, 30080, Outcome::Reject),
                to(From::Pod(POD), NODE_IP4, 30080, Outcome::Reject),
                to(From::Node, NODE_IP4, 30080, Outcome::Reject),
                to(From::Outside(OUTSIDE), external_ip, 80, Outcome::Reject),
                to(From::Node, external_ip, 80, Outcome::Reject),
            ],
        },
        Case {
            name: "no usable endpoints (none ready or serving): rejected, never a hang",
            services: vec![web(node_port_spec("Cluster"))],
            slices: vec![web_slice(vec![
                (LOCAL_EP, "n1", (false, false, false)),
                (REMOTE_EP, "n2", (false, false, true)),
            ])],
            node: with_cidr(),
            probes: vec![
                to(From::Pod(POD), cluster_ip, 80, Outcome::Reject),
                to(From::Node, cluster_ip, 80, Outcome::Reject),
                to(From::Outside(OUTSIDE), NODE_IP4, 30080, Outcome::Reject),
            ],
        },
        Case {
            name: "externalTrafficPolicy Local with local endpoints: outside clients keep their address and reach this node's; pods and the node reach all",
            services: vec![web(node_port_spec("Local"))],
            slices: vec![web_slice(both())],
            node: with_cidr(),
            probes: vec![
                to(From::Outside(OUTSIDE), NODE_IP4, 30080, reach(&local_ep, Seen::Client)),
                to(From::Outside(OUTSIDE), external_ip, 80, reach(&local_ep, Seen::Client)),
                to(From::Pod(POD), external_ip, 80, reach(&all_eps, Seen::Client)),
                to(From::Pod(POD), NODE_IP4, 30080, reach(&all_eps, Seen::Client)),
                to(From::RemotePod(REMOTE_POD), NODE_IP4, 30080, reach(&all_eps, Seen::Client)),
                to(From::Node, NODE_IP4, 30080, reach(&all_eps, Seen::Node)),
                to(From::Node, external_ip, 80, reach(&all_eps, Seen::Node)),
                to(From::Pod(POD), cluster_ip, 80, reach(&all_eps, Seen::Client)),
            ],
        },
        Case {
            name: "externalTrafficPolicy Local without local endpoints: outside clients dropped, pods and the node still served",
            services: vec![web(node_port_spec("Local"))],
            slices: vec![web_slice(vec![(REMOTE_EP, "n2", READY)])],
            node: with_cidr(),
            probes: vec![
                to(From::Outside(OUTSIDE), NODE_IP4, 30080, Outcome::Drop),
                to(From::Outside(OUTSIDE), external_ip, 80, Outcome::Drop),
                to(From::Pod(POD), external_ip, 80, reach(&remote_ep, Seen::Client)),
                to(From::Node, NODE_IP4, 30080, reach(&remote_ep, Seen::Node)),
                to(From::Outside(OUTSIDE), cluster_ip, 80, reach(&remote_ep, Seen::Node)),
            ],
        },
        Case {
            name: "internalTrafficPolicy Local with local endpoints: cluster IP clients reach this node's",
            services: vec![web(json!({"clusterIP": cluster_ip, "internalTrafficPolicy": "Local",
                                      "ports": [{"name": "http", "port": 80}]}))],
            slices: vec![web_slice(both())],
            node: with_cidr(),
            probes: vec![
                to(From::Pod(POD), cluster_ip, 80, reach(&local_ep, Seen::Client)),
                to(From::Node, cluster_ip, 80, reach(&local_ep, Seen::Node)),
            ],
        },
        Case {
            name: "internalTrafficPolicy Local without local endpoints: dropped",
            services: vec![web(json!({"clusterIP": cluster_ip, "internalTrafficPolicy": "Local",
                                      "ports": [{"name": "http", "port": 80}]}))],
            slices: vec![web_slice(vec![(REMOTE_EP, "n2", READY)])],
            node: with_cidr(),
            probes: vec![
                to(From::Pod(POD), cluster_ip, 80, Outcome::Drop),
                to(From::Node, cluster_ip, 80, Outcome::Drop),
            ],
        },
        Case {
            name: "terminating fallback: no ready endpoint, so the serving terminating ones",
            services: vec![web(json!({"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80}]}))],
            slices: vec![web_slice(vec![
                (LOCAL_EP, "n1", (false, true, true)),
                (REMOTE_EP, "n2", (false, false, true)),
            ])],
            node: with_cidr(),
            probes: vec![to(From::Pod(POD), cluster_ip, 80, reach(&local_ep, Seen::Client))],
        },
        Case {
            name: "terminating fallback not taken while an endpoint is ready",
            services: vec![web(json!({"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80}]}))],
            slices: vec![web_slice(vec![
                (LOCAL_EP, "n1", (false, true, true)),
                (REMOTE_EP, "n2", READY),
            ])],
            node: with_cidr(),
            probes: vec![to(From::Pod(POD), cluster_ip, 80, reach(&remote_ep, Seen::Client))],
        },
        Case {
            name: "hairpin: a pod reaching itself through its Service",
            services: vec![web(node_port_spec("Cluster"))],
            slices: vec![web_slice(vec![(LOCAL_EP, "n1", READY)])],
            node: with_cidr(),
            probes: vec![
                to(From::Pod(LOCAL_EP), cluster_ip, 80, reach(&local_ep, Seen::Hairpin)),
                to(From::Pod(LOCAL_EP), NODE_IP4, 30080, reach(&local_ep, Seen::Node)),
            ],
        },
        Case {
            name: "session affinity (ClientIP) on every frontend",
            services: vec![web(json!({"type": "NodePort", "clusterIP": cluster_ip,
                                      "sessionAffinity": "ClientIP",
                                      "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
                                      "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}))],
            slices: vec![web_slice(both())],
            node: with_cidr(),
            probes: vec![
                to(From::Pod(POD), cluster_ip, 80, Outcome::Reach {
                    endpoints: all_eps.iter().map(|e| e.to_string()).collect(),
                    seen: Seen::Client,
                    affinity: Some(600),
                }),
                to(From::Outside(OUTSIDE), NODE_IP4, 30080, Outcome::Reach {
                    endpoints: all_eps.iter().map(|e| e.to_string()).collect(),
                    seen: Seen::Node,
                    affinity: Some(600),
                }),
            ],
        },
        Case {
            name: "dual-stack: each family its own cluster IP, NodePort and endpoints",
            services: vec![service("dual", json!({"type": "NodePort",
                "clusterIP": "198.19.0.20", "clusterIPs": ["198.19.0.20", "2001:2:0:4000::20"],
                "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                "ports": [{"name": "http", "port": 80, "nodePort": 30100}]}))],
            slices: vec![
                slice("dual", "IPv4", &[(LOCAL_EP, "n1", READY)], http()),
                slice("dual", "IPv6", &[("2001:2:0:8000::2", "n1", READY)], http()),
            ],
            node: with_cidr(),
            probes: vec![
                to(From::Pod(POD), "198.19.0.20", 80, reach(&local_ep, Seen::Client)),
                to(From::Pod("2001:2:0:8000::3"), "2001:2:0:4000::20", 80, reach(&["[2001:2:0:8000::2]:8080"], Seen::Client)),
                to(From::Outside(OUTSIDE6), NODE_IP6, 30100, reach(&["[2001:2:0:8000::2]:8080"], Seen::Node)),
                to(From::Outside(OUTSIDE), NODE_IP4, 30100, reach(&local_ep, Seen::Node)),
                to(From::Node, "2001:2:0:4000::20", 80, reach(&["[2001:2:0:8000::2]:8080"], Seen::Node)),
            ],
        },
        Case {
            name: "dual-stack terminating fallback per family: IPv4 ready, IPv6 only terminating",
            services: vec![service("dual", json!({
                "clusterIP": "198.19.0.20", "clusterIPs": ["198.19.0.20", "2001:2:0:4000::20"],
                "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                "ports": [{"name": "http", "port": 80}]}))],
            slices: vec![
                slice("dual", "IPv4", &[(LOCAL_EP, "n1", READY)], http()),
                slice("dual", "IPv6", &[("2001:2:0:8000::2", "n1", (false, true, true))], http()),
            ],
            node: with_cidr(),
            probes: vec![
                to(From::Pod(POD), "198.19.0.20", 80, reach(&local_ep, Seen::Client)),
                to(From::Pod("2001:2:0:8000::3"), "2001:2:0:4000::20", 80, reach(&["[2001:2:0:8000::2]:8080"], Seen::Client)),
            ],
        },
        Case {
            name: "nodeport-addresses: NodePorts answer only there (a family without one answers everywhere)",
            services: vec![service("dual", json!({"type": "NodePort",
                "clusterIP": "198.19.0.20", "clusterIPs": ["198.19.0.20", "2001:2:0:4000::20"],
                "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                "ports": [{"name": "http", "port": 80, "nodePort": 30100}]}))],
            slices: vec![
                slice("dual", "IPv4", &[(LOCAL_EP, "n1", READY)], http()),
                slice("dual", "IPv6", &[("2001:2:0:8000::2", "n1", READY)], http()),
            ],
            node: Node {
                nodeport_addresses: vec!["198.18.0.0/24"],
                ..with_cidr()
            },
            probes: vec![
                to(From::Outside(OUTSIDE), NODE_IP4, 30100, reach(&local_ep, Seen::Node)),
                to(From::Outside(OUTSIDE), NODE_IP4_B, 30100, Outcome::NotAService),
                to(From::Outside(OUTSIDE6), NODE_IP6, 30100, reach(&["[2001:2:0:8000::2]:8080"], Seen::Node)),
            ],
        },
        Case {
            name: "masquerade-all: every cluster IP client masqueraded, pods too",
            services: vec![web(json!({"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80}]}))],
            slices: vec![web_slice(both())],
            node: Node {
                masquerade_all: true,
                ..with_cidr()
            },
            probes: vec![
                to(From::Pod(POD), cluster_ip, 80, reach(&all_eps, Seen::Node)),
                to(From::Outside(OUTSIDE), cluster_ip, 80, reach(&all_eps, Seen::Node)),
            ],
        },
        Case {
            name: "topology hints (trafficDistribution PreferClose): this zone's endpoints, on every frontend",
            services: vec![web(json!({"type": "NodePort", "clusterIP": cluster_ip,
                                      "trafficDistribution": "PreferClose",
                                      "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}))],
            slices: vec![hinted_slice("web", &[(LOCAL_EP, "n1", "zone-a"), (REMOTE_EP, "n2", "zone-b")])],
            node: Node {
                zone: Some("zone-a"),
                ..with_cidr()
            },
            probes: vec![
                to(From::Pod(POD), cluster_ip, 80, reach(&local_ep, Seen::Client)),
                to(From::Node, cluster_ip, 80, reach(&local_ep, Seen::Node)),
                to(From::Outside(OUTSIDE), NODE_IP4, 30080, reach(&local_ep, Seen::Node)),
            ],
        },
        Case {
            name: "topology hints for another zone only: every endpoint (kube-proxy's fallback)",
            services: vec![web(json!({"clusterIP": cluster_ip, "trafficDistribution": "PreferClose",
                                      "ports": [{"name": "http", "port": 80}]}))],
            slices: vec![hinted_slice("web", &[(LOCAL_EP, "n1", "zone-b"), (REMOTE_EP, "n2", "zone-b")])],
            node: Node {
                zone: Some("zone-a"),
                ..with_cidr()
            },
            probes: vec![to(From::Pod(POD), cluster_ip, 80, reach(&all_eps, Seen::Client))],
        },
        Case {
            name: "cluster-cidr absent: nothing told apart, so no cluster IP masquerade and pods are outside clients of external frontends",
            services: vec![
                web(node_port_spec("Local")),
                service("plain", json!({"clusterIP": "198.19.0.30", "ports": [{"name": "http", "port": 80}]})),
            ],
            slices: vec![web_slice(both()), slice("plain", "IPv4", &both(), http())],
            node: Node::default(),
            probes: vec![
                to(From::Pod(POD), "198.19.0.30", 80, reach(&all_eps, Seen::Client)),
                to(From::Outside(OUTSIDE), "198.19.0.30", 80, reach(&all_eps, Seen::Client)),
                to(From::Pod(POD), external_ip, 80, reach(&local_ep, Seen::Client)),
                to(From::Outside(OUTSIDE), NODE_IP4, 30080, reach(&local_ep, Seen::Client)),
                to(From::Node, NODE_IP4, 30080, reach(&all_eps, Seen::Node)),
            ],
        },
    ]
}
