//! The fleet census behind `/metrics` (docs/adr/0025-http-surface.md):
//! agents by liveness and by convergence state (the one rule,
//! `manifest_types::convergence::assess`, as `flotilla get agents` applies
//! it), failing resources by kind and reason, rejected manifests by reason,
//! deployments by rollout phase. Counted every `--census-interval` from one
//! read of each key family, never per scrape and never per agent series:
//! the label sets are small and fixed whatever the fleet's size.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv::Store;
use flotilla_nats::{AgentReports, read_family, read_reports};
use manifest_types::convergence::{self, Liveness, State, Target, Thresholds};
use manifest_types::rollout::Phase;
use manifest_types::status::ResourceState;
use manifest_types::{AgentId, AgentManifest, DeploymentStatus, keys};

/// What the fleet looked like at the last count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Census {
    /// When it was counted; `None` before the first count.
    pub at: Option<SystemTime>,
    /// Agents by liveness (`Online`, `Stale`, `Offline`).
    pub liveness: BTreeMap<String, u64>,
    /// Agents by convergence state (`Converged`, `Progressing`, …).
    pub states: BTreeMap<String, u64>,
    /// Failed resources by (kind, reason).
    pub failing: BTreeMap<(String, String), u64>,
    /// Agents whose last manifest was rejected, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Deployments by rollout phase (`None` without a staged rollout).
    pub deployments: BTreeMap<String, u64>,
}

/// The census shared between its counting task and the HTTP handlers.
pub type Shared = Arc<RwLock<Census>>;

/// Counts `reports` against the desired generations and the deployment
/// statuses. Pure.
pub fn count(
    reports: &AgentReports,
    desired: &BTreeMap<AgentId, u64>,
    deployments: &[DeploymentStatus],
    thresholds: &Thresholds,
    at: SystemTime,
) -> Census {
    // Every known label value is present, at 0 when nothing has it: a
    // series does not vanish when its count drops to nothing.
    let zeros = |names: &[&str]| -> BTreeMap<String, u64> {
        names.iter().map(|n| ((*n).to_owned(), 0)).collect()
    };
    let mut census = Census {
        at: Some(at),
        liveness: zeros(&[
            Liveness::Online.as_str(),
            Liveness::Stale.as_str(),
            Liveness::Offline.as_str(),
        ]),
        states: zeros(&[
            State::Offline.as_str(),
            State::Stale.as_str(),
            State::IdentityConflict.as_str(),
            State::Rejected.as_str(),
            State::Degraded.as_str(),
            State::Progressing.as_str(),
            State::Pending.as_str(),
            State::Converged.as_str(),
        ]),
        deployments: zeros(&[
            "None",
            Phase::Progressing.as_str(),
            Phase::Paused.as_str(),
            Phase::Halted.as_str(),
            Phase::RolledBack.as_str(),
            Phase::Complete.as_str(),
        ]),
        ..Census::default()
    };
    let mut agents: Vec<&AgentId> = reports
        .statuses
        .keys()
        .chain(reports.heartbeats.keys())
        .chain(desired.keys())
        .collect();
    agents.sort();
    agents.dedup();
    for agent in agents {
        let generation = desired.get(agent).copied().unwrap_or(0);
        let verdict = convergence::assess(
            &reports.report(agent),
            Target::Agent { generation },
            thresholds,
        );
        *census
            .liveness
            .entry(verdict.liveness.as_str().to_owned())
            .or_default() += 1;
        *census
            .states
            .entry(verdict.state.as_str().to_owned())
            .or_default() += 1;
        let Some(status) = reports.statuses.get(agent) else {
            continue;
        };
        for resource in status.resources.values() {
            if let ResourceState::Failed { reason, .. } = &resource.state {
                *census
                    .failing
                    .entry((resource.kind.clone(), reason.clone()))
                    .or_default() += 1;
            }
        }
        if let Some(r) = &status.rejection {
            *census
                .rejected
                .entry(r.reason.as_str().to_owned())
                .or_default() += 1;
        }
    }
    for d in deployments {
        let phase = d
            .rollout
            .as_ref()
            .map_or("None", |r| r.phase.as_str())
            .to_owned();
        *census.deployments.entry(phase).or_default() += 1;
    }
    census
}

/// Reads what [`count`] needs: every status and heartbeat, every desired
/// generation, every deployment status.
async fn read(
    store: &Store,
    heartbeats: &Store,
) -> Result<(AgentReports, BTreeMap<AgentId, u64>, Vec<DeploymentStatus>), flotilla_nats::ReadError>
{
    let reports = read_reports(store, heartbeats).await?;
    let mut desired = BTreeMap::new();
    let snap = read_family(store, keys::DESIRED_STATE).await?;
    for (id, e) in snap.family(keys::DESIRED_STATE) {
        if let (Ok(agent), Ok(m)) = (
            AgentId::new(id),
            serde_json::from_slice::<AgentManifest>(&e.value),
        ) {
            desired.insert(agent, m.generation);
        }
    }
    let snap = read_family(store, keys::DEPLOYMENT_STATUS).await?;
    let deployments = snap
        .family(keys::DEPLOYMENT_STATUS)
        .filter_map(|(_, e)| serde_json::from_slice(&e.value).ok())
        .collect();
    Ok((reports, desired, deployments))
}

/// Counts the fleet every `every` into `shared`, until aborted.
pub async fn keep(
    store: Store,
    heartbeats: Store,
    thresholds: Thresholds,
    every: Duration,
    shared: Shared,
) {
    loop {
        match read(&store, &heartbeats).await {
            Ok((reports, desired, deployments)) => {
                let census = count(
                    &reports,
                    &desired,
                    &deployments,
                    &thresholds,
                    SystemTime::now(),
                );
                *shared.write().expect("census lock") = census;
            }
            Err(error) => {
                tracing::warn!(error = %crate::daemon::execute::error_chain(&error), "cannot count the fleet for /metrics; the last count stands");
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifest_types::Heartbeat;

    fn status(agent: &str, generation: u64, failed: bool) -> manifest_types::AgentStatus {
        let mut s: manifest_types::AgentStatus = serde_json::from_value(serde_json::json!({
            "apiVersion": "flotilla.dev/v1",
            "agentId": agent,
            "instanceId": "i",
            "manifestGeneration": generation,
            "observedGeneration": generation,
            "observedRevision": 1,
            "resources": {},
            "conditions": [
                {"type": "Ready", "status": !failed, "reason": "r", "lastTransitionTime": "t"},
                {"type": "Degraded", "status": failed, "reason": "r", "lastTransitionTime": "t"}
            ],
            "agent": {"version": "0", "arch": "x", "os": "linux"}
        }))
        .expect("a status");
        if failed {
            s.resources.insert(
                "motd".parse().unwrap(),
                serde_json::from_value(serde_json::json!({
                    "kind": "File", "specHash": "h", "state": "failed",
                    "since": "t", "reason": "WriteFailed", "message": "m", "attempts": 1
                }))
                .expect("a resource status"),
            );
        }
        s
    }

    #[test]
    fn counts_agents_by_liveness_and_state_with_fixed_labels() {
        let mut reports = AgentReports::default();
        let a = AgentId::new("pi-a").unwrap();
        let b = AgentId::new("pi-b").unwrap();
        let c = AgentId::new("pi-c").unwrap();
        reports.statuses.insert(a.clone(), status("pi-a", 2, false));
        reports.statuses.insert(b.clone(), status("pi-b", 1, true));
        for id in [&a, &b] {
            reports
                .heartbeats
                .insert(id.clone(), (Duration::from_secs(1), None::<Heartbeat>));
            reports
                .status_ages
                .insert(id.clone(), Duration::from_secs(1));
        }
        let desired = BTreeMap::from([(a, 2), (b, 2), (c, 1)]);
        let census = count(
            &reports,
            &desired,
            &[],
            &Thresholds::default(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(census.liveness.values().sum::<u64>(), 3);
        assert_eq!(census.states.get("Converged"), Some(&1));
        assert_eq!(
            census.failing.get(&("File".into(), "WriteFailed".into())),
            Some(&1)
        );
        assert_eq!(census.states.len(), 8, "every state, at 0 when none");
        assert_eq!(census.liveness.len(), 3);
        assert_eq!(census.deployments.values().sum::<u64>(), 0);
    }
}
