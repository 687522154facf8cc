//! `flotilla-control`: parses flags and runs [`flotilla_control::daemon::run`].

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Parser;
use flotilla_control::daemon::{self, Config, NatsAuth};
use manifest_types::BucketName;
use tracing_subscriber::EnvFilter;

/// Flotilla's control plane: renders deployments into per-agent manifests.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// NATS server URL.
    #[arg(
        long,
        env = "FLOTILLA_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// JetStream KV bucket holding the fleet.
    #[arg(long, env = "FLOTILLA_BUCKET", default_value = manifest_types::keys::DEFAULT_BUCKET)]
    bucket: BucketName,
    /// NATS credentials file (JWT + nkey seed).
    #[arg(
        long,
        env = "FLOTILLA_CREDS",
        value_name = "FILE",
        conflicts_with = "nats_user"
    )]
    creds: Option<PathBuf>,
    /// NATS user (with FLOTILLA_NATS_PASSWORD).
    #[arg(long, env = "FLOTILLA_NATS_USER", requires = "nats_password")]
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
    config.auth = match (args.creds, args.nats_user, args.nats_password) {
        (Some(path), _, _) => NatsAuth::Credentials(path),
        (None, Some(user), Some(password)) => NatsAuth::UserPassword { user, password },
        _ => NatsAuth::None,
    };
    tracing::info!(nats = %config.nats_url, bucket = %config.bucket, "starting flotilla-control");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(daemon::run(config, shutdown_signal()))?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
