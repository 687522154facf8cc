//! The daemon's state, in three parts with one job each: the [`FleetView`]
//! (what the bucket holds, fed by the watch), the [`RenderMemo`] (the last
//! render and what must be rendered again) and the [`Rollouts`] (rollouts in
//! progress and what judging them reads; `rollouts` starts and judges them). [`State::apply_entry`] feeds a
//! watched entry to the view and marks what it touched in the other two.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use async_nats::jetstream::kv::{Entry, Operation};
use manifest_types::keys::Key;
use manifest_types::{AgentId, DeploymentName};

use super::view::{FleetView, Touched};
use crate::render::Rendered;
use crate::rollout::Run;

#[derive(Debug, Default)]
pub(crate) struct State {
    pub fleet: FleetView,
    pub memo: RenderMemo,
    pub rollouts: Rollouts,
}

/// The last pass's render of the whole fleet, and what the next pass must
/// render again: every agent after a deployment changed (or a relist), else
/// the agents whose labels, values, desired-state value or report changed.
#[derive(Debug, Default)]
pub(crate) struct RenderMemo {
    /// Patched by later passes that render only the agents whose inputs changed.
    pub rendered: Option<Rendered>,
    pub dirty: Dirty,
}

#[derive(Debug, Default)]
pub(crate) struct Dirty {
    pub all: bool,
    pub agents: BTreeSet<AgentId>,
}

impl Dirty {
    fn agent(&mut self, agent: AgentId) {
        if !self.all {
            self.agents.insert(agent);
        }
    }
}

/// Rollouts in progress, and what judging them reads.
#[derive(Debug, Default)]
pub(crate) struct Rollouts {
    /// Rollouts in progress (or finished, until the next revision).
    pub runs: BTreeMap<DeploymentName, Run>,
    /// Something a rollout's judgement depends on changed (an agent's
    /// status, a switch, a new rollout).
    pub due: bool,
    /// While a rollout is in progress: every agent's status as last seen
    /// (seeded by one read, then kept current by the watch), so a
    /// judgement reads only heartbeats. None otherwise (no memory spent).
    pub tracked: Option<BTreeMap<AgentId, Tracked>>,
    /// The last heartbeat read for judging rollouts, and when (monotonic).
    pub beats: Option<(tokio::time::Instant, flotilla_nats::Snapshot)>,
}

impl Rollouts {
    /// After a relist: the rollouts carry on and are judged at once.
    pub fn relist(self) -> Self {
        Self {
            runs: self.runs,
            due: true,
            ..Self::default()
        }
    }

    /// Whether a rollout is still to be judged (not Complete or RolledBack).
    pub fn rolling(&self) -> bool {
        self.runs.values().any(|r| !r.status.phase.is_final())
    }
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

impl State {
    pub fn new(signing: std::sync::Arc<manifest_types::signing::SigningKeys>) -> Self {
        Self {
            fleet: FleetView {
                signing,
                ..FleetView::default()
            },
            ..Self::default()
        }
    }

    /// A fresh state for a relist: everything is read again from the
    /// bucket except what this process itself wrote and the rollouts it runs.
    pub fn relist(self) -> Self {
        Self {
            fleet: self.fleet.relist(),
            memo: RenderMemo {
                rendered: None,
                dirty: Dirty {
                    all: true,
                    agents: BTreeSet::new(),
                },
            },
            rollouts: self.rollouts.relist(),
        }
    }

    /// Records one watched entry; true when a pass is needed.
    pub fn apply_entry(&mut self, entry: &Entry) -> bool {
        let touched = self.fleet.apply_entry(entry);
        if let (Some(Key::ActualState(agent)), Some(tracked)) =
            (Key::parse(&entry.key), &mut self.rollouts.tracked)
        {
            Tracked::record(tracked, agent, entry);
        }
        self.touched(&entry.key, entry.operation, touched)
    }

    /// Records one value (or DEL/PURGE marker) of `key` at `revision`; true
    /// when a pass is needed.
    #[cfg(test)]
    pub fn apply(&mut self, key: &str, revision: u64, operation: Operation, value: &[u8]) -> bool {
        let touched = self.fleet.apply(key, revision, operation, value);
        self.touched(key, operation, touched)
    }

    /// Marks what an entry touched in the render memo and the rollouts.
    fn touched(&mut self, key: &str, operation: Operation, touched: Touched) -> bool {
        if let Some(Key::Deployment(name)) = Key::parse(key)
            && operation != Operation::Put
        {
            // A deployment that comes back is a new one, with rollouts of its own.
            self.rollouts.runs.remove(&name);
        }
        match touched {
            Touched::Nothing => false,
            Touched::Written => true,
            Touched::Fleet => {
                self.memo.dirty.all = true;
                true
            }
            Touched::Agent(agent) => {
                self.memo.dirty.agent(agent);
                true
            }
            Touched::Report(agent, changed) => {
                self.rollouts.due |= self.rollouts.rolling();
                if changed {
                    self.memo.dirty.agent(agent);
                }
                changed
            }
            // Only a rollout in progress renders from the history.
            Touched::History(name) => {
                let matters = self.rollouts.runs.contains_key(&name);
                self.memo.dirty.all |= matters;
                matters
            }
            Touched::Control => {
                self.rollouts.due = true;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use manifest_types::signing::SigningKeys;
    use manifest_types::{AgentManifest, DeploymentName};
    use serde_json::json;

    use super::*;
    use crate::daemon::view::Written;

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
        let mut s = State::new(Arc::new(SigningKeys::new(vec![signer])));
        let manifest = |resources: serde_json::Value| {
            json!({"apiVersion": "flotilla.dev/v1", "agentId": "pi-1", "generation": 4,
                   "resources": resources})
        };
        // Written by hand (or by a stolen control credential): unsigned.
        let forged = manifest(json!([{"id": "web/f", "kind": "File",
            "spec": {"path": "/etc/f", "content": "forged"},
            "source": {"deployment": "web", "revision": 3}}]));
        assert!(s.apply("desired-state.pi-1", 5, Operation::Put, &bytes(forged)));
        assert!(s.fleet.known_agents()[&agent("pi-1")].previous.is_none());

        // The control plane's own, signed with its key: it stands.
        let mut own: AgentManifest = serde_json::from_value(manifest(json!([]))).unwrap();
        s.fleet.signing.sign(&mut own);
        assert!(s.apply("desired-state.pi-1", 6, Operation::Put, &own.to_json()));
        assert!(s.fleet.known_agents()[&agent("pi-1")].previous.is_some());
    }

    #[test]
    fn deployments_are_recorded_replaced_and_removed() {
        let mut s = State::default();
        assert!(s.apply("deployments.web", 3, Operation::Put, &deployment("web")));
        assert!(!s.apply("deployments.web", 3, Operation::Put, &deployment("web")));
        assert!(s.apply("deployments.web", 8, Operation::Put, &deployment("web")));
        let d = &s.fleet.deployments[&name("web")];
        assert_eq!((d.revision, d.first_seen), (8, 3));
        assert!(d.document.is_ok());
        assert!(s.apply("deployments.web", 9, Operation::Delete, b""));
        assert!(s.fleet.deployments.is_empty());
        assert!(!s.apply("deployments.web", 10, Operation::Purge, b""));
    }

    #[test]
    fn unreadable_and_misnamed_deployments_carry_an_error() {
        let mut s = State::default();
        s.apply("deployments.bad", 1, Operation::Put, b"{not json");
        s.apply("deployments.other", 2, Operation::Put, &deployment("web"));
        let bad = s.fleet.deployments[&name("bad")]
            .document
            .as_ref()
            .unwrap_err();
        assert!(bad.contains("invalid deployment"), "{bad}");
        let other = s.fleet.deployments[&name("other")]
            .document
            .as_ref()
            .unwrap_err();
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
        assert!(s.fleet.registered[&agent("pi-2")].is_empty());
        assert!(s.apply("agents.pi-1", 5, Operation::Delete, b""));
        assert_eq!(s.fleet.registered.len(), 1);
    }

    #[test]
    fn own_writes_echoed_back_do_not_trigger_a_render() {
        let mut s = State::default();
        s.fleet.desired.insert(
            agent("pi-1"),
            Written {
                revision: 7,
                value: None,
            },
        );
        assert!(!s.apply("desired-state.pi-1", 7, Operation::Put, b"{}"));
        assert!(s.apply("desired-state.pi-1", 8, Operation::Purge, b""));
        assert!(s.fleet.desired[&agent("pi-1")].value.is_none());
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
        let known = s.fleet.known_agents();
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
        let resolved = s.fleet.unresolved_created_revisions();
        s.fleet.resolve_created_revisions(&resolved);
        assert_eq!(s.fleet.deployments[&name("web")].created_revision, Some(5));
        assert_eq!(s.fleet.deployments[&name("api")].created_revision, Some(21));
        // Later updates keep the resolved order.
        s.apply("deployments.web", 30, Operation::Put, &deployment("web"));
        assert_eq!(s.fleet.deployments[&name("web")].created_revision, Some(5));
        // Deleted and created again: a new deployment, ordered last.
        s.apply("deployments.web", 31, Operation::Delete, b"");
        s.apply("deployments.web", 32, Operation::Put, &deployment("web"));
        let resolved = s.fleet.unresolved_created_revisions();
        s.fleet.resolve_created_revisions(&resolved);
        assert_eq!(s.fleet.deployments[&name("web")].created_revision, Some(32));
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
        s.fleet.wrote(AgentManifest::empty(agent("pi-1"), 3), 10);
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
        s.fleet.wrote(AgentManifest::empty(agent("pi-1"), 6), 14);
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
        assert_eq!(s.fleet.floor(&agent("pi-1")).generation, 6);
    }

    #[test]
    fn a_relist_forgets_the_bucket_but_not_what_this_process_wrote() {
        let mut s = State::default();
        s.fleet.wrote(AgentManifest::empty(agent("pi-1"), 9), 40);
        s.apply(
            "agents.pi-1",
            41,
            Operation::Put,
            &inventory("pi-1", json!({})),
        );
        let s = s.relist();
        assert!(s.fleet.desired.is_empty() && s.fleet.registered.is_empty());
        assert_eq!(s.fleet.floor(&agent("pi-1")).generation, 9);
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
        assert!(s.fleet.desired[&agent("pi-1")].value.is_none());
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
