//! Writes the bad-input corpus (`testbed::hostile`) as fuzzing seeds:
//! `<dir>/manifest/<n>` and `<dir>/deployment/<n>`, plus one valid document
//! of each, so the fuzzer starts from every shape the tests know.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let valid_manifest = testbed::manifest_json(
        "pi-1",
        3,
        serde_json::json!([{"id": "d/f", "kind": "File",
            "spec": {"path": "/srv/f", "content": "${x}", "mode": "0640"}}]),
    );
    let valid_deployment = serde_json::json!({"apiVersion": "flotilla.dev/v1", "kind": "Deployment",
        "name": "web", "selector": {"matchLabels": {"role": "kiosk"}, "deviceLabels": true},
        "rollout": {"canary": 1, "waves": "50%"},
        "resources": [{"id": "conf", "kind": "File",
            "spec": {"path": "/srv/${agent.id}.conf", "content": "site=${labels.site} x=${values.x}"}}]});
    let sets = [
        (
            "manifest",
            testbed::hostile::manifests("pi-1", "/srv", 6),
            valid_manifest.to_vec(),
        ),
        (
            "deployment",
            testbed::hostile::deployments("web"),
            valid_deployment.to_string().into_bytes(),
        ),
    ];
    for (target, corpus, valid) in sets {
        let out = dir.join(target);
        std::fs::create_dir_all(&out)?;
        std::fs::write(out.join("valid"), valid)?;
        for (i, (_, bytes)) in corpus.iter().enumerate() {
            std::fs::write(out.join(format!("hostile-{i:03}")), bytes)?;
        }
        println!("{}: {} seeds", out.display(), corpus.len() + 1);
    }
    Ok(())
}
