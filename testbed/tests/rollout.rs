//! Staged rollouts and revisions with the built binaries (issue 10,
//! docs/adr/0016): a real nats-server, `flotilla-control`, `flotilla-agent`
//! processes and the `flotilla` CLI. Each agent writes its own file
//! (`$ROOT/<id>.motd`), so what every device runs is read off the disk.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::Fleet;
use serde_json::Value;

const AGENTS: [&str; 4] = ["pi-1", "pi-2", "pi-3", "pi-4"];

/// The `hello` deployment writing `content` to each agent's file (a path
/// outside the file root when `content` is "BROKEN": that fails on every
/// agent it reaches), with `policy` as its rollout block.
fn hello(content: &str, policy: &str) -> String {
    let path = if content == "BROKEN" {
        "/proc/flotilla-no-such-dir/${agent.id}.motd"
    } else {
        "$ROOT/${agent.id}.motd"
    };
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Deployment\nname: hello\n\
         selector:\n  matchLabels: {{role: kiosk}}\n\
         resources:\n  - id: motd\n    kind: File\n    spec: {{path: \"{path}\", content: \"{content}\\n\"}}\n\
         {policy}\n"
    )
}

async fn fleet_of(ids: &[&str]) -> Fleet {
    let mut fleet = Fleet::start(&[]);
    for id in ids {
        fleet.start_agent(id, &["role=kiosk"], "300ms");
    }
    fleet.registered(ids).await;
    fleet
}

/// What each agent's file holds now (None: no file).
fn files(fleet: &Fleet) -> BTreeMap<String, Option<String>> {
    AGENTS
        .iter()
        .chain(["pi-5"].iter())
        .map(|id| {
            let text = std::fs::read_to_string(fleet.root().join(format!("{id}.motd"))).ok();
            (id.to_string(), text.map(|t| t.trim().to_owned()))
        })
        .collect()
}

fn count(files: &BTreeMap<String, Option<String>>, content: &str) -> usize {
    files
        .values()
        .filter(|c| c.as_deref() == Some(content))
        .count()
}

/// `flotilla rollout status hello -o json` (printed whatever the exit code).
fn rollout(fleet: &Fleet) -> Value {
    rollout_of(fleet, "hello")
}

fn rollout_of(fleet: &Fleet, name: &str) -> Value {
    let out = fleet.flotilla(&["rollout", "status", name, "-o", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The revision of `hello` each agent's manifest carries, and whether the
/// agent reports it Ready at that revision.
async fn revisions(fleet: &Fleet, ids: &[&str]) -> BTreeMap<String, (u64, bool)> {
    revisions_of(fleet, ids, "hello/motd").await
}

/// The revision of `resource`'s deployment each agent's manifest carries,
/// and whether the agent reports `resource` Ready at that revision.
async fn revisions_of(
    fleet: &Fleet,
    ids: &[&str],
    resource: &str,
) -> BTreeMap<String, (u64, bool)> {
    let kv = fleet.fleet_kv().await;
    let mut out = BTreeMap::new();
    for id in ids {
        let json = |key: String| {
            let kv = kv.clone();
            async move {
                kv.get(key)
                    .await
                    .unwrap()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .unwrap_or(Value::Null)
            }
        };
        let m = json(format!("desired-state.{id}")).await;
        let rev = m["resources"][0]["source"]["revision"]
            .as_u64()
            .unwrap_or(0);
        let s = json(format!("actual-state.{id}")).await;
        let r = &s["resources"][resource];
        let ready = r["state"] == "ready" && r["source"]["revision"].as_u64() == Some(rev);
        out.insert(id.to_string(), (rev, ready));
    }
    out
}

fn ok(fleet: &Fleet, out: &std::process::Output) {
    assert!(out.status.success(), "{}", fleet.report(out));
}

/// A first deployment and an update each go canary first, then wave by
/// wave, each wave only after the one before converged and soaked; the
/// history lists both revisions with who and what; `diff` shows what a
/// file would change and how many agents it reaches; `undo` restores the
/// first revision as a new one.
#[tokio::test]
async fn waves_follow_the_canary_once_it_is_healthy_and_undo_restores_a_revision() {
    let fleet = fleet_of(&AGENTS).await;
    let policy = "rollout: {canary: 1, waves: 2, soak: 2s}";
    let out = fleet.apply(&hello("v1", policy), &["--wait", "--timeout", "60s"]);
    ok(&fleet, &out);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("wave 3/3"), "{printed}");
    assert_eq!(count(&files(&fleet), "v1"), 4);
    let r = rollout(&fleet);
    assert_eq!(r["phase"], "Complete", "{r}");
    assert_eq!(r["waves"], 3);
    let listed = fleet.flotilla(&["get", "deployments"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("Complete 3/3"), "{listed}");
    let described = fleet.flotilla(&["describe", "deployment", "hello"]);
    let described = String::from_utf8_lossy(&described.stdout);
    assert!(
        described.contains("Rollout:      Complete from nothing; wave 3/3; 4 updated / 4 healthy"),
        "{described}"
    );

    // The update: while the canary soaks, exactly one agent runs v2.
    let out = fleet.apply(&hello("v2", policy), &[]);
    ok(&fleet, &out);
    let soaking = fleet
        .wait("the canary on v2", Duration::from_secs(30), || {
            let f = files(&fleet);
            (count(&f, "v2") >= 1).then_some(f)
        })
        .await;
    assert_eq!(count(&soaking, "v2"), 1, "{soaking:?}");
    assert_eq!(count(&soaking, "v1"), 3, "{soaking:?}");
    let r = rollout(&fleet);
    assert_eq!(r["wave"], 1, "{r}");
    assert_eq!(r["counts"][r["from"].to_string()]["desired"], 3, "{r}");
    // Nobody else moves before the canary has soaked for 2 s.
    let canary_at = Instant::now();
    fleet
        .wait("a second agent on v2", Duration::from_secs(30), || {
            (count(&files(&fleet), "v2") >= 2).then_some(())
        })
        .await;
    assert!(
        canary_at.elapsed() >= Duration::from_millis(1500),
        "the next wave came {:?} after the canary converged",
        canary_at.elapsed()
    );
    fleet
        .wait("every agent on v2", Duration::from_secs(30), || {
            (count(&files(&fleet), "v2") == 4).then_some(())
        })
        .await;
    fleet
        .wait("the rollout complete", Duration::from_secs(10), || {
            (rollout(&fleet)["phase"] == "Complete").then_some(())
        })
        .await;

    // diff: a change, an addition and a removal, with the agents reached.
    let next = hello("v3", policy).replace(
        "  - id: motd",
        "  - id: extra\n    kind: File\n    spec: {path: \"$ROOT/${agent.id}.extra\", content: \"x\"}\n  - id: motd",
    );
    let file = fleet.dir.path().join("next.yaml");
    std::fs::write(&file, next.replace("$ROOT", fleet.root().to_str().unwrap())).unwrap();
    let out = fleet.flotilla(&["diff", "-f", file.to_str().unwrap()]);
    ok(&fleet, &out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("+ extra  (added on 4 agents)"), "{text}");
    assert!(text.contains("~ motd  (changed on 4 agents)"), "{text}");
    assert!(
        text.contains("spec.content: \"v2\\n\" -> \"v3\\n\""),
        "{text}"
    );
    let out = fleet.flotilla(&["diff", "-f", file.to_str().unwrap(), "-o", "json"]);
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["added"], serde_json::json!(["extra"]));
    assert_eq!(d["agentsSelected"], 4);

    // History: both revisions, newest current, with a summary.
    let out = fleet.flotilla(&["rollout", "history", "hello", "-o", "json"]);
    ok(&fleet, &out);
    let h: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(h.len(), 2, "{h:?}");
    assert_eq!(h[1]["current"], true);
    assert_eq!(h[1]["summary"], "~motd (spec.content)");
    assert!(h[0]["appliedAt"].as_str().unwrap().ends_with('Z'), "{h:?}");
    assert!(h[0]["by"].is_string(), "{h:?}");
    let first = h[0]["revision"].as_u64().unwrap();

    // Undo: revision 1's document as a new revision; history is kept.
    let out = fleet.flotilla(&["rollout", "undo", "hello"]);
    ok(&fleet, &out);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("revision {first} restored")),
        "{said}"
    );
    fleet
        .wait("every agent back on v1", Duration::from_secs(60), || {
            (count(&files(&fleet), "v1") == 4).then_some(())
        })
        .await;
    let out = fleet.flotilla(&["rollout", "history", "hello", "-o", "json"]);
    let h: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(h.len(), 3, "{h:?}");
    assert!(
        h[2]["summary"]
            .as_str()
            .unwrap()
            .contains("undo to revision"),
        "{h:?}"
    );
}

/// A revision that fails on the canary halts the rollout (`apply --wait`
/// exits 8) with nobody else moved; `resume` while it still fails halts it
/// again. Under the fleet's default policy with `onFailure: rollback` the
/// canary returns to the last good revision (exit 9) while nobody else ever
/// left it.
#[tokio::test]
async fn a_failing_canary_halts_or_rolls_back_while_nobody_else_moves() {
    let fleet = fleet_of(&AGENTS).await;
    let out = fleet.apply(&hello("good", ""), &["--wait", "--timeout", "60s"]);
    ok(&fleet, &out);
    assert_eq!(count(&files(&fleet), "good"), 4);
    let good = revisions(&fleet, &AGENTS).await["pi-1"].0;

    let out = fleet.apply(
        &hello("BROKEN", "rollout: {canary: 1}"),
        &["--wait", "--timeout", "60s"],
    );
    assert_eq!(out.status.code(), Some(8), "{}", fleet.report(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("halted at wave 1/2"), "{err}");
    let r = rollout(&fleet);
    assert_eq!(r["phase"], "Halted", "{r}");
    assert_eq!(r["failed"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["from"], good, "{r}");
    // The other three never left the good revision.
    let on = revisions(&fleet, &AGENTS).await;
    let still: Vec<_> = on
        .values()
        .filter(|(rev, ready)| *rev == good && *ready)
        .collect();
    assert_eq!(still.len(), 3, "{on:?}");
    let out = fleet.flotilla(&["rollout", "status", "hello"]);
    assert_eq!(out.status.code(), Some(8), "{}", fleet.report(&out));

    // Resumed while the canary still fails: halted again.
    let halted = fleet.flotilla(&["rollout", "resume", "hello"]);
    ok(&fleet, &halted);
    fleet
        .wait("halted again", Duration::from_secs(20), || {
            let r = rollout(&fleet);
            (r["phase"] == "Halted" && r["controlRevision"].as_u64() > Some(0)).then_some(())
        })
        .await;
    let on = revisions(&fleet, &AGENTS).await;
    assert_eq!(
        on.values().filter(|(rev, _)| *rev == good).count(),
        3,
        "{on:?}"
    );

    // The fleet's default policy, for a revision that carries none.
    let policy = fleet.dir.path().join("policy.yaml");
    std::fs::write(&policy, "canary: 1\nonFailure: rollback\n").unwrap();
    ok(
        &fleet,
        &fleet.flotilla(&["rollout", "default", "--set", policy.to_str().unwrap()]),
    );
    let shown = fleet.flotilla(&["rollout", "default", "-o", "json"]);
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["onFailure"], "rollback", "{shown}");
    let out = fleet.apply(&hello("BROKEN", ""), &["--wait", "--timeout", "60s"]);
    assert_eq!(out.status.code(), Some(9), "{}", fleet.report(&out));
    let r = rollout(&fleet);
    assert_eq!(r["phase"], "RolledBack", "{r}");
    // The canary back on the good revision and Ready there, with everyone.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let on = revisions(&fleet, &AGENTS).await;
        if on.values().all(|&(rev, ready)| rev == good && ready) {
            break;
        }
        assert!(Instant::now() < deadline, "{on:?}\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pause holds a rollout at its wave through a control-plane restart (no
/// wave repeated or skipped); a device joining mid-rollout gets the
/// revision its wave is on; resume finishes it; an Offline agent is
/// counted and reported, never waited for, and catches up when it returns.
#[tokio::test]
async fn pause_survives_a_restart_offline_agents_are_counted_and_catch_up() {
    let mut fleet = fleet_of(&AGENTS).await;
    let out = fleet.apply(&hello("v1", ""), &["--wait", "--timeout", "60s"]);
    ok(&fleet, &out);
    fleet.kill_agent("pi-4");
    fleet
        .wait("pi-4 Offline", Duration::from_secs(20), || {
            (common::field(&fleet.agents_json(), "pi-4", "liveness") == "Offline").then_some(())
        })
        .await;

    // Paused before the revision lands: its rollout starts paused.
    ok(&fleet, &fleet.flotilla(&["rollout", "pause", "hello"]));
    let policy = "rollout: {canary: 1, waves: 1}";
    ok(&fleet, &fleet.apply(&hello("v2", policy), &[]));
    fleet
        .wait("paused", Duration::from_secs(20), || {
            (rollout(&fleet)["phase"] == "Paused").then_some(())
        })
        .await;

    fleet.restart_control(&[]);
    fleet.start_agent("pi-5", &["role=kiosk"], "300ms");
    fleet.registered(&["pi-5"]).await;
    let r = fleet
        .wait("pi-5 rendered", Duration::from_secs(30), || {
            let f = files(&fleet);
            f["pi-5"].is_some().then_some(rollout(&fleet))
        })
        .await;
    assert_eq!(r["phase"], "Paused", "{r}");
    assert_eq!(r["wave"], 1, "no wave released while paused: {r}");
    // pi-5 joined at a wave not yet released: the previous revision, like
    // every other agent, and the status says so.
    let f = files(&fleet);
    assert_eq!(f["pi-5"].as_deref(), Some("v1"), "{f:?}\n{}", fleet.logs());
    assert_eq!(count(&f, "v2"), 0, "paused: nobody moved: {f:?}");
    let kv = fleet.fleet_kv().await;
    let status: Value =
        serde_json::from_slice(&kv.get("deployment-status.hello").await.unwrap().unwrap()).unwrap();
    assert!(status["heldBack"].get("pi-5").is_some(), "{status}");

    ok(&fleet, &fleet.flotilla(&["rollout", "resume", "hello"]));
    let out = fleet.apply(&hello("v2", policy), &["--wait", "--timeout", "60s"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "pi-4 is Offline: {}",
        fleet.report(&out)
    );
    let r = rollout(&fleet);
    assert_eq!(r["phase"], "Complete", "{r}");
    assert!(
        r["offline"].as_array().unwrap().iter().any(|a| a == "pi-4"),
        "{r}"
    );
    let f = files(&fleet);
    assert_eq!(count(&f, "v2"), 4, "every live agent on v2: {f:?}");

    fleet.start_agent("pi-4", &["role=kiosk"], "300ms");
    fleet
        .wait("pi-4 caught up", Duration::from_secs(30), || {
            (files(&fleet)["pi-4"].as_deref() == Some("v2")).then_some(())
        })
        .await;
}

/// A container that crash-loops on the canary: the agent puts its previous
/// container back (ReplaceFailed), the rollout sees the canary Degraded and
/// rolls back (`apply --wait` exits 9); the canary returns to the good
/// revision and every device runs exactly one container of it, while
/// nobody else ever left it.
#[tokio::test]
async fn a_container_crash_looping_on_the_canary_rolls_the_rollout_back() {
    testbed::docker::require_engine();
    let ids: Vec<String> = (0..3)
        .map(|_| testbed::docker::unique_agent("ro"))
        .collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let _cleanup = testbed::docker::Cleanup::new(&ids);
    let fleet = fleet_of(&ids).await;
    let app = |command: &str, policy: &str| {
        format!(
            "apiVersion: flotilla.dev/v1\nkind: Deployment\nname: app\n\
             selector:\n  matchLabels: {{role: kiosk}}\n\
             resources:\n  - id: web\n    kind: Container\n    \
             spec: {{image: \"{}\", command: [sh, -c, \"{command}\"]}}\n{policy}\n",
            testbed::docker::TEST_IMAGE
        )
    };
    let sleeper = "trap 'exit 0' TERM; sleep 3600 & wait";
    ok(
        &fleet,
        &fleet.apply(&app(sleeper, ""), &["--wait", "--timeout", "60s"]),
    );
    let good = revisions_of(&fleet, &ids, "app/web").await[ids[0]].0;
    let before: BTreeMap<&str, Vec<testbed::docker::Container>> = ids
        .iter()
        .map(|id| (*id, testbed::docker::containers_of(id)))
        .collect();

    let out = fleet.apply(
        &app("exit 3", "rollout: {canary: 1, onFailure: rollback}"),
        &["--wait", "--timeout", "90s"],
    );
    assert_eq!(out.status.code(), Some(9), "{}", fleet.report(&out));
    let r = rollout_of(&fleet, "app");
    assert_eq!(r["phase"], "RolledBack", "{r}");
    assert_eq!(r["failed"].as_array().map(Vec::len), Some(1), "{r}");
    assert_eq!(
        r["counts"][good.to_string()]["desired"],
        3,
        "all back on {good}: {r}"
    );
    let canary = r["failed"][0].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let on = revisions_of(&fleet, &ids, "app/web").await;
        if on.values().all(|&(rev, ready)| rev == good && ready) {
            break;
        }
        assert!(Instant::now() < deadline, "{on:?}\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &ids {
        let now = testbed::docker::containers_of(id);
        let running: Vec<_> = now.iter().filter(|c| c.state == "running").collect();
        assert_eq!(running.len(), 1, "{id}: {now:?}");
        if *id != canary {
            assert_eq!(now, before[id], "{id} never left the good revision");
        }
    }
}

/// A released agent the new revision cannot be rendered for (a value it
/// lacks) is a failure the rollout sees, as every reader does: the rollout
/// halts instead of waiting for it forever, and nobody else moves.
#[tokio::test]
async fn a_canary_that_cannot_be_rendered_halts_the_rollout() {
    let fleet = fleet_of(&AGENTS[..2]).await;
    ok(
        &fleet,
        &fleet.apply(&hello("v1", ""), &["--wait", "--timeout", "60s"]),
    );
    let templated = hello("site ${values.site}", "rollout: {canary: 1}");
    let out = fleet.apply(&templated, &[]);
    ok(&fleet, &out);
    let r = fleet
        .wait("the rollout halted", Duration::from_secs(30), || {
            let r = rollout(&fleet);
            (r["phase"] == "Halted").then_some(r)
        })
        .await;
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("failed on revision"),
        "{r}"
    );
    assert_eq!(count(&files(&fleet), "v1"), 2, "nobody else moved");
}
