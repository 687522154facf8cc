//! The bad-input campaign against a real nats-server: every document of
//! the hostile corpus (`testbed::hostile::manifests`: truncated JSON, wrong
//! types, huge strings, deep nesting, traversal and NUL in paths, unit names
//! with `/`, privileged containers, duplicate ids, absurd generations, …)
//! is written straight into the agent's key by a raw client. Each one gets a
//! typed rejection for exactly that revision, the agent stays alive and
//! keeps reporting, and the last good manifest stays converged on disk.
//! The agent runs as a development agent (`allow_unsigned`) so the corpus
//! reaches decoding and validation; a signing agent rejects all of it
//! earlier (tests/signing.rs).

mod common;

use common::*;
use manifest_types::RejectionReason;
use serde_json::json;
use testbed::hostile::manifests;

#[tokio::test]
async fn every_hostile_manifest_is_rejected_with_a_typed_reason_and_the_last_good_one_keeps_running()
 {
    let h = Harness::new().await;
    let store = h.store().await;
    let root = h.root("pi-1");
    let good = root.join("good");
    let _agent = RunningAgent::start(h.config("pi-1"));
    apply(&store, "pi-1", 5, json!([file("d/good", &good, "v5")])).await;
    wait_status(&store, "pi-1", "converged on 5", |s| s.converged_on(5)).await;

    let corpus = manifests("pi-1", root.to_str().unwrap(), 6);
    assert!(corpus.len() >= 200, "a corpus of {}", corpus.len());
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for (label, bytes) in &corpus {
        let revision = put_manifest(&store, "pi-1", bytes.clone().into()).await;
        // Rejected at this revision, or (a failure of this test) accepted.
        let s = wait_status(&store, "pi-1", label, |s| {
            s.rejection.as_ref().is_some_and(|r| r.revision == revision)
                || s.manifest_generation != 5
        })
        .await;
        let r = s
            .rejection
            .as_ref()
            .filter(|r| r.revision == revision)
            .unwrap_or_else(|| panic!("{label}: not rejected: {:?} at {revision}", s.rejection));
        assert!(
            !matches!(
                r.reason,
                RejectionReason::Other(_) | RejectionReason::DesiredStateDeleted
            ),
            "{label}: a reason the contract does not define for a manifest: {:?}",
            r.reason
        );
        assert_eq!(
            s.manifest_generation, 5,
            "{label}: the last good manifest is kept"
        );
        *reasons.entry(r.reason.to_string()).or_default() += 1;
    }
    // The agent is alive and still converged on generation 5, on disk too.
    apply(&store, "pi-1", 5, json!([file("d/good", &good, "v5")])).await;
    let revision = apply(&store, "pi-1", 7, json!([file("d/good", &good, "v7")])).await;
    wait_status(&store, "pi-1", "converged on 7 after the corpus", |s| {
        s.converged_on(7) && s.observed_revision == revision
    })
    .await;
    assert_eq!(std::fs::read_to_string(&good).unwrap(), "v7");
    let outside: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, ["good"], "the corpus wrote nothing");
    eprintln!(
        "{} hostile manifests, rejected as: {reasons:?}",
        corpus.len()
    );
}
