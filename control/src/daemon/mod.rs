//! The control-plane daemon: one event loop that watches the keys it renders
//! from and re-renders the fleet on every change.
//!
//! ```text
//! KV watch (deployments.>, agents.>, values.>, desired-state.>,
//!           deployment-status.>, actual-state.>, revisions.>, rollouts.>,
//!           settings.heartbeat, settings.rollout)
//!        │ entries, drained in bursts
//!        ▼
//!   State::apply_entry ──(pass needed?)──▶ execute::pass
//!     (view, render memo, rollouts)          plan::plan_manifests (pure)
//!                                            → write manifests (CAS)
//!                                            plan::plan_records (pure)
//!                                            → statuses, history, heartbeat
//!                                              settings, orphans
//! ```
//!
//! Layout: `view` (the fleet view: what the bucket holds), `state` (the view,
//! the render memo and the rollouts together, fed by the watch), `plan` (what
//! a pass writes, decided without I/O), `execute` (a pass performed, its
//! outcome taken back), `rollouts` (starting, judging, history), `metrics`,
//! and this module, the event loop.
//!
//! - The watch delivers the current value of every key first; nothing is
//!   rendered before that replay is through (an entry with `delta == 0`), so a
//!   restarted control plane renders from the whole picture and, when nothing
//!   changed, writes nothing.
//! - Whatever the watch has already queued is applied before rendering, so
//!   a burst costs one render; there is no debounce sleep on the path from
//!   `apply` to the agent. The daemon's own writes coming back through the
//!   watch cost no render ([`Metrics::passes`] counts them).
//! - The control plane owns `desired-state.<id>`: a value it did not write (a
//!   hand edit, an older value put back, a restore, malformed JSON, a
//!   DEL/PURGE) is replaced in the next pass above the key's generation and
//!   what the agent reports (docs/adr/0012-the-control-plane-owns-desired-state.md).
//! - Each pass also keeps `settings.heartbeat` sized to the registered
//!   agents ([`crate::heartbeat`], docs/adr/0015), and records each new
//!   deployment revision in its history (`revisions.<name>.<revision>`).
//! - Staged rollouts (docs/adr/0016): a pass starts a rollout for each new
//!   revision under a policy; rollouts are judged ([`crate::rollout`]) on
//!   every agent's status, held from this watch while a rollout is in
//!   progress, and heartbeats read at most every 250 ms — after agents
//!   report (at most every 10 ms, or twice as long as the last judgement
//!   took) and every [`Config::rollout_recheck`]; a judgement that releases
//!   agents or moves the phase or wave asks for a full render.
//! - A failed write is retried after [`Config::retry_after`] by a pass that
//!   renders the agents whose writes failed again.
//! - A watch survives server restarts (its ordered consumer is recreated);
//!   errors are logged, never fatal. Should it end, the daemon relists.
//! - A deleted bucket is noticed (the server's stream-deleted advisory, and a
//!   check every [`Config::bucket_check_interval`]): the daemon creates it
//!   again with its RePublish rule and relists; a watch resumed on the new
//!   stream would skip its history, because KV sequences restart at 1.

pub(crate) mod execute;
mod leadership;
mod metrics;
mod plan;
mod rollouts;
mod service;
mod state;
mod view;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv::Store};
use futures::{FutureExt, StreamExt};
use manifest_types::convergence::Thresholds;
use manifest_types::signing::SigningKeys;
use manifest_types::{BucketName, keys};
use tokio::time::Instant;

use crate::bucket::{BucketError, ensure_bucket};
use crate::heartbeat::HeartbeatPolicy;
pub use metrics::Metrics;
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
    /// Replicas of every bucket the daemon creates (3 on a 3-node cluster);
    /// an existing bucket with fewer is scaled up (docs/adr/0021).
    pub replicas: flotilla_nats::Replicas,
    pub auth: NatsAuth,
    /// TLS to NATS (a CA file, optionally a client certificate).
    pub tls: flotilla_nats::Tls,
    /// KV writes in flight at once during a pass.
    pub publish_concurrency: usize,
    /// Delay before a pass with failed writes is retried.
    pub retry_after: Duration,
    /// How often the daemon checks that the bucket it watches still exists
    /// (besides the server's stream-deleted advisory).
    pub bucket_check_interval: Duration,
    /// Counters of the daemon's work, shared with the caller.
    pub metrics: Arc<Metrics>,
    /// How the fleet's heartbeat interval is sized (`settings.heartbeat`).
    pub heartbeat: HeartbeatPolicy,
    /// Liveness limits for judging rollouts (as the CLI's `--stale-after`
    /// / `--offline-after`).
    pub thresholds: Thresholds,
    /// While a rollout is in progress, how often it is judged again even
    /// when no agent reports (agents going Offline, soak times ending).
    pub rollout_recheck: Duration,
    /// The keys every manifest is signed with (docs/adr/0004, 0017); empty:
    /// manifests are unsigned, for agents run with `--allow-unsigned`.
    pub signing: Arc<SigningKeys>,
    /// The control lease's time (docs/adr/0022): a follower takes over at
    /// most this long after the leader stopped renewing, plus one pass.
    pub lease_ttl: Duration,
    /// Sites with a JetStream domain of their own (docs/adr/0023).
    pub sites: Vec<flotilla_nats::site::SiteName>,
    /// The hub's JetStream domain, which sites source from.
    pub hub_domain: String,
    /// The HTTP surface (`/healthz`, `/readyz`, `/metrics`; docs/adr/0025),
    /// if any.
    pub http: Option<crate::http::HttpConfig>,
    /// How often the fleet is counted for `/metrics`.
    pub census_interval: Duration,
}

impl Config {
    /// Defaults for everything but the server URL: bucket `fleet`, no
    /// authentication, 64 writes in flight, retry after 1 s, bucket checked
    /// every 5 s, unsigned manifests.
    pub fn new(nats_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            bucket: BucketName::default(),
            replicas: flotilla_nats::Replicas::ONE,
            auth: NatsAuth::None,
            tls: flotilla_nats::Tls::default(),
            publish_concurrency: 64,
            retry_after: Duration::from_secs(1),
            bucket_check_interval: Duration::from_secs(5),
            metrics: Arc::default(),
            heartbeat: HeartbeatPolicy::default(),
            thresholds: Thresholds::default(),
            rollout_recheck: Duration::from_secs(1),
            signing: Arc::default(),
            lease_ttl: crate::lease::DEFAULT_TTL,
            sites: Vec::new(),
            hub_domain: flotilla_nats::site::DEFAULT_HUB_DOMAIN.to_owned(),
            http: None,
            census_interval: Duration::from_secs(15),
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
            .tls(&config.tls)
            .connect()
            .await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut shutdown = std::pin::pin!(shutdown);
    // A server that answers but whose JetStream does not (a cluster that has
    // not formed or has lost its quorum) is waited for, saying so; a bucket
    // the control plane must not use (no RePublish rule, replicas refused)
    // is an error.
    let store = loop {
        match ensure_bucket(&js, &config.bucket, config.replicas).await {
            Ok(store) => break store,
            Err(error @ (BucketError::Read { .. } | BucketError::Create { .. })) => {
                tracing::warn!(error = %execute::error_chain(&error), "JetStream does not answer for the fleet bucket (a cluster that has not formed or has lost its quorum, or no JetStream for this account?); retrying");
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(config.retry_after.max(Duration::from_secs(2))) => {}
                }
            }
            Err(error) => return Err(error.into()),
        }
    };
    tracing::info!(nats = %config.nats_url, bucket = %config.bucket, "control plane running");
    let sites = (!config.sites.is_empty()).then(|| {
        tokio::spawn(crate::sites::keep(
            client.clone(),
            js.clone(),
            config.bucket.clone(),
            config.sites.clone(),
            config.hub_domain.clone(),
        ))
    });
    let mut tasks: Vec<_> = sites.into_iter().collect();
    if let Some(http) = config.http.clone() {
        let census = crate::census::Shared::default();
        match crate::bucket::open_heartbeat_bucket(&js, &config.bucket).await {
            Ok(heartbeats) => tasks.push(tokio::spawn(crate::census::keep(
                store.clone(),
                heartbeats,
                config.thresholds,
                config.census_interval,
                census.clone(),
            ))),
            Err(error) => {
                tracing::warn!(error = %execute::error_chain(&error), "cannot open the heartbeat bucket; /metrics counts no agents");
            }
        }
        tasks.push(tokio::spawn(crate::http::serve(
            http,
            config.metrics.clone(),
            census,
            client,
        )));
    }
    run_with_store(js, store, &config, shutdown).await;
    for task in tasks {
        task.abort();
    }
    Ok(())
}

/// The control loop on an already opened fleet bucket (see the module docs).
/// `js` is the context the bucket was opened with; the daemon recreates the
/// bucket through it when it goes missing. Returns when `shutdown` completes.
pub async fn run_with_store(
    js: jetstream::Context,
    store: Store,
    config: &Config,
    shutdown: impl Future<Output = ()>,
) {
    let metrics = &config.metrics;
    let mut shutdown = std::pin::pin!(shutdown);
    let families = [
        keys::all(keys::DEPLOYMENTS),
        keys::all(keys::AGENTS),
        keys::all(keys::DESIRED_STATE),
        keys::all(keys::DEPLOYMENT_STATUS),
        keys::all(keys::ACTUAL_STATE),
        keys::all(keys::VALUES),
        keys::all(keys::REVISIONS),
        keys::all(keys::ROLLOUTS),
        keys::HEARTBEAT_SETTINGS.to_owned(),
        keys::ROLLOUT_SETTINGS.to_owned(),
    ];
    let heartbeats = loop {
        match crate::bucket::ensure_heartbeat_bucket(&js, &config.bucket, config.replicas).await {
            Ok(h) => break h,
            Err(error) => {
                tracing::warn!(error = %execute::error_chain(&error), "cannot open the heartbeat bucket; retrying");
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(config.retry_after) => {}
                }
            }
        }
    };
    let mut leadership = loop {
        match leadership::Leadership::start(js.clone(), config).await {
            Ok(l) => break l,
            Err(error) => {
                tracing::warn!(error = %execute::error_chain(&error), "cannot open the control lease bucket; retrying");
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(config.retry_after) => {}
                }
            }
        }
    };
    let mut service = service::Service::new();
    async {
        // The server announces a deleted stream (at most once: the periodic
        // check catches a missed announcement).
        let advisory_subject = format!(
            "$JS.EVENT.ADVISORY.STREAM.DELETED.{}",
            keys::stream_name(&config.bucket)
        );
        let mut advisories = match js.client().subscribe(advisory_subject).await {
            Ok(s) => Some(s),
            Err(error) => {
                tracing::warn!(error = %execute::error_chain(&error), "cannot subscribe to stream advisories; relying on the periodic bucket check");
                None
            }
        };
        let mut store = store;
        let mut created = store.status().await.ok().map(|s| s.info.created);
        let mut state = State::new(config.signing.clone());
        let mut first = true;
        'relist: loop {
            if !std::mem::take(&mut first) {
                metrics.relisted();
            }
            // (Re)list: a fresh watch replays the current value of every key.
            let watch = tokio::select! {
                _ = &mut shutdown => return,
                w = store.watch_many_with_history(&families) => w,
            };
            let mut watch = match watch {
                Ok(w) => w,
                Err(error) => {
                    tracing::warn!(error = %execute::error_chain(&error), "cannot watch the fleet bucket; retrying");
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(config.retry_after) => continue,
                    }
                }
            };
            state = std::mem::take(&mut state).relist();
            // Nothing to replay (a new fleet): the view is loaded already.
            let mut replayed = flotilla_nats::family::count_keys(&store, &families)
                .await
                .is_ok_and(|n| n == 0);
            let mut dirty = false;
            let mut retry_at: Option<Instant> = None;
            // When rollouts are judged next; never sooner than `gap` after the
            // last judgement: MIN_JUDGE_GAP, or twice what the last one took
            // (each reads every agent), so judging takes at most a third of
            // the control plane's time however large the fleet.
            let mut judge_at: Option<Instant> = None;
            let mut judged_at = Instant::now() - MIN_JUDGE_GAP;
            let mut gap = MIN_JUDGE_GAP;
            let mut check_at = Instant::now() + config.bucket_check_interval;
            let mut seen = 0u64;
            loop {
                tokio::select! {
                    biased;
                    // Cancel-safe: nothing is in flight between passes.
                    _ = &mut shutdown => return,
                    // Cancel-safe: the watch buffers entries until polled again.
                    first = watch.next() => {
                        let Some(first) = first else {
                            tracing::warn!("fleet watch ended; relisting");
                            continue 'relist;
                        };
                        let mut next = Some(first);
                        while let Some(item) = next {
                            match item {
                                Ok(entry) => {
                                    dirty |= state.apply_entry(&entry);
                                    replayed |= entry.delta == 0;
                                    seen = seen.max(entry.revision);
                                }
                                Err(error) => tracing::warn!(error = %execute::error_chain(&error), "fleet watch error; it recovers on its own"),
                            }
                            next = watch.next().now_or_never().flatten();
                        }
                    }
                    // Cancel-safe: a subscription buffers messages until polled.
                    Some(_) = next_advisory(&mut advisories) => check_at = Instant::now(),
                    // Cancel-safe: a timer; the check runs in the arm's body.
                    _ = tokio::time::sleep_until(check_at) => {
                        check_at = Instant::now() + config.bucket_check_interval;
                        match check_bucket(&js, &config.bucket, config.replicas).await {
                            Ok((now, info)) => match created {
                                Some(c) if c != info.created => {
                                    // A watch on the old stream would resume at its old
                                    // sequence and miss the new history: relist.
                                    tracing::warn!(bucket = %config.bucket, "the fleet bucket was deleted and created again; relisting and rewriting every manifest above what its agent has seen");
                                    metrics.replaced_bucket();
                                    created = Some(info.created);
                                    store = now;
                                    continue 'relist;
                                }
                                Some(_) => {}
                                None => created = Some(info.created),
                            },
                            Err(error) => tracing::warn!(error = %execute::error_chain(&error), "cannot check the fleet bucket; retrying"),
                        }
                    }
                    // Cancel-safe: a timer.
                    _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                        retry_at = None;
                        dirty = true;
                    }
                    // Cancel-safe: a timer; the judgement runs after the select.
                    _ = tokio::time::sleep_until(judge_at.unwrap_or_else(Instant::now)), if judge_at.is_some() => {
                        judge_at = None;
                        state.rollouts.due = true;
                    }
                    // Cancel-safe: a timer; pings only while the loop turns.
                    _ = tokio::time::sleep_until(service.next_ping().unwrap_or_else(Instant::now)), if service.next_ping().is_some() => {
                        service.ping();
                    }
                    // Cancel-safe: a watch channel.
                    () = leadership.took() => {
                        // Continue from what the last leader stored, not
                        // from what this instance held when it last led.
                        state.rollouts = Default::default();
                        state.rollouts.due = true;
                        state.memo.dirty.all = true;
                        dirty = true;
                    }
                }
                if replayed
                    && leadership.acting()
                    && state.rollouts.due
                    && state.rollouts.rolling()
                    && state.memo.rendered.is_some()
                {
                    let due = judged_at + gap;
                    if Instant::now() < due {
                        judge_at = Some(judge_at.map_or(due, |at| at.min(due)));
                    } else {
                        judged_at = Instant::now();
                        // Bounded: a read stalled on a stream whose leader
                        // just died must not hold up the loop.
                        // The first read of every status may be large.
                        let limit = match state.rollouts.tracked {
                            Some(_) => JUDGE_READ_LIMIT,
                            None => JUDGE_READ_LIMIT * 10,
                        };
                        let judged = tokio::time::timeout(
                            limit,
                            rollouts::judge(&mut state, &store, &heartbeats, &config.thresholds),
                        )
                        .await;
                        match judged {
                            Ok(Ok(moved)) => {
                                dirty |= moved;
                                gap = (judged_at.elapsed() * 2).max(MIN_JUDGE_GAP);
                            }
                            // A failed read says nothing of the fleet's size:
                            // judge again after the usual recheck.
                            Ok(Err(error)) => {
                                state.rollouts.due = true;
                                tracing::warn!(error = %execute::error_chain(&error), "cannot read the fleet to judge rollouts; retrying");
                            }
                            Err(_) => {
                                state.rollouts.due = true;
                                tracing::warn!(?limit, "reading the fleet to judge rollouts took too long; retrying");
                            }
                        }
                        judge_at = Some(Instant::now() + config.rollout_recheck);
                    }
                }
                if replayed && dirty && leadership.acting() {
                    dirty = false;
                    let started = Instant::now();
                    let report = execute::pass(
                        &mut state,
                        &store,
                        config.publish_concurrency,
                        &config.heartbeat,
                        || leadership.acting(),
                    )
                    .await;
                    metrics.pass(
                        report.agents_rendered,
                        report.manifests_written,
                        report.statuses_written,
                        started.elapsed(),
                    );
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
                if replayed && state.rollouts.rolling() && state.rollouts.due {
                    // A pass started a rollout: judge it at once.
                    judge_at = Some(judged_at + gap);
                }
                if replayed {
                    metrics.settled(seen);
                    metrics.loaded();
                    service.ready();
                }
                metrics.set_acting(leadership.acting());
                service.status(leadership.acting());
            }
        }
    }
    .await;
    leadership.stop().await;
}

/// The longest a judgement's reads may take before it is tried again (ten
/// times this for the first, which reads every agent's status).
const JUDGE_READ_LIMIT: Duration = Duration::from_secs(3);

/// The least time between two judgements of the rollouts (each reads every
/// agent's status and heartbeat; larger fleets wait longer, see `gap`).
const MIN_JUDGE_GAP: Duration = Duration::from_millis(10);

/// The next stream-deleted advisory, or never without a subscription.
async fn next_advisory(advisories: &mut Option<async_nats::Subscriber>) -> Option<()> {
    match advisories {
        Some(s) => s.next().await.map(|_| ()),
        None => std::future::pending().await,
    }
}

#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error(transparent)]
    Bucket(#[from] BucketError),
    #[error("cannot read the bucket's stream info")]
    Status(#[source] async_nats::jetstream::kv::StatusError),
}

/// The fleet bucket as it is now — created again, with its RePublish rule,
/// if it went missing — and its stream info (whose creation time tells a
/// recreated bucket from the one being watched).
async fn check_bucket(
    js: &jetstream::Context,
    bucket: &BucketName,
    replicas: flotilla_nats::Replicas,
) -> Result<(Store, async_nats::jetstream::stream::Info), CheckError> {
    let store = ensure_bucket(js, bucket, replicas).await?;
    let status = store.status().await.map_err(CheckError::Status)?;
    Ok((store, status.info))
}
