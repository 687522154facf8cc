//! The shipped `deploy/systemd/flotilla-control.service` under a real
//! systemd (a device container), as the unit's header says to install it:
//! its user, the binary, `control.env` from `control.env.example`, the
//! control credentials and signing key, the client certificate for mutual
//! TLS. As its own user, with its hardening, it starts (`Type=notify`: READY once the fleet
//! view is loaded), says in `systemctl status` that it acts, holds the
//! control lease under its own pid, comes back by itself after a SIGKILL,
//! and lets the lease go when stopped.

use std::path::Path;
use std::time::{Duration, Instant};

use manifest_types::lease::ControlLease;
use manifest_types::{BucketName, keys};
use testbed::device::Device;
use testbed::{SecureServer, binary, workspace_root};

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
}

/// The lease record, read as an operator would (`nats kv get fleet-control lease`).
async fn lease(secure: &SecureServer) -> Option<ControlLease> {
    let client =
        async_nats::ConnectOptions::with_credentials_file(secure.authority.join("operator.creds"))
            .await
            .unwrap()
            .require_tls(true)
            .add_root_certificates(secure.pki.ca.clone())
            .add_client_certificate(
                secure.pki.client_cert.clone(),
                secure.pki.client_key.clone(),
            )
            .connect(secure.server.url())
            .await
            .unwrap();
    let js = async_nats::jetstream::new(client);
    let kv = js
        .get_key_value(keys::control_bucket(&BucketName::default()))
        .await
        .ok()?;
    let value = kv.get(keys::LEASE).await.ok()??;
    serde_json::from_slice(&value).ok()
}

async fn wait<T>(
    what: &str,
    context: &dyn Fn() -> String,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: {what}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_control_unit_starts_leads_restarts_and_lets_the_lease_go() {
    let dir = tempfile::tempdir().unwrap();
    let secure = SecureServer::start(dir.path());
    let (key_file, _) = testbed::signing_key(dir.path());
    let device = Device::start("control");
    let share = device.share_dir();
    let context = || {
        format!(
            "--- device\n{}\n--- control journal\n{}",
            device.diagnostics(),
            device.journal("flotilla-control.service")
        )
    };
    copy(&binary("flotilla-control"), &share.join("flotilla-control"));
    copy(
        &workspace_root().join("deploy/systemd/flotilla-control.service"),
        &share.join("flotilla-control.service"),
    );
    copy(
        &secure.authority.join("control.creds"),
        &share.join("control.creds"),
    );
    copy(&key_file, &share.join("signing.nk"));
    copy(&secure.pki.ca, &share.join("ca.pem"));
    copy(&secure.pki.client_cert, &share.join("tls.pem"));
    copy(&secure.pki.client_key, &share.join("tls-key.pem"));
    // control.env from the example: this server, one replica (one server),
    // a short lease so the test waits little.
    let example =
        std::fs::read_to_string(workspace_root().join("deploy/systemd/control.env.example"))
            .unwrap();
    let env: String = example
        .lines()
        .map(|l| match l.split_once('=') {
            Some(("FLOTILLA_NATS_URL", _)) => {
                format!(
                    "FLOTILLA_NATS_URL={}",
                    secure.server.url().replace("nats://", "tls://")
                )
            }
            Some(("FLOTILLA_REPLICAS", _)) => "FLOTILLA_REPLICAS=1".into(),
            Some(("FLOTILLA_LEASE_TTL", _)) => "FLOTILLA_LEASE_TTL=3s".into(),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(env, example, "the example has the settings to change");
    std::fs::write(share.join("control.env"), env).unwrap();
    // Mutual TLS (the server here verifies client certificates), as the
    // unit's header says.
    std::fs::write(
        share.join("control.env"),
        format!(
            "{}\nFLOTILLA_TLS_CERT=/etc/flotilla/tls.pem\nFLOTILLA_TLS_KEY=/etc/flotilla/tls-key.pem\n",
            std::fs::read_to_string(share.join("control.env")).unwrap()
        ),
    )
    .unwrap();
    let install = "set -e; cd /flotilla; \
        useradd --system --no-create-home --shell /usr/sbin/nologin flotilla; \
        install -m 0755 flotilla-control /usr/local/bin/flotilla-control; \
        install -D -m 0600 control.env /etc/flotilla/control.env; \
        install -m 0600 -o flotilla control.creds signing.nk tls.pem tls-key.pem /etc/flotilla/; \
        install -m 0644 ca.pem /etc/flotilla/ca.pem; \
        install -m 0644 flotilla-control.service /etc/systemd/system/; \
        systemctl daemon-reload; systemctl enable --now flotilla-control 2>&1";
    let (code, out) = device.exec_status(&["sh", "-c", install]);
    assert_eq!(code, 0, "install:\n{out}\n{}", context());

    // Type=notify: active once READY came.
    assert_eq!(
        device.systemctl(&["is-active", "flotilla-control.service"]),
        "active",
        "{}",
        context()
    );
    let main_pid = || -> u32 {
        device
            .systemctl(&[
                "show",
                "-p",
                "MainPID",
                "--value",
                "flotilla-control.service",
            ])
            .trim()
            .parse()
            .unwrap()
    };
    let first = main_pid();
    let held = wait("the service holds the lease", &context, async || {
        lease(&secure).await.filter(|l| l.pid == first)
    })
    .await;
    wait("systemctl status says it acts", &context, async || {
        device
            .systemctl(&[
                "show",
                "-p",
                "StatusText",
                "--value",
                "flotilla-control.service",
            ])
            .contains("acting for the fleet")
            .then_some(())
    })
    .await;
    let user = device.exec(&["stat", "-c", "%U", &format!("/proc/{first}")]);
    assert_eq!(user.trim(), "flotilla", "its own user, not root");

    // SIGKILL: systemd starts it again; the new process takes the lease once
    // the old one's expires.
    device.systemctl(&["kill", "-s", "SIGKILL", "flotilla-control.service"]);
    let next = wait("restarted and leading again", &context, async || {
        let pid = main_pid();
        (pid != 0 && pid != first).then_some(())?;
        lease(&secure)
            .await
            .filter(|l| l.pid == pid && l.instance != held.instance)
    })
    .await;
    assert_eq!(
        device.systemctl(&["is-active", "flotilla-control.service"]),
        "active"
    );

    // Stopped: the lease is let go at once, not left to expire.
    device.systemctl(&["stop", "flotilla-control.service"]);
    assert!(
        lease(&secure).await.is_none(),
        "lease still held by {next:?} after stop\n{}",
        context()
    );
}
