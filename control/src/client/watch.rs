//! Reading a watch: newline-delimited `{"type", "object"}` events from a chunked response.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ClientError;

#[derive(Debug, Clone)]
pub enum WatchEvent<K> {
    Added(K),
    Modified(K),
    Deleted(K),
    /// Everything up to this resourceVersion has been sent.
    Bookmark(String),
}

pub struct WatchStream<K> {
    response: reqwest::Response,
    buffer: Vec<u8>,
    url: String,
    _kind: PhantomData<fn() -> K>,
}

impl<K: DeserializeOwned> WatchStream<K> {
    pub(super) fn new(response: reqwest::Response, url: String) -> Self {
        Self {
            response,
            buffer: Vec::new(),
            url,
            _kind: PhantomData,
        }
    }

    /// The next event; `None` when the server ended the watch (timeout), an error when the
    /// connection broke, the server sent an ERROR event, or a line could not be understood.
    pub async fn next(&mut self) -> Option<Result<WatchEvent<K>, ClientError>> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(self.parse(&line));
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) if self.buffer.iter().all(u8::is_ascii_whitespace) => return None,
                Ok(None) => {
                    let rest = std::mem::take(&mut self.buffer);
                    return Some(self.parse(&rest));
                }
                Err(source) => {
                    return Some(Err(ClientError::Http {
                        method: "WATCH".into(),
                        url: self.url.clone(),
                        source,
                    }))
                }
            }
        }
    }

    fn parse(&self, line: &[u8]) -> Result<WatchEvent<K>, ClientError> {
        let bad = |message: String| ClientError::Decode {
            what: format!("watch event from {}", self.url),
            message,
        };
        let event: Value =
            serde_json::from_slice(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no \"type\"".into()))?;
        let object = event
            .get("object")
            .cloned()
            .ok_or_else(|| bad("no \"object\"".into()))?;
        let decode = |object: Value| {
            serde_json::from_value::<K>(object)
                .map_err(|e| bad(format!("{kind} object does not decode: {e}")))
        };
        match kind {
            "ADDED" => decode(object).map(WatchEvent::Added),
            "MODIFIED" => decode(object).map(WatchEvent::Modified),
            "DELETED" => decode(object).map(WatchEvent::Deleted),
            "BOOKMARK" => object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .map(|rv| WatchEvent::Bookmark(rv.to_string()))
                .ok_or_else(|| bad("BOOKMARK without metadata.resourceVersion".into())),
            "ERROR" => Err(ClientError::Api {
                method: "WATCH".into(),
                url: self.url.clone(),
                code: object.get("code").and_then(Value::as_u64).unwrap_or(500) as u16,
                reason: object
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                message: object
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            }),
            other => Err(bad(format!("unknown event type {other:?}"))),
        }
    }
}
