//! One reconciler per resource kind, dispatched by a closed `match` over
//! [`ResourceSpec`]. Each observes, plans (a pure function carrying most of
//! the unit tests) and applies the minimum change, returning an [`Outcome`];
//! retry policy lives in [`crate::worker`], not here.

pub mod file;

use manifest_types::{
    AgentManifest, ManagedResource, ReadyDetails, ReleasedResource, ResourceKind, ResourceSpec,
};

use crate::state::StateDir;

/// What one reconcile of one resource achieved.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ready(ReadyDetails),
    /// Retried with backoff. `reason` is a stable CamelCase code.
    Failed {
        reason: &'static str,
        message: String,
    },
    /// Terminal for this generation.
    Unsupported(String),
}

/// A failed step inside a reconciler (small, so `Result<_, Failure>` stays cheap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl Outcome {
    pub fn failed(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Failed {
            reason,
            message: message.into(),
        }
    }
}

/// All reconcilers of this agent.
#[derive(Debug)]
pub struct Reconcilers {
    pub files: file::FileReconciler,
}

impl Reconcilers {
    pub fn new(
        state: StateDir,
        roots: Vec<std::path::PathBuf>,
    ) -> Result<Self, crate::state::StateError> {
        Ok(Self {
            files: file::FileReconciler::new(state, roots)?,
        })
    }

    /// Kinds this build can converge (reported in the inventory).
    pub fn available() -> Vec<ResourceKind> {
        vec![ResourceKind::File]
    }

    /// Converges one resource. Reconcile always sees the whole resource,
    /// never a hint of what changed.
    pub async fn reconcile(&mut self, resource: &ManagedResource) -> Outcome {
        match &resource.spec {
            ResourceSpec::File(spec) => self.files.reconcile(&resource.id, spec),
            ResourceSpec::Container(_) | ResourceSpec::SystemdUnit(_) => Outcome::failed(
                "ReconcilerUnavailable",
                format!(
                    "{} reconciler not available on this agent",
                    resource.spec.kind_str()
                ),
            ),
            ResourceSpec::Unsupported(u) => Outcome::Unsupported(u.reason.clone()),
        }
    }

    /// Removes (or releases) what the agent owns but `manifest` no longer lists.
    pub async fn remove_unlisted(&mut self, manifest: &AgentManifest) -> Vec<ReleasedResource> {
        self.files.remove_unlisted(manifest)
    }
}
