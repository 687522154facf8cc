//! The README's "Installing the agent on a Raspberry Pi", followed to the
//! end as a new user would, and every deployment in `examples/` applied to
//! the device it installed.
//!
//! A secured fleet as in "Securing a fleet": `flotilla auth init`, the
//! shipped flotilla-secure.conf with mutual TLS, a signing flotilla-control,
//! a device enrolled with `flotilla agent enroll`. The device is a container
//! with systemd as PID 1 (Debian bookworm) and the host's Docker Engine; on
//! it, `deploy/install-agent.sh` — the script the README teaches — installs
//! the agent binary, its credentials, the CA and the shipped unit, creates
//! the file roots and starts the agent. Then each example is applied with
//! `flotilla apply --wait` and must converge on the device.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Output};

use testbed::device::Device;
use testbed::{Process, SecureServer, binary, workspace_root};

const ID: &str = "pi-install";

fn ok(what: &str, out: &Output, context: &dyn Fn() -> String) -> String {
    assert!(
        out.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        context()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
}

#[test]
fn the_readme_install_steps_reach_a_converging_device_and_every_example_converges_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let secure = SecureServer::start(dir.path());
    let tls = secure.tls_args();
    let url = secure.server.url();

    // The operator's side: a signing key and flotilla-control.
    let (key_file, public_key) = testbed::signing_key(dir.path());
    let mut control = Command::new(binary("flotilla-control"));
    control
        .args(["--nats-url", &url])
        .arg("--creds")
        .arg(secure.authority.join("control.creds"))
        .arg("--signing-key-file")
        .arg(&key_file)
        .args(&tls);
    let control_log = dir.path().join("control.log");
    let _control = Process::spawn(control, &control_log);
    let flotilla = |args: &[&str]| -> Output {
        Command::new(binary("flotilla"))
            .args(["--nats-url", &url])
            .arg("--creds")
            .arg(secure.authority.join("operator.creds"))
            .args(&tls)
            .args(args)
            .output()
            .unwrap()
    };

    // Enrolment, on the operator's machine.
    let creds = dir.path().join(format!("{ID}.creds"));
    let enrolled = flotilla(&[
        "agent",
        "enroll",
        ID,
        "--auth-dir",
        secure.authority.to_str().unwrap(),
        "--out",
        creds.to_str().unwrap(),
        "--label",
        "role=kiosk",
    ]);
    ok("agent enroll", &enrolled, &|| secure.server.log());

    // What the README says to copy onto the device.
    let device = Device::start_with_docker("install");
    let share = device.share_dir();
    let context = || {
        format!(
            "--- device\n{}\n--- agent journal\n{}\n--- control\n{}",
            device.diagnostics(),
            device.journal("flotilla-agent.service"),
            std::fs::read_to_string(&control_log).unwrap_or_default()
        )
    };
    copy(&binary("flotilla-agent"), &share.join("flotilla-agent"));
    copy(
        &workspace_root().join("deploy/systemd/flotilla-agent.service"),
        &share.join("flotilla-agent.service"),
    );
    copy(
        &workspace_root().join("deploy/install-agent.sh"),
        &share.join("install-agent.sh"),
    );
    copy(&creds, &share.join(format!("{ID}.creds")));
    copy(&secure.pki.ca, &share.join("ca.pem"));
    copy(&secure.pki.client_cert, &share.join("device.pem"));
    copy(&secure.pki.client_key, &share.join("device-key.pem"));

    // A seed where the public key belongs is refused before anything is
    // installed, naming the key it wants.
    let seed = std::fs::read_to_string(&key_file).unwrap();
    let install = |trusted: &str| -> Vec<String> {
        [
            "sh",
            "install-agent.sh",
            "--id",
            ID,
            "--nats-url",
            &url.replace("nats://", "tls://"),
            "--creds",
            &format!("{ID}.creds"),
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "device.pem",
            "--tls-key",
            "device-key.pem",
            "--trusted-key",
            trusted,
            "--file-root",
            "/etc/flotilla-demo",
            "--file-root",
            "/etc/sensor",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let in_share = |args: &[String]| {
        let mut full = vec!["sh".to_owned(), "-c".to_owned()];
        full.push(format!(
            "cd /flotilla && {} 2>&1",
            args.iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        full
    };
    let refused = in_share(&install(seed.trim()));
    let (code, out) = device.exec_status(&refused.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("PUBLIC key"), "{out}");
    assert!(!out.contains(seed.trim()), "the seed is never echoed");
    assert_ne!(
        device
            .exec_status(&["test", "-e", "/usr/local/bin/flotilla-agent"])
            .0,
        0,
        "nothing installed"
    );

    // The install itself: it returns once the agent says it reached NATS.
    let args = in_share(&install(&public_key));
    let (code, out) = device.exec_status(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "install-agent.sh failed:\n{out}\n{}", context());
    assert!(out.contains("flotilla-agent: connected to NATS"), "{out}");
    assert_eq!(
        device.exec(&["stat", "-c", "%a", "/etc/flotilla/device.creds"]),
        "600"
    );
    assert_eq!(
        device.exec(&["stat", "-c", "%a", "/etc/flotilla/agent.toml"]),
        "600"
    );
    for root in ["/etc/flotilla-demo", "/etc/sensor"] {
        assert_eq!(device.exec(&["stat", "-c", "%F", root]), "directory");
    }
    assert_eq!(
        device.systemctl(&["is-enabled", "flotilla-agent.service"]),
        "enabled"
    );

    // Every example, on the device. Each selects role=kiosk or role=sensor;
    // the operator labels the device to match before applying it.
    ok(
        "values set",
        &flotilla(&["values", "set", ID, "site=lab"]),
        &context,
    );
    let mut examples: Vec<_> = std::fs::read_dir(workspace_root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 6, "{examples:?}");
    for example in &examples {
        let text = std::fs::read_to_string(example).unwrap();
        let role = if text.contains("role: sensor") {
            "sensor"
        } else {
            assert!(text.contains("role: kiosk"), "{}", example.display());
            "kiosk"
        };
        ok(
            "label",
            &flotilla(&["label", "agent", ID, &format!("role={role}")]),
            &context,
        );
        let mut apply: Vec<OsString> = vec!["apply".into(), "-f".into(), example.into()];
        apply.extend(["--wait".into(), "--timeout".into(), "120s".into()]);
        let out = Command::new(binary("flotilla"))
            .args(["--nats-url", &url])
            .arg("--creds")
            .arg(secure.authority.join("operator.creds"))
            .args(&tls)
            .args(&apply)
            .output()
            .unwrap();
        ok(&format!("apply {}", example.display()), &out, &context);
        // What the unit examples left on the device, seen from the device.
        match example.file_name().unwrap().to_str().unwrap() {
            "sensor.yaml" => assert_eq!(
                device.systemctl(&["is-active", "flotilla-sensor.service"]),
                "active"
            ),
            "health-report.yaml" => {
                assert_eq!(
                    device.systemctl(&["is-active", "flotilla-health-report.timer"]),
                    "active"
                );
                assert_eq!(
                    device
                        .exec_status(&["systemctl", "is-active", "flotilla-health-report.service"])
                        .1,
                    "inactive",
                    "the job waits for its timer"
                );
                let describe = ok(
                    "describe agent",
                    &flotilla(&["describe", "agent", ID]),
                    &context,
                );
                assert!(describe.contains("health-report/job"), "{describe}");
            }
            _ => {}
        }
    }
    let status = device.systemctl(&[
        "show",
        "-p",
        "StatusText",
        "--value",
        "flotilla-agent.service",
    ]);
    assert!(
        status.starts_with("connected to NATS; generation "),
        "{status}"
    );
}
