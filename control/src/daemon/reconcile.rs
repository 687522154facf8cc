//! One reconcile pass: render the whole fleet from [`State`], publish the
//! manifests that do not stand (their resources changed, or the stored value
//! is not the control plane's own rendering at a generation the agent can
//! accept — docs/adr/0012), then the deployment statuses whose content
//! changed, then remove statuses of deleted deployments. Always the whole
//! desired state, never a hint of what changed (STYLE.md 5); the state cache
//! makes an unchanged fleet cost no KV round trip at all.

use std::collections::BTreeMap;

use async_nats::jetstream::kv::Store;
use futures::StreamExt;
use manifest_types::{AgentId, AgentManifest, ApiVersion, DeploymentStatus, ManagedResource, keys};

use super::state::{State, Written};
use crate::heartbeat::{HeartbeatPolicy, needs_write};
use crate::publish::{self, Floor, PublishOutcome, StatusOutcome};
use crate::render;

/// What a pass did; `failures` > 0 asks for a retry.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PassReport {
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
    let rendered = render::render(&state.deployment_inputs(), state.known_agents());
    let mut report = PassReport::default();

    // Manifests: skip agents whose cached manifest stands; publish re-checks
    // against the store with CAS, so a stale cache costs a read.
    let mut generations: BTreeMap<AgentId, u64> = BTreeMap::new();
    let mut changed: Vec<(AgentId, Vec<ManagedResource>, Floor)> = Vec::new();
    for (agent, resources) in rendered.manifests {
        let floor = state.floor(&agent);
        match state.desired.get(&agent) {
            Some(Written {
                revision,
                value: Some(m),
            }) if floor.stands(m, *revision, &resources) => {
                generations.insert(agent, m.generation);
            }
            _ => changed.push((agent, resources, floor)),
        }
    }
    let results: Vec<_> = futures::stream::iter(changed)
        .map(|(agent, resources, floor)| async move {
            let outcome =
                publish::publish_manifest_above(store, &agent, resources.clone(), floor).await;
            (agent, resources, outcome)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    for (agent, resources, outcome) in results {
        match outcome {
            Ok(outcome) => {
                let generation = outcome.generation();
                let mut manifest = AgentManifest::empty(agent.clone(), generation);
                manifest.resources = resources;
                match outcome {
                    PublishOutcome::Written { revision, .. } => {
                        tracing::info!(%agent, generation, revision, resources = manifest.resources.len(), "manifest written");
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
                generations.insert(agent, generation);
            }
            Err(error) => {
                report.failed(format!("cannot publish the manifest of {agent}"), &error);
            }
        }
    }

    // Deployment statuses. One whose targets could not all be published
    // waits for the retry rather than report a partial picture.
    let mut statuses = Vec::new();
    for (name, r) in rendered.deployments {
        let Some(record) = state.deployments.get(&name) else {
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
            conflicts: r.conflicts,
            render_failures: r.render_failures,
            error: r.error,
        };
        let stored = state.statuses.get(&name).and_then(|w| w.value.as_ref());
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
                        tracing::debug!(deployment = %status.name, revision, "deployment status written");
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
