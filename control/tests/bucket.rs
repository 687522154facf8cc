//! The fleet bucket: created with the RePublish rule agents depend on, and an
//! existing bucket without it is refused.

mod common;

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use common::*;
use flotilla_control::bucket::{BucketError, HISTORY, ensure_bucket};
use futures::StreamExt;
use manifest_types::{BucketName, keys};
use testbed::NatsServer;

#[tokio::test]
async fn creates_the_bucket_with_the_republish_rule_and_reopens_it() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let info = store.status().await.unwrap().info;
    let rule = info.config.republish.expect("RePublish rule");
    assert_eq!(rule.source, "$KV.fleet.desired-state.>");
    assert_eq!(rule.destination, "flotilla.fleet.desired-state.>");
    assert!(!rule.headers_only);
    assert_eq!(info.config.max_messages_per_subject, HISTORY);

    // Opening it again (a second control plane, a restart) is fine.
    let js = async_nats::jetstream::new(server.client().await);
    ensure_bucket(&js, &BucketName::default(), flotilla_nats::Replicas::ONE)
        .await
        .unwrap();
}

#[tokio::test]
async fn republishes_committed_manifests_only() {
    let server = NatsServer::start();
    // One connection for the subscription and the writes: the server handles
    // the SUB before the first write (a flush alone does not wait for that).
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let store = ensure_bucket(&js, &BucketName::default(), flotilla_nats::Replicas::ONE)
        .await
        .unwrap();
    let mut sub = client
        .subscribe(keys::republish_subject(
            &BucketName::default(),
            &agent("pi-1"),
        ))
        .await
        .unwrap();
    let key = keys::desired_state(&agent("pi-1"));
    let r1 = store.put(&key, Bytes::from_static(b"v1")).await.unwrap();
    store
        .update(&key, Bytes::from_static(b"v2"), r1)
        .await
        .unwrap();
    let lost = store.update(&key, Bytes::from_static(b"loser"), r1).await;
    assert_eq!(
        lost.unwrap_err().kind(),
        kv::UpdateErrorKind::WrongLastRevision
    );
    store.put(&key, Bytes::from_static(b"v3")).await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap_or_else(|_| panic!("republished message; seen so far {seen:?}"))
            .unwrap();
        let revision = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Sequence"))
            .map(|v| v.to_string());
        seen.push((String::from_utf8(m.payload.to_vec()).unwrap(), revision));
    }
    assert_eq!(seen[0], ("v1".to_owned(), Some(r1.to_string())));
    assert_eq!(seen[1].0, "v2");
    assert_eq!(seen[2].0, "v3");
}

#[tokio::test]
async fn refuses_an_existing_bucket_without_the_rule() {
    let server = NatsServer::start();
    let js = async_nats::jetstream::new(server.client().await);
    js.create_key_value(kv::Config {
        bucket: "fleet".into(),
        history: 5,
        ..Default::default()
    })
    .await
    .unwrap();
    let err = ensure_bucket(&js, &BucketName::default(), flotilla_nats::Replicas::ONE)
        .await
        .unwrap_err();
    match err {
        BucketError::MissingRepublish { found, .. } => assert_eq!(found, "no rule"),
        other => panic!("expected MissingRepublish, got {other:?}"),
    }
}

#[tokio::test]
async fn the_daemon_refuses_to_run_on_a_bucket_without_the_rule() {
    let server = NatsServer::start();
    let js = async_nats::jetstream::new(server.client().await);
    js.create_key_value(kv::Config {
        bucket: "fleet".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let result = tokio::time::timeout(
        WAIT,
        flotilla_control::daemon::run(
            flotilla_control::Config::new(server.url()),
            std::future::pending(),
        ),
    )
    .await
    .expect("the daemon gives up at once");
    assert!(
        matches!(
            result,
            Err(flotilla_control::DaemonError::Bucket(
                BucketError::MissingRepublish { .. }
            ))
        ),
        "{result:?}"
    );
}

/// On one server a bucket cannot have 3 replicas: asking for them is a
/// clear error, at creation and for an existing bucket, which is left as
/// it was (docs/adr/0021).
#[tokio::test]
async fn more_replicas_than_servers_is_a_clear_error_and_changes_nothing() {
    let server = NatsServer::start();
    let js = async_nats::jetstream::new(server.client().await);
    let three = flotilla_nats::Replicas::new(3).unwrap();
    let err = ensure_bucket(&js, &BucketName::default(), three)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BucketError::Create { .. }),
        "creation refused: {err:?}"
    );
    let store = ensure_bucket(&js, &BucketName::default(), flotilla_nats::Replicas::ONE)
        .await
        .unwrap();
    store.put("values.pi-1", Bytes::from("{}")).await.unwrap();
    let err = ensure_bucket(&js, &BucketName::default(), three)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            BucketError::Replicas {
                have: 1,
                want: 3,
                ..
            }
        ) && text.contains("--replicas 1"),
        "{text}"
    );
    let info = store.status().await.unwrap().info;
    assert_eq!(info.config.num_replicas.max(1), 1);
    assert_eq!(
        store.get("values.pi-1").await.unwrap(),
        Some(Bytes::from("{}")),
        "nothing lost"
    );
    assert!(flotilla_nats::Replicas::new(0).is_err());
    assert!(flotilla_nats::Replicas::new(6).is_err());
}
