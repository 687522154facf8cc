//! Shared harness: a real nats-server per test, the fleet bucket, the
//! control-plane daemon run in-process (the binary's own code), typed reads
//! and a polling helper.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{Operation, Store};
use bytes::Bytes;
use flotilla_control::daemon::{self, Config, DaemonError, Metrics};
use manifest_types::{AgentId, AgentManifest, BucketName, DeploymentName, DeploymentStatus, keys};
use serde_json::{Value, json};
use testbed::NatsServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a condition may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn agent(id: &str) -> AgentId {
    AgentId::new(id).unwrap()
}

pub fn name(n: &str) -> DeploymentName {
    DeploymentName::new(n).unwrap()
}

/// The heartbeat bucket beside the fleet bucket (docs/adr/0015).
#[allow(dead_code)]
pub async fn heartbeats(server: &NatsServer) -> Store {
    let js = async_nats::jetstream::new(server.client().await);
    flotilla_nats::ensure_heartbeat_bucket(
        &js,
        &BucketName::default(),
        flotilla_nats::Replicas::ONE,
    )
    .await
    .expect("heartbeat bucket")
}

/// The fleet bucket, created (with its RePublish rule) if missing.
pub async fn store(server: &NatsServer) -> Store {
    let js = async_nats::jetstream::new(server.client().await);
    flotilla_control::bucket::ensure_bucket(
        &js,
        &BucketName::default(),
        flotilla_nats::Replicas::ONE,
    )
    .await
    .expect("fleet bucket")
}

/// The control-plane daemon running in-process; stopped like SIGTERM.
pub struct Control {
    /// The daemon's counters (passes, writes, settled revision).
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), DaemonError>>>,
}

impl Control {
    pub fn start(server: &NatsServer) -> Self {
        let mut config = Config::new(server.url());
        config.retry_after = Duration::from_millis(200);
        config.bucket_check_interval = Duration::from_millis(500);
        let metrics = config.metrics.clone();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(daemon::run(config, async move {
            let _ = rx.await;
        }));
        Self {
            metrics,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Waits until the daemon has applied everything up to `revision` from
    /// its watch and finished any pass it called for: a barrier, after which
    /// its counters say what those entries cost.
    pub async fn settled(&self, revision: u64) {
        wait_for(
            &format!("daemon settled at revision {revision}"),
            || async { (self.metrics.settled_revision() >= revision).then_some(()) },
        )
        .await
    }

    /// Signals shutdown and waits for a clean exit.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("daemon stops within the timeout")
            .expect("daemon task did not panic")
            .expect("daemon exits cleanly");
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Polls `check` until it yields a value; fails the test after [`WAIT`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A deployment document as an operator writes it.
pub fn deployment(name: &str, selector: Value, resources: Value) -> Value {
    json!({"apiVersion": "flotilla.dev/v1", "kind": "Deployment", "name": name,
           "selector": selector, "resources": resources})
}

pub fn file(id: &str, path: &str, content: &str) -> Value {
    json!({"id": id, "kind": "File", "spec": {"path": path, "content": content}})
}

/// Writes `deployments.<name>`; returns its revision.
pub async fn put_deployment(store: &Store, doc: &Value) -> u64 {
    let n = name(doc["name"].as_str().unwrap());
    store
        .put(
            keys::deployment(&n),
            Bytes::from(serde_json::to_vec(doc).unwrap()),
        )
        .await
        .unwrap()
}

/// Registers an agent with `labels`, as the agent does at start.
/// Registers agent `id` as a device and an operator do: the operator's
/// labels (`values.<id>`, [`label`]) and the device's inventory reporting
/// the same labels. Returns the inventory's revision.
pub async fn register(store: &Store, id: &str, labels: Value) -> u64 {
    label(store, id, labels.clone()).await;
    let inventory = json!({"apiVersion": "flotilla.dev/v1", "agentId": id,
        "instanceId": format!("instance-{id}"), "agentVersion": "0.1.0", "arch": "x86_64",
        "os": "linux", "reconcilers": ["File"], "labels": labels});
    store
        .put(
            keys::inventory(&agent(id)),
            Bytes::from(serde_json::to_vec(&inventory).unwrap()),
        )
        .await
        .unwrap()
}

/// Sets the operator's labels of `id` (`values.<id>`), keeping its values;
/// returns the revision.
pub async fn label(store: &Store, id: &str, labels: Value) -> u64 {
    let key = keys::values(&agent(id));
    let mut doc = match store.get(&key).await.unwrap() {
        Some(b) => serde_json::from_slice::<Value>(&b).unwrap(),
        None => json!({"apiVersion": "flotilla.dev/v1", "agentId": id}),
    };
    doc["labels"] = labels;
    store
        .put(key, Bytes::from(serde_json::to_vec(&doc).unwrap()))
        .await
        .unwrap()
}

/// Writes an agent status claiming it has looked at `observed`.
pub async fn put_status(store: &Store, id: &str, accepted: u64, observed: u64) {
    let status = json!({"apiVersion": "flotilla.dev/v1", "agentId": id, "instanceId": "i",
        "manifestGeneration": accepted, "observedGeneration": observed, "observedRevision": 1,
        "resources": {}, "conditions": [],
        "agent": {"version": "0.1.0", "arch": "x86_64", "os": "linux"}});
    store
        .put(
            keys::actual_state(&agent(id)),
            Bytes::from(serde_json::to_vec(&status).unwrap()),
        )
        .await
        .unwrap();
}

/// The bucket's last revision (stream sequence), asked afresh
/// (`Store::status` answers from a cache).
pub async fn last_revision(store: &Store) -> u64 {
    let mut stream = store.stream.clone();
    stream.info().await.unwrap().state.last_sequence
}

/// The manifest stored for `id` and its revision (None: missing, marker).
pub async fn manifest(store: &Store, id: &str) -> Option<(u64, AgentManifest)> {
    let e = store
        .entry(keys::desired_state(&agent(id)))
        .await
        .unwrap()?;
    if e.operation != Operation::Put {
        return None;
    }
    Some((
        e.revision,
        AgentManifest::from_json(&e.value).expect("valid manifest"),
    ))
}

/// The deployment status stored for `n` and its revision.
pub async fn status(store: &Store, n: &str) -> Option<(u64, DeploymentStatus)> {
    let e = store
        .entry(keys::deployment_status(&name(n)))
        .await
        .unwrap()?;
    if e.operation != Operation::Put {
        return None;
    }
    Some((
        e.revision,
        serde_json::from_slice(&e.value).expect("valid status"),
    ))
}

/// Resource ids of a manifest, in order.
pub fn ids(m: &AgentManifest) -> Vec<String> {
    m.resources.iter().map(|r| r.id.to_string()).collect()
}

/// Waits until `id`'s manifest satisfies `pred`; returns it.
pub async fn wait_manifest(
    store: &Store,
    id: &str,
    what: &str,
    pred: impl Fn(&AgentManifest) -> bool,
) -> (u64, AgentManifest) {
    wait_for(&format!("{id}: {what}"), || async {
        manifest(store, id).await.filter(|(_, m)| pred(m))
    })
    .await
}

/// Waits until the status of `n` satisfies `pred`; returns it.
pub async fn wait_status(
    store: &Store,
    n: &str,
    what: &str,
    pred: impl Fn(&DeploymentStatus) -> bool,
) -> (u64, DeploymentStatus) {
    wait_for(&format!("status of {n}: {what}"), || async {
        status(store, n).await.filter(|(_, s)| pred(s))
    })
    .await
}
