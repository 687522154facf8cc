//! The agent against a real nats-server: converging, updating, removing,
//! restarting without touching anything, repairing drift, starting offline.

mod common;

use std::os::unix::fs::MetadataExt;

use common::*;
use manifest_types::{ConditionType, ReadyDetails, ResourceState};
use serde_json::json;

#[tokio::test]
async fn converges_updates_and_removes_files() {
    let h = Harness::new().await;
    let store = h.store().await;
    let root = h.root("pi-1");
    let _agent = RunningAgent::start(h.config("pi-1"));
    let motd = root.join("etc/motd");
    let conf = root.join("etc/app/app.conf");

    let mut conf_spec = file("demo/conf", &conf, "port = 1\n");
    conf_spec["spec"]["mode"] = json!("0640");
    put_manifest(
        &store,
        "pi-1",
        manifest(
            "pi-1",
            1,
            json!([file("demo/motd", &motd, "hello\n"), conf_spec]),
        ),
    )
    .await;
    let s = wait_status(&store, "pi-1", "converged on 1", |s| s.converged_on(1)).await;
    assert_eq!(std::fs::read_to_string(&motd).unwrap(), "hello\n");
    assert_eq!(std::fs::metadata(&conf).unwrap().mode() & 0o7777, 0o640);
    match &s.resources[&"demo/conf".parse().unwrap()].state {
        ResourceState::Ready {
            details: ReadyDetails::File { mode, size, .. },
            ..
        } => {
            assert_eq!(mode, "0640");
            assert_eq!(*size, 9);
        }
        other => panic!("{other:?}"),
    }
    assert!(!s.condition_true(ConditionType::Degraded));

    // Update one resource: generation bump, file rewritten.
    put_manifest(
        &store,
        "pi-1",
        manifest(
            "pi-1",
            2,
            json!([
                file("demo/motd", &motd, "hello v2\n"),
                file("demo/conf", &conf, "port = 1\n")
            ]),
        ),
    )
    .await;
    wait_status(&store, "pi-1", "converged on 2", |s| s.converged_on(2)).await;
    assert_eq!(std::fs::read_to_string(&motd).unwrap(), "hello v2\n");
    assert_eq!(
        std::fs::metadata(&conf).unwrap().mode() & 0o7777,
        0o644,
        "mode back to the default"
    );

    // Remove a resource: its file is deleted, the other stays.
    put_manifest(
        &store,
        "pi-1",
        manifest("pi-1", 3, json!([file("demo/motd", &motd, "hello v2\n")])),
    )
    .await;
    let s = wait_status(&store, "pi-1", "converged on 3", |s| s.converged_on(3)).await;
    assert!(!conf.exists());
    assert!(motd.exists());
    assert_eq!(s.resources.len(), 1);

    // Empty manifest: everything the agent wrote is gone.
    put_manifest(&store, "pi-1", manifest("pi-1", 4, json!([]))).await;
    wait_status(&store, "pi-1", "converged on 4", |s| s.converged_on(4)).await;
    assert!(!motd.exists());
}

#[tokio::test]
async fn restart_with_the_same_manifest_touches_nothing() {
    let h = Harness::new().await;
    let store = h.store().await;
    let path = h.root("pi-2").join("f.txt");
    let agent = RunningAgent::start(h.config("pi-2"));
    put_manifest(
        &store,
        "pi-2",
        manifest("pi-2", 1, json!([file("d/f", &path, "same")])),
    )
    .await;
    let before = wait_status(&store, "pi-2", "converged", |s| s.converged_on(1)).await;
    let meta = std::fs::metadata(&path).unwrap();
    agent.stop().await;

    let _agent = RunningAgent::start(h.config("pi-2"));
    // The barrier: a new generation with the same file, which only the
    // restarted agent can converge. It converged from its cache at start,
    // then looked at the file again for generation 2 (a new generation is
    // a drift check) and ran its removal sweep before reporting 2.
    put_manifest(
        &store,
        "pi-2",
        manifest("pi-2", 2, json!([file("d/f", &path, "same")])),
    )
    .await;
    wait_status(&store, "pi-2", "the restarted agent converged on 2", |s| {
        s.converged_on(2)
    })
    .await;
    let after_meta = std::fs::metadata(&path).unwrap();
    assert_eq!(after_meta.ino(), meta.ino(), "file replaced");
    assert_eq!(after_meta.mtime_nsec(), meta.mtime_nsec(), "file rewritten");
    assert_eq!(
        after_meta.ctime_nsec(),
        meta.ctime_nsec(),
        "file metadata touched"
    );
    let after = status(&store, "pi-2").await.unwrap();
    assert_eq!(after.instance_id, before.instance_id, "same installation");
    assert!(after.converged_on(2));
}

#[tokio::test]
async fn drift_is_repaired_within_a_resync() {
    let h = Harness::new().await;
    let store = h.store().await;
    let path = h.root("pi-3").join("conf/app.conf");
    let _agent = RunningAgent::start(h.config("pi-3"));
    put_manifest(
        &store,
        "pi-3",
        manifest("pi-3", 1, json!([file("d/conf", &path, "wanted\n")])),
    )
    .await;
    wait_status(&store, "pi-3", "converged", |s| s.converged_on(1)).await;

    std::fs::write(&path, "edited by hand\n").unwrap();
    wait_for("edited file restored", || {
        std::fs::read_to_string(&path).ok().as_deref() == Some("wanted\n")
    })
    .await;

    std::fs::remove_file(&path).unwrap();
    wait_for("deleted file restored", || {
        std::fs::read_to_string(&path).ok().as_deref() == Some("wanted\n")
    })
    .await;

    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    wait_for("mode restored", || {
        std::fs::metadata(&path).unwrap().mode() & 0o7777 == 0o644
    })
    .await;
}

#[tokio::test]
async fn starts_offline_from_the_cached_manifest_and_reports_once_connected() {
    let mut h = Harness::new().await;
    let store = h.store().await;
    let path = h.root("pi-4").join("f");
    let agent = RunningAgent::start(h.config("pi-4"));
    put_manifest(
        &store,
        "pi-4",
        manifest("pi-4", 1, json!([file("d/f", &path, "cached")])),
    )
    .await;
    wait_status(&store, "pi-4", "converged", |s| s.converged_on(1)).await;
    agent.stop().await;
    store
        .purge(manifest_types::keys::actual_state(&"pi-4".parse().unwrap()))
        .await
        .unwrap();
    let beat_key = manifest_types::keys::heartbeat(&"pi-4".parse().unwrap());
    let beat_before = h.heartbeats().await.entry(beat_key.clone()).await.unwrap();

    // Reboot with no network: the file was lost meanwhile.
    h.server.stop();
    std::fs::remove_file(&path).unwrap();
    let _agent = RunningAgent::start(h.config("pi-4"));
    wait_for(
        "file converged from the cached manifest while offline",
        || path.exists(),
    )
    .await;
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "cached");

    h.server.restart();
    let store = h.store().await;
    let s = wait_status(&store, "pi-4", "status after the server came back", |s| {
        s.converged_on(1)
    })
    .await;
    assert_eq!(s.manifest_generation, 1);
    // Its first status went out after a heartbeat of this run: a reader
    // never finds it fresh beside an old (or no) heartbeat.
    let beat = h.heartbeats().await.entry(beat_key).await.unwrap();
    assert!(
        beat.as_ref().map(|b| b.revision) > beat_before.map(|b| b.revision),
        "no heartbeat of this run before its status: {beat:?}"
    );
}

#[tokio::test]
async fn unknown_kinds_are_unsupported_and_failures_stay_per_resource() {
    let h = Harness::new().await;
    let store = h.store().await;
    let path = h.root("pi-5").join("ok");
    let _agent = RunningAgent::start(h.config("pi-5"));
    put_manifest(
        &store,
        "pi-5",
        manifest(
            "pi-5",
            1,
            json!([
                file("d/ok", &path, "fine"),
                {"id": "d/fw", "kind": "Firmware", "spec": {"blob": "x"}},
                {"id": "d/newfield", "kind": "File", "spec": {"path": path.with_file_name("n"), "content": "", "checksum": "x"}},
                {"id": "d/app", "kind": "Container", "spec": {"image": "127.0.0.1:9/no-registry-here:1"}},
                {"id": "d/svc", "kind": "SystemdUnit", "spec": {"unit": "x.service"}}
            ]),
        ),
    )
    .await;
    let s = wait_status(&store, "pi-5", "all five reported", |s| {
        s.manifest_generation == 1
            && s.resources.len() == 5
            && s.resources.values().all(|r| {
                !matches!(
                    r.state,
                    ResourceState::Pending | ResourceState::Reconciling { .. }
                )
            })
    })
    .await;
    let state = |id: &str| s.resources[&id.parse().unwrap()].state.clone();
    assert!(state("d/ok").is_ready());
    assert!(
        matches!(state("d/fw"), ResourceState::Unsupported { reason } if reason.contains("Firmware"))
    );
    assert!(
        matches!(state("d/newfield"), ResourceState::Unsupported { reason } if reason.contains("checksum"))
    );
    match state("d/svc") {
        ResourceState::Failed {
            reason, message, ..
        } => {
            assert_eq!(reason, "SystemdUnavailable");
            assert!(message.contains("no-systemd-here"), "{message}");
        }
        other => panic!("d/svc: {other:?}"),
    }
    // No registry at that address (or no engine at all): a typed failure of
    // that one resource.
    match state("d/app") {
        ResourceState::Failed { reason, .. } => assert!(
            ["ImagePullFailed", "DockerUnavailable"].contains(&reason.as_str()),
            "{reason}"
        ),
        other => panic!("d/app: {other:?}"),
    }
    assert!(!s.condition_true(ConditionType::Ready));
    assert!(s.condition_true(ConditionType::Degraded));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "fine");
    assert!(
        !path.with_file_name("n").exists(),
        "a spec with unknown fields is never half-applied"
    );
}

/// A removal sweep for an older manifest never removes what a newer one
/// brings: the sweep for generation 1 is held up listing containers (a
/// Docker Engine that does not answer), generation 2 adds a file meanwhile,
/// and the file is written after that sweep — present once the agent
/// reports generation 2 converged, not written and then swept away.
#[tokio::test]
async fn a_sweep_in_flight_never_removes_what_a_newer_manifest_brings() {
    let h = Harness::new().await;
    let store = h.store().await;
    let path = h.root("pi-9").join("new.txt");
    let engine = testbed::docker::StalledEngine::start(h.dir.path());
    let mut config = h.config("pi-9");
    config.docker_host = Some(engine.url());
    let _agent = RunningAgent::start(config);

    put_manifest(&store, "pi-9", manifest("pi-9", 1, json!([]))).await;
    // The barrier: generation 1's sweep is waiting on the engine.
    engine.connected().await;
    put_manifest(
        &store,
        "pi-9",
        manifest("pi-9", 2, json!([file("d/new", &path, "kept\n")])),
    )
    .await;
    wait_status(&store, "pi-9", "generation 2 accepted", |s| {
        s.observed_generation == 2
    })
    .await;
    let s = status(&store, "pi-9").await.unwrap();
    assert!(!s.converged_on(2), "not converged while a sweep is held up");

    engine.release();
    wait_status(&store, "pi-9", "converged on 2", |s| s.converged_on(2)).await;
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "kept\n");
}

/// An agent killed after recording a file's intent in its ledger (the file
/// not yet written) or right after writing it, then started again: the
/// file holds exactly the new content (never a torn one), the ledger
/// matches the file, and the status converges.
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn an_agent_killed_around_a_file_write_ends_with_the_file_and_ledger_agreeing() {
    use std::process::Command;
    for step in ["file-recorded", "file-written"] {
        let h = Harness::new().await;
        let store = h.store().await;
        let root = h.root("pi-f");
        let motd = root.join("motd");
        let run = |fault: Option<&str>| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-agent"));
            cmd.env("FLOTILLA_NATS_URL", h.server.url())
                .env("FLOTILLA_ID", "pi-f")
                .env("FLOTILLA_ALLOW_UNSIGNED", "true")
                .env("FLOTILLA_STATE_DIR", h.dir.path().join("pi-f/state"))
                .env("FLOTILLA_FILE_ROOTS", &root)
                .env("FLOTILLA_RESYNC_INTERVAL", "500ms");
            if let Some(step) = fault {
                cmd.env("FLOTILLA_FAULT_EXIT_AT", step);
            }
            cmd
        };
        std::fs::write(&motd, "old\n").unwrap();
        apply(
            &store,
            "pi-f",
            1,
            json!([{"id": "f/motd", "kind": "File",
                    "spec": {"path": motd, "content": "new\n", "adopt": true}}]),
        )
        .await;
        let code = run(Some(step)).output().unwrap().status;
        assert_eq!(code.code(), Some(86), "{step}: the fault hook fired");
        let left = std::fs::read_to_string(&motd).unwrap();
        assert!(left == "old\n" || left == "new\n", "{step}: torn: {left:?}");

        let log = h.dir.path().join("agent.log");
        let _agent = testbed::Process::spawn(run(None), &log);
        wait_status(&store, "pi-f", "converged after restart", |s| {
            s.converged_on(1)
        })
        .await;
        assert_eq!(std::fs::read_to_string(&motd).unwrap(), "new\n", "{step}");
        let ledger = flotilla_agent::state::StateDir::open(&h.dir.path().join("pi-f/state"))
            .unwrap()
            .load_ledger()
            .unwrap();
        let entry = &ledger.files[&motd];
        assert_eq!(
            entry.sha256,
            flotilla_agent::reconcile::file::sha256_hex(b"new\n"),
            "{step}: the ledger matches the file"
        );
    }
}
