//! The seam between the Container reconciler and a container engine:
//! [`ContainerEngine`], the few things the reconciler asks of an engine,
//! with answers in the agent's own types. [`super::docker::DockerEngine`] is
//! the real one (bollard, with the one connection and reconnect rule); the
//! unit tests drive the reconciler against a scripted fake (`super::fake`)
//! to reach failure paths on cue — the engine gone in the middle of a
//! replacement, a health check turning unhealthy, the engine coming back.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::{Duration, SystemTime};

use manifest_types::ContainerSpec;

use crate::reconcile::Failure;

/// A container's state as a list shows it, ordered from least to most
/// usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ListedState {
    /// Dead, removing: only good for removal.
    Gone,
    Created,
    Exited,
    Paused,
    Restarting,
    Running,
}

/// One container as a list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub id: String,
    pub state: ListedState,
    /// Seconds since the epoch.
    pub created: i64,
    pub labels: HashMap<String, String>,
}

/// A container's lifecycle state, as the engine reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerStatus {
    Created,
    Running,
    Paused,
    Restarting,
    Removing,
    Exited,
    Dead,
    Unknown,
}

impl fmt::Display for ContainerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Restarting => "restarting",
            Self::Removing => "removing",
            Self::Exited => "exited",
            Self::Dead => "dead",
            Self::Unknown => "unknown",
        })
    }
}

/// What a container's healthcheck says; a container without one has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    Starting,
    Healthy,
    Unhealthy,
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Starting => "starting",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        })
    }
}

/// One container as an inspect shows it: what [`super::assess`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    pub id: String,
    pub image_id: String,
    pub status: ContainerStatus,
    /// The last run's exit code (reset by the engine when it restarts the
    /// container).
    pub exit_code: i64,
    /// Restarts by the engine under the restart policy.
    pub restart_count: u64,
    /// RFC 3339, as the engine gave it ("" before the first start).
    pub started_at: String,
    pub finished_at: String,
    pub created: Option<SystemTime>,
    pub health: Option<HealthStatus>,
}

/// What the Container reconciler asks of a container engine. Every failure
/// is a typed [`Failure`] (`DockerUnavailable` when the engine cannot be
/// reached, `DockerError` when it refuses, and the specific reasons named
/// below); an implementation that holds a connection drops it after a
/// transport error and connects again on the next call.
pub trait ContainerEngine: Send + Sync + fmt::Debug + 'static {
    /// Whether the engine answers now: its version.
    fn version(&self) -> impl Future<Output = Result<String, Failure>> + Send;

    /// Every container (running or not) carrying all of `labels`.
    fn list(
        &self,
        labels: &[(&str, &str)],
    ) -> impl Future<Output = Result<Vec<Summary>, Failure>> + Send;

    fn inspect(&self, id: &str) -> impl Future<Output = Result<Inspected, Failure>> + Send;

    /// Whether the image `reference` is on this device.
    fn has_image(&self, reference: &str) -> impl Future<Output = Result<bool, Failure>> + Send;

    /// Pulls `reference`, telling `on_status` each new progress line. A
    /// registry's refusal is `ImagePullFailed`.
    fn pull(
        &self,
        reference: &str,
        on_status: &(dyn Fn(&str) + Send + Sync),
    ) -> impl Future<Output = Result<(), Failure>> + Send;

    /// Creates (does not start) a container named `name` for `spec` with
    /// `labels`; its id. A taken name is `NameConflict`.
    fn create(
        &self,
        name: &str,
        spec: &ContainerSpec,
        labels: HashMap<String, String>,
    ) -> impl Future<Output = Result<String, Failure>> + Send;

    /// Starts a container; the engine failing to run it is `StartFailed`.
    fn start(&self, id: &str) -> impl Future<Output = Result<(), Failure>> + Send;

    /// Stops a container, killing it after `timeout`; a container already
    /// stopped or gone is not an error.
    fn stop(&self, id: &str, timeout: Duration)
    -> impl Future<Output = Result<(), Failure>> + Send;

    /// Removes a (stopped) container; one already gone is not an error.
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), Failure>> + Send;

    /// The exit code of the container's last run since `since`, from the
    /// engine's event log, when it still has it.
    fn last_exit_code(
        &self,
        id: &str,
        since: SystemTime,
    ) -> impl Future<Output = Option<i64>> + Send;

    /// The registry digest an image was pulled by, when it has one.
    fn image_digest(
        &self,
        image_id: &str,
    ) -> impl Future<Output = Result<Option<String>, Failure>> + Send;
}
