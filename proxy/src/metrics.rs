//! Prometheus metrics with kube-proxy's names, and the health state behind `/healthz`.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// An address refused on purpose: the object's kind and why (`model::Refusal::label`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    pub kind: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

/// kube-proxy's `ip_family` label: `IPv4` or `IPv6` (`v1.IPFamily`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabel {
    pub ip_family: String,
}

/// The metrics only one mode has, under kube-proxy's per-mode names.
pub enum ModeMetrics {
    Iptables {
        /// `kubeproxy_sync_proxy_rules_iptables_restore_failures_total`.
        restore_failures: Counter,
        /// `kubeproxy_sync_proxy_rules_iptables_total{table}`: rules programmed per table.
        rules_total: Family<TableLabel, Gauge>,
        /// `kubeproxy_sync_proxy_rules_iptables_last`: rules the last sync wrote.
        rules_last: Gauge,
    },
    Ebpf {
        /// `kpx_proxy_bpf_frontends`: map entries programmed.
        frontends: Gauge,
        /// `kpx_proxy_bpf_map_writes_last`: map writes of the last sync.
        writes_last: Gauge,
        /// `kpx_proxy_bpf_map_full_total{map}`.
        map_full: Family<MapLabel, Counter>,
    },
    Nftables {
        /// `kubeproxy_sync_proxy_rules_nftables_sync_failures_total`.
        sync_failures: Counter,
        /// `kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total`: stale chains and sets
        /// the housekeeping tick could not delete.
        cleanup_failures: Counter,
        /// `kpx_proxy_nftables_rules{table}`: rules in kpx's table of each family.
        rules_total: Family<TableLabel, Gauge>,
        /// `kpx_proxy_nftables_written_last`: rules and elements the last sync wrote.
        written_last: Gauge,
    },
    /// kube-proxy's IPVS proxier counts only its iptables-restore failures
    /// (`metrics.IPTablesRestoreFailuresTotal` in `pkg/proxy/ipvs/proxier.go`); IPVS and ipset
    /// failures count in the common `kpx_proxy_sync_failures_total` only, as there.
    Ipvs {
        /// `kubeproxy_sync_proxy_rules_iptables_restore_failures_total`: the iptables part's.
        restore_failures: Counter,
        /// `kpx_proxy_ipvs_virtual_servers{ip_family}`: virtual servers programmed per family
        /// (the backend's `SyncReport::per_table`, keyed `IPv4` / `IPv6`).
        virtual_servers: Family<FamilyLabel, Gauge>,
        /// `kpx_proxy_ipvs_netlink_messages_total`: IPVS netlink messages sent
        /// (`SyncReport::messages`).
        netlink_messages: Counter,
    },
    /// A mode without metrics of its own.
    None,
}

pub struct Metrics {
    pub sync_duration: Histogram,
    pub full_sync_duration: Histogram,
    pub partial_sync_duration: Histogram,
    pub network_programming: Histogram,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    /// Every mode's failed syncs (`kpx_proxy_sync_failures_total`).
    pub sync_failures: Counter,
    /// Stale-flow cleanups that failed (`kpx_proxy_conntrack_cleanup_failures_total`).
    pub conntrack_failures: Counter,
    pub mode: ModeMetrics,
    pub service_changes: Counter,
    pub services: Gauge,
    pub endpoints: Gauge,
    pub skipped: Family<KindLabel, Counter>,
    pub refused_addresses: Family<RefusedLabel, Counter>,
    pub registry: Registry,
}

impl Metrics {
    /// The metrics of a proxy running `mode` (a backend's `name()`): the common ones, and
    /// that mode's own, registered only for it.
    pub fn new(mode: &str) -> Self {
        let seconds = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let m = Self {
            sync_duration: seconds(),
            full_sync_duration: seconds(),
            partial_sync_duration: seconds(),
            network_programming: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            last_sync_timestamp: Gauge::default(),
            sync_failures: Counter::default(),
            conntrack_failures: Counter::default(),
            mode: match mode {
                "iptables" => ModeMetrics::Iptables {
                    restore_failures: Counter::default(),
                    rules_total: Family::default(),
                    rules_last: Gauge::default(),
                },
                "ebpf" => ModeMetrics::Ebpf {
                    frontends: Gauge::default(),
                    writes_last: Gauge::default(),
                    map_full: Family::default(),
                },
                "nftables" => ModeMetrics::Nftables {
                    sync_failures: Counter::default(),
                    cleanup_failures: Counter::default(),
                    rules_total: Family::default(),
                    written_last: Gauge::default(),
                },
                "ipvs" => ModeMetrics::Ipvs {
                    restore_failures: Counter::default(),
                    virtual_servers: Family::default(),
                    netlink_messages: Counter::default(),
                },
                _ => ModeMetrics::None,
            },
            service_changes: Counter::default(),
            services: Gauge::default(),
            endpoints: Gauge::default(),
            skipped: Family::default(),
            refused_addresses: Family::default(),
            registry: Registry::default(),
        };
        let mut registry = Registry::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.full_sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.partial_sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_sync_timestamp.clone(),
        );
        registry.register(
            "kpx_proxy_sync_failures",
            "Syncs that failed (and were retried with backoff), every mode",
            m.sync_failures.clone(),
        );
        match &m.mode {
            ModeMetrics::Iptables {
                restore_failures,
                rules_total,
                rules_last,
            } => {
                registry.register(
                    "kubeproxy_sync_proxy_rules_iptables_restore_failures",
                    "Cumulative proxy iptables restore failures",
                    restore_failures.clone(),
                );
                registry.register(
                    "kubeproxy_sync_proxy_rules_iptables_total",
                    "Total number of iptables rules owned by kpx-proxy, per table",
                    rules_total.clone(),
                );
                registry.register(
                    "kubeproxy_sync_proxy_rules_iptables_last",
                    "Number of iptables rules written by the last sync",
                    rules_last.clone(),
                );
            }
            ModeMetrics::Ebpf {
                frontends,
                writes_last,
                map_full,
            } => {
                registry.register(
                    "kpx_proxy_bpf_frontends",
                    "Service frontends (kpx_services entries) programmed",
                    frontends.clone(),
                );
                registry.register(
                    "kpx_proxy_bpf_map_writes_last",
                    "BPF map writes of the last sync",
                    writes_last.clone(),
                );
                registry.register(
                    "kpx_proxy_bpf_map_full",
                    "Syncs that stopped because a BPF map was full, per map",
                    map_full.clone(),
                );
            }
            ModeMetrics::Nftables {
                sync_failures,
                cleanup_failures,
                rules_total,
                written_last,
            } => {
                registry.register(
                    "kubeproxy_sync_proxy_rules_nftables_sync_failures",
                    "Cumulative proxy nftables sync failures",
                    sync_failures.clone(),
                );
                registry.register(
                    "kubeproxy_sync_proxy_rules_nftables_cleanup_failures",
                    "Cumulative proxy nftables cleanup failures",
                    cleanup_failures.clone(),
                );
                registry.register(
                    "kpx_proxy_nftables_rules",
                    "Rules in kpx's nftables table, per table",
                    rules_total.clone(),
                );
                registry.register(
                    "kpx_proxy_nftables_written_last",
                    "Rules and map elements written by the last sync",
                    written_last.clone(),
                );
            }
            ModeMetrics::Ipvs {
                restore_failures,
                virtual_servers,
                netlink_messages,
            } => {
                registry.register(
                    "kubeproxy_sync_proxy_rules_iptables_restore_failures",
                    "Cumulative proxy iptables restore failures",
                    restore_failures.clone(),
                );
                registry.register(
                    "kpx_proxy_ipvs_virtual_servers",
                    "IPVS virtual servers programmed by kpx-proxy, per IP family",
                    virtual_servers.clone(),
                );
                registry.register(
                    "kpx_proxy_ipvs_netlink_messages",
                    "Netlink messages the IPVS mode sent: IPVS generic netlink and ipset members (each one acknowledged by the kernel)",
                    netlink_messages.clone(),
                );
            }
            ModeMetrics::None => {}
        }
        registry.register(
            "kpx_proxy_conntrack_cleanup_failures",
            "Stale conntrack cleanups that failed (tried again with the next sync)",
            m.conntrack_failures.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes.clone(),
        );
        registry.register(
            "kpx_proxy_service_ports",
            "Service ports programmed",
            m.services.clone(),
        );
        registry.register(
            "kpx_proxy_endpoints",
            "Endpoints known",
            m.endpoints.clone(),
        );
        registry.register(
            "kpx_proxy_skipped_objects",
            "Objects (or fields of them) skipped because they could not be used",
            m.skipped.clone(),
        );
        registry.register(
            "kpx_proxy_refused_addresses",
            "Endpoints, external and load-balancer IPs never programmed (loopback, link-local, unspecified, multicast, broadcast, the node's or the API server's address), per kind and reason",
            m.refused_addresses.clone(),
        );
        Self { registry, ..m }
    }

    /// Records a successful sync's counts in the mode's own metrics.
    pub fn synced(&self, report: &crate::backend::SyncReport) {
        match &self.mode {
            ModeMetrics::Iptables {
                rules_total,
                rules_last,
                ..
            } => {
                for (table, count) in &report.per_table {
                    rules_total
                        .get_or_create(&TableLabel {
                            table: table.to_string(),
                        })
                        .set(count.n as i64);
                }
                rules_last.set(report.written.n as i64);
            }
            ModeMetrics::Ebpf {
                frontends,
                writes_last,
                ..
            } => {
                frontends.set(report.total.n as i64);
                writes_last.set(report.written.n as i64);
            }
            ModeMetrics::Nftables {
                rules_total,
                written_last,
                ..
            } => {
                for (table, count) in &report.per_table {
                    rules_total
                        .get_or_create(&TableLabel {
                            table: table.to_string(),
                        })
                        .set(count.n as i64);
                }
                written_last.set(report.written.n as i64);
            }
            ModeMetrics::Ipvs {
                virtual_servers,
                netlink_messages,
                ..
            } => {
                for (family, count) in &report.per_table {
                    virtual_servers
                        .get_or_create(&FamilyLabel {
                            ip_family: family.to_string(),
                        })
                        .set(count.n as i64);
                }
                netlink_messages.inc_by(report.messages as u64);
            }
            ModeMetrics::None => {}
        }
    }

    /// Counts a failed housekeeping tick (stale chains left for the next one).
    pub fn housekeeping_failed(&self) {
        if let ModeMetrics::Nftables {
            cleanup_failures, ..
        } = &self.mode
        {
            cleanup_failures.inc();
        }
    }

    /// Counts a failed sync, in the mode's own metrics too.
    pub fn failed(&self, error: &crate::backend::BackendError) {
        use crate::backend::BackendError;
        self.sync_failures.inc();
        match (&self.mode, error) {
            (
                ModeMetrics::Iptables {
                    restore_failures, ..
                },
                BackendError::Command { .. } | BackendError::Spawn { .. },
            ) => {
                restore_failures.inc();
            }
            (ModeMetrics::Nftables { sync_failures, .. }, _) => {
                sync_failures.inc();
            }
            // The iptables part's restore only: ipset and netlink failures are not
            // iptables-restore failures (kube-proxy counts those nowhere but in its logs).
            (
                ModeMetrics::Ipvs {
                    restore_failures, ..
                },
                BackendError::Command { command, .. } | BackendError::Spawn { command, .. },
            ) if is_iptables_restore(command) => {
                restore_failures.inc();
            }
            (ModeMetrics::Ebpf { map_full, .. }, BackendError::Capacity { what, .. }) => {
                let map = what.trim_start_matches("BPF map ").to_string();
                map_full.get_or_create(&MapLabel { map }).inc();
            }
            _ => {}
        }
    }
}

/// Whether `command` is an iptables-restore of either family and flavour
/// (`iptables-nft-restore`, `ip6tables-legacy-restore`, …).
fn is_iptables_restore(command: &str) -> bool {
    let name = command.split_whitespace().next().unwrap_or("");
    let name = name.rsplit('/').next().unwrap_or(name);
    (name.starts_with("iptables") || name.starts_with("ip6tables")) && name.ends_with("-restore")
}

/// kube-proxy's health: healthy while syncs succeed at least every two sync periods.
pub struct Health {
    pub sync_period: Duration,
    last_success: Mutex<Option<SystemTime>>,
    started: SystemTime,
    pub last_error: Mutex<Option<String>>,
}

impl Health {
    pub fn new(sync_period: Duration) -> Self {
        Self {
            sync_period,
            last_success: Mutex::new(None),
            started: SystemTime::now(),
            last_error: Mutex::new(None),
        }
    }

    pub fn synced(&self) {
        *self.last_success.lock().unwrap_or_else(|e| e.into_inner()) = Some(SystemTime::now());
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn failed(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// (healthy, last successful sync, last error)
    pub fn status(&self) -> (bool, Option<SystemTime>, Option<String>) {
        let last = *self.last_success.lock().unwrap_or_else(|e| e.into_inner());
        let error = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let reference = last.unwrap_or(self.started);
        let age = SystemTime::now()
            .duration_since(reference)
            .unwrap_or_default();
        (age <= self.sync_period * 2, last, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendError, Count, SyncReport, Unit};

    fn text(m: &Metrics) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).expect("encode");
        out
    }

    fn command_failed(command: &str) -> BackendError {
        BackendError::Command {
            command: command.into(),
            status: "exit status: 1".into(),
            stderr: "injected".into(),
        }
    }

    #[test]
    fn ipvs_mode_has_kube_proxys_restore_counter_and_kpxs_virtual_servers_and_messages() {
        let m = Metrics::new("ipvs");
        m.synced(&SyncReport {
            full: true,
            total: Count::new(5, Unit::VirtualServers),
            per_table: vec![
                ("IPv4", Count::new(3, Unit::VirtualServers)),
                ("IPv6", Count::new(2, Unit::VirtualServers)),
            ],
            messages: 12,
            ..Default::default()
        });
        m.synced(&SyncReport {
            per_table: vec![("IPv4", Count::new(4, Unit::VirtualServers))],
            messages: 2,
            ..Default::default()
        });
        // Only the iptables part's restore is an iptables-restore failure.
        m.failed(&command_failed("ip6tables-legacy-restore"));
        m.failed(&command_failed("ipset restore"));
        m.failed(&BackendError::kernel("IPVS new service", "EINVAL"));
        let t = text(&m);
        for line in [
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 1",
            "kpx_proxy_ipvs_virtual_servers{ip_family=\"IPv4\"} 4",
            "kpx_proxy_ipvs_virtual_servers{ip_family=\"IPv6\"} 2",
            "kpx_proxy_ipvs_netlink_messages_total 14",
            "kpx_proxy_sync_failures_total 3",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} missing from\n{t}");
        }
        assert!(!t.contains("nftables"), "{t}");
        // Other modes do not register the ipvs metrics.
        let t = text(&Metrics::new("iptables"));
        assert!(!t.contains("kpx_proxy_ipvs_"), "{t}");
    }

    #[test]
    fn iptables_restore_commands_are_told_from_the_others() {
        for yes in [
            "iptables-nft-restore",
            "ip6tables-legacy-restore",
            "/usr/sbin/iptables-restore --noflush",
        ] {
            assert!(is_iptables_restore(yes), "{yes}");
        }
        for no in ["ipset restore", "iptables-nft-save", "nft", "conntrack"] {
            assert!(!is_iptables_restore(no), "{no}");
        }
    }
}
