//! Reading the fleet: every agent's [`AgentStatus`], one agent's manifest or
//! status, a deployment's [`DeploymentStatus`], and how far a deployment's
//! change has landed ([`rollout`]). Shared by the daemon, the CLI and tests.
//!
//! Whole families (`actual-state.>`) are read with one ordered consumer that
//! delivers the last value per key ([`read_family`]); single keys with a
//! direct get.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::kv::{self, Operation, Store};
use futures::StreamExt;
use manifest_types::{
    AgentId, AgentManifest, AgentStatus, DeploymentName, DeploymentStatus, Rejection, keys,
};
use serde::de::DeserializeOwned;

/// How long [`read_family`] waits for the next value before giving up.
pub const READ_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot read {key}")]
    Entry {
        key: String,
        #[source]
        source: kv::EntryError,
    },
    #[error("cannot list {family}.>")]
    List {
        family: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("listing {family}.> stalled: no value for {READ_IDLE_TIMEOUT:?}")]
    ListTimeout { family: String },
    #[error("{key} holds an unreadable document")]
    Unreadable {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{key} holds an invalid manifest")]
    InvalidManifest {
        key: String,
        #[source]
        source: manifest_types::ManifestError,
    },
}

/// The current value of every key of one family (`actual-state`, `agents`,
/// …), keyed by the part after the family's dot. Deleted keys are left out.
pub async fn read_family(
    store: &Store,
    family: &str,
) -> Result<BTreeMap<String, kv::Entry>, FleetError> {
    let list_err = |source: async_nats::Error| FleetError::List {
        family: family.to_owned(),
        source,
    };
    let prefix = format!("{}{family}.", store.prefix);
    let consumer = store
        .stream
        .create_consumer(pull::OrderedConfig {
            description: Some("flotilla fleet read".into()),
            filter_subject: format!("{prefix}>"),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| list_err(e.into()))?;
    let mut remaining = consumer.cached_info().num_pending;
    let mut out = BTreeMap::new();
    if remaining == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(|e| list_err(e.into()))?;
    while remaining > 0 {
        let message = match tokio::time::timeout(READ_IDLE_TIMEOUT, messages.next()).await {
            Err(_) | Ok(None) => {
                return Err(FleetError::ListTimeout {
                    family: family.to_owned(),
                });
            }
            Ok(Some(message)) => message.map_err(|e| list_err(e.into()))?,
        };
        let info = message.info().map_err(list_err)?;
        remaining = info.pending;
        let revision = info.stream_sequence;
        let created = info.published;
        let Some(name) = message.subject.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let operation = operation(&message);
        if operation != Operation::Put {
            out.remove(name);
            continue;
        }
        out.insert(
            name.to_owned(),
            kv::Entry {
                bucket: store.name.clone(),
                key: format!("{family}.{name}"),
                value: message.payload.clone(),
                revision,
                delta: remaining,
                created,
                operation,
                seen_current: remaining == 0,
            },
        );
    }
    Ok(out)
}

/// The KV operation a stream message carries (`KV-Operation`, or a server
/// marker's reason).
fn operation(message: &async_nats::jetstream::Message) -> Operation {
    let Some(headers) = message.headers.as_ref() else {
        return Operation::Put;
    };
    if let Some(op) = headers.get("KV-Operation") {
        return Operation::from_str(op.as_str()).unwrap_or(Operation::Put);
    }
    match headers.get("Nats-Marker-Reason").map(|r| r.as_str()) {
        Some("MaxAge" | "Purge") => Operation::Purge,
        Some("Remove") => Operation::Delete,
        _ => Operation::Put,
    }
}

/// Every agent's reported status; an unreadable one maps to its parse error.
pub async fn agent_statuses(
    store: &Store,
) -> Result<BTreeMap<AgentId, Result<AgentStatus, String>>, FleetError> {
    let mut out = BTreeMap::new();
    for (id, entry) in read_family(store, keys::ACTUAL_STATE).await? {
        let Ok(agent) = AgentId::new(id) else {
            continue;
        };
        out.insert(
            agent,
            serde_json::from_slice::<AgentStatus>(&entry.value).map_err(|e| e.to_string()),
        );
    }
    Ok(out)
}

/// One agent's reported status, if it has written one.
pub async fn agent_status(
    store: &Store,
    agent: &AgentId,
) -> Result<Option<AgentStatus>, FleetError> {
    read_json(store, &keys::actual_state(agent)).await
}

/// A deployment's render results, if the control plane has written them.
pub async fn deployment_status(
    store: &Store,
    name: &DeploymentName,
) -> Result<Option<DeploymentStatus>, FleetError> {
    read_json(store, &keys::deployment_status(name)).await
}

/// The manifest stored for an agent and its KV revision.
pub async fn desired_manifest(
    store: &Store,
    agent: &AgentId,
) -> Result<Option<(AgentManifest, u64)>, FleetError> {
    let key = keys::desired_state(agent);
    let Some(entry) = current(store, &key).await? else {
        return Ok(None);
    };
    AgentManifest::from_json(&entry.value)
        .map(|m| Some((m, entry.revision)))
        .map_err(|source| FleetError::InvalidManifest { key, source })
}

async fn current(store: &Store, key: &str) -> Result<Option<kv::Entry>, FleetError> {
    let entry = store.entry(key).await.map_err(|source| FleetError::Entry {
        key: key.to_owned(),
        source,
    })?;
    Ok(entry.filter(|e| e.operation == Operation::Put))
}

async fn read_json<T: DeserializeOwned>(store: &Store, key: &str) -> Result<Option<T>, FleetError> {
    let Some(entry) = current(store, key).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&entry.value)
        .map(Some)
        .map_err(|source| FleetError::Unreadable {
            key: key.to_owned(),
            source,
        })
}

/// Whether `status` shows the change carried by manifest `generation` as
/// landed: that generation (or a later one, which still carries it) is the
/// accepted manifest and every resource is Ready.
pub fn converged(status: &AgentStatus, generation: u64) -> bool {
    status.manifest_generation >= generation
        && status.condition_true(manifest_types::ConditionType::Ready)
}

/// How far one deployment's current revision has landed on its targets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollout {
    /// Targets whose status shows their manifest generation converged.
    pub converged: Vec<AgentId>,
    /// Targets still working on it (or not yet at the generation).
    pub pending: Vec<AgentId>,
    /// Targets that rejected the manifest carrying it.
    pub rejected: Vec<(AgentId, Rejection)>,
    /// Targets that have never reported a readable status.
    pub silent: Vec<AgentId>,
}

impl Rollout {
    pub fn is_complete(&self) -> bool {
        self.pending.is_empty() && self.rejected.is_empty() && self.silent.is_empty()
    }

    pub fn total(&self) -> usize {
        self.converged.len() + self.pending.len() + self.rejected.len() + self.silent.len()
    }
}

/// Classifies every target of `deployment` by the statuses agents report.
pub fn rollout(
    deployment: &DeploymentStatus,
    statuses: &BTreeMap<AgentId, AgentStatus>,
) -> Rollout {
    let mut out = Rollout::default();
    for (agent, &generation) in &deployment.targets {
        match statuses.get(agent) {
            None => out.silent.push(agent.clone()),
            Some(s) if converged(s, generation) => out.converged.push(agent.clone()),
            Some(s) => match s.rejected_at_or_after(generation) {
                Some(r) => out.rejected.push((agent.clone(), r.clone())),
                None => out.pending.push(agent.clone()),
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifest_types::{AgentBuild, ApiVersion, Condition, ConditionType};

    fn status(agent: &str, accepted: u64, ready: bool) -> AgentStatus {
        AgentStatus {
            api_version: ApiVersion,
            agent_id: AgentId::new(agent).unwrap(),
            instance_id: "i".into(),
            manifest_generation: accepted,
            observed_generation: accepted,
            observed_revision: 1,
            resources: BTreeMap::new(),
            conditions: vec![Condition {
                type_: ConditionType::Ready,
                status: ready,
                reason: "Test".into(),
                message: String::new(),
                last_transition_time: String::new(),
            }],
            rejection: None,
            released: Vec::new(),
            agent: AgentBuild {
                version: "0".into(),
                arch: "x".into(),
                os: "linux".into(),
            },
        }
    }

    #[test]
    fn rollout_classifies_every_target() {
        let id = |s: &str| AgentId::new(s).unwrap();
        let deployment = DeploymentStatus {
            api_version: ApiVersion,
            name: DeploymentName::new("web").unwrap(),
            observed_revision: 9,
            created_revision: 2,
            targets: [
                (id("a"), 3),
                (id("b"), 5),
                (id("c"), 4),
                (id("d"), 7),
                (id("e"), 1),
            ]
            .into_iter()
            .collect(),
            conflicts: Vec::new(),
            error: None,
        };
        let mut rejected = status("c", 3, true);
        rejected.observed_generation = 4;
        rejected.rejection = Some(Rejection {
            reason: "PathOutsideRoots".into(),
            message: "no".into(),
            revision: 20,
            generation: Some(4),
        });
        let statuses: BTreeMap<_, _> = [
            (id("a"), status("a", 3, true)),
            (id("b"), status("b", 4, true)),
            (id("c"), rejected),
            (id("d"), status("d", 7, false)),
            (id("e"), status("e", 2, true)),
        ]
        .into_iter()
        .collect();
        let r = rollout(&deployment, &statuses);
        assert_eq!(r.converged, [id("a"), id("e")]);
        assert_eq!(r.pending, [id("b"), id("d")]);
        assert_eq!(r.rejected.len(), 1);
        assert_eq!(r.rejected[0].0, id("c"));
        assert!(r.silent.is_empty());
        assert!(!r.is_complete());
        assert_eq!(r.total(), 5);

        let none = rollout(&deployment, &BTreeMap::new());
        assert_eq!(none.silent.len(), 5);
    }
}
