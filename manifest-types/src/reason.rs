//! Typed reason codes for resources that are not Ready.
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
