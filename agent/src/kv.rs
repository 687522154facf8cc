//! The agent's whole NATS footprint (docs/adr/0002-kv-layout-and-republish-watch.md):
//! direct gets of its own keys, compare-and-swap publishes to its own keys,
//! and (in [`crate::agent`]) one subscription to its RePublish subject. No
//! stream info, no consumers, no bucket management — so a per-device user
//! can be confined to exactly these subjects.

use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream::DirectGetErrorKind};
use bytes::Bytes;
use manifest_types::{AgentId, BucketName, keys};
use tokio::sync::watch;

/// One value read from the bucket.
#[derive(Debug, Clone, PartialEq)]
pub enum KvValue {
    Value {
        revision: u64,
        bytes: Bytes,
    },
    /// A DEL or PURGE marker.
    Deleted {
        revision: u64,
    },
}

impl KvValue {
    pub fn revision(&self) -> u64 {
        match self {
            Self::Value { revision, .. } | Self::Deleted { revision } => *revision,
        }
    }

    /// Builds a value from message headers (RePublish and direct get carry
    /// the same ones), read by the one operation parser in `flotilla_nats`.
    pub fn from_parts(revision: u64, headers: Option<&HeaderMap>, payload: Bytes) -> Self {
        match flotilla_nats::family::operation(headers) {
            async_nats::jetstream::kv::Operation::Put => Self::Value {
                revision,
                bytes: payload,
            },
            _ => Self::Deleted { revision },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("compare-and-swap lost: {key} is no longer at the expected revision")]
    Conflict { key: String },
    #[error("NATS request for {key} failed: {message}")]
    Nats { key: String, message: String },
}

/// Typed access to the agent's own keys.
#[derive(Debug, Clone)]
pub struct AgentKv {
    js: jetstream::Context,
    bucket: BucketName,
    agent: AgentId,
    /// Whether the fleet's JetStream answered the last request (of any
    /// [`AgentKv`] sharing it): a connection to a NATS server is not enough
    /// — behind a leaf node whose uplink is down, or on a server without
    /// JetStream for the account, every request fails.
    answers: Arc<watch::Sender<bool>>,
}

impl AgentKv {
    pub fn new(client: async_nats::Client, bucket: BucketName, agent: AgentId) -> Self {
        Self {
            js: jetstream::new(client),
            bucket,
            agent,
            answers: Arc::new(watch::Sender::new(true)),
        }
    }

    /// The same agent's keys in `bucket` (the heartbeat bucket), sharing the
    /// connection and what is known of JetStream's answers.
    pub fn beside(&self, bucket: BucketName) -> Self {
        Self {
            bucket,
            ..self.clone()
        }
    }

    /// Follows whether JetStream answers: false after a request failed for
    /// want of an answer, true again after one succeeded.
    pub fn answers(&self) -> watch::Receiver<bool> {
        self.answers.subscribe()
    }

    /// Records how a request went (a conflict is an answer).
    fn answered<T>(&self, result: Result<T, KvError>) -> Result<T, KvError> {
        let answered = !matches!(result, Err(KvError::Nats { .. }));
        self.answers
            .send_if_modified(|a| std::mem::replace(a, answered) != answered);
        result
    }

    pub fn agent(&self) -> &AgentId {
        &self.agent
    }

    pub fn bucket(&self) -> &BucketName {
        &self.bucket
    }

    /// Direct get of the last value of `key`; `None` if it never existed (or
    /// was purged without a marker).
    pub async fn get(&self, key: &str) -> Result<Option<KvValue>, KvError> {
        let got = self.get_once(key).await;
        self.answered(got)
    }

    async fn get_once(&self, key: &str) -> Result<Option<KvValue>, KvError> {
        let stream = self
            .js
            .get_stream_no_info(keys::stream_name(&self.bucket))
            .await
            .map_err(|e| nats_err(key, e))?;
        match stream
            .direct_get_last_for_subject(keys::kv_subject(&self.bucket, key))
            .await
        {
            Ok(msg) => Ok(Some(KvValue::from_parts(
                msg.sequence,
                Some(&msg.headers),
                msg.payload,
            ))),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(nats_err(key, e)),
        }
    }

    /// Writes `value` to `key` only if the key is still at `expected`
    /// (0: the key must not exist). Returns the new revision.
    pub async fn write_if(&self, key: &str, value: Bytes, expected: u64) -> Result<u64, KvError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        self.publish(key, value, headers).await
    }

    /// Unconditional write (heartbeats, inventory).
    pub async fn put(&self, key: &str, value: Bytes) -> Result<u64, KvError> {
        self.publish(key, value, HeaderMap::new()).await
    }

    async fn publish(&self, key: &str, value: Bytes, headers: HeaderMap) -> Result<u64, KvError> {
        let published = self.publish_once(key, value, headers).await;
        self.answered(published)
    }

    async fn publish_once(
        &self,
        key: &str,
        value: Bytes,
        headers: HeaderMap,
    ) -> Result<u64, KvError> {
        let ack = self
            .js
            .publish_with_headers(keys::kv_subject(&self.bucket, key), headers, value)
            .await
            .map_err(|e| nats_err(key, e))?;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(KvError::Conflict {
                key: key.to_owned(),
            }),
            Err(e) => Err(nats_err(key, e)),
        }
    }
}

fn nats_err(key: &str, e: impl std::fmt::Display) -> KvError {
    KvError::Nats {
        key: key.to_owned(),
        message: e.to_string(),
    }
}
