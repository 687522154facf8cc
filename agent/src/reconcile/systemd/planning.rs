//! The SystemdUnit reconciler's decisions, pure: what to do to a unit's run
//! state ([`plan_action`]) and what its state means for the resource
//! ([`assess`]), from what systemd reports ([`Observed`]) and the levels the
//! ledger keeps ([`Levels`]). docs/adr/0009-systemd-units.md has the rules.

use std::time::{Duration, UNIX_EPOCH};

use manifest_types::spec::{TriggerAction, UnitState};
use manifest_types::{FailureReason, ReadyDetails, SystemdUnitSpec, UnitRun};

use crate::reconcile::Outcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    None,
    Start,
    Stop,
    Restart,
    Reload,
}

/// A unit's `ActiveState`, as systemd reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ActiveState {
    Active,
    Reloading,
    #[default]
    Inactive,
    Failed,
    Activating,
    Deactivating,
    /// `maintenance`, `refreshing` or a state newer than this build.
    Other(String),
}

impl ActiveState {
    pub fn parse(state: &str) -> Self {
        match state {
            "active" => Self::Active,
            "reloading" => Self::Reloading,
            "inactive" => Self::Inactive,
            "failed" => Self::Failed,
            "activating" => Self::Activating,
            "deactivating" => Self::Deactivating,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Active => "active",
            Self::Reloading => "reloading",
            Self::Inactive => "inactive",
            Self::Failed => "failed",
            Self::Activating => "activating",
            Self::Deactivating => "deactivating",
            Self::Other(s) => s,
        }
    }

    /// Running, or on its way to running.
    pub fn is_up(&self) -> bool {
        matches!(self, Self::Active | Self::Activating | Self::Reloading)
    }

    /// A job (or a run its trigger started) is under way.
    fn in_transition(&self) -> bool {
        matches!(
            self,
            Self::Activating | Self::Deactivating | Self::Reloading
        )
    }
}

impl std::fmt::Display for ActiveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the unit's files and `restartOn` inputs stand against the levels
/// it was last (re)started — for `completed`, last run — with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Levels {
    pub files_changed: bool,
    pub inputs_changed: bool,
}

/// What to do to the unit's run state. Only `running`, `stopped` and a run
/// owed to `completed` ever start or stop anything; `triggered` never does.
pub fn plan_action(
    want: UnitState,
    o: &Observed,
    levels: Levels,
    on_trigger: TriggerAction,
) -> Action {
    let active = &o.active_state;
    match want {
        // Starting it would only run it once more: refused in `assess`.
        UnitState::Running if o.never_stays_active => Action::None,
        UnitState::Running if !active.is_up() => Action::Start,
        UnitState::Running if levels.files_changed => Action::Restart,
        UnitState::Running if levels.inputs_changed => match on_trigger {
            TriggerAction::Restart => Action::Restart,
            TriggerAction::Reload => Action::Reload,
        },
        UnitState::Running => Action::None,
        // A run its active trigger started is not the agent's to stop.
        UnitState::Stopped if !o.active_triggers.is_empty() => Action::None,
        UnitState::Stopped if active.is_up() => Action::Stop,
        UnitState::Stopped => Action::None,
        UnitState::Triggered => Action::None,
        // A run in progress (the agent's or a trigger's) is waited for.
        UnitState::Completed if active.in_transition() => Action::None,
        UnitState::Completed if levels.files_changed || levels.inputs_changed => {
            if *active == ActiveState::Active {
                Action::Restart
            } else {
                Action::Start
            }
        }
        UnitState::Completed => Action::None,
    }
}

/// What systemd says about a unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub active_state: ActiveState,
    pub sub_state: String,
    /// Service units only.
    pub n_restarts: u32,
    pub main_pid: u32,
    /// Service result (`success`, `exit-code`, `timeout`, …).
    pub result: String,
    pub exit_status: i32,
    /// Microseconds since the epoch; 0 when never active.
    pub active_enter_usec: u64,
    /// A oneshot service without `RemainAfterExit=yes`: never stays active.
    pub never_stays_active: bool,
    /// Active units (timers, paths, sockets) that trigger this one; read
    /// only when the unit is wanted stopped.
    pub active_triggers: Vec<String>,
    /// The main process's last start and exit (µs since the epoch; 0: none).
    pub exec_start_usec: u64,
    pub exec_exit_usec: u64,
    /// Timers only (µs since the epoch; 0: none or not on the calendar).
    pub last_trigger_usec: u64,
    pub next_elapse_usec: u64,
}

/// A systemd timestamp as RFC 3339; `None` for 0 ("never") and for
/// `USEC_INFINITY` or anything past year 9999 ("not scheduled").
fn rfc3339(usec: u64) -> Option<String> {
    const YEAR_10000_USEC: u64 = 253_402_300_800_000_000;
    (usec > 0 && usec < YEAR_10000_USEC).then(|| {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_micros(usec)).to_string()
    })
}

/// Judges the unit against the wanted state. `run_job`: for `completed`,
/// how the start job of the current run ended, if the agent saw it end.
pub fn assess(want: UnitState, o: &Observed, run_job: Option<&str>) -> Outcome {
    let with_run = matches!(want, UnitState::Triggered | UnitState::Completed);
    let ready = || {
        Outcome::ready(ReadyDetails::SystemdUnit {
            active_state: o.active_state.to_string(),
            sub_state: o.sub_state.clone(),
            n_restarts: o.n_restarts,
            main_pid: (o.main_pid > 0).then_some(o.main_pid),
            active_since: rfc3339(o.active_enter_usec),
            last_run: (with_run && o.exec_start_usec > 0).then(|| UnitRun {
                result: o.result.clone(),
                exit_status: o.exit_status,
                started_at: rfc3339(o.exec_start_usec),
                ended_at: rfc3339(o.exec_exit_usec),
            }),
            last_trigger: rfc3339(o.last_trigger_usec),
            next_elapse: rfc3339(o.next_elapse_usec),
        })
    };
    let why = || {
        let mut m = format!("unit is {} ({})", o.active_state, o.sub_state);
        if !o.result.is_empty() && o.result != "success" {
            m.push_str(&format!(", result {}", o.result));
        }
        if o.exit_status != 0 {
            m.push_str(&format!(", exit status {}", o.exit_status));
        }
        if let Some(t) = rfc3339(o.exec_exit_usec).filter(|_| with_run) {
            m.push_str(&format!(", last run ended {t}"));
        }
        m
    };
    use ActiveState as A;
    let active = &o.active_state;
    match want {
        UnitState::Running if o.never_stays_active => Outcome::failed(
            FailureReason::UnitNeverStaysActive,
            "a oneshot service without RemainAfterExit=yes never stays active, so the agent \
             does not start it: use state `triggered` (a timer or another unit runs it) or \
             `completed` (run once per change)",
        ),
        UnitState::Running => match active {
            A::Active | A::Reloading => ready(),
            A::Failed => Outcome::failed(FailureReason::UnitFailed, why()),
            A::Activating => Outcome::failed(FailureReason::UnitActivating, why()),
            _ => Outcome::failed(FailureReason::UnitNotRunning, why()),
        },
        UnitState::Stopped if !o.active_triggers.is_empty() => Outcome::failed(
            FailureReason::UnitTriggered,
            format!(
                "{}; it is triggered by {}, which is active, and the agent does not stop what a \
                 trigger starts: use state `triggered`, or stop the trigger",
                why(),
                o.active_triggers.join(", ")
            ),
        ),
        UnitState::Stopped => match active {
            A::Inactive | A::Failed => ready(),
            _ => Outcome::failed(FailureReason::UnitNotStopped, why()),
        },
        UnitState::Triggered => match active {
            A::Failed => Outcome::failed(FailureReason::UnitLastRunFailed, why()),
            _ => ready(),
        },
        UnitState::Completed => match (active, run_job) {
            (A::Activating | A::Deactivating | A::Reloading, _) => Outcome::Waiting {
                message: format!("the run is in progress ({})", o.sub_state),
                recheck_after: Duration::from_secs(2),
            },
            (A::Failed, _) => Outcome::failed(FailureReason::UnitRunFailed, why()),
            (_, Some(job)) if job != "done" => Outcome::failed(
                FailureReason::UnitRunFailed,
                format!("the run's start job ended {job}; {}", why()),
            ),
            _ => ready(),
        },
    }
}

/// Hash of the files the spec asks for (content and drop-ins).
pub fn files_hash(spec: &SystemdUnitSpec) -> String {
    let mut all = Vec::new();
    if let Some(c) = &spec.content {
        all.extend_from_slice(b"unit\0");
        all.extend_from_slice(c.as_bytes());
    }
    for (name, content) in &spec.drop_ins {
        all.extend_from_slice(format!("\0drop-in\0{name}\0").as_bytes());
        all.extend_from_slice(content.as_bytes());
    }
    crate::reconcile::file::sha256_hex(&all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::Failure;

    fn unit(active: &str) -> Observed {
        Observed {
            active_state: ActiveState::parse(active),
            ..Observed::default()
        }
    }

    const SAME: Levels = Levels {
        files_changed: false,
        inputs_changed: false,
    };
    const FILES: Levels = Levels {
        files_changed: true,
        inputs_changed: false,
    };
    const INPUTS: Levels = Levels {
        files_changed: false,
        inputs_changed: true,
    };

    #[test]
    fn active_states_parse_and_keep_what_they_do_not_know() {
        for s in [
            "active",
            "reloading",
            "inactive",
            "failed",
            "activating",
            "deactivating",
            "maintenance",
        ] {
            assert_eq!(ActiveState::parse(s).as_str(), s);
        }
        assert_eq!(
            ActiveState::parse("refreshing"),
            ActiveState::Other("refreshing".into())
        );
        assert!(ActiveState::Activating.is_up() && !ActiveState::Deactivating.is_up());
    }

    #[test]
    fn actions_follow_the_wanted_state_and_the_levels() {
        use Action::*;
        use TriggerAction as T;
        use UnitState::*;
        let plan = |want, o: &Observed, l, t| plan_action(want, o, l, t);
        assert_eq!(plan(Running, &unit("inactive"), SAME, T::Restart), Start);
        assert_eq!(plan(Running, &unit("failed"), FILES, T::Restart), Start);
        assert_eq!(plan(Running, &unit("active"), SAME, T::Restart), None);
        assert_eq!(plan(Running, &unit("active"), FILES, T::Reload), Restart);
        assert_eq!(plan(Running, &unit("active"), INPUTS, T::Restart), Restart);
        assert_eq!(plan(Running, &unit("active"), INPUTS, T::Reload), Reload);
        assert_eq!(plan(Stopped, &unit("active"), FILES, T::Restart), Stop);
        assert_eq!(plan(Stopped, &unit("inactive"), FILES, T::Restart), None);
        assert_eq!(plan(Stopped, &unit("failed"), SAME, T::Restart), None);
    }

    #[test]
    fn a_oneshot_that_never_stays_active_is_never_started_for_running() {
        let o = Observed {
            never_stays_active: true,
            ..unit("inactive")
        };
        for levels in [SAME, FILES, INPUTS] {
            assert_eq!(
                plan_action(UnitState::Running, &o, levels, TriggerAction::Restart),
                Action::None
            );
        }
        assert!(matches!(
            assess(UnitState::Running, &o, None),
            Outcome::Failed(Failure {
                reason: FailureReason::UnitNeverStaysActive,
                ..
            })
        ));
    }

    #[test]
    fn triggered_units_are_never_started_or_stopped() {
        for active in ["inactive", "failed", "activating", "active", "deactivating"] {
            for levels in [SAME, FILES, INPUTS] {
                assert_eq!(
                    plan_action(
                        UnitState::Triggered,
                        &unit(active),
                        levels,
                        TriggerAction::Restart
                    ),
                    Action::None,
                    "{active} {levels:?}"
                );
            }
        }
        // A run in progress or a good last run is Ready, with the run.
        let ran = Observed {
            result: "success".into(),
            exec_start_usec: 1_700_000_000_000_000,
            exec_exit_usec: 1_700_000_020_000_000,
            ..unit("inactive")
        };
        match assess(UnitState::Triggered, &ran, None) {
            Outcome::Ready {
                details: ReadyDetails::SystemdUnit { last_run, .. },
                ..
            } => {
                let run = last_run.expect("the last run");
                assert_eq!(run.result, "success");
                assert_eq!(run.started_at.as_deref(), Some("2023-11-14T22:13:20Z"));
                assert_eq!(run.ended_at.as_deref(), Some("2023-11-14T22:13:40Z"));
            }
            o => panic!("{o:?}"),
        }
        let unscheduled = Observed {
            next_elapse_usec: u64::MAX,
            last_trigger_usec: 1_700_000_000_000_000,
            ..unit("active")
        };
        match assess(UnitState::Running, &unscheduled, None) {
            Outcome::Ready {
                details:
                    ReadyDetails::SystemdUnit {
                        next_elapse,
                        last_trigger,
                        ..
                    },
                ..
            } => {
                assert_eq!(next_elapse, Option::None, "USEC_INFINITY: not scheduled");
                assert_eq!(last_trigger.as_deref(), Some("2023-11-14T22:13:20Z"));
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            assess(UnitState::Triggered, &unit("activating"), None),
            Outcome::Ready { .. }
        ));
        // A failed last run is reported, not repaired.
        let failed = Observed {
            result: "exit-code".into(),
            exit_status: 3,
            ..unit("failed")
        };
        match assess(UnitState::Triggered, &failed, None) {
            Outcome::Failed(Failure { reason, message }) => {
                assert_eq!(reason, FailureReason::UnitLastRunFailed);
                assert!(message.contains("exit status 3"), "{message}");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn stopped_never_stops_what_an_active_trigger_starts() {
        let o = Observed {
            active_triggers: vec!["job.timer".into()],
            ..unit("activating")
        };
        assert_eq!(
            plan_action(UnitState::Stopped, &o, SAME, TriggerAction::Restart),
            Action::None
        );
        match assess(UnitState::Stopped, &o, None) {
            Outcome::Failed(Failure { reason, message }) => {
                assert_eq!(reason, FailureReason::UnitTriggered);
                assert!(message.contains("job.timer"), "{message}");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn completed_runs_once_per_change_and_waits_for_a_run_in_progress() {
        let plan =
            |o: &Observed, l| plan_action(UnitState::Completed, o, l, TriggerAction::Restart);
        assert_eq!(plan(&unit("inactive"), FILES), Action::Start);
        assert_eq!(plan(&unit("failed"), INPUTS), Action::Start);
        assert_eq!(
            plan(&unit("active"), FILES),
            Action::Restart,
            "RemainAfterExit=yes"
        );
        assert_eq!(plan(&unit("activating"), FILES), Action::None);
        assert_eq!(plan(&unit("inactive"), SAME), Action::None);
        assert_eq!(
            plan(&unit("failed"), SAME),
            Action::None,
            "a failed run is not repeated"
        );

        assert!(matches!(
            assess(UnitState::Completed, &unit("activating"), None),
            Outcome::Waiting { .. }
        ));
        assert!(matches!(
            assess(UnitState::Completed, &unit("inactive"), Some("done")),
            Outcome::Ready { .. }
        ));
        for (o, job) in [
            (unit("failed"), None),
            (unit("inactive"), Some("dependency")),
        ] {
            assert!(matches!(
                assess(UnitState::Completed, &o, job),
                Outcome::Failed(Failure {
                    reason: FailureReason::UnitRunFailed,
                    ..
                })
            ));
        }
    }

    fn observed(active: &str, sub: &str) -> Observed {
        Observed {
            active_state: ActiveState::parse(active),
            sub_state: sub.into(),
            n_restarts: 2,
            main_pid: 42,
            result: "exit-code".into(),
            exit_status: 1,
            active_enter_usec: 1_700_000_000_000_000,
            ..Observed::default()
        }
    }

    #[test]
    fn assess_reports_ready_failed_and_activating() {
        match assess(UnitState::Running, &observed("active", "running"), None) {
            Outcome::Ready {
                details:
                    ReadyDetails::SystemdUnit {
                        n_restarts,
                        main_pid,
                        active_since,
                        last_run,
                        ..
                    },
                ..
            } => {
                assert_eq!(n_restarts, 2);
                assert_eq!(main_pid, Some(42));
                assert_eq!(active_since.as_deref(), Some("2023-11-14T22:13:20Z"));
                assert_eq!(last_run, Option::None);
            }
            o => panic!("{o:?}"),
        }
        match assess(UnitState::Running, &observed("failed", "failed"), None) {
            Outcome::Failed(Failure { reason, message }) => {
                assert_eq!(reason, FailureReason::UnitFailed);
                assert!(message.contains("result exit-code"), "{message}");
                assert!(message.contains("exit status 1"), "{message}");
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            assess(
                UnitState::Running,
                &observed("activating", "auto-restart"),
                None
            ),
            Outcome::Failed(Failure {
                reason: FailureReason::UnitActivating,
                ..
            })
        ));
        assert!(matches!(
            assess(UnitState::Stopped, &observed("inactive", "dead"), None),
            Outcome::Ready { .. }
        ));
        assert!(matches!(
            assess(UnitState::Stopped, &observed("active", "running"), None),
            Outcome::Failed(Failure {
                reason: FailureReason::UnitNotStopped,
                ..
            })
        ));
    }

    #[test]
    fn files_hash_covers_content_and_drop_ins() {
        let spec = |content: Option<&str>, drop: Option<&str>| SystemdUnitSpec {
            unit: manifest_types::spec::UnitName::new("a.service").unwrap(),
            content: content.map(Into::into),
            drop_ins: drop
                .map(|d| [("x.conf".to_owned(), d.to_owned())].into())
                .unwrap_or_default(),
            enabled: None,
            state: UnitState::Running,
            on_trigger: TriggerAction::Restart,
        };
        let a = files_hash(&spec(Some("1"), None));
        assert_ne!(a, files_hash(&spec(Some("2"), None)));
        assert_ne!(a, files_hash(&spec(Some("1"), Some("d"))));
        assert_eq!(a, files_hash(&spec(Some("1"), None)));
    }
}
