//! Fleet-level behaviour with the built binaries: a real nats-server,
//! `flotilla-control`, several `flotilla-agent` processes sharing one file
//! root (each writes its own paths, via `${agent.id}`) and the `flotilla` CLI.
//! Liveness by server time (issue 9, docs/adr/0015), the adaptive heartbeat
//! interval, per-device values (docs/adr/0014), and a control-plane restart
//! that changes nothing.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Fleet, field, watch};
use manifest_types::keys;
use serde_json::Value;

const HELLO: &str = r#"
apiVersion: flotilla.dev/v1
kind: Deployment
name: hello
selector:
  matchLabels: {role: kiosk}
resources:
  - id: motd
    kind: File
    spec: {path: "$ROOT/${agent.id}.motd", content: "hello\n"}
"#;

/// An agent killed outright goes Stale after 3 of its declared intervals and
/// Offline after 10, whatever its last status says, in `get agents`,
/// `describe deployment`, `watch` and `apply --wait`; restarted, it is Online
/// again. The other agent stays Online throughout.
#[tokio::test]
async fn a_killed_agent_goes_stale_then_offline_and_comes_back_online() {
    let mut fleet = Fleet::start(&[]);
    fleet.start_agent("pi-1", &["role=kiosk"], "300ms");
    fleet.start_agent("pi-2", &["role=kiosk"], "300ms");
    fleet.registered(&["pi-1", "pi-2"]).await;
    let out = fleet.apply(HELLO, &["--wait", "--timeout", "30s"]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    fleet
        .wait("both Online and Converged", Duration::from_secs(30), || {
            let a = fleet.agents_json();
            ["pi-1", "pi-2"]
                .iter()
                .all(|id| {
                    field(&a, id, "liveness") == "Online"
                        && field(&a, id, "state") == "Converged"
                        && field(&a, id, "heartbeatIntervalSeconds") == 0.3
                })
                .then_some(())
        })
        .await;
    let (mut watcher, lines) = watch(&fleet);
    // The watch has read every agent's liveness once before the kill.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let killed = Instant::now();
    fleet.kill_agent("pi-1");
    let mut seen = Vec::new();
    fleet
        .wait("pi-1 Offline", Duration::from_secs(20), || {
            let a = fleet.agents_json();
            let l = field(&a, "pi-1", "liveness").as_str().unwrap().to_owned();
            assert_eq!(field(&a, "pi-2", "liveness"), "Online", "{a:?}");
            if seen.last() != Some(&l) {
                seen.push(l.clone());
            }
            (l == "Offline").then_some(())
        })
        .await;
    // Offline within 10 intervals (3 s) of the last beat, plus a poll or two.
    assert!(
        killed.elapsed() < Duration::from_secs(8),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(seen, ["Online", "Stale", "Offline"], "in this order");
    let a = fleet.agents_json();
    // Its last status still says Ready; the verdict does not believe it.
    assert_eq!(field(&a, "pi-1", "state"), "Offline");
    assert!(
        field(&a, "pi-1", "reason")
            .as_str()
            .unwrap()
            .starts_with("last heartbeat"),
        "{a:?}"
    );

    // watch printed the transitions as they happened.
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !printed
        .iter()
        .any(|l: &String| l.contains("heartbeat.pi-1: Stale -> Offline"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) => printed.push(l),
            Err(_) => panic!("watch printed no Offline line: {printed:?}"),
        }
    }
    assert!(
        printed
            .iter()
            .any(|l| l.contains("heartbeat.pi-1: Online -> Stale")),
        "{printed:?}"
    );
    assert!(
        !printed.iter().any(|l| l.contains("heartbeat.pi-2:")),
        "{printed:?}"
    );

    // describe deployment: the target's liveness; apply --wait does not wait
    // for an Offline target: it reports it and exits 7.
    let out = fleet.flotilla(&["describe", "deployment", "hello", "-o", "json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["targetStates"]["pi-1"]["liveness"], "Offline", "{doc}");
    assert_eq!(doc["targetStates"]["pi-2"]["liveness"], "Online", "{doc}");
    let v2 = HELLO.replace("hello\\n", "hello again\\n");
    let out = fleet.apply(&v2, &["--wait", "--timeout", "30s"]);
    assert_eq!(out.status.code(), Some(7), "{}", fleet.report(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 Offline: pi-1"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(fleet.root().join("pi-2.motd")).unwrap(),
        "hello again\n"
    );

    // Restarted: Online, and it catches up with the change it missed.
    fleet.start_agent("pi-1", &["role=kiosk"], "300ms");
    fleet
        .wait(
            "pi-1 Online and Converged again",
            Duration::from_secs(30),
            || {
                let a = fleet.agents_json();
                (field(&a, "pi-1", "liveness") == "Online"
                    && field(&a, "pi-1", "state") == "Converged")
                    .then_some(())
            },
        )
        .await;
    assert_eq!(
        std::fs::read_to_string(fleet.root().join("pi-1.motd")).unwrap(),
        "hello again\n"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) if l.contains("heartbeat.pi-1: Offline -> Online") => break,
            Ok(_) => {}
            Err(_) => panic!("watch printed no Online line"),
        }
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
}

/// The control plane sizes the fleet's heartbeat interval to its cap; agents
/// pick a new one up without a restart and declare it, and nobody looks
/// Stale while the interval grows.
#[tokio::test]
async fn the_heartbeat_interval_adapts_when_the_fleet_grows_past_the_cap() {
    let control = [
        "--heartbeat-max-rate",
        "2",
        "--heartbeat-min-interval",
        "100ms",
    ];
    let mut fleet = Fleet::start(&control);
    fleet.start_agent("pi-1", &[], "200ms");
    // One agent at 2 beats/s: 500 ms, longer than its own 200 ms.
    fleet
        .wait("pi-1 beats every 500 ms", Duration::from_secs(20), || {
            let a = fleet.agents_json();
            (field(&a, "pi-1", "heartbeatIntervalSeconds") == 0.5).then_some(())
        })
        .await;
    for id in ["pi-2", "pi-3", "pi-4"] {
        fleet.start_agent(id, &[], "200ms");
    }
    // Four agents at 2 beats/s: every 2 s.
    let kv = fleet.fleet_kv().await;
    fleet
        .wait(
            "every agent beats every 2 s",
            Duration::from_secs(40),
            || {
                let a = fleet.agents_json();
                for id in ["pi-1", "pi-2", "pi-3", "pi-4"] {
                    assert_ne!(field(&a, id, "liveness"), "Stale", "{id}: {a:?}");
                    assert_ne!(field(&a, id, "liveness"), "Offline", "{id}: {a:?}");
                }
                ["pi-1", "pi-2", "pi-3", "pi-4"]
                    .iter()
                    .all(|id| field(&a, id, "heartbeatIntervalSeconds") == 2.0)
                    .then_some(())
            },
        )
        .await;
    let settings: Value =
        serde_json::from_slice(&kv.get(keys::HEARTBEAT_SETTINGS).await.unwrap().unwrap()).unwrap();
    assert_eq!(settings["intervalMs"], 2000, "{settings}");
    assert_eq!(settings["agents"], 4, "{settings}");
    assert_eq!(settings["maxPerSecond"], 2, "{settings}");
}

const VALUES: &str = r#"
apiVersion: flotilla.dev/v1
kind: Deployment
name: site
selector:
  matchLabels: {role: kiosk}
resources:
  - id: conf
    kind: File
    spec:
      path: "$ROOT/${agent.id}.conf"
      content: "role=${labels.role} site=${values.site} literal=$${agent.id} shell=${HOME}\n"
"#;

/// Per-device values are rendered per agent; one agent without its value is
/// reported (and keeps what it had) while the others converge; setting the
/// value renders it.
#[tokio::test]
async fn per_device_values_are_rendered_per_agent_and_a_missing_one_is_reported() {
    let mut fleet = Fleet::start(&[]);
    for id in ["pi-1", "pi-2", "pi-3"] {
        fleet.start_agent(id, &["role=kiosk"], "500ms");
    }
    for (id, site) in [("pi-1", "berlin"), ("pi-2", "paris")] {
        let out = fleet.flotilla(&["values", "set", id, &format!("site={site}")]);
        assert!(out.status.success(), "{}", fleet.report(&out));
    }
    fleet.registered(&["pi-1", "pi-2", "pi-3"]).await;
    let out = fleet.apply(VALUES, &["--wait", "--timeout", "30s"]);
    assert_eq!(out.status.code(), Some(4), "{}", fleet.report(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pi-3"), "{stderr}");
    assert!(
        stderr.contains("${values.site} is not set for agent pi-3"),
        "{stderr}"
    );
    for (id, site) in [("pi-1", "berlin"), ("pi-2", "paris")] {
        let path = fleet.root().join(format!("{id}.conf"));
        let want = format!("role=kiosk site={site} literal=${{agent.id}} shell=${{HOME}}\n");
        fleet
            .wait(&format!("{id} rendered"), Duration::from_secs(20), || {
                (std::fs::read_to_string(&path).ok()? == want).then_some(())
            })
            .await;
    }
    assert!(!fleet.root().join("pi-3.conf").exists());
    let out = fleet.flotilla(&["describe", "deployment", "site", "-o", "json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let failures = doc["status"]["renderFailures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{doc}");
    assert_eq!(failures[0]["agent"], "pi-3");
    assert_eq!(failures[0]["resource"], "site/conf");
    assert_eq!(doc["targetStates"]["pi-3"]["state"], "Degraded", "{doc}");
    assert_eq!(doc["targetStates"]["pi-1"]["state"], "Converged", "{doc}");
    // The agents only ever receive plain values.
    let kv = fleet.fleet_kv().await;
    let m = kv.get("desired-state.pi-1").await.unwrap().unwrap();
    let m = String::from_utf8_lossy(&m);
    assert!(m.contains("site=berlin") && !m.contains("${values"), "{m}");

    let out = fleet.flotilla(&["values", "set", "pi-3", "site=rome"]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    let path = fleet.root().join("pi-3.conf");
    fleet
        .wait(
            "pi-3 rendered once its value is set",
            Duration::from_secs(20),
            || {
                std::fs::read_to_string(&path)
                    .ok()
                    .filter(|c| c.contains("site=rome"))
            },
        )
        .await;
    let out = fleet.flotilla(&["values", "get", "pi-3", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["values"]["site"], "rome");
}

/// A restarted control plane reads the fleet back from KV: it writes no new
/// manifest, status or setting, and no agent's liveness verdict changes.
#[tokio::test]
async fn a_control_plane_restart_changes_no_verdict_and_writes_nothing() {
    let mut fleet = Fleet::start(&[]);
    fleet.start_agent("pi-1", &["role=kiosk"], "300ms");
    fleet.start_agent("pi-2", &["role=kiosk"], "300ms");
    fleet.registered(&["pi-1", "pi-2"]).await;
    let out = fleet.apply(HELLO, &["--wait", "--timeout", "30s"]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    fleet.kill_agent("pi-1");
    fleet
        .wait("pi-1 Offline", Duration::from_secs(20), || {
            (field(&fleet.agents_json(), "pi-1", "liveness") == "Offline").then_some(())
        })
        .await;
    let kv = fleet.fleet_kv().await;
    let owned = [
        "desired-state.pi-1".to_owned(),
        "desired-state.pi-2".to_owned(),
        "deployment-status.hello".to_owned(),
        keys::HEARTBEAT_SETTINGS.to_owned(),
    ];
    let mut before = Vec::new();
    for k in &owned {
        before.push(kv.entry(k).await.unwrap().expect(k).revision);
    }
    let verdicts = |a: &BTreeMap<String, Value>| {
        a.iter()
            .map(|(id, v)| (id.clone(), v["state"].clone(), v["liveness"].clone()))
            .collect::<Vec<_>>()
    };
    let was = verdicts(&fleet.agents_json());

    fleet.restart_control(&[]);
    // Barrier: a deployment applied after the restart is rendered, so the
    // new control plane has replayed everything before it.
    let probe = "apiVersion: flotilla.dev/v1\nkind: Deployment\nname: probe\nselector: {agents: [nobody]}\n";
    let out = fleet.apply(probe, &[]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    fleet
        .wait("the probe rendered", Duration::from_secs(20), || {
            let doc = fleet.flotilla(&["describe", "deployment", "probe", "-o", "json"]);
            let doc: Value = serde_json::from_slice(&doc.stdout).ok()?;
            doc["status"].is_object().then_some(())
        })
        .await;
    for (k, rev) in owned.iter().zip(&before) {
        assert_eq!(
            kv.entry(k).await.unwrap().unwrap().revision,
            *rev,
            "{k} rewritten"
        );
    }
    assert_eq!(verdicts(&fleet.agents_json()), was);
}

/// flotilla-control and the agent say in their logs when they lose NATS and
/// when they have it back, and the fleet keeps converging afterwards.
#[tokio::test]
async fn a_server_outage_is_logged_by_the_control_plane_and_the_agent() {
    let mut fleet = Fleet::start(&[]);
    fleet.start_agent("pi-1", &["role=kiosk"], "1s");
    fleet.registered(&["pi-1"]).await;
    let log = |name: &str| std::fs::read_to_string(fleet.dir.path().join(name)).unwrap_or_default();
    let count = |text: &str, needle: &str| text.matches(needle).count();
    assert!(
        count(&log("control.log"), "connected to NATS") >= 1,
        "{}",
        fleet.logs()
    );

    fleet.server.restart();
    fleet
        .wait(
            "the outage and the reconnection logged",
            Duration::from_secs(30),
            || {
                let (control, agent) = (log("control.log"), log("pi-1.log"));
                // Each outage: one "disconnected", then one more "connected".
                (count(&control, "disconnected from NATS") >= 1
                    && count(&control, "connected to NATS") >= 2
                    && count(&agent, "disconnected from NATS") >= 1
                    && count(&agent, "connected to NATS") >= 2)
                    .then_some(())
            },
        )
        .await;
    // Still a working fleet: the agent is registered and Online.
    fleet.registered(&["pi-1"]).await;
}
