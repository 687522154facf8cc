//! The agent as a real systemd service: the binary and
//! deploy/systemd/flotilla-agent.service installed in a device container
//! (systemd as PID 1), talking to a nats-server on the host. Covers READY
//! without a network, the STATUS line, a config + service deployment with a
//! restartOn trigger and its removal, and the watchdog restarting a wedged
//! agent (test-only fault hook, hence the feature gate).

#![cfg(feature = "fault-injection")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use testbed::device::Device;

const UNIT: &str = "flotilla-agent.service";

fn show(device: &Device, property: &str) -> String {
    device.systemctl(&["show", "-p", property, "--value", UNIT])
}

/// Polls a condition on the device (the agent runs in the device).
async fn wait_device(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn install_agent(device: &Device, nats_url: &str) {
    let share = device.share_dir();
    std::fs::copy(
        env!("CARGO_BIN_EXE_flotilla-agent"),
        share.join("flotilla-agent"),
    )
    .unwrap();
    std::fs::copy(
        testbed::workspace_root().join("deploy/systemd/flotilla-agent.service"),
        share.join(UNIT),
    )
    .unwrap();
    write_config(device, nats_url);
    device.exec(&[
        "cp",
        "/flotilla/flotilla-agent",
        "/usr/local/bin/flotilla-agent",
    ]);
    device.exec(&["cp", &format!("/flotilla/{UNIT}"), "/etc/systemd/system/"]);
    device.exec(&[
        "mkdir",
        "-p",
        "/etc/flotilla-app",
        &format!("/etc/systemd/system/{UNIT}.d"),
    ]);
    // Test-only: a short watchdog so the wedge test is quick.
    std::fs::write(
        share.join("test.conf"),
        "[Service]\nWatchdogSec=3s\nEnvironment=RUST_LOG=info,async_nats=warn\n",
    )
    .unwrap();
    device.exec(&[
        "cp",
        "/flotilla/test.conf",
        &format!("/etc/systemd/system/{UNIT}.d/"),
    ]);
    device.systemctl(&["daemon-reload"]);
}

fn write_config(device: &Device, nats_url: &str) {
    std::fs::write(
        device.share_dir().join("agent.toml"),
        format!(
            "id = \"pi-svc\"\nnats-url = \"{nats_url}\"\nfile-roots = [\"/etc/flotilla-app\"]\n\
             allow-unsigned = true\nresync-interval = \"1s\"\nheartbeat-interval = \"1s\"\nunit-job-timeout = \"8s\"\n[labels]\nrole = \"sensor\"\n"
        ),
    )
    .unwrap();
    device.exec(&["mkdir", "-p", "/etc/flotilla"]);
    device.exec(&["cp", "/flotilla/agent.toml", "/etc/flotilla/agent.toml"]);
}

#[tokio::test]
async fn the_agent_runs_as_a_systemd_service() {
    let device = Device::start("agent");
    let h = Harness::new().await;
    let store = h.store().await;

    // A brand-new device with no network: READY anyway, no restart loop.
    install_agent(&device, "nats://127.0.0.1:9");
    device.systemctl(&["start", UNIT]); // Type=notify: returns once READY=1 arrived
    assert_eq!(device.systemctl(&["is-active", UNIT]), "active");
    // A deliberate window longer than WatchdogSec: a restart loop would show.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(device.systemctl(&["is-active", UNIT]), "active");
    assert_eq!(show(&device, "NRestarts"), "0", "no restart loop offline");
    assert!(
        show(&device, "StatusText").starts_with("not connected to NATS"),
        "{}",
        show(&device, "StatusText")
    );

    // Now with the fleet's server.
    write_config(&device, &h.server.url());
    device.systemctl(&["restart", UNIT]);
    wait_device("connected STATUS", Duration::from_secs(15), || {
        show(&device, "StatusText").starts_with("connected to NATS")
    })
    .await;
    let status = device.systemctl(&["status", "--no-pager", UNIT]);
    assert!(status.contains("active (running)"), "{status}");
    assert!(status.contains("Status: \"connected to NATS"), "{status}");

    let resources = |v: &str| {
        json!([
            {"id": "s/conf", "kind": "File", "spec": {"path": "/etc/flotilla-app/app.conf", "content": v}},
            {"id": "s/app", "kind": "SystemdUnit", "restartOn": ["s/conf"], "spec": {
                "unit": "flotilla-test-app.service",
                "enabled": true,
                "content": "[Service]\nExecStart=/bin/sh -c 'cp /etc/flotilla-app/app.conf /run/seen; exec sleep infinity'\n[Install]\nWantedBy=multi-user.target\n"
            }}
        ])
    };
    apply(&store, "pi-svc", 1, resources("v1\n")).await;
    wait_status(&store, "pi-svc", "converged on 1", |s| s.converged_on(1)).await;
    assert_eq!(device.exec(&["cat", "/run/seen"]), "v1");
    let pid1 = device.systemctl(&[
        "show",
        "-p",
        "MainPID",
        "--value",
        "flotilla-test-app.service",
    ]);
    wait_device("generation 1 in STATUS", Duration::from_secs(15), || {
        show(&device, "StatusText").contains("generation 1; 2/2 resources ready")
    })
    .await;

    apply(&store, "pi-svc", 2, resources("v2\n")).await;
    wait_status(&store, "pi-svc", "converged on 2", |s| s.converged_on(2)).await;
    assert_eq!(device.exec(&["cat", "/run/seen"]), "v2");
    let pid2 = device.systemctl(&[
        "show",
        "-p",
        "MainPID",
        "--value",
        "flotilla-test-app.service",
    ]);
    assert_ne!(pid1, pid2, "the config change restarted the service");

    // Restarted with no network: the line reports the cached generation and
    // its resources from the start, not "generation 0".
    write_config(&device, "nats://127.0.0.1:9");
    device.systemctl(&["restart", UNIT]);
    let mut lines = Vec::new();
    wait_device(
        "the cached generation in STATUS",
        Duration::from_secs(15),
        || {
            let line = show(&device, "StatusText");
            let done = line.starts_with("not connected to NATS")
                && line.ends_with("generation 2; 2/2 resources ready");
            lines.push(line);
            done
        },
    )
    .await;
    assert!(
        lines
            .iter()
            .all(|l| l.is_empty() || l.contains("generation 2")),
        "every line since the restart names the cached generation: {lines:?}"
    );
    write_config(&device, &h.server.url());
    device.systemctl(&["restart", UNIT]);
    wait_device("connected again", Duration::from_secs(15), || {
        show(&device, "StatusText") == "connected to NATS; generation 2; 2/2 resources ready"
    })
    .await;

    apply(&store, "pi-svc", 3, json!([])).await;
    wait_status(&store, "pi-svc", "converged on 3", |s| s.converged_on(3)).await;
    let (code, _) = device.exec_status(&[
        "test",
        "-e",
        "/etc/systemd/system/flotilla-test-app.service",
    ]);
    assert_ne!(code, 0, "the unit file the agent wrote is removed");
    let (_, active) = device.exec_status(&["systemctl", "is-active", "flotilla-test-app.service"]);
    assert_eq!(active, "inactive");

    // A slow reconcile — a start job that never finishes, waited on for 8 s,
    // longer than WatchdogSec=3s — never costs the agent its watchdog.
    let restarts: u32 = show(&device, "NRestarts").parse().unwrap();
    let stuck = json!([{"id": "s/stuck", "kind": "SystemdUnit", "spec": {
        "unit": "flotilla-test-stuck.service",
        "content": "[Service]\nType=notify\nExecStart=/bin/sleep infinity\nTimeoutStartSec=infinity\n"
    }}]);
    apply(&store, "pi-svc", 4, stuck).await;
    let s = wait_status(&store, "pi-svc", "stuck unit reported", |s| {
        s.resources
            .values()
            .any(|r| matches!(&r.state, manifest_types::ResourceState::Failed { reason, .. } if reason == "UnitActivating"))
    })
    .await;
    let message = format!("{:?}", s.resources);
    assert!(message.contains("still running after 8s"), "{message}");
    assert!(!s.converged_on(4), "a unit stuck activating is not Ready");
    assert_eq!(show(&device, "NRestarts").parse::<u32>().unwrap(), restarts);

    // A wedged event loop withholds the watchdog ping; systemd restarts the agent.
    let pid_before = show(&device, "MainPID");
    device.exec(&["touch", "/var/lib/flotilla/wedge"]);
    wait_device("a watchdog restart", Duration::from_secs(30), || {
        show(&device, "NRestarts").parse::<u32>().unwrap() > restarts
            && show(&device, "ActiveState") == "active"
    })
    .await;
    assert_ne!(show(&device, "MainPID"), pid_before);
    let journal = device.journal(UNIT);
    assert!(journal.contains("atchdog timeout"), "{journal}");
    // And it is back at work.
    apply(&store, "pi-svc", 5, resources("v3\n")).await;
    wait_status(&store, "pi-svc", "converged on 5 after the restart", |s| {
        s.converged_on(5)
    })
    .await;
    assert_eq!(device.exec(&["cat", "/run/seen"]), "v3");
}
