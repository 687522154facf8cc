//! # manifest-types — Flotilla's wire contract
//!
//! Everything that crosses NATS between operator, control plane and agents,
//! as typed Rust values with their exact JSON shape. No I/O, no async.
//!
//! The design as a whole (the loop, the KV layout, who writes what, the
//! guarantees): `docs/ARCHITECTURE.md`.
//!
//! ## Tour
//! - [`ids`]: validated newtypes ([`AgentId`], [`DeploymentName`],
//!   [`ResourceId`], …) that validate on deserialize too.
//! - [`keys`]: KV key names and subjects, the only place they are spelled,
//!   and [`keys::device_permissions`], the subjects one device may use.
//! - [`spec`]: per-kind resource specs, one file each ([`FileSpec`],
//!   [`ContainerSpec`], [`SystemdUnitSpec`] with its run states
//!   [`spec::UnitState`]) and the forward-compatible parse into
//!   [`ResourceSpec`].
//! - [`manifest`]: [`AgentManifest`] (`desired-state.<id>`), typed
//!   [`ManifestError`] rejections, spec hashes and the signing input.
//! - [`status`]: [`AgentStatus`] (`actual-state.<id>`), per-resource
//!   [`ResourceStatus`] and [`Condition`]s.
//! - [`convergence`]: the one convergence rule — [`convergence::assess`]
//!   turns a status, a target and the heartbeat's server-time age into the
//!   [`convergence::State`] an operator sees (ADR 0010). Every reader uses it.
//! - [`reason`]: the typed reason codes — [`FailureReason`] (resources not
//!   Ready), [`RejectionReason`] (manifests not accepted), [`ReleaseReason`]
//!   (dropped resources left in place); strings on the wire, so newer codes
//!   never break a reader (ADR 0018).
//! - [`inventory`]: [`AgentInventory`] (`agents.<id>`, with which engines
//!   answer) and [`Heartbeat`].
//! - [`deployment`]: [`Deployment`] (`deployments.<name>`) and
//!   [`DeploymentStatus`] (`deployment-status.<name>`); [`selector`]:
//!   [`Selector`], which agents a deployment or a rollout wave selects.
//! - [`rollout`]: staged rollouts (ADR 0016) — the operator's
//!   [`rollout::RolloutPolicy`] (in a deployment, or `settings.rollout`),
//!   the pause switch [`rollout::RolloutControl`] (`rollouts.<name>`), the
//!   control plane's [`rollout::RolloutStatus`] and the history records
//!   [`rollout::RevisionRecord`] (`revisions.<name>.<revision>`).
//! - [`signing`]: ed25519 (nkeys) signatures over a manifest's canonical
//!   form — [`signing::SigningKeys`] (the control plane's keys, several
//!   while rotating), [`signing::Trust`] / [`signing::verify`] (what an
//!   agent accepts) with typed `Unsigned`/`UntrustedKey`/`BadSignature`
//!   reasons (ADR 0004, 0017).
//! - [`diff`]: what one revision of a deployment changes from another,
//!   field by field (`flotilla diff`, history summaries).
//! - [`template`]: per-device references in deployment specs
//!   (`${agent.id}`, `${labels.k}`, `${values.k}`) and their expansion;
//!   [`AgentValues`] (`values.<id>`) holds an agent's operator-set values.
//!
//! Every document carries `apiVersion: flotilla.dev/v1`; field names are
//! camelCase. Golden files under `tests/golden/` pin the JSON shape, and the
//! `schema` feature derives JSON Schemas (checked in under `docs/schema/`).

pub mod canonical;
pub mod convergence;
pub mod deployment;
pub mod diff;
pub mod ids;
pub mod inventory;
pub mod keys;
pub mod lease;
pub mod manifest;
pub mod reason;
pub mod rollout;
pub mod selector;
pub mod signing;
pub mod spec;
pub mod status;
pub mod template;

pub use deployment::{
    ChangeNote, Conflict, Deployment, DeploymentError, DeploymentResource, DeploymentStatus,
    RenderError, RenderFailure, Selector,
};
pub use ids::{AgentId, BucketName, DeploymentName, IdError, LocalId, ResourceId};
pub use inventory::{AgentInventory, EngineStatus, Heartbeat, HeartbeatSettings};
pub use manifest::{AgentManifest, ManagedResource, ManifestError, ResourceSource, Signature};
pub use reason::{FailureReason, RejectionReason, ReleaseReason};
pub use spec::{
    ContainerSpec, FileMode, FileSpec, ResourceKind, ResourceSpec, SpecError, SystemdUnitSpec,
    UnitName,
};
pub use status::{
    AgentBuild, AgentStatus, Condition, ConditionType, ReadyDetails, Rejection, ReleasedResource,
    RemovingResource, ResourceState, ResourceStatus, UnitRun,
};
pub use template::AgentValues;

/// The one API version this build speaks.
pub const API_VERSION: &str = "flotilla.dev/v1";

/// The `apiVersion` field of every document other than the manifest (which
/// probes it by hand to reject unknown versions with their own class).
/// Serialises as [`API_VERSION`]; any other value fails to deserialize.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiVersion;

impl serde::Serialize for ApiVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(API_VERSION)
    }
}

impl<'de> serde::Deserialize<'de> for ApiVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s == API_VERSION {
            Ok(ApiVersion)
        } else {
            Err(serde::de::Error::custom(format!(
                "unsupported apiVersion {s:?} (expected {API_VERSION:?})"
            )))
        }
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for ApiVersion {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ApiVersion".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "const": API_VERSION })
    }
}

#[cfg(feature = "schema")]
mod deployment_schema {
    use super::*;
    use schemars::JsonSchema;

    #[derive(JsonSchema)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct DeploymentResourceSchema {
        id: LocalId,
        #[serde(flatten)]
        spec: manifest::KindAndSpec,
        #[serde(default)]
        restart_on: Vec<LocalId>,
    }

    #[derive(JsonSchema)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    #[allow(dead_code)]
    struct DeploymentSchema {
        api_version: ApiVersion,
        /// Always "Deployment".
        #[serde(default)]
        kind: Option<String>,
        name: DeploymentName,
        selector: Selector,
        resources: Vec<DeploymentResourceSchema>,
        #[serde(default)]
        rollout: Option<rollout::RolloutPolicy>,
        #[serde(default)]
        change: Option<ChangeNote>,
    }

    impl JsonSchema for Deployment {
        fn schema_name() -> std::borrow::Cow<'static, str> {
            "Deployment".into()
        }
        fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
            DeploymentSchema::json_schema(g)
        }
    }
}
