//! The daemon's side of the lease (docs/adr/0022): a task of its own
//! campaigns and renews on a timer — never held up by a long pass, and never
//! holding one up with a slow renewal — and tells the event loop until when
//! this instance may act and when it took the lease. It also refuses two
//! misconfigurations: an instance that has seen a leader with other signing
//! keys never campaigns (until it sees a leader with its own keys), and a
//! lease bucket deleted by hand is created again.

use std::time::Duration;

use async_nats::jetstream;
use manifest_types::lease::ControlLease;
use manifest_types::{ApiVersion, BucketName};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::Config;
use crate::bucket::{BucketError, ensure_control_bucket};
use crate::lease::{Lease, Role};

/// What the lease task tells the event loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Acting {
    /// Until when this instance may write (None: it follows).
    until: Option<Instant>,
    /// How many times it took the lease.
    term: u64,
}

/// The event loop's handle on the lease task.
#[derive(Debug)]
pub(crate) struct Leadership {
    rx: watch::Receiver<Acting>,
    term: u64,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Leadership {
    /// Opens (or creates) the lease bucket and starts campaigning.
    pub async fn start(js: jetstream::Context, config: &Config) -> Result<Self, BucketError> {
        let store =
            ensure_control_bucket(&js, &config.bucket, config.replicas, config.lease_ttl).await?;
        let record = ControlLease {
            api_version: ApiVersion,
            instance: uuid::Uuid::new_v4().to_string(),
            host: std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            since: crate::rollout::rfc3339(std::time::SystemTime::now()),
            ttl_ms: config.lease_ttl.as_millis() as u64,
            signing_keys: sorted(&config.signing.key_ids()),
        };
        tracing::info!(instance = %record.instance, lease_ttl = ?config.lease_ttl, "campaigning for the control lease");
        let (tx, rx) = watch::channel(Acting::default());
        let (stop, stopped) = oneshot::channel();
        let campaign = Campaign {
            lease: Lease::new(store, record, config.lease_ttl),
            js,
            bucket: config.bucket.clone(),
            replicas: config.replicas,
            ttl: config.lease_ttl,
            leading: false,
            mismatch: None,
            tx,
        };
        Ok(Self {
            rx,
            term: 0,
            stop: Some(stop),
            task: Some(tokio::spawn(campaign.run(stopped))),
        })
    }

    /// Whether this instance may write now.
    pub fn acting(&self) -> bool {
        self.rx.borrow().until.is_some_and(|t| Instant::now() < t)
    }

    /// Resolves when this instance takes the lease (again). Cancel-safe.
    pub async fn took(&mut self) {
        loop {
            if self.rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            let term = self.rx.borrow_and_update().term;
            if term != self.term {
                self.term = term;
                return;
            }
        }
    }

    /// Stops campaigning and lets the lease go, so a follower need not wait
    /// for it to expire.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// The lease task's state.
struct Campaign {
    lease: Lease,
    js: jetstream::Context,
    bucket: BucketName,
    replicas: flotilla_nats::Replicas,
    ttl: Duration,
    leading: bool,
    /// The keys of a leader whose keys differ from ours (logged once per
    /// change); while set, this instance does not campaign.
    mismatch: Option<Vec<String>>,
    tx: watch::Sender<Acting>,
}

impl Campaign {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        loop {
            let next = self.tick().await;
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep_until(next) => {}
            }
        }
        self.tx.send_modify(|a| a.until = None);
        self.lease.release().await;
    }

    /// Campaigns or renews once; when to do it again.
    async fn tick(&mut self) -> Instant {
        let mut next = Instant::now() + self.lease.period();
        let ours = self.lease.record().signing_keys.clone();
        let result = match &self.mismatch {
            // A leader with other keys was seen: watch, never campaign.
            Some(_) => self.lease.holder().await,
            None => self.lease.tick().await,
        };
        let was = self.leading;
        match result {
            Ok(Role::Leader) => self.leading = true,
            Ok(Role::Follower(holder)) => {
                self.leading = false;
                match holder {
                    Some(h) if sorted(&h.signing_keys) != ours => {
                        let theirs = sorted(&h.signing_keys);
                        if self.mismatch.as_ref() != Some(&theirs) {
                            tracing::error!(leader = %h.instance, host = %h.host, leader_keys = ?theirs, our_keys = ?ours,
                                "the acting control plane signs with other keys than this instance: agents trusting only one set would reject the other's manifests, so this instance will not campaign; give every instance the same --signing-key-file");
                        }
                        self.mismatch = Some(theirs);
                    }
                    Some(_) => self.mismatch = None,
                    // Nobody holds it (expired, released, the bucket made
                    // again): an instance that saw other keys lead still
                    // does not campaign; it would re-sign the fleet with
                    // keys its agents may not trust.
                    None => {}
                }
            }
            Err(error) => {
                tracing::warn!(error = %super::execute::error_chain(&error), "control lease");
                // A lease bucket deleted by hand is created again.
                match ensure_control_bucket(&self.js, &self.bucket, self.replicas, self.ttl).await {
                    Ok(store) => self.lease.set_store(store),
                    Err(error) => {
                        tracing::warn!(error = %super::execute::error_chain(&error), "cannot open the control lease bucket")
                    }
                }
                self.leading = self.lease.acting();
                // Try again soon: the lease may be running out.
                next = Instant::now() + self.lease.period().min(Duration::from_millis(500));
            }
        }
        let instance = &self.lease.record().instance;
        let until = self.lease.acting_until().filter(|_| self.leading);
        match (was, self.leading) {
            (false, true) => {
                tracing::info!(%instance, "took the control lease: acting for the fleet");
                self.tx.send_modify(|a| {
                    a.until = until;
                    a.term += 1;
                });
            }
            (true, false) => {
                tracing::warn!(%instance, "lost the control lease: stopped acting, following");
                self.tx.send_modify(|a| a.until = None);
            }
            _ => {
                self.tx.send_if_modified(|a| {
                    let changed = a.until != until;
                    a.until = until;
                    changed
                });
            }
        }
        next
    }
}

fn sorted(keys: &[String]) -> Vec<String> {
    let mut keys = keys.to_vec();
    keys.sort();
    keys
}
