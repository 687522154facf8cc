//! Fleet-level intent: a [`Deployment`] (operator-written, `deployments.<name>`)
//! selects agents and lists resources; the control plane renders it into
//! every selected agent's manifest and reports [`DeploymentStatus`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ids::{AgentId, DeploymentName, LocalId, ResourceId};
use crate::inventory::validate_label;
use crate::manifest::{ManagedResource, ManifestError, ResourceSource, WireResource};
use crate::spec::ResourceSpec;
use crate::{API_VERSION, ApiVersion};

#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    pub name: DeploymentName,
    pub selector: Selector,
    pub resources: Vec<DeploymentResource>,
}

/// Selects agents by explicit id and/or labels. An agent is selected when its
/// id is listed, or when `matchLabels` is non-empty and all of it matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<AgentId>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

impl Selector {
    pub fn selects(&self, agent: &AgentId, labels: &BTreeMap<String, String>) -> bool {
        self.agents.contains(agent)
            || (!self.match_labels.is_empty()
                && self
                    .match_labels
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v)))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentResource {
    pub id: LocalId,
    pub spec: ResourceSpec,
    pub restart_on: Vec<LocalId>,
}

/// Why a deployment document is refused (by the CLI before writing it, and by
/// the control plane when reading it).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeploymentError {
    #[error("unsupported apiVersion {found:?} (expected {API_VERSION:?})")]
    UnsupportedApiVersion { found: String },
    #[error("invalid deployment: {message}")]
    InvalidDocument { message: String },
    #[error("resource {resource:?}: {reason}")]
    UnsupportedResource { resource: String, reason: String },
    #[error("the selector selects nothing: give `agents` and/or `matchLabels`")]
    EmptySelector,
    #[error(transparent)]
    Resource(#[from] ManifestError),
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireDeployment {
    api_version: String,
    #[serde(default = "deployment_kind")]
    kind: String,
    name: DeploymentName,
    selector: Selector,
    #[serde(default)]
    resources: Vec<WireResource>,
}

fn deployment_kind() -> String {
    "Deployment".to_owned()
}

impl Deployment {
    /// Parses and validates a deployment document (JSON value; the CLI turns
    /// YAML into one first).
    pub fn from_value(value: serde_json::Value) -> Result<Self, DeploymentError> {
        let invalid = |m: String| DeploymentError::InvalidDocument { message: m };
        if let Some(v) = value.get("apiVersion").and_then(|v| v.as_str())
            && v != API_VERSION
        {
            return Err(DeploymentError::UnsupportedApiVersion {
                found: v.to_owned(),
            });
        }
        let wire: WireDeployment =
            serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        if wire.kind != "Deployment" {
            return Err(invalid(format!(
                "kind is {:?}, expected \"Deployment\"",
                wire.kind
            )));
        }
        for (k, v) in &wire.selector.match_labels {
            validate_label(k, v).map_err(invalid)?;
        }
        if wire.selector.agents.is_empty() && wire.selector.match_labels.is_empty() {
            return Err(DeploymentError::EmptySelector);
        }
        let mut resources = Vec::new();
        for w in wire.resources {
            let id = LocalId::new(w.id.clone()).map_err(|e| invalid(e.to_string()))?;
            // Reuse the manifest rules (spec parse, restartOn, collisions) by
            // rendering into a scratch manifest.
            let r = ManagedResource::from_wire(w)?;
            if let ResourceSpec::Unsupported(u) = &r.spec {
                return Err(DeploymentError::UnsupportedResource {
                    resource: id.to_string(),
                    reason: u.reason.clone(),
                });
            }
            let restart_on = r
                .restart_on
                .iter()
                .map(|t| LocalId::new(t.as_str()))
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(format!("restartOn: {e}")))?;
            resources.push(DeploymentResource {
                id,
                spec: r.spec,
                restart_on,
            });
        }
        let d = Deployment {
            name: wire.name,
            selector: wire.selector,
            resources,
        };
        d.render_resources(0)?;
        Ok(d)
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, DeploymentError> {
        let value =
            serde_json::from_slice(bytes).map_err(|e| DeploymentError::InvalidDocument {
                message: e.to_string(),
            })?;
        Self::from_value(value)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("deployment serialises")
    }

    /// The resources as they appear in an agent manifest: ids
    /// `<deployment>/<local-id>`, each naming this deployment and `revision`.
    /// Fails on the same cross-resource rules as a manifest.
    pub fn render_resources(&self, revision: u64) -> Result<Vec<ManagedResource>, ManifestError> {
        let rendered: Vec<ManagedResource> = self
            .resources
            .iter()
            .map(|r| ManagedResource {
                id: ResourceId::rendered(&self.name, &r.id),
                spec: r.spec.clone(),
                restart_on: r
                    .restart_on
                    .iter()
                    .map(|t| ResourceId::rendered(&self.name, t))
                    .collect(),
                source: Some(ResourceSource {
                    deployment: self.name.clone(),
                    revision,
                }),
            })
            .collect();
        let scratch = crate::AgentManifest {
            agent_id: AgentId::new("scratch").expect("valid id"),
            generation: 0,
            resources: rendered,
            signatures: Vec::new(),
        };
        scratch.validate()?;
        Ok(scratch.resources)
    }
}

impl Serialize for Deployment {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WireDeployment {
            api_version: API_VERSION.to_owned(),
            kind: deployment_kind(),
            name: self.name.clone(),
            selector: self.selector.clone(),
            resources: self
                .resources
                .iter()
                .map(|r| WireResource {
                    id: r.id.to_string(),
                    kind: r.spec.kind_str().to_owned(),
                    spec: r.spec.normalised(),
                    restart_on: r.restart_on.iter().map(ToString::to_string).collect(),
                    source: None,
                })
                .collect(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Deployment {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::from_value(serde_json::Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Render results the control plane publishes in `deployment-status.<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    pub api_version: ApiVersion,
    pub name: DeploymentName,
    /// KV revision of `deployments.<name>` these results are for.
    pub observed_revision: u64,
    /// Revision at which the control plane first saw this deployment; orders
    /// deployments for conflict resolution (earliest keeps a contested target).
    pub created_revision: u64,
    /// Selected agents → generation of their manifest carrying this revision.
    pub targets: BTreeMap<AgentId, u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<Conflict>,
    /// Set when the stored document could not be read; nothing is rendered from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A resource left out of an agent's manifest because an earlier deployment
/// already manages the same target there.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Conflict {
    pub agent: AgentId,
    pub resource: ResourceId,
    pub held_by: ResourceId,
    pub target: String,
}

impl DeploymentStatus {
    pub fn target_agents(&self) -> BTreeSet<&AgentId> {
        self.targets.keys().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(resources: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": API_VERSION, "kind": "Deployment", "name": "web",
               "selector": {"matchLabels": {"role": "edge"}}, "resources": resources})
    }

    #[test]
    fn renders_ids_and_sources() {
        let d = Deployment::from_value(doc(json!([
            {"id": "conf", "kind": "File", "spec": {"path": "/etc/w", "content": "x"}},
            {"id": "svc", "kind": "SystemdUnit", "spec": {"unit": "w.service"}, "restartOn": ["conf"]}
        ])))
        .unwrap();
        let r = d.render_resources(7).unwrap();
        assert_eq!(r[1].id.as_str(), "web/svc");
        assert_eq!(r[1].restart_on[0].as_str(), "web/conf");
        assert_eq!(r[0].source.as_ref().unwrap().revision, 7);
        let again = Deployment::from_json(&d.to_json()).unwrap();
        assert_eq!(again, d);
    }

    #[test]
    fn refuses_what_an_operator_must_fix() {
        let unknown = doc(json!([{"id": "x", "kind": "Firmware", "spec": {}}]));
        assert!(matches!(
            Deployment::from_value(unknown),
            Err(DeploymentError::UnsupportedResource { .. })
        ));
        let mut empty = doc(json!([]));
        empty["selector"] = json!({});
        assert!(matches!(
            Deployment::from_value(empty),
            Err(DeploymentError::EmptySelector)
        ));
        let bad_restart = doc(
            json!([{"id": "x", "kind": "File", "spec": {"path": "/a", "content": ""}, "restartOn": ["y"]}]),
        );
        assert!(matches!(
            Deployment::from_value(bad_restart),
            Err(DeploymentError::Resource(
                ManifestError::InvalidRestartOn { .. }
            ))
        ));
        let typo = json!({"apiVersion": API_VERSION, "name": "a", "selectr": {}, "selector": {"agents": ["a"]}});
        assert!(matches!(
            Deployment::from_value(typo),
            Err(DeploymentError::InvalidDocument { .. })
        ));
    }

    #[test]
    fn selector_semantics() {
        let a = AgentId::new("a").unwrap();
        let labels: BTreeMap<_, _> = [("role".to_owned(), "edge".to_owned())].into();
        let by_label = Selector {
            agents: vec![],
            match_labels: labels.clone(),
        };
        assert!(by_label.selects(&a, &labels));
        assert!(!by_label.selects(&a, &BTreeMap::new()));
        let by_id = Selector {
            agents: vec![a.clone()],
            match_labels: BTreeMap::new(),
        };
        assert!(by_id.selects(&a, &BTreeMap::new()));
        assert!(!Selector::default().selects(&a, &labels));
    }
}
