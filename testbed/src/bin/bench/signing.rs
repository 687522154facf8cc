//! `flotilla-bench signing [--agents 10000] [--runs 5]`: what signed
//! manifests cost. For N manifests shaped like the fleet benchmark's (one
//! File resource each), the CPU time of signing them all — what
//! flotilla-control adds to a render of the whole fleet — with one key and
//! with two (during a rotation), and of one agent verifying its manifest on
//! receipt. Medians of the runs, measured side by side in one process.

use std::time::{Duration, Instant};

use manifest_types::AgentManifest;
use manifest_types::signing::{Signer, SigningKeys, Trust};

pub(crate) fn run() -> anyhow::Result<()> {
    let n = testbed::bench_arg("--agents", 10_000);
    let runs = testbed::bench_arg("--runs", 5).max(1);
    let key = || Signer::from_seed(&Signer::generate().0).expect("a generated seed");
    let one = SigningKeys::new(vec![key()]);
    let two = SigningKeys::new(vec![key(), key()]);
    let manifests: Vec<AgentManifest> = (0..n)
        .map(|i| {
            let id = format!("a{i:05}");
            let doc = testbed::manifest_json(
                &id,
                7,
                serde_json::json!([{"id": "bench/config", "kind": "File", "spec": {
                    "path": format!("/srv/bench/{id}.conf"), "content": "update = 3\n"},
                    "source": {"deployment": "bench", "revision": 12}}]),
            );
            AgentManifest::from_json(&doc).expect("a valid manifest")
        })
        .collect();
    let time = |keys: &SigningKeys| -> (Duration, Vec<Vec<u8>>) {
        let mut out = Vec::with_capacity(n);
        let t = Instant::now();
        for m in &manifests {
            let mut m = m.clone();
            keys.sign(&mut m);
            out.push(m.to_json());
        }
        (t.elapsed(), out)
    };
    let unsigned = SigningKeys::default();
    let (mut base, mut s1, mut s2, mut v) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        base.push(time(&unsigned).0);
        let (d, signed) = time(&one);
        s1.push(d);
        s2.push(time(&two).0);
        let trust = Trust {
            keys: one.key_ids(),
            allow_unsigned: false,
        };
        let t = Instant::now();
        for bytes in &signed {
            trust.admit(bytes).expect("verifies");
        }
        v.push(t.elapsed());
    }
    let median = |mut d: Vec<Duration>| {
        d.sort();
        d[d.len() / 2]
    };
    let (base, s1, s2, v) = (median(base), median(s1), median(s2), median(v));
    let per = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6 / n as f64);
    let total = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    println!("| {n} manifests, median of {runs} | total | per manifest | ratio to unsigned |");
    println!("|---|---|---|---|");
    for (what, d) in [
        ("serialise, unsigned", base),
        ("sign with one key + serialise", s1),
        ("sign with two keys (rotation) + serialise", s2),
    ] {
        println!(
            "| {what} | {} | {} | {:.2}x |",
            total(d),
            per(d),
            d.as_secs_f64() / base.as_secs_f64()
        );
    }
    println!(
        "| verify on receipt (agent) | {} | {} | — |",
        total(v),
        per(v)
    );
    Ok(())
}
