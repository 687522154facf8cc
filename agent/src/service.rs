//! Being a well-behaved systemd service (`deploy/systemd/flotilla-agent.service`,
//! `Type=notify`): READY, WATCHDOG and STATUS through `sd_notify`. Without
//! `NOTIFY_SOCKET` (not under systemd) every call is a no-op.
//!
//! - READY is sent once the agent converges from its cached manifest and
//!   its tasks run — before NATS answers, so a device with no network yet
//!   starts fine and does not restart-loop.
//! - WATCHDOG pings go out only while the event loop keeps turning (it
//!   beats [`Liveness`] at least every second). A reconcile runs in its own
//!   task, so a slow image pull never stops the pings; a wedged loop does,
//!   and systemd restarts the agent.
//! - STATUS is one line for `systemctl status`: connected or not, the
//!   accepted generation (the cached one right after a restart), resources
//!   ready/total. It is sent again at once when the connection comes or goes
//!   and whenever the status changes, not only at the next watchdog ping.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::status::{StatusBoard, Summary};

/// How the event loop shows it is alive, and whether NATS is connected.
#[derive(Debug)]
pub struct Liveness {
    start: Instant,
    last_beat_ms: AtomicU64,
    connected: AtomicBool,
    /// Raised when `connected` changes (a permit is kept if nobody waits).
    connection_changed: Notify,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            connection_changed: Notify::new(),
        }
    }
}

impl Liveness {
    pub fn beat(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_beat_ms.store(ms, Ordering::Relaxed);
    }

    fn since_beat(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_beat_ms.load(Ordering::Relaxed)))
    }

    pub fn set_connected(&self, c: bool) {
        self.connected.store(c, Ordering::Relaxed);
        self.connection_changed.notify_one();
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// The event loop beats at least this often.
pub const BEAT: Duration = Duration::from_secs(1);

pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// The `systemctl status` line.
pub fn status_line(connected: bool, s: &Summary) -> String {
    let mut line = format!(
        "{}; generation {}{}; {}/{} resources ready",
        if connected {
            "connected to NATS"
        } else {
            "not connected to NATS (converging from the last good manifest)"
        },
        s.generation,
        if s.converging { " (converging)" } else { "" },
        s.ready,
        s.total,
    );
    if let Some(r) = &s.rejection {
        line.push_str(&format!("; last manifest rejected: {r}"));
    }
    line
}

/// Sends WATCHDOG pings while the loop beats, and STATUS whenever the line
/// changes: at once on a (re)connection, a disconnection or a status change.
pub async fn supervise(live: Arc<Liveness>, board: StatusBoard) {
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog.map_or(Duration::from_secs(5), |w| {
        (w / 3).min(Duration::from_secs(5))
    });
    // Stale beyond this, the loop is wedged: stop pinging.
    let stale = watchdog.map_or(Duration::MAX, |w| (w / 2).max(BEAT * 3));
    let mut last_line = String::new();
    let mut interval = tokio::time::interval(period);
    let mut statuses = board.subscribe();
    loop {
        let ping = tokio::select! {
            _ = interval.tick() => true,
            () = live.connection_changed.notified() => false,
            changed = statuses.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
        };
        let line = status_line(live.connected(), &board.summary());
        let mut states = Vec::new();
        if line != last_line {
            states.push(NotifyState::Status(&line));
        }
        let beat = live.since_beat();
        if ping && watchdog.is_some() {
            if beat <= stale {
                states.push(NotifyState::Watchdog);
            } else {
                tracing::error!(since_beat = ?beat, "event loop is not turning; withholding the watchdog ping");
            }
        }
        if !states.is_empty() && sd_notify::notify(&states).is_ok() {
            last_line.clone_from(&line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifest_types::AgentId;

    #[test]
    fn status_line_says_connection_generation_and_counts() {
        let (board, _rx) = StatusBoard::new(AgentId::new("pi-1").unwrap(), "i".into());
        assert_eq!(
            status_line(true, &board.summary()),
            "connected to NATS; generation 0; 0/0 resources ready"
        );
        // Right after a restart from the cached generation 6: its
        // generation and resource count, before the worker's first pass.
        board.accepted(6, 6);
        assert_eq!(
            status_line(false, &board.summary()),
            "not connected to NATS (converging from the last good manifest); \
             generation 6 (converging); 0/6 resources ready"
        );
        board.set_resources(6, Default::default(), vec![], vec![]);
        assert_eq!(
            status_line(true, &board.summary()),
            "connected to NATS; generation 6; 0/6 resources ready"
        );
    }

    #[test]
    fn liveness_tracks_beats() {
        let l = Liveness::default();
        l.beat();
        assert!(l.since_beat() < Duration::from_secs(1));
        assert!(!l.connected());
        l.set_connected(true);
        assert!(l.connected());
    }
}
