//! The CLI's error type and the exit code each variant maps to.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | ok |
//! | 1 | error: connection, I/O, server, missing bucket |
//! | 2 | usage (clap) or invalid document / identifier |
//! | 3 | conflict: the compare-and-swap write lost to another operator (also: deleted by someone else during `apply --wait`) |
//! | 4 | rejected: an agent rejected the manifest, or the control plane reported the deployment invalid (`--wait`) |
//! | 5 | timeout (`--wait`) |
//! | 6 | not found |
//! | 7 | offline: every target converged except some that are Offline (`--wait`); they converge when they return |
//! | 8 | halted: the deployment's staged rollout halted on failures (`--wait`, `rollout status`) |
//! | 9 | rolled back: the deployment's staged rollout failed and rolled back (`--wait`, `rollout status`) |

use std::time::Duration;

/// Exit code for success.
pub const OK: u8 = 0;
/// Exit code for connection, I/O and server errors.
pub const ERROR: u8 = 1;
/// Exit code for usage errors and invalid documents (clap also uses 2).
pub const USAGE: u8 = 2;
/// Exit code for a lost compare-and-swap race.
pub const CONFLICT: u8 = 3;
/// Exit code for a rejection seen while waiting.
pub const REJECTED: u8 = 4;
/// Exit code for a wait that ran out of time.
pub const TIMEOUT: u8 = 5;
/// Exit code for a deployment or agent that does not exist.
pub const NOT_FOUND: u8 = 6;
/// Exit code for a wait that ended with every live target converged and
/// some targets Offline.
pub const OFFLINE: u8 = 7;
/// Exit code for a staged rollout that halted on failures.
pub const HALTED: u8 = 8;
/// Exit code for a staged rollout that failed and rolled back.
pub const ROLLED_BACK: u8 = 9;

/// Everything a command can fail with. `Display` is the one-line message
/// printed to stderr; [`CliError::exit_code`] is the process exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),

    /// `origin` names the file (or argument) the bad input came from.
    #[error("{origin}: {message}")]
    InvalidDocument { origin: String, message: String },

    #[error("cannot connect to NATS at {url}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::Error,
    },

    #[error("no fleet bucket {bucket:?} at {url} — is flotilla-control running?")]
    NoBucket { bucket: String, url: String },

    #[error("{context}")]
    Nats {
        context: String,
        #[source]
        source: async_nats::Error,
    },

    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The CAS write lost: someone else changed the key since it was read.
    #[error("{0}")]
    Conflict(String),

    /// An agent rejected the manifest, or the control plane could not use
    /// the deployment.
    #[error("{0}")]
    Rejected(String),

    #[error("timed out after {}: {detail}", humantime::format_duration(*.after))]
    Timeout { after: Duration, detail: String },

    #[error("{0}")]
    NotFound(String),

    /// Every target converged but these, which are Offline.
    #[error("{0}")]
    Offline(String),

    /// The rollout halted on failures.
    #[error("{0}")]
    Halted(String),

    /// The rollout failed and returned its agents to the previous revision.
    #[error("{0}")]
    RolledBack(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) | Self::InvalidDocument { .. } => USAGE,
            Self::Connect { .. } | Self::NoBucket { .. } | Self::Nats { .. } | Self::Io { .. } => {
                ERROR
            }
            Self::Conflict(_) => CONFLICT,
            Self::Rejected(_) => REJECTED,
            Self::Timeout { .. } => TIMEOUT,
            Self::NotFound(_) => NOT_FOUND,
            Self::Offline(_) => OFFLINE,
            Self::Halted(_) => HALTED,
            Self::RolledBack(_) => ROLLED_BACK,
        }
    }

    /// Wraps any NATS-side error with a line of context.
    pub fn nats(context: impl Into<String>, source: impl Into<async_nats::Error>) -> Self {
        Self::Nats {
            context: context.into(),
            source: source.into(),
        }
    }

    /// The message with its whole source chain, for stderr.
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut next = std::error::Error::source(self);
        while let Some(e) = next {
            let msg = e.to_string();
            if !out.ends_with(&msg) {
                out.push_str(": ");
                out.push_str(&msg);
            }
            next = e.source();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_pinned() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        let invalid = CliError::InvalidDocument {
            origin: "a.yaml".into(),
            message: "bad".into(),
        };
        assert_eq!(invalid.exit_code(), 2);
        assert_eq!(invalid.to_string(), "a.yaml: bad");
        assert_eq!(CliError::Conflict("x".into()).exit_code(), 3);
        assert_eq!(CliError::Rejected("x".into()).exit_code(), 4);
        let timeout = CliError::Timeout {
            after: Duration::from_secs(60),
            detail: "1/2 agents converged".into(),
        };
        assert_eq!(timeout.exit_code(), 5);
        assert_eq!(
            timeout.to_string(),
            "timed out after 1m: 1/2 agents converged"
        );
        assert_eq!(CliError::NotFound("x".into()).exit_code(), 6);
        assert_eq!(CliError::Offline("x".into()).exit_code(), 7);
        assert_eq!(CliError::Halted("x".into()).exit_code(), 8);
        assert_eq!(CliError::RolledBack("x".into()).exit_code(), 9);
        let no_bucket = CliError::NoBucket {
            bucket: "fleet".into(),
            url: "nats://h:4222".into(),
        };
        assert_eq!(no_bucket.exit_code(), 1);
    }

    #[test]
    fn report_includes_the_source_chain() {
        let e = CliError::Io {
            context: "cannot read a.yaml".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        };
        assert_eq!(e.report(), "cannot read a.yaml: no such file");
    }
}
