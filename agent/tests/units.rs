//! The SystemdUnit reconciler against a real systemd (PID 1 in a device
//! container, testbed::device) and a real nats-server. The agent runs
//! in-process on the host and reaches the device's system bus over a mounted
//! socket; it writes unit files into a directory on the device's unit search
//! path and config files into a directory the device sees as /flotilla.
//! (tests/service.rs runs the agent *inside* the device as a systemd service.)

mod common;

use common::*;
use manifest_types::{AgentStatus, ReadyDetails, ResourceState};
use serde_json::{Value, json};
use testbed::device::Device;

fn unit(id: &str, spec: Value) -> Value {
    json!({"id": id, "kind": "SystemdUnit", "spec": spec})
}

fn state<'a>(s: &'a AgentStatus, id: &str) -> Option<&'a ResourceState> {
    s.resources.get(&id.parse().unwrap()).map(|r| &r.state)
}

/// (sub state, main pid, n restarts) of a Ready unit.
fn ready(s: &AgentStatus, id: &str) -> Option<(String, Option<u32>, u32)> {
    match state(s, id)? {
        ResourceState::Ready {
            details:
                ReadyDetails::SystemdUnit {
                    sub_state,
                    main_pid,
                    n_restarts,
                    ..
                },
            ..
        } => Some((sub_state.clone(), *main_pid, *n_restarts)),
        _ => None,
    }
}

fn failed(s: &AgentStatus, id: &str) -> Option<(String, String)> {
    match state(s, id)? {
        ResourceState::Failed {
            reason, message, ..
        } => Some((reason.clone(), message.clone())),
        _ => None,
    }
}

#[tokio::test]
async fn a_service_and_its_config_converge_restart_on_change_and_clean_up() {
    let s = setup("svc").await;
    let store = s.h.store().await;
    let resources = |greeting: &str| {
        json!([
            file("app/conf", &s.share.join("conf/app.conf"), greeting),
            {"id": "app/svc", "kind": "SystemdUnit", "restartOn": ["app/conf"], "spec": {
                "unit": "flotilla-test-app.service",
                "enabled": true,
                "content": "[Unit]\nDescription=test app\n[Service]\nExecStart=/bin/sh -c 'cp /flotilla/conf/app.conf /run/seen; exec sleep infinity'\n[Install]\nWantedBy=multi-user.target\n",
                "dropIns": {"10-env.conf": "[Service]\nEnvironment=GREETING=yes\n"}
            }}
        ])
    };
    apply(&store, "svc", 1, resources("v1\n")).await;
    let st = wait_status(&store, "svc", "converged on 1", |st| st.converged_on(1)).await;
    let (sub, pid1, _) = ready(&st, "app/svc").expect("ready details");
    assert_eq!(sub, "running");
    let pid1 = pid1.expect("a main pid");
    assert_eq!(s.device.exec(&["cat", "/run/seen"]), "v1");
    assert_eq!(
        s.device
            .systemctl(&["is-enabled", "flotilla-test-app.service"]),
        "enabled"
    );
    assert_eq!(
        s.device.systemctl(&[
            "show",
            "-p",
            "Environment",
            "--value",
            "flotilla-test-app.service"
        ]),
        "GREETING=yes"
    );
    let unit_file = s.device.units_dir().join("flotilla-test-app.service");
    let mtime = std::fs::metadata(&unit_file).unwrap().modified().unwrap();

    // The config changes: the service restarts (new main pid) and sees it.
    apply(&store, "svc", 2, resources("v2\n")).await;
    let st = wait_status(&store, "svc", "converged on 2", |st| st.converged_on(2)).await;
    let (_, pid2, _) = ready(&st, "app/svc").unwrap();
    assert_ne!(pid2.unwrap(), pid1, "restartOn must restart the service");
    assert_eq!(s.device.exec(&["cat", "/run/seen"]), "v2");
    assert_eq!(
        std::fs::metadata(&unit_file).unwrap().modified().unwrap(),
        mtime,
        "an unchanged unit file is not rewritten"
    );

    // Removed: stopped, disabled, files deleted.
    apply(&store, "svc", 3, json!([])).await;
    wait_status(&store, "svc", "converged on 3", |st| st.converged_on(3)).await;
    assert!(!unit_file.exists());
    assert!(
        !s.device
            .units_dir()
            .join("flotilla-test-app.service.d")
            .exists()
    );
    let (_, active) =
        s.device
            .exec_status(&["systemctl", "is-active", "flotilla-test-app.service"]);
    assert_eq!(active, "inactive");
    let (_, enabled) =
        s.device
            .exec_status(&["systemctl", "is-enabled", "flotilla-test-app.service"]);
    assert_ne!(enabled, "enabled");
}

#[tokio::test]
async fn a_failing_unit_is_failed_until_fixed_and_a_manual_stop_is_repaired() {
    let s = setup("fail").await;
    let store = s.h.store().await;
    let svc = |exec: &str| {
        unit(
            "f/svc",
            json!({"unit": "flotilla-test-fail.service",
                   "content": format!("[Service]\nExecStart={exec}\n")}),
        )
    };
    apply(&store, "fail", 1, json!([svc("/bin/false")])).await;
    let st = wait_status(&store, "fail", "failed", |st| failed(st, "f/svc").is_some()).await;
    let (reason, message) = failed(&st, "f/svc").unwrap();
    assert!(
        ["UnitFailed", "JobFailed"].contains(&reason.as_str()),
        "{reason}: {message}"
    );
    assert!(
        message.contains("exit-code") || message.contains("failed"),
        "{message}"
    );
    match state(&st, "f/svc").unwrap() {
        ResourceState::Failed {
            retry_after_seconds,
            ..
        } => assert!(retry_after_seconds.is_some()),
        other => panic!("{other:?}"),
    }

    apply(&store, "fail", 2, json!([svc("/bin/sleep infinity")])).await;
    let st = wait_status(&store, "fail", "fixed", |st| st.converged_on(2)).await;
    let (_, pid, _) = ready(&st, "f/svc").unwrap();

    s.device.systemctl(&["stop", "flotilla-test-fail.service"]);
    wait_status(&store, "fail", "restarted after a manual stop", |st| {
        ready(st, "f/svc").is_some_and(|(_, p, _)| p.is_some() && p != pid)
    })
    .await;
    assert_eq!(
        s.device
            .systemctl(&["is-active", "flotilla-test-fail.service"]),
        "active"
    );
}

#[tokio::test]
async fn a_unit_the_agent_did_not_create_is_released_not_stopped() {
    let s = setup("pre").await;
    let store = s.h.store().await;
    // Installed by someone else, like ssh.service on a Pi.
    std::fs::write(
        s.device.units_dir().join("flotilla-test-pre.service"),
        "[Service]\nExecStart=/bin/sleep infinity\n",
    )
    .unwrap();
    s.device.systemctl(&["daemon-reload"]);
    apply(
        &store,
        "pre",
        1,
        json!([unit("os/pre", json!({"unit": "flotilla-test-pre.service"}))]),
    )
    .await;
    wait_status(&store, "pre", "started", |st| st.converged_on(1)).await;
    assert_eq!(
        s.device
            .systemctl(&["is-active", "flotilla-test-pre.service"]),
        "active"
    );

    apply(&store, "pre", 2, json!([])).await;
    let st = wait_status(&store, "pre", "released", |st| st.converged_on(2)).await;
    assert!(
        st.released
            .iter()
            .any(|r| r.target == "flotilla-test-pre.service" && r.reason == "NotCreatedByAgent"),
        "{:?}",
        st.released
    );
    assert_eq!(
        s.device
            .systemctl(&["is-active", "flotilla-test-pre.service"]),
        "active",
        "dropping a unit the agent did not create never stops it"
    );
    assert!(
        s.device
            .units_dir()
            .join("flotilla-test-pre.service")
            .exists()
    );
}

#[tokio::test]
async fn bad_unit_names_are_rejected_before_any_dbus_call() {
    // No device: the default harness points the agent at a bus that does not exist.
    let h = Harness::new().await;
    let store = h.store().await;
    let _a = RunningAgent::start(h.config("names"));
    for (generation, name) in [
        (1, "../../etc/passwd.service"),
        (2, "nosuffix"),
        (3, "x.device"),
    ] {
        let revision = apply(
            &store,
            "names",
            generation,
            json!([unit("u/bad", json!({"unit": name}))]),
        )
        .await;
        let st = wait_status(&store, "names", "rejected", |st| {
            st.rejection
                .as_ref()
                .is_some_and(|r| r.revision == revision)
        })
        .await;
        let r = st.rejection.unwrap();
        assert!(r.message.contains("unit name"), "{name}: {r:?}");
        assert!(st.resources.is_empty(), "nothing was reconciled");
    }
}

#[tokio::test]
async fn a_unit_turned_unsupported_keeps_running_with_its_files() {
    let s = setup("unsup").await;
    let store = s.h.store().await;
    let name = "flotilla-test-unsup.service";
    let spec = json!({"unit": name, "content": "[Service]\nExecStart=/bin/sleep infinity\n",
                      "dropIns": {"10-env.conf": "[Service]\nEnvironment=A=1\n"}});
    apply(&store, "unsup", 1, json!([unit("u/svc", spec.clone())])).await;
    let st = wait_status(&store, "unsup", "running", |st| st.converged_on(1)).await;
    let (_, pid, _) = ready(&st, "u/svc").unwrap();
    assert!(pid.is_some());

    let mut newer = spec.clone();
    newer["fromTheFuture"] = json!(true);
    apply(&store, "unsup", 2, json!([unit("u/svc", newer)])).await;
    // manifestGeneration 2 is reported only after its removal sweep ran.
    let st = wait_status(&store, "unsup", "unsupported", |st| {
        st.manifest_generation == 2
            && matches!(state(st, "u/svc"), Some(ResourceState::Unsupported { .. }))
    })
    .await;
    assert!(!st.converged_on(2));
    assert_eq!(s.device.systemctl(&["is-active", name]), "active");
    assert_eq!(
        s.device
            .systemctl(&["show", "-p", "MainPID", "--value", name])
            .parse::<u32>()
            .ok(),
        pid,
        "same main PID: not restarted"
    );
    assert!(s.device.units_dir().join(name).exists(), "unit file kept");
    assert!(
        s.device
            .units_dir()
            .join(format!("{name}.d/10-env.conf"))
            .exists(),
        "drop-in kept"
    );

    let mut v3 = spec;
    v3["dropIns"] = json!({"10-env.conf": "[Service]\nEnvironment=A=3\n"});
    apply(&store, "unsup", 3, json!([unit("u/svc", v3)])).await;
    let st = wait_status(&store, "unsup", "ready again", |st| st.converged_on(3)).await;
    assert!(ready(&st, "u/svc").is_some());
}

/// The inventory says which engines answer, and is rewritten when one goes
/// away: here the device's system bus stops, and no Docker Engine listens
/// at the configured socket.
#[tokio::test]
async fn the_inventory_says_which_engines_are_reachable_and_follows_them() {
    let device = Device::start("engines");
    let h = Harness::new().await;
    let mut config = h.config("engines");
    config.unit_dir = device.units_dir();
    config.systemd_bus = Some(device.bus_address());
    let no_engine = tempfile::tempdir().unwrap();
    config.docker_host = Some(format!(
        "unix://{}",
        no_engine.path().join("docker.sock").display()
    ));
    let _agent = RunningAgent::start(config);
    let store = h.store().await;
    let key = manifest_types::keys::inventory(&manifest_types::AgentId::new("engines").unwrap());
    let inventory = || async {
        store
            .get(key.clone())
            .await
            .unwrap()
            .and_then(|b| serde_json::from_slice::<manifest_types::AgentInventory>(&b).ok())
    };
    let engine = |inv: &manifest_types::AgentInventory, kind: ResourceKind| {
        inv.engines.iter().find(|e| e.kind == kind).cloned()
    };
    use manifest_types::ResourceKind;

    let deadline = tokio::time::Instant::now() + WAIT;
    let inv = loop {
        if let Some(inv) = inventory().await
            && !inv.engines.is_empty()
        {
            break inv;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no engines in the inventory"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let systemd = engine(&inv, ResourceKind::SystemdUnit).unwrap();
    assert!(systemd.reachable, "{systemd:?}");
    assert!(
        systemd
            .version
            .as_deref()
            .is_some_and(|v| v.starts_with("252")),
        "{systemd:?}"
    );
    let docker = engine(&inv, ResourceKind::Container).unwrap();
    assert!(!docker.reachable, "{docker:?}");
    assert!(docker.message.is_some(), "{docker:?}");
    assert!(engine(&inv, ResourceKind::File).unwrap().reachable);

    // The bus goes away: the next probe says so (probes run every 5 s).
    device.systemctl(&["stop", "dbus.socket", "dbus.service"]);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let inv = inventory().await.unwrap();
        if engine(&inv, ResourceKind::SystemdUnit).is_some_and(|e| !e.reachable) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "systemd still reachable: {:?}",
            inv.engines
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// An agent killed right after writing a unit's files, and right after
/// systemd reloaded them, then started again: one unit, running, its
/// files as the manifest says, the ledger owning them, the status
/// converged.
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn an_agent_killed_while_installing_a_unit_ends_with_it_running_once() {
    use std::process::Command;
    for step in ["unit-files-written", "unit-reloaded"] {
        let device = testbed::device::Device::start("unit-fault");
        let h = Harness::new().await;
        let store = h.store().await;
        let name = "flotilla-test-fault.service";
        let run = |fault: Option<&str>| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-agent"));
            cmd.env("FLOTILLA_NATS_URL", h.server.url())
                .env("FLOTILLA_ID", "unit-fault")
                .env("FLOTILLA_ALLOW_UNSIGNED", "true")
                .env("FLOTILLA_STATE_DIR", h.dir.path().join("state"))
                .env("FLOTILLA_UNIT_DIR", device.units_dir())
                .env("FLOTILLA_SYSTEMD_BUS", device.bus_address())
                .env("FLOTILLA_RESYNC_INTERVAL", "500ms");
            if let Some(step) = fault {
                cmd.env("FLOTILLA_FAULT_EXIT_AT", step);
            }
            cmd
        };
        apply(
            &store,
            "unit-fault",
            1,
            json!([unit("app/svc", json!({
                "unit": name,
                "enabled": true,
                "content": "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n"
            }))]),
        )
        .await;
        let code = run(Some(step)).output().unwrap().status;
        assert_eq!(code.code(), Some(86), "{step}: the fault hook fired");

        let log = h.dir.path().join("agent.log");
        let _agent = testbed::Process::spawn(run(None), &log);
        let st = wait_status(&store, "unit-fault", "converged after restart", |st| {
            st.converged_on(1)
        })
        .await;
        let (sub, ..) = ready(&st, "app/svc").expect("ready");
        assert_eq!(sub, "running", "{step}");
        assert_eq!(device.systemctl(&["is-active", name]), "active", "{step}");
        assert_eq!(device.systemctl(&["is-enabled", name]), "enabled", "{step}");
        let files: Vec<_> = std::fs::read_dir(device.units_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|f| f.starts_with("flotilla-test-fault"))
            .collect();
        assert_eq!(files, [name], "{step}: one unit file");
        let ledger = flotilla_agent::state::StateDir::open(&h.dir.path().join("state"))
            .unwrap()
            .load_units()
            .unwrap();
        assert!(
            ledger.units.contains_key(name),
            "{step}: the ledger owns it"
        );
    }
}
