//! Has a deployment landed? Pure decisions over typed documents, shared by
//! `apply --wait`, `get deployments` and `describe deployment`.
//!
//! A target agent with manifest generation `g` (from
//! `DeploymentStatus.targets`) is
//! - **converged** when [`AgentStatus::converged_on`]`(g)`, or when it has
//!   already moved past `g` and every resource of this deployment is Ready;
//! - **rejected** when [`AgentStatus::rejected_at_or_after`]`(g)` is set;
//! - otherwise **pending**, with a one-line reason.

use std::collections::BTreeMap;

use manifest_types::{
    AgentId, AgentStatus, ConditionType, DeploymentName, DeploymentStatus, Rejection, ResourceState,
};

#[derive(Debug, Clone, PartialEq)]
pub enum TargetState {
    Converged,
    Rejected(Rejection),
    Pending(String),
}

impl TargetState {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Converged => "Converged",
            Self::Rejected(_) => "Rejected",
            Self::Pending(_) => "Pending",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            Self::Converged => String::new(),
            Self::Rejected(r) => rejection_line(r),
            Self::Pending(why) => why.clone(),
        }
    }
}

/// `reason: message (revision R, generation G)`.
pub fn rejection_line(r: &Rejection) -> String {
    let generation = r
        .generation
        .map(|g| format!(", generation {g}"))
        .unwrap_or_default();
    format!(
        "{}: {} (revision {}{generation})",
        r.reason, r.message, r.revision
    )
}

/// Where one target agent stands on `generation` of its manifest.
pub fn target_state(
    status: Option<&AgentStatus>,
    generation: u64,
    deployment: &DeploymentName,
) -> TargetState {
    let Some(s) = status else {
        return TargetState::Pending("no status reported yet".into());
    };
    if let Some(r) = s.rejected_at_or_after(generation) {
        return TargetState::Rejected(r.clone());
    }
    if s.converged_on(generation) {
        return TargetState::Converged;
    }
    let ours: Vec<_> = s
        .resources
        .iter()
        .filter(|(_, r)| {
            r.source
                .as_ref()
                .is_some_and(|src| &src.deployment == deployment)
        })
        .collect();
    if s.manifest_generation > generation && ours.iter().all(|(_, r)| r.state.is_ready()) {
        return TargetState::Converged;
    }
    if s.condition_true(ConditionType::IdentityConflict) {
        let msg = s
            .condition(ConditionType::IdentityConflict)
            .map(|c| c.message.as_str())
            .unwrap_or_default();
        return TargetState::Pending(format!("identity conflict: {msg}"));
    }
    if s.manifest_generation < generation {
        return TargetState::Pending(format!(
            "on manifest generation {}, waiting for {generation}",
            s.manifest_generation
        ));
    }
    let not_ready: Vec<String> = ours
        .iter()
        .filter(|(_, r)| !r.state.is_ready())
        .map(|(id, r)| format!("{id} {}", resource_detail(&r.state)))
        .collect();
    if !not_ready.is_empty() {
        return TargetState::Pending(not_ready.join("; "));
    }
    match s.condition(ConditionType::Ready) {
        Some(c) if !c.reason.is_empty() => {
            TargetState::Pending(format!("not Ready: {} {}", c.reason, c.message))
        }
        _ => TargetState::Pending("not Ready yet".into()),
    }
}

/// A resource's state with its reason, for one-line summaries.
pub fn resource_detail(state: &ResourceState) -> String {
    match state {
        ResourceState::Failed {
            reason, message, ..
        } => format!("Failed: {reason}: {message}"),
        ResourceState::Unsupported { reason } => format!("Unsupported: {reason}"),
        ResourceState::Reconciling { message } if !message.is_empty() => {
            format!("Reconciling: {message}")
        }
        other => other.name().to_owned(),
    }
}

/// The state of every target of a deployment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub targets: BTreeMap<AgentId, TargetState>,
}

impl Progress {
    pub fn of(status: &DeploymentStatus, agents: &BTreeMap<AgentId, AgentStatus>) -> Progress {
        Progress {
            targets: status
                .targets
                .iter()
                .map(|(agent, g)| {
                    (
                        agent.clone(),
                        target_state(agents.get(agent), *g, &status.name),
                    )
                })
                .collect(),
        }
    }

    pub fn total(&self) -> usize {
        self.targets.len()
    }

    pub fn converged(&self) -> usize {
        self.targets
            .values()
            .filter(|t| **t == TargetState::Converged)
            .count()
    }

    pub fn rejected(&self) -> impl Iterator<Item = (&AgentId, &Rejection)> {
        self.targets.iter().filter_map(|(a, t)| match t {
            TargetState::Rejected(r) => Some((a, r)),
            _ => None,
        })
    }

    pub fn pending(&self) -> impl Iterator<Item = (&AgentId, &str)> {
        self.targets.iter().filter_map(|(a, t)| match t {
            TargetState::Pending(why) => Some((a, why.as_str())),
            _ => None,
        })
    }

    pub fn is_done(&self) -> bool {
        self.converged() == self.total()
    }

    /// `hello: 1/2 agents converged on revision 7`
    pub fn line(&self, deployment: &DeploymentName, revision: u64) -> String {
        format!(
            "{deployment}: {}/{} agents converged on revision {revision}",
            self.converged(),
            self.total()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifest_types::{
        AgentBuild, ApiVersion, Condition, ReadyDetails, ResourceId, ResourceSource, ResourceStatus,
    };

    fn name() -> DeploymentName {
        DeploymentName::new("hello").unwrap()
    }

    fn ready_details() -> ResourceState {
        ResourceState::Ready {
            since: "t".into(),
            details: ReadyDetails::File {
                sha256: "ab".into(),
                size: 1,
                mode: "0644".into(),
                uid: 0,
                gid: 0,
            },
        }
    }

    fn status(
        generation: u64,
        ready: bool,
        resources: Vec<(&str, &str, ResourceState)>,
    ) -> AgentStatus {
        AgentStatus {
            api_version: ApiVersion,
            agent_id: AgentId::new("pi-1").unwrap(),
            instance_id: "i".into(),
            manifest_generation: generation,
            observed_generation: generation,
            observed_revision: 10,
            resources: resources
                .into_iter()
                .map(|(id, dep, state)| {
                    (
                        ResourceId::new(id).unwrap(),
                        ResourceStatus {
                            kind: "File".into(),
                            spec_hash: "h".into(),
                            source: Some(ResourceSource {
                                deployment: DeploymentName::new(dep).unwrap(),
                                revision: 7,
                            }),
                            state,
                        },
                    )
                })
                .collect(),
            conditions: vec![Condition {
                type_: ConditionType::Ready,
                status: ready,
                reason: if ready { "AllReady" } else { "ResourcesFailed" }.into(),
                message: String::new(),
                last_transition_time: "t".into(),
            }],
            rejection: None,
            released: vec![],
            agent: AgentBuild {
                version: "0".into(),
                arch: "x".into(),
                os: "linux".into(),
            },
        }
    }

    #[test]
    fn converged_on_the_exact_generation() {
        let s = status(4, true, vec![("hello/motd", "hello", ready_details())]);
        assert_eq!(target_state(Some(&s), 4, &name()), TargetState::Converged);
    }

    #[test]
    fn converged_past_the_generation_when_our_resources_are_ready() {
        // Another deployment's resource failing does not hold this one back.
        let failing = ResourceState::Failed {
            since: "t".into(),
            reason: "Boom".into(),
            message: "m".into(),
            attempts: 1,
            retry_after_seconds: None,
        };
        let s = status(
            6,
            false,
            vec![
                ("hello/motd", "hello", ready_details()),
                ("other/x", "other", failing.clone()),
            ],
        );
        assert_eq!(target_state(Some(&s), 4, &name()), TargetState::Converged);
        let s = status(6, false, vec![("hello/motd", "hello", failing)]);
        let t = target_state(Some(&s), 4, &name());
        assert_eq!(t.name(), "Pending");
        assert!(
            t.detail().contains("hello/motd Failed: Boom: m"),
            "{}",
            t.detail()
        );
    }

    #[test]
    fn behind_or_not_ready_is_pending() {
        let s = status(3, true, vec![]);
        let t = target_state(Some(&s), 4, &name());
        assert_eq!(
            t,
            TargetState::Pending("on manifest generation 3, waiting for 4".into())
        );
        let s = status(4, false, vec![]);
        assert_eq!(target_state(Some(&s), 4, &name()).name(), "Pending");
        assert_eq!(
            target_state(None, 4, &name()),
            TargetState::Pending("no status reported yet".into())
        );
    }

    #[test]
    fn rejection_of_this_generation_or_newer() {
        let mut s = status(3, true, vec![]);
        s.rejection = Some(Rejection {
            reason: "PathOutsideRoots".into(),
            message: "/x is outside every file root".into(),
            revision: 12,
            generation: Some(4),
        });
        let t = target_state(Some(&s), 4, &name());
        assert_eq!(t.name(), "Rejected");
        assert_eq!(
            t.detail(),
            "PathOutsideRoots: /x is outside every file root (revision 12, generation 4)"
        );
        // A rejection of an older generation does not count against a newer one.
        assert_eq!(target_state(Some(&s), 5, &name()).name(), "Pending");
        // A malformed manifest has no generation: it counts.
        s.rejection.as_mut().unwrap().generation = None;
        assert_eq!(target_state(Some(&s), 4, &name()).name(), "Rejected");
    }

    #[test]
    fn progress_counts_and_lines() {
        let dname = name();
        let a = AgentId::new("pi-1").unwrap();
        let b = AgentId::new("pi-2").unwrap();
        let ds = DeploymentStatus {
            api_version: ApiVersion,
            name: dname.clone(),
            observed_revision: 7,
            created_revision: 3,
            targets: [(a.clone(), 4), (b.clone(), 2)].into(),
            conflicts: vec![],
            error: None,
        };
        let agents: BTreeMap<_, _> = [(a.clone(), status(4, true, vec![]))].into();
        let p = Progress::of(&ds, &agents);
        assert_eq!((p.converged(), p.total()), (1, 2));
        assert!(!p.is_done());
        assert_eq!(
            p.line(&dname, 7),
            "hello: 1/2 agents converged on revision 7"
        );
        assert_eq!(
            p.pending().map(|(a, _)| a.as_str()).collect::<Vec<_>>(),
            ["pi-2"]
        );
        assert_eq!(p.rejected().count(), 0);
        let empty = Progress::default();
        assert!(empty.is_done());
    }
}
