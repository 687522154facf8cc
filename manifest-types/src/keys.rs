//! KV key names and NATS subjects, in one place. See "The KV layout" in
//! docs/ARCHITECTURE.md and docs/adr/0002-kv-layout-and-republish-watch.md.

pub use crate::ids::DEFAULT_BUCKET;
use crate::ids::{AgentId, BucketName, DeploymentName};

pub const DESIRED_STATE: &str = "desired-state";
pub const ACTUAL_STATE: &str = "actual-state";
pub const AGENTS: &str = "agents";
pub const HEARTBEAT: &str = "heartbeat";
pub const DEPLOYMENTS: &str = "deployments";
pub const DEPLOYMENT_STATUS: &str = "deployment-status";
pub const VALUES: &str = "values";
pub const REVISIONS: &str = "revisions";
pub const ROLLOUTS: &str = "rollouts";

/// `desired-state.<agent-id>`: the agent's manifest, written by the control plane only.
pub fn desired_state(agent: &AgentId) -> String {
    format!("{DESIRED_STATE}.{agent}")
}

/// `actual-state.<agent-id>`: the agent's status, written by that agent only.
pub fn actual_state(agent: &AgentId) -> String {
    format!("{ACTUAL_STATE}.{agent}")
}

/// `agents.<agent-id>`: the agent's inventory.
pub fn inventory(agent: &AgentId) -> String {
    format!("{AGENTS}.{agent}")
}

/// The bucket heartbeats live in, beside the fleet bucket `bucket`
/// (docs/adr/0015-heartbeats-and-liveness.md): `<bucket>-heartbeats`, one
/// value per key, so liveness churn never touches the fleet bucket's history.
pub fn heartbeat_bucket(bucket: &BucketName) -> String {
    format!("{bucket}-heartbeats")
}

/// The bucket of the control plane's lease, beside the fleet bucket
/// `bucket` (docs/adr/0022-one-acting-control-plane.md): `<bucket>-control`,
/// one value per key, each expiring after the lease time unless renewed.
pub fn control_bucket(bucket: &BucketName) -> String {
    format!("{bucket}-control")
}

/// `lease` (in [`control_bucket`]): the [`crate::lease::ControlLease`] of the
/// control-plane instance that acts; absent while none does.
pub const LEASE: &str = "lease";

/// `settings.heartbeat` (fleet bucket): the heartbeat interval the control
/// plane asks of agents, sized to the fleet (docs/adr/0015).
pub const HEARTBEAT_SETTINGS: &str = "settings.heartbeat";

/// `heartbeat.<agent-id>` (in [`heartbeat_bucket`]): the agent's liveness record.
pub fn heartbeat(agent: &AgentId) -> String {
    format!("{HEARTBEAT}.{agent}")
}

/// `deployments.<name>`: fleet-level intent, written by operators.
pub fn deployment(name: &DeploymentName) -> String {
    format!("{DEPLOYMENTS}.{name}")
}

/// `deployment-status.<name>`: render results, written by the control plane.
pub fn deployment_status(name: &DeploymentName) -> String {
    format!("{DEPLOYMENT_STATUS}.{name}")
}

/// `values.<agent-id>`: the operator's per-agent values (docs/adr/0014).
pub fn values(agent: &AgentId) -> String {
    format!("{VALUES}.{agent}")
}

/// `revisions.<name>.<revision>`: one revision of a deployment in its
/// history, written by the control plane (docs/adr/0016).
pub fn revision(name: &DeploymentName, revision: u64) -> String {
    format!("{REVISIONS}.{name}.{revision}")
}

/// Every revision key of one deployment: `revisions.<name>.*`.
pub fn revisions_of(name: &DeploymentName) -> String {
    format!("{REVISIONS}.{name}.*")
}

/// `rollouts.<name>`: the operator's pause/resume switch for a deployment's
/// rollouts (docs/adr/0016).
pub fn rollout(name: &DeploymentName) -> String {
    format!("{ROLLOUTS}.{name}")
}

/// `settings.rollout` (fleet bucket): the fleet's default rollout policy,
/// for deployments that carry none (docs/adr/0016).
pub const ROLLOUT_SETTINGS: &str = "settings.rollout";

/// A wildcard over every key of one family, e.g. `actual-state.>`.
pub fn all(prefix: &str) -> String {
    format!("{prefix}.>")
}

/// A parsed key of the fleet bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    DesiredState(AgentId),
    ActualState(AgentId),
    Inventory(AgentId),
    Heartbeat(AgentId),
    Deployment(DeploymentName),
    DeploymentStatus(DeploymentName),
    Values(AgentId),
    Revision(DeploymentName, u64),
    Rollout(DeploymentName),
}

impl Key {
    /// Parses a key name; `None` for keys that are not Flotilla's or carry an
    /// invalid id.
    pub fn parse(key: &str) -> Option<Key> {
        let (family, id) = key.split_once('.')?;
        Some(match family {
            DESIRED_STATE => Key::DesiredState(id.parse().ok()?),
            ACTUAL_STATE => Key::ActualState(id.parse().ok()?),
            AGENTS => Key::Inventory(id.parse().ok()?),
            HEARTBEAT => Key::Heartbeat(id.parse().ok()?),
            DEPLOYMENTS => Key::Deployment(id.parse().ok()?),
            DEPLOYMENT_STATUS => Key::DeploymentStatus(id.parse().ok()?),
            VALUES => Key::Values(id.parse().ok()?),
            REVISIONS => {
                let (name, revision) = id.split_once('.')?;
                Key::Revision(name.parse().ok()?, revision.parse().ok()?)
            }
            ROLLOUTS => Key::Rollout(id.parse().ok()?),
            _ => return None,
        })
    }
}

/// The raw stream subject of a key: `$KV.<bucket>.<key>`.
pub fn kv_subject(bucket: &BucketName, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// The JetStream stream backing a bucket.
pub fn stream_name(bucket: &BucketName) -> String {
    format!("KV_{bucket}")
}

/// The direct-get subject for one key (last message by subject), which a
/// server can permit per key.
pub fn direct_get_subject(bucket: &BucketName, key: &str) -> String {
    format!(
        "$JS.API.DIRECT.GET.{}.{}",
        stream_name(bucket),
        kv_subject(bucket, key)
    )
}

/// Source of the bucket's RePublish rule: every desired-state key.
pub fn republish_source(bucket: &BucketName) -> String {
    format!("$KV.{bucket}.{DESIRED_STATE}.>")
}

/// Destination of the bucket's RePublish rule. Only the server publishes here.
pub fn republish_destination(bucket: &BucketName) -> String {
    format!("flotilla.{bucket}.{DESIRED_STATE}.>")
}

/// The subject on which one agent hears committed manifests for its key.
pub fn republish_subject(bucket: &BucketName, agent: &AgentId) -> String {
    format!("flotilla.{bucket}.{DESIRED_STATE}.{agent}")
}

/// The inbox prefix an agent uses, so the server can confine its replies.
pub fn agent_inbox_prefix(agent: &AgentId) -> String {
    format!("_INBOX.{agent}")
}

/// The subjects one device may use, and nothing else (docs/adr/0017): what
/// `flotilla agent enroll` puts into its credentials and
/// `deploy/nats/flotilla.conf` spells out for a hand-written user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePermissions {
    /// Direct gets of its own keys and of `settings.heartbeat`; writes of its
    /// status, inventory and heartbeat.
    pub publish: Vec<String>,
    /// Its committed manifests (republished by the server) and its inbox.
    pub subscribe: Vec<String>,
}

pub fn device_permissions(bucket: &BucketName, agent: &AgentId) -> DevicePermissions {
    let heartbeats = BucketName::new(heartbeat_bucket(bucket)).expect("a valid bucket name");
    DevicePermissions {
        publish: vec![
            direct_get_subject(bucket, &desired_state(agent)),
            direct_get_subject(bucket, &actual_state(agent)),
            direct_get_subject(bucket, &inventory(agent)),
            direct_get_subject(bucket, HEARTBEAT_SETTINGS),
            kv_subject(bucket, &actual_state(agent)),
            kv_subject(bucket, &inventory(agent)),
            kv_subject(&heartbeats, &heartbeat(agent)),
        ],
        subscribe: vec![
            republish_subject(bucket, agent),
            format!("{}.>", agent_inbox_prefix(agent)),
        ],
    }
}

/// What a site's leaf node may carry between the site's JetStream and
/// the hub's (docs/adr/0023-sites-behind-leaf-nodes.md), in the
/// credentials of its uplink: the site's server consumes the hub's fleet
/// stream (its sources) and answers the hub's requests to the site's own
/// JetStream (the hub's sources and the control plane keeping the site's
/// buckets). Nothing else of the hub: no other stream, no stream changes,
/// no KV writes. Each device is still confined to its own subjects by its
/// own credentials at the site.
pub fn site_uplink_permissions(
    bucket: &BucketName,
    hub_domain: &str,
    site: &str,
) -> DevicePermissions {
    let stream = stream_name(bucket);
    let hub = format!("$JS.{hub_domain}.API");
    DevicePermissions {
        publish: vec![
            format!("{hub}.CONSUMER.CREATE.{stream}"),
            format!("{hub}.CONSUMER.CREATE.{stream}.>"),
            format!("{hub}.CONSUMER.DELETE.{stream}.>"),
            format!("{hub}.CONSUMER.INFO.{stream}.>"),
            format!("{hub}.STREAM.INFO.{stream}"),
            // Deliveries to the hub's sourcing consumers on the site's
            // streams, flow control, and the servers' answers to each
            // other's consumer requests.
            "$JS.S.>".to_owned(),
            "$JS.FC.>".to_owned(),
            "$JSC.R.>".to_owned(),
            "_INBOX.>".to_owned(),
        ],
        subscribe: vec![
            format!("$JS.{site}.API.>"),
            "$JS.S.>".to_owned(),
            "$JS.FC.>".to_owned(),
            "$JSC.R.>".to_owned(),
            "_INBOX.>".to_owned(),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_may_use_exactly_the_subjects_of_deploy_nats_flotilla_conf() {
        let p = device_permissions(&BucketName::default(), &AgentId::new("pi-01").unwrap());
        let conf = include_str!("../../deploy/nats/flotilla.conf");
        for s in p.publish.iter().chain(&p.subscribe) {
            assert!(
                conf.contains(&format!("\"{s}\"")),
                "{s} is not in flotilla.conf"
            );
        }
        assert_eq!((p.publish.len(), p.subscribe.len()), (7, 2));
    }

    #[test]
    fn a_site_uplink_reaches_only_the_fleet_stream_at_the_hub() {
        let p = site_uplink_permissions(&BucketName::default(), "hub", "shop-1");
        assert!(p.publish.iter().all(|s| !s.contains("STREAM.UPDATE")
            && !s.contains("STREAM.DELETE")
            && !s.starts_with("$KV")));
        assert!(
            p.publish
                .contains(&"$JS.hub.API.CONSUMER.CREATE.KV_fleet.>".to_owned())
        );
        assert!(p.subscribe.contains(&"$JS.shop-1.API.>".to_owned()));
    }

    #[test]
    fn literals_are_pinned() {
        let a = AgentId::new("pi-1").unwrap();
        let d = DeploymentName::new("hello").unwrap();
        let b = BucketName::default();
        assert_eq!(desired_state(&a), "desired-state.pi-1");
        assert_eq!(actual_state(&a), "actual-state.pi-1");
        assert_eq!(inventory(&a), "agents.pi-1");
        assert_eq!(heartbeat(&a), "heartbeat.pi-1");
        assert_eq!(deployment(&d), "deployments.hello");
        assert_eq!(deployment_status(&d), "deployment-status.hello");
        assert_eq!(values(&a), "values.pi-1");
        assert_eq!(revision(&d, 42), "revisions.hello.42");
        assert_eq!(revisions_of(&d), "revisions.hello.*");
        assert_eq!(rollout(&d), "rollouts.hello");
        assert_eq!(ROLLOUT_SETTINGS, "settings.rollout");
        assert_eq!(kv_subject(&b, "agents.pi-1"), "$KV.fleet.agents.pi-1");
        assert_eq!(
            direct_get_subject(&b, "desired-state.pi-1"),
            "$JS.API.DIRECT.GET.KV_fleet.$KV.fleet.desired-state.pi-1"
        );
        assert_eq!(republish_source(&b), "$KV.fleet.desired-state.>");
        assert_eq!(republish_destination(&b), "flotilla.fleet.desired-state.>");
        assert_eq!(
            republish_subject(&b, &a),
            "flotilla.fleet.desired-state.pi-1"
        );
        assert_eq!(agent_inbox_prefix(&a), "_INBOX.pi-1");
        assert_eq!(heartbeat_bucket(&b), "fleet-heartbeats");
        assert_eq!(HEARTBEAT_SETTINGS, "settings.heartbeat");
        assert_eq!(all(ACTUAL_STATE), "actual-state.>");
    }

    #[test]
    fn keys_round_trip() {
        let a = AgentId::new("pi-1").unwrap();
        assert_eq!(
            Key::parse(&desired_state(&a)),
            Some(Key::DesiredState(a.clone()))
        );
        assert_eq!(Key::parse(&values(&a)), Some(Key::Values(a.clone())));
        assert_eq!(Key::parse(&heartbeat(&a)), Some(Key::Heartbeat(a)));
        let d = DeploymentName::new("web").unwrap();
        assert_eq!(
            Key::parse(&revision(&d, 7)),
            Some(Key::Revision(d.clone(), 7))
        );
        assert_eq!(Key::parse(&rollout(&d)), Some(Key::Rollout(d)));
        assert_eq!(Key::parse("revisions.web"), None);
        assert_eq!(Key::parse("revisions.web.x"), None);
        assert_eq!(Key::parse("desired-state.Bad"), None);
        assert_eq!(Key::parse("other.x"), None);
    }
}
