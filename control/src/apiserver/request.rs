//! Parsing what a request addresses (resource, namespace, name, subresource) and its query.

use serde::Deserialize;

use crate::api::resources::{self, ResourceInfo};
use crate::api::ApiError;

/// What a resource URL points at.
#[derive(Debug, Clone)]
pub struct Target {
    pub resource: &'static ResourceInfo,
    /// The namespace in the URL (None for cluster-scoped resources and all-namespace lists).
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
    /// A legacy `/watch/` path.
    pub watch_path: bool,
}

/// Where a path under `/api` or `/apis` leads.
#[derive(Debug)]
pub enum Route {
    /// `/api/v1`, `/apis/apps/v1`: the resource list of a group version.
    GroupVersion {
        group: String,
        version: String,
    },
    /// `/apis/apps`: one group.
    Group {
        group: String,
    },
    Resource(Target),
}

/// Parses `/api/v1/...` or `/apis/<group>/<version>/...`.
pub fn route(path: &str) -> Result<Route, ApiError> {
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let not_found = || ApiError::path_not_found(path);
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group] => {
            return Ok(Route::Group {
                group: group.to_string(),
            })
        }
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(not_found()),
    };
    if rest.is_empty() {
        return Ok(Route::GroupVersion {
            group: group.into(),
            version: version.into(),
        });
    }
    let (watch_path, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    let find = |plural: &str| resources::lookup(group, version, plural).ok_or_else(not_found);
    let namespaces = || resources::lookup("", "v1", "namespaces").ok_or_else(not_found);
    let target =
        |resource, namespace: Option<&str>, name: Option<&str>, sub: Option<&str>| Target {
            resource,
            namespace: namespace.map(String::from),
            name: name.map(String::from),
            subresource: sub.map(String::from),
            watch_path,
        };
    let t = match rest {
        // Namespaces themselves and their subresources (only in the core group).
        ["namespaces"] if group.is_empty() => target(namespaces()?, None, None, None),
        ["namespaces", name] if group.is_empty() => target(namespaces()?, None, Some(name), None),
        ["namespaces", name, sub @ ("status" | "finalize")] if group.is_empty() => {
            target(namespaces()?, None, Some(name), Some(sub))
        }
        ["namespaces", ns, plural, tail @ ..] => {
            let resource = find(plural)?;
            if !resource.namespaced {
                return Err(not_found());
            }
            match tail {
                [] => target(resource, Some(ns), None, None),
                [name] => target(resource, Some(ns), Some(name), None),
                [name, sub] => target(resource, Some(ns), Some(name), Some(sub)),
                _ => return Err(not_found()),
            }
        }
        [plural] => target(find(plural)?, None, None, None),
        [plural, name] => {
            let resource = find(plural)?;
            if resource.namespaced {
                return Err(not_found());
            }
            target(resource, None, Some(name), None)
        }
        [plural, name, sub] => {
            let resource = find(plural)?;
            if resource.namespaced {
                return Err(not_found());
            }
            target(resource, None, Some(name), Some(sub))
        }
        _ => return Err(not_found()),
    };
    if let Some(sub) = &t.subresource {
        let streaming = ["exec", "attach", "portforward", "proxy"];
        if t.resource.kind == resources::Kind::Pod && streaming.contains(&sub.as_str()) {
            return Err(ApiError::bad_request(format!(
                "pods/{sub} is not served by kpx (it needs a streaming protocol); in a lab, \
                 `kpx-lab exec POD -- COMMAND` runs a command in a pod"
            )));
        }
        if !t.resource.supports_subresource(sub) {
            return Err(not_found());
        }
    }
    Ok(Route::Resource(t))
}

/// Query parameters kube-apiserver understands (unknown ones are ignored, as there).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Query {
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
    pub limit: Option<String>,
    #[serde(rename = "continue")]
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub watch: Option<String>,
    pub allow_watch_bookmarks: Option<String>,
    pub timeout_seconds: Option<String>,
    pub send_initial_events: Option<String>,
    pub include_object: Option<String>,
    pub dry_run: Option<String>,
    pub grace_period_seconds: Option<String>,
    pub propagation_policy: Option<String>,
}

pub fn parse_query(raw: Option<&str>) -> Result<Query, ApiError> {
    serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
}

pub fn flag(value: &Option<String>) -> bool {
    matches!(value.as_deref(), Some("true") | Some("1") | Some(""))
}

pub fn number<T: std::str::FromStr>(
    value: &Option<String>,
    name: &str,
) -> Result<Option<T>, ApiError> {
    match value.as_deref() {
        None | Some("") => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            ApiError::bad_request(format!("invalid {name}: {v:?} is not a valid number"))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(path: &str) -> Target {
        match route(path).expect(path) {
            Route::Resource(t) => t,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn paths() {
        let t = target("/api/v1/namespaces/default/services/web/status");
        assert_eq!(
            (
                t.resource.plural,
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.subresource.as_deref()
            ),
            ("services", Some("default"), Some("web"), Some("status"))
        );
        let t = target("/apis/discovery.k8s.io/v1/endpointslices");
        assert_eq!(
            (t.resource.plural, t.namespace, t.name),
            ("endpointslices", None, None)
        );
        let t = target("/api/v1/namespaces/kube-system");
        assert_eq!(
            (t.resource.plural, t.name.as_deref()),
            ("namespaces", Some("kube-system"))
        );
        let t = target("/api/v1/watch/namespaces/a/pods");
        assert!(t.watch_path);
        let t = target("/api/v1/nodes/n1/status");
        assert_eq!(t.subresource.as_deref(), Some("status"));
        assert!(route("/api/v1/namespaces/a/nodes").is_err());
        assert!(route("/api/v1/namespaces/a/services/x/binding").is_err());
        assert!(route("/apis/apps/v1/namespaces/a/services").is_err());
    }
}
