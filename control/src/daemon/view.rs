//! The fleet view: the daemon's in-memory copy of the keys it renders from
//! and writes to, fed by one KV watch ([`FleetView::apply`]), with what this
//! process itself wrote (the floors of ADR 0012). It answers what a render,
//! a rollout's judgement and (later) an API read from it; it decides
//! nothing. [`Touched`] says what a watched entry changed: echoes of the
//! daemon's own writes (already recorded by KV sequence) change nothing,
//! and neither does a value equal to the one held. Agents' statuses count
//! for the render only when they change whether a stored manifest can stand
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
use crate::render::{AgentInput, Labels};
use crate::rollout::Control;

/// One watched value, as [`FleetView::apply`] reads it.
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

/// What one watched entry changed, for the render memo and the rollouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Touched {
    /// Nothing anyone reads (an echo, an equal value, a key not Flotilla's).
    Nothing,
    /// A value the daemon writes itself (a deployment status, the heartbeat
    /// settings): a pass puts its own back, rendering nobody.
    Written,
    /// Every agent's render may change (a deployment, the rollout policy).
    Fleet,
    /// This agent's render may change (labels, values, its stored manifest).
    Agent(AgentId),
    /// An agent reported; true when that changes whether its stored
    /// manifest stands.
    Report(AgentId, bool),
    /// A deployment's history changed (renders read it while it rolls out).
    History(DeploymentName),
    /// An operator's rollout switch.
    Control,
}

impl Touched {
    fn written(changed: bool) -> Self {
        if changed {
            Self::Written
        } else {
            Self::Nothing
        }
    }

    fn fleet(changed: bool) -> Self {
        if changed { Self::Fleet } else { Self::Nothing }
    }

    fn agent(changed: bool, agent: AgentId) -> Self {
        if changed {
            Self::Agent(agent)
        } else {
            Self::Nothing
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct FleetView {
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
    /// Each deployment's history (`revisions.<name>.<revision>`): the
    /// documents of earlier revisions, for agents a rollout holds on one.
    pub history: BTreeMap<DeploymentName, BTreeMap<u64, Deployment>>,
    /// The revisions recorded in the history, readable or not.
    pub recorded: BTreeMap<DeploymentName, BTreeSet<u64>>,
    /// The operators' pause/resume switches (`rollouts.<name>`).
    pub controls: BTreeMap<DeploymentName, Control>,
    /// The fleet's default rollout policy (`settings.rollout`).
    pub default_rollout: Option<RolloutPolicy>,
}

static NO_LABELS: Labels = Labels::new();

impl FleetView {
    /// A fresh view for a relist: everything is read again from the bucket
    /// except what this process itself wrote.
    pub fn relist(self) -> Self {
        Self {
            written: self.written,
            signing: self.signing,
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

    /// The manifest stored for `agent`, when it is readable and addressed to it.
    pub fn stored(&self, agent: &AgentId) -> Option<&AgentManifest> {
        self.desired.get(agent).and_then(|w| w.value.as_ref())
    }

    /// Records one watched entry (and, for a deployment, when it was written).
    pub fn apply_entry(&mut self, entry: &Entry) -> Touched {
        let touched = self.apply(&entry.key, entry.revision, entry.operation, &entry.value);
        if let Some(Key::Deployment(name)) = Key::parse(&entry.key)
            && let Some(d) = self.deployments.get_mut(&name)
            && d.revision == entry.revision
        {
            d.applied_at = Some(SystemTime::from(entry.created));
        }
        touched
    }

    /// Records one value (or DEL/PURGE marker) of `key` at `revision`, and
    /// says what it touched.
    pub fn apply(
        &mut self,
        key: &str,
        revision: u64,
        operation: Operation,
        value: &[u8],
    ) -> Touched {
        let entry = Seen {
            key,
            revision,
            value,
        };
        let put = operation == Operation::Put;
        if key == keys::HEARTBEAT_SETTINGS {
            return Touched::written(self.apply_heartbeat_settings(entry, put));
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
            return Touched::fleet(changed);
        }
        match Key::parse(key) {
            Some(Key::Deployment(name)) => {
                let changed = self.apply_deployment(name, entry, put);
                Touched::fleet(changed)
            }
            Some(Key::Inventory(agent)) => {
                let changed = self.apply_inventory(agent.clone(), entry, put);
                Touched::agent(changed, agent)
            }
            Some(Key::DesiredState(agent)) => {
                if self
                    .desired
                    .get(&agent)
                    .is_some_and(|w| w.revision >= entry.revision)
                {
                    // The echo of this daemon's own write: not parsed again.
                    return Touched::Nothing;
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
                Touched::agent(changed, agent)
            }
            Some(Key::DeploymentStatus(name)) => {
                if self
                    .statuses
                    .get(&name)
                    .is_some_and(|w| w.revision >= entry.revision)
                {
                    return Touched::Nothing;
                }
                let value = put
                    .then(|| serde_json::from_slice(entry.value).ok())
                    .flatten();
                Touched::written(record(
                    &mut self.statuses,
                    name,
                    entry.revision,
                    value,
                    Missing::Expected,
                ))
            }
            Some(Key::ActualState(agent)) => {
                let reported = if put {
                    publish::reported_floor(entry.value)
                } else {
                    Floor::default()
                };
                let changed = self.apply_report(agent.clone(), reported);
                Touched::Report(agent, changed)
            }
            Some(Key::Values(agent)) => {
                let changed = self.apply_values(agent.clone(), entry, put);
                Touched::agent(changed, agent)
            }
            Some(Key::Heartbeat(_)) => Touched::Nothing,
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
                if changed {
                    Touched::History(name)
                } else {
                    Touched::Nothing
                }
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
                            return Touched::Nothing;
                        }
                    }
                } else {
                    Control {
                        revision: self.controls.get(&name).map_or(0, |c| c.revision),
                        paused: false,
                    }
                };
                self.controls.insert(name, control);
                Touched::Control
            }
            None => {
                tracing::debug!(key, "ignoring a key that is not Flotilla's");
                Touched::Nothing
            }
        }
    }

    fn apply_deployment(&mut self, name: DeploymentName, entry: Seen<'_>, put: bool) -> bool {
        if !put {
            let removed = self.deployments.remove(&name).is_some();
            // A deployment that comes back is a new one.
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

    /// The creation order of each deployment rendered for the first time
    /// (from a stored status when there is one, so restarts keep the order;
    /// a deployment deleted and created again is new).
    pub fn unresolved_created_revisions(&self) -> BTreeMap<DeploymentName, u64> {
        self.deployments
            .iter()
            .filter(|(_, d)| d.created_revision.is_none())
            .map(|(name, d)| {
                let recreated = self.deleted.contains(name);
                let stored = self
                    .statuses
                    .get(name)
                    .and_then(|s| s.value.as_ref())
                    .map(|s| s.created_revision)
                    .filter(|&c| c <= d.first_seen && !recreated);
                (name.clone(), stored.unwrap_or(d.first_seen))
            })
            .collect()
    }

    /// Fixes the creation order [`Self::unresolved_created_revisions`] found.
    pub fn resolve_created_revisions(&mut self, resolved: &BTreeMap<DeploymentName, u64>) {
        for (name, created) in resolved {
            if let Some(d) = self.deployments.get_mut(name) {
                d.created_revision = Some(*created);
                self.deleted.remove(name);
            }
        }
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
