//! The SystemdUnit kind: [`SystemdUnitSpec`], the run state it asks for
//! ([`UnitState`], docs/adr/0009) and validated unit names ([`UnitName`]).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{SpecError, is_default};

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
    pub(super) fn validate(&self) -> Result<(), SpecError> {
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
