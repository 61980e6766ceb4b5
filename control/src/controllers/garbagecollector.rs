//! The garbage collector's decision (kube-controller-manager's garbagecollector): objects whose
//! owners are all gone are deleted (background cascading deletion); owner references to gone
//! owners are dropped while another owner remains; an owner deleted with `propagationPolicy:
//! Orphan` first has its dependents let go, one with `Foreground` first has them deleted, and
//! then loses the finalizer that held it. Pure: the loop verifies an owner's absence with the
//! API before deleting anything.

use std::collections::{BTreeMap, BTreeSet};

pub const ORPHAN: &str = "orphan";
pub const FOREGROUND: &str = "foregroundDeletion";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerRef {
    pub uid: String,
    pub kind: String,
    pub name: String,
}

/// What the collector needs of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub owners: Vec<OwnerRef>,
    pub deleting: bool,
    pub finalizers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Every owner is gone (each to be confirmed with the API first).
    Delete { item: Item, owners: Vec<OwnerRef> },
    /// Keep the object, without these owner references (gone, or orphaning it).
    DropOwners { item: Item, uids: BTreeSet<String> },
    /// An owner deleted in the foreground: its dependents go first.
    DeleteDependent { item: Item },
    /// Every dependent is let go of (or gone): the owner may go.
    RemoveFinalizer { item: Item, finalizer: &'static str },
}

/// The actions for one pass over everything the collector watches. `watched` are the kinds it
/// sees: an owner of another kind is never taken for gone.
pub fn decide(items: &[Item], watched: &[&str]) -> Vec<Action> {
    let live: BTreeMap<&str, &Item> = items.iter().map(|i| (i.uid.as_str(), i)).collect();
    let mut referenced: BTreeSet<&str> = BTreeSet::new();
    let mut actions = Vec::new();
    for item in items {
        if item.owners.is_empty() {
            continue;
        }
        let mut gone = Vec::new();
        let mut drop = BTreeSet::new();
        let mut foreground = false;
        for owner in &item.owners {
            match live.get(owner.uid.as_str()) {
                Some(o) => {
                    referenced.insert(o.uid.as_str());
                    if o.deleting && o.finalizers.iter().any(|f| f == ORPHAN) {
                        drop.insert(owner.uid.clone());
                    } else if o.deleting && o.finalizers.iter().any(|f| f == FOREGROUND) {
                        foreground = true;
                    }
                }
                None if watched.contains(&owner.kind.as_str()) => {
                    gone.push(owner.clone());
                    drop.insert(owner.uid.clone());
                }
                None => {}
            }
        }
        if !gone.is_empty() && gone.len() == item.owners.len() {
            if !item.deleting {
                actions.push(Action::Delete {
                    item: item.clone(),
                    owners: gone,
                });
            }
        } else if foreground && !item.deleting {
            actions.push(Action::DeleteDependent { item: item.clone() });
        } else if !drop.is_empty() {
            actions.push(Action::DropOwners {
                item: item.clone(),
                uids: drop,
            });
        }
    }
    for item in items.iter().filter(|i| i.deleting) {
        if referenced.contains(item.uid.as_str()) {
            continue;
        }
        for finalizer in [ORPHAN, FOREGROUND] {
            if item.finalizers.iter().any(|f| f == finalizer) {
                actions.push(Action::RemoveFinalizer {
                    item: item.clone(),
                    finalizer,
                });
            }
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    const WATCHED: &[&str] = &["Deployment", "ReplicaSet", "Pod"];

    fn item(kind: &str, name: &str, owners: &[(&str, &str)]) -> Item {
        Item {
            kind: kind.into(),
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            owners: owners
                .iter()
                .map(|(kind, name)| OwnerRef {
                    uid: format!("uid-{name}"),
                    kind: kind.to_string(),
                    name: name.to_string(),
                })
                .collect(),
            deleting: false,
            finalizers: vec![],
        }
    }

    fn deleting(mut i: Item, finalizer: &str) -> Item {
        i.deleting = true;
        i.finalizers = vec![finalizer.into()];
        i
    }

    #[test]
    fn dependents_of_a_gone_owner_are_deleted() {
        let items = [
            item("ReplicaSet", "rs", &[("Deployment", "web")]),
            item("Pod", "p1", &[("ReplicaSet", "rs")]),
        ];
        let actions = decide(&items, WATCHED);
        assert_eq!(actions.len(), 1);
        assert!(
            matches!(&actions[0], Action::Delete { item, owners } if item.name == "rs" && owners[0].name == "web")
        );
    }

    #[test]
    fn an_owner_of_an_unwatched_kind_is_never_taken_for_gone() {
        let items = [item("Pod", "p", &[("StatefulSet", "db")])];
        assert!(decide(&items, WATCHED).is_empty());
    }

    #[test]
    fn a_gone_owner_beside_a_live_one_is_dropped() {
        let items = [
            item("ReplicaSet", "rs", &[]),
            item("Pod", "p", &[("ReplicaSet", "rs"), ("ReplicaSet", "old")]),
        ];
        let actions = decide(&items, WATCHED);
        assert_eq!(actions.len(), 1);
        assert!(
            matches!(&actions[0], Action::DropOwners { item, uids } if item.name == "p" && uids.contains("uid-old") && uids.len() == 1)
        );
    }

    #[test]
    fn orphaning_lets_dependents_go_then_the_owner() {
        let rs = deleting(item("ReplicaSet", "rs", &[]), ORPHAN);
        let pod = item("Pod", "p", &[("ReplicaSet", "rs")]);
        let actions = decide(&[rs.clone(), pod.clone()], WATCHED);
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert!(matches!(&actions[0], Action::DropOwners { item, .. } if item.name == "p"));
        let free = Item {
            owners: vec![],
            ..pod
        };
        let actions = decide(&[rs, free], WATCHED);
        assert!(
            matches!(&actions[..], [Action::RemoveFinalizer { item, finalizer }] if item.name == "rs" && *finalizer == ORPHAN)
        );
    }

    #[test]
    fn foreground_deletes_dependents_first() {
        let web = deleting(item("Deployment", "web", &[]), FOREGROUND);
        let rs = item("ReplicaSet", "rs", &[("Deployment", "web")]);
        let actions = decide(&[web.clone(), rs.clone()], WATCHED);
        assert!(matches!(&actions[..], [Action::DeleteDependent { item }] if item.name == "rs"));
        // While the dependent terminates, the owner waits.
        let going = Item {
            deleting: true,
            ..rs
        };
        assert!(decide(&[web.clone(), going], WATCHED).is_empty());
        assert!(matches!(
            &decide(&[web], WATCHED)[..],
            [Action::RemoveFinalizer { finalizer, .. }] if *finalizer == FOREGROUND
        ));
    }
}
