//! Shared harness: a real nats-server, the fleet bucket, and agents run
//! in-process through `flotilla_agent::run` (the same code as the binary).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::kv::Store;
use bytes::Bytes;
use flotilla_agent::Config;
use manifest_types::{AgentId, AgentStatus, BucketName, keys};
use serde_json::{Value, json};
use testbed::NatsServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const WAIT: Duration = Duration::from_secs(15);

pub struct Harness {
    pub server: NatsServer,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub async fn new() -> Self {
        Self::with_server(NatsServer::start()).await
    }

    pub async fn with_server(server: NatsServer) -> Self {
        let h = Self {
            server,
            dir: tempfile::tempdir().unwrap(),
        };
        h.store().await;
        h
    }

    /// The fleet bucket, as the control plane sees it (created if missing).
    pub async fn store(&self) -> Store {
        let js = async_nats::jetstream::new(self.server.client().await);
        flotilla_control::bucket::ensure_bucket(
            &js,
            &BucketName::default(),
            flotilla_nats::Replicas::ONE,
        )
        .await
        .unwrap()
    }

    /// The heartbeat bucket beside the fleet bucket (docs/adr/0015).
    #[allow(dead_code)]
    pub async fn heartbeats(&self) -> Store {
        let js = async_nats::jetstream::new(self.server.client().await);
        flotilla_nats::ensure_heartbeat_bucket(
            &js,
            &BucketName::default(),
            flotilla_nats::Replicas::ONE,
        )
        .await
        .unwrap()
    }

    /// A file root for agent `id`, created on first use.
    pub fn root(&self, id: &str) -> PathBuf {
        let p = self.dir.path().join(id).join("root");
        std::fs::create_dir_all(&p).unwrap();
        p.canonicalize().unwrap()
    }

    pub fn config(&self, id: &str) -> Config {
        let mut c = Config::new(
            self.server.url(),
            AgentId::new(id).unwrap(),
            self.dir.path().join(id).join("state"),
        )
        .with_file_root(&self.root(id))
        .unwrap();
        // Never the host's /etc/systemd/system or system bus: tests of units
        // run against a device container (tests/units.rs).
        c.unit_dir = self.dir.path().join(id).join("units");
        c.systemd_bus = Some(format!(
            "unix:path={}",
            self.dir.path().join("no-systemd-here").display()
        ));
        c.resync_interval = Duration::from_millis(400);
        c.heartbeat_interval = Duration::from_millis(500);
        c
    }
}

/// An agent running in-process; stopped (like SIGTERM) on `stop` or drop.
pub struct RunningAgent {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), flotilla_agent::AgentError>>>,
}

impl RunningAgent {
    pub fn start(config: Config) -> Self {
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(flotilla_agent::run(config, async move {
            let _ = rx.await;
        }));
        Self {
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        self.stop.take().map(|s| s.send(()));
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

pub use testbed::manifest_json as manifest;

pub fn file(id: &str, path: &Path, content: &str) -> Value {
    json!({"id": id, "kind": "File", "spec": {"path": path, "content": content}})
}

/// Writes generation `generation` of `agent`'s manifest with `resources`;
/// returns the revision.
pub async fn apply(store: &Store, agent: &str, generation: u64, resources: Value) -> u64 {
    put_manifest(store, agent, manifest(agent, generation, resources)).await
}

/// Writes `desired-state.<agent>` as the control plane would; returns the revision.
pub async fn put_manifest(store: &Store, agent: &str, bytes: Bytes) -> u64 {
    store
        .put(keys::desired_state(&AgentId::new(agent).unwrap()), bytes)
        .await
        .unwrap()
}

pub async fn status(store: &Store, agent: &str) -> Option<AgentStatus> {
    let entry = store
        .entry(keys::actual_state(&AgentId::new(agent).unwrap()))
        .await
        .unwrap()?;
    serde_json::from_slice(&entry.value).ok()
}

/// Polls `agent`'s status until `pred` holds.
pub async fn wait_status(
    store: &Store,
    agent: &str,
    what: &str,
    pred: impl Fn(&AgentStatus) -> bool,
) -> AgentStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = None;
    loop {
        if let Some(s) = status(store, agent).await {
            if pred(&s) {
                return s;
            }
            last = Some(s);
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {agent}: {what}; last status: {last:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until `pred` holds (for file system effects).
pub async fn wait_for(what: &str, pred: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !pred() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An agent running in-process on the host that converges SystemdUnit
/// resources on a device container (testbed::device): it writes unit files
/// into a directory on the device's unit search path, talks to the device's
/// system bus, and has the share (`/flotilla` in the device) as file root.
pub struct Setup {
    pub h: Harness,
    pub device: testbed::device::Device,
    /// The share, as the host sees it.
    pub share: PathBuf,
    pub _agent: RunningAgent,
}

pub async fn setup(agent: &str) -> Setup {
    let device = testbed::device::Device::start(agent);
    let h = Harness::new().await;
    let share = device.share_dir().canonicalize().unwrap();
    let mut config = h.config(agent).with_file_root(&share).unwrap();
    config.unit_dir = device.units_dir();
    config.systemd_bus = Some(device.bus_address());
    let _agent = RunningAgent::start(config);
    Setup {
        h,
        device,
        share,
        _agent,
    }
}
