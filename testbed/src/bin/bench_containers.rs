//! `flotilla-bench-containers`: the Container reconciler against the real
//! Docker Engine, printed as tables (a benchmark, not a timed test).
//!
//! ```sh
//! ./scripts/test            # once: installs docker.io, starts dockerd, builds the test image
//! cargo build --release --workspace --bins
//! target/release/flotilla-bench-containers [--applies 20] [--containers 10]
//! ```
//!
//! The agent runs as its own process (the release binary) so its memory can
//! be read from `/proc/<pid>/status` and `smaps_rollup`.
//!
//! 1. Apply→Ready, image present: write a manifest, wait until the status
//!    says converged with the container Ready. Measured for a *create* (no
//!    container → one) and a *replace* (env changed → new container swapped
//!    in), side by side, N times each.
//! 2. Memory: VmRSS and Pss of the agent idle with an empty manifest, then
//!    managing M containers, then after a few drift checks.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::kv::Store;
use manifest_types::{AgentId, AgentStatus, BucketName, keys};
use serde_json::{Value, json};
use testbed::docker::{Cleanup, TEST_IMAGE, containers_of, require_engine};
use testbed::{NatsServer, Process};

fn container(id: &str, env: &str) -> Value {
    json!({"id": id, "kind": "Container", "spec": {
        "image": TEST_IMAGE,
        "command": ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"],
        "env": {"GEN": env},
    }})
}

async fn apply(
    store: &Store,
    agent: &AgentId,
    generation: u64,
    resources: Value,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    store
        .put(
            keys::desired_state(agent),
            testbed::manifest_json(agent.as_str(), generation, resources),
        )
        .await?;
    let deadline = start + Duration::from_secs(60);
    let key = keys::actual_state(agent);
    loop {
        if let Some(e) = store.entry(&key).await? {
            let s: AgentStatus = serde_json::from_slice(&e.value)?;
            if s.converged_on(generation) {
                return Ok(start.elapsed());
            }
        }
        if Instant::now() > deadline {
            bail!("generation {generation} did not converge");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn memory(pid: u32) -> (u64, u64) {
    let field = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    (field(&status, "VmRSS:"), field(&smaps, "Pss:"))
}

fn stats(samples: &mut [Duration]) -> (Duration, Duration, Duration) {
    samples.sort();
    let at = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    (at(50), at(90), samples[samples.len() - 1])
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn agent_binary() -> anyhow::Result<std::path::PathBuf> {
    let p = testbed::workspace_root().join("target/release/flotilla-agent");
    if !p.exists() {
        bail!(
            "{} is missing: run `cargo build --release --workspace --bins`",
            p.display()
        );
    }
    Ok(p)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let applies = testbed::bench_arg("--applies", 20) as u64;
    let many = testbed::bench_arg("--containers", 10);
    require_engine();
    let engine = Command::new("docker")
        .args([
            "version",
            "--format",
            "{{.Server.Version}} (API {{.Server.APIVersion}})",
        ])
        .output()
        .context("docker version")?;
    let server = NatsServer::start();
    let js = async_nats::jetstream::new(server.client().await);
    let store =
        flotilla_nats::ensure_bucket(&js, &BucketName::default(), flotilla_nats::Replicas::ONE)
            .await?;
    let dir = tempfile::tempdir()?;
    let agent = AgentId::new(format!("bench-ctr-{}", std::process::id()))?;
    let _cleanup = Cleanup::new(&[agent.as_str()]);
    println!(
        "Docker Engine {}; nats-server on loopback; {} cores",
        String::from_utf8_lossy(&engine.stdout).trim(),
        std::thread::available_parallelism()?
    );

    let mut cmd = Command::new(agent_binary()?);
    cmd.env("FLOTILLA_NATS_URL", server.url())
        .env("FLOTILLA_ID", agent.as_str())
        .env("FLOTILLA_STATE_DIR", dir.path().join("state"))
        .env("FLOTILLA_RESYNC_INTERVAL", "2s")
        .env("FLOTILLA_CONTAINER_STOP_TIMEOUT", "2s")
        .env("RUST_LOG", "warn");
    let process = Process::spawn(cmd, &dir.path().join("agent.log"));
    let pid = process.pid();

    let mut generation = 1;
    apply(&store, &agent, generation, json!([])).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = memory(pid);

    let (mut create, mut replace, mut baseline) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..applies {
        // Baseline in the same run: the docker CLI's own create + start.
        let t = Instant::now();
        let out = Command::new("docker")
            .args([
                "run",
                "-d",
                "--label",
                "flotilla-bench=1",
                TEST_IMAGE,
                "sleep",
                "3600",
            ])
            .output()?;
        baseline.push(t.elapsed());
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Command::new("docker").args(["rm", "-f", &id]).output()?;
        generation += 1;
        create.push(
            apply(
                &store,
                &agent,
                generation,
                json!([container("bench/app", &format!("{i}"))]),
            )
            .await?,
        );
        generation += 1;
        replace.push(
            apply(
                &store,
                &agent,
                generation,
                json!([container("bench/app", &format!("{i}b"))]),
            )
            .await?,
        );
        generation += 1;
        apply(&store, &agent, generation, json!([])).await?;
    }
    let (c50, c90, cmax) = stats(&mut create);
    let (r50, r90, rmax) = stats(&mut replace);
    let (b50, b90, bmax) = stats(&mut baseline);
    println!("\nApply→Ready, image present ({applies} each)\n");
    println!("| operation | p50 | p90 | max |");
    println!("|---|---|---|---|");
    println!(
        "| create (none → 1 container) | {} | {} | {} |",
        ms(c50),
        ms(c90),
        ms(cmax)
    );
    println!(
        "| replace (env changed) | {} | {} | {} |",
        ms(r50),
        ms(r90),
        ms(rmax)
    );
    println!(
        "| baseline: `docker run -d` (CLI, no status) | {} | {} | {} |",
        ms(b50),
        ms(b90),
        ms(bmax)
    );
    println!(
        "\ncreate p50 / docker run p50 = {:.2} (the agent waits 300 ms after a start before calling it Ready)",
        c50.as_secs_f64() / b50.as_secs_f64()
    );

    generation += 1;
    let resources: Vec<Value> = (0..many)
        .map(|i| container(&format!("bench/c{i}"), "x"))
        .collect();
    let t = apply(&store, &agent, generation, Value::Array(resources)).await?;
    let running = containers_of(agent.as_str()).len();
    let with_many = memory(pid);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after_resyncs = memory(pid);
    println!(
        "\nAgent memory ({many} containers converged in {}; {running} running)\n",
        ms(t)
    );
    println!("| agent state | VmRSS | Pss |");
    println!("|---|---|---|");
    println!("| idle, empty manifest | {} KiB | {} KiB |", idle.0, idle.1);
    println!(
        "| managing {many} containers | {} KiB | {} KiB |",
        with_many.0, with_many.1
    );
    println!(
        "| same, after 3 drift checks | {} KiB | {} KiB |",
        after_resyncs.0, after_resyncs.1
    );

    generation += 1;
    apply(&store, &agent, generation, json!([])).await?;
    process.terminate();
    Ok(())
}
