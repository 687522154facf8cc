//! Table tests of the convergence rule: each row is one observation and the
//! state (and reason) an operator must see.

use std::time::Duration;

use std::collections::BTreeMap;

use super::*;
use crate::ApiVersion;
use crate::deployment::{Deployment, DeploymentStatus};
use crate::ids::AgentId;
use crate::manifest::ResourceSource;
use crate::status::{AgentBuild, Condition, ReadyDetails, ResourceStatus};

const FRESH: Option<Duration> = Some(Duration::from_secs(2));

/// `(what, status, desired generation, heartbeat age, state, reason)`.
type AgentRow<'a> = (
    &'a str,
    Option<&'a AgentStatus>,
    u64,
    Option<Duration>,
    State,
    &'a str,
);
/// `(what, status, expected resources, heartbeat age, state, reason)`.
type DeploymentRow<'a> = (
    &'a str,
    &'a AgentStatus,
    &'a [&'a str],
    Option<Duration>,
    State,
    &'a str,
);

fn rid(s: &str) -> ResourceId {
    ResourceId::new(s).unwrap()
}

fn web() -> DeploymentName {
    DeploymentName::new("web").unwrap()
}

fn ready() -> ResourceState {
    ResourceState::Ready {
        since: "t".into(),
        details: ReadyDetails::File {
            sha256: "ab".into(),
            size: 1,
            mode: "0644".into(),
            uid: 0,
            gid: 0,
        },
    }
}

fn failed() -> ResourceState {
    ResourceState::Failed {
        since: "t".into(),
        reason: "ImagePullFailed".into(),
        message: "no such image".into(),
        attempts: 2,
        retry_after_seconds: Some(4),
    }
}

fn reconciling() -> ResourceState {
    ResourceState::Reconciling {
        message: "pulling".into(),
    }
}

/// A status on manifest `generation` with Ready = `ready` and the given
/// resources `(id, deployment revision, state)`.
fn status(generation: u64, ready: bool, resources: &[(&str, u64, ResourceState)]) -> AgentStatus {
    AgentStatus {
        api_version: ApiVersion,
        agent_id: AgentId::new("pi-1").unwrap(),
        instance_id: "i".into(),
        manifest_generation: generation,
        observed_generation: generation,
        observed_revision: 10,
        resources: resources
            .iter()
            .map(|(id, rev, state)| {
                let id = rid(id);
                let source = id.deployment().map(|d| ResourceSource {
                    deployment: DeploymentName::new(d).unwrap(),
                    revision: *rev,
                });
                (
                    id,
                    ResourceStatus {
                        kind: "File".into(),
                        spec_hash: "h".into(),
                        source,
                        state: state.clone(),
                    },
                )
            })
            .collect(),
        conditions: vec![
            Condition {
                type_: ConditionType::Ready,
                status: ready,
                reason: if ready { "AllReady" } else { "NotAllReady" }.into(),
                message: String::new(),
                last_transition_time: "t".into(),
            },
            Condition {
                type_: ConditionType::Degraded,
                status: resources
                    .iter()
                    .any(|(_, _, s)| matches!(s, ResourceState::Failed { .. })),
                reason: "R".into(),
                message: String::new(),
                last_transition_time: "t".into(),
            },
        ],
        rejection: None,
        released: vec![],
        removing: vec![],
        agent: AgentBuild {
            version: "0".into(),
            arch: "x".into(),
            os: "linux".into(),
        },
    }
}

fn rejected(mut s: AgentStatus, generation: Option<u64>) -> AgentStatus {
    s.rejection = Some(Rejection {
        reason: crate::RejectionReason::PathOutsideRoots,
        message: "/x is outside every file root".into(),
        revision: 12,
        generation,
    });
    s
}

fn conflicted(mut s: AgentStatus) -> AgentStatus {
    s.conditions.push(Condition {
        type_: ConditionType::IdentityConflict,
        status: true,
        reason: "OtherInstance".into(),
        message: "instance j writes this key".into(),
        last_transition_time: "t".into(),
    });
    s
}

fn agent(
    status: Option<&AgentStatus>,
    generation: u64,
    heartbeat_age: Option<Duration>,
) -> Verdict {
    assess(
        &AgentReport {
            status,
            heartbeat_age,
            heartbeat_conflict: None,
            ..Default::default()
        },
        Target::Agent { generation },
        &Thresholds::default(),
    )
}

fn deployment(
    status: Option<&AgentStatus>,
    generation: u64,
    revision: u64,
    resources: &[&str],
    heartbeat_age: Option<Duration>,
) -> Verdict {
    let resources: Vec<ResourceId> = resources.iter().map(|r| rid(r)).collect();
    let name = web();
    assess(
        &AgentReport {
            status,
            heartbeat_age,
            heartbeat_conflict: None,
            ..Default::default()
        },
        Target::Deployment {
            name: &name,
            revision,
            generation,
            resources: &resources,
        },
        &Thresholds::default(),
    )
}

#[test]
fn default_thresholds_derive_from_the_heartbeat_interval() {
    let s = Duration::from_secs;
    let t = Thresholds::default();
    assert_eq!(t.limits(None), (s(45), s(150)));
    // An agent that declares its interval is judged by it.
    assert_eq!(t.limits(Some(s(2))), (s(6), s(20)));
    let t = Thresholds::from_heartbeat_interval(s(2));
    assert_eq!(t.limits(None), (s(6), s(20)));
    assert_eq!(t.limits(Some(s(60))), (s(180), s(600)));
    // A declared interval above an hour is taken as an hour.
    assert_eq!(t.limits(Some(s(100_000))), (s(3 * 3600), s(10 * 3600)));
    // Fixed limits win; Offline never before Stale.
    let t = Thresholds::fixed(s(5), s(9));
    assert_eq!(t.limits(Some(s(60))), (s(5), s(9)));
    let t = Thresholds {
        offline_after: Some(s(1)),
        ..Thresholds::default()
    };
    assert_eq!(t.limits(Some(s(2))), (s(6), s(6)));
}

#[test]
fn liveness_is_the_heartbeat_age_against_the_declared_interval() {
    let s = Duration::from_secs;
    let st = status(4, true, &[]);
    let t = Thresholds::default();
    let report = |heartbeat_age, heartbeat_interval, status_age, status| AgentReport {
        status,
        heartbeat_age,
        heartbeat_interval,
        status_age,
        ..Default::default()
    };
    let cases = [
        (
            report(Some(s(1)), Some(s(1)), None, Some(&st)),
            Liveness::Online,
        ),
        (
            report(Some(s(4)), Some(s(1)), None, Some(&st)),
            Liveness::Stale,
        ),
        (
            report(Some(s(11)), Some(s(1)), None, Some(&st)),
            Liveness::Offline,
        ),
        // A slow interval: the same ages are fine.
        (
            report(Some(s(11)), Some(s(60)), None, Some(&st)),
            Liveness::Online,
        ),
        // No heartbeat: a status is Stale, an old status Offline, nothing at all Offline.
        (report(None, None, Some(s(1)), Some(&st)), Liveness::Stale),
        (
            report(None, None, Some(s(1000)), Some(&st)),
            Liveness::Offline,
        ),
        (report(None, None, None, None), Liveness::Offline),
    ];
    for (i, (r, want)) in cases.iter().enumerate() {
        assert_eq!(liveness(r, &t).0, *want, "case {i}");
        let v = assess(r, Target::Agent { generation: 4 }, &t);
        assert_eq!(v.liveness, *want, "case {i}");
    }
    // Status never looks fresher than the heartbeat: Ready but Offline.
    let v = assess(&cases[2].0, Target::Agent { generation: 4 }, &t);
    assert_eq!(v.state, State::Offline);
    // Never heard of at all is Pending (nothing to say about convergence).
    let v = assess(&cases[6].0, Target::Agent { generation: 4 }, &t);
    assert_eq!(v.state, State::Pending);
}

#[test]
fn whole_agent_table() {
    let converged = status(4, true, &[("web/motd", 7, ready())]);
    let empty_converged = status(4, true, &[]);
    let behind = status(3, true, &[("web/motd", 6, ready())]);
    let failing = status(4, false, &[("web/motd", 7, failed())]);
    let working = status(4, false, &[("web/motd", 7, reconciling())]);
    // Ready condition says true but a resource is not: the resource wins.
    let lying = status(4, true, &[("web/motd", 7, reconciling())]);
    let not_ready = status(4, false, &[]);
    let rejected_newer = rejected(status(3, true, &[]), Some(4));
    let rejected_older = rejected(status(3, true, &[]), Some(4));
    let malformed = rejected(status(3, true, &[]), None);
    let conflict = conflicted(status(4, true, &[]));
    let nothing = status(0, true, &[]);
    let s = Duration::from_secs;
    let rows: Vec<AgentRow<'_>> = vec![
        (
            "converged",
            Some(&converged),
            4,
            FRESH,
            State::Converged,
            "",
        ),
        (
            "empty manifest, truly empty",
            Some(&empty_converged),
            4,
            FRESH,
            State::Converged,
            "",
        ),
        (
            "nothing desired, nothing run",
            Some(&nothing),
            0,
            FRESH,
            State::Converged,
            "",
        ),
        (
            "no status",
            None,
            4,
            FRESH,
            State::Pending,
            "no status reported yet",
        ),
        (
            "no status, never seen",
            None,
            4,
            None,
            State::Pending,
            "no status reported yet",
        ),
        (
            "behind",
            Some(&behind),
            4,
            FRESH,
            State::Progressing,
            "on manifest generation 3, waiting for 4",
        ),
        (
            "ahead of the desired key",
            Some(&converged),
            3,
            FRESH,
            State::Progressing,
            "on manifest generation 4, above the desired generation 3",
        ),
        (
            "failing resource",
            Some(&failing),
            4,
            FRESH,
            State::Degraded,
            "web/motd Failed: ImagePullFailed: no such image",
        ),
        (
            "reconciling resource",
            Some(&working),
            4,
            FRESH,
            State::Progressing,
            "web/motd Reconciling: pulling",
        ),
        (
            "Ready condition contradicted by a resource",
            Some(&lying),
            4,
            FRESH,
            State::Progressing,
            "web/motd Reconciling: pulling",
        ),
        (
            "not Ready, no resource to blame",
            Some(&not_ready),
            4,
            FRESH,
            State::Progressing,
            "not Ready: NotAllReady",
        ),
        (
            "rejected the desired generation",
            Some(&rejected_newer),
            4,
            FRESH,
            State::Rejected,
            "PathOutsideRoots: /x is outside every file root (KV sequence 12, generation 4)",
        ),
        (
            "rejection superseded by a newer desired generation",
            Some(&rejected_older),
            5,
            FRESH,
            State::Progressing,
            "on manifest generation 3, waiting for 5",
        ),
        (
            "malformed value has no generation: counts",
            Some(&malformed),
            4,
            FRESH,
            State::Rejected,
            "PathOutsideRoots: /x is outside every file root (KV sequence 12)",
        ),
        (
            "identity conflict beats converged",
            Some(&conflict),
            4,
            FRESH,
            State::IdentityConflict,
            "identity conflict: instance j writes this key",
        ),
        (
            "stale whatever it says",
            Some(&converged),
            4,
            Some(s(46)),
            State::Stale,
            "last heartbeat 46s ago",
        ),
        (
            "exactly at the stale limit is still live",
            Some(&converged),
            4,
            Some(s(45)),
            State::Converged,
            "",
        ),
        (
            "offline whatever it says",
            Some(&converged),
            4,
            Some(s(151)),
            State::Offline,
            "last heartbeat 151s ago",
        ),
        (
            "offline without a status",
            None,
            4,
            Some(s(600)),
            State::Offline,
            "last heartbeat 600s ago",
        ),
        (
            "status but no heartbeat is not fresh",
            Some(&converged),
            4,
            None,
            State::Stale,
            "no heartbeat read",
        ),
        (
            "stale beats rejected",
            Some(&rejected_newer),
            4,
            Some(s(60)),
            State::Stale,
            "last heartbeat 60s ago",
        ),
    ];
    for (what, st, generation, age, want, detail) in rows {
        let v = agent(st, generation, age);
        assert_eq!(v.state, want, "{what}: {v:?}");
        assert_eq!(v.detail(), detail, "{what}");
        assert_eq!(v.is_converged(), want == State::Converged, "{what}");
    }
}

#[test]
fn one_deployment_table() {
    let motd = ("web/motd", 7, ready());
    let conf = ("web/conf", 7, ready());
    let both = status(4, true, &[motd.clone(), conf.clone()]);
    let other_failing = status(
        6,
        false,
        &[motd.clone(), conf.clone(), ("db/x", 2, failed())],
    );
    let old_revision = status(4, true, &[("web/motd", 6, ready()), conf.clone()]);
    let one_missing = status(4, true, std::slice::from_ref(&motd));
    let ours_failing = status(4, false, &[("web/motd", 7, failed()), conf.clone()]);
    let ours_pending = status(
        4,
        false,
        &[("web/motd", 7, ResourceState::Pending), conf.clone()],
    );
    let left_over = status(
        4,
        false,
        &[motd.clone(), conf.clone(), ("web/old", 6, failed())],
    );
    let nothing_of_ours = status(4, true, &[("db/x", 2, ready())]);
    let behind = status(3, true, &[motd.clone(), conf.clone()]);
    let rejected_it = rejected(status(3, true, &[]), Some(4));
    let rows: Vec<DeploymentRow<'_>> = vec![
        (
            "all of ours at this revision and Ready",
            &both,
            &["web/motd", "web/conf"],
            FRESH,
            State::Converged,
            "",
        ),
        (
            "a later generation still carrying it; another deployment failing does not hold it back",
            &other_failing,
            &["web/motd", "web/conf"],
            FRESH,
            State::Converged,
            "",
        ),
        (
            "one resource at an older revision",
            &old_revision,
            &["web/motd", "web/conf"],
            FRESH,
            State::Progressing,
            "web/motd at revision 6, waiting for 7",
        ),
        (
            "a resource not reported: no convergence by vacuity",
            &one_missing,
            &["web/motd", "web/conf"],
            FRESH,
            State::Progressing,
            "web/conf not reported yet",
        ),
        (
            "none of ours reported at all",
            &nothing_of_ours,
            &["web/motd"],
            FRESH,
            State::Progressing,
            "web/motd not reported yet",
        ),
        (
            "a deployment that truly has no resources",
            &nothing_of_ours,
            &[],
            FRESH,
            State::Converged,
            "",
        ),
        (
            "ours failing",
            &ours_failing,
            &["web/motd", "web/conf"],
            FRESH,
            State::Degraded,
            "web/motd Failed: ImagePullFailed: no such image",
        ),
        (
            "ours pending",
            &ours_pending,
            &["web/motd", "web/conf"],
            FRESH,
            State::Progressing,
            "web/motd Pending",
        ),
        (
            "a dropped resource of ours still being removed",
            &left_over,
            &["web/motd", "web/conf"],
            FRESH,
            State::Progressing,
            "web/old is still being removed",
        ),
        (
            "behind the carrying generation",
            &behind,
            &["web/motd", "web/conf"],
            FRESH,
            State::Progressing,
            "on manifest generation 3, waiting for 4",
        ),
        (
            "rejected the carrying generation",
            &rejected_it,
            &["web/motd"],
            FRESH,
            State::Rejected,
            "PathOutsideRoots: /x is outside every file root (KV sequence 12, generation 4)",
        ),
        (
            "stale whatever it says",
            &both,
            &["web/motd", "web/conf"],
            Some(Duration::from_secs(100)),
            State::Stale,
            "last heartbeat 100s ago",
        ),
    ];
    for (what, st, resources, age, want, detail) in rows {
        let v = deployment(Some(st), 4, 7, resources, age);
        assert_eq!(v.state, want, "{what}: {v:?}");
        assert_eq!(v.detail(), detail, "{what}");
    }
    assert_eq!(
        deployment(None, 4, 7, &["web/motd"], FRESH).state,
        State::Pending
    );
}

#[test]
fn a_heartbeat_conflict_is_reported_even_when_the_status_looks_fine() {
    let s = status(4, true, &[]);
    let v = assess(
        &AgentReport {
            status: Some(&s),
            heartbeat_age: FRESH,
            heartbeat_conflict: Some("instance j heartbeats too"),
            ..Default::default()
        },
        Target::Agent { generation: 4 },
        &Thresholds::default(),
    );
    assert_eq!(v.state, State::IdentityConflict);
    assert_eq!(v.detail(), "identity conflict: instance j heartbeats too");
}

#[test]
fn the_rejection_is_reachable_typed() {
    let s = rejected(status(3, true, &[]), Some(4));
    let v = agent(Some(&s), 4, FRESH);
    assert_eq!(v.rejection().map(|r| r.revision), Some(12));
    assert!(
        agent(Some(&status(4, true, &[])), 4, FRESH)
            .rejection()
            .is_none()
    );
}

#[test]
fn states_sort_most_urgent_first() {
    let mut all = [
        State::Converged,
        State::Pending,
        State::Progressing,
        State::Degraded,
        State::Rejected,
        State::IdentityConflict,
        State::Stale,
        State::Offline,
    ];
    all.sort();
    assert_eq!(all.first(), Some(&State::Offline));
    assert_eq!(all.last(), Some(&State::Converged));
}

#[test]
fn progress_assesses_every_target_and_skips_conflicted_resources() {
    use crate::deployment::Conflict;
    let id = |s: &str| AgentId::new(s).unwrap();
    let ds = DeploymentStatus {
        api_version: ApiVersion,
        name: web(),
        observed_revision: 7,
        created_revision: 3,
        targets: [(id("a"), 4), (id("b"), 2), (id("c"), 5), (id("d"), 5)].into(),
        conflicts: vec![Conflict {
            agent: id("c"),
            resource: rid("web/conf"),
            held_by: rid("base/conf"),
            target: "file /etc/conf".into(),
        }],
        render_failures: vec![],
        error: None,
        rollout: None,
        held_back: Default::default(),
    };
    let resources = [rid("web/motd"), rid("web/conf")];
    let a = status(
        4,
        true,
        &[("web/motd", 7, ready()), ("web/conf", 7, ready())],
    );
    let c = status(5, true, &[("web/motd", 7, ready())]);
    let d = rejected(status(4, true, &[]), Some(5));
    let statuses: BTreeMap<AgentId, AgentStatus> =
        [(id("a"), a), (id("c"), c), (id("d"), d)].into();
    let p = Progress::of(
        &ds,
        &resources,
        |agent| AgentReport {
            status: statuses.get(agent),
            heartbeat_age: FRESH,
            heartbeat_conflict: None,
            ..Default::default()
        },
        &Thresholds::default(),
    );
    let states: Vec<(&str, State)> = p
        .targets
        .iter()
        .map(|(a, v)| (a.as_str(), v.state))
        .collect();
    assert_eq!(
        states,
        [
            ("a", State::Converged),
            ("b", State::Pending),
            // c's manifest lacks web/conf because base holds the target.
            ("c", State::Converged),
            ("d", State::Rejected),
        ]
    );
    assert_eq!((p.converged(), p.total()), (2, 4));
    assert!(!p.is_done());
    assert_eq!(
        p.rejected().map(|(a, _)| a.as_str()).collect::<Vec<_>>(),
        ["d"]
    );
    assert_eq!(p.not_converged().count(), 2);
    assert_eq!(p.line(&web(), 7), "web: 2/4 agents converged on revision 7");
    assert!(Progress::default().is_done());

    // A rollout holds a back on revision 5: converged there, not on 7.
    let held = DeploymentStatus {
        held_back: [(id("a"), Some(5))].into(),
        ..ds
    };
    let p = Progress::of(
        &held,
        &resources,
        |agent| AgentReport {
            status: statuses.get(agent),
            heartbeat_age: FRESH,
            ..Default::default()
        },
        &Thresholds::default(),
    );
    let a = &p.targets[&id("a")];
    assert_eq!(a.state, State::Progressing);
    assert_eq!(a.reason, Some(Reason::HeldBack { revision: Some(5) }));
    assert_eq!(a.detail(), "held at revision 5 by the rollout");
    // Held back on a revision it fails on: Degraded, never merely "held".
    let failing = status(4, false, &[("web/motd", 5, failed())]);
    let p = Progress::of(
        &held,
        &resources,
        |_| AgentReport {
            status: Some(&failing),
            heartbeat_age: FRESH,
            ..Default::default()
        },
        &Thresholds::default(),
    );
    assert_eq!(p.targets[&id("a")].state, State::Degraded);
}

#[test]
fn deployment_resources_are_the_rendered_ids() {
    let d = Deployment::from_json(include_bytes!("../../tests/golden/deployment.json")).unwrap();
    let ids = deployment_resources(&d);
    assert_eq!(ids.len(), d.resources.len());
    assert!(ids.iter().all(|i| i.deployment() == Some(d.name.as_str())));
}

#[test]
fn a_dropped_resource_whose_removal_failed_is_not_converged() {
    let mut s = status(4, false, &[("web/motd", 7, ready())]);
    s.removing.push(crate::RemovingResource {
        id: rid("web/old"),
        kind: "Container".into(),
        reason: crate::FailureReason::DockerUnavailable.into(),
        message: "engine down".into(),
        attempts: 1,
        retry_after_seconds: Some(1),
    });
    let v = deployment(Some(&s), 4, 7, &["web/motd"], FRESH);
    assert_eq!(v.state, State::Degraded, "{v:?}");
    assert_eq!(v.reason, Some(Reason::ResourceLeftOver(rid("web/old"))));
    // Another deployment's stuck removal does not hold this one back.
    s.removing[0].id = rid("db/old");
    s.conditions.clear();
    assert_eq!(
        deployment(Some(&s), 4, 7, &["web/motd"], FRESH).state,
        State::Converged
    );
    // The whole agent is not converged either way.
    assert_ne!(agent(Some(&s), 4, FRESH).state, State::Converged);
}

#[test]
fn an_override_never_hides_liveness_or_an_identity_conflict() {
    let reason = || Reason::HeldBack { revision: Some(3) };
    for (state, kept) in [
        (State::Offline, true),
        (State::Stale, true),
        (State::IdentityConflict, true),
        (State::Converged, false),
        (State::Progressing, false),
        (State::Degraded, false),
        (State::Rejected, false),
    ] {
        let v = Verdict {
            state,
            reason: None,
            liveness: Liveness::Online,
        };
        let o = v.clone().overridden(State::Progressing, reason());
        if kept {
            assert_eq!(o, v, "{state:?}");
        } else {
            assert_eq!((o.state, o.reason), (State::Progressing, Some(reason())));
        }
    }
}
