use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use manifest_types::convergence::{Liveness, State, Verdict};
use manifest_types::rollout::{Amount, OnFailure, Phase, RolloutPolicy, Waves};
use manifest_types::{AgentId, DeploymentName, Selector};

use super::*;
use crate::render::Labels;

fn name() -> DeploymentName {
    DeploymentName::new("web").unwrap()
}

fn agents(n: usize) -> Vec<AgentId> {
    (0..n)
        .map(|i| AgentId::new(format!("pi-{i}")).unwrap())
        .collect()
}

static NONE: Labels = Labels::new();

fn targets<'a>(ids: &'a [AgentId], current: &BTreeMap<AgentId, u64>) -> Vec<Target<'a>> {
    ids.iter()
        .map(|a| Target {
            agent: a,
            labels: &NONE,
            current: current.get(a).copied(),
        })
        .collect()
}

fn verdict(state: State, liveness: Liveness) -> Verdict {
    Verdict {
        state,
        reason: None,
        liveness,
    }
}

/// A fleet as the judge sees it: which revision each agent's manifest
/// carries, and the verdict of agents on the new revision.
struct Fleet {
    ids: Vec<AgentId>,
    current: BTreeMap<AgentId, u64>,
    on_new: BTreeMap<AgentId, Verdict>,
    now: SystemTime,
}

const FROM: u64 = 5;
const TO: u64 = 9;

impl Fleet {
    fn new(n: usize) -> Self {
        let ids = agents(n);
        let current = ids.iter().map(|a| (a.clone(), FROM)).collect();
        Self {
            ids,
            current,
            on_new: BTreeMap::new(),
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
        }
    }

    fn step(&self, policy: &RolloutPolicy, mut run: Run, control: Control) -> Run {
        run.status.policy = policy.clone();
        let targets = targets(&self.ids, &self.current);
        let judge = Judge {
            name: &name(),
            control,
            targets: &targets,
            history: |r: u64| r == FROM,
            verdict: |a: &AgentId, r: Option<u64>| match r {
                Some(TO) => self
                    .on_new
                    .get(a)
                    .cloned()
                    .unwrap_or_else(|| verdict(State::Progressing, Liveness::Online)),
                _ => verdict(State::Converged, Liveness::Online),
            },
            now: self.now,
        };
        judge.step(run)
    }

    /// The agents the control plane would now render at the new revision
    /// write it and converge there.
    fn converge_moved(&mut self, run: &Run) {
        for a in &self.ids {
            if revision_for(run, a, self.current.get(a).copied(), |r| r == FROM) == Some(TO) {
                self.current.insert(a.clone(), TO);
                self.on_new
                    .entry(a.clone())
                    .or_insert_with(|| verdict(State::Converged, Liveness::Online));
            }
        }
    }

    fn on_new_count(&self) -> usize {
        self.current.values().filter(|&&r| r == TO).count()
    }
}

fn started() -> Run {
    start(
        TO,
        &RolloutPolicy::default(),
        None,
        Some(FROM),
        Control::default(),
    )
}

#[test]
fn waves_put_the_canary_first_then_sizes_or_selectors_and_stay_stable() {
    let ids = agents(10);
    let none = BTreeMap::new();
    let t = targets(&ids, &none);
    let policy = RolloutPolicy {
        canary: Some(Amount::Count(1)),
        waves: Some(Waves::Size(Amount::Percent(30))),
        ..Default::default()
    };
    let w = waves(&name(), &policy, &t);
    let sizes: Vec<usize> = w.iter().map(Vec::len).collect();
    assert_eq!(sizes, [1, 3, 3, 3]);
    // Every target exactly once; the same order every time.
    let mut all: Vec<&AgentId> = w.iter().flatten().copied().collect();
    assert_eq!(w, waves(&name(), &policy, &t));
    all.sort();
    assert_eq!(all, ids.iter().collect::<Vec<_>>());
    // The order depends on the deployment: not always the same canary.
    let canaries: std::collections::BTreeSet<&AgentId> = ["web", "api", "db", "cache", "ui"]
        .iter()
        .map(|n| waves(&DeploymentName::new(*n).unwrap(), &policy, &t)[0][0])
        .collect();
    assert!(canaries.len() > 1, "{canaries:?}");
    // No policy parts: one wave.
    assert_eq!(waves(&name(), &RolloutPolicy::default(), &t).len(), 1);
    // Selectors: one site first, the rest last, empty waves left out.
    let lab: Labels = [("site".to_owned(), "lab".to_owned())].into();
    let mut t = targets(&ids, &none);
    t[3].labels = &lab;
    t[7].labels = &lab;
    let by_site = RolloutPolicy {
        waves: Some(Waves::Selectors(vec![
            Selector {
                match_labels: [("site".to_owned(), "mars".to_owned())].into(),
                ..Default::default()
            },
            Selector {
                match_labels: lab.clone(),
                ..Default::default()
            },
        ])),
        ..Default::default()
    };
    let w = waves(&name(), &by_site, &t);
    assert_eq!(w.len(), 2);
    let mut first: Vec<&str> = w[0].iter().map(|a| a.as_str()).collect();
    first.sort();
    assert_eq!(first, ["pi-3", "pi-7"]);
    assert_eq!(w[1].len(), 8);
}

#[test]
fn a_wave_is_released_only_after_the_one_before_is_healthy() {
    let policy = RolloutPolicy {
        canary: Some(Amount::Count(1)),
        waves: Some(Waves::Size(Amount::Percent(50))),
        ..Default::default()
    };
    let mut f = Fleet::new(6);
    let run = f.step(&policy, started(), Control::default());
    assert_eq!((run.status.wave, run.status.waves), (1, 3));
    assert_eq!(run.moving.len(), 1, "the canary alone");
    // Judged again before the canary converged: nothing more.
    let run = f.step(&policy, run, Control::default());
    assert_eq!((run.status.wave, run.moving.len()), (1, 1));
    f.converge_moved(&run);
    let run = f.step(&policy, run, Control::default());
    assert_eq!(run.status.wave, 2);
    f.converge_moved(&run);
    assert_eq!(f.on_new_count(), 4);
    let run = f.step(&policy, run, Control::default());
    assert_eq!(run.status.wave, 3);
    f.converge_moved(&run);
    let run = f.step(&policy, run, Control::default());
    assert_eq!(run.status.phase, Phase::Complete);
    assert_eq!(f.on_new_count(), 6);
    let c = run.status.target_counts();
    assert_eq!((c.desired, c.updated, c.converged), (6, 6, 6));
}

#[test]
fn a_wave_soaks_before_the_next_is_released() {
    let policy = RolloutPolicy {
        canary: Some(Amount::Count(1)),
        soak: Duration::from_secs(30),
        ..Default::default()
    };
    let mut f = Fleet::new(3);
    let run = f.step(&policy, started(), Control::default());
    f.converge_moved(&run);
    let run = f.step(&policy, run, Control::default());
    assert_eq!(run.status.wave, 1);
    assert!(run.status.healthy_since.is_some());
    f.now += Duration::from_secs(29);
    let run = f.step(&policy, run, Control::default());
    assert_eq!(run.status.wave, 1);
    // Unhealthy during the soak: the clock starts again.
    let canary = run.moving.iter().next().unwrap().clone();
    f.on_new.insert(
        canary.clone(),
        verdict(State::Progressing, Liveness::Online),
    );
    let run = f.step(&policy, run, Control::default());
    assert!(run.status.healthy_since.is_none());
    f.on_new
        .insert(canary, verdict(State::Converged, Liveness::Online));
    let run = f.step(&policy, run, Control::default());
    f.now += Duration::from_secs(30);
    let run = f.step(&policy, run, Control::default());
    assert_eq!(run.status.wave, 2);
}

#[test]
fn a_failing_canary_halts_or_rolls_back_and_nobody_else_moves() {
    for on_failure in [OnFailure::Halt, OnFailure::Rollback] {
        let policy = RolloutPolicy {
            canary: Some(Amount::Count(1)),
            on_failure,
            ..Default::default()
        };
        let mut f = Fleet::new(5);
        let run = f.step(&policy, started(), Control::default());
        f.converge_moved(&run);
        let canary = run.moving.iter().next().unwrap().clone();
        f.on_new
            .insert(canary.clone(), verdict(State::Degraded, Liveness::Online));
        let run = f.step(&policy, run, Control::default());
        assert_eq!(run.status.failed, vec![canary.clone()]);
        assert!(run.status.message.as_deref().unwrap().contains("pi-"));
        match on_failure {
            OnFailure::Halt => {
                assert_eq!(run.status.phase, Phase::Halted);
                // The canary keeps the new revision; nobody else gets it.
                let run = f.step(&policy, run, Control::default());
                assert_eq!(run.status.wave, 1);
                for a in &f.ids {
                    let want = if *a == canary { TO } else { FROM };
                    assert_eq!(
                        revision_for(&run, a, f.current.get(a).copied(), |r| r == FROM),
                        Some(want)
                    );
                }
            }
            OnFailure::Rollback => {
                assert_eq!(run.status.phase, Phase::RolledBack);
                for a in &f.ids {
                    assert_eq!(
                        revision_for(&run, a, f.current.get(a).copied(), |r| r == FROM),
                        Some(FROM)
                    );
                }
            }
        }
    }
}

#[test]
fn failures_within_the_threshold_do_not_stop_the_rollout() {
    let policy = RolloutPolicy {
        failure_threshold: Amount::Count(1),
        ..Default::default()
    };
    let mut f = Fleet::new(4);
    let run = f.step(&policy, started(), Control::default());
    f.converge_moved(&run);
    f.on_new
        .insert(f.ids[0].clone(), verdict(State::Degraded, Liveness::Online));
    let run = f.step(&policy, run, Control::default());
    assert_eq!(run.status.phase, Phase::Progressing);
    assert_eq!(run.status.target_counts().failed, 1);
    f.on_new
        .insert(f.ids[1].clone(), verdict(State::Rejected, Liveness::Online));
    assert_eq!(
        f.step(&policy, run, Control::default()).status.phase,
        Phase::Halted
    );
}

#[test]
fn offline_agents_are_moved_counted_and_never_waited_for() {
    let policy = RolloutPolicy {
        canary: Some(Amount::Count(2)),
        max_unavailable: Some(Amount::Count(1)),
        ..Default::default()
    };
    let mut f = Fleet::new(4);
    // Whichever agents the canary holds, make them Offline.
    let t = targets(&f.ids, &f.current);
    let canary: Vec<AgentId> = waves(&name(), &policy, &t)[0]
        .iter()
        .map(|a| (*a).clone())
        .collect();
    for a in &canary {
        f.on_new
            .insert(a.clone(), verdict(State::Offline, Liveness::Offline));
    }
    let run = f.step(&policy, started(), Control::default());
    // Nothing live in the canary: the next wave goes at once, and of it
    // one agent (the budget); the Offline canaries cost none.
    assert_eq!(run.status.wave, 2);
    assert_eq!(run.moving.len(), 3);
    assert!(canary.iter().all(|a| run.moving.contains(a)));
    assert_eq!(run.status.offline.len(), 2);
    assert_eq!(run.status.target_counts().offline, 2);
}

#[test]
fn max_unavailable_releases_a_wave_a_few_at_a_time() {
    let policy = RolloutPolicy {
        max_unavailable: Some(Amount::Count(2)),
        ..Default::default()
    };
    let mut f = Fleet::new(5);
    let run = f.step(&policy, started(), Control::default());
    assert_eq!(run.moving.len(), 2);
    let run = f.step(&policy, run, Control::default());
    assert_eq!(run.moving.len(), 2, "the two are not converged yet");
    f.converge_moved(&run);
    let run = f.step(&policy, run, Control::default());
    assert_eq!(f.on_new_count(), 2);
    assert_eq!(run.moving.len(), 4);
}

#[test]
fn pause_stops_releases_and_resume_continues_also_after_a_halt() {
    let policy = RolloutPolicy {
        canary: Some(Amount::Count(1)),
        ..Default::default()
    };
    let mut f = Fleet::new(3);
    let run = f.step(&policy, started(), Control::default());
    f.converge_moved(&run);
    let paused = Control {
        revision: 20,
        paused: true,
    };
    let run = f.step(&policy, run, paused);
    assert_eq!((run.status.phase, run.status.wave), (Phase::Paused, 1));
    let run = f.step(&policy, run, paused);
    assert_eq!(run.status.wave, 1);
    let resumed = Control {
        revision: 21,
        paused: false,
    };
    let run = f.step(&policy, run, resumed);
    assert_eq!((run.status.phase, run.status.wave), (Phase::Progressing, 2));
    // A halt is resumed by a newer switch, and judged again.
    let canary = f.ids.iter().find(|a| f.current[*a] == TO).unwrap().clone();
    f.on_new
        .insert(canary.clone(), verdict(State::Degraded, Liveness::Online));
    let run = f.step(&policy, run, resumed);
    assert_eq!(run.status.phase, Phase::Halted);
    let run = f.step(&policy, run, resumed);
    assert_eq!(
        run.status.phase,
        Phase::Halted,
        "the same switch resumes nothing"
    );
    f.on_new
        .insert(canary, verdict(State::Converged, Liveness::Online));
    let again = Control {
        revision: 22,
        paused: false,
    };
    assert_eq!(f.step(&policy, run, again).status.phase, Phase::Progressing);
}

#[test]
fn a_restarted_judge_recognises_moved_agents_and_repeats_no_wave() {
    let policy = RolloutPolicy {
        canary: Some(Amount::Count(1)),
        waves: Some(Waves::Size(Amount::Count(2))),
        ..Default::default()
    };
    let mut f = Fleet::new(5);
    let run = f.step(&policy, started(), Control::default());
    f.converge_moved(&run);
    let run = f.step(&policy, run, Control::default());
    assert_eq!(run.status.wave, 2);
    f.converge_moved(&run);
    // Restart: the stored status, no memory of who was released.
    let restarted = Run {
        status: run.status.clone(),
        moving: Default::default(),
    };
    let run = f.step(&policy, restarted, Control::default());
    assert_eq!(run.status.wave, 3, "wave 2 had converged: on to wave 3");
    f.converge_moved(&run);
    assert_eq!(f.on_new_count(), 5);
}

#[test]
fn a_new_rollout_keeps_the_last_complete_revision_as_its_base() {
    let complete = Run {
        status: RolloutStatus {
            phase: Phase::Complete,
            ..started().status
        },
        moving: Default::default(),
    };
    assert_eq!(
        start(
            12,
            &RolloutPolicy::default(),
            Some(&complete.status),
            None,
            Control::default()
        )
        .status
        .from,
        Some(TO)
    );
    // Superseded mid-way: the base stays the last complete one.
    assert_eq!(
        start(
            12,
            &RolloutPolicy::default(),
            Some(&started().status),
            None,
            Control::default()
        )
        .status
        .from,
        Some(FROM)
    );
    assert_eq!(
        start(
            12,
            &RolloutPolicy::default(),
            None,
            None,
            Control::default()
        )
        .status
        .from,
        None
    );
    let paused = Control {
        revision: 3,
        paused: true,
    };
    assert_eq!(
        start(12, &RolloutPolicy::default(), None, None, paused)
            .status
            .phase,
        Phase::Paused
    );
}

#[test]
fn held_agents_keep_the_revision_they_run_or_get_the_base() {
    let run = started();
    let a = AgentId::new("pi-1").unwrap();
    let known = |r: u64| r == FROM || r == 7;
    assert_eq!(revision_for(&run, &a, Some(7), known), Some(7));
    assert_eq!(
        revision_for(&run, &a, Some(3), known),
        Some(FROM),
        "no document"
    );
    assert_eq!(
        revision_for(&run, &a, None, known),
        Some(FROM),
        "a new agent"
    );
    assert_eq!(
        revision_for(&run, &a, Some(TO), known),
        Some(TO),
        "moved stay moved"
    );
}

#[test]
fn a_rollback_returns_only_the_moved_agents_and_needs_the_base_in_history() {
    let policy = RolloutPolicy {
        canary: Some(Amount::Count(1)),
        on_failure: OnFailure::Rollback,
        ..Default::default()
    };
    let mut f = Fleet::new(3);
    let run = f.step(&policy, started(), Control::default());
    f.converge_moved(&run);
    let canary = f.ids.iter().find(|a| f.current[*a] == TO).unwrap().clone();
    f.on_new
        .insert(canary.clone(), verdict(State::Degraded, Liveness::Online));
    // Another agent still runs an older revision (7) than the base.
    let other = f.ids.iter().find(|a| **a != canary).unwrap().clone();
    f.current.insert(other.clone(), 7);
    let run = f.step(&policy, run, Control::default());
    assert_eq!(run.status.phase, Phase::RolledBack);
    let known = |r: u64| r == FROM || r == 7;
    assert_eq!(revision_for(&run, &canary, Some(TO), known), Some(FROM));
    assert_eq!(
        revision_for(&run, &other, Some(7), known),
        Some(7),
        "never moved: keeps what it runs"
    );

    // Without the base's document, rolling back would leave the canary on
    // the bad revision while saying otherwise: halt instead, and say why.
    let targets = targets(&f.ids, &f.current);
    let mut fresh = started();
    fresh.status.policy = policy.clone();
    fresh.moving.insert(canary.clone());
    let judge = Judge {
        name: &name(),
        control: Control::default(),
        targets: &targets,
        history: |_: u64| false,
        verdict: |a: &AgentId, r: Option<u64>| match (a == &canary, r) {
            (true, Some(TO)) => verdict(State::Degraded, Liveness::Online),
            _ => verdict(State::Converged, Liveness::Online),
        },
        now: f.now,
    };
    let halted = judge.step(fresh);
    assert_eq!(halted.status.phase, Phase::Halted);
    assert!(halted.status.message.unwrap().contains("cannot roll back"));
}

#[test]
fn a_pause_keeps_unwritten_releases_back_and_forgets_earlier_health() {
    let policy = RolloutPolicy {
        canary: Some(Amount::Count(1)),
        soak: Duration::from_secs(60),
        ..Default::default()
    };
    let mut f = Fleet::new(3);
    let run = f.step(&policy, started(), Control::default());
    assert_eq!(run.moving.len(), 1, "released, not yet written");
    let paused = Control {
        revision: 5,
        paused: true,
    };
    let run = f.step(&policy, run, paused);
    assert_eq!(run.status.phase, Phase::Paused);
    assert!(
        run.moving.is_empty(),
        "a pause stops releases not yet written"
    );
    // Resumed: released again; once healthy, the soak starts then, not before.
    let resumed = Control {
        revision: 6,
        paused: false,
    };
    let run = f.step(&policy, run, resumed);
    f.converge_moved(&run);
    let run = f.step(&policy, run, resumed);
    assert!(run.status.healthy_since.is_some());
    let run = f.step(
        &policy,
        run,
        Control {
            revision: 7,
            paused: true,
        },
    );
    assert!(
        run.status.healthy_since.is_none(),
        "paused: health does not carry over"
    );
}

#[test]
fn an_identity_conflict_is_reported_but_never_blocks() {
    let policy = RolloutPolicy {
        canary: Some(Amount::Count(1)),
        ..Default::default()
    };
    let mut f = Fleet::new(2);
    let t = targets(&f.ids, &f.current);
    let canary = waves(&name(), &policy, &t)[0][0].clone();
    f.on_new
        .insert(canary, verdict(State::IdentityConflict, Liveness::Online));
    let run = f.step(&policy, started(), Control::default());
    assert_eq!(
        run.status.wave, 2,
        "the conflicted canary does not hold the rollout"
    );
    assert_eq!(run.status.targets, 2);
}
