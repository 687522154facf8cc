//! Connecting, opening the fleet bucket, and small typed read helpers, all
//! through the one client layer `flotilla_nats` (ADR 0011).
//!
//! Only `apply` may create the bucket ([`flotilla_nats::ensure_bucket`], which
//! also sets the RePublish rule agents depend on — without linking the
//! control plane); every read command opens an existing one and says so
//! plainly when it is missing. Listings read whole key families with one
//! ordered consumer ([`Fleet::snapshot`]), never one request per key.

use std::time::SystemTime;

use async_nats::jetstream::{self, kv};
use flotilla_nats::{BucketError, Connector};
use manifest_types::{
    AgentInventory, AgentManifest, AgentStatus, AgentValues, Deployment, DeploymentStatus,
    Heartbeat, keys,
};

use crate::args::GlobalArgs;
use crate::exit::CliError;

pub use flotilla_nats::Snapshot;

/// A connection to NATS and the fleet bucket.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub store: kv::Store,
    /// Where heartbeats live (docs/adr/0015).
    pub heartbeats: kv::Store,
    pub url: String,
}

async fn connect(g: &GlobalArgs) -> Result<jetstream::Context, CliError> {
    let auth = g.nats.auth().map_err(|e| CliError::Usage(e.to_string()))?;
    let tls = g.nats.tls().map_err(|e| CliError::Usage(e.to_string()))?;
    let client = Connector::new(g.nats.url(), "flotilla-cli", auth)
        .tls(&tls)
        .connect()
        .await
        .map_err(|e| CliError::Connect {
            url: g.nats.url().to_owned(),
            source: e.into(),
        })?;
    Ok(jetstream::new(client))
}

/// The control lease now (docs/adr/0022): the record of the instance that
/// acts and when it last renewed (server time); None while no instance
/// holds it, or when no control plane ever ran against the bucket.
pub async fn control_lease(
    g: &GlobalArgs,
) -> Result<Option<(manifest_types::lease::ControlLease, SystemTime)>, CliError> {
    let js = connect(g).await?;
    let name = keys::control_bucket(&g.bucket);
    let Ok(store) = js.get_key_value(name.as_str()).await else {
        return Ok(None);
    };
    let entry = store.entry(keys::LEASE).await.map_err(|e| {
        CliError::nats(
            format!("cannot read {} in {name} at {}", keys::LEASE, g.nats.url()),
            e,
        )
    })?;
    Ok(entry
        .filter(|e| e.operation == kv::Operation::Put)
        .and_then(|e| {
            let lease = serde_json::from_slice(&e.value).ok()?;
            Some((lease, SystemTime::from(e.created)))
        }))
}

impl Fleet {
    /// Opens an existing bucket; a missing one is [`CliError::NoBucket`].
    pub async fn open(g: &GlobalArgs) -> Result<Self, CliError> {
        let js = connect(g).await?;
        let store = match flotilla_nats::open_bucket(&js, &g.bucket).await {
            Ok(store) => store,
            Err(e) => return Err(Self::open_error(g, e)),
        };
        match flotilla_nats::open_heartbeat_bucket(&js, &g.bucket).await {
            Ok(heartbeats) => Ok(Self {
                store,
                heartbeats,
                url: g.nats.url().to_owned(),
            }),
            Err(BucketError::Missing { .. }) => Err(CliError::nats(
                format!(
                    "no heartbeat bucket {} beside bucket {} at {} — is an up-to-date flotilla-control running? (docs/adr/0015)",
                    manifest_types::keys::heartbeat_bucket(&g.bucket),
                    g.bucket,
                    g.nats.url()
                ),
                std::io::Error::other("bucket not found"),
            )),
            Err(e) => Err(Self::open_error(g, e)),
        }
    }

    fn open_error(g: &GlobalArgs, e: BucketError) -> CliError {
        match e {
            BucketError::Missing { .. } => CliError::NoBucket {
                bucket: g.bucket.to_string(),
                url: g.nats.url().to_owned(),
            },
            e => CliError::nats(
                format!("cannot open bucket {} at {}", g.bucket, g.nats.url()),
                e,
            ),
        }
    }

    /// Opens the bucket, creating it (with its RePublish rule) if missing,
    /// and the heartbeat bucket beside it.
    pub async fn open_or_create(g: &GlobalArgs) -> Result<Self, CliError> {
        let js = connect(g).await?;
        let failed = |e| CliError::nats(format!("bucket {} at {}", g.bucket, g.nats.url()), e);
        let store = flotilla_nats::ensure_bucket(&js, &g.bucket, flotilla_nats::Replicas::ONE)
            .await
            .map_err(failed)?;
        let heartbeats = flotilla_nats::open_heartbeat_bucket(&js, &g.bucket)
            .await
            .map_err(failed)?;
        Ok(Self {
            store,
            heartbeats,
            url: g.nats.url().to_owned(),
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
    /// `actual-state`, …) in one read, with the server's clock.
    /// Heartbeats come from their own bucket, merged in.
    pub async fn snapshot(&self, families: &[&str]) -> Result<Snapshot, CliError> {
        let filters: Vec<String> = families.iter().map(|f| keys::all(f)).collect();
        self.snapshot_keys(&filters).await
    }

    /// The live entries of the named keys (or wildcards) in one read per
    /// bucket, with the server's clock.
    pub async fn snapshot_keys(&self, filters: &[String]) -> Result<Snapshot, CliError> {
        let failed = |e| CliError::nats("cannot read the fleet", e);
        let (beats, rest): (Vec<String>, Vec<String>) = filters
            .iter()
            .cloned()
            .partition(|k| k.starts_with(&format!("{}.", keys::HEARTBEAT)));
        let empty = || Snapshot {
            entries: Default::default(),
            server_time: SystemTime::UNIX_EPOCH,
        };
        // The fleet bucket first, then heartbeats: an agent beats before it
        // writes its first status, so a status read always has its
        // heartbeat read too (read at once, a fresh agent looked Stale).
        let fleet = match rest.is_empty() {
            true => empty(),
            false => flotilla_nats::read_keys(&self.store, &rest)
                .await
                .map_err(failed)?,
        };
        let heartbeats = match beats.is_empty() {
            true => empty(),
            false => flotilla_nats::read_keys(&self.heartbeats, &beats)
                .await
                .map_err(failed)?,
        };
        Ok(fleet.merge(heartbeats))
    }
}

/// A decoded value with its KV metadata.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    /// The entry's KV sequence (for `deployments.<name>`: the deployment's
    /// revision).
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
            .map_err(|m| {
                format!(
                    "{} (KV sequence {}) is not readable: {m}",
                    e.key, e.revision
                )
            })
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
serde_decode!(
    AgentStatus,
    AgentInventory,
    Heartbeat,
    DeploymentStatus,
    AgentValues
);
