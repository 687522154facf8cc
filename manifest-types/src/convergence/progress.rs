//! How far one deployment's rendered revision has landed on its targets:
//! [`Progress`], one [`Verdict`] per target agent.

use std::collections::BTreeMap;

use super::{AgentReport, Reason, State, Target, Thresholds, Verdict, assess};
use crate::deployment::{Deployment, DeploymentStatus};
use crate::ids::{AgentId, DeploymentName, ResourceId};
use crate::status::Rejection;

/// The resource ids a deployment renders into every manifest it selects.
pub fn deployment_resources(deployment: &Deployment) -> Vec<ResourceId> {
    deployment
        .resources
        .iter()
        .map(|r| ResourceId::rendered(&deployment.name, &r.id))
        .collect()
}

/// How far one deployment's rendered revision has landed: the [`Verdict`]
/// of every target agent (`DeploymentStatus.targets`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub targets: BTreeMap<AgentId, Verdict>,
}

impl Progress {
    /// Assesses every target of `status` (the render results for revision
    /// `status.observedRevision`). `resources` are the deployment's rendered
    /// ids ([`deployment_resources`]); a resource the control plane left out
    /// of an agent's manifest because of a conflict is not expected there.
    pub fn of<'a>(
        status: &DeploymentStatus,
        resources: &[ResourceId],
        report: impl Fn(&AgentId) -> AgentReport<'a>,
        thresholds: &Thresholds,
    ) -> Self {
        let targets = status
            .targets
            .iter()
            .map(|(agent, &generation)| {
                let expected: Vec<ResourceId> = resources
                    .iter()
                    .filter(|id| {
                        !status
                            .conflicts
                            .iter()
                            .any(|c| &c.agent == agent && &c.resource == *id)
                    })
                    .cloned()
                    .collect();
                let target = Target::Deployment {
                    name: &status.name,
                    revision: status.observed_revision,
                    generation,
                    resources: &expected,
                };
                let verdict = assess(&report(agent), target, thresholds);
                // Not given the revision (a rollout holds it back) or not
                // rendered for this agent: it cannot converge on the revision
                // whatever it reports (liveness still comes first).
                let instead = match (
                    status.held_back.get(agent),
                    status.render_failures.iter().find(|f| &f.agent == agent),
                ) {
                    // Held back, but failing where it is held: the failure shows.
                    (Some(&revision), _)
                        if matches!(verdict.state, State::Progressing | State::Converged) =>
                    {
                        Some((State::Progressing, Reason::HeldBack { revision }))
                    }
                    (Some(_), _) => None,
                    (None, Some(f)) => Some((
                        State::Degraded,
                        Reason::RenderFailed {
                            resource: f.resource.clone(),
                            message: f.message.clone(),
                        },
                    )),
                    (None, None) => None,
                };
                let verdict = match instead {
                    Some((state, reason)) => verdict.overridden(state, reason),
                    None => verdict,
                };
                (agent.clone(), verdict)
            })
            .collect();
        Self { targets }
    }

    pub fn total(&self) -> usize {
        self.targets.len()
    }

    /// How many targets are in `state`.
    pub fn count(&self, state: State) -> usize {
        self.targets.values().filter(|v| v.state == state).count()
    }

    pub fn converged(&self) -> usize {
        self.count(State::Converged)
    }

    /// Every target that rejected the manifest carrying the revision.
    pub fn rejected(&self) -> impl Iterator<Item = (&AgentId, &Rejection)> {
        self.targets
            .iter()
            .filter_map(|(a, v)| v.rejection().map(|r| (a, r)))
    }

    /// Every target not (yet) converged, with its verdict.
    pub fn not_converged(&self) -> impl Iterator<Item = (&AgentId, &Verdict)> {
        self.targets.iter().filter(|(_, v)| !v.is_converged())
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
