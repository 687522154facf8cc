//! Being a well-behaved systemd service
//! (`deploy/systemd/flotilla-control.service`, `Type=notify`): READY once the
//! fleet view is loaded (the watch's replay is through), WATCHDOG while the
//! event loop keeps turning (the pings are sent from it), and a one-line
//! STATUS — acting or following. Without `NOTIFY_SOCKET` every call is a
//! no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct Service {
    /// Half the watchdog interval systemd asked for, if it asked.
    ping_every: Option<Duration>,
    next: Instant,
    ready: bool,
    status: String,
}

impl Service {
    pub fn new() -> Self {
        let ping_every = sd_notify::watchdog_enabled().map(|w| w / 2);
        Self {
            ping_every,
            next: Instant::now(),
            ready: false,
            status: String::new(),
        }
    }

    /// The fleet view is loaded: READY (once).
    pub fn ready(&mut self) {
        if !std::mem::replace(&mut self.ready, true) {
            let _ = sd_notify::notify(&[NotifyState::Ready]);
        }
    }

    /// When the next watchdog ping is due (never without a watchdog).
    pub fn next_ping(&self) -> Option<Instant> {
        self.ping_every.map(|_| self.next)
    }

    /// A watchdog ping, from the event loop.
    pub fn ping(&mut self) {
        if let Some(every) = self.ping_every {
            self.next = Instant::now() + every;
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        }
    }

    /// `systemctl status`'s line, sent when it changes.
    pub fn status(&mut self, acting: bool) {
        let line = if acting {
            "acting for the fleet (holds the control lease)"
        } else {
            "following (another instance holds the control lease)"
        };
        if self.status != line {
            line.clone_into(&mut self.status);
            let _ = sd_notify::notify(&[NotifyState::Status(line)]);
        }
    }
}
