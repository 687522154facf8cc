//! Liveness: whether an agent is alive, from the server-side age of its last
//! heartbeat against the interval it declares ([`Thresholds`]), never from
//! what its status claims (docs/adr/0010, 0015).

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::{AgentReport, Reason};

/// The agent's default heartbeat period (the agent's `--heartbeat-interval`).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);

/// Heartbeats missed before an agent is [`State::Stale`](super::State::Stale).
pub const STALE_AFTER_BEATS: u32 = 3;
/// Heartbeats missed before an agent is [`State::Offline`](super::State::Offline).
pub const OFFLINE_AFTER_BEATS: u32 = 10;

/// The longest heartbeat interval a reader believes (the agent obeys the
/// fleet's setting only up to this too).
pub const MAX_DECLARED_INTERVAL: Duration = Duration::from_secs(3600);

/// Liveness limits on the age of an agent's last heartbeat (server time).
///
/// By default they follow each agent's own heartbeat interval, which the
/// agent declares in every heartbeat (`intervalMs`; the control plane adapts
/// it to the fleet's size, docs/adr/0015): Stale after [`STALE_AFTER_BEATS`]
/// missed beats, Offline after [`OFFLINE_AFTER_BEATS`]. An operator may fix
/// either limit instead (`--stale-after`, `--offline-after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Older than this: Stale. None: [`STALE_AFTER_BEATS`] intervals.
    pub stale_after: Option<Duration>,
    /// Older than this: Offline. None: [`OFFLINE_AFTER_BEATS`] intervals.
    pub offline_after: Option<Duration>,
    /// The interval of a heartbeat that declares none (an older agent).
    pub assumed_interval: Duration,
}

impl Thresholds {
    /// Limits derived from `interval` for heartbeats that declare none;
    /// heartbeats that declare one use their own.
    pub fn from_heartbeat_interval(interval: Duration) -> Self {
        Self {
            stale_after: None,
            offline_after: None,
            assumed_interval: interval,
        }
    }

    /// Fixed limits, whatever interval agents declare.
    pub fn fixed(stale_after: Duration, offline_after: Duration) -> Self {
        Self {
            stale_after: Some(stale_after),
            offline_after: Some(offline_after),
            assumed_interval: DEFAULT_HEARTBEAT_INTERVAL,
        }
    }

    /// `(stale_after, offline_after)` for an agent whose heartbeat declares
    /// `interval` (heartbeats are jittered by less than one period, so three
    /// missed beats are never jitter). Offline is never before Stale.
    pub fn limits(&self, interval: Option<Duration>) -> (Duration, Duration) {
        // A declared interval longer than any the fleet asks for is not
        // believed: a device cannot buy itself hours of looking Online.
        let interval = interval
            .unwrap_or(self.assumed_interval)
            .min(MAX_DECLARED_INTERVAL);
        let stale = self.stale_after.unwrap_or(interval * STALE_AFTER_BEATS);
        let offline = self
            .offline_after
            .unwrap_or(interval * OFFLINE_AFTER_BEATS)
            .max(stale);
        (stale, offline)
    }
}

impl Default for Thresholds {
    /// Limits that follow each agent's declared interval, assuming
    /// [`DEFAULT_HEARTBEAT_INTERVAL`] for heartbeats that declare none.
    fn default() -> Self {
        Self::from_heartbeat_interval(DEFAULT_HEARTBEAT_INTERVAL)
    }
}

/// Whether an agent is alive, from the server-side age of its last
/// heartbeat alone (never from what its status claims).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Liveness {
    /// Heartbeats arrive within the Stale limit.
    Online,
    /// Heartbeats stopped, or none was read while a status exists.
    Stale,
    /// No heartbeat within the Offline limit, or the agent was never heard.
    Offline,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "Online",
            Self::Stale => "Stale",
            Self::Offline => "Offline",
        }
    }
}

impl fmt::Display for Liveness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An agent's [`Liveness`] and, unless Online, why.
pub fn liveness(o: &AgentReport<'_>, thresholds: &Thresholds) -> (Liveness, Option<Reason>) {
    let (stale, offline) = thresholds.limits(o.heartbeat_interval);
    match (o.heartbeat_age, o.status_age) {
        (Some(age), _) if age > offline => (Liveness::Offline, Some(Reason::HeartbeatAge(age))),
        (Some(age), _) if age > stale => (Liveness::Stale, Some(Reason::HeartbeatAge(age))),
        (Some(_), _) => (Liveness::Online, None),
        // A status but no heartbeat (expired, or never written): its own
        // age bounds how long ago the agent was last heard of.
        (None, Some(age)) if age > offline => (Liveness::Offline, Some(Reason::NoHeartbeat)),
        (None, _) if o.status.is_some() => (Liveness::Stale, Some(Reason::NoHeartbeat)),
        (None, _) => (Liveness::Offline, Some(Reason::NoHeartbeat)),
    }
}
