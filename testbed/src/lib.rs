//! # testbed — real servers for Flotilla's tests and benchmarks
//!
//! [`NatsServer`] starts a real `nats-server` (JetStream on) on a free
//! loopback port with its own store directory, and kills it on drop. It can
//! be stopped and restarted on the same port and store, which is how tests
//! take the server away from a running agent.
//!
//! The design as a whole (the loop, the KV layout, who writes what, the
//! guarantees): `docs/ARCHITECTURE.md`.
//!
//! The binary comes from `$FLOTILLA_NATS_SERVER`, else the project's pinned
//! install at `target/tools/venv/bin/nats-server` (made by `scripts/test`
//! and `scripts/demo`), else `nats-server` on `PATH`.
//!
//! [`NatsServer::start_with_own_config`] runs a whole configuration (a
//! shipped one, paths replaced); [`TestPki`] makes a CA, server and client
//! certificates for TLS tests; [`hostile`] is the bad-input corpus.
//!
//! [`docker`] drives the real Docker Engine; [`device::Device`] boots a
//! "device container" with systemd as PID 1 for SystemdUnit tests.
//! [`cluster::SecureCluster`] runs the shipped 3-node cluster configuration
//! on one machine; [`relay::Relay`] is a link a test cuts and restores.

pub mod cluster;
pub mod device;
pub mod docker;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod hostile;
pub mod relay;
pub mod site;

/// The nats-server binary tests run against.
pub fn nats_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FLOTILLA_NATS_SERVER") {
        return p.into();
    }
    let pinned = workspace_root().join("target/tools/venv/bin/nats-server");
    if pinned.exists() {
        return pinned;
    }
    "nats-server".into()
}

/// The repository root (this crate lives in `<root>/testbed`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testbed has a parent dir")
        .to_path_buf()
}

/// A running nats-server with JetStream, owned by one test.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    extra_config: String,
    /// A whole configuration, `{port}` and `{store}` substituted, instead
    /// of the default one plus `extra_config`.
    own_config: Option<String>,
}

impl NatsServer {
    /// Starts a server with JetStream and no authentication.
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    /// Starts a server with `extra` appended to its config file (for example
    /// an `authorization { users = [...] }` block).
    pub fn start_with_config(extra: &str) -> Self {
        Self::launch(extra.to_owned(), None, None)
    }

    /// Starts a server from a whole configuration (a shipped one, with its
    /// paths replaced): `{port}` and `{store}` in `template` become the port
    /// and a JetStream store directory of its own.
    pub fn start_with_own_config(template: &str) -> Self {
        Self::launch(String::new(), Some(template.to_owned()), None)
    }

    /// [`Self::start_with_own_config`] on a port chosen beforehand (a
    /// cluster's nodes name each other's ports in their routes).
    pub fn start_at(port: u16, template: &str) -> Self {
        Self::launch(String::new(), Some(template.to_owned()), Some(port))
    }

    fn launch(extra_config: String, own_config: Option<String>, port: Option<u16>) -> Self {
        let mut server = Self {
            child: None,
            port: port.unwrap_or_else(free_port),
            dir: tempfile::Builder::new()
                .prefix("flotilla-nats-")
                .tempdir()
                .expect("temp dir for nats-server"),
            extra_config,
            own_config,
        };
        match port {
            Some(_) => {
                if let Err(e) = server.spawn() {
                    panic!("nats-server did not start on port {}: {e}", server.port);
                }
            }
            None => server.start_retrying(),
        }
        server
    }

    fn start_retrying(&mut self) {
        let mut last_err = String::new();
        // A port can be taken between free_port() and the bind: retry on a new one.
        for _ in 0..5 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last_err = e,
            }
            self.port = free_port();
        }
        panic!("nats-server did not start: {last_err}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let conf = self.dir.path().join("nats.conf");
        let log = self.dir.path().join("nats.log");
        let _ = std::fs::remove_file(&log);
        let store = self.dir.path().join("jetstream");
        let text = match &self.own_config {
            Some(template) => template
                .replace("{port}", &self.port.to_string())
                .replace("{store}", &store.display().to_string()),
            None => format!(
                "listen: \"127.0.0.1:{port}\"\nserver_name: flotilla-test-{port}\n\
                 jetstream {{ store_dir: {store:?} }}\n{extra}\n",
                port = self.port,
                extra = self.extra_config,
            ),
        };
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        let child = Command::new(nats_server_binary())
            .arg("-c")
            .arg(&conf)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.dir.path().join("nats.stderr"))
                    .map_err(|e| e.to_string())?,
            )
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run {} ({e}); run scripts/test, or set FLOTILLA_NATS_SERVER",
                    nats_server_binary().display()
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = read(&log);
            if text.contains("Server is ready") {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let stderr = read(&self.dir.path().join("nats.stderr"));
                return Err(format!("nats-server exited with {status}: {text}{stderr}"));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("nats-server not ready after 15 s: {text}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's log so far (useful in assertion messages).
    pub fn log(&self) -> String {
        read(&self.dir.path().join("nats.log"))
    }

    /// Kills the server; the store directory and port are kept for [`Self::restart`].
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn() {
            panic!("nats-server did not restart on port {}: {e}", self.port);
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's process id while it runs (for RSS readings).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A plain client connected to this server.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url()))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every `*.log` file in `dir`, each under a `--- <path>` line (for
/// failure messages).
pub fn log_files(dir: &Path) -> String {
    let mut s = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "log") {
            s += &format!("--- {}\n{}\n", p.display(), read(&p));
        }
    }
    s
}

/// Panics unless every non-comment line of a shipped configuration
/// rewritten for a test has lost its production paths.
pub fn assert_paths_replaced(config: &str) {
    assert!(
        config
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .all(|l| !l.contains("/etc/nats") && !l.contains("/var/lib/nats")),
        "every path replaced:\n{config}"
    );
}

/// How many compare-and-swap conflicts the control planes logging into
/// `*.log` files in `dir` met (the fault campaign's "CAS conflicts seen").
pub fn cas_conflicts(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .map(|p| read(&p).matches("compare-and-swap conflict").count())
        .sum()
}

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn read(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_restarts_and_serves_jetstream() {
        let mut server = NatsServer::start();
        let client = server.client().await;
        let js = async_nats::jetstream::new(client);
        js.create_key_value(async_nats::jetstream::kv::Config {
            bucket: "t".into(),
            ..Default::default()
        })
        .await
        .expect("JetStream is enabled");
        let port = server.port();
        server.stop();
        assert!(!server.is_running());
        server.restart();
        assert_eq!(server.port(), port);
        let js = async_nats::jetstream::new(server.client().await);
        js.get_key_value("t").await.expect("store survives restart");
    }
}

/// A built workspace binary (`target/debug/<name>`); `scripts/test` builds
/// them all before running tests.
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let path = dir.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` (scripts/test does)",
        path.display()
    );
    path
}

/// A child process killed (SIGKILL) on drop; output goes to a log file.
#[derive(Debug)]
pub struct Process {
    child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Self {
            child,
            log: log.to_owned(),
        }
    }

    /// Sends SIGTERM and waits, as systemd would on `stop`.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("wait")
    }

    /// SIGKILL: the process dies without a word, as on power loss.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn output(&self) -> String {
        read(&self.log)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command that runs `program args…` in a private mount namespace where
/// `private_dir` is bind-mounted on `mountpoint` — one machine, several
/// "devices" that each see their own files at the same path. Needs root.
pub fn in_private_mount(private_dir: &Path, mountpoint: &Path, program: &Path) -> Command {
    std::fs::create_dir_all(mountpoint).expect("mountpoint");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$1\" \"$2\" && shift 2 && exec \"$@\"")
        .arg("sh")
        .arg(private_dir)
        .arg(mountpoint)
        .arg(program);
    cmd
}

/// A manifest document as the control plane writes it, for tests and
/// benchmarks that put `desired-state.<agent>` directly.
pub fn manifest_json(agent: &str, generation: u64, resources: serde_json::Value) -> bytes::Bytes {
    bytes::Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "flotilla.dev/v1",
            "agentId": agent,
            "generation": generation,
            "resources": resources,
        }))
        .expect("a JSON value serialises"),
    )
}

/// A fresh manifest signing key for a test fleet: the seed written to
/// `dir/signing.nk` (for `flotilla-control --signing-key-file`) and the
/// public key (for `flotilla-agent --trusted-key`).
pub fn signing_key(dir: &Path) -> (PathBuf, String) {
    let (seed, public) = manifest_types::signing::Signer::generate();
    let file = dir.join("signing.nk");
    std::fs::write(&file, seed).expect("write the signing key");
    (file, public)
}

/// A benchmark's numeric option `--name N`, or `default`.
pub fn bench_arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A benchmark's list option `--name 1,2,3`, or `default` parsed the same way.
pub fn bench_list(name: &str, default: &str) -> Vec<usize> {
    let args: Vec<String> = std::env::args().collect();
    let raw = args
        .iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, String::as_str);
    raw.split(',')
        .filter_map(|v| v.trim().replace('_', "").parse().ok())
        .collect()
}

/// A throwaway PKI for TLS tests, written as PEM files into a directory:
/// a CA, a server certificate for 127.0.0.1/localhost and a client
/// certificate (for mutual TLS), all signed by the CA.
#[derive(Debug, Clone)]
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    /// `--tls-ca`, `--tls-cert` and `--tls-key` (mutual TLS) for a Flotilla
    /// program connecting to a server with this PKI.
    pub fn client_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--tls-ca".into(),
            self.ca.clone().into(),
            "--tls-cert".into(),
            self.client_cert.clone().into(),
            "--tls-key".into(),
            self.client_key.clone().into(),
        ]
    }

    pub fn generate(dir: &Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("a CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Flotilla test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("the CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, cn: &str| {
            let key = KeyPair::generate().expect("a key");
            let mut params = CertificateParams::new(names).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params
                .signed_by(&key, &issuer)
                .expect("a signed certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) =
            leaf(vec!["127.0.0.1".into(), "localhost".into()], "nats-server");
        let (client_cert, client_key) = leaf(vec!["pi-a".into()], "pi-a");
        let write = |name: &str, pem: &str| {
            let p = dir.join(name);
            std::fs::write(&p, pem).expect("write a PEM file");
            p
        };
        Self {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
        }
    }
}

/// The production layout of docs/adr/0017 on a real nats-server: `flotilla
/// auth init` writes an authority into `dir/authority`, and the shipped
/// `deploy/nats/flotilla-secure.conf` runs with its `nats-auth.conf`, the
/// test PKI's certificates and mutual TLS, on a free loopback port.
#[derive(Debug)]
pub struct SecureServer {
    pub server: NatsServer,
    pub pki: TestPki,
    /// The authority: control.creds, operator.creds, system.creds and the
    /// keys `agent enroll` / `agent revoke` need.
    pub authority: PathBuf,
    /// Where sites' leaf nodes dial in (the shipped `leafnodes` listener).
    pub leaf_port: u16,
}

impl SecureServer {
    pub fn start(dir: &Path) -> Self {
        let authority = dir.join("authority");
        let init = std::process::Command::new(binary("flotilla"))
            .args(["auth", "init", "--dir"])
            .arg(&authority)
            .arg("--resolver-dir")
            .arg(dir.join("jwt"))
            .output()
            .expect("run flotilla auth init");
        assert!(init.status.success(), "flotilla auth init: {init:?}");
        let pki = TestPki::generate(dir);
        let leaf_port = free_port();
        let shipped =
            std::fs::read_to_string(workspace_root().join("deploy/nats/flotilla-secure.conf"))
                .expect("the shipped secure config");
        let path = |p: &Path| p.to_str().expect("a UTF-8 path").to_owned();
        let config = shipped
            .replace("/etc/nats/tls/server.pem", &path(&pki.server_cert))
            .replace("/etc/nats/tls/server-key.pem", &path(&pki.server_key))
            .replace("/etc/nats/tls/ca.pem", &path(&pki.ca))
            // Mutual TLS, the shipped option.
            .replace("# verify: true", "verify: true")
            .replace("0.0.0.0:4222", "127.0.0.1:{port}")
            .replace("0.0.0.0:7422", &format!("127.0.0.1:{leaf_port}"))
            .replace("http: 127.0.0.1:8222", "")
            .replace("server_name: flotilla-1", "server_name: flotilla-{port}")
            .replace("store_dir: /var/lib/nats", "store_dir: \"{store}\"")
            .replace(
                "include \"nats-auth.conf\"",
                &std::fs::read_to_string(authority.join("nats-auth.conf"))
                    .expect("nats-auth.conf from auth init"),
            );
        assert_ne!(config, shipped, "the shipped config has its placeholders");
        Self {
            server: NatsServer::start_with_own_config(&config),
            pki,
            authority,
            leaf_port,
        }
    }

    /// `--tls-ca`, `--tls-cert` and `--tls-key` for a client of this server.
    pub fn tls_args(&self) -> Vec<std::ffi::OsString> {
        self.pki.client_args()
    }
}
