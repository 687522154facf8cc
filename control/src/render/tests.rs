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
    /// Labels the devices report about themselves.
    reported: BTreeMap<AgentId, Labels>,
    values: BTreeMap<AgentId, Labels>,
    previous: BTreeMap<AgentId, AgentManifest>,
}

impl Fleet {
    fn new() -> Self {
        Self {
            deployments: Vec::new(),
            agents: BTreeMap::new(),
            reported: BTreeMap::new(),
            values: BTreeMap::new(),
            previous: BTreeMap::new(),
        }
    }

    fn reports(mut self, id: &str, l: &[(&str, &str)]) -> Self {
        self.reported.insert(agent(id), labels(l));
        self
    }

    fn values(mut self, id: &str, v: &[(&str, &str)]) -> Self {
        self.values.insert(agent(id), labels(v));
        self
    }

    /// Gives every agent the manifests of `rendered` as its stored one.
    fn stored(mut self, rendered: &Rendered) -> Self {
        for (a, resources) in &rendered.manifests {
            let mut m = AgentManifest::empty(a.clone(), 1);
            m.resources = resources.clone();
            self.previous.insert(a.clone(), m);
        }
        self
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
                rollout: None,
            })
            .collect();
        let none = Labels::new();
        render(
            &inputs,
            self.agents.iter().map(|(a, labels)| {
                (
                    a,
                    AgentInput {
                        labels,
                        device_labels: self.reported.get(a).unwrap_or(&none),
                        values: self.values.get(a).unwrap_or(&none),
                        previous: self.previous.get(a),
                    },
                )
            }),
        )
    }
}

/// A device rewriting the labels it reports cannot select itself into a
/// deployment (and receive its files); only a deployment that opts in
/// matches reported labels, and the operator's label of a key wins.
#[test]
fn selectors_match_operator_labels_and_reported_ones_only_when_opted_in() {
    let secret = deployment(
        "secret",
        json!({"matchLabels": {"role": "vault"}}),
        json!([file("key", "/etc/key", "k")]),
    );
    let hint = deployment(
        "hint",
        json!({"matchLabels": {"model": "pi4"}, "deviceLabels": true}),
        json!([file("cfg", "/etc/model.conf", "${labels.model}")]),
    );
    let r = Fleet::new()
        .deploy(secret, 1, 1)
        .deploy(hint, 2, 2)
        .agent("pi-1", &[("role", "vault")])
        .agent("pi-2", &[])
        .reports("pi-2", &[("role", "vault"), ("model", "pi4")])
        .agent("pi-3", &[("model", "pi3")])
        .reports("pi-3", &[("model", "pi4")])
        .render();
    let ids = |a: &str| -> Vec<String> {
        r.manifests[&agent(a)]
            .iter()
            .map(|m| m.id.to_string())
            .collect()
    };
    assert_eq!(ids("pi-1"), ["secret/key"]);
    assert_eq!(ids("pi-2"), ["hint/cfg"], "a claimed role selects nothing");
    assert!(ids("pi-3").is_empty(), "the operator's model wins");
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

fn path_of(r: &ManagedResource) -> &str {
    match &r.spec {
        manifest_types::ResourceSpec::File(f) => &f.path,
        other => panic!("not a file: {other:?}"),
    }
}

#[test]
fn templated_specs_are_rendered_per_agent() {
    let web = deployment(
        "web",
        json!({"matchLabels": {"role": "kiosk"}}),
        json!([file(
            "conf",
            "/srv/${labels.site}/${agent.id}.conf",
            "cert=${values.cert}"
        )]),
    );
    let out = Fleet::new()
        .deploy(web, 4, 4)
        .agent("pi-1", &[("role", "kiosk"), ("site", "berlin")])
        .agent("pi-2", &[("role", "kiosk"), ("site", "paris")])
        .values("pi-1", &[("cert", "/etc/c1.pem")])
        .values("pi-2", &[("cert", "/etc/c2.pem")])
        .render();
    let one = &out.manifests[&agent("pi-1")][0];
    assert_eq!(path_of(one), "/srv/berlin/pi-1.conf");
    assert_eq!(
        path_of(&out.manifests[&agent("pi-2")][0]),
        "/srv/paris/pi-2.conf"
    );
    match &one.spec {
        manifest_types::ResourceSpec::File(f) => assert_eq!(f.content, "cert=/etc/c1.pem"),
        _ => unreachable!(),
    }
    assert!(out.deployments[&name("web")].render_failures.is_empty());
}

#[test]
fn an_unresolved_reference_fails_only_that_agent_which_keeps_its_last_render() {
    let v1 = deployment(
        "web",
        json!({"matchLabels": {"role": "kiosk"}}),
        json!([file("conf", "/srv/${agent.id}.conf", "v1")]),
    );
    let v2 = deployment(
        "web",
        json!({"matchLabels": {"role": "kiosk"}}),
        json!([file("conf", "/srv/${agent.id}.conf", "v2 ${values.site}")]),
    );
    let fleet = || {
        Fleet::new()
            .agent("pi-1", &[("role", "kiosk")])
            .agent("pi-2", &[("role", "kiosk")])
            .values("pi-1", &[("site", "s1")])
    };
    let first = fleet().deploy(v1, 3, 3).render();
    let out = fleet().deploy(v2, 9, 3).stored(&first).render();
    let ok = &out.manifests[&agent("pi-1")][0];
    assert_eq!(ok.source.as_ref().unwrap().revision, 9);
    // pi-2 has no `site` value: it keeps revision 3, exactly as rendered then.
    assert_eq!(
        out.manifests[&agent("pi-2")],
        first.manifests[&agent("pi-2")]
    );
    let status = &out.deployments[&name("web")];
    assert_eq!(status.targets.len(), 2);
    assert_eq!(status.render_failures.len(), 1);
    let failure = &status.render_failures[0];
    assert_eq!(failure.agent, agent("pi-2"));
    assert_eq!(failure.resource.as_str(), "web/conf");
    assert!(
        failure.message.contains("${values.site}"),
        "{}",
        failure.message
    );
    // Without a previous render there is nothing to keep: nothing of it.
    let fresh = fleet()
        .deploy(
            deployment(
                "web",
                json!({"matchLabels": {"role": "kiosk"}}),
                json!([file("conf", "/srv/${agent.id}.conf", "${values.site}")]),
            ),
            9,
            3,
        )
        .render();
    assert!(fresh.manifests[&agent("pi-2")].is_empty());
}

#[test]
fn a_rendered_spec_that_breaks_its_rules_fails_that_agent() {
    // A value that makes the path relative.
    let d = deployment(
        "web",
        json!({"agents": ["pi-1", "pi-2"]}),
        json!([file("conf", "${values.dir}/x", "x")]),
    );
    let out = Fleet::new()
        .deploy(d, 2, 2)
        .agent("pi-1", &[])
        .agent("pi-2", &[])
        .values("pi-1", &[("dir", "/srv")])
        .values("pi-2", &[("dir", "relative")])
        .render();
    assert_eq!(path_of(&out.manifests[&agent("pi-1")][0]), "/srv/x");
    let f = &out.deployments[&name("web")].render_failures;
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].agent, agent("pi-2"));
}
