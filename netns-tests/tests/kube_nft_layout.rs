//! The benchmarks' kube-proxy nftables layout (`kpx_lab::bench::kube_nft`) is a transaction
//! the kernel takes: loaded with `nft -f` into a throwaway namespace, read back, and loaded a
//! second time over itself (kube-proxy's next full sync finds its table there).

use std::io::Write;
use std::process::{Command, Stdio};

use kpx_lab::bench::kube_nft::{full_sync, Layout, ServicePort};
use kpx_lab::lab::LAB_PREFIX;

fn nft(ns: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .expect("write");
    drop(input);
    let out = child.wait_with_output().expect("nft output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A namespace removed on drop (also by `kpx-lab down --all`: it carries the lab prefix).
struct Scratch(String);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn services(v6: bool, n: usize, endpoints: usize) -> Vec<ServicePort> {
    (0..n)
        .map(|i| ServicePort {
            namespace: "bench".into(),
            name: format!("svc-{i:05}"),
            port_name: "http".into(),
            protocol: if i % 3 == 2 { "udp" } else { "tcp" },
            cluster_ip: if v6 {
                format!("2001:2:0:ff::{:x}", i + 1).parse().expect("vip")
            } else {
                format!("198.18.128.{}", i + 1).parse().expect("vip")
            },
            port: 80,
            // The last Service has none: a no-endpoint-services element instead of chains.
            endpoints: (0..if i + 1 == n { 0 } else { endpoints })
                .map(|e| {
                    if v6 {
                        format!("[2001:2:0:101::{:x}]:8080", i * endpoints + e + 10)
                    } else {
                        format!("198.19.1.{}:8080", i * endpoints + e + 10)
                    }
                    .parse()
                    .expect("endpoint")
                })
                .collect(),
        })
        .collect()
}

#[test]
fn kube_proxy_layout_loads_and_reads_back() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var("KPX_REQUIRE_NETNS").map_or(true, |v| v != "1"),
            "kube_nft_layout needs root (KPX_REQUIRE_NETNS=1)"
        );
        eprintln!("SKIPPED kube_nft_layout: network namespaces need root");
        return;
    }
    let ns = Scratch(format!("{LAB_PREFIX}kube-nft-{}", std::process::id()));
    assert!(Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .expect("ip")
        .success());
    for v6 in [false, true] {
        let family = if v6 { "ip6" } else { "ip" };
        let svcs = services(v6, 6, 3);
        let layout = Layout {
            ipv6: v6,
            cluster_cidr: Some(
                if v6 {
                    "2001:2:0:100::/56"
                } else {
                    "198.19.0.0/16"
                }
                .into(),
            ),
            service_cidr: Some(
                if v6 {
                    "2001:2:0:ff::/112"
                } else {
                    "198.18.128.0/17"
                }
                .into(),
            ),
        };
        let text = full_sync(&layout, &svcs);
        let (ok, _, err) = nft(&ns.0, &["-f", "-"], Some(&text));
        assert!(ok, "{family}: nft -f failed: {err}\n{text}");
        // Twice: the first-sync base chain recreation and every `add` are idempotent.
        let (ok, _, err) = nft(&ns.0, &["-f", "-"], Some(&text));
        assert!(ok, "{family}: second nft -f failed: {err}");

        let (ok, listed, err) = nft(&ns.0, &["list", "table", family, "kube-proxy"], None);
        assert!(ok, "{family}: list failed: {err}");
        // Per Service with endpoints: its chain with one numgen vmap, and an endpoint chain
        // per endpoint with its DNAT; the last Service only a reject element.
        for svc in &svcs[..5] {
            let chain = svc.service_chain();
            assert!(
                listed.contains(&format!("chain {chain} {{")),
                "{chain}\n{listed}"
            );
            for ep in &svc.endpoints {
                let ep_chain = svc.endpoint_chain(*ep);
                assert!(
                    listed.contains(&format!("chain {ep_chain} {{")),
                    "{ep_chain}"
                );
                assert!(
                    listed.contains(&format!("dnat {family} to {ep}"))
                        || listed.contains(&format!("dnat to {ep}")),
                    "no DNAT to {ep}\n{listed}"
                );
            }
        }
        assert_eq!(
            listed.matches("numgen random mod 3 vmap").count(),
            5,
            "{listed}"
        );
        assert_eq!(listed.matches(" : goto reject-chain").count(), 1);
        assert!(!listed.contains(&svcs[5].service_chain()), "{listed}");
        assert!(listed.contains("type nat hook prerouting priority dstnat"));
        assert!(!listed.contains("nodeport-ips"), "{listed}");
    }
    // Only the two tables this test made.
    let (_, tables, _) = nft(&ns.0, &["list", "tables"], None);
    assert_eq!(
        tables.lines().collect::<Vec<_>>(),
        vec!["table ip kube-proxy", "table ip6 kube-proxy"]
    );
}
