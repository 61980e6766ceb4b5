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
pub struct MapLabel {
    pub map: String,
}

pub struct Metrics {
    pub sync_duration: Histogram,
    pub full_sync_duration: Histogram,
    pub partial_sync_duration: Histogram,
    pub network_programming: Histogram,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub sync_failures: Counter,
    pub rules_total: Gauge,
    pub rules_written: Gauge,
    pub service_changes: Counter,
    pub services: Gauge,
    pub endpoints: Gauge,
    pub skipped: Family<KindLabel, Counter>,
    pub refused_addresses: Family<RefusedLabel, Counter>,
    pub map_full: Family<MapLabel, Counter>,
    pub registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let seconds = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let m = Self {
            sync_duration: seconds(),
            full_sync_duration: seconds(),
            partial_sync_duration: seconds(),
            network_programming: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            last_sync_timestamp: Gauge::default(),
            sync_failures: Counter::default(),
            rules_total: Gauge::default(),
            rules_written: Gauge::default(),
            service_changes: Counter::default(),
            services: Gauge::default(),
            endpoints: Gauge::default(),
            skipped: Family::default(),
            refused_addresses: Family::default(),
            map_full: Family::default(),
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
            "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy rules restore failures",
            m.sync_failures.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables",
            "Number of proxy rules programmed",
            m.rules_total.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables_last",
            "Number of proxy rules written in the last sync",
            m.rules_written.clone(),
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
        registry.register(
            "kpx_proxy_bpf_map_full",
            "Syncs that stopped because a BPF map was full, per map (eBPF backend)",
            m.map_full.clone(),
        );
        Self { registry, ..m }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
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
