//! The bad-input campaign against the control plane, on a real nats-server:
//! every hostile deployment document of `testbed::hostile::deployments`
//! (truncated JSON, wrong types, bad names, traversal, oversize content,
//! broken templates and rollout policies, deep nesting) is written straight
//! into `deployments.<name>` by a raw client, next to a good deployment.
//! The control plane never stops: each hostile deployment gets a status
//! with its error, and the good deployment keeps being served and changed.

mod common;

use bytes::Bytes;
use common::*;
use serde_json::json;
use testbed::NatsServer;

#[tokio::test]
async fn hostile_deployments_are_reported_and_never_stop_the_others() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let control = Control::start(&server);
    register(&store, "pi-1", json!({"role": "kiosk"})).await;
    let good = |content: &str| {
        deployment(
            "good",
            json!({"matchLabels": {"role": "kiosk"}}),
            json!([file("motd", "/srv/motd", content)]),
        )
    };
    put_deployment(&store, &good("v1")).await;
    wait_manifest(&store, "pi-1", "v1 rendered", |m| m.resources.len() == 1).await;

    let corpus = testbed::hostile::deployments("placeholder");
    assert!(corpus.len() >= 100, "a corpus of {}", corpus.len());
    let mut last = 0;
    for (i, (_, bytes)) in corpus.iter().enumerate() {
        // The document names "placeholder"; the key names `hostile-<i>`.
        let text = String::from_utf8_lossy(bytes).replace("placeholder", &format!("hostile-{i}"));
        last = store
            .put(
                format!("deployments.hostile-{i}"),
                Bytes::from(text.into_bytes()),
            )
            .await
            .unwrap();
    }
    control.settled(last).await;
    // Every hostile deployment has a status that says what is wrong, and
    // selects nobody.
    for (i, (label, _)) in corpus.iter().enumerate() {
        let (_, s) = wait_status(&store, &format!("hostile-{i}"), label, |s| {
            s.error.is_some()
        })
        .await;
        assert!(s.targets.is_empty(), "{label}: {s:?}");
    }
    // The good deployment is still served: a change reaches the agent.
    let rev = put_deployment(&store, &good("v2")).await;
    let (_, m) = wait_manifest(&store, "pi-1", "v2 rendered", |m| {
        m.resources
            .first()
            .and_then(|r| r.source.as_ref())
            .is_some_and(|s| s.revision == rev)
    })
    .await;
    assert_eq!(
        common::ids(&m),
        ["good/motd"],
        "nothing hostile reached a manifest"
    );
    control.stop().await;
    eprintln!(
        "{} hostile deployments reported, the good one served",
        corpus.len()
    );
}
