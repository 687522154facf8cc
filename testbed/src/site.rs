//! [`Site`]: the shipped `deploy/nats/leaf/flotilla-leaf.conf` as a site's
//! leaf node on this machine, with the `site.conf` and uplink credentials
//! `flotilla auth site` wrote, dialling a [`SecureServer`] hub through a
//! [`Relay`] the test can cut and restore.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::relay::Relay;
use crate::{NatsServer, SecureServer, binary, workspace_root};

#[derive(Debug)]
pub struct Site {
    /// The site's leaf node; devices connect to [`NatsServer::url`].
    pub server: NatsServer,
    /// The uplink, from the site to the hub's leaf-node port.
    pub uplink: Relay,
    /// What `flotilla auth site` wrote (site.conf and both creds).
    pub files: PathBuf,
}

impl Site {
    /// Issues the site `name` from the hub's authority and starts its leaf
    /// node, its account cache in `dir/<name>-jwt`.
    pub fn start(hub: &SecureServer, dir: &Path, name: &str) -> Self {
        Self::issued_by(&hub.authority, hub, dir, name)
    }

    /// [`Self::start`], the site issued by the authority in `authority`
    /// (another fleet's, to see a site whose credentials do not match).
    pub fn issued_by(authority: &Path, hub: &SecureServer, dir: &Path, name: &str) -> Self {
        let uplink = Relay::start(([127, 0, 0, 1], hub.leaf_port).into());
        let files = dir.join(name);
        let path = |p: &Path| p.to_str().expect("a UTF-8 path").to_owned();
        let out = Command::new(binary("flotilla"))
            .args(["auth", "site", name, "--dir"])
            .arg(authority)
            .arg("--out")
            .arg(&files)
            .args(["--hub", &format!("tls://127.0.0.1:{}", uplink.port())])
            .arg("--install-dir")
            .arg(&files)
            .arg("--hub-ca")
            .arg(&hub.pki.ca)
            .arg("--resolver-dir")
            .arg(dir.join(format!("{name}-jwt")))
            .output()
            .expect("run flotilla auth site");
        assert!(out.status.success(), "flotilla auth site: {out:?}");
        let site_conf =
            std::fs::read_to_string(files.join("site.conf")).expect("site.conf from auth site");
        let shipped =
            std::fs::read_to_string(workspace_root().join("deploy/nats/leaf/flotilla-leaf.conf"))
                .expect("the shipped leaf config");
        let config = shipped
            .replace("/etc/nats/tls/server.pem", &path(&hub.pki.server_cert))
            .replace("/etc/nats/tls/server-key.pem", &path(&hub.pki.server_key))
            .replace("/etc/nats/tls/ca.pem", &path(&hub.pki.ca))
            // Mutual TLS, the shipped option.
            .replace("# verify: true", "verify: true")
            .replace("0.0.0.0:4222", "127.0.0.1:{port}")
            .replace("http: 127.0.0.1:8222", "")
            .replace("store_dir: /var/lib/nats", "store_dir: \"{store}\"")
            .replace("include \"site.conf\"", &site_conf);
        crate::assert_paths_replaced(&config);
        Self {
            server: NatsServer::start_with_own_config(&config),
            uplink,
            files,
        }
    }
}
