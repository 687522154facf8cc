//! What the agent writes: its status (CAS, coalesced, identity-checked), its
//! heartbeat (own task, jittered, independent of reconciliation, into the
//! heartbeat bucket beside the fleet bucket; docs/adr/0015) and its
//! inventory (only when it changed).
//!
//! A fleet bucket deleted and created again takes the status and inventory
//! keys with it and restarts revisions at 1 ([`HistoryResets`],
//! docs/adr/0012): the status writer notices (its key is gone) and so does
//! the event loop (its key's revision went back); then the status is written
//! again from scratch, the inventory registered again and the manifest read
//! again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use manifest_types::{
    AgentInventory, AgentStatus, ApiVersion, ConditionType, Heartbeat, HeartbeatSettings, keys,
};
use rand::Rng;
use tokio::sync::{oneshot, watch};

use crate::kv::{AgentKv, KvError, KvValue};
use crate::status::StatusBoard;

/// Longest wait, counted from the first connection, for the first heartbeat
/// to be delivered before the first status is written anyway (a missing
/// heartbeat bucket must not keep the status from being written).
const FIRST_BEAT_WAIT: Duration = Duration::from_secs(2);

/// How soon an undelivered first heartbeat is tried again (doubling up to
/// the interval).
const FIRST_BEAT_RETRY: Duration = Duration::from_millis(100);

/// Longest wait for the fleet's heartbeat settings before a beat goes out
/// with the interval it has.
const SETTINGS_WAIT: Duration = Duration::from_millis(500);

/// `base` ± 20 %, so a fleet restarted together does not act in lockstep.
pub fn jittered(base: Duration) -> Duration {
    let f = rand::rng().random_range(0.8..1.2);
    base.mul_f64(f)
}

/// Waits for `d`, or until the connection epoch changes (a reconnect) or the
/// bucket's history restarts, whichever is first.
async fn pause(
    d: Duration,
    connected: &mut watch::Receiver<u64>,
    resets: &mut watch::Receiver<u64>,
) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        _ = connected.changed() => {}
        _ = resets.changed() => {}
    }
}

/// Tells the agent's tasks that the bucket's history restarted under them:
/// the bucket was deleted and created again, so the keys the agent writes are
/// gone and revisions start at 1 again. Any task that notices says so; every
/// task that depends on revisions or on its keys existing subscribes.
#[derive(Debug, Clone)]
pub struct HistoryResets(watch::Sender<u64>);

impl Default for HistoryResets {
    fn default() -> Self {
        Self(watch::channel(0).0)
    }
}

impl HistoryResets {
    /// Reports a restarted history, noticed by `by`.
    pub fn restarted(&self, by: &'static str) {
        tracing::warn!(
            noticed_by = by,
            "the bucket's history restarted (deleted and created again?); rewriting this agent's keys and reading its manifest again"
        );
        self.0.send_modify(|n| *n += 1);
    }

    /// A receiver that sees every later restart.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct InstanceProbe {
    instance_id: String,
}

fn instance_of(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<InstanceProbe>(bytes)
        .ok()
        .map(|p| p.instance_id)
}

/// Writes every new status with compare-and-swap on `actual-state.<id>`.
///
/// The revision to swap against comes from our own last write, or from a
/// direct get after a restart, a lost race or a restarted history. A stored
/// status from another `instanceId` is an identity conflict: reported (log,
/// condition, heartbeat) and re-checked each `recheck`, never overwritten.
/// The key found missing after this writer wrote it means the bucket was
/// created again: the status is created anew and the other tasks told.
///
/// Nothing is written before `first_beat` says the first heartbeat was
/// delivered (or `FIRST_BEAT_WAIT`, 2 s, after the first connection): a reader
/// that finds a status then finds a heartbeat too, and a starting agent never
/// looks Stale.
pub async fn status_writer(
    kv: AgentKv,
    board: StatusBoard,
    mut statuses: watch::Receiver<Arc<AgentStatus>>,
    mut connected: watch::Receiver<u64>,
    history: HistoryResets,
    recheck: Duration,
    first_beat: oneshot::Receiver<()>,
) {
    let mut connected_once = connected.clone();
    let bounded = async move {
        let _ = connected_once.wait_for(|epoch| *epoch > 0).await;
        tokio::time::sleep(FIRST_BEAT_WAIT).await;
    };
    tokio::select! {
        _ = first_beat => {}
        () = bounded => tracing::debug!("no heartbeat delivered yet; writing the status anyway"),
    }
    let key = keys::actual_state(kv.agent());
    let ours = board.current().instance_id.clone();
    let mut resets = history.subscribe();
    let mut known: Option<u64> = None;
    let mut wrote = false;
    let mut dirty = true;
    let mut failures = 0u32;
    loop {
        if !dirty {
            tokio::select! {
                changed = statuses.changed() => if changed.is_err() { return },
                // The key went with the old bucket: read it again, write it again.
                changed = resets.changed() => {
                    if changed.is_err() { return }
                    known = None;
                }
            }
            dirty = true;
        }
        if known.is_none() {
            let read = kv.get(&key).await;
            if matches!(read, Ok(None)) && std::mem::take(&mut wrote) {
                history.restarted("status writer");
                resets.borrow_and_update();
            }
            if matches!(read, Ok(None | Some(KvValue::Deleted { .. })))
                && board.identity_conflict().is_some()
            {
                tracing::info!(key, "status key free again; this installation takes over");
                board.set_identity_conflict(None);
            }
            match read {
                Ok(None) => known = Some(0),
                Ok(Some(KvValue::Deleted { revision })) => known = Some(revision),
                Ok(Some(KvValue::Value { revision, bytes })) => match instance_of(&bytes) {
                    Some(other) if other != ours => {
                        if board.identity_conflict().as_deref() != Some(other.as_str()) {
                            tracing::error!(
                                key, other_instance = %other, this_instance = %ours,
                                "identity conflict: another installation writes this agent's status; \
                                 not overwriting it (delete the key to let this one take over)"
                            );
                        }
                        board.set_identity_conflict(Some(other));
                        pause(recheck, &mut connected, &mut resets).await;
                        continue;
                    }
                    _ => {
                        board.set_identity_conflict(None);
                        known = Some(revision);
                    }
                },
                Err(e) => {
                    failures += 1;
                    tracing::debug!(error = %e, "cannot read own status key; retrying");
                    pause(
                        crate::worker::backoff(failures).min(Duration::from_secs(5)),
                        &mut connected,
                        &mut resets,
                    )
                    .await;
                    continue;
                }
            }
        }
        let status = statuses.borrow_and_update().clone();
        let bytes = Bytes::from(serde_json::to_vec(&*status).expect("status serialises"));
        match kv.write_if(&key, bytes, known.unwrap_or(0)).await {
            Ok(revision) => {
                failures = 0;
                known = Some(revision);
                wrote = true;
                dirty = false;
                tracing::debug!(
                    revision,
                    generation = status.manifest_generation,
                    "status written"
                );
            }
            Err(KvError::Conflict { .. }) => known = None,
            Err(e) => {
                failures += 1;
                tracing::debug!(error = %e, "status write failed; retrying with the newest status");
                pause(
                    crate::worker::backoff(failures).min(Duration::from_secs(5)),
                    &mut connected,
                    &mut resets,
                )
                .await;
            }
        }
    }
}

/// Every how many beats the heartbeat reads the fleet's interval setting.
pub const SETTINGS_EVERY: u64 = 4;

/// The longest interval the fleet setting is obeyed up to (readers believe
/// no longer one either).
pub const MAX_FLEET_INTERVAL: Duration = manifest_types::convergence::MAX_DECLARED_INTERVAL;

/// The interval to beat at: the longer of the agent's own and the fleet's
/// (capped at [`MAX_FLEET_INTERVAL`]).
pub fn effective_interval(configured: Duration, fleet: Option<Duration>) -> Duration {
    fleet.map_or(configured, |f| configured.max(f.min(MAX_FLEET_INTERVAL)))
}

/// Publishes `heartbeat.<id>` into the heartbeat bucket (`beats`; ADR 0015)
/// at the longer of `configured` and the fleet's interval setting
/// (`settings.heartbeat` in the fleet bucket, read every [`SETTINGS_EVERY`]
/// beats, and at the next beat after a read that failed), jittered. Each
/// beat declares the interval until the next one, so readers judge its
/// liveness by it; a longer interval is declared before it is waited. Its KV
/// timestamp, which is server time, is the liveness signal.
///
/// The first beat goes out at once and is tried again, from
/// `FIRST_BEAT_RETRY` (100 ms) doubling up to the interval, until the server has it;
/// `first` is told then, and the status writer waits for it, so a reader
/// never sees a fresh status without a heartbeat (which would look Stale).
/// Every (re)connection (`connected`) beats at once too: the status the
/// agent rewrites after an outage is not fresher than its heartbeat.
pub async fn heartbeat(
    beats: AgentKv,
    fleet: AgentKv,
    board: StatusBoard,
    configured: Duration,
    mut connected: watch::Receiver<u64>,
    first: oneshot::Sender<()>,
) {
    let key = keys::heartbeat(beats.agent());
    let mut seq = 0u64;
    let mut interval = configured;
    let mut fleet_interval: Option<Duration> = None;
    let mut first = Some(first);
    let mut retry = FIRST_BEAT_RETRY;
    let mut delay = Duration::ZERO;
    let mut settings_read = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            changed = connected.changed() => if changed.is_err() { return },
        }
        if seq.is_multiple_of(SETTINGS_EVERY) || !settings_read {
            // Bounded, so a slow read never holds the beat up.
            let read =
                tokio::time::timeout(SETTINGS_WAIT, fleet.get(keys::HEARTBEAT_SETTINGS)).await;
            settings_read = matches!(read, Ok(Ok(_)));
            match read {
                Ok(Ok(Some(KvValue::Value { bytes, .. }))) => {
                    match serde_json::from_slice::<HeartbeatSettings>(&bytes) {
                        Ok(s) => fleet_interval = Some(s.interval()),
                        Err(e) => {
                            tracing::debug!(error = %e, "unreadable heartbeat settings; keeping the last")
                        }
                    }
                }
                Ok(Ok(_)) => fleet_interval = None,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "heartbeat settings not read; keeping the last")
                }
                Err(_) => tracing::debug!("heartbeat settings read timed out; keeping the last"),
            }
            let next = effective_interval(configured, fleet_interval);
            if next != interval {
                tracing::info!(from = ?interval, to = ?next, "heartbeat interval changed by the fleet setting");
                interval = next;
            }
        }
        seq += 1;
        let status = board.current();
        let hb = Heartbeat {
            api_version: ApiVersion,
            agent_id: status.agent_id.clone(),
            instance_id: status.instance_id.clone(),
            seq,
            manifest_generation: status.manifest_generation,
            ready: status.condition_true(ConditionType::Ready),
            identity_conflict: board.identity_conflict(),
            interval_ms: Some(u64::try_from(interval.as_millis()).unwrap_or(u64::MAX)),
        };
        let bytes = Bytes::from(serde_json::to_vec(&hb).expect("heartbeat serialises"));
        let delivered = match tokio::time::timeout(interval, beats.put(&key, bytes)).await {
            Ok(Ok(revision)) => {
                tracing::trace!(seq, revision, "heartbeat");
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "heartbeat not delivered");
                false
            }
            Err(_) => {
                tracing::debug!("heartbeat timed out");
                false
            }
        };
        delay = match (&first, delivered) {
            (Some(_), false) => {
                let d = jittered(retry).min(interval);
                retry = retry.saturating_mul(2);
                d
            }
            _ => jittered(interval),
        };
        if delivered && let Some(tx) = first.take() {
            let _ = tx.send(());
        }
    }
}

/// Writes `agents.<id>` unless it already holds exactly the current
/// inventory; again whenever the inventory changes (an engine became
/// reachable or not) and each time the bucket's history restarts (the key
/// went with it).
pub async fn register(
    kv: AgentKv,
    mut inventories: watch::Receiver<AgentInventory>,
    mut connected: watch::Receiver<u64>,
    history: HistoryResets,
) {
    let key = keys::inventory(kv.agent());
    let mut resets = history.subscribe();
    let mut failures = 0;
    loop {
        let inventory = inventories.borrow_and_update().clone();
        let bytes = Bytes::from(serde_json::to_vec(&inventory).expect("inventory serialises"));
        let result = match kv.get(&key).await {
            Ok(Some(KvValue::Value { bytes: stored, .. }))
                if serde_json::from_slice::<AgentInventory>(&stored)
                    .ok()
                    .as_ref()
                    == Some(&inventory) =>
            {
                Ok(())
            }
            Ok(_) => kv
                .put(&key, bytes.clone())
                .await
                .map(|_| tracing::info!(key, "inventory registered")),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                failures = 0;
                // Again after a history reset, or when the inventory changed
                // (an engine came or went).
                let again = tokio::select! {
                    r = resets.changed() => r.is_ok(),
                    r = inventories.changed() => r.is_ok(),
                };
                if !again {
                    return;
                }
            }
            Err(e) => {
                failures += 1;
                tracing::debug!(error = %e, "inventory not registered yet; retrying");
                pause(
                    crate::worker::backoff(failures).min(Duration::from_secs(5)),
                    &mut connected,
                    &mut resets,
                )
                .await;
            }
        }
    }
}
