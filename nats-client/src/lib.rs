//! # flotilla-nats — the one NATS client layer
//!
//! Everything agent, control plane and CLI share about talking to NATS,
//! defined once (docs/adr/0011-one-nats-client-layer.md). Small on purpose:
//! async-nats, tokio, tracing and the contract crate, nothing heavier, so the agent
//! can use it without growing.
//!
//! The design as a whole (the loop, the KV layout, who writes what, the
//! guarantees): `docs/ARCHITECTURE.md`.
//!
//! ## Tour
//! - [`args`]: [`NatsArgs`], the eight connection flags (`--nats-url`, the
//!   four ways to authenticate, TLS) every program flattens into its own
//!   clap arguments, with their `FLOTILLA_*` variables.
//! - [`auth`]: [`Auth`], one authentication type with one precedence —
//!   credentials file > nkey seed file > user/password > none
//!   ([`Auth::pick`]).
//! - [`connect`]: [`Connector`], the one way to connect: a comma-separated
//!   server list, the caller's client name, optional inbox prefix (agents
//!   confine themselves to `_INBOX.<id>`), retry-on-first-connect and event
//!   callback; [`connect::log_event`] logs events by default, a server's
//!   refusal (wrong, revoked or expired credentials) as an error.
//! - [`tls`]: [`Tls`], TLS to the server — a CA file, optionally a client
//!   certificate (mTLS) — with rustls and `ring` (no OpenSSL on devices).
//! - [`shutdown`]: [`shutdown_signal`], SIGTERM or SIGINT.
//! - [`bucket`]: the fleet bucket's configuration with its RePublish rule
//!   (ADR 0002), [`ensure_bucket`] (control plane and `flotilla apply`) and
//!   [`open_bucket`] (readers; a missing bucket is a typed error); the
//!   heartbeat bucket beside it (history 1, a TTL; ADR 0015) and the control
//!   plane's lease bucket ([`ensure_control_bucket`], ADR 0022); every
//!   bucket with at least the [`Replicas`] asked for, an existing one scaled
//!   up in place (ADR 0021).
//! - [`family`]: [`read_families`] / [`read_keys`] — the current value of a
//!   whole key family (or of a set of keys) in one ordered consumer with
//!   `DeliverPolicy::LastPerSubject`, never one request per key, with each
//!   entry's revision and server timestamp and the server's own clock
//!   ([`family::Snapshot::server_time`]) for ages.
//! - [`site`]: sites with a JetStream domain of their own (ADR 0023):
//!   [`site::SiteName`], the sources between a site's buckets and the
//!   hub's ([`site::ensure_site`], [`site::ensure_hub_sources`]).
//! - [`reports`]: [`AgentReports`] — a snapshot's statuses and heartbeat ages
//!   as the input of the one convergence rule
//!   (`manifest_types::convergence::assess`).

pub mod args;
pub mod auth;
pub mod bucket;
pub mod connect;
pub mod family;
pub mod reports;
pub mod shutdown;
pub mod site;
pub mod tls;

pub use args::{DEFAULT_NATS_URL, NatsArgs};
pub use auth::{Auth, AuthError};
pub use bucket::{
    BucketError, Replicas, bucket_config, control_bucket_config, ensure_bucket,
    ensure_control_bucket, ensure_heartbeat_bucket, heartbeat_bucket_config, open_bucket,
    open_heartbeat_bucket, republish_rule,
};
pub use connect::{ConnectError, Connector};
pub use family::{ReadError, Snapshot, read_families, read_family, read_keys};
pub use reports::{AgentReports, read_reports};
pub use shutdown::shutdown_signal;
pub use tls::{Tls, TlsError};
