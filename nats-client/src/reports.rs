//! What a [`Snapshot`] says about agents, ready for the convergence rule:
//! each agent's decoded status and its heartbeat's age by server time.

use std::collections::BTreeMap;
use std::time::Duration;

use manifest_types::convergence::AgentReport;
use manifest_types::{AgentId, AgentStatus, Heartbeat, keys};

use crate::family::{ReadError, Snapshot, read_family};

/// Every agent's status (fleet bucket `store`) and heartbeat (`heartbeats`,
/// the heartbeat bucket beside it), one read each, merged on the later
/// server clock.
///
/// # Errors
/// As [`crate::read_keys`].
pub async fn read_reports(
    store: &async_nats::jetstream::kv::Store,
    heartbeats: &async_nats::jetstream::kv::Store,
) -> Result<AgentReports, ReadError> {
    let statuses = read_family(store, keys::ACTUAL_STATE).await?;
    let beats = read_family(heartbeats, keys::HEARTBEAT).await?;
    Ok(AgentReports::from_snapshot(&statuses.merge(beats)))
}

/// Agents' statuses and heartbeats decoded from one snapshot (one that read
/// the `actual-state` and `heartbeat` keys). Unreadable values count as
/// absent: an unreadable status is no status, and an unreadable heartbeat
/// still proves the agent wrote at that time.
#[derive(Debug, Clone, Default)]
pub struct AgentReports {
    pub statuses: BTreeMap<AgentId, AgentStatus>,
    /// Age of each status by server time.
    pub status_ages: BTreeMap<AgentId, Duration>,
    /// Age (server time) and the decoded document, when readable.
    pub heartbeats: BTreeMap<AgentId, (Duration, Option<Heartbeat>)>,
}

impl AgentReports {
    pub fn from_snapshot(snap: &Snapshot) -> Self {
        let mut out = Self::default();
        for (id, e) in snap.family(keys::ACTUAL_STATE) {
            if let (Ok(agent), Ok(s)) = (
                AgentId::new(id),
                serde_json::from_slice::<AgentStatus>(&e.value),
            ) {
                out.status_ages.insert(agent.clone(), snap.age(e));
                out.statuses.insert(agent, s);
            }
        }
        for (id, e) in snap.family(keys::HEARTBEAT) {
            if let Ok(agent) = AgentId::new(id) {
                let hb = serde_json::from_slice::<Heartbeat>(&e.value).ok();
                out.heartbeats.insert(agent, (snap.age(e), hb));
            }
        }
        out
    }

    /// The input of [`manifest_types::convergence::assess`] for `agent`.
    pub fn report(&self, agent: &AgentId) -> AgentReport<'_> {
        let hb = self.heartbeats.get(agent);
        AgentReport {
            status: self.statuses.get(agent),
            heartbeat_age: hb.map(|(age, _)| *age),
            heartbeat_conflict: hb
                .and_then(|(_, h)| h.as_ref())
                .and_then(|h| h.identity_conflict.as_deref()),
            heartbeat_interval: hb
                .and_then(|(_, h)| h.as_ref())
                .and_then(Heartbeat::interval),
            status_age: self.status_ages.get(agent).copied(),
        }
    }
}
