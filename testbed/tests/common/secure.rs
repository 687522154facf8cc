//! The harness of the tests that run the production auth layout (the
//! authority of `flotilla auth init`, enrolled devices, signed manifests,
//! mutual TLS) on more than one server: a 3-node cluster, a hub and a site.
//! [`Servers`] is what such a layout offers the harness; [`SecureFleet`]
//! runs `flotilla-control`, enrolled agents and the operator's CLI on it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use testbed::cluster::SecureCluster;
use testbed::{Process, TestPki, binary};

/// Servers running the production auth layout.
pub trait Servers {
    /// Where the control plane and operators connect (comma-separated).
    fn urls(&self) -> String;
    /// Every server's log, for failure messages.
    fn logs(&self) -> String;
    /// The authority `flotilla auth init` made.
    fn authority(&self) -> &Path;
    fn pki(&self) -> &TestPki;
}

impl Servers for SecureCluster {
    fn urls(&self) -> String {
        SecureCluster::urls(self)
    }

    fn logs(&self) -> String {
        SecureCluster::logs(self)
    }

    fn authority(&self) -> &Path {
        &self.authority
    }

    fn pki(&self) -> &TestPki {
        &self.pki
    }
}

pub struct SecureFleet<S> {
    pub servers: S,
    pub dir: tempfile::TempDir,
    /// The public key agents trust; the control plane signs with its seed.
    pub trusted: String,
    key_file: PathBuf,
    pub processes: Vec<Process>,
}

impl<S: Servers> SecureFleet<S> {
    /// A fleet on `servers` (started in `dir`), with a fresh signing key.
    pub fn new(dir: tempfile::TempDir, servers: S) -> Self {
        let (key_file, trusted) = testbed::signing_key(dir.path());
        let fleet = Self {
            servers,
            dir,
            trusted,
            key_file,
            processes: Vec::new(),
        };
        std::fs::create_dir_all(fleet.root()).unwrap();
        fleet
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("files")
    }

    /// A file of the authority (`control.creds`, `operator.creds`, …).
    pub fn creds(&self, name: &str) -> PathBuf {
        self.servers.authority().join(name)
    }

    /// `flotilla-control` signing with the fleet's key, plus `args`, logging
    /// to `control.log`.
    pub fn start_control(&mut self, args: &[&str]) {
        let mut control = Command::new(binary("flotilla-control"));
        control
            .args(["--nats-url", &self.servers.urls()])
            .arg("--creds")
            .arg(self.creds("control.creds"))
            .arg("--signing-key-file")
            .arg(&self.key_file)
            .args(self.servers.pki().client_args())
            .args(args);
        let log = self.dir.path().join("control.log");
        self.processes.push(Process::spawn(control, &log));
    }

    /// The CLI as an operator, through `urls`.
    pub fn flotilla_via(&self, urls: &str, args: &[&str]) -> Output {
        Command::new(binary("flotilla"))
            .args(["--nats-url", urls])
            .arg("--creds")
            .arg(self.creds("operator.creds"))
            .args(self.servers.pki().client_args())
            .args(args)
            .output()
            .unwrap()
    }

    pub fn flotilla(&self, args: &[&str]) -> Output {
        self.flotilla_via(&self.servers.urls(), args)
    }

    pub fn ok(&self, out: &Output) -> String {
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

    pub fn logs(&self) -> String {
        format!(
            "{}\n{}",
            self.servers.logs(),
            testbed::log_files(self.dir.path())
        )
    }

    /// The credentials `start_agent` enrolled `id` with.
    pub fn device_creds(&self, id: &str) -> PathBuf {
        self.dir.path().join(format!("{id}.creds"))
    }

    /// Enrols `id` (label role=kiosk) and starts its agent on `urls`,
    /// resyncing every second.
    pub fn start_agent(&mut self, id: &str, urls: &str) {
        self.start_agent_resyncing(id, urls, "1s");
    }

    /// [`Self::start_agent`] with a resync interval of `resync`.
    pub fn start_agent_resyncing(&mut self, id: &str, urls: &str, resync: &str) {
        self.ok(&self.flotilla(&[
            "agent",
            "enroll",
            id,
            "--auth-dir",
            self.servers.authority().to_str().unwrap(),
            "--out",
            self.device_creds(id).to_str().unwrap(),
            "--label",
            "role=kiosk",
        ]));
        let mut cmd = Command::new(binary("flotilla-agent"));
        cmd.args(["--nats-url", urls, "--id", id])
            .arg("--creds")
            .arg(self.device_creds(id))
            .args(["--trusted-key", &self.trusted])
            .arg("--state-dir")
            .arg(self.dir.path().join(id))
            .arg("--file-root")
            .arg(self.root())
            .args(["--resync-interval", resync, "--heartbeat-interval", "500ms"])
            .args(self.servers.pki().client_args());
        let log = self.dir.path().join(format!("{id}.log"));
        self.processes.push(Process::spawn(cmd, &log));
    }

    pub fn agent_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{id}.log"))).unwrap_or_default()
    }

    /// Polls `check` until it yields a value, for at most `limit`.
    pub async fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        check: impl FnMut() -> Option<T>,
    ) -> T {
        super::poll(what, limit, || self.logs(), check).await
    }

    /// Applies `hello`: one File per kiosk with `content`, and `rollout`
    /// (a `rollout: {…}` line, or nothing).
    pub fn apply(&self, content: &str, rollout: &str, args: &[&str]) -> Output {
        let yaml = self.dir.path().join("hello.yaml");
        std::fs::write(
            &yaml,
            format!(
                "apiVersion: flotilla.dev/v1\nkind: Deployment\nname: hello\n\
                 selector:\n  matchLabels: {{role: kiosk}}\n{rollout}resources:\n  - id: motd\n    kind: File\n    \
                 spec: {{path: \"{}/${{agent.id}}.motd\", content: \"{content}\"}}\n",
                self.root().display()
            ),
        )
        .unwrap();
        let mut all = vec!["apply", "-f", yaml.to_str().unwrap()];
        all.extend_from_slice(args);
        self.flotilla(&all)
    }

    /// What each of `ids` has in its file.
    pub fn files(&self, ids: &[&str]) -> Vec<String> {
        ids.iter()
            .map(|id| {
                std::fs::read_to_string(self.root().join(format!("{id}.motd"))).unwrap_or_default()
            })
            .collect()
    }

    /// `flotilla get agents -o json` through `urls`, by agent id.
    pub fn agents_via(&self, urls: &str) -> Option<BTreeMap<String, Value>> {
        let out = self.flotilla_via(urls, &["get", "agents", "-o", "json"]);
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).ok()?;
        Some(
            rows.into_iter()
                .filter_map(|r| Some((r["agentId"].as_str()?.to_owned(), r)))
                .collect(),
        )
    }
}
