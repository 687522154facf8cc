//! One reconciler per resource kind, dispatched by a closed `match` over
//! [`ResourceSpec`]. Each observes, plans (a pure function carrying most of
//! the unit tests) and applies the minimum change, returning an [`Outcome`];
//! retry policy lives in [`crate::worker`], not here.

pub mod container;
pub mod file;
pub mod systemd;

use manifest_types::{
    AgentManifest, ManagedResource, ReadyDetails, ReleasedResource, ResourceKind, ResourceSpec,
};

use crate::state::StateDir;
use crate::status::StatusBoard;

/// Lets a long reconcile (an image pull) show `Reconciling` with a message
/// while it works.
#[derive(Debug)]
pub struct Progress<'a> {
    board: &'a StatusBoard,
    resource: &'a ManagedResource,
}

impl<'a> Progress<'a> {
    pub fn new(board: &'a StatusBoard, resource: &'a ManagedResource) -> Self {
        Self { board, resource }
    }

    pub fn report(&self, message: impl Into<String>) {
        self.board.set_progress(self.resource, message.into());
    }
}

/// The level a `restartOn` trigger is measured by: a hash of the spec
/// hashes of the resource's inputs (sorted by id), or "" without inputs.
/// Reconcilers remember it; a different value means a restart is owed.
pub fn inputs_hash(manifest: &AgentManifest, restart_on: &[manifest_types::ResourceId]) -> String {
    let mut inputs: Vec<String> = restart_on
        .iter()
        .filter_map(|id| {
            manifest
                .resource(id)
                .map(|r| format!("{id}={}", r.spec_hash()))
        })
        .collect();
    if inputs.is_empty() {
        return String::new();
    }
    inputs.sort();
    file::sha256_hex(inputs.join("\n").as_bytes())
}

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

impl From<Failure> for Outcome {
    fn from(f: Failure) -> Self {
        Self::Failed {
            reason: f.reason,
            message: f.message,
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
    pub containers: container::ContainerReconciler,
    pub units: systemd::UnitReconciler,
}

impl Reconcilers {
    pub fn new(
        state: StateDir,
        config: &crate::config::Config,
    ) -> Result<Self, crate::state::StateError> {
        Ok(Self {
            files: file::FileReconciler::new(state.clone(), config.file_roots.clone())?,
            containers: container::ContainerReconciler::new(
                config.agent_id.clone(),
                config.docker_host.clone(),
                config.container_stop_timeout,
            ),
            units: systemd::UnitReconciler::new(
                state.clone(),
                config.unit_dir.clone(),
                config.systemd_bus.clone(),
                config.unit_job_timeout,
            )?,
        })
    }

    /// Kinds this build can converge (reported in the inventory).
    pub fn available() -> Vec<ResourceKind> {
        vec![
            ResourceKind::File,
            ResourceKind::Container,
            ResourceKind::SystemdUnit,
        ]
    }

    /// Converges one resource. Reconcile always sees the whole resource,
    /// never a hint of what changed.
    pub async fn reconcile(
        &mut self,
        resource: &ManagedResource,
        manifest: &AgentManifest,
        progress: &Progress<'_>,
    ) -> Outcome {
        match &resource.spec {
            ResourceSpec::File(spec) => self.files.reconcile(&resource.id, spec),
            ResourceSpec::Container(spec) => {
                let inputs = inputs_hash(manifest, &resource.restart_on);
                let hash = container::effective_hash(&resource.spec_hash(), &inputs);
                self.containers
                    .reconcile(&resource.id, spec, &hash, progress)
                    .await
            }
            ResourceSpec::SystemdUnit(spec) => {
                let inputs = inputs_hash(manifest, &resource.restart_on);
                self.units.reconcile(&resource.id, spec, &inputs).await
            }
            ResourceSpec::Unsupported(u) => Outcome::Unsupported(u.reason.clone()),
        }
    }

    /// When a Ready resource should be looked at again before the next drift
    /// check (a freshly started container).
    pub fn recheck_after(&mut self, resource: &ManagedResource) -> Option<std::time::Duration> {
        match resource.spec {
            ResourceSpec::Container(_) => self.containers.recheck_after(&resource.id),
            _ => None,
        }
    }

    /// Removes (or releases) what the agent owns but `manifest` no longer lists.
    pub async fn remove_unlisted(&mut self, manifest: &AgentManifest) -> Vec<ReleasedResource> {
        self.containers.remove_unlisted(manifest).await;
        let mut released = self.units.remove_unlisted(manifest).await;
        released.extend(self.files.remove_unlisted(manifest));
        released
    }
}
