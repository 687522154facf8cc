//! `flotilla apply --wait` against a real nats-server, with the control
//! plane's and agents' documents seeded directly into KV.

mod common;

use common::*;
use manifest_types::{Deployment, keys};

/// Applies the example (no wait) and returns the document and its revision.
async fn applied(env: &Env) -> (Deployment, u64, async_nats::jetstream::kv::Store) {
    let run = env.run(&["apply", "-f", path(&hello_yaml())]);
    assert_eq!(run.code, 0, "{run:?}");
    let store = env.store().await;
    let (d, revision) = stored_deployment(&store, "hello").await.unwrap();
    (d, revision, store)
}

fn status_key() -> String {
    keys::deployment_status(&dname("hello"))
}

fn actual(id: &str) -> String {
    keys::actual_state(&agent(id))
}

/// What a live agent writes: a fresh heartbeat, then its status.
async fn report(
    env: &Env,
    store: &async_nats::jetstream::kv::Store,
    id: &str,
    status: &manifest_types::AgentStatus,
) {
    put_json(
        &env.beats().await,
        &keys::heartbeat(&agent(id)),
        &heartbeat(id, status.manifest_generation),
    )
    .await;
    put_json(store, &actual(id), status).await;
}

#[tokio::test]
async fn converged_targets_exit_0() {
    let env = Env::start();
    let (d, rev, store) = applied(&env).await;
    put_json(
        &store,
        &status_key(),
        &deployment_status("hello", rev, &[("pi-1", 4), ("pi-2", 9)]),
    )
    .await;
    report(
        &env,
        &store,
        "pi-1",
        &agent_status("pi-1", 4, true, &d, rev),
    )
    .await;
    // pi-2 has moved past its generation; this deployment's resources are Ready
    // even though the agent as a whole is not (another deployment failing).
    let mut past = agent_status("pi-2", 11, true, &d, rev);
    past.conditions[0].status = false;
    report(&env, &store, "pi-2", &past).await;

    let run = env.run(&[
        "apply",
        "-f",
        path(&hello_yaml()),
        "--wait",
        "--timeout",
        "20s",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains(&format!("hello: unchanged (revision {rev})")),
        "{run:?}"
    );
    assert!(
        run.stdout
            .contains(&format!("hello: 2/2 agents converged on revision {rev}")),
        "{run:?}"
    );
}

#[tokio::test]
async fn a_rejection_exits_4_naming_agent_and_reason() {
    let env = Env::start();
    let (d, rev, store) = applied(&env).await;
    put_json(
        &store,
        &status_key(),
        &deployment_status("hello", rev, &[("pi-1", 4), ("pi-2", 4)]),
    )
    .await;
    report(
        &env,
        &store,
        "pi-1",
        &agent_status("pi-1", 4, true, &d, rev),
    )
    .await;
    report(
        &env,
        &store,
        "pi-2",
        &rejected(agent_status("pi-2", 3, true, &d, rev - 1), 4),
    )
    .await;

    let run = env.run(&[
        "apply",
        "-f",
        path(&hello_yaml()),
        "--wait",
        "--timeout",
        "20s",
    ]);
    assert_eq!(run.code, 4, "{run:?}");
    assert!(
        run.stdout.contains("pi-2 rejected it: PathOutsideRoots"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("1 of 2 agents rejected")
            && run
                .stderr
                .contains("pi-2: PathOutsideRoots: resource hello/motd"),
        "{run:?}"
    );
}

#[tokio::test]
async fn nothing_converging_times_out_with_exit_5() {
    let env = Env::start();
    let (d, rev, store) = applied(&env).await;
    put_json(
        &store,
        &status_key(),
        &deployment_status("hello", rev, &[("pi-1", 4), ("pi-2", 4)]),
    )
    .await;
    report(
        &env,
        &store,
        "pi-1",
        &agent_status("pi-1", 3, true, &d, rev - 1),
    )
    .await;
    report(
        &env,
        &store,
        "pi-2",
        &agent_status("pi-2", 4, false, &d, rev),
    )
    .await;

    let started = std::time::Instant::now();
    let run = env.run(&[
        "apply",
        "-f",
        path(&hello_yaml()),
        "--wait",
        "--timeout",
        "1s",
    ]);
    assert_eq!(run.code, 5, "{run:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    assert!(
        run.stdout
            .contains(&format!("hello: 0/2 agents converged on revision {rev}"))
    );
    assert!(run.stderr.contains("timed out after 1s"), "{run:?}");
    assert!(
        run.stderr
            .contains("pi-1 (Progressing: on manifest generation 3, waiting for 4)"),
        "{run:?}"
    );
    assert!(
        run.stderr
            .contains("pi-2 (Degraded: hello/motd Failed: PermissionDenied: cannot write)"),
        "{run:?}"
    );
}

#[tokio::test]
async fn no_control_plane_times_out_saying_so() {
    let env = Env::start();
    let run = env.run(&[
        "apply",
        "-f",
        path(&hello_yaml()),
        "--wait",
        "--timeout",
        "1s",
    ]);
    assert_eq!(run.code, 5, "{run:?}");
    assert!(
        run.stdout
            .contains("waiting for flotilla-control to render revision")
    );
    assert!(
        run.stderr.contains("is flotilla-control running?")
            && run.stderr.contains("there is no deployment-status.hello"),
        "{run:?}"
    );

    // A status for an older revision does not count either.
    let store = env.store().await;
    let (_, rev) = stored_deployment(&store, "hello").await.unwrap();
    put_json(
        &store,
        &status_key(),
        &deployment_status("hello", rev - 1, &[]),
    )
    .await;
    let run = env.run(&[
        "apply",
        "-f",
        path(&hello_yaml()),
        "--wait",
        "--timeout",
        "1s",
    ]);
    assert_eq!(run.code, 5, "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "deployment-status.hello is at revision {}",
            rev - 1
        )),
        "{run:?}"
    );
}

#[tokio::test]
async fn zero_targets_succeed_and_say_so() {
    let env = Env::start();
    let (_, rev, store) = applied(&env).await;
    put_json(&store, &status_key(), &deployment_status("hello", rev, &[])).await;
    let run = env.run(&[
        "apply",
        "-f",
        path(&hello_yaml()),
        "--wait",
        "--timeout",
        "5s",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("selects no agents"), "{run:?}");
}

#[tokio::test]
async fn control_plane_error_exits_4() {
    let env = Env::start();
    let (_, rev, store) = applied(&env).await;
    let mut s = deployment_status("hello", rev, &[]);
    s.error = Some("resources hello/motd and base/motd both manage file".into());
    put_json(&store, &status_key(), &s).await;
    let run = env.run(&[
        "apply",
        "-f",
        path(&hello_yaml()),
        "--wait",
        "--timeout",
        "5s",
    ]);
    assert_eq!(run.code, 4, "{run:?}");
    assert!(
        run.stderr.contains("flotilla-control cannot use revision"),
        "{run:?}"
    );
    assert!(run.stderr.contains("both manage file"), "{run:?}");
}

#[tokio::test]
async fn waits_while_the_fleet_catches_up_and_reports_each_step() {
    let env = Env::start();
    let (d, rev, store) = applied(&env).await;
    let mut wait = Spawned::start(
        &env.url(),
        &[
            "apply",
            "-f",
            path(&hello_yaml()),
            "--wait",
            "--timeout",
            "30s",
        ],
    );
    Spawned::expect_line(&mut wait.stdout, "waiting for flotilla-control to render").await;

    // The control plane renders; nothing has converged yet.
    put_json(
        &store,
        &status_key(),
        &deployment_status("hello", rev, &[("pi-1", 2), ("pi-2", 2)]),
    )
    .await;
    Spawned::expect_line(
        &mut wait.stdout,
        &format!("hello: 0/2 agents converged on revision {rev}"),
    )
    .await;

    report(
        &env,
        &store,
        "pi-1",
        &agent_status("pi-1", 2, true, &d, rev),
    )
    .await;
    Spawned::expect_line(
        &mut wait.stdout,
        &format!("hello: 1/2 agents converged on revision {rev}"),
    )
    .await;

    report(
        &env,
        &store,
        "pi-2",
        &agent_status("pi-2", 2, true, &d, rev),
    )
    .await;
    Spawned::expect_line(
        &mut wait.stdout,
        &format!("hello: 2/2 agents converged on revision {rev}"),
    )
    .await;
    assert_eq!(wait.wait_exit().await, 0);
}

#[tokio::test]
async fn a_deletion_by_someone_else_ends_the_wait_as_a_conflict() {
    let env = Env::start();
    let (d, rev, store) = applied(&env).await;
    put_json(
        &store,
        &status_key(),
        &deployment_status("hello", rev, &[("pi-1", 2)]),
    )
    .await;
    report(
        &env,
        &store,
        "pi-1",
        &agent_status("pi-1", 1, true, &d, rev),
    )
    .await;
    let mut wait = Spawned::start(
        &env.url(),
        &[
            "apply",
            "-f",
            path(&hello_yaml()),
            "--wait",
            "--timeout",
            "30s",
        ],
    );
    Spawned::expect_line(
        &mut wait.stdout,
        &format!("hello: 0/1 agents converged on revision {rev}"),
    )
    .await;
    // What flotilla-control does when the deployment is deleted.
    store
        .delete(keys::deployment(&dname("hello")))
        .await
        .unwrap();
    store.delete(status_key()).await.unwrap();
    Spawned::expect_line(
        &mut wait.stderr,
        "hello: deleted by someone else while waiting",
    )
    .await;
    assert_eq!(wait.wait_exit().await, 3);
}

/// A target whose status says converged but whose heartbeat is missing is
/// never counted: the wait times out naming it Stale.
#[tokio::test]
async fn a_converged_status_without_a_live_heartbeat_does_not_count() {
    let env = Env::start();
    let (d, rev, store) = applied(&env).await;
    put_json(
        &store,
        &status_key(),
        &deployment_status("hello", rev, &[("pi-1", 4)]),
    )
    .await;
    put_json(
        &store,
        &actual("pi-1"),
        &agent_status("pi-1", 4, true, &d, rev),
    )
    .await;
    let run = env.run(&[
        "apply",
        "-f",
        path(&hello_yaml()),
        "--wait",
        "--timeout",
        "1s",
    ]);
    assert_eq!(run.code, 5, "{run:?}");
    assert!(
        run.stderr.contains("pi-1 (Stale: no heartbeat read)"),
        "{run:?}"
    );
    // The same status with a fresh heartbeat converges.
    report(
        &env,
        &store,
        "pi-1",
        &agent_status("pi-1", 4, true, &d, rev),
    )
    .await;
    let run = env.run(&[
        "apply",
        "-f",
        path(&hello_yaml()),
        "--wait",
        "--timeout",
        "20s",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
}

/// A target that has accepted the generation but does not report every
/// resource of the deployment is not converged by vacuity.
#[tokio::test]
async fn a_missing_resource_of_the_deployment_is_not_converged() {
    let env = Env::start();
    let (d, rev, store) = applied(&env).await;
    put_json(
        &store,
        &status_key(),
        &deployment_status("hello", rev, &[("pi-1", 4)]),
    )
    .await;
    let mut partial = agent_status("pi-1", 4, true, &d, rev);
    let dropped = partial.resources.keys().next().unwrap().clone();
    partial.resources.remove(&dropped);
    report(&env, &store, "pi-1", &partial).await;
    let run = env.run(&[
        "apply",
        "-f",
        path(&hello_yaml()),
        "--wait",
        "--timeout",
        "1s",
    ]);
    assert_eq!(run.code, 5, "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("pi-1 (Progressing: {dropped} not reported yet)")),
        "{run:?}"
    );
}
