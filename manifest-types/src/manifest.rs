//! The per-device document: [`AgentManifest`], its resources, the typed
//! rejections an agent may answer it with, and the signed-document format.
//!
//! Parsing is in two stages so every rejection has a class: the `apiVersion`
//! is probed first (unknown → [`ManifestError::UnsupportedApiVersion`]), then
//! the document is read, then each resource's spec is parsed with the
//! forward-compatibility rules of [`crate::spec`], then cross-resource rules
//! are checked ([`AgentManifest::validate`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::API_VERSION;
use crate::canonical::canonical_json;
use crate::ids::{AgentId, DeploymentName, ResourceId};
use crate::spec::{ResourceSpec, SpecError};

/// What an agent must converge to. Written by the control plane to
/// `desired-state.<agent-id>`; never deleted, generation strictly increasing.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentManifest {
    pub agent_id: AgentId,
    pub generation: u64,
    pub resources: Vec<ManagedResource>,
    /// Signatures over the canonical form of the rest of the document
    /// (docs/adr/0004-signed-document-format.md). Verified by agents that are
    /// configured with trusted keys.
    pub signatures: Vec<Signature>,
}

/// One resource of a manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedResource {
    pub id: ResourceId,
    pub spec: ResourceSpec,
    /// Ids of resources of the same manifest whose change restarts this one.
    pub restart_on: Vec<ResourceId>,
    /// The deployment (and its KV revision) this resource was rendered from.
    pub source: Option<ResourceSource>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ResourceSource {
    pub deployment: DeploymentName,
    pub revision: u64,
}

/// An ed25519 signature by a key in NATS nkey encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Signature {
    /// Public nkey of the signer (e.g. `O…` operator or `A…` account key).
    pub key_id: String,
    /// Base64url (no padding) ed25519 signature over [`AgentManifest::signing_input`].
    pub sig: String,
}

/// The largest generation a manifest may carry: 2^53 - 1, the largest
/// integer every JSON reader (a browser's too) holds exactly. It also keeps
/// a hostile writer from pushing a fleet's generations to where `+ 1`
/// overflows.
pub const MAX_GENERATION: u64 = (1 << 53) - 1;

/// A generation-valued top-level `field` of a document that need not parse
/// as its full type (a rejected manifest, any version of a status): `None`
/// when absent, not an unsigned integer, or above [`MAX_GENERATION`] — a
/// generation no manifest may carry is never believed.
pub fn probe_generation(doc: &serde_json::Value, field: &str) -> Option<u64> {
    doc.get(field)?.as_u64().filter(|&g| g <= MAX_GENERATION)
}

/// Why a manifest was not accepted. [`ManifestError::reason`] is the stable
/// code written into status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    #[error("not valid JSON: {message}")]
    MalformedJson { message: String },
    #[error("unsupported apiVersion {found:?} (this agent speaks {API_VERSION:?})")]
    UnsupportedApiVersion { found: String },
    #[error("invalid manifest: {message}")]
    InvalidDocument { message: String },
    #[error("resource {resource:?}: {error}")]
    InvalidSpec { resource: String, error: SpecError },
    #[error("resource id {id:?} appears more than once")]
    DuplicateResourceId { id: ResourceId },
    #[error("generation {generation} is above the largest allowed, {MAX_GENERATION}")]
    InvalidGeneration { generation: u64 },
    #[error(
        "resource {resource}: restartOn names {target:?}, which is not another resource of this manifest"
    )]
    InvalidRestartOn {
        resource: ResourceId,
        target: ResourceId,
    },
    #[error("resources {first} and {second} both manage {what} {name:?}")]
    DuplicateTarget {
        what: &'static str,
        name: String,
        first: ResourceId,
        second: ResourceId,
    },
}

impl ManifestError {
    /// The rejection reason in status.
    pub fn reason(&self) -> crate::RejectionReason {
        use crate::RejectionReason as R;
        match self {
            Self::MalformedJson { .. } => R::MalformedJson,
            Self::UnsupportedApiVersion { .. } => R::UnsupportedApiVersion,
            Self::InvalidDocument { .. } => R::InvalidDocument,
            Self::InvalidSpec { error, .. } => error.reason(),
            Self::DuplicateResourceId { .. } => R::DuplicateResourceId,
            Self::InvalidGeneration { .. } => R::InvalidGeneration,
            Self::InvalidRestartOn { .. } => R::InvalidRestartOn,
            Self::DuplicateTarget { .. } => R::DuplicateTarget,
        }
    }
}

// The wire shapes. Resources keep `spec` as raw JSON until their kind is known.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiVersionProbe {
    api_version: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireManifest {
    api_version: String,
    agent_id: AgentId,
    generation: u64,
    #[serde(default)]
    resources: Vec<WireResource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    signatures: Vec<Signature>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WireResource {
    pub id: String,
    pub kind: String,
    pub spec: serde_json::Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ResourceSource>,
}

fn invalid(message: impl ToString) -> ManifestError {
    ManifestError::InvalidDocument {
        message: message.to_string(),
    }
}

impl AgentManifest {
    /// An empty manifest: everything this agent manages is to be removed.
    pub fn empty(agent_id: AgentId, generation: u64) -> Self {
        Self {
            agent_id,
            generation,
            resources: Vec::new(),
            signatures: Vec::new(),
        }
    }

    /// Parses and validates a manifest exactly as an agent does.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::MalformedJson {
                message: e.to_string(),
            })?;
        let probe: ApiVersionProbe = serde_json::from_value(value.clone()).map_err(invalid)?;
        if probe.api_version != API_VERSION {
            return Err(ManifestError::UnsupportedApiVersion {
                found: probe.api_version,
            });
        }
        let wire: WireManifest = serde_json::from_value(value).map_err(invalid)?;
        let resources = wire
            .resources
            .into_iter()
            .map(ManagedResource::from_wire)
            .collect::<Result<Vec<_>, _>>()?;
        let manifest = Self {
            agent_id: wire.agent_id,
            generation: wire.generation,
            resources,
            signatures: wire.signatures,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// Serialises to the wire form (plain JSON, camelCase).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_wire()).expect("manifest serialises")
    }

    fn to_wire(&self) -> WireManifest {
        WireManifest {
            api_version: API_VERSION.to_owned(),
            agent_id: self.agent_id.clone(),
            generation: self.generation,
            resources: self
                .resources
                .iter()
                .map(ManagedResource::to_wire)
                .collect(),
            signatures: self.signatures.clone(),
        }
    }

    /// The bytes a signature covers: the RFC 8785 canonical JSON of the
    /// document without its `signatures` field.
    pub fn signing_input(&self) -> Vec<u8> {
        let mut wire = self.to_wire();
        wire.signatures.clear();
        let value = serde_json::to_value(&wire).expect("manifest serialises");
        canonical_json(&value).into_bytes()
    }

    /// Cross-resource rules: unique ids, restartOn targets that exist, no two
    /// resources managing the same file path, unit or container.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.generation > MAX_GENERATION {
            return Err(ManifestError::InvalidGeneration {
                generation: self.generation,
            });
        }
        let mut ids = BTreeSet::new();
        for r in &self.resources {
            if !ids.insert(&r.id) {
                return Err(ManifestError::DuplicateResourceId { id: r.id.clone() });
            }
        }
        let mut targets: BTreeMap<(&'static str, String), &ResourceId> = BTreeMap::new();
        for r in &self.resources {
            for t in &r.restart_on {
                if t == &r.id || !ids.contains(t) {
                    return Err(ManifestError::InvalidRestartOn {
                        resource: r.id.clone(),
                        target: t.clone(),
                    });
                }
            }
            if let Some(target) = r.spec.target()
                && let Some(first) = targets.insert(target.clone(), &r.id)
            {
                return Err(ManifestError::DuplicateTarget {
                    what: target.0,
                    name: target.1,
                    first: first.clone(),
                    second: r.id.clone(),
                });
            }
        }
        Ok(())
    }

    pub fn resource(&self, id: &ResourceId) -> Option<&ManagedResource> {
        self.resources.iter().find(|r| &r.id == id)
    }
}

impl ResourceSpec {
    /// The host object a resource manages, for collision checks: ("file",
    /// path), ("unit", name). Containers are found by labels, never by name,
    /// so they cannot collide.
    pub fn target(&self) -> Option<(&'static str, String)> {
        match self {
            ResourceSpec::File(f) => Some(("file", f.path.clone())),
            ResourceSpec::SystemdUnit(u) => Some(("unit", u.unit.as_str().to_owned())),
            ResourceSpec::Container(_) | ResourceSpec::Unsupported(_) => None,
        }
    }
}

impl ManagedResource {
    fn from_wire_with(
        w: WireResource,
        parse: fn(&str, serde_json::Value) -> Result<ResourceSpec, crate::SpecError>,
    ) -> Result<Self, ManifestError> {
        let id = ResourceId::new(w.id).map_err(invalid)?;
        let spec = parse(&w.kind, w.spec).map_err(|error| ManifestError::InvalidSpec {
            resource: id.to_string(),
            error,
        })?;
        let restart_on = w
            .restart_on
            .into_iter()
            .map(ResourceId::new)
            .collect::<Result<_, _>>()
            .map_err(invalid)?;
        Ok(Self {
            id,
            spec,
            restart_on,
            source: w.source,
        })
    }

    pub(crate) fn from_wire(w: WireResource) -> Result<Self, ManifestError> {
        Self::from_wire_with(w, ResourceSpec::from_parts)
    }

    /// [`Self::from_wire`] checking only the spec's shape (see
    /// [`ResourceSpec::shape`]).
    pub(crate) fn from_wire_shape(w: WireResource) -> Result<Self, ManifestError> {
        Self::from_wire_with(w, ResourceSpec::shape)
    }

    pub(crate) fn to_wire(&self) -> WireResource {
        WireResource {
            id: self.id.to_string(),
            kind: self.spec.kind_str().to_owned(),
            spec: self.spec.normalised(),
            restart_on: self.restart_on.iter().map(ToString::to_string).collect(),
            source: self.source.clone(),
        }
    }

    /// SHA-256 (hex) of the canonical `{kind, spec}` with defaults omitted:
    /// equal for specs that mean the same thing.
    pub fn spec_hash(&self) -> String {
        let v = serde_json::json!({ "kind": self.spec.kind_str(), "spec": self.spec.normalised() });
        hex(&Sha256::digest(canonical_json(&v).as_bytes()))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Serialize for AgentManifest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_wire().serialize(s)
    }
}

impl<'de> Deserialize<'de> for AgentManifest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        let bytes = serde_json::to_vec(&value).map_err(serde::de::Error::custom)?;
        Self::from_json(&bytes).map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "schema")]
mod schema {
    //! JSON Schema for the manifest, via schema-only mirror types that show
    //! the `{kind, spec}` pairing the custom serde impls implement.
    use super::*;
    use crate::ApiVersion;
    use crate::spec::{ContainerSpec, FileSpec, SystemdUnitSpec};
    use schemars::JsonSchema;

    #[derive(JsonSchema)]
    #[serde(tag = "kind", content = "spec")]
    #[allow(dead_code)]
    pub(crate) enum KindAndSpec {
        File(FileSpec),
        Container(ContainerSpec),
        SystemdUnit(SystemdUnitSpec),
    }

    #[derive(JsonSchema)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct ManagedResourceSchema {
        id: ResourceId,
        #[serde(flatten)]
        spec: KindAndSpec,
        #[serde(default)]
        restart_on: Vec<ResourceId>,
        source: Option<ResourceSource>,
    }

    #[derive(JsonSchema)]
    #[serde(rename_all = "camelCase")]
    #[schemars(rename = "AgentManifest")]
    #[allow(dead_code)]
    struct AgentManifestSchema {
        api_version: ApiVersion,
        agent_id: AgentId,
        generation: u64,
        resources: Vec<ManagedResourceSchema>,
        #[serde(default)]
        signatures: Vec<Signature>,
    }

    impl JsonSchema for AgentManifest {
        fn schema_name() -> std::borrow::Cow<'static, str> {
            "AgentManifest".into()
        }
        fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
            AgentManifestSchema::json_schema(g)
        }
    }
}
#[cfg(feature = "schema")]
pub(crate) use schema::KindAndSpec;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn generations_are_probed_from_documents_that_do_not_fully_parse() {
        let doc = json!({"apiVersion": "flotilla.dev/v9", "generation": 41, "x": {}});
        assert_eq!(probe_generation(&doc, "generation"), Some(41));
        assert_eq!(probe_generation(&doc, "missing"), None);
        assert_eq!(
            probe_generation(&json!({"generation": -1}), "generation"),
            None
        );
        assert_eq!(
            probe_generation(&json!({"generation": "7"}), "generation"),
            None
        );
        let max = json!({"generation": MAX_GENERATION});
        assert_eq!(probe_generation(&max, "generation"), Some(MAX_GENERATION));
        let above = json!({"generation": MAX_GENERATION + 1});
        assert_eq!(probe_generation(&above, "generation"), None);
    }

    fn manifest(resources: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": API_VERSION, "agentId": "pi-1", "generation": 3, "resources": resources
        }))
        .unwrap()
    }

    #[test]
    fn parses_and_round_trips() {
        let bytes = manifest(json!([
            {"id": "web/conf", "kind": "File", "spec": {"path": "/etc/x", "content": "a"}},
            {"id": "web/svc", "kind": "Gizmo", "spec": {"a": 1}, "restartOn": ["web/conf"]}
        ]));
        let m = AgentManifest::from_json(&bytes).unwrap();
        assert_eq!(m.generation, 3);
        assert!(matches!(m.resources[1].spec, ResourceSpec::Unsupported(_)));
        let again = AgentManifest::from_json(&m.to_json()).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn rejection_classes() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{not json".to_vec(), "MalformedJson"),
            (
                br#"{"apiVersion":"flotilla.dev/v9","agentId":"a","generation":1}"#.to_vec(),
                "UnsupportedApiVersion",
            ),
            (
                br#"{"agentId":"a","generation":1}"#.to_vec(),
                "InvalidDocument",
            ),
            (
                br#"{"apiVersion":"flotilla.dev/v1","agentId":"a","generation":9007199254740992}"#
                    .to_vec(),
                "InvalidGeneration",
            ),
            (
                br#"{"apiVersion":"flotilla.dev/v1","agentId":"A!","generation":1}"#.to_vec(),
                "InvalidDocument",
            ),
            (
                manifest(
                    json!([{"id": "a", "kind": "File", "spec": {"path": "x", "content": ""}}]),
                ),
                "InvalidPath",
            ),
            (
                manifest(json!([
                    {"id": "a", "kind": "File", "spec": {"path": "/x", "content": ""}},
                    {"id": "a", "kind": "File", "spec": {"path": "/y", "content": ""}}
                ])),
                "DuplicateResourceId",
            ),
            (
                manifest(json!([
                    {"id": "a", "kind": "File", "spec": {"path": "/x", "content": ""}},
                    {"id": "b", "kind": "File", "spec": {"path": "/x", "content": ""}}
                ])),
                "DuplicateTarget",
            ),
            (
                manifest(
                    json!([{"id": "a", "kind": "File", "spec": {"path": "/x", "content": ""}, "restartOn": ["zz"]}]),
                ),
                "InvalidRestartOn",
            ),
        ];
        for (bytes, reason) in cases {
            let err = AgentManifest::from_json(&bytes).unwrap_err();
            assert_eq!(
                err.reason(),
                reason,
                "{}: {err}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    #[test]
    fn spec_hash_ignores_defaults_and_key_order() {
        let a =
            manifest(json!([{"id": "a", "kind": "File", "spec": {"path": "/x", "content": "1"}}]));
        let b = manifest(
            json!([{"id": "a", "kind": "File", "spec": {"mode": "0644", "content": "1", "path": "/x"}}]),
        );
        let c =
            manifest(json!([{"id": "a", "kind": "File", "spec": {"path": "/x", "content": "2"}}]));
        let h = |b: &[u8]| AgentManifest::from_json(b).unwrap().resources[0].spec_hash();
        assert_eq!(h(&a), h(&b));
        assert_ne!(h(&a), h(&c));
        assert_eq!(h(&a).len(), 64);
    }

    #[test]
    fn signing_input_excludes_signatures_and_is_canonical() {
        let mut m = AgentManifest::from_json(&manifest(json!([]))).unwrap();
        let before = m.signing_input();
        m.signatures.push(Signature {
            key_id: "OABC".into(),
            sig: "x".into(),
        });
        assert_eq!(m.signing_input(), before);
        assert_eq!(
            String::from_utf8(before).unwrap(),
            r#"{"agentId":"pi-1","apiVersion":"flotilla.dev/v1","generation":3,"resources":[]}"#
        );
    }
}
