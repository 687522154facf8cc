//! Staged rollouts, as pure decisions (docs/adr/0016): which agents are in
//! which wave ([`waves`]), which revision each target is rendered at
//! ([`revision_for`]), and how a rollout moves on ([`start`], [`Judge::step`]):
//! releasing agents within the `maxUnavailable` budget, judging a wave
//! healthy (every live agent of the released waves converged on the new
//! revision, by the one convergence rule) and soaked, and halting or rolling
//! back when failures cross the threshold. No I/O; time is the server's,
//! passed in.
//!
//! The daemon keeps a [`Run`] per deployment under rollout: the
//! [`RolloutStatus`] it publishes in `deployment-status.<name>` (so a
//! restarted control plane continues from it) and the agents released since
//! (`moving`; after a restart, agents already on the new revision are
//! recognised from their stored manifests, so no wave is repeated or
//! skipped).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use manifest_types::convergence::{Liveness, State, Verdict};
use manifest_types::rollout::{
    LISTED_AGENTS, OnFailure, Phase, RevisionCounts, RolloutPolicy, RolloutStatus, Waves,
};
use manifest_types::{AgentId, DeploymentName};

/// A deployment's rollout as the daemon holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub status: RolloutStatus,
    /// Agents released to the new revision (besides those whose stored
    /// manifest already carries it).
    pub moving: BTreeSet<AgentId>,
}

/// The operator's switch (`rollouts.<name>`) as last read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    /// KV sequence of `rollouts.<name>`; 0 when absent.
    pub revision: u64,
    pub paused: bool,
}

/// One target of the new revision.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub agent: &'a AgentId,
    /// The agent's labels (`render::Labels`).
    pub labels: &'a BTreeMap<String, String>,
    /// The revision of this deployment its stored manifest carries.
    pub current: Option<u64>,
}

/// A stable pseudo-random order of agents per deployment (FNV-1a over
/// `<deployment>/<agent>`): the canary is not always the first id, and an
/// agent keeps its place across passes and restarts.
fn rank(name: &DeploymentName, agent: &AgentId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name
        .as_str()
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(agent.as_str().bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The targets split into waves, in release order: the canary first, then
/// waves of `waves` size, or one per selector (the agents no selector
/// picks last). Empty waves are left out; without canary and waves, every
/// target is one wave.
pub fn waves<'a>(
    name: &DeploymentName,
    policy: &RolloutPolicy,
    targets: &[Target<'a>],
) -> Vec<Vec<&'a AgentId>> {
    let mut rest: Vec<&Target<'a>> = targets.iter().collect();
    rest.sort_by_key(|t| (rank(name, t.agent), t.agent));
    let total = rest.len();
    let mut out: Vec<Vec<&AgentId>> = Vec::new();
    if let Some(canary) = policy.canary {
        let n = canary.of(total).clamp(1, total.max(1)).min(total);
        out.push(rest.drain(..n).map(|t| t.agent).collect());
    }
    match &policy.waves {
        Some(Waves::Size(size)) => {
            let n = size.of(total).max(1);
            while !rest.is_empty() {
                let take = n.min(rest.len());
                out.push(rest.drain(..take).map(|t| t.agent).collect());
            }
        }
        Some(Waves::Selectors(selectors)) => {
            for s in selectors {
                let (wave, others): (Vec<&Target<'a>>, Vec<&Target<'a>>) =
                    rest.into_iter().partition(|t| s.selects(t.agent, t.labels));
                out.push(wave.into_iter().map(|t| t.agent).collect());
                rest = others;
            }
            out.push(rest.drain(..).map(|t| t.agent).collect());
        }
        None => out.push(rest.drain(..).map(|t| t.agent).collect()),
    }
    out.retain(|w| !w.is_empty());
    out
}

/// The revision `agent` is rendered at while `run` is in progress: the new
/// one once released (and it stays there), else the one it runs (when its
/// document is still in `history`), else the rollout's `from`. None: nothing
/// of this deployment.
pub fn revision_for(
    run: &Run,
    agent: &AgentId,
    current: Option<u64>,
    history: impl Fn(u64) -> bool,
) -> Option<u64> {
    let s = &run.status;
    let kept = || match current {
        Some(r) if r != s.revision && history(r) => Some(r),
        _ => s.from,
    };
    match s.phase {
        Phase::Complete => Some(s.revision),
        // Rolled back: agents on the new revision return to `from`; the
        // others keep what they run.
        Phase::RolledBack => kept(),
        _ if current == Some(s.revision) || run.moving.contains(agent) => Some(s.revision),
        _ => kept(),
    }
}

/// A new rollout of revision `to`, after `previous` (the rollout of an
/// earlier revision, if any) or, without one, after `rendered` (the
/// revision last rendered to every target at once). Agents keep the last
/// revision rolled out completely until their wave is released.
pub fn start(
    to: u64,
    policy: &RolloutPolicy,
    previous: Option<&RolloutStatus>,
    rendered: Option<u64>,
    control: Control,
) -> Run {
    let from = match previous {
        Some(p) if p.phase == Phase::Complete => Some(p.revision),
        Some(p) => p.from,
        None => rendered,
    };
    Run {
        status: RolloutStatus {
            revision: to,
            from,
            phase: if control.paused {
                Phase::Paused
            } else {
                Phase::Progressing
            },
            policy: policy.clone(),
            targets: 0,
            wave: 1,
            waves: 1,
            healthy_since: None,
            message: None,
            control_revision: control.revision,
            counts: BTreeMap::new(),
            failed: Vec::new(),
            offline: Vec::new(),
        },
        moving: BTreeSet::new(),
    }
}

/// What one judgement of a rollout reads (the policy is the run's own,
/// fixed when it started).
#[derive(Debug)]
pub struct Judge<'a, H, V> {
    pub name: &'a DeploymentName,
    pub control: Control,
    pub targets: &'a [Target<'a>],
    /// Whether a revision's document is in the history.
    pub history: H,
    /// The one convergence rule for an agent on a revision of this
    /// deployment (None: on none of it), from fresh reports.
    pub verdict: V,
    /// Server time.
    pub now: SystemTime,
}

impl<H, V> Judge<'_, H, V>
where
    H: Fn(u64) -> bool,
    V: Fn(&AgentId, Option<u64>) -> Verdict,
{
    /// The rollout moved on: pause and resume applied, failures judged,
    /// agents released within the budget, the next wave released once the
    /// released ones have been healthy for the soak time, counts refreshed.
    pub fn step(&self, mut run: Run) -> Run {
        let policy = &run.status.policy.clone();
        let (name, control, targets, history, verdict, now) = (
            self.name,
            self.control,
            self.targets,
            &self.history,
            &self.verdict,
            self.now,
        );
        let plan = waves(name, policy, targets);
        let total = targets.len();
        {
            let s = &mut run.status;
            s.targets = total;
            s.waves = plan.len().max(1);
            s.wave = s.wave.clamp(1, s.waves);
            // The operator's switch: pause, resume (also a halted rollout,
            // which is then judged again from scratch).
            if control.revision != s.control_revision {
                s.control_revision = control.revision;
                match (s.phase, control.paused) {
                    (Phase::Progressing, true) => s.phase = Phase::Paused,
                    (Phase::Paused | Phase::Halted, false) => {
                        s.phase = Phase::Progressing;
                        s.message = None;
                    }
                    _ => {}
                }
            }
        }
        let released: Vec<&AgentId> = plan[..run.status.wave.min(plan.len())]
            .iter()
            .flatten()
            .copied()
            .collect();
        let current: BTreeMap<&AgentId, Option<u64>> =
            targets.iter().map(|t| (t.agent, t.current)).collect();
        let to = run.status.revision;
        let moved =
            |run: &Run, a: &AgentId| current.get(a) == Some(&Some(to)) || run.moving.contains(a);

        // Failures among the agents moved to the new revision.
        let judged: Vec<(&AgentId, Verdict)> = released
            .iter()
            .filter(|a| moved(&run, a))
            .map(|a| (*a, verdict(a, Some(to))))
            .collect();
        let failed: Vec<&AgentId> = judged
            .iter()
            .filter(|(_, v)| matches!(v.state, State::Degraded | State::Rejected))
            .map(|(a, _)| *a)
            .collect();
        // Offline agents, and agents another installation writes as, are
        // not waited for: counted and reported, never blocking.
        let live =
            |v: &Verdict| v.liveness != Liveness::Offline && v.state != State::IdentityConflict;
        run.status.failed = failed
            .iter()
            .take(LISTED_AGENTS)
            .map(|a| (*a).clone())
            .collect();
        if !run.status.phase.is_final()
            && run.status.phase != Phase::Halted
            && failed.len() > policy.failure_threshold.of(total)
        {
            let s = &mut run.status;
            let names: Vec<&str> = failed.iter().take(3).map(|a| a.as_str()).collect();
            let message = format!(
                "{} agent(s) failed on revision {to} (threshold {}): {}",
                failed.len(),
                policy.failure_threshold,
                names.join(", ")
            );
            s.healthy_since = None;
            match policy.on_failure {
                OnFailure::Halt => {
                    s.phase = Phase::Halted;
                    s.message = Some(message);
                }
                OnFailure::Rollback => match s.from {
                    // Rolling back renders `from` from the history: without
                    // its document, moved agents would keep the new revision
                    // while the status said otherwise. Halt and say why.
                    Some(f) if !history(f) => {
                        s.phase = Phase::Halted;
                        s.message = Some(format!(
                            "{message}; cannot roll back: revision {f} is not in the history, halted instead"
                        ));
                    }
                    Some(f) => {
                        s.phase = Phase::RolledBack;
                        s.message = Some(format!("{message}; rolled back to revision {f}"));
                        run.moving.clear();
                    }
                    None => {
                        s.phase = Phase::RolledBack;
                        s.message = Some(format!(
                            "{message}; rolled back (no earlier revision: removed from the agents it reached)"
                        ));
                        run.moving.clear();
                    }
                },
            }
        }
        if matches!(run.status.phase, Phase::Halted | Phase::Paused) {
            // Stopped: agents released but not yet written stay where they
            // are, and health seen before a pause does not count after it.
            run.moving.retain(|a| current.get(a) == Some(&Some(to)));
            run.status.healthy_since = None;
        }

        if run.status.phase == Phase::Progressing {
            // Release agents of the released waves within the budget; Offline
            // ones cost none (they catch up when they return).
            let unavailable = judged
                .iter()
                .filter(|(_, v)| live(v) && !v.is_converged())
                .count();
            let mut budget = policy
                .max_unavailable
                .map_or(usize::MAX, |m| m.of(total).max(1))
                .saturating_sub(unavailable);
            for a in &released {
                if moved(&run, a) {
                    continue;
                }
                let offline = !live(&verdict(a, Some(to)));
                if offline || budget > 0 {
                    if !offline {
                        budget -= 1;
                    }
                    run.moving.insert((*a).clone());
                }
            }
            // Healthy: every live agent of the released waves moved and
            // converged on the new revision.
            let healthy = released.iter().all(|a| {
                let v = verdict(a, Some(to));
                !live(&v) || (moved(&run, a) && v.is_converged())
            });
            let s = &mut run.status;
            if !healthy {
                s.healthy_since = None;
            } else {
                let since = match s.healthy_since.as_deref().map(humantime::parse_rfc3339) {
                    Some(Ok(t)) => t,
                    _ => {
                        s.healthy_since = Some(rfc3339(now));
                        now
                    }
                };
                let soaked = now.duration_since(since).unwrap_or(Duration::ZERO) >= policy.soak;
                if soaked {
                    if s.wave >= s.waves {
                        s.phase = Phase::Complete;
                        run.moving.clear();
                    } else {
                        s.wave += 1;
                        s.healthy_since = None;
                        // The next wave's agents go out in the same pass.
                        return self.step(run);
                    }
                }
            }
        }

        // Counts per revision, by where each target is rendered now.
        let mut counts: BTreeMap<u64, RevisionCounts> = BTreeMap::new();
        let mut offline = Vec::new();
        for t in targets {
            let planned = revision_for(&run, t.agent, t.current, history);
            let v = verdict(t.agent, planned);
            if v.liveness == Liveness::Offline {
                offline.push(t.agent.clone());
            }
            let Some(r) = planned else { continue };
            let c = counts.entry(r).or_default();
            c.desired += 1;
            c.updated += usize::from(t.current == Some(r));
            c.converged += usize::from(v.is_converged());
            c.failed += usize::from(matches!(v.state, State::Degraded | State::Rejected));
            c.offline += usize::from(v.liveness == Liveness::Offline);
        }
        let s = &mut run.status;
        s.counts = counts;
        offline.truncate(LISTED_AGENTS);
        s.offline = offline;
        run
    }
}

/// RFC 3339 server time, as kept in [`RolloutStatus::healthy_since`].
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests;
