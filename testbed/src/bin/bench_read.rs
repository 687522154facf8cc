//! `flotilla-bench-read`: how fast `flotilla get agents` reads a big fleet.
//!
//! A benchmark program, not a timed test. For each fleet size N it starts a
//! real nats-server, seeds N agents' four keys (`agents.<id>`,
//! `actual-state.<id>`, `heartbeat.<id>`, `desired-state.<id>`, realistic
//! documents), then times, median of `--runs` runs each, side by side:
//! 1. `flotilla get agents -o json` — the real binary, built in release
//!    (`target/release/flotilla`), as an operator runs it;
//! 2. the same read in-process: one ordered consumer over the four families
//!    (`flotilla_nats::read_families`, what the CLI does);
//! 3. the old way in-process: list every key, then one direct get per key
//!    (32 in flight), as the CLI did before `flotilla-nats`.
//!
//! ```sh
//! cargo build --release -p flotilla-cli --bin flotilla
//! cargo run --release -p testbed --bin flotilla-bench-read -- --agents 100,1000,10000 --runs 5
//! ```

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, kv::Store};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use manifest_types::{AgentId, BucketName, keys};
use serde_json::json;
use testbed::NatsServer;

fn list_arg(name: &str, default: &str) -> Vec<usize> {
    let args: Vec<String> = std::env::args().collect();
    let raw = args
        .iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_owned());
    raw.split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn release_cli() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| testbed::workspace_root().join("target"));
    let path = dir.join("release").join("flotilla");
    if !path.exists() {
        bail!(
            "{} is not built: run `cargo build --release -p flotilla-cli --bin flotilla`",
            path.display()
        );
    }
    Ok(path)
}

fn status(id: &str, generation: u64) -> serde_json::Value {
    let file = |n: u32| {
        (
            format!("web/file-{n}"),
            json!({"kind": "File", "specHash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                   "source": {"deployment": "web", "revision": 7},
                   "state": "ready", "since": "2026-12-02T10:00:00Z",
                   "details": {"kind": "File", "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                               "size": 120, "mode": "0644", "uid": 0, "gid": 0}}),
        )
    };
    let resources: serde_json::Map<String, serde_json::Value> = (1..=3).map(file).collect();
    let cond = |t: &str, s: bool, r: &str| {
        json!({"type": t, "status": s, "reason": r, "message": "",
               "lastTransitionTime": "2026-12-02T10:00:00Z"})
    };
    json!({
        "apiVersion": "flotilla.dev/v1", "agentId": id, "instanceId": uuid_like(id),
        "manifestGeneration": generation, "observedGeneration": generation,
        "observedRevision": 12, "resources": resources,
        "conditions": [cond("Ready", true, "AllReady"), cond("Reconciling", false, "Idle"),
                       cond("Degraded", false, "NoFailures")],
        "agent": {"version": "0.1.0", "arch": "aarch64", "os": "linux"},
    })
}

fn uuid_like(id: &str) -> String {
    format!("00000000-0000-4000-8000-{:0>12}", id.len())
}

/// Seeds `n` agents' four keys; returns how many keys were written.
async fn seed(js: &jetstream::Context, n: usize) -> anyhow::Result<usize> {
    let bucket = BucketName::default();
    let docs = |i: usize| {
        let id = format!("pi-{i:05}");
        let a = AgentId::new(&id).expect("valid id");
        let inventory = json!({"apiVersion": "flotilla.dev/v1", "agentId": id, "instanceId": uuid_like(&id),
            "agentVersion": "0.1.0", "arch": "aarch64", "os": "linux", "hostname": id,
            "reconcilers": ["File", "Container", "SystemdUnit"], "labels": {"role": "kiosk", "site": "lobby"}});
        let heartbeat = json!({"apiVersion": "flotilla.dev/v1", "agentId": id, "instanceId": uuid_like(&id),
            "seq": 42, "manifestGeneration": 4, "ready": true});
        let files = json!([
            {"id": "web/file-1", "kind": "File", "spec": {"path": "/etc/a", "content": "x"}},
            {"id": "web/file-2", "kind": "File", "spec": {"path": "/etc/b", "content": "y"}},
        ]);
        [
            (keys::inventory(&a), Bytes::from(inventory.to_string())),
            (
                keys::actual_state(&a),
                Bytes::from(status(&id, 4).to_string()),
            ),
            (keys::heartbeat(&a), Bytes::from(heartbeat.to_string())),
            (
                keys::desired_state(&a),
                testbed::manifest_json(&id, 4, files),
            ),
        ]
    };
    let beats = BucketName::new(keys::heartbeat_bucket(&bucket))?;
    let writes = futures::stream::iter((0..n).flat_map(docs))
        .map(|(key, value)| {
            let js = js.clone();
            // Heartbeats live in their own bucket (docs/adr/0015).
            let subject = match key.starts_with("heartbeat.") {
                true => keys::kv_subject(&beats, &key),
                false => keys::kv_subject(&bucket, &key),
            };
            async move {
                js.publish(subject, value).await?.await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(256)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(writes.len())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// The old read: list keys, then one direct get per key of the families.
async fn per_key(store: &Store, families: &[&str]) -> anyhow::Result<usize> {
    let keys: Vec<String> = store.keys().await?.try_collect().await?;
    let wanted = keys.into_iter().filter(|k| {
        k.split_once('.')
            .is_some_and(|(f, _)| families.contains(&f))
    });
    let found: Vec<bool> = futures::stream::iter(wanted)
        .map(|k| async move { anyhow::Ok(store.entry(&k).await?.is_some()) })
        .buffer_unordered(32)
        .try_collect()
        .await?;
    Ok(found.into_iter().filter(|f| *f).count())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes = list_arg("--agents", "100,1000,10000");
    let runs = testbed::bench_arg("--runs", 5).max(1);
    let cli = release_cli()?;
    let families = [keys::AGENTS, keys::ACTUAL_STATE, keys::DESIRED_STATE];
    let mut rows = Vec::new();
    for &n in &sizes {
        let server = NatsServer::start();
        let js = jetstream::new(server.client().await);
        let store =
            flotilla_nats::ensure_bucket(&js, &BucketName::default(), flotilla_nats::Replicas::ONE)
                .await?;
        let beats = flotilla_nats::ensure_heartbeat_bucket(
            &js,
            &BucketName::default(),
            flotilla_nats::Replicas::ONE,
        )
        .await?;
        let written = seed(&js, n).await?;
        let (mut cli_t, mut family_t, mut per_key_t) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let t = Instant::now();
            let out = Command::new(&cli)
                .args(["get", "agents", "-o", "json", "--nats-url", &server.url()])
                .env_remove("FLOTILLA_CREDS")
                .output()
                .context("run flotilla")?;
            cli_t.push(t.elapsed());
            if !out.status.success() {
                bail!(
                    "flotilla get agents failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let listed = rows.as_array().map_or(0, Vec::len);
            if listed != n {
                bail!("flotilla listed {listed} agents, expected {n}");
            }

            let t = Instant::now();
            let (snap, hb) = tokio::join!(
                flotilla_nats::read_families(&store, &families),
                flotilla_nats::read_family(&beats, keys::HEARTBEAT)
            );
            let snap = snap?.merge(hb?);
            family_t.push(t.elapsed());
            if snap.len() != written {
                bail!(
                    "family read returned {} keys, expected {written}",
                    snap.len()
                );
            }

            let t = Instant::now();
            let got =
                per_key(&store, &families).await? + per_key(&beats, &[keys::HEARTBEAT]).await?;
            per_key_t.push(t.elapsed());
            if got != written {
                bail!("per-key read returned {got} keys, expected {written}");
            }
        }
        let (c, f, p) = (median(cli_t), median(family_t), median(per_key_t));
        rows.push(format!(
            "| {n} | {written} | {} | {} | {} | {:.1}x |",
            ms(c),
            ms(f),
            ms(p),
            p.as_secs_f64() / f.as_secs_f64()
        ));
        eprintln!("{n} agents done");
    }
    println!();
    println!(
        "| agents | keys | `flotilla get agents -o json` (release binary) | family read in-process | per-key gets in-process (old) | old / family |"
    );
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!("\nmedian of {runs} runs each; one nats-server 2.15 on loopback");
    Ok(())
}
