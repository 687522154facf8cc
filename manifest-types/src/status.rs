//! What an agent reports in `actual-state.<agent-id>`: [`AgentStatus`], one
//! [`ResourceStatus`] per resource, and Kubernetes-style [`Condition`]s.
//!
//! Whether a status means converged is decided in one place,
//! [`crate::convergence::assess`] (ADR 0010); [`AgentStatus::converged_on`]
//! is that rule for a status just received. Times written here are
//! informational only (devices may have no RTC); ages are computed from KV
//! server timestamps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ApiVersion;
use crate::ids::{AgentId, ResourceId};
use crate::manifest::ResourceSource;
use crate::reason::{RejectionReason, ReleaseReason};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub api_version: ApiVersion,
    pub agent_id: AgentId,
    /// Persisted per installation: tells "someone else writes my key" from "I restarted".
    pub instance_id: String,
    /// Generation of the accepted manifest this status reflects (0: none yet).
    pub manifest_generation: u64,
    /// Highest generation looked at, accepted or not.
    pub observed_generation: u64,
    /// Highest KV revision of the desired-state key looked at (malformed
    /// values have no generation but have a revision).
    pub observed_revision: u64,
    #[serde(default)]
    pub resources: BTreeMap<ResourceId, ResourceStatus>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The most recent manifest that was not accepted, while it is the newest
    /// one looked at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection: Option<Rejection>,
    /// Resources dropped from the manifest whose artefacts were left in place
    /// (e.g. a file changed by someone else since the agent wrote it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<ReleasedResource>,
    /// Resources dropped from the manifest whose removal has not succeeded
    /// yet (engine down, a stop job failed, a file busy). Removal is part of
    /// convergence: while this is not empty, Ready is false; each entry is
    /// retried with backoff.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removing: Vec<RemovingResource>,
    pub agent: AgentBuild,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentBuild {
    pub version: String,
    pub arch: String,
    pub os: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    pub kind: String,
    /// [`crate::ManagedResource::spec_hash`] of the spec this status is about.
    pub spec_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ResourceSource>,
    #[serde(flatten)]
    pub state: ResourceState,
}

/// The life of one resource. Unsupported is terminal for a generation;
/// Failed is retried after `retryAfterSeconds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(
    tag = "state",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum ResourceState {
    Pending,
    Reconciling {
        message: String,
    },
    Ready {
        since: String,
        details: ReadyDetails,
    },
    Failed {
        since: String,
        reason: String,
        message: String,
        attempts: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_seconds: Option<u64>,
    },
    Unsupported {
        reason: String,
    },
}

impl ResourceState {
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Reconciling { .. } => "Reconciling",
            Self::Ready { .. } => "Ready",
            Self::Failed { .. } => "Failed",
            Self::Unsupported { .. } => "Unsupported",
        }
    }
}

/// What "Ready" means, per kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all_fields = "camelCase")]
pub enum ReadyDetails {
    File {
        sha256: String,
        size: u64,
        mode: String,
        uid: u32,
        gid: u32,
    },
    Container {
        container_id: String,
        image_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image_digest: Option<String>,
        running_since: String,
        /// Restarts by the engine under the container's restart policy.
        restart_count: u64,
        /// Times the agent recreated or restarted it because it was removed
        /// or stopped outside Flotilla (since the agent started).
        #[serde(default, skip_serializing_if = "is_zero")]
        repairs: u64,
        /// The image's healthcheck status, when it has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health: Option<String>,
    },
    SystemdUnit {
        active_state: String,
        sub_state: String,
        n_restarts: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        main_pid: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        active_since: Option<String>,
        /// A service's last run (its main process), for `triggered` and
        /// `completed` units: result, exit status and times.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_run: Option<UnitRun>,
        /// A timer's last elapse and next one (RFC 3339, the device's clock).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_trigger: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_elapse: Option<String>,
    },
}

/// The last run of a service's main process, as systemd reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct UnitRun {
    /// systemd's service result: `success`, `exit-code`, `signal`,
    /// `timeout`, `core-dump`, ...
    pub result: String,
    /// The main process's exit status (or signal number).
    pub exit_status: i32,
    /// When the main process started (RFC 3339, the device's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it exited; absent while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ConditionType {
    /// Every resource of the accepted manifest is Ready.
    Ready,
    /// Work is under way.
    Reconciling,
    /// At least one resource is Failed or Unsupported.
    Degraded,
    /// The newest manifest looked at was not accepted; the last good one runs.
    ManifestRejected,
    /// Another installation (instanceId) writes this agent's status key.
    IdentityConflict,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: ConditionType,
    pub status: bool,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// Informational (device clock).
    pub last_transition_time: String,
}

/// A manifest the agent did not accept, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Rejection {
    /// Stable class, e.g. `MalformedJson`, `InvalidPath`, `PathOutsideRoots`,
    /// `WrongAgent`, `ReplayedGeneration`, `DesiredStateDeleted`.
    pub reason: RejectionReason,
    pub message: String,
    /// KV revision of the rejected value.
    pub revision: u64,
    /// Its generation, when it had a readable one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ReleasedResource {
    pub id: ResourceId,
    pub target: String,
    pub reason: ReleaseReason,
    /// What happened, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A resource the agent is still removing, and why the last attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RemovingResource {
    pub id: ResourceId,
    pub kind: String,
    /// A stable code ([`crate::FailureReason`]).
    pub reason: String,
    pub message: String,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
}

impl AgentStatus {
    pub fn condition(&self, t: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == t)
    }

    pub fn condition_true(&self, t: ConditionType) -> bool {
        self.condition(t).is_some_and(|c| c.status)
    }

    /// The rejection of `generation` or of anything newer, if any.
    pub fn rejected_at_or_after(&self, generation: u64) -> Option<&Rejection> {
        self.rejection
            .as_ref()
            .filter(|r| r.generation.is_none_or(|g| g >= generation))
            .filter(|_| self.manifest_generation < generation)
    }

    pub fn ready_count(&self) -> usize {
        self.resources
            .values()
            .filter(|r| r.state.is_ready())
            .count()
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
