//! The Container reconciler's decisions, pure: the label hash, engine
//! names, what to do with the containers a resource has ([`plan`]) and how a
//! container is doing ([`assess`]).

use std::time::{Duration, SystemTime};

use manifest_types::spec::RestartPolicy;
use manifest_types::{AgentId, ContainerSpec, FailureReason, ReadyDetails, ResourceId};

use super::engine::{ContainerStatus, HealthStatus, Inspected, ListedState};
use super::{CRASH_WINDOW, HEALTH_RECHECK};
use crate::reconcile::Outcome;

/// The label hash: the spec hash, combined with the hash of the
/// `restartOn` inputs ([`crate::reconcile::inputs_hash`]) when there are any, so a
/// change to an input replaces the container.
pub fn effective_hash(spec_hash: &str, inputs_hash: &str) -> String {
    if inputs_hash.is_empty() {
        return spec_hash.to_owned();
    }
    crate::reconcile::file::sha256_hex(format!("{spec_hash}\n{inputs_hash}").as_bytes())
}

/// The engine-side name: readable, unique per agent, resource and hash.
/// Names are never used to find containers; labels are.
pub fn container_name(agent: &AgentId, id: &ResourceId, hash: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    format!(
        "flotilla.{}.{}.{}",
        clean(agent.as_str()),
        clean(id.as_ref()),
        &hash[..hash.len().min(12)]
    )
}

/// The image reference to create from (and pull): pinned by digest when given.
pub fn image_ref(spec: &ContainerSpec) -> String {
    match &spec.digest {
        Some(d) if !spec.image.contains('@') => format!("{}@{d}", spec.image),
        _ => spec.image.clone(),
    }
}

/// What a label-filtered list says about one of our containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    pub hash: String,
    pub state: ListedState,
    pub created: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No usable container with the wanted hash: pull, create, swap.
    /// `clear`: dead or half-removed containers of the wanted hash, which
    /// hold its (deterministic) name, removed before the create; `replace`:
    /// every other container of the resource, removed after the swap.
    Create {
        clear: Vec<String>,
        replace: Vec<String>,
    },
    /// The container exists but is not running. `repair` when someone
    /// stopped it (as opposed to a create whose start never happened).
    Start {
        id: String,
        repair: bool,
        remove: Vec<String>,
    },
    /// Look at it and report; remove the extras.
    Observe { id: String, remove: Vec<String> },
}

/// Decides what to do with this resource's containers.
pub fn plan(hash: &str, policy: RestartPolicy, listed: &[Listed]) -> Plan {
    let best = listed
        .iter()
        .filter(|c| c.hash == hash && c.state != ListedState::Gone)
        .max_by_key(|c| (c.state, c.created));
    let others = |keep: &str| -> Vec<String> {
        listed
            .iter()
            .filter(|c| c.id != keep)
            .map(|c| c.id.clone())
            .collect()
    };
    let Some(best) = best else {
        let (clear, replace) = listed
            .iter()
            .partition::<Vec<&Listed>, _>(|c| c.hash == hash && c.state == ListedState::Gone);
        let ids = |l: Vec<&Listed>| l.into_iter().map(|c| c.id.clone()).collect();
        return Plan::Create {
            clear: ids(clear),
            replace: ids(replace),
        };
    };
    let remove = others(&best.id);
    let engine_restarts = matches!(policy, RestartPolicy::Always | RestartPolicy::UnlessStopped);
    match best.state {
        ListedState::Created => Plan::Start {
            id: best.id.clone(),
            repair: false,
            remove,
        },
        // Under always/unless-stopped the engine restarts exits itself, so an
        // exited container was stopped by hand: repair it. Under no/on-failure
        // an exit is the process's own business: report it.
        ListedState::Exited if engine_restarts => Plan::Start {
            id: best.id.clone(),
            repair: true,
            remove,
        },
        _ => Plan::Observe {
            id: best.id.clone(),
            remove,
        },
    }
}

/// Reads an engine's container state into Ready or a typed failure.
pub fn assess(inspect: &Inspected, now: SystemTime, repairs: u64) -> Outcome {
    let exit_code = inspect.exit_code;
    let restart_count = inspect.restart_count;
    match inspect.status {
        // Between two runs: the engine still shows the last exit code.
        ContainerStatus::Restarting => {
            return Outcome::failed(
                FailureReason::CrashLoopBackOff,
                format!(
                    "container keeps exiting: last exit code {exit_code}, restarted {restart_count} times by the engine"
                ),
            );
        }
        ContainerStatus::Running => {}
        ContainerStatus::Paused => {
            return Outcome::failed(FailureReason::ContainerPaused, "container is paused");
        }
        ContainerStatus::Exited => {
            return Outcome::failed(
                FailureReason::ContainerExited,
                format!(
                    "container exited with code {exit_code} at {}; its restart policy does not restart it",
                    inspect.finished_at
                ),
            );
        }
        other => {
            return Outcome::failed(
                FailureReason::ContainerNotRunning,
                format!("container is {other}"),
            );
        }
    }
    let up_for = humantime::parse_rfc3339_weak(&inspect.started_at)
        .ok()
        .and_then(|t| now.duration_since(t).ok())
        .unwrap_or(Duration::MAX);
    // Running again after a restart: the engine has reset the exit code.
    if restart_count > 0 && up_for < CRASH_WINDOW {
        return Outcome::failed(
            FailureReason::CrashLoopBackOff,
            format!(
                "container keeps exiting: restarted {restart_count} times by the engine, up only {:.1} s since the last restart",
                up_for.as_secs_f64()
            ),
        );
    }
    match inspect.health {
        Some(HealthStatus::Unhealthy) => {
            return Outcome::failed(
                FailureReason::Unhealthy,
                "the container's healthcheck reports unhealthy",
            );
        }
        // Ready only once the engine says healthy.
        Some(HealthStatus::Starting) => {
            return Outcome::Waiting {
                message: "running; healthcheck still starting".into(),
                recheck_after: HEALTH_RECHECK,
            };
        }
        Some(HealthStatus::Healthy) | None => {}
    }
    Outcome::ready(ReadyDetails::Container {
        container_id: inspect.id.clone(),
        image_id: inspect.image_id.clone(),
        image_digest: None,
        running_since: inspect.started_at.clone(),
        restart_count,
        repairs,
        health: inspect.health.map(|h| h.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::Failure;

    fn listed(id: &str, hash: &str, state: ListedState, created: i64) -> Listed {
        Listed {
            id: id.into(),
            hash: hash.into(),
            state,
            created,
        }
    }

    #[test]
    fn nothing_listed_creates() {
        assert_eq!(
            plan("h", RestartPolicy::Always, &[]),
            Plan::Create {
                clear: vec![],
                replace: vec![]
            }
        );
    }

    #[test]
    fn a_dead_container_holding_the_name_is_cleared_before_the_create() {
        let l = [
            listed("dead", "h", ListedState::Gone, 9),
            listed("old", "x", ListedState::Running, 1),
            listed("older-dead", "y", ListedState::Gone, 0),
        ];
        assert_eq!(
            plan("h", RestartPolicy::Always, &l),
            Plan::Create {
                clear: vec!["dead".into()],
                replace: vec!["old".into(), "older-dead".into()]
            }
        );
    }

    #[test]
    fn changed_hash_replaces_every_old_container() {
        let l = [
            listed("a", "old", ListedState::Running, 1),
            listed("b", "older", ListedState::Exited, 0),
        ];
        assert_eq!(
            plan("new", RestartPolicy::Always, &l),
            Plan::Create {
                clear: vec![],
                replace: vec!["a".into(), "b".into()]
            }
        );
    }

    #[test]
    fn created_but_never_started_is_started_not_recreated() {
        // The agent died between create and start.
        let l = [listed("a", "h", ListedState::Created, 1)];
        assert_eq!(
            plan("h", RestartPolicy::Always, &l),
            Plan::Start {
                id: "a".into(),
                repair: false,
                remove: vec![]
            }
        );
    }

    #[test]
    fn stopped_by_hand_is_repaired_only_when_the_engine_would_restart_it() {
        let l = [listed("a", "h", ListedState::Exited, 1)];
        assert!(matches!(
            plan("h", RestartPolicy::Always, &l),
            Plan::Start { repair: true, .. }
        ));
        assert!(matches!(
            plan("h", RestartPolicy::UnlessStopped, &l),
            Plan::Start { repair: true, .. }
        ));
        assert!(matches!(
            plan("h", RestartPolicy::No, &l),
            Plan::Observe { .. }
        ));
        assert!(matches!(
            plan("h", RestartPolicy::OnFailure, &l),
            Plan::Observe { .. }
        ));
    }

    #[test]
    fn duplicates_keep_the_running_one_and_remove_the_rest() {
        let l = [
            listed("new-created", "h", ListedState::Created, 5),
            listed("running", "h", ListedState::Running, 1),
            listed("dead", "h", ListedState::Gone, 9),
            listed("stale", "x", ListedState::Running, 9),
        ];
        assert_eq!(
            plan("h", RestartPolicy::Always, &l),
            Plan::Observe {
                id: "running".into(),
                remove: vec!["new-created".into(), "dead".into(), "stale".into()]
            }
        );
    }

    #[test]
    fn restart_inputs_change_the_hash() {
        assert_ne!(
            effective_hash("s", "inputs-1"),
            effective_hash("s", "inputs-2")
        );
        assert_eq!(effective_hash("s", ""), "s");
    }

    #[test]
    fn names_are_engine_safe_and_carry_the_hash() {
        let agent = AgentId::new("pi-1").unwrap();
        let id: ResourceId = "web/nginx".parse().unwrap();
        let n = container_name(&agent, &id, "0123456789abcdef");
        assert_eq!(n, "flotilla.pi-1.web-nginx.0123456789ab");
    }

    fn inspect(status: ContainerStatus, restarts: u64, started: &str) -> Inspected {
        Inspected {
            id: "cid".into(),
            image_id: "sha256:img".into(),
            status,
            exit_code: 3,
            restart_count: restarts,
            started_at: started.into(),
            finished_at: String::new(),
            created: None,
            health: Some(HealthStatus::Healthy),
        }
    }

    #[test]
    fn assess_ready_crashloop_and_exit() {
        let now = humantime::parse_rfc3339("2026-11-23T12:00:00Z").unwrap();
        let ready = assess(
            &inspect(ContainerStatus::Running, 0, "2026-11-23T11:59:59.5Z"),
            now,
            2,
        );
        match ready {
            Outcome::Ready {
                details:
                    ReadyDetails::Container {
                        container_id,
                        restart_count,
                        repairs,
                        health,
                        ..
                    },
                ..
            } => {
                assert_eq!(container_id, "cid");
                assert_eq!(restart_count, 0);
                assert_eq!(repairs, 2);
                assert_eq!(health.as_deref(), Some("healthy"));
            }
            o => panic!("{o:?}"),
        }
        // Restarted and up only briefly: crash loop, with the exit code.
        match assess(
            &inspect(
                ContainerStatus::Running,
                4,
                "2026-11-23T11:59:58.123456789Z",
            ),
            now,
            0,
        ) {
            Outcome::Failed(Failure { reason, message }) => {
                assert_eq!(reason, FailureReason::CrashLoopBackOff);
                assert!(message.contains("4 times"), "{message}");
                assert!(message.contains("up only 1.9 s"), "{message}");
            }
            o => panic!("{o:?}"),
        }
        // Restarted long ago and stable since: Ready, restarts reported.
        assert!(matches!(
            assess(
                &inspect(ContainerStatus::Running, 4, "2026-11-23T11:00:00Z"),
                now,
                0
            ),
            Outcome::Ready {
                details: ReadyDetails::Container {
                    restart_count: 4,
                    ..
                },
                ..
            }
        ));
        assert!(matches!(
            assess(&inspect(ContainerStatus::Restarting, 1, ""), now, 0),
            Outcome::Failed(Failure {
                reason: FailureReason::CrashLoopBackOff,
                ..
            })
        ));
        assert!(matches!(
            assess(&inspect(ContainerStatus::Exited, 0, ""), now, 0),
            Outcome::Failed(Failure {
                reason: FailureReason::ContainerExited,
                ..
            })
        ));
    }

    #[test]
    fn health_starting_is_waiting_and_unhealthy_failed() {
        let now = humantime::parse_rfc3339("2026-11-23T12:00:00Z").unwrap();
        let with_health = |h| {
            let mut i = inspect(ContainerStatus::Running, 0, "2026-11-23T11:00:00Z");
            i.health = h;
            i
        };
        assert!(matches!(
            assess(&with_health(Some(HealthStatus::Starting)), now, 0),
            Outcome::Waiting { .. }
        ));
        assert!(matches!(
            assess(&with_health(Some(HealthStatus::Unhealthy)), now, 0),
            Outcome::Failed(Failure {
                reason: FailureReason::Unhealthy,
                ..
            })
        ));
        assert!(matches!(
            assess(&with_health(None), now, 0),
            Outcome::Ready { .. }
        ));
    }
}
