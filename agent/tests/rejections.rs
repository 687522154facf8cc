//! Bad input never costs the device its last good manifest: each class of
//! invalid value written straight into `desired-state.<id>` gets a typed
//! rejection in status, and the files of the last good generation stay.

mod common;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use bytes::Bytes;
use common::*;
use manifest_types::{AgentId, ConditionType, keys, spec::MAX_FILE_CONTENT_BYTES};
use serde_json::json;

#[tokio::test]
async fn each_invalid_class_is_rejected_and_the_last_good_manifest_keeps_running() {
    let h = Harness::new().await;
    let store = h.store().await;
    let root = h.root("pi-1");
    let good = root.join("good");
    let _agent = RunningAgent::start(h.config("pi-1"));
    put_manifest(
        &store,
        "pi-1",
        manifest("pi-1", 5, json!([file("d/good", &good, "v5")])),
    )
    .await;
    wait_status(&store, "pi-1", "converged on 5", |s| s.converged_on(5)).await;

    let with_spec = |spec: serde_json::Value| {
        manifest(
            "pi-1",
            6,
            json!([{"id": "d/x", "kind": "File", "spec": spec}]),
        )
    };
    let cases: Vec<(&str, Bytes)> = vec![
        (
            "MalformedJson",
            Bytes::from_static(b"{\"apiVersion\": \"flotilla.dev/v1\", \"generation\": 6,"),
        ),
        (
            "UnsupportedApiVersion",
            Bytes::from(
                json!({"apiVersion": "flotilla.dev/v2", "agentId": "pi-1", "generation": 6})
                    .to_string(),
            ),
        ),
        (
            "InvalidDocument",
            Bytes::from(json!({"apiVersion": "flotilla.dev/v1", "agentId": "pi-1"}).to_string()),
        ),
        (
            "InvalidPath",
            with_spec(json!({"path": "relative/path", "content": ""})),
        ),
        (
            "InvalidPath",
            with_spec(json!({"path": format!("{}/../escape", root.display()), "content": ""})),
        ),
        (
            "PathOutsideRoots",
            with_spec(json!({"path": "/etc/flotilla-test-never", "content": ""})),
        ),
        (
            "ContentTooLarge",
            with_spec(
                json!({"path": root.join("big"), "content": "x".repeat(MAX_FILE_CONTENT_BYTES + 1)}),
            ),
        ),
        (
            "InvalidBase64",
            with_spec(json!({"path": root.join("b64"), "content": "!!!", "encoding": "base64"})),
        ),
        (
            "MalformedSpec",
            with_spec(json!({"path": root.join("m"), "content": "", "mode": "rwxr-xr-x"})),
        ),
        (
            "WrongAgent",
            manifest("pi-2", 6, json!([file("d/x", &root.join("w"), "")])),
        ),
        (
            "ReplayedGeneration",
            manifest("pi-1", 5, json!([file("d/x", &root.join("r"), "")])),
        ),
        (
            "ReplayedGeneration",
            manifest("pi-1", 4, json!([file("d/good", &good, "v4")])),
        ),
        (
            "DuplicateResourceId",
            manifest(
                "pi-1",
                6,
                json!([
                    file("d/x", &root.join("a"), ""),
                    file("d/x", &root.join("b"), "")
                ]),
            ),
        ),
    ];
    for (reason, bytes) in cases {
        let revision = put_manifest(&store, "pi-1", bytes).await;
        let s = wait_status(&store, "pi-1", reason, |s| s.observed_revision >= revision).await;
        let rejection = s
            .rejection
            .as_ref()
            .unwrap_or_else(|| panic!("{reason}: not rejected: {s:#?}"));
        assert_eq!(rejection.reason, reason, "{rejection:?}");
        assert_eq!(rejection.revision, revision);
        assert!(s.condition_true(ConditionType::ManifestRejected));
        assert!(
            s.converged_on(5),
            "{reason}: last good manifest no longer converged: {s:#?}"
        );
        assert_eq!(std::fs::read_to_string(&good).unwrap(), "v5", "{reason}");
    }
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        1,
        "nothing of a rejected manifest was written"
    );

    // The next good manifest clears the rejection.
    put_manifest(
        &store,
        "pi-1",
        manifest("pi-1", 6, json!([file("d/good", &good, "v6")])),
    )
    .await;
    let s = wait_status(&store, "pi-1", "converged on 6", |s| s.converged_on(6)).await;
    assert!(s.rejection.is_none());
    assert!(!s.condition_true(ConditionType::ManifestRejected));
    assert_eq!(std::fs::read_to_string(&good).unwrap(), "v6");

    // A desired-state key deleted by hand: keep running, say so.
    store
        .delete(keys::desired_state(&AgentId::new("pi-1").unwrap()))
        .await
        .unwrap();
    let s = wait_status(&store, "pi-1", "deletion reported", |s| {
        s.rejection.is_some()
    })
    .await;
    assert_eq!(s.rejection.as_ref().unwrap().reason, "DesiredStateDeleted");
    assert!(s.converged_on(6));
    assert_eq!(std::fs::read_to_string(&good).unwrap(), "v6");
}

#[tokio::test]
async fn a_cas_write_rejected_by_the_server_is_never_applied() {
    let h = Harness::new().await;
    let store = h.store().await;
    let root = h.root("pi-3");
    let _agent = RunningAgent::start(h.config("pi-3"));
    let rev1 = put_manifest(
        &store,
        "pi-3",
        manifest("pi-3", 1, json!([file("d/a", &root.join("a"), "1")])),
    )
    .await;
    wait_status(&store, "pi-3", "converged on 1", |s| s.converged_on(1)).await;
    let rev2 = put_manifest(
        &store,
        "pi-3",
        manifest("pi-3", 2, json!([file("d/a", &root.join("a"), "2")])),
    )
    .await;
    assert!(rev2 > rev1);

    // A losing CAS writer, straight on the raw $KV subject, with a stale revision.
    let js = async_nats::jetstream::new(h.server.client().await);
    let mut headers = HeaderMap::new();
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        rev1.to_string().as_str(),
    );
    let loser = manifest(
        "pi-3",
        99,
        json!([file("d/loser", &root.join("loser"), "uncommitted")]),
    );
    let err = js
        .publish_with_headers(
            keys::kv_subject(&Default::default(), "desired-state.pi-3"),
            headers,
            loser,
        )
        .await
        .unwrap()
        .await
        .expect_err("the server must refuse a stale CAS write");
    assert_eq!(err.kind(), PublishErrorKind::WrongLastSequence);

    let rev3 = put_manifest(
        &store,
        "pi-3",
        manifest("pi-3", 3, json!([file("d/a", &root.join("a"), "3")])),
    )
    .await;
    let s = wait_status(&store, "pi-3", "converged on 3", |s| s.converged_on(3)).await;
    assert_eq!(s.observed_revision, rev3);
    assert_eq!(
        s.observed_generation, 3,
        "the uncommitted generation 99 was looked at"
    );
    assert!(!root.join("loser").exists());
    assert_eq!(std::fs::read_to_string(root.join("a")).unwrap(), "3");
}

#[tokio::test]
async fn another_installation_writing_the_status_key_is_an_identity_conflict() {
    let h = Harness::new().await;
    let store = h.store().await;
    let key = keys::actual_state(&AgentId::new("pi-4").unwrap());
    let foreign =
        json!({"apiVersion": "flotilla.dev/v1", "agentId": "pi-4", "instanceId": "someone-else"});
    let foreign_rev = store
        .put(&key, Bytes::from(foreign.to_string()))
        .await
        .unwrap();
    let path = h.root("pi-4").join("f");
    let _agent = RunningAgent::start(h.config("pi-4"));
    put_manifest(
        &store,
        "pi-4",
        manifest("pi-4", 1, json!([file("d/f", &path, "x")])),
    )
    .await;
    wait_for("converged locally", || path.exists()).await;

    // The conflict shows in the heartbeat; the foreign status is never
    // overwritten. The barrier: a new generation gives the status writer a
    // new status to write; once the heartbeat reports that generation (and
    // one beat more), the writer has had its chance and declined.
    let hb_key = keys::heartbeat(&AgentId::new("pi-4").unwrap());
    let beats = h.heartbeats().await;
    let heartbeat = |pred: Box<dyn Fn(&manifest_types::Heartbeat) -> bool>| {
        let (store, hb_key) = (beats.clone(), hb_key.clone());
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                if let Some(e) = store.entry(&hb_key).await.unwrap() {
                    let hb: manifest_types::Heartbeat = serde_json::from_slice(&e.value).unwrap();
                    if pred(&hb) {
                        return hb;
                    }
                }
                assert!(tokio::time::Instant::now() < deadline, "no such heartbeat");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    heartbeat(Box::new(|hb| {
        hb.identity_conflict.as_deref() == Some("someone-else")
    }))
    .await;
    put_manifest(
        &store,
        "pi-4",
        manifest("pi-4", 2, json!([file("d/f", &path, "y")])),
    )
    .await;
    let hb = heartbeat(Box::new(|hb| {
        hb.manifest_generation == 2 && hb.identity_conflict.as_deref() == Some("someone-else")
    }))
    .await;
    heartbeat(Box::new(move |later| later.seq > hb.seq)).await;
    let entry = store.entry(&key).await.unwrap().unwrap();
    assert_eq!(
        entry.revision, foreign_rev,
        "the agent overwrote another installation's status"
    );

    // The operator deletes the stale key: this installation takes over.
    store.delete(&key).await.unwrap();
    let s = wait_status(&store, "pi-4", "taken over", |s| s.converged_on(2)).await;
    assert_ne!(s.instance_id, "someone-else");
    assert!(!s.condition_true(ConditionType::IdentityConflict));
}
