//! Objects between the store and the wire. Stored values never hold `resourceVersion`; it is
//! the key's modification revision, added on the way out.

use bytes::Bytes;
use serde_json::Value;

use crate::api::{meta, ApiError};
use crate::store::KeyValue;

/// The stored form: compact JSON without the server-only metadata fields.
pub fn encode(obj: &Value) -> Result<Bytes, ApiError> {
    let mut copy = obj.clone();
    meta::strip_server_fields(meta::metadata_mut(&mut copy));
    serde_json::to_vec(&copy)
        .map(Bytes::from)
        .map_err(|e| ApiError::internal(format!("encoding object: {e}")))
}

/// The object as clients see it, with `resourceVersion` set to `revision`.
pub fn decode_at(value: &[u8], revision: i64) -> Result<Value, ApiError> {
    let mut obj: Value = serde_json::from_slice(value)
        .map_err(|e| ApiError::internal(format!("stored object is not valid JSON: {e}")))?;
    meta::set_resource_version(&mut obj, revision);
    Ok(obj)
}

pub fn decode(kv: &KeyValue) -> Result<Value, ApiError> {
    decode_at(&kv.value, kv.mod_revision)
}

/// Writes the stored bytes with `"resourceVersion"` spliced into `metadata`, without parsing:
/// LIST of thousands of objects is mostly this copy. Stored values are written by `encode`, whose
/// top-level keys before `metadata` are `apiVersion` and `kind`, so the first `"metadata":{` is
/// the object's own.
pub fn write_with_revision(out: &mut Vec<u8>, value: &[u8], revision: i64) -> Result<(), ApiError> {
    const NEEDLE: &[u8] = b"\"metadata\":{";
    match find(value, NEEDLE) {
        Some(at) => {
            let split = at + NEEDLE.len();
            out.extend_from_slice(&value[..split]);
            out.extend_from_slice(b"\"resourceVersion\":\"");
            out.extend_from_slice(revision.to_string().as_bytes());
            out.extend_from_slice(b"\"");
            if value.get(split) != Some(&b'}') {
                out.push(b',');
            }
            out.extend_from_slice(&value[split..]);
            Ok(())
        }
        None => {
            let obj = decode_at(value, revision)?;
            serde_json::to_writer(&mut *out, &obj).map_err(|e| ApiError::internal(e.to_string()))
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn splicing_the_revision_matches_decoding() {
        for obj in [
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "labels": {"x": "\"metadata\":{"}}, "spec": {}}),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {}}),
        ] {
            let stored = encode(&obj).expect("encode");
            let mut out = Vec::new();
            write_with_revision(&mut out, &stored, 42).expect("write");
            let spliced: Value = serde_json::from_slice(&out).expect("valid JSON");
            assert_eq!(spliced, decode_at(&stored, 42).expect("decode"));
            assert_eq!(spliced["metadata"]["resourceVersion"], "42");
        }
    }
}
