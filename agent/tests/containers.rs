//! The Container reconciler against a real Docker Engine and a real
//! nats-server: create, replace, remove, repair, pull, crash loops, crashes
//! of the agent itself, two agents on one engine, and the device owner's
//! limits. Images are built locally (testbed::docker).

mod common;

use std::time::Duration;

use common::*;
use manifest_types::{AgentStatus, ReadyDetails, ResourceState};
use serde_json::{Value, json};
use testbed::docker::{
    Cleanup, Registry, TEST_IMAGE, containers_of, docker, image_variant, inspect, require_engine,
    unique_agent,
};

/// A process that exits promptly on SIGTERM (a bare `sleep` as PID 1 would not).
fn sleeper() -> Value {
    json!(["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"])
}

fn container(id: &str, spec: Value) -> Value {
    json!({"id": id, "kind": "Container", "spec": spec})
}

fn state<'a>(s: &'a AgentStatus, id: &str) -> Option<&'a ResourceState> {
    s.resources.get(&id.parse().unwrap()).map(|r| &r.state)
}

/// (container id, image id, restart count, repairs) of a Ready container.
fn ready(s: &AgentStatus, id: &str) -> Option<(String, String, u64, u64)> {
    match state(s, id)? {
        ResourceState::Ready {
            details:
                ReadyDetails::Container {
                    container_id,
                    image_id,
                    restart_count,
                    repairs,
                    ..
                },
            ..
        } => Some((
            container_id.clone(),
            image_id.clone(),
            *restart_count,
            *repairs,
        )),
        _ => None,
    }
}

fn failed_reason<'a>(s: &'a AgentStatus, id: &str) -> Option<(&'a str, &'a str)> {
    match state(s, id)? {
        ResourceState::Failed {
            reason, message, ..
        } => Some((reason.as_str(), message.as_str())),
        _ => None,
    }
}

fn config(h: &Harness, agent: &str) -> flotilla_agent::Config {
    let mut c = h.config(agent);
    c.container_stop_timeout = Duration::from_secs(2);
    c
}

/// One in-process agent on the shared engine; its containers are removed
/// when this is dropped (after the agent stops: fields drop in order).
struct EngineAgent {
    id: String,
    h: Harness,
    store: async_nats::jetstream::kv::Store,
    _running: RunningAgent,
    _cleanup: Cleanup,
}

async fn engine_agent(
    prefix: &str,
    tweak: impl FnOnce(&mut flotilla_agent::Config),
) -> EngineAgent {
    require_engine();
    let id = unique_agent(prefix);
    let _cleanup = Cleanup::new(&[&id]);
    let h = Harness::new().await;
    let store = h.store().await;
    let mut cfg = config(&h, &id);
    tweak(&mut cfg);
    EngineAgent {
        _running: RunningAgent::start(cfg),
        id,
        h,
        store,
        _cleanup,
    }
}

#[tokio::test]
async fn creates_replaces_on_change_and_removes() {
    let e = engine_agent("ctr", |_| {}).await;
    let (agent, store) = (e.id.clone(), e.store.clone());

    let spec = |v: &str| {
        json!({"image": TEST_IMAGE, "command": sleeper(), "env": {"VERSION": v},
               "labels": {"app": "web"}, "memoryLimitBytes": 67108864u64, "cpuLimitMillis": 500})
    };
    apply(&store, &agent, 1, json!([container("web/app", spec("1"))])).await;
    let s = wait_status(&store, &agent, "container ready", |s| s.converged_on(1)).await;
    let (id1, image, restarts, repairs) = ready(&s, "web/app").expect("ready details");
    let listed = containers_of(&agent);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, id1);
    assert_eq!(listed[0].state, "running");
    assert_eq!(listed[0].resource, "web/app");
    assert_eq!(
        image,
        docker(&["image", "inspect", "-f", "{{.Id}}", TEST_IMAGE])
    );
    assert_eq!((restarts, repairs), (0, 0));
    assert_eq!(inspect(&id1, "{{.Config.Labels.app}}"), "web");
    assert_eq!(inspect(&id1, "{{.HostConfig.Memory}}"), "67108864");
    assert_eq!(inspect(&id1, "{{.HostConfig.NanoCpus}}"), "500000000");
    assert_eq!(
        inspect(&id1, "{{.HostConfig.RestartPolicy.Name}}"),
        "always"
    );

    // Changed env: replaced by a new container, still exactly one.
    apply(&store, &agent, 2, json!([container("web/app", spec("2"))])).await;
    let s = wait_status(&store, &agent, "replaced", |s| s.converged_on(2)).await;
    let (id2, ..) = ready(&s, "web/app").unwrap();
    assert_ne!(id1, id2);
    let listed = containers_of(&agent);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, id2);
    assert!(inspect(&id2, "{{.Config.Env}}").contains("VERSION=2"));

    // Removed from the manifest: stopped and removed.
    apply(&store, &agent, 3, json!([])).await;
    wait_status(&store, &agent, "empty", |s| s.converged_on(3)).await;
    wait_for("container removed", || containers_of(&agent).is_empty()).await;
}

#[tokio::test]
async fn repairs_a_container_removed_or_stopped_by_hand() {
    let e = engine_agent("ctr", |_| {}).await;
    let (agent, store) = (e.id.clone(), e.store.clone());
    apply(
        &store,
        &agent,
        1,
        json!([container(
            "web/app",
            json!({"image": TEST_IMAGE, "command": sleeper()})
        )]),
    )
    .await;
    let s = wait_status(&store, &agent, "ready", |s| s.converged_on(1)).await;
    let (id1, ..) = ready(&s, "web/app").unwrap();

    docker(&["rm", "-f", &id1]);
    let s = wait_status(&store, &agent, "recreated after docker rm -f", |s| {
        ready(s, "web/app").is_some_and(|(id, _, _, repairs)| id != id1 && repairs == 1)
    })
    .await;
    let (id2, ..) = ready(&s, "web/app").unwrap();
    assert_eq!(containers_of(&agent).len(), 1);

    docker(&["stop", "-t", "1", &id2]);
    wait_status(&store, &agent, "started after docker stop", |s| {
        ready(s, "web/app").is_some_and(|(id, _, _, repairs)| id == id2 && repairs == 2)
    })
    .await;
    assert_eq!(inspect(&id2, "{{.State.Running}}"), "true");
}

#[tokio::test]
async fn pulls_by_policy_and_reports_unknown_images() {
    require_engine();
    let agent = unique_agent("pull");
    let _cleanup = Cleanup::new(&[&agent]);
    let registry = Registry::start();
    let v1 = image_variant(&format!("flotilla-test/{agent}:v1"), "one");
    let v2 = image_variant(&format!("flotilla-test/{agent}:v2"), "two");
    let a = registry.push(&v1, "pulled-a:1");
    let b = registry.push(&v1, "pulled-b:1");
    let h = Harness::new().await;
    let store = h.store().await;
    let root = h.root(&agent);
    let _a = RunningAgent::start(config(&h, &agent));

    let resources = |env: &str| {
        json!([
            container(
                "p/if-not-present",
                json!({"image": a, "command": sleeper(), "env": {"E": env}})
            ),
            container(
                "p/always",
                json!({"image": b, "command": sleeper(), "env": {"E": env}, "pullPolicy": "Always"})
            ),
            container(
                "p/unknown",
                json!({"image": format!("{}/no-such-image:1", registry.host())})
            ),
            file("p/file", &root.join("f"), "still converges\n"),
        ])
    };
    apply(&store, &agent, 1, resources("1")).await;
    let s = wait_status(&store, &agent, "pulled, and the unknown one failed", |s| {
        ready(s, "p/if-not-present").is_some()
            && ready(s, "p/always").is_some()
            && failed_reason(s, "p/unknown").is_some()
            && state(s, "p/file").is_some_and(ResourceState::is_ready)
    })
    .await;
    assert_eq!(ready(&s, "p/if-not-present").unwrap().1, v1);
    assert_eq!(ready(&s, "p/always").unwrap().1, v1);
    let (reason, message) = failed_reason(&s, "p/unknown").unwrap();
    assert_eq!(reason, "ImagePullFailed");
    assert!(message.contains("no-such-image"), "{message}");
    assert_eq!(
        std::fs::read_to_string(root.join("f")).unwrap(),
        "still converges\n"
    );

    // The registry moves both tags to v2; locally they still name v1.
    registry.push(&v2, "pulled-a:1");
    registry.push(&v2, "pulled-b:1");
    docker(&["tag", &v1, &a]);
    docker(&["tag", &v1, &b]);
    apply(&store, &agent, 2, resources("2")).await;
    let s = wait_status(&store, &agent, "both replaced", |s| {
        s.manifest_generation == 2
            && ready(s, "p/if-not-present")
                .is_some_and(|r| inspect(&r.0, "{{.Config.Env}}").contains("E=2"))
            && ready(s, "p/always")
                .is_some_and(|r| inspect(&r.0, "{{.Config.Env}}").contains("E=2"))
    })
    .await;
    assert_eq!(
        ready(&s, "p/if-not-present").unwrap().1,
        v1,
        "IfNotPresent must not pull"
    );
    assert_eq!(ready(&s, "p/always").unwrap().1, v2, "Always must pull");

    apply(&store, &agent, 3, json!([])).await;
    wait_for("containers removed", || containers_of(&agent).is_empty()).await;
    for image in [a, b] {
        testbed::docker::docker_ok(&["rmi", &image]);
    }
    testbed::docker::docker_ok(&["rmi", "-f", &v1, &v2]);
}

#[tokio::test]
async fn a_command_that_exits_is_a_crash_loop_never_ready() {
    let e = engine_agent("crash", |_| {}).await;
    let (agent, store) = (e.id.clone(), e.store.clone());
    apply(
        &store,
        &agent,
        1,
        json!([container(
            "c/exits",
            json!({"image": TEST_IMAGE, "command": ["sh", "-c", "exit 3"]})
        )]),
    )
    .await;
    let mut seen_ready = false;
    let mut seen_exit_code = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    let mut failed = None;
    while tokio::time::Instant::now() < deadline {
        if let Some(s) = status(&store, &agent).await {
            seen_ready |= ready(&s, "c/exits").is_some();
            if let Some(ResourceState::Failed {
                reason,
                message,
                retry_after_seconds,
                ..
            }) = state(&s, "c/exits")
            {
                // Between two runs the engine shows the exit code; while
                // running again it shows the restart count.
                seen_exit_code |= message.contains("exit code 3");
                failed = Some((reason.clone(), message.clone(), *retry_after_seconds));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!seen_ready, "a crash-looping container was reported Ready");
    let (reason, message, retry) = failed.expect("reported Failed");
    assert_eq!(reason, "CrashLoopBackOff");
    assert!(seen_exit_code, "the exit code was reported: last {message}");
    // Also while the engine shows it running again (from its event log).
    assert!(
        message.contains("exit code 3"),
        "the latest status names the exit code: {message}"
    );
    assert!(retry.is_some_and(|r| r >= 1));
    assert_eq!(
        containers_of(&agent).len(),
        1,
        "the agent must not recreate it"
    );
}

#[tokio::test]
async fn two_agents_on_one_engine_touch_only_their_own() {
    require_engine();
    let (a, b) = (unique_agent("two"), unique_agent("two"));
    let _cleanup = Cleanup::new(&[&a, &b]);
    let stranger = docker(&["run", "-d", "--rm", TEST_IMAGE, "sleep", "60"]);
    let h = Harness::new().await;
    let store = h.store().await;
    let _ra = RunningAgent::start(config(&h, &a));
    let _rb = RunningAgent::start(config(&h, &b));
    let app = || {
        json!([container(
            "web/app",
            json!({"image": TEST_IMAGE, "command": sleeper()})
        )])
    };
    apply(&store, &a, 1, app()).await;
    apply(&store, &b, 1, app()).await;
    wait_status(&store, &a, "a ready", |s| s.converged_on(1)).await;
    let sb = wait_status(&store, &b, "b ready", |s| s.converged_on(1)).await;
    let (b_id, ..) = ready(&sb, "web/app").unwrap();

    apply(&store, &a, 2, json!([])).await;
    wait_status(&store, &a, "a empty", |s| s.converged_on(2)).await;
    wait_for("a's container removed", || containers_of(&a).is_empty()).await;
    // Let a few resyncs of both agents pass.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let bs = containers_of(&b);
    assert_eq!(bs.len(), 1);
    assert_eq!(bs[0].id, b_id);
    assert_eq!(bs[0].state, "running");
    assert_eq!(inspect(&stranger, "{{.State.Running}}"), "true");
    docker(&["rm", "-f", &stranger]);
}

#[tokio::test]
async fn privileges_and_foreign_mounts_need_the_device_owner() {
    let e = engine_agent("priv", |c| {
        c.container_policy.allowed_capabilities = vec!["NET_ADMIN".into()];
    })
    .await;
    let (agent, store, h) = (e.id.clone(), e.store.clone(), &e.h);
    let base = json!({"image": TEST_IMAGE, "command": sleeper()});
    apply(&store, &agent, 1, json!([container("s/app", base.clone())])).await;
    let s = wait_status(&store, &agent, "ready", |s| s.converged_on(1)).await;
    let (id, ..) = ready(&s, "s/app").unwrap();

    let refused = [
        (json!({"privileged": true}), "PrivilegeNotAllowed"),
        (json!({"networkMode": "host"}), "PrivilegeNotAllowed"),
        (json!({"capAdd": ["SYS_ADMIN"]}), "PrivilegeNotAllowed"),
        (
            json!({"volumes": [{"hostPath": "/etc", "target": "/host-etc"}]}),
            "PathOutsideRoots",
        ),
    ];
    for (generation, (extra, reason)) in (2..).zip(refused) {
        let mut spec = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let revision = apply(
            &store,
            &agent,
            generation,
            json!([container("s/app", spec)]),
        )
        .await;
        let s = wait_status(&store, &agent, reason, |s| {
            s.rejection.as_ref().is_some_and(|r| r.revision == revision)
        })
        .await;
        assert_eq!(s.rejection.as_ref().unwrap().reason, reason, "{extra}");
        assert_eq!(s.manifest_generation, 1);
        assert_eq!(
            ready(&s, "s/app").unwrap().0,
            id,
            "the last good container keeps running"
        );
    }

    // An allowed capability and a bind mount under the file root are fine.
    let root = h.root(&agent);
    std::fs::write(root.join("data.txt"), "shared\n").unwrap();
    let mut spec = base.clone();
    spec["capAdd"] = json!(["NET_ADMIN"]);
    spec["volumes"] = json!([{"hostPath": root, "target": "/data", "readOnly": true}]);
    apply(&store, &agent, 10, json!([container("s/app", spec)])).await;
    let s = wait_status(&store, &agent, "allowed", |s| s.converged_on(10)).await;
    let (id, ..) = ready(&s, "s/app").unwrap();
    assert_eq!(docker(&["exec", &id, "cat", "/data/data.txt"]), "shared");
    assert!(inspect(&id, "{{.HostConfig.CapAdd}}").contains("NET_ADMIN"));
}

#[tokio::test]
async fn a_missing_engine_fails_only_the_containers() {
    let agent = unique_agent("nodocker");
    let h = Harness::new().await;
    let store = h.store().await;
    let root = h.root(&agent);
    let mut cfg = config(&h, &agent);
    cfg.docker_host = Some(format!(
        "unix://{}",
        h.dir.path().join("no-docker.sock").display()
    ));
    let _a = RunningAgent::start(cfg);
    apply(
        &store,
        &agent,
        1,
        json!([
            container("x/app", json!({"image": TEST_IMAGE})),
            file("x/file", &root.join("f"), "ok\n"),
        ]),
    )
    .await;
    let s = wait_status(&store, &agent, "file ready, container failed", |s| {
        failed_reason(s, "x/app").is_some()
            && state(s, "x/file").is_some_and(ResourceState::is_ready)
    })
    .await;
    let (reason, message) = failed_reason(&s, "x/app").unwrap();
    assert_eq!(reason, "DockerUnavailable");
    assert!(message.contains("no-docker.sock"), "{message}");
    match state(&s, "x/app").unwrap() {
        ResourceState::Failed {
            retry_after_seconds,
            ..
        } => assert!(retry_after_seconds.is_some()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_changed_file_replaces_the_container_that_restarts_on_it() {
    let e = engine_agent("trig", |_| {}).await;
    let (agent, store) = (e.id.clone(), e.store.clone());
    let conf_dir = e.h.root(&agent).join("conf");
    let resources = |content: &str| {
        json!([
            {"id": "svc/app", "kind": "Container", "restartOn": ["svc/conf"],
             "spec": {"image": TEST_IMAGE,
                      "command": ["sh", "-c", "cp /conf/app.conf /tmp/seen; trap 'exit 0' TERM; sleep 3600 & wait"],
                      "volumes": [{"hostPath": conf_dir, "target": "/conf", "readOnly": true}]}},
            file("svc/conf", &conf_dir.join("app.conf"), content),
        ])
    };
    apply(&store, &agent, 1, resources("v1\n")).await;
    let s = wait_status(&store, &agent, "ready", |s| s.converged_on(1)).await;
    let (id1, ..) = ready(&s, "svc/app").unwrap();
    assert_eq!(docker(&["exec", &id1, "cat", "/tmp/seen"]), "v1");

    apply(&store, &agent, 2, resources("v2\n")).await;
    let s = wait_status(&store, &agent, "replaced", |s| s.converged_on(2)).await;
    let (id2, ..) = ready(&s, "svc/app").unwrap();
    assert_ne!(
        id1, id2,
        "a changed restartOn input must restart the container"
    );
    assert_eq!(
        docker(&["exec", &id2, "cat", "/tmp/seen"]),
        "v2",
        "started after the file was written"
    );
    assert_eq!(containers_of(&agent).len(), 1);
}

#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn an_agent_killed_right_after_create_ends_with_one_container() {
    use std::process::Command;
    require_engine();
    let agent = unique_agent("fault");
    let _cleanup = Cleanup::new(&[&agent]);
    let h = Harness::new().await;
    let store = h.store().await;
    apply(
        &store,
        &agent,
        1,
        json!([container(
            "f/app",
            json!({"image": TEST_IMAGE, "command": sleeper()})
        )]),
    )
    .await;
    let run = |fault: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-agent"));
        cmd.env("FLOTILLA_NATS_URL", h.server.url())
            .env("FLOTILLA_ID", &agent)
            .env("FLOTILLA_ALLOW_UNSIGNED", "true")
            .env("FLOTILLA_STATE_DIR", h.dir.path().join("state"))
            .env("FLOTILLA_RESYNC_INTERVAL", "500ms")
            .env("FLOTILLA_CONTAINER_STOP_TIMEOUT", "2s");
        if fault {
            cmd.env("FLOTILLA_FAULT_EXIT_AT", "container-created");
        }
        cmd
    };
    let status_code = run(true).output().unwrap().status;
    assert_eq!(status_code.code(), Some(86), "the fault hook fired");
    let left = containers_of(&agent);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].state, "created");

    let log = h.dir.path().join("agent.log");
    let _agent = testbed::Process::spawn(run(false), &log);
    let s = wait_status(&store, &agent, "ready after restart", |s| s.converged_on(1)).await;
    let (id, ..) = ready(&s, "f/app").unwrap();
    let now = containers_of(&agent);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0].id, id);
    assert_eq!(
        id, left[0].id,
        "the half-made container is started, not duplicated"
    );
}

/// An agent killed at each step of a replacement (the new container
/// created, started, the old one removed) and started again ends with
/// exactly one container, the new one, running and Ready.
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn an_agent_killed_at_each_step_of_a_replacement_ends_with_one_container() {
    use std::process::Command;
    require_engine();
    for step in [
        "container-created",
        "container-started",
        "old-container-removed",
    ] {
        let agent = unique_agent("replace-fault");
        let _cleanup = Cleanup::new(&[&agent]);
        let h = Harness::new().await;
        let store = h.store().await;
        let spec = |v: &str| {
            json!([container(
                "f/app",
                json!({"image": TEST_IMAGE, "command": sleeper(), "env": {"V": v}})
            )])
        };
        let run = |fault: Option<&str>| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-agent"));
            cmd.env("FLOTILLA_NATS_URL", h.server.url())
                .env("FLOTILLA_ID", &agent)
                .env("FLOTILLA_ALLOW_UNSIGNED", "true")
                .env("FLOTILLA_STATE_DIR", h.dir.path().join("state"))
                .env("FLOTILLA_RESYNC_INTERVAL", "500ms")
                .env("FLOTILLA_CONTAINER_STOP_TIMEOUT", "2s");
            if let Some(step) = fault {
                cmd.env("FLOTILLA_FAULT_EXIT_AT", step);
            }
            cmd
        };
        let log = h.dir.path().join("agent.log");
        apply(&store, &agent, 1, spec("1")).await;
        let first = testbed::Process::spawn(run(None), &log);
        let s = wait_status(&store, &agent, "v1 ready", |s| s.converged_on(1)).await;
        let (old, ..) = ready(&s, "f/app").unwrap();
        first.kill();

        apply(&store, &agent, 2, spec("2")).await;
        let code = run(Some(step)).output().unwrap().status;
        assert_eq!(code.code(), Some(86), "{step}: the fault hook fired");

        let _agent = testbed::Process::spawn(run(None), &log);
        let s = wait_status(&store, &agent, "v2 ready after restart", |s| {
            s.converged_on(2)
        })
        .await;
        let (new, ..) = ready(&s, "f/app").unwrap();
        assert_ne!(new, old, "{step}");
        let now = containers_of(&agent);
        assert_eq!(now.len(), 1, "{step}: {now:?}");
        assert_eq!(
            (now[0].id.as_str(), now[0].state.as_str()),
            (new.as_str(), "running"),
            "{step}"
        );
        let env = docker(&["inspect", "-f", "{{range .Config.Env}}{{.}} {{end}}", &new]);
        assert!(env.contains("V=2"), "{step}: the new spec runs: {env}");
    }
}

#[tokio::test]
async fn a_container_that_dies_soon_after_start_is_caught_before_the_next_resync() {
    let e = engine_agent("late", |c| {
        c.resync_interval = Duration::from_secs(300); // no drift check during the test
    })
    .await;
    let (agent, store) = (e.id.clone(), e.store.clone());
    apply(
        &store,
        &agent,
        1,
        json!([container(
            "c/late",
            json!({"image": TEST_IMAGE, "command": ["sh", "-c", "sleep 1; exit 4"]})
        )]),
    )
    .await;
    // Up for the settle delay, so Ready at first; the early recheck finds the crash.
    let s = wait_status(&store, &agent, "crash loop found by the recheck", |s| {
        failed_reason(s, "c/late").is_some_and(|(r, _)| r == "CrashLoopBackOff")
    })
    .await;
    let (_, message) = failed_reason(&s, "c/late").unwrap();
    assert!(message.contains("restarted"), "{message}");
}

/// The container's id as the engine has it, if it is running.
fn running_id(agent: &str) -> Option<String> {
    let listed = containers_of(agent);
    match listed.as_slice() {
        [only] if only.state == "running" => Some(only.id.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn a_container_turned_unsupported_keeps_running_untouched() {
    let e = engine_agent("unsup", |_| {}).await;
    let (agent, store) = (e.id.clone(), e.store.clone());
    let spec = json!({"image": TEST_IMAGE, "command": sleeper()});
    apply(&store, &agent, 1, json!([container("u/app", spec.clone())])).await;
    let s = wait_status(&store, &agent, "ready", |s| s.converged_on(1)).await;
    let (cid, ..) = ready(&s, "u/app").unwrap();

    // A newer control plane adds a field this agent does not know.
    let mut newer = spec.clone();
    newer["fromTheFuture"] = json!({"x": 1});
    apply(&store, &agent, 2, json!([container("u/app", newer)])).await;
    // manifestGeneration 2 is reported only after generation 2's removal
    // sweep ran: the barrier that proves the agent had its chance to remove it.
    let s = wait_status(&store, &agent, "unsupported", |s| {
        s.manifest_generation == 2
            && matches!(state(s, "u/app"), Some(ResourceState::Unsupported { .. }))
    })
    .await;
    assert!(!s.converged_on(2), "Unsupported is not Ready");
    assert_eq!(
        running_id(&agent),
        Some(cid.clone()),
        "same container, still running"
    );

    // A generation the agent understands converges normally.
    let mut v3 = spec;
    v3["env"] = json!({"V": "3"});
    apply(&store, &agent, 3, json!([container("u/app", v3)])).await;
    let s = wait_status(&store, &agent, "ready again", |s| s.converged_on(3)).await;
    let (cid3, ..) = ready(&s, "u/app").unwrap();
    assert_ne!(cid3, cid, "the changed spec replaced it");
    assert_eq!(running_id(&agent), Some(cid3));
}

#[tokio::test]
async fn a_replacement_that_crashes_restores_the_previous_container() {
    let e = engine_agent("rollback", |_| {}).await;
    let (agent, store) = (e.id.clone(), e.store.clone());
    apply(
        &store,
        &agent,
        1,
        json!([container(
            "r/app",
            json!({"image": TEST_IMAGE, "command": sleeper()})
        )]),
    )
    .await;
    let s = wait_status(&store, &agent, "ready", |s| s.converged_on(1)).await;
    let (good, ..) = ready(&s, "r/app").unwrap();

    apply(
        &store,
        &agent,
        2,
        json!([container(
            "r/app",
            json!({"image": TEST_IMAGE, "command": ["sh", "-c", "exit 3"]})
        )]),
    )
    .await;
    let s = wait_status(&store, &agent, "the update failed", |s| {
        failed_reason(s, "r/app").is_some_and(|(r, _)| r == "ReplaceFailed")
    })
    .await;
    let (_, message) = failed_reason(&s, "r/app").unwrap();
    assert!(message.contains("previous one runs again"), "{message}");
    assert!(!s.converged_on(2));
    assert_eq!(
        running_id(&agent),
        Some(good.clone()),
        "the previous container serves again, and the failed one is gone"
    );
    // Fixed in the next generation: converges.
    apply(
        &store,
        &agent,
        3,
        json!([container(
            "r/app",
            json!({"image": TEST_IMAGE, "command": sleeper(), "env": {"V": "3"}})
        )]),
    )
    .await;
    let s = wait_status(&store, &agent, "ready on 3", |s| s.converged_on(3)).await;
    let (fixed, ..) = ready(&s, "r/app").unwrap();
    assert_eq!(running_id(&agent), Some(fixed));
}

#[tokio::test]
async fn a_container_is_ready_only_once_its_healthcheck_passes() {
    let e = engine_agent("health", |_| {}).await;
    let (agent, store) = (e.id.clone(), e.store.clone());
    // Healthy once /tmp/ok exists, which the command makes after 3 s.
    let spec = json!({
        "image": TEST_IMAGE,
        "command": ["sh", "-c", "trap 'exit 0' TERM; (sleep 3; touch /tmp/ok) & sleep 3600 & wait"],
        "healthcheck": {"test": ["CMD-SHELL", "test -f /tmp/ok"], "intervalSeconds": 1, "retries": 30}
    });
    apply(&store, &agent, 1, json!([container("h/app", spec)])).await;
    let s = wait_status(&store, &agent, "reconciling while starting", |s| {
        matches!(state(s, "h/app"), Some(ResourceState::Reconciling { message }) if message.contains("healthcheck"))
    })
    .await;
    assert!(
        !s.converged_on(1),
        "not Ready while the healthcheck is starting"
    );
    let s = wait_status(&store, &agent, "ready once healthy", |s| s.converged_on(1)).await;
    match state(&s, "h/app") {
        Some(ResourceState::Ready {
            details: ReadyDetails::Container { health, .. },
            ..
        }) => assert_eq!(health.as_deref(), Some("healthy")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_failed_removal_is_not_converged_and_is_retried() {
    let mut proxy = testbed::docker::EngineProxy::start();
    let host = proxy.host();
    let e = engine_agent("rmfail", |c| c.docker_host = Some(host)).await;
    let (agent, store) = (e.id.clone(), e.store.clone());
    let root = e.h.root(&agent);
    apply(
        &store,
        &agent,
        1,
        json!([
            container("d/app", json!({"image": TEST_IMAGE, "command": sleeper()})),
            file("d/f", &root.join("f"), "x\n"),
        ]),
    )
    .await;
    wait_status(&store, &agent, "ready", |s| s.converged_on(1)).await;

    proxy.stop();
    apply(
        &store,
        &agent,
        2,
        json!([file("d/f", &root.join("f"), "x\n")]),
    )
    .await;
    let s = wait_status(&store, &agent, "removal owed", |s| {
        s.manifest_generation == 2 && !s.removing.is_empty()
    })
    .await;
    assert!(!s.converged_on(2), "a removal that failed is not converged");
    assert_eq!(s.removing[0].id.to_string(), "d/app");
    assert_eq!(s.removing[0].reason, "DockerUnavailable");
    assert!(s.removing[0].retry_after_seconds.is_some());
    assert_eq!(containers_of(&agent).len(), 1, "still there");

    proxy.resume();
    let s = wait_status(&store, &agent, "removed after the engine returned", |s| {
        s.converged_on(2)
    })
    .await;
    assert!(s.removing.is_empty());
    assert!(containers_of(&agent).is_empty(), "the container is gone");
}

#[tokio::test]
async fn a_stalled_pull_blocks_neither_other_resources_nor_a_newer_manifest() {
    let registry = testbed::docker::StalledRegistry::start().await;
    let e = engine_agent("stall", |_| {}).await;
    let (agent, store) = (e.id.clone(), e.store.clone());
    let root = e.h.root(&agent);
    let stalled = json!({"image": registry.image("stalls/app:1"), "pullPolicy": "Always"});
    let started = tokio::time::Instant::now();
    apply(
        &store,
        &agent,
        1,
        json!([
            container("s/app", stalled.clone()),
            file("s/f", &root.join("f"), "one\n"),
        ]),
    )
    .await;
    let s = wait_status(&store, &agent, "the file ready beside the pull", |s| {
        state(s, "s/f").is_some_and(ResourceState::is_ready)
    })
    .await;
    let file_ready = started.elapsed();
    assert!(
        matches!(
            state(&s, "s/app"),
            None | Some(ResourceState::Reconciling { .. })
        ),
        "the pull is still under way: {:?}",
        state(&s, "s/app")
    );
    assert!(
        file_ready < Duration::from_secs(1),
        "file ready after {file_ready:?}"
    );

    // A newer generation, written while the pull still stalls.
    let written = tokio::time::Instant::now();
    apply(
        &store,
        &agent,
        2,
        json!([
            container("s/app", stalled),
            file("s/f", &root.join("f"), "two\n"),
        ]),
    )
    .await;
    let two = flotilla_agent::reconcile::file::sha256_hex(b"two\n");
    wait_status(&store, &agent, "generation 2's file", |s| {
        matches!(state(s, "s/f"), Some(ResourceState::Ready {
            details: ReadyDetails::File { sha256, .. }, ..
        }) if *sha256 == two)
    })
    .await;
    let acted = written.elapsed();
    assert_eq!(std::fs::read_to_string(root.join("f")).unwrap(), "two\n");
    assert!(acted < Duration::from_secs(1), "acted on after {acted:?}");

    // Dropping the stalled container interrupts its pull; the generation converges.
    apply(
        &store,
        &agent,
        3,
        json!([file("s/f", &root.join("f"), "two\n")]),
    )
    .await;
    wait_status(&store, &agent, "converged without the container", |s| {
        s.converged_on(3)
    })
    .await;
}
