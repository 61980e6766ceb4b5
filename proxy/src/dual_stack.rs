//! Dual-stack: one backend per IP family behind the one `Backend` seam, as kube-proxy's
//! meta-proxier does. Each family's backend renders only its own addresses, keeps its own
//! record of what it applied and fails on its own: an IPv6 failure never holds back IPv4.

use serde_json::{json, Value};

use crate::backend::{Backend, BackendError, SyncReport};
use crate::model::{Changes, ProxyState};

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
}

impl<B: Backend> Backend for DualStack<B> {
    fn name(&self) -> &'static str {
        self.families[0].name()
    }

    /// Syncs every family even when one fails; the first error is returned (the runner then
    /// makes the next sync full, for both, which is harmless for the one that worked).
    fn sync(
        &mut self,
        state: &ProxyState,
        changes: &Changes,
        full: bool,
    ) -> Result<SyncReport, BackendError> {
        let mut total = SyncReport {
            full,
            ..SyncReport::default()
        };
        let mut first_error = None;
        for backend in &mut self.families {
            match backend.sync(state, changes, full) {
                Ok(report) => {
                    total.rules_written += report.rules_written;
                    total.rules_total += report.rules_total;
                    total.chains_written += report.chains_written;
                    total.chains_deleted += report.chains_deleted;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    fn lost_state(&mut self) -> Option<String> {
        self.families.iter_mut().find_map(|b| b.lost_state())
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        let mut first_error = None;
        for backend in &mut self.families {
            if let Err(e) = backend.cleanup() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// One entry per Service port, its addresses and endpoints from every family.
    fn dump(&self) -> Result<Value, BackendError> {
        let mut merged: Vec<Value> = Vec::new();
        for backend in &self.families {
            let dump = backend.dump()?;
            for service in dump["services"].as_array().into_iter().flatten() {
                match merged
                    .iter_mut()
                    .find(|m| m["service"] == service["service"])
                {
                    Some(existing) => merge_service(existing, service),
                    None => merged.push(service.clone()),
                }
            }
        }
        Ok(json!({ "backend": self.name(), "services": merged }))
    }
}

fn merge_service(into: &mut Value, other: &Value) {
    for list in ["addresses", "endpoints"] {
        let extra: Vec<Value> = other[list].as_array().cloned().unwrap_or_default();
        if let Some(values) = into[list].as_array_mut() {
            values.extend(extra);
        }
    }
    if into["nodePort"].is_null() {
        into["nodePort"] = other["nodePort"].clone();
    }
    // A family without endpoints says so only when no family has any.
    if into["noEndpoints"].is_null() {
        return;
    }
    if other["noEndpoints"].is_null() {
        if let Some(object) = into.as_object_mut() {
            object.remove("noEndpoints");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that records what it was asked and can be told to fail.
    struct Recording {
        name: &'static str,
        fail: bool,
        synced: usize,
        cleaned: bool,
        dump: Value,
    }

    impl Recording {
        fn new(name: &'static str, dump: Value) -> Self {
            Self {
                name,
                fail: false,
                synced: 0,
                cleaned: false,
                dump,
            }
        }
    }

    impl Backend for Recording {
        fn name(&self) -> &'static str {
            self.name
        }
        fn sync(
            &mut self,
            _: &ProxyState,
            _: &Changes,
            full: bool,
        ) -> Result<SyncReport, BackendError> {
            self.synced += 1;
            if self.fail {
                return Err(BackendError::Command {
                    command: format!("{}-restore", self.name),
                    status: "exit status: 1".into(),
                    stderr: "injected".into(),
                });
            }
            Ok(SyncReport {
                full,
                rules_written: 3,
                rules_total: 10,
                chains_written: 1,
                chains_deleted: 0,
            })
        }
        fn lost_state(&mut self) -> Option<String> {
            (self.name == "v6").then(|| "the nat canary rule is gone".to_string())
        }
        fn cleanup(&mut self) -> Result<(), BackendError> {
            self.cleaned = true;
            Ok(())
        }
        fn dump(&self) -> Result<Value, BackendError> {
            Ok(self.dump.clone())
        }
    }

    #[test]
    fn a_failing_family_does_not_stop_the_other_and_reports_its_error() {
        let mut v4 = Recording::new("v4", json!({"services": []}));
        v4.fail = true;
        let v6 = Recording::new("v6", json!({"services": []}));
        let mut dual = DualStack::new(v4, Some(v6));
        let err = dual
            .sync(&ProxyState::default(), &Changes::default(), true)
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
    fn reports_add_up_over_families() {
        let dual = &mut DualStack::new(
            Recording::new("v4", json!({})),
            Some(Recording::new("v6", json!({}))),
        );
        let report = dual
            .sync(&ProxyState::default(), &Changes::default(), false)
            .expect("test data is valid");
        assert_eq!((report.rules_written, report.rules_total), (6, 20));
        assert!(!report.full);
    }

    #[test]
    fn dump_merges_a_service_port_seen_by_both_families() {
        let v4 = Recording::new(
            "v4",
            json!({"services": [
                {"service": "default/web:http/TCP", "addresses": ["198.18.128.9:80"], "nodePort": 30080, "endpoints": ["198.19.1.10:8080"]},
                {"service": "default/v4only:http/TCP", "addresses": ["198.18.128.7:80"], "nodePort": null, "endpoints": []},
            ]}),
        );
        let v6 = Recording::new(
            "v6",
            json!({"services": [
                {"service": "default/web:http/TCP", "addresses": ["[2001:2:0:ff::9]:80"], "nodePort": 30080, "endpoints": [], "noEndpoints": "REJECT"},
            ]}),
        );
        let dump = DualStack::new(v4, Some(v6))
            .dump()
            .expect("test data is valid");
        let services = dump["services"].as_array().expect("test data is valid");
        assert_eq!(services.len(), 2);
        assert_eq!(
            services[0],
            json!({"service": "default/web:http/TCP", "addresses": ["198.18.128.9:80", "[2001:2:0:ff::9]:80"], "nodePort": 30080, "endpoints": ["198.19.1.10:8080"]})
        );
    }
}
