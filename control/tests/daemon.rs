//! The control-plane daemon against a real nats-server: deployments and
//! inventories in, manifests and deployment statuses out.

mod common;

use bytes::Bytes;
use common::*;
use manifest_types::{AgentManifest, keys};
use serde_json::json;
use testbed::NatsServer;

fn kiosk_web(content: &str) -> serde_json::Value {
    deployment(
        "web",
        json!({"matchLabels": {"role": "kiosk"}}),
        json!([
            file("motd", "/etc/motd", content),
            file("conf", "/etc/web.conf", "port = 80\n")
        ]),
    )
}

#[tokio::test]
async fn renders_updates_and_removes_a_deployment() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let _control = Control::start(&server);

    register(&store, "pi-1", json!({"role": "kiosk"})).await;
    register(&store, "pi-2", json!({"role": "sensor"})).await;
    let rev = put_deployment(&store, &kiosk_web("v1")).await;

    let (_, m1) = wait_manifest(&store, "pi-1", "web rendered", |m| !m.resources.is_empty()).await;
    assert_eq!(ids(&m1), ["web/motd", "web/conf"]);
    let source = m1.resources[0].source.as_ref().unwrap();
    assert_eq!((source.deployment.as_str(), source.revision), ("web", rev));
    // The sensor is selected by nothing: an (empty) manifest all the same.
    let (_, m2) = wait_manifest(&store, "pi-2", "empty manifest", |_| true).await;
    assert!(m2.resources.is_empty());

    let (_, s) = wait_status(&store, "web", "observed", |s| s.observed_revision == rev).await;
    assert_eq!(s.targets.len(), 1);
    assert_eq!(s.targets[&agent("pi-1")], m1.generation);
    assert!(s.conflicts.is_empty() && s.error.is_none());

    // Update: the next generation carries the change and the new revision.
    let rev2 = put_deployment(&store, &kiosk_web("v2")).await;
    let (_, m1b) = wait_manifest(&store, "pi-1", "v2", |m| {
        m.resources[0].source.as_ref().unwrap().revision == rev2
    })
    .await;
    assert_eq!(m1b.generation, m1.generation + 1);
    let manifest_types::ResourceSpec::File(f) = &m1b.resources[0].spec else {
        panic!("a file");
    };
    assert_eq!(f.content, "v2");
    let (_, s) = wait_status(&store, "web", "observed v2", |s| {
        s.observed_revision == rev2
    })
    .await;
    assert_eq!(s.targets[&agent("pi-1")], m1b.generation);
    assert_eq!(
        s.created_revision, rev,
        "creation order is kept across updates"
    );

    // Delete: an empty manifest at the next generation; the status goes too.
    store.delete(keys::deployment(&name("web"))).await.unwrap();
    let (_, m1c) = wait_manifest(&store, "pi-1", "emptied", |m| m.resources.is_empty()).await;
    assert_eq!(m1c.generation, m1b.generation + 1);
    wait_for("status removed", || async {
        status(&store, "web").await.is_none().then_some(())
    })
    .await;
    // The sensor never changed.
    assert_eq!(
        manifest(&store, "pi-2").await.unwrap().1.generation,
        m2.generation
    );
}

#[tokio::test]
async fn registering_and_relabelling_agents_re_renders() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let _control = Control::start(&server);
    put_deployment(&store, &kiosk_web("v1")).await;
    // Known only through an existing desired-state key (no inventory): it
    // is rendered, and can be selected by id.
    let old = AgentManifest::empty(agent("pi-9"), 6);
    store
        .put(
            keys::desired_state(&agent("pi-9")),
            Bytes::from(old.to_json()),
        )
        .await
        .unwrap();
    let by_id = deployment(
        "pinned",
        json!({"agents": ["pi-9", "pi-10"]}),
        json!([file("x", "/etc/x", "x")]),
    );
    put_deployment(&store, &by_id).await;
    let (_, m) = wait_manifest(&store, "pi-9", "selected by id", |m| m.resources.len() == 1).await;
    assert_eq!(m.generation, 7);
    // An id nobody has registered is not invented.
    let (_, s) = wait_status(&store, "pinned", "written", |_| true).await;
    assert_eq!(
        s.targets.keys().map(|a| a.as_str()).collect::<Vec<_>>(),
        ["pi-9"]
    );
    assert!(manifest(&store, "pi-10").await.is_none());

    register(&store, "pi-1", json!({"role": "sensor"})).await;
    let (_, m) = wait_manifest(&store, "pi-1", "registered", |_| true).await;
    assert!(m.resources.is_empty());

    register(&store, "pi-1", json!({"role": "kiosk"})).await;
    let (_, m) = wait_manifest(&store, "pi-1", "label gained", |m| m.resources.len() == 2).await;
    assert_eq!(m.generation, 2);
    wait_status(&store, "web", "targets pi-1", |s| {
        s.targets.get(&agent("pi-1")) == Some(&2)
    })
    .await;

    register(&store, "pi-1", json!({})).await;
    let (_, m) = wait_manifest(&store, "pi-1", "label lost", |m| m.resources.is_empty()).await;
    assert_eq!(m.generation, 3);
    wait_status(&store, "web", "no targets", |s| s.targets.is_empty()).await;
}

#[tokio::test]
async fn the_earliest_deployment_keeps_a_contested_file() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let _control = Control::start(&server);
    register(&store, "pi-1", json!({"role": "kiosk"})).await;

    let base = deployment(
        "base",
        json!({"agents": ["pi-1"]}),
        json!([file("motd", "/etc/motd", "base")]),
    );
    let base_rev = put_deployment(&store, &base).await;
    wait_manifest(&store, "pi-1", "base", |m| ids(m) == ["base/motd"]).await;
    let web = kiosk_web("web");
    put_deployment(&store, &web).await;
    let (_, m) = wait_manifest(&store, "pi-1", "web added", |m| m.resources.len() == 2).await;
    assert_eq!(ids(&m), ["base/motd", "web/conf"]);

    let (_, s) = wait_status(&store, "web", "conflict", |s| !s.conflicts.is_empty()).await;
    assert_eq!(s.conflicts.len(), 1);
    let c = &s.conflicts[0];
    assert_eq!(
        (
            c.agent.as_str(),
            c.resource.as_str(),
            c.held_by.as_str(),
            c.target.as_str()
        ),
        ("pi-1", "web/motd", "base/motd", "file /etc/motd")
    );
    let (_, b) = wait_status(&store, "base", "written", |_| true).await;
    assert!(b.conflicts.is_empty());
    assert_eq!(b.created_revision, base_rev);

    // An update of the older deployment does not lose it the file.
    let base2 = deployment(
        "base",
        json!({"agents": ["pi-1"]}),
        json!([file("motd", "/etc/motd", "base v2")]),
    );
    let rev = put_deployment(&store, &base2).await;
    let (_, m) = wait_manifest(&store, "pi-1", "base v2", |m| {
        m.resources[0].source.as_ref().unwrap().revision == rev
    })
    .await;
    assert_eq!(ids(&m), ["base/motd", "web/conf"]);

    // Once the holder is gone, the later deployment gets the file.
    store.delete(keys::deployment(&name("base"))).await.unwrap();
    let (_, m) = wait_manifest(&store, "pi-1", "web takes over", |m| {
        ids(m) == ["web/motd", "web/conf"]
    })
    .await;
    assert!(m.generation >= 4);
    wait_status(&store, "web", "conflict resolved", |s| {
        s.conflicts.is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_broken_deployment_is_reported_and_the_rest_keeps_working() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let _control = Control::start(&server);
    register(&store, "pi-1", json!({"role": "kiosk"})).await;
    store
        .put(
            keys::deployment(&name("broken")),
            Bytes::from_static(b"{\"apiVersion\": 3"),
        )
        .await
        .unwrap();
    put_deployment(&store, &kiosk_web("v1")).await;

    wait_manifest(&store, "pi-1", "web rendered", |m| m.resources.len() == 2).await;
    let (_, s) = wait_status(&store, "broken", "error reported", |s| s.error.is_some()).await;
    assert!(s.targets.is_empty());
    assert!(s.error.unwrap().contains("invalid deployment"));

    // Fixed: it renders.
    let fixed = deployment(
        "broken",
        json!({"agents": ["pi-1"]}),
        json!([file("f", "/etc/f", "x")]),
    );
    put_deployment(&store, &fixed).await;
    wait_manifest(&store, "pi-1", "fixed deployment rendered", |m| {
        m.resources.len() == 3
    })
    .await;
    wait_status(&store, "broken", "error cleared", |s| {
        s.error.is_none() && s.targets.len() == 1
    })
    .await;
}

#[tokio::test]
async fn a_restart_writes_no_new_generation_and_keeps_the_conflict_order() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let control = Control::start(&server);
    register(&store, "pi-1", json!({"role": "kiosk"})).await;
    register(&store, "pi-2", json!({"role": "kiosk"})).await;
    register(&store, "pi-3", json!({})).await;
    let base = |c: &str| {
        deployment(
            "base",
            json!({"matchLabels": {"role": "kiosk"}}),
            json!([file("motd", "/etc/motd", c)]),
        )
    };
    put_deployment(&store, &base("one")).await;
    wait_status(&store, "base", "written", |_| true).await;
    put_deployment(&store, &kiosk_web("v1")).await;
    wait_status(&store, "web", "conflict", |s| s.conflicts.len() == 2).await;
    // "base" is now newer than "web" by revision, but older by creation.
    let base_rev = put_deployment(&store, &base("two")).await;
    wait_status(&store, "base", "two", |s| s.observed_revision == base_rev).await;
    wait_status(&store, "web", "still in conflict", |s| {
        s.conflicts.len() == 2
    })
    .await;

    let keys_to_compare = [
        keys::desired_state(&agent("pi-1")),
        keys::desired_state(&agent("pi-2")),
        keys::desired_state(&agent("pi-3")),
        keys::deployment_status(&name("base")),
        keys::deployment_status(&name("web")),
    ];
    let revisions = || async {
        let mut out = Vec::new();
        for k in &keys_to_compare {
            out.push(
                store
                    .entry(k.as_str())
                    .await
                    .unwrap()
                    .expect("written")
                    .revision,
            );
        }
        out
    };
    let before = revisions().await;
    control.stop().await;

    let control = Control::start(&server);
    // A new agent proves the restarted daemon has rendered (the replay comes
    // first); everything else must be exactly as it was.
    register(&store, "pi-4", json!({})).await;
    let (rev4, _) = wait_manifest(&store, "pi-4", "new agent after restart", |_| true).await;
    control.settled(rev4).await;
    assert_eq!(revisions().await, before, "a restart rewrote keys");
    assert_eq!(
        control.metrics.manifests_written(),
        1,
        "only the new agent's manifest"
    );
    assert_eq!(control.metrics.statuses_written(), 0);
}

#[tokio::test]
async fn own_writes_coming_back_through_the_watch_cost_no_render() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let control = Control::start(&server);
    for id in ["pi-1", "pi-2", "pi-3"] {
        register(&store, id, json!({"role": "kiosk"})).await;
    }
    put_deployment(&store, &kiosk_web("v1")).await;
    wait_status(&store, "web", "three targets", |s| s.targets.len() == 3).await;
    control.settled(last_revision(&store).await).await;
    let (passes, manifests, statuses) = (
        control.metrics.passes(),
        control.metrics.manifests_written(),
        control.metrics.statuses_written(),
    );

    // One change → one pass, which writes three manifests and one status.
    let rev = put_deployment(&store, &kiosk_web("v2")).await;
    let (status_rev, _) = wait_status(&store, "web", "v2", |s| s.observed_revision == rev).await;
    for id in ["pi-1", "pi-2", "pi-3"] {
        let (_, m) = manifest(&store, id).await.unwrap();
        assert_eq!(m.resources[0].source.as_ref().unwrap().revision, rev);
    }
    // Every echo of those four writes has been applied (the status was
    // written last) and the daemon has settled: they cost no pass.
    control.settled(status_rev).await;
    assert_eq!(control.metrics.passes(), passes + 1, "echoes re-rendered");
    assert_eq!(control.metrics.manifests_written(), manifests + 3);
    assert_eq!(control.metrics.statuses_written(), statuses + 1);

    // Agents' status writes that change nothing about their keys cost none.
    put_status(&store, "pi-1", 2, 2).await;
    put_status(&store, "pi-2", 2, 2).await;
    control.settled(last_revision(&store).await).await;
    assert_eq!(control.metrics.passes(), passes + 1, "statuses re-rendered");
}

#[tokio::test]
async fn an_older_revision_put_back_while_the_daemon_was_down_is_replaced_after_its_restart() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let control = Control::start(&server);
    register(&store, "pi-1", json!({"role": "kiosk"})).await;
    put_deployment(&store, &kiosk_web("v1")).await;
    let (rev1, m1) = wait_manifest(&store, "pi-1", "v1", |m| m.resources.len() == 2).await;
    put_deployment(&store, &kiosk_web("v2")).await;
    wait_manifest(&store, "pi-1", "v2", |m| m.generation == m1.generation + 1).await;
    put_deployment(&store, &kiosk_web("v1")).await;
    let (_, m3) = wait_manifest(&store, "pi-1", "back to v1", |m| {
        m.generation == m1.generation + 2
    })
    .await;
    // The agent has accepted the newest generation.
    put_status(&store, "pi-1", m3.generation, m3.generation).await;
    control.stop().await;

    // Put back generation 1, byte for byte as the control plane wrote it.
    let old = store
        .entry_for_revision(keys::desired_state(&agent("pi-1")), rev1)
        .await
        .unwrap()
        .expect("history keeps it");
    let put_back = store
        .put(keys::desired_state(&agent("pi-1")), old.value)
        .await
        .unwrap();

    let control = Control::start(&server);
    let (rev, m) =
        wait_manifest(&store, "pi-1", "replaced", |m| m.generation > m3.generation).await;
    assert!(rev > put_back);
    assert_eq!(
        m.generation,
        m3.generation + 1,
        "above the key and the agent"
    );
    assert_eq!(m.resources, m3.resources, "the current rendering");
    control.settled(rev).await;
    assert_eq!(control.metrics.manifests_written(), 1);
}

#[tokio::test]
async fn a_deleted_bucket_is_created_again_with_its_republish_rule_and_rendered_above_the_agents() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let control = Control::start(&server);
    register(&store, "pi-1", json!({"role": "kiosk"})).await;
    put_deployment(&store, &kiosk_web("v1")).await;
    let (_, m1) = wait_manifest(&store, "pi-1", "v1", |m| m.resources.len() == 2).await;

    let js = async_nats::jetstream::new(server.client().await);
    js.delete_key_value("fleet").await.unwrap();
    wait_for("the daemon notices the deleted bucket", || async {
        (control.metrics.bucket_replaced() >= 1).then_some(())
    })
    .await;
    // The bucket is back, with the rule agents depend on (ensure_bucket
    // refuses a bucket without it).
    let store = common::store(&server).await;
    // Revisions restarted; the agent still reports what it saw before.
    put_status(&store, "pi-1", m1.generation, m1.generation).await;
    register(&store, "pi-1", json!({"role": "kiosk"})).await;
    let rev = put_deployment(&store, &kiosk_web("v2")).await;
    let (_, m) = wait_manifest(&store, "pi-1", "v2 in the new bucket", |m| {
        m.resources
            .first()
            .is_some_and(|r| r.source.as_ref().unwrap().revision == rev)
    })
    .await;
    assert!(
        m.generation > m1.generation,
        "generation {} is not above the agent's {}",
        m.generation,
        m1.generation
    );
    wait_status(&store, "web", "status in the new bucket", |s| {
        s.observed_revision == rev
    })
    .await;
}

#[tokio::test]
async fn a_hand_purged_manifest_is_recreated_above_the_agents_generation() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let _control = Control::start(&server);
    register(&store, "pi-1", json!({"role": "kiosk"})).await;
    put_deployment(&store, &kiosk_web("v1")).await;
    let (_, m) = wait_manifest(&store, "pi-1", "rendered", |m| m.resources.len() == 2).await;
    put_status(&store, "pi-1", m.generation, m.generation + 4).await;

    store
        .purge(keys::desired_state(&agent("pi-1")))
        .await
        .unwrap();
    let (_, again) = wait_manifest(&store, "pi-1", "recreated", |_| true).await;
    // Above what the agent reported (m + 4); one more when the status and
    // the purge were handled in two passes.
    assert!(again.generation > m.generation + 4, "{}", again.generation);
    assert_eq!(again.resources, m.resources);
}

#[tokio::test]
async fn the_daemon_survives_a_server_restart() {
    let mut server = NatsServer::start();
    let store = store(&server).await;
    let _control = Control::start(&server);
    register(&store, "pi-1", json!({"role": "kiosk"})).await;
    put_deployment(&store, &kiosk_web("v1")).await;
    let (_, m) = wait_manifest(&store, "pi-1", "rendered", |m| m.resources.len() == 2).await;

    server.restart();
    let store = common::store(&server).await;
    let rev = put_deployment(&store, &kiosk_web("v2")).await;
    let (_, m2) = wait_manifest(&store, "pi-1", "v2 after the server restart", |m| {
        m.resources[0].source.as_ref().unwrap().revision == rev
    })
    .await;
    assert_eq!(m2.generation, m.generation + 1);
}

#[tokio::test]
async fn a_write_that_fails_blocks_nobody_else_and_is_retried() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let _control = Control::start(&server);
    register(&store, "pi-1", json!({"a": "1", "b": "1"})).await;
    register(&store, "pi-2", json!({"b": "1"})).await;
    // Each deployment fits in the bucket; both together on pi-1 do not
    // (values are capped at 1 MiB).
    let big = |n: &str, label: &str, dir: &str| {
        let blobs: Vec<_> = (0..3)
            .map(|i| {
                file(
                    &format!("blob{i}"),
                    &format!("{dir}/{i}"),
                    &"x".repeat(200 * 1024),
                )
            })
            .collect();
        deployment(n, json!({"matchLabels": {label: "1"}}), json!(blobs))
    };
    put_deployment(&store, &big("alpha", "a", "/srv/alpha")).await;
    wait_manifest(&store, "pi-1", "alpha", |m| m.resources.len() == 3).await;
    put_deployment(&store, &big("beta", "b", "/srv/beta")).await;

    // pi-2 gets beta although pi-1's manifest cannot be written.
    wait_manifest(&store, "pi-2", "beta", |m| m.resources.len() == 3).await;
    let (_, m1) = manifest(&store, "pi-1").await.unwrap();
    assert_eq!(ids(&m1), ["alpha/blob0", "alpha/blob1", "alpha/blob2"]);
    assert!(status(&store, "beta").await.is_none(), "no partial status");

    // Once it fits again it is written, and beta's status with it.
    store
        .delete(keys::deployment(&name("alpha")))
        .await
        .unwrap();
    wait_manifest(&store, "pi-1", "beta only", |m| ids(m)[0] == "beta/blob0").await;
    let (_, s) = wait_status(&store, "beta", "both targets", |s| s.targets.len() == 2).await;
    assert!(s.conflicts.is_empty());
}

/// A pass costs what changed: one agent relabelled renders one agent, a
/// new value renders one agent, while a deployment change renders the
/// whole fleet; the deployment status still counts every target.
#[tokio::test]
async fn a_pass_renders_only_the_agents_whose_inputs_changed() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let control = Control::start(&server);
    for i in 0..20 {
        register(&store, &format!("pi-{i}"), json!({"role": "kiosk"})).await;
    }
    let templated = deployment(
        "web",
        json!({"matchLabels": {"role": "kiosk"}}),
        json!([file("conf", "/etc/${agent.id}.conf", "site=${values.site}")]),
    );
    let rev = put_deployment(&store, &templated).await;
    control.settled(rev).await;
    let (_, s) = wait_status(&store, "web", "rendered", |s| s.observed_revision == rev).await;
    assert_eq!(s.targets.len(), 20);
    assert_eq!(s.render_failures.len(), 20, "no agent has `site` yet");

    // One agent's value: one agent rendered, its manifest written.
    let before = control.metrics.agents_rendered();
    let written = control.metrics.manifests_written();
    let values = json!({"apiVersion": "flotilla.dev/v1", "agentId": "pi-3",
        "values": {"site": "s3"}, "labels": {"role": "kiosk"}});
    let vrev = store
        .put("values.pi-3", Bytes::from(values.to_string()))
        .await
        .unwrap();
    control.settled(vrev).await;
    assert_eq!(control.metrics.agents_rendered() - before, 1);
    assert_eq!(control.metrics.manifests_written() - written, 1);
    let (_, m) = wait_manifest(&store, "pi-3", "rendered with its value", |m| {
        !m.resources.is_empty()
    })
    .await;
    let manifest_types::ResourceSpec::File(f) = &m.resources[0].spec else {
        panic!("a file")
    };
    assert_eq!(
        (f.path.as_str(), f.content.as_str()),
        ("/etc/pi-3.conf", "site=s3")
    );
    let (_, s) = wait_status(&store, "web", "19 failures", |s| {
        s.render_failures.len() == 19
    })
    .await;
    assert_eq!(s.targets.len(), 20);

    // One agent relabelled out of the selection: one agent rendered.
    let before = control.metrics.agents_rendered();
    let lrev = label(&store, "pi-7", json!({"role": "sensor"})).await;
    control.settled(lrev).await;
    assert_eq!(control.metrics.agents_rendered() - before, 1);
    let (_, s) = wait_status(&store, "web", "19 targets", |s| s.targets.len() == 19).await;
    assert!(!s.targets.contains_key(&agent("pi-7")));
    assert_eq!(s.render_failures.len(), 18);

    // A deployment change renders everyone.
    let before = control.metrics.agents_rendered();
    let rev2 = put_deployment(&store, &kiosk_web("v2")).await;
    control.settled(rev2).await;
    assert_eq!(control.metrics.agents_rendered() - before, 20);
}
