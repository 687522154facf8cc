//! `fleet::progress` against a real nats-server and the real control loop:
//! how far a rendered deployment has landed, by the one convergence rule,
//! with heartbeat ages by server time.

mod common;

use bytes::Bytes;
use common::*;
use flotilla_control::fleet;
use manifest_types::convergence::{State, Thresholds};
use manifest_types::{AgentManifest, keys};
use serde_json::json;
use testbed::NatsServer;

/// A status reporting every resource of `m` (or all but the last) Ready.
async fn report(store: &async_nats::jetstream::kv::Store, m: &AgentManifest, drop_last: bool) {
    let id = m.agent_id.as_str();
    let mut resources = serde_json::Map::new();
    let keep = m.resources.len() - usize::from(drop_last);
    for r in &m.resources[..keep] {
        resources.insert(
            r.id.to_string(),
            json!({"kind": "File", "specHash": r.spec_hash(), "source": r.source,
                   "state": "ready", "since": "t",
                   "details": {"kind": "File", "sha256": "ab", "size": 1, "mode": "0644", "uid": 0, "gid": 0}}),
        );
    }
    let status = json!({"apiVersion": "flotilla.dev/v1", "agentId": id, "instanceId": "i",
        "manifestGeneration": m.generation, "observedGeneration": m.generation, "observedRevision": 1,
        "resources": resources,
        "conditions": [{"type": "Ready", "status": true, "reason": "AllResourcesReady", "message": "", "lastTransitionTime": "t"}],
        "agent": {"version": "0.1.0", "arch": "x86_64", "os": "linux"}});
    store
        .put(
            keys::actual_state(&agent(id)),
            Bytes::from(status.to_string()),
        )
        .await
        .unwrap();
}

async fn heartbeat(store: &async_nats::jetstream::kv::Store, id: &str) {
    let hb = json!({"apiVersion": "flotilla.dev/v1", "agentId": id, "instanceId": "i",
                    "seq": 1, "manifestGeneration": 1, "ready": true});
    store
        .put(keys::heartbeat(&agent(id)), Bytes::from(hb.to_string()))
        .await
        .unwrap();
}

#[tokio::test]
async fn progress_is_the_convergence_rule_over_every_target() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let beats = heartbeats(&server).await;
    let _control = Control::start(&server);
    let t = Thresholds::default();
    let web = name("web");
    assert_eq!(
        fleet::progress(&store, &beats, &web, &t).await.unwrap(),
        None
    );

    for id in ["pi-1", "pi-2", "pi-3"] {
        register(&store, id, json!({"role": "kiosk"})).await;
    }
    let doc = deployment(
        "web",
        json!({"matchLabels": {"role": "kiosk"}}),
        json!([file("a", "/srv/a", "1"), file("b", "/srv/b", "2")]),
    );
    let revision = put_deployment(&store, &doc).await;
    wait_status(&store, "web", "rendered", |s| {
        s.observed_revision == revision && s.targets.len() == 3
    })
    .await;
    let m1 = wait_manifest(&store, "pi-1", "rendered", |m| m.resources.len() == 2)
        .await
        .1;
    let m2 = wait_manifest(&store, "pi-2", "rendered", |m| m.resources.len() == 2)
        .await
        .1;

    // pi-1: every resource Ready at the revision, live. pi-2: converged
    // status but no heartbeat. pi-3: nothing reported.
    heartbeat(&beats, "pi-1").await;
    report(&store, &m1, false).await;
    report(&store, &m2, false).await;
    let p = fleet::progress(&store, &beats, &web, &t)
        .await
        .unwrap()
        .unwrap();
    let states: Vec<(&str, State)> = p
        .targets
        .iter()
        .map(|(a, v)| (a.as_str(), v.state))
        .collect();
    assert_eq!(
        states,
        [
            ("pi-1", State::Converged),
            ("pi-2", State::Stale),
            ("pi-3", State::Pending)
        ]
    );
    assert_eq!(
        p.line(&web, revision),
        format!("web: 1/3 agents converged on revision {revision}")
    );

    // pi-2 live but one resource missing: not converged by vacuity.
    heartbeat(&beats, "pi-2").await;
    report(&store, &m2, true).await;
    let p = fleet::progress(&store, &beats, &web, &t)
        .await
        .unwrap()
        .unwrap();
    let v = &p.targets[&agent("pi-2")];
    assert_eq!(v.state, State::Progressing, "{v:?}");
    assert_eq!(v.detail(), "web/b not reported yet");
}
