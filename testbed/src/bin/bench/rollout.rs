//! `flotilla-bench rollout`: what a staged rollout costs (docs/adr/0016).
//!
//! One fleet of N in-process agents (as in `fleet.rs`), the real release
//! `flotilla-control`, one label-selected Deployment. Measured side by side
//! in one run, alternating, `--runs` times each:
//! 1. **all at once**: a content update with no rollout policy; time until
//!    every agent has converged on it;
//! 2. **waves**: a content update under `rollout: {waves: "<100/W>%"}` with
//!    zero soak (W waves, the first acting as canary); time until every agent
//!    has converged on it and the rollout is Complete.
//!
//! For each: the median time, flotilla-control's CPU, and the bytes written
//! to the fleet bucket per update (every `$KV.fleet.>` publish, by key
//! family: manifests, statuses, deployment status, history).
//!
//! ```sh
//! cargo build --release --workspace --bins
//! target/release/flotilla-bench rollout --agents 1000 --waves 10 --runs 3
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::Store;
use bytes::Bytes;
use futures::StreamExt;
use manifest_types::{BucketName, DeploymentStatus, keys};
use serde_json::json;

use crate::fleet::{Bench, cpu_seconds, deployment_value, ms};

pub async fn run() -> anyhow::Result<()> {
    let n = testbed::bench_arg("--agents", 1000);
    let waves = testbed::bench_arg("--waves", 10).max(1);
    let runs = testbed::bench_arg("--runs", 3).max(1);
    println!("{} cores", std::thread::available_parallelism()?);
    let bench = Bench::start().await?;
    let Bench {
        servers,
        files,
        control,
        store,
        converged,
        ..
    } = &bench;
    let client = servers.client().await;
    let agents = bench.agents(n).await?;
    eprintln!("{n} agents registered");

    // Every publish into the fleet bucket, by key family.
    let bytes: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut sub = client
        .subscribe(format!("$KV.{}.>", BucketName::default()))
        .await?;
    let tally = bytes.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let family = m.subject.split('.').nth(2).unwrap_or_default().to_owned();
            *tally
                .lock()
                .expect("not poisoned")
                .entry(family)
                .or_default() += m.payload.len() as u64;
        }
    });

    // A first revision everywhere, so both modes start from the same place.
    let mut step = 0usize;
    let revision = store
        .put("deployments.bench", doc(files, step, None))
        .await?;
    converged
        .wait(n, revision, Duration::from_secs(300))
        .await?;

    let share = 100usize.div_ceil(waves);
    let policy = json!({"waves": format!("{share}%")});
    let mut rows: BTreeMap<&str, Vec<Measured>> = BTreeMap::new();
    for run in 0..runs {
        for (mode, policy) in [("all at once", None), ("waves", Some(&policy))] {
            step += 1;
            let staged = policy.is_some();
            bytes.lock().expect("not poisoned").clear();
            let cpu = cpu_seconds(control.pid())?;
            let t = Instant::now();
            let revision = store
                .put("deployments.bench", doc(files, step, policy))
                .await?;
            converged
                .wait(n, revision, Duration::from_secs(600))
                .await?;
            if staged {
                complete(store, revision).await?;
            }
            let took = t.elapsed();
            let cpu = cpu_seconds(control.pid())? - cpu;
            // Let the last status writes land in the tally.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let written = bytes.lock().expect("not poisoned").clone();
            eprintln!("run {run}: {mode}: {took:?}");
            rows.entry(mode).or_default().push((took, cpu, written));
        }
    }
    drop(agents);

    println!();
    println!(
        "| {n} agents, median of {runs} | until all converged | ratio | flotilla-control CPU | per wave | KV bytes written: manifests / agent statuses / deployment status / history |"
    );
    println!("|---|---|---|---|---|---|");
    let base = median(rows["all at once"].iter().map(|r| r.0).collect());
    for (mode, label, w) in [
        ("all at once", "all at once".to_owned(), 1),
        ("waves", format!("{waves} waves, zero soak"), waves),
    ] {
        let r = &rows[mode];
        let took = median(r.iter().map(|r| r.0).collect());
        let cpu = median_f(r.iter().map(|r| r.1).collect());
        let family =
            |f: &str| median_u(r.iter().map(|r| r.2.get(f).copied().unwrap_or(0)).collect());
        println!(
            "| {label} | {} | {:.2}x | {cpu:.2} s | {:.0} ms | {} / {} / {} / {} |",
            ms(took),
            took.as_secs_f64() / base.as_secs_f64(),
            cpu * 1000.0 / w as f64,
            kb(family(keys::DESIRED_STATE)),
            kb(family(keys::ACTUAL_STATE)),
            kb(family(keys::DEPLOYMENT_STATUS)),
            kb(family(keys::REVISIONS)),
        );
    }
    Ok(())
}

/// One update: how long until all converged, control-plane CPU seconds,
/// and bytes written per key family.
type Measured = (Duration, f64, BTreeMap<String, u64>);

/// Waits until the rollout of `revision` is Complete.
async fn complete(store: &Store, revision: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(b) = store.get("deployment-status.bench").await?
            && let Ok(s) = serde_json::from_slice::<DeploymentStatus>(&b)
            && s.rollout.as_ref().is_some_and(|r| {
                r.revision == revision && r.phase == manifest_types::rollout::Phase::Complete
            })
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "rollout of {revision} not complete"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn doc(files: &std::path::Path, i: usize, policy: Option<&serde_json::Value>) -> Bytes {
    let mut d = deployment_value(files, i);
    if let Some(p) = policy {
        d["rollout"] = p.clone();
    }
    Bytes::from(d.to_string())
}

fn median(mut v: Vec<Duration>) -> Duration {
    crate::percentile(&mut v, 50)
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_u(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn kb(b: u64) -> String {
    format!("{:.1} KB", b as f64 / 1000.0)
}
