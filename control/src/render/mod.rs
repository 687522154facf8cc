//! Deployments → per-agent resource lists. Pure: no I/O, no clock, no
//! randomness; the same input always gives the same output, which is what
//! lets a restarted control plane publish nothing when nothing changed.
//!
//! Rules (docs/adr/0007-control-plane-rendering.md; docs/ARCHITECTURE.md
//! "The documents", "Generations, admission and compare-and-swap"):
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
//! - A templated deployment (`${agent.id}`, `${labels.k}`, `${values.k}`;
//!   docs/adr/0014) is rendered for each agent it selects. When that fails
//!   for one agent (a label or value it lacks, a rendered spec that breaks
//!   its kind's rules), the agent keeps the resources of this deployment it
//!   was last rendered (from its previous manifest, at their old revision),
//!   and the failure is reported as a [`RenderFailure`]; every other agent
//!   gets the new revision. Never a half-rendered spec.
//! - A deployment under a staged rollout (docs/adr/0016) renders each agent
//!   it selects at the revision [`crate::rollout::revision_for`] gives it:
//!   the new one once its wave is released, else the one it runs, from that
//!   revision's document in the history; the agents kept on another
//!   revision are reported in [`DeploymentRender::held_back`]. Agents that
//!   only an earlier revision selected are not targets and get nothing.

use std::collections::{BTreeMap, BTreeSet};

use manifest_types::template::Context;
use manifest_types::{
    AgentId, AgentManifest, Conflict, Deployment, DeploymentName, ManagedResource, RenderFailure,
    ResourceId,
};

use crate::rollout::{self, Run};

/// Labels an agent reports in its inventory (`agents.<id>`).
pub type Labels = BTreeMap<String, String>;

/// What one agent's render depends on besides the deployments.
#[derive(Debug, Clone, Copy)]
pub struct AgentInput<'a> {
    /// The operator's labels (`values.<id>`): what selectors match and
    /// `${labels.k}` reads.
    pub labels: &'a Labels,
    /// The labels the device reports (`agents.<id>`): hints, matched only by
    /// deployments whose selector opts in (`deviceLabels`).
    pub device_labels: &'a Labels,
    /// The operator's per-agent values (`values.<id>`, `${values.k}`).
    pub values: &'a Labels,
    /// The agent's stored manifest: what it keeps of a deployment whose
    /// render fails for it.
    pub previous: Option<&'a AgentManifest>,
}

/// One deployment as stored in `deployments.<name>`.
#[derive(Debug, Clone, Copy)]
pub struct DeploymentInput<'a> {
    pub name: &'a DeploymentName,
    /// The parsed document, or why the stored bytes could not be read.
    pub document: Result<&'a Deployment, &'a str>,
    /// The deployment's revision (the KV sequence of `deployments.<name>`);
    /// rendered into every resource's source.
    pub revision: u64,
    /// Revision at which the control plane first saw the deployment; orders
    /// deployments for conflict resolution.
    pub created_revision: u64,
    /// The staged rollout of `revision`, if one is in progress.
    pub rollout: Option<Staged<'a>>,
}

/// A rollout in progress and the documents of earlier revisions.
#[derive(Debug, Clone, Copy)]
pub struct Staged<'a> {
    pub run: &'a Run,
    /// Earlier revisions' documents (`revisions.<name>.<revision>`).
    pub history: &'a BTreeMap<u64, Deployment>,
}

/// The render of one deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeploymentRender {
    /// Agents the selector selects.
    pub targets: BTreeSet<AgentId>,
    /// Resources left out because an earlier deployment manages the target.
    pub conflicts: Vec<Conflict>,
    /// Selected agents this revision could not be rendered for.
    pub render_failures: Vec<RenderFailure>,
    /// Set when nothing could be rendered from the document.
    pub error: Option<String>,
    /// Targets a rollout keeps on another revision (None: on none of it).
    pub held_back: BTreeMap<AgentId, Option<u64>>,
}

/// The render of the whole fleet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rendered {
    /// Every known agent → the resources of its next manifest.
    pub manifests: BTreeMap<AgentId, Vec<ManagedResource>>,
    /// Every deployment → its targets, conflicts and error.
    pub deployments: BTreeMap<DeploymentName, DeploymentRender>,
}

impl Rendered {
    /// Replaces what this render says about `agents` with `partial`, a
    /// render of exactly those agents over the same deployments: their
    /// manifests, and their places in every deployment's targets,
    /// conflicts and render failures. Every other agent's render is kept.
    pub fn patch(&mut self, partial: Rendered, agents: &BTreeSet<AgentId>) {
        self.manifests.retain(|a, _| !agents.contains(a));
        self.manifests.extend(partial.manifests);
        let mut deployments = partial.deployments;
        for (name, d) in &mut deployments {
            let Some(old) = self.deployments.remove(name) else {
                continue;
            };
            d.targets
                .extend(old.targets.into_iter().filter(|a| !agents.contains(a)));
            d.conflicts.extend(
                old.conflicts
                    .into_iter()
                    .filter(|c| !agents.contains(&c.agent)),
            );
            d.render_failures.extend(
                old.render_failures
                    .into_iter()
                    .filter(|f| !agents.contains(&f.agent)),
            );
            d.held_back.extend(
                old.held_back
                    .into_iter()
                    .filter(|(a, _)| !agents.contains(a)),
            );
            d.conflicts.sort();
            d.render_failures.sort();
        }
        self.deployments = deployments;
    }
}

/// A deployment's resources rendered once, shared by all agents it selects.
struct Prepared<'a> {
    name: &'a DeploymentName,
    deployment: &'a Deployment,
    revision: u64,
    /// Rendered once for every agent (templated ones: per agent instead).
    resources: Vec<ManagedResource>,
    rollout: Option<Staged<'a>>,
    /// Earlier revisions rendered once (untemplated ones), as agents need them.
    earlier: std::cell::RefCell<BTreeMap<u64, Option<Vec<ManagedResource>>>>,
}

/// The revision of `deployment` an agent's previous manifest carries.
pub(crate) fn current_revision(
    previous: Option<&AgentManifest>,
    deployment: &DeploymentName,
) -> Option<u64> {
    previous?
        .resources
        .iter()
        .filter_map(|r| r.source.as_ref())
        .find(|s| &s.deployment == deployment)
        .map(|s| s.revision)
}

/// The resources of `deployment` in an agent's previous manifest.
fn kept_from(
    previous: Option<&AgentManifest>,
    deployment: &DeploymentName,
) -> Vec<ManagedResource> {
    previous
        .map(|m| {
            m.resources
                .iter()
                .filter(|r| {
                    r.source
                        .as_ref()
                        .is_some_and(|s| &s.deployment == deployment)
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Renders the fleet. `agents` yields every known agent with its input: the
/// registered ones with their labels, and the ones known only because they
/// already have a desired-state key (they can be selected by id, or by the
/// operator's labels).
pub fn render<'a>(
    deployments: &[DeploymentInput<'_>],
    agents: impl IntoIterator<Item = (&'a AgentId, AgentInput<'a>)>,
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
                    revision: d.revision,
                    resources,
                    rollout: d.rollout,
                    earlier: Default::default(),
                }),
                Err(e) => status.error = Some(e.to_string()),
            },
        }
    }

    for (agent, input) in agents {
        let mut resources = Vec::new();
        // Target ("file /etc/x") → the resource that holds it on this agent.
        let mut held: BTreeMap<(&'static str, String), ResourceId> = BTreeMap::new();
        for p in &prepared {
            let labels = p
                .deployment
                .selector
                .labels(input.labels, input.device_labels);
            if !p.deployment.selector.selects(agent, &labels) {
                continue;
            }
            let status = out
                .deployments
                .get_mut(p.name)
                .expect("every prepared deployment has a status");
            status.targets.insert(agent.clone());
            let ctx = Context {
                agent,
                labels: &labels,
                values: input.values,
            };
            // The revision this agent is rendered at (a rollout may hold it
            // on another one).
            let planned = match &p.rollout {
                None => Some(p.revision),
                Some(st) => rollout::revision_for(
                    st.run,
                    agent,
                    current_revision(input.previous, p.name),
                    |r| st.history.contains_key(&r),
                ),
            };
            if planned != Some(p.revision) {
                status.held_back.insert(agent.clone(), planned);
            }
            let own;
            let candidates: &[ManagedResource] = match planned {
                None => &[],
                Some(r) if r != p.revision => {
                    own = p.render_earlier(r, &ctx, input.previous);
                    &own
                }
                Some(_) if p.deployment.is_templated() => {
                    own = match p.deployment.render_for(p.revision, &ctx) {
                        Ok(r) => r,
                        Err(e) => {
                            status.render_failures.push(RenderFailure {
                                agent: agent.clone(),
                                resource: e.resource,
                                message: e.message,
                            });
                            kept_from(input.previous, p.name)
                        }
                    };
                    &own
                }
                Some(_) => &p.resources,
            };
            let mut left_out: BTreeSet<&ResourceId> = BTreeSet::new();
            let first_kept = resources.len();
            for r in candidates {
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
        status.render_failures.sort();
    }
    out
}

impl Prepared<'_> {
    /// The resources of earlier revision `revision` for one agent; what it
    /// has of this deployment when that revision cannot be rendered for it
    /// (or its document is no longer in the history).
    fn render_earlier(
        &self,
        revision: u64,
        ctx: &Context<'_>,
        previous: Option<&AgentManifest>,
    ) -> Vec<ManagedResource> {
        let Some(doc) = self.rollout.and_then(|st| st.history.get(&revision)) else {
            return kept_from(previous, self.name);
        };
        let rendered = if doc.is_templated() {
            doc.render_for(revision, ctx).ok()
        } else {
            self.earlier
                .borrow_mut()
                .entry(revision)
                .or_insert_with(|| doc.render_resources(revision).ok())
                .clone()
        };
        rendered.unwrap_or_else(|| kept_from(previous, self.name))
    }
}

#[cfg(test)]
mod tests;
