//! flotilla-control's HTTP surface (docs/adr/0025) against a real fleet:
//! the probes, the bearer token, `/metrics` counting agents by liveness and
//! convergence state as they converge and as one goes Offline, a JSON 404,
//! and an address beyond loopback refused without a token.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::Fleet;
use testbed::binary;

const TOKEN: &str = "s3cret-token";

/// One HTTP/1.1 GET: the status code and the body.
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the HTTP surface");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_owned())
}

/// The address the control plane logged it listens on.
fn listening(fleet: &Fleet) -> Option<SocketAddr> {
    let log = std::fs::read_to_string(fleet.dir.path().join("control.log")).ok()?;
    let line = log.lines().find(|l| l.contains("HTTP listening"))?;
    let addr = line.split("listen=").nth(1)?.split_whitespace().next()?;
    addr.parse().ok()
}

/// The value of the sample `series` (name and labels, as printed) in a
/// metrics text, if present.
fn sample(text: &str, series: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

const HELLO: &str = "apiVersion: flotilla.dev/v1\nkind: Deployment\nname: hello\n\
    selector:\n  matchLabels: {role: kiosk}\nresources:\n  - id: motd\n    kind: File\n    \
    spec: {path: \"$ROOT/${agent.id}.motd\", content: \"hi\"}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_token_and_metrics_follow_the_fleet() {
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut fleet = Fleet::start(&[
        "--listen",
        "127.0.0.1:0",
        "--http-token-file",
        token_file.to_str().unwrap(),
        "--census-interval",
        "300ms",
    ]);
    let addr = fleet
        .wait(
            "the HTTP address in the log",
            Duration::from_secs(30),
            || listening(&fleet),
        )
        .await;

    assert_eq!(get(addr, "/healthz", None), (200, "ok\n".into()));
    let ready = fleet
        .wait("/readyz 200", Duration::from_secs(30), || {
            let (code, body) = get(addr, "/readyz", None);
            (code == 200).then_some(body)
        })
        .await;
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["role"], "acting", "{ready}");

    let (code, body) = get(addr, "/metrics", None);
    assert_eq!(code, 401, "{body}");
    assert_eq!(get(addr, "/metrics", Some("wrong")).0, 401);
    let (code, body) = get(addr, "/nope", Some(TOKEN));
    assert_eq!(code, 404);
    assert!(body.contains("no route /nope"), "{body}");

    for id in ["pi-1", "pi-2"] {
        fleet.start_agent(id, &["role=kiosk"], "300ms");
    }
    fleet.registered(&["pi-1", "pi-2"]).await;
    let out = fleet.apply(HELLO, &["--wait", "--timeout", "30s"]);
    assert!(out.status.success(), "{}", fleet.report(&out));
    let metrics = |fleet: &Fleet| {
        let (code, body) = get(addr, "/metrics", Some(TOKEN));
        assert_eq!(code, 200, "{body}\n{}", fleet.logs());
        body
    };
    let text = fleet
        .wait(
            "two agents Online and Converged in /metrics",
            Duration::from_secs(30),
            || {
                let text = metrics(&fleet);
                (sample(&text, "flotilla_agents{liveness=\"Online\"}") == Some(2)
                    && sample(&text, "flotilla_agents_by_state{state=\"Converged\"}") == Some(2))
                .then_some(text)
            },
        )
        .await;
    assert_eq!(sample(&text, "flotilla_control_acting"), Some(1), "{text}");
    assert_eq!(
        sample(&text, "flotilla_deployments{phase=\"None\"}"),
        Some(1),
        "{text}"
    );
    assert!(
        sample(&text, "flotilla_control_manifests_written_total").is_some_and(|n| n >= 2),
        "{text}"
    );
    assert!(
        text.contains("flotilla_control_pass_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("flotilla_control_kv_conflicts_total"),
        "{text}"
    );

    // One agent stops: it goes Offline in the census, never Converged.
    fleet.kill_agent("pi-2");
    fleet
        .wait("pi-2 Offline in /metrics", Duration::from_secs(30), || {
            let text = metrics(&fleet);
            (sample(&text, "flotilla_agents{liveness=\"Offline\"}") == Some(1)
                && sample(&text, "flotilla_agents_by_state{state=\"Converged\"}") == Some(1))
            .then_some(())
        })
        .await;
}

#[test]
fn an_address_beyond_loopback_needs_a_token() {
    let out = std::process::Command::new(binary("flotilla-control"))
        .args(["--nats-url", "nats://127.0.0.1:1", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--http-token-file"), "{stderr}");
}
