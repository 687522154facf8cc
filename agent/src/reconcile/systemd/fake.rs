//! A scripted [`UnitManager`] for the reconciler's unit tests: units held in
//! memory, jobs that end as the test says (or never), systemd that can go
//! away and come back, and a log of every call that changes something.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use manifest_types::FailureReason;
use manifest_types::spec::UnitState;

use super::manager::{JobEnd, JobResult, LoadState, UnitManager};
use super::planning::{Action, ActiveState, Observed};
use crate::reconcile::{Failure, Interrupt};

/// How a queued job goes: it ends with `end` (None: never) and leaves the
/// unit in `active_state`/`sub_state`.
#[derive(Debug, Clone)]
pub struct Script {
    pub end: Option<JobEnd>,
    pub active_state: &'static str,
    pub sub_state: &'static str,
}

#[derive(Debug, Default)]
pub struct Units {
    /// Unit name → what systemd says about it. Unknown names are not found.
    pub units: BTreeMap<String, Observed>,
    pub file_states: BTreeMap<String, String>,
    /// What the next job of each action does; default: done, as asked.
    pub scripts: BTreeMap<(String, Action), Script>,
    /// Every start, stop, restart, reload, enable and disable, in order.
    pub calls: Vec<String>,
    /// systemd does not answer.
    pub down: bool,
}

#[derive(Debug, Default)]
pub struct FakeUnits(pub Mutex<Units>);

impl FakeUnits {
    pub fn with(f: impl FnOnce(&mut Units)) -> Self {
        let mut u = Units::default();
        f(&mut u);
        Self(Mutex::new(u))
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Units> {
        self.0.lock().unwrap()
    }

    fn up(&self) -> Result<std::sync::MutexGuard<'_, Units>, Failure> {
        let u = self.lock();
        if u.down {
            return Err(Failure::new(
                FailureReason::SystemdUnavailable,
                "cannot reach systemd over D-Bus: (fake) down",
            ));
        }
        Ok(u)
    }
}

impl UnitManager for FakeUnits {
    type Job = Option<JobEnd>;

    async fn probe(&self) -> Result<String, Failure> {
        self.up().map(|_| "252 (fake)".into())
    }

    async fn load(&self, name: &str, _files_changed: bool) -> Result<LoadState, Failure> {
        let u = self.up()?;
        Ok(if u.units.contains_key(name) {
            LoadState::Loaded
        } else {
            LoadState::NotFound
        })
    }

    async fn reload(&self) -> Result<(), Failure> {
        self.up().map(drop)
    }

    async fn unit_file_state(&self, name: &str) -> Result<String, Failure> {
        let u = self.up()?;
        Ok(u.file_states
            .get(name)
            .cloned()
            .unwrap_or_else(|| "disabled".into()))
    }

    async fn enable(&self, name: &str) -> Result<(), Failure> {
        let mut u = self.up()?;
        u.calls.push(format!("enable {name}"));
        u.file_states.insert(name.into(), "enabled".into());
        Ok(())
    }

    async fn disable(&self, name: &str) -> Result<(), Failure> {
        let mut u = self.up()?;
        u.calls.push(format!("disable {name}"));
        u.file_states.insert(name.into(), "disabled".into());
        Ok(())
    }

    async fn observe(&self, name: &str, _want: UnitState) -> Result<Observed, Failure> {
        let u = self.up()?;
        Ok(u.units.get(name).cloned().unwrap_or_default())
    }

    async fn queue(&self, name: &str, action: Action) -> Result<Option<JobEnd>, Failure> {
        let mut u = self.up()?;
        u.calls.push(format!("{action:?} {name}"));
        let script = u
            .scripts
            .get(&(name.to_owned(), action))
            .cloned()
            .unwrap_or(Script {
                end: Some(JobEnd::Done),
                active_state: if action == Action::Stop {
                    "inactive"
                } else {
                    "active"
                },
                sub_state: if action == Action::Stop {
                    "dead"
                } else {
                    "running"
                },
            });
        let unit = u.units.entry(name.to_owned()).or_default();
        unit.active_state = ActiveState::parse(script.active_state);
        unit.sub_state = script.sub_state.into();
        Ok(script.end)
    }

    async fn wait(
        &self,
        job: Option<JobEnd>,
        timeout: Duration,
        mut interrupt: Interrupt,
    ) -> Result<JobResult, Failure> {
        match job {
            Some(end) => Ok(JobResult::Ended(end)),
            None => tokio::select! {
                () = tokio::time::sleep(timeout) => Ok(JobResult::StillRunning),
                () = interrupt.requested() => Ok(JobResult::Interrupted),
            },
        }
    }

    async fn keep_loaded(&self, _name: &str) -> Result<(), Failure> {
        self.up().map(drop)
    }

    async fn let_unload(&self, _name: &str) -> Result<(), Failure> {
        self.up().map(drop)
    }
}
