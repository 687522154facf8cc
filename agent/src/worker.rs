//! The reconcile worker: runs beside the agent's event loop, converging the
//! newest accepted manifest resource by resource. One failing resource never
//! blocks the others; each has its own exponential backoff.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use manifest_types::{
    AgentManifest, ReleasedResource, ResourceId, ResourceSpec, ResourceState, ResourceStatus,
};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::reconcile::{Outcome, Progress, Reconcilers};
use crate::status::{StatusBoard, now_rfc3339};

const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Delay before retry number `attempts` (1-based): 1 s, 2 s, 4 s … 5 min.
pub fn backoff(attempts: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(
            1u32.checked_shl(attempts.saturating_sub(1))
                .unwrap_or(u32::MAX),
        )
        .min(BACKOFF_MAX)
}

#[derive(Debug)]
struct Record {
    status: ResourceStatus,
    attempts: u32,
    retry_at: Option<Instant>,
}

#[derive(Debug)]
pub struct Worker {
    reconcilers: Reconcilers,
    records: BTreeMap<ResourceId, Record>,
    released: Vec<ReleasedResource>,
    generation: u64,
    board: StatusBoard,
}

impl Worker {
    pub fn new(reconcilers: Reconcilers, board: StatusBoard) -> Self {
        Self {
            reconcilers,
            records: BTreeMap::new(),
            released: Vec::new(),
            generation: 0,
            board,
        }
    }

    /// Runs until `desired` closes. `resync` asks for a drift check.
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Option<Arc<AgentManifest>>>,
        resync: Arc<Notify>,
    ) {
        let mut manifest = desired.borrow_and_update().clone();
        let mut drift_check = true;
        loop {
            if let Some(m) = &manifest {
                self.pass(m, drift_check).await;
            }
            drift_check = false;
            let next_retry = self.records.values().filter_map(|r| r.retry_at).min();
            tokio::select! {
                // Cancel-safe: `changed` only marks the value seen.
                changed = desired.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    manifest = desired.borrow_and_update().clone();
                    drift_check = true;
                }
                // Cancel-safe: a missed notification is stored as a permit.
                () = resync.notified() => drift_check = true,
                () = sleep_until_opt(next_retry) => {}
            }
        }
    }

    /// One pass over the manifest. `drift_check` re-observes every healthy
    /// resource; failed ones wait for their backoff unless the manifest changed.
    async fn pass(&mut self, m: &AgentManifest, drift_check: bool) {
        let new_generation = m.generation != self.generation;
        if new_generation {
            self.released.clear();
        }
        let now = Instant::now();
        // Resources with restartOn go after their inputs, so a container
        // replaced for a changed File starts with the new file in place.
        let mut order: Vec<_> = m.resources.iter().collect();
        order.sort_by_key(|r| !r.restart_on.is_empty());
        for r in order {
            let hash = r.spec_hash();
            let rec = self.records.get(&r.id);
            let due = match rec {
                None => true,
                Some(rec) if rec.status.spec_hash != hash || new_generation => true,
                Some(rec) => match rec.retry_at {
                    Some(at) => at <= now,
                    None => drift_check && !matches!(r.spec, ResourceSpec::Unsupported(_)),
                },
            };
            if !due {
                continue;
            }
            let progress = Progress::new(&self.board, r);
            let outcome = self.reconcilers.reconcile(r, m, &progress).await;
            let previous = self
                .records
                .remove(&r.id)
                .filter(|p| p.status.spec_hash == hash);
            let mut record =
                next_record(previous, outcome, r.spec.kind_str(), hash, r.source.clone());
            if record.retry_at.is_none()
                && let Some(after) = self.reconcilers.recheck_after(r)
            {
                // Ready, but young enough to look at again soon (a container
                // that was just started may still crash).
                record.retry_at = Some(Instant::now() + after);
            }
            self.records.insert(r.id.clone(), record);
        }
        self.records.retain(|id, _| m.resource(id).is_some());
        self.released
            .extend(self.reconcilers.remove_unlisted(m).await);
        self.generation = m.generation;
        let statuses = self
            .records
            .iter()
            .map(|(id, r)| (id.clone(), r.status.clone()))
            .collect();
        self.board
            .set_resources(m.generation, statuses, self.released.clone());
    }
}

fn next_record(
    previous: Option<Record>,
    outcome: Outcome,
    kind: &str,
    spec_hash: String,
    source: Option<manifest_types::ResourceSource>,
) -> Record {
    let prev_state = previous.as_ref().map(|p| &p.status.state);
    let since = |same: bool| match (same, prev_state) {
        (true, Some(ResourceState::Ready { since, .. } | ResourceState::Failed { since, .. })) => {
            since.clone()
        }
        _ => now_rfc3339(),
    };
    let (state, attempts, retry_at) = match outcome {
        Outcome::Ready(details) => {
            let was_ready = matches!(prev_state, Some(ResourceState::Ready { .. }));
            (
                ResourceState::Ready {
                    since: since(was_ready),
                    details,
                },
                0,
                None,
            )
        }
        Outcome::Failed { reason, message } => {
            let attempts = previous.as_ref().map_or(0, |p| p.attempts) + 1;
            let delay = backoff(attempts);
            let was_failed = matches!(prev_state, Some(ResourceState::Failed { .. }));
            tracing::warn!(kind, reason, %message, attempts, retry_in = ?delay, "resource failed");
            (
                ResourceState::Failed {
                    since: since(was_failed),
                    reason: reason.to_owned(),
                    message,
                    attempts,
                    retry_after_seconds: Some(delay.as_secs()),
                },
                attempts,
                Some(Instant::now() + delay),
            )
        }
        Outcome::Unsupported(reason) => (ResourceState::Unsupported { reason }, 0, None),
    };
    Record {
        status: ResourceStatus {
            kind: kind.to_owned(),
            spec_hash,
            source,
            state,
        },
        attempts,
        retry_at,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(30), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn failures_count_attempts_and_keep_since() {
        let fail = || Outcome::failed("X", "boom");
        let r1 = next_record(None, fail(), "File", "h".into(), None);
        assert_eq!(r1.attempts, 1);
        let since1 = match &r1.status.state {
            ResourceState::Failed { since, .. } => since.clone(),
            s => panic!("{s:?}"),
        };
        let r2 = next_record(Some(r1), fail(), "File", "h".into(), None);
        assert_eq!(r2.attempts, 2);
        match &r2.status.state {
            ResourceState::Failed {
                since,
                retry_after_seconds,
                attempts,
                ..
            } => {
                assert_eq!(since, &since1);
                assert_eq!(*retry_after_seconds, Some(2));
                assert_eq!(*attempts, 2);
            }
            s => panic!("{s:?}"),
        }
        let ready = next_record(
            Some(r2),
            Outcome::Ready(manifest_types::ReadyDetails::File {
                sha256: String::new(),
                size: 0,
                mode: "0644".into(),
                uid: 0,
                gid: 0,
            }),
            "File",
            "h".into(),
            None,
        );
        assert_eq!(ready.attempts, 0);
        assert!(ready.retry_at.is_none());
    }
}
