//! `flotilla-bench`: apply→converged latency on loopback, printed as tables.
//!
//! A benchmark program, not a timed test: it asserts nothing about speed and
//! prints medians and percentiles measured side by side in one run. See
//! docs/BENCHMARKS.md for results and how to reproduce them:
//!
//! ```sh
//! cargo run --release -p testbed --bin flotilla-bench -- [--applies 200] [--fleet 100]
//! ```
//!
//! 1. Single agent: write the next manifest generation (two File resources)
//!    into `desired-state.<id>`, wait for `actual-state.<id>` to say
//!    converged on it; N times. The agent runs in-process, exactly the code
//!    of the binary, against a real nats-server.
//! 2. Fleet: N agents in-process; one manifest write per agent in a burst;
//!    time until all report converged, repeated a few rounds.
//!
//! `flotilla-bench fleet …` measures the control plane at fleet scale
//! instead (see `fleet.rs`), and `flotilla-bench rollout …` a staged rollout
//! against an all-at-once update (see `rollout.rs`), and `flotilla-bench
//! signing …` what signed manifests cost (see `signing.rs`).

mod fleet;
mod rollout;
mod signing;

use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::kv::Store;
use bytes::Bytes;
use flotilla_agent::Config;
use futures::StreamExt;
use manifest_types::convergence::{AgentReport, Target, Thresholds, assess};
use manifest_types::{AgentId, AgentStatus, BucketName, DeploymentName, ResourceId, keys};
use serde_json::json;
use testbed::NatsServer;
use tokio::sync::oneshot;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("fleet") => return fleet::run().await,
        Some("rollout") => return rollout::run().await,
        Some("signing") => return signing::run(),
        _ => {}
    }
    let applies = testbed::bench_arg("--applies", 200);
    let fleet = testbed::bench_arg("--fleet", 100);
    let rounds = testbed::bench_arg("--rounds", 5);
    let server = NatsServer::start();
    let js = async_nats::jetstream::new(server.client().await);
    let store =
        flotilla_nats::ensure_bucket(&js, &BucketName::default(), flotilla_nats::Replicas::ONE)
            .await?;
    let dir = tempfile::tempdir()?;
    println!(
        "nats-server {} on loopback; {} cores",
        server.url(),
        std::thread::available_parallelism()?
    );

    // 1. Single agent.
    let (_stop, id) = start_agent(&server, dir.path(), "bench-0")?;
    let root = dir.path().join("bench-0/root");
    let mut samples = Vec::with_capacity(applies);
    // One warm-up round (connect, first get, directory creation).
    apply_and_wait(&store, &id, 1, &root).await?;
    for generation in 2..(applies as u64 + 2) {
        let t = Instant::now();
        apply_and_wait(&store, &id, generation, &root).await?;
        samples.push(t.elapsed());
    }
    println!();
    println!("| single agent, 2 File resources | applies | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| write desired-state → status converged | {} | {} | {} | {} | {} |",
        samples.len(),
        ms(percentile(&mut samples, 50)),
        ms(percentile(&mut samples, 90)),
        ms(percentile(&mut samples, 99)),
        ms(percentile(&mut samples, 100)),
    );

    // 1b. Single agent, through the control plane: write a Deployment, the
    // in-process control plane renders it, the agent converges.
    let (stop_control, control_stopped) = oneshot::channel::<()>();
    tokio::spawn(flotilla_control::daemon::run(
        flotilla_control::daemon::Config::new(server.url()),
        async move {
            let _ = control_stopped.await;
        },
    ));
    let (_stop_cp, cp) = start_agent(&server, dir.path(), "bench-cp")?;
    let cp_root = dir.path().join("bench-cp/root").canonicalize()?;
    let mut through = Vec::with_capacity(applies);
    for i in 0..=applies {
        let t = Instant::now();
        let revision = store
            .put("deployments.bench", deployment(&cp, i, &cp_root))
            .await?;
        wait_deployment(&store, &cp, revision).await?;
        if i > 0 {
            through.push(t.elapsed());
        }
    }
    println!(
        "| write deployment → control plane renders → status converged | {} | {} | {} | {} | {} |",
        through.len(),
        ms(percentile(&mut through, 50)),
        ms(percentile(&mut through, 90)),
        ms(percentile(&mut through, 99)),
        ms(percentile(&mut through, 100)),
    );
    let _ = stop_control.send(());

    // 2. Fleet.
    let mut agents = Vec::new();
    for i in 1..=fleet {
        agents.push(start_agent(&server, dir.path(), &format!("fleet-{i}"))?);
    }
    let mut times = Vec::new();
    for round in 1..=rounds as u64 {
        let t = Instant::now();
        let mut watch = store.watch(keys::all(keys::ACTUAL_STATE)).await?;
        for (_, id) in &agents {
            let root = dir.path().join(id.as_str()).join("root");
            store
                .put(keys::desired_state(id), manifest(id, round, &root))
                .await?;
        }
        let mut converged = std::collections::BTreeSet::new();
        while converged.len() < agents.len() {
            let entry = tokio::time::timeout(Duration::from_secs(60), watch.next())
                .await
                .context("fleet did not converge within 60 s")?
                .context("watch ended")??;
            if let Ok(s) = serde_json::from_slice::<AgentStatus>(&entry.value)
                && s.converged_on(round)
            {
                converged.insert(s.agent_id);
            }
        }
        times.push(t.elapsed());
    }
    println!();
    println!("| fleet | agents | rounds | median all-converged | best | worst |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| write {fleet} manifests → all statuses converged | {fleet} | {rounds} | {} | {} | {} |",
        ms(percentile(&mut times, 50)),
        ms(percentile(&mut times, 0)),
        ms(percentile(&mut times, 100)),
    );
    drop(agents);
    Ok(())
}

fn start_agent(
    server: &NatsServer,
    dir: &std::path::Path,
    id: &str,
) -> anyhow::Result<(oneshot::Sender<()>, AgentId)> {
    let agent = AgentId::new(id)?;
    let root = dir.join(id).join("root");
    std::fs::create_dir_all(&root)?;
    let config = Config::new(server.url(), agent.clone(), dir.join(id).join("state"))
        .with_file_root(&root)?;
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(flotilla_agent::run(config, async move {
        let _ = rx.await;
    }));
    Ok((tx, agent))
}

fn manifest(id: &AgentId, generation: u64, root: &std::path::Path) -> Bytes {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    Bytes::from(
        json!({
            "apiVersion": "flotilla.dev/v1", "agentId": id, "generation": generation,
            "resources": [
                {"id": "bench/config", "kind": "File", "spec": {"path": root.join("app/config.toml"), "content": format!("generation = {generation}\n"), "mode": "0640"}},
                {"id": "bench/motd", "kind": "File", "spec": {"path": root.join("motd"), "content": format!("hello {generation}\n")}}
            ]
        })
        .to_string(),
    )
}

async fn apply_and_wait(
    store: &Store,
    id: &AgentId,
    generation: u64,
    root: &std::path::Path,
) -> anyhow::Result<()> {
    let mut watch = store.watch(keys::actual_state(id)).await?;
    store
        .put(keys::desired_state(id), manifest(id, generation, root))
        .await?;
    loop {
        let entry = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .with_context(|| format!("generation {generation} did not converge in 10 s"))?
            .context("watch ended")??;
        if serde_json::from_slice::<AgentStatus>(&entry.value)
            .is_ok_and(|s| s.converged_on(generation))
        {
            return Ok(());
        }
    }
}

fn deployment(agent: &AgentId, i: usize, root: &std::path::Path) -> Bytes {
    Bytes::from(
        json!({
            "apiVersion": "flotilla.dev/v1", "kind": "Deployment", "name": "bench",
            "selector": {"agents": [agent]},
            "resources": [
                {"id": "config", "kind": "File", "spec": {"path": root.join("app/config.toml"), "content": format!("apply = {i}\n"), "mode": "0640"}},
                {"id": "motd", "kind": "File", "spec": {"path": root.join("motd"), "content": format!("hello {i}\n")}}
            ]
        })
        .to_string(),
    )
}

/// Waits until `agent` is converged on revision `revision` of the
/// deployment [`deployment`] puts ([`converged_on_revision`]).
async fn wait_deployment(store: &Store, agent: &AgentId, revision: u64) -> anyhow::Result<()> {
    let name = DeploymentName::new("bench")?;
    let resources = [
        ResourceId::new("bench/config")?,
        ResourceId::new("bench/motd")?,
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut watch = store.watch_with_history(keys::actual_state(agent)).await?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let entry = tokio::time::timeout(left, watch.next())
            .await
            .with_context(|| format!("deployment revision {revision} did not converge in 10 s"))?
            .context("watch ended")??;
        if let Ok(s) = serde_json::from_slice::<AgentStatus>(&entry.value)
            && converged_on_revision(&s, &name, &resources, revision)
        {
            return Ok(());
        }
    }
}

/// Whether `status`, just received, shows its agent converged on revision
/// `revision` of `deployment`, which renders `resources` for it: the one
/// convergence rule ([`assess`] for [`Target::Deployment`]) applied as
/// [`AgentStatus::converged_on`] applies it to a status just received (its
/// arrival is the liveness proof). A status does not say which manifest
/// generation carried the revision; the one the agent accepted stands in for
/// it, as a status reporting the revision's resources was written on that
/// generation or a later one.
pub(crate) fn converged_on_revision(
    status: &AgentStatus,
    deployment: &DeploymentName,
    resources: &[ResourceId],
    revision: u64,
) -> bool {
    let report = AgentReport {
        status: Some(status),
        heartbeat_age: Some(Duration::ZERO),
        ..Default::default()
    };
    let target = Target::Deployment {
        name: deployment,
        revision,
        generation: status.manifest_generation,
        resources,
    };
    assess(&report, target, &Thresholds::default()).is_converged()
}

pub(crate) fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort();
    let idx = ((samples.len() - 1) * p).div_ceil(100);
    samples[idx.min(samples.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
