//! The File kind: [`FileSpec`], its mode and owner types, and the path rule
//! every kind shares ([`validate_abs_path`]).

use base64::Engine as _;

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{MAX_FILE_CONTENT_BYTES, SpecError, is_default, is_false};

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

    pub(super) fn validate(&self) -> Result<(), SpecError> {
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
