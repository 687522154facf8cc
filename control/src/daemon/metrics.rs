//! Counters of the daemon's work, readable while it runs: tests read them to
//! prove what did *not* happen (an echo of the daemon's own write costing a
//! render) without waiting out a quiet period.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Shared with whoever started the daemon ([`super::Config::metrics`]) and
/// with the HTTP surface (`/readyz`, `/metrics`; [`crate::http`]).
#[derive(Debug)]
pub struct Metrics {
    view_loaded: AtomicBool,
    acting: AtomicBool,
    pass_seconds: Histogram,
    passes: AtomicU64,
    agents_rendered: AtomicU64,
    manifests_written: AtomicU64,
    statuses_written: AtomicU64,
    relists: AtomicU64,
    bucket_replaced: AtomicU64,
    settled_revision: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            view_loaded: AtomicBool::default(),
            acting: AtomicBool::default(),
            // 1 ms to ~16 s.
            pass_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            passes: AtomicU64::default(),
            agents_rendered: AtomicU64::default(),
            manifests_written: AtomicU64::default(),
            statuses_written: AtomicU64::default(),
            relists: AtomicU64::default(),
            bucket_replaced: AtomicU64::default(),
            settled_revision: AtomicU64::default(),
        }
    }
}

impl Metrics {
    /// The fleet view has been loaded (the watch's replay is through).
    pub fn view_loaded(&self) -> bool {
        self.view_loaded.load(Ordering::SeqCst)
    }

    /// This instance holds the control lease and acts.
    pub fn acting(&self) -> bool {
        self.acting.load(Ordering::SeqCst)
    }

    /// Durations of reconcile passes.
    pub fn pass_seconds(&self) -> &Histogram {
        &self.pass_seconds
    }

    pub(crate) fn loaded(&self) {
        self.view_loaded.store(true, Ordering::SeqCst);
    }

    pub(crate) fn set_acting(&self, acting: bool) {
        self.acting.store(acting, Ordering::SeqCst);
    }

    /// Reconcile passes run.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::SeqCst)
    }

    /// Agents rendered over all passes: the whole fleet when a deployment
    /// changed, only the agents whose inputs changed otherwise.
    pub fn agents_rendered(&self) -> u64 {
        self.agents_rendered.load(Ordering::SeqCst)
    }

    /// Desired-state values written.
    pub fn manifests_written(&self) -> u64 {
        self.manifests_written.load(Ordering::SeqCst)
    }

    /// Deployment-status values written.
    pub fn statuses_written(&self) -> u64 {
        self.statuses_written.load(Ordering::SeqCst)
    }

    /// Watches opened after the first (a watch that ended, a replaced bucket).
    pub fn relists(&self) -> u64 {
        self.relists.load(Ordering::SeqCst)
    }

    /// Times the daemon found the bucket deleted (and created it again) or
    /// replaced by another one.
    pub fn bucket_replaced(&self) -> u64 {
        self.bucket_replaced.load(Ordering::SeqCst)
    }

    /// The highest KV sequence of the bucket the daemon has applied from
    /// its watch and acted on: any pass that entry called for has finished.
    /// Sequences restart with a recreated bucket, and so does this. (The
    /// name predates "KV sequence"; agent/tests use it.)
    pub fn settled_revision(&self) -> u64 {
        self.settled_revision.load(Ordering::SeqCst)
    }

    pub(crate) fn pass(&self, rendered: usize, manifests: usize, statuses: usize, took: Duration) {
        self.pass_seconds.observe(took.as_secs_f64());
        self.passes.fetch_add(1, Ordering::SeqCst);
        self.agents_rendered
            .fetch_add(rendered as u64, Ordering::SeqCst);
        self.manifests_written
            .fetch_add(manifests as u64, Ordering::SeqCst);
        self.statuses_written
            .fetch_add(statuses as u64, Ordering::SeqCst);
    }

    pub(crate) fn relisted(&self) {
        self.relists.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn replaced_bucket(&self) {
        self.bucket_replaced.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn settled(&self, kv_sequence: u64) {
        self.settled_revision.store(kv_sequence, Ordering::SeqCst);
    }
}
