//! Reading the fleet: every agent's [`AgentStatus`], one agent's manifest or
//! status, a deployment's [`DeploymentStatus`], and how far a deployment's
//! change has landed ([`progress`], by the one convergence rule
//! [`manifest_types::convergence`]). Shared by the daemon, the CLI and tests.
//!
//! Whole families (`actual-state.>`) are read with one ordered consumer
//! ([`flotilla_nats::family`], re-exported as [`read_family`]); single keys
//! with a direct get.

use std::collections::BTreeMap;

use async_nats::jetstream::kv::{self, Operation, Store};
pub use flotilla_nats::family::{ReadError, Snapshot, read_family};
use manifest_types::convergence::{self, Progress, Thresholds};
use manifest_types::{
    AgentId, AgentManifest, AgentStatus, Deployment, DeploymentName, DeploymentStatus, keys,
};
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot read {key}")]
    Entry {
        key: String,
        #[source]
        source: kv::EntryError,
    },
    #[error(transparent)]
    Read(#[from] ReadError),
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
    #[error("{key} holds an invalid deployment")]
    InvalidDeployment {
        key: String,
        #[source]
        source: manifest_types::DeploymentError,
    },
}

/// Every agent's reported status; an unreadable one maps to its parse error.
pub async fn agent_statuses(
    store: &Store,
) -> Result<BTreeMap<AgentId, Result<AgentStatus, String>>, FleetError> {
    let mut out = BTreeMap::new();
    for (id, entry) in read_family(store, keys::ACTUAL_STATE)
        .await?
        .family(keys::ACTUAL_STATE)
    {
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

/// The manifest stored for an agent and its KV sequence.
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

/// How far the rendered revision of deployment `name` has landed on its
/// targets, by [`convergence::assess`]: the deployment, its render results,
/// and every target's status and heartbeat (`heartbeats`: the heartbeat
/// bucket, docs/adr/0015), ages by server time.
/// `None` until the control plane has rendered the deployment.
///
/// # Errors
/// [`FleetError`] when a read fails or the deployment or its status is
/// unreadable.
pub async fn progress(
    store: &Store,
    heartbeats: &Store,
    name: &DeploymentName,
    thresholds: &Thresholds,
) -> Result<Option<Progress>, FleetError> {
    let Some(status) = deployment_status(store, name).await? else {
        return Ok(None);
    };
    let key = keys::deployment(name);
    let resources = match current(store, &key).await? {
        Some(entry) => Deployment::from_json(&entry.value)
            .map(|d| convergence::deployment_resources(&d))
            .map_err(|source| FleetError::InvalidDeployment { key, source })?,
        None => Vec::new(),
    };
    let reports = flotilla_nats::read_reports(store, heartbeats).await?;
    Ok(Some(Progress::of(
        &status,
        &resources,
        |agent| reports.report(agent),
        thresholds,
    )))
}
