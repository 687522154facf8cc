//! Units that are not meant to run all the time (docs/adr/0009, "Units that
//! are not meant to run all the time"), against a real systemd in a device
//! container: a timer and the oneshot job it runs (`state: triggered`), a
//! failing triggered job, and a oneshot run once per change (`completed`).
//!
//! The jobs carry `RefuseManualStart=yes`/`RefuseManualStop=yes`: systemd
//! itself then refuses any start or stop the agent might send (its timer's
//! are not manual), and such a refusal would show as a Failed resource. Each
//! run appends its start and, from `ExecStopPost=`, systemd's verdict on it
//! to a log on the share, so the test counts runs and how each one ended.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use manifest_types::{AgentStatus, ReadyDetails, ResourceState, UnitRun};
use serde_json::{Value, json};

fn state<'a>(s: &'a AgentStatus, id: &str) -> Option<&'a ResourceState> {
    s.resources.get(&id.parse().unwrap()).map(|r| &r.state)
}

fn last_run(s: &AgentStatus, id: &str) -> Option<UnitRun> {
    match state(s, id)? {
        ResourceState::Ready {
            details: ReadyDetails::SystemdUnit { last_run, .. },
            ..
        } => last_run.clone(),
        _ => None,
    }
}

fn failed_reason(s: &AgentStatus, id: &str) -> Option<(String, u32)> {
    match state(s, id)? {
        ResourceState::Failed {
            reason, attempts, ..
        } => Some((reason.clone(), *attempts)),
        _ => None,
    }
}

/// A oneshot job that logs `start` and, after it ended, systemd's result
/// and exit status into `/flotilla/<log>` on the device.
fn job_unit(log: &str, script: &str) -> String {
    format!(
        "[Unit]\nDescription=flotilla test job\nRefuseManualStart=yes\nRefuseManualStop=yes\n\
         [Service]\nType=oneshot\n\
         ExecStart=/bin/sh -c 'echo start >> /flotilla/{log}; {script}'\n\
         ExecStopPost=/bin/sh -c 'echo \"end $$SERVICE_RESULT $$EXIT_STATUS\" >> /flotilla/{log}'\n"
    )
}

/// A timer that runs `service` a second after it starts and `period` after
/// each run ended.
fn timer_unit(service: &str, period: &str) -> String {
    format!(
        "[Unit]\nDescription=flotilla test timer\n[Timer]\nUnit={service}\nOnActiveSec=1s\n\
         OnUnitInactiveSec={period}\nAccuracySec=100ms\n[Install]\nWantedBy=timers.target\n"
    )
}

fn unit(id: &str, spec: Value) -> Value {
    json!({"id": id, "kind": "SystemdUnit", "spec": spec})
}

/// The runs logged so far: `None` for one still running, else its end line.
fn runs(log: &Path) -> Vec<Option<String>> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out: Vec<Option<String>> = Vec::new();
    for line in text.lines() {
        if line == "start" {
            out.push(None);
        } else if let Some(end) = line.strip_prefix("end ") {
            match out.last_mut() {
                Some(last @ None) => *last = Some(end.to_owned()),
                _ => panic!("an end without a start in {}:\n{text}", log.display()),
            }
        }
    }
    out
}

#[tokio::test]
async fn a_timer_runs_its_job_and_the_agent_never_starts_or_stops_it() {
    let s = setup("timer").await;
    let store = s.h.store().await;
    let log = s.share.join("job.log");
    let job = "flotilla-test-job.service";
    apply(
        &store,
        "timer",
        1,
        json!([
            unit(
                "t/job",
                json!({"unit": job, "state": "triggered",
                                 "content": job_unit("job.log", "sleep 20")})
            ),
            unit(
                "t/timer",
                json!({"unit": "flotilla-test-job.timer", "enabled": true,
                                   "content": timer_unit(job, "3s")})
            ),
        ]),
    )
    .await;
    wait_status(&store, "timer", "converged on 1", |st| st.converged_on(1)).await;
    assert_eq!(
        s.device
            .systemctl(&["is-enabled", "flotilla-test-job.timer"]),
        "enabled"
    );

    // A minute of drift checks (every 0.4 s) while the timer runs a 20 s job
    // three times. The job must stay Ready throughout — a start or stop by
    // the agent would be refused by systemd and show as Failed.
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(62);
    let mut seen_running = false;
    while tokio::time::Instant::now() < watch_until {
        let st = status(&store, "timer").await.expect("a status");
        assert!(
            st.converged_on(1),
            "the fleet saw this device leave Converged while its timer ran the job: {:#?}",
            st.resources
        );
        seen_running |= runs(&log).last().is_some_and(Option::is_none);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        seen_running,
        "a run was in progress during the drift checks"
    );

    wait_for("the third run to end", || {
        let r = runs(&log);
        r.len() >= 3 && r[..3].iter().all(Option::is_some)
    })
    .await;
    let r = runs(&log);
    for (i, end) in r.iter().flatten().enumerate() {
        assert_eq!(end, "success 0", "run {i} was not left to finish: {r:?}");
    }
    let st = wait_status(&store, "timer", "the last run reported", |st| {
        last_run(st, "t/job").is_some_and(|run| run.ended_at.is_some())
    })
    .await;
    let run = last_run(&st, "t/job").unwrap();
    assert_eq!((run.result.as_str(), run.exit_status), ("success", 0));
    assert!(run.started_at.is_some());
    match state(&st, "t/timer") {
        Some(ResourceState::Ready {
            details:
                ReadyDetails::SystemdUnit {
                    active_state,
                    last_trigger,
                    ..
                },
            ..
        }) => {
            assert_eq!(active_state, "active");
            assert!(last_trigger.is_some(), "the timer's last elapse");
        }
        other => panic!("timer: {other:?}"),
    }
}

#[tokio::test]
async fn a_failed_triggered_run_is_reported_and_not_started_again() {
    let s = setup("tfail").await;
    let store = s.h.store().await;
    let log = s.share.join("fail.log");
    let job = "flotilla-test-fail.service";
    apply(
        &store,
        "tfail",
        1,
        json!([
            unit(
                "f/job",
                json!({"unit": job, "state": "triggered",
                                 "content": job_unit("fail.log", "exit 3")})
            ),
            // One run only: a second after the timer starts.
            unit(
                "f/timer",
                json!({"unit": "flotilla-test-fail.timer",
                "content": format!("[Timer]\nUnit={job}\nOnActiveSec=1s\nAccuracySec=100ms\n")})
            ),
        ]),
    )
    .await;
    let st = wait_status(&store, "tfail", "the failed run reported", |st| {
        failed_reason(st, "f/job").is_some_and(|(r, _)| r == "UnitLastRunFailed")
    })
    .await;
    let message = match state(&st, "f/job") {
        Some(ResourceState::Failed { message, .. }) => message.clone(),
        other => panic!("{other:?}"),
    };
    assert!(message.contains("exit status 3"), "{message}");
    // The worker retries a Failed resource with backoff (1 s, 2 s, ...):
    // three more looks, and the job still ran exactly once.
    wait_status(&store, "tfail", "three retries", |st| {
        failed_reason(st, "f/job").is_some_and(|(_, attempts)| attempts >= 4)
    })
    .await;
    assert_eq!(
        runs(&log),
        vec![Some("exit-code 3".to_owned())],
        "the agent never starts a triggered unit, not even to repair it"
    );
    assert_eq!(
        s.device.exec_status(&["systemctl", "is-active", job]).1,
        "failed"
    );
}

#[tokio::test]
async fn a_completed_unit_runs_once_per_change_and_a_remain_after_exit_unit_stays_active() {
    let s = setup("once").await;
    let store = s.h.store().await;
    let log = s.share.join("once.log");
    let conf = s.share.join("once.conf");
    // Manual starts are the agent's job here, so no RefuseManualStart.
    let once = |script: &str| {
        format!(
            "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo start >> /flotilla/once.log; {script}'\n\
             ExecStopPost=/bin/sh -c 'echo \"end $$SERVICE_RESULT $$EXIT_STATUS\" >> /flotilla/once.log'\n"
        )
    };
    let setup_unit = |script: &str| {
        json!({"id": "o/setup", "kind": "SystemdUnit", "restartOn": ["o/conf"],
               "spec": {"unit": "flotilla-test-once.service", "state": "completed",
                        "content": once(script)}})
    };
    let remain = unit(
        "o/remain",
        json!({"unit": "flotilla-test-remain.service",
               "content": "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n"}),
    );
    let resources = |conf_text: &str, script: &str, extra: Option<Value>| {
        let mut r = vec![
            file("o/conf", &conf, conf_text),
            setup_unit(script),
            remain.clone(),
        ];
        r.extend(extra);
        Value::Array(r)
    };

    apply(&store, "once", 1, resources("v1\n", "sleep 1", None)).await;
    let st = wait_status(&store, "once", "converged on 1", |st| st.converged_on(1)).await;
    assert_eq!(runs(&log), vec![Some("success 0".to_owned())]);
    let run = last_run(&st, "o/setup")
        .unwrap_or_else(|| panic!("the run is reported: {:#?}", st.resources));
    assert_eq!(run.result, "success");
    assert_eq!(
        s.device
            .systemctl(&["is-active", "flotilla-test-remain.service"]),
        "active",
        "a RemainAfterExit=yes oneshot stays active under state running"
    );

    // A generation that changes nothing of the unit: no second run.
    let other = file("o/other", &s.share.join("other"), "x\n");
    apply(&store, "once", 2, resources("v1\n", "sleep 1", Some(other))).await;
    wait_status(&store, "once", "converged on 2", |st| st.converged_on(2)).await;
    assert_eq!(runs(&log).len(), 1, "no change, no run");

    // Its restartOn input changed: one more run.
    apply(&store, "once", 3, resources("v2\n", "sleep 1", None)).await;
    wait_status(&store, "once", "converged on 3", |st| st.converged_on(3)).await;
    assert_eq!(runs(&log).len(), 2);

    // A run that fails is reported, and not repeated for the same unit.
    apply(&store, "once", 4, resources("v2\n", "exit 4", None)).await;
    let st = wait_status(&store, "once", "the failed run", |st| {
        st.manifest_generation == 4
            && failed_reason(st, "o/setup").is_some_and(|(r, _)| r == "UnitRunFailed")
    })
    .await;
    assert!(!st.converged_on(4));
    wait_status(&store, "once", "three retries", |st| {
        failed_reason(st, "o/setup").is_some_and(|(_, attempts)| attempts >= 4)
    })
    .await;
    assert_eq!(
        runs(&log),
        vec![
            Some("success 0".to_owned()),
            Some("success 0".to_owned()),
            Some("exit-code 4".to_owned())
        ]
    );
}

#[tokio::test]
async fn running_a_oneshot_that_never_stays_active_is_refused_not_looped() {
    let s = setup("loop").await;
    let store = s.h.store().await;
    let log = s.share.join("loop.log");
    apply(
        &store,
        "loop",
        1,
        // No `state`: the default, running.
        // No RefuseManualStart either: nothing but the agent keeps it from running.
        json!([unit("l/job", json!({"unit": "flotilla-test-loop.service",
            "content": "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo start >> /flotilla/loop.log'\n"}))]),
    )
    .await;
    wait_status(&store, "loop", "refused", |st| {
        failed_reason(st, "l/job")
            .is_some_and(|(r, attempts)| r == "UnitNeverStaysActive" && attempts >= 3)
    })
    .await;
    assert!(runs(&log).is_empty(), "never started: {:?}", runs(&log));
}
