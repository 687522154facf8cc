//! Fleet reads against a real nats-server.

mod common;

use bytes::Bytes;
use common::*;
use flotilla_control::fleet;
use flotilla_control::publish::publish_manifest;
use manifest_types::keys;
use testbed::NatsServer;

#[tokio::test]
async fn reads_every_agents_status_and_single_keys() {
    let server = NatsServer::start();
    let store = store(&server).await;
    assert!(fleet::agent_statuses(&store).await.unwrap().is_empty());
    assert!(
        fleet::read_family(&store, keys::DEPLOYMENTS)
            .await
            .unwrap()
            .is_empty()
    );

    put_status(&store, "pi-1", 1, 1).await;
    put_status(&store, "pi-1", 2, 2).await;
    put_status(&store, "pi-2", 4, 4).await;
    put_status(&store, "pi-3", 1, 1).await;
    store
        .delete(keys::actual_state(&agent("pi-3")))
        .await
        .unwrap();
    store
        .put(
            keys::actual_state(&agent("pi-4")),
            Bytes::from_static(b"{torn"),
        )
        .await
        .unwrap();
    // Other families are not mixed in.
    register(&store, "pi-5", serde_json::json!({})).await;

    let statuses = fleet::agent_statuses(&store).await.unwrap();
    let ids: Vec<&str> = statuses.keys().map(|a| a.as_str()).collect();
    assert_eq!(ids, ["pi-1", "pi-2", "pi-4"]);
    assert_eq!(
        statuses[&agent("pi-1")]
            .as_ref()
            .unwrap()
            .manifest_generation,
        2
    );
    assert_eq!(
        statuses[&agent("pi-2")]
            .as_ref()
            .unwrap()
            .manifest_generation,
        4
    );
    assert!(statuses[&agent("pi-4")].is_err());

    let one = fleet::agent_status(&store, &agent("pi-2"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(one.observed_generation, 4);
    assert!(
        fleet::agent_status(&store, &agent("pi-3"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        fleet::agent_status(&store, &agent("pi-4")).await,
        Err(fleet::FleetError::Unreadable { .. })
    ));

    assert!(
        fleet::desired_manifest(&store, &agent("pi-1"))
            .await
            .unwrap()
            .is_none()
    );
    publish_manifest(&store, &agent("pi-1"), Vec::new())
        .await
        .unwrap();
    let (m, revision) = fleet::desired_manifest(&store, &agent("pi-1"))
        .await
        .unwrap()
        .unwrap();
    assert!(revision > 0);
    assert_eq!(m.generation, 3, "above the generation pi-1 reported");
    assert!(
        fleet::deployment_status(&store, &name("web"))
            .await
            .unwrap()
            .is_none()
    );
}
