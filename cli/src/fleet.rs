//! The operator's view of agents and deployments, assembled from KV entries.
//!
//! Ages ("last seen") come from the KV entries' server timestamps, never from
//! times an agent writes into its documents (devices may have no RTC).

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use async_nats::jetstream::kv;
use manifest_types::keys::{self, Key};
use manifest_types::{
    AgentId, AgentInventory, AgentManifest, AgentStatus, ConditionType, Deployment, DeploymentName,
    DeploymentStatus, Heartbeat,
};
use serde::Serialize;

use crate::convergence::{Progress, TargetState};
use crate::kv::{Decode, Snapshot, Versioned};
use crate::output;

/// One agent's documents, each optional.
#[derive(Debug, Clone)]
pub struct AgentView {
    pub id: AgentId,
    pub inventory: Option<Versioned<AgentInventory>>,
    pub status: Option<Versioned<AgentStatus>>,
    pub heartbeat: Option<Versioned<Heartbeat>>,
    pub desired: Option<Versioned<AgentManifest>>,
    /// Server time of the newest heartbeat, else of the newest value the
    /// agent wrote (readable or not).
    pub last_seen: Option<SystemTime>,
    /// Values present but unreadable.
    pub problems: Vec<String>,
}

/// The entries of one agent's four keys.
#[derive(Debug, Default, Clone, Copy)]
pub struct AgentEntries<'a> {
    pub inventory: Option<&'a kv::Entry>,
    pub status: Option<&'a kv::Entry>,
    pub heartbeat: Option<&'a kv::Entry>,
    pub desired: Option<&'a kv::Entry>,
}

impl AgentEntries<'_> {
    pub fn is_empty(&self) -> bool {
        self.inventory.is_none()
            && self.status.is_none()
            && self.heartbeat.is_none()
            && self.desired.is_none()
    }
}

fn decode_into<T: Decode>(
    e: Option<&kv::Entry>,
    problems: &mut Vec<String>,
) -> Option<Versioned<T>> {
    match Versioned::decode(e?) {
        Ok(v) => Some(v),
        Err(p) => {
            problems.push(p);
            None
        }
    }
}

impl AgentView {
    pub fn from_entries(id: AgentId, e: AgentEntries<'_>) -> Self {
        let mut problems = Vec::new();
        let written = |e: Option<&kv::Entry>| e.map(|e| SystemTime::from(e.created));
        let last_seen =
            written(e.heartbeat).or_else(|| written(e.status).max(written(e.inventory)));
        Self {
            inventory: decode_into(e.inventory, &mut problems),
            status: decode_into(e.status, &mut problems),
            heartbeat: decode_into(e.heartbeat, &mut problems),
            desired: decode_into(e.desired, &mut problems),
            id,
            last_seen,
            problems,
        }
    }

    pub fn status(&self) -> Option<&AgentStatus> {
        self.status.as_ref().map(|v| &v.value)
    }

    pub fn desired_generation(&self) -> Option<u64> {
        self.desired.as_ref().map(|d| d.value.generation)
    }

    pub fn phase(&self) -> Phase {
        phase(
            self.status(),
            self.heartbeat.as_ref().map(|h| &h.value),
            self.desired_generation(),
        )
    }

    /// `ready/total` resources, `-` without a status.
    pub fn ready_column(&self) -> String {
        match self.status() {
            Some(s) => format!("{}/{}", s.ready_count(), s.resources.len()),
            None => "-".into(),
        }
    }

    /// `manifest/desired` generations.
    pub fn generation_column(&self) -> String {
        let m = self
            .status()
            .map_or("-".to_owned(), |s| s.manifest_generation.to_string());
        let d = self
            .desired_generation()
            .map_or("-".to_owned(), |g| g.to_string());
        format!("{m}/{d}")
    }

    pub fn last_seen_column(&self) -> String {
        self.last_seen.map_or("never".into(), |t| {
            format!("{} ago", output::age(output::since(t)))
        })
    }

    pub fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.inventory.as_ref().map(|i| &i.value.labels)
    }

    /// The machine-readable form: typed documents as stored, plus the
    /// derived columns.
    pub fn doc(&self, with_manifest: bool) -> AgentDoc<'_> {
        AgentDoc {
            agent_id: &self.id,
            state: self.phase().as_str(),
            last_seen: self.last_seen.map(output::rfc3339),
            last_seen_seconds_ago: self.last_seen.map(|t| output::since(t).as_secs()),
            desired_generation: self.desired_generation(),
            inventory: self.inventory.as_ref().map(|v| &v.value),
            status: self.status(),
            heartbeat: self.heartbeat.as_ref().map(|v| &v.value),
            desired: if with_manifest {
                self.desired.as_ref().map(|v| &v.value)
            } else {
                None
            },
            problems: &self.problems,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentDoc<'a> {
    pub agent_id: &'a AgentId,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen_seconds_ago: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_generation: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inventory: Option<&'a AgentInventory>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'a AgentStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<&'a Heartbeat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired: Option<&'a AgentManifest>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub problems: &'a [String],
}

/// The STATUS column of `get agents`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Ready,
    Degraded,
    Rejected,
    Pending,
    IdentityConflict,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Degraded => "Degraded",
            Self::Rejected => "Rejected",
            Self::Pending => "Pending",
            Self::IdentityConflict => "IdentityConflict",
        }
    }
}

/// One word for an agent, most urgent first: another installation writes its
/// key; its newest manifest was rejected; a resource is failing; it has not
/// caught up with its desired generation; all Ready.
pub fn phase(
    status: Option<&AgentStatus>,
    heartbeat: Option<&Heartbeat>,
    desired_generation: Option<u64>,
) -> Phase {
    if heartbeat.is_some_and(|h| h.identity_conflict.is_some())
        || status.is_some_and(|s| s.condition_true(ConditionType::IdentityConflict))
    {
        return Phase::IdentityConflict;
    }
    let Some(s) = status else {
        return Phase::Pending;
    };
    if s.rejection.is_some() || s.condition_true(ConditionType::ManifestRejected) {
        return Phase::Rejected;
    }
    if s.condition_true(ConditionType::Degraded) {
        return Phase::Degraded;
    }
    if desired_generation.is_some_and(|d| d > s.manifest_generation) {
        return Phase::Pending;
    }
    if s.condition_true(ConditionType::Ready) {
        Phase::Ready
    } else {
        Phase::Pending
    }
}

/// Every agent named by any of its keys, from a snapshot of the four families.
pub fn agents(snap: &Snapshot) -> Vec<AgentView> {
    let mut ids = BTreeSet::new();
    for key in snap.entries.keys() {
        if let Some(
            Key::Inventory(a) | Key::ActualState(a) | Key::Heartbeat(a) | Key::DesiredState(a),
        ) = Key::parse(key)
        {
            ids.insert(a);
        }
    }
    ids.into_iter()
        .map(|id| {
            let e = AgentEntries {
                inventory: snap.entries.get(&keys::inventory(&id)),
                status: snap.entries.get(&keys::actual_state(&id)),
                heartbeat: snap.entries.get(&keys::heartbeat(&id)),
                desired: snap.entries.get(&keys::desired_state(&id)),
            };
            AgentView::from_entries(id, e)
        })
        .collect()
}

/// The families `get agents` reads.
pub const AGENT_FAMILIES: [&str; 4] = [
    keys::AGENTS,
    keys::ACTUAL_STATE,
    keys::HEARTBEAT,
    keys::DESIRED_STATE,
];

/// The families `get deployments` reads.
pub const DEPLOYMENT_FAMILIES: [&str; 3] = [
    keys::DEPLOYMENTS,
    keys::DEPLOYMENT_STATUS,
    keys::ACTUAL_STATE,
];

/// One deployment: its document and the control plane's render results.
#[derive(Debug, Clone)]
pub struct DeploymentView {
    pub name: DeploymentName,
    pub deployment: Option<Versioned<Deployment>>,
    pub status: Option<Versioned<DeploymentStatus>>,
    pub problems: Vec<String>,
}

impl DeploymentView {
    pub fn from_entries(
        name: DeploymentName,
        deployment: Option<&kv::Entry>,
        status: Option<&kv::Entry>,
    ) -> Self {
        let mut problems = Vec::new();
        Self {
            deployment: decode_into(deployment, &mut problems),
            status: decode_into(status, &mut problems),
            name,
            problems,
        }
    }

    pub fn revision(&self) -> Option<u64> {
        self.deployment.as_ref().map(|d| d.revision)
    }

    /// The render results, when they are for the current revision (or a
    /// newer one) rather than an earlier one.
    pub fn current_status(&self) -> Option<&DeploymentStatus> {
        let s = &self.status.as_ref()?.value;
        match self.revision() {
            Some(r) if s.observed_revision < r => None,
            _ => Some(s),
        }
    }

    /// The CONVERGED column: `n/m`, `pending` (not rendered yet), `invalid`.
    pub fn converged_column(&self, progress: Option<&Progress>) -> String {
        match (self.current_status(), progress) {
            (Some(s), _) if s.error.is_some() => "invalid".into(),
            (Some(_), Some(p)) => format!("{}/{}", p.converged(), p.total()),
            _ => "pending".into(),
        }
    }
}

/// Every deployment named by `deployments.*` or `deployment-status.*`.
pub fn deployments(snap: &Snapshot) -> Vec<DeploymentView> {
    let mut names = BTreeSet::new();
    for key in snap.entries.keys() {
        if let Some(Key::Deployment(n) | Key::DeploymentStatus(n)) = Key::parse(key) {
            names.insert(n);
        }
    }
    names
        .into_iter()
        .map(|n| {
            let d = snap.entries.get(&keys::deployment(&n));
            let s = snap.entries.get(&keys::deployment_status(&n));
            DeploymentView::from_entries(n, d, s)
        })
        .collect()
}

/// Decoded agent statuses of a snapshot, by agent (unreadable ones skipped).
pub fn statuses(snap: &Snapshot) -> BTreeMap<AgentId, AgentStatus> {
    snap.family(keys::ACTUAL_STATE)
        .filter_map(|(id, e)| {
            let id: AgentId = id.parse().ok()?;
            let v = Versioned::<AgentStatus>::decode(e).ok()?;
            Some((id, v.value))
        })
        .collect()
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentDoc<'a> {
    pub name: &'a DeploymentName,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<&'a Deployment>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'a DeploymentStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub converged: Option<usize>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub target_states: BTreeMap<&'a AgentId, TargetDoc>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub problems: &'a [String],
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetDoc {
    pub state: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl DeploymentView {
    pub fn doc<'a>(&'a self, progress: Option<&'a Progress>) -> DeploymentDoc<'a> {
        let progress = progress.filter(|_| self.current_status().is_some());
        DeploymentDoc {
            name: &self.name,
            revision: self.revision(),
            deployment: self.deployment.as_ref().map(|d| &d.value),
            status: self.status.as_ref().map(|s| &s.value),
            converged: progress.map(Progress::converged),
            target_states: progress
                .map(|p| {
                    p.targets
                        .iter()
                        .map(|(a, t): (&AgentId, &TargetState)| {
                            (
                                a,
                                TargetDoc {
                                    state: t.name(),
                                    detail: t.detail(),
                                },
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            problems: &self.problems,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifest_types::{AgentBuild, ApiVersion, Condition, Rejection};

    fn status(generation: u64, conditions: &[(ConditionType, bool)]) -> AgentStatus {
        AgentStatus {
            api_version: ApiVersion,
            agent_id: AgentId::new("pi-1").unwrap(),
            instance_id: "i".into(),
            manifest_generation: generation,
            observed_generation: generation,
            observed_revision: 1,
            resources: BTreeMap::new(),
            conditions: conditions
                .iter()
                .map(|(t, s)| Condition {
                    type_: *t,
                    status: *s,
                    reason: "R".into(),
                    message: String::new(),
                    last_transition_time: "t".into(),
                })
                .collect(),
            rejection: None,
            released: vec![],
            agent: AgentBuild {
                version: "0".into(),
                arch: "x".into(),
                os: "linux".into(),
            },
        }
    }

    #[test]
    fn phases_most_urgent_first() {
        use ConditionType::*;
        assert_eq!(phase(None, None, Some(1)), Phase::Pending);
        let ready = status(3, &[(Ready, true)]);
        assert_eq!(phase(Some(&ready), None, Some(3)), Phase::Ready);
        assert_eq!(phase(Some(&ready), None, None), Phase::Ready);
        assert_eq!(phase(Some(&ready), None, Some(4)), Phase::Pending);
        let degraded = status(3, &[(Ready, false), (Degraded, true)]);
        assert_eq!(phase(Some(&degraded), None, Some(3)), Phase::Degraded);
        let mut rejected = degraded.clone();
        rejected.rejection = Some(Rejection {
            reason: "InvalidPath".into(),
            message: "m".into(),
            revision: 9,
            generation: Some(4),
        });
        assert_eq!(phase(Some(&rejected), None, Some(4)), Phase::Rejected);
        let conflict = status(3, &[(Ready, true), (IdentityConflict, true)]);
        assert_eq!(
            phase(Some(&conflict), None, Some(3)),
            Phase::IdentityConflict
        );
        let hb = Heartbeat {
            api_version: ApiVersion,
            agent_id: AgentId::new("pi-1").unwrap(),
            instance_id: "i".into(),
            seq: 1,
            manifest_generation: 3,
            ready: true,
            identity_conflict: Some("other".into()),
        };
        assert_eq!(
            phase(Some(&ready), Some(&hb), Some(3)),
            Phase::IdentityConflict
        );
        let not_ready = status(3, &[(Ready, false)]);
        assert_eq!(phase(Some(&not_ready), None, Some(3)), Phase::Pending);
    }
}
