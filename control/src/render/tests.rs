use serde_json::json;

use super::*;

fn deployment(name: &str, selector: serde_json::Value, resources: serde_json::Value) -> Deployment {
    Deployment::from_value(json!({
        "apiVersion": manifest_types::API_VERSION, "kind": "Deployment", "name": name,
        "selector": selector, "resources": resources,
    }))
    .expect("test deployment is valid")
}

fn file(id: &str, path: &str, content: &str) -> serde_json::Value {
    json!({"id": id, "kind": "File", "spec": {"path": path, "content": content}})
}

fn unit(id: &str, unit: &str, restart_on: &[&str]) -> serde_json::Value {
    json!({"id": id, "kind": "SystemdUnit", "spec": {"unit": unit}, "restartOn": restart_on})
}

fn agent(id: &str) -> AgentId {
    AgentId::new(id).unwrap()
}

fn name(n: &str) -> DeploymentName {
    DeploymentName::new(n).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ids(resources: &[ManagedResource]) -> Vec<&str> {
    resources.iter().map(|r| r.id.as_str()).collect()
}

/// A fleet: deployments with (revision, created revision) and agents with labels.
struct Fleet {
    deployments: Vec<(DeploymentName, Result<Deployment, String>, u64, u64)>,
    agents: BTreeMap<AgentId, Labels>,
}

impl Fleet {
    fn new() -> Self {
        Self {
            deployments: Vec::new(),
            agents: BTreeMap::new(),
        }
    }

    fn deploy(mut self, d: Deployment, revision: u64, created: u64) -> Self {
        self.deployments
            .push((d.name.clone(), Ok(d), revision, created));
        self
    }

    fn broken(mut self, n: &str, error: &str, revision: u64) -> Self {
        self.deployments
            .push((name(n), Err(error.to_owned()), revision, revision));
        self
    }

    fn agent(mut self, id: &str, l: &[(&str, &str)]) -> Self {
        self.agents.insert(agent(id), labels(l));
        self
    }

    fn render(&self) -> Rendered {
        let inputs: Vec<DeploymentInput<'_>> = self
            .deployments
            .iter()
            .map(|(n, d, rev, created)| DeploymentInput {
                name: n,
                document: d.as_ref().map_err(String::as_str),
                revision: *rev,
                created_revision: *created,
            })
            .collect();
        render(&inputs, &self.agents)
    }
}

#[test]
fn selects_by_label_and_by_id_and_renders_sources() {
    let web = deployment(
        "web",
        json!({"matchLabels": {"role": "kiosk"}, "agents": ["pi-3"]}),
        json!([
            file("conf", "/etc/web.conf", "a"),
            unit("svc", "web.service", &["conf"])
        ]),
    );
    let out = Fleet::new()
        .deploy(web, 7, 7)
        .agent("pi-1", &[("role", "kiosk")])
        .agent("pi-2", &[("role", "sensor")])
        .agent("pi-3", &[])
        .render();

    assert_eq!(ids(&out.manifests[&agent("pi-1")]), ["web/conf", "web/svc"]);
    assert!(out.manifests[&agent("pi-2")].is_empty());
    assert_eq!(ids(&out.manifests[&agent("pi-3")]), ["web/conf", "web/svc"]);
    let svc = &out.manifests[&agent("pi-1")][1];
    assert_eq!(svc.restart_on[0].as_str(), "web/conf");
    let source = svc.source.as_ref().unwrap();
    assert_eq!((source.deployment.as_str(), source.revision), ("web", 7));

    let status = &out.deployments[&name("web")];
    assert_eq!(
        status.targets,
        [agent("pi-1"), agent("pi-3")].into_iter().collect()
    );
    assert!(status.conflicts.is_empty());
    assert_eq!(status.error, None);
}

#[test]
fn every_known_agent_gets_an_output_even_with_no_deployments() {
    let out = Fleet::new()
        .agent("pi-1", &[])
        .agent("pi-2", &[("a", "b")])
        .render();
    assert_eq!(out.manifests.len(), 2);
    assert!(out.manifests.values().all(Vec::is_empty));
    assert!(out.deployments.is_empty());
}

#[test]
fn earliest_created_deployment_keeps_a_contested_target() {
    // "base" was created first although its current revision is newer.
    let base = deployment(
        "base",
        json!({"matchLabels": {"site": "a"}}),
        json!([
            file("config", "/etc/app.toml", "base"),
            file("motd", "/etc/motd", "hi")
        ]),
    );
    let web = deployment(
        "web",
        json!({"agents": ["pi-2"]}),
        json!([
            file("config", "/etc/app.toml", "web"),
            unit("svc", "web.service", &[])
        ]),
    );
    let out = Fleet::new()
        .deploy(web, 5, 4)
        .deploy(base, 9, 2)
        .agent("pi-1", &[("site", "a")])
        .agent("pi-2", &[("site", "a")])
        .render();

    assert_eq!(
        ids(&out.manifests[&agent("pi-1")]),
        ["base/config", "base/motd"]
    );
    assert_eq!(
        ids(&out.manifests[&agent("pi-2")]),
        ["base/config", "base/motd", "web/svc"]
    );
    assert!(out.deployments[&name("base")].conflicts.is_empty());
    assert_eq!(
        out.deployments[&name("web")].conflicts,
        [Conflict {
            agent: agent("pi-2"),
            resource: ResourceId::new("web/config").unwrap(),
            held_by: ResourceId::new("base/config").unwrap(),
            target: "file /etc/app.toml".into(),
        }]
    );
    // The loser still targets the agent: its other resources are there.
    assert!(
        out.deployments[&name("web")]
            .targets
            .contains(&agent("pi-2"))
    );
}

#[test]
fn equal_created_revisions_are_ordered_by_name() {
    let a = deployment(
        "alpha",
        json!({"agents": ["pi-1"]}),
        json!([unit("u", "x.service", &[])]),
    );
    let b = deployment(
        "beta",
        json!({"agents": ["pi-1"]}),
        json!([unit("u", "x.service", &[])]),
    );
    let out = Fleet::new()
        .deploy(b, 3, 3)
        .deploy(a, 3, 3)
        .agent("pi-1", &[])
        .render();
    assert_eq!(ids(&out.manifests[&agent("pi-1")]), ["alpha/u"]);
    let c = &out.deployments[&name("beta")].conflicts;
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].target, "unit x.service");
    assert_eq!(c[0].held_by.as_str(), "alpha/u");
}

#[test]
fn a_left_out_resource_takes_restart_on_references_with_it() {
    let base = deployment(
        "base",
        json!({"agents": ["pi-1"]}),
        json!([file("c", "/etc/c", "x")]),
    );
    let web = deployment(
        "web",
        json!({"agents": ["pi-1"]}),
        json!([
            file("c", "/etc/c", "y"),
            file("d", "/etc/d", "z"),
            unit("svc", "w.service", &["c", "d"])
        ]),
    );
    let out = Fleet::new()
        .deploy(base, 1, 1)
        .deploy(web, 2, 2)
        .agent("pi-1", &[])
        .render();
    let resources = &out.manifests[&agent("pi-1")];
    assert_eq!(ids(resources), ["base/c", "web/d", "web/svc"]);
    let restart_on: Vec<&str> = resources[2].restart_on.iter().map(|r| r.as_str()).collect();
    assert_eq!(restart_on, ["web/d"]);
    // What reaches the agent is a valid manifest.
    manifest_types::AgentManifest {
        agent_id: agent("pi-1"),
        generation: 1,
        resources: resources.clone(),
        signatures: Vec::new(),
    }
    .validate()
    .expect("rendered manifest is valid");
}

#[test]
fn containers_never_conflict() {
    let app = |n: &str| {
        deployment(
            n,
            json!({"agents": ["pi-1"]}),
            json!([{"id": "app", "kind": "Container", "spec": {"image": "nginx:1"}}]),
        )
    };
    let out = Fleet::new()
        .deploy(app("one"), 1, 1)
        .deploy(app("two"), 2, 2)
        .agent("pi-1", &[])
        .render();
    assert_eq!(ids(&out.manifests[&agent("pi-1")]), ["one/app", "two/app"]);
    assert!(out.deployments.values().all(|d| d.conflicts.is_empty()));
}

#[test]
fn a_broken_deployment_renders_nothing_and_reports_its_error() {
    let web = deployment(
        "web",
        json!({"agents": ["pi-1"]}),
        json!([file("c", "/etc/c", "x")]),
    );
    let out = Fleet::new()
        .broken("bad", "invalid deployment: expected value at line 1", 4)
        .deploy(web, 5, 5)
        .agent("pi-1", &[])
        .render();
    assert_eq!(ids(&out.manifests[&agent("pi-1")]), ["web/c"]);
    let bad = &out.deployments[&name("bad")];
    assert_eq!(
        bad.error.as_deref(),
        Some("invalid deployment: expected value at line 1")
    );
    assert!(bad.targets.is_empty());
    assert_eq!(out.deployments[&name("web")].error, None);
}

#[test]
fn resources_follow_deployment_creation_order_then_document_order() {
    let first = deployment(
        "zzz",
        json!({"agents": ["pi-1"]}),
        json!([file("b", "/etc/b", ""), file("a", "/etc/a", "")]),
    );
    let second = deployment(
        "aaa",
        json!({"agents": ["pi-1"]}),
        json!([file("c", "/etc/c", "")]),
    );
    let out = Fleet::new()
        .deploy(second, 10, 10)
        .deploy(first, 11, 1)
        .agent("pi-1", &[])
        .render();
    assert_eq!(
        ids(&out.manifests[&agent("pi-1")]),
        ["zzz/b", "zzz/a", "aaa/c"]
    );
}

#[test]
fn render_is_deterministic_and_independent_of_input_order() {
    let a = deployment(
        "a",
        json!({"matchLabels": {"x": "1"}}),
        json!([file("f", "/etc/f", "a")]),
    );
    let b = deployment(
        "b",
        json!({"matchLabels": {"x": "1"}}),
        json!([file("f", "/etc/f", "b")]),
    );
    let one = Fleet::new()
        .deploy(a.clone(), 3, 1)
        .deploy(b.clone(), 4, 2)
        .agent("pi-1", &[("x", "1")])
        .agent("pi-2", &[("x", "1")])
        .render();
    let two = Fleet::new()
        .deploy(b, 4, 2)
        .deploy(a, 3, 1)
        .agent("pi-2", &[("x", "1")])
        .agent("pi-1", &[("x", "1")])
        .render();
    assert_eq!(one, two);
    assert_eq!(one.deployments[&name("b")].conflicts.len(), 2);
    assert_eq!(
        one.deployments[&name("b")].conflicts[0].agent,
        agent("pi-1")
    );
}

#[test]
fn a_new_revision_changes_every_selected_manifest() {
    let web = deployment(
        "web",
        json!({"agents": ["pi-1"]}),
        json!([file("c", "/etc/c", "x")]),
    );
    let before = Fleet::new()
        .deploy(web.clone(), 3, 3)
        .agent("pi-1", &[])
        .render();
    let after = Fleet::new().deploy(web, 8, 3).agent("pi-1", &[]).render();
    assert_ne!(
        before.manifests[&agent("pi-1")],
        after.manifests[&agent("pi-1")]
    );
    assert_eq!(
        after.manifests[&agent("pi-1")][0]
            .source
            .as_ref()
            .unwrap()
            .revision,
        8
    );
}
