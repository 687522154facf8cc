//! The daemon's side of staged rollouts (docs/adr/0016): starting a rollout when a deployment with a policy gets a
//! new revision ([`prepare`], part of a pass's plan), judging rollouts on
//! every agent's status and heartbeat ([`judge`]: [`observe`] reads,
//! [`steps`] decides — the decisions being the pure [`crate::rollout`] —
//! and the state adopts them), and the history records a pass writes
//! (`revisions.<name>.<revision>`, [`plan_history`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream::kv::Store;
use manifest_types::convergence::{self, AgentReport, Target, Thresholds, Verdict};
use manifest_types::rollout::RevisionRecord;
use manifest_types::{AgentId, ApiVersion, Deployment, DeploymentName, ResourceId, keys};

use super::state::{Rollouts, State, Tracked};
use super::view::FleetView;
use crate::rollout::{self, Judge, Run};

static NO_LABELS: crate::render::Labels = crate::render::Labels::new();

/// The rollouts after this pass: one started for every deployment whose
/// policy applies and whose revision has none yet, a stored one continued
/// after a restart; those of deployments gone, and of new revisions without
/// a policy, dropped (a rollout in progress keeps the policy it started
/// with). True when a rollout was started or continued. `created` is the
/// creation order the pass resolves for deployments not yet rendered.
pub(crate) fn prepare(
    fleet: &FleetView,
    created: &BTreeMap<DeploymentName, u64>,
    runs: &BTreeMap<DeploymentName, Run>,
) -> (BTreeMap<DeploymentName, Run>, bool) {
    let mut runs = runs.clone();
    let mut due = false;
    runs.retain(|name, _| fleet.deployments.contains_key(name));
    for (name, d) in &fleet.deployments {
        let Ok(doc) = &d.document else { continue };
        // A rollout keeps the policy it started with, whatever happens to
        // the deployment's or the fleet's policy meanwhile.
        if runs
            .get(name)
            .is_some_and(|r| r.status.revision == d.revision)
        {
            continue;
        }
        // Its own policy, else the fleet's default.
        let Some(policy) = doc.rollout.as_ref().or(fleet.default_rollout.as_ref()) else {
            runs.remove(name);
            continue;
        };
        // A stored status of a deployment deleted and created again is
        // another deployment's: not continued, not a base.
        let created_revision = d.created_revision.or_else(|| created.get(name).copied());
        let stored = fleet
            .statuses
            .get(name)
            .and_then(|w| w.value.as_ref())
            .filter(|s| created_revision.is_none_or(|c| c == s.created_revision));
        let stored_rollout = stored.and_then(|s| s.rollout.as_ref());
        due = true;
        // A restarted control plane continues where the last one stopped.
        if let Some(r) = stored_rollout.filter(|r| r.revision == d.revision) {
            tracing::info!(deployment = %name, revision = d.revision, phase = %r.phase, wave = r.wave, "continuing a rollout");
            runs.insert(
                name.clone(),
                Run {
                    status: r.clone(),
                    moving: Default::default(),
                },
            );
            continue;
        }
        let rendered = stored
            .filter(|s| s.rollout.is_none())
            .map(|s| s.observed_revision);
        let previous = runs.get(name).map(|r| &r.status).or(stored_rollout);
        if previous.is_none() && rendered == Some(d.revision) {
            // Already rendered to every target at once.
            continue;
        }
        let control = fleet.controls.get(name).copied().unwrap_or_default();
        let run = rollout::start(d.revision, policy, previous, rendered, control);
        tracing::info!(deployment = %name, revision = d.revision, from = ?run.status.from, "starting a rollout");
        runs.insert(name.clone(), run);
    }
    (runs, due)
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub(crate) struct JudgeError(#[from] flotilla_nats::ReadError);

/// Judges every rollout in progress on the agents' statuses (held by the
/// watch while rollouts are in progress, seeded by one read) and one fresh
/// read of their heartbeats (server time). True when a rollout moved on, so
/// the deployment statuses must be written again (and, when an agent was
/// released or the phase or wave changed, the fleet rendered again).
pub(crate) async fn judge(
    state: &mut State,
    store: &Store,
    heartbeats: &Store,
    thresholds: &Thresholds,
) -> Result<bool, JudgeError> {
    state.rollouts.due = false;
    if state.memo.rendered.is_none() {
        return Ok(false);
    }
    observe(&mut state.rollouts, store, heartbeats).await?;
    let since = state
        .rollouts
        .beats
        .as_ref()
        .map_or(Duration::ZERO, |(read_at, _)| read_at.elapsed());
    let steps = steps(state, since, thresholds);
    Ok(adopt(state, steps))
}

/// Reads what judging needs: every agent's status once (the watch keeps
/// them current from then on) and, at most every [`BEATS_REFRESH`], the
/// heartbeats.
pub(crate) async fn observe(
    rollouts: &mut Rollouts,
    store: &Store,
    heartbeats: &Store,
) -> Result<(), JudgeError> {
    if rollouts.tracked.is_none() {
        let snapshot = flotilla_nats::read_family(store, keys::ACTUAL_STATE).await?;
        let mut tracked = BTreeMap::new();
        for (id, entry) in snapshot.family(keys::ACTUAL_STATE) {
            if let Ok(agent) = AgentId::new(id) {
                Tracked::record(&mut tracked, agent, entry);
            }
        }
        rollouts.tracked = Some(tracked);
    }
    // Liveness moves in heartbeat intervals, not milliseconds; between
    // reads, the server's clock and every age are carried forward by the
    // monotonic clock (`since` in [`steps`]), so no age looks younger than
    // it is.
    let fresh = rollouts
        .beats
        .as_ref()
        .is_some_and(|(at, _)| at.elapsed() < BEATS_REFRESH);
    if !fresh {
        let snapshot = flotilla_nats::read_family(heartbeats, keys::HEARTBEAT).await?;
        rollouts.beats = Some((tokio::time::Instant::now(), snapshot));
    }
    Ok(())
}

/// The next step of every rollout in progress that moves, decided on the
/// fleet view, the last render and what [`observe`] read, `since` that read
/// (no I/O; the decisions are [`crate::rollout`]'s).
pub(crate) fn steps(
    state: &State,
    since: Duration,
    thresholds: &Thresholds,
) -> BTreeMap<DeploymentName, Run> {
    let mut steps = BTreeMap::new();
    let (Some(rendered), Some((_, snapshot)), Some(tracked)) = (
        &state.memo.rendered,
        &state.rollouts.beats,
        &state.rollouts.tracked,
    ) else {
        return steps;
    };
    let fleet = &state.fleet;
    let now = snapshot.server_time + since;
    let beats = flotilla_nats::AgentReports::from_snapshot(snapshot);
    let report = |agent: &AgentId| -> AgentReport<'_> {
        let heard = beats.report(agent);
        let held = tracked.get(agent);
        AgentReport {
            status: held.and_then(|t| t.status.as_ref()),
            status_age: held.map(|t| now.duration_since(t.created).unwrap_or_default()),
            heartbeat_age: heard.heartbeat_age.map(|age| age + since),
            ..heard
        }
    };
    for (name, run) in &state.rollouts.runs {
        if run.status.phase.is_final() {
            continue;
        }
        let Some(record) = fleet.deployments.get(name) else {
            continue;
        };
        let (Ok(doc), Some(render)) = (&record.document, rendered.deployments.get(name)) else {
            continue;
        };
        // Judged only once the pass has started the rollout of this revision.
        if record.revision != run.status.revision {
            continue;
        }
        let history = fleet.history.get(name);
        // Resource ids per revision, as each agent's manifest carries them.
        let mut ids: BTreeMap<u64, Vec<ResourceId>> = BTreeMap::new();
        ids.insert(record.revision, convergence::deployment_resources(doc));
        for (r, d) in history.into_iter().flatten() {
            ids.entry(*r)
                .or_insert_with(|| convergence::deployment_resources(d));
        }
        let current: BTreeMap<&AgentId, Option<u64>> = render
            .targets
            .iter()
            .map(|a| (a, crate::render::current_revision(fleet.stored(a), name)))
            .collect();
        // Wave selectors see the labels the deployment's selector sees.
        let labels: Vec<_> = render
            .targets
            .iter()
            .map(|a| {
                doc.selector.labels(
                    fleet.labels.get(a).unwrap_or(&NO_LABELS),
                    fleet.registered.get(a).unwrap_or(&NO_LABELS),
                )
            })
            .collect();
        let targets: Vec<rollout::Target<'_>> = render
            .targets
            .iter()
            .zip(&labels)
            .map(|(a, labels)| rollout::Target {
                agent: a,
                labels,
                current: current[a],
            })
            .collect();
        let verdict = |agent: &AgentId, revision: Option<u64>| -> Verdict {
            let report: AgentReport<'_> = report(agent);
            // Not rendered for this agent (a value it lacks): it cannot
            // converge on the revision, and says so as every reader does.
            if revision == Some(record.revision)
                && let Some(f) = render.render_failures.iter().find(|f| &f.agent == agent)
            {
                return convergence::assess(
                    &report,
                    Target::Agent {
                        generation: u64::MAX,
                    },
                    thresholds,
                )
                .overridden(
                    convergence::State::Degraded,
                    convergence::Reason::RenderFailed {
                        resource: f.resource.clone(),
                        message: f.message.clone(),
                    },
                );
            }
            let Some(revision) = revision else {
                return convergence::assess(
                    &report,
                    Target::Agent {
                        generation: u64::MAX,
                    },
                    thresholds,
                );
            };
            let expected: Vec<ResourceId> = ids
                .get(&revision)
                .into_iter()
                .flatten()
                .filter(|id| {
                    !render
                        .conflicts
                        .iter()
                        .any(|c| &c.agent == agent && &c.resource == *id)
                })
                .cloned()
                .collect();
            // The generation carrying the revision, once written.
            let generation = match fleet.stored(agent) {
                Some(m) if current.get(agent) == Some(&Some(revision)) || expected.is_empty() => {
                    m.generation
                }
                _ => u64::MAX,
            };
            convergence::assess(
                &report,
                Target::Deployment {
                    name,
                    revision,
                    generation,
                    resources: &expected,
                },
                thresholds,
            )
        };
        let judge = Judge {
            name,
            control: fleet.controls.get(name).copied().unwrap_or_default(),
            targets: &targets,
            history: |r: u64| history.is_some_and(|h| h.contains_key(&r)),
            verdict,
            now,
        };
        let next = judge.step(run.clone());
        if next != *run {
            steps.insert(name.clone(), next);
        }
    }
    steps
}

/// Takes the rollouts' steps into the state; true when any moved.
pub(crate) fn adopt(state: &mut State, steps: BTreeMap<DeploymentName, Run>) -> bool {
    let changed = !steps.is_empty();
    for (name, next) in steps {
        let Some(run) = state.rollouts.runs.get_mut(&name) else {
            continue;
        };
        if renders_differently(&next, run) {
            state.memo.dirty.all = true;
        }
        if next.status.phase != run.status.phase || next.status.wave != run.status.wave {
            tracing::info!(deployment = %name, revision = next.status.revision, phase = %next.status.phase,
                wave = next.status.wave, waves = next.status.waves, message = next.status.message.as_deref().unwrap_or_default(),
                "rollout moved on");
        }
        *run = next;
    }
    if !state.rollouts.rolling() {
        // Nothing left to judge: stop holding statuses.
        state.rollouts.tracked = None;
        state.rollouts.beats = None;
    }
    changed
}

/// Whether the fleet must be rendered again: an agent released, a phase or
/// wave changed. New counts only change the deployment status, which a
/// pass writes without rendering anyone.
fn renders_differently(a: &Run, b: &Run) -> bool {
    a.moving != b.moving
        || a.status.phase != b.status.phase
        || a.status.wave != b.status.wave
        || a.status.from != b.status.from
}

/// How old a heartbeat read may be when a rollout is judged.
const BEATS_REFRESH: std::time::Duration = std::time::Duration::from_millis(250);

/// How many revisions of each deployment the history keeps (besides the
/// ones a rollout in progress renders from).
pub const HISTORY_LIMIT: usize = 10;

/// What a pass writes to the deployments' histories.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct HistoryPlan {
    /// New revisions to record, with the document each records.
    pub records: Vec<(RevisionRecord, Deployment)>,
    /// Revisions to purge, once every record above is written.
    pub trims: Vec<(DeploymentName, u64)>,
}

/// Every deployment revision not yet in its history, with a one-line
/// summary of the change from the revision before, and the trims that keep
/// each history to [`HISTORY_LIMIT`] (never a revision a rollout renders
/// from); a deleted deployment's history goes with it.
pub(crate) fn plan_history(fleet: &FleetView, runs: &BTreeMap<DeploymentName, Run>) -> HistoryPlan {
    let mut plan = HistoryPlan::default();
    let mut recorded = fleet.recorded.clone();
    for (name, d) in &fleet.deployments {
        let Ok(doc) = &d.document else { continue };
        if recorded.get(name).is_some_and(|r| r.contains(&d.revision)) {
            continue;
        }
        let before = fleet
            .history
            .get(name)
            .and_then(|h| h.range(..d.revision).next_back())
            .map(|(_, d)| d);
        let record = RevisionRecord {
            api_version: ApiVersion,
            name: name.clone(),
            revision: d.revision,
            applied_at: d.applied_at.map(rollout::rfc3339).unwrap_or_default(),
            summary: match doc.change.as_ref().and_then(|c| c.cause.as_deref()) {
                Some(cause) => format!(
                    "{} ({cause})",
                    manifest_types::diff::diff(before, doc).summary()
                ),
                None => manifest_types::diff::diff(before, doc).summary(),
            },
            deployment: serde_json::from_slice(&doc.to_json()).expect("a document is JSON"),
        };
        recorded.entry(name.clone()).or_default().insert(d.revision);
        plan.records.push((record, doc.clone()));
    }
    // Trim: the newest HISTORY_LIMIT, and whatever a rollout renders from —
    // its own revisions and every revision an agent still runs.
    for (name, revisions) in &recorded {
        let keep = if fleet.deployments.contains_key(name) {
            HISTORY_LIMIT
        } else {
            0
        };
        let excess = revisions.len().saturating_sub(keep);
        if excess == 0 {
            continue;
        }
        let mut in_use: BTreeSet<u64> = runs
            .get(name)
            .map(|r| [Some(r.status.revision), r.status.from])
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        if keep > 0 && runs.contains_key(name) {
            in_use.extend(
                fleet
                    .desired
                    .keys()
                    .filter_map(|a| crate::render::current_revision(fleet.stored(a), name)),
            );
        }
        plan.trims.extend(
            revisions
                .iter()
                .take(excess)
                .filter(|r| !in_use.contains(r))
                .map(|r| (name.clone(), *r)),
        );
    }
    plan
}
