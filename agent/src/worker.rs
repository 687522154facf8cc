//! The reconcile worker: runs beside the agent's event loop and converges
//! the newest accepted manifest.
//!
//! - Independent resources reconcile concurrently, at most
//!   [`Worker::concurrency`] at once, each as a task of its own: a long image
//!   pull or a unit job waiting out its timeout delays no other resource. A
//!   resource with `restartOn` waits until its inputs are settled, so a
//!   container replaced for a changed File starts with the new file in place.
//! - A newer manifest is taken at once. A reconcile whose resource it
//!   changes or drops is interrupted at a safe point (see
//!   [`crate::reconcile::Interrupt`]); reconciles of unchanged resources
//!   carry on and count for the new generation.
//! - Each resource has its own exponential backoff after failures;
//!   reconcilers say themselves when a good or pending state deserves another
//!   look ([`Outcome`]'s `recheck_after`).
//! - Removal is part of convergence: once every resource of a generation
//!   has been reconciled, a sweep removes what the manifest no longer lists
//!   — after any interrupted reconcile of a dropped resource has ended, and
//!   a resource that a newer manifest brings (back) meanwhile is reconciled
//!   only after the sweep, so the two never race over one unit, container
//!   or file.
//!   Removals that fail stay in the status (`removing`), keep Ready false and
//!   are retried with backoff.
//! - The status names a generation (`manifestGeneration`) only when every
//!   resource of it has been looked at and its removal sweep has run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use manifest_types::{
    AgentManifest, ManagedResource, ReleasedResource, RemovingResource, ResourceId, ResourceKind,
    ResourceSpec, ResourceState, ResourceStatus,
};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::reconcile::{self, Ctx, Interrupt, Outcome, Progress, Reconcilers, Removals};
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

/// The level a resource is reconciled at: its spec hash and the hash of its
/// `restartOn` inputs. A result for the same level is valid for any
/// generation that carries it.
fn level(r: &ManagedResource, m: &AgentManifest) -> String {
    format!(
        "{}:{}",
        r.spec_hash(),
        reconcile::inputs_hash(m, &r.restart_on)
    )
}

#[derive(Debug)]
struct Record {
    status: ResourceStatus,
    level: String,
    attempts: u32,
    /// When to look again (backoff, or the reconciler's recheck).
    retry_at: Option<Instant>,
    /// A drift check was asked for.
    drift: bool,
}

#[derive(Debug)]
struct InFlight {
    level: String,
    interrupt: watch::Sender<bool>,
}

enum Done {
    Resource {
        id: ResourceId,
        level: String,
        outcome: Outcome,
    },
    Removal {
        generation: u64,
        dropped: Vec<(ResourceId, ResourceKind)>,
        removals: Removals,
    },
}

#[derive(Debug, Default)]
struct Removal {
    /// Resources that left the manifest and are not confirmed removed.
    dropped: BTreeMap<ResourceId, ResourceKind>,
    /// Whether a sweep is in flight.
    running: bool,
    /// The manifest the sweep in flight removes against: it may remove
    /// anything that manifest does not list — also what a newer manifest
    /// brought meanwhile ([`held_by_sweep`]).
    sweeping: Option<Arc<AgentManifest>>,
    /// The generation the last finished sweep ran for.
    swept: u64,
    attempts: u32,
    retry_at: Option<Instant>,
    /// A sweep was asked for (drift check) while none was due.
    drift: bool,
    removing: Vec<RemovingResource>,
    released: Vec<ReleasedResource>,
}

#[derive(Debug)]
pub struct Worker {
    reconcilers: Arc<Reconcilers>,
    board: StatusBoard,
    /// Reconciles in flight at once.
    pub concurrency: usize,
    manifest: Option<Arc<AgentManifest>>,
    records: BTreeMap<ResourceId, Record>,
    in_flight: BTreeMap<ResourceId, InFlight>,
    removal: Removal,
    /// The generation the status may name (see the module doc).
    settled: u64,
}

/// Whether `r` (at level `lvl`) needs a reconcile now.
fn due(r: &ManagedResource, lvl: &str, record: Option<&Record>, now: Instant) -> bool {
    match record {
        None => true,
        Some(rec) if rec.level != lvl => true,
        Some(rec) => {
            rec.retry_at.is_some_and(|at| at <= now)
                || (rec.drift && !matches!(r.spec, ResourceSpec::Unsupported(_)))
        }
    }
}

/// The resources of `m` a sweep in flight against `swept` may remove: every
/// one `swept` does not list under the same id *and* host object (a File
/// moved to another path keeps its id, and the sweep removes by path). None
/// of them may be reconciled until the sweep ends: written first, it would
/// be removed after and still be reported Ready.
fn held_by_sweep(m: &AgentManifest, swept: Option<&AgentManifest>) -> BTreeSet<ResourceId> {
    let Some(swept) = swept else {
        return BTreeSet::new();
    };
    m.resources
        .iter()
        .filter(|r| {
            swept
                .resource(&r.id)
                .is_none_or(|old| old.spec.target() != r.spec.target())
        })
        .map(|r| r.id.clone())
        .collect()
}

/// Which resources to start now, in manifest order: due, not in flight, not
/// `held` (by a sweep), with no input of their `restartOn` due or in
/// flight, and no more than `limit` reconciles in flight in all (held ones
/// take no place). The scheduling decision, pure.
fn starts(
    m: &AgentManifest,
    levels: &BTreeMap<&ResourceId, String>,
    records: &BTreeMap<ResourceId, Record>,
    in_flight: &BTreeSet<ResourceId>,
    held: &BTreeSet<ResourceId>,
    now: Instant,
    limit: usize,
) -> BTreeSet<ResourceId> {
    let due: BTreeSet<&ResourceId> = m
        .resources
        .iter()
        .filter(|r| !in_flight.contains(&r.id) && due(r, &levels[&r.id], records.get(&r.id), now))
        .map(|r| &r.id)
        .collect();
    let mut picked = BTreeSet::new();
    for r in &m.resources {
        if in_flight.len() + picked.len() >= limit {
            break;
        }
        let inputs_busy = r
            .restart_on
            .iter()
            .any(|i| due.contains(i) || in_flight.contains(i));
        if due.contains(&r.id) && !inputs_busy && !held.contains(&r.id) {
            picked.insert(r.id.clone());
        }
    }
    picked
}

/// Whether the removal sweep runs now: once every resource of the
/// generation has been looked at (`looked_at`), then on drift checks and on
/// its own backoff — and never while a reconcile of a resource the manifest
/// no longer lists is still winding down, or that reconcile (a drift check
/// repairing a "manual stop") could undo what the sweep just removed.
fn sweep_due(
    removal: &Removal,
    in_flight: &BTreeMap<ResourceId, InFlight>,
    looked_at: bool,
    m: &AgentManifest,
    now: Instant,
) -> bool {
    !removal.running
        && looked_at
        && in_flight.keys().all(|id| m.resource(id).is_some())
        && (removal.swept != m.generation
            || removal.drift
            || removal.retry_at.is_some_and(|at| at <= now))
}

impl Worker {
    pub fn new(reconcilers: Arc<Reconcilers>, board: StatusBoard) -> Self {
        Self {
            reconcilers,
            board,
            concurrency: crate::config::DEFAULT_CONCURRENCY,
            manifest: None,
            records: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            removal: Removal::default(),
            settled: 0,
        }
    }

    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Runs until `desired` closes. `resync` asks for a drift check.
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Option<Arc<AgentManifest>>>,
        resync: Arc<Notify>,
    ) {
        let mut tasks: JoinSet<Done> = JoinSet::new();
        if let Some(m) = desired.borrow_and_update().clone() {
            self.take(m);
        }
        loop {
            // One instant for both: whatever is due at `now` is started (or
            // held back until a task finishes); the wake-up is strictly later.
            let now = Instant::now();
            self.schedule(&mut tasks, now);
            self.publish();
            let next = self.next_wakeup(now);
            tokio::select! {
                // Cancel-safe: `changed` only marks the value seen.
                changed = desired.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if let Some(m) = desired.borrow_and_update().clone() {
                        self.take(m);
                    }
                }
                // Cancel-safe: a missed notification is stored as a permit.
                () = resync.notified() => self.drift_check(),
                // Cancel-safe: JoinSet::join_next keeps unfinished tasks.
                Some(done) = tasks.join_next(), if !tasks.is_empty() => match done {
                    Ok(done) => self.finish(done),
                    Err(e) => tracing::error!(error = %e, "a reconcile task panicked"),
                },
                () = sleep_until_opt(next) => {}
            }
        }
        for f in self.in_flight.values() {
            let _ = f.interrupt.send(true);
        }
        tasks.shutdown().await;
    }

    /// A newer manifest: interrupt reconciles it makes stale, note what it
    /// dropped, and look at everything else again.
    fn take(&mut self, m: Arc<AgentManifest>) {
        if let Some(old) = &self.manifest {
            if old.generation == m.generation {
                return;
            }
            for r in &old.resources {
                if m.resource(&r.id).is_none()
                    && let Some(kind) = r.spec.kind()
                {
                    self.removal.dropped.insert(r.id.clone(), kind);
                }
            }
            self.removal.released.clear();
        }
        for (id, f) in &self.in_flight {
            let current = m.resource(id).map(|r| level(r, &m));
            if current.as_deref() != Some(f.level.as_str()) {
                tracing::info!(resource = %id, "a newer manifest changes this resource; interrupting its reconcile");
                let _ = f.interrupt.send(true);
            }
        }
        for id in m.resources.iter().map(|r| &r.id) {
            self.removal.dropped.remove(id);
        }
        self.records.retain(|id, _| m.resource(id).is_some());
        for rec in self.records.values_mut() {
            rec.drift = true;
        }
        self.manifest = Some(m);
    }

    /// The periodic resync: look at every resource again, except failed
    /// ones, which keep waiting for their backoff.
    fn drift_check(&mut self) {
        for rec in self.records.values_mut() {
            if !matches!(rec.status.state, ResourceState::Failed { .. }) {
                rec.drift = true;
            }
        }
        self.removal.drift = true;
    }

    /// Whether every resource has a result for its current level.
    fn all_looked_at(&self, m: &AgentManifest) -> bool {
        m.resources.iter().all(|r| {
            self.records
                .get(&r.id)
                .is_some_and(|rec| rec.level == level(r, m))
        })
    }

    /// Starts what is due, within the concurrency bound and `restartOn` order.
    fn schedule(&mut self, tasks: &mut JoinSet<Done>, now: Instant) {
        let Some(m) = self.manifest.clone() else {
            return;
        };
        let levels: BTreeMap<&ResourceId, String> =
            m.resources.iter().map(|r| (&r.id, level(r, &m))).collect();
        let picked = starts(
            &m,
            &levels,
            &self.records,
            &self.in_flight.keys().cloned().collect(),
            &held_by_sweep(&m, self.removal.sweeping.as_deref()),
            now,
            self.concurrency,
        );
        for r in m.resources.iter().filter(|r| picked.contains(&r.id)) {
            let lvl = levels[&r.id].clone();
            let (interrupt_tx, interrupt) = Interrupt::new();
            let resource = Arc::new(r.clone());
            let ctx = Ctx {
                progress: Progress::new(self.board.clone(), resource.clone()),
                interrupt,
            };
            let (reconcilers, manifest, id) = (self.reconcilers.clone(), m.clone(), r.id.clone());
            let task_level = lvl.clone();
            tasks.spawn(async move {
                let outcome = reconcilers.reconcile(&resource, &manifest, ctx).await;
                Done::Resource {
                    id,
                    level: task_level,
                    outcome,
                }
            });
            if let Some(rec) = self.records.get_mut(&r.id) {
                rec.drift = false;
            }
            self.in_flight.insert(
                r.id.clone(),
                InFlight {
                    level: lvl,
                    interrupt: interrupt_tx,
                },
            );
        }
        if sweep_due(
            &self.removal,
            &self.in_flight,
            self.all_looked_at(&m),
            &m,
            now,
        ) {
            self.removal.running = true;
            self.removal.drift = false;
            self.removal.sweeping = Some(m.clone());
            let dropped: Vec<_> = self
                .removal
                .dropped
                .iter()
                .map(|(id, k)| (id.clone(), *k))
                .collect();
            let (reconcilers, manifest) = (self.reconcilers.clone(), m.clone());
            tasks.spawn(async move {
                let removals = reconcilers.remove_unlisted(&manifest, &dropped).await;
                Done::Removal {
                    generation: manifest.generation,
                    dropped,
                    removals,
                }
            });
        }
    }

    fn finish(&mut self, done: Done) {
        match done {
            Done::Resource { id, level, outcome } => {
                self.in_flight.remove(&id);
                self.board.clear_progress(&id);
                let Some(m) = self.manifest.clone() else {
                    return;
                };
                let Some(r) = m.resource(&id) else { return };
                if outcome == Outcome::Interrupted {
                    return;
                }
                // A result for a level the manifest no longer has is stale.
                if self::level(r, &m) != level {
                    return;
                }
                let previous = self.records.remove(&id).filter(|p| p.level == level);
                let record = next_record(previous, outcome, r, level);
                self.records.insert(id, record);
            }
            Done::Removal {
                generation,
                dropped,
                removals,
            } => {
                self.removal.running = false;
                self.removal.sweeping = None;
                self.removal.swept = generation;
                let failed: BTreeSet<&ResourceId> =
                    removals.failed.iter().map(|(id, _, _)| id).collect();
                for (id, _) in &dropped {
                    if !failed.contains(id) {
                        self.removal.dropped.remove(id);
                    }
                }
                for r in removals.released {
                    if !self.removal.released.contains(&r) {
                        self.removal.released.push(r);
                    }
                }
                if removals.failed.is_empty() {
                    self.removal.attempts = 0;
                    self.removal.retry_at = None;
                    self.removal.removing.clear();
                } else {
                    self.removal.attempts += 1;
                    let delay = backoff(self.removal.attempts);
                    self.removal.retry_at = Some(Instant::now() + delay);
                    self.removal.removing = removals
                        .failed
                        .into_iter()
                        .map(|(id, kind, f)| {
                            tracing::warn!(resource = %id, reason = %f.reason, message = %f.message,
                                attempts = self.removal.attempts, retry_in = ?delay, "removal failed");
                            self.removal.dropped.insert(id.clone(), kind);
                            RemovingResource {
                                id,
                                kind: kind.to_string(),
                                reason: f.reason.into(),
                                message: f.message,
                                attempts: self.removal.attempts,
                                retry_after_seconds: Some(delay.as_secs()),
                            }
                        })
                        .collect();
                }
            }
        }
    }

    /// Hands the board what the worker knows.
    fn publish(&mut self) {
        let Some(m) = &self.manifest else { return };
        if self.all_looked_at(m) && self.removal.swept == m.generation {
            self.settled = m.generation;
        }
        let statuses = self
            .records
            .iter()
            .map(|(id, r)| (id.clone(), r.status.clone()))
            .collect();
        self.board.set_resources(
            self.settled,
            statuses,
            self.removal.released.clone(),
            self.removal.removing.clone(),
        );
    }

    /// The next retry or recheck still ahead. One already due but held back
    /// (by the concurrency bound, an input in flight, or a resource not yet
    /// looked at) is started when a task finishes, so it never spins the loop.
    fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        self.records
            .iter()
            .filter(|(id, _)| !self.in_flight.contains_key(*id))
            .filter_map(|(_, r)| r.retry_at)
            .chain(self.removal.retry_at.filter(|_| !self.removal.running))
            .filter(|at| *at > now)
            .min()
    }
}

fn next_record(
    previous: Option<Record>,
    outcome: Outcome,
    r: &ManagedResource,
    level: String,
) -> Record {
    let kind = r.spec.kind_str();
    let prev_state = previous.as_ref().map(|p| &p.status.state);
    let since = |same: bool| match (same, prev_state) {
        (true, Some(ResourceState::Ready { since, .. } | ResourceState::Failed { since, .. })) => {
            since.clone()
        }
        _ => now_rfc3339(),
    };
    let now = Instant::now();
    let (state, attempts, retry_at) = match outcome {
        Outcome::Ready {
            details,
            recheck_after,
        } => {
            let was_ready = matches!(prev_state, Some(ResourceState::Ready { .. }));
            (
                ResourceState::Ready {
                    since: since(was_ready),
                    details,
                },
                0,
                recheck_after.map(|d| now + d),
            )
        }
        Outcome::Waiting {
            message,
            recheck_after,
        } => (
            ResourceState::Reconciling { message },
            0,
            Some(now + recheck_after),
        ),
        Outcome::Failed(f) => {
            let attempts = previous.as_ref().map_or(0, |p| p.attempts) + 1;
            let delay = backoff(attempts);
            let was_failed = matches!(prev_state, Some(ResourceState::Failed { .. }));
            tracing::warn!(resource = %r.id, kind, reason = %f.reason, message = %f.message, attempts, retry_in = ?delay, "resource failed");
            (
                ResourceState::Failed {
                    since: since(was_failed),
                    reason: f.reason.into(),
                    message: f.message,
                    attempts,
                    retry_after_seconds: Some(delay.as_secs()),
                },
                attempts,
                Some(now + delay),
            )
        }
        Outcome::Unsupported(reason) => (ResourceState::Unsupported { reason }, 0, None),
        // Filtered out by the caller; kept total for safety.
        Outcome::Interrupted => (ResourceState::Pending, 0, Some(now)),
    };
    Record {
        status: ResourceStatus {
            kind: kind.to_owned(),
            spec_hash: r.spec_hash(),
            source: r.source.clone(),
            state,
        },
        level,
        attempts,
        retry_at,
        drift: false,
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
    use manifest_types::FailureReason;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(30), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    fn resource() -> ManagedResource {
        let m = serde_json::json!({
            "apiVersion": "flotilla.dev/v1", "agentId": "a", "generation": 1,
            "resources": [{"id": "d/a", "kind": "File", "spec": {"path": "/etc/x", "content": "x"}}]
        });
        AgentManifest::from_json(m.to_string().as_bytes())
            .unwrap()
            .resources
            .remove(0)
    }

    #[tokio::test(start_paused = true)]
    async fn failures_count_attempts_and_keep_since() {
        let r = resource();
        let fail = || Outcome::failed(FailureReason::WriteFailed, "boom");
        let r1 = next_record(None, fail(), &r, "l".into());
        assert_eq!(r1.attempts, 1);
        let since1 = match &r1.status.state {
            ResourceState::Failed { since, .. } => since.clone(),
            s => panic!("{s:?}"),
        };
        let r2 = next_record(Some(r1), fail(), &r, "l".into());
        assert_eq!(r2.attempts, 2);
        match &r2.status.state {
            ResourceState::Failed {
                since,
                retry_after_seconds,
                attempts,
                reason,
                ..
            } => {
                assert_eq!(since, &since1);
                assert_eq!(*retry_after_seconds, Some(2));
                assert_eq!(*attempts, 2);
                assert_eq!(reason, "WriteFailed");
            }
            s => panic!("{s:?}"),
        }
        assert_eq!(r2.retry_at, Some(Instant::now() + Duration::from_secs(2)));
        let ready = next_record(
            Some(r2),
            Outcome::ready(manifest_types::ReadyDetails::File {
                sha256: String::new(),
                size: 0,
                mode: "0644".into(),
                uid: 0,
                gid: 0,
            }),
            &r,
            "l".into(),
        );
        assert_eq!(ready.attempts, 0);
        assert!(ready.retry_at.is_none());
    }

    fn manifest(resources: serde_json::Value) -> AgentManifest {
        let m = serde_json::json!({
            "apiVersion": "flotilla.dev/v1", "agentId": "a", "generation": 1,
            "resources": resources
        });
        AgentManifest::from_json(m.to_string().as_bytes()).unwrap()
    }

    fn files(ids: &[&str]) -> serde_json::Value {
        ids.iter()
            .enumerate()
            .map(|(n, id)| {
                serde_json::json!({"id": id, "kind": "File",
                    "spec": {"path": format!("/etc/x{n}"), "content": "x"}})
            })
            .collect()
    }

    fn ids(set: &BTreeSet<ResourceId>) -> Vec<String> {
        set.iter().map(ToString::to_string).collect()
    }

    /// [`starts`] at the levels `m` gives its resources, as ids.
    fn picks(
        m: &AgentManifest,
        records: &BTreeMap<ResourceId, Record>,
        in_flight: &BTreeSet<ResourceId>,
        held: &BTreeSet<ResourceId>,
        now: Instant,
        limit: usize,
    ) -> Vec<String> {
        let levels = m.resources.iter().map(|r| (&r.id, level(r, m))).collect();
        ids(&starts(m, &levels, records, in_flight, held, now, limit))
    }

    fn record_for(m: &AgentManifest, id: &str, retry_at: Option<Instant>, drift: bool) -> Record {
        let r = m.resource(&id.parse().unwrap()).unwrap();
        let mut rec = next_record(None, Outcome::Unsupported("x".into()), r, level(r, m));
        rec.retry_at = retry_at;
        rec.drift = drift;
        rec
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_waits_for_reconciles_of_dropped_resources_to_end() {
        let now = Instant::now();
        let mut m = manifest(files(&["d/a"]));
        m.generation = 2;
        let mut removal = Removal {
            swept: 1,
            ..Removal::default()
        };
        let in_flight = |ids: &[&str]| -> BTreeMap<ResourceId, InFlight> {
            ids.iter()
                .map(|id| {
                    let (interrupt, _) = watch::channel(true);
                    let level = String::new();
                    (id.parse().unwrap(), InFlight { level, interrupt })
                })
                .collect()
        };
        // A generation not yet swept: due once everything was looked at …
        assert!(sweep_due(&removal, &in_flight(&[]), true, &m, now));
        assert!(!sweep_due(&removal, &in_flight(&[]), false, &m, now));
        // … also with a listed resource in flight (a drift check) …
        assert!(sweep_due(&removal, &in_flight(&["d/a"]), true, &m, now));
        // … but not while a dropped resource's reconcile winds down.
        assert!(!sweep_due(&removal, &in_flight(&["d/gone"]), true, &m, now));
        // Swept: again only on a drift check or a due retry, one at a time.
        removal.swept = 2;
        assert!(!sweep_due(&removal, &in_flight(&[]), true, &m, now));
        removal.retry_at = Some(now);
        assert!(sweep_due(&removal, &in_flight(&[]), true, &m, now));
        removal.running = true;
        assert!(!sweep_due(&removal, &in_flight(&[]), true, &m, now));
    }

    #[tokio::test(start_paused = true)]
    async fn starts_what_is_due_within_the_bound_inputs_first() {
        let mut res = files(&["d/a", "d/b", "d/c"]);
        res.as_array_mut().unwrap().push(serde_json::json!({
            "id": "d/svc", "kind": "Container", "restartOn": ["d/a"],
            "spec": {"image": "x:1"}
        }));
        let m = manifest(res);
        let now = Instant::now();
        let none = BTreeMap::new();
        // Nothing looked at yet: all files start; the container waits for its input.
        let first = picks(&m, &none, &BTreeSet::new(), &BTreeSet::new(), now, 8);
        assert_eq!(first, ["d/a", "d/b", "d/c"]);
        // The bound counts what is already in flight.
        let busy: BTreeSet<ResourceId> = ["d/b".parse().unwrap()].into();
        assert_eq!(picks(&m, &none, &busy, &BTreeSet::new(), now, 2), ["d/a"]);
        // While its input is in flight the container still waits …
        let mut records: BTreeMap<ResourceId, Record> = ["d/b", "d/c"]
            .iter()
            .map(|id| (id.parse().unwrap(), record_for(&m, id, None, false)))
            .collect();
        let a: BTreeSet<ResourceId> = ["d/a".parse().unwrap()].into();
        assert!(picks(&m, &records, &a, &BTreeSet::new(), now, 8).is_empty());
        // … and starts once the input has its result.
        records.insert("d/a".parse().unwrap(), record_for(&m, "d/a", None, false));
        assert_eq!(
            picks(&m, &records, &BTreeSet::new(), &BTreeSet::new(), now, 8),
            ["d/svc"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_sweep_in_flight_holds_back_what_its_manifest_does_not_list() {
        let file = |id: &str, path: &str, content: &str| {
            serde_json::json!({"id": id, "kind": "File",
                "spec": {"path": path, "content": content}})
        };
        let swept = manifest(serde_json::json!([
            file("d/a", "/etc/a", "x"),
            file("d/b", "/etc/b", "x"),
        ]));
        let m = manifest(serde_json::json!([
            file("d/new", "/etc/new", "x"),
            file("d/b", "/etc/moved", "x"),
            file("d/a", "/etc/a", "changed"),
        ]));
        // New, and moved to a path the sweep would remove: held. Changed
        // in place: the sweep keeps its path, so it goes ahead.
        let held = held_by_sweep(&m, Some(&swept));
        assert_eq!(ids(&held), ["d/b", "d/new"]);
        assert!(held_by_sweep(&m, None).is_empty(), "no sweep, nothing held");
        // Held resources take no place in the bound.
        let none = BTreeMap::new();
        let picked = picks(&m, &none, &BTreeSet::new(), &held, Instant::now(), 1);
        assert_eq!(picked, ["d/a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_wait_for_their_time_and_drift_checks_look_again() {
        let m = manifest(files(&["d/a", "d/b"]));
        let now = Instant::now();
        let later = now + Duration::from_secs(2);
        let mut records: BTreeMap<ResourceId, Record> = BTreeMap::new();
        records.insert(
            "d/a".parse().unwrap(),
            record_for(&m, "d/a", Some(later), false),
        );
        records.insert("d/b".parse().unwrap(), record_for(&m, "d/b", None, false));
        assert!(picks(&m, &records, &BTreeSet::new(), &BTreeSet::new(), now, 8).is_empty());
        assert_eq!(
            picks(&m, &records, &BTreeSet::new(), &BTreeSet::new(), later, 8),
            ["d/a"]
        );
        // A drift check re-observes a File …
        records
            .get_mut(&"d/b".parse::<ResourceId>().unwrap())
            .unwrap()
            .drift = true;
        assert_eq!(
            picks(&m, &records, &BTreeSet::new(), &BTreeSet::new(), now, 8),
            ["d/b"]
        );
        // … a changed level is due at once, whatever the backoff says.
        let changed = manifest(serde_json::json!([
            {"id": "d/a", "kind": "File", "spec": {"path": "/etc/x0", "content": "new"}},
            {"id": "d/b", "kind": "File", "spec": {"path": "/etc/x1", "content": "x"}},
        ]));
        records
            .get_mut(&"d/b".parse::<ResourceId>().unwrap())
            .unwrap()
            .drift = false;
        assert_eq!(
            picks(
                &changed,
                &records,
                &BTreeSet::new(),
                &BTreeSet::new(),
                now,
                8
            ),
            ["d/a"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_reconciling_and_rechecked_when_the_reconciler_says() {
        let r = resource();
        let rec = next_record(
            None,
            Outcome::Waiting {
                message: "health: starting".into(),
                recheck_after: Duration::from_millis(500),
            },
            &r,
            "l".into(),
        );
        assert_eq!(
            rec.status.state,
            ResourceState::Reconciling {
                message: "health: starting".into()
            }
        );
        assert_eq!(rec.attempts, 0);
        assert_eq!(
            rec.retry_at,
            Some(Instant::now() + Duration::from_millis(500))
        );
    }
}
