//! The ReplicaSet and ReplicationController decision, pure: given a controller and the pods of
//! its namespace, which pods it owns (adopting matching orphans), how many to create or which to
//! delete, and the status to report. Both kinds share it through [`Replicated`].

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec, ReplicationController};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};

/// A replicated workload, whatever its kind.
#[derive(Debug, Clone)]
pub struct Replicated {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub replicas: i32,
    pub selector: LabelSelector,
    pub template: Option<PodTemplateSpec>,
    /// The status as last written (a pass writes only a different one).
    pub current: Counts,
}

impl From<&ReplicaSet> for Replicated {
    fn from(rs: &ReplicaSet) -> Self {
        let spec = rs.spec.clone().unwrap_or_default();
        Self {
            api_version: "apps/v1",
            kind: "ReplicaSet",
            name: rs.metadata.name.clone().unwrap_or_default(),
            namespace: rs.metadata.namespace.clone().unwrap_or_default(),
            uid: rs.metadata.uid.clone().unwrap_or_default(),
            replicas: spec.replicas.unwrap_or(1),
            selector: spec.selector,
            template: spec.template,
            current: rs.status.as_ref().map_or_else(Counts::default, |s| {
                Counts::reported(
                    s.replicas,
                    s.ready_replicas,
                    s.available_replicas,
                    s.fully_labeled_replicas,
                )
            }),
        }
    }
}

impl From<&ReplicationController> for Replicated {
    fn from(rc: &ReplicationController) -> Self {
        let spec = rc.spec.clone().unwrap_or_default();
        // An RC's selector is a plain map, defaulting to its template's labels.
        let labels = spec.selector.clone().or_else(|| {
            spec.template
                .as_ref()
                .and_then(|t| t.metadata.as_ref())
                .and_then(|m| m.labels.clone())
        });
        Self {
            api_version: "v1",
            kind: "ReplicationController",
            name: rc.metadata.name.clone().unwrap_or_default(),
            namespace: rc.metadata.namespace.clone().unwrap_or_default(),
            uid: rc.metadata.uid.clone().unwrap_or_default(),
            replicas: spec.replicas.unwrap_or(1),
            selector: LabelSelector {
                match_labels: labels,
                match_expressions: None,
            },
            template: spec.template,
            current: rc.status.as_ref().map_or_else(Counts::default, |s| {
                Counts::reported(
                    s.replicas,
                    s.ready_replicas,
                    s.available_replicas,
                    s.fully_labeled_replicas,
                )
            }),
        }
    }
}

/// Whether `selector` selects `labels`; an empty selector selects nothing (as for workloads).
pub fn selects(selector: &LabelSelector, labels: Option<&BTreeMap<String, String>>) -> bool {
    let empty = BTreeMap::new();
    let labels = labels.unwrap_or(&empty);
    let mut any = false;
    for (k, v) in selector.match_labels.iter().flatten() {
        any = true;
        if labels.get(k) != Some(v) {
            return false;
        }
    }
    for e in selector.match_expressions.iter().flatten() {
        any = true;
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        let ok = match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    any
}

fn controller_uid(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

fn is_active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// What the controller does in one pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Orphans matching the selector, to be given an owner reference.
    pub adopt: Vec<String>,
    /// Pods to create from the template.
    pub create: Vec<Pod>,
    /// Pods to delete, most expendable first.
    pub delete: Vec<String>,
    pub status: Counts,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub replicas: i32,
    pub ready: i32,
    pub available: i32,
    pub fully_labeled: i32,
}

impl Counts {
    /// As a ReplicaSet's or ReplicationController's status reports them (absent: 0).
    fn reported(
        replicas: i32,
        ready: Option<i32>,
        available: Option<i32>,
        fully_labeled: Option<i32>,
    ) -> Self {
        Self {
            replicas,
            ready: ready.unwrap_or(0),
            available: available.unwrap_or(0),
            fully_labeled: fully_labeled.unwrap_or(0),
        }
    }
}

pub fn owner_reference(w: &Replicated) -> OwnerReference {
    OwnerReference {
        api_version: w.api_version.into(),
        kind: w.kind.into(),
        name: w.name.clone(),
        uid: w.uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// A new pod from the template, owned by `w`.
pub fn pod_from_template(w: &Replicated) -> Pod {
    let template = w.template.clone().unwrap_or_default();
    let meta = template.metadata.unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", w.name)),
            namespace: Some(w.namespace.clone()),
            labels: meta.labels,
            annotations: meta.annotations,
            owner_references: Some(vec![owner_reference(w)]),
            ..Default::default()
        },
        spec: template.spec,
        status: None,
    }
}

/// The pass for `w` over the pods of its namespace.
pub fn decide(w: &Replicated, pods: &[&Pod]) -> Decision {
    let mut decision = Decision::default();
    let mut owned: Vec<&Pod> = Vec::new();
    for pod in pods {
        if pod.metadata.namespace.as_deref() != Some(w.namespace.as_str()) {
            continue;
        }
        match controller_uid(pod) {
            Some(uid) if uid == w.uid => owned.push(pod),
            Some(_) => {}
            None if is_active(pod) && selects(&w.selector, pod.metadata.labels.as_ref()) => {
                decision.adopt.extend(pod.metadata.name.clone());
                owned.push(pod);
            }
            None => {}
        }
    }
    let mut active: Vec<&Pod> = owned.iter().copied().filter(|p| is_active(p)).collect();
    let wanted = w.replicas.max(0) as usize;
    if active.len() < wanted {
        decision.create = (active.len()..wanted)
            .map(|_| pod_from_template(w))
            .collect();
    } else if active.len() > wanted {
        // kube-controller-manager's order: unscheduled, then not ready, then the newest.
        active.sort_by_key(|p| {
            (
                p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some(),
                is_ready(p),
                std::cmp::Reverse(p.metadata.creation_timestamp.clone().map(|t| t.0)),
                p.metadata.name.clone(),
            )
        });
        decision.delete = active[..active.len() - wanted]
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
    }
    let template_labels = w
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let active: Vec<&Pod> = owned.iter().copied().filter(|p| is_active(p)).collect();
    decision.status = Counts {
        replicas: active.len() as i32,
        ready: active.iter().filter(|p| is_ready(p)).count() as i32,
        available: active.iter().filter(|p| is_ready(p)).count() as i32,
        fully_labeled: active
            .iter()
            .filter(|p| {
                let labels = p.metadata.labels.clone().unwrap_or_default();
                template_labels
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
            })
            .count() as i32,
    };
    decision
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn rs(replicas: i32) -> ReplicaSet {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "rs-1"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"},
                "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]},
                "template": {"metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}}))
        .expect("rs")
    }

    fn pod(
        name: &str,
        owner: Option<&str>,
        node: Option<&str>,
        ready: bool,
        created: &str,
        extra: Value,
    ) -> Pod {
        let mut p = json!({
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"},
                "creationTimestamp": created},
            "spec": {"containers": [{"name": "c", "image": "nginx"}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        });
        if let Some(uid) = owner {
            p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "uid": uid, "controller": true}]);
        }
        if let Some(node) = node {
            p["spec"]["nodeName"] = json!(node);
        }
        if let (Some(target), Some(extra)) = (p["metadata"].as_object_mut(), extra.as_object()) {
            target.extend(extra.clone());
        }
        serde_json::from_value(p).expect("pod")
    }

    #[test]
    fn missing_replicas_are_created_from_the_template_owned_by_the_set() {
        let owned = pod(
            "web-a",
            Some("rs-1"),
            Some("n1"),
            true,
            "2026-01-01T00:00:00Z",
            json!({}),
        );
        let other = pod(
            "other",
            Some("rs-2"),
            Some("n1"),
            true,
            "2026-01-01T00:00:00Z",
            json!({}),
        );
        let gone = pod(
            "web-old",
            Some("rs-1"),
            Some("n1"),
            true,
            "2026-01-01T00:00:00Z",
            json!({"deletionTimestamp": "2026-01-02T00:00:00Z"}),
        );
        let d = decide(&(&rs(3)).into(), &[&owned, &other, &gone]);
        assert_eq!(d.create.len(), 2);
        let new = &d.create[0];
        assert_eq!(new.metadata.generate_name.as_deref(), Some("web-"));
        assert_eq!(
            new.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app"))
                .map(String::as_str),
            Some("web")
        );
        let owner = &new.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("ReplicaSet", "rs-1", Some(true))
        );
        assert_eq!(
            d.status,
            Counts {
                replicas: 1,
                ready: 1,
                available: 1,
                fully_labeled: 1
            }
        );
    }

    #[test]
    fn matching_orphans_are_adopted_and_excluded_ones_are_not() {
        let orphan = pod(
            "orphan",
            None,
            Some("n1"),
            true,
            "2026-01-01T00:00:00Z",
            json!({}),
        );
        let mut db = pod(
            "db",
            None,
            Some("n1"),
            true,
            "2026-01-01T00:00:00Z",
            json!({}),
        );
        db.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert("tier".into(), "db".into());
        let d = decide(&(&rs(1)).into(), &[&orphan, &db]);
        assert_eq!(d.adopt, ["orphan"]);
        assert!(d.create.is_empty() && d.delete.is_empty());
    }

    #[test]
    fn scaling_down_deletes_unscheduled_then_not_ready_then_newest() {
        let pods = [
            pod(
                "old-ready",
                Some("rs-1"),
                Some("n1"),
                true,
                "2026-01-01T00:00:00Z",
                json!({}),
            ),
            pod(
                "new-ready",
                Some("rs-1"),
                Some("n1"),
                true,
                "2026-01-03T00:00:00Z",
                json!({}),
            ),
            pod(
                "not-ready",
                Some("rs-1"),
                Some("n1"),
                false,
                "2026-01-01T00:00:00Z",
                json!({}),
            ),
            pod(
                "unscheduled",
                Some("rs-1"),
                None,
                false,
                "2026-01-01T00:00:00Z",
                json!({}),
            ),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        assert_eq!(
            decide(&(&rs(1)).into(), &refs).delete,
            ["unscheduled", "not-ready", "new-ready"]
        );
        assert_eq!(decide(&(&rs(0)).into(), &refs).delete.len(), 4);
    }

    #[test]
    fn a_replication_controller_selects_by_its_template_labels_by_default() {
        let rc: ReplicationController = serde_json::from_value(json!({
            "metadata": {"name": "nginx", "namespace": "default", "uid": "rc-1"},
            "spec": {"replicas": 3, "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}}}))
        .expect("rc");
        let orphan = pod(
            "orphan",
            None,
            Some("n1"),
            true,
            "2026-01-01T00:00:00Z",
            json!({}),
        );
        let d = decide(&(&rc).into(), &[&orphan]);
        assert_eq!(d.adopt, ["orphan"]);
        assert_eq!(d.create.len(), 2);
        assert_eq!(
            d.create[0]
                .metadata
                .owner_references
                .as_ref()
                .map(|o| o[0].kind.clone()),
            Some("ReplicationController".into())
        );
    }
}
