//! Signed manifests against a real nats-server (docs/adr/0004, 0017): an
//! agent that trusts the control plane's key converges only to manifests it
//! signed. Whoever else can write the bucket — here a raw client with full
//! write access — gets a typed rejection, and the device keeps its last good
//! manifest; a cached manifest tampered with on disk is not run.

mod common;

use bytes::Bytes;
use common::*;
use manifest_types::AgentManifest;
use manifest_types::signing::{Signer, Trust};
use serde_json::json;

fn signed(signer: &Signer, bytes: Bytes) -> Bytes {
    let mut m = AgentManifest::from_json(&bytes).unwrap();
    signer.sign(&mut m);
    Bytes::from(m.to_json())
}

fn signer() -> Signer {
    Signer::from_seed(&Signer::generate().0).unwrap()
}

#[tokio::test]
async fn only_manifests_signed_by_a_trusted_key_are_converged() {
    let h = Harness::new().await;
    let store = h.store().await;
    let control = signer();
    let good = h.root("pi-1").join("motd");
    let mut config = h.config("pi-1");
    config.trust = Trust {
        keys: vec![control.public_key()],
        allow_unsigned: false,
    };
    let agent = RunningAgent::start(config.clone());
    let v = |generation: u64, content: &str| {
        manifest("pi-1", generation, json!([file("d/motd", &good, content)]))
    };
    put_manifest(&store, "pi-1", signed(&control, v(5, "v5"))).await;
    wait_status(&store, "pi-1", "converged on 5", |s| s.converged_on(5)).await;

    let mut forged: serde_json::Value =
        serde_json::from_slice(&signed(&control, v(6, "v6"))).unwrap();
    forged["resources"][0]["spec"]["content"] = "evil".into();
    let cases: Vec<(&str, Bytes)> = vec![
        // Well-formed, unsigned, with a generation meant to exhaust the
        // control plane's: rejected, and the generation is not believed.
        ("Unsigned", v(1 << 52, "evil")),
        ("BadSignature", Bytes::from(forged.to_string())),
        ("UntrustedKey", signed(&signer(), v(7, "evil"))),
        (
            "WrongAgent",
            signed(
                &control,
                manifest("pi-2", 8, json!([file("d/motd", &good, "evil")])),
            ),
        ),
        // An older signed manifest put back: a replay.
        ("ReplayedGeneration", signed(&control, v(4, "v4"))),
    ];
    for (reason, bytes) in &cases {
        let revision = put_manifest(&store, "pi-1", bytes.clone()).await;
        let s = wait_status(&store, "pi-1", reason, |s| {
            s.rejection
                .as_ref()
                .is_some_and(|r| r.revision == revision && r.reason == *reason)
        })
        .await;
        assert_eq!(s.manifest_generation, 5, "{reason}: last good kept");
        assert!(
            s.observed_generation < 1 << 52,
            "{reason}: an unverified generation is not reported"
        );
        assert_eq!(std::fs::read_to_string(&good).unwrap(), "v5", "{reason}");
    }
    let revision = put_manifest(&store, "pi-1", signed(&control, v(9, "v9"))).await;
    wait_status(&store, "pi-1", "converged on 9", |s| {
        s.converged_on(9) && s.observed_revision == revision && s.rejection.is_none()
    })
    .await;
    assert_eq!(std::fs::read_to_string(&good).unwrap(), "v9");
    agent.stop().await;

    // The cached manifest on the device's storage is changed while the
    // agent is down (its signature kept), and the key holds something no
    // trusted key signed. The tampered cache is not run: nothing is
    // accepted, and the file keeps what the last good manifest wrote.
    let cache = h.dir.path().join("pi-1/state/manifest.json");
    let tampered = std::fs::read_to_string(&cache)
        .unwrap()
        .replace("v9", "evil");
    assert!(tampered.contains("evil") && tampered.contains("signatures"));
    std::fs::write(&cache, tampered).unwrap();
    let revision = put_manifest(&store, "pi-1", v(10, "evil")).await;
    let _agent = RunningAgent::start(config);
    let s = wait_status(&store, "pi-1", "the restarted agent's report", |s| {
        s.observed_revision == revision && s.rejection.is_some()
    })
    .await;
    assert_eq!(s.rejection.unwrap().reason, "Unsigned");
    assert_eq!(
        s.manifest_generation, 0,
        "neither the cache nor the key is accepted"
    );
    assert_eq!(std::fs::read_to_string(&good).unwrap(), "v9");
}
