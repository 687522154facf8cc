//! The real Docker Engine for container tests, driven with the `docker` CLI
//! (the way an operator pokes at a device), and a local image registry.
//!
//! `scripts/test` installs docker.io, starts dockerd and builds
//! [`TEST_IMAGE`] (`ensure_docker`, `ensure_test_images` in scripts/lib.sh).
//! Tests share one engine, so each test uses agent ids of its own
//! ([`unique_agent`]) and [`Cleanup`] removes that agent's containers.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A busybox image built locally with `docker import` (no registry needed).
pub const TEST_IMAGE: &str = "flotilla-test/busybox:1";
pub use flotilla_agent::reconcile::container::{LABEL_AGENT, LABEL_RESOURCE};

/// Runs `docker args…`; panics with its stderr if it fails.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run docker {args:?}: {e} (scripts/test installs docker.io)"));
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Like [`docker`] but returns whether it succeeded.
pub fn docker_ok(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Panics with the fix when the engine or the test image is missing.
pub fn require_engine() {
    assert!(
        docker_ok(&["image", "inspect", TEST_IMAGE]),
        "the Docker Engine or the image {TEST_IMAGE} is missing: run ./scripts/test \
         (or `source scripts/lib.sh && ensure_docker && ensure_test_images`)"
    );
}

/// An agent id no other test (or earlier run) uses on this engine.
pub fn unique_agent(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One container as `docker ps -a` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub state: String,
    pub resource: String,
    pub image: String,
}

/// Containers labelled with `agent`'s id, running or not.
pub fn containers_of(agent: &str) -> Vec<Container> {
    let out = docker(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        &format!("label={LABEL_AGENT}={agent}"),
        "--format",
        &format!(
            "{{{{.ID}}}}\t{{{{.State}}}}\t{{{{.Label \"{LABEL_RESOURCE}\"}}}}\t{{{{.Image}}}}"
        ),
    ]);
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut f = l.split('\t');
            let mut next = || f.next().unwrap_or_default().to_owned();
            Container {
                id: next(),
                state: next(),
                resource: next(),
                image: next(),
            }
        })
        .collect()
}

/// `docker inspect -f <format> <id>`.
pub fn inspect(id: &str, format: &str) -> String {
    docker(&["inspect", "-f", format, id])
}

/// Removes every container of the given agents on drop (and at creation,
/// in case an earlier run left some).
#[derive(Debug)]
pub struct Cleanup(pub Vec<String>);

impl Cleanup {
    pub fn new(agents: &[&str]) -> Self {
        let c = Self(agents.iter().map(|a| a.to_string()).collect());
        c.remove_all();
        c
    }

    fn remove_all(&self) {
        for agent in &self.0 {
            for c in containers_of(agent) {
                let _ = docker_ok(&["rm", "-f", &c.id]);
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// A local image registry (Debian's `docker-registry`) on a free loopback
/// port; the engine trusts 127.0.0.0/8 registries without TLS.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-registry-")
            .tempdir()
            .expect("registry dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("docker-registry (apt install docker-registry; scripts/test does)");
        let registry = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes local image `source` as `<host>/<name>` and removes the local
    /// tag, so the engine must pull it. Returns the full reference.
    pub fn push(&self, source: &str, name: &str) -> String {
        let reference = format!("{}/{name}", self.host());
        docker(&["tag", source, &reference]);
        docker(&["push", "-q", &reference]);
        docker(&["rmi", &reference]);
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Commits a variant of the test image with a marker file, so two pushes
/// under one tag have different image ids. Returns the image id.
pub fn image_variant(tag: &str, marker: &str) -> String {
    let name = unique_agent("variant");
    docker(&[
        "run",
        "--name",
        &name,
        TEST_IMAGE,
        "sh",
        "-c",
        &format!("echo {marker} > /marker"),
    ]);
    let id = docker(&["commit", &name, tag]);
    docker(&["rm", &name]);
    id
}

/// A Unix-socket forwarder in front of the real engine socket, so a test can
/// take the engine away from an agent (and give it back) without stopping
/// dockerd for every other test. While stopped, the socket path is gone and
/// every open connection is cut.
#[derive(Debug)]
pub struct EngineProxy {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl EngineProxy {
    /// Starts forwarding from a fresh socket path to `/var/run/docker.sock`.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("proxy dir");
        let path = dir.path().join("docker.sock");
        let mut p = Self {
            path,
            _dir: dir,
            task: None,
        };
        p.resume();
        p
    }

    /// The `unix://` address to give the agent as its docker host.
    pub fn host(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Cuts every connection and removes the socket: the engine is unreachable.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }

    /// Serves the socket again.
    pub fn resume(&mut self) {
        self.stop();
        let listener = tokio::net::UnixListener::bind(&self.path).expect("bind proxy socket");
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    break;
                };
                conns.spawn(async move {
                    if let Ok(mut engine) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
            }
        }));
    }
}

impl Drop for EngineProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A registry that accepts connections and never answers: a pull from it
/// stalls until the test ends (drop closes every connection).
#[derive(Debug)]
pub struct StalledRegistry {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl StalledRegistry {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stalled registry");
        let port = listener.local_addr().expect("local addr").port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        Self { port, task }
    }

    /// An image reference on this registry.
    pub fn image(&self, name: &str) -> String {
        format!("127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for StalledRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Docker Engine socket that accepts connections and answers nothing
/// until [`StalledEngine::release`]: then every connection closes and new
/// ones are refused, as when dockerd hangs and then goes away. The number
/// of connections accepted so far tells a test the agent is waiting on it.
#[derive(Debug)]
pub struct StalledEngine {
    path: std::path::PathBuf,
    accepted: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl StalledEngine {
    /// Listens on `dir/docker.sock`.
    pub fn start(dir: &std::path::Path) -> Self {
        let path = dir.join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind stalled engine");
        let (tx, accepted) = tokio::sync::watch::channel(0);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
                tx.send_replace(held.len());
            }
        });
        Self {
            path,
            accepted,
            task,
        }
    }

    /// The agent's `docker_host` for it.
    pub fn url(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Waits until a client has connected (and is waiting for an answer).
    pub async fn connected(&self) {
        let mut accepted = self.accepted.clone();
        accepted
            .wait_for(|n| *n > 0)
            .await
            .expect("stalled engine running");
    }

    /// Closes every connection and refuses new ones.
    pub fn release(&self) {
        self.task.abort();
    }
}

impl Drop for StalledEngine {
    fn drop(&mut self) {
        self.task.abort();
    }
}
