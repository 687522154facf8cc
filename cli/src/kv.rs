//! Connecting, opening the fleet bucket, and small typed read helpers.
//!
//! Only `apply` may create the bucket (through
//! [`flotilla_control::bucket::ensure_bucket`], which also sets the RePublish
//! rule agents depend on); every read command opens an existing one and says
//! so plainly when it is missing.

use std::collections::BTreeMap;
use std::time::SystemTime;

use async_nats::jetstream::{self, kv};
use futures::{StreamExt, TryStreamExt};
use manifest_types::{
    AgentInventory, AgentManifest, AgentStatus, Deployment, DeploymentStatus, Heartbeat,
};

use crate::args::GlobalArgs;
use crate::exit::CliError;

/// How many direct gets a listing keeps in flight.
const CONCURRENT_GETS: usize = 32;

/// A connection to NATS and the fleet bucket.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub store: kv::Store,
    pub url: String,
}

async fn connect(g: &GlobalArgs) -> Result<jetstream::Context, CliError> {
    let connect_err = |source: async_nats::Error| CliError::Connect {
        url: g.nats_url.clone(),
        source,
    };
    let mut opts = async_nats::ConnectOptions::new().name("flotilla-cli");
    if let Some(creds) = &g.creds {
        opts = opts
            .credentials_file(creds)
            .await
            .map_err(|e| CliError::Io {
                context: format!("cannot read credentials file {}", creds.display()),
                source: e,
            })?;
    }
    let servers: Vec<&str> = g
        .nats_url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let client = opts
        .connect(servers)
        .await
        .map_err(|e| connect_err(e.into()))?;
    Ok(jetstream::new(client))
}

impl Fleet {
    /// Opens an existing bucket; a missing one is [`CliError::NoBucket`].
    pub async fn open(g: &GlobalArgs) -> Result<Self, CliError> {
        let js = connect(g).await?;
        match js.get_key_value(g.bucket.as_str()).await {
            Ok(store) => Ok(Self {
                store,
                url: g.nats_url.clone(),
            }),
            Err(e) if is_stream_not_found(&e) => Err(CliError::NoBucket {
                bucket: g.bucket.to_string(),
                url: g.nats_url.clone(),
            }),
            Err(e) => Err(CliError::nats(
                format!("cannot open bucket {} at {}", g.bucket, g.nats_url),
                e,
            )),
        }
    }

    /// Opens the bucket, creating it (with its RePublish rule) if missing.
    pub async fn open_or_create(g: &GlobalArgs) -> Result<Self, CliError> {
        let js = connect(g).await?;
        let store = flotilla_control::bucket::ensure_bucket(&js, &g.bucket)
            .await
            .map_err(|e| CliError::nats(format!("bucket {} at {}", g.bucket, g.nats_url), e))?;
        Ok(Self {
            store,
            url: g.nats_url.clone(),
        })
    }

    /// The live (not deleted) entry of `key`, if any.
    pub async fn entry(&self, key: impl Into<String>) -> Result<Option<kv::Entry>, CliError> {
        let key = key.into();
        let entry = self
            .store
            .entry(key.as_str())
            .await
            .map_err(|e| CliError::nats(format!("cannot read {key}"), e))?;
        Ok(entry.filter(|e| e.operation == kv::Operation::Put))
    }

    /// The current entry of `key` including delete markers.
    pub async fn raw_entry(&self, key: &str) -> Result<Option<kv::Entry>, CliError> {
        self.store
            .entry(key)
            .await
            .map_err(|e| CliError::nats(format!("cannot read {key}"), e))
    }

    /// Reads and decodes `key`. `Ok(None)`: absent; `Ok(Some(Err(_)))`:
    /// present but not a valid document.
    pub async fn read<T: Decode>(
        &self,
        key: impl Into<String>,
    ) -> Result<Option<Decoded<T>>, CliError> {
        Ok(self.entry(key).await?.map(|e| Versioned::decode(&e)))
    }

    /// The live entries of every key in the given families (`agents`,
    /// `actual-state`, …), by key.
    pub async fn snapshot(&self, families: &[&str]) -> Result<Snapshot, CliError> {
        let keys: Vec<String> = self
            .store
            .keys()
            .await
            .map_err(|e| CliError::nats("cannot list keys", e))?
            .try_collect()
            .await
            .map_err(|e| CliError::nats("cannot list keys", e))?;
        let wanted = keys.into_iter().filter(|k| {
            k.split_once('.')
                .is_some_and(|(family, _)| families.contains(&family))
        });
        let entries: Vec<Option<kv::Entry>> = futures::stream::iter(wanted)
            .map(|k| async move { self.entry(&k).await })
            .buffer_unordered(CONCURRENT_GETS)
            .try_collect()
            .await?;
        Ok(Snapshot {
            entries: entries
                .into_iter()
                .flatten()
                .map(|e| (e.key.clone(), e))
                .collect(),
        })
    }
}

/// Whether opening a bucket failed because its stream does not exist.
fn is_stream_not_found(e: &jetstream::context::KeyValueError) -> bool {
    use jetstream::context::{GetStreamError, GetStreamErrorKind};
    if e.kind() != jetstream::context::KeyValueErrorKind::GetBucket {
        return false;
    }
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<GetStreamError>())
        .is_some_and(|s| {
            matches!(s.kind(), GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
        })
}

/// Live entries of a set of key families.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub entries: BTreeMap<String, kv::Entry>,
}

impl Snapshot {
    pub fn get<T: Decode>(&self, key: &str) -> Option<Decoded<T>> {
        self.entries.get(key).map(Versioned::decode)
    }

    /// Every key of one family, as `(id, entry)`.
    pub fn family<'a>(&'a self, family: &'a str) -> impl Iterator<Item = (&'a str, &'a kv::Entry)> {
        self.entries.iter().filter_map(move |(k, e)| {
            k.split_once('.')
                .filter(|(f, _)| *f == family)
                .map(|(_, id)| (id, e))
        })
    }
}

/// A decoded value with its KV metadata.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: u64,
    /// Server time of the write.
    pub created: SystemTime,
}

/// A value that was present: decoded, or why it could not be.
pub type Decoded<T> = Result<Versioned<T>, String>;

impl<T: Decode> Versioned<T> {
    pub fn decode(e: &kv::Entry) -> Decoded<T> {
        T::decode(&e.value)
            .map(|value| Versioned {
                value,
                revision: e.revision,
                created: SystemTime::from(e.created),
            })
            .map_err(|m| format!("{} (revision {}) is not readable: {m}", e.key, e.revision))
    }
}

/// How each document type is read off the wire (the typed constructors of
/// `manifest-types` where they exist, so validation is the contract's).
pub trait Decode: Sized {
    fn decode(bytes: &[u8]) -> Result<Self, String>;
}

impl Decode for Deployment {
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        Deployment::from_json(bytes).map_err(|e| e.to_string())
    }
}

impl Decode for AgentManifest {
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        AgentManifest::from_json(bytes).map_err(|e| e.to_string())
    }
}

macro_rules! serde_decode {
    ($($t:ty),*) => {$(
        impl Decode for $t {
            fn decode(bytes: &[u8]) -> Result<Self, String> {
                serde_json::from_slice(bytes).map_err(|e| e.to_string())
            }
        }
    )*};
}
serde_decode!(AgentStatus, AgentInventory, Heartbeat, DeploymentStatus);
