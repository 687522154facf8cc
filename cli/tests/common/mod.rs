//! Shared helpers for the CLI's integration tests: a real nats-server per
//! test (testbed), the fleet bucket as the control plane creates it, the
//! built `flotilla` binary, and typed documents to seed KV with.

#![allow(dead_code)] // each test file uses a different subset

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::TryStreamExt;
use manifest_types::{
    AgentBuild, AgentId, AgentInventory, AgentManifest, AgentStatus, ApiVersion, BucketName,
    Condition, ConditionType, Deployment, DeploymentName, DeploymentStatus, Heartbeat,
    ReadyDetails, Rejection, ResourceKind, ResourceState, ResourceStatus, keys,
};
use testbed::NatsServer;

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// The outcome of one `flotilla` run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// A command line for the binary against `url`, with the FLOTILLA_* env cleared.
pub fn command(url: &str, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--nats-url")
        .arg(url)
        .args(args)
        .env_remove("FLOTILLA_NATS_URL")
        .env_remove("FLOTILLA_BUCKET")
        .env_remove("FLOTILLA_CREDS")
        .stdin(Stdio::null());
    c
}

/// Runs the binary to completion.
pub fn flotilla(url: &str, args: &[&str]) -> Run {
    let out = command(url, args).output().expect("run flotilla");
    Run {
        code: out.status.code().expect("exited normally"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A test's server, bucket and scratch directory.
pub struct Env {
    pub server: NatsServer,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn start() -> Self {
        Self {
            server: NatsServer::start(),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn run(&self, args: &[&str]) -> Run {
        flotilla(&self.url(), args)
    }

    /// The fleet bucket, created as the control plane creates it.
    pub async fn store(&self) -> kv::Store {
        let js = async_nats::jetstream::new(self.server.client().await);
        flotilla_control::bucket::ensure_bucket(&js, &BucketName::default())
            .await
            .expect("fleet bucket")
    }

    /// Writes `text` to a file in the scratch directory.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write fixture");
        p
    }
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The checked-in example.
pub fn hello_yaml() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello.yaml")
}

/// A small deployment document with one File resource whose content is `content`.
pub fn deployment_yaml(name: &str, content: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Deployment\nname: {name}\n\
         selector:\n  matchLabels:\n    role: kiosk\n\
         resources:\n  - id: motd\n    kind: File\n    spec:\n      path: /etc/flotilla-demo/motd\n      content: {content:?}\n"
    )
}

pub fn agent(id: &str) -> AgentId {
    AgentId::new(id).unwrap()
}

pub fn dname(n: &str) -> DeploymentName {
    DeploymentName::new(n).unwrap()
}

pub async fn put_json<T: serde::Serialize>(store: &kv::Store, key: &str, value: &T) -> u64 {
    store
        .put(key, serde_json::to_vec(value).unwrap().into())
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"))
}

/// The stored deployment and its revision.
pub async fn stored_deployment(store: &kv::Store, name: &str) -> Option<(Deployment, u64)> {
    let e = store.entry(keys::deployment(&dname(name))).await.unwrap()?;
    (e.operation == kv::Operation::Put).then(|| {
        (
            Deployment::from_json(&e.value).expect("valid stored deployment"),
            e.revision,
        )
    })
}

/// How many values `key` has had (its KV history).
pub async fn history_len(store: &kv::Store, key: &str) -> usize {
    let h: Vec<kv::Entry> = store
        .history(key)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    h.len()
}

/// Every key in the bucket.
pub async fn all_keys(store: &kv::Store) -> Vec<String> {
    store.keys().await.unwrap().try_collect().await.unwrap()
}

pub fn deployment_status(
    name: &str,
    observed_revision: u64,
    targets: &[(&str, u64)],
) -> DeploymentStatus {
    DeploymentStatus {
        api_version: ApiVersion,
        name: dname(name),
        observed_revision,
        created_revision: observed_revision,
        targets: targets.iter().map(|(a, g)| (agent(a), *g)).collect(),
        conflicts: vec![],
        error: None,
    }
}

fn condition(t: ConditionType, status: bool, reason: &str) -> Condition {
    Condition {
        type_: t,
        status,
        reason: reason.into(),
        message: String::new(),
        last_transition_time: "2026-11-22T10:00:00Z".into(),
    }
}

/// A status for `id` on `generation` with `deployment`'s resources rendered
/// at `revision`, all Ready when `ready`.
pub fn agent_status(
    id: &str,
    generation: u64,
    ready: bool,
    deployment: &Deployment,
    revision: u64,
) -> AgentStatus {
    let resources = deployment
        .render_resources(revision)
        .unwrap()
        .into_iter()
        .map(|r| {
            let state = if ready {
                ResourceState::Ready {
                    since: "2026-11-22T10:00:00Z".into(),
                    details: ReadyDetails::File {
                        sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                            .into(),
                        size: 4,
                        mode: "0644".into(),
                        uid: 0,
                        gid: 0,
                    },
                }
            } else {
                ResourceState::Failed {
                    since: "2026-11-22T10:00:00Z".into(),
                    reason: "PermissionDenied".into(),
                    message: "cannot write".into(),
                    attempts: 2,
                    retry_after_seconds: Some(4),
                }
            };
            (
                r.id.clone(),
                ResourceStatus {
                    kind: r.spec.kind_str().to_owned(),
                    spec_hash: r.spec_hash(),
                    source: r.source.clone(),
                    state,
                },
            )
        })
        .collect();
    AgentStatus {
        api_version: ApiVersion,
        agent_id: agent(id),
        instance_id: format!("{id}-instance"),
        manifest_generation: generation,
        observed_generation: generation,
        observed_revision: 40,
        resources,
        conditions: vec![
            condition(
                ConditionType::Ready,
                ready,
                if ready {
                    "AllResourcesReady"
                } else {
                    "ResourcesNotReady"
                },
            ),
            condition(
                ConditionType::Degraded,
                !ready,
                if ready {
                    "AsExpected"
                } else {
                    "ResourcesFailing"
                },
            ),
        ],
        rejection: None,
        released: vec![],
        agent: AgentBuild {
            version: "0.1.0".into(),
            arch: "aarch64".into(),
            os: "linux".into(),
        },
    }
}

/// `status` after rejecting `generation` (the previous manifest keeps running).
pub fn rejected(mut status: AgentStatus, generation: u64) -> AgentStatus {
    let r = Rejection {
        reason: "PathOutsideRoots".into(),
        message: "resource hello/motd: /etc/flotilla-demo/motd is outside every file root".into(),
        revision: 41,
        generation: Some(generation),
    };
    status.observed_generation = generation;
    status.conditions.push(Condition {
        type_: ConditionType::ManifestRejected,
        status: true,
        reason: r.reason.clone(),
        message: r.message.clone(),
        last_transition_time: "2026-11-22T10:00:00Z".into(),
    });
    status.rejection = Some(r);
    status
}

pub fn inventory(id: &str, labels: &[(&str, &str)]) -> AgentInventory {
    AgentInventory {
        api_version: ApiVersion,
        agent_id: agent(id),
        instance_id: format!("{id}-instance"),
        agent_version: "0.1.0".into(),
        arch: "aarch64".into(),
        os: "linux".into(),
        hostname: Some(format!("{id}.local")),
        reconcilers: vec![ResourceKind::File],
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    }
}

pub fn heartbeat(id: &str, generation: u64) -> Heartbeat {
    Heartbeat {
        api_version: ApiVersion,
        agent_id: agent(id),
        instance_id: format!("{id}-instance"),
        seq: 7,
        manifest_generation: generation,
        ready: true,
        identity_conflict: None,
    }
}

/// The manifest the control plane would render for `id` from `deployment`.
pub fn manifest(
    id: &str,
    generation: u64,
    deployment: &Deployment,
    revision: u64,
) -> AgentManifest {
    let mut m = AgentManifest::empty(agent(id), generation);
    m.resources = deployment.render_resources(revision).unwrap();
    m
}

/// A child whose stdout and stderr lines arrive on channels.
pub struct Spawned {
    pub child: Child,
    pub stdout: mpsc::Receiver<String>,
    pub stderr: mpsc::Receiver<String>,
}

impl Spawned {
    pub fn start(url: &str, args: &[&str]) -> Self {
        let mut child = command(url, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn flotilla");
        let lines = |r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().unwrap()));
        let stderr = lines(Box::new(child.stderr.take().unwrap()));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// The next line containing `needle` (lines before it are skipped).
    pub fn expect_line(rx: &mpsc::Receiver<String>, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(e) => panic!("no line containing {needle:?}: {e}"),
            }
        }
    }

    /// Waits for exit (bounded) and returns the code.
    pub fn wait_exit(&mut self) -> i32 {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().expect("exited normally");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "flotilla did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
