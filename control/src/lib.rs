//! # flotilla-control — the control plane
//!
//! Turns fleet-level intent (`deployments.<name>`) and what agents say about
//! themselves (`agents.<id>`) into one manifest per agent
//! (`desired-state.<id>`), written with compare-and-swap and a strictly
//! increasing generation, and reports per-deployment render results
//! (`deployment-status.<name>`). It never calls an agent: it writes intent
//! into NATS KV and agents converge on their own ("The loop" in
//! `docs/ARCHITECTURE.md`, the design as a whole).
//!
//! ## Tour
//! - [`daemon`] — the one task of the binary: a KV watch over the keys it
//!   renders from and the agents' statuses, an in-memory copy of them, and a
//!   reconcile pass after every burst of changes that can change the render
//!   (its own writes coming back cost none, and are not parsed again). A
//!   pass renders the whole fleet only when a deployment changed; otherwise
//!   only the agents whose labels, values (`values.<id>`), stored manifest
//!   or report changed. It replaces any desired-state value it did not
//!   write, keeps `settings.heartbeat` sized to the fleet, and recreates a
//!   deleted bucket and relists. Inside (ADR 0020): the fleet view (the KV
//!   cache), the render memo and the rollouts as separate parts; a pass is
//!   planned without I/O (`plan`: which manifests at which generation,
//!   which statuses, history and settings, which rollout steps) and then
//!   executed (`execute`). Several instances may run: only the holder of
//!   the control lease acts (`leadership`, [`lease`], ADR 0022).
//!   Entry points: [`daemon::run`] (connect, check the bucket, loop until
//!   shutdown) and [`daemon::run_with_store`] for callers that already hold
//!   the bucket; both take a shutdown future, so tests run exactly the
//!   binary's code in-process. [`daemon::Metrics`] counts passes and writes.
//! - [`render`] — pure: deployments + agents' labels and values → each
//!   agent's resources (templated specs rendered per agent, ADR 0014), each
//!   deployment's targets, conflicts and render failures; a partial render
//!   patches the last one ([`render::Rendered::patch`]). Carries most unit
//!   tests.
//! - [`publish`] — the CAS writes: [`publish::publish_manifest_above`] (the
//!   stored value stands only as the rendering at or above the agent's
//!   [`publish::Floor`]; new generations above it and the stored one; bounded
//!   retry on lost races), [`publish::publish_manifest_over`] (one CAS
//!   against the watched copy, no read) and the deployment-status writes.
//!   Every manifest is signed with the daemon's keys (`--signing-key-file`,
//!   ADR 0017); a stored one stands only when signed by exactly those keys.
//! - [`rollout`] — pure: staged rollouts (ADR 0016) — waves in a stable
//!   hash order, the revision each target is rendered at, and
//!   [`rollout::Judge::step`]: releases within the budget, the health gate
//!   (the one convergence rule) and soak, halt or rollback past the failure
//!   threshold. The daemon starts a rollout for each new revision of a
//!   deployment with a policy (its own or `settings.rollout`), judges it on
//!   the statuses its watch delivers and fresh heartbeat reads, keeps its
//!   state in
//!   `deployment-status.<name>` and each deployment's history in
//!   `revisions.<name>.<revision>`.
//! - [`heartbeat`] — pure: the fleet's heartbeat interval, sized to keep the
//!   fleet under a heartbeat-rate cap; the daemon publishes it in
//!   `settings.heartbeat` (ADR 0015).
//! - [`fleet`] — reads for operators and tests: every agent's status, one
//!   key's typed value, and [`fleet::progress`] — how far a deployment's
//!   change has landed, by the one convergence rule
//!   (`manifest_types::convergence`, ADR 0010).
//! - [`bucket`] — the fleet bucket with the RePublish rule agents depend on,
//!   re-exported from `flotilla_nats::bucket` (ADR 0011), which also holds
//!   connecting, auth and whole-family reads.
//!
//! - [`sites`] — sites whose leaf nodes run JetStream in a domain of their
//!   own (`--site`, ADR 0023): a task keeps each site's buckets sourcing
//!   from the hub's and the hub's from theirs, retrying while a site is
//!   unreachable.
//!
//! - [`http`] — the HTTP surface every instance serves (`--listen`, ADR
//!   0025): `/healthz`, `/readyz`, `/metrics` from the daemon's counters
//!   and the [`census`] — the fleet counted by the one convergence rule
//!   every `--census-interval`, with fixed label sets.
//!
//! - [`args`] — the command line: [`args::Args`] (the NATS connection flags
//!   are `flotilla_nats::NatsArgs`) and [`args::Args::config`], which loads
//!   the signing keys and builds the daemon's [`Config`].
//!
//! The binary `flotilla-control` (`src/main.rs`) only sets up logging,
//! calls [`args::Args::config`] and runs [`daemon::run`] until a signal.
//!
//! Decisions: docs/adr/ (0016 for revisions and staged rollouts, 0014 for per-device values, 0015 for heartbeats and
//! liveness, 0002 for the KV layout and RePublish watch, 0003
//! for generations and CAS, 0012 for owning desired-state and recovering a
//! recreated bucket).

pub mod args;
pub mod bucket;
pub mod census;
pub mod daemon;
pub mod fleet;
pub mod heartbeat;
pub mod http;
pub mod lease;
pub mod publish;
pub mod render;
pub mod rollout;
pub mod sites;

pub use daemon::{Config, DaemonError, NatsAuth, run};
pub use publish::{PublishError, PublishOutcome, publish_manifest};
