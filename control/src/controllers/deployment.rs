//! The Deployment decision, pure: from a Deployment and the ReplicaSets it owns, the new
//! ReplicaSet (for the current pod template, named by the template's hash), the replica count
//! of each ReplicaSet for this step of the rollout (RollingUpdate within maxSurge and
//! maxUnavailable, or Recreate), the old ReplicaSets beyond the revision history to delete, and
//! the status `kubectl rollout status` reads.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

pub const HASH_LABEL: &str = "pod-template-hash";
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";

/// What one pass does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// The ReplicaSet to create for the current template, if it does not exist yet.
    pub create: Option<ReplicaSet>,
    /// `name → replicas` for every owned ReplicaSet whose count changes.
    pub scale: BTreeMap<String, i32>,
    /// Old ReplicaSets past `revisionHistoryLimit`, scaled to zero: deleted.
    pub delete: Vec<String>,
    pub status: DeploymentStatus,
}

/// The short hash of a pod template that names its ReplicaSet and labels its pods.
pub fn template_hash(d: &Deployment) -> String {
    let template = d.spec.as_ref().map(|s| &s.template);
    let text = serde_json::to_string(&template).unwrap_or_default();
    let digest = Sha256::digest(text.as_bytes());
    // Pod-template hashes are lowercase alphanumerics, 10 characters.
    digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

fn owned_by(rs: &ReplicaSet, uid: &str) -> bool {
    rs.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION_ANNOTATION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn available(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

/// A percentage or absolute value of `total`, rounded up (surge) or down (unavailable).
fn scaled(value: Option<&IntOrString>, default_percent: i32, total: i32, round_up: bool) -> i32 {
    match value {
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(s)) => {
            let percent: i32 = s.trim_end_matches('%').parse().unwrap_or(default_percent);
            let exact = f64::from(total) * f64::from(percent) / 100.0;
            (if round_up {
                exact.ceil()
            } else {
                exact.floor()
            }) as i32
        }
        None => {
            let exact = f64::from(total) * f64::from(default_percent) / 100.0;
            (if round_up {
                exact.ceil()
            } else {
                exact.floor()
            }) as i32
        }
    }
}

fn new_replica_set(d: &Deployment, hash: &str, revision: i64) -> ReplicaSet {
    let name = d.metadata.name.clone().unwrap_or_default();
    let spec = d.spec.clone().unwrap_or_default();
    let mut template = spec.template.clone();
    let meta = template.metadata.get_or_insert_with(Default::default);
    meta.labels
        .get_or_insert_with(Default::default)
        .insert(HASH_LABEL.into(), hash.into());
    let mut selector = spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(Default::default)
        .insert(HASH_LABEL.into(), hash.into());
    let mut labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.insert(HASH_LABEL.into(), hash.into());
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{name}-{hash}")),
            namespace: d.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some([(REVISION_ANNOTATION.to_string(), revision.to_string())].into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name,
                uid: d.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::apps::v1::ReplicaSetSpec {
            replicas: Some(0),
            selector,
            template: Some(template),
            min_ready_seconds: spec.min_ready_seconds,
        }),
        status: None,
    }
}

fn condition(type_: &str, ok: bool, reason: &str, message: String) -> DeploymentCondition {
    DeploymentCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: Some(reason.into()),
        message: Some(message),
        ..Default::default()
    }
}

/// The pass for `d` over the ReplicaSets of its namespace.
pub fn plan(d: &Deployment, sets: &[&ReplicaSet]) -> Plan {
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let name = d.metadata.name.clone().unwrap_or_default();
    let spec = d.spec.clone().unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1);
    let hash = template_hash(d);
    let mut owned: Vec<ReplicaSet> = sets
        .iter()
        .filter(|rs| owned_by(rs, &uid))
        .map(|rs| (*rs).clone())
        .collect();
    let mut out = Plan::default();
    let new_name = format!("{name}-{hash}");
    if !owned
        .iter()
        .any(|rs| rs.metadata.name.as_deref() == Some(new_name.as_str()))
    {
        let next_revision = owned.iter().map(revision).max().unwrap_or(0) + 1;
        let rs = new_replica_set(d, &hash, next_revision);
        out.create = Some(rs.clone());
        owned.push(rs);
    }
    let (new, mut old): (Vec<ReplicaSet>, Vec<ReplicaSet>) = owned
        .into_iter()
        .partition(|rs| rs.metadata.name.as_deref() == Some(new_name.as_str()));
    let new = &new[0];
    old.sort_by_key(revision);
    let mut counts: BTreeMap<String, i32> = old
        .iter()
        .chain([new])
        .map(|rs| {
            (
                rs.metadata.name.clone().unwrap_or_default(),
                spec_replicas(rs),
            )
        })
        .collect();
    let old_total: i32 = old.iter().map(spec_replicas).sum();
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    if recreate {
        let old_running: i32 = old
            .iter()
            .map(|rs| rs.status.as_ref().map_or(0, |s| s.replicas))
            .sum();
        for rs in &old {
            counts.insert(rs.metadata.name.clone().unwrap_or_default(), 0);
        }
        if old_total == 0 && old_running == 0 {
            counts.insert(new_name.clone(), replicas);
        }
    } else {
        let rolling = spec
            .strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref());
        let surge = scaled(
            rolling.and_then(|r| r.max_surge.as_ref()),
            25,
            replicas,
            true,
        );
        let mut unavailable = scaled(
            rolling.and_then(|r| r.max_unavailable.as_ref()),
            25,
            replicas,
            false,
        );
        if surge == 0 && unavailable == 0 {
            unavailable = 1;
        }
        // Scale the new ReplicaSet up within the surge.
        let new_count = spec_replicas(new);
        let room = replicas + surge - (old_total + new_count);
        let up = room.min(replicas - new_count).max(0);
        let new_count = if new_count > replicas {
            replicas
        } else {
            new_count + up
        };
        counts.insert(new_name.clone(), new_count);
        // Scale old ones down as far as availability allows, oldest first.
        let min_available = replicas - unavailable;
        let total_available: i32 = old.iter().chain([new]).map(available).sum();
        let mut can_remove = (total_available - min_available).max(0);
        // Old replicas that are not available cost no availability: always removable.
        for rs in &old {
            let n = rs.metadata.name.clone().unwrap_or_default();
            let current = spec_replicas(rs);
            let unavailable_here = (current - available(rs)).max(0);
            let remove = (unavailable_here + can_remove).min(current);
            can_remove -= (remove - unavailable_here).max(0);
            counts.insert(n, current - remove);
        }
    }
    for rs in old.iter().chain([new]) {
        let n = rs.metadata.name.clone().unwrap_or_default();
        if counts.get(&n) != Some(&spec_replicas(rs))
            || out
                .create
                .as_ref()
                .is_some_and(|c| c.metadata.name == rs.metadata.name)
        {
            out.scale.insert(n.clone(), counts[&n]);
        }
    }
    // Revision history: old ReplicaSets at zero beyond the limit go, oldest first.
    let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let idle: Vec<&ReplicaSet> = old
        .iter()
        .filter(|rs| counts.get(rs.metadata.name.as_deref().unwrap_or("")) == Some(&0))
        .filter(|rs| rs.status.as_ref().map_or(0, |s| s.replicas) == 0)
        .collect();
    if idle.len() > limit {
        out.delete = idle[..idle.len() - limit]
            .iter()
            .filter_map(|rs| rs.metadata.name.clone())
            .collect();
    }
    // Status from what the ReplicaSets report.
    let all: Vec<&ReplicaSet> = old.iter().chain([new]).collect();
    let sum = |f: fn(&ReplicaSet) -> i32| all.iter().map(|rs| f(rs)).sum::<i32>();
    let total = sum(|rs| rs.status.as_ref().map_or(0, |s| s.replicas));
    let ready = sum(|rs| {
        rs.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
    });
    let avail = sum(available);
    let updated = new.status.as_ref().map_or(0, |s| s.replicas);
    let rolling = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    let max_unavailable = if recreate {
        replicas
    } else {
        scaled(
            rolling.and_then(|r| r.max_unavailable.as_ref()),
            25,
            replicas,
            false,
        )
    };
    let complete = updated == replicas && total == replicas && avail == replicas;
    out.status = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(total),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(avail),
        unavailable_replicas: Some((replicas - avail).max(0)),
        conditions: Some(vec![
            condition(
                "Available",
                avail >= replicas - max_unavailable,
                if avail >= replicas - max_unavailable {
                    "MinimumReplicasAvailable"
                } else {
                    "MinimumReplicasUnavailable"
                },
                format!("{avail} of {replicas} replicas available"),
            ),
            condition(
                "Progressing",
                true,
                if complete {
                    "NewReplicaSetAvailable"
                } else {
                    "ReplicaSetUpdated"
                },
                format!(
                    "ReplicaSet \"{new_name}\" {}",
                    if complete {
                        "has successfully progressed"
                    } else {
                        "is progressing"
                    }
                ),
            ),
        ]),
        collision_count: None,
        terminating_replicas: None,
    };
    out
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn deployment(image: &str, strategy: Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "d-1", "generation": 2},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}}, "strategy": strategy,
                "template": {"metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": image}]}}}}))
        .expect("deployment")
    }

    /// A ReplicaSet as the API would hold it after earlier passes.
    fn existing(d: &Deployment, revision: i64, replicas: i32, available: i32) -> ReplicaSet {
        let mut rs = new_replica_set(d, &template_hash(d), revision);
        if let Some(spec) = rs.spec.as_mut() {
            spec.replicas = Some(replicas);
        }
        rs.status = Some(k8s_openapi::api::apps::v1::ReplicaSetStatus {
            replicas,
            ready_replicas: Some(available),
            available_replicas: Some(available),
            ..Default::default()
        });
        rs
    }

    #[test]
    fn a_new_deployment_gets_a_replica_set_named_by_its_template_hash() {
        let d = deployment("nginx:1.14", json!({}));
        let p = plan(&d, &[]);
        let rs = p.create.expect("a new ReplicaSet");
        let name = format!("web-{}", template_hash(&d));
        assert_eq!(rs.metadata.name.as_deref(), Some(name.as_str()));
        assert_eq!(revision(&rs), 1);
        let hash = rs
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.as_ref())
            .and_then(|l| l.get(HASH_LABEL).cloned());
        assert_eq!(hash, Some(template_hash(&d)));
        assert_eq!(p.scale, [(name, 3)].into());
        assert_eq!(template_hash(&d).len(), 10);
        assert_ne!(
            template_hash(&d),
            template_hash(&deployment("nginx:1.16", json!({})))
        );
    }

    #[test]
    fn a_rolling_update_surges_then_trades_old_for_new_as_they_become_available() {
        let v1 = deployment(
            "nginx:1.14",
            json!({"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
        );
        let v2 = deployment(
            "nginx:1.16",
            json!({"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
        );
        let old = existing(&v1, 1, 3, 3);
        let old_name = old.metadata.name.clone().expect("name");
        let new_name = format!("web-{}", template_hash(&v2));
        // Step 1: one surge replica, nothing removed (no unavailability allowed).
        let p = plan(&v2, &[&old]);
        assert_eq!(p.create.as_ref().map(revision), Some(2));
        assert_eq!(p.scale, [(new_name.clone(), 1)].into());
        // Step 2: the new replica is available: one old one goes.
        let new = existing(&v2, 2, 1, 1);
        assert_eq!(
            plan(&v2, &[&old, &new]).scale,
            [(old_name.clone(), 2)].into()
        );
        // Step 3: room again for the next new replica.
        let old = existing(&v1, 1, 2, 2);
        assert_eq!(
            plan(&v2, &[&old, &new]).scale,
            [(new_name.clone(), 2)].into()
        );
        // Done: old at zero, status complete.
        let old = existing(&v1, 1, 0, 0);
        let new = existing(&v2, 2, 3, 3);
        let p = plan(&v2, &[&old, &new]);
        assert!(p.scale.is_empty() && p.create.is_none());
        assert_eq!(
            (
                p.status.updated_replicas,
                p.status.available_replicas,
                p.status.observed_generation
            ),
            (Some(3), Some(3), Some(2))
        );
        let progressing = p
            .status
            .conditions
            .expect("conditions")
            .into_iter()
            .find(|c| c.type_ == "Progressing")
            .expect("Progressing");
        assert_eq!(
            progressing.reason.as_deref(),
            Some("NewReplicaSetAvailable")
        );
    }

    #[test]
    fn recreate_stops_every_old_pod_before_starting_new_ones() {
        let v1 = deployment("nginx:1.14", json!({"type": "Recreate"}));
        let v2 = deployment("nginx:1.16", json!({"type": "Recreate"}));
        let old = existing(&v1, 1, 3, 3);
        let p = plan(&v2, &[&old]);
        assert_eq!(
            p.scale.get(old.metadata.name.as_deref().unwrap_or("")),
            Some(&0)
        );
        assert_eq!(
            p.scale.get(&format!("web-{}", template_hash(&v2))),
            Some(&0),
            "created at zero"
        );
        let old = existing(&v1, 1, 0, 0);
        let new = existing(&v2, 2, 0, 0);
        assert_eq!(
            plan(&v2, &[&old, &new]).scale,
            [(format!("web-{}", template_hash(&v2)), 3)].into()
        );
    }

    #[test]
    fn old_replica_sets_past_the_history_limit_are_deleted_oldest_first() {
        let current = deployment("nginx:1.0", json!({}));
        let mut sets: Vec<ReplicaSet> = (1..=12)
            .map(|i| {
                let mut rs = existing(&deployment(&format!("nginx:0.{i}"), json!({})), i, 0, 0);
                rs.metadata.name = Some(format!("web-old{i:02}"));
                rs
            })
            .collect();
        sets.push(existing(&current, 13, 3, 3));
        let refs: Vec<&ReplicaSet> = sets.iter().collect();
        assert_eq!(plan(&current, &refs).delete, ["web-old01", "web-old02"]);
    }
}
