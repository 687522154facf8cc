//! Golden files pin the JSON shape of every wire type: a renamed field or a
//! changed default fails here before it reaches a fleet. Regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p manifest-types --all-features` and review the diff.
//! The comparison always comes first: with `UPDATE_GOLDEN` set, a file that
//! differs is reported (with its first differing lines), rewritten, and the
//! test still fails, so a run can never pass by comparing a file with itself.

use std::collections::BTreeMap;
use std::path::PathBuf;

use manifest_types::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Compares `want` with the file at `path`; on a difference reports it and,
/// only then, rewrites the file when `UPDATE_GOLDEN` is set. Fails on any
/// difference either way.
fn compare_then_update(path: &std::path::Path, want: &str) {
    let current = std::fs::read_to_string(path).ok();
    if current.as_deref() == Some(want) {
        return;
    }
    let diff = match &current {
        Some(current) => first_difference(current, want),
        None => "the file does not exist".to_owned(),
    };
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, want).unwrap();
        panic!(
            "{} differed and was rewritten; review `git diff` and re-run without UPDATE_GOLDEN:\n{diff}",
            path.display()
        );
    }
    panic!(
        "{} is stale (regenerate with UPDATE_GOLDEN=1 and review):\n{diff}",
        path.display()
    );
}

/// The first differing line of two texts, with its line number.
fn first_difference(old: &str, new: &str) -> String {
    let (mut old_lines, mut new_lines) = (old.lines(), new.lines());
    for n in 1.. {
        match (old_lines.next(), new_lines.next()) {
            (None, None) => break,
            (a, b) if a == b => continue,
            (a, b) => {
                return format!(
                    "line {n}:\n- {}\n+ {}",
                    a.unwrap_or("<end of file>"),
                    b.unwrap_or("<end of file>")
                );
            }
        }
    }
    "only the final newline differs".to_owned()
}

/// Serialises `value`, compares with the golden file, and parses the file back.
fn check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(name: &str, value: &T) {
    let path = golden_path(name);
    let mut text = serde_json::to_string_pretty(value).unwrap();
    text.push('\n');
    compare_then_update(&path, &text);
    let golden = std::fs::read_to_string(&path).unwrap();
    let parsed: T = serde_json::from_str(&golden).unwrap();
    assert_eq!(&parsed, value, "{name} does not round-trip");
}

fn id<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().unwrap()
}

fn manifest() -> AgentManifest {
    let d = Deployment::from_json(include_bytes!("golden/deployment.json")).unwrap();
    AgentManifest {
        agent_id: id("pi-01"),
        generation: 4,
        resources: d.render_resources(12).unwrap(),
        signatures: vec![Signature {
            key_id: "OCONTROLPLANEPUBLICKEYEXAMPLEAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
            sig: "c2lnbmF0dXJlLWJ5dGVzLWdvLWhlcmU".into(),
        }],
    }
}

#[test]
fn deployment() {
    let d = Deployment::from_json(include_bytes!("golden/deployment.json")).unwrap();
    assert_eq!(d.resources.len(), 3);
    check("deployment.json", &d);
}

#[test]
fn agent_manifest() {
    check("agent-manifest.json", &manifest());
}

#[test]
fn agent_status() {
    let m = manifest();
    let mut resources = BTreeMap::new();
    let hash = |i: usize| m.resources[i].spec_hash();
    resources.insert(
        m.resources[0].id.clone(),
        ResourceStatus {
            kind: "File".into(),
            spec_hash: hash(0),
            source: m.resources[0].source.clone(),
            state: ResourceState::Ready {
                since: "2026-11-22T10:00:00Z".into(),
                details: ReadyDetails::File {
                    sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                        .into(),
                    size: 4,
                    mode: "0644".into(),
                    uid: 0,
                    gid: 0,
                },
            },
        },
    );
    resources.insert(
        m.resources[1].id.clone(),
        ResourceStatus {
            kind: "SystemdUnit".into(),
            spec_hash: hash(1),
            source: m.resources[1].source.clone(),
            state: ResourceState::Failed {
                since: "2026-11-22T10:00:01Z".into(),
                reason: "ReconcilerUnavailable".into(),
                message: "reconciler not available on this agent".into(),
                attempts: 3,
                retry_after_seconds: Some(40),
            },
        },
    );
    resources.insert(
        m.resources[2].id.clone(),
        ResourceStatus {
            kind: "Container".into(),
            spec_hash: hash(2),
            source: m.resources[2].source.clone(),
            state: ResourceState::Ready {
                since: "2026-11-22T10:00:02Z".into(),
                details: ReadyDetails::Container {
                    container_id: "4f2c".into(),
                    image_id: "sha256:abcd".into(),
                    image_digest: None,
                    running_since: "2026-11-22T10:00:02Z".into(),
                    restart_count: 0,
                    repairs: 1,
                    health: Some("healthy".into()),
                },
            },
        },
    );
    let status = AgentStatus {
        api_version: ApiVersion,
        agent_id: id("pi-01"),
        instance_id: "2d9c6f8e-1f0a-4a57-9a43-6f3e2b1c0d9e".into(),
        manifest_generation: 4,
        observed_generation: 5,
        observed_revision: 31,
        resources,
        conditions: vec![
            Condition {
                type_: ConditionType::Ready,
                status: false,
                reason: "ResourcesFailed".into(),
                message: "1 of 3 resources failed".into(),
                last_transition_time: "2026-11-22T10:00:01Z".into(),
            },
            Condition {
                type_: ConditionType::ManifestRejected,
                status: true,
                reason: "PathOutsideRoots".into(),
                message: "resource web/config: /root/x is outside every file root".into(),
                last_transition_time: "2026-11-22T10:00:03Z".into(),
            },
        ],
        rejection: Some(Rejection {
            reason: manifest_types::RejectionReason::PathOutsideRoots,
            message: "resource web/config: /root/x is outside every file root".into(),
            revision: 31,
            generation: Some(5),
        }),
        released: vec![ReleasedResource {
            id: id("old/motd"),
            target: "/etc/motd".into(),
            reason: manifest_types::ReleaseReason::ChangedSinceWritten,
            message: Some("changed by someone else since the agent wrote it; left in place".into()),
        }],
        removing: vec![manifest_types::RemovingResource {
            id: id("old/web"),
            kind: "Container".into(),
            reason: manifest_types::FailureReason::DockerUnavailable.into(),
            message: "cannot reach the Docker Engine: connection refused".into(),
            attempts: 2,
            retry_after_seconds: Some(2),
        }],
        agent: AgentBuild {
            version: "0.1.0".into(),
            arch: "aarch64".into(),
            os: "linux".into(),
        },
    };
    check("agent-status.json", &status);
}

#[test]
fn inventory_and_heartbeat() {
    let inv = AgentInventory {
        api_version: ApiVersion,
        agent_id: id("pi-01"),
        instance_id: "2d9c6f8e-1f0a-4a57-9a43-6f3e2b1c0d9e".into(),
        agent_version: "0.1.0".into(),
        arch: "aarch64".into(),
        os: "linux".into(),
        hostname: Some("pi-01".into()),
        reconcilers: vec![ResourceKind::File, ResourceKind::Container],
        engines: vec![
            manifest_types::EngineStatus {
                kind: ResourceKind::File,
                engine: "filesystem".into(),
                reachable: true,
                version: None,
                message: None,
            },
            manifest_types::EngineStatus {
                kind: ResourceKind::Container,
                engine: "Docker Engine".into(),
                reachable: false,
                version: None,
                message: Some("cannot reach the Docker Engine: connection refused".into()),
            },
        ],
        labels: [("role".to_owned(), "kiosk".to_owned())].into(),
    };
    check("agent-inventory.json", &inv);
    let hb = Heartbeat {
        api_version: ApiVersion,
        agent_id: id("pi-01"),
        instance_id: inv.instance_id.clone(),
        seq: 42,
        manifest_generation: 4,
        ready: true,
        identity_conflict: None,
        interval_ms: Some(15_000),
    };
    check("heartbeat.json", &hb);
}

#[test]
fn deployment_status() {
    let st = DeploymentStatus {
        api_version: ApiVersion,
        name: id("web"),
        observed_revision: 12,
        created_revision: 3,
        targets: [(id("pi-01"), 4), (id("pi-02"), 9)].into(),
        conflicts: vec![Conflict {
            agent: id("pi-02"),
            resource: id("web/config"),
            held_by: id("base/config"),
            target: "file /etc/app/config.toml".into(),
        }],
        render_failures: vec![RenderFailure {
            agent: id("pi-03"),
            resource: id("web/config"),
            message: "${values.site} is not set for agent pi-03".into(),
        }],
        error: None,
        rollout: None,
        held_back: Default::default(),
    };
    check("deployment-status.json", &st);
}

#[test]
fn heartbeat_settings() {
    let s = HeartbeatSettings {
        api_version: ApiVersion,
        interval_ms: 20_000,
        agents: 10_000,
        max_per_second: 500,
    };
    check("heartbeat-settings.json", &s);
}

#[test]
fn agent_values() {
    let v = AgentValues {
        api_version: ApiVersion,
        agent_id: id("pi-01"),
        values: [
            ("site".to_owned(), "berlin-2".to_owned()),
            ("cert".to_owned(), "/etc/flotilla/pi-01.pem".to_owned()),
        ]
        .into(),
        labels: [("role".to_owned(), "kiosk".to_owned())].into(),
    };
    check("agent-values.json", &v);
}

#[cfg(feature = "schema")]
#[test]
fn json_schemas_are_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/schema");
    for (name, schema) in [
        ("deployment.schema.json", schemars::schema_for!(Deployment)),
        (
            "agent-manifest.schema.json",
            schemars::schema_for!(AgentManifest),
        ),
        (
            "agent-status.schema.json",
            schemars::schema_for!(AgentStatus),
        ),
        (
            "agent-values.schema.json",
            schemars::schema_for!(AgentValues),
        ),
    ] {
        let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        compare_then_update(&dir.join(name), &text);
    }
}

#[test]
fn a_stale_golden_file_fails_even_when_updating() {
    let path = std::env::temp_dir().join(format!("flotilla-golden-{}.json", std::process::id()));
    std::fs::write(&path, "{\n  \"a\": 1\n}\n").unwrap();
    // Same text: passes.
    compare_then_update(&path, "{\n  \"a\": 1\n}\n");
    // Different text: fails whether or not UPDATE_GOLDEN is set, naming the line.
    let err = std::panic::catch_unwind(|| compare_then_update(&path, "{\n  \"a\": 2\n}\n"))
        .expect_err("a changed shape must fail");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("line 2:\n-   \"a\": 1\n+   \"a\": 2"), "{msg}");
    std::fs::remove_file(&path).ok();
}
