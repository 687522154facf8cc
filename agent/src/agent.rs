//! The agent's event loop: the one place where manifest updates, reconnects,
//! the resync timer and shutdown meet. Slow work (reconciling, writing
//! status, heartbeats, direct gets) runs beside it in tasks of its own.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use manifest_types::{AgentInventory, ApiVersion, Rejection, keys};
use rand::Rng;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::gate::{Accepted, Decision, Gate};
use crate::kv::{AgentKv, KvError, KvValue};
use crate::reconcile::Reconcilers;
use crate::report::{self, HistoryResets};
use crate::service::{self, Liveness};
use crate::state::{CachedManifest, StateDir, StateError};
use crate::status::{StatusBoard, agent_build};
use crate::worker::Worker;

/// Longest random delay before the direct get that follows a (re)connect.
const RECONNECT_JITTER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot set up the NATS connection")]
    Connect(#[source] async_nats::Error),
    #[error("cannot subscribe to {subject}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("the heartbeat bucket beside {bucket} has no valid name")]
    HeartbeatBucket {
        bucket: manifest_types::BucketName,
        #[source]
        source: manifest_types::IdError,
    },
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let state = StateDir::open(&config.state_dir)?;
    let instance_id = state.instance_id()?;
    let gate = Gate {
        agent_id: config.agent_id.clone(),
        trust: config.trust.clone(),
        roots: config.file_roots.clone(),
        containers: config.container_policy.clone(),
    };
    let (board, statuses) = StatusBoard::new(config.agent_id.clone(), instance_id.clone());
    let (desired_tx, desired_rx) = watch::channel(None);
    let resync = Arc::new(Notify::new());
    let mut tasks = JoinSet::new();

    // Converge from the cached manifest first: the network may be down.
    let mut current: Option<Accepted> = None;
    if let Some(cached) = state.load_manifest()? {
        match gate.decide(&cached.bytes, cached.revision, None) {
            Decision::Accept(a) => {
                tracing::info!(
                    generation = a.manifest.generation,
                    "converging from the cached manifest"
                );
                board.observed(a.revision, Some(a.manifest.generation));
                board.accepted(a.manifest.generation, a.manifest.resources.len());
                desired_tx.send_replace(Some(Arc::new(a.manifest.clone())));
                current = Some(*a);
            }
            // Tampered with on disk, or no longer trusted: not run, and said.
            Decision::Reject(r) => {
                tracing::warn!(reason = %r.reason, message = %r.message, "cached manifest rejected; not converging from it");
                board.rejected(r);
            }
            Decision::Unchanged => {}
        }
    }
    let reconcilers = Arc::new(Reconcilers::new(state.clone(), &config)?);
    tasks.spawn(
        Worker::new(reconcilers.clone(), board.clone())
            .with_concurrency(config.reconcile_concurrency)
            .run(desired_rx, resync.clone()),
    );

    let heartbeat_bucket = manifest_types::BucketName::new(keys::heartbeat_bucket(&config.bucket))
        .map_err(|source| AgentError::HeartbeatBucket {
            bucket: config.bucket.clone(),
            source,
        })?;
    let live = Arc::new(Liveness::default());
    live.beat();
    let (epoch_tx, epoch_rx) = watch::channel(0u64);
    let client = connect(&config, epoch_tx, live.clone()).await?;
    let subject = keys::republish_subject(&config.bucket, &config.agent_id);
    let mut sub = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| AgentError::Subscribe {
            subject,
            source: e.into(),
        })?;
    let kv = AgentKv::new(
        client.clone(),
        config.bucket.clone(),
        config.agent_id.clone(),
    );

    // The first heartbeat goes out before the first status (see
    // report::heartbeat and report::status_writer).
    let (first_beat, beaten) = tokio::sync::oneshot::channel();
    tasks.spawn(report::heartbeat(
        kv.beside(heartbeat_bucket.clone()),
        kv.clone(),
        board.clone(),
        config.heartbeat_interval,
        epoch_rx.clone(),
        first_beat,
    ));

    let history = HistoryResets::default();
    tasks.spawn(report::status_writer(
        kv.clone(),
        board.clone(),
        statuses,
        epoch_rx.clone(),
        history.clone(),
        config.resync_interval,
        beaten,
    ));
    let (inventory_tx, inventory_rx) = watch::channel(inventory(&config, &instance_id));
    tasks.spawn(report::register(
        kv.clone(),
        inventory_rx,
        epoch_rx.clone(),
        history.clone(),
    ));
    tasks.spawn(probe_engines(
        reconcilers,
        inventory_tx,
        config.resync_interval.max(ENGINE_PROBE_MIN),
    ));

    tasks.spawn(service::supervise(live.clone(), board.clone()));
    // Up and converging (from the cache if there is one), connected or not.
    service::notify_ready();

    let mut resets = history.subscribe();
    let (cache_tx, cache_rx) = watch::channel(None);
    tasks.spawn(cache_writer(state, cache_rx));
    let mut looper = Loop {
        gate,
        cache: cache_tx,
        board,
        desired_tx,
        last_revision: current.as_ref().map_or(0, |c| c.revision),
        current,
        history,
    };
    let (fetched_tx, mut fetched) = mpsc::channel(4);
    let mut connected = epoch_rx;
    let resync_timer = tokio::time::sleep(report::jittered(config.resync_interval));
    let fetch_timer = tokio::time::sleep(Duration::MAX);
    let unanswered = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(shutdown, resync_timer, fetch_timer, unanswered);
    let mut answers = kv.answers();
    let mut fetch_armed = false;
    let key = keys::desired_state(&config.agent_id);
    let mut beat = tokio::time::interval(service::BEAT);

    loop {
        live.beat();
        tokio::select! {
            // Cancel-safe: a pinned future polled to completion once.
            () = &mut shutdown => break,
            // Cancel-safe: Interval::tick.
            _ = beat.tick() => {
                #[cfg(feature = "fault-injection")]
                fault_wedge(&config.state_dir);
            }
            // Cancel-safe: Subscriber::next does not lose a message when dropped.
            msg = sub.next() => {
                let Some(msg) = msg else { break };
                match msg.headers.as_ref().and_then(|h| h.get("Nats-Sequence")).and_then(|v| v.as_str().parse().ok()) {
                    Some(revision) => {
                        let value = KvValue::from_parts(revision, msg.headers.as_ref(), msg.payload);
                        if looper.republished(value) == Heard::Older {
                            // A late message, or a restarted history: a direct get tells.
                            spawn_fetch(&kv, &key, looper.last_revision, &fetched_tx);
                        }
                    }
                    None => tracing::warn!(subject = %msg.subject, "republished message without Nats-Sequence; ignoring it"),
                }
            }
            // Cancel-safe: `changed` only marks the value seen.
            changed = resets.changed() => {
                if changed.is_err() { break }
                spawn_fetch(&kv, &key, looper.last_revision, &fetched_tx);
            }
            // Cancel-safe: `changed` only marks the epoch seen.
            changed = connected.changed() => {
                if changed.is_err() { break }
                let delay = rand::rng().random_range(Duration::ZERO..RECONNECT_JITTER);
                fetch_timer.as_mut().reset(tokio::time::Instant::now() + delay);
                fetch_armed = true;
            }
            () = &mut fetch_timer, if fetch_armed => {
                fetch_armed = false;
                spawn_fetch(&kv, &key, looper.last_revision, &fetched_tx);
            }
            // Cancel-safe: `changed` only marks the value seen.
            changed = answers.changed() => {
                if changed.is_err() { break }
                if *answers.borrow_and_update() {
                    tracing::info!("the fleet's JetStream answers again; reading this agent's key");
                    spawn_fetch(&kv, &key, looper.last_revision, &fetched_tx);
                    unanswered.as_mut().reset(tokio::time::Instant::now() + Duration::MAX / 4);
                } else {
                    if live.connected() {
                        warn_unanswered(&config.nats_url);
                    }
                    unanswered.as_mut().reset(tokio::time::Instant::now() + UNANSWERED_RETRY);
                }
            }
            // While JetStream does not answer: say so again, and ask again.
            () = &mut unanswered => {
                // Disconnected, the connection's own log line says it all.
                if live.connected() {
                    warn_unanswered(&config.nats_url);
                }
                unanswered.as_mut().reset(tokio::time::Instant::now() + UNANSWERED_RETRY);
                spawn_fetch(&kv, &key, looper.last_revision, &fetched_tx);
            }
            () = &mut resync_timer => {
                resync_timer.as_mut().reset(tokio::time::Instant::now() + report::jittered(config.resync_interval));
                spawn_fetch(&kv, &key, looper.last_revision, &fetched_tx);
                resync.notify_one();
            }
            // Cancel-safe: mpsc::Receiver::recv.
            Some((handled_before, result)) = fetched.recv() => match result {
                Ok(value) => looper.fetched(handled_before, value),
                Err(e) => tracing::debug!(error = %e, "desired-state get failed; will retry on reconnect or resync"),
            },
        }
    }
    tracing::info!("shutting down");
    service::notify_stopping();
    tasks.abort_all();
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
    Ok(())
}

/// While the fleet's JetStream does not answer, how often the agent says so
/// and reads its key again (the first read that succeeds ends it).
const UNANSWERED_RETRY: Duration = Duration::from_secs(15);

fn warn_unanswered(url: &str) {
    tracing::warn!(nats = %url, "connected to NATS, but the fleet's JetStream does not answer (a leaf node whose uplink is down, a cluster without a quorum, or an account without JetStream?); converging from the last good manifest and asking again");
}

/// A direct get's answer, with the highest revision handled when it was sent.
type Fetched = (u64, Result<Option<KvValue>, KvError>);

fn spawn_fetch(kv: &AgentKv, key: &str, handled_before: u64, tx: &mpsc::Sender<Fetched>) {
    let (kv, key, tx) = (kv.clone(), key.to_owned(), tx.clone());
    tokio::spawn(async move {
        let _ = tx.send((handled_before, kv.get(&key).await)).await;
    });
}

/// How a republished value relates to what the loop has handled.
#[derive(Debug, PartialEq, Eq)]
enum Heard {
    /// Newer: evaluated.
    New,
    /// The revision handled last, heard again.
    Again,
    /// Below the revision handled last: late, or the history restarted.
    Older,
}

/// Caches each accepted manifest in the state directory, newest first
/// (a backlog collapses to the latest), with the writes and fsyncs on the
/// blocking pool: a slow SD card never holds up the event loop or the
/// watchdog. Should the agent die before a write lands, it starts from the
/// previous cache and hears of the newer manifest again from NATS.
async fn cache_writer(state: StateDir, mut accepted: watch::Receiver<Option<CachedManifest>>) {
    while accepted.changed().await.is_ok() {
        let Some(m) = accepted.borrow_and_update().clone() else {
            continue;
        };
        let state = state.clone();
        match tokio::task::spawn_blocking(move || state.save_manifest(&m)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot cache the accepted manifest; converging anyway")
            }
            Err(e) => tracing::error!(error = %e, "the manifest cache task failed"),
        }
    }
}

/// State owned by the event loop.
struct Loop {
    gate: Gate,
    /// Accepted manifests to cache; written by [`cache_writer`], off the loop.
    cache: watch::Sender<Option<CachedManifest>>,
    board: StatusBoard,
    desired_tx: watch::Sender<Option<Arc<manifest_types::AgentManifest>>>,
    current: Option<Accepted>,
    /// Highest desired-state revision handled (from the cached manifest at
    /// start); republished values at or below it are not evaluated again.
    last_revision: u64,
    history: HistoryResets,
}

impl Loop {
    /// A value heard on the RePublish subject.
    fn republished(&mut self, value: KvValue) -> Heard {
        let revision = value.revision();
        if revision < self.last_revision {
            return Heard::Older;
        }
        if revision == self.last_revision {
            return Heard::Again;
        }
        self.evaluate(value);
        Heard::New
    }

    /// The answer of a direct get sent when `handled_before` was the highest
    /// revision handled. A direct get answers with the key's current value,
    /// so an answer below `handled_before` means the key's history restarted
    /// (the bucket was deleted and created again, revisions start at 1): it
    /// is the truth now, and goes through the gate, whose replay floor is by
    /// generation. An answer at or below what was handled since is late, and
    /// so is one sent before a restart already seen (revisions only go back
    /// at a restart, so `handled_before` is then above `last_revision`).
    fn fetched(&mut self, handled_before: u64, value: Option<KvValue>) {
        let revision = value.as_ref().map_or(0, KvValue::revision);
        let restarted = revision < handled_before && handled_before <= self.last_revision;
        if restarted {
            tracing::warn!(
                revision,
                handled_before,
                "desired-state revision went back: the bucket's history restarted; evaluating the current value afresh"
            );
            self.last_revision = 0;
            self.history.restarted("desired-state get");
        }
        match value {
            Some(v) if v.revision() > self.last_revision => self.evaluate(v),
            Some(_) => {}
            None if self.last_revision == 0 => self.missing(),
            None => {}
        }
    }

    fn evaluate(&mut self, value: KvValue) {
        let revision = value.revision();
        self.last_revision = revision;
        let bytes = match value {
            KvValue::Deleted { .. } => return self.deleted(revision),
            KvValue::Value { bytes, .. } => bytes,
        };
        match self.gate.decide(&bytes, revision, self.current.as_ref()) {
            Decision::Accept(a) => {
                let generation = a.manifest.generation;
                let cached = CachedManifest {
                    bytes: a.bytes.clone(),
                    revision,
                };
                self.cache.send_replace(Some(cached));
                tracing::info!(
                    generation,
                    revision,
                    resources = a.manifest.resources.len(),
                    "manifest accepted"
                );
                self.board.observed(revision, Some(generation));
                self.board.accepted(generation, a.manifest.resources.len());
                self.desired_tx
                    .send_replace(Some(Arc::new(a.manifest.clone())));
                self.current = Some(*a);
            }
            Decision::Unchanged => {
                let (generation, resources) = self.current.as_ref().map_or((0, 0), |c| {
                    (c.manifest.generation, c.manifest.resources.len())
                });
                self.board.observed(revision, Some(generation));
                self.board.accepted(generation, resources);
            }
            Decision::Reject(r) => {
                tracing::warn!(reason = %r.reason, message = %r.message, revision, generation = ?r.generation,
                    "manifest rejected; keeping the last good one");
                self.board.observed(revision, r.generation);
                self.board.rejected(r);
            }
        }
    }

    /// The key was deleted or purged by hand. The control plane never does
    /// that: keep running the last good manifest and say so.
    fn deleted(&mut self, revision: u64) {
        self.board.observed(revision, None);
        if self.current.is_some() {
            tracing::warn!(
                revision,
                "desired-state key deleted; keeping the last good manifest"
            );
            self.board.rejected(Rejection {
                reason: manifest_types::RejectionReason::DesiredStateDeleted,
                message: "the desired-state key was deleted or purged; the last good manifest keeps running".into(),
                revision,
                generation: None,
            });
        }
    }

    /// The key does not exist (never written, or gone with its bucket).
    fn missing(&mut self) {
        if self.current.is_some() {
            self.deleted(0);
        }
    }
}

fn inventory(config: &Config, instance_id: &str) -> AgentInventory {
    let build = agent_build();
    AgentInventory {
        api_version: ApiVersion,
        agent_id: config.agent_id.clone(),
        instance_id: instance_id.to_owned(),
        agent_version: build.version,
        arch: build.arch,
        os: build.os,
        hostname: std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty()),
        reconcilers: Reconcilers::available(),
        engines: Vec::new(),
        labels: config.labels.clone(),
    }
}

/// Engines are asked no more often than this, whatever the resync interval.
const ENGINE_PROBE_MIN: Duration = Duration::from_secs(5);

/// Asks the reconcilers' engines whether they answer, now and every
/// `period`, and puts the answer in the inventory when it changed (the
/// register task then rewrites `agents.<id>`).
async fn probe_engines(
    reconcilers: Arc<Reconcilers>,
    inventory: watch::Sender<AgentInventory>,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let engines = reconcilers.engines(Duration::from_secs(5)).await;
        inventory.send_if_modified(|inv| {
            if inv.engines == engines {
                return false;
            }
            for e in &engines {
                let before = inv.engines.iter().find(|b| b.kind == e.kind);
                if before.map(|b| b.reachable) != Some(e.reachable) {
                    match (&e.reachable, &e.message) {
                        (true, _) => tracing::info!(engine = %e.engine, version = ?e.version, "engine reachable"),
                        (false, m) => tracing::warn!(engine = %e.engine, message = ?m, "engine not reachable"),
                    }
                }
            }
            inv.engines = engines;
            true
        });
    }
}

/// Test-only: a `wedge` file in the state dir blocks the event loop forever
/// (the file is consumed, so the restarted agent runs normally).
#[cfg(feature = "fault-injection")]
fn fault_wedge(state_dir: &std::path::Path) {
    let trigger = state_dir.join("wedge");
    if std::fs::remove_file(&trigger).is_ok() {
        tracing::error!("fault injection: wedging the event loop");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

async fn connect(
    config: &Config,
    epoch: watch::Sender<u64>,
    live: Arc<Liveness>,
) -> Result<async_nats::Client, AgentError> {
    flotilla_nats::Connector::new(
        &config.nats_url,
        format!("flotilla-agent {}", config.agent_id),
        config.auth.clone(),
    )
    .inbox_prefix(keys::agent_inbox_prefix(&config.agent_id))
    .tls(&config.tls)
    .retry_on_initial_connect()
    .event_callback(move |event| {
        let epoch = epoch.clone();
        let live = live.clone();
        async move {
            match event {
                async_nats::Event::Connected => {
                    tracing::info!("connected to NATS");
                    live.set_connected(true);
                    epoch.send_modify(|e| *e += 1);
                }
                async_nats::Event::Disconnected => {
                    live.set_connected(false);
                    tracing::warn!("disconnected from NATS; converging from the last good manifest")
                }
                other => flotilla_nats::connect::log_event(&other),
            }
        }
    })
    .connect()
    .await
    .map_err(|e| AgentError::Connect(e.into()))
}
