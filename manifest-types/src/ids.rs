//! Validated identifiers. Every one of them validates on deserialize too, so
//! a value that made it into a typed document is known to be well formed.
//!
//! Agent ids, deployment names and local resource ids are single NATS subject
//! tokens: lowercase ASCII letters, digits, `-` and `_`, 1 to 63 characters.
//! A [`ResourceId`] is either one such token or `<deployment>/<local-id>`.

use std::fmt;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct IdError {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// Longest token accepted for agent ids, deployment names and local ids.
pub const MAX_TOKEN_LEN: usize = 63;

fn check_token(what: &'static str, value: &str) -> Result<(), IdError> {
    let err = |reason| {
        Err(IdError {
            what,
            value: value.to_owned(),
            reason,
        })
    };
    if value.is_empty() {
        return err("must not be empty");
    }
    if value.len() > MAX_TOKEN_LEN {
        return err("longer than 63 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return err("only lowercase letters, digits, '-' and '_' are allowed");
    }
    Ok(())
}

fn check_resource_id(value: &str) -> Result<(), IdError> {
    const WHAT: &str = "resource id";
    match value.split_once('/') {
        None => check_token(WHAT, value),
        Some((deployment, local)) => {
            check_token(WHAT, deployment)?;
            check_token(WHAT, local).map_err(|e| IdError {
                value: value.to_owned(),
                reason: if local.contains('/') {
                    "'/' may appear only once, between deployment and local id"
                } else {
                    e.reason
                },
                ..e
            })
        }
    }
}

fn check_bucket(value: &str) -> Result<(), IdError> {
    if value.is_empty()
        || value.len() > 64
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(IdError {
            what: "bucket name",
            value: value.to_owned(),
            reason: "1 to 64 ASCII letters, digits, '-' or '_'",
        });
    }
    Ok(())
}

macro_rules! validated_id {
    ($(#[$doc:meta])* $name:ident, $check:expr, $pattern:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                $check(&value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }

        #[cfg(feature = "schema")]
        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "type": "string", "pattern": $pattern })
            }
        }
    };
}

#[cfg_attr(not(feature = "schema"), allow(dead_code))]
const TOKEN_PATTERN: &str = "^[a-z0-9_-]{1,63}$";

validated_id!(
    /// The id of one device's agent; one whole NATS subject token.
    AgentId,
    |v: &str| check_token("agent id", v),
    TOKEN_PATTERN
);
validated_id!(
    /// The name of a fleet-level deployment; one whole NATS subject token.
    DeploymentName,
    |v: &str| check_token("deployment name", v),
    TOKEN_PATTERN
);
validated_id!(
    /// A resource id local to one deployment document.
    LocalId,
    |v: &str| check_token("local resource id", v),
    TOKEN_PATTERN
);
validated_id!(
    /// A resource id inside an agent manifest: `<deployment>/<local-id>` when
    /// rendered from a deployment, or a single token.
    ResourceId,
    check_resource_id,
    "^[a-z0-9_-]{1,63}(/[a-z0-9_-]{1,63})?$"
);
validated_id!(
    /// A JetStream KV bucket name.
    BucketName,
    check_bucket,
    "^[A-Za-z0-9_-]{1,64}$"
);

impl ResourceId {
    /// The id a deployment's resource gets in every manifest it is rendered into.
    pub fn rendered(deployment: &DeploymentName, local: &LocalId) -> Self {
        Self(format!("{deployment}/{local}"))
    }

    /// The deployment part of a rendered id, if it has one.
    pub fn deployment(&self) -> Option<&str> {
        self.0.split_once('/').map(|(d, _)| d)
    }
}

/// The fleet's KV bucket unless configured otherwise (also `keys::DEFAULT_BUCKET`).
pub const DEFAULT_BUCKET: &str = "fleet";

impl Default for BucketName {
    fn default() -> Self {
        Self(DEFAULT_BUCKET.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_accept_the_documented_alphabet() {
        for ok in ["pi-01", "a", "x_y", &"a".repeat(63)] {
            AgentId::new(ok).unwrap();
        }
        for bad in [
            "",
            "Pi",
            "a.b",
            "a*",
            "a>",
            "a/b",
            "a b",
            &"a".repeat(64),
            "é",
        ] {
            assert!(AgentId::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn resource_ids_allow_one_separator() {
        ResourceId::new("web/config").unwrap();
        ResourceId::new("solo").unwrap();
        for bad in ["a/b/c", "/a", "a/", "A/b", "a.b/c"] {
            assert!(ResourceId::new(bad).is_err(), "{bad:?} accepted");
        }
        let id = ResourceId::rendered(
            &DeploymentName::new("web").unwrap(),
            &LocalId::new("conf").unwrap(),
        );
        assert_eq!(id.as_str(), "web/conf");
        assert_eq!(id.deployment(), Some("web"));
    }

    #[test]
    fn deserialize_validates() {
        let err = serde_json::from_str::<AgentId>("\"a.b\"").unwrap_err();
        assert!(err.to_string().contains("invalid agent id"), "{err}");
        let id: AgentId = serde_json::from_str("\"pi-7\"").unwrap();
        assert_eq!(id.as_str(), "pi-7");
    }
}
