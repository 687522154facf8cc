//! `get`, `describe` and `watch` against a real nats-server, reading KV
//! contents the test seeds directly (this tests the CLI's reading, not an agent).

mod common;

use common::*;
use manifest_types::{Conflict, Deployment, ResourceId, keys};
use serde_json::{Value, json};

struct Seeded {
    env: Env,
    revision: u64,
    deployment: Deployment,
}

/// Three agents: pi-1 converged, pi-2 rejected its newest manifest, pi-3
/// (a sensor) registered with nothing to do and in an identity conflict;
/// deployment `hello` targets the two kiosks; `old` was deleted but its
/// status lingers.
async fn seeded() -> Seeded {
    let env = Env::start();
    let run = env.run(&["apply", "-f", path(&hello_yaml())]);
    assert_eq!(run.code, 0, "{run:?}");
    let store = env.store().await;
    let beats = env.beats().await;
    let (d, rev) = stored_deployment(&store, "hello").await.unwrap();
    for (id, role) in [("pi-1", "kiosk"), ("pi-2", "kiosk"), ("pi-3", "sensor")] {
        let a = agent(id);
        put_json(
            &store,
            &keys::inventory(&a),
            &inventory(id, &[("role", role)]),
        )
        .await;
        // The operator's labels.
        put_json(
            &store,
            &keys::values(&a),
            &json!({"apiVersion": "flotilla.dev/v1", "agentId": id, "labels": {"role": role}}),
        )
        .await;
        put_json(&beats, &keys::heartbeat(&a), &heartbeat(id, 4)).await;
    }
    for id in ["pi-1", "pi-2"] {
        put_json(
            &store,
            &keys::desired_state(&agent(id)),
            &manifest(id, 4, &d, rev),
        )
        .await;
    }
    // pi-3's key is also written by another installation.
    let mut hb = heartbeat("pi-3", 4);
    hb.identity_conflict = Some("other-installation".into());
    put_json(&beats, &keys::heartbeat(&agent("pi-3")), &hb).await;
    put_json(
        &store,
        &keys::actual_state(&agent("pi-1")),
        &agent_status("pi-1", 4, true, &d, rev),
    )
    .await;
    put_json(
        &store,
        &keys::actual_state(&agent("pi-2")),
        &rejected(agent_status("pi-2", 3, true, &d, rev), 4),
    )
    .await;
    let mut status = deployment_status("hello", rev, &[("pi-1", 4), ("pi-2", 4)]);
    status.conflicts.push(Conflict {
        agent: agent("pi-2"),
        resource: ResourceId::new("hello/app-conf").unwrap(),
        held_by: ResourceId::new("base/app-conf").unwrap(),
        target: "file /etc/flotilla-demo/app.conf".into(),
    });
    put_json(&store, &keys::deployment_status(&dname("hello")), &status).await;
    put_json(
        &store,
        &keys::deployment_status(&dname("old")),
        &deployment_status("old", 1, &[]),
    )
    .await;
    Seeded {
        env,
        revision: rev,
        deployment: d,
    }
}

fn by_key<'a>(rows: &'a Value, field: &str, value: &str) -> &'a Value {
    rows.as_array()
        .expect("a JSON array")
        .iter()
        .find(|r| r[field] == value)
        .unwrap_or_else(|| panic!("no row with {field}={value} in {rows:#}"))
}

#[tokio::test]
async fn get_agents_prints_the_stored_documents() {
    let s = seeded().await;
    let run = s.env.run(&["get", "agents", "-o", "json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let rows = run.json();
    assert_eq!(rows.as_array().unwrap().len(), 3);

    let pi1 = by_key(&rows, "agentId", "pi-1");
    let d = &s.deployment;
    assert_eq!(
        pi1["status"],
        json!(agent_status("pi-1", 4, true, d, s.revision))
    );
    assert_eq!(
        pi1["inventory"],
        json!(inventory("pi-1", &[("role", "kiosk")]))
    );
    assert_eq!(pi1["heartbeat"], json!(heartbeat("pi-1", 4)));
    assert_eq!(pi1["desiredGeneration"], 4);
    assert_eq!(pi1["state"], "Converged");
    assert!(pi1["lastSeenSecondsAgo"].as_u64().unwrap() < 60, "{pi1}");
    assert_eq!(by_key(&rows, "agentId", "pi-2")["state"], "Rejected");
    let pi3 = by_key(&rows, "agentId", "pi-3");
    assert_eq!(pi3["state"], "IdentityConflict");
    assert_eq!(pi3["heartbeat"]["identityConflict"], "other-installation");
    assert!(pi3.get("status").is_none() && pi3.get("desiredGeneration").is_none());

    let yaml = s.env.run(&["get", "agents", "-o", "yaml"]);
    assert_eq!(yaml.code, 0, "{yaml:?}");
    let from_yaml: Value = serde_saphyr::from_str(&yaml.stdout).expect("YAML output parses");
    assert_eq!(
        by_key(&from_yaml, "agentId", "pi-1")["status"],
        pi1["status"]
    );

    let table = s.env.run(&["get", "agents"]);
    assert_eq!(table.code, 0, "{table:?}");
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", table.stdout);
    for col in [
        "AGENT",
        "READY",
        "GENERATION",
        "STATUS",
        "LAST SEEN",
        "LABELS",
    ] {
        assert!(lines[0].contains(col), "{}", lines[0]);
    }
    let cells = |line: &str| {
        line.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let pi1 = cells(lines[1]);
    assert_eq!(pi1[..4], ["pi-1", "2/2", "4/4", "Converged"]);
    assert!(lines[1].ends_with("role=kiosk"), "{}", lines[1]);
    assert_eq!(cells(lines[2])[..4], ["pi-2", "2/2", "3/4", "Rejected"]);
    assert_eq!(
        cells(lines[3])[..4],
        ["pi-3", "-", "-/-", "IdentityConflict"]
    );
}

#[tokio::test]
async fn get_deployments_counts_converged_targets() {
    let s = seeded().await;
    let run = s.env.run(&["get", "deployments", "-o", "json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let rows = run.json();
    let hello = by_key(&rows, "name", "hello");
    assert_eq!(hello["revision"], s.revision);
    assert_eq!(hello["deployment"], json!(s.deployment));
    assert_eq!(hello["converged"], 1);
    assert_eq!(hello["targetStates"]["pi-1"]["state"], "Converged");
    assert_eq!(hello["targetStates"]["pi-2"]["state"], "Rejected");
    assert_eq!(hello["status"]["conflicts"][0]["heldBy"], "base/app-conf");
    let old = by_key(&rows, "name", "old");
    assert!(old.get("revision").is_none() && old.get("deployment").is_none());

    let table = s.env.run(&["get", "deployments"]);
    assert_eq!(table.code, 0, "{table:?}");
    let lines: Vec<Vec<&str>> = table
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "NAME",
            "REVISION",
            "TARGETS",
            "CONVERGED",
            "CONFLICTS",
            "ROLLOUT"
        ]
    );
    let rev = s.revision.to_string();
    assert_eq!(lines[1], ["hello", rev.as_str(), "2", "1/2", "1", "-"]);
    assert_eq!(lines[2], ["old", "deleted", "0", "0/0", "0", "-"]);
}

#[tokio::test]
async fn describe_agent_shows_resources_rejection_and_the_manifest() {
    let s = seeded().await;
    let run = s.env.run(&["describe", "agent", "pi-2", "-o", "json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let doc = run.json();
    let expected_status = rejected(agent_status("pi-2", 3, true, &s.deployment, s.revision), 4);
    assert_eq!(doc["status"], json!(expected_status));
    assert_eq!(
        doc["desired"],
        json!(manifest("pi-2", 4, &s.deployment, s.revision))
    );
    assert_eq!(doc["state"], "Rejected");

    let table = s.env.run(&["describe", "agent", "pi-2"]);
    assert_eq!(table.code, 0, "{table:?}");
    let out = &table.stdout;
    for want in [
        "Agent:        pi-2",
        "Status:       Rejected",
        "Labels:       role=kiosk",
        "Generations:  manifest 3, observed 4 (KV sequence 40), desired 4",
        "RESOURCE",
        "hello/motd",
        "sha256 9f86d081884c mode 0644 size 4 owner 0:0",
        "ManifestRejected",
        "Rejection:    PathOutsideRoots: resource hello/motd",
        "(KV sequence 41, generation 4)",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }

    let pi3 = s.env.run(&["describe", "agent", "pi-3"]);
    assert_eq!(pi3.code, 0, "{pi3:?}");
    assert!(
        pi3.stdout.contains(
            "Conflict:     installation pi-3-instance cannot write its status: \
             actual-state.pi-3 is written by installation other-installation"
        ),
        "{}",
        pi3.stdout
    );
    assert!(
        pi3.stdout.contains("No status reported yet."),
        "{}",
        pi3.stdout
    );

    let missing = s.env.run(&["describe", "agent", "pi-9"]);
    assert_eq!(missing.code, 6, "{missing:?}");
    assert!(missing.stderr.contains("no agent pi-9"), "{missing:?}");
}

#[tokio::test]
async fn describe_deployment_shows_targets_and_conflicts() {
    let s = seeded().await;
    let run = s
        .env
        .run(&["describe", "deployment", "hello", "-o", "json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let doc = run.json();
    assert_eq!(doc["deployment"], json!(s.deployment));
    assert_eq!(doc["converged"], 1);
    assert!(
        doc["targetStates"]["pi-2"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("PathOutsideRoots: "),
        "{doc:#}"
    );

    let table = s.env.run(&["describe", "deployment", "hello"]);
    assert_eq!(table.code, 0, "{table:?}");
    let out = &table.stdout;
    for want in [
        "Name:         hello",
        &format!("Revision:     {} (applied ", s.revision),
        "Selector:     matchLabels role=kiosk",
        &format!("Rendered:     revision {}", s.revision),
        "/etc/flotilla-demo/motd (0644)",
        "/etc/flotilla-demo/app.conf (0640)",
        &format!("Targets (1/2 converged on revision {})", s.revision),
        "Converged",
        "Rejected",
        "base/app-conf",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }

    let missing = s.env.run(&["describe", "deployment", "nope"]);
    assert_eq!(missing.code, 6, "{missing:?}");
}

#[tokio::test]
async fn read_commands_need_the_bucket_and_never_create_it() {
    let env = Env::start();
    for args in [
        &["get", "agents"][..],
        &["get", "deployments"],
        &["describe", "agent", "pi-1"],
        &["describe", "deployment", "hello"],
        &["delete", "deployment", "hello"],
        &["watch"],
    ] {
        let run = env.run(args);
        assert_eq!(run.code, 1, "{args:?}: {run:?}");
        assert!(
            run.stderr.contains(&format!(
                "no fleet bucket \"fleet\" at {} — is flotilla-control running?",
                env.url()
            )),
            "{args:?}: {run:?}"
        );
    }
    let js = async_nats::jetstream::new(env.server.client().await);
    assert!(
        js.get_key_value("fleet").await.is_err(),
        "no bucket was created"
    );

    // An empty bucket is fine.
    env.store().await;
    let run = env.run(&["get", "agents", "-o", "json"]);
    assert_eq!((run.code, run.json()), (0, json!([])), "{run:?}");
    // --nats-url takes a comma-separated server list.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let urls = format!("nats://127.0.0.1:{dead}, {}", env.url());
    for _ in 0..3 {
        let run = flotilla(&urls, &["get", "agents", "-o", "json"]);
        assert_eq!((run.code, run.json()), (0, json!([])), "{run:?}");
    }
    assert_eq!(env.run(&["get", "deployments"]).stdout, "no deployments\n");
}

#[tokio::test]
async fn watch_prints_one_line_per_change_until_interrupted() {
    let env = Env::start();
    let store = env.store().await;
    let d = flotilla_cli::apply::load(&hello_yaml()).unwrap();
    let mut watch = Spawned::start(&env.url(), &["watch"]);
    Spawned::expect_line(&mut watch.stderr, "watching").await;

    put_json(&store, &keys::deployment(&dname("hello")), &d).await;
    let line = Spawned::expect_line(&mut watch.stdout, "deployments.hello").await;
    assert!(line.ends_with("applied, 2 resources"), "{line}");

    // Heartbeats are not shown: the next line is the inventory.
    put_json(
        &env.beats().await,
        &keys::heartbeat(&agent("pi-1")),
        &heartbeat("pi-1", 4),
    )
    .await;
    put_json(
        &store,
        &keys::inventory(&agent("pi-1")),
        &inventory("pi-1", &[("role", "kiosk")]),
    )
    .await;
    let line = Spawned::next_line(&mut watch.stdout).await;
    assert!(
        line.contains("agents.pi-1") && line.contains("role=kiosk"),
        "{line}"
    );

    put_json(
        &store,
        &keys::actual_state(&agent("pi-1")),
        &agent_status("pi-1", 4, true, &d, 1),
    )
    .await;
    let line = Spawned::expect_line(&mut watch.stdout, "actual-state.pi-1").await;
    assert!(
        line.ends_with("Converged, generation 4, 2/2 resources ready"),
        "{line}"
    );

    store
        .delete(keys::deployment(&dname("hello")))
        .await
        .unwrap();
    let line = Spawned::expect_line(&mut watch.stdout, "deployments.hello").await;
    assert!(line.ends_with("deleted"), "{line}");

    let pid = watch.child.id().expect("running").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    assert_eq!(watch.wait_exit().await, 0, "Ctrl-C ends the watch cleanly");
}

/// Liveness is part of the state: the same converged status turns Stale and
/// then Offline as its heartbeat ages by server time, and `--heartbeat-interval`
/// sets the thresholds (Stale after 3 beats, Offline after 10).
#[tokio::test]
async fn an_agent_whose_heartbeat_ages_turns_stale_then_offline() {
    let s = seeded().await;
    let state = || {
        let run = s.env.run(&[
            "get",
            "agents",
            "-o",
            "json",
            "--heartbeat-interval",
            "300ms",
        ]);
        assert_eq!(run.code, 0, "{run:?}");
        let rows = run.json();
        let pi1 = by_key(&rows, "agentId", "pi-1");
        (
            pi1["state"].as_str().unwrap().to_owned(),
            pi1["reason"].as_str().unwrap_or_default().to_owned(),
        )
    };
    // The default thresholds (45 s / 150 s) keep a just-written heartbeat live.
    let run = s.env.run(&["get", "agents", "-o", "json"]);
    assert_eq!(by_key(&run.json(), "agentId", "pi-1")["state"], "Converged");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let (st, reason) = state();
        if seen.last() != Some(&st) {
            seen.push(st.clone());
        }
        if st == "Offline" {
            assert!(reason.starts_with("last heartbeat "), "{reason}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never Offline: {seen:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Never better than the truth on the way: it only ever got worse.
    let order = ["Converged", "Stale", "Offline"];
    let ranks: Vec<usize> = seen
        .iter()
        .map(|s| {
            order
                .iter()
                .position(|o| o == s)
                .unwrap_or_else(|| panic!("{seen:?}"))
        })
        .collect();
    assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(seen.contains(&"Stale".to_owned()), "{seen:?}");
    // A fresh heartbeat makes it live again.
    put_json(
        &s.env.beats().await,
        &keys::heartbeat(&agent("pi-1")),
        &heartbeat("pi-1", 4),
    )
    .await;
    let run = s.env.run(&["get", "agents", "-o", "json"]);
    assert_eq!(by_key(&run.json(), "agentId", "pi-1")["state"], "Converged");
}
