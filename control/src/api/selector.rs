//! Label selectors (`app=web,tier in (a,b),!canary`) and field selectors
//! (`metadata.name=x,spec.nodeName!=n1`), parsed and matched like kube-apiserver does.

use serde_json::{Map, Value};

use super::resources::ResourceInfo;
use super::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for term in split_terms(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(term).map_err(|why| {
                ApiError::bad_request(format!(
                    "unable to parse requirement: {why} (in label selector {text:?})"
                ))
            })?);
        }
        Ok(Self(requirements))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let get = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::DoesNotExist(k) => get(k).is_none(),
        })
    }
}

/// Splits on commas that are not inside a `(…)` value set.
fn split_terms(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(valid_key(key.trim())?));
    }
    for (op, build) in [
        (
            "!=",
            Requirement::NotEquals as fn(String, String) -> Requirement,
        ),
        ("==", Requirement::Equals),
        ("=", Requirement::Equals),
    ] {
        if let Some((key, value)) = term.split_once(op) {
            return Ok(build(valid_key(key.trim())?, valid_value(value.trim())?));
        }
    }
    let words: Vec<&str> = term.splitn(2, char::is_whitespace).collect();
    if let [key, rest] = words.as_slice() {
        let rest = rest.trim();
        let (negated, set) = if let Some(set) = rest.strip_prefix("notin") {
            (true, set)
        } else if let Some(set) = rest.strip_prefix("in") {
            (false, set)
        } else {
            return Err(format!(
                "unknown operator in {term:?}: expected one of =, ==, !=, in, notin"
            ));
        };
        let set = set.trim();
        let inner = set
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix(')'))
            .ok_or_else(|| format!("expected a parenthesised value set in {term:?}"))?;
        let values = inner
            .split(',')
            .map(|v| valid_value(v.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        let key = valid_key(key)?;
        return Ok(if negated {
            Requirement::NotIn(key, values)
        } else {
            Requirement::In(key, values)
        });
    }
    Ok(Requirement::Exists(valid_key(term)?))
}

fn valid_key(key: &str) -> Result<String, String> {
    super::validation::names::qualified_name(key)
        .map(|()| key.to_string())
        .map_err(|why| format!("invalid label key {key:?}: {why}"))
}

fn valid_value(value: &str) -> Result<String, String> {
    super::validation::names::label_value(value)
        .map(|()| value.to_string())
        .map_err(|why| format!("invalid label value {value:?}: {why}"))
}

/// A label map as selector text (`app=web,tier=front`), as kubectl and Scale show it.
pub fn format_labels(labels: Option<&Map<String, Value>>) -> String {
    labels
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// A parsed field selector over the fields a resource supports.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(text: &str, resource: &ResourceInfo) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector {text:?}: {term:?} is not of the form field=value or field!=value"
                )));
            };
            let field = field.trim();
            let supported = ["metadata.name", "metadata.namespace"]
                .iter()
                .chain(resource.field_selectors)
                .any(|f| *f == field);
            if !supported {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field} (supported for {}: metadata.name, metadata.namespace{})",
                    resource.plural,
                    resource.field_selectors.iter().map(|f| format!(", {f}")).collect::<String>()
                )));
            }
            terms.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(Self(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `metadata.name=x` alone: lets a list or watch read one key instead of a range.
    pub fn exact_name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|(f, eq, _)| f == "metadata.name" && *eq)
            .map(|(_, _, v)| v.as_str())
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = field_value(obj, field);
            (actual == *value) == *equal
        })
    }
}

/// A field as the selector compares it: a string, `""` when absent.
fn field_value(obj: &Value, field: &str) -> String {
    let pointer = format!("/{}", field.replace('.', "/"));
    match obj.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::resources::{by_kind, Kind};

    fn labels(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn label_selectors_follow_kubernetes_syntax() {
        let l = labels(json!({"app": "web", "tier": "front"}));
        let check = |s: &str| LabelSelector::parse(s).expect(s).matches(Some(&l));
        assert!(check(""));
        assert!(check("app=web"));
        assert!(check("app==web,tier"));
        assert!(check("app in (web, db),!canary"));
        assert!(check("tier notin (back)"));
        assert!(!check("app!=web"));
        assert!(!check("canary"));
        assert!(!check("app in (db)"));
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("-bad=x").is_err());
    }

    #[test]
    fn field_selectors_name_the_unsupported_field() {
        let pods = by_kind(Kind::Pod);
        let s = FieldSelector::parse("spec.nodeName=n1,metadata.name!=x", pods).expect("parse");
        assert!(s.matches(&json!({"metadata": {"name": "a"}, "spec": {"nodeName": "n1"}})));
        assert!(!s.matches(&json!({"metadata": {"name": "a"}, "spec": {}})));
        let err = FieldSelector::parse("spec.bogus=1", pods).expect_err("must be refused");
        assert_eq!(err.code, 400);
        assert!(
            err.message
                .contains("field label not supported: spec.bogus"),
            "{}",
            err.message
        );
    }
}
