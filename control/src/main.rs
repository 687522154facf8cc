//! `flotilla-control`: parses flags and runs [`flotilla_control::daemon::run`].

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use flotilla_control::daemon::{self, Config};
use flotilla_nats::Auth;
use manifest_types::BucketName;
use manifest_types::signing::{Signer, SigningKeys};
use tracing_subscriber::EnvFilter;

/// Flotilla's control plane: renders deployments into per-agent manifests.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// NATS server URL, or a comma-separated list.
    #[arg(
        long,
        env = "FLOTILLA_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// JetStream KV bucket holding the fleet.
    #[arg(long, env = "FLOTILLA_BUCKET", default_value = manifest_types::keys::DEFAULT_BUCKET)]
    bucket: BucketName,
    /// NATS credentials file (JWT + nkey seed). Wins over every other method.
    #[arg(long, env = "FLOTILLA_CREDS", value_name = "FILE")]
    creds: Option<PathBuf>,
    /// File holding an nkey user seed. Wins over user/password.
    #[arg(long, env = "FLOTILLA_NKEY_SEED_FILE", value_name = "FILE")]
    nkey_seed_file: Option<PathBuf>,
    /// NATS user (with FLOTILLA_NATS_PASSWORD).
    #[arg(long, env = "FLOTILLA_NATS_USER")]
    nats_user: Option<String>,
    #[arg(long, env = "FLOTILLA_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// CA certificate (PEM) the NATS server's certificate must chain to; TLS
    /// is then required.
    #[arg(long, env = "FLOTILLA_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that verify clients (mTLS).
    #[arg(long, env = "FLOTILLA_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "FLOTILLA_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Heartbeats per second the whole fleet may send: the published
    /// heartbeat interval grows with the fleet to keep under it.
    #[arg(long, env = "FLOTILLA_HEARTBEAT_MAX_RATE", default_value_t = 500)]
    heartbeat_max_rate: u64,
    /// Shortest heartbeat interval published (agents whose own is longer keep theirs).
    #[arg(long, env = "FLOTILLA_HEARTBEAT_MIN_INTERVAL", value_parser = humantime::parse_duration, default_value = "100ms")]
    heartbeat_min_interval: std::time::Duration,
    /// Longest heartbeat interval published, however large the fleet.
    #[arg(long, env = "FLOTILLA_HEARTBEAT_MAX_INTERVAL", value_parser = humantime::parse_duration, default_value = "10m")]
    heartbeat_max_interval: std::time::Duration,
    /// Fixed age of the last heartbeat (server time) after which a rollout
    /// counts an agent Stale; default: 3 of the intervals it declares.
    #[arg(long, env = "FLOTILLA_STALE_AFTER", value_parser = humantime::parse_duration)]
    stale_after: Option<std::time::Duration>,
    /// … and Offline (not waited for); default: 10 declared intervals.
    #[arg(long, env = "FLOTILLA_OFFLINE_AFTER", value_parser = humantime::parse_duration)]
    offline_after: Option<std::time::Duration>,
    /// While a rollout is in progress, judge it at least this often.
    #[arg(long, env = "FLOTILLA_ROLLOUT_RECHECK", value_parser = humantime::parse_duration, default_value = "1s")]
    rollout_recheck: std::time::Duration,
    /// File holding the nkey seed manifests are signed with (`flotilla keys
    /// generate`). Repeat it while rotating: every manifest then carries a
    /// signature by each key. None: manifests are unsigned, and only agents
    /// run with --allow-unsigned accept them.
    #[arg(
        long = "signing-key-file",
        env = "FLOTILLA_SIGNING_KEY_FILES",
        value_delimiter = ',',
        value_name = "FILE"
    )]
    signing_key_files: Vec<PathBuf>,
}

/// The signing keys from their seed files; the seed itself never reaches a
/// log or an error message.
fn signing_keys(files: &[PathBuf]) -> anyhow::Result<SigningKeys> {
    let mut signers = Vec::new();
    for file in files {
        let seed = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the signing key file {}", file.display()))?;
        let signer = Signer::from_seed(&seed)
            .with_context(|| format!("{} does not hold an nkey seed", file.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(file)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(file = %file.display(), mode = format!("{:o}", mode & 0o777), "the signing key file is readable by others than its owner; chmod 600 it");
            }
        }
        signers.push(signer);
    }
    Ok(SigningKeys::new(signers))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn")),
        )
        .init();
    let args = Args::parse();
    let mut config = Config::new(args.nats_url);
    config.bucket = args.bucket;
    config.heartbeat = flotilla_control::heartbeat::HeartbeatPolicy {
        max_per_second: args.heartbeat_max_rate.max(1),
        min_interval: args.heartbeat_min_interval,
        max_interval: args.heartbeat_max_interval,
    };
    config.thresholds.stale_after = args.stale_after;
    config.thresholds.offline_after = args.offline_after;
    config.rollout_recheck = args.rollout_recheck;
    config.auth = Auth::pick(
        args.creds,
        args.nkey_seed_file,
        args.nats_user,
        args.nats_password,
    )?;
    config.tls = flotilla_nats::Tls::pick(args.tls_ca, args.tls_cert, args.tls_key)?;
    config.signing = std::sync::Arc::new(signing_keys(&args.signing_key_files)?);
    if config.signing.is_empty() {
        tracing::warn!(
            "no --signing-key-file: manifests are written unsigned, and only agents run with --allow-unsigned accept them"
        );
    }
    tracing::info!(nats = %config.nats_url, bucket = %config.bucket, auth = config.auth.method(), signing_keys = ?config.signing.key_ids(), "starting flotilla-control");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = flotilla_nats::shutdown_signal()?;
        daemon::run(config, shutdown).await?;
        anyhow::Ok(())
    })?;
    tracing::info!("stopped");
    Ok(())
}
