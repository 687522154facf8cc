//! The fleet harness shared by the fleet-level tests: a real nats-server,
//! `flotilla-control`, `flotilla-agent` processes sharing one file root
//! (each writes its own paths, via `${agent.id}`) and the `flotilla` CLI.
#![allow(dead_code)]

pub mod secure;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use manifest_types::BucketName;
use serde_json::Value;
use testbed::{NatsServer, Process, binary};

pub struct Fleet {
    pub server: NatsServer,
    pub dir: tempfile::TempDir,
    /// The seed files flotilla-control signs with (at start: one fresh key).
    pub control_keys: Vec<PathBuf>,
    /// The public keys agents started from now on trust (at start: that key).
    pub trusted_keys: Vec<String>,
    pub control: Option<Process>,
    pub agents: BTreeMap<String, Process>,
}

impl Fleet {
    pub fn start(control_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (seed_file, public) = testbed::signing_key(dir.path());
        let mut fleet = Self {
            server: NatsServer::start(),
            control_keys: vec![seed_file],
            trusted_keys: vec![public],
            dir,
            control: None,
            agents: BTreeMap::new(),
        };
        std::fs::create_dir_all(fleet.root()).unwrap();
        fleet.start_control(control_args);
        fleet
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("files")
    }

    pub fn start_control(&mut self, args: &[&str]) {
        self.control = Some(self.spawn_control(args, "control"));
    }

    /// Another `flotilla-control` instance on this fleet (a follower while
    /// the first holds the lease), logging to `<name>.log`.
    pub fn spawn_control(&self, args: &[&str], name: &str) -> Process {
        let mut cmd = Command::new(binary("flotilla-control"));
        cmd.args(["--nats-url", &self.server.url()]);
        for key in &self.control_keys {
            cmd.arg("--signing-key-file").arg(key);
        }
        cmd.args(args);
        Process::spawn(cmd, &self.dir.path().join(format!("{name}.log")))
    }

    pub fn restart_control(&mut self, args: &[&str]) {
        let status = self.control.take().unwrap().terminate();
        assert!(status.success(), "control stops cleanly: {status:?}");
        self.start_control(args);
    }

    pub fn start_agent(&mut self, id: &str, labels: &[&str], interval: &str) {
        let url = self.server.url();
        self.start_agent_via(&url, id, labels, interval);
    }

    /// [`Self::start_agent`] reaching NATS at `url` (a relay the test cuts).
    pub fn start_agent_via(&mut self, url: &str, id: &str, labels: &[&str], interval: &str) {
        let mut cmd = Command::new(binary("flotilla-agent"));
        cmd.args(["--nats-url", url, "--id", id])
            .arg("--state-dir")
            .arg(self.dir.path().join(id).join("state"))
            .arg("--file-root")
            .arg(self.root())
            .args(["--resync-interval", "1s", "--heartbeat-interval", interval]);
        for l in labels {
            cmd.args(["--label", l]);
        }
        for key in &self.trusted_keys {
            cmd.args(["--trusted-key", key]);
        }
        let log = self.dir.path().join(format!("{id}.log"));
        self.agents.insert(id.to_owned(), Process::spawn(cmd, &log));
        // The operator gives the device the same labels: only the
        // operator's are matched by selectors (docs/adr/0017).
        if !labels.is_empty() {
            let mut args = vec!["label", "agent", id];
            args.extend_from_slice(labels);
            let out = self.flotilla(&args);
            assert!(out.status.success(), "{}", self.report(&out));
        }
    }

    pub fn kill_agent(&mut self, id: &str) {
        self.agents.remove(id).expect("agent runs").kill();
    }

    pub fn flotilla(&self, args: &[&str]) -> Output {
        Command::new(binary("flotilla"))
            .args(["--nats-url", &self.server.url()])
            .args(args)
            .output()
            .unwrap()
    }

    /// `get agents -o json`, by agent id.
    pub fn agents_json(&self) -> BTreeMap<String, Value> {
        let out = self.flotilla(&["get", "agents", "-o", "json"]);
        if String::from_utf8_lossy(&out.stderr).contains("no fleet bucket") {
            // flotilla-control has not created it yet.
            return BTreeMap::new();
        }
        assert!(out.status.success(), "{}", self.report(&out));
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        rows.into_iter()
            .map(|r| (r["agentId"].as_str().unwrap().to_owned(), r))
            .collect()
    }

    pub fn apply(&self, yaml: &str, args: &[&str]) -> Output {
        let file = self.dir.path().join("deployment.yaml");
        std::fs::write(&file, yaml.replace("$ROOT", self.root().to_str().unwrap())).unwrap();
        let mut all = vec!["apply", "-f", file.to_str().unwrap()];
        all.extend_from_slice(args);
        self.flotilla(&all)
    }

    pub fn logs(&self) -> String {
        testbed::log_files(self.dir.path())
    }

    pub fn report(&self, out: &Output) -> String {
        format!(
            "exit {:?}\nstdout: {}\nstderr: {}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        )
    }

    /// Polls `check` until it yields a value, for at most `limit`.
    pub async fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        check: impl FnMut() -> Option<T>,
    ) -> T {
        poll(what, limit, || self.logs(), check).await
    }

    /// Waits until every agent in `ids` has registered (`agents.<id>`) and
    /// is Online.
    pub async fn registered(&self, ids: &[&str]) {
        self.wait(
            &format!("{ids:?} registered and Online"),
            Duration::from_secs(30),
            || {
                let a = self.agents_json();
                ids.iter()
                    .all(|id| {
                        field(&a, id, "inventory").is_object()
                            && field(&a, id, "liveness") == "Online"
                    })
                    .then_some(())
            },
        )
        .await
    }

    pub async fn fleet_kv(&self) -> async_nats::jetstream::kv::Store {
        let js = async_nats::jetstream::new(self.server.client().await);
        js.get_key_value(BucketName::default().as_str())
            .await
            .unwrap()
    }
}

pub fn field<'a>(agents: &'a BTreeMap<String, Value>, id: &str, f: &str) -> &'a Value {
    agents.get(id).map_or(&Value::Null, |a| &a[f])
}

/// `flotilla watch`'s stdout, line by line.
pub fn watch(fleet: &Fleet) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(binary("flotilla"))
        .args(["--nats-url", &fleet.server.url(), "watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Polls `check` every 50 ms until it yields a value; after `limit`, fails
/// naming `what`, with `logs()`.
pub async fn poll<T>(
    what: &str,
    limit: Duration,
    logs: impl Fn() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
