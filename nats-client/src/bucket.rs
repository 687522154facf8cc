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
pub fn bucket_config(bucket: &BucketName) -> kv::Config {
    kv::Config {
        bucket: bucket.to_string(),
        description: "Flotilla fleet state (see docs/adr/0002)".into(),
        history: HISTORY,
        max_value_size: MAX_VALUE_SIZE,
        storage: jetstream::stream::StorageType::File,
        republish: Some(republish_rule(bucket)),
        ..Default::default()
    }
}

/// How long a heartbeat outlives its agent's silence: after a day without
/// one, liveness is judged by the status's age instead (docs/adr/0015).
pub const HEARTBEAT_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The config of the heartbeat bucket beside fleet bucket `bucket`: one
/// value per key (history 1), expired after [`HEARTBEAT_TTL`], file storage
/// (a server restart keeps every agent's last heartbeat and its timestamp).
pub fn heartbeat_bucket_config(bucket: &BucketName) -> kv::Config {
    kv::Config {
        bucket: keys::heartbeat_bucket(bucket),
        description: "Flotilla heartbeats (see docs/adr/0015)".into(),
        history: 1,
        max_age: HEARTBEAT_TTL,
        max_value_size: 4096,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// Opens the heartbeat bucket beside fleet bucket `bucket`, creating it if
/// missing (control plane and `flotilla apply`, with [`ensure_bucket`]).
///
/// # Errors
/// [`BucketError::Create`] when the server refuses.
pub async fn ensure_heartbeat_bucket(
    js: &jetstream::Context,
    bucket: &BucketName,
) -> Result<kv::Store, BucketError> {
    let name = keys::heartbeat_bucket(bucket);
    if let Ok(store) = js.get_key_value(name.as_str()).await {
        return Ok(store);
    }
    match js.create_key_value(heartbeat_bucket_config(bucket)).await {
        Ok(store) => Ok(store),
        // Lost a creation race: re-open.
        Err(create_err) => js
            .get_key_value(name.as_str())
            .await
            .map_err(|_| BucketError::Create {
                bucket: bucket.clone(),
                source: create_err.into(),
            }),
    }
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
/// and the heartbeat bucket beside it ([`ensure_heartbeat_bucket`]). An
/// existing bucket without the rule is an error, never silently used.
///
/// # Errors
/// [`BucketError::MissingRepublish`] for an existing bucket without the
/// rule; [`BucketError::Read`] / [`BucketError::Create`] when the server
/// refuses.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    bucket: &BucketName,
) -> Result<kv::Store, BucketError> {
    ensure_heartbeat_bucket(js, bucket).await?;
    match js.get_key_value(bucket.as_str()).await {
        Ok(store) => {
            check_republish(&store, bucket).await?;
            Ok(store)
        }
        Err(e) if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
            // Lost a creation race with another control-plane instance? Re-open.
            match js.create_key_value(bucket_config(bucket)).await {
                Ok(store) => Ok(store),
                Err(create_err) => match js.get_key_value(bucket.as_str()).await {
                    Ok(store) => {
                        check_republish(&store, bucket).await?;
                        Ok(store)
                    }
                    Err(_) => Err(BucketError::Create {
                        bucket: bucket.clone(),
                        source: create_err.into(),
                    }),
                },
            }
        }
        Err(e) => Err(BucketError::Read {
            bucket: bucket.clone(),
            source: e.into(),
        }),
    }
}

async fn check_republish(store: &kv::Store, bucket: &BucketName) -> Result<(), BucketError> {
    let status = store.status().await.map_err(|e| BucketError::Read {
        bucket: bucket.clone(),
        source: e.into(),
    })?;
    let want = republish_rule(bucket);
    match &status.info.config.republish {
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
