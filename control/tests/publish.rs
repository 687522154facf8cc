//! `publish_manifest` against a real nats-server: the generation and CAS
//! rules of docs/adr/0003-generations-cas-and-convergence.md and 0012.

mod common;

use bytes::Bytes;
use common::*;
use flotilla_control::publish::{
    Floor, PublishError, PublishOutcome, publish_manifest, publish_manifest_above,
};
use futures::StreamExt;
use manifest_types::signing::SigningKeys;
use manifest_types::{AgentManifest, Deployment, ManagedResource, keys};
use serde_json::json;
use testbed::NatsServer;

/// Rendered resources of a one-file deployment at `revision`.
fn resources(content: &str, revision: u64) -> Vec<ManagedResource> {
    let doc = deployment(
        "web",
        json!({"agents": ["pi-1"]}),
        json!([file("motd", "/etc/motd", content)]),
    );
    Deployment::from_value(doc)
        .unwrap()
        .render_resources(revision)
        .unwrap()
}

#[tokio::test]
async fn same_resources_write_nothing_and_new_ones_bump_the_generation() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let pi = agent("pi-1");

    let first = publish_manifest(&store, &pi, resources("a", 3))
        .await
        .unwrap();
    let PublishOutcome::Written {
        generation: 1,
        revision,
    } = first
    else {
        panic!("first publish creates generation 1, got {first:?}");
    };
    let again = publish_manifest(&store, &pi, resources("a", 3))
        .await
        .unwrap();
    assert_eq!(
        again,
        PublishOutcome::Unchanged {
            generation: 1,
            revision
        }
    );
    assert_eq!(
        manifest(&store, "pi-1").await.unwrap().0,
        revision,
        "no write"
    );

    let changed = publish_manifest(&store, &pi, resources("b", 4))
        .await
        .unwrap();
    let PublishOutcome::Written {
        generation: 2,
        revision: r2,
    } = changed
    else {
        panic!("changed resources give generation 2, got {changed:?}");
    };
    let (stored_rev, m) = manifest(&store, "pi-1").await.unwrap();
    assert_eq!(
        (stored_rev, m.generation, m.agent_id.as_str()),
        (r2, 2, "pi-1")
    );
    assert_eq!(m.resources, resources("b", 4));

    // An empty manifest is a change too: everything is to be removed.
    let empty = publish_manifest(&store, &pi, Vec::new()).await.unwrap();
    assert_eq!(empty.generation(), 3);
    assert!(
        manifest(&store, "pi-1")
            .await
            .unwrap()
            .1
            .resources
            .is_empty()
    );
}

#[tokio::test]
async fn a_purged_key_is_recreated_above_what_the_agent_has_seen() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let pi = agent("pi-1");
    for (i, c) in ["a", "b", "c"].iter().enumerate() {
        publish_manifest(&store, &pi, resources(c, i as u64 + 1))
            .await
            .unwrap();
    }
    // The agent has looked at generation 7 (say, written by an earlier
    // control plane whose history is gone).
    put_status(&store, "pi-1", 3, 7).await;
    store.purge(keys::desired_state(&pi)).await.unwrap();

    let out = publish_manifest(&store, &pi, resources("c", 3))
        .await
        .unwrap();
    assert!(
        matches!(out, PublishOutcome::Written { generation: 8, .. }),
        "{out:?}"
    );
    assert_eq!(manifest(&store, "pi-1").await.unwrap().1.generation, 8);
}

#[tokio::test]
async fn a_deleted_key_without_agent_status_starts_at_one_above_nothing() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let pi = agent("pi-1");
    store.delete(keys::desired_state(&pi)).await.unwrap();
    let out = publish_manifest(&store, &pi, resources("a", 1))
        .await
        .unwrap();
    assert_eq!(out.generation(), 1);
}

#[tokio::test]
async fn unreadable_or_misaddressed_values_are_replaced_above_their_generation() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let key = keys::desired_state(&agent("pi-1"));

    // Not a manifest this build accepts, but its generation is readable.
    let future_version =
        json!({"apiVersion": "flotilla.dev/v9", "agentId": "pi-1", "generation": 12});
    store
        .put(
            &key,
            Bytes::from(serde_json::to_vec(&future_version).unwrap()),
        )
        .await
        .unwrap();
    put_status(&store, "pi-1", 2, 5).await;
    let out = publish_manifest(&store, &agent("pi-1"), resources("a", 1))
        .await
        .unwrap();
    assert_eq!(out.generation(), 13);

    // Another agent's manifest in this agent's key: replaced, not "unchanged".
    let mut foreign = AgentManifest::empty(agent("pi-2"), 20);
    foreign.resources = resources("a", 1);
    store
        .put(&key, Bytes::from(foreign.to_json()))
        .await
        .unwrap();
    let out = publish_manifest(&store, &agent("pi-1"), resources("a", 1))
        .await
        .unwrap();
    assert!(
        matches!(out, PublishOutcome::Written { generation: 21, .. }),
        "{out:?}"
    );

    // Garbage: nothing to read, so above the agent's observed generation.
    store
        .put(&key, Bytes::from_static(b"{garbage"))
        .await
        .unwrap();
    put_status(&store, "pi-1", 21, 30).await;
    let out = publish_manifest(&store, &agent("pi-1"), resources("a", 1))
        .await
        .unwrap();
    assert_eq!(out.generation(), 31);
}

#[tokio::test]
async fn concurrent_writers_each_land_on_fresh_state() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let pi = agent("pi-1");
    publish_manifest(&store, &pi, resources("start", 1))
        .await
        .unwrap();

    // Four writers with different content race from the same read; every
    // lost CAS re-reads, so each lands exactly one generation above the
    // value it replaced and none is lost.
    let writers = (0..4).map(|i| {
        let store = store.clone();
        let pi = pi.clone();
        tokio::spawn(async move {
            publish_manifest(&store, &pi, resources(&format!("w{i}"), 10 + i)).await
        })
    });
    let outcomes: Vec<PublishOutcome> = futures::future::join_all(writers)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    let mut generations: Vec<u64> = outcomes
        .iter()
        .map(|o| match o {
            PublishOutcome::Written { generation, .. } => *generation,
            other => panic!("every writer had new content, got {other:?}"),
        })
        .collect();
    generations.sort();
    assert_eq!(generations, [2, 3, 4, 5]);

    // The stored history is strictly increasing, one generation per write.
    let mut history = store.history(keys::desired_state(&pi)).await.unwrap();
    let mut stored = Vec::new();
    while let Some(e) = history.next().await {
        stored.push(
            AgentManifest::from_json(&e.unwrap().value)
                .unwrap()
                .generation,
        );
    }
    assert_eq!(stored, [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn a_foreign_write_between_publishes_is_built_upon() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let pi = agent("pi-1");
    publish_manifest(&store, &pi, resources("a", 1))
        .await
        .unwrap();
    // Someone else (another control-plane instance) moved the key on.
    let mut other = AgentManifest::empty(pi.clone(), 9);
    other.resources = resources("x", 2);
    store
        .put(keys::desired_state(&pi), Bytes::from(other.to_json()))
        .await
        .unwrap();
    let out = publish_manifest(&store, &pi, resources("b", 3))
        .await
        .unwrap();
    assert_eq!(out.generation(), 10);
}

#[tokio::test]
async fn an_invalid_manifest_is_refused_before_anything_is_written() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let mut twice = resources("a", 1);
    twice.extend(resources("b", 1));
    let err = publish_manifest(&store, &agent("pi-1"), twice)
        .await
        .unwrap_err();
    assert!(
        matches!(err, PublishError::InvalidManifest { .. }),
        "{err:?}"
    );
    assert!(manifest(&store, "pi-1").await.is_none());
}

#[tokio::test]
async fn a_stored_rendering_below_the_floor_or_rejected_as_replayed_is_rewritten_above_it() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let pi = agent("pi-1");
    let PublishOutcome::Written { revision, .. } = publish_manifest_above(
        &store,
        &pi,
        resources("a", 1),
        Floor::default(),
        &SigningKeys::default(),
    )
    .await
    .unwrap()
    .outcome
    else {
        panic!("first publish writes");
    };
    // Generation 1 is the rendering, but the agent has already seen 6 (an
    // older revision put back): it does not stand.
    let floor = Floor {
        generation: 6,
        replayed_revision: None,
    };
    let out = publish_manifest_above(
        &store,
        &pi,
        resources("a", 1),
        floor,
        &SigningKeys::default(),
    )
    .await
    .unwrap()
    .outcome;
    let PublishOutcome::Written {
        generation: 7,
        revision: r7,
    } = out
    else {
        panic!("rewritten above the floor, got {out:?}");
    };
    assert!(r7 > revision);
    let (_, m) = manifest(&store, "pi-1").await.unwrap();
    assert_eq!((m.generation, m.resources), (7, resources("a", 1)));

    // At the floor it stands…
    let at = Floor {
        generation: 7,
        replayed_revision: None,
    };
    let out = publish_manifest_above(&store, &pi, resources("a", 1), at, &SigningKeys::default())
        .await
        .unwrap()
        .outcome;
    assert_eq!(
        out,
        PublishOutcome::Unchanged {
            generation: 7,
            revision: r7
        }
    );
    // …unless the agent rejected exactly that revision as replayed.
    let rejected = Floor {
        generation: 7,
        replayed_revision: Some(r7),
    };
    let out = publish_manifest_above(
        &store,
        &pi,
        resources("a", 1),
        rejected,
        &SigningKeys::default(),
    )
    .await
    .unwrap()
    .outcome;
    assert!(
        matches!(out, PublishOutcome::Written { generation: 8, .. }),
        "{out:?}"
    );
}
