//! The daemon's in-memory copy of the keys it renders from and writes to,
//! fed by one KV watch. [`State::apply`] says whether an entry can change the
//! render; echoes of the daemon's own writes (already recorded by KV sequence)
//! cannot, and neither can a value equal to the one held. Agents' statuses
//! count only when they change whether a stored manifest can stand
//! (docs/adr/0012-the-control-plane-owns-desired-state.md).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use async_nats::jetstream::kv::{Entry, Operation};
use manifest_types::keys::{self, Key};
use manifest_types::rollout::{RevisionRecord, RolloutControl, RolloutPolicy};
use manifest_types::signing::SigningKeys;
use manifest_types::{
    AgentId, AgentInventory, AgentManifest, AgentValues, Deployment, DeploymentName,
    DeploymentStatus, HeartbeatSettings,
};

use crate::publish::{self, Floor};
use crate::render::{AgentInput, DeploymentInput, Labels, Rendered, Staged};
use crate::rollout::{Control, Run};

/// One watched value, as [`State::apply`] reads it.
struct Seen<'a> {
    key: &'a str,
    revision: u64,
    value: &'a [u8],
}

/// A deployment as last seen in `deployments.<name>`.
#[derive(Debug)]
pub(crate) struct DeploymentRecord {
    pub revision: u64,
    pub document: Result<Deployment, String>,
    /// Revision at which this daemon first saw the deployment.
    pub first_seen: u64,
    /// Creation order used for conflicts; resolved at the first render (from
    /// a stored status when there is one, so restarts keep the order).
    pub created_revision: Option<u64>,
    /// Server time the document was written.
    pub applied_at: Option<SystemTime>,
}

/// A key the daemon writes: the value last seen or written, by KV sequence.
/// `value` is `None` for a DEL/PURGE marker or a value that does not parse
/// (for a manifest: or is addressed to another agent).
#[derive(Debug)]
pub(crate) struct Written<T> {
    pub revision: u64,
    pub value: Option<T>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub deployments: BTreeMap<DeploymentName, DeploymentRecord>,
    /// Registered agents (`agents.<id>`) → the labels they report (hints).
    pub registered: BTreeMap<AgentId, Labels>,
    /// The operator's labels of each agent (`values.<id>`, docs/adr/0017).
    pub labels: BTreeMap<AgentId, Labels>,
    /// The operator's per-agent values (`values.<id>`, docs/adr/0014).
    pub values: BTreeMap<AgentId, Labels>,
    pub desired: BTreeMap<AgentId, Written<AgentManifest>>,
    /// The keys manifests are signed with (none: unsigned).
    pub signing: Arc<SigningKeys>,
    pub statuses: BTreeMap<DeploymentName, Written<DeploymentStatus>>,
    /// Deployments deleted while this daemon watched: if one comes back it
    /// is a new deployment, whatever its old stored status says.
    pub deleted: BTreeSet<DeploymentName>,
    /// What each agent's status (`actual-state.<id>`) says about its key.
    pub reported: BTreeMap<AgentId, Floor>,
    /// The highest generation this process has written per agent. Kept
    /// across relists (a recreated bucket starts empty, the agents do not).
    pub written: BTreeMap<AgentId, u64>,
    /// `settings.heartbeat` as last seen or written (docs/adr/0015).
    pub heartbeat: Option<Written<HeartbeatSettings>>,
    /// What the next pass must render again.
    pub dirty: Dirty,
    /// The last pass's render of the whole fleet, patched by later passes
    /// that render only the agents whose inputs changed.
    pub rendered: Option<Rendered>,
    /// Each deployment's history (`revisions.<name>.<revision>`): the
    /// documents of earlier revisions, for agents a rollout holds on one.
    pub history: BTreeMap<DeploymentName, BTreeMap<u64, Deployment>>,
    /// The revisions recorded in the history, readable or not.
    pub recorded: BTreeMap<DeploymentName, BTreeSet<u64>>,
    /// The operators' pause/resume switches (`rollouts.<name>`).
    pub controls: BTreeMap<DeploymentName, Control>,
    /// The fleet's default rollout policy (`settings.rollout`).
    pub default_rollout: Option<RolloutPolicy>,
    /// Rollouts in progress (or finished, until the next revision).
    pub runs: BTreeMap<DeploymentName, Run>,
    /// Something a rollout's judgement depends on changed (an agent's
    /// status, a switch, a new rollout).
    pub rollout_due: bool,
    /// While a rollout is in progress: every agent's status as last seen
    /// (seeded by one read, then kept current by the watch), so a
    /// judgement reads only heartbeats. None otherwise (no memory spent).
    pub tracked: Option<BTreeMap<AgentId, Tracked>>,
    /// The last heartbeat read for judging rollouts, and when (monotonic).
    pub beats: Option<(tokio::time::Instant, flotilla_nats::Snapshot)>,
}

/// An agent's status as the watch last delivered it.
#[derive(Debug)]
pub(crate) struct Tracked {
    pub revision: u64,
    /// Server time of the write.
    pub created: SystemTime,
    /// None: deleted or unreadable.
    pub status: Option<manifest_types::AgentStatus>,
}

impl Tracked {
    /// Records `entry` unless a newer value is already held.
    pub fn record(map: &mut BTreeMap<AgentId, Tracked>, agent: AgentId, entry: &Entry) {
        if map
            .get(&agent)
            .is_some_and(|t| t.revision >= entry.revision)
        {
            return;
        }
        let status = (entry.operation == Operation::Put)
            .then(|| serde_json::from_slice(&entry.value).ok())
            .flatten();
        map.insert(
            agent,
            Tracked {
                revision: entry.revision,
                created: SystemTime::from(entry.created),
                status,
            },
        );
    }
}

/// What changed since the last pass, so a pass renders only that: every
/// agent after a deployment changed (or a relist), else the agents whose
/// labels, values, desired-state value or report changed.
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    pub all: bool,
    pub agents: BTreeSet<AgentId>,
}

impl Dirty {
    /// Records `agent` when `changed`; returns `changed`.
    fn agent(&mut self, changed: bool, agent: AgentId) -> bool {
        if changed && !self.all {
            self.agents.insert(agent);
        }
        changed
    }
}

static NO_LABELS: Labels = Labels::new();
static NO_HISTORY: BTreeMap<u64, Deployment> = BTreeMap::new();

impl State {
    /// A fresh state for a relist: everything is read again from the
    /// bucket except what this process itself wrote.
    pub fn relist(self) -> Self {
        Self {
            written: self.written,
            runs: self.runs,
            signing: self.signing,
            rollout_due: true,
            dirty: Dirty {
                all: true,
                agents: BTreeSet::new(),
            },
            ..Self::default()
        }
    }

    /// The floor a stored manifest of `agent` must reach to stand, and a new
    /// one must be written above.
    pub fn floor(&self, agent: &AgentId) -> Floor {
        let reported = self.reported.get(agent).copied().unwrap_or_default();
        Floor {
            generation: reported
                .generation
                .max(self.written.get(agent).copied().unwrap_or(0)),
            ..reported
        }
    }

    /// Records a manifest this daemon wrote.
    pub fn wrote(&mut self, manifest: AgentManifest, revision: u64) {
        let agent = manifest.agent_id.clone();
        let highest = self.written.entry(agent.clone()).or_default();
        *highest = (*highest).max(manifest.generation);
        self.desired.insert(
            agent,
            Written {
                revision,
                value: Some(manifest),
            },
        );
    }

    /// Records one watched entry; true when the render may change.
    pub fn apply_entry(&mut self, entry: &Entry) -> bool {
        let changed = self.apply(&entry.key, entry.revision, entry.operation, &entry.value);
        match Key::parse(&entry.key) {
            Some(Key::Deployment(name)) => {
                if let Some(d) = self.deployments.get_mut(&name)
                    && d.revision == entry.revision
                {
                    d.applied_at = Some(SystemTime::from(entry.created));
                }
            }
            Some(Key::ActualState(agent)) => {
                if let Some(tracked) = &mut self.tracked {
                    Tracked::record(tracked, agent, entry);
                }
            }
            _ => {}
        }
        changed
    }

    /// Whether a rollout is still to be judged (not Complete or RolledBack).
    pub fn rolling(&self) -> bool {
        self.runs.values().any(|r| !r.status.phase.is_final())
    }

    /// Records one value (or DEL/PURGE marker) of `key` at `revision`; true
    /// when the render may change.
    pub fn apply(&mut self, key: &str, revision: u64, operation: Operation, value: &[u8]) -> bool {
        let entry = Seen {
            key,
            revision,
            value,
        };
        let put = operation == Operation::Put;
        if key == keys::HEARTBEAT_SETTINGS {
            return self.apply_heartbeat_settings(entry, put);
        }
        if key == keys::ROLLOUT_SETTINGS {
            let policy = put
                .then(|| serde_json::from_slice::<RolloutPolicy>(value))
                .transpose()
                .unwrap_or_else(|error| {
                    tracing::warn!(%error, "{key} does not parse; no fleet default rollout policy");
                    None
                })
                .filter(|p| match p.validate() {
                    Ok(()) => true,
                    Err(error) => {
                        tracing::warn!(%error, "{key} is not a usable policy; no fleet default rollout policy");
                        false
                    }
                });
            let changed = self.default_rollout != policy;
            self.default_rollout = policy;
            self.dirty.all |= changed;
            return changed;
        }
        match Key::parse(key) {
            Some(Key::Deployment(name)) => {
                let changed = self.apply_deployment(name, entry, put);
                self.dirty.all |= changed;
                changed
            }
            Some(Key::Inventory(agent)) => {
                let changed = self.apply_inventory(agent.clone(), entry, put);
                self.dirty.agent(changed, agent)
            }
            Some(Key::DesiredState(agent)) => {
                if self
                    .desired
                    .get(&agent)
                    .is_some_and(|w| w.revision >= entry.revision)
                {
                    // The echo of this daemon's own write: not parsed again.
                    return false;
                }
                let value = put
                    .then(|| AgentManifest::from_json(entry.value).ok())
                    .flatten()
                    .filter(|m| m.agent_id == agent)
                    .map(|mut m| {
                        self.signing.keep_verified(entry.value, &mut m);
                        m
                    });
                let changed = record(
                    &mut self.desired,
                    agent.clone(),
                    entry.revision,
                    value,
                    Missing::Replace,
                );
                self.dirty.agent(changed, agent)
            }
            Some(Key::DeploymentStatus(name)) => {
                if self
                    .statuses
                    .get(&name)
                    .is_some_and(|w| w.revision >= entry.revision)
                {
                    return false;
                }
                let value = put
                    .then(|| serde_json::from_slice(entry.value).ok())
                    .flatten();
                record(
                    &mut self.statuses,
                    name,
                    entry.revision,
                    value,
                    Missing::Expected,
                )
            }
            Some(Key::ActualState(agent)) => {
                self.rollout_due |= self.rolling();
                let reported = if put {
                    publish::reported_floor(entry.value)
                } else {
                    Floor::default()
                };
                let changed = self.apply_report(agent.clone(), reported);
                self.dirty.agent(changed, agent)
            }
            Some(Key::Values(agent)) => {
                let changed = self.apply_values(agent.clone(), entry, put);
                self.dirty.agent(changed, agent)
            }
            Some(Key::Heartbeat(_)) => false,
            Some(Key::Revision(name, revision)) => {
                let doc = put
                    .then(|| serde_json::from_slice::<RevisionRecord>(value).ok())
                    .flatten()
                    .and_then(|r| Deployment::from_value(r.deployment).ok())
                    .filter(|d| d.name == name);
                if put {
                    self.recorded
                        .entry(name.clone())
                        .or_default()
                        .insert(revision);
                } else if let Some(r) = self.recorded.get_mut(&name) {
                    r.remove(&revision);
                }
                let history = self.history.entry(name.clone()).or_default();
                let changed = match doc {
                    Some(d) => history.insert(revision, d).is_none(),
                    None => history.remove(&revision).is_some(),
                };
                // Only a rollout in progress renders from the history.
                let matters = changed && self.runs.contains_key(&name);
                self.dirty.all |= matters;
                matters
            }
            Some(Key::Rollout(name)) => {
                // Only a readable switch acts: `rollout resume` writes one.
                // A deleted one is "not paused" but resumes nothing (the
                // revision a resume is told by stays).
                let control = if put {
                    match serde_json::from_slice::<RolloutControl>(value) {
                        Ok(c) if c.name == name => Control {
                            revision,
                            paused: c.paused,
                        },
                        _ => {
                            tracing::warn!(
                                key,
                                "not a rollout switch for this deployment; ignored"
                            );
                            return false;
                        }
                    }
                } else {
                    Control {
                        revision: self.controls.get(&name).map_or(0, |c| c.revision),
                        paused: false,
                    }
                };
                self.controls.insert(name, control);
                self.rollout_due = true;
                false
            }
            None => {
                tracing::debug!(key, "ignoring a key that is not Flotilla's");
                false
            }
        }
    }

    fn apply_deployment(&mut self, name: DeploymentName, entry: Seen<'_>, put: bool) -> bool {
        if !put {
            let removed = self.deployments.remove(&name).is_some();
            // A deployment that comes back is a new one, with rollouts of its own.
            self.runs.remove(&name);
            self.deleted.insert(name);
            return removed;
        }
        if self
            .deployments
            .get(&name)
            .is_some_and(|d| d.revision >= entry.revision)
        {
            return false;
        }
        let document = Deployment::from_json(entry.value)
            .map_err(|e| e.to_string())
            .and_then(|d| {
                if d.name == name {
                    Ok(d)
                } else {
                    Err(format!(
                        "the document is named {:?} but stored under {:?}",
                        d.name.as_str(),
                        entry.key
                    ))
                }
            });
        if let Err(error) = &document {
            tracing::warn!(deployment = %name, revision = entry.revision, %error, "deployment does not parse; rendering nothing from it");
        }
        let (first_seen, created_revision) = match self.deployments.get(&name) {
            Some(old) => (old.first_seen, old.created_revision),
            None => (entry.revision, None),
        };
        let applied_at = self.deployments.get(&name).and_then(|d| d.applied_at);
        self.deployments.insert(
            name,
            DeploymentRecord {
                revision: entry.revision,
                document,
                first_seen,
                created_revision,
                applied_at,
            },
        );
        true
    }

    /// An agent's status matters to the render only when it changes whether
    /// its stored manifest can stand (most status writes do not).
    fn apply_report(&mut self, agent: AgentId, reported: Floor) -> bool {
        let admitted = |s: &Self| {
            s.desired.get(&agent).and_then(|d| {
                d.value
                    .as_ref()
                    .map(|m| s.floor(&agent).admits(m.generation, d.revision))
            })
        };
        let before = admitted(self);
        self.reported.insert(agent.clone(), reported);
        before != admitted(self)
    }

    fn apply_inventory(&mut self, agent: AgentId, entry: Seen<'_>, put: bool) -> bool {
        if !put {
            return self.registered.remove(&agent).is_some();
        }
        let labels = addressed(&agent, entry.value, "inventory", |i: AgentInventory| {
            (i.agent_id, i.labels)
        });
        self.registered.insert(agent, labels.clone()) != Some(labels)
    }

    /// Someone else's value (or a deletion) asks for a pass, which puts the
    /// fleet's own value back if it differs; an echo costs nothing.
    fn apply_heartbeat_settings(&mut self, entry: Seen<'_>, put: bool) -> bool {
        if self
            .heartbeat
            .as_ref()
            .is_some_and(|w| w.revision >= entry.revision)
        {
            return false;
        }
        let value = put
            .then(|| serde_json::from_slice(entry.value).ok())
            .flatten();
        self.heartbeat = Some(Written {
            revision: entry.revision,
            value,
        });
        true
    }

    fn apply_values(&mut self, agent: AgentId, entry: Seen<'_>, put: bool) -> bool {
        if !put {
            let labels = self.labels.remove(&agent).is_some();
            return self.values.remove(&agent).is_some() | labels;
        }
        let (values, labels) = addressed(&agent, entry.value, "values", |v: AgentValues| {
            (v.agent_id, (v.values, v.labels))
        });
        let labels_changed = self.labels.insert(agent.clone(), labels.clone()) != Some(labels);
        (self.values.insert(agent, values.clone()) != Some(values)) | labels_changed
    }

    /// Every agent the control plane knows — registered ones with their
    /// labels, and those known only by an existing desired-state key — with
    /// what its render depends on.
    pub fn known_agents(&self) -> BTreeMap<&AgentId, AgentInput<'_>> {
        let input = |a: &AgentId, device_labels| AgentInput {
            labels: self.labels.get(a).unwrap_or(&NO_LABELS),
            device_labels,
            values: self.values.get(a).unwrap_or(&NO_LABELS),
            // What a failed render keeps is copied into the next manifest
            // and signed: only the control plane's own verified manifest
            // may supply it, never a value someone else wrote there.
            previous: self
                .desired
                .get(a)
                .and_then(|w| w.value.as_ref())
                .filter(|m| self.signing.is_empty() || !m.signatures.is_empty()),
        };
        let mut agents: BTreeMap<&AgentId, AgentInput<'_>> = self
            .desired
            .keys()
            .map(|a| (a, input(a, &NO_LABELS)))
            .collect();
        agents.extend(self.registered.iter().map(|(a, l)| (a, input(a, l))));
        agents
    }

    /// Fixes each deployment's creation order the first time it is rendered.
    pub fn resolve_created_revisions(&mut self) {
        for (name, d) in &mut self.deployments {
            if d.created_revision.is_none() {
                let recreated = self.deleted.remove(name);
                let stored = self
                    .statuses
                    .get(name)
                    .and_then(|s| s.value.as_ref())
                    .map(|s| s.created_revision)
                    .filter(|&c| c <= d.first_seen && !recreated);
                d.created_revision = Some(stored.unwrap_or(d.first_seen));
            }
        }
    }

    /// The render input for every deployment (after
    /// [`Self::resolve_created_revisions`]).
    pub fn deployment_inputs(&self) -> Vec<DeploymentInput<'_>> {
        self.deployments
            .iter()
            .map(|(name, d)| DeploymentInput {
                name,
                document: d.document.as_ref().map_err(String::as_str),
                revision: d.revision,
                created_revision: d.created_revision.unwrap_or(d.first_seen),
                rollout: self
                    .runs
                    .get(name)
                    .filter(|r| r.status.revision == d.revision)
                    .map(|run| Staged {
                        run,
                        history: self.history.get(name).unwrap_or(&NO_HISTORY),
                    }),
            })
            .collect()
    }
}

/// The map (labels, values) a document addressed to `agent` carries; empty,
/// with a warning, when it does not parse or names another agent.
fn addressed<T: serde::de::DeserializeOwned, M: Default>(
    agent: &AgentId,
    bytes: &[u8],
    what: &str,
    parts: impl FnOnce(T) -> (AgentId, M),
) -> M {
    match serde_json::from_slice::<T>(bytes).map(parts) {
        Ok((claimed, map)) if &claimed == agent => map,
        Ok((claimed, _)) => {
            tracing::warn!(%agent, %claimed, "{what} names another agent; ignoring it");
            M::default()
        }
        Err(error) => {
            tracing::warn!(%agent, %error, "{what} does not parse; using none");
            M::default()
        }
    }
}

/// What a missing or unreadable value of a written key means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missing {
    /// Always replaced (a desired-state key is never absent).
    Replace,
    /// Fine when nothing was held either (a deleted deployment's status).
    Expected,
}

/// Records a value of a key the daemon writes, unless the daemon already
/// holds that revision (the echo of its own write) or a newer one. True when
/// the render may change: the value differs from the one held (for
/// [`Missing::Replace`] keys: or is no readable value at all).
fn record<K: Ord, T: PartialEq>(
    map: &mut BTreeMap<K, Written<T>>,
    key: K,
    revision: u64,
    value: Option<T>,
    missing: Missing,
) -> bool {
    if map.get(&key).is_some_and(|w| w.revision >= revision) {
        return false;
    }
    let same = (value.is_some() || missing == Missing::Expected)
        && map.get(&key).is_some_and(|w| w.value == value);
    map.insert(key, Written { revision, value });
    !same
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bytes(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    fn deployment(name: &str) -> Vec<u8> {
        bytes(
            json!({"apiVersion": "flotilla.dev/v1", "kind": "Deployment", "name": name,
            "selector": {"agents": ["pi-1"]},
            "resources": [{"id": "f", "kind": "File", "spec": {"path": "/etc/f", "content": "x"}}]}),
        )
    }

    fn inventory(agent: &str, labels: serde_json::Value) -> Vec<u8> {
        bytes(
            json!({"apiVersion": "flotilla.dev/v1", "agentId": agent, "instanceId": "i",
            "agentVersion": "0.1.0", "arch": "x86_64", "os": "linux", "reconcilers": ["File"],
            "labels": labels}),
        )
    }

    fn name(n: &str) -> DeploymentName {
        DeploymentName::new(n).unwrap()
    }

    fn agent(a: &str) -> AgentId {
        AgentId::new(a).unwrap()
    }

    #[test]
    fn a_manifest_the_control_plane_did_not_sign_supplies_nothing_to_a_render() {
        let (seed, _) = manifest_types::signing::Signer::generate();
        let signer = manifest_types::signing::Signer::from_seed(&seed).unwrap();
        let mut s = State {
            signing: Arc::new(SigningKeys::new(vec![signer])),
            ..State::default()
        };
        let manifest = |resources: serde_json::Value| {
            json!({"apiVersion": "flotilla.dev/v1", "agentId": "pi-1", "generation": 4,
                   "resources": resources})
        };
        // Written by hand (or by a stolen control credential): unsigned.
        let forged = manifest(json!([{"id": "web/f", "kind": "File",
            "spec": {"path": "/etc/f", "content": "forged"},
            "source": {"deployment": "web", "revision": 3}}]));
        assert!(s.apply("desired-state.pi-1", 5, Operation::Put, &bytes(forged)));
        assert!(s.known_agents()[&agent("pi-1")].previous.is_none());

        // The control plane's own, signed with its key: it stands.
        let mut own: AgentManifest = serde_json::from_value(manifest(json!([]))).unwrap();
        s.signing.sign(&mut own);
        assert!(s.apply("desired-state.pi-1", 6, Operation::Put, &own.to_json()));
        assert!(s.known_agents()[&agent("pi-1")].previous.is_some());
    }

    #[test]
    fn deployments_are_recorded_replaced_and_removed() {
        let mut s = State::default();
        assert!(s.apply("deployments.web", 3, Operation::Put, &deployment("web")));
        assert!(!s.apply("deployments.web", 3, Operation::Put, &deployment("web")));
        assert!(s.apply("deployments.web", 8, Operation::Put, &deployment("web")));
        let d = &s.deployments[&name("web")];
        assert_eq!((d.revision, d.first_seen), (8, 3));
        assert!(d.document.is_ok());
        assert!(s.apply("deployments.web", 9, Operation::Delete, b""));
        assert!(s.deployments.is_empty());
        assert!(!s.apply("deployments.web", 10, Operation::Purge, b""));
    }

    #[test]
    fn unreadable_and_misnamed_deployments_carry_an_error() {
        let mut s = State::default();
        s.apply("deployments.bad", 1, Operation::Put, b"{not json");
        s.apply("deployments.other", 2, Operation::Put, &deployment("web"));
        let bad = s.deployments[&name("bad")].document.as_ref().unwrap_err();
        assert!(bad.contains("invalid deployment"), "{bad}");
        let other = s.deployments[&name("other")].document.as_ref().unwrap_err();
        assert!(other.contains("named \"web\""), "{other}");
    }

    #[test]
    fn inventory_changes_matter_only_when_labels_change() {
        let mut s = State::default();
        assert!(s.apply(
            "agents.pi-1",
            1,
            Operation::Put,
            &inventory("pi-1", json!({"a": "1"}))
        ));
        assert!(!s.apply(
            "agents.pi-1",
            2,
            Operation::Put,
            &inventory("pi-1", json!({"a": "1"}))
        ));
        assert!(s.apply(
            "agents.pi-1",
            3,
            Operation::Put,
            &inventory("pi-1", json!({"a": "2"}))
        ));
        // Claims to be someone else: known, but unlabelled.
        assert!(s.apply(
            "agents.pi-2",
            4,
            Operation::Put,
            &inventory("pi-9", json!({"a": "2"}))
        ));
        assert!(s.registered[&agent("pi-2")].is_empty());
        assert!(s.apply("agents.pi-1", 5, Operation::Delete, b""));
        assert_eq!(s.registered.len(), 1);
    }

    #[test]
    fn own_writes_echoed_back_do_not_trigger_a_render() {
        let mut s = State::default();
        s.desired.insert(
            agent("pi-1"),
            Written {
                revision: 7,
                value: None,
            },
        );
        assert!(!s.apply("desired-state.pi-1", 7, Operation::Put, b"{}"));
        assert!(s.apply("desired-state.pi-1", 8, Operation::Purge, b""));
        assert!(s.desired[&agent("pi-1")].value.is_none());
        assert!(s.apply("deployment-status.web", 4, Operation::Put, b"{}"));
        assert!(!s.apply("deployment-status.web", 4, Operation::Put, b"{}"));
        assert!(!s.apply("heartbeat.pi-1", 9, Operation::Put, b"{}"));
        assert!(!s.apply("unrelated.key", 9, Operation::Put, b"{}"));
    }

    #[test]
    fn known_agents_include_those_with_only_a_desired_state_key() {
        let mut s = State::default();
        s.apply(
            "agents.pi-1",
            1,
            Operation::Put,
            &inventory("pi-1", json!({"a": "1"})),
        );
        s.apply("desired-state.pi-2", 2, Operation::Put, b"junk");
        s.apply("desired-state.pi-1", 3, Operation::Put, b"junk");
        s.apply(
            "values.pi-2",
            4,
            Operation::Put,
            &bytes(
                json!({"apiVersion": "flotilla.dev/v1", "agentId": "pi-2", "labels": {"b": "2"}}),
            ),
        );
        let known = s.known_agents();
        assert_eq!(known.len(), 2);
        let pi1 = &known[&agent("pi-1")];
        assert_eq!(pi1.device_labels.get("a").map(String::as_str), Some("1"));
        assert!(
            pi1.labels.is_empty(),
            "reported labels are not the operator's"
        );
        assert_eq!(
            known[&agent("pi-2")].labels.get("b").map(String::as_str),
            Some("2")
        );
    }

    #[test]
    fn creation_order_comes_from_a_stored_status_when_there_is_one() {
        let mut s = State::default();
        s.apply("deployments.web", 20, Operation::Put, &deployment("web"));
        s.apply("deployments.api", 21, Operation::Put, &deployment("api"));
        let status = bytes(json!({"apiVersion": "flotilla.dev/v1", "name": "web",
            "observedRevision": 20, "createdRevision": 5, "targets": {}}));
        s.apply("deployment-status.web", 22, Operation::Put, &status);
        // A stored createdRevision newer than the document is not believed.
        let future = bytes(json!({"apiVersion": "flotilla.dev/v1", "name": "api",
            "observedRevision": 21, "createdRevision": 99, "targets": {}}));
        s.apply("deployment-status.api", 23, Operation::Put, &future);
        s.resolve_created_revisions();
        assert_eq!(s.deployments[&name("web")].created_revision, Some(5));
        assert_eq!(s.deployments[&name("api")].created_revision, Some(21));
        // Later updates keep the resolved order.
        s.apply("deployments.web", 30, Operation::Put, &deployment("web"));
        assert_eq!(s.deployments[&name("web")].created_revision, Some(5));
        // Deleted and created again: a new deployment, ordered last.
        s.apply("deployments.web", 31, Operation::Delete, b"");
        s.apply("deployments.web", 32, Operation::Put, &deployment("web"));
        s.resolve_created_revisions();
        assert_eq!(s.deployments[&name("web")].created_revision, Some(32));
    }

    fn agent_status(accepted: u64, observed: u64, replayed: Option<u64>) -> Vec<u8> {
        let mut status = json!({"apiVersion": "flotilla.dev/v1", "agentId": "pi-1",
            "instanceId": "i", "manifestGeneration": accepted, "observedGeneration": observed,
            "observedRevision": 1, "resources": {}, "conditions": [],
            "agent": {"version": "0.1.0", "arch": "x86_64", "os": "linux"}});
        if let Some(revision) = replayed {
            status["rejection"] = json!({"reason": "ReplayedGeneration", "message": "m",
                "revision": revision, "generation": 1});
        }
        bytes(status)
    }

    #[test]
    fn statuses_matter_only_when_they_change_whether_the_stored_manifest_stands() {
        let mut s = State::default();
        s.wrote(AgentManifest::empty(agent("pi-1"), 3), 10);
        let key = "actual-state.pi-1";
        assert!(
            !s.apply(key, 11, Operation::Put, &agent_status(3, 3, None)),
            "the agent accepted what is stored"
        );
        assert!(
            s.apply(key, 12, Operation::Put, &agent_status(5, 5, None)),
            "the agent has seen more than what is stored"
        );
        assert!(!s.apply(key, 13, Operation::Put, &agent_status(5, 5, None)));
        s.wrote(AgentManifest::empty(agent("pi-1"), 6), 14);
        assert!(!s.apply(key, 15, Operation::Put, &agent_status(5, 6, Some(12))));
        assert!(
            s.apply(key, 16, Operation::Put, &agent_status(5, 6, Some(14))),
            "the agent rejected the stored revision as replayed"
        );
        assert!(
            !s.apply(
                "actual-state.pi-7",
                17,
                Operation::Put,
                &agent_status(1, 1, None)
            ),
            "an agent without a key has nothing to replace"
        );
        assert_eq!(s.floor(&agent("pi-1")).generation, 6);
    }

    #[test]
    fn a_relist_forgets_the_bucket_but_not_what_this_process_wrote() {
        let mut s = State::default();
        s.wrote(AgentManifest::empty(agent("pi-1"), 9), 40);
        s.apply(
            "agents.pi-1",
            41,
            Operation::Put,
            &inventory("pi-1", json!({})),
        );
        let s = s.relist();
        assert!(s.desired.is_empty() && s.registered.is_empty());
        assert_eq!(s.floor(&agent("pi-1")).generation, 9);
    }

    #[test]
    fn unreadable_manifests_always_ask_for_a_pass_and_a_status_marker_once() {
        let mut s = State::default();
        assert!(s.apply("desired-state.pi-1", 5, Operation::Put, b"junk"));
        assert!(s.apply("desired-state.pi-1", 6, Operation::Put, b"more junk"));
        assert!(s.apply("desired-state.pi-1", 7, Operation::Delete, b""));
        // Another agent's manifest in this key is not this agent's manifest.
        let foreign = AgentManifest::empty(agent("pi-2"), 3).to_json();
        assert!(s.apply("desired-state.pi-1", 8, Operation::Put, &foreign));
        assert!(s.desired[&agent("pi-1")].value.is_none());
        // The same manifest at a new revision (a restore of identical bytes)
        // changes nothing.
        let own = AgentManifest::empty(agent("pi-1"), 3).to_json();
        assert!(s.apply("desired-state.pi-1", 9, Operation::Put, &own));
        assert!(!s.apply("desired-state.pi-1", 10, Operation::Put, &own));
        // The echo of a status removal: nothing held, nothing to do.
        assert!(s.apply("deployment-status.web", 11, Operation::Delete, b""));
        assert!(!s.apply("deployment-status.web", 12, Operation::Delete, b""));
    }
}
