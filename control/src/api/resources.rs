//! The resources kpx-control serves, as data: one row per kind.

/// Every kind the API serves; behaviour that differs per kind matches on this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Namespace,
    Service,
    Endpoints,
    EndpointSlice,
    Pod,
    Node,
    ReplicationController,
    ReplicaSet,
    Deployment,
    Event,
}

#[derive(Debug)]
pub struct ResourceInfo {
    pub kind: Kind,
    pub group: &'static str,
    pub version: &'static str,
    pub kind_name: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
    /// Subresources served besides the object itself.
    pub subresources: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Whether `status` is a subresource: PUT/PATCH on the object keep the stored status, and
    /// PUT/PATCH on `/status` change only the status.
    pub has_status: bool,
    /// Whether the object has a `spec` whose changes bump `metadata.generation`.
    pub has_spec: bool,
    /// Extra field selectors besides `metadata.name` and `metadata.namespace`.
    pub field_selectors: &'static [&'static str],
}

impl ResourceInfo {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind_name)
    }

    /// The store key prefix of every object of this resource: `/registry/<plural>/`, so that
    /// `etcdctl get /registry/services/default/web` reads a Service.
    pub fn key_prefix(&self) -> String {
        format!("/registry/{}/", self.plural)
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("{}{ns}/{name}", self.key_prefix()),
            _ => format!("{}{name}", self.key_prefix()),
        }
    }

    /// The prefix of one namespace's objects, or of all of them.
    pub fn namespace_prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("{}{ns}/", self.key_prefix()),
            _ => self.key_prefix(),
        }
    }

    pub fn supports_subresource(&self, sub: &str) -> bool {
        self.subresources.contains(&sub)
    }
}

const ALL: &[&str] = &["all"];

pub static RESOURCES: &[ResourceInfo] = &[
    ResourceInfo {
        kind: Kind::Namespace,
        group: "",
        version: "v1",
        kind_name: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        short_names: &["ns"],
        namespaced: false,
        subresources: &["status"],
        categories: &[],
        has_status: true,
        has_spec: false,
        field_selectors: &["status.phase"],
    },
    ResourceInfo {
        kind: Kind::Service,
        group: "",
        version: "v1",
        kind_name: "Service",
        plural: "services",
        singular: "service",
        short_names: &["svc"],
        namespaced: true,
        subresources: &["status"],
        categories: ALL,
        has_status: true,
        has_spec: false,
        field_selectors: &["spec.clusterIP", "spec.type"],
    },
    ResourceInfo {
        kind: Kind::Endpoints,
        group: "",
        version: "v1",
        kind_name: "Endpoints",
        plural: "endpoints",
        singular: "endpoints",
        short_names: &["ep"],
        namespaced: true,
        subresources: &[],
        categories: &[],
        has_status: false,
        has_spec: false,
        field_selectors: &[],
    },
    ResourceInfo {
        kind: Kind::EndpointSlice,
        group: "discovery.k8s.io",
        version: "v1",
        kind_name: "EndpointSlice",
        plural: "endpointslices",
        singular: "endpointslice",
        short_names: &[],
        namespaced: true,
        subresources: &[],
        categories: &[],
        has_status: false,
        has_spec: false,
        field_selectors: &["addressType"],
    },
    ResourceInfo {
        kind: Kind::Pod,
        group: "",
        version: "v1",
        kind_name: "Pod",
        plural: "pods",
        singular: "pod",
        short_names: &["po"],
        namespaced: true,
        subresources: &["status", "binding", "log"],
        categories: ALL,
        has_status: true,
        has_spec: false,
        field_selectors: &[
            "spec.nodeName",
            "spec.schedulerName",
            "status.phase",
            "status.podIP",
            "spec.serviceAccountName",
            "spec.restartPolicy",
        ],
    },
    ResourceInfo {
        kind: Kind::Node,
        group: "",
        version: "v1",
        kind_name: "Node",
        plural: "nodes",
        singular: "node",
        short_names: &["no"],
        namespaced: false,
        subresources: &["status"],
        categories: &[],
        has_status: true,
        has_spec: false,
        field_selectors: &["spec.unschedulable"],
    },
    ResourceInfo {
        kind: Kind::ReplicationController,
        group: "",
        version: "v1",
        kind_name: "ReplicationController",
        plural: "replicationcontrollers",
        singular: "replicationcontroller",
        short_names: &["rc"],
        namespaced: true,
        subresources: &["status", "scale"],
        categories: ALL,
        has_status: true,
        has_spec: true,
        field_selectors: &["status.replicas"],
    },
    ResourceInfo {
        kind: Kind::ReplicaSet,
        group: "apps",
        version: "v1",
        kind_name: "ReplicaSet",
        plural: "replicasets",
        singular: "replicaset",
        short_names: &["rs"],
        namespaced: true,
        subresources: &["status", "scale"],
        categories: ALL,
        has_status: true,
        has_spec: true,
        field_selectors: &["status.replicas"],
    },
    ResourceInfo {
        kind: Kind::Deployment,
        group: "apps",
        version: "v1",
        kind_name: "Deployment",
        plural: "deployments",
        singular: "deployment",
        short_names: &["deploy"],
        namespaced: true,
        subresources: &["status", "scale"],
        categories: ALL,
        has_status: true,
        has_spec: true,
        field_selectors: &[],
    },
    ResourceInfo {
        kind: Kind::Event,
        group: "",
        version: "v1",
        kind_name: "Event",
        plural: "events",
        singular: "event",
        short_names: &["ev"],
        namespaced: true,
        subresources: &[],
        categories: &[],
        has_status: false,
        has_spec: false,
        field_selectors: &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "type",
        ],
    },
];

pub fn by_kind(kind: Kind) -> &'static ResourceInfo {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind)
        .unwrap_or(&RESOURCES[0])
}

/// The resource served at `/api/v1/<plural>` or `/apis/<group>/<version>/<plural>`.
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The API groups served, in discovery order (the legacy core group is not among them).
pub fn groups() -> Vec<&'static str> {
    let mut groups: Vec<&'static str> = Vec::new();
    for r in RESOURCES {
        if !r.group.is_empty() && !groups.contains(&r.group) {
            groups.push(r.group);
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_registry_plural_namespace_name() {
        let svc = by_kind(Kind::Service);
        assert_eq!(
            svc.key(Some("default"), "web"),
            "/registry/services/default/web"
        );
        assert_eq!(by_kind(Kind::Node).key(None, "n1"), "/registry/nodes/n1");
        assert_eq!(
            by_kind(Kind::EndpointSlice).key(Some("a"), "b"),
            "/registry/endpointslices/a/b"
        );
    }
}
