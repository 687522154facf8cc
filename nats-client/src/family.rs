//! Reading many keys at once: the current value of every key of one or more
//! families (`actual-state.>`, …), or of a set of named keys, through **one**
//! ordered consumer with `DeliverPolicy::LastPerSubject` — a single request
//! to create it, then the values stream in batches. Never one request per
//! key: 10,000 agents' statuses arrive in a fraction of a second
//! (docs/BENCHMARKS.md, `flotilla-bench-read`).
//!
//! Each entry keeps its revision (stream sequence) and server timestamp; the
//! [`Snapshot`] also carries the server's clock at the time of the read (the
//! consumer's creation time, stamped by the server), so ages are server time
//! minus server time and never depend on the reader's clock.
//!
//! Deleted and purged keys are left out. The consumer is ephemeral (the
//! server removes it when the read is done or abandoned); it needs
//! `$JS.API.CONSUMER.CREATE.KV_<bucket>` permission, which operators and the
//! control plane have and devices do not.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::kv::{self, Operation, Store};
use futures::StreamExt;

/// How long a read waits for the next value before giving up.
pub const READ_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {what} from bucket {bucket}")]
    Nats {
        bucket: String,
        what: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("reading {what} from bucket {bucket} stalled: no value for {READ_IDLE_TIMEOUT:?}")]
    Stalled { bucket: String, what: String },
}

/// The live entries read, by key, and the server's clock at the read.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub entries: BTreeMap<String, kv::Entry>,
    /// Server time when the read started (consumer creation time).
    pub server_time: SystemTime,
}

impl Snapshot {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, key: &str) -> Option<&kv::Entry> {
        self.entries.get(key)
    }

    /// Every key of one family, as `(id, entry)` with the id after the dot.
    pub fn family<'a>(&'a self, family: &'a str) -> impl Iterator<Item = (&'a str, &'a kv::Entry)> {
        self.entries.iter().filter_map(move |(k, e)| {
            k.split_once('.')
                .filter(|(f, _)| *f == family)
                .map(|(_, id)| (id, e))
        })
    }

    /// Both reads in one snapshot (their keys are disjoint: two buckets),
    /// on the later server clock, so no age looks younger than it is.
    pub fn merge(mut self, other: Snapshot) -> Snapshot {
        self.entries.extend(other.entries);
        self.server_time = self.server_time.max(other.server_time);
        self
    }

    /// How long ago (server time) `entry` was written; zero if the entry is
    /// stamped after the read started.
    pub fn age(&self, entry: &kv::Entry) -> Duration {
        self.server_time
            .duration_since(SystemTime::from(entry.created))
            .unwrap_or_default()
    }
}

/// The current value of every key of one family (`actual-state`, …).
///
/// # Errors
/// See [`read_keys`].
pub async fn read_family(store: &Store, family: &str) -> Result<Snapshot, ReadError> {
    read_families(store, &[family]).await
}

/// How many keys match `filters` now (values and delete markers): what a
/// watch of them with history replays before it is current.
///
/// # Errors
/// [`ReadError::Nats`] when the consumer cannot be created.
pub async fn count_keys(store: &Store, filters: &[String]) -> Result<u64, ReadError> {
    let subjects: Vec<String> = filters
        .iter()
        .map(|f| format!("{}{f}", store.prefix))
        .collect();
    let consumer = store
        .stream
        .create_consumer(pull::OrderedConfig {
            description: Some("flotilla key count".into()),
            filter_subjects: subjects,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| ReadError::Nats {
            bucket: store.name.clone(),
            what: filters.join(", "),
            source: e.into(),
        })?;
    Ok(consumer.cached_info().num_pending)
}

/// The current value of every key of the given families, in one read.
///
/// # Errors
/// See [`read_keys`].
pub async fn read_families(store: &Store, families: &[&str]) -> Result<Snapshot, ReadError> {
    let filters: Vec<String> = families.iter().map(|f| format!("{f}.>")).collect();
    read_keys(store, &filters).await
}

/// The current value of every key matching `filters` (key names, or
/// wildcards such as `heartbeat.>`), in one read.
///
/// # Errors
/// [`ReadError::Nats`] when the consumer cannot be created or a message
/// fails; [`ReadError::Stalled`] when no value arrives for
/// [`READ_IDLE_TIMEOUT`] while some are still due.
pub async fn read_keys(store: &Store, filters: &[String]) -> Result<Snapshot, ReadError> {
    let what = filters.join(", ");
    let nats_err = |source: async_nats::Error| ReadError::Nats {
        bucket: store.name.clone(),
        what: what.clone(),
        source,
    };
    let mut subjects: Vec<String> = filters
        .iter()
        .map(|f| format!("{}{f}", store.prefix))
        .collect();
    let (filter_subject, filter_subjects) = if subjects.len() == 1 {
        (subjects.remove(0), Vec::new())
    } else {
        (String::new(), subjects)
    };
    let consumer = store
        .stream
        .create_consumer(pull::OrderedConfig {
            description: Some("flotilla family read".into()),
            filter_subject,
            filter_subjects,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| nats_err(e.into()))?;
    let info = consumer.cached_info();
    let server_time = SystemTime::from(info.created);
    let mut remaining = info.num_pending;
    let mut entries = BTreeMap::new();
    if remaining == 0 {
        return Ok(Snapshot {
            entries,
            server_time,
        });
    }
    let prefix = store.prefix.as_str();
    let mut messages = consumer.messages().await.map_err(|e| nats_err(e.into()))?;
    while remaining > 0 {
        let message = match tokio::time::timeout(READ_IDLE_TIMEOUT, messages.next()).await {
            Err(_) | Ok(None) => {
                return Err(ReadError::Stalled {
                    bucket: store.name.clone(),
                    what,
                });
            }
            Ok(Some(message)) => message.map_err(|e| nats_err(e.into()))?,
        };
        let meta = message.info().map_err(nats_err)?;
        remaining = meta.pending;
        let Some(key) = message.subject.strip_prefix(prefix) else {
            continue;
        };
        let operation = operation(message.headers.as_ref());
        if operation != Operation::Put {
            entries.remove(key);
            continue;
        }
        entries.insert(
            key.to_owned(),
            kv::Entry {
                bucket: store.name.clone(),
                key: key.to_owned(),
                value: message.payload.clone(),
                revision: meta.stream_sequence,
                delta: remaining,
                created: meta.published,
                operation,
                seen_current: remaining == 0,
            },
        );
    }
    Ok(Snapshot {
        entries,
        server_time,
    })
}

/// The KV operation a stored message carries: its `KV-Operation` header, or
/// a server marker's reason (per-message TTL expiry, purge, removal).
pub fn operation(headers: Option<&async_nats::HeaderMap>) -> Operation {
    let Some(headers) = headers else {
        return Operation::Put;
    };
    if let Some(op) = headers.get("KV-Operation") {
        return Operation::from_str(op.as_str()).unwrap_or(Operation::Put);
    }
    match headers.get("Nats-Marker-Reason").map(|r| r.as_str()) {
        Some("MaxAge" | "Purge") => Operation::Purge,
        Some("Remove") => Operation::Delete,
        _ => Operation::Put,
    }
}
