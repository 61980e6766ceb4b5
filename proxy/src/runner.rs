//! The sync loop (kube-proxy's BoundedFrequencyRunner): apply watch updates to the tracker,
//! and sync at most once per `--min-sync-period`, at least once per `--sync-period`, with
//! backoff after a failure. Nothing is programmed before both initial lists are in.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use crate::backend::{Backend, NodeState, SyncInput};
use crate::metrics::{Health, KindLabel, Metrics, RefusedLabel};
use crate::model::{ChangeTracker, Protected, ProxyState};
use crate::watch::Update;

/// The addresses no Service may take as an external or load-balancer IP on this node: every
/// address of the node's interfaces, `extra` (`--node-ip`), and the API server's address
/// from the client configuration (`server`, resolved if it is a name). A Service there
/// captured `kubectl logs` and every connection to the API server (issue 15, item 8).
pub async fn protected_addresses(server: &str, extra: &[std::net::IpAddr]) -> Protected {
    let mut node: Vec<std::net::IpAddr> = extra.to_vec();
    for ip in NodeState::read().ips() {
        if !node.contains(&ip) {
            node.push(ip);
        }
    }
    let mut api_server = Vec::new();
    if let Some((host, port)) = server_host(server) {
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => api_server.push(ip),
            Err(_) => match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(found) => api_server.extend(found.map(|a| a.ip())),
                Err(e) => {
                    tracing::warn!(server, error = %e, "cannot resolve the API server's name; its address is not protected from external IPs")
                }
            },
        }
    }
    api_server.sort();
    api_server.dedup();
    Protected { node, api_server }
}

/// `https://host:port/path` → (host, port); IPv6 hosts are bracketed in URLs.
fn server_host(server: &str) -> Option<(String, u16)> {
    let (scheme, rest) = server.split_once("://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    let default_port = if scheme == "https" { 443 } else { 80 };
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return Some((host.to_string(), port.unwrap_or(default_port)));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.to_string(), port.parse().ok()?)),
        None => Some((authority.to_string(), default_port)),
    }
}

/// How often the node's addresses are read.
const NODE_POLL: Duration = Duration::from_secs(1);

/// The annotation an EndpointSlice controller sets to when the change behind it happened.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub node_name: String,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    /// How often a full resync happens even when nothing seems lost.
    pub full_sync_period: Duration,
    /// This node's and the API server's addresses: never external or load-balancer IPs.
    pub protected: Protected,
}

pub struct Runner<B: Backend> {
    backend: B,
    config: RunnerConfig,
    tracker: ChangeTracker,
    state: ProxyState,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    services_listed: bool,
    slices_listed: bool,
    need_full: bool,
    last_sync: Option<Instant>,
    last_full: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// When the changes waiting to be programmed happened (from EndpointSlice annotations).
    pending_triggers: Vec<SystemTime>,
    generation: u64,
    /// The node's addresses, as last read; a change syncs (the backends get them with each sync).
    node: NodeState,
    node_changed: bool,
    /// Health-check node ports, updated after each successful sync.
    health_check: Option<crate::healthcheck::HealthCheckServer>,
    /// Stale-flow cleanups that failed, tried again with the next sync's (bounded).
    conntrack_retry: std::collections::BTreeSet<crate::model::ConntrackCleanup>,
}

impl<B: Backend> Runner<B> {
    pub fn new(
        backend: B,
        config: RunnerConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        Self {
            backend,
            tracker: ChangeTracker::with_protected(&config.node_name, config.protected.clone()),
            config,
            state: ProxyState::default(),
            metrics,
            health,
            services_listed: false,
            slices_listed: false,
            need_full: true,
            last_sync: None,
            last_full: None,
            retry_at: None,
            backoff: Duration::from_secs(1),
            pending_triggers: Vec::new(),
            generation: 0,
            node: NodeState::read(),
            node_changed: false,
            health_check: None,
            conntrack_retry: Default::default(),
        }
    }

    /// Serves the health-check node ports of the Services this node programs.
    pub fn with_health_check(mut self, server: crate::healthcheck::HealthCheckServer) -> Self {
        self.health_check = Some(server);
        self
    }

    fn note_trigger(&mut self, slice: &k8s_openapi::api::discovery::v1::EndpointSlice) {
        let time = slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            .and_then(|t| chrono_parse(t));
        if let Some(t) = time {
            self.pending_triggers.push(t);
        }
    }

    fn apply(&mut self, update: Update) {
        match update {
            Update::ServicesListing => self.tracker.begin_services_list(),
            Update::ServiceListed(svc) => self.tracker.list_service(svc),
            Update::ServicesListDone => {
                self.services_listed = true;
                self.tracker.finish_services_list();
            }
            Update::ServiceApplied(svc) => self.tracker.apply_service(svc),
            Update::ServiceDeleted(svc) => self.tracker.delete_service(&svc),
            Update::SlicesListing => self.tracker.begin_slices_list(),
            Update::SliceListed(slice) => self.tracker.list_slice(slice),
            Update::SlicesListDone => {
                self.slices_listed = true;
                self.tracker.finish_slices_list();
            }
            Update::SliceApplied(slice) => {
                self.note_trigger(&slice);
                self.tracker.apply_slice(slice);
            }
            Update::SliceDeleted(slice) => self.tracker.delete_slice(&slice),
            Update::NodeApplied(node) => {
                let before = self.tracker.zone().to_string();
                self.tracker.set_node_labels(node.metadata.labels.as_ref());
                if self.tracker.zone() != before {
                    tracing::info!(
                        zone = self.tracker.zone(),
                        "node zone changed; re-selecting endpoints"
                    );
                }
            }
            Update::NodeDeleted => self.tracker.set_node_labels(None),
        }
    }

    fn ready(&self) -> bool {
        self.services_listed && self.slices_listed
    }

    /// When the next sync may run, if one is wanted.
    fn next_sync(&self) -> Option<Instant> {
        if !self.ready() || !(self.tracker.has_changes() || self.need_full || self.node_changed) {
            return None;
        }
        let earliest = self
            .last_sync
            .map_or_else(Instant::now, |t| t + self.config.min_sync_period);
        Some(self.retry_at.map_or(earliest, |r| r.max(earliest)))
    }

    /// Runs until `updates` closes or `shutdown` resolves.
    pub async fn run(
        mut self,
        mut updates: mpsc::Receiver<Update>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut periodic = tokio::time::interval(self.config.sync_period);
        periodic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // How soon an address added to (or removed from) the node reaches the backends.
        let mut node_poll = tokio::time::interval(NODE_POLL);
        node_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.next_sync();
            tokio::select! {
                _ = &mut shutdown => return,
                update = updates.recv() => match update {
                    Some(update) => {
                        self.apply(update);
                        // Take everything already queued before deciding to sync.
                        while let Ok(update) = updates.try_recv() {
                            self.apply(update);
                        }
                        continue;
                    }
                    None => return,
                },
                _ = periodic.tick() => {
                    if !self.ready() {
                        continue;
                    }
                    let hourly = self.last_full.is_none_or(|t| t.elapsed() >= self.config.full_sync_period);
                    if hourly {
                        self.need_full = true;
                    } else if !self.need_full {
                        if let Some(why) = tokio::task::block_in_place(|| self.backend.lost_state()) {
                            tracing::warn!(backend = self.backend.name(), reason = %why, "programmed rules missing; full resync");
                            self.need_full = true;
                        }
                    }
                    if let Err(e) = tokio::task::block_in_place(|| self.backend.housekeeping()) {
                        self.metrics.housekeeping_failed();
                        tracing::warn!(backend = self.backend.name(), error = %e, "housekeeping failed; retried on the next tick");
                    }
                    if self.retry_at.is_some_and(|r| r > Instant::now()) {
                        continue;
                    }
                }
                _ = node_poll.tick() => {
                    self.read_node();
                    continue;
                }
                _ = sleep_until(deadline), if deadline.is_some() => {}
            }
            self.sync();
        }
    }

    /// Reads the node's addresses; a change asks for a sync.
    fn read_node(&mut self) {
        let now = NodeState::read();
        if now != self.node {
            tracing::info!(addresses = ?now.ips().collect::<Vec<_>>(), "the node's addresses changed");
            self.node = now;
            self.node_changed = true;
        }
    }

    fn sync(&mut self) {
        if !self.ready() {
            return;
        }
        self.read_node();
        self.generation += 1;
        let span = tracing::info_span!(
            "sync",
            backend = self.backend.name(),
            generation = self.generation
        );
        let _enter = span.enter();
        let started = Instant::now();
        // The new state is what we want programmed, whether or not this apply succeeds.
        let changes = self.tracker.advance(&mut self.state);
        for skipped in &changes.skipped {
            tracing::warn!(kind = skipped.kind, object = %skipped.object, field = %skipped.field, reason = %skipped.reason, "skipping unusable input");
            self.metrics
                .skipped
                .get_or_create(&KindLabel {
                    kind: skipped.kind.to_string(),
                })
                .inc();
            if let Some(why) = skipped.refusal {
                self.metrics
                    .refused_addresses
                    .get_or_create(&RefusedLabel {
                        kind: skipped.kind.to_string(),
                        reason: why.label().to_string(),
                    })
                    .inc();
            }
        }
        let full = self.need_full;
        let input = SyncInput {
            state: &self.state,
            changes: &changes,
            full,
            node: &self.node,
        };
        let result = tokio::task::block_in_place(|| self.backend.sync(input));
        let elapsed = started.elapsed();
        self.last_sync = Some(Instant::now());
        match result {
            Ok(report) => {
                self.need_full = false;
                self.node_changed = false;
                self.retry_at = None;
                self.backoff = Duration::from_secs(1);
                if full {
                    release_free_memory();
                    self.last_full = Some(Instant::now());
                    self.metrics
                        .full_sync_duration
                        .observe(elapsed.as_secs_f64());
                } else {
                    self.metrics
                        .partial_sync_duration
                        .observe(elapsed.as_secs_f64());
                }
                self.metrics.sync_duration.observe(elapsed.as_secs_f64());
                self.metrics.synced(&report);
                self.metrics
                    .service_changes
                    .inc_by((changes.changed.len() + changes.removed.len()) as u64);
                self.metrics.services.set(self.state.entries.len() as i64);
                self.metrics
                    .endpoints
                    .set(self.state.endpoint_count() as i64);
                let now = SystemTime::now();
                for t in self.pending_triggers.drain(..) {
                    if let Ok(latency) = now.duration_since(t) {
                        self.metrics
                            .network_programming
                            .observe(latency.as_secs_f64());
                    }
                }
                let now_seconds = now
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                self.metrics.last_sync_timestamp.set(now_seconds);
                self.health.synced();
                if let Some(hc) = self.health_check.as_mut() {
                    hc.sync(&self.state);
                }
                if !changes.conntrack.is_empty() || !self.conntrack_retry.is_empty() {
                    let mut cleanups = std::mem::take(&mut self.conntrack_retry);
                    cleanups.extend(changes.conntrack.iter().cloned());
                    if let Err(e) =
                        tokio::task::block_in_place(|| self.backend.clear_stale_flows(&cleanups))
                    {
                        self.metrics.conntrack_failures.inc();
                        tracing::warn!(error = %e, cleanups = cleanups.len(), "clearing stale conntrack entries failed; retried with the next sync");
                        // Bounded: past this many a stale flow waits for its conntrack timeout.
                        const RETRY_MAX: usize = 10_000;
                        self.conntrack_retry = cleanups.into_iter().take(RETRY_MAX).collect();
                    }
                }
                tracing::debug!(
                    full,
                    written = %report.written,
                    total = %report.total,
                    chains_written = report.chains_written,
                    elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                    "synced"
                );
            }
            Err(e) => {
                self.metrics.failed(&e);
                self.health.failed(e.to_string());
                self.need_full = true;
                self.retry_at = Some(Instant::now() + self.backoff);
                tracing::error!(error = %e, retry_in = ?self.backoff, "sync failed; the previous rules stay in place");
                self.backoff = (self.backoff * 2).min(self.config.sync_period);
            }
        }
    }
}

/// A full sync builds the whole ruleset as text (tens of MB at 10,000 Services) and reads the
/// tables back; glibc keeps such freed memory in its arenas. Returning it keeps the proxy's
/// resident memory near its working set.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// RFC 3339 to a `SystemTime`.
fn chrono_parse(text: &str) -> Option<SystemTime> {
    let parsed = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    let nanos = parsed.timestamp_nanos_opt()?;
    u64::try_from(nanos)
        .ok()
        .map(|n| SystemTime::UNIX_EPOCH + Duration::from_nanos(n))
}

#[cfg(test)]
mod protected_tests {
    use super::server_host;

    #[test]
    fn the_api_servers_host_is_read_from_the_client_url() {
        let host = |s| server_host(s).map(|(h, p)| format!("{h} {p}"));
        assert_eq!(
            host("http://198.18.0.1:6443"),
            Some("198.18.0.1 6443".into())
        );
        assert_eq!(
            host("https://[2001:2::1]:6443/"),
            Some("2001:2::1 6443".into())
        );
        assert_eq!(
            host("https://kubernetes.default.svc"),
            Some("kubernetes.default.svc 443".into())
        );
        assert_eq!(host("http://10.0.0.1/api"), Some("10.0.0.1 80".into()));
        assert_eq!(host("nonsense"), None);
    }
}
