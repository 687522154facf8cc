//! Faults with real servers (issue 19's campaign; each bounded in time):
//! a device cut off from NATS for longer than the Offline threshold, the
//! nats-server SIGKILLed in the middle of a staged rollout, and an agent
//! that reaches a NATS server but not the fleet's JetStream.

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, field};
use testbed::relay::Relay;
use testbed::{NatsServer, Process, binary};

fn hello(content: &str, rollout: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Deployment\nname: hello\n\
         selector:\n  matchLabels: {{role: kiosk}}\n{rollout}\
         resources:\n  - id: motd\n    kind: File\n    spec: {{path: \"$ROOT/${{agent.id}}.motd\", content: \"{content}\"}}\n"
    )
}

fn on(fleet: &Fleet, ids: &[&str], content: &str) -> usize {
    ids.iter()
        .filter(|id| {
            std::fs::read_to_string(fleet.root().join(format!("{id}.motd")))
                .is_ok_and(|c| c == content)
        })
        .count()
}

/// The link between one device and NATS is cut for longer than the
/// Offline threshold: the fleet sees it Offline (never Converged from old
/// data), its workload stays as it was, a change applied meanwhile reaches
/// it after the link returns, and it is Online and Converged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cut_off_is_offline_keeps_its_workload_and_catches_up() {
    let mut fleet = Fleet::start(&[]);
    let relay = Relay::start(
        format!("127.0.0.1:{}", fleet.server.port())
            .parse()
            .unwrap(),
    );
    fleet.start_agent_via(&relay.url(), "pi-cut", &["role=kiosk"], "300ms");
    fleet.start_agent("pi-ok", &["role=kiosk"], "300ms");
    fleet.registered(&["pi-cut", "pi-ok"]).await;
    let out = fleet.apply(&hello("v1", ""), &["--wait", "--timeout", "30s"]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    let file = fleet.root().join("pi-cut.motd");
    let written = std::fs::metadata(&file).unwrap().modified().unwrap();

    relay.cut();
    let cut = Instant::now();
    fleet
        .wait("pi-cut Offline", Duration::from_secs(30), || {
            let a = fleet.agents_json();
            // Once its heartbeat is late it is never shown Converged.
            if field(&a, "pi-cut", "liveness") != "Online" {
                assert_ne!(field(&a, "pi-cut", "state"), "Converged", "{a:?}");
            }
            (field(&a, "pi-cut", "liveness") == "Offline").then_some(())
        })
        .await;
    let offline_after = cut.elapsed();
    // A change while it is cut off: the other device converges.
    let out = fleet.apply(&hello("v2", ""), &[]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    fleet
        .wait("pi-ok on v2", Duration::from_secs(30), || {
            (on(&fleet, &["pi-ok"], "v2") == 1).then_some(())
        })
        .await;
    // The device's workload, untouched while cut off.
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "v1");
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        written
    );

    relay.restore();
    let healed = Instant::now();
    fleet
        .wait(
            "pi-cut Online and Converged on v2",
            Duration::from_secs(30),
            || {
                let a = fleet.agents_json();
                (on(&fleet, &["pi-cut"], "v2") == 1
                    && field(&a, "pi-cut", "liveness") == "Online"
                    && field(&a, "pi-cut", "state") == "Converged")
                    .then_some(())
            },
        )
        .await;
    eprintln!(
        "device cut off: Offline after {offline_after:?}; converged on the change {:?} after the link returned; CAS conflicts {}",
        healed.elapsed(),
        testbed::cas_conflicts(fleet.dir.path())
    );
}

/// The nats-server (file store) SIGKILLed and restarted while a staged
/// rollout is in progress: no intent lost, the rollout finishes with its
/// waves in order, and every status is fresh afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_killed_mid_rollout_loses_nothing() {
    let ids = ["pi-1", "pi-2", "pi-3", "pi-4"];
    let mut fleet = Fleet::start(&[]);
    for id in ids {
        fleet.start_agent(id, &["role=kiosk"], "300ms");
    }
    fleet.registered(&ids).await;
    let policy = "rollout: {canary: 1, waves: 2, soak: 1s}\n";
    let out = fleet.apply(&hello("v1", policy), &["--wait", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    let out = fleet.apply(&hello("v2", policy), &[]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    let mut waves: Vec<u64> = Vec::new();
    let mut note = |fleet: &Fleet| {
        let out = fleet.flotilla(&["rollout", "status", "hello", "-o", "json"]);
        if let Ok(r) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            && let Some(w) = r["wave"].as_u64()
            && waves.last() != Some(&w)
        {
            waves.push(w);
        }
    };
    fleet
        .wait("the canary on v2", Duration::from_secs(30), || {
            note(&fleet);
            (on(&fleet, &ids, "v2") >= 1).then_some(())
        })
        .await;
    let at = Instant::now();
    fleet.server.stop();
    fleet.server.restart();
    fleet
        .wait("the rollout completes", Duration::from_secs(60), || {
            note(&fleet);
            let out = fleet.flotilla(&["rollout", "status", "hello", "-o", "json"]);
            let r: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (r["phase"] == "Complete" && on(&fleet, &ids, "v2") == ids.len()).then_some(())
        })
        .await;
    let done = at.elapsed();
    assert!(
        waves.windows(2).all(|w| w[1] == w[0] + 1),
        "waves seen: {waves:?}"
    );
    assert_eq!(waves.last(), Some(&3));
    fleet
        .wait(
            "every agent Online and Converged",
            Duration::from_secs(30),
            || {
                let a = fleet.agents_json();
                ids.iter()
                    .all(|id| {
                        field(&a, id, "liveness") == "Online"
                            && field(&a, id, "state") == "Converged"
                    })
                    .then_some(())
            },
        )
        .await;
    eprintln!(
        "nats-server SIGKILLed mid-rollout: rollout complete {done:?} after the kill; waves {waves:?}; CAS conflicts {}",
        testbed::cas_conflicts(fleet.dir.path())
    );
}

/// Behind a plain leaf node of a hub without accounts, the fleet's
/// JetStream does not answer: the agent says so (and keeps converging from
/// what it has) instead of logging "connected" and then nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_reaches_nats_but_not_jetstream_says_so() {
    let leaf_port = testbed::free_port();
    let hub = NatsServer::start_with_config(&format!(
        "leafnodes {{ listen: \"127.0.0.1:{leaf_port}\" }}"
    ));
    let leaf = NatsServer::start_with_own_config(&format!(
        "listen: \"127.0.0.1:{{port}}\"\nserver_name: leaf-{{port}}\n\
         leafnodes {{ remotes: [ {{ url: \"nats-leaf://127.0.0.1:{leaf_port}\" }} ] }}\n"
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(binary("flotilla-agent"));
    cmd.args([
        "--nats-url",
        &leaf.url(),
        "--id",
        "pi-leaf",
        "--allow-unsigned",
    ])
    .arg("--state-dir")
    .arg(dir.path().join("state"))
    .arg("--file-root")
    .arg(dir.path());
    let log = dir.path().join("agent.log");
    let _agent = Process::spawn(cmd, &log);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("connected to NATS") && text.contains("JetStream does not answer") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no word of JetStream:\n{text}\n--- hub\n{}",
            hub.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
