//! The bad-input corpus: hundreds of malformed or hostile documents, built
//! deterministically, for the tests that write them straight into the KV
//! bucket with a raw client (agent/tests/hostile.rs,
//! control/tests/hostile.rs) and as the fuzz targets' seeds
//! (fuzz/seeds.sh). Every manifest here must be rejected with a typed
//! reason; none is a valid manifest an agent should run.

use serde_json::{Value, json};

fn doc(agent: &str, generation: Value, resources: Value) -> Value {
    json!({"apiVersion": "flotilla.dev/v1", "agentId": agent, "generation": generation,
           "resources": resources})
}

fn file(id: &str, path: Value, content: Value) -> Value {
    json!({"id": id, "kind": "File", "spec": {"path": path, "content": content}})
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// Hostile manifests for `agent` whose File root is `root`, each with a
/// label saying what it tries. `generation` is above what the agent runs,
/// so a rejection is never just a replay (except where replay is the point).
pub fn manifests(agent: &str, root: &str, generation: u64) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut push = |label: String, bytes: Vec<u8>| out.push((label, bytes));
    let g = || json!(generation);
    let good_file = file("d/ok", json!(format!("{root}/ok")), json!("ok"));
    let good = doc(agent, g(), json!([good_file.clone()])).to_string();

    // Truncated JSON at many offsets.
    for cut in 1..good.len() {
        push(
            format!("truncated at {cut}"),
            good.as_bytes()[..cut].to_vec(),
        );
    }
    // Not a JSON object / not JSON.
    for raw in [
        &b""[..],
        b" ",
        b"null",
        b"[]",
        b"42",
        b"\"manifest\"",
        b"true",
        b"{}",
        b"\xef\xbb\xbf{}",
        b"\xff\xfe\x00{",
        b"{\"apiVersion\":\"flotilla.dev/v1\"\x00}",
        b"{'apiVersion': 'flotilla.dev/v1'}",
        b"{\"apiVersion\":\"flotilla.dev/v1\",}",
        b"NaN",
    ] {
        push(
            format!("raw {:?}", String::from_utf8_lossy(raw)),
            raw.to_vec(),
        );
    }
    push("deep nesting (array)".into(), nested(5000).into_bytes());
    push(
        "deep nesting in an unknown field".into(),
        format!(
            "{{\"apiVersion\":\"flotilla.dev/v1\",\"agentId\":\"{agent}\",\"generation\":{generation},\"x\":{}}}",
            nested(300)
        )
        .into_bytes(),
    );
    // Wrong types and missing fields.
    let base = doc(agent, g(), json!([good_file.clone()]));
    for (field, value) in [
        ("apiVersion", json!(1)),
        ("apiVersion", json!("flotilla.dev/v2")),
        ("apiVersion", json!(null)),
        ("agentId", json!(5)),
        ("agentId", json!("")),
        ("agentId", json!("Pi.1")),
        ("agentId", json!("a/b")),
        ("agentId", json!("x".repeat(100_000))),
        ("agentId", json!("other-agent")),
        ("generation", json!("7")),
        ("generation", json!(-1)),
        ("generation", json!(1.5)),
        ("generation", json!(9_007_199_254_740_992u64)),
        ("generation", json!(u64::MAX)),
        ("generation", json!(1e300)),
        ("generation", json!(null)),
        ("generation", json!(0)),
        ("resources", json!({})),
        ("resources", json!("all")),
        ("resources", json!([1])),
        ("resources", json!([null])),
        ("resources", json!([[]])),
        ("signatures", json!("yes")),
        ("signatures", json!([{"keyId": 1}])),
    ] {
        let mut d = base.clone();
        d[field] = value.clone();
        let shown: String = value.to_string().chars().take(40).collect();
        push(format!("{field} = {shown}"), d.to_string().into_bytes());
    }
    for field in ["apiVersion", "agentId", "generation"] {
        let mut d = base.clone();
        d.as_object_mut().unwrap().remove(field);
        push(format!("no {field}"), d.to_string().into_bytes());
    }
    // Resource shapes.
    let resource = |r: Value| doc(agent, g(), json!([r])).to_string().into_bytes();
    for (label, r) in [
        (
            "no id",
            json!({"kind": "File", "spec": {"path": format!("{root}/a"), "content": ""}}),
        ),
        (
            "numeric id",
            json!({"id": 7, "kind": "File", "spec": {"path": format!("{root}/a"), "content": ""}}),
        ),
        (
            "empty id",
            json!({"id": "", "kind": "File", "spec": {"path": format!("{root}/a"), "content": ""}}),
        ),
        (
            "id with spaces",
            json!({"id": "a b", "kind": "File", "spec": {"path": format!("{root}/a"), "content": ""}}),
        ),
        (
            "huge id",
            json!({"id": "a".repeat(50_000), "kind": "File", "spec": {"path": format!("{root}/a"), "content": ""}}),
        ),
        ("no kind", json!({"id": "d/a", "spec": {}})),
        ("numeric kind", json!({"id": "d/a", "kind": 3, "spec": {}})),
        ("no spec", json!({"id": "d/a", "kind": "File"})),
        (
            "spec is a list",
            json!({"id": "d/a", "kind": "File", "spec": []}),
        ),
        (
            "spec is a string",
            json!({"id": "d/a", "kind": "File", "spec": "rm -rf /"}),
        ),
        (
            "restartOn a number",
            json!({"id": "d/a", "kind": "File", "restartOn": [1], "spec": {"path": format!("{root}/a"), "content": ""}}),
        ),
        (
            "restartOn unknown",
            json!({"id": "d/a", "kind": "File", "restartOn": ["d/zz"], "spec": {"path": format!("{root}/a"), "content": ""}}),
        ),
        (
            "restartOn itself",
            json!({"id": "d/a", "kind": "File", "restartOn": ["d/a"], "spec": {"path": format!("{root}/a"), "content": ""}}),
        ),
    ] {
        push(format!("resource: {label}"), resource(r));
    }
    // Paths: traversal, NUL, relative, outside the roots, odd shapes.
    for path in [
        json!(format!("{root}/../escape")),
        json!(format!("{root}/a/../../etc/passwd")),
        json!(format!("{root}/./a")),
        json!(format!("{root}//a")),
        json!(format!("{root}/a/")),
        json!(format!("{root}/a\u{0}b")),
        json!(format!("{root}/{}", "a".repeat(5000))),
        json!(root),
        json!(format!("{root}X/a")),
        json!("/etc/passwd"),
        json!("/etc/systemd/system/evil.service"),
        json!("/"),
        json!(""),
        json!("relative/path"),
        json!(".."),
        json!("../../etc/shadow"),
        json!("~/.ssh/authorized_keys"),
        json!(7),
        json!(null),
        json!(["a"]),
    ] {
        let shown: String = path.to_string().chars().take(60).collect();
        push(
            format!("path {shown}"),
            resource(file("d/p", path, json!("x"))),
        );
    }
    // Content and file metadata.
    let f = |spec: Value| json!({"id": "d/m", "kind": "File", "spec": spec});
    let p = format!("{root}/m");
    for (label, spec) in [
        (
            "content too large",
            json!({"path": p, "content": "x".repeat(300 * 1024)}),
        ),
        ("content a number", json!({"path": p, "content": 5})),
        (
            "bad base64",
            json!({"path": p, "content": "!!!", "encoding": "base64"}),
        ),
        (
            "unknown encoding",
            json!({"path": p, "content": "x", "encoding": "rot13"}),
        ),
        (
            "mode 99999",
            json!({"path": p, "content": "x", "mode": "99999"}),
        ),
        (
            "mode text",
            json!({"path": p, "content": "x", "mode": "rwx"}),
        ),
        (
            "mode negative",
            json!({"path": p, "content": "x", "mode": -1}),
        ),
        (
            "owner empty",
            json!({"path": p, "content": "x", "owner": ""}),
        ),
        (
            "owner object",
            json!({"path": p, "content": "x", "owner": {"uid": "root"}}),
        ),
        // (An unknown field is not here: it is a newer agent's field, kept
        // as Unsupported without touching the file — ADR 0003.)
        (
            "mode 0o10000",
            json!({"path": p, "content": "x", "mode": "10000"}),
        ),
    ] {
        push(format!("file: {label}"), resource(f(spec)));
    }
    // Units.
    let u = |spec: Value| json!({"id": "d/u", "kind": "SystemdUnit", "spec": spec});
    for name in [
        "../../etc/evil.service",
        "a/b.service",
        "evil",
        "a b.service",
        ".service",
        "x.exe",
        "",
        "\u{0}.service",
    ] {
        push(
            format!("unit name {name:?}"),
            resource(u(json!({"unit": name}))),
        );
    }
    push(
        "unit name too long".into(),
        resource(u(json!({"unit": format!("{}.service", "a".repeat(300))}))),
    );
    push("unit without name".into(), resource(u(json!({}))));
    push(
        "unit content a number".into(),
        resource(u(json!({"unit": "a.service", "content": 1}))),
    );
    // Containers asking for more than the device allows, or malformed.
    let c = |spec: Value| json!({"id": "d/c", "kind": "Container", "spec": spec});
    for (label, spec) in [
        (
            "privileged",
            json!({"image": "busybox", "privileged": true}),
        ),
        (
            "host network",
            json!({"image": "busybox", "networkMode": "host"}),
        ),
        (
            "cap SYS_ADMIN",
            json!({"image": "busybox", "capAdd": ["SYS_ADMIN"]}),
        ),
        ("cap ALL", json!({"image": "busybox", "capAdd": ["ALL"]})),
        (
            "bind /",
            json!({"image": "busybox", "volumes": [{"hostPath": "/", "target": "/host"}]}),
        ),
        (
            "bind /etc",
            json!({"image": "busybox", "volumes": [{"hostPath": "/etc", "target": "/etc"}]}),
        ),
        (
            "bind docker.sock",
            json!({"image": "busybox", "volumes": [{"hostPath": "/var/run/docker.sock", "target": "/s"}]}),
        ),
        (
            "bind escape",
            json!({"image": "busybox", "volumes": [{"hostPath": format!("{root}/../.."), "target": "/h"}]}),
        ),
        ("no image", json!({})),
        ("image a number", json!({"image": 4})),
        ("empty image", json!({"image": ""})),
        (
            "network mode container",
            json!({"image": "busybox", "networkMode": "container:other"}),
        ),
        ("env a list", json!({"image": "busybox", "env": ["A"]})),
    ] {
        push(format!("container: {label}"), resource(c(spec)));
    }
    // Cross-resource rules.
    let two = |a: Value, b: Value| doc(agent, g(), json!([a, b])).to_string().into_bytes();
    push(
        "duplicate ids".into(),
        two(good_file.clone(), good_file.clone()),
    );
    push(
        "two resources, one path".into(),
        two(
            file("d/x", json!(format!("{root}/same")), json!("1")),
            file("d/y", json!(format!("{root}/same")), json!("2")),
        ),
    );
    push(
        "two resources, one unit".into(),
        two(
            u(json!({"unit": "a.service"})),
            json!({"id": "d/u2", "kind": "SystemdUnit", "spec": {"unit": "a.service"}}),
        ),
    );
    // Many resources, one of them bad, near the payload limit.
    let mut many: Vec<Value> = (0..2000)
        .map(|i| {
            file(
                &format!("d/f{i}"),
                json!(format!("{root}/f{i}")),
                json!("x"),
            )
        })
        .collect();
    many.push(file("d/bad", json!("/etc/passwd"), json!("x")));
    push(
        "2000 resources and one outside the roots".into(),
        doc(agent, g(), json!(many)).to_string().into_bytes(),
    );
    out
}

/// A change to a good document that makes it hostile.
type Edit = Box<dyn Fn(&mut Value)>;

/// Hostile deployment documents, for `deployments.<name>` (the name is
/// the label's index; some documents name another deployment).
pub fn deployments(name: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let good = json!({"apiVersion": "flotilla.dev/v1", "kind": "Deployment", "name": name,
        "selector": {"matchLabels": {"role": "kiosk"}},
        "resources": [{"id": "motd", "kind": "File", "spec": {"path": "/srv/x", "content": "x"}}]});
    let text = good.to_string();
    for cut in (1..text.len()).step_by(2) {
        out.push((
            format!("truncated at {cut}"),
            text.as_bytes()[..cut].to_vec(),
        ));
    }
    for raw in [&b""[..], b"null", b"[]", b"\xff\xfe", b"{}"] {
        out.push((
            format!("raw {:?}", String::from_utf8_lossy(raw)),
            raw.to_vec(),
        ));
    }
    out.push(("deep nesting".into(), nested(5000).into_bytes()));
    let variants: Vec<(&str, Edit)> = vec![
        (
            "another name",
            Box::new(|d| d["name"] = "someone-else".into()),
        ),
        ("bad name", Box::new(|d| d["name"] = "Bad Name!".into())),
        ("kind Pod", Box::new(|d| d["kind"] = "Pod".into())),
        (
            "apiVersion v9",
            Box::new(|d| d["apiVersion"] = "flotilla.dev/v9".into()),
        ),
        (
            "selector a string",
            Box::new(|d| d["selector"] = "all".into()),
        ),
        (
            "selector unknown field",
            Box::new(|d| d["selector"]["everyone"] = true.into()),
        ),
        (
            "resources an object",
            Box::new(|d| d["resources"] = json!({})),
        ),
        (
            "resource id with slash",
            Box::new(|d| d["resources"][0]["id"] = "a/b".into()),
        ),
        (
            "path traversal",
            Box::new(|d| d["resources"][0]["spec"]["path"] = "/srv/../etc/passwd".into()),
        ),
        (
            "relative path",
            Box::new(|d| d["resources"][0]["spec"]["path"] = "etc/passwd".into()),
        ),
        (
            "content too large",
            Box::new(|d| d["resources"][0]["spec"]["content"] = "x".repeat(300 * 1024).into()),
        ),
        (
            "unterminated template",
            Box::new(|d| d["resources"][0]["spec"]["content"] = "${values.x".into()),
        ),
        (
            "unknown template field",
            Box::new(|d| d["resources"][0]["spec"]["content"] = "${agent.secret}".into()),
        ),
        (
            "duplicate resource ids",
            Box::new(|d| {
                let r = d["resources"][0].clone();
                d["resources"].as_array_mut().unwrap().push(r);
            }),
        ),
        (
            "unit name with slash",
            Box::new(|d| {
                d["resources"][0] =
                    json!({"id": "u", "kind": "SystemdUnit", "spec": {"unit": "a/b.service"}})
            }),
        ),
        (
            "rollout canary 200%",
            Box::new(|d| d["rollout"] = json!({"canary": "200%"})),
        ),
        (
            "rollout waves 0",
            Box::new(|d| d["rollout"] = json!({"waves": 0})),
        ),
        (
            "rollout soak text",
            Box::new(|d| d["rollout"] = json!({"soak": "forever"})),
        ),
        (
            "rollout onFailure explode",
            Box::new(|d| d["rollout"] = json!({"onFailure": "explode"})),
        ),
        (
            "huge name",
            Box::new(|d| d["name"] = "a".repeat(100_000).into()),
        ),
    ];
    for (label, f) in variants {
        let mut d = good.clone();
        f(&mut d);
        out.push((label.to_owned(), d.to_string().into_bytes()));
    }
    out
}
