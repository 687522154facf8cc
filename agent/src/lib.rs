//! # flotilla-agent — the mini-kubelet on every device
//!
//! The agent watches its own manifest in NATS KV, converges File, Container
//! and SystemdUnit resources, and reports typed status. It keeps converging
//! from its last good manifest while offline, and never destroys what it
//! does not understand.
//!
//! The design as a whole (the loop, the KV layout, who writes what, the
//! guarantees): `docs/ARCHITECTURE.md`.
//!
//! ## Tour
//! - [`agent::run`] — the event loop: RePublish subscription, direct gets after
//!   each (re)connect and on a jittered resync, shutdown. Entry point for the
//!   binary and for in-process tests.
//! - [`gate`] — pure manifest admission, the cached manifest at start
//!   included: signatures first (the trusted keys; ADR 0017), then typed
//!   rejections, the replay floor, file roots, the device owner's container
//!   limits.
//! - [`worker`] — converges the newest accepted manifest beside the loop:
//!   concurrent bounded reconciles in `restartOn` order, interrupts at safe
//!   points when a newer manifest changes a resource, per-resource backoff,
//!   and the removal sweep whose failures stay in the status (`removing`).
//! - [`reconcile`] — one reconciler per kind, each returning an
//!   [`reconcile::Outcome`] that says when to look again:
//!   [`reconcile::file`] (atomic writes on the blocking pool, ledger),
//!   [`reconcile::container`] (labels as the source of truth, a failed
//!   replacement restores the previous container; the engine behind the
//!   [`reconcile::container::ContainerEngine`] seam —
//!   [`reconcile::container::DockerEngine`] via bollard, a scripted fake in
//!   its unit tests) and
//!   [`reconcile::systemd`] (unit-file ledger, level-based triggers, the
//!   four run states; systemd behind the [`reconcile::systemd::UnitManager`]
//!   seam — [`reconcile::systemd::DbusUnits`] over D-Bus via zbus, a scripted
//!   fake in its unit tests).
//! - [`status`] — the status board that assembles [`manifest_types::AgentStatus`].
//! - [`report`] — status writer (CAS, coalesced, identity-checked),
//!   heartbeat and inventory tasks. The heartbeat goes to the heartbeat
//!   bucket beside the fleet bucket, first before any status, at the longer
//!   of `--heartbeat-interval` and the fleet's `settings.heartbeat` (read
//!   every 4 beats), declaring its interval (ADR 0015).
//! - [`kv`] — the agent's entire NATS footprint: direct gets and CAS publishes
//!   on its own keys.
//! - [`state`] — the state directory: instance id, cached manifest, ledgers.
//! - [`config`] — flags, `FLOTILLA_*` environment and TOML file, the
//!   trusted keys (`--trusted-key`, or `--allow-unsigned` for development;
//!   neither is an error); NATS authentication, TLS and connecting are the
//!   shared `flotilla_nats` layer (ADR 0011).
//! - [`fsutil`] — atomic writes, and the `O_NOFOLLOW` walk that keeps File
//!   resources inside their roots under races (ADR 0005).
//! - [`service`] — systemd READY, WATCHDOG and STATUS notifications.
//!
//! Decisions: docs/adr/ (0002 for the watch, 0003 for generations and CAS,
//! 0005 for file ownership, 0008 for containers, 0009 for units, 0013 for the
//! worker and safe change, 0015 for heartbeats).

pub mod agent;
pub mod config;
pub mod fault;
pub mod fsutil;
pub mod gate;
pub mod kv;
pub mod reconcile;
pub mod report;
pub mod service;
pub mod state;
pub mod status;
pub mod worker;

pub use agent::{AgentError, run};
pub use config::Config;
