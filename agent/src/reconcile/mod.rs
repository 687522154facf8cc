//! One reconciler per resource kind, dispatched by a closed `match` over
//! [`ResourceSpec`]. Each observes, plans (a pure function carrying most of
//! the unit tests) and applies the minimum change, returning an [`Outcome`];
//! retry policy lives in [`crate::worker`], not here.

pub mod container;
pub mod file;
pub mod systemd;

use std::sync::Arc;
use std::time::Duration;

use manifest_types::{
    AgentManifest, EngineStatus, FailureReason, ManagedResource, ReadyDetails, ReleasedResource,
    ResourceId, ResourceKind, ResourceSpec,
};
use tokio::sync::watch;

use crate::state::StateDir;
use crate::status::StatusBoard;

/// Lets a long reconcile (an image pull) show `Reconciling` with a message
/// while it works. Owned, so a reconcile can run as a task of its own.
#[derive(Debug, Clone)]
pub struct Progress {
    board: StatusBoard,
    resource: Arc<ManagedResource>,
}

impl Progress {
    pub fn new(board: StatusBoard, resource: Arc<ManagedResource>) -> Self {
        Self { board, resource }
    }

    pub fn report(&self, message: impl Into<String>) {
        self.board.set_progress(&self.resource, message.into());
    }
}

/// Raised by the worker when a newer manifest changes or drops the resource
/// being reconciled. Reconcilers look at it only at safe points — while
/// waiting for an image pull or a unit job — and then return
/// [`Outcome::Interrupted`]; a container swap, once begun, always finishes.
#[derive(Debug, Clone)]
pub struct Interrupt(watch::Receiver<bool>);

impl Interrupt {
    pub fn new() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        (tx, Self(rx))
    }

    /// One that is never raised (removals, tests).
    pub fn never() -> Self {
        Self::new().1
    }

    /// Resolves once an interrupt is requested; never, once the sender is gone.
    pub async fn requested(&mut self) {
        if self.0.wait_for(|raised| *raised).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Everything a reconcile gets besides the resource itself.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub progress: Progress,
    pub interrupt: Interrupt,
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

/// What one reconcile of one resource achieved, and when to look again.
/// Retry policy (backoff after failures) lives in [`crate::worker`]; a
/// reconciler only says when a good or pending state deserves another look.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Ready; `recheck_after` when it is young enough to look at again
    /// before the next drift check (a container that was just started may
    /// still crash).
    Ready {
        details: ReadyDetails,
        recheck_after: Option<Duration>,
    },
    /// Not Ready and not failed: on its way (a healthcheck still `starting`,
    /// a unit job still running). Reported as `Reconciling`.
    Waiting {
        message: String,
        recheck_after: Duration,
    },
    /// Retried with backoff.
    Failed(Failure),
    /// Terminal for this generation.
    Unsupported(String),
    /// A newer manifest interrupted the reconcile at a safe point; nothing
    /// was decided.
    Interrupted,
}

/// A failed step inside a reconciler (small, so `Result<_, Failure>` stays cheap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: FailureReason,
    pub message: String,
}

impl Failure {
    pub fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl From<Failure> for Outcome {
    fn from(f: Failure) -> Self {
        Self::Failed(f)
    }
}

impl Outcome {
    pub fn failed(reason: FailureReason, message: impl Into<String>) -> Self {
        Self::Failed(Failure::new(reason, message))
    }

    pub fn ready(details: ReadyDetails) -> Self {
        Self::Ready {
            details,
            recheck_after: None,
        }
    }
}

/// What a removal sweep of one kind did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Removals {
    /// Dropped resources whose artefacts were deliberately left in place.
    pub released: Vec<ReleasedResource>,
    /// Dropped resources whose removal failed this time.
    pub failed: Vec<(ResourceId, ResourceKind, Failure)>,
}

impl Removals {
    pub fn extend(&mut self, other: Removals) {
        self.released.extend(other.released);
        self.failed.extend(other.failed);
    }
}

/// All reconcilers of this agent. Shared by the worker's concurrent
/// reconciles: each kind keeps its small state behind its own locks.
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

    /// Asks each reconciler's engine whether it answers (at most `timeout`
    /// each), for the inventory: a device without a Docker Engine, or with
    /// its system bus down, says so instead of listing the kind as usable.
    pub async fn engines(&self, timeout: Duration) -> Vec<EngineStatus> {
        let status = |kind, engine: &str, r: Result<Result<String, Failure>, _>| {
            let r = match r {
                Ok(answer) => answer.map_err(|f| f.message),
                Err(_) => Err(format!("no answer within {timeout:?}")),
            };
            EngineStatus {
                kind,
                engine: engine.to_owned(),
                reachable: r.is_ok(),
                message: r.as_ref().err().cloned(),
                version: r.ok(),
            }
        };
        let (docker, systemd) = tokio::join!(
            tokio::time::timeout(timeout, self.containers.probe()),
            tokio::time::timeout(timeout, self.units.probe()),
        );
        vec![
            EngineStatus {
                kind: ResourceKind::File,
                engine: "filesystem".into(),
                reachable: true,
                version: None,
                message: None,
            },
            status(ResourceKind::Container, "Docker Engine", docker),
            status(ResourceKind::SystemdUnit, "systemd", systemd),
        ]
    }

    /// Converges one resource. Reconcile always sees the whole resource,
    /// never a hint of what changed.
    pub async fn reconcile(
        &self,
        resource: &ManagedResource,
        manifest: &AgentManifest,
        ctx: Ctx,
    ) -> Outcome {
        match &resource.spec {
            ResourceSpec::File(spec) => self.files.reconcile(&resource.id, spec).await,
            ResourceSpec::Container(spec) => {
                let inputs = inputs_hash(manifest, &resource.restart_on);
                let hash = container::effective_hash(&resource.spec_hash(), &inputs);
                self.containers
                    .reconcile(&resource.id, spec, &hash, ctx)
                    .await
            }
            ResourceSpec::SystemdUnit(spec) => {
                let inputs = inputs_hash(manifest, &resource.restart_on);
                self.units.reconcile(&resource.id, spec, &inputs, ctx).await
            }
            ResourceSpec::Unsupported(u) => Outcome::Unsupported(u.reason.clone()),
        }
    }

    /// Removes (or releases) what the agent owns but `manifest` does not list
    /// under any id. A resource that is listed but Unsupported is kept as it
    /// is: the agent never destroys what it does not understand.
    /// `dropped` names resources known to have left the manifest, so a kind
    /// whose manager is unreachable can still say which removals are owed.
    pub async fn remove_unlisted(
        &self,
        manifest: &AgentManifest,
        dropped: &[(ResourceId, ResourceKind)],
    ) -> Removals {
        let mut out = self.containers.remove_unlisted(manifest, dropped).await;
        out.extend(self.units.remove_unlisted(manifest).await);
        out.extend(self.files.remove_unlisted(manifest).await);
        out
    }
}
