//! The fleet's heartbeat interval (docs/adr/0015-heartbeats-and-liveness.md):
//! sized so every agent beating at it keeps the whole fleet under a cap of
//! heartbeats per second — `clamp(agents / max_per_second, min, max)`, as
//! Nomad and ZLayer size theirs — and published in `settings.heartbeat` for
//! agents to pick up without a restart. Pure: no I/O.

use std::time::Duration;

use manifest_types::{ApiVersion, HeartbeatSettings};

/// The cap and bounds the interval is sized within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatPolicy {
    /// Heartbeats per second the whole fleet may send, at most.
    pub max_per_second: u64,
    /// The shortest interval published (agents beat at their own configured
    /// interval when it is longer).
    pub min_interval: Duration,
    /// The longest interval published, however large the fleet.
    pub max_interval: Duration,
}

impl Default for HeartbeatPolicy {
    /// 500 heartbeats per second, interval between 100 ms and 10 min: a
    /// small fleet keeps its agents' own intervals (15 s by default), 10,000
    /// agents beat every 20 s (Stale after 60 s, Offline after 200 s).
    fn default() -> Self {
        Self {
            max_per_second: 500,
            min_interval: Duration::from_millis(100),
            max_interval: Duration::from_secs(600),
        }
    }
}

/// The interval is published in steps of this much, rounded up.
const STEP_MS: u64 = 100;

impl HeartbeatPolicy {
    /// The settings for a fleet of `agents`.
    pub fn settings(&self, agents: usize) -> HeartbeatSettings {
        let agents = agents as u64;
        let per_second = self.max_per_second.max(1);
        // agents / per_second seconds, in ms, rounded up to a step.
        let ms = (agents * 1000).div_ceil(per_second).div_ceil(STEP_MS) * STEP_MS;
        let min = u64::try_from(self.min_interval.as_millis()).unwrap_or(u64::MAX);
        let max = u64::try_from(self.max_interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(min);
        HeartbeatSettings {
            api_version: ApiVersion,
            interval_ms: ms.clamp(min, max),
            agents,
            max_per_second: per_second,
        }
    }
}

/// Whether `stored` must be replaced by `want`: it is missing, keeps another
/// cap, is shorter than wanted (the fleet would beat over the cap), or is
/// more than 20% longer (a shrunk fleet's liveness would be judged slowly).
/// Small shrinks are left alone, so a fleet hovering at a size does not
/// rewrite the key on every registration.
pub fn needs_write(stored: Option<&HeartbeatSettings>, want: &HeartbeatSettings) -> bool {
    match stored {
        None => true,
        Some(s) => {
            s.max_per_second != want.max_per_second
                || s.interval_ms < want.interval_ms
                || s.interval_ms.saturating_mul(5) > want.interval_ms.saturating_mul(6)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_keeps_the_fleet_under_the_cap() {
        let p = HeartbeatPolicy::default();
        for (agents, ms) in [
            (0, 100),
            (100, 200),
            (500, 1_000),
            (501, 1_100),
            (1_000, 2_000),
            (10_000, 20_000),
            (1_000_000, 600_000),
        ] {
            let s = p.settings(agents);
            assert_eq!(s.interval_ms, ms, "{agents} agents");
            // The rate at that interval never exceeds the cap (below the
            // maximum interval).
            if ms < 600_000 {
                assert!(agents as f64 / (ms as f64 / 1000.0) <= p.max_per_second as f64);
            }
        }
        let tight = HeartbeatPolicy {
            max_per_second: 3,
            min_interval: Duration::from_millis(200),
            max_interval: Duration::from_secs(5),
        };
        assert_eq!(tight.settings(1).interval_ms, 400);
        assert_eq!(tight.settings(6).interval_ms, 2_000);
        assert_eq!(tight.settings(100).interval_ms, 5_000);
    }

    #[test]
    fn writes_on_growth_and_real_shrinkage_only() {
        let p = HeartbeatPolicy::default();
        let at = |n| p.settings(n);
        assert!(needs_write(None, &at(10)));
        assert!(!needs_write(Some(&at(1_000)), &at(1_000)));
        assert!(needs_write(Some(&at(1_000)), &at(1_100)), "growth");
        assert!(!needs_write(Some(&at(1_000)), &at(900)), "a small shrink");
        assert!(needs_write(Some(&at(1_000)), &at(700)), "a real shrink");
        let other_cap = HeartbeatPolicy {
            max_per_second: 100,
            ..p
        };
        assert!(needs_write(Some(&at(10)), &other_cap.settings(10)));
    }
}
