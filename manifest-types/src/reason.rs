//! Typed reason codes: for resources that are not Ready ([`FailureReason`]),
//! manifests that were not accepted ([`RejectionReason`]) and dropped
//! resources left in place ([`ReleaseReason`]).
//!
//! On the wire a reason is a stable CamelCase string (the `reason` of a
//! `Failed` [`crate::ResourceState`] or of a `removing` entry), so a newer
//! agent's codes never break an older reader. Code that branches on a reason
//! — the agent's retry and reconnect logic, the CLI, the control plane —
//! matches on [`FailureReason`] instead of comparing strings;
//! [`FailureReason::parse`] maps a code it does not know to `None`.

use std::fmt;

macro_rules! reasons {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Why one reconcile (or removal) of a resource failed.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum FailureReason {
            $( $(#[$doc])* $name, )*
        }

        impl FailureReason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [FailureReason] = &[$(FailureReason::$name),*];

            /// The stable wire code.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( FailureReason::$name => stringify!($name), )*
                }
            }
        }
    };
}

reasons! {
    // ---- transport to the device's managers: retried, client rebuilt
    /// The Docker Engine socket does not answer.
    DockerUnavailable,
    /// The engine answered with an error.
    DockerError,
    /// systemd's D-Bus API does not answer.
    SystemdUnavailable,
    /// systemd answered a D-Bus call with an error.
    SystemdError,
    // ---- containers
    ImagePullFailed,
    ImageNotPresent,
    NameConflict,
    StartFailed,
    ContainerExited,
    ContainerPaused,
    ContainerNotRunning,
    CrashLoopBackOff,
    Unhealthy,
    /// A replacement failed to start or crash-looped; the previous container
    /// was started again and keeps serving.
    ReplaceFailed,
    // ---- units
    UnitFailed,
    UnitActivating,
    UnitNotRunning,
    UnitNotStopped,
    UnitNotFound,
    UnitInvalid,
    JobFailed,
    /// `state: running` on a unit that can never stay active (a oneshot
    /// service without `RemainAfterExit=yes`): the agent does not start it.
    UnitNeverStaysActive,
    /// `state: stopped` on a unit an active timer, path or socket unit
    /// triggers: the agent does not stop what its trigger starts.
    UnitTriggered,
    /// `state: triggered`: the last run its trigger started failed. The
    /// agent does not start it again; the next triggered run may succeed.
    UnitLastRunFailed,
    /// `state: completed`: the run for the current files and inputs failed;
    /// it is repeated only when they change.
    UnitRunFailed,
    // ---- files and the state directory
    NotOwned,
    NotARegularFile,
    NotADirectory,
    SymlinkInPath,
    PathOutsideRoots,
    PermissionDenied,
    UnknownPrincipal,
    InvalidContent,
    ReadFailed,
    WriteFailed,
    CreateDirFailed,
    RemoveFailed,
    StateWriteFailed,
}

impl FailureReason {
    /// The reason for a wire code, or `None` for a code this build does not
    /// know (a newer agent's).
    pub fn parse(code: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| r.as_str() == code)
    }

    /// The device's manager (engine, systemd) could not be reached: the
    /// client should be rebuilt before the retry.
    pub fn is_unavailable(self) -> bool {
        matches!(self, Self::DockerUnavailable | Self::SystemdUnavailable)
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<FailureReason> for String {
    fn from(r: FailureReason) -> Self {
        r.as_str().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_are_none() {
        for r in FailureReason::ALL {
            assert_eq!(FailureReason::parse(r.as_str()), Some(*r));
        }
        assert_eq!(
            FailureReason::DockerUnavailable.as_str(),
            "DockerUnavailable"
        );
        assert_eq!(FailureReason::parse("SomethingNewer"), None);
        assert!(FailureReason::DockerUnavailable.is_unavailable());
        assert!(!FailureReason::DockerError.is_unavailable());
    }
}

/// A string-coded enum whose wire form is its variant name, and whose
/// unknown codes (a newer writer's) parse to `Other` and are written back
/// unchanged.
macro_rules! open_codes {
    ($(#[$meta:meta])* $ty:ident { $( $(#[$doc:meta])* $name:ident ),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $ty {
            $( $(#[$doc])* $name, )*
            /// A code this build does not know, kept as it was written.
            Other(String),
        }

        impl $ty {
            /// The stable wire code.
            pub fn as_str(&self) -> &str {
                match self {
                    $( Self::$name => stringify!($name), )*
                    Self::Other(code) => code,
                }
            }

            /// The reason for a wire code; an unknown code is kept in `Other`.
            pub fn parse(code: &str) -> Self {
                match code {
                    $( stringify!($name) => Self::$name, )*
                    other => Self::Other(other.to_owned()),
                }
            }

            /// Every code this build knows, in declaration order.
            pub fn known() -> Vec<Self> {
                vec![$( Self::$name ),*]
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<str> for $ty {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok(Self::parse(&String::deserialize(d)?))
            }
        }

        #[cfg(feature = "schema")]
        impl schemars::JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($ty).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "description": concat!(
                        "A stable code; readers keep codes they do not know. Known: ",
                        $( stringify!($name), " ", )*
                    )
                })
            }
        }
    };
}

open_codes! {
    /// Why a manifest was not accepted (`Rejection.reason`); the last good
    /// manifest keeps running.
    RejectionReason {
        /// Not JSON, or not an object.
        MalformedJson,
        /// An `apiVersion` this build does not speak.
        UnsupportedApiVersion,
        /// A required field missing or of the wrong type.
        InvalidDocument,
        /// A known kind's spec that does not parse.
        MalformedSpec,
        InvalidPath,
        ContentTooLarge,
        InvalidBase64,
        InvalidMode,
        InvalidUnitName,
        InvalidField,
        DuplicateResourceId,
        InvalidGeneration,
        InvalidRestartOn,
        DuplicateTarget,
        /// Addressed to another agent.
        WrongAgent,
        /// At or below the accepted generation, with other content.
        ReplayedGeneration,
        /// A File path (or bind mount) outside the agent's file roots.
        PathOutsideRoots,
        /// A container privilege the device owner did not allow.
        PrivilegeNotAllowed,
        /// No signature, and the agent accepts only signed manifests.
        Unsigned,
        /// A signature that does not verify, or is malformed.
        BadSignature,
        /// Signed by a key the agent does not trust.
        UntrustedKey,
        /// The desired-state key was deleted or purged by hand.
        DesiredStateDeleted,
    }
}

open_codes! {
    /// Why a dropped resource's artefact was left in place
    /// (`ReleasedResource.reason`) instead of removed.
    ReleaseReason {
        /// A unit (e.g. `ssh.service`) the agent did not create: only its
        /// management ends.
        NotCreatedByAgent,
        /// A file that existed before the agent adopted it.
        Adopted,
        /// A file changed by someone else since the agent wrote it.
        ChangedSinceWritten,
        /// The way to the file changed (a symlink or a non-directory).
        PathChanged,
    }
}

#[cfg(test)]
mod open_code_tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_are_kept() {
        for r in RejectionReason::known() {
            assert_eq!(RejectionReason::parse(r.as_str()), r);
        }
        for r in ReleaseReason::known() {
            assert_eq!(ReleaseReason::parse(r.as_str()), r);
        }
        let newer: RejectionReason = serde_json::from_str("\"FromTheFuture\"").unwrap();
        assert_eq!(newer, RejectionReason::Other("FromTheFuture".into()));
        assert_eq!(serde_json::to_string(&newer).unwrap(), "\"FromTheFuture\"");
        assert_eq!(RejectionReason::WrongAgent, "WrongAgent");
        assert_eq!(
            serde_json::to_string(&ReleaseReason::NotCreatedByAgent).unwrap(),
            "\"NotCreatedByAgent\""
        );
    }
}
