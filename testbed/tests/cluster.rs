//! The shipped 3-node cluster configuration
//! (`deploy/nats/cluster/flotilla-cluster.conf`, docs/adr/0021) on one
//! machine, with the production auth layout: `flotilla-control
//! --replicas 3` creates both buckets on all three nodes, agents given every
//! node's URL converge, the node leading the fleet's stream is SIGKILLed in
//! the middle of a staged rollout and the rollout completes on the other
//! two, the node comes back and catches up, and a revocation sent to one
//! node cuts off a device connected to another.

use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde_json::Value;
use testbed::cluster::SecureCluster;
use testbed::{Process, binary};

mod common;

use common::secure::SecureFleet;

type Fleet = SecureFleet<SecureCluster>;

/// The staged rollout every update here goes through.
const ROLLOUT: &str = "rollout: {canary: 1, waves: 2, soak: 1s}\n";

fn rollout(fleet: &Fleet) -> Option<Value> {
    let out = fleet.flotilla(&["rollout", "status", "hello", "-o", "json"]);
    serde_json::from_slice(&out.stdout).ok()
}

const AGENTS: [&str; 4] = ["pi-1", "pi-2", "pi-3", "pi-4"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_replicates_the_fleet_survives_its_stream_leader_and_revokes_everywhere()
 {
    let dir = tempfile::tempdir().unwrap();
    let cluster = SecureCluster::start(dir.path());
    cluster.wait_formed(Duration::from_secs(30)).await;
    let mut fleet = SecureFleet::new(dir, cluster);
    let all = fleet.servers.urls();
    fleet.start_control(&["--replicas", "3"]);
    // Both buckets on all three nodes.
    let js = jetstream::new(fleet.servers.client_of(&all, "control.creds").await);
    for stream in ["KV_fleet", "KV_fleet-heartbeats"] {
        let replicas = fleet
            .wait(
                &format!("{stream} created"),
                Duration::from_secs(30),
                || {
                    let handle = tokio::runtime::Handle::current();
                    tokio::task::block_in_place(|| {
                        handle.block_on(async {
                            let mut s = js.get_stream(stream).await.ok()?;
                            Some(s.info().await.ok()?.config.num_replicas)
                        })
                    })
                },
            )
            .await;
        assert_eq!(replicas, 3, "{stream}");
    }
    // A new replicated stream answers direct gets once its replicas are up.
    let kv = js.get_key_value("fleet").await.unwrap();
    fleet
        .wait(
            "the fleet bucket answers reads",
            Duration::from_secs(30),
            || {
                let handle = tokio::runtime::Handle::current();
                tokio::task::block_in_place(|| handle.block_on(kv.get("values.nobody")).ok())
            },
        )
        .await;
    for id in AGENTS {
        fleet.start_agent(id, &all);
    }

    fleet.ok(&fleet.apply("v1", ROLLOUT, &["--wait", "--timeout", "60s"]));
    assert_eq!(fleet.files(&AGENTS), ["v1"; 4]);

    // The update rolls out canary first; once the canary runs v2, the node
    // leading the fleet's stream dies.
    fleet.ok(&fleet.apply("v2", ROLLOUT, &[]));
    fleet
        .wait("the canary on v2", Duration::from_secs(30), || {
            fleet.files(&AGENTS).iter().any(|f| f == "v2").then_some(())
        })
        .await;
    let leader = fleet
        .servers
        .stream_leader("KV_fleet")
        .await
        .expect("the fleet stream has a leader");
    let killed = fleet.servers.node(&leader);
    let at = Instant::now();
    fleet.servers.nodes[killed].stop();
    let survivors: String = (0..3)
        .filter(|&i| i != killed)
        .map(|i| fleet.servers.nodes[i].url())
        .collect::<Vec<_>>()
        .join(",");
    let done = fleet
        .wait(
            "the rollout completes on the other two nodes",
            Duration::from_secs(90),
            || {
                let out =
                    fleet.flotilla_via(&survivors, &["rollout", "status", "hello", "-o", "json"]);
                let r: Value = serde_json::from_slice(&out.stdout).ok()?;
                (r["phase"] == "Complete" && r["revision"].as_u64().is_some()).then_some(r)
            },
        )
        .await;
    let reconverged = at.elapsed();
    assert_eq!(done["waves"], 3, "{done}");
    assert_eq!(fleet.files(&AGENTS), ["v2"; 4]);
    eprintln!(
        "stream leader {leader} killed mid-rollout: rollout complete {reconverged:?} later; CAS conflicts {}",
        testbed::cas_conflicts(fleet.dir.path())
    );

    // The node returns and catches up: every replica current, none behind.
    fleet.servers.nodes[killed].restart();
    fleet
        .wait(
            "the returned node's replica is current",
            Duration::from_secs(60),
            || {
                let handle = tokio::runtime::Handle::current();
                tokio::task::block_in_place(|| {
                    handle.block_on(async {
                        let mut s = js.get_stream("KV_fleet").await.ok()?;
                        let info = s.info().await.ok()?;
                        let c = info.cluster.as_ref()?;
                        (c.leader.is_some()
                            && c.replicas.len() == 2
                            && c.replicas
                                .iter()
                                .all(|r| r.current && r.lag.unwrap_or(0) == 0))
                        .then_some(())
                    })
                })
            },
        )
        .await;
    assert_eq!(
        rollout(&fleet).map(|r| r["phase"].clone()),
        Some(Value::from("Complete"))
    );

    // A device connected to nats-3 only; its revocation sent to nats-1.
    let victim_creds = fleet.dir.path().join("pi-x.creds");
    fleet.start_agent("pi-x", &fleet.servers.nodes[2].url());
    fleet
        .wait("pi-x converged on v2", Duration::from_secs(30), || {
            (fleet.files(&["pi-x"]) == ["v2"]).then_some(())
        })
        .await;
    let refused = |log: &str| {
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("the NATS server refused these credentials"))
    };
    let at = Instant::now();
    fleet.ok(&fleet.flotilla_via(
        &fleet.servers.nodes[0].url(),
        &[
            "agent",
            "revoke",
            "pi-x",
            "--auth-dir",
            fleet.servers.authority.to_str().unwrap(),
        ],
    ));
    fleet
        .wait(
            "pi-x, connected to nats-3, is cut off by a revocation sent to nats-1",
            Duration::from_secs(30),
            || {
                std::fs::read_to_string(fleet.dir.path().join("pi-x.log"))
                    .is_ok_and(|l| refused(&l))
                    .then_some(())
            },
        )
        .await;
    eprintln!(
        "revocation across the cluster: pi-x refused {:?} after revoke started",
        at.elapsed()
    );
    let again = async_nats::ConnectOptions::with_credentials_file(victim_creds)
        .await
        .unwrap()
        .require_tls(true)
        .add_root_certificates(fleet.servers.pki.ca.clone())
        .add_client_certificate(
            fleet.servers.pki.client_cert.clone(),
            fleet.servers.pki.client_key.clone(),
        )
        .connect(fleet.servers.nodes[1].url())
        .await;
    assert!(again.is_err(), "the revoked device connects to nats-2");
}

/// An R1 bucket (made by `flotilla apply` before the control plane ran, or
/// by a single-server installation grown into a cluster) is scaled up in
/// place by `--replicas 3`, its history kept (docs/adr/0021).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_bucket_is_scaled_up_in_place_with_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = SecureCluster::start(dir.path());
    cluster.wait_formed(Duration::from_secs(30)).await;
    let js = jetstream::new(cluster.client_of(&cluster.urls(), "control.creds").await);
    let bucket = manifest_types::BucketName::default();
    let store = flotilla_nats::ensure_bucket(&js, &bucket, flotilla_nats::Replicas::ONE)
        .await
        .unwrap();
    for v in ["a", "b", "c"] {
        store.put("values.pi-1", v.into()).await.unwrap();
    }
    let three = flotilla_nats::Replicas::new(3).unwrap();
    flotilla_nats::ensure_bucket(&js, &bucket, three)
        .await
        .unwrap();
    for stream in ["KV_fleet", "KV_fleet-heartbeats"] {
        let info = js
            .get_stream(stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        assert_eq!(info.config.num_replicas, 3, "{stream}");
    }
    let history: Vec<_> =
        futures::StreamExt::collect::<Vec<_>>(store.history("values.pi-1").await.unwrap())
            .await
            .into_iter()
            .map(|e| e.unwrap().value)
            .collect();
    assert_eq!(
        history,
        ["a", "b", "c"].map(bytes::Bytes::from),
        "history kept"
    );
}

/// A cluster that has not formed (here: two of its three nodes down from
/// the start): flotilla-control says JetStream does not answer and waits,
/// instead of exiting or acting on a lone node; once the nodes are up it
/// creates its buckets with three replicas and runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_waits_for_a_cluster_that_has_not_formed() {
    let mut cluster = testbed::cluster::Cluster::start();
    cluster.nodes[1].stop();
    cluster.nodes[2].stop();
    let dir = tempfile::tempdir().unwrap();
    let mut control = Command::new(binary("flotilla-control"));
    control.args(["--nats-url", &cluster.urls(), "--replicas", "3"]);
    let log = dir.path().join("control.log");
    let control = Process::spawn(control, &log);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read().contains("JetStream does not answer for the fleet bucket") {
        assert!(Instant::now() < deadline, "no warning:\n{}", read());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!read().contains("control plane running"), "{}", read());
    cluster.nodes[1].restart();
    cluster.nodes[2].restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !read().contains("control plane running") {
        assert!(
            Instant::now() < deadline,
            "not running after the cluster formed:\n{}\n{}",
            read(),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let js = jetstream::new(cluster.client().await);
    let info = js
        .get_stream("KV_fleet")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3);
    drop(control);
}
