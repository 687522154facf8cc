//! Deployments → per-agent resource lists. Pure: no I/O, no clock, no
//! randomness; the same input always gives the same output, which is what
//! lets a restarted control plane publish nothing when nothing changed.
//!
//! Rules (DESIGN.md "Wire contract", "Generations"):
//! - Every known agent gets an output, possibly empty: an agent selected by
//!   nothing gets an empty manifest, so its resources are removed.
//! - Deployments are visited in creation order (`createdRevision`, then
//!   name); resources keep their order inside a deployment.
//! - Two deployments managing the same target (file path, unit name) on one
//!   agent: the earlier keeps it, the later's resource is left out of that
//!   agent's manifest and reported as a [`Conflict`] of the later deployment.
//!   Its `restartOn` references to a left-out sibling are dropped with it, so
//!   the manifest stays valid.
//! - A deployment whose document does not parse renders nothing and carries
//!   its error; everything else renders normally.

use std::collections::{BTreeMap, BTreeSet};

use manifest_types::{AgentId, Conflict, Deployment, DeploymentName, ManagedResource, ResourceId};

/// Labels an agent reports in its inventory (`agents.<id>`).
pub type Labels = BTreeMap<String, String>;

/// One deployment as stored in `deployments.<name>`.
#[derive(Debug, Clone, Copy)]
pub struct DeploymentInput<'a> {
    pub name: &'a DeploymentName,
    /// The parsed document, or why the stored bytes could not be read.
    pub document: Result<&'a Deployment, &'a str>,
    /// KV revision of the stored document; rendered into every resource's source.
    pub revision: u64,
    /// Revision at which the control plane first saw the deployment; orders
    /// deployments for conflict resolution.
    pub created_revision: u64,
}

/// The render of one deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeploymentRender {
    /// Agents the selector selects.
    pub targets: BTreeSet<AgentId>,
    /// Resources left out because an earlier deployment manages the target.
    pub conflicts: Vec<Conflict>,
    /// Set when nothing could be rendered from the document.
    pub error: Option<String>,
}

/// The render of the whole fleet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rendered {
    /// Every known agent → the resources of its next manifest.
    pub manifests: BTreeMap<AgentId, Vec<ManagedResource>>,
    /// Every deployment → its targets, conflicts and error.
    pub deployments: BTreeMap<DeploymentName, DeploymentRender>,
}

/// A deployment's resources rendered once, shared by all agents it selects.
struct Prepared<'a> {
    name: &'a DeploymentName,
    deployment: &'a Deployment,
    resources: Vec<ManagedResource>,
}

/// Renders the fleet. `agents` yields every known agent with its labels: the
/// registered ones with their inventory labels, and the ones known only
/// because they already have a desired-state key with empty labels (they can
/// still be selected by id).
pub fn render<'a>(
    deployments: &[DeploymentInput<'_>],
    agents: impl IntoIterator<Item = (&'a AgentId, &'a Labels)>,
) -> Rendered {
    let mut ordered: Vec<&DeploymentInput<'_>> = deployments.iter().collect();
    ordered.sort_by(|a, b| (a.created_revision, a.name).cmp(&(b.created_revision, b.name)));

    let mut out = Rendered::default();
    let mut prepared = Vec::with_capacity(ordered.len());
    for d in ordered {
        let status = out.deployments.entry(d.name.clone()).or_default();
        match d.document {
            Err(error) => status.error = Some(error.to_owned()),
            Ok(deployment) => match deployment.render_resources(d.revision) {
                Ok(resources) => prepared.push(Prepared {
                    name: d.name,
                    deployment,
                    resources,
                }),
                Err(e) => status.error = Some(e.to_string()),
            },
        }
    }

    for (agent, labels) in agents {
        let mut resources = Vec::new();
        // Target ("file /etc/x") → the resource that holds it on this agent.
        let mut held: BTreeMap<(&'static str, String), ResourceId> = BTreeMap::new();
        for p in &prepared {
            if !p.deployment.selector.selects(agent, labels) {
                continue;
            }
            let status = out
                .deployments
                .get_mut(p.name)
                .expect("every prepared deployment has a status");
            status.targets.insert(agent.clone());
            let mut left_out: BTreeSet<&ResourceId> = BTreeSet::new();
            let first_kept = resources.len();
            for r in &p.resources {
                if let Some(target) = r.spec.target() {
                    if let Some(holder) = held.get(&target) {
                        status.conflicts.push(Conflict {
                            agent: agent.clone(),
                            resource: r.id.clone(),
                            held_by: holder.clone(),
                            target: format!("{} {}", target.0, target.1),
                        });
                        left_out.insert(&r.id);
                        continue;
                    }
                    held.insert(target, r.id.clone());
                }
                resources.push(r.clone());
            }
            if !left_out.is_empty() {
                for r in &mut resources[first_kept..] {
                    r.restart_on.retain(|t| !left_out.contains(t));
                }
            }
        }
        out.manifests.insert(agent.clone(), resources);
    }
    for status in out.deployments.values_mut() {
        status.conflicts.sort();
    }
    out
}

#[cfg(test)]
mod tests;
