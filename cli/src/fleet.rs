//! The operator's view of agents and deployments, assembled from KV entries.
//!
//! Every state shown is the one convergence rule's
//! ([`manifest_types::convergence::assess`], ADR 0010). Ages ("last seen",
//! heartbeat age) are server time minus server time: the KV entries'
//! timestamps against the server clock of the read that returned them
//! ([`Snapshot::server_time`]), never the reader's clock or times an agent
//! writes into its documents (devices may have no RTC).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv;
use flotilla_nats::AgentReports;
use manifest_types::convergence::{self, AgentReport, Progress, Target, Thresholds, Verdict};
use manifest_types::keys::{self, Key};
use manifest_types::{
    AgentId, AgentInventory, AgentManifest, AgentStatus, AgentValues, Deployment, DeploymentName,
    DeploymentStatus, Heartbeat,
};
use serde::Serialize;

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
    /// The operator's document (`values.<id>`): values and labels.
    pub values: Option<Versioned<AgentValues>>,
    /// Server time of the newest heartbeat, else of the newest value the
    /// agent wrote (readable or not).
    pub last_seen: Option<SystemTime>,
    /// How long before the read `last_seen` was (server time).
    pub last_seen_age: Option<Duration>,
    /// Age of the heartbeat by server time; None without one.
    pub heartbeat_age: Option<Duration>,
    /// What the convergence rule says about this agent.
    pub verdict: Verdict,
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
    pub values: Option<&'a kv::Entry>,
}

impl<'a> AgentEntries<'a> {
    /// The entries of `id`'s keys in `snap`.
    pub fn of(snap: &'a Snapshot, id: &AgentId) -> Self {
        Self {
            inventory: snap.entries.get(&keys::inventory(id)),
            status: snap.entries.get(&keys::actual_state(id)),
            heartbeat: snap.entries.get(&keys::heartbeat(id)),
            desired: snap.entries.get(&keys::desired_state(id)),
            values: snap.entries.get(&keys::values(id)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.inventory.is_none()
            && self.status.is_none()
            && self.heartbeat.is_none()
            && self.desired.is_none()
            && self.values.is_none()
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
    /// `server_time` is the server's clock at the read that returned the
    /// entries; ages are measured against it.
    pub fn from_entries(
        id: AgentId,
        e: AgentEntries<'_>,
        server_time: SystemTime,
        thresholds: &Thresholds,
    ) -> Self {
        let mut problems = Vec::new();
        let written = |e: Option<&kv::Entry>| e.map(|e| SystemTime::from(e.created));
        let last_seen =
            written(e.heartbeat).or_else(|| written(e.status).max(written(e.inventory)));
        let age = |t: SystemTime| server_time.duration_since(t).unwrap_or_default();
        let heartbeat_age = written(e.heartbeat).map(age);
        let inventory = decode_into(e.inventory, &mut problems);
        let status: Option<Versioned<AgentStatus>> = decode_into(e.status, &mut problems);
        let heartbeat: Option<Versioned<Heartbeat>> = decode_into(e.heartbeat, &mut problems);
        let desired: Option<Versioned<AgentManifest>> = decode_into(e.desired, &mut problems);
        let values = decode_into(e.values, &mut problems);
        let verdict = convergence::assess(
            &AgentReport {
                status: status.as_ref().map(|v| &v.value),
                heartbeat_age,
                heartbeat_conflict: heartbeat
                    .as_ref()
                    .and_then(|h| h.value.identity_conflict.as_deref()),
                heartbeat_interval: heartbeat.as_ref().and_then(|h| h.value.interval()),
                status_age: written(e.status).map(age),
            },
            Target::Agent {
                generation: desired.as_ref().map_or(0, |d| d.value.generation),
            },
            thresholds,
        );
        Self {
            inventory,
            status,
            heartbeat,
            desired,
            values,
            id,
            last_seen,
            last_seen_age: last_seen.map(age),
            heartbeat_age,
            verdict,
            problems,
        }
    }

    pub fn status(&self) -> Option<&AgentStatus> {
        self.status.as_ref().map(|v| &v.value)
    }

    pub fn desired_generation(&self) -> Option<u64> {
        self.desired.as_ref().map(|d| d.value.generation)
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
        self.last_seen_age
            .map_or("never".into(), |a| format!("{} ago", output::age(a)))
    }

    /// The operator's labels, which selectors match.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        self.values.as_ref().map_or(&NONE, |v| &v.value.labels)
    }

    /// The labels the device reports about itself: hints, matched only by
    /// selectors with `deviceLabels: true`.
    pub fn reported_labels(&self) -> &BTreeMap<String, String> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        self.inventory.as_ref().map_or(&NONE, |i| &i.value.labels)
    }

    /// The machine-readable form: typed documents as stored, plus the
    /// derived columns.
    pub fn doc(&self, with_manifest: bool) -> AgentDoc<'_> {
        AgentDoc {
            agent_id: &self.id,
            state: self.verdict.state.as_str(),
            liveness: self.verdict.liveness.as_str(),
            heartbeat_interval_seconds: self
                .heartbeat
                .as_ref()
                .and_then(|h| h.value.interval())
                .map(|i| i.as_secs_f64()),
            reason: self.verdict.detail(),
            last_seen: self.last_seen.map(output::rfc3339),
            last_seen_seconds_ago: self.last_seen_age.map(|a| a.as_secs()),
            heartbeat_age_seconds: self.heartbeat_age.map(|a| a.as_secs()),
            desired_generation: self.desired_generation(),
            labels: self.labels(),
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
    /// The convergence rule's state (ADR 0010).
    pub state: &'static str,
    /// Online / Stale / Offline, from the heartbeat's server-time age.
    pub liveness: &'static str,
    /// The interval the agent's last heartbeat declared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_seconds: Option<f64>,
    /// Why, in one line (empty when Converged).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen_seconds_ago: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_age_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_generation: Option<u64>,
    /// The operator's labels (`values.<id>`), which selectors match; the
    /// device's own are `inventory.labels`.
    pub labels: &'a BTreeMap<String, String>,
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

/// Every agent named by any of its keys, from a snapshot of the four families.
pub fn agents(snap: &Snapshot, thresholds: &Thresholds) -> Vec<AgentView> {
    let mut ids = BTreeSet::new();
    for key in snap.entries.keys() {
        if let Some(
            Key::Inventory(a)
            | Key::ActualState(a)
            | Key::Heartbeat(a)
            | Key::DesiredState(a)
            | Key::Values(a),
        ) = Key::parse(key)
        {
            ids.insert(a);
        }
    }
    ids.into_iter()
        .map(|id| {
            let e = AgentEntries::of(snap, &id);
            AgentView::from_entries(id, e, snap.server_time, thresholds)
        })
        .collect()
}

/// The families `get agents` reads.
pub const AGENT_FAMILIES: [&str; 5] = [
    keys::AGENTS,
    keys::ACTUAL_STATE,
    keys::HEARTBEAT,
    keys::DESIRED_STATE,
    keys::VALUES,
];

/// The families `get deployments` reads.
pub const DEPLOYMENT_FAMILIES: [&str; 4] = [
    keys::DEPLOYMENTS,
    keys::DEPLOYMENT_STATUS,
    keys::ACTUAL_STATE,
    keys::HEARTBEAT,
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

    /// How far the rendered revision has landed, by the convergence rule;
    /// None until it is rendered.
    pub fn progress(&self, reports: &AgentReports, thresholds: &Thresholds) -> Option<Progress> {
        let status = self.current_status()?;
        let resources = self
            .deployment
            .as_ref()
            .map(|d| convergence::deployment_resources(&d.value))
            .unwrap_or_default();
        Some(Progress::of(
            status,
            &resources,
            |a| reports.report(a),
            thresholds,
        ))
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
    /// The convergence rule's state (ADR 0010).
    pub state: &'static str,
    /// Online / Stale / Offline, from the heartbeat's server-time age.
    pub liveness: &'static str,
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
                        .map(|(a, v): (&AgentId, &Verdict)| {
                            (
                                a,
                                TargetDoc {
                                    state: v.state.as_str(),
                                    liveness: v.liveness.as_str(),
                                    detail: v.detail(),
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
