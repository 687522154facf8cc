//! The daemon's side of staged rollouts (docs/adr/0016): starting a
//! rollout when a deployment with a policy gets a new revision
//! ([`prepare`]), judging rollouts on every agent's status and heartbeat
//! ([`judge`], the decisions being the pure
//! [`crate::rollout`]), and keeping each deployment's history
//! (`revisions.<name>.<revision>`, [`record_history`]).

use std::collections::BTreeMap;

use async_nats::jetstream::kv::{self, Store};
use manifest_types::convergence::{self, AgentReport, Target, Thresholds, Verdict};
use manifest_types::rollout::RevisionRecord;
use manifest_types::{AgentId, ApiVersion, DeploymentName, ResourceId, keys};

use super::state::{State, Tracked};
use crate::rollout::{self, Judge, Run};

static NO_LABELS: crate::render::Labels = crate::render::Labels::new();

/// Starts a rollout for every deployment whose policy applies and whose
/// revision has none yet, continuing a stored one after a restart; drops
/// the rollouts of deployments gone, and of new revisions without a policy
/// (a rollout in progress keeps the policy it started with).
pub(crate) fn prepare(state: &mut State) {
    let mut runs = std::mem::take(&mut state.runs);
    let mut due = false;
    runs.retain(|name, _| state.deployments.contains_key(name));
    for (name, d) in &state.deployments {
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
        let Some(policy) = doc.rollout.as_ref().or(state.default_rollout.as_ref()) else {
            runs.remove(name);
            continue;
        };
        // A stored status of a deployment deleted and created again is
        // another deployment's: not continued, not a base.
        let stored = state
            .statuses
            .get(name)
            .and_then(|w| w.value.as_ref())
            .filter(|s| d.created_revision.is_none_or(|c| c == s.created_revision));
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
        let control = state.controls.get(name).copied().unwrap_or_default();
        let run = rollout::start(d.revision, policy, previous, rendered, control);
        tracing::info!(deployment = %name, revision = d.revision, from = ?run.status.from, "starting a rollout");
        runs.insert(name.clone(), run);
    }
    state.runs = runs;
    state.rollout_due |= due;
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
    state.rollout_due = false;
    let Some(rendered) = &state.rendered else {
        return Ok(false);
    };
    if state.tracked.is_none() {
        // Seed: every status once; the watch keeps them current from here.
        let snapshot = flotilla_nats::read_family(store, keys::ACTUAL_STATE).await?;
        let mut tracked = BTreeMap::new();
        for (id, entry) in snapshot.family(keys::ACTUAL_STATE) {
            if let Ok(agent) = AgentId::new(id) {
                Tracked::record(&mut tracked, agent, entry);
            }
        }
        state.tracked = Some(tracked);
    }
    // Heartbeats: read at most every BEATS_REFRESH (liveness moves in
    // heartbeat intervals, not milliseconds); between reads, the server's
    // clock and every age are carried forward by the monotonic clock, so no
    // age looks younger than it is.
    let fresh = state
        .beats
        .as_ref()
        .is_some_and(|(at, _)| at.elapsed() < BEATS_REFRESH);
    if !fresh {
        let snapshot = flotilla_nats::read_family(heartbeats, keys::HEARTBEAT).await?;
        state.beats = Some((tokio::time::Instant::now(), snapshot));
    }
    let (read_at, snapshot) = state.beats.as_ref().expect("read above");
    let since = read_at.elapsed();
    let now = snapshot.server_time + since;
    let beats = flotilla_nats::AgentReports::from_snapshot(snapshot);
    let tracked = state.tracked.as_ref().expect("seeded above");
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
    let mut changed = false;
    let mut runs = std::mem::take(&mut state.runs);
    for (name, run) in &mut runs {
        if run.status.phase.is_final() {
            continue;
        }
        let Some(record) = state.deployments.get(name) else {
            continue;
        };
        let (Ok(doc), Some(render)) = (&record.document, rendered.deployments.get(name)) else {
            continue;
        };
        // Judged only once the pass has started the rollout of this revision.
        if record.revision != run.status.revision {
            continue;
        }
        let history = state.history.get(name);
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
            .map(|a| (a, current_revision(state, a, name)))
            .collect();
        // Wave selectors see the labels the deployment's selector sees.
        let labels: Vec<_> = render
            .targets
            .iter()
            .map(|a| {
                doc.selector.labels(
                    state.labels.get(a).unwrap_or(&NO_LABELS),
                    state.registered.get(a).unwrap_or(&NO_LABELS),
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
            let generation = match state.desired.get(agent).and_then(|w| w.value.as_ref()) {
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
            control: state.controls.get(name).copied().unwrap_or_default(),
            targets: &targets,
            history: |r: u64| history.is_some_and(|h| h.contains_key(&r)),
            verdict,
            now,
        };
        let next = judge.step(run.clone());
        if renders_differently(&next, run) {
            state.dirty.all = true;
        }
        if next != *run {
            if next.status.phase != run.status.phase || next.status.wave != run.status.wave {
                tracing::info!(deployment = %name, revision = next.status.revision, phase = %next.status.phase,
                    wave = next.status.wave, waves = next.status.waves, message = next.status.message.as_deref().unwrap_or_default(),
                    "rollout moved on");
            }
            changed = true;
            *run = next;
        }
    }
    state.runs = runs;
    if !state.rolling() {
        // Nothing left to judge: stop holding statuses.
        state.tracked = None;
        state.beats = None;
    }
    Ok(changed)
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

/// The revision of `deployment` the agent's stored manifest carries.
fn current_revision(state: &State, agent: &AgentId, deployment: &DeploymentName) -> Option<u64> {
    let stored = state.desired.get(agent).and_then(|w| w.value.as_ref());
    crate::render::current_revision(stored, deployment)
}

/// How old a heartbeat read may be when a rollout is judged.
const BEATS_REFRESH: std::time::Duration = std::time::Duration::from_millis(250);

/// How many revisions of each deployment the history keeps (besides the
/// ones a rollout in progress renders from).
pub const HISTORY_LIMIT: usize = 10;

/// Records every deployment revision not yet in its history, with a
/// one-line summary of the change from the revision before, and trims the
/// history to [`HISTORY_LIMIT`] (never a revision a rollout renders from);
/// a deleted deployment's history goes with it. Returns the failures.
pub(crate) async fn record_history(state: &mut State, store: &Store) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, d) in &state.deployments {
        let Ok(doc) = &d.document else { continue };
        if state
            .recorded
            .get(name)
            .is_some_and(|r| r.contains(&d.revision))
        {
            continue;
        }
        let before = state
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
        let key = keys::revision(name, d.revision);
        let bytes = serde_json::to_vec(&record).expect("records serialise");
        match store.create(&key, bytes.into()).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => {
                failures.push(format!("cannot record {key}: {e}"));
                continue;
            }
        }
        state
            .recorded
            .entry(name.clone())
            .or_default()
            .insert(d.revision);
        state
            .history
            .entry(name.clone())
            .or_default()
            .insert(d.revision, doc.clone());
    }
    // Trim: the newest HISTORY_LIMIT, and whatever a rollout renders from —
    // its own revisions and every revision an agent still runs.
    let mut drop: Vec<(DeploymentName, u64)> = Vec::new();
    for (name, revisions) in &state.recorded {
        let keep = if state.deployments.contains_key(name) {
            HISTORY_LIMIT
        } else {
            0
        };
        let excess = revisions.len().saturating_sub(keep);
        if excess == 0 {
            continue;
        }
        let mut in_use: std::collections::BTreeSet<u64> = state
            .runs
            .get(name)
            .map(|r| [Some(r.status.revision), r.status.from])
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        if keep > 0 && state.runs.contains_key(name) {
            in_use.extend(
                state
                    .desired
                    .keys()
                    .filter_map(|a| current_revision(state, a, name)),
            );
        }
        drop.extend(
            revisions
                .iter()
                .take(excess)
                .filter(|r| !in_use.contains(r))
                .map(|r| (name.clone(), *r)),
        );
    }
    for (name, revision) in drop {
        let key = keys::revision(&name, revision);
        match store.purge(&key).await {
            Ok(()) => {
                if let Some(r) = state.recorded.get_mut(&name) {
                    r.remove(&revision);
                }
                if let Some(h) = state.history.get_mut(&name) {
                    h.remove(&revision);
                }
            }
            Err(e) => failures.push(format!("cannot trim {key}: {e}")),
        }
    }
    failures
}
