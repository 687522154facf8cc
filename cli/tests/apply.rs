//! `flotilla apply` and `flotilla delete` against a real nats-server.

mod common;

use common::*;
use manifest_types::{Deployment, keys};

#[tokio::test]
async fn apply_creates_the_typed_document_and_the_bucket() {
    let env = Env::start();
    let file = hello_yaml();
    let run = env.run(&["apply", "-f", path(&file)]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.starts_with("hello: created (revision "),
        "{run:?}"
    );

    // The bucket exists now, with the control plane's RePublish rule.
    let store = env.store().await;
    let (stored, revision) = stored_deployment(&store, "hello").await.expect("written");
    let expected = Deployment::from_json(&Deployment::to_json(
        &flotilla_cli::apply::load(&file).unwrap(),
    ))
    .unwrap();
    assert!(stored.same_intent(&expected), "{stored:?}");
    let change = stored
        .change
        .as_ref()
        .expect("apply records who changed it");
    assert!(
        change.by.as_deref().is_some_and(|b| !b.is_empty()),
        "{change:?}"
    );
    assert_eq!(stored.resources.len(), 2);
    assert!(run.stdout.contains(&format!("(revision {revision})")));

    // The stored bytes are the contract's JSON, readable by `nats kv get`.
    let raw = store
        .get(keys::deployment(&dname("hello")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(raw.as_ref(), stored.to_json().as_slice());
    let wire: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert!(wire["change"]["by"].is_string(), "{wire}");
}

#[tokio::test]
async fn reapplying_the_same_content_writes_no_new_revision() {
    let env = Env::start();
    let file = hello_yaml();
    let first = env.run(&["apply", "-f", path(&file)]);
    assert_eq!(first.code, 0, "{first:?}");
    let store = env.store().await;
    let (_, revision) = stored_deployment(&store, "hello").await.unwrap();

    let again = env.run(&["apply", "-f", path(&file)]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(
        again.stdout.trim(),
        format!("hello: unchanged (revision {revision})")
    );
    // The same document as JSON, keys reordered, is also unchanged.
    let d = flotilla_cli::apply::load(&file).unwrap();
    let json = env.file("hello.json", &String::from_utf8(d.to_json()).unwrap());
    let as_json = env.run(&["-o", "json", "apply", "-f", path(&json)]);
    assert_eq!(as_json.code, 0, "{as_json:?}");
    assert_eq!(as_json.json()["result"], "unchanged");
    assert_eq!(as_json.json()["revision"], revision);

    let key = keys::deployment(&dname("hello"));
    assert_eq!(history_len(&store, &key).await, 1);

    // A real change is an update at a new revision.
    let changed = env.file("changed.yaml", &deployment_yaml("hello", "changed\n"));
    let run = env.run(&["apply", "-f", path(&changed)]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.starts_with("hello: configured (revision "),
        "{run:?}"
    );
    let (stored, new_revision) = stored_deployment(&store, "hello").await.unwrap();
    assert!(new_revision > revision);
    assert_eq!(stored.resources.len(), 1);
    assert_eq!(history_len(&store, &key).await, 2);
}

#[tokio::test]
async fn invalid_documents_exit_2_and_write_nothing() {
    let env = Env::start();
    let store = env.store().await;
    let base = deployment_yaml("bad", "x");
    let cases = [
        (
            "bad-id.yaml",
            base.replace("id: motd", "id: Motd.Bad"),
            "invalid local resource id",
        ),
        (
            "unknown-kind.yaml",
            base.replace("kind: File", "kind: Firmware"),
            "unknown resource kind \"Firmware\"",
        ),
        (
            "bad-mode.yaml",
            base.replace("      content:", "      mode: \"0999\"\n      content:"),
            "invalid file mode",
        ),
        (
            "empty-selector.yaml",
            base.replace("  matchLabels:\n    role: kiosk\n", "  {}\n")
                .replace("selector:\n  {}", "selector: {}"),
            "selects nothing",
        ),
        (
            "relative-path.yaml",
            base.replace("/etc/flotilla-demo/motd", "etc/motd"),
            "is not absolute",
        ),
        (
            "not-yaml.yaml",
            "name: [unclosed\n".to_owned(),
            "not valid YAML",
        ),
    ];
    for (name, text, want) in cases {
        let file = env.file(name, &text);
        let run = env.run(&["apply", "-f", path(&file)]);
        assert_eq!(run.code, 2, "{name}: {run:?}");
        assert!(
            run.stderr.contains(want) && run.stderr.contains(name),
            "{name}: stderr should name the file and say {want:?}: {}",
            run.stderr
        );
        assert!(run.stdout.is_empty(), "{name}: {run:?}");
    }
    assert!(all_keys(&store).await.is_empty(), "nothing was written");

    let missing = env.run(&["apply", "-f", "/nonexistent/deploy.yaml"]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(
        missing
            .stderr
            .contains("cannot read /nonexistent/deploy.yaml")
    );
}

#[tokio::test]
async fn concurrent_applies_at_the_same_revision_one_wins_one_conflicts() {
    let env = Env::start();
    let base = env.file("v1.yaml", &deployment_yaml("race", "v1"));
    assert_eq!(env.run(&["apply", "-f", path(&base)]).code, 0);
    let store = env.store().await;

    for round in 0..3 {
        let (_, revision) = stored_deployment(&store, "race").await.unwrap();
        let rev = revision.to_string();
        let a = env.file(
            &format!("a{round}.yaml"),
            &deployment_yaml("race", &format!("a{round}")),
        );
        let b = env.file(
            &format!("b{round}.yaml"),
            &deployment_yaml("race", &format!("b{round}")),
        );
        let spawn = |f: &std::path::Path| {
            command(
                &env.url(),
                &["apply", "-f", path(f), "--expect-revision", &rev],
            )
            .output()
        };
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| spawn(&a).unwrap());
            let tb = s.spawn(|| spawn(&b).unwrap());
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let codes = (ra.status.code().unwrap(), rb.status.code().unwrap());
        let (winner, loser) = match codes {
            (0, 3) => (&a, &rb),
            (3, 0) => (&b, &ra),
            other => {
                panic!("round {round}: expected one 0 and one 3, got {other:?}: {ra:?} {rb:?}")
            }
        };
        let loser_err = String::from_utf8_lossy(&loser.stderr);
        assert!(
            loser_err.contains("conflict")
                && loser_err.contains(&format!("expected revision {rev}")),
            "{loser_err}"
        );
        assert!(loser_err.contains("nothing was written"), "{loser_err}");
        let (stored, new_revision) = stored_deployment(&store, "race").await.unwrap();
        assert!(
            stored.same_intent(&flotilla_cli::apply::load(winner).unwrap()),
            "no lost update"
        );
        assert_eq!(new_revision, revision + 1, "exactly one write");
        assert!(
            loser_err.contains(&format!("it is at revision {new_revision}")),
            "{loser_err}"
        );
    }
}

#[tokio::test]
async fn expect_revision_guards_against_stale_reads() {
    let env = Env::start();
    let v1 = env.file("v1.yaml", &deployment_yaml("guarded", "v1"));
    let v2 = env.file("v2.yaml", &deployment_yaml("guarded", "v2"));
    // 0 means "must not exist yet".
    let created = env.run(&["apply", "-f", path(&v1), "--expect-revision", "0"]);
    assert_eq!(created.code, 0, "{created:?}");
    let again = env.run(&["apply", "-f", path(&v2), "--expect-revision", "0"]);
    assert_eq!(again.code, 3, "{again:?}");
    assert!(
        again.stderr.contains("expected it not to exist"),
        "{again:?}"
    );

    let store = env.store().await;
    let (_, revision) = stored_deployment(&store, "guarded").await.unwrap();
    let stale = env.run(&[
        "apply",
        "-f",
        path(&v2),
        "--expect-revision",
        &(revision + 5).to_string(),
    ]);
    assert_eq!(stale.code, 3, "{stale:?}");
    assert!(
        stale
            .stderr
            .contains(&format!("it is at revision {revision}")),
        "{stale:?}"
    );
    let (stored, _) = stored_deployment(&store, "guarded").await.unwrap();
    assert!(stored.same_intent(&flotilla_cli::apply::load(&v1).unwrap()));

    let ok = env.run(&[
        "apply",
        "-f",
        path(&v2),
        "--expect-revision",
        &revision.to_string(),
    ]);
    assert_eq!(ok.code, 0, "{ok:?}");
    let (stored, _) = stored_deployment(&store, "guarded").await.unwrap();
    assert!(stored.same_intent(&flotilla_cli::apply::load(&v2).unwrap()));
}

#[tokio::test]
async fn delete_removes_the_key_then_reports_not_found() {
    let env = Env::start();
    let file = hello_yaml();
    assert_eq!(env.run(&["apply", "-f", path(&file)]).code, 0);
    let store = env.store().await;
    let (_, revision) = stored_deployment(&store, "hello").await.unwrap();

    let run = env.run(&["delete", "deployment", "hello"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout.trim(),
        format!("hello: deleted (was revision {revision})")
    );
    assert!(stored_deployment(&store, "hello").await.is_none());
    assert!(
        store
            .get(keys::deployment(&dname("hello")))
            .await
            .unwrap()
            .is_none()
    );

    let second = env.run(&["delete", "deployment", "hello"]);
    assert_eq!(second.code, 6, "{second:?}");
    assert!(second.stderr.contains("no deployment hello"), "{second:?}");

    // Re-creating a deleted deployment is a create again.
    let recreated = env.run(&["apply", "-f", path(&file)]);
    assert_eq!(recreated.code, 0, "{recreated:?}");
    assert!(recreated.stdout.contains("created"), "{recreated:?}");
}

#[tokio::test]
async fn connection_errors_exit_1() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let run = flotilla(&url, &["get", "agents"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("cannot connect to NATS"), "{run:?}");
    let run = flotilla(&url, &["apply", "-f", path(&hello_yaml())]);
    assert_eq!(run.code, 1, "{run:?}");
}

#[test]
fn usage_errors_exit_2_and_help_documents_exit_codes() {
    let run = flotilla("nats://127.0.0.1:1", &["apply"]);
    assert_eq!(run.code, 2, "{run:?}");
    let run = flotilla("nats://127.0.0.1:1", &["describe", "agent", "Not.Valid"]);
    assert_eq!(run.code, 2, "{run:?}");
    let help = flotilla("nats://127.0.0.1:1", &["--help"]);
    assert_eq!(help.code, 0);
    for line in ["3  conflict", "4  rejected", "5  timeout", "6  not found"] {
        assert!(help.stdout.contains(line), "{line:?} missing from --help");
    }
}

#[tokio::test]
async fn apply_reads_stdin() {
    use std::io::Write;
    let env = Env::start();
    let d = flotilla_cli::apply::load(&hello_yaml()).unwrap();
    let mut child = command(&env.url(), &["-o", "yaml", "apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&d.to_json()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let doc: serde_json::Value =
        serde_saphyr::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(doc["result"], "created");
    assert_eq!(doc["name"], "hello");
    let store = env.store().await;
    assert!(
        stored_deployment(&store, "hello")
            .await
            .unwrap()
            .0
            .same_intent(&d)
    );
}
