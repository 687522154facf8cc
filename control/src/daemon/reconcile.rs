//! One reconcile pass: render from [`State`] — the whole fleet when a
//! deployment changed, else only the agents whose labels, values, stored
//! manifest or report changed, patched into the last render — publish the
//! manifests of those agents that do not stand (their resources changed, or
//! the stored value is not the control plane's own rendering at a generation
//! the agent can accept — docs/adr/0012), then the deployment statuses whose
//! content changed, then remove statuses of deleted deployments. Each agent
//! is rendered from its whole desired state, never a hint of what changed
//! (STYLE.md 5); the pass's cost follows what changed, and an unchanged
//! fleet costs no KV round trip at all.

use std::collections::BTreeMap;

use async_nats::jetstream::kv::Store;
use futures::StreamExt;
use manifest_types::{AgentId, ApiVersion, DeploymentStatus, ManagedResource, keys};

use super::state::{State, Written};
use crate::heartbeat::{HeartbeatPolicy, needs_write};
use crate::publish::{self, Floor, Known, PublishOutcome, StatusOutcome};
use crate::render;

/// What a pass did; `failures` > 0 asks for a retry.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PassReport {
    /// Agents rendered in this pass (all, or those whose inputs changed).
    pub agents_rendered: usize,
    pub manifests_written: usize,
    pub statuses_written: usize,
    pub failures: usize,
    /// The first failure, for the one warning a failed pass logs (each
    /// failure is logged at debug: an outage must not log once per agent).
    pub first_error: Option<String>,
}

impl PassReport {
    fn failed(&mut self, what: String, error: &dyn std::error::Error) {
        let error = error_chain(error);
        tracing::debug!(%error, "{what}");
        self.failures += 1;
        self.first_error
            .get_or_insert_with(|| format!("{what}: {error}"));
    }
}

pub(crate) async fn reconcile(
    state: &mut State,
    store: &Store,
    concurrency: usize,
    heartbeat: &HeartbeatPolicy,
) -> PassReport {
    state.resolve_created_revisions();
    super::rollouts::prepare(state);
    let mut report = PassReport::default();
    // Render the whole fleet after a deployment changed (or a relist), else
    // only the agents whose inputs changed, patched into the last render.
    let dirty = std::mem::take(&mut state.dirty);
    let full = dirty.all || state.rendered.is_none();
    let (fresh, rendered): (Vec<AgentId>, _) = if full {
        let r = render::render(&state.deployment_inputs(), state.known_agents());
        (r.manifests.keys().cloned().collect(), r)
    } else {
        let agents = state
            .known_agents()
            .into_iter()
            .filter(|(a, _)| dirty.agents.contains(*a));
        let partial = render::render(&state.deployment_inputs(), agents);
        let fresh = partial.manifests.keys().cloned().collect();
        let mut r = state.rendered.take().expect("a previous render");
        r.patch(partial, &dirty.agents);
        (fresh, r)
    };
    report.agents_rendered = fresh.len();

    // Manifests of the agents just rendered: skip those whose cached
    // manifest stands (only the others are copied out to be written);
    // publish re-checks against the store with CAS.
    let mut changed: Vec<(AgentId, Vec<ManagedResource>, Floor, Option<Known>)> = Vec::new();
    for agent in fresh {
        let resources = &rendered.manifests[&agent];
        let floor = state.floor(&agent);
        let known = match state.desired.get(&agent) {
            Some(Written {
                revision,
                value: Some(m),
            }) if floor.stands(m, *revision, resources, &state.signing) => continue,
            Some(Written {
                revision,
                value: Some(m),
            }) => Some(Known {
                revision: *revision,
                generation: m.generation,
            }),
            _ => None,
        };
        changed.push((agent, resources.clone(), floor, known));
    }
    let keys = state.signing.clone();
    let signing = &*keys;
    let results: Vec<_> = futures::stream::iter(changed)
        .map(|(agent, resources, floor, known)| async move {
            // A watched copy of the key saves the read before the write.
            let outcome = match known {
                Some(known) => {
                    publish::publish_manifest_over(
                        store,
                        &agent,
                        resources.clone(),
                        floor,
                        known,
                        signing,
                    )
                    .await
                }
                None => {
                    publish::publish_manifest_above(
                        store,
                        &agent,
                        resources.clone(),
                        floor,
                        signing,
                    )
                    .await
                }
            };
            (agent, outcome)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    for (agent, outcome) in results {
        match outcome {
            // The manifest as written or as it stands, signatures included.
            Ok(publish::Published { outcome, manifest }) => {
                let generation = outcome.generation();
                match outcome {
                    PublishOutcome::Written { revision, .. } => {
                        tracing::info!(%agent, generation, kv_sequence = revision, resources = manifest.resources.len(), "manifest written");
                        report.manifests_written += 1;
                        state.wrote(manifest, revision);
                    }
                    // The store was ahead of the cache.
                    PublishOutcome::Unchanged { revision, .. } => {
                        state.desired.insert(
                            agent.clone(),
                            Written {
                                revision,
                                value: Some(manifest),
                            },
                        );
                    }
                }
            }
            Err(error) => {
                report.failed(format!("cannot publish the manifest of {agent}"), &error);
                // Rendered again by the retry.
                state.dirty.agents.insert(agent);
            }
        }
    }

    // Deployment statuses, from the whole (patched) render and the stored
    // generations. One whose targets are not all written yet waits for the
    // retry rather than report a partial picture.
    // A target counts only once its stored manifest carries this render.
    let generations: BTreeMap<&AgentId, u64> = state
        .desired
        .iter()
        .filter_map(|(a, w)| {
            let m = w.value.as_ref()?;
            (rendered.manifests.get(a) == Some(&m.resources)).then_some((a, m.generation))
        })
        .collect();
    let mut statuses = Vec::new();
    for (name, r) in &rendered.deployments {
        let Some(record) = state.deployments.get(name) else {
            continue;
        };
        let Some(targets) = r
            .targets
            .iter()
            .map(|a| generations.get(a).map(|&g| (a.clone(), g)))
            .collect::<Option<BTreeMap<_, _>>>()
        else {
            continue;
        };
        let status = DeploymentStatus {
            api_version: ApiVersion,
            name: name.clone(),
            observed_revision: record.revision,
            created_revision: record.created_revision.unwrap_or(record.first_seen),
            targets,
            conflicts: r.conflicts.clone(),
            render_failures: r.render_failures.clone(),
            error: r.error.clone(),
            rollout: state
                .runs
                .get(name)
                .filter(|run| run.status.revision == record.revision)
                .map(|run| run.status.clone()),
            held_back: r.held_back.clone(),
        };
        let stored = state.statuses.get(name).and_then(|w| w.value.as_ref());
        if stored != Some(&status) {
            statuses.push(status);
        }
    }
    let results: Vec<_> = futures::stream::iter(statuses)
        .map(|status| async move {
            let outcome = publish::publish_deployment_status(store, &status).await;
            (status, outcome)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    for (status, outcome) in results {
        match outcome {
            Ok(outcome) => {
                let revision = match outcome {
                    StatusOutcome::Written { revision } => {
                        report.statuses_written += 1;
                        tracing::debug!(deployment = %status.name, revision = status.observed_revision, kv_sequence = revision, "deployment status written");
                        revision
                    }
                    StatusOutcome::Unchanged { revision } => revision,
                };
                state.statuses.insert(
                    status.name.clone(),
                    Written {
                        revision,
                        value: Some(status),
                    },
                );
            }
            Err(error) => {
                report.failed(
                    format!("cannot write the status of {}", status.name),
                    &error,
                );
            }
        }
    }

    // Each deployment's history of revisions.
    for failure in super::rollouts::record_history(state, store).await {
        tracing::debug!(%failure, "history");
        report.failures += 1;
        report.first_error.get_or_insert(failure);
    }

    // The fleet's heartbeat interval, sized to the registered agents.
    let want = heartbeat.settings(state.registered.len());
    let stored = state.heartbeat.as_ref().and_then(|w| w.value.as_ref());
    if needs_write(stored, &want) {
        let bytes = serde_json::to_vec(&want).expect("settings serialise");
        match store.put(keys::HEARTBEAT_SETTINGS, bytes.into()).await {
            Ok(revision) => {
                tracing::info!(
                    interval_ms = want.interval_ms,
                    agents = want.agents,
                    "heartbeat interval published"
                );
                state.heartbeat = Some(Written {
                    revision,
                    value: Some(want),
                });
            }
            Err(error) => {
                report.failed(format!("cannot write {}", keys::HEARTBEAT_SETTINGS), &error);
            }
        }
    }

    state.rendered = Some(rendered);

    // Statuses of deployments that no longer exist.
    let orphans: Vec<_> = state
        .statuses
        .iter()
        .filter(|(name, w)| w.value.is_some() && !state.deployments.contains_key(*name))
        .map(|(name, _)| name.clone())
        .collect();
    for name in orphans {
        match publish::remove_deployment_status(store, &name).await {
            Ok(()) => {
                tracing::info!(deployment = %name, "deployment deleted; status removed");
                if let Some(w) = state.statuses.get_mut(&name) {
                    w.value = None;
                }
            }
            Err(error) => {
                report.failed(format!("cannot remove the status of {name}"), &error);
            }
        }
    }
    report
}

/// An error and its sources, `: `-separated (Display never repeats a source).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}
