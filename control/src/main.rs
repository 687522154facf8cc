//! `flotilla-control`: parses flags and runs [`flotilla_control::daemon::run`].

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Parser;
use flotilla_control::daemon::{self, Config};
use flotilla_nats::Auth;
use manifest_types::BucketName;
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
    config.auth = Auth::pick(
        args.creds,
        args.nkey_seed_file,
        args.nats_user,
        args.nats_password,
    )?;
    tracing::info!(nats = %config.nats_url, bucket = %config.bucket, auth = config.auth.method(), "starting flotilla-control");
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
