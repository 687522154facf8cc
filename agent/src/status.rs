//! The status board: the one place where the event loop (what was observed
//! and accepted) and the worker (how each resource is doing) meet to form the
//! [`AgentStatus`] the agent reports. Every change rebuilds the document and
//! hands it to the status writer through a `watch` channel, so writes are
//! coalesced: the writer always sends the newest, never a backlog.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use manifest_types::{
    AgentBuild, AgentId, AgentStatus, ApiVersion, Condition, ConditionType, Rejection,
    ReleasedResource, RemovingResource, ResourceId, ResourceState, ResourceStatus,
};
use tokio::sync::watch;

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

pub fn agent_build() -> AgentBuild {
    AgentBuild {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
        os: std::env::consts::OS.to_owned(),
    }
}

#[derive(Debug, Default)]
struct Inputs {
    accepted_generation: u64,
    /// Resources the accepted manifest lists.
    accepted_resources: usize,
    observed_generation: u64,
    observed_revision: u64,
    rejection: Option<Rejection>,
    worker_generation: u64,
    resources: BTreeMap<ResourceId, ResourceStatus>,
    /// What reconciles in flight say they are doing (shown over `resources`).
    progress: BTreeMap<ResourceId, ResourceStatus>,
    released: Vec<ReleasedResource>,
    removing: Vec<RemovingResource>,
    identity_conflict: Option<String>,
    /// When each condition last changed status.
    transitions: BTreeMap<ConditionType, (bool, String)>,
}

/// The accepted manifest as the device runs it: see [`StatusBoard::summary`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub generation: u64,
    /// The worker has not yet looked at every resource of `generation`.
    pub converging: bool,
    pub total: usize,
    /// Ready resources of `generation` (0 while converging).
    pub ready: usize,
    pub rejection: Option<String>,
}

/// Shared, cheap to clone.
#[derive(Debug, Clone)]
pub struct StatusBoard {
    agent_id: AgentId,
    instance_id: String,
    inputs: Arc<Mutex<Inputs>>,
    tx: Arc<watch::Sender<Arc<AgentStatus>>>,
}

impl StatusBoard {
    pub fn new(
        agent_id: AgentId,
        instance_id: String,
    ) -> (Self, watch::Receiver<Arc<AgentStatus>>) {
        let mut inputs = Inputs::default();
        let initial = build(&agent_id, &instance_id, &mut inputs);
        let (tx, rx) = watch::channel(Arc::new(initial));
        let board = Self {
            agent_id,
            instance_id,
            inputs: Arc::new(Mutex::new(inputs)),
            tx: Arc::new(tx),
        };
        (board, rx)
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<AgentStatus>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<AgentStatus> {
        self.tx.borrow().clone()
    }

    fn update(&self, f: impl FnOnce(&mut Inputs)) {
        let mut inputs = self.inputs.lock().expect("status board lock");
        f(&mut inputs);
        let status = build(&self.agent_id, &self.instance_id, &mut inputs);
        self.tx.send_if_modified(|cur| {
            if **cur == status {
                false
            } else {
                *cur = Arc::new(status);
                true
            }
        });
    }

    /// A value of the desired-state key was looked at.
    pub fn observed(&self, revision: u64, generation: Option<u64>) {
        self.update(|i| {
            i.observed_revision = i.observed_revision.max(revision);
            if let Some(g) = generation {
                i.observed_generation = i.observed_generation.max(g);
            }
        });
    }

    /// A manifest of `resources` resources was accepted (the worker will
    /// converge it).
    pub fn accepted(&self, generation: u64, resources: usize) {
        self.update(|i| {
            i.accepted_generation = generation;
            i.accepted_resources = resources;
            i.observed_generation = i.observed_generation.max(generation);
            i.rejection = None;
        });
    }

    /// What the device runs, for its `systemctl status` line: the accepted
    /// generation (the cached one right after a restart), how many of its
    /// resources are Ready, and the last rejection.
    pub fn summary(&self) -> Summary {
        let i = self.inputs.lock().expect("status board lock");
        let current = i.worker_generation == i.accepted_generation;
        Summary {
            generation: i.accepted_generation,
            converging: !current,
            total: i.accepted_resources,
            ready: if current {
                i.resources.values().filter(|r| r.state.is_ready()).count()
            } else {
                0
            },
            rejection: i.rejection.as_ref().map(|r| r.reason.to_string()),
        }
    }

    pub fn rejected(&self, rejection: Rejection) {
        self.update(|i| i.rejection = Some(rejection));
    }

    /// What the worker knows: the generation every resource has been looked
    /// at for (and swept), each resource's status, and removals.
    pub fn set_resources(
        &self,
        generation: u64,
        resources: BTreeMap<ResourceId, ResourceStatus>,
        released: Vec<ReleasedResource>,
        removing: Vec<RemovingResource>,
    ) {
        self.update(|i| {
            i.worker_generation = generation;
            i.resources = resources;
            i.released = released;
            i.removing = removing;
        });
    }

    /// One resource is being worked on (shown until its reconcile returns).
    pub fn set_progress(&self, resource: &manifest_types::ManagedResource, message: String) {
        self.update(|i| {
            i.progress.insert(
                resource.id.clone(),
                ResourceStatus {
                    kind: resource.spec.kind_str().to_owned(),
                    spec_hash: resource.spec_hash(),
                    source: resource.source.clone(),
                    state: manifest_types::ResourceState::Reconciling { message },
                },
            );
        });
    }

    /// The reconcile of `id` returned; its own status takes over again.
    pub fn clear_progress(&self, id: &ResourceId) {
        self.update(|i| {
            i.progress.remove(id);
        });
    }

    pub fn set_identity_conflict(&self, other_instance: Option<String>) {
        self.update(|i| i.identity_conflict = other_instance);
    }

    pub fn identity_conflict(&self) -> Option<String> {
        self.inputs
            .lock()
            .expect("status board lock")
            .identity_conflict
            .clone()
    }
}

fn build(agent_id: &AgentId, instance_id: &str, i: &mut Inputs) -> AgentStatus {
    let mut resources = i.resources.clone();
    for (id, p) in &i.progress {
        resources.insert(id.clone(), p.clone());
    }
    let total = resources.len();
    let ready = resources.values().filter(|r| r.state.is_ready()).count();
    let removing = i.removing.len();
    let broken = resources
        .values()
        .filter(|r| {
            matches!(
                r.state,
                ResourceState::Failed { .. } | ResourceState::Unsupported { .. }
            )
        })
        .count()
        + removing;
    let behind = i.worker_generation != i.accepted_generation;
    let mut conds: Vec<(ConditionType, bool, String, String)> = Vec::new();
    let (ready_ok, ready_reason, ready_msg) = if i.accepted_generation == 0 {
        (false, "NoManifest", "no manifest accepted yet".to_owned())
    } else if behind {
        (
            false,
            "Reconciling",
            format!("converging generation {}", i.accepted_generation),
        )
    } else if removing > 0 {
        (
            false,
            "RemovingResources",
            format!(
                "{removing} removed resource(s) not yet removed; {ready}/{total} resources ready"
            ),
        )
    } else if ready == total {
        (
            true,
            "AllResourcesReady",
            format!("{ready}/{total} resources ready"),
        )
    } else {
        (
            false,
            "ResourcesNotReady",
            format!("{ready}/{total} resources ready"),
        )
    };
    conds.push((
        ConditionType::Ready,
        ready_ok,
        ready_reason.into(),
        ready_msg,
    ));
    conds.push((
        ConditionType::Reconciling,
        behind,
        if behind { "NewGeneration" } else { "Idle" }.into(),
        String::new(),
    ));
    conds.push((
        ConditionType::Degraded,
        broken > 0,
        if broken > 0 {
            "ResourcesFailing"
        } else {
            "AsExpected"
        }
        .into(),
        if broken > 0 {
            format!("{broken} resources failed, unsupported or not yet removed")
        } else {
            String::new()
        },
    ));
    match &i.rejection {
        Some(r) => conds.push((
            ConditionType::ManifestRejected,
            true,
            r.reason.to_string(),
            r.message.clone(),
        )),
        None => conds.push((
            ConditionType::ManifestRejected,
            false,
            "Accepted".into(),
            String::new(),
        )),
    }
    if let Some(other) = &i.identity_conflict {
        conds.push((
            ConditionType::IdentityConflict,
            true,
            "OtherInstanceWrites".into(),
            format!("instance {other} writes this agent's status key"),
        ));
    }
    let conditions = conds
        .into_iter()
        .map(|(type_, status, reason, message)| {
            let entry = i
                .transitions
                .entry(type_)
                .or_insert_with(|| (status, now_rfc3339()));
            if entry.0 != status {
                *entry = (status, now_rfc3339());
            }
            Condition {
                type_,
                status,
                reason,
                message,
                last_transition_time: entry.1.clone(),
            }
        })
        .collect();
    AgentStatus {
        api_version: ApiVersion,
        agent_id: agent_id.clone(),
        instance_id: instance_id.to_owned(),
        manifest_generation: i.worker_generation,
        observed_generation: i.observed_generation,
        observed_revision: i.observed_revision,
        resources,
        conditions,
        rejection: i.rejection.clone(),
        released: i.released.clone(),
        removing: i.removing.clone(),
        agent: agent_build(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifest_types::ReadyDetails;

    fn ready() -> ResourceStatus {
        ResourceStatus {
            kind: "File".into(),
            spec_hash: "h".into(),
            source: None,
            state: ResourceState::Ready {
                since: "t".into(),
                details: ReadyDetails::File {
                    sha256: "s".into(),
                    size: 1,
                    mode: "0644".into(),
                    uid: 0,
                    gid: 0,
                },
            },
        }
    }

    #[test]
    fn conditions_follow_inputs_and_coalesce() {
        let (board, mut rx) = StatusBoard::new("pi-1".parse().unwrap(), "inst".into());
        rx.borrow_and_update();
        assert!(!board.current().condition_true(ConditionType::Ready));
        board.accepted(3, 0);
        let s = board.current();
        assert!(s.condition_true(ConditionType::Reconciling));
        assert!(!s.converged_on(3));
        board.set_resources(
            3,
            [("d/a".parse().unwrap(), ready())].into(),
            vec![],
            vec![],
        );
        let s = board.current();
        assert!(s.converged_on(3), "{s:?}");
        assert!(!s.condition_true(ConditionType::Degraded));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // Same inputs again: no new status to write.
        board.set_resources(
            3,
            [("d/a".parse().unwrap(), ready())].into(),
            vec![],
            vec![],
        );
        assert!(!rx.has_changed().unwrap());
        board.rejected(Rejection {
            reason: manifest_types::RejectionReason::MalformedJson,
            message: "x".into(),
            revision: 9,
            generation: None,
        });
        let s = board.current();
        assert!(s.condition_true(ConditionType::ManifestRejected));
        assert!(
            s.converged_on(3),
            "a rejection keeps the last good manifest converged"
        );
        assert_eq!(s.rejected_at_or_after(4).map(|r| r.revision), Some(9));
    }
}
