//! [`SecureCluster`]: the shipped `deploy/nats/cluster/flotilla-cluster.conf`
//! as three nodes on one machine — each its own ports, store and resolver
//! directory, the authority `flotilla auth init` made, the test PKI for
//! client TLS and mutual TLS between the nodes.
//!
//! [`Cluster`]: three plain nodes (no TLS, no auth; JetStream with
//! `sync_interval: always`, as shipped) for benchmarks whose in-process
//! agents cannot each carry credentials.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::Store;

use crate::{NatsServer, TestPki, binary, free_port, workspace_root};

/// Three nodes of the shipped cluster configuration.
#[derive(Debug)]
pub struct SecureCluster {
    /// `nats-1`, `nats-2`, `nats-3`, in that order.
    pub nodes: Vec<NatsServer>,
    pub pki: TestPki,
    /// The authority: control.creds, operator.creds, system.creds and the
    /// keys `agent enroll` / `agent revoke` need.
    pub authority: PathBuf,
}

impl SecureCluster {
    /// Starts the three nodes (they form the cluster on their own; see
    /// [`Self::wait_formed`]).
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
        let auth = std::fs::read_to_string(authority.join("nats-auth.conf"))
            .expect("nats-auth.conf from auth init");
        let pki = TestPki::generate(dir);
        let shipped = std::fs::read_to_string(
            workspace_root().join("deploy/nats/cluster/flotilla-cluster.conf"),
        )
        .expect("the shipped cluster config");
        let example =
            std::fs::read_to_string(workspace_root().join("deploy/nats/cluster/node.conf.example"))
                .expect("the shipped node.conf example");
        let path = |p: &Path| p.to_str().expect("a UTF-8 path").to_owned();
        let client: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let nodes = (0..3)
            .map(|i| {
                // As the README says: only the node's name differs.
                let mut node =
                    example.replace("NODE_NAME: nats-1", &format!("NODE_NAME: nats-{}", i + 1));
                for (j, port) in routes.iter().enumerate() {
                    node = node.replace(
                        &format!("nats-route://nats-{}:6222", j + 1),
                        &format!("nats-route://127.0.0.1:{port}"),
                    );
                }
                let node = node
                    .replace("0.0.0.0:4222", "127.0.0.1:{port}")
                    .replace("127.0.0.1:8222", &format!("127.0.0.1:{}", free_port()))
                    .replace("0.0.0.0:6222", &format!("127.0.0.1:{}", routes[i]))
                    .replace("0.0.0.0:7422", &format!("127.0.0.1:{}", free_port()))
                    .replace("/var/lib/nats", "{store}");
                let config = shipped
                    .replace("include \"node.conf\"", &node)
                    .replace("/etc/nats/tls/server.pem", &path(&pki.server_cert))
                    .replace("/etc/nats/tls/server-key.pem", &path(&pki.server_key))
                    .replace("/etc/nats/tls/ca.pem", &path(&pki.ca))
                    // Mutual TLS for clients too, the shipped option.
                    .replace("# verify: true", "verify: true")
                    .replace(
                        "include \"nats-auth.conf\"",
                        &auth.replace(
                            &path(&dir.join("jwt")),
                            &path(&dir.join(format!("jwt-{}", i + 1))),
                        ),
                    );
                crate::assert_paths_replaced(&config);
                NatsServer::start_at(client[i], &config)
            })
            .collect();
        Self {
            nodes,
            pki,
            authority,
        }
    }

    /// Every node's URL, comma-separated (what clients are given).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node named `name` (`nats-2`).
    pub fn node(&self, name: &str) -> usize {
        name.strip_prefix("nats-")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=3).contains(n))
            .map(|n| n - 1)
            .unwrap_or_else(|| panic!("{name} is not a node of this cluster"))
    }

    /// A client of node `i` with the credentials `creds` (a file of the
    /// authority) and mutual TLS.
    pub async fn client(&self, i: usize, creds: &str) -> async_nats::Client {
        self.client_of(&self.nodes[i].url(), creds).await
    }

    /// A client of `urls` with the credentials `creds` (a file of the
    /// authority) and mutual TLS.
    pub async fn client_of(&self, urls: &str, creds: &str) -> async_nats::Client {
        let addrs: Vec<async_nats::ServerAddr> = urls
            .split(',')
            .map(|u| u.parse().expect("a server address"))
            .collect();
        async_nats::ConnectOptions::with_credentials_file(self.authority.join(creds))
            .await
            .expect("a credentials file")
            .require_tls(true)
            .add_root_certificates(self.pki.ca.clone())
            .add_client_certificate(self.pki.client_cert.clone(), self.pki.client_key.clone())
            .connect(addrs)
            .await
            .unwrap_or_else(|e| panic!("connect to {urls} with {creds}: {e}"))
    }

    /// Waits until the nodes have formed a cluster with a JetStream meta
    /// leader that answers the fleet account (at most `limit`).
    pub async fn wait_formed(&self, limit: Duration) {
        let client = self.client(0, "control.creds").await;
        let js = async_nats::jetstream::new(client);
        let deadline = Instant::now() + limit;
        loop {
            // Answered by the meta leader once there is one.
            if js.query_account().await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not form in {limit:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The name of the node leading stream `stream` now, if any.
    pub async fn stream_leader(&self, stream: &str) -> Option<String> {
        let client = self.client_of(&self.urls(), "control.creds").await;
        let js = async_nats::jetstream::new(client);
        let mut s = js.get_stream(stream).await.ok()?;
        s.info().await.ok()?.cluster.as_ref()?.leader.clone()
    }

    /// Every node's log.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- nats-{}\n{}", i + 1, n.log()))
            .collect()
    }
}

/// Three plain nodes of one JetStream cluster on one machine: no TLS and no
/// authentication, JetStream with `sync_interval: always` (as every shipped
/// configuration), routes between all three. For benchmarks; the shipped
/// production layout is [`SecureCluster`].
#[derive(Debug)]
pub struct Cluster {
    /// `bench-1`, `bench-2`, `bench-3`, in that order.
    pub nodes: Vec<NatsServer>,
}

impl Cluster {
    /// Starts the three nodes (they form the cluster on their own; see
    /// [`Self::wait_formed`]).
    ///
    /// Their ports are chosen below the kernel's range of ephemeral ports:
    /// a port [`free_port`] found free can be taken by an outgoing
    /// connection (the first nodes' routes, thousands of clients) before
    /// the last node binds it.
    pub fn start() -> Self {
        let mut ports = listen_ports(6).into_iter();
        let client: Vec<u16> = ports.by_ref().take(3).collect();
        let routes: Vec<u16> = ports.collect();
        let all = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let nodes = (0..3)
            .map(|i| {
                let config = format!(
                    "listen: 127.0.0.1:{{port}}\n\
                     server_name: bench-{n}\n\
                     jetstream {{ store_dir: \"{{store}}\", sync_interval: always }}\n\
                     cluster {{\n  name: bench\n  listen: 127.0.0.1:{route}\n  routes: [{all}]\n}}\n",
                    n = i + 1,
                    route = routes[i],
                );
                NatsServer::start_at(client[i], &config)
            })
            .collect();
        Self { nodes }
    }

    /// Every node's URL, comma-separated (what clients are given).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client given every node's URL.
    pub async fn client(&self) -> async_nats::Client {
        let addrs: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .map(|n| n.url().parse().expect("a server address"))
            .collect();
        async_nats::connect(addrs)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.urls()))
    }

    /// Waits until the nodes have formed a cluster whose JetStream meta
    /// leader answers (at most `limit`).
    pub async fn wait_formed(&self, limit: Duration) {
        let js = async_nats::jetstream::new(self.client().await);
        let deadline = Instant::now() + limit;
        // Answered by the meta leader once there is one.
        while js.query_account().await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the cluster did not form in {limit:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until KV bucket `bucket` exists (someone else creates it) and
    /// answers a get: a freshly created replicated bucket answers direct
    /// gets only once its replicas are up (at most `limit`).
    pub async fn wait_bucket(&self, bucket: &str, limit: Duration) -> Store {
        let js = async_nats::jetstream::new(self.client().await);
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(store) = js.get_key_value(bucket).await
                && store.get("flotilla-bench-probe").await.is_ok()
            {
                return store;
            }
            assert!(
                Instant::now() < deadline,
                "bucket {bucket} did not answer in {limit:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Each node's process id (for RSS and CPU readings), in node order.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .map(|n| n.pid().expect("every node runs"))
            .collect()
    }

    /// Every node's log.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- bench-{}\n{}", i + 1, n.log()))
            .collect()
    }
}

/// `n` distinct loopback ports nobody listens on now, below the kernel's
/// ephemeral range (`net.ipv4.ip_local_port_range`), so no outgoing
/// connection is given one of them meanwhile; [`free_port`]s if that range
/// leaves no room below it.
fn listen_ports(n: usize) -> Vec<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low <= 11000 {
        return (0..n).map(|_| free_port()).collect();
    }
    // Start somewhere new each time (no two runs at once in the same
    // place), then walk the range for ports that bind.
    let span = u32::from(low) - 10000;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let mut ports = Vec::with_capacity(n);
    for step in 0..span {
        if ports.len() == n {
            break;
        }
        let port = (10000 + (seed.wrapping_add(step.wrapping_mul(7919)) % span)) as u16;
        if !ports.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    assert_eq!(ports.len(), n, "{n} free ports below {low}");
    ports
}
