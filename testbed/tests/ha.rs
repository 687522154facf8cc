//! Several `flotilla-control` instances on one fleet (docs/adr/0022): one
//! acts, elected through the control lease; when it is SIGKILLed in the
//! middle of a staged rollout a follower takes over within the lease time
//! and the rollout completes with no wave repeated or skipped; a paused
//! leader stops writing before a follower takes over and writes nothing when
//! it wakes; an instance with other signing keys never takes over from the
//! leader; a lease bucket deleted by hand is created again.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Fleet;
use futures::StreamExt;
use manifest_types::lease::ControlLease;
use manifest_types::{DeploymentStatus, keys};
use testbed::Process;

const AGENTS: [&str; 4] = ["pi-1", "pi-2", "pi-3", "pi-4"];
/// Short, so the tests wait little; the default is 6 s.
const TTL: &str = "3s";

fn hello(content: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Deployment\nname: hello\n\
         selector:\n  matchLabels: {{role: kiosk}}\n\
         rollout: {{canary: 1, waves: 2, soak: 1s}}\n\
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

async fn fleet_of(ids: &[&str]) -> (Fleet, Process) {
    let mut fleet = Fleet::start(&["--lease-ttl", TTL]);
    let standby = fleet.spawn_control(&["--lease-ttl", TTL], "standby");
    for id in ids {
        fleet.start_agent(id, &["role=kiosk"], "300ms");
    }
    fleet.registered(ids).await;
    (fleet, standby)
}

/// The lease record now, if any instance holds it.
async fn lease(fleet: &Fleet) -> Option<ControlLease> {
    let js = async_nats::jetstream::new(fleet.server.client().await);
    let kv = js
        .get_key_value(keys::control_bucket(&Default::default()))
        .await
        .ok()?;
    let value = kv.get(keys::LEASE).await.ok()??;
    serde_json::from_slice(&value).ok()
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| handle.block_on(f))
}

async fn leader(fleet: &Fleet) -> ControlLease {
    fleet
        .wait(
            "an instance holds the lease",
            Duration::from_secs(30),
            || block(lease(fleet)),
        )
        .await
}

/// Every (revision, phase, wave) the deployment status of `hello` shows,
/// in order, from now on.
async fn record_rollout(fleet: &Fleet) -> Arc<Mutex<Vec<(u64, String, usize)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kv = fleet.fleet_kv().await;
    let mut watch = kv.watch("deployment-status.hello").await.unwrap();
    let out = seen.clone();
    tokio::spawn(async move {
        while let Some(Ok(entry)) = watch.next().await {
            if let Ok(s) = serde_json::from_slice::<DeploymentStatus>(&entry.value)
                && let Some(r) = s.rollout
            {
                let step = (r.revision, r.phase.to_string(), r.wave);
                let mut seen = out.lock().unwrap();
                if seen.last() != Some(&step) {
                    seen.push(step);
                }
            }
        }
    });
    seen
}

fn log_of(fleet: &Fleet, name: &str) -> String {
    std::fs::read_to_string(fleet.dir.path().join(format!("{name}.log"))).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_its_rollout_completes_wave_by_wave() {
    let (mut fleet, standby) = fleet_of(&AGENTS).await;
    let first = leader(&fleet).await;
    let out = fleet.apply(&hello("v1"), &["--wait", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    let steps = record_rollout(&fleet).await;
    let out = fleet.apply(&hello("v2"), &[]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    fleet
        .wait("the canary on v2", Duration::from_secs(30), || {
            (on(&fleet, &AGENTS, "v2") >= 1).then_some(())
        })
        .await;
    // SIGKILL whichever instance leads.
    let (killed, survivor, survivor_log) =
        if fleet.control.as_ref().map(Process::pid) == Some(first.pid) {
            (fleet.control.take().unwrap(), standby, "standby")
        } else {
            (standby, fleet.control.take().unwrap(), "control")
        };
    let at = Instant::now();
    killed.kill();
    let next = fleet
        .wait(
            "a follower takes the lease",
            Duration::from_secs(30),
            || block(lease(&fleet)).filter(|l| l.instance != first.instance),
        )
        .await;
    let takeover = at.elapsed();
    assert_eq!(next.pid, survivor.pid());
    // What an operator sees.
    let out = fleet.flotilla(&["get", "control", "-o", "json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["pid"], survivor.pid(), "{shown}");
    assert!(shown["renewedAt"].is_string(), "{shown}");
    let table = String::from_utf8_lossy(&fleet.flotilla(&["get", "control"]).stdout).into_owned();
    assert!(table.contains(&next.instance), "{table}");
    fleet
        .wait("every agent on v2", Duration::from_secs(60), || {
            (on(&fleet, &AGENTS, "v2") == AGENTS.len()).then_some(())
        })
        .await;
    let v2 = fleet
        .wait("the v2 rollout complete", Duration::from_secs(30), || {
            let steps = steps.lock().unwrap();
            let last = steps.last()?;
            (last.1 == "Complete").then_some(last.0)
        })
        .await;
    let completed = at.elapsed();
    // Wave by wave: never back, never two at once.
    let waves: Vec<usize> = steps
        .lock()
        .unwrap()
        .iter()
        .filter(|(r, _, _)| *r == v2)
        .map(|(_, _, w)| *w)
        .collect();
    assert!(
        waves.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1),
        "waves seen: {waves:?}"
    );
    assert_eq!(waves.last(), Some(&3), "{waves:?}");
    assert!(
        log_of(&fleet, survivor_log).contains("took the control lease"),
        "{}",
        fleet.logs()
    );
    eprintln!(
        "leader SIGKILLed mid-rollout (lease time {TTL}): follower took the lease after {takeover:?}, rollout complete after {completed:?}; waves seen {waves:?}; CAS conflicts {}",
        testbed::cas_conflicts(fleet.dir.path())
    );
    drop(survivor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_stops_writing_before_a_follower_takes_over() {
    let ids = ["pi-1", "pi-2"];
    let (mut fleet, standby) = fleet_of(&ids).await;
    let first = leader(&fleet).await;
    let out = fleet.apply(&hello("v1"), &["--wait", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    let (paused_name, paused_pid) = if fleet.control.as_ref().map(Process::pid) == Some(first.pid) {
        ("control", first.pid)
    } else {
        ("standby", standby.pid())
    };
    assert_eq!(paused_pid, first.pid);
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &paused_pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    signal("-STOP");
    fleet
        .wait(
            "a follower takes the lease",
            Duration::from_secs(30),
            || block(lease(&fleet)).filter(|l| l.instance != first.instance),
        )
        .await;
    let out = fleet.apply(&hello("v2"), &["--wait", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    assert_eq!(on(&fleet, &ids, "v2"), ids.len());

    // It wakes up: it finds the lease gone and writes nothing.
    let before = log_of(&fleet, paused_name).len();
    signal("-CONT");
    fleet
        .wait(
            "the woken instance sees it lost the lease",
            Duration::from_secs(30),
            || {
                log_of(&fleet, paused_name)[before..]
                    .contains("lost the control lease")
                    .then_some(())
            },
        )
        .await;
    let out = fleet.apply(&hello("v3"), &["--wait", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    let woken = log_of(&fleet, paused_name);
    assert!(
        !woken[before..].contains("manifest written"),
        "the paused leader wrote after waking:\n{}",
        &woken[before..]
    );
    fleet.control.take();
    drop(standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_signing_keys_never_take_over_and_a_deleted_lease_bucket_comes_back() {
    let ids = ["pi-1"];
    let mut fleet = Fleet::start(&["--lease-ttl", TTL]);
    let first = leader(&fleet).await;
    // A second instance with another key: it says so and stays a follower.
    let other_dir = fleet.dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let (other_key, _) = testbed::signing_key(&other_dir);
    let mut cmd = std::process::Command::new(testbed::binary("flotilla-control"));
    cmd.args(["--nats-url", &fleet.server.url(), "--lease-ttl", TTL])
        .arg("--signing-key-file")
        .arg(&other_key);
    let other = Process::spawn(cmd, &fleet.dir.path().join("other.log"));
    fleet
        .wait(
            "the other instance reports the key mismatch",
            Duration::from_secs(30),
            || {
                log_of(&fleet, "other")
                    .contains("signs with other keys")
                    .then_some(())
            },
        )
        .await;
    for id in ids {
        fleet.start_agent(id, &["role=kiosk"], "300ms");
    }
    fleet.registered(&ids).await;
    let out = fleet.apply(&hello("v1"), &["--wait", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    assert_eq!(
        block(lease(&fleet)).map(|l| l.instance),
        Some(first.instance.clone())
    );
    assert!(!log_of(&fleet, "other").contains("took the control lease"));

    // The lease bucket deleted by hand: created again, the leader leads on.
    let js = async_nats::jetstream::new(fleet.server.client().await);
    js.delete_stream("KV_fleet-control").await.unwrap();
    fleet
        .wait(
            "the lease bucket is back, held",
            Duration::from_secs(30),
            || block(lease(&fleet)),
        )
        .await;
    let out = fleet.apply(&hello("v2"), &["--wait", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    assert!(!log_of(&fleet, "other").contains("took the control lease"));
    drop(other);
}
