//! Which agents a deployment (or a rollout wave) selects: [`Selector`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::AgentId;

/// Selects agents by explicit id and/or labels. An agent is selected when its
/// id is listed, or when `matchLabels` is non-empty and all of it matches.
///
/// The labels matched are the operator's (`values.<id>`, `flotilla label
/// agent`). A device can rewrite the labels it reports about itself
/// (`agents.<id>`), so those are matched only when `deviceLabels` is true —
/// for deployments any device may receive — and an operator label of the
/// same key still wins (docs/adr/0017).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<AgentId>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Also match the labels the device reports in its inventory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub device_labels: bool,
}

impl Selector {
    /// The labels this selector (and `${labels.k}`) sees for an agent with
    /// `operator` labels that reports `device` labels.
    pub fn labels<'a>(
        &self,
        operator: &'a BTreeMap<String, String>,
        device: &'a BTreeMap<String, String>,
    ) -> std::borrow::Cow<'a, BTreeMap<String, String>> {
        if !self.device_labels || device.is_empty() {
            return std::borrow::Cow::Borrowed(operator);
        }
        let mut all = device.clone();
        all.extend(operator.iter().map(|(k, v)| (k.clone(), v.clone())));
        std::borrow::Cow::Owned(all)
    }

    /// Whether an agent with `operator` labels reporting `device` labels is selected.
    pub fn selects_agent(
        &self,
        agent: &AgentId,
        operator: &BTreeMap<String, String>,
        device: &BTreeMap<String, String>,
    ) -> bool {
        self.selects(agent, &self.labels(operator, device))
    }

    /// Whether `labels` (already [`Self::labels`]) select `agent`.
    pub fn selects(&self, agent: &AgentId, labels: &BTreeMap<String, String>) -> bool {
        self.agents.contains(agent)
            || (!self.match_labels.is_empty()
                && self
                    .match_labels
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v)))
    }
}
