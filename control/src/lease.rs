//! The lease that makes one `flotilla-control` instance act for the fleet
//! (docs/adr/0022-one-acting-control-plane.md): a value at `lease` in the
//! control bucket ([`manifest_types::keys::control_bucket`]) whose maximum
//! age is the lease time.
//!
//! - A follower campaigns with `create`: only one instance succeeds, and
//!   only while nobody holds the lease (or its value expired by server
//!   time, or its holder let it go on shutdown).
//! - The leader renews with `update` against the revision it holds, every
//!   third of the lease time; a renewal that finds another revision means
//!   the lease was lost.
//! - The leader acts only until [`Lease::acting`] says no: a third of the
//!   lease time before the value can expire, counted from when the last
//!   successful renewal was *sent* (the server stamps it later), so a leader
//!   cut off or paused stops writing before any follower can take over.
//!   Every write is compare-and-swap besides, so a write already in flight
//!   from a stale leader fails rather than overwrites.

use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Store, UpdateErrorKind};
use bytes::Bytes;
use manifest_types::keys;
use manifest_types::lease::ControlLease;
use tokio::time::Instant;

/// The lease time unless `--lease-ttl` says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(6);

/// What one [`Lease::tick`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// This instance holds the lease (and acts while [`Lease::acting`]).
    Leader,
    /// Another instance holds it (its record, when readable).
    Follower(Option<ControlLease>),
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot campaign for the control lease")]
    Create(#[source] kv::CreateError),
    #[error("cannot renew the control lease")]
    Update(#[source] kv::UpdateError),
    #[error("cannot read the control lease")]
    Read(#[source] kv::EntryError),
}

/// This instance's side of the lease.
#[derive(Debug)]
pub struct Lease {
    store: Store,
    record: ControlLease,
    ttl: Duration,
    /// The revision this instance holds, while it leads.
    held: Option<u64>,
    /// Until when this instance may act.
    acting_until: Option<Instant>,
}

impl Lease {
    pub fn new(store: Store, record: ControlLease, ttl: Duration) -> Self {
        Self {
            store,
            record,
            ttl,
            held: None,
            acting_until: None,
        }
    }

    /// This instance's record (what followers and `flotilla get control` read).
    pub fn record(&self) -> &ControlLease {
        &self.record
    }

    /// How often to [`Self::tick`]: a third of the lease time.
    pub fn period(&self) -> Duration {
        self.ttl / 3
    }

    /// Whether this instance may write now.
    pub fn acting(&self) -> bool {
        self.acting_until.is_some_and(|t| Instant::now() < t)
    }

    /// Until when this instance may write, while it leads.
    pub fn acting_until(&self) -> Option<Instant> {
        self.acting_until
    }

    /// Campaigns (as a follower) or renews (as the leader).
    pub async fn tick(&mut self) -> Result<Role, LeaseError> {
        let sent = Instant::now();
        let value = Bytes::from(serde_json::to_vec(&self.record).expect("a lease serialises"));
        let written = match self.held {
            Some(revision) => match self.store.update(keys::LEASE, value, revision).await {
                Ok(r) => Ok(r),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    // Expired and taken, or removed by hand.
                    self.step_down();
                    return self.holder().await;
                }
                Err(e) => Err(LeaseError::Update(e)),
            },
            None => match self.store.create(keys::LEASE, value.clone()).await {
                Ok(r) => Ok(r),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                    let role = self.holder().await?;
                    // Still this instance's own value (a renewal whose
                    // answer was lost, a server restart): renew it now
                    // rather than wait for it to expire.
                    let Some(revision) = self.held else {
                        return Ok(role);
                    };
                    match self.store.update(keys::LEASE, value, revision).await {
                        Ok(r) => Ok(r),
                        Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                            self.step_down();
                            return self.holder().await;
                        }
                        Err(e) => Err(LeaseError::Update(e)),
                    }
                }
                Err(e) => Err(LeaseError::Create(e)),
            },
        };
        match written {
            Ok(revision) => {
                self.held = Some(revision);
                self.acting_until = Some(sent + self.ttl - self.ttl / 3);
                Ok(Role::Leader)
            }
            // Unanswered: the lease may still be this instance's, until
            // `acting_until` passes.
            Err(e) => {
                if !self.acting() {
                    self.step_down();
                }
                Err(e)
            }
        }
    }

    fn step_down(&mut self) {
        self.held = None;
        self.acting_until = None;
    }

    /// Who holds the lease now, without campaigning.
    pub async fn holder(&mut self) -> Result<Role, LeaseError> {
        let entry = self
            .store
            .entry(keys::LEASE)
            .await
            .map_err(LeaseError::Read)?
            .filter(|e| e.operation == kv::Operation::Put);
        let record: Option<ControlLease> = entry
            .as_ref()
            .and_then(|e| serde_json::from_slice(&e.value).ok());
        // A renewal whose answer was lost still wrote this instance's
        // value: hold that revision, and act again after the next renewal.
        if let (Some(e), Some(r)) = (&entry, &record)
            && r.instance == self.record.instance
        {
            self.held = Some(e.revision);
        }
        Ok(Role::Follower(record))
    }

    /// Uses `store` from now on (the bucket was created again).
    pub fn set_store(&mut self, store: Store) {
        self.store = store;
    }

    /// Lets the lease go (on shutdown), so a follower need not wait for it
    /// to expire.
    pub async fn release(&mut self) {
        if let Some(revision) = self.held.take() {
            self.acting_until = None;
            match self
                .store
                .delete_expect_revision(keys::LEASE, Some(revision))
                .await
            {
                Ok(()) => tracing::info!("control lease released"),
                Err(error) => {
                    tracing::warn!(%error, "cannot release the control lease; it expires on its own")
                }
            }
        }
    }
}
