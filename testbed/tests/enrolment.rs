//! Enrolment and per-device credentials on a real nats-server running the
//! shipped `deploy/nats/flotilla-secure.conf` with the authority `flotilla
//! auth init` made (docs/adr/0017): enrolled devices run the whole loop with
//! their own credentials; with device A's credentials, an attacker can
//! neither read B's intent nor write anything but A's own reports; the
//! operator role cannot write desired state; a revoked device is cut off at
//! once, and credentials enrolled with `--expires` stop working at expiry.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use testbed::{NatsServer, Process, SecureServer, TestPki, binary};

struct Secure {
    server: NatsServer,
    dir: tempfile::TempDir,
    pki: TestPki,
    _processes: Vec<Process>,
}

impl Secure {
    fn auth(&self) -> PathBuf {
        self.dir.path().join("authority")
    }

    fn creds(&self, name: &str) -> PathBuf {
        self.auth().join(name)
    }

    /// `--tls-ca`, `--tls-cert`, `--tls-key`: mutual TLS.
    fn tls_args(&self, cmd: &mut Command) {
        cmd.args(self.pki.client_args());
    }

    /// The CLI as an operator (operator.creds).
    fn flotilla(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(binary("flotilla"));
        cmd.args(["--nats-url", &self.server.url()])
            .arg("--creds")
            .arg(self.creds("operator.creds"));
        self.tls_args(&mut cmd);
        cmd.args(args).output().unwrap()
    }

    fn logs(&self) -> String {
        let mut s = self.server.log();
        for e in std::fs::read_dir(self.dir.path()).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|e| e == "log") {
                s += &format!(
                    "\n--- {}\n{}",
                    p.display(),
                    std::fs::read_to_string(&p).unwrap()
                );
            }
        }
        s
    }

    fn ok(&self, out: &Output) -> String {
        assert!(
            out.status.success(),
            "exit {:?}\nstdout: {}\nstderr: {}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("files")
    }

    fn start_agent(&mut self, id: &str, trusted: &str) {
        let mut cmd = Command::new(binary("flotilla-agent"));
        cmd.args(["--nats-url", &self.server.url(), "--id", id])
            .arg("--creds")
            .arg(self.dir.path().join(format!("{id}.creds")))
            .args(["--trusted-key", trusted])
            .arg("--state-dir")
            .arg(self.dir.path().join(id))
            .arg("--file-root")
            .arg(self.root())
            .args(["--resync-interval", "1s", "--heartbeat-interval", "500ms"]);
        self.tls_args(&mut cmd);
        let log = self.dir.path().join(format!("{id}.log"));
        self._processes.push(Process::spawn(cmd, &log));
    }

    async fn wait(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(
                Instant::now() < deadline,
                "timed out: {what}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Connection options with `creds` over mutual TLS (the test PKI).
async fn mutual_tls(pki: &TestPki, creds: &Path) -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::with_credentials_file(creds)
        .await
        .unwrap()
        .add_root_certificates(pki.ca.clone())
        .add_client_certificate(pki.client_cert.clone(), pki.client_key.clone())
        .require_tls(true)
}

/// A client authenticated by `creds`, recording the server's errors
/// (permission violations).
async fn client(
    url: &str,
    pki: &TestPki,
    creds: &Path,
    inbox: &str,
) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = errors.clone();
    let c = mutual_tls(pki, creds)
        .await
        .custom_inbox_prefix(inbox)
        .request_timeout(Some(Duration::from_millis(500)))
        .event_callback(move |e| {
            let seen = seen.clone();
            async move {
                match e {
                    async_nats::Event::ServerError(e) => seen.lock().unwrap().push(e.to_string()),
                    async_nats::Event::Disconnected => {
                        seen.lock().unwrap().push("disconnected".into())
                    }
                    _ => {}
                }
            }
        })
        .connect(url)
        .await
        .unwrap();
    (c, errors)
}

fn denied(errors: &Mutex<Vec<String>>, kind: &str, subject: &str) -> bool {
    let needle = format!("permissions violation for {kind} to \"{subject}\"").to_lowercase();
    errors
        .lock()
        .unwrap()
        .iter()
        .any(|e| e.to_lowercase().replace('\'', "\"").contains(&needle))
}

/// `hello` (files under `root` with `content`) as a YAML file to apply.
fn write_hello(yaml: &Path, root: &Path, content: &str) {
    let doc = HELLO
        .replace("ROOT", root.to_str().unwrap())
        .replace("CONTENT", content);
    std::fs::write(yaml, doc).unwrap();
}

const HELLO: &str = "apiVersion: flotilla.dev/v1\nkind: Deployment\nname: hello\n\
    selector:\n  matchLabels: {role: kiosk}\nresources:\n  - id: motd\n    kind: File\n    \
    spec: {path: \"ROOT/${agent.id}.motd\", content: \"CONTENT\"}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_devices_are_confined_to_their_own_subjects_and_revoked_or_expired_ones_are_cut_off()
 {
    let dir = tempfile::tempdir().unwrap();
    let SecureServer {
        server,
        pki,
        authority: auth,
        ..
    } = SecureServer::start(dir.path());
    let mut fleet = Secure {
        server,
        dir,
        pki,
        _processes: Vec::new(),
    };
    std::fs::create_dir_all(fleet.root()).unwrap();
    let (key_file, public) = testbed::signing_key(fleet.dir.path());
    let mut control = Command::new(binary("flotilla-control"));
    fleet.tls_args(&mut control);
    control
        .args(["--nats-url", &fleet.server.url()])
        .arg("--creds")
        .arg(fleet.creds("control.creds"))
        .arg("--signing-key-file")
        .arg(&key_file);
    let log = fleet.dir.path().join("control.log");
    fleet._processes.push(Process::spawn(control, &log));

    // Enrolment: credentials and the operator's labels, no server change.
    for id in ["pi-a", "pi-b"] {
        let out = fleet.dir.path().join(format!("{id}.creds"));
        let enrolled = fleet.flotilla(&[
            "agent",
            "enroll",
            id,
            "--auth-dir",
            auth.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--expires",
            "30d",
            "--label",
            "role=kiosk",
        ]);
        fleet.ok(&enrolled);
        fleet.start_agent(id, &public);
    }
    fleet
        .wait("both devices registered with their own credentials", || {
            let out = fleet.flotilla(&["get", "agents", "-o", "json"]);
            let rows: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).unwrap_or_default();
            rows.iter().filter(|r| r["inventory"].is_object()).count() == 2
        })
        .await;
    let yaml = fleet.dir.path().join("hello.yaml");
    let root = fleet.root();
    write_hello(&yaml, &root, "v1");
    fleet.ok(&fleet.flotilla(&[
        "apply",
        "-f",
        yaml.to_str().unwrap(),
        "--wait",
        "--timeout",
        "30s",
    ]));
    for id in ["pi-a", "pi-b"] {
        assert_eq!(
            std::fs::read_to_string(root.join(format!("{id}.motd"))).unwrap(),
            "v1"
        );
    }
    // The history says who applied it: the operator user of operator.creds,
    // as its JWT names it (the control plane records the revision in the
    // pass that renders it; poll, the write may trail the status).
    fleet
        .wait("the history names the operator", || {
            let out = fleet.flotilla(&["rollout", "history", "hello", "-o", "json"]);
            let lines: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).unwrap_or_default();
            lines.len() == 1 && lines[0]["by"] == "flotilla-operator"
        })
        .await;
    let table = fleet.ok(&fleet.flotilla(&["rollout", "history", "hello"]));
    assert!(
        table.lines().nth(1).is_some_and(|l| l
            .split_whitespace()
            .nth(2)
            .is_some_and(|by| by == "flotilla-operator")),
        "BY is not the operator's JWT name:\n{table}"
    );

    // TLS is required, and (verify) so is a client certificate from the CA:
    // valid credentials alone do not get in.
    let a_creds = fleet.dir.path().join("pi-a.creds");
    let plain = async_nats::ConnectOptions::with_credentials_file(a_creds.clone())
        .await
        .unwrap()
        .connect(fleet.server.url())
        .await;
    assert!(plain.is_err(), "a plain connection was accepted");
    let no_client_cert = async_nats::ConnectOptions::with_credentials_file(a_creds.clone())
        .await
        .unwrap()
        .add_root_certificates(fleet.pki.ca.clone())
        .require_tls(true)
        .connect(fleet.server.url())
        .await;
    assert!(
        no_client_cert.is_err(),
        "a client without a certificate was accepted"
    );

    // Device A's credentials, in an attacker's hands.
    let url = fleet.server.url();
    let (a, errors) = client(
        &url,
        &fleet.pki,
        &fleet.dir.path().join("pi-a.creds"),
        "_INBOX.pi-a",
    )
    .await;
    let mut js = jetstream::new(a.clone());
    js.set_timeout(Duration::from_millis(500));
    // B's manifest: direct get, subscription, a KV watch (its stream info
    // and consumer creation), a raw consumer.
    let stream = js.get_stream_no_info("KV_fleet").await.unwrap();
    assert!(
        stream
            .direct_get_last_for_subject("$KV.fleet.desired-state.pi-b")
            .await
            .is_err()
    );
    let _sub = a
        .subscribe("flotilla.fleet.desired-state.pi-b")
        .await
        .unwrap();
    let _sub_all = a.subscribe("flotilla.fleet.desired-state.>").await.unwrap();
    assert!(
        js.get_key_value("fleet").await.is_err(),
        "a KV handle needs stream info"
    );
    for subject in [
        "$JS.API.CONSUMER.CREATE.KV_fleet",
        "$JS.API.STREAM.INFO.KV_fleet",
        "$JS.API.STREAM.DELETE.KV_fleet",
        "$JS.API.STREAM.PURGE.KV_fleet",
        "$KV.fleet.actual-state.pi-b",
        "$KV.fleet-heartbeats.heartbeat.pi-b",
        "$KV.fleet.agents.pi-b",
        "$KV.fleet.desired-state.pi-a",
        "$KV.fleet.desired-state.pi-b",
        "$KV.fleet.deployments.evil",
        "$KV.fleet.values.pi-a",
        "flotilla.fleet.desired-state.pi-a",
    ] {
        a.publish(subject, Bytes::from_static(b"{}")).await.unwrap();
    }
    a.flush().await.unwrap();
    fleet
        .wait("every attempt denied by the server", || {
            [
                ("subscription", "flotilla.fleet.desired-state.pi-b"),
                ("subscription", "flotilla.fleet.desired-state.>"),
                (
                    "publish",
                    "$JS.API.DIRECT.GET.KV_fleet.$KV.fleet.desired-state.pi-b",
                ),
                ("publish", "$JS.API.STREAM.INFO.KV_fleet"),
                ("publish", "$JS.API.CONSUMER.CREATE.KV_fleet"),
                ("publish", "$JS.API.STREAM.DELETE.KV_fleet"),
                ("publish", "$JS.API.STREAM.PURGE.KV_fleet"),
                ("publish", "$KV.fleet.actual-state.pi-b"),
                ("publish", "$KV.fleet-heartbeats.heartbeat.pi-b"),
                ("publish", "$KV.fleet.agents.pi-b"),
                ("publish", "$KV.fleet.desired-state.pi-a"),
                ("publish", "$KV.fleet.desired-state.pi-b"),
                ("publish", "$KV.fleet.deployments.evil"),
                ("publish", "$KV.fleet.values.pi-a"),
                ("publish", "flotilla.fleet.desired-state.pi-a"),
            ]
            .iter()
            .all(|(kind, subject)| denied(&errors, kind, subject))
        })
        .await;
    // Nothing reached the bucket, and the fleet is as it was.
    let (control_client, _) =
        client(&url, &fleet.pki, &fleet.creds("control.creds"), "_INBOX").await;
    let kv = jetstream::new(control_client)
        .get_key_value("fleet")
        .await
        .unwrap();
    assert!(kv.get("deployments.evil").await.unwrap().is_none());
    assert!(
        kv.get("actual-state.pi-b")
            .await
            .unwrap()
            .is_some_and(|v| v.as_ref() != b"{}")
    );

    // The operator role writes deployments, never desired state.
    let (op, op_errors) = client(&url, &fleet.pki, &fleet.creds("operator.creds"), "_INBOX").await;
    op.publish("$KV.fleet.desired-state.pi-a", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    op.publish("$JS.API.STREAM.DELETE.KV_fleet", Bytes::new())
        .await
        .unwrap();
    op.publish("$KV.fleet.actual-state.pi-a", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    op.publish(
        "$KV.fleet-heartbeats.heartbeat.pi-a",
        Bytes::from_static(b"{}"),
    )
    .await
    .unwrap();
    op.flush().await.unwrap();
    fleet
        .wait("the operator role denied desired state", || {
            denied(&op_errors, "publish", "$KV.fleet.desired-state.pi-a")
                && denied(&op_errors, "publish", "$JS.API.STREAM.DELETE.KV_fleet")
                && denied(&op_errors, "publish", "$KV.fleet.actual-state.pi-a")
                && denied(&op_errors, "publish", "$KV.fleet-heartbeats.heartbeat.pi-a")
        })
        .await;

    // Revoke B: its open connection is closed, a new one refused, A keeps going.
    let (b, b_events) = client(
        &url,
        &fleet.pki,
        &fleet.dir.path().join("pi-b.creds"),
        "_INBOX.pi-b",
    )
    .await;
    let revoked = Instant::now();
    fleet.ok(&fleet.flotilla(&[
        "agent",
        "revoke",
        "pi-b",
        "--auth-dir",
        auth.to_str().unwrap(),
    ]));
    fleet
        .wait("pi-b's connection closed", || {
            b_events.lock().unwrap().iter().any(|e| e == "disconnected")
        })
        .await;
    let cut_off = revoked.elapsed();
    fleet
        .wait(
            "pi-b's agent logs that its credentials were refused",
            || {
                std::fs::read_to_string(fleet.dir.path().join("pi-b.log")).is_ok_and(|l| {
                    l.lines().any(|l| {
                        l.contains("ERROR")
                            && l.contains("the NATS server refused these credentials")
                    })
                })
            },
        )
        .await;
    drop(b);
    let again = mutual_tls(&fleet.pki, &fleet.dir.path().join("pi-b.creds"))
        .await
        .connect(&url)
        .await;
    assert!(again.is_err(), "a revoked device connects again");
    write_hello(&yaml, &root, "v2");
    fleet.ok(&fleet.flotilla(&["apply", "-f", yaml.to_str().unwrap()]));
    fleet
        .wait("pi-a converges on v2", || {
            std::fs::read_to_string(root.join("pi-a.motd")).is_ok_and(|c| c == "v2")
        })
        .await;
    assert_eq!(
        std::fs::read_to_string(root.join("pi-b.motd")).unwrap(),
        "v1",
        "pi-b is cut off"
    );
    eprintln!("revocation: connection closed {cut_off:?} after `flotilla agent revoke` started");

    // With its own credentials nothing an agent or the control plane does
    // is refused; a device given another device's credentials says so.
    let refused = "refused an operation these credentials do not allow";
    for log in ["pi-a.log", "control.log"] {
        let text = std::fs::read_to_string(fleet.dir.path().join(log)).unwrap();
        assert!(!text.contains(refused), "{log}:\n{text}");
    }
    std::fs::copy(
        fleet.dir.path().join("pi-a.creds"),
        fleet.dir.path().join("pi-x.creds"),
    )
    .unwrap();
    fleet.start_agent("pi-x", &public);
    fleet
        .wait(
            "pi-x logs that the server refuses pi-a's credentials",
            || {
                std::fs::read_to_string(fleet.dir.path().join("pi-x.log")).is_ok_and(|l| {
                    l.lines()
                        .any(|l| l.contains(refused) && l.contains("ERROR"))
                })
            },
        )
        .await;

    // Credentials issued with --expires work until then; at expiry the
    // server closes the device's connection and refuses new ones.
    let creds = fleet.dir.path().join("pi-c.creds");
    fleet.ok(&fleet.flotilla(&[
        "agent",
        "enroll",
        "pi-c",
        "--auth-dir",
        auth.to_str().unwrap(),
        "--out",
        creds.to_str().unwrap(),
        "--expires",
        "15s",
    ]));
    let (c, c_events) = client(&url, &fleet.pki, &creds, "_INBOX.pi-c").await;
    // Allowed, answered: a direct get of its own (absent) manifest.
    let own = jetstream::new(c.clone())
        .get_stream_no_info("KV_fleet")
        .await
        .unwrap()
        .direct_get_last_for_subject("$KV.fleet.desired-state.pi-c")
        .await;
    assert!(
        matches!(&own, Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound),
        "{own:?} {:?}",
        c_events.lock().unwrap()
    );
    fleet
        .wait("pi-c's connection closed at expiry", || {
            let events = c_events.lock().unwrap();
            events.iter().any(|e| e.to_lowercase().contains("expired"))
                && events.iter().any(|e| e == "disconnected")
        })
        .await;
    drop(c);
    // JWT expiry has one-second resolution: within the second of expiry the
    // server still admits a connection (and closes it at once); after it,
    // none.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let again = mutual_tls(&fleet.pki, &creds).await.connect(&url).await;
        if again.is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expired credentials still connect"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
