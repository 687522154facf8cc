//! `flotilla-control`: sets up logging, then runs [`flotilla_control::daemon::run`]
//! with the configuration [`flotilla_control::args::Args`] builds.

use std::io::IsTerminal;

use clap::Parser;
use flotilla_control::args::Args;
use flotilla_control::daemon;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn")),
        )
        .init();
    let config = Args::parse().config()?;
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
