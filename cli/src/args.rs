//! Command-line arguments (clap derive).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use manifest_types::{AgentId, BucketName, DeploymentName};

const LONG_ABOUT: &str = "\
The Flotilla operator CLI.

Operators write deployments (`deployments.<name>` in the fleet KV bucket);
flotilla-control renders them into one manifest per selected agent, and each
agent reports its status back. This tool writes and reads those keys.

Exit codes:
  0  ok
  1  error (connection, I/O, server, no fleet bucket)
  2  usage, or an invalid document or identifier
  3  conflict: the deployment changed since it was read (another operator won
     the compare-and-swap); nothing was overwritten. Also: deleted by someone
     else during apply --wait
  4  rejected: an agent rejected the manifest, or flotilla-control reported the
     deployment invalid (apply --wait)
  5  timeout (apply --wait)
  6  not found
  7  offline: every target converged except some that are Offline (apply
     --wait); they converge on their own when they come back
  8  halted: the deployment's staged rollout halted on failures (apply --wait,
     rollout status)
  9  rolled back: the staged rollout failed and rolled back (likewise)";

#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about = "The Flotilla operator CLI", long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    #[command(flatten)]
    pub nats: flotilla_nats::NatsArgs,
    /// The fleet KV bucket.
    #[arg(long, global = true, env = "FLOTILLA_BUCKET", default_value = "fleet")]
    pub bucket: BucketName,
    /// The heartbeat period assumed for agents whose heartbeat does not
    /// declare one (older agents). Every agent is Stale after 3 missed
    /// heartbeats and Offline after 10 of its own interval (ADR 0010, 0015),
    /// unless --stale-after / --offline-after fix the limits.
    #[arg(long, global = true, env = "FLOTILLA_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration, default_value = "15s")]
    pub heartbeat_interval: Duration,
    /// Fixed age of the last heartbeat (server time) after which an agent is
    /// Stale, whatever interval it declares.
    #[arg(long, global = true, env = "FLOTILLA_STALE_AFTER", value_parser = humantime::parse_duration)]
    pub stale_after: Option<Duration>,
    /// Fixed age of the last heartbeat (server time) after which an agent is
    /// Offline, whatever interval it declares.
    #[arg(long, global = true, env = "FLOTILLA_OFFLINE_AFTER", value_parser = humantime::parse_duration)]
    pub offline_after: Option<Duration>,
}

impl GlobalArgs {
    /// Liveness thresholds: the flags, else each agent's declared interval.
    pub fn thresholds(&self) -> manifest_types::convergence::Thresholds {
        manifest_types::convergence::Thresholds {
            stale_after: self.stale_after,
            offline_after: self.offline_after,
            assumed_interval: self.heartbeat_interval,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update a deployment from a YAML or JSON file.
    Apply(ApplyArgs),
    /// List agents or deployments.
    Get {
        #[command(subcommand)]
        what: GetWhat,
    },
    /// Show one agent or deployment in detail.
    Describe {
        #[command(subcommand)]
        what: DescribeWhat,
    },
    /// Delete a deployment (flotilla-control then removes its resources from the agents).
    Delete {
        #[command(subcommand)]
        what: DeleteWhat,
    },
    /// Print one line per change of agent status, inventory, deployments and
    /// deployment status, until Ctrl-C.
    Watch,
    /// Show what applying a file would change: resources added, changed
    /// (field by field) and removed, and how many agents each reaches.
    Diff(DiffArgs),
    /// A deployment's staged rollout and revision history (docs/adr/0016).
    Rollout(RolloutArgs),
    /// Show or change one agent's per-device values (`values.<id>`), which
    /// deployments reference as `${values.<key>}` (docs/adr/0014).
    Values(ValuesArgs),
    /// The control plane's manifest signing keys (docs/adr/0017). Works
    /// offline: no NATS connection.
    Keys(KeysArgs),
    /// Set or remove an agent's operator-owned labels, which deployment
    /// selectors match (`values.<id>`; docs/adr/0017): `key=value` sets,
    /// `key-` removes. Without changes: print them.
    Label {
        #[command(subcommand)]
        what: LabelWhat,
    },
    /// The fleet's NATS authority: operator, accounts and credentials
    /// (docs/adr/0017). Works offline on the auth directory.
    Auth {
        #[command(subcommand)]
        action: AuthAction,
    },
    /// Enrol or revoke a device (docs/adr/0017).
    Agent {
        #[command(subcommand)]
        action: AgentAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuthAction {
    /// Create the authority in DIR: keys, JWTs, credentials for the control
    /// plane (control.creds) and operators (operator.creds), and
    /// nats-auth.conf for nats-server to include.
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Where nats-server keeps account JWTs (it must be able to write there).
        #[arg(long, value_name = "DIR", default_value = "/var/lib/nats/jwt")]
        resolver_dir: PathBuf,
    },
    /// Write what a site's leaf node needs into OUT (docs/adr/0023):
    /// site.conf for deploy/nats/leaf/flotilla-leaf.conf to include, and
    /// its uplink credentials. Again after `agent revoke`: keeps the
    /// credentials, refreshes the accounts site.conf preloads.
    Site {
        /// The site's name, also its server's name.
        name: String,
        #[arg(long, value_name = "DIR", env = "FLOTILLA_AUTH_DIR")]
        dir: PathBuf,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The hub's leaf-node URL (repeat for each hub node), e.g. tls://hub:7422.
        #[arg(long = "hub", value_name = "URL", required = true)]
        hub: Vec<String>,
        /// Where the credentials are installed on the site server.
        #[arg(long, value_name = "DIR", default_value = "/etc/nats")]
        install_dir: PathBuf,
        /// The CA of the hub's certificate, on the site server.
        #[arg(long, value_name = "FILE", default_value = "/etc/nats/tls/ca.pem")]
        hub_ca: PathBuf,
        /// The site server's account cache (it must be able to write there).
        #[arg(long, value_name = "DIR", default_value = "/var/lib/nats/jwt")]
        resolver_dir: PathBuf,
        /// The hub's JetStream domain (as flotilla-control --hub-domain).
        #[arg(long, default_value = "hub")]
        hub_domain: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentAction {
    /// Issue a device's credentials: a new user key allowed exactly its own
    /// subjects. Also sets the operator's labels given with --label.
    Enroll {
        agent: AgentId,
        /// The auth directory (`flotilla auth init`).
        #[arg(long, value_name = "DIR", env = "FLOTILLA_AUTH_DIR")]
        auth_dir: PathBuf,
        /// Where the credentials go (mode 0600, never overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Expire the credentials after this long, e.g. "365d".
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        /// An operator label for the device (repeatable); written to the fleet.
        #[arg(long = "label", value_parser = parse_label_change, value_name = "KEY=VALUE")]
        labels: Vec<LabelChange>,
    },
    /// Revoke every credential issued to a device and push the change to the
    /// server: its connections are closed and new ones refused.
    Revoke {
        agent: AgentId,
        #[arg(long, value_name = "DIR", env = "FLOTILLA_AUTH_DIR")]
        auth_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum LabelWhat {
    Agent {
        agent: AgentId,
        #[arg(value_parser = parse_label_change, value_name = "KEY=VALUE|KEY-")]
        changes: Vec<LabelChange>,
    },
    /// Make the labels devices report about themselves (`agents.<id>`)
    /// operator labels, where the operator has no label of that key: the
    /// upgrade path from selectors that matched reported labels, run once.
    /// Only for devices whose claims you vouch for.
    AdoptReported {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        agents: Vec<AgentId>,
        /// Every agent that reports labels.
        #[arg(long)]
        all: bool,
    },
}

/// One change of `flotilla label agent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelChange {
    Set(String, String),
    Remove(String),
}

fn parse_label_change(s: &str) -> Result<LabelChange, String> {
    if let Some((k, v)) = s.split_once('=') {
        manifest_types::inventory::validate_label(k, v)?;
        return Ok(LabelChange::Set(k.to_owned(), v.to_owned()));
    }
    match s.strip_suffix('-') {
        Some(k) => {
            manifest_types::inventory::validate_label(k, "")?;
            Ok(LabelChange::Remove(k.to_owned()))
        }
        None => Err(format!("{s:?}: expected key=value or key-")),
    }
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub action: KeysAction,
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Create a signing key: the seed goes to FILE (mode 0600, never
    /// overwritten), the public key agents trust is printed.
    Generate {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the public key of a seed file.
    Public { file: PathBuf },
    /// Create the key that replaces CURRENT and print the steps that move
    /// the fleet to it with no downtime.
    Rotate {
        /// The seed file flotilla-control signs with now.
        #[arg(long, value_name = "FILE")]
        current: PathBuf,
        /// Where the new seed goes (mode 0600, never overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The deployment document (YAML or JSON); `-` reads stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub action: RolloutAction,
}

#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Phase, wave and per-revision counts (exit 8: halted, 9: rolled back).
    Status { name: DeploymentName },
    /// Release no further agents until `resume`.
    Pause { name: DeploymentName },
    /// Continue a paused rollout; a halted one is judged again.
    Resume { name: DeploymentName },
    /// The revisions kept: when, by whom, and what changed.
    History { name: DeploymentName },
    /// The fleet's default rollout policy (`settings.rollout`), for
    /// deployments without their own: print it, `--set FILE`, or `--clear`.
    Default {
        /// A YAML or JSON policy, the shape of a deployment's `rollout:`.
        #[arg(long, value_name = "FILE", conflicts_with = "clear")]
        set: Option<PathBuf>,
        #[arg(long)]
        clear: bool,
    },
    /// Restore an earlier revision (default: the one before the current)
    /// as a new revision.
    Undo {
        name: DeploymentName,
        #[arg(long, value_name = "N")]
        to_revision: Option<u64>,
        /// Why, for the history (default: "undo to revision N").
        #[arg(long)]
        cause: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct ValuesArgs {
    #[command(subcommand)]
    pub action: ValuesAction,
}

#[derive(Debug, Subcommand)]
pub enum ValuesAction {
    /// Print the agent's values.
    Get { agent: AgentId },
    /// Set values: `key=value` pairs (an empty value is a value; use `unset`
    /// to remove a key).
    Set {
        agent: AgentId,
        #[arg(required = true, value_parser = parse_pair, value_name = "KEY=VALUE")]
        pairs: Vec<(String, String)>,
    },
    /// Remove keys.
    Unset {
        agent: AgentId,
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    manifest_types::template::validate_value(k, v)?;
    Ok((k.to_owned(), v.to_owned()))
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The deployment document (YAML or JSON); `-` reads stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// Wait until every targeted agent has converged on the written revision.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 90s, 5m).
    #[arg(long, value_parser = parse_duration, default_value = "60s", requires = "wait")]
    pub timeout: Duration,
    /// Write only if the deployment is at this revision, the KV sequence of
    /// `deployments.<name>` (0: only if it does not exist).
    #[arg(long, value_name = "N")]
    pub expect_revision: Option<u64>,
    /// Why, for the deployment's history (`flotilla rollout history`).
    #[arg(long)]
    pub cause: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum GetWhat {
    /// Every agent known to the bucket.
    #[command(visible_alias = "agent")]
    Agents,
    /// Every deployment and its progress.
    #[command(visible_alias = "deployment", visible_alias = "deploy")]
    Deployments,
    /// Which flotilla-control instance acts for the fleet (it holds the
    /// control lease, docs/adr/0022); the others follow.
    Control,
}

#[derive(Debug, Subcommand)]
pub enum DescribeWhat {
    /// Inventory, conditions and per-resource status of one agent.
    #[command(visible_alias = "agents")]
    Agent { id: AgentId },
    /// Selector, resources and per-target state of one deployment.
    #[command(visible_alias = "deployments", visible_alias = "deploy")]
    Deployment { name: DeploymentName },
}

#[derive(Debug, Subcommand)]
pub enum DeleteWhat {
    /// Delete `deployments.<name>`.
    #[command(visible_alias = "deployments", visible_alias = "deploy")]
    Deployment { name: DeploymentName },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 30s, 5m)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_apply_with_wait() {
        let cli = Cli::try_parse_from([
            "flotilla",
            "-o",
            "json",
            "apply",
            "-f",
            "x.yaml",
            "--wait",
            "--timeout",
            "2m",
            "--bucket",
            "b",
        ])
        .unwrap();
        assert_eq!(cli.global.output, Format::Json);
        assert_eq!(cli.global.bucket.as_str(), "b");
        let Command::Apply(a) = cli.command else {
            panic!()
        };
        assert!(a.wait);
        assert_eq!(a.timeout, Duration::from_secs(120));
    }

    #[test]
    fn invalid_ids_are_usage_errors() {
        let err = Cli::try_parse_from(["flotilla", "describe", "agent", "Bad.Id"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("invalid agent id"), "{err}");
    }

    #[test]
    fn timeout_needs_wait() {
        assert!(Cli::try_parse_from(["flotilla", "apply", "-f", "x", "--timeout", "1s"]).is_err());
    }
}
