//! The Container kind: [`ContainerSpec`] and its parts (ports, volumes,
//! restart and pull policies, network mode, healthcheck).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{SpecError, is_default, is_false, validate_abs_path};

/// A container run through the local Docker Engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ContainerSpec {
    /// Image reference, e.g. `registry.local:5000/app:1.2`.
    pub image: String,
    /// Optional digest pin, `sha256:<64 hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Overrides the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Overrides the image's cmd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub restart_policy: RestartPolicy,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// CPU limit in thousandths of a CPU (1000 = one core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit_millis: Option<u32>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub pull_policy: PullPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub network_mode: NetworkMode,
    /// Refused unless the agent's own config allows privileged containers.
    #[serde(default, skip_serializing_if = "is_false")]
    pub privileged: bool,
    /// Extra capabilities, e.g. `NET_ADMIN`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host: u16,
    pub container: u16,
    #[serde(default, skip_serializing_if = "is_default")]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

/// A named volume (`name`) or a bind mount (`hostPath`, only under the
/// agent's allowed roots), mounted at `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    pub target: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum RestartPolicy {
    No,
    #[default]
    Always,
    OnFailure,
    UnlessStopped,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum PullPolicy {
    #[default]
    IfNotPresent,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum NetworkMode {
    #[default]
    Bridge,
    Host,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Healthcheck {
    /// Docker's form: `["CMD", "arg", ...]`, `["CMD-SHELL", "cmd"]` or `["NONE"]`.
    pub test: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period_seconds: Option<u32>,
}

impl ContainerSpec {
    pub(super) fn validate(&self) -> Result<(), SpecError> {
        let field = |field, reason: String| Err(SpecError::InvalidField { field, reason });
        if self.image.is_empty() || self.image.chars().any(|c| c.is_whitespace()) {
            return field(
                "image",
                format!("{:?} is not an image reference", self.image),
            );
        }
        if let Some(d) = &self.digest {
            let hex = d.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return field("digest", format!("{d:?} is not sha256:<64 hex digits>"));
            }
        }
        for v in &self.volumes {
            if v.name.is_some() == v.host_path.is_some() {
                return field(
                    "volumes",
                    format!(
                        "mount at {:?} needs exactly one of name or hostPath",
                        v.target
                    ),
                );
            }
            if let Some(p) = &v.host_path {
                validate_abs_path(p)?;
            }
            if !v.target.starts_with('/') {
                return field("volumes", format!("target {:?} is not absolute", v.target));
            }
        }
        for p in &self.ports {
            if p.host == 0 || p.container == 0 {
                return field("ports", "port 0 is not allowed".into());
            }
        }
        if let Some(k) = self.labels.keys().find(|k| k.starts_with("io.flotilla.")) {
            return field(
                "labels",
                format!("{k:?}: labels under io.flotilla. are reserved for the agent"),
            );
        }
        if self.cpu_limit_millis == Some(0) || self.memory_limit_bytes == Some(0) {
            return field("limits", "a limit of 0 is not allowed".into());
        }
        Ok(())
    }
}
