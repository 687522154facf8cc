//! What the agent writes: its status (CAS, coalesced, identity-checked), its
//! heartbeat (own task, jittered, independent of reconciliation) and its
//! inventory (once, only when it changed).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use manifest_types::{AgentInventory, AgentStatus, ApiVersion, ConditionType, Heartbeat, keys};
use rand::Rng;
use tokio::sync::watch;

use crate::kv::{AgentKv, KvError, KvValue};
use crate::status::StatusBoard;

/// `base` ± 20 %, so a fleet restarted together does not act in lockstep.
pub fn jittered(base: Duration) -> Duration {
    let f = rand::rng().random_range(0.8..1.2);
    base.mul_f64(f)
}

/// Waits for `d` or until the connection epoch changes (a reconnect), whichever is first.
async fn pause(d: Duration, connected: &mut watch::Receiver<u64>) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        _ = connected.changed() => {}
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
/// direct get after a restart or a lost race. A stored status from another
/// `instanceId` is an identity conflict: reported (log, condition, heartbeat)
/// and re-checked each `recheck`, never overwritten.
pub async fn status_writer(
    kv: AgentKv,
    board: StatusBoard,
    mut statuses: watch::Receiver<Arc<AgentStatus>>,
    mut connected: watch::Receiver<u64>,
    recheck: Duration,
) {
    let key = keys::actual_state(kv.agent());
    let ours = board.current().instance_id.clone();
    let mut known: Option<u64> = None;
    let mut dirty = true;
    let mut failures = 0u32;
    loop {
        if !dirty {
            if statuses.changed().await.is_err() {
                return;
            }
            dirty = true;
        }
        if known.is_none() {
            let read = kv.get(&key).await;
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
                        pause(recheck, &mut connected).await;
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
                )
                .await;
            }
        }
    }
}

/// Publishes `heartbeat.<id>` every `interval` (jittered). Its KV timestamp,
/// which is server time, is the liveness signal.
pub async fn heartbeat(kv: AgentKv, board: StatusBoard, interval: Duration) {
    let key = keys::heartbeat(kv.agent());
    let mut seq = 0u64;
    // The first beat comes soon after start, spread over a second.
    let mut delay = jittered(Duration::from_millis(500));
    loop {
        tokio::time::sleep(delay).await;
        delay = jittered(interval);
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
        };
        let bytes = Bytes::from(serde_json::to_vec(&hb).expect("heartbeat serialises"));
        match tokio::time::timeout(interval, kv.put(&key, bytes)).await {
            Ok(Ok(_)) => tracing::trace!(seq, "heartbeat"),
            Ok(Err(e)) => tracing::debug!(error = %e, "heartbeat not delivered"),
            Err(_) => tracing::debug!("heartbeat timed out"),
        }
    }
}

/// Writes `agents.<id>` unless it already holds exactly `inventory`.
pub async fn register(kv: AgentKv, inventory: AgentInventory, mut connected: watch::Receiver<u64>) {
    let key = keys::inventory(kv.agent());
    let bytes = Bytes::from(serde_json::to_vec(&inventory).expect("inventory serialises"));
    let mut failures = 0;
    loop {
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
            Ok(()) => return,
            Err(e) => {
                failures += 1;
                tracing::debug!(error = %e, "inventory not registered yet; retrying");
                pause(
                    crate::worker::backoff(failures).min(Duration::from_secs(5)),
                    &mut connected,
                )
                .await;
            }
        }
    }
}
