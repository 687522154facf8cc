//! Compare-and-swap writes of what the control plane owns: agent manifests
//! (`desired-state.<id>`) and deployment statuses (`deployment-status.<name>`).
//!
//! Manifest rules (DESIGN.md "Generations", docs/adr/0003):
//! - a desired-state key is never deleted, and generations strictly increase;
//! - the same resources as stored → no write, the stored generation stands;
//! - different resources → `generation + 1`, written with `update(key, value,
//!   revision)` against the revision just read;
//! - no readable manifest (key missing, DEL/PURGE marker, unreadable bytes,
//!   another agent's id) → the key is (re)created at a generation above both
//!   whatever generation can still be read there and the agent's reported
//!   `observedGeneration`, so the agent never sees a replayed generation;
//! - a lost race (`WrongLastRevision`) re-reads and retries on fresh state,
//!   at most [`MAX_ATTEMPTS`] times.

use async_nats::jetstream::kv::{self, Operation, Store, UpdateErrorKind};
use bytes::Bytes;
use manifest_types::{AgentId, AgentManifest, DeploymentStatus, ManagedResource, keys};

/// How many times a write is tried before a lost CAS race is an error.
pub const MAX_ATTEMPTS: usize = 5;

/// What [`publish_manifest`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// The stored manifest already has these resources.
    Unchanged { generation: u64 },
    /// A new generation was written at this KV revision.
    Written { generation: u64, revision: u64 },
}

impl PublishOutcome {
    /// The generation now stored for the agent.
    pub fn generation(&self) -> u64 {
        match *self {
            Self::Unchanged { generation } | Self::Written { generation, .. } => generation,
        }
    }
}

/// What [`publish_deployment_status`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOutcome {
    Unchanged { revision: u64 },
    Written { revision: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read {key}")]
    Read {
        key: String,
        #[source]
        source: kv::EntryError,
    },
    #[error("cannot write {key}")]
    Write {
        key: String,
        #[source]
        source: kv::UpdateError,
    },
    #[error("cannot delete {key}")]
    Delete {
        key: String,
        #[source]
        source: kv::DeleteError,
    },
    #[error("gave up writing {key}: another writer changed it on each of {attempts} attempts")]
    Contended { key: String, attempts: usize },
    #[error("refusing to publish an invalid manifest for {agent}")]
    InvalidManifest {
        agent: AgentId,
        #[source]
        source: manifest_types::ManifestError,
    },
}

/// Publishes `resources` as the manifest of `agent`; see the module docs.
pub async fn publish_manifest(
    store: &Store,
    agent: &AgentId,
    resources: Vec<ManagedResource>,
) -> Result<PublishOutcome, PublishError> {
    let key = keys::desired_state(agent);
    let mut manifest = AgentManifest::empty(agent.clone(), 0);
    manifest.resources = resources;
    manifest
        .validate()
        .map_err(|source| PublishError::InvalidManifest {
            agent: agent.clone(),
            source,
        })?;
    for _ in 0..MAX_ATTEMPTS {
        let current = read(store, &key).await?;
        let (generation, expected_revision) = match &current {
            Some(entry) if entry.operation == Operation::Put => {
                match AgentManifest::from_json(&entry.value) {
                    Ok(stored) if stored.agent_id == *agent => {
                        if stored.resources == manifest.resources {
                            return Ok(PublishOutcome::Unchanged {
                                generation: stored.generation,
                            });
                        }
                        (stored.generation + 1, entry.revision)
                    }
                    // Unreadable or misaddressed: recreate above anything
                    // either side has seen.
                    _ => {
                        let floor = probe_u64(&entry.value, "generation").unwrap_or(0);
                        let observed = observed_generation(store, agent).await?;
                        (floor.max(observed) + 1, entry.revision)
                    }
                }
            }
            // A DEL/PURGE marker: update against the marker's revision.
            Some(marker) => (
                observed_generation(store, agent).await? + 1,
                marker.revision,
            ),
            // Never written: `update` at revision 0 is a create.
            None => (observed_generation(store, agent).await? + 1, 0),
        };
        manifest.generation = generation;
        match store
            .update(&key, Bytes::from(manifest.to_json()), expected_revision)
            .await
        {
            Ok(revision) => {
                return Ok(PublishOutcome::Written {
                    generation,
                    revision,
                });
            }
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
            Err(source) => return Err(PublishError::Write { key, source }),
        }
    }
    Err(PublishError::Contended {
        key,
        attempts: MAX_ATTEMPTS,
    })
}

/// The highest generation the agent reports having looked at (or accepted),
/// read leniently from `actual-state.<id>`; 0 when there is nothing readable.
pub async fn observed_generation(store: &Store, agent: &AgentId) -> Result<u64, PublishError> {
    let key = keys::actual_state(agent);
    Ok(match read(store, &key).await? {
        Some(entry) if entry.operation == Operation::Put => {
            let observed = probe_u64(&entry.value, "observedGeneration").unwrap_or(0);
            let accepted = probe_u64(&entry.value, "manifestGeneration").unwrap_or(0);
            observed.max(accepted)
        }
        _ => 0,
    })
}

/// Writes `status` to `deployment-status.<name>` unless it is already stored
/// there, with CAS against the revision read.
pub async fn publish_deployment_status(
    store: &Store,
    status: &DeploymentStatus,
) -> Result<StatusOutcome, PublishError> {
    let key = keys::deployment_status(&status.name);
    let value = Bytes::from(serde_json::to_vec(status).expect("deployment status serialises"));
    for _ in 0..MAX_ATTEMPTS {
        let expected = match read(store, &key).await? {
            Some(entry) if entry.operation == Operation::Put => {
                if serde_json::from_slice::<DeploymentStatus>(&entry.value)
                    .ok()
                    .as_ref()
                    == Some(status)
                {
                    return Ok(StatusOutcome::Unchanged {
                        revision: entry.revision,
                    });
                }
                entry.revision
            }
            Some(marker) => marker.revision,
            None => 0,
        };
        match store.update(&key, value.clone(), expected).await {
            Ok(revision) => return Ok(StatusOutcome::Written { revision }),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
            Err(source) => return Err(PublishError::Write { key, source }),
        }
    }
    Err(PublishError::Contended {
        key,
        attempts: MAX_ATTEMPTS,
    })
}

/// Removes the status of a deployment that no longer exists (a DEL marker,
/// so `nats kv history` still shows what it was).
pub async fn remove_deployment_status(
    store: &Store,
    name: &manifest_types::DeploymentName,
) -> Result<(), PublishError> {
    let key = keys::deployment_status(name);
    store
        .delete(&key)
        .await
        .map_err(|source| PublishError::Delete { key, source })
}

async fn read(store: &Store, key: &str) -> Result<Option<kv::Entry>, PublishError> {
    store.entry(key).await.map_err(|source| PublishError::Read {
        key: key.to_owned(),
        source,
    })
}

/// A top-level unsigned integer field of a JSON document that may not parse
/// as its full type.
fn probe_u64(bytes: &[u8], field: &str) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()?
        .get(field)?
        .as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_fields_of_documents_that_do_not_fully_parse() {
        let doc = br#"{"apiVersion":"flotilla.dev/v9","generation":41,"x":{}}"#;
        assert_eq!(probe_u64(doc, "generation"), Some(41));
        assert_eq!(probe_u64(doc, "missing"), None);
        assert_eq!(probe_u64(b"{not json", "generation"), None);
        assert_eq!(probe_u64(br#"{"generation":-1}"#, "generation"), None);
    }

    #[test]
    fn outcome_reports_the_stored_generation() {
        assert_eq!(PublishOutcome::Unchanged { generation: 4 }.generation(), 4);
        assert_eq!(
            PublishOutcome::Written {
                generation: 5,
                revision: 90
            }
            .generation(),
            5
        );
    }
}
