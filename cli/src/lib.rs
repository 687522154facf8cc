//! # flotilla-cli — the operator CLI (`flotilla`)
//!
//! Operators write deployments into the fleet KV bucket and read back what
//! the control plane rendered and what the agents report. Everything goes
//! through NATS JetStream KV with the key names and documents of
//! `manifest-types`; the CLI never talks to agents or to flotilla-control.
//!
//! The design as a whole (the loop, the KV layout, who writes what, the
//! guarantees): `docs/ARCHITECTURE.md`.
//!
//! ## Commands
//! - `apply -f FILE [--wait [--timeout 60s]] [--expect-revision N]` ([`apply`],
//!   [`wait`]): YAML/JSON → [`manifest_types::Deployment`] → compare-and-swap
//!   into `deployments.<name>`; `--wait` follows `deployment-status.<name>`
//!   (and its rollout, wave by wave) and each target's `actual-state.<agent>`
//!   and `heartbeat.<agent>`.
//! - `get agents|deployments` ([`get`]), `describe agent|deployment` ([`describe`]):
//!   views assembled in [`fleet`] from one whole-family read (one ordered
//!   consumer, `flotilla_nats::family`); ages are server time against server
//!   time. `get control`: the control-plane instance that holds the lease
//!   (docs/adr/0022).
//! - Every state shown (`Converged`, `Progressing`, `Degraded`, `Rejected`,
//!   `Stale`, `Offline`, `IdentityConflict`, `Pending`) is the one
//!   convergence rule's, `manifest_types::convergence::assess` (ADR 0010);
//!   `--heartbeat-interval` sets its liveness thresholds.
//! - `delete deployment NAME` ([`delete`]), `watch` ([`watch`]).
//! - `values get|set|unset AGENT` ([`values`]): the operator's per-agent
//!   values (`values.<id>`) that deployments reference as `${values.k}`;
//!   `label agent AGENT k=v|k-`: the operator's labels in the same document,
//!   the only labels selectors match (ADR 0017).
//! - `keys generate|public|rotate` ([`keys`]): the control plane's manifest
//!   signing keys, offline.
//! - `auth init`, `agent enroll|revoke` ([`enrolment`] over [`authority`]):
//!   the fleet's NATS authority (operator, accounts, JWTs) and per-device
//!   credentials; revocation is pushed to the server (ADR 0017).
//! - `diff -f FILE` ([`diff`]): what an apply would change, field by field,
//!   and how many registered agents each change reaches.
//! - `rollout status|pause|resume|history|undo|default` ([`rollout`]): a
//!   deployment's staged rollout, its revision history and the fleet's
//!   default policy (ADR 0016); `apply --cause` records why, and who is the
//!   `name` of the `--creds` user JWT ([`apply::who`]).
//! - Counters: *revision* is only ever a deployment's (the KV sequence of
//!   `deployments.<name>`, what `rollout history` lists); the KV sequence of
//!   any other key is printed as *KV sequence* (`kvSequence`), e.g. the
//!   desired-state value an agent observed (`describe agent`), a rejected
//!   value, an entry of `watch`.
//! - Global: `-o table|json|yaml` ([`output`]), `--nats-url`
//!   (`FLOTILLA_NATS_URL`, a comma-separated list), `--bucket`
//!   (`FLOTILLA_BUCKET`), and one authentication with the precedence of
//!   `flotilla_nats::Auth`: `--creds` > `--nkey-seed-file` >
//!   `--nats-user`/`--nats-password` > none; `--tls-ca`, `--tls-cert`,
//!   `--tls-key` (`flotilla_nats::Tls`). Only `apply` creates the
//!   bucket ([`kv`]), through `flotilla_nats`, not the control plane.
//!
//! ## Exit codes ([`exit`])
//! | code | meaning |
//! |---|---|
//! | 0 | ok |
//! | 1 | error: connection, I/O, server, no fleet bucket |
//! | 2 | usage, or an invalid document or identifier |
//! | 3 | conflict: another operator changed the deployment since it was read; nothing was overwritten (also: deleted by someone else during `apply --wait`) |
//! | 4 | rejected: an agent rejected the manifest, or flotilla-control reported the deployment invalid (`apply --wait`) |
//! | 5 | timeout (`apply --wait`) |
//! | 6 | not found |
//! | 7 | offline: every target converged except some that are Offline (`apply --wait`) |
//! | 8 | halted: the deployment's staged rollout halted on failures (`apply --wait`, `rollout status`) |
//! | 9 | rolled back: the staged rollout failed and rolled back (`apply --wait`, `rollout status`) |

pub mod apply;
pub mod args;
pub mod authority;
pub mod delete;
pub mod describe;
pub mod diff;
pub mod enrolment;
pub mod exit;
pub mod fleet;
pub mod get;
pub mod keys;
pub mod kv;
pub mod output;
pub mod rollout;
pub mod values;
pub mod wait;
pub mod watch;

pub use args::Cli;
pub use exit::CliError;

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    use args::Command;
    let g = &cli.global;
    match &cli.command {
        Command::Apply(a) => apply::run(g, a).await,
        Command::Get { what } => get::run(g, what).await,
        Command::Describe { what } => describe::run(g, what).await,
        Command::Delete { what } => delete::run(g, what).await,
        Command::Watch => watch::run(g).await,
        Command::Values(v) => values::run(g, &v.action).await,
        Command::Diff(d) => diff::run(g, d).await,
        Command::Keys(k) => keys::run(g, &k.action),
        Command::Label {
            what: args::LabelWhat::Agent { agent, changes },
        } => values::label(g, agent, changes).await,
        Command::Label {
            what: args::LabelWhat::AdoptReported { agents, all },
        } => values::adopt_reported(g, agents, *all).await,
        Command::Auth { action } => enrolment::auth(g, action),
        Command::Agent { action } => enrolment::agent(g, action).await,
        Command::Rollout(r) => rollout::run(g, &r.action).await,
    }
}
