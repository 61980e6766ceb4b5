//! Events (core/v1), as Kubernetes components record them for `kubectl describe` and
//! `kubectl get events`: one Event per object, reason and message, its `count` and
//! `lastTimestamp` bumped when it happens again. Recording never blocks the caller and a
//! failure to record is only logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Event;
use serde_json::json;

use super::{Api, Client, Object, Patch};
use crate::api::meta;

/// The object an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Involved {
    pub kind: String,
    pub api_version: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.containers{NAME}` for events about one container.
    pub field_path: Option<String>,
}

impl Involved {
    pub fn of<K: Object>(obj: &K) -> Self {
        let m = obj.metadata();
        Self {
            kind: K::KIND.to_string(),
            api_version: K::API_VERSION.to_string(),
            namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
            name: m.name.clone().unwrap_or_default(),
            uid: m.uid.clone().unwrap_or_default(),
            field_path: None,
        }
    }

    pub fn container(mut self, name: &str) -> Self {
        self.field_path = Some(format!("spec.containers{{{name}}}"));
        self
    }
}

/// Past events by (object, reason, message): the Event's name and count.
type Seen = HashMap<(String, Option<String>, String, String), (String, i32)>;

/// Records events for one component (`default-scheduler`, `kubelet`, …).
pub struct Recorder {
    client: Client,
    component: String,
    host: Option<String>,
    seen: Mutex<Seen>,
}

/// At most this many distinct events are remembered for aggregation.
const REMEMBERED: usize = 4096;

impl Recorder {
    pub fn new(client: Client, component: &str, host: Option<&str>) -> Arc<Self> {
        Arc::new(Self {
            client,
            component: component.to_string(),
            host: host.map(String::from),
            seen: Mutex::new(HashMap::new()),
        })
    }

    pub fn normal(self: &Arc<Self>, about: Involved, reason: &str, message: String) {
        self.record(about, "Normal", reason, message);
    }

    pub fn warning(self: &Arc<Self>, about: Involved, reason: &str, message: String) {
        self.record(about, "Warning", reason, message);
    }

    fn record(self: &Arc<Self>, about: Involved, type_: &str, reason: &str, message: String) {
        let this = self.clone();
        let (type_, reason) = (type_.to_string(), reason.to_string());
        tokio::spawn(async move {
            if let Err(e) = this.write(&about, &type_, &reason, &message).await {
                tracing::debug!(error = %e, reason, "recording an event failed");
            }
        });
    }

    async fn write(
        &self,
        about: &Involved,
        type_: &str,
        reason: &str,
        message: &str,
    ) -> Result<(), super::ClientError> {
        let api = Api::<Event>::namespaced(self.client.clone(), &about.namespace);
        let now = meta::now_rfc3339();
        let key = (
            about.uid.clone(),
            about.field_path.clone(),
            reason.to_string(),
            message.to_string(),
        );
        let previous = self
            .seen
            .lock()
            .map(|s| s.get(&key).cloned())
            .unwrap_or_default();
        if let Some((name, count)) = previous {
            let patch = json!({"count": count + 1, "lastTimestamp": now});
            match api.patch(&name, Patch::Merge, &patch).await {
                Ok(_) => {
                    if let Ok(mut seen) = self.seen.lock() {
                        seen.insert(key, (name, count + 1));
                    }
                    return Ok(());
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let name = format!("{}.{:x}", about.name, nanos);
        let mut involved = json!({"kind": about.kind, "apiVersion": about.api_version,
            "namespace": about.namespace, "name": about.name, "uid": about.uid});
        if let Some(path) = &about.field_path {
            involved["fieldPath"] = json!(path);
        }
        let mut source = json!({"component": self.component});
        if let Some(host) = &self.host {
            source["host"] = json!(host);
        }
        let event: Event = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": about.namespace},
            "involvedObject": involved,
            "reason": reason, "message": message, "type": type_,
            "source": source, "reportingComponent": self.component,
            "reportingInstance": self.host.clone().unwrap_or_default(),
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }))
        .map_err(|e| super::ClientError::Decode {
            what: "an Event".into(),
            message: e.to_string(),
        })?;
        api.create(&event).await?;
        if let Ok(mut seen) = self.seen.lock() {
            if seen.len() >= REMEMBERED {
                seen.clear();
            }
            seen.insert(key, (name, 1));
        }
        Ok(())
    }
}
