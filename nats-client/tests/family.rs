//! Whole-family reads against a real nats-server: every live key, with its
//! latest revision and server timestamp; deleted and purged keys left out;
//! other families not mixed in; the server's clock carried for ages.

use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use bytes::Bytes;
use flotilla_nats::{ensure_bucket, read_families, read_family, read_keys};
use manifest_types::BucketName;
use testbed::NatsServer;

async fn store(server: &NatsServer) -> jetstream::kv::Store {
    let js = jetstream::new(server.client().await);
    ensure_bucket(&js, &BucketName::default(), flotilla_nats::Replicas::ONE)
        .await
        .unwrap()
}

#[tokio::test]
async fn reads_every_live_key_of_a_family_with_revisions_and_server_times() {
    let server = NatsServer::start();
    let kv = store(&server).await;
    assert!(read_family(&kv, "actual-state").await.unwrap().is_empty());

    let before = SystemTime::now() - Duration::from_secs(5);
    kv.put("actual-state.a", Bytes::from_static(b"a1"))
        .await
        .unwrap();
    let a2 = kv
        .put("actual-state.a", Bytes::from_static(b"a2"))
        .await
        .unwrap();
    let b = kv
        .put("actual-state.b", Bytes::from_static(b"b1"))
        .await
        .unwrap();
    kv.put("actual-state.gone", Bytes::from_static(b"x"))
        .await
        .unwrap();
    kv.delete("actual-state.gone").await.unwrap();
    kv.put("actual-state.purged", Bytes::from_static(b"x"))
        .await
        .unwrap();
    kv.purge("actual-state.purged").await.unwrap();
    let hb = kv
        .put("heartbeat.a", Bytes::from_static(b"h"))
        .await
        .unwrap();
    kv.put("actual-statex.c", Bytes::from_static(b"other family"))
        .await
        .unwrap();

    let snap = read_family(&kv, "actual-state").await.unwrap();
    let keys: Vec<&str> = snap.entries.keys().map(String::as_str).collect();
    assert_eq!(keys, ["actual-state.a", "actual-state.b"]);
    let a = snap.get("actual-state.a").unwrap();
    assert_eq!((a.value.as_ref(), a.revision), (&b"a2"[..], a2));
    assert_eq!(snap.get("actual-state.b").unwrap().revision, b);
    // Server timestamps: after the test began (give or take clock skew of
    // the same machine), never after the read's server time.
    for e in snap.entries.values() {
        let created = SystemTime::from(e.created);
        assert!(created > before, "{e:?}");
        assert!(
            created <= snap.server_time,
            "{e:?} vs {:?}",
            snap.server_time
        );
    }
    assert!(snap.age(a) < Duration::from_secs(5));
    let ids: Vec<&str> = snap.family("actual-state").map(|(id, _)| id).collect();
    assert_eq!(ids, ["a", "b"]);

    // Two families in one read; single keys by name.
    let both = read_families(&kv, &["actual-state", "heartbeat"])
        .await
        .unwrap();
    assert_eq!(both.len(), 3);
    assert_eq!(both.get("heartbeat.a").unwrap().revision, hb);
    let some = read_keys(
        &kv,
        &[
            "actual-state.b".into(),
            "heartbeat.a".into(),
            "agents.none".into(),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        some.entries.keys().map(String::as_str).collect::<Vec<_>>(),
        ["actual-state.b", "heartbeat.a"]
    );
}

#[tokio::test]
async fn the_server_time_moves_with_the_server_not_with_the_reader() {
    let server = NatsServer::start();
    let kv = store(&server).await;
    kv.put("heartbeat.a", Bytes::from_static(b"h"))
        .await
        .unwrap();
    let first = read_family(&kv, "heartbeat").await.unwrap();
    // Wait until a later read is stamped later by the server.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let next = read_family(&kv, "heartbeat").await.unwrap();
        if next.server_time > first.server_time {
            let e = next.get("heartbeat.a").unwrap();
            assert!(next.age(e) > first.age(first.get("heartbeat.a").unwrap()));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server time never moved"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn ten_thousand_keys_in_one_read() {
    let server = NatsServer::start();
    let kv = store(&server).await;
    let js = jetstream::new(server.client().await);
    let acks: Vec<_> = futures::future::join_all((0..10_000).map(|i| {
        let js = js.clone();
        async move {
            js.publish(
                format!("$KV.fleet.actual-state.a{i}"),
                Bytes::from(format!("{i}")),
            )
            .await
            .unwrap()
            .await
            .unwrap()
        }
    }))
    .await;
    assert_eq!(acks.len(), 10_000);
    let snap = read_family(&kv, "actual-state").await.unwrap();
    assert_eq!(snap.len(), 10_000);
    assert_eq!(
        snap.get("actual-state.a9999").unwrap().value.as_ref(),
        b"9999"
    );
}
