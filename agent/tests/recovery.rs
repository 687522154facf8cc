//! The control plane owns `desired-state.<id>` and heals it; a bucket deleted
//! and created again recovers on its own. A real nats-server, the control
//! plane's daemon and an agent, both in-process (the binaries' own code).
//! docs/adr/0012-the-control-plane-owns-desired-state.md

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::Store;
use bytes::Bytes;
use common::*;
use flotilla_control::daemon::{self, Metrics};
use manifest_types::{AgentId, AgentManifest, AgentStatus, keys};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The control-plane daemon in-process, with its counters.
struct Control {
    metrics: Arc<Metrics>,
    _stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), flotilla_control::DaemonError>>,
}

impl Control {
    fn start(h: &Harness) -> Self {
        let mut config = daemon::Config::new(h.server.url());
        config.retry_after = Duration::from_millis(200);
        config.bucket_check_interval = Duration::from_millis(500);
        let metrics = config.metrics.clone();
        let (stop, rx) = oneshot::channel();
        let task = tokio::spawn(daemon::run(config, async move {
            let _ = rx.await;
        }));
        Self {
            metrics,
            _stop: stop,
            task,
        }
    }

    /// Waits until the daemon has applied its watch up to `revision` and
    /// finished any pass that called for.
    async fn settled(&self, revision: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.metrics.settled_revision() < revision {
            assert!(
                tokio::time::Instant::now() < deadline,
                "daemon did not settle at revision {revision} (at {})",
                self.metrics.settled_revision()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn deployment(root: &std::path::Path, content: &str) -> Value {
    json!({"apiVersion": "flotilla.dev/v1", "kind": "Deployment", "name": "web",
        // The device's own label (these tests are about recovery, not trust).
        "selector": {"matchLabels": {"role": "kiosk"}, "deviceLabels": true},
        "resources": [{"id": "motd", "kind": "File",
                       "spec": {"path": root.join("motd"), "content": content}}]})
}

async fn put_deployment(store: &Store, doc: &Value) -> u64 {
    store
        .put(
            "deployments.web",
            Bytes::from(serde_json::to_vec(doc).unwrap()),
        )
        .await
        .unwrap()
}

fn key() -> String {
    keys::desired_state(&AgentId::new("pi-1").unwrap())
}

/// The stored manifest and its revision.
async fn stored(store: &Store) -> Option<(u64, AgentManifest)> {
    let e = store.entry(key()).await.unwrap()?;
    AgentManifest::from_json(&e.value)
        .ok()
        .map(|m| (e.revision, m))
}

/// The agent's status and the revision of its key.
async fn status_entry(store: &Store) -> Option<(u64, AgentStatus)> {
    let e = store
        .entry(keys::actual_state(&AgentId::new("pi-1").unwrap()))
        .await
        .unwrap()?;
    serde_json::from_slice(&e.value)
        .ok()
        .map(|s| (e.revision, s))
}

/// Converged on `generation`, with nothing rejected.
fn settled_on(s: &AgentStatus, generation: u64) -> bool {
    s.converged_on(generation) && s.rejection.is_none()
}

/// Waits for the control plane to replace the value it did not write (put
/// at `foreign_revision`, readable generation `foreign_generation`) and for
/// the agent to converge on the replacement; checks it took one pass.
async fn healed(
    store: &Store,
    control: &Control,
    passes_before: u64,
    foreign_revision: u64,
    foreign_generation: u64,
    agent_observed: u64,
) -> AgentManifest {
    let what = format!("value at revision {foreign_revision} replaced");
    let (rev, m) = {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some((rev, m)) = stored(store).await.filter(|(r, _)| *r > foreign_revision) {
                break (rev, m);
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert!(
        m.generation > foreign_generation.max(agent_observed),
        "{what}: generation {} is not above the key's {foreign_generation} and the agent's {agent_observed}",
        m.generation
    );
    let generation = m.generation;
    wait_status(store, "pi-1", "converged on the replacement", |s| {
        settled_on(s, generation)
    })
    .await;
    let (status_rev, _) = status_entry(store).await.unwrap();
    control.settled(status_rev.max(rev)).await;
    assert_eq!(
        control.metrics.passes(),
        passes_before + 1,
        "{what}: one pass replaces it; its echo and the agent's statuses cost none"
    );
    m
}

#[tokio::test]
async fn every_value_the_control_plane_did_not_write_is_replaced_and_the_agent_converges() {
    let h = Harness::new().await;
    let store = h.store().await;
    let root = h.root("pi-1");
    let control = Control::start(&h);
    let mut config = h.config("pi-1");
    config.labels.insert("role".into(), "kiosk".into());
    let _agent = RunningAgent::start(config);

    put_deployment(&store, &deployment(&root, "v1")).await;
    wait_for("v1 on disk", || {
        std::fs::read_to_string(root.join("motd")).ok().as_deref() == Some("v1")
    })
    .await;
    let (first_rev, first) = stored(&store).await.unwrap();
    put_deployment(&store, &deployment(&root, "v2")).await;
    wait_for("v2 on disk", || {
        std::fs::read_to_string(root.join("motd")).ok().as_deref() == Some("v2")
    })
    .await;
    let (_, mut current) = stored(&store).await.unwrap();
    wait_status(&store, "pi-1", "converged on v2", |s| {
        settled_on(s, current.generation)
    })
    .await;
    control.settled(status_entry(&store).await.unwrap().0).await;

    // Each foreign value, in turn: (what, how it is written).
    let older = store
        .entry_for_revision(key(), first_rev)
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(AgentManifest::from_json(&older).unwrap(), first);
    enum Foreign {
        Put(Bytes),
        Delete,
        Purge,
    }
    let edited = |m: &AgentManifest, generation: u64, content: Option<&str>| {
        let mut edited = m.clone();
        edited.generation = generation;
        match content {
            Some(content) => {
                let manifest_types::ResourceSpec::File(f) = &mut edited.resources[0].spec else {
                    panic!("a file");
                };
                f.content = content.into();
            }
            None => edited.resources.clear(),
        }
        Foreign::Put(Bytes::from(edited.to_json()))
    };
    let cases = [
        "an older revision put back",
        "a hand edit at the same generation",
        "a hand edit at a higher generation",
        "malformed JSON",
        "a deleted key",
        "a purged key",
    ];
    for what in cases {
        let (_, before) = status_entry(&store).await.unwrap();
        let passes = control.metrics.passes();
        let foreign = match what {
            "an older revision put back" => Foreign::Put(older.clone()),
            "a hand edit at the same generation" => {
                edited(&current, current.generation, Some("edited by hand"))
            }
            "a hand edit at a higher generation" => edited(&current, current.generation + 5, None),
            "malformed JSON" => Foreign::Put(Bytes::from_static(b"{\"apiVersion\": \"flotilla")),
            "a deleted key" => Foreign::Delete,
            _ => Foreign::Purge,
        };
        let foreign_generation = match &foreign {
            Foreign::Put(b) => serde_json::from_slice::<Value>(b)
                .ok()
                .and_then(|v| v["generation"].as_u64())
                .unwrap_or(0),
            Foreign::Delete | Foreign::Purge => 0,
        };
        // A replacement comes after the foreign value: above this revision.
        let revision = match foreign {
            Foreign::Put(bytes) => store.put(key(), bytes).await.unwrap(),
            Foreign::Delete => {
                let before = last_revision(&store).await;
                store.delete(key()).await.unwrap();
                before
            }
            Foreign::Purge => {
                let before = last_revision(&store).await;
                store.purge(key()).await.unwrap();
                before
            }
        };
        let healed = healed(
            &store,
            &control,
            passes,
            revision,
            foreign_generation,
            before.observed_generation,
        )
        .await;
        assert_eq!(healed.resources, current.resources, "{what}: the rendering");
        assert_eq!(
            std::fs::read_to_string(root.join("motd")).unwrap(),
            "v2",
            "{what}: the device ends on the rendering"
        );
        current = healed;
    }
}

#[tokio::test]
async fn a_bucket_deleted_and_created_again_recovers_on_its_own_and_a_new_apply_converges() {
    let h = Harness::new().await;
    let store = h.store().await;
    let root = h.root("pi-1");
    let control = Control::start(&h);
    let mut config = h.config("pi-1");
    config.labels.insert("role".into(), "kiosk".into());
    let _agent = RunningAgent::start(config);

    put_deployment(&store, &deployment(&root, "v1")).await;
    let (_, m1) = {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(found) = stored(&store)
                .await
                .filter(|(_, m)| !m.resources.is_empty())
            {
                break found;
            }
            assert!(tokio::time::Instant::now() < deadline, "v1 rendered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    wait_status(&store, "pi-1", "converged on v1", |s| {
        settled_on(s, m1.generation)
    })
    .await;
    // A real fleet's bucket has a long history: make sure the new one's
    // revisions start well below the old ones.
    for seq in 0..300u32 {
        store
            .put("heartbeat.filler", Bytes::from(seq.to_string()))
            .await
            .unwrap();
    }
    let old_revision = last_revision(&store).await;

    let js = async_nats::jetstream::new(h.server.client().await);
    js.delete_key_value("fleet").await.unwrap();

    // No operator step: the control plane creates the bucket again (with its
    // RePublish rule: ensure_bucket refuses one without), the agent registers
    // and reports again into it.
    let deadline = tokio::time::Instant::now() + WAIT;
    let store = loop {
        if control.metrics.bucket_replaced() >= 1
            && let Ok(s) = js.get_key_value("fleet").await
        {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "bucket recreated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    h.store().await;
    wait_for_entry(&store, "agents.pi-1").await;
    wait_for_entry(&store, "actual-state.pi-1").await;

    // A new apply converges, above everything the agent saw before.
    let rev = put_deployment(&store, &deployment(&root, "v2")).await;
    assert!(
        rev < old_revision,
        "revisions restarted: {rev} vs {old_revision}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    let m2 = loop {
        if let Some((_, m)) = stored(&store).await.filter(|(_, m)| {
            m.resources
                .first()
                .is_some_and(|r| r.source.as_ref().is_some_and(|s| s.revision == rev))
        }) {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "v2 rendered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(m2.generation > m1.generation);
    wait_status(&store, "pi-1", "converged on v2", |s| {
        settled_on(s, m2.generation)
    })
    .await;
    wait_for("v2 on disk", || {
        std::fs::read_to_string(root.join("motd")).ok().as_deref() == Some("v2")
    })
    .await;
}

/// The bucket's last revision, asked afresh (`Store::status` answers from a
/// cache).
async fn last_revision(store: &Store) -> u64 {
    let mut stream = store.stream.clone();
    stream.info().await.unwrap().state.last_sequence
}

async fn wait_for_entry(store: &Store, key: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !matches!(store.entry(key).await, Ok(Some(_))) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} written again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
