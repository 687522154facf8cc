//! A pass, executed: [`pass`] plans round one
//! ([`plan_manifests`](super::plan::plan_manifests)), takes the plan's
//! bookkeeping into the state (creation order, rollouts, the render), writes
//! the manifests with compare-and-swap ([`crate::publish`]), then plans
//! and writes round two ([`plan_records`](super::plan::plan_records)):
//! deployment statuses, history, the heartbeat settings, orphaned statuses.
//! Every outcome is taken back into the state, so the echoes of these writes
//! cost nothing and a failed write is planned again by the retry.

use async_nats::jetstream::kv::{self, Store};
use futures::StreamExt;
use manifest_types::keys;

use super::plan::{ManifestWrite, RecordsPlan, plan_manifests, plan_records};
use super::state::State;
use super::view::Written;
use crate::heartbeat::HeartbeatPolicy;
use crate::publish::{self, PublishOutcome, StatusOutcome};

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
    /// The lease ran out before `agents` were written: rendered again by
    /// the next pass this instance runs.
    fn stopped(
        &mut self,
        agents: impl Iterator<Item = manifest_types::AgentId>,
        state: &mut State,
    ) {
        self.failures += 1;
        self.first_error.get_or_insert_with(|| NOT_ACTING.into());
        state.memo.dirty.agents.extend(agents);
    }

    fn failed(&mut self, what: String, error: &dyn std::error::Error) {
        let error = error_chain(error);
        tracing::debug!(%error, "{what}");
        self.failures += 1;
        self.first_error
            .get_or_insert_with(|| format!("{what}: {error}"));
    }
}

/// One pass: plan, execute, record the outcome (see the module docs).
pub(crate) async fn pass(
    state: &mut State,
    store: &Store,
    concurrency: usize,
    heartbeat: &HeartbeatPolicy,
    acting: impl Fn() -> bool,
) -> PassReport {
    let plan = plan_manifests(state);
    let mut report = PassReport {
        agents_rendered: plan.agents_rendered,
        ..PassReport::default()
    };
    let writes = plan.adopt(state);
    // Each round writes only while this instance holds the lease (ADR 0022).
    if !acting() {
        report.stopped(writes.into_iter().map(|w| w.agent), state);
        return report;
    }
    write_manifests(state, store, writes, concurrency, &mut report).await;
    if !acting() {
        report.failures += 1;
        report.first_error.get_or_insert_with(|| NOT_ACTING.into());
        return report;
    }
    let records = plan_records(state, heartbeat);
    write_records(state, store, records, concurrency, &mut report).await;
    report
}

const NOT_ACTING: &str = "the control lease ran out during the pass";

async fn write_manifests(
    state: &mut State,
    store: &Store,
    writes: Vec<ManifestWrite>,
    concurrency: usize,
    report: &mut PassReport,
) {
    let keys = state.fleet.signing.clone();
    let signing = &*keys;
    let results: Vec<_> = futures::stream::iter(writes)
        .map(|w| async move {
            let planned = w.generation();
            // A watched copy of the key saves the read before the write.
            let outcome = match w.known {
                Some(known) => {
                    publish::publish_manifest_over(
                        store,
                        &w.agent,
                        w.resources,
                        w.floor,
                        known,
                        signing,
                    )
                    .await
                }
                None => {
                    publish::publish_manifest_above(store, &w.agent, w.resources, w.floor, signing)
                        .await
                }
            };
            (w.agent, planned, outcome)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    for (agent, planned, outcome) in results {
        match outcome {
            // The manifest as written or as it stands, signatures included.
            Ok(publish::Published { outcome, manifest }) => {
                let generation = outcome.generation();
                if planned.is_some_and(|p| p != generation) {
                    tracing::debug!(%agent, ?planned, generation, "the key had moved since it was watched");
                }
                match outcome {
                    PublishOutcome::Written { revision, .. } => {
                        tracing::info!(%agent, generation, kv_sequence = revision, resources = manifest.resources.len(), "manifest written");
                        report.manifests_written += 1;
                        state.fleet.wrote(manifest, revision);
                    }
                    // The store was ahead of the cache.
                    PublishOutcome::Unchanged { revision, .. } => {
                        state.fleet.desired.insert(
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
                state.memo.dirty.agents.insert(agent);
            }
        }
    }
}

async fn write_records(
    state: &mut State,
    store: &Store,
    plan: RecordsPlan,
    concurrency: usize,
    report: &mut PassReport,
) {
    let results: Vec<_> = futures::stream::iter(plan.statuses)
        .map(|status| async move {
            let outcome = publish::publish_deployment_status(store, &status).await;
            (status, outcome)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let fleet = &mut state.fleet;
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
                fleet.statuses.insert(
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

    // Each deployment's history of revisions; trimmed only once every new
    // revision is recorded (the trims count them).
    let mut recorded_all = true;
    for (record, doc) in plan.history.records {
        let key = keys::revision(&record.name, record.revision);
        let bytes = serde_json::to_vec(&record).expect("records serialise");
        match store.create(&key, bytes.into()).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => {
                report.failed(format!("cannot record {key}"), &e);
                recorded_all = false;
                continue;
            }
        }
        fleet
            .recorded
            .entry(record.name.clone())
            .or_default()
            .insert(record.revision);
        fleet
            .history
            .entry(record.name)
            .or_default()
            .insert(record.revision, doc);
    }
    let trims = if recorded_all {
        plan.history.trims
    } else {
        Vec::new()
    };
    for (name, revision) in trims {
        let key = keys::revision(&name, revision);
        match store.purge(&key).await {
            Ok(()) => {
                if let Some(r) = fleet.recorded.get_mut(&name) {
                    r.remove(&revision);
                }
                if let Some(h) = fleet.history.get_mut(&name) {
                    h.remove(&revision);
                }
            }
            Err(e) => report.failed(format!("cannot trim {key}"), &e),
        }
    }

    // The fleet's heartbeat interval, sized to the registered agents.
    if let Some(want) = plan.heartbeat {
        let bytes = serde_json::to_vec(&want).expect("settings serialise");
        match store.put(keys::HEARTBEAT_SETTINGS, bytes.into()).await {
            Ok(revision) => {
                tracing::info!(
                    interval_ms = want.interval_ms,
                    agents = want.agents,
                    "heartbeat interval published"
                );
                fleet.heartbeat = Some(Written {
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
    for name in plan.orphans {
        match publish::remove_deployment_status(store, &name).await {
            Ok(()) => {
                tracing::info!(deployment = %name, "deployment deleted; status removed");
                if let Some(w) = fleet.statuses.get_mut(&name) {
                    w.value = None;
                }
            }
            Err(error) => {
                report.failed(format!("cannot remove the status of {name}"), &error);
            }
        }
    }
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
