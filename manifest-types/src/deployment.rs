//! Fleet-level intent: a [`Deployment`] (operator-written, `deployments.<name>`)
//! selects agents and lists resources; the control plane renders it into
//! every selected agent's manifest and reports [`DeploymentStatus`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ids::{AgentId, DeploymentName, LocalId, ResourceId};
use crate::inventory::validate_label;
use crate::manifest::{ManagedResource, ManifestError, ResourceSource, WireResource};
use crate::rollout::{RolloutPolicy, RolloutStatus};
pub use crate::selector::Selector;
use crate::spec::ResourceSpec;
use crate::template;
use crate::{API_VERSION, ApiVersion};

#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    pub name: DeploymentName,
    pub selector: Selector,
    pub resources: Vec<DeploymentResource>,
    /// How a new revision reaches the targets (docs/adr/0016); None: the
    /// fleet default (`settings.rollout`), or all at once.
    pub rollout: Option<RolloutPolicy>,
    /// Who made this revision and why, as the CLI records it; shown by
    /// `flotilla rollout history`, ignored by the render.
    pub change: Option<ChangeNote>,
}

/// Who changed a deployment, and why (`flotilla apply --cause`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChangeNote {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentResource {
    pub id: LocalId,
    /// The spec; for a templated resource, rendered for a stand-in agent
    /// ([`template::sample`]), which checks it against the kind's rules.
    pub spec: ResourceSpec,
    pub restart_on: Vec<LocalId>,
    /// The spec as written, when a string in it references the agent
    /// (`${agent.id}`, `${labels.k}`, `${values.k}`; docs/adr/0014): the
    /// control plane renders it for each agent.
    pub template: Option<serde_json::Value>,
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
    #[error("invalid rollout policy: {0}")]
    Rollout(String),
    #[error("resource {resource:?}: {error}")]
    Template {
        resource: String,
        #[source]
        error: template::SyntaxError,
    },
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rollout: Option<RolloutPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    change: Option<ChangeNote>,
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
        if let Some(p) = &wire.rollout {
            p.validate().map_err(DeploymentError::Rollout)?;
        }
        let mut resources = Vec::new();
        for mut w in wire.resources {
            let id = LocalId::new(w.id.clone()).map_err(|e| invalid(e.to_string()))?;
            let template = template::has_templates(&w.spec).then(|| w.spec.clone());
            if let Some(t) = &template {
                w.spec = template::sample(t).map_err(|error| DeploymentError::Template {
                    resource: id.to_string(),
                    error,
                })?;
            }
            // Reuse the manifest rules (spec parse, restartOn, collisions) by
            // rendering into a scratch manifest. A templated spec is checked
            // for its shape here and in full for each agent it is rendered for.
            let r = if template.is_some() {
                ManagedResource::from_wire_shape(w)?
            } else {
                ManagedResource::from_wire(w)?
            };
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
                template,
            });
        }
        let d = Deployment {
            name: wire.name,
            selector: wire.selector,
            resources,
            rollout: wire.rollout,
            change: wire.change,
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

    /// Whether `other` asks for the same thing: equal but for the
    /// [`ChangeNote`] (re-applying a document unchanged is no new revision).
    pub fn same_intent(&self, other: &Deployment) -> bool {
        self.name == other.name
            && self.selector == other.selector
            && self.resources == other.resources
            && self.rollout == other.rollout
    }

    /// Whether any resource references the agent it is rendered for, so
    /// each agent needs [`Self::render_for`].
    pub fn is_templated(&self) -> bool {
        self.resources.iter().any(|r| r.template.is_some())
    }

    /// The resources as they appear in an agent manifest: ids
    /// `<deployment>/<local-id>`, each naming this deployment and `revision`.
    /// Fails on the same cross-resource rules as a manifest. Templated
    /// resources appear as rendered for the stand-in agent; use
    /// [`Self::render_for`] for a real one.
    pub fn render_resources(&self, revision: u64) -> Result<Vec<ManagedResource>, ManifestError> {
        let rendered: Vec<ManagedResource> = self
            .resources
            .iter()
            .map(|r| self.managed(r, r.spec.clone(), revision))
            .collect();
        self.checked(rendered)
    }

    /// The resources rendered for one agent: every reference replaced by the
    /// agent's own value. Fails as a whole — never half-rendered — when a
    /// reference has no value for this agent or the rendered spec breaks its
    /// kind's rules.
    pub fn render_for(
        &self,
        revision: u64,
        ctx: &template::Context<'_>,
    ) -> Result<Vec<ManagedResource>, RenderError> {
        let mut rendered = Vec::with_capacity(self.resources.len());
        for r in &self.resources {
            let spec = match &r.template {
                None => r.spec.clone(),
                Some(t) => {
                    let failed = |message: String| RenderError {
                        resource: ResourceId::rendered(&self.name, &r.id),
                        message,
                    };
                    let expanded =
                        template::expand_value(t, ctx).map_err(|e| failed(e.to_string()))?;
                    ResourceSpec::from_parts(r.spec.kind_str(), expanded)
                        .map_err(|e| failed(e.to_string()))?
                }
            };
            rendered.push(self.managed(r, spec, revision));
        }
        self.checked(rendered).map_err(|e| RenderError {
            resource: ResourceId::rendered(&self.name, &self.resources[0].id),
            message: e.to_string(),
        })
    }

    fn managed(
        &self,
        r: &DeploymentResource,
        spec: ResourceSpec,
        revision: u64,
    ) -> ManagedResource {
        ManagedResource {
            id: ResourceId::rendered(&self.name, &r.id),
            spec,
            restart_on: r
                .restart_on
                .iter()
                .map(|t| ResourceId::rendered(&self.name, t))
                .collect(),
            source: Some(ResourceSource {
                deployment: self.name.clone(),
                revision,
            }),
        }
    }

    fn checked(
        &self,
        rendered: Vec<ManagedResource>,
    ) -> Result<Vec<ManagedResource>, ManifestError> {
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
                    spec: r.template.clone().unwrap_or_else(|| r.spec.normalised()),
                    restart_on: r.restart_on.iter().map(ToString::to_string).collect(),
                    source: None,
                })
                .collect(),
            rollout: self.rollout.clone(),
            change: self.change.clone(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Deployment {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::from_value(serde_json::Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Why a templated deployment could not be rendered for one agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {message}")]
pub struct RenderError {
    pub resource: ResourceId,
    pub message: String,
}

/// An agent the deployment selects but could not be rendered for: it keeps
/// what it runs of this deployment (the resources of its last good render)
/// until its values are fixed (docs/adr/0014).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RenderFailure {
    pub agent: AgentId,
    pub resource: ResourceId,
    pub message: String,
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
    /// Selected agents whose render of this revision failed (a reference
    /// without a value for them, or a rendered spec that breaks its kind's
    /// rules). They are in `targets` too, with the generation that keeps
    /// their last good render of this deployment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub render_failures: Vec<RenderFailure>,
    /// Set when the stored document could not be read; nothing is rendered from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The staged rollout of `observedRevision`, when a policy applies
    /// (docs/adr/0016); absent: every target gets each revision at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// Targets a rollout keeps on another revision than `observedRevision`
    /// (their wave is not released yet, or the rollout rolled back), with
    /// the revision their manifest carries (`null`: none of this deployment
    /// yet). Their `targets` generation carries that revision.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub held_back: BTreeMap<AgentId, Option<u64>>,
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
    fn templated_resources_keep_their_template_and_render_per_agent() {
        let d = Deployment::from_value(doc(json!([
            {"id": "conf", "kind": "File", "spec": {"path": "${values.dir}/${agent.id}.conf", "content": "site=${labels.site}"}},
            {"id": "plain", "kind": "File", "spec": {"path": "/etc/plain", "content": "x"}}
        ])))
        .expect("a value at the start of a path is checked per agent");
        assert!(d.is_templated());
        // The stored document keeps the references as written.
        let wire: serde_json::Value = serde_json::from_slice(&d.to_json()).unwrap();
        assert_eq!(
            wire["resources"][0]["spec"]["path"],
            "${values.dir}/${agent.id}.conf"
        );
        assert_eq!(Deployment::from_json(&d.to_json()).unwrap(), d);
        let a = AgentId::new("pi-1").unwrap();
        let labels = [("site".to_owned(), "s1".to_owned())].into();
        let values = [("dir".to_owned(), "/srv".to_owned())].into();
        let ctx = template::Context {
            agent: &a,
            labels: &labels,
            values: &values,
        };
        let r = d.render_for(5, &ctx).unwrap();
        assert_eq!(r[0].spec.target().unwrap().1, "/srv/pi-1.conf");
        assert_eq!(r[1].spec.target().unwrap().1, "/etc/plain");
        let bad = [("dir".to_owned(), "srv".to_owned())].into();
        let e = d
            .render_for(
                5,
                &template::Context {
                    values: &bad,
                    ..ctx
                },
            )
            .unwrap_err();
        assert_eq!(e.resource.as_str(), "web/conf");
        assert!(e.message.contains("absolute"), "{e}");
    }

    #[test]
    fn resources_that_differ_only_in_their_references_are_not_one_target() {
        let d = Deployment::from_value(doc(json!([
            {"id": "a", "kind": "File", "spec": {"path": "/etc/app/${values.a}.conf", "content": ""}},
            {"id": "b", "kind": "File", "spec": {"path": "/etc/app/${values.b}.conf", "content": ""}}
        ])));
        assert!(d.is_ok(), "{d:?}");
        // The same template twice is one target on every agent.
        let same = Deployment::from_value(doc(json!([
            {"id": "a", "kind": "File", "spec": {"path": "/etc/${agent.id}", "content": ""}},
            {"id": "b", "kind": "File", "spec": {"path": "/etc/${agent.id}", "content": ""}}
        ])));
        assert!(same.is_err());
    }

    #[test]
    fn malformed_references_reject_the_document() {
        for spec in [
            json!({"path": "/etc/${agent.id", "content": ""}),
            json!({"path": "/etc/${agent.hostname}", "content": ""}),
            json!({"path": "/etc/x", "content": "${values.}"}),
        ] {
            let e = Deployment::from_value(doc(json!([{"id": "f", "kind": "File", "spec": spec}])))
                .unwrap_err();
            assert!(matches!(e, DeploymentError::Template { .. }), "{e}");
        }
    }

    #[test]
    fn selector_semantics() {
        let a = AgentId::new("a").unwrap();
        let labels: BTreeMap<_, _> = [("role".to_owned(), "edge".to_owned())].into();
        let by_label = Selector {
            agents: vec![],
            match_labels: labels.clone(),
            device_labels: false,
        };
        assert!(by_label.selects(&a, &labels));
        assert!(!by_label.selects(&a, &BTreeMap::new()));
        let by_id = Selector {
            agents: vec![a.clone()],
            match_labels: BTreeMap::new(),
            device_labels: false,
        };
        assert!(by_id.selects(&a, &BTreeMap::new()));
        assert!(!Selector::default().selects(&a, &labels));

        // Reported labels count only with deviceLabels, under the operator's.
        let none = BTreeMap::new();
        assert!(!by_label.selects_agent(&a, &none, &labels));
        assert!(by_label.selects_agent(&a, &labels, &none));
        let hints = Selector {
            device_labels: true,
            ..by_label.clone()
        };
        assert!(hints.selects_agent(&a, &none, &labels));
        let operator: BTreeMap<_, _> = [("role".to_owned(), "core".to_owned())].into();
        assert!(
            !hints.selects_agent(&a, &operator, &labels),
            "the operator's label wins"
        );
        assert!(by_id.selects_agent(&a, &none, &none));
    }
}
