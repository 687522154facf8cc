//! The engine's create request for a [`ContainerSpec`].

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, HealthConfig, HostConfig, PortBinding,
    RestartPolicy as DockerRestartPolicy, RestartPolicyNameEnum,
};
use manifest_types::ContainerSpec;
use manifest_types::spec::{NetworkMode, RestartPolicy};

use super::image_ref;

/// The engine's create request for `spec`.
pub fn create_body(spec: &ContainerSpec, labels: HashMap<String, String>) -> ContainerCreateBody {
    let port_key = |p: &manifest_types::spec::PortMapping| {
        let proto = match p.protocol {
            manifest_types::spec::Protocol::Tcp => "tcp",
            manifest_types::spec::Protocol::Udp => "udp",
        };
        format!("{}/{proto}", p.container)
    };
    let mut port_bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for p in &spec.ports {
        port_bindings
            .entry(port_key(p))
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: p.host_ip.clone(),
                host_port: Some(p.host.to_string()),
            });
    }
    let binds = spec
        .volumes
        .iter()
        .map(|v| {
            let source = v.name.as_deref().or(v.host_path.as_deref()).unwrap_or("");
            let ro = if v.read_only { ":ro" } else { "" };
            format!("{source}:{}{ro}", v.target)
        })
        .collect::<Vec<_>>();
    let secs = |s: Option<u32>| s.map(|s| i64::from(s) * 1_000_000_000);
    let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    ContainerCreateBody {
        image: Some(image_ref(spec)),
        entrypoint: non_empty(&spec.command),
        cmd: non_empty(&spec.args),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(labels),
        exposed_ports: (!spec.ports.is_empty()).then(|| spec.ports.iter().map(port_key).collect()),
        healthcheck: spec.healthcheck.as_ref().map(|h| HealthConfig {
            test: Some(h.test.clone()),
            interval: secs(h.interval_seconds),
            timeout: secs(h.timeout_seconds),
            retries: h.retries.map(i64::from),
            start_period: secs(h.start_period_seconds),
            ..Default::default()
        }),
        host_config: Some(HostConfig {
            port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
            binds: (!binds.is_empty()).then_some(binds),
            restart_policy: Some(DockerRestartPolicy {
                name: Some(match spec.restart_policy {
                    RestartPolicy::No => RestartPolicyNameEnum::NO,
                    RestartPolicy::Always => RestartPolicyNameEnum::ALWAYS,
                    RestartPolicy::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
                    RestartPolicy::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
                }),
                maximum_retry_count: None,
            }),
            memory: spec
                .memory_limit_bytes
                .map(|m| m.min(i64::MAX as u64) as i64),
            nano_cpus: spec.cpu_limit_millis.map(|m| i64::from(m) * 1_000_000),
            network_mode: Some(
                match spec.network_mode {
                    NetworkMode::Bridge => "bridge",
                    NetworkMode::Host => "host",
                    NetworkMode::None => "none",
                }
                .into(),
            ),
            privileged: Some(spec.privileged),
            cap_add: non_empty(&spec.cap_add),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_maps_the_spec() {
        let spec: ContainerSpec = serde_json::from_value(serde_json::json!({
            "image": "app:1",
            "digest": format!("sha256:{}", "a".repeat(64)),
            "command": ["/bin/httpd"], "args": ["-f"],
            "env": {"A": "1"},
            "ports": [{"host": 8080, "container": 80}, {"host": 5353, "container": 53, "protocol": "udp"}],
            "volumes": [{"name": "data", "target": "/data"}, {"hostPath": "/srv/x", "target": "/x", "readOnly": true}],
            "restartPolicy": "onFailure",
            "memoryLimitBytes": 1048576, "cpuLimitMillis": 500,
            "healthcheck": {"test": ["CMD", "true"], "intervalSeconds": 5},
            "networkMode": "none"
        }))
        .unwrap();
        let body = create_body(&spec, HashMap::new());
        assert_eq!(
            body.image.as_deref(),
            Some(format!("app:1@sha256:{}", "a".repeat(64)).as_str())
        );
        assert_eq!(body.env, Some(vec!["A=1".to_owned()]));
        let mut exposed = body.exposed_ports.unwrap();
        exposed.sort();
        assert_eq!(exposed, ["53/udp", "80/tcp"]);
        let host = body.host_config.unwrap();
        assert_eq!(host.binds.unwrap(), ["data:/data", "/srv/x:/x:ro"]);
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.memory, Some(1_048_576));
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(
            host.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::ON_FAILURE)
        );
        assert_eq!(
            host.port_bindings.unwrap()["80/tcp"].as_ref().unwrap()[0]
                .host_port
                .as_deref(),
            Some("8080")
        );
        assert_eq!(body.healthcheck.unwrap().interval, Some(5_000_000_000));
    }
}
