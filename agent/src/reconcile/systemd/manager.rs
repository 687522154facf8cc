//! The seam between the SystemdUnit reconciler and systemd: [`UnitManager`],
//! the few things the reconciler asks of a unit manager, with typed answers.
//! [`super::dbus::DbusUnits`] is the real one (zbus, with the one connection
//! and reconnect policy); the unit tests drive the reconciler against a
//! scripted fake (`super::fake`) to reach failure paths on cue — a job that
//! never ends, a stop job that fails, systemd going away and coming back.

use std::future::Future;
use std::time::Duration;

use manifest_types::spec::UnitState;

use super::planning::{Action, Observed};
use crate::reconcile::{Failure, Interrupt};

/// Whether systemd could load a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadState {
    Loaded,
    /// No unit file anywhere on the search path.
    NotFound,
    /// `error`, `bad-setting`, `masked`, …
    Other(String),
}

/// How a job ended, in systemd's words (`JobRemoved`'s result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    Done,
    Failed,
    Timeout,
    Canceled,
    Dependency,
    Skipped,
    Other(String),
}

impl JobEnd {
    pub fn parse(result: &str) -> Self {
        match result {
            "done" => Self::Done,
            "failed" => Self::Failed,
            "timeout" => Self::Timeout,
            "canceled" => Self::Canceled,
            "dependency" => Self::Dependency,
            "skipped" => Self::Skipped,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Canceled => "canceled",
            Self::Dependency => "dependency",
            Self::Skipped => "skipped",
            Self::Other(r) => r,
        }
    }
}

/// How a unit job ended, as far as the agent waited for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    Ended(JobEnd),
    /// Still queued or running after the agent's job timeout; the unit's
    /// state says the rest.
    StillRunning,
    /// A newer manifest interrupted the wait (the job carries on in systemd).
    Interrupted,
}

impl JobResult {
    pub fn is_done(&self) -> bool {
        matches!(self, Self::Ended(JobEnd::Done))
    }
}

/// What the SystemdUnit reconciler asks of systemd. Every failure is a typed
/// [`Failure`] (`SystemdUnavailable`, `SystemdError`); an implementation
/// that holds a connection drops it after an error and connects again on
/// the next call.
pub trait UnitManager: Send + Sync + std::fmt::Debug + 'static {
    /// A job systemd accepted, until its end is known.
    type Job: Send;

    /// Whether systemd answers now: its version.
    fn probe(&self) -> impl Future<Output = Result<String, Failure>> + Send;

    /// Loads `name`, reloading systemd's configuration first when
    /// `files_changed` or systemd says the unit's files changed on disk.
    fn load(
        &self,
        name: &str,
        files_changed: bool,
    ) -> impl Future<Output = Result<LoadState, Failure>> + Send;

    /// Reloads systemd's configuration (`daemon-reload`).
    fn reload(&self) -> impl Future<Output = Result<(), Failure>> + Send;

    /// `enabled`, `disabled`, `static`, `alias`, …
    fn unit_file_state(&self, name: &str) -> impl Future<Output = Result<String, Failure>> + Send;

    fn enable(&self, name: &str) -> impl Future<Output = Result<(), Failure>> + Send;

    fn disable(&self, name: &str) -> impl Future<Output = Result<(), Failure>> + Send;

    /// What systemd says about a loaded unit; what `want` needs besides the
    /// states (a service's type for `running`, active triggers for `stopped`).
    fn observe(
        &self,
        name: &str,
        want: UnitState,
    ) -> impl Future<Output = Result<Observed, Failure>> + Send;

    /// Queues `action` in mode "replace".
    fn queue(
        &self,
        name: &str,
        action: Action,
    ) -> impl Future<Output = Result<Self::Job, Failure>> + Send;

    /// Waits for a queued job to end — at most `timeout`, and only until
    /// `interrupt` is raised.
    fn wait(
        &self,
        job: Self::Job,
        timeout: Duration,
        interrupt: Interrupt,
    ) -> impl Future<Output = Result<JobResult, Failure>> + Send;

    /// Keeps `name` loaded (its last run with it) while this manager lives.
    fn keep_loaded(&self, name: &str) -> impl Future<Output = Result<(), Failure>> + Send;

    /// Ends what [`Self::keep_loaded`] started, if it did.
    fn let_unload(&self, name: &str) -> impl Future<Output = Result<(), Failure>> + Send;
}
