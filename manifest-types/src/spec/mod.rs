//! Resource specs, one type per kind, and the forward-compatible parse that
//! turns a `{kind, spec}` pair off the wire into a [`ResourceSpec`].
//!
//! An unknown kind, or an unknown field anywhere inside a known kind's spec,
//! yields [`ResourceSpec::Unsupported`]: an agent must not half-apply a spec it
//! does not fully understand, but the rest of its manifest still converges.
//! A known field with a bad value is a [`SpecError`], which rejects the whole
//! manifest (the agent keeps its last good one).

use std::fmt;

use serde::{Deserialize, Serialize};

mod container;
mod file;
mod unit;

pub use container::*;
pub use file::*;
pub use unit::*;

/// Largest decoded File content accepted, in bytes. KV values are capped at
/// 1 MiB by default and a manifest carries every resource of a device.
pub const MAX_FILE_CONTENT_BYTES: usize = 256 * 1024;

/// The resource kinds this version of the contract knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ResourceKind {
    File,
    Container,
    SystemdUnit,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 3] = [Self::File, Self::Container, Self::SystemdUnit];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "File",
            Self::Container => "Container",
            Self::SystemdUnit => "SystemdUnit",
        }
    }

    pub fn parse(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == kind)
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bad value inside a known kind's spec. Each variant is one class of
/// rejection with a stable [`SpecError::reason`] code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{message}")]
    Malformed { message: String },
    #[error("path {path:?} {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("content is {size} bytes, more than the {max}-byte limit")]
    ContentTooLarge { size: usize, max: usize },
    #[error("content is not valid base64: {message}")]
    InvalidBase64 { message: String },
    #[error("invalid file mode {mode:?}: {reason}")]
    InvalidMode { mode: String, reason: &'static str },
    #[error("invalid unit name {unit:?}: {reason}")]
    InvalidUnitName { unit: String, reason: &'static str },
    #[error("invalid {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
}

impl SpecError {
    /// The rejection reason in status.
    pub fn reason(&self) -> crate::RejectionReason {
        use crate::RejectionReason as R;
        match self {
            Self::Malformed { .. } => R::MalformedSpec,
            Self::InvalidPath { .. } => R::InvalidPath,
            Self::ContentTooLarge { .. } => R::ContentTooLarge,
            Self::InvalidBase64 { .. } => R::InvalidBase64,
            Self::InvalidMode { .. } => R::InvalidMode,
            Self::InvalidUnitName { .. } => R::InvalidUnitName,
            Self::InvalidField { .. } => R::InvalidField,
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

// -------------------------------------------------------- ResourceSpec ----

/// A typed resource spec, or the honest admission that this build does not
/// understand it.
#[derive(Debug, Clone, PartialEq)]
pub enum ResourceSpec {
    File(FileSpec),
    Container(ContainerSpec),
    SystemdUnit(SystemdUnitSpec),
    /// Unknown kind or unknown field: the original is kept verbatim so it
    /// re-serialises unchanged.
    Unsupported(UnsupportedSpec),
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnsupportedSpec {
    pub kind: String,
    pub spec: serde_json::Value,
    pub reason: String,
}

impl ResourceSpec {
    /// Parses a `{kind, spec}` pair; see the module docs for the rules.
    pub fn from_parts(kind: &str, spec: serde_json::Value) -> Result<Self, SpecError> {
        let typed = Self::shape(kind, spec)?;
        typed.validate()?;
        Ok(typed)
    }

    /// Parses a `{kind, spec}` pair for its shape only (field names and
    /// types), without the value rules [`Self::from_parts`] also checks: a
    /// templated deployment resource, whose values are known only per agent.
    pub(crate) fn shape(kind: &str, spec: serde_json::Value) -> Result<Self, SpecError> {
        let Some(known) = ResourceKind::parse(kind) else {
            return Ok(Self::Unsupported(UnsupportedSpec {
                reason: format!("unknown resource kind {kind:?}"),
                kind: kind.to_owned(),
                spec,
            }));
        };
        let parsed = match known {
            ResourceKind::File => parse_known(&spec).map(|s| s.map(Self::File)),
            ResourceKind::Container => parse_known(&spec).map(|s| s.map(Self::Container)),
            ResourceKind::SystemdUnit => parse_known(&spec).map(|s| s.map(Self::SystemdUnit)),
        }?;
        match parsed {
            Ok(typed) => Ok(typed),
            Err(unknown_fields) => Ok(Self::Unsupported(UnsupportedSpec {
                kind: kind.to_owned(),
                spec,
                reason: format!(
                    "unknown field(s) in {kind} spec: {}",
                    unknown_fields.join(", ")
                ),
            })),
        }
    }

    /// The kind as written on the wire.
    pub fn kind_str(&self) -> &str {
        match self {
            Self::File(_) => "File",
            Self::Container(_) => "Container",
            Self::SystemdUnit(_) => "SystemdUnit",
            Self::Unsupported(u) => &u.kind,
        }
    }

    pub fn kind(&self) -> Option<ResourceKind> {
        ResourceKind::parse(self.kind_str())
    }

    /// The normalised spec: defaults omitted, so a field added later with a
    /// default does not change it. Unsupported specs are returned verbatim.
    pub fn normalised(&self) -> serde_json::Value {
        let v = match self {
            Self::File(s) => serde_json::to_value(s),
            Self::Container(s) => serde_json::to_value(s),
            Self::SystemdUnit(s) => serde_json::to_value(s),
            Self::Unsupported(u) => return u.spec.clone(),
        };
        v.expect("spec types serialise to JSON")
    }

    fn validate(&self) -> Result<(), SpecError> {
        match self {
            Self::File(s) => s.validate(),
            Self::Container(s) => s.validate(),
            Self::SystemdUnit(s) => s.validate(),
            Self::Unsupported(_) => Ok(()),
        }
    }
}

/// `Ok(Ok(spec))`: parsed; `Ok(Err(paths))`: unknown fields at these paths;
/// `Err`: a known field holds a bad value.
fn parse_known<T: serde::de::DeserializeOwned>(
    spec: &serde_json::Value,
) -> Result<Result<T, Vec<String>>, SpecError> {
    let mut unknown = Vec::new();
    let parsed = serde_ignored::deserialize(spec.clone(), |path| unknown.push(path.to_string()));
    match parsed {
        Ok(_) if !unknown.is_empty() => Ok(Err(unknown)),
        Ok(t) => Ok(Ok(t)),
        // A bad value next to an unknown field: the unknown field wins, the
        // spec may be valid for the newer agent it was written for.
        Err(_) if !unknown.is_empty() => Ok(Err(unknown)),
        Err(e) => Err(SpecError::Malformed {
            message: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(spec: serde_json::Value) -> Result<ResourceSpec, SpecError> {
        ResourceSpec::from_parts("File", spec)
    }

    #[test]
    fn file_defaults_and_normalisation() {
        let a = file(json!({"path": "/etc/a", "content": "x"})).unwrap();
        let b = file(json!({"path": "/etc/a", "content": "x", "mode": "0644", "adopt": false}))
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.normalised(), json!({"path": "/etc/a", "content": "x"}));
        let ResourceSpec::File(f) = a else { panic!() };
        assert_eq!(f.mode.bits(), 0o644);
    }

    #[test]
    fn unknown_kind_and_unknown_field_are_unsupported() {
        let u = ResourceSpec::from_parts("Firmware", json!({"x": 1})).unwrap();
        assert!(
            matches!(&u, ResourceSpec::Unsupported(s) if s.reason.contains("unknown resource kind"))
        );
        let u = file(json!({"path": "/a", "content": "", "checksum": "x"})).unwrap();
        let ResourceSpec::Unsupported(u) = u else {
            panic!("{u:?}")
        };
        assert!(u.reason.contains("checksum"), "{}", u.reason);
        // nested unknown field
        let u = ResourceSpec::from_parts(
            "Container",
            json!({"image": "a", "ports": [{"host": 1, "container": 2, "sctpMagic": true}]}),
        )
        .unwrap();
        assert!(matches!(u, ResourceSpec::Unsupported(s) if s.reason.contains("sctpMagic")));
    }

    #[test]
    fn each_invalid_class_has_its_reason() {
        let cases = [
            (json!({"path": "rel", "content": ""}), "InvalidPath"),
            (json!({"path": "/a/../b", "content": ""}), "InvalidPath"),
            (
                json!({"path": "/a", "content": "", "mode": "999"}),
                "MalformedSpec",
            ),
            (
                json!({"path": "/a", "content": "%%", "encoding": "base64"}),
                "InvalidBase64",
            ),
            (
                json!({"path": "/a", "content": "x".repeat(MAX_FILE_CONTENT_BYTES + 1)}),
                "ContentTooLarge",
            ),
            (json!({"path": "/a", "content": 5}), "MalformedSpec"),
            (
                json!({"path": "/a", "content": "", "owner": "bad name"}),
                "InvalidField",
            ),
        ];
        for (spec, reason) in cases {
            let err = file(spec.clone()).unwrap_err();
            assert_eq!(err.reason(), reason, "{spec}: {err}");
        }
        let err =
            ResourceSpec::from_parts("SystemdUnit", json!({"unit": "../x.service"})).unwrap_err();
        assert!(err.to_string().contains("unit name"), "{err}");
        let err = ResourceSpec::from_parts("Container", json!({"image": ""})).unwrap_err();
        assert_eq!(err.reason(), "InvalidField");
        let err = ResourceSpec::from_parts(
            "Container",
            json!({"image": "a", "labels": {"io.flotilla.agent": "someone-else"}}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
    }

    #[test]
    fn unit_names() {
        for ok in [
            "nginx.service",
            "getty@tty1.service",
            "backup.timer",
            "-.mount",
        ] {
            UnitName::new(ok).unwrap();
        }
        for bad in [
            "nginx",
            "a/b.service",
            ".service",
            "x.device",
            "a b.service",
        ] {
            assert!(UnitName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn modes_round_trip_as_octal_strings() {
        let m: FileMode = "0750".parse().unwrap();
        assert_eq!(m.bits(), 0o750);
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"0750\"");
        assert!("8".parse::<FileMode>().is_err());
        assert!("17777".parse::<FileMode>().is_err());
    }
}
