//! Parsing what a request addresses (resource, namespace, name, subresource) and its query.

use serde::Deserialize;

use crate::api::resources::{self, ResourceInfo};
use crate::api::status::FieldReason;
use crate::api::{ApiError, FieldError};

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
    /// PatchOptions.force (server-side apply only).
    pub force: Option<String>,
}

/// Parses the query; boolean parameters come out as `"true"` or `"false"` (see
/// [`crate::api::query::parse_bool`]), so every reader — [`flag`], or a comparison with
/// `"true"` — agrees with kube-apiserver.
pub fn parse_query(raw: Option<&str>) -> Result<Query, ApiError> {
    let mut query: Query = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    for value in [
        &mut query.watch,
        &mut query.allow_watch_bookmarks,
        &mut query.send_initial_events,
        &mut query.force,
    ] {
        normalize_bool(value);
    }
    Ok(query)
}

// Boolean parameters: one conversion for the API server and the kubelet API.
pub use crate::api::query::{flag, normalize_bool};

/// The options object kube-apiserver decodes a write's query into; it names the object in the
/// 422 for a bad `dryRun` (`CreateOptions.meta.k8s.io "" is invalid: dryRun: ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOptions {
    Create,
    Update,
    Patch,
    /// A server-side apply patch: `force` is allowed (kpx then refuses the patch type, 415).
    ApplyPatch,
    Delete,
}

impl WriteOptions {
    fn kind(self) -> &'static str {
        match self {
            WriteOptions::Create => "CreateOptions",
            WriteOptions::Update => "UpdateOptions",
            WriteOptions::Patch | WriteOptions::ApplyPatch => "PatchOptions",
            WriteOptions::Delete => "DeleteOptions",
        }
    }
}

/// Validates a write's options before anything is read or written, as kube-apiserver's
/// handlers do (`k8s.io/apimachinery/pkg/apis/meta/v1/validation`: `ValidateDryRun` — only
/// `All` — through `ValidateCreateOptions`/`ValidateUpdateOptions`/`ValidatePatchOptions`/
/// `ValidateDeleteOptions`, and `force` only on apply patches, which kpx does not serve).
/// Returns whether the write is a dry run. A refusal is kube's 422 on the options object.
pub fn validate_write_options(query: &Query, options: WriteOptions) -> Result<bool, ApiError> {
    let mut causes = Vec::new();
    if let Some(value) = &query.dry_run {
        if value != "All" {
            // field.NotSupported(dryRun, []string{...}) renders the value with Go's %#v.
            causes.push(FieldError {
                field: "dryRun".into(),
                reason: FieldReason::NotSupported,
                value: format!("[]string{{{value:?}}}"),
                detail: "supported values: \"All\"".into(),
            });
        }
    }
    if options == WriteOptions::Patch && query.force.is_some() {
        causes.push(FieldError::forbidden(
            "force",
            "may not be specified for non-apply patch",
        ));
    }
    if causes.is_empty() {
        return Ok(query.dry_run.is_some());
    }
    let kind = options.kind();
    let mut err = ApiError::invalid("meta.k8s.io", kind, "", causes);
    // kube qualifies the kind with its group in the message: `CreateOptions.meta.k8s.io ""`.
    err.message = err
        .message
        .replacen(kind, &format!("{kind}.meta.k8s.io"), 1);
    Err(err)
}

/// A non-empty, non-"0" `resourceVersion` query value as a store revision. kube-apiserver
/// parses it with `strconv.ParseUint` (`APIObjectVersioner.ParseResourceVersion` in
/// `staging/src/k8s.io/apiserver/pkg/storage/etcd3`) and answers anything else — `-1`, `+5`,
/// `abc` — with a 400 "invalid resource version"; a revision past i64 is no revision either.
pub fn parse_resource_version(value: &str) -> Result<i64, ApiError> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(rv) = value.parse::<i64>() {
            return Ok(rv);
        }
    }
    Err(ApiError::bad_request(format!(
        "invalid resource version: {value:?}: allowed: a non-negative integer"
    )))
}

/// kube-apiserver's `ValidateListOptions`
/// (`staging/src/k8s.io/apimachinery/pkg/apis/meta/internalversion/validation/validation.go`,
/// with the WatchList feature on: kpx serves `sendInitialEvents`): a list may not ask for
/// initial events, a `resourceVersionMatch` needs a `resourceVersion` and no `continue`, and a
/// watch takes `sendInitialEvents` only with `resourceVersionMatch=NotOlderThan` (and that
/// match only with it). A refusal is kube's 422 on `ListOptions.meta.k8s.io ""`.
pub fn validate_list_options(query: &Query, watch: bool) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    let rv_match = query.resource_version_match.as_deref().unwrap_or("");
    let has_continue = query
        .continue_token
        .as_deref()
        .is_some_and(|c| !c.is_empty());
    if watch {
        if query.send_initial_events.is_some() && rv_match != "NotOlderThan" {
            causes.push(FieldError::forbidden(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        if !rv_match.is_empty() {
            if query.send_initial_events.is_none() {
                causes.push(FieldError::forbidden(
                    "resourceVersionMatch",
                    "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
                ));
            }
            if rv_match != "NotOlderThan" {
                causes.push(FieldError::not_supported(
                    "resourceVersionMatch",
                    rv_match,
                    &["NotOlderThan"],
                ));
            }
            if has_continue {
                causes.push(FieldError::forbidden(
                    "resourceVersionMatch",
                    "resourceVersionMatch is forbidden when continue is provided",
                ));
            }
        }
    } else {
        if !rv_match.is_empty() {
            let rv = query.resource_version.as_deref().unwrap_or("");
            if rv.is_empty() {
                causes.push(FieldError::forbidden(
                    "resourceVersionMatch",
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
            if has_continue {
                causes.push(FieldError::forbidden(
                    "resourceVersionMatch",
                    "resourceVersionMatch is forbidden when continue is provided",
                ));
            }
            if rv_match != "Exact" && rv_match != "NotOlderThan" {
                causes.push(FieldError::not_supported(
                    "resourceVersionMatch",
                    rv_match,
                    &["Exact", "NotOlderThan", ""],
                ));
            }
            if rv_match == "Exact" && rv == "0" {
                causes.push(FieldError::forbidden(
                    "resourceVersionMatch",
                    "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                ));
            }
        }
        if query.send_initial_events.is_some() {
            causes.push(FieldError::forbidden(
                "sendInitialEvents",
                "sendInitialEvents is forbidden for list",
            ));
        }
    }
    if causes.is_empty() {
        return Ok(());
    }
    let mut err = ApiError::invalid("meta.k8s.io", "ListOptions", "", causes);
    err.message = err
        .message
        .replacen("ListOptions", "ListOptions.meta.k8s.io", 1);
    Err(err)
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
    use crate::api::query::parse_bool;

    #[test]
    fn booleans_as_kube_converts_them() {
        let table: &[(&str, bool)] = &[
            ("true", true),
            ("True", true),
            ("TRUE", true),
            ("t", true),
            ("T", true),
            ("1", true),
            ("yes", true),
            ("", true),
            ("false", false),
            ("False", false),
            ("FALSE", false),
            ("fAlSe", false),
            ("0", false),
            // Not strconv.ParseBool: "f" and "F" are true for kube's query conversion.
            ("f", true),
            ("F", true),
            ("00", true),
        ];
        for (value, want) in table {
            assert_eq!(parse_bool(value), *want, "{value:?}");
        }
        let q = parse_query(Some(
            "watch=True&allowWatchBookmarks=1&sendInitialEvents=FALSE",
        ))
        .expect("query");
        assert!(flag(&q.watch));
        assert!(flag(&q.allow_watch_bookmarks));
        assert_eq!(q.send_initial_events.as_deref(), Some("false"));
        assert!(!flag(&parse_query(Some("watch=0")).expect("query").watch));
        assert!(!flag(&parse_query(None).expect("query").watch));
    }

    #[test]
    fn dry_run_only_all() {
        let q = |raw| parse_query(Some(raw)).expect("query");
        assert_eq!(
            validate_write_options(&q("dryRun=All"), WriteOptions::Create).ok(),
            Some(true)
        );
        assert_eq!(
            validate_write_options(&q(""), WriteOptions::Delete).ok(),
            Some(false)
        );
        let err = validate_write_options(&q("dryRun=all"), WriteOptions::Create)
            .expect_err("all is not All");
        assert_eq!((err.code, err.reason), (422, "Invalid"));
        assert_eq!(
            err.message,
            r#"CreateOptions.meta.k8s.io "" is invalid: dryRun: Unsupported value: []string{"all"}: supported values: "All""#
        );
        assert_eq!(err.details.causes[0].field, "dryRun");
        let err = validate_write_options(&q("force=true"), WriteOptions::Patch)
            .expect_err("force on a non-apply patch");
        assert!(
            err.message.starts_with("PatchOptions.meta.k8s.io"),
            "{}",
            err.message
        );
    }

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
