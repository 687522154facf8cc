//! `deploy/nats/flotilla.conf`'s authorization block on a real nats-server:
//! the control plane runs as `control`, operators write as `operator`, a
//! device hears its committed manifests as its own user, and neither the
//! control plane nor an operator can publish into the RePublish subjects.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use flotilla_control::daemon::{self, Config, NatsAuth};
use futures::StreamExt;
use manifest_types::{AgentManifest, BucketName, keys};
use serde_json::json;
use testbed::NatsServer;
use tokio::sync::oneshot;

/// The file's `authorization { … }` block with test passwords filled in.
fn authorization_block() -> String {
    let path = testbed::workspace_root().join("deploy/nats/flotilla.conf");
    let conf = std::fs::read_to_string(&path).expect("deploy/nats/flotilla.conf");
    let start = conf
        .find("authorization {")
        .expect("an authorization block");
    conf[start..]
        .replace("$FLOTILLA_CONTROL_PASSWORD", "\"control-secret\"")
        .replace("$FLOTILLA_OPERATOR_PASSWORD", "\"operator-secret\"")
        .replace("$FLOTILLA_PI_01_PASSWORD", "\"pi-01-secret\"")
}

async fn connect(server: &NatsServer, user: &str, inbox: Option<&str>) -> async_nats::Client {
    let mut options =
        async_nats::ConnectOptions::with_user_and_password(user.into(), format!("{user}-secret"));
    if let Some(prefix) = inbox {
        options = options.custom_inbox_prefix(prefix);
    }
    options.connect(server.url()).await.expect("connect")
}

/// The next manifest the device hears.
async fn next(sub: &mut async_nats::Subscriber) -> AgentManifest {
    let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a republished manifest")
        .expect("subscription open");
    AgentManifest::from_json(&m.payload).expect("only committed, valid manifests")
}

#[tokio::test]
async fn the_shipped_permissions_carry_the_loop_and_guard_the_republish_subjects() {
    let server = NatsServer::start_with_config(&authorization_block());
    let mut config = Config::new(server.url());
    config.auth = NatsAuth::UserPassword {
        user: "control".into(),
        password: "control-secret".into(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let control = tokio::spawn(daemon::run(config, async move {
        let _ = stopped.await;
    }));

    let operator = connect(&server, "operator", None).await;
    let js = async_nats::jetstream::new(operator.clone());
    let store = wait_for("bucket created by the control plane", || async {
        js.get_key_value("fleet").await.ok()
    })
    .await;

    // The device listens on its own republished subject only.
    let pi = connect(&server, "pi-01", Some("_INBOX.pi-01")).await;
    let mut manifests = pi
        .subscribe(keys::republish_subject(
            &BucketName::default(),
            &agent("pi-01"),
        ))
        .await
        .unwrap();
    // A permitted round trip (direct get of its own key), so the server has
    // the subscription before anything is written.
    let _ = pi
        .request(
            keys::direct_get_subject(
                &BucketName::default(),
                &keys::desired_state(&agent("pi-01")),
            ),
            Bytes::new(),
        )
        .await;

    register(&store, "pi-01", json!({"role": "kiosk"})).await;
    let doc = |c: &str| {
        deployment(
            "web",
            json!({"matchLabels": {"role": "kiosk"}}),
            json!([file("f", "/etc/f", c)]),
        )
    };
    put_deployment(&store, &doc("one")).await;
    let mut m = next(&mut manifests).await;
    if m.resources.is_empty() {
        // Registered before the deployment was rendered: the empty manifest first.
        m = next(&mut manifests).await;
    }
    assert_eq!(m.resources.len(), 1);

    // Neither the control plane's nor an operator's user may forge one.
    let forged = keys::republish_subject(&BucketName::default(), &agent("pi-01"));
    let control_client = connect(&server, "control", None).await;
    control_client
        .publish(forged.clone(), Bytes::from_static(b"forged"))
        .await
        .unwrap();
    control_client.flush().await.unwrap();
    operator
        .publish(forged.clone(), Bytes::from_static(b"forged"))
        .await
        .unwrap();
    operator.flush().await.unwrap();
    // The server logs each denial, naming the user and the subject.
    let denied = |user: &str| {
        server.log().lines().any(|l| {
            l.contains("Violation") && l.contains(&format!("user:{user}\"")) && l.contains(&forged)
        })
    };
    wait_for("both forgeries denied", || async {
        (denied("control") && denied("operator")).then_some(())
    })
    .await;
    // The next thing the device hears is the next committed manifest.
    put_deployment(&store, &doc("two")).await;
    let m2 = next(&mut manifests).await;
    assert_eq!(m2.generation, m.generation + 1);

    let _ = stop.send(());
    control.await.unwrap().expect("control plane exits cleanly");
}
