//! The fleet bucket: created (by the control plane or `flotilla apply`) with
//! the RePublish rule the agents' watch depends on
//! (docs/adr/0002-kv-layout-and-republish-watch.md), refused when an existing
//! bucket lacks it, and opened by readers without ever being created.

use async_nats::jetstream::{self, kv, stream::Republish};
use manifest_types::{BucketName, keys};

/// How many values per key the bucket keeps (`nats kv history` shows them).
pub const HISTORY: i64 = 5;
/// Largest value accepted; manifests are capped well below it.
pub const MAX_VALUE_SIZE: i32 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error(
        "bucket {bucket} exists without the RePublish rule {expected_source} -> {expected_destination} (found {found}); agents would never hear of new manifests. Recreate it or add the rule."
    )]
    MissingRepublish {
        bucket: BucketName,
        expected_source: String,
        expected_destination: String,
        found: String,
    },
    #[error("bucket {bucket} does not exist (nothing has been applied yet?)")]
    Missing { bucket: BucketName },
    #[error("cannot read bucket {bucket}")]
    Read {
        bucket: BucketName,
        #[source]
        source: async_nats::Error,
    },
    #[error("cannot create bucket {bucket}")]
    Create {
        bucket: BucketName,
        #[source]
        source: async_nats::Error,
    },
    #[error(
        "bucket {name} has {have} replica(s) and {want} are asked for (--replicas), but the servers refused to add them: on a single server run with --replicas 1; on a cluster, check that {want} servers with JetStream are up"
    )]
    Replicas {
        name: String,
        have: usize,
        want: usize,
        #[source]
        source: async_nats::Error,
    },
}

/// How many servers of a cluster hold each bucket the control plane
/// creates: 1 on a single server, 3 on a 3-node cluster
/// (docs/adr/0021-cluster-replicas-and-durability.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas(usize);

impl Replicas {
    pub const ONE: Self = Self(1);

    /// 1 to 5 (JetStream's limit).
    pub fn new(n: usize) -> Result<Self, String> {
        if (1..=5).contains(&n) {
            Ok(Self(n))
        } else {
            Err(format!("{n} replicas: JetStream keeps 1 to 5"))
        }
    }

    pub fn get(self) -> usize {
        self.0
    }
}

impl Default for Replicas {
    fn default() -> Self {
        Self::ONE
    }
}

impl std::str::FromStr for Replicas {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        s.parse::<usize>()
            .map_err(|e| format!("{s:?}: {e}"))
            .and_then(Self::new)
    }
}

impl std::fmt::Display for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The RePublish rule of a fleet bucket.
pub fn republish_rule(bucket: &BucketName) -> Republish {
    Republish {
        source: keys::republish_source(bucket),
        destination: keys::republish_destination(bucket),
        headers_only: false,
    }
}

/// The config a fleet bucket is created with.
pub fn bucket_config(bucket: &BucketName, replicas: Replicas) -> kv::Config {
    kv::Config {
        bucket: bucket.to_string(),
        description: "Flotilla fleet state (see docs/adr/0002)".into(),
        history: HISTORY,
        max_value_size: MAX_VALUE_SIZE,
        storage: jetstream::stream::StorageType::File,
        republish: Some(republish_rule(bucket)),
        num_replicas: replicas.get(),
        ..Default::default()
    }
}

/// How long a heartbeat outlives its agent's silence: after a day without
/// one, liveness is judged by the status's age instead (docs/adr/0015).
pub const HEARTBEAT_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The config of the heartbeat bucket beside fleet bucket `bucket`: one
/// value per key (history 1), expired after [`HEARTBEAT_TTL`], file storage
/// (a server restart keeps every agent's last heartbeat and its timestamp).
pub fn heartbeat_bucket_config(bucket: &BucketName, replicas: Replicas) -> kv::Config {
    kv::Config {
        bucket: keys::heartbeat_bucket(bucket),
        description: "Flotilla heartbeats (see docs/adr/0015)".into(),
        history: 1,
        max_age: HEARTBEAT_TTL,
        max_value_size: 4096,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas.get(),
        ..Default::default()
    }
}

/// The config of the control plane's lease bucket beside fleet bucket
/// `bucket`: one value per key, expired `ttl` after its last write (the
/// lease time, docs/adr/0022), file storage.
pub fn control_bucket_config(
    bucket: &BucketName,
    replicas: Replicas,
    ttl: std::time::Duration,
) -> kv::Config {
    kv::Config {
        bucket: keys::control_bucket(bucket),
        description: "Flotilla control-plane lease (see docs/adr/0022)".into(),
        history: 1,
        max_age: ttl,
        max_value_size: 4096,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas.get(),
        ..Default::default()
    }
}

/// Opens the control plane's lease bucket beside fleet bucket `bucket`,
/// creating it if missing; an existing one gets at least `replicas` and the
/// lease time `ttl`.
///
/// # Errors
/// As [`ensure_bucket`].
pub async fn ensure_control_bucket(
    js: &jetstream::Context,
    bucket: &BucketName,
    replicas: Replicas,
    ttl: std::time::Duration,
) -> Result<kv::Store, BucketError> {
    ensure(
        js,
        control_bucket_config(bucket, replicas, ttl),
        bucket,
        |_| Ok(()),
    )
    .await
}

/// Opens the heartbeat bucket beside fleet bucket `bucket`, creating it if
/// missing, with at least `replicas` (control plane and `flotilla apply`,
/// with [`ensure_bucket`]).
///
/// # Errors
/// [`BucketError::Create`] when the server refuses, [`BucketError::Replicas`]
/// when an existing bucket cannot be scaled up.
pub async fn ensure_heartbeat_bucket(
    js: &jetstream::Context,
    bucket: &BucketName,
    replicas: Replicas,
) -> Result<kv::Store, BucketError> {
    ensure(
        js,
        heartbeat_bucket_config(bucket, replicas),
        bucket,
        |_| Ok(()),
    )
    .await
}

/// Re-opening a bucket another instance created at the same moment: how
/// often, and how long apart.
const REOPEN_ATTEMPTS: usize = 8;
const REOPEN_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// Opens bucket `config.bucket` (the fleet bucket `fleet` or one beside it),
/// creating it with `config` when it does not exist; an existing one with
/// fewer replicas than `config` asks for is scaled up in place, never
/// recreated (ADR 0021), and given `config`'s maximum age — once `check`
/// accepts the existing bucket.
async fn ensure(
    js: &jetstream::Context,
    config: kv::Config,
    fleet: &BucketName,
    check: impl Fn(&jetstream::stream::Info) -> Result<(), BucketError>,
) -> Result<kv::Store, BucketError> {
    let name = config.bucket.clone();
    let want = config.num_replicas.max(1);
    let max_age = config.max_age;
    let read = |e: async_nats::Error| BucketError::Read {
        bucket: fleet.clone(),
        source: e,
    };
    let store = match js.get_key_value(name.as_str()).await {
        Ok(store) => store,
        Err(e) if is_stream_not_found(&e) => match js.create_key_value(config).await {
            Ok(store) => store,
            // Lost a creation race with another instance? Re-open; a
            // replicated bucket just created may take a moment to answer.
            Err(create_err) => {
                let mut reopened = js.get_key_value(name.as_str()).await;
                for _ in 0..REOPEN_ATTEMPTS {
                    if reopened.is_ok() {
                        break;
                    }
                    tokio::time::sleep(REOPEN_PAUSE).await;
                    reopened = js.get_key_value(name.as_str()).await;
                }
                reopened.map_err(|_| BucketError::Create {
                    bucket: fleet.clone(),
                    source: create_err.into(),
                })?
            }
        },
        Err(e) => return Err(read(e.into())),
    };
    let info = store.status().await.map_err(|e| read(e.into()))?.info;
    check(&info)?;
    let have = info.config.num_replicas.max(1);
    if have < want || info.config.max_age != max_age {
        let mut changed = info.config;
        changed.num_replicas = have.max(want);
        changed.max_age = max_age;
        js.update_stream(changed)
            .await
            .map_err(|source| BucketError::Replicas {
                name: name.clone(),
                have,
                want,
                source: source.into(),
            })?;
        tracing::info!(bucket = %name, replicas = have.max(want), ?max_age, "bucket updated");
    }
    Ok(store)
}

/// Opens the heartbeat bucket beside fleet bucket `bucket`; never creates it.
///
/// # Errors
/// [`BucketError::Missing`] (naming the fleet bucket) when it does not exist.
pub async fn open_heartbeat_bucket(
    js: &jetstream::Context,
    bucket: &BucketName,
) -> Result<kv::Store, BucketError> {
    open_named(js, &keys::heartbeat_bucket(bucket), bucket).await
}

/// Opens an existing fleet bucket; never creates one.
///
/// # Errors
/// [`BucketError::Missing`] when the bucket's stream does not exist,
/// [`BucketError::Read`] for any other failure.
pub async fn open_bucket(
    js: &jetstream::Context,
    bucket: &BucketName,
) -> Result<kv::Store, BucketError> {
    open_named(js, bucket.as_str(), bucket).await
}

/// Opens bucket `name` (the fleet bucket `bucket` or one beside it).
async fn open_named(
    js: &jetstream::Context,
    name: &str,
    bucket: &BucketName,
) -> Result<kv::Store, BucketError> {
    match js.get_key_value(name).await {
        Ok(store) => Ok(store),
        Err(e) if is_stream_not_found(&e) => Err(BucketError::Missing {
            bucket: bucket.clone(),
        }),
        Err(e) => Err(BucketError::Read {
            bucket: bucket.clone(),
            source: e.into(),
        }),
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

/// Opens the fleet bucket, creating it (with its RePublish rule) if missing,
/// and the heartbeat bucket beside it ([`ensure_heartbeat_bucket`]), each
/// with at least `replicas`. An existing bucket without the rule is an
/// error, never silently used.
///
/// # Errors
/// [`BucketError::MissingRepublish`] for an existing bucket without the
/// rule; [`BucketError::Read`] / [`BucketError::Create`] when the server
/// refuses; [`BucketError::Replicas`] when a bucket cannot be scaled up.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    bucket: &BucketName,
    replicas: Replicas,
) -> Result<kv::Store, BucketError> {
    ensure_heartbeat_bucket(js, bucket, replicas).await?;
    ensure(js, bucket_config(bucket, replicas), bucket, |info| {
        check_republish(info, bucket)
    })
    .await
}

fn check_republish(info: &jetstream::stream::Info, bucket: &BucketName) -> Result<(), BucketError> {
    let want = republish_rule(bucket);
    match &info.config.republish {
        Some(r)
            if r.source == want.source && r.destination == want.destination && !r.headers_only =>
        {
            Ok(())
        }
        other => Err(BucketError::MissingRepublish {
            bucket: bucket.clone(),
            expected_source: want.source,
            expected_destination: want.destination,
            found: match other {
                Some(r) => format!(
                    "{} -> {} (headersOnly={})",
                    r.source, r.destination, r.headers_only
                ),
                None => "no rule".into(),
            },
        }),
    }
}
