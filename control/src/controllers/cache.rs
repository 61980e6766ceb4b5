//! A controller's cache of one kind, fed by a reflector, and object keys.

use std::collections::BTreeMap;

use crate::client::{Object, ReflectorEvent};

/// `(namespace, name)`; the namespace is empty for cluster-scoped objects.
pub type Key = (String, String);

pub fn key_of<K: Object>(obj: &K) -> Key {
    let meta = obj.metadata();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// A cache kept by one reflector, and whether its first list is in.
pub struct Cache<K> {
    pub objects: BTreeMap<Key, K>,
    pub synced: bool,
    listing: BTreeMap<Key, K>,
}

impl<K: Object + Clone> Cache<K> {
    pub fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            synced: false,
            listing: BTreeMap::new(),
        }
    }

    /// Applies an event; returns the objects it changed (old and new versions).
    pub fn apply(&mut self, event: ReflectorEvent<K>) -> Vec<K> {
        match event {
            ReflectorEvent::Init => {
                self.listing.clear();
                Vec::new()
            }
            ReflectorEvent::InitApply(obj) => {
                self.listing.insert(key_of(&obj), obj);
                Vec::new()
            }
            ReflectorEvent::InitDone => {
                let old = std::mem::take(&mut self.objects);
                self.objects = std::mem::take(&mut self.listing);
                self.synced = true;
                old.into_values()
                    .chain(self.objects.values().cloned())
                    .collect()
            }
            ReflectorEvent::Apply(obj) => {
                let old = self.objects.insert(key_of(&obj), obj.clone());
                old.into_iter().chain([obj]).collect()
            }
            ReflectorEvent::Delete(obj) => {
                self.objects.remove(&key_of(&obj));
                vec![obj]
            }
        }
    }
}

impl<K: Object + Clone> Default for Cache<K> {
    fn default() -> Self {
        Self::new()
    }
}
