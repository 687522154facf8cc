//! Resource specs, one type per kind, and the forward-compatible parse that
//! turns a `{kind, spec}` pair off the wire into a [`ResourceSpec`].
//!
//! An unknown kind, or an unknown field anywhere inside a known kind's spec,
//! yields [`ResourceSpec::Unsupported`]: an agent must not half-apply a spec it
//! does not fully understand, but the rest of its manifest still converges.
//! A known field with a bad value is a [`SpecError`], which rejects the whole
//! manifest (the agent keeps its last good one).

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

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

// ---------------------------------------------------------------- File ----

/// A file the agent writes atomically and owns through its ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct FileSpec {
    /// Absolute, normalised path; must lie under one of the agent's file roots.
    pub path: String,
    /// The content, as UTF-8 text or base64 according to `encoding`.
    pub content: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub encoding: ContentEncoding,
    /// Permission bits as an octal string, e.g. "0640". Default "0644".
    #[serde(default, skip_serializing_if = "is_default")]
    pub mode: FileMode,
    /// User name or numeric uid; unset leaves the owner as created (the agent's user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Principal>,
    /// Group name or numeric gid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Principal>,
    /// Take over a file that already exists and that the agent did not write.
    #[serde(default, skip_serializing_if = "is_false")]
    pub adopt: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum ContentEncoding {
    #[default]
    Utf8,
    Base64,
}

/// Unix permission bits, written on the wire as an octal string ("0644").
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FileMode(u32);

impl FileMode {
    pub fn new(bits: u32) -> Option<Self> {
        (bits <= 0o7777).then_some(Self(bits))
    }
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl Default for FileMode {
    fn default() -> Self {
        Self(0o644)
    }
}

impl fmt::Debug for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl std::str::FromStr for FileMode {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let bad = |reason| SpecError::InvalidMode {
            mode: s.to_owned(),
            reason,
        };
        if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(bad("expected 1 to 4 octal digits, e.g. \"0644\""));
        }
        let bits = u32::from_str_radix(s, 8).map_err(|_| bad("not octal"))?;
        Self::new(bits).ok_or_else(|| bad("out of range"))
    }
}

impl Serialize for FileMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for FileMode {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "FileMode".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "pattern": "^[0-7]{1,4}$" })
    }
}

/// A user or group: a name, or a numeric id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum Principal {
    Id(u32),
    Name(String),
}

impl FileSpec {
    /// The decoded bytes to write.
    pub fn decoded_content(&self) -> Result<Vec<u8>, SpecError> {
        match self.encoding {
            ContentEncoding::Utf8 => Ok(self.content.as_bytes().to_vec()),
            ContentEncoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(self.content.trim())
                .map_err(|e| SpecError::InvalidBase64 {
                    message: e.to_string(),
                }),
        }
    }

    fn validate(&self) -> Result<(), SpecError> {
        validate_abs_path(&self.path)?;
        let size = self.decoded_content()?.len();
        if size > MAX_FILE_CONTENT_BYTES {
            return Err(SpecError::ContentTooLarge {
                size,
                max: MAX_FILE_CONTENT_BYTES,
            });
        }
        for p in [&self.owner, &self.group].into_iter().flatten() {
            if let Principal::Name(n) = p {
                validate_principal_name(n)?;
            }
        }
        Ok(())
    }
}

fn validate_principal_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::InvalidField {
            field: "owner/group",
            reason: format!("{name:?} is not a valid user or group name"),
        })
    }
}

/// Checks that `path` is absolute and normalised: no `.`/`..` components, no
/// empty components, no NUL. Roots and symlinks are the agent's business.
pub fn validate_abs_path(path: &str) -> Result<(), SpecError> {
    let bad = |reason| {
        Err(SpecError::InvalidPath {
            path: path.to_owned(),
            reason,
        })
    };
    if !path.starts_with('/') {
        return bad("is not absolute");
    }
    if path.len() > 4096 {
        return bad("is longer than 4096 bytes");
    }
    if path.contains('\0') {
        return bad("contains NUL");
    }
    if path == "/" || path.ends_with('/') {
        return bad("names a directory");
    }
    if path[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("is not normalised (empty, '.' or '..' component)");
    }
    Ok(())
}

// ----------------------------------------------------------- Container ----

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
    fn validate(&self) -> Result<(), SpecError> {
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

// --------------------------------------------------------- SystemdUnit ----

/// A systemd unit, optionally with a unit file and drop-ins the agent owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct SystemdUnitSpec {
    pub unit: UnitName,
    /// Unit file content; when given the agent writes and owns the unit file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Drop-in file name (`*.conf`) → content.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub drop_ins: BTreeMap<String, String>,
    /// Enable or disable; unset leaves enablement as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// What the agent does to the unit's run state. Default: `running`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub state: UnitState,
    /// What a `restartOn` trigger (or a changed unit file) does to a
    /// `running` unit: restart it (default) or reload it.
    #[serde(default, skip_serializing_if = "is_default")]
    pub on_trigger: TriggerAction,
}

/// The run state a SystemdUnit resource asks for (docs/adr/0009, "Units that
/// are not meant to run all the time").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum UnitState {
    /// The default. Keep the unit active: start it when it is not, restart
    /// it when its files or `restartOn` inputs change. A oneshot service
    /// without `RemainAfterExit=yes` can never stay active and is refused
    /// (`UnitNeverStaysActive`), never started.
    #[default]
    Running,
    /// Keep the unit inactive: stop it when it runs. A unit an active timer,
    /// path or socket unit triggers is not stopped (`UnitTriggered`).
    Stopped,
    /// Install (and enable, with `enabled`) the unit, but never start, stop or
    /// restart it: its timer, path unit, socket or a dependency runs it.
    /// Ready once files and enablement are converged; the last run is
    /// reported, and a failed last run is `UnitLastRunFailed` (never
    /// "repaired" by starting it). Changed files apply from the next run.
    Triggered,
    /// Run the unit (typically a oneshot) once, and again only when its
    /// files or `restartOn` inputs change; wait for the run to finish. Ready
    /// when that run succeeded; a failed run is `UnitRunFailed` and is not
    /// repeated until the unit or its inputs change.
    Completed,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum TriggerAction {
    #[default]
    Restart,
    Reload,
}

/// Unit suffixes the agent manages.
pub const UNIT_SUFFIXES: [&str; 6] = [
    ".service", ".timer", ".socket", ".path", ".target", ".mount",
];

/// A systemd unit name with a known suffix and no path separators.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnitName(String);

impl UnitName {
    pub fn new(name: impl Into<String>) -> Result<Self, SpecError> {
        let name = name.into();
        let bad = |reason| SpecError::InvalidUnitName {
            unit: name.clone(),
            reason,
        };
        let Some(stem) = UNIT_SUFFIXES.iter().find_map(|s| name.strip_suffix(s)) else {
            return Err(bad(
                "needs one of the suffixes .service .timer .socket .path .target .mount",
            ));
        };
        if stem.is_empty() || name.len() > 255 {
            return Err(bad("empty or longer than 255 characters"));
        }
        if !stem.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.' | b'-' | b'@' | b'\\')
        }) {
            return Err(bad("only ASCII letters, digits and :_.-@\\ are allowed"));
        }
        Ok(Self(name))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for UnitName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for UnitName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for UnitName {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "UnitName".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[A-Za-z0-9:_.@\\\\-]+\\.(service|timer|socket|path|target|mount)$"
        })
    }
}

impl SystemdUnitSpec {
    fn validate(&self) -> Result<(), SpecError> {
        for name in self.drop_ins.keys() {
            let ok = name.ends_with(".conf")
                && name.len() > 5
                && !name.contains('/')
                && !name.starts_with('.');
            if !ok {
                return Err(SpecError::InvalidField {
                    field: "dropIns",
                    reason: format!("{name:?} is not a drop-in file name (*.conf, no '/')"),
                });
            }
        }
        Ok(())
    }
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
