//! What an agent says about itself: [`AgentInventory`] in `agents.<id>`
//! (written at start, only when it changed) and [`Heartbeat`] in
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
    /// Labels the device reports about itself. Hints: see DESIGN.md Security.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
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
