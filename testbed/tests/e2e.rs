//! End to end, with the built binaries: a real nats-server, `flotilla-control`,
//! three `flotilla-agent` processes (each in its own mount namespace, so each
//! sees a private directory at the same path, like separate devices) and the
//! `flotilla` CLI. Needs root for the mount namespaces (CI runs as root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use manifest_types::{AgentId, AgentManifest, DeploymentName, DeploymentStatus, keys};
use testbed::{NatsServer, Process, binary, in_private_mount};

struct Fleet {
    server: NatsServer,
    dir: tempfile::TempDir,
    signing_key: (PathBuf, String),
    mountpoint: PathBuf,
    control: Option<Process>,
    _agents: Vec<Process>,
}

impl Fleet {
    fn start() -> Self {
        let server = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let mountpoint = dir.path().join("device-etc");
        let mut fleet = Self {
            signing_key: testbed::signing_key(dir.path()),
            server,
            dir,
            mountpoint,
            control: None,
            _agents: Vec::new(),
        };
        fleet.start_control();
        for (id, role) in [("pi-1", "kiosk"), ("pi-2", "kiosk"), ("pi-3", "sensor")] {
            let private = fleet.device_dir(id);
            let mut cmd = in_private_mount(&private, &fleet.mountpoint, &binary("flotilla-agent"));
            cmd.args([
                "--nats-url",
                &fleet.server.url(),
                "--id",
                id,
                "--label",
                &format!("role={role}"),
                "--trusted-key",
                &fleet.signing_key.1,
            ])
            .arg("--state-dir")
            .arg(fleet.dir.path().join(id).join("state"))
            .arg("--file-root")
            .arg(&fleet.mountpoint)
            .args(["--resync-interval", "1s", "--heartbeat-interval", "1s"]);
            let log = fleet.dir.path().join(format!("{id}.log"));
            fleet._agents.push(Process::spawn(cmd, &log));
            // The operator's label, which the selectors match.
            let role = format!("role={role}");
            let out = fleet.flotilla(&["label", "agent", id, &role]);
            assert!(out.status.success(), "{out:?}");
        }
        fleet
    }

    fn start_control(&mut self) {
        let mut cmd = Command::new(binary("flotilla-control"));
        cmd.args(["--nats-url", &self.server.url()])
            .arg("--signing-key-file")
            .arg(&self.signing_key.0);
        self.control = Some(Process::spawn(cmd, &self.dir.path().join("control.log")));
    }

    /// What device `id` sees at the mountpoint.
    fn device_dir(&self, id: &str) -> PathBuf {
        let p = self.dir.path().join(id).join("etc");
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn flotilla(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("flotilla"))
            .args(["--nats-url", &self.server.url()])
            .args(args)
            .output()
            .unwrap()
    }

    fn apply(&self, yaml: &str) -> std::process::Output {
        let file = self.dir.path().join("deployment.yaml");
        std::fs::write(
            &file,
            yaml.replace("$ROOT", self.mountpoint.to_str().unwrap()),
        )
        .unwrap();
        self.flotilla(&[
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--wait",
            "--timeout",
            "30s",
        ])
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for name in ["control.log", "pi-1.log", "pi-2.log", "pi-3.log"] {
            s += &format!(
                "--- {name}\n{}\n",
                std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
            );
        }
        s
    }

    async fn manifest(&self, id: &str) -> (u64, AgentManifest) {
        let js = async_nats::jetstream::new(self.server.client().await);
        let kv = js.get_key_value("fleet").await.unwrap();
        let e = kv
            .entry(keys::desired_state(&AgentId::new(id).unwrap()))
            .await
            .unwrap()
            .expect("desired-state written");
        (e.revision, AgentManifest::from_json(&e.value).unwrap())
    }
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

fn ok(out: &std::process::Output, fleet: &Fleet) {
    assert!(
        out.status.success(),
        "flotilla failed ({:?}):\nstdout: {}\nstderr: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        fleet.logs()
    );
}

async fn wait_for(what: &str, fleet: &Fleet, pred: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pred() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const V1: &str = r#"
apiVersion: flotilla.dev/v1
kind: Deployment
name: hello
selector:
  matchLabels: {role: kiosk}
resources:
  - id: motd
    kind: File
    spec: {path: $ROOT/motd, content: "hello v1\n"}
  - id: conf
    kind: File
    spec: {path: $ROOT/app/app.conf, content: "port = 8080\n", mode: "0640"}
"#;

#[tokio::test]
async fn operator_to_device_and_back() {
    let fleet = Fleet::start();
    let (pi1, pi2, pi3) = (
        fleet.device_dir("pi-1"),
        fleet.device_dir("pi-2"),
        fleet.device_dir("pi-3"),
    );

    // The devices register themselves (agents.<id>) before the operator applies.
    let js = async_nats::jetstream::new(fleet.server.client().await);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kv = js.get_key_value("fleet").await;
        let mut registered = 0;
        if let Ok(kv) = &kv {
            for id in ["pi-1", "pi-2", "pi-3"] {
                if kv
                    .entry(keys::inventory(&AgentId::new(id).unwrap()))
                    .await
                    .unwrap()
                    .is_some()
                {
                    registered += 1;
                }
            }
        }
        if registered == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agents did not register\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Apply: both kiosks converge, the sensor is untouched.
    let out = fleet.apply(V1);
    ok(&out, &fleet);
    for dev in [&pi1, &pi2] {
        assert_eq!(read(&dev.join("motd")).as_deref(), Some("hello v1\n"));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dev.join("app/app.conf"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o7777, 0o640);
    }
    assert_eq!(
        std::fs::read_dir(&pi3).unwrap().count(),
        0,
        "unselected agent touched"
    );
    let (_, m1) = fleet.manifest("pi-1").await;
    let (_, m3) = fleet.manifest("pi-3").await;
    assert!(m3.resources.is_empty());

    // Update one resource: generation bump, file updated.
    ok(&fleet.apply(&V1.replace("hello v1", "hello v2")), &fleet);
    let (_, m1b) = fleet.manifest("pi-1").await;
    assert!(m1b.generation > m1.generation);
    assert_eq!(read(&pi1.join("motd")).as_deref(), Some("hello v2\n"));
    assert_eq!(read(&pi2.join("motd")).as_deref(), Some("hello v2\n"));

    // Remove a resource: its file is deleted on both kiosks.
    let without_conf = V1.replace("hello v1", "hello v2");
    let without_conf = &without_conf[..without_conf.find("  - id: conf").unwrap()];
    ok(&fleet.apply(without_conf), &fleet);
    assert!(!pi1.join("app/app.conf").exists());
    assert!(!pi2.join("app/app.conf").exists());
    assert!(pi1.join("motd").exists());

    // A control-plane restart writes no new generation.
    let before: Vec<u64> =
        futures::future::join_all(["pi-1", "pi-2", "pi-3"].map(|a| fleet.manifest(a)))
            .await
            .into_iter()
            .map(|(r, _)| r)
            .collect();
    let mut fleet = fleet;
    assert!(
        fleet.control.take().unwrap().terminate().success(),
        "control plane did not stop cleanly on SIGTERM"
    );
    fleet.start_control();
    // Barrier: a kiosk the restarted control plane has never seen registers
    // (the operator labelled it, and its inventory appears).
    // The watch replays every other key before it, and a pass writes the
    // deployment's status only after all of its manifests: once the status
    // lists the newcomer, any rewrite of the others would have landed.
    let kv = js.get_key_value("fleet").await.unwrap();
    let newcomer = AgentId::new("pi-9").unwrap();
    let out = fleet.flotilla(&["label", "agent", "pi-9", "role=kiosk"]);
    assert!(out.status.success(), "{out:?}");
    let inventory = serde_json::json!({"apiVersion": "flotilla.dev/v1", "agentId": "pi-9",
        "instanceId": "e2e-barrier", "agentVersion": "0.1.0", "arch": "x86_64", "os": "linux",
        "reconcilers": ["File"], "labels": {"role": "kiosk"}});
    kv.put(
        keys::inventory(&newcomer),
        serde_json::to_vec(&inventory).unwrap().into(),
    )
    .await
    .unwrap();
    let status_key = keys::deployment_status(&DeploymentName::new("hello").unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = kv.entry(status_key.as_str()).await.unwrap();
        let status: Option<DeploymentStatus> =
            status.and_then(|e| serde_json::from_slice(&e.value).ok());
        if status.is_some_and(|s| s.targets.contains_key(&newcomer)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted control plane never rendered the newcomer\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after: Vec<u64> =
        futures::future::join_all(["pi-1", "pi-2", "pi-3"].map(|a| fleet.manifest(a)))
            .await
            .into_iter()
            .map(|(r, _)| r)
            .collect();
    assert_eq!(before, after, "restart rewrote manifests\n{}", fleet.logs());

    // Delete the deployment: empty manifests, files gone.
    let out = fleet.flotilla(&["delete", "deployment", "hello"]);
    ok(&out, &fleet);
    wait_for("files removed after delete", &fleet, || {
        !pi1.join("motd").exists() && !pi2.join("motd").exists()
    })
    .await;
    let (_, m1c) = fleet.manifest("pi-1").await;
    assert!(m1c.resources.is_empty());
    assert!(m1c.generation > m1b.generation);

    // The bucket deleted under the running fleet: the control plane creates
    // it again and the devices register again, with no operator step; a new
    // apply converges above every generation the devices saw before.
    js.delete_key_value("fleet").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut registered = 0;
        if let Ok(kv) = js.get_key_value("fleet").await {
            for id in ["pi-1", "pi-2", "pi-3"] {
                let id = AgentId::new(id).unwrap();
                if kv.entry(keys::inventory(&id)).await.unwrap().is_some()
                    && kv.entry(keys::actual_state(&id)).await.unwrap().is_some()
                {
                    registered += 1;
                }
            }
        }
        if registered == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet did not come back into a recreated bucket\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The operator's labels went with the bucket, like its deployments.
    for id in ["pi-1", "pi-2"] {
        ok(
            &fleet.flotilla(&["label", "agent", id, "role=kiosk"]),
            &fleet,
        );
    }
    ok(&fleet.apply(&V1.replace("hello v1", "hello again")), &fleet);
    for dev in [&pi1, &pi2] {
        assert_eq!(read(&dev.join("motd")).as_deref(), Some("hello again\n"));
    }
    let (_, m1d) = fleet.manifest("pi-1").await;
    assert!(m1d.generation > m1c.generation);
}
