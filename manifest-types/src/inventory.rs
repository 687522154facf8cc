//! What an agent says about itself: [`AgentInventory`] in `agents.<id>`
//! (written only when it changed: checked at start and after each engine
//! probe) and [`Heartbeat`] in
//! `heartbeat.<id>` (periodic; its KV timestamp is the liveness signal).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ApiVersion;
use crate::ids::AgentId;
use crate::spec::ResourceKind;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentInventory {
    pub api_version: ApiVersion,
    pub agent_id: AgentId,
    pub instance_id: String,
    pub agent_version: String,
    pub arch: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Kinds this agent can reconcile (others report Failed/Unsupported).
    pub reconcilers: Vec<ResourceKind>,
    /// Whether the engine behind each reconciler (the Docker Engine,
    /// systemd over the system bus) answered when last asked; rewritten when
    /// that changes. Absent until the first probe, and from older agents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engines: Vec<EngineStatus>,
    /// Labels the device reports about itself. Hints only: selectors match
    /// the operator's labels (`values.<id>`; docs/adr/0017-trust-model.md).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The engine a reconciler drives, as the agent last found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct EngineStatus {
    pub kind: ResourceKind,
    /// What the engine is: "Docker Engine", "systemd", "filesystem".
    pub engine: String,
    pub reachable: bool,
    /// The engine's version, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why it is not reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    pub api_version: ApiVersion,
    pub agent_id: AgentId,
    pub instance_id: String,
    /// Increments per heartbeat of this process.
    pub seq: u64,
    pub manifest_generation: u64,
    pub ready: bool,
    /// Set while another installation is writing this agent's status key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_conflict: Option<String>,
    /// The interval until this agent's next heartbeat, in milliseconds:
    /// readers judge its liveness by it (`convergence::Thresholds`). Absent
    /// from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
}

impl Heartbeat {
    /// The declared interval.
    pub fn interval(&self) -> Option<std::time::Duration> {
        self.interval_ms.map(std::time::Duration::from_millis)
    }
}

/// `settings.heartbeat` (fleet bucket): the heartbeat interval the control
/// plane asks every agent to use at least, sized so the whole fleet's
/// heartbeat rate stays under a cap (docs/adr/0015). Agents read it every few
/// beats and use the longer of it and their own configured interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatSettings {
    pub api_version: ApiVersion,
    /// The interval agents should beat at, at least, in milliseconds.
    pub interval_ms: u64,
    /// How many agents it was sized for.
    pub agents: u64,
    /// The fleet-wide cap on heartbeats per second it keeps to.
    pub max_per_second: u64,
}

impl HeartbeatSettings {
    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.interval_ms)
    }
}

/// Checks a label key or value: 1 to 63 ASCII letters, digits, `-_.`, and
/// for keys also one `/` prefix separator.
pub fn validate_label(key: &str, value: &str) -> Result<(), String> {
    let tok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    let key_ok = match key.split_once('/') {
        Some((p, n)) => tok(p) && tok(n),
        None => tok(key),
    };
    if !key_ok {
        return Err(format!("invalid label key {key:?}"));
    }
    if !(value.is_empty() || tok(value)) {
        return Err(format!("invalid label value {value:?} for {key:?}"));
    }
    Ok(())
}
