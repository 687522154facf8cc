//! Shared helpers for the CLI's integration tests: a real nats-server per
//! test (testbed), the fleet bucket as the control plane creates it, the
//! built `flotilla` binary, and typed documents to seed KV with.

#![allow(dead_code)] // each test file uses a different subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::TryStreamExt;
use manifest_types::{
    AgentBuild, AgentId, AgentInventory, AgentManifest, AgentStatus, ApiVersion, BucketName,
    Condition, ConditionType, Deployment, DeploymentName, DeploymentStatus, Heartbeat,
    ReadyDetails, Rejection, ResourceKind, ResourceState, ResourceStatus, keys,
};
use testbed::NatsServer;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

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
        flotilla_nats::ensure_bucket(&js, &BucketName::default(), flotilla_nats::Replicas::ONE)
            .await
            .expect("fleet bucket")
    }

    /// The heartbeat bucket beside the fleet bucket (docs/adr/0015).
    pub async fn beats(&self) -> kv::Store {
        let js = async_nats::jetstream::new(self.server.client().await);
        flotilla_nats::ensure_heartbeat_bucket(
            &js,
            &BucketName::default(),
            flotilla_nats::Replicas::ONE,
        )
        .await
        .expect("heartbeat bucket")
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
        render_failures: vec![],
        error: None,
        rollout: None,
        held_back: Default::default(),
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
        removing: vec![],
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
        reason: manifest_types::RejectionReason::PathOutsideRoots,
        message: "resource hello/motd: /etc/flotilla-demo/motd is outside every file root".into(),
        revision: 41,
        generation: Some(generation),
    };
    status.observed_generation = generation;
    status.conditions.push(Condition {
        type_: ConditionType::ManifestRejected,
        status: true,
        reason: r.reason.to_string(),
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
        engines: Vec::new(),
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
        interval_ms: None,
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

/// A child whose stdout and stderr lines arrive on channels, read by tokio
/// tasks: waiting on it never blocks the test's runtime.
pub struct Spawned {
    pub child: tokio::process::Child,
    pub stdout: mpsc::UnboundedReceiver<String>,
    pub stderr: mpsc::UnboundedReceiver<String>,
}

impl Spawned {
    pub fn start(url: &str, args: &[&str]) -> Self {
        let mut child = tokio::process::Command::from(command(url, args))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn flotilla");
        fn lines(
            r: impl tokio::io::AsyncRead + Unpin + Send + 'static,
        ) -> mpsc::UnboundedReceiver<String> {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        }
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// The next line containing `needle` (lines before it are skipped).
    pub async fn expect_line(rx: &mut mpsc::UnboundedReceiver<String>, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) if line.contains(needle) => return line,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("no line containing {needle:?}: the output ended"),
                Err(_) => panic!("no line containing {needle:?} within 20 s"),
            }
        }
    }

    /// The next line, whatever it is (bounded).
    pub async fn next_line(rx: &mut mpsc::UnboundedReceiver<String>) -> String {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a line within 20 s")
            .expect("the output has not ended")
    }

    /// Waits for exit (bounded) and returns the code.
    pub async fn wait_exit(&mut self) -> i32 {
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("flotilla did not exit within 30 s")
            .expect("wait for flotilla")
            .code()
            .expect("exited normally")
    }
}
