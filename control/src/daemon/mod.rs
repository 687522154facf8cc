//! The control-plane daemon: one event loop that watches the keys it renders
//! from and re-renders the fleet on every change.
//!
//! ```text
//! KV watch (deployments.>, agents.>, desired-state.>, deployment-status.>)
//!        │ entries, drained in bursts
//!        ▼
//!   State::apply ──(render may change?)──▶ reconcile::reconcile
//!                                            render → publish manifests (CAS)
//!                                            → deployment statuses → orphans
//! ```
//!
//! - The watch delivers the current value of every key first; nothing is
//!   rendered before that replay is through (an entry with `delta == 0`), so a
//!   restarted control plane renders from the whole picture and, when nothing
//!   changed, writes nothing.
//! - Whatever the watch has already queued is applied before rendering, so
//!   a burst costs one render; there is no debounce sleep on the path from
//!   `apply` to the agent.
//! - A failed write is retried by a full pass after [`Config::retry_after`].
//! - A watch survives server restarts (its ordered consumer is recreated);
//!   errors are logged, never fatal. Should it end, the daemon relists.

mod reconcile;
mod state;

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::kv::Store;
use futures::{FutureExt, StreamExt};
use manifest_types::{BucketName, keys};
use tokio::time::Instant;

use crate::bucket::{BucketError, ensure_bucket};
use state::State;

/// How the control plane authenticates to NATS: the one [`flotilla_nats::Auth`]
/// (precedence creds file > nkey seed file > user/password > none).
pub use flotilla_nats::Auth as NatsAuth;

/// How the daemon reaches NATS and paces its work.
#[derive(Debug, Clone)]
pub struct Config {
    /// One NATS URL or a comma-separated list.
    pub nats_url: String,
    pub bucket: BucketName,
    pub auth: NatsAuth,
    /// KV writes in flight at once during a pass.
    pub publish_concurrency: usize,
    /// Delay before a pass with failed writes is retried.
    pub retry_after: Duration,
}

impl Config {
    /// Defaults for everything but the server URL: bucket `fleet`, no
    /// authentication, 64 writes in flight, retry after 1 s.
    pub fn new(nats_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            bucket: BucketName::default(),
            auth: NatsAuth::None,
            publish_concurrency: 64,
            retry_after: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Connect(#[from] flotilla_nats::ConnectError),
    #[error(transparent)]
    Bucket(#[from] BucketError),
}

/// Connects, opens (or creates) the fleet bucket, and runs the control loop
/// until `shutdown` completes. Refuses a bucket without the RePublish rule.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let client =
        flotilla_nats::Connector::new(&config.nats_url, "flotilla-control", config.auth.clone())
            .connect()
            .await?;
    let js = async_nats::jetstream::new(client);
    let store = ensure_bucket(&js, &config.bucket).await?;
    tracing::info!(nats = %config.nats_url, bucket = %config.bucket, "control plane running");
    run_with_store(store, &config, shutdown).await;
    Ok(())
}

/// The control loop on an already opened fleet bucket (see the module docs).
/// Returns when `shutdown` completes.
pub async fn run_with_store(store: Store, config: &Config, shutdown: impl Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    let families = [
        keys::all(keys::DEPLOYMENTS),
        keys::all(keys::AGENTS),
        keys::all(keys::DESIRED_STATE),
        keys::all(keys::DEPLOYMENT_STATUS),
    ];
    loop {
        // (Re)list: a fresh watch replays the current value of every key.
        let watch = tokio::select! {
            _ = &mut shutdown => return,
            w = store.watch_many_with_history(&families) => w,
        };
        let mut watch = match watch {
            Ok(w) => w,
            Err(error) => {
                tracing::warn!(error = %reconcile::error_chain(&error), "cannot watch the fleet bucket; retrying");
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(config.retry_after) => continue,
                }
            }
        };
        let mut state = State::default();
        let mut replayed = false;
        let mut dirty = false;
        let mut retry_at: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                // Cancel-safe: nothing is in flight between passes.
                _ = &mut shutdown => return,
                // Cancel-safe: the watch buffers entries until polled again.
                first = watch.next() => {
                    let Some(first) = first else {
                        tracing::warn!("fleet watch ended; relisting");
                        break;
                    };
                    let mut next = Some(first);
                    while let Some(item) = next {
                        match item {
                            Ok(entry) => {
                                dirty |= state.apply_entry(&entry);
                                replayed |= entry.delta == 0;
                            }
                            Err(error) => tracing::warn!(error = %reconcile::error_chain(&error), "fleet watch error; it recovers on its own"),
                        }
                        next = watch.next().now_or_never().flatten();
                    }
                }
                // Cancel-safe: a timer.
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    retry_at = None;
                    dirty = true;
                }
            }
            if replayed && dirty {
                dirty = false;
                let report =
                    reconcile::reconcile(&mut state, &store, config.publish_concurrency).await;
                tracing::debug!(?report, "reconcile pass");
                if report.failures > 0 {
                    tracing::warn!(
                        failures = report.failures,
                        first = report.first_error.as_deref().unwrap_or_default(),
                        retry_in = ?config.retry_after,
                        "reconcile pass incomplete; retrying"
                    );
                    retry_at = Some(Instant::now() + config.retry_after);
                } else {
                    retry_at = None;
                }
            }
        }
    }
}
