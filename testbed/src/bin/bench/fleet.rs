//! `flotilla-bench fleet`: the control plane at fleet scale.
//!
//! For each fleet size N: a fresh nats-server, the real `flotilla-control`
//! binary (release build) as its own process, and N agents in this process
//! (exactly the agent's code, one NATS connection each), labelled
//! `bench=fleet`, all with one shared file root. The fleet runs as in
//! production: the control plane signs every manifest with a key of its own
//! and each agent accepts only manifests signed by it (docs/adr/0017).
//! Measured, side by side in one run:
//! 1. **new deployment**: one label-selected Deployment whose File path
//!    carries `${agent.id}` is put; time until every agent reports it
//!    converged (all its resources Ready at that revision);
//! 2. **update**: the content changes; time until all converged again;
//! 3. the control plane's RSS, idle before the agents start and after the
//!    updates, and per agent;
//! 4. `flotilla get agents -o json` (the release binary), median of 3;
//! 5. the heartbeat interval the control plane published, the heartbeat
//!    writes per second it holds the fleet to (agents would beat every
//!    second; the cap is 500/s) and nats-server RSS while the fleet idles;
//! 6. the control plane alone (registered agents, no agent processes), once
//!    unsigned and once signed: what signing costs it at fleet scale.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! target/release/flotilla-bench fleet --agents 100,1000,10000 --updates 3
//! ```
//!
//! With `--servers single,single-sync,cluster` (any of them, in any order,
//! the first being the baseline) the same fleet runs instead against each
//! kind of NATS side by side, `--runs` times each, alternating, and the
//! tables compare them (medians over the runs, ratios to the baseline):
//! - `single`: one nats-server with JetStream's default durability (the
//!   store flushed to disk every 2 minutes), as the default run;
//! - `single-sync`: the same with `sync_interval: always` (an fsync before
//!   every acknowledgement), as the shipped configurations;
//! - `cluster`: three nodes of one JetStream cluster on this machine
//!   ([`testbed::cluster::Cluster`], `sync_interval: always`), the control
//!   plane given every node with `--replicas 3`, each agent one node, round
//!   robin; nats-server RSS and CPU per node.
//!
//! The control plane alone then runs signed against each kind.
//!
//! Each of these runs is a child process of its own (this program with
//! `--one <kind>` or `--alone <kind>`, printing its measures as one JSON
//! line): in-process agents that have been stopped do not all let go of
//! their connections, and a run that dies (the release profile aborts on a
//! panic) takes only itself down; the parent then stops what the child had
//! started and left running (its nats-servers and flotilla-control: the
//! child leads a process group of its own) and removes their directories.
//!
//! ```sh
//! target/release/flotilla-bench fleet --agents 1000,10000 --updates 3 \
//!     --servers single,single-sync,cluster --runs 1
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::kv::Store;
use bytes::Bytes;
use flotilla_agent::Config;
use futures::StreamExt;
use manifest_types::signing::{Signer, Trust};
use manifest_types::{
    AgentId, AgentStatus, BucketName, DeploymentName, HeartbeatSettings, LocalId, ResourceId, keys,
};
use serde_json::json;
use testbed::NatsServer;
use testbed::cluster::Cluster;
use tokio::sync::{oneshot, watch};

/// Where the simulated devices keep their state and files.
const DEVICE_STORAGE: &str = "/dev/shm";

/// The fleet-wide heartbeat cap the control plane is started with.
const MAX_RATE: u64 = 500;

/// The benchmark's Deployment and the one resource it renders for each agent.
const DEPLOYMENT: &str = "bench";
const RESOURCE: &str = "config";

/// How long any one wait of the benchmark may take.
const LIMIT: Duration = Duration::from_secs(600);

pub async fn run() -> anyhow::Result<()> {
    let sizes = testbed::bench_list("--agents", "100,1000,10000");
    let updates = testbed::bench_arg("--updates", 3);
    let n = sizes.first().copied().context("--agents")?;
    if let Some(kind) = Kind::arg("--one")? {
        CHILD.store(true, Ordering::Relaxed);
        return child::report(one_fleet(n, updates, kind).await.map(|r| r.to_json()));
    }
    if let Some(kind) = Kind::arg("--alone")? {
        CHILD.store(true, Ordering::Relaxed);
        let alone = control_alone(n, updates, true, kind).await;
        return child::report(alone.map(|a| a.to_json()));
    }
    println!("{} cores", std::thread::available_parallelism()?);
    if let Some(kinds) = Kind::from_args()? {
        return compare(&sizes, updates, &kinds).await;
    }
    let mut rows = Vec::new();
    for &n in &sizes {
        rows.push(one_fleet(n, updates, Kind::Single).await?);
    }
    println!();
    println!(
        "| agents | new deployment → all written / all converged | update → all written / all converged (median of {updates}) | control RSS idle | control RSS | per agent | `get agents` | heartbeat interval | heartbeats/s (cap {MAX_RATE}) | nats-server RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} / {} | {} / {} | {} | {} | {:.1} KiB | {} | {:.1} s | {:.0} | {} |",
            r.agents,
            ms(r.first_written),
            ms(r.first),
            ms(r.update_written),
            ms(r.update),
            kib(r.control_idle),
            kib(r.control_rss),
            r.control_rss.saturating_sub(r.control_idle) as f64 / r.agents as f64,
            r.get_agents,
            r.interval.as_secs_f64(),
            r.heartbeats_per_s,
            kib(r.server_rss.iter().sum()),
        );
    }
    println!();
    println!(
        "| agents | CPU during the new deployment: nats-server | flotilla-control | the in-process agents |"
    );
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} s | {:.1} s | {:.1} s |",
            r.agents,
            r.server_cpu.iter().sum::<f64>(),
            r.control_cpu,
            r.agents_cpu
        );
    }
    // The control plane alone: registered agents without agent processes,
    // so nothing else competes for the two cores; unsigned and signed side
    // by side.
    let mut alone = Vec::new();
    for &n in &sizes {
        for signed in [false, true] {
            let a = control_alone(n, updates, signed, Kind::Single).await?;
            alone.push((n, signed, (a.first, a.update, a.control_cpu)));
        }
    }
    println!();
    println!(
        "| agents (registered, no agent processes) | manifests | new deployment → all manifests written | update → all written (median of {updates}) | ratio to unsigned (update) | flotilla-control CPU for the new deployment |"
    );
    println!("|---|---|---|---|---|---|");
    for (n, signed, (first, update, cpu)) in &alone {
        let unsigned = alone
            .iter()
            .find(|(m, s, _)| m == n && !s)
            .map(|(_, _, (_, u, _))| *u)
            .expect("each size ran unsigned");
        println!(
            "| {n} | {} | {} | {} | {:.2}x | {cpu:.1} s |",
            if *signed { "signed" } else { "unsigned" },
            ms(*first),
            ms(*update),
            update.as_secs_f64() / unsigned.as_secs_f64(),
        );
    }
    Ok(())
}

/// `--servers`: the fleet against each kind of NATS, side by side, `--runs`
/// times each (alternating); medians, ratios to the first kind. A run that
/// fails (agents that do not all register within the limit) is reported,
/// not fatal.
async fn compare(sizes: &[usize], updates: usize, kinds: &[Kind]) -> anyhow::Result<()> {
    let runs = testbed::bench_arg("--runs", 1).max(1);
    let base = kinds[0];
    // Per size and kind: the runs that completed, and why the others failed.
    let mut fleets: Vec<(usize, Kind, Vec<Row>, Vec<String>)> = Vec::new();
    for &n in sizes {
        for run in 0..runs {
            for &kind in kinds {
                eprintln!("run {} of {runs}", run + 1);
                let at = match fleets.iter().position(|(m, k, ..)| *m == n && *k == kind) {
                    Some(i) => i,
                    None => {
                        fleets.push((n, kind, Vec::new(), Vec::new()));
                        fleets.len() - 1
                    }
                };
                match child::run(n, updates, "--one", kind).await {
                    Ok(row) => fleets[at].2.push(Row::from_json(&row)?),
                    Err(e) => {
                        eprintln!("fleet of {n} on {kind:?}: failed: {e}");
                        fleets[at].3.push(e);
                    }
                }
            }
        }
    }
    let fleets: Vec<(usize, Kind, Option<Row>, Vec<String>)> = fleets
        .into_iter()
        .map(|(n, kind, rows, failed)| {
            let row = (!rows.is_empty()).then(|| Row::median(&rows));
            (n, kind, row, failed)
        })
        .collect();
    let baseline = |n: usize| {
        fleets
            .iter()
            .find(|(m, k, ..)| *k == base && *m == n)
            .and_then(|(_, _, b, _)| b.clone())
    };
    // The sum, and each node's share when there are several; `unit` with
    // its leading space.
    let per_node = |v: &[f64], unit: &str, digits: usize| match v.len() {
        1 => format!("{:.digits$}{unit}", v[0]),
        _ => format!(
            "{:.digits$}{unit} ({})",
            v.iter().sum::<f64>(),
            v.iter()
                .map(|x| format!("{x:.digits$}"))
                .collect::<Vec<_>>()
                .join(" + ")
        ),
    };
    let rss_nodes = |v: &[u64]| {
        per_node(
            &v.iter().map(|&k| k as f64 / 1024.0).collect::<Vec<_>>(),
            " MiB",
            1,
        )
    };
    let ratio = |a: f64, b: Option<f64>| match b {
        Some(b) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "—".to_owned(),
    };
    let secs = |d: Duration| d.as_secs_f64();
    // Runs completed, and the first reason one failed.
    let completed = |failed: &[String]| {
        let ok = runs - failed.len();
        match failed.first() {
            None => format!("{ok} of {runs}"),
            Some(why) => format!(
                "{ok} of {runs} ({})",
                why.lines().next().unwrap_or_default().replace('|', "/")
            ),
        }
    };

    println!();
    println!(
        "| agents | NATS | runs completed | agents started → all registered | new deployment → all written / all converged | ratio (converged) | update → all written / all converged (median of {updates}) | ratio (converged) | `get agents` | heartbeats/s (cap {MAX_RATE}) | control RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (n, kind, row, failed) in &fleets {
        let done = completed(failed);
        let Some(r) = row else {
            println!(
                "| {n} | {} | {done} | — | — | — | — | — | — | — | — |",
                kind.label()
            );
            continue;
        };
        let b = baseline(*n);
        println!(
            "| {n} | {} | {done} | {} | {} / {} | {} | {} / {} | {} | {} | {:.0} | {} |",
            kind.label(),
            ms(r.registered),
            ms(r.first_written),
            ms(r.first),
            ratio(secs(r.first), b.as_ref().map(|b| secs(b.first))),
            ms(r.update_written),
            ms(r.update),
            ratio(secs(r.update), b.as_ref().map(|b| secs(b.update))),
            r.get_agents,
            r.heartbeats_per_s,
            kib(r.control_rss),
        );
    }
    println!();
    println!(
        "| agents | NATS | nats-server CPU during the new deployment (per node) | ratio | flotilla-control CPU | agents' CPU | nats-server CPU-s per s while idle (heartbeats) | nats-server RSS, fleet idle (per node) | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (n, kind, row, _) in &fleets {
        let Some(r) = row else {
            continue;
        };
        let b = baseline(*n);
        let cpu: f64 = r.server_cpu.iter().sum();
        let rss: u64 = r.server_rss.iter().sum();
        println!(
            "| {n} | {} | {} | {} | {:.1} s | {:.1} s | {} | {} | {} |",
            kind.label(),
            per_node(&r.server_cpu, " s", 1),
            ratio(cpu, b.as_ref().map(|b| b.server_cpu.iter().sum())),
            r.control_cpu,
            r.agents_cpu,
            per_node(&r.idle_cpu, "", 2),
            rss_nodes(&r.server_rss),
            ratio(
                rss as f64,
                b.as_ref().map(|b| b.server_rss.iter().sum::<u64>() as f64)
            ),
        );
    }

    // The control plane alone, signed: only nats-server and flotilla-control
    // share the cores.
    let mut alone: Vec<(usize, Kind, Vec<Alone>)> = Vec::new();
    for &n in sizes {
        for _ in 0..runs {
            for &kind in kinds {
                let a = child::run(n, updates, "--alone", kind)
                    .await
                    .map_err(|e| anyhow::anyhow!("control plane alone on {kind:?}: {e}"))?;
                let a = Alone::from_json(&a)?;
                match alone.iter_mut().find(|(m, k, _)| *m == n && *k == kind) {
                    Some((_, _, all)) => all.push(a),
                    None => alone.push((n, kind, vec![a])),
                }
            }
        }
    }
    let alone: Vec<(usize, Kind, Alone)> = alone
        .into_iter()
        .map(|(n, kind, all)| {
            let nodes = all[0].server_cpu.len();
            let a = Alone {
                first: mid(all.iter().map(|a| a.first).collect()),
                update: mid(all.iter().map(|a| a.update).collect()),
                control_cpu: mid(all.iter().map(|a| a.control_cpu).collect()),
                server_cpu: (0..nodes)
                    .map(|i| mid(all.iter().map(|a| a.server_cpu[i]).collect()))
                    .collect(),
            };
            (n, kind, a)
        })
        .collect();
    println!();
    println!(
        "| agents (registered, no agent processes), signed | NATS | new deployment → all manifests written | ratio | update → all written (median of {updates}) | ratio | flotilla-control CPU | nats-server CPU (per node) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (n, kind, a) in &alone {
        let b = alone
            .iter()
            .find(|(m, k, _)| m == n && *k == base)
            .map(|(_, _, b)| b)
            .expect("each size ran on the baseline");
        println!(
            "| {n} | {} | {} | {} | {} | {} | {:.1} s | {} |",
            kind.label(),
            ms(a.first),
            ratio(secs(a.first), Some(secs(b.first))),
            ms(a.update),
            ratio(secs(a.update), Some(secs(b.update))),
            a.control_cpu,
            per_node(&a.server_cpu, " s", 1),
        );
    }
    Ok(())
}

/// `flotilla get agents` over the live fleet, three times.
#[derive(Clone, Default)]
struct Reads {
    /// Of the reads that succeeded.
    median: Option<Duration>,
    /// Why the others failed.
    failed: Vec<String>,
}

impl std::fmt::Display for Reads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(m) = self.median {
            write!(f, "{}", ms(m))?;
        }
        if let Some(why) = self.failed.first() {
            let sep = if self.median.is_some() { ", " } else { "" };
            let why = why.lines().next().unwrap_or_default().replace('|', "/");
            write!(f, "{sep}{} failed ({why})", self.failed.len())?;
        }
        Ok(())
    }
}

#[derive(Clone)]
struct Row {
    agents: usize,
    /// Agents started → every one reported a status on its first manifest.
    registered: Duration,
    /// CPU seconds of each nats-server (in node order), flotilla-control
    /// and the agents during the new deployment.
    server_cpu: Vec<f64>,
    control_cpu: f64,
    agents_cpu: f64,
    first: Duration,
    first_written: Duration,
    update: Duration,
    update_written: Duration,
    control_idle: u64,
    control_rss: u64,
    get_agents: Reads,
    heartbeats_per_s: f64,
    interval: Duration,
    /// Each nats-server's RSS while the fleet idles, KiB.
    server_rss: Vec<u64>,
    /// Each nats-server's CPU seconds per second while the fleet idles
    /// (heartbeats only).
    idle_cpu: Vec<f64>,
}

impl Row {
    /// Each measure's median over `rows` (one per run of one configuration).
    fn median(rows: &[Row]) -> Row {
        let nodes = rows[0].server_rss.len();
        let each = |f: &dyn Fn(&Row) -> f64| mid(rows.iter().map(f).collect());
        let time = |f: &dyn Fn(&Row) -> Duration| mid(rows.iter().map(f).collect());
        let mut reads: Vec<Duration> = rows.iter().filter_map(|r| r.get_agents.median).collect();
        Row {
            agents: rows[0].agents,
            registered: time(&|r| r.registered),
            server_cpu: (0..nodes).map(|i| each(&|r| r.server_cpu[i])).collect(),
            control_cpu: each(&|r| r.control_cpu),
            agents_cpu: each(&|r| r.agents_cpu),
            first: time(&|r| r.first),
            first_written: time(&|r| r.first_written),
            update: time(&|r| r.update),
            update_written: time(&|r| r.update_written),
            control_idle: mid(rows.iter().map(|r| r.control_idle).collect()),
            control_rss: mid(rows.iter().map(|r| r.control_rss).collect()),
            get_agents: Reads {
                median: (!reads.is_empty()).then(|| crate::percentile(&mut reads, 50)),
                failed: rows
                    .iter()
                    .flat_map(|r| r.get_agents.failed.clone())
                    .collect(),
            },
            heartbeats_per_s: each(&|r| r.heartbeats_per_s),
            interval: time(&|r| r.interval),
            server_rss: (0..nodes)
                .map(|i| mid(rows.iter().map(|r| r.server_rss[i]).collect()))
                .collect(),
            idle_cpu: (0..nodes).map(|i| each(&|r| r.idle_cpu[i])).collect(),
        }
    }
}

impl Row {
    /// As a child run reports it.
    fn to_json(&self) -> serde_json::Value {
        let secs = Duration::as_secs_f64;
        json!({
            "agents": self.agents,
            "registered": secs(&self.registered),
            "server_cpu": self.server_cpu,
            "control_cpu": self.control_cpu,
            "agents_cpu": self.agents_cpu,
            "first": secs(&self.first),
            "first_written": secs(&self.first_written),
            "update": secs(&self.update),
            "update_written": secs(&self.update_written),
            "control_idle": self.control_idle,
            "control_rss": self.control_rss,
            "get_agents": {
                "median": self.get_agents.median.as_ref().map(secs),
                "failed": self.get_agents.failed,
            },
            "heartbeats_per_s": self.heartbeats_per_s,
            "interval": secs(&self.interval),
            "server_rss": self.server_rss,
            "idle_cpu": self.idle_cpu,
        })
    }

    fn from_json(v: &serde_json::Value) -> anyhow::Result<Row> {
        let j = Json(v);
        Ok(Row {
            agents: j.u64("agents")? as usize,
            registered: j.secs("registered")?,
            server_cpu: j.f64s("server_cpu")?,
            control_cpu: j.f64("control_cpu")?,
            agents_cpu: j.f64("agents_cpu")?,
            first: j.secs("first")?,
            first_written: j.secs("first_written")?,
            update: j.secs("update")?,
            update_written: j.secs("update_written")?,
            control_idle: j.u64("control_idle")?,
            control_rss: j.u64("control_rss")?,
            get_agents: Reads {
                median: v["get_agents"]["median"]
                    .as_f64()
                    .map(Duration::from_secs_f64),
                failed: v["get_agents"]["failed"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.as_str().map(str::to_owned))
                    .collect(),
            },
            heartbeats_per_s: j.f64("heartbeats_per_s")?,
            interval: j.secs("interval")?,
            server_rss: j
                .f64s("server_rss")?
                .into_iter()
                .map(|k| k as u64)
                .collect(),
            idle_cpu: j.f64s("idle_cpu")?,
        })
    }
}

/// Fields of a child run's JSON line.
struct Json<'a>(&'a serde_json::Value);

impl Json<'_> {
    fn f64(&self, key: &str) -> anyhow::Result<f64> {
        self.0[key]
            .as_f64()
            .with_context(|| format!("{key} in a child run's measures"))
    }

    fn u64(&self, key: &str) -> anyhow::Result<u64> {
        self.0[key]
            .as_u64()
            .with_context(|| format!("{key} in a child run's measures"))
    }

    fn secs(&self, key: &str) -> anyhow::Result<Duration> {
        self.f64(key).map(Duration::from_secs_f64)
    }

    fn f64s(&self, key: &str) -> anyhow::Result<Vec<f64>> {
        self.0[key]
            .as_array()
            .with_context(|| format!("{key} in a child run's measures"))?
            .iter()
            .map(|x| x.as_f64().context("a number"))
            .collect()
    }
}

/// Set in a child run (`--one`, `--alone`): it says on stdout what it
/// starts, for the parent to clean up should it die.
static CHILD: AtomicBool = AtomicBool::new(false);

/// `--servers` runs, each a child process of its own.
mod child {
    use std::io::Write;
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::atomic::Ordering;

    use std::os::unix::process::CommandExt;

    use super::{CHILD, Kind};

    const RESULT: &str = "flotilla-bench-result ";
    const FAILED: &str = "flotilla-bench-failed ";
    const DIR: &str = "flotilla-bench-dir ";

    /// A child's last word on stdout: its measures as one JSON line, or why
    /// it failed.
    pub(super) fn report(result: anyhow::Result<serde_json::Value>) -> anyhow::Result<()> {
        match result {
            Ok(v) => {
                println!("{RESULT}{v}");
                Ok(())
            }
            Err(e) => {
                println!("{FAILED}{}", format!("{e:#}").replace('\n', " "));
                Err(e)
            }
        }
    }

    /// In a child run: the simulated devices' directory, said on stdout as
    /// soon as it exists.
    pub(super) fn storage(dir: &Path) -> anyhow::Result<()> {
        if !CHILD.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "{DIR}{}", dir.display())?;
        out.flush()?;
        Ok(())
    }

    /// Runs this program with `mode` (`--one`, `--alone`) on `kind` and `n`
    /// agents as a child; its measures, or why it failed.
    pub(super) async fn run(
        n: usize,
        updates: usize,
        mode: &str,
        kind: Kind,
    ) -> Result<serde_json::Value, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let args = [
            "fleet".to_owned(),
            "--agents".to_owned(),
            n.to_string(),
            "--updates".to_owned(),
            updates.to_string(),
            mode.to_owned(),
            kind.name().to_owned(),
        ];
        let out = tokio::task::spawn_blocking(move || {
            let child = Command::new(exe)
                .args(args)
                // Its own process group: what it starts is in it.
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            let group = child.id();
            let out = child.wait_with_output()?;
            std::io::Result::Ok((group, out))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let (group, out) = out;
        let text = String::from_utf8_lossy(&out.stdout);
        clean_up(group, &text);
        if let Some(v) = text.lines().find_map(|l| l.strip_prefix(RESULT)) {
            return serde_json::from_str(v).map_err(|e| e.to_string());
        }
        Err(text
            .lines()
            .find_map(|l| l.strip_prefix(FAILED))
            .map(str::to_owned)
            .unwrap_or_else(|| format!("the run died ({})", out.status)))
    }

    /// Stops what a child started and left running (it died before its
    /// drops ran): each process still in its process group `group`, by its
    /// id; then removes the nats-servers' directories and the devices'.
    fn clean_up(group: u32, text: &str) {
        let cmdline = |pid: u32| -> Vec<String> {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        };
        // The process group of each process: field 5 of /proc/<pid>/stat,
        // the third after the command name (which may hold spaces).
        let in_group = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.to_owned()))
                .and_then(|rest| rest.split_whitespace().nth(2)?.parse::<u32>().ok())
                == Some(group)
        };
        let left: Vec<u32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| in_group(pid))
            .collect();
        for pid in left {
            // Gone, or a zombie (no command line).
            let args = cmdline(pid);
            let Some(program) = args.first() else {
                continue;
            };
            eprintln!("stopping {program} ({pid}), left running by a run that died");
            let _ = Command::new("kill").arg(pid.to_string()).status();
            for _ in 0..100 {
                if cmdline(pid).is_empty() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            // A nats-server's directory holds its config (`-c <dir>/nats.conf`).
            let dir = args
                .iter()
                .position(|a| a == "-c")
                .and_then(|i| args.get(i + 1))
                .and_then(|conf| Path::new(conf).parent());
            if let Some(dir) = dir
                && dir
                    .file_name()
                    .is_some_and(|d| d.to_string_lossy().starts_with("flotilla-nats-"))
            {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        for dir in text.lines().filter_map(|l| l.strip_prefix(DIR)) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The middle value (the upper one of an even count).
fn mid<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// Which NATS a fleet runs against (`--servers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// One nats-server, JetStream's default durability (flushed every 2 min).
    Single,
    /// One nats-server with `sync_interval: always`.
    SingleSync,
    /// Three nodes, `sync_interval: always`, every bucket on all three.
    Cluster,
}

impl Kind {
    /// `--servers single,single-sync,cluster`, if given.
    fn from_args() -> anyhow::Result<Option<Vec<Kind>>> {
        let args: Vec<String> = std::env::args().collect();
        let Some(i) = args.iter().position(|a| a == "--servers") else {
            return Ok(None);
        };
        let list = args.get(i + 1).context("--servers needs a list")?;
        let kinds = list
            .split(',')
            .map(Kind::parse)
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!kinds.is_empty(), "--servers needs a list");
        Ok(Some(kinds))
    }

    /// `name <kind>`, if given.
    fn arg(name: &str) -> anyhow::Result<Option<Kind>> {
        let args: Vec<String> = std::env::args().collect();
        match args.iter().position(|a| a == name) {
            None => Ok(None),
            Some(i) => Kind::parse(args.get(i + 1).context("a kind of servers")?).map(Some),
        }
    }

    fn parse(k: &str) -> anyhow::Result<Kind> {
        match k.trim() {
            "single" => Ok(Kind::Single),
            "single-sync" => Ok(Kind::SingleSync),
            "cluster" => Ok(Kind::Cluster),
            other => bail!("--servers: {other:?} is not single, single-sync or cluster"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Single => "single",
            Kind::SingleSync => "single-sync",
            Kind::Cluster => "cluster",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Single => "1 server, default sync (2 min)",
            Kind::SingleSync => "1 server, `sync_interval: always`",
            Kind::Cluster => "3-node cluster, R3, `sync_interval: always`",
        }
    }
}

/// The NATS a fleet runs against: one server or a 3-node cluster.
pub(crate) enum Servers {
    One(NatsServer),
    Three(Cluster),
}

impl Servers {
    pub(crate) async fn start(kind: Kind) -> Self {
        match kind {
            Kind::Single => Servers::One(NatsServer::start()),
            // NatsServer::start's configuration, plus the shipped setting.
            Kind::SingleSync => Servers::One(NatsServer::start_with_own_config(
                "listen: \"127.0.0.1:{port}\"\nserver_name: flotilla-bench-{port}\n\
                 jetstream { store_dir: \"{store}\", sync_interval: always }\n",
            )),
            Kind::Cluster => {
                let cluster = Cluster::start();
                cluster.wait_formed(Duration::from_secs(60)).await;
                Servers::Three(cluster)
            }
        }
    }

    /// Every server's URL, comma-separated.
    pub(crate) fn urls(&self) -> String {
        match self {
            Servers::One(s) => s.url(),
            Servers::Three(c) => c.urls(),
        }
    }

    /// The URL agent number `i` is given: one node each, round robin.
    fn agent_url(&self, i: usize) -> String {
        match self {
            Servers::One(s) => s.url(),
            Servers::Three(c) => c.nodes[i % c.nodes.len()].url(),
        }
    }

    /// How many servers hold each bucket the control plane creates.
    fn replicas(&self) -> usize {
        match self {
            Servers::One(_) => 1,
            Servers::Three(c) => c.nodes.len(),
        }
    }

    /// A client of every server.
    pub(crate) async fn client(&self) -> async_nats::Client {
        match self {
            Servers::One(s) => s.client().await,
            Servers::Three(c) => c.client().await,
        }
    }

    /// Each nats-server's process id, in node order.
    fn pids(&self) -> anyhow::Result<Vec<u32>> {
        match self {
            Servers::One(s) => Ok(vec![s.pid().context("nats-server runs")?]),
            Servers::Three(c) => Ok(c.pids()),
        }
    }

    /// The fleet bucket once the control plane has created it and it
    /// answers reads (a replicated one does so only once its replicas are up).
    async fn bucket(&self) -> anyhow::Result<Store> {
        let bucket = BucketName::default();
        match self {
            Servers::Three(c) => Ok(c.wait_bucket(bucket.as_str(), LIMIT).await),
            Servers::One(s) => {
                let js = async_nats::jetstream::new(s.client().await);
                loop {
                    if let Ok(s) = js.get_key_value(bucket.as_str()).await {
                        break Ok(s);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

/// CPU seconds each of `pids` has used so far.
fn cpus(pids: &[u32]) -> anyhow::Result<Vec<f64>> {
    pids.iter().map(|&p| cpu_seconds(p)).collect()
}

/// NATS servers, the release control plane and the simulated devices'
/// storage, before any agent runs.
pub(crate) struct Bench {
    pub servers: Servers,
    pub js: async_nats::jetstream::Context,
    pub dir: tempfile::TempDir,
    /// The file root every agent shares (each writes its own paths).
    pub files: PathBuf,
    pub control: ControlPlane,
    /// The control plane's public signing key, which every agent trusts.
    pub trusted: String,
    pub store: Store,
    /// Every agent's converged revision, from a watch started before them.
    pub converged: Converged,
}

impl Bench {
    /// On one nats-server, as `NatsServer::start` configures it.
    pub(crate) async fn start() -> anyhow::Result<Self> {
        Self::start_on(Kind::Single).await
    }

    pub(crate) async fn start_on(kind: Kind) -> anyhow::Result<Self> {
        let servers = Servers::start(kind).await;
        let js = async_nats::jetstream::new(servers.client().await);
        // Ten thousand devices do not share one disk: each simulated device's
        // state and files live on tmpfs (when there is one), so the benchmark
        // measures the mesh, not this VM's one disk under 40,000 fsyncs.
        let dir = match Path::new(DEVICE_STORAGE).is_dir() {
            true => tempfile::tempdir_in(DEVICE_STORAGE)?,
            false => tempfile::tempdir()?,
        };
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files)?;
        let files = files.canonicalize()?;
        let (control, trusted) = ControlPlane::start(&servers, dir.path(), true)?;
        let trusted = trusted.expect("a signing control plane");
        // The control plane creates the bucket; wait for it.
        let store = servers.bucket().await?;
        let converged = Converged::watch(&store).await?;
        Ok(Self {
            servers,
            js,
            dir,
            files,
            control,
            trusted,
            store,
            converged,
        })
    }

    /// Starts `n` agents and waits until every one has reported a status
    /// on its first manifest; dropping the result stops them.
    pub(crate) async fn agents(&self, n: usize) -> anyhow::Result<Vec<oneshot::Sender<()>>> {
        label_fleet(&self.store, n).await?;
        let mut agents = Vec::with_capacity(n);
        for i in 0..n {
            agents.push(start_agent(
                &self.servers.agent_url(i),
                self.dir.path(),
                &self.files,
                &format!("a{i:05}"),
                &self.trusted,
            )?);
        }
        self.converged
            .wait(n, 0, LIMIT)
            .await
            .context("agents did not register")?;
        Ok(agents)
    }
}

async fn one_fleet(n: usize, updates: usize, kind: Kind) -> anyhow::Result<Row> {
    eprintln!("fleet of {n} on {kind:?}: starting");
    let bench = Bench::start_on(kind).await?;
    child::storage(bench.dir.path())?;
    let Bench {
        servers,
        js,
        files,
        control,
        store,
        converged,
        ..
    } = &bench;
    let control_idle = rss_kib(control.pid())?;
    let t = Instant::now();
    let agents = bench.agents(n).await?;
    let registered = t.elapsed();
    eprintln!("fleet of {n} on {kind:?}: registered in {registered:?}");

    let written = Converged::written(store).await?;
    let server_pids = servers.pids()?;
    let cpu_before = (
        cpus(&server_pids)?,
        cpu_seconds(control.pid())?,
        cpu_seconds(std::process::id())?,
    );
    let t = Instant::now();
    let revision = store.put("deployments.bench", deployment(files, 0)).await?;
    written
        .wait(n, revision, LIMIT)
        .await
        .context("new deployment written")?;
    let first_written = t.elapsed();
    converged
        .wait(n, revision, LIMIT)
        .await
        .context("new deployment")?;
    let first = t.elapsed();
    let server_cpu = cpus(&server_pids)?
        .iter()
        .zip(&cpu_before.0)
        .map(|(after, before)| after - before)
        .collect();
    let control_cpu = cpu_seconds(control.pid())? - cpu_before.1;
    let agents_cpu = cpu_seconds(std::process::id())? - cpu_before.2;
    eprintln!(
        "fleet of {n} on {kind:?}: new deployment written {first_written:?}, converged {first:?}"
    );

    let mut times = Vec::new();
    let mut written_times = Vec::new();
    for i in 1..=updates {
        let t = Instant::now();
        let revision = store.put("deployments.bench", deployment(files, i)).await?;
        written
            .wait(n, revision, LIMIT)
            .await
            .context("update written")?;
        written_times.push(t.elapsed());
        converged.wait(n, revision, LIMIT).await.context("update")?;
        times.push(t.elapsed());
    }
    let update = crate::percentile(&mut times, 50);
    let update_written = crate::percentile(&mut written_times, 50);
    eprintln!("fleet of {n} on {kind:?}: updates {times:?}");
    let control_rss = rss_kib(control.pid())?;

    let mut reads = Vec::new();
    let mut get_failed = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = Command::new(release_binary("flotilla")?)
            .args(["--nats-url", &servers.urls(), "get", "agents", "-o", "json"])
            .stderr(Stdio::piped())
            .output()?;
        match out.status.success() {
            true => reads.push(t.elapsed()),
            // A read can fail under load (a stalled family read); say so in
            // the table rather than lose the run.
            false => {
                let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                eprintln!("fleet of {n} on {kind:?}: flotilla get agents failed: {why}");
                get_failed.push(why);
            }
        }
    }
    let get_agents = Reads {
        median: (!reads.is_empty()).then(|| crate::percentile(&mut reads, 50)),
        failed: get_failed,
    };

    // Over two published intervals (at least 10 s), once every agent has
    // had time to read the setting.
    let interval = published_interval(store).await?;
    let idle_before = cpus(&server_pids)?;
    let t = Instant::now();
    let heartbeats_per_s = heartbeat_rate(js, (interval * 2).max(Duration::from_secs(10))).await?;
    let idle_cpu = cpus(&server_pids)?
        .iter()
        .zip(&idle_before)
        .map(|(after, before)| (after - before) / t.elapsed().as_secs_f64())
        .collect();
    let server_rss = server_pids
        .iter()
        .map(|&p| rss_kib(p))
        .collect::<anyhow::Result<_>>()?;
    drop(agents);
    drop(bench);
    Ok(Row {
        agents: n,
        registered,
        server_cpu,
        control_cpu,
        agents_cpu,
        first,
        first_written,
        update,
        update_written,
        control_idle,
        control_rss,
        get_agents,
        heartbeats_per_s,
        interval,
        server_rss,
        idle_cpu,
    })
}

/// What [`control_alone`] measures.
#[derive(Clone)]
struct Alone {
    /// New deployment → all manifests written.
    first: Duration,
    /// Update → all written, median.
    update: Duration,
    /// flotilla-control's CPU seconds for the new deployment.
    control_cpu: f64,
    /// Each nats-server's CPU seconds for the new deployment.
    server_cpu: Vec<f64>,
}

impl Alone {
    /// As a child run reports it.
    fn to_json(&self) -> serde_json::Value {
        json!({
            "first": self.first.as_secs_f64(),
            "update": self.update.as_secs_f64(),
            "control_cpu": self.control_cpu,
            "server_cpu": self.server_cpu,
        })
    }

    fn from_json(v: &serde_json::Value) -> anyhow::Result<Alone> {
        let j = Json(v);
        Ok(Alone {
            first: j.secs("first")?,
            update: j.secs("update")?,
            control_cpu: j.f64("control_cpu")?,
            server_cpu: j.f64s("server_cpu")?,
        })
    }
}

/// The control plane's own cost: `n` agents registered by writing their
/// inventories (no agent runs), then one templated deployment and
/// `updates` updates, each timed until every manifest carries it.
async fn control_alone(
    n: usize,
    updates: usize,
    signed: bool,
    kind: Kind,
) -> anyhow::Result<Alone> {
    eprintln!("control plane alone, {n} agents, signed: {signed}, on {kind:?}");
    let servers = Servers::start(kind).await;
    let dir = tempfile::tempdir()?;
    let (control, _) = ControlPlane::start(&servers, dir.path(), signed)?;
    child::storage(dir.path())?;
    let store = servers.bucket().await?;
    let written = Converged::written(&store).await?;
    label_fleet(&store, n).await?;
    put_each(&store, n, |id| {
        let inventory = json!({"apiVersion": "flotilla.dev/v1", "agentId": id,
            "instanceId": id, "agentVersion": "0.1.0", "arch": "x86_64", "os": "linux",
            "reconcilers": ["File"], "labels": {"bench": "fleet"}});
        (format!("agents.{id}"), inventory)
    })
    .await?;
    written
        .wait(n, 0, LIMIT)
        .await
        .context("registered agents get their first manifest")?;
    let files = Path::new("/srv/bench");
    let server_pids = servers.pids()?;
    let server_before = cpus(&server_pids)?;
    let cpu = cpu_seconds(control.pid())?;
    let t = Instant::now();
    let revision = store.put("deployments.bench", deployment(files, 0)).await?;
    written
        .wait(n, revision, LIMIT)
        .await
        .context("new deployment written")?;
    let first = t.elapsed();
    let control_cpu = cpu_seconds(control.pid())? - cpu;
    let server_cpu = cpus(&server_pids)?
        .iter()
        .zip(&server_before)
        .map(|(after, before)| after - before)
        .collect();
    let mut times = Vec::new();
    for i in 1..=updates {
        let t = Instant::now();
        let revision = store.put("deployments.bench", deployment(files, i)).await?;
        written
            .wait(n, revision, LIMIT)
            .await
            .context("update written")?;
        times.push(t.elapsed());
    }
    Ok(Alone {
        first,
        update: crate::percentile(&mut times, 50),
        control_cpu,
        server_cpu,
    })
}

/// Heartbeat writes per second over `window`, from the heartbeat bucket's
/// stream sequence.
async fn heartbeat_rate(
    js: &async_nats::jetstream::Context,
    window: Duration,
) -> anyhow::Result<f64> {
    // Fresh stream info each time (a KV store's `status()` is cached).
    let stream = format!("KV_{}", keys::heartbeat_bucket(&BucketName::default()));
    let sequence = || async {
        anyhow::Ok(
            js.get_stream(&stream)
                .await?
                .info()
                .await?
                .state
                .last_sequence,
        )
    };
    let before = sequence().await?;
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let after = sequence().await?;
    Ok((after - before) as f64 / t.elapsed().as_secs_f64())
}

/// The published heartbeat interval (`settings.heartbeat`).
async fn published_interval(store: &Store) -> anyhow::Result<Duration> {
    let entry = store
        .get(keys::HEARTBEAT_SETTINGS)
        .await?
        .context("settings.heartbeat is published")?;
    Ok(serde_json::from_slice::<HeartbeatSettings>(&entry)?.interval())
}

/// The revision of the benchmark's deployment that an agent's status, just
/// received, shows it converged on ([`crate::converged_on_revision`]); 0 for
/// an agent that reports none of its resources and is converged on the
/// manifest it accepted, its first or a later one ("registered",
/// [`AgentStatus::converged_on`]).
fn converged_revision(bytes: &[u8]) -> Option<u64> {
    let status = serde_json::from_slice::<AgentStatus>(bytes).ok()?;
    let name = DeploymentName::new(DEPLOYMENT).expect("a valid deployment name");
    let local = LocalId::new(RESOURCE).expect("a valid resource id");
    let resources = [ResourceId::rendered(&name, &local)];
    match status
        .resources
        .get(&resources[0])
        .and_then(|r| r.source.as_ref())
    {
        Some(at) => crate::converged_on_revision(&status, &name, &resources, at.revision)
            .then_some(at.revision),
        None => (status.manifest_generation > 0 && status.converged_on(status.manifest_generation))
            .then_some(0),
    }
}

/// Each agent's newest deployment revision seen in one key family, from one
/// watch: converged in `actual-state.>`, written in `desired-state.>`.
pub(crate) struct Converged {
    newest: Arc<Mutex<HashMap<String, u64>>>,
    changed: watch::Receiver<u64>,
}

impl Converged {
    /// Agents' statuses: the revision of the benchmark's deployment each is
    /// converged on ([`converged_revision`]).
    pub(crate) async fn watch(store: &Store) -> anyhow::Result<Self> {
        Self::track(store, keys::ACTUAL_STATE, converged_revision).await
    }

    /// Agents' manifests: the revision of the deployment they carry.
    async fn written(store: &Store) -> anyhow::Result<Self> {
        Self::track(store, keys::DESIRED_STATE, |bytes| {
            let m = manifest_types::AgentManifest::from_json(bytes).ok()?;
            Some(
                m.resources
                    .iter()
                    .filter_map(|r| r.source.as_ref().map(|s| s.revision))
                    .min()
                    .unwrap_or(0),
            )
        })
        .await
    }

    async fn track(
        store: &Store,
        family: &str,
        revision_of: fn(&[u8]) -> Option<u64>,
    ) -> anyhow::Result<Self> {
        let mut w = store.watch(keys::all(family)).await?;
        let newest: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let (tx, rx) = watch::channel(0u64);
        let map = newest.clone();
        let family = family.to_owned();
        tokio::spawn(async move {
            while let Some(entry) = w.next().await {
                // The watch's ordered consumer reports a missed idle
                // heartbeat (a loaded machine) as an error, then recreates
                // itself from the last sequence it delivered: keep reading.
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) => {
                        eprintln!("watch of {family}.>: {e}; resuming");
                        continue;
                    }
                };
                let Some(revision) = revision_of(&entry.value) else {
                    continue;
                };
                let mut m = map.lock().expect("not poisoned");
                let held = m.entry(entry.key.clone()).or_default();
                if revision >= *held {
                    *held = revision;
                    drop(m);
                    tx.send_modify(|v| *v += 1);
                }
            }
        });
        Ok(Self {
            newest,
            changed: rx,
        })
    }

    /// Waits until `n` agents report `revision` (or a newer one) converged.
    pub(crate) async fn wait(
        &self,
        n: usize,
        revision: u64,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let mut changed = self.changed.clone();
        let done = |m: &HashMap<String, u64>| m.values().filter(|&&r| r >= revision).count();
        let t = Instant::now();
        tokio::time::timeout(limit, async {
            loop {
                let count = done(&self.newest.lock().expect("not poisoned"));
                if count >= n {
                    return Ok(());
                }
                // A word every 30 s while a wait is long.
                if tokio::time::timeout(Duration::from_secs(30), changed.changed())
                    .await
                    .is_err()
                {
                    eprintln!(
                        "  {count} of {n} on revision {revision} after {:.0?}",
                        t.elapsed()
                    );
                    continue;
                }
            }
        })
        .await
        .with_context(|| {
            format!(
                "{} of {n} converged on revision {revision} after {limit:?}",
                done(&self.newest.lock().expect("not poisoned"))
            )
        })?
    }
}

pub(crate) struct ControlPlane(Child);

impl ControlPlane {
    /// Starts the release control plane, given every server and as many
    /// replicas as there are servers; `signed`: with a new signing key of
    /// its own, whose public key is returned.
    pub(crate) fn start(
        servers: &Servers,
        dir: &Path,
        signed: bool,
    ) -> anyhow::Result<(Self, Option<String>)> {
        let log = std::fs::File::create(dir.join("control.log"))?;
        let mut cmd = Command::new(release_binary("flotilla-control")?);
        cmd.args(["--nats-url", &servers.urls()])
            .args(["--replicas", &servers.replicas().to_string()])
            .args(["--heartbeat-max-rate", &MAX_RATE.to_string()]);
        let mut public = None;
        if signed {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let (seed, key) = Signer::generate();
            let file = dir.join("signing.seed");
            std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(&file)?
                .write_all(seed.as_bytes())?;
            cmd.arg("--signing-key-file").arg(&file);
            public = Some(key);
        }
        let child = cmd
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok((Self(child), public))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn release_binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| testbed::workspace_root().join("target"));
    let path = dir.join("release").join(name);
    if !path.exists() {
        bail!(
            "{} is not built: run `cargo build --release --workspace --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// CPU seconds (user + system) a process has used so far.
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat.rsplit_once(')').context("/proc/<pid>/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// Resident set size of a process, KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/<pid>/status")
}

/// The operator's `bench=fleet` label on agents `a00000`… (`values.<id>`):
/// selectors match only operator labels (docs/adr/0017).
async fn label_fleet(store: &Store, n: usize) -> anyhow::Result<()> {
    put_each(store, n, |id| {
        let values = json!({"apiVersion": "flotilla.dev/v1", "agentId": id,
            "labels": {"bench": "fleet"}});
        (format!("values.{id}"), values)
    })
    .await
}

/// Puts one key per agent `a00000`… (`doc(id)` → key, value), 256 at a time.
async fn put_each(
    store: &Store,
    n: usize,
    doc: impl Fn(&str) -> (String, serde_json::Value),
) -> anyhow::Result<()> {
    futures::stream::iter(0..n)
        .map(|i| {
            let (key, value) = doc(&format!("a{i:05}"));
            let store = store.clone();
            async move { store.put(key, Bytes::from(value.to_string())).await }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    Ok(())
}

pub(crate) fn start_agent(
    url: &str,
    dir: &Path,
    files: &Path,
    id: &str,
    trusted: &str,
) -> anyhow::Result<oneshot::Sender<()>> {
    let mut config =
        Config::new(url, AgentId::new(id)?, dir.join("state").join(id)).with_file_root(files)?;
    config.trust = Trust {
        keys: vec![trusted.to_owned()],
        allow_unsigned: false,
    };
    config.labels.insert("bench".into(), "fleet".into());
    // Agents would beat every second; the control plane's published
    // interval holds the fleet to MAX_RATE.
    config.heartbeat_interval = Duration::from_secs(1);
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(flotilla_agent::run(config, async move {
        let _ = rx.await;
    }));
    Ok(tx)
}

/// The benchmark's Deployment: every `bench=fleet` agent, one File per agent
/// at a path of its own.
fn deployment(files: &Path, i: usize) -> Bytes {
    Bytes::from(deployment_value(files, i).to_string())
}

/// [`deployment`] as a JSON value, to add to.
pub(crate) fn deployment_value(files: &Path, i: usize) -> serde_json::Value {
    json!({
        "apiVersion": "flotilla.dev/v1", "kind": "Deployment", "name": DEPLOYMENT,
        "selector": {"matchLabels": {"bench": "fleet"}},
        "resources": [
            {"id": RESOURCE, "kind": "File", "spec": {
                "path": format!("{}/${{agent.id}}.conf", files.display()),
                "content": format!("update = {i}\n")}}
        ]
    })
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn kib(k: u64) -> String {
    format!("{:.1} MiB", k as f64 / 1024.0)
}
