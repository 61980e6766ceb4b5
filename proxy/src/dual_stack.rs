//! Dual-stack: one backend per IP family behind the one `Backend` seam, as kube-proxy's
//! meta-proxier does. Each family's backend renders only its own addresses, keeps its own
//! record of what it applied and fails on its own: an IPv6 failure never holds back IPv4.

use std::collections::BTreeSet;

use crate::backend::{Backend, BackendError, Dump, DumpedService, SyncInput, SyncReport};
use crate::model::ConntrackCleanup;

pub struct DualStack<B: Backend> {
    /// The primary family first (IPv4), then the secondary.
    families: Vec<B>,
}

impl<B: Backend> DualStack<B> {
    pub fn new(primary: B, secondary: Option<B>) -> Self {
        Self {
            families: std::iter::once(primary).chain(secondary).collect(),
        }
    }

    pub fn families(&self) -> usize {
        self.families.len()
    }

    /// Runs `f` on every family, even after one fails; the first error is returned.
    fn each(
        &mut self,
        mut f: impl FnMut(&mut B) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        let mut first_error = None;
        for backend in &mut self.families {
            if let Err(e) = f(backend) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl<B: Backend> Backend for DualStack<B> {
    fn name(&self) -> &'static str {
        self.families[0].name()
    }

    /// Syncs every family even when one fails; the first error is returned (the runner then
    /// makes the next sync full, for both, which is harmless for the one that worked).
    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, BackendError> {
        let mut total: Option<SyncReport> = None;
        self.each(|backend| {
            let report = backend.sync(input)?;
            total = Some(match total.take() {
                None => report,
                Some(t) => SyncReport {
                    full: t.full,
                    written: t.written + report.written,
                    total: t.total + report.total,
                    chains_written: t.chains_written + report.chains_written,
                    chains_deleted: t.chains_deleted + report.chains_deleted,
                    per_table: add_tables(t.per_table, report.per_table),
                    messages: t.messages + report.messages,
                },
            });
            Ok(())
        })?;
        Ok(total.unwrap_or(SyncReport {
            full: input.full,
            ..SyncReport::default()
        }))
    }

    fn lost_state(&mut self) -> Option<String> {
        self.families.iter_mut().find_map(|b| b.lost_state())
    }

    fn housekeeping(&mut self) -> Result<(), BackendError> {
        self.each(|b| b.housekeeping())
    }

    /// Once: the families share the one conntrack table (its entries carry their family).
    fn clear_stale_flows(
        &mut self,
        flows: &BTreeSet<ConntrackCleanup>,
    ) -> Result<(), BackendError> {
        self.families[0].clear_stale_flows(flows)
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        self.each(|b| b.cleanup())
    }

    /// One entry per Service port, its addresses and endpoints from every family.
    fn dump(&self) -> Result<Dump, BackendError> {
        let mut merged: Vec<DumpedService> = Vec::new();
        for backend in &self.families {
            for service in backend.dump()?.services {
                match merged.iter_mut().find(|m| m.service == service.service) {
                    Some(existing) => merge_service(existing, service),
                    None => merged.push(service),
                }
            }
        }
        Ok(Dump {
            backend: self.name().to_string(),
            services: merged,
            conntrack: Vec::new(),
        }
        .sorted())
    }
}

/// Per-table counts of two families, table by table.
fn add_tables(
    mut into: Vec<(&'static str, crate::backend::Count)>,
    other: Vec<(&'static str, crate::backend::Count)>,
) -> Vec<(&'static str, crate::backend::Count)> {
    for (table, count) in other {
        match into.iter_mut().find(|(t, _)| *t == table) {
            Some((_, c)) => *c = *c + count,
            None => into.push((table, count)),
        }
    }
    into
}

fn merge_service(into: &mut DumpedService, other: DumpedService) {
    into.addresses.extend(other.addresses);
    into.endpoints.extend(other.endpoints);
    into.frontends.extend(other.frontends);
    into.node_port = into.node_port.or(other.node_port);
    // A family without endpoints says so only when no family has any.
    if other.no_endpoints.is_none() || !into.endpoints.is_empty() {
        into.no_endpoints = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Count, NodeState, Unit};
    use crate::model::{Changes, ProxyState};

    /// A backend that records what it was asked and can be told to fail.
    struct Recording {
        name: &'static str,
        fail: bool,
        synced: usize,
        cleaned: bool,
        dump: Dump,
    }

    impl Recording {
        fn new(name: &'static str, services: Vec<DumpedService>) -> Self {
            Self {
                name,
                fail: false,
                synced: 0,
                cleaned: false,
                dump: Dump {
                    backend: name.into(),
                    services,
                    conntrack: Vec::new(),
                },
            }
        }
    }

    impl Backend for Recording {
        fn name(&self) -> &'static str {
            self.name
        }
        fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, BackendError> {
            self.synced += 1;
            if self.fail {
                return Err(BackendError::Command {
                    command: format!("{}-restore", self.name),
                    status: "exit status: 1".into(),
                    stderr: "injected".into(),
                });
            }
            Ok(SyncReport {
                full: input.full,
                written: Count::new(3, Unit::Rules),
                total: Count::new(10, Unit::Rules),
                chains_written: 1,
                chains_deleted: 0,
                per_table: vec![
                    ("nat", Count::new(7, Unit::Rules)),
                    ("filter", Count::new(3, Unit::Rules)),
                ],
                messages: 0,
            })
        }
        fn lost_state(&mut self) -> Option<String> {
            (self.name == "v6").then(|| "the nat canary rule is gone".to_string())
        }
        fn cleanup(&mut self) -> Result<(), BackendError> {
            self.cleaned = true;
            Ok(())
        }
        fn dump(&self) -> Result<Dump, BackendError> {
            Ok(self.dump.clone())
        }
    }

    fn input<'a>(
        state: &'a ProxyState,
        changes: &'a Changes,
        node: &'a NodeState,
        full: bool,
    ) -> SyncInput<'a> {
        SyncInput {
            state,
            changes,
            full,
            node,
        }
    }

    #[test]
    fn a_failing_family_does_not_stop_the_other_and_reports_its_error() {
        let mut v4 = Recording::new("v4", vec![]);
        v4.fail = true;
        let v6 = Recording::new("v6", vec![]);
        let mut dual = DualStack::new(v4, Some(v6));
        let (state, changes, node) = (
            ProxyState::default(),
            Changes::default(),
            NodeState::default(),
        );
        let err = dual
            .sync(input(&state, &changes, &node, true))
            .expect_err("the v4 family fails");
        assert!(err.to_string().contains("v4-restore"), "{err}");
        assert_eq!(dual.families[1].synced, 1);
        assert_eq!(
            dual.lost_state().as_deref(),
            Some("the nat canary rule is gone")
        );
        dual.cleanup().expect("test data is valid");
        assert!(dual.families.iter().all(|b| b.cleaned));
    }

    #[test]
    fn reports_add_up_over_families_in_their_unit() {
        let dual = &mut DualStack::new(
            Recording::new("v4", vec![]),
            Some(Recording::new("v6", vec![])),
        );
        let (state, changes, node) = (
            ProxyState::default(),
            Changes::default(),
            NodeState::default(),
        );
        let report = dual
            .sync(input(&state, &changes, &node, false))
            .expect("test data is valid");
        assert_eq!(report.written, Count::new(6, Unit::Rules));
        assert_eq!(report.total.to_string(), "20 rules");
        assert_eq!(
            report.per_table,
            [
                ("nat", Count::new(14, Unit::Rules)),
                ("filter", Count::new(6, Unit::Rules))
            ]
        );
        assert!(!report.full);
    }

    #[test]
    fn dump_merges_a_service_port_seen_by_both_families() {
        let service =
            |name: &str, addresses: &[&str], node_port, endpoints: &[&str], none: Option<&str>| {
                DumpedService {
                    service: name.into(),
                    addresses: addresses.iter().map(|a| a.to_string()).collect(),
                    node_port,
                    endpoints: endpoints.iter().map(|a| a.to_string()).collect(),
                    no_endpoints: none.map(String::from),
                    frontends: vec![],
                }
            };
        let v4 = Recording::new(
            "v4",
            vec![
                service(
                    "default/web:http/TCP",
                    &["198.18.128.9:80"],
                    Some(30080),
                    &["198.19.1.10:8080"],
                    None,
                ),
                service(
                    "default/v4only:http/TCP",
                    &["198.18.128.7:80"],
                    None,
                    &[],
                    Some("reject"),
                ),
            ],
        );
        let v6 = Recording::new(
            "v6",
            vec![service(
                "default/web:http/TCP",
                &["[2001:2:0:ff::9]:80"],
                Some(30080),
                &[],
                Some("reject"),
            )],
        );
        let dump = DualStack::new(v4, Some(v6))
            .dump()
            .expect("test data is valid");
        assert_eq!(dump.services.len(), 2);
        assert_eq!(
            dump.services[1],
            service(
                "default/web:http/TCP",
                &["198.18.128.9:80", "[2001:2:0:ff::9]:80"],
                Some(30080),
                &["198.19.1.10:8080"],
                None
            )
        );
        assert_eq!(dump.services[0].no_endpoints.as_deref(), Some("reject"));
        // The JSON `kpx-proxy dump --json` prints keeps kube-proxy-like camelCase names.
        let json = serde_json::to_value(&dump).expect("serialisable");
        assert_eq!(json["services"][1]["nodePort"], 30080);
        assert!(json["services"][1].get("noEndpoints").is_none());
    }
}
