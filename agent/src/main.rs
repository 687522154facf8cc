//! `flotilla-agent`: parses configuration and runs [`flotilla_agent::run`].

use std::io::IsTerminal;

use clap::Parser;
use flotilla_agent::config::{Args, Config};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        // Colour only on a terminal: not in journald or a log file.
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn")),
        )
        .init();
    let config = Config::from_args(Args::parse())?;
    tracing::info!(agent = %config.agent_id, nats = %config.nats_url, bucket = %config.bucket, auth = config.auth.method(), "starting flotilla-agent");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = flotilla_nats::shutdown_signal()?;
        flotilla_agent::run(config, shutdown).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}
