//! The agent's NATS footprint is narrow enough for a per-device user: the
//! full loop works for a user allowed only its own subjects, and that user
//! can neither read another device's intent nor forge its status.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use flotilla_agent::config::NatsAuth;
use manifest_types::{AgentId, keys};
use serde_json::json;
use testbed::NatsServer;

/// Exactly what `deploy/nats/flotilla.conf` grants an agent, for `pi-7`.
fn agent_user(id: &str) -> String {
    agent_identity(id, &format!(r#"user: "{id}", password: "secret-{id}""#))
}

/// The agent permissions for `id`, for a user identified by `identity`
/// (`user/password` or `nkey: U…`).
fn agent_identity(id: &str, identity: &str) -> String {
    format!(
        r#"{{ {identity}, permissions: {{
            publish: {{ allow: [
                "$JS.API.DIRECT.GET.KV_fleet.$KV.fleet.desired-state.{id}",
                "$JS.API.DIRECT.GET.KV_fleet.$KV.fleet.actual-state.{id}",
                "$JS.API.DIRECT.GET.KV_fleet.$KV.fleet.agents.{id}",
                "$JS.API.DIRECT.GET.KV_fleet.$KV.fleet.settings.heartbeat",
                "$KV.fleet.actual-state.{id}",
                "$KV.fleet-heartbeats.heartbeat.{id}",
                "$KV.fleet.agents.{id}"
            ] }}
            subscribe: {{ allow: ["flotilla.fleet.desired-state.{id}", "_INBOX.{id}.>"] }}
        }} }}"#
    )
}

#[tokio::test]
async fn a_device_user_confined_to_its_own_subjects_runs_the_full_loop() {
    let config = format!(
        "no_auth_user: admin\nauthorization {{ users = [\n {{ user: admin, password: admin }}\n {}\n {}\n] }}",
        agent_user("pi-7"),
        agent_user("pi-8")
    );
    let h = Harness::with_server(NatsServer::start_with_config(&config)).await;
    let store = h.store().await;
    let path = h.root("pi-7").join("f");
    let mut cfg = h.config("pi-7");
    cfg.auth = NatsAuth::UserPassword {
        user: "pi-7".into(),
        password: "secret-pi-7".into(),
    };
    let _agent = RunningAgent::start(cfg);

    put_manifest(
        &store,
        "pi-7",
        manifest("pi-7", 1, json!([file("d/f", &path, "one")])),
    )
    .await;
    wait_status(&store, "pi-7", "converged on 1", |s| s.converged_on(1)).await;
    put_manifest(
        &store,
        "pi-7",
        manifest("pi-7", 2, json!([file("d/f", &path, "two")])),
    )
    .await;
    wait_status(&store, "pi-7", "converged on 2", |s| s.converged_on(2)).await;
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
    let beats = h.heartbeats().await;
    for (bucket, key) in [
        (&beats, keys::heartbeat(&AgentId::new("pi-7").unwrap())),
        (&store, keys::inventory(&AgentId::new("pi-7").unwrap())),
    ] {
        let deadline = tokio::time::Instant::now() + WAIT;
        while bucket.entry(&key).await.unwrap().is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{key} never written under the restricted user"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // The same user against another device's keys: every attempt is denied.
    put_manifest(&store, "pi-8", manifest("pi-8", 1, json!([]))).await;
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = violations.clone();
    let client =
        async_nats::ConnectOptions::with_user_and_password("pi-7".into(), "secret-pi-7".into())
            .custom_inbox_prefix("_INBOX.pi-7")
            .request_timeout(Some(Duration::from_millis(500)))
            .event_callback(move |e| {
                let seen = seen.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = e {
                        seen.lock().unwrap().push(e.to_string());
                    }
                }
            })
            .connect(h.server.url())
            .await
            .unwrap();
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(Duration::from_millis(500));
    let stream = js.get_stream_no_info("KV_fleet").await.unwrap();
    let read_other = stream
        .direct_get_last_for_subject("$KV.fleet.desired-state.pi-8")
        .await;
    assert!(read_other.is_err(), "pi-7 read pi-8's manifest");
    let forge = js
        .publish(
            "$KV.fleet.actual-state.pi-8",
            Bytes::from_static(b"{\"forged\":true}"),
        )
        .await
        .unwrap()
        .await;
    assert!(forge.is_err(), "pi-7 forged pi-8's status");
    let _sub = client
        .subscribe("flotilla.fleet.desired-state.pi-8")
        .await
        .unwrap();
    let _admin = client
        .publish("flotilla.fleet.desired-state.pi-7", Bytes::new())
        .await;
    client.flush().await.unwrap();
    wait_for("three permission violations reported by the server", || {
        let v = violations.lock().unwrap();
        let count = |needle: &str| {
            v.iter()
                .filter(|e| e.to_lowercase().contains(needle))
                .count()
        };
        count("permissions violation for publish") >= 2
            && count("permissions violation for subscription") >= 1
    })
    .await;
    let forged = store
        .entry(keys::actual_state(&AgentId::new("pi-8").unwrap()))
        .await
        .unwrap();
    assert!(forged.is_none(), "a forged status reached the bucket");
}

/// The same confined device authenticated by an nkey seed file (the agent's
/// `--nkey-seed-file`) runs the full loop.
#[tokio::test]
async fn a_device_authenticated_by_an_nkey_seed_file_runs_the_full_loop() {
    let key = nkeys::KeyPair::new_user();
    let config = format!(
        "no_auth_user: admin\nauthorization {{ users = [\n {{ user: admin, password: admin }}\n {}\n] }}",
        agent_identity("pi-9", &format!("nkey: {}", key.public_key()))
    );
    let h = Harness::with_server(NatsServer::start_with_config(&config)).await;
    let store = h.store().await;
    let seed = h.root("pi-9").join("..").join("pi-9.nk");
    std::fs::write(&seed, key.seed().unwrap()).unwrap();
    let path = h.root("pi-9").join("f");
    let mut cfg = h.config("pi-9");
    cfg.auth = NatsAuth::NkeySeedFile(seed);
    let _agent = RunningAgent::start(cfg);
    put_manifest(
        &store,
        "pi-9",
        manifest("pi-9", 1, json!([file("d/f", &path, "nkey")])),
    )
    .await;
    wait_status(&store, "pi-9", "converged on 1", |s| s.converged_on(1)).await;
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "nkey");
}
