//! The fleet's trust model with the built binaries (docs/adr/0017): a real
//! nats-server, `flotilla-control`, `flotilla-agent` processes and the
//! `flotilla` CLI. Signing keys are rotated with no downtime, and a retired
//! key's device keeps its last good manifest; no seed ever reaches the KV
//! bucket or a log.

mod common;

use std::time::Duration;

use common::Fleet;
use futures::StreamExt;
use manifest_types::{AgentId, AgentManifest, AgentStatus, keys};
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
    spec: {path: "$ROOT/${agent.id}.motd", content: "$CONTENT"}
"#;

/// What `id`'s key and status say: (the stored manifest, the status).
async fn read(fleet: &Fleet, id: &str) -> (Option<AgentManifest>, Option<AgentStatus>) {
    let kv = fleet.fleet_kv().await;
    let agent = AgentId::new(id).unwrap();
    let manifest = kv
        .get(keys::desired_state(&agent))
        .await
        .unwrap()
        .and_then(|b| AgentManifest::from_json(&b).ok());
    let status = kv
        .get(keys::actual_state(&agent))
        .await
        .unwrap()
        .and_then(|b| serde_json::from_slice(&b).ok());
    (manifest, status)
}

/// Waits until `id` has accepted the manifest stored for it, signed by
/// exactly `signers`; returns its generation.
async fn converged_signed_by(fleet: &Fleet, id: &str, signers: &[&str]) -> u64 {
    let mut want: Vec<&str> = signers.to_vec();
    want.sort();
    let (id2, want2) = (id.to_owned(), want.clone());
    let handle = tokio::runtime::Handle::current();
    fleet
        .wait(
            &format!("{id} converged on a manifest signed by {want:?}"),
            Duration::from_secs(30),
            move || {
                let (m, s) = tokio::task::block_in_place(|| handle.block_on(read(fleet, &id2)));
                let (m, s) = (m?, s?);
                let mut by: Vec<&str> = m.signatures.iter().map(|g| g.key_id.as_str()).collect();
                by.sort();
                (by == want2 && s.converged_on(m.generation) && s.rejection.is_none())
                    .then_some(m.generation)
            },
        )
        .await
}

fn motd(fleet: &Fleet, id: &str) -> String {
    std::fs::read_to_string(fleet.root().join(format!("{id}.motd"))).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_key_is_rotated_with_no_downtime_and_a_retired_key_runs_nothing_new() {
    let mut fleet = Fleet::start(&[]);
    let old_key = fleet.trusted_keys[0].clone();
    fleet.start_agent("pi-1", &["role=kiosk"], "500ms");
    fleet.start_agent("pi-2", &["role=kiosk"], "500ms");
    fleet.registered(&["pi-1", "pi-2"]).await;
    let out = fleet.apply(
        &HELLO.replace("$CONTENT", "v1"),
        &["--wait", "--timeout", "30s"],
    );
    assert!(out.status.success(), "{}", fleet.report(&out));
    converged_signed_by(&fleet, "pi-1", &[&old_key]).await;

    // The new key, from the CLI (offline, no NATS).
    let new_file = fleet.dir.path().join("new.nk");
    let out = fleet.flotilla(&[
        "keys",
        "rotate",
        "--current",
        fleet.control_keys[0].to_str().unwrap(),
        "--out",
        new_file.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    let rotated: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rotated["current"], old_key.as_str());
    let new_key = rotated["new"].as_str().unwrap().to_owned();

    // 1. Sign with both: every manifest is re-signed, devices trusting the
    //    old key stay converged.
    fleet.control_keys.push(new_file.clone());
    fleet.restart_control(&[]);
    let both = [old_key.as_str(), new_key.as_str()];
    let g1 = converged_signed_by(&fleet, "pi-1", &both).await;
    converged_signed_by(&fleet, "pi-2", &both).await;

    // 2. pi-2 moves to the new key (its cached manifest verifies with it).
    fleet.kill_agent("pi-2");
    fleet.trusted_keys = vec![new_key.clone()];
    fleet.start_agent("pi-2", &["role=kiosk"], "500ms");
    converged_signed_by(&fleet, "pi-2", &both).await;

    // 3. Sign with the new key only, and change the deployment: pi-2 follows;
    //    pi-1, still trusting only the retired key, rejects what it cannot
    //    verify and keeps running its last good manifest.
    fleet.control_keys = vec![new_file];
    fleet.restart_control(&[]);
    let out = fleet.apply(&HELLO.replace("$CONTENT", "v2"), &[]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    converged_signed_by(&fleet, "pi-2", &[&new_key]).await;
    fleet
        .wait("pi-2 runs v2", Duration::from_secs(30), || {
            (motd(&fleet, "pi-2") == "v2").then_some(())
        })
        .await;
    let handle = tokio::runtime::Handle::current();
    let status = fleet
        .wait("pi-1 rejects the new key", Duration::from_secs(30), || {
            let (_, s) = tokio::task::block_in_place(|| handle.block_on(read(&fleet, "pi-1")));
            s.filter(|s| {
                s.rejection
                    .as_ref()
                    .is_some_and(|r| r.reason == "UntrustedKey")
            })
        })
        .await;
    assert_eq!(
        status.manifest_generation, g1,
        "pi-1 keeps its last good manifest"
    );
    assert_eq!(motd(&fleet, "pi-1"), "v1");
    let out = fleet.flotilla(&["describe", "agent", "pi-1"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("UntrustedKey"),
        "the operator sees why: {}",
        fleet.report(&out)
    );

    // No seed anywhere: not in any value of the fleet bucket, not in a log.
    let seeds: Vec<String> = fleet
        .control_keys
        .iter()
        .chain([&fleet.dir.path().join("signing.nk")])
        .map(|f| std::fs::read_to_string(f).unwrap().trim().to_owned())
        .collect();
    let kv = fleet.fleet_kv().await;
    let mut keys = kv.keys().await.unwrap();
    let mut values = 0;
    while let Some(key) = keys.next().await {
        let key = key.unwrap();
        let Some(v) = kv.get(&key).await.unwrap() else {
            continue;
        };
        values += 1;
        let v = String::from_utf8_lossy(&v);
        for seed in &seeds {
            assert!(!v.contains(seed.as_str()), "a seed in {key}");
        }
    }
    assert!(values >= 6, "the bucket was read ({values} values)");
    let logs = fleet.logs();
    for seed in &seeds {
        assert!(!logs.contains(seed.as_str()), "a seed in the logs");
    }
}

/// A device that claims a label in its own inventory (`--label`, or a raw
/// write of `agents.<id>` with its own credentials) is not selected by it:
/// selectors match the operator's labels (`flotilla label agent`). Only a
/// deployment that opts in with `deviceLabels: true` matches the claim, or
/// the operator adopting it (`flotilla label adopt-reported`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_claiming_a_label_is_not_selected_by_it() {
    let mut fleet = Fleet::start(&[]);
    fleet.start_agent("pi-1", &["role=kiosk"], "500ms");
    // pi-2 reports role=kiosk about itself; the operator never labelled it.
    let trusted = fleet.trusted_keys[0].clone();
    let mut cmd = std::process::Command::new(testbed::binary("flotilla-agent"));
    cmd.args(["--nats-url", &fleet.server.url(), "--id", "pi-2"])
        .args(["--trusted-key", &trusted, "--label", "role=kiosk"])
        .args(["--label", "site=lobby"])
        .arg("--state-dir")
        .arg(fleet.dir.path().join("pi-2/state"))
        .arg("--file-root")
        .arg(fleet.root())
        .args(["--resync-interval", "1s", "--heartbeat-interval", "500ms"]);
    let log = fleet.dir.path().join("pi-2.log");
    fleet
        .agents
        .insert("pi-2".into(), testbed::Process::spawn(cmd, &log));
    fleet.registered(&["pi-1", "pi-2"]).await;
    fleet
        .wait(
            "pi-2's claim in its inventory",
            Duration::from_secs(30),
            || {
                let a = fleet.agents_json();
                (common::field(&a, "pi-2", "inventory")["labels"]["role"] == "kiosk").then_some(())
            },
        )
        .await;

    let out = fleet.apply(
        &HELLO.replace("$CONTENT", "secret"),
        &["--wait", "--timeout", "30s"],
    );
    assert!(out.status.success(), "{}", fleet.report(&out));
    let out = fleet.flotilla(&["describe", "deployment", "hello", "-o", "json"]);
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    let targets: Vec<&str> = d["status"]["targets"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(targets, ["pi-1"], "{d}");
    assert_eq!(motd(&fleet, "pi-1"), "secret");
    let (m, _) = read(&fleet, "pi-2").await;
    assert!(m.unwrap().resources.is_empty(), "pi-2 received nothing");
    assert!(!fleet.root().join("pi-2.motd").exists());
    // `get agents` shows the operator's labels; the claim is a hint.
    let a = fleet.agents_json();
    assert_eq!(common::field(&a, "pi-2", "labels"), &serde_json::json!({}));
    assert_eq!(common::field(&a, "pi-1", "labels")["role"], "kiosk");

    // A deployment that opts in to reported labels does match the claim.
    let hints = HELLO
        .replace("name: hello", "name: hints")
        .replace(
            "matchLabels: {role: kiosk}",
            "matchLabels: {role: kiosk}\n  deviceLabels: true",
        )
        .replace("id: motd", "id: hint")
        .replace("${agent.id}.motd", "${agent.id}.hint");
    let out = fleet.apply(
        &hints.replace("$CONTENT", "for anyone"),
        &["--wait", "--timeout", "30s"],
    );
    assert!(out.status.success(), "{}", fleet.report(&out));
    assert_eq!(
        std::fs::read_to_string(fleet.root().join("pi-2.hint")).unwrap(),
        "for anyone"
    );

    // The upgrade path: the operator vouches for pi-2's claim, which then
    // selects it — and never overrides a label the operator set.
    let out = fleet.flotilla(&["label", "agent", "pi-2", "site=lab"]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    let out = fleet.flotilla(&["label", "adopt-reported", "pi-2", "pi-2", "-o", "json"]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    let docs: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        docs,
        serde_json::json!([{"agentId": "pi-2", "adopted": {"role": "kiosk"},
            "kept": {"site": "lab"}, "leftOut": {},
            "labels": {"role": "kiosk", "site": "lab"}}]),
    );
    let values = fleet.flotilla(&["values", "get", "pi-2", "-o", "json"]);
    let values: Value = serde_json::from_slice(&values.stdout).unwrap();
    assert_eq!(
        values["labels"],
        serde_json::json!({"role": "kiosk", "site": "lab"}),
        "{values}"
    );
    fleet
        .wait("pi-2 selected by hello", Duration::from_secs(30), || {
            std::fs::read_to_string(fleet.root().join("pi-2.motd"))
                .ok()
                .filter(|m| m == "secret")
        })
        .await;
    let out = fleet.flotilla(&["label", "adopt-reported", "pi-9"]);
    assert_eq!(out.status.code(), Some(6), "{}", fleet.report(&out));
}
