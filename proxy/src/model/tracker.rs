//! Change tracking (kube-proxy's service and endpoints change trackers): the latest Services
//! and EndpointSlices, and which Services changed since the last snapshot. Building the next
//! snapshot recomputes only those, and drops changes that change nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::endpoints::{
    merge, port_endpoints, select_per_family, slice_endpoints, slice_service, Place,
    SliceEndpoints, Uses, ZONE_LABEL,
};
use super::refuse::Protected;
use super::service::{service_key, service_ports, NamespacedName, Skipped};
use super::state::{udp_cleanups, Changes, ProxyState, ServiceEntry};

#[derive(Default)]
pub struct ChangeTracker {
    node_name: String,
    /// This node's `topology.kubernetes.io/zone` label, empty until the Node is seen.
    zone: String,
    /// Addresses no Service may take as an external or load-balancer IP here.
    protected: Protected,
    /// Each Service's ports, parsed once when it arrives (the objects themselves are not kept:
    /// at 10,000 Services they would be most of the proxy's memory).
    services: HashMap<NamespacedName, Vec<super::ServicePort>>,
    /// Slices by their own key: the Service they belong to and their endpoints.
    slices: HashMap<NamespacedName, (NamespacedName, SliceEndpoints)>,
    slices_of: HashMap<NamespacedName, Vec<NamespacedName>>,
    dirty: BTreeSet<NamespacedName>,
    skipped: Vec<Skipped>,
    /// What a re-list has delivered so far, swapped in when it is complete.
    services_listing: Option<HashMap<NamespacedName, Vec<super::ServicePort>>>,
    slices_listing: Option<Vec<(NamespacedName, NamespacedName, SliceEndpoints)>>,
}

fn slice_key(slice: &EndpointSlice) -> Option<NamespacedName> {
    Some(NamespacedName::new(
        slice.metadata.namespace.as_deref()?,
        slice.metadata.name.as_deref()?,
    ))
}

impl ChangeTracker {
    /// `node_name` decides which endpoints are local.
    pub fn new(node_name: &str) -> Self {
        Self::with_protected(node_name, Protected::default())
    }

    /// As `new`, never programming `protected` as an external or load-balancer IP.
    pub fn with_protected(node_name: &str, protected: Protected) -> Self {
        Self {
            node_name: node_name.to_string(),
            protected,
            ..Default::default()
        }
    }

    /// This node's labels changed (its Node object was listed, updated or, with `None`,
    /// deleted). Only the zone matters (kube-proxy's `NodeTopologyConfig` passes on only the
    /// topology labels); a new zone re-selects every Service's endpoints.
    pub fn set_node_labels(&mut self, labels: Option<&BTreeMap<String, String>>) {
        let zone = labels
            .and_then(|l| l.get(ZONE_LABEL))
            .cloned()
            .unwrap_or_default();
        if zone != self.zone {
            self.zone = zone;
            self.dirty.extend(self.services.keys().cloned());
        }
    }

    /// This node's zone as last seen (empty: none).
    pub fn zone(&self) -> &str {
        &self.zone
    }

    pub fn apply_service(&mut self, svc: Service) {
        if let Some(key) = service_key(&svc) {
            let ports: Vec<super::ServicePort> =
                service_ports(&svc, &self.protected, &mut self.skipped)
                    .into_values()
                    .collect();
            self.dirty.insert(key.clone());
            self.services.insert(key, ports);
        }
    }

    pub fn delete_service(&mut self, svc: &Service) {
        if let Some(key) = service_key(svc) {
            self.services.remove(&key);
            self.dirty.insert(key);
        }
    }

    /// Replaces every Service (after a re-list).
    pub fn reset_services(&mut self, services: Vec<Service>) {
        self.begin_services_list();
        for svc in services {
            self.list_service(svc);
        }
        self.finish_services_list();
    }

    /// A re-list of Services starts: objects until `finish_services_list` replace all.
    pub fn begin_services_list(&mut self) {
        self.services_listing = Some(HashMap::new());
    }

    pub fn list_service(&mut self, svc: Service) {
        let Some(key) = service_key(&svc) else { return };
        let ports: Vec<super::ServicePort> =
            service_ports(&svc, &self.protected, &mut self.skipped)
                .into_values()
                .collect();
        self.services_listing
            .get_or_insert_with(HashMap::new)
            .insert(key, ports);
    }

    pub fn finish_services_list(&mut self) {
        let listed = self.services_listing.take().unwrap_or_default();
        // Only what differs is dirty: a re-list that changes nothing re-renders nothing.
        for (key, ports) in &self.services {
            if listed.get(key) != Some(ports) {
                self.dirty.insert(key.clone());
            }
        }
        for key in listed.keys() {
            if !self.services.contains_key(key) {
                self.dirty.insert(key.clone());
            }
        }
        self.services = listed;
    }

    pub fn apply_slice(&mut self, slice: EndpointSlice) {
        let Some(key) = slice_key(&slice) else {
            return;
        };
        self.forget_slice(&key);
        let Some(service) = slice_service(&slice) else {
            return;
        };
        let endpoints = slice_endpoints(&slice, &self.node_name, &mut self.skipped);
        self.insert_slice(key, service, endpoints);
    }

    fn insert_slice(
        &mut self,
        key: NamespacedName,
        service: NamespacedName,
        endpoints: SliceEndpoints,
    ) {
        let of = self.slices_of.entry(service.clone()).or_default();
        if !of.contains(&key) {
            of.push(key.clone());
        }
        self.dirty.insert(service.clone());
        self.slices.insert(key, (service, endpoints));
    }

    pub fn delete_slice(&mut self, slice: &EndpointSlice) {
        if let Some(key) = slice_key(slice) {
            self.forget_slice(&key);
        }
    }

    /// Replaces every EndpointSlice (after a re-list).
    pub fn reset_slices(&mut self, slices: Vec<EndpointSlice>) {
        self.begin_slices_list();
        for slice in slices {
            self.list_slice(slice);
        }
        self.finish_slices_list();
    }

    pub fn begin_slices_list(&mut self) {
        self.slices_listing = Some(Vec::new());
    }

    pub fn list_slice(&mut self, slice: EndpointSlice) {
        let (Some(key), Some(service)) = (slice_key(&slice), slice_service(&slice)) else {
            return;
        };
        let endpoints = slice_endpoints(&slice, &self.node_name, &mut self.skipped);
        self.slices_listing
            .get_or_insert_with(Vec::new)
            .push((key, service, endpoints));
    }

    pub fn finish_slices_list(&mut self) {
        let listed = self.slices_listing.take().unwrap_or_default();
        let old: Vec<NamespacedName> = self.slices.keys().cloned().collect();
        for key in old {
            self.forget_slice(&key);
        }
        for (key, service, endpoints) in listed {
            self.insert_slice(key, service, endpoints);
        }
    }

    fn forget_slice(&mut self, key: &NamespacedName) {
        if let Some((service, _)) = self.slices.remove(key) {
            if let Some(set) = self.slices_of.get_mut(&service) {
                set.retain(|k| k != key);
                if set.is_empty() {
                    self.slices_of.remove(&service);
                }
            }
            self.dirty.insert(service);
        }
    }

    /// Whether anything changed since the last snapshot.
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }

    fn entries_of(
        &mut self,
        service: &NamespacedName,
    ) -> BTreeMap<super::ServicePortName, ServiceEntry> {
        let mut out = BTreeMap::new();
        let Some(ports) = self.services.get(service) else {
            return out;
        };
        let slices: Vec<&SliceEndpoints> = self
            .slices_of
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k).map(|(_, eps)| eps))
            .collect();
        for port in ports.clone() {
            let name = port.name.clone();
            let key = (name.port.clone(), name.protocol);
            let endpoints = merge(slices.iter().filter_map(|s| port_endpoints(s, &key)));
            let place = Place {
                node: &self.node_name,
                zone: &self.zone,
            };
            let selected = select_per_family(&endpoints, Uses::of(&port), place);
            out.insert(
                name,
                ServiceEntry {
                    port,
                    endpoints,
                    selected,
                },
            );
        }
        out
    }

    /// The next snapshot: `previous` with the changed Services recomputed.
    pub fn snapshot(&mut self, previous: &ProxyState) -> (ProxyState, Changes) {
        let mut state = previous.clone();
        let changes = self.advance(&mut state);
        (state, changes)
    }

    /// [`snapshot`](Self::snapshot) in place, for the proxy that keeps only the latest state:
    /// copying a 10,000-Service state (and dropping the old one) every sync cost more than
    /// planning and writing one changed Service.
    pub fn advance(&mut self, state: &mut ProxyState) -> Changes {
        let mut changes = Changes::default();
        let dirty = std::mem::take(&mut self.dirty);
        for service in &dirty {
            let fresh = self.entries_of(service);
            let stale: Vec<_> = state
                .entries
                .range(
                    super::ServicePortName {
                        service: service.clone(),
                        port: String::new(),
                        protocol: super::Protocol::Tcp,
                    }..,
                )
                .take_while(|(k, _)| &k.service == service)
                .map(|(k, _)| k.clone())
                .filter(|k| !fresh.contains_key(k))
                .collect();
            for name in stale {
                if let Some(old) = state.entries.remove(&name) {
                    udp_cleanups(Some(&old), None, &mut changes.conntrack);
                    changes.removed.insert(name, old);
                }
            }
            for (name, entry) in fresh {
                let old = state.entries.get(&name);
                if old.is_some_and(|o| **o == entry) {
                    continue;
                }
                udp_cleanups(
                    old.map(|o| o.as_ref()),
                    Some(&entry),
                    &mut changes.conntrack,
                );
                changes.changed.insert(name.clone());
                state.entries.insert(name, Arc::new(entry));
            }
        }
        changes.skipped = std::mem::take(&mut self.skipped);
        changes
    }
}

#[cfg(test)]
mod refuse_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod topology_tests;
