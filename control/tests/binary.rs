//! The `flotilla-control` binary: flags, one log line per manifest written,
//! a clean exit on SIGTERM.

mod common;

use std::process::Command;

use common::*;
use serde_json::json;
use testbed::{NatsServer, Process};

#[tokio::test]
async fn renders_logs_and_stops_cleanly_on_sigterm() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-control"));
    cmd.args(["--nats-url", &server.url()])
        .env("FLOTILLA_BUCKET", "site-a")
        .env("RUST_LOG", "info");
    let control = Process::spawn(cmd, &dir.path().join("control.log"));

    // The bucket named by the environment, with its RePublish rule.
    let js = async_nats::jetstream::new(server.client().await);
    let bucket = manifest_types::BucketName::new("site-a").unwrap();
    let store = wait_for("bucket created by the binary", || async {
        let kv = js.get_key_value("site-a").await.ok()?;
        let rule = kv.status().await.ok()?.info.config.republish?;
        (rule.destination == manifest_types::keys::republish_destination(&bucket)).then_some(kv)
    })
    .await;

    register(&store, "pi-1", json!({"role": "kiosk"})).await;
    put_deployment(
        &store,
        &deployment(
            "web",
            json!({"agents": ["pi-1"]}),
            json!([file("f", "/etc/f", "x")]),
        ),
    )
    .await;
    let (_, m) = wait_manifest(&store, "pi-1", "rendered by the binary", |m| {
        m.resources.len() == 1
    })
    .await;
    // One plain (no colour codes) line per manifest written.
    let line = format!("manifest written agent=pi-1 generation={}", m.generation);
    wait_for("log line for the manifest", || async {
        control.output().contains(&line).then_some(())
    })
    .await;

    let status = control.terminate();
    assert!(status.success(), "exit status {status:?}");
}
