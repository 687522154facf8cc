//! A pass, planned: pure functions from the [`State`] to what a pass
//! writes, with no I/O. [`execute`](super::execute) performs a plan and
//! takes its outcome back into the state. A pass is two rounds, because a
//! deployment status reports the generations the manifests were actually
//! written at:
//!
//! 1. [`plan_manifests`] — the rollouts this pass starts ([`prepare`]), the
//!    render (the whole fleet when a deployment changed, else only the
//!    agents whose labels, values, stored manifest or report changed,
//!    patched into the last render) and the manifests that do not stand
//!    (their resources changed, or the stored value is not the control
//!    plane's own rendering at a generation the agent can accept —
//!    docs/adr/0012), each with the generation it is planned at.
//! 2. [`plan_records`] — the deployment statuses whose content changed, the
//!    history records and trims, the heartbeat settings, and the statuses of
//!    deleted deployments to remove.
//!
//! Each agent is rendered from its whole desired state, never a hint of what
//! changed; the pass's cost follows what changed, and an unchanged fleet
//! plans nothing.

use std::collections::{BTreeMap, BTreeSet};

use manifest_types::{
    AgentId, ApiVersion, Deployment, DeploymentName, DeploymentStatus, HeartbeatSettings,
    ManagedResource,
};

use super::rollouts::{HistoryPlan, plan_history, prepare};
use super::state::State;
use super::view::{FleetView, Written};
use crate::heartbeat::{HeartbeatPolicy, needs_write};
use crate::publish::{Floor, Known};
use crate::render::{self, DeploymentInput, Rendered, Staged};
use crate::rollout::Run;

/// Round one of a pass.
#[derive(Debug)]
pub(crate) struct ManifestPlan {
    /// The creation order of deployments rendered for the first time.
    pub created: BTreeMap<DeploymentName, u64>,
    /// The rollouts as this pass leaves them (started, continued, dropped).
    pub runs: BTreeMap<DeploymentName, Run>,
    /// A rollout was started or continued: judge at once.
    pub rollouts_started: bool,
    /// This pass's render, to take into the render memo.
    pub render: RenderUpdate,
    /// How many agents this pass rendered.
    pub agents_rendered: usize,
    /// The manifests that do not stand.
    pub writes: Vec<ManifestWrite>,
}

/// A pass's render: the whole fleet, or some agents to patch into the last
/// render (which stays in the memo, never copied).
#[derive(Debug)]
pub(crate) enum RenderUpdate {
    Whole(Rendered),
    Patch {
        rendered: Rendered,
        agents: BTreeSet<AgentId>,
    },
}

impl RenderUpdate {
    /// Takes this render into `memo`: the whole fleet's render after the pass.
    pub fn apply_to(self, memo: &mut Option<Rendered>) {
        match (self, memo.as_mut()) {
            (Self::Patch { rendered, agents }, Some(previous)) => previous.patch(rendered, &agents),
            (Self::Whole(rendered) | Self::Patch { rendered, .. }, _) => *memo = Some(rendered),
        }
    }
}

/// One manifest to write.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ManifestWrite {
    pub agent: AgentId,
    pub resources: Vec<ManagedResource>,
    /// What the agent and this process have seen of the key.
    pub floor: Floor,
    /// The readable manifest the key holds (None: nothing readable; the
    /// key is read afresh before writing).
    pub known: Option<Known>,
}

impl ManifestWrite {
    /// The generation the write is planned at, when the key's content is
    /// known (a compare-and-swap that finds the key moved goes higher).
    pub fn generation(&self) -> Option<u64> {
        self.known.map(|k| self.floor.next_above(k.generation))
    }
}

static NO_HISTORY: BTreeMap<u64, Deployment> = BTreeMap::new();

/// The render input for every deployment: its creation order (resolved, or
/// from `created`) and, while it rolls out, the rollout and its history.
pub(crate) fn deployment_inputs<'a>(
    fleet: &'a FleetView,
    created: &BTreeMap<DeploymentName, u64>,
    runs: &'a BTreeMap<DeploymentName, Run>,
) -> Vec<DeploymentInput<'a>> {
    fleet
        .deployments
        .iter()
        .map(|(name, d)| DeploymentInput {
            name,
            document: d.document.as_ref().map_err(String::as_str),
            revision: d.revision,
            created_revision: d
                .created_revision
                .or_else(|| created.get(name).copied())
                .unwrap_or(d.first_seen),
            rollout: runs
                .get(name)
                .filter(|r| r.status.revision == d.revision)
                .map(|run| Staged {
                    run,
                    history: fleet.history.get(name).unwrap_or(&NO_HISTORY),
                }),
        })
        .collect()
}

/// Round one: what to render and which manifests to write.
pub(crate) fn plan_manifests(state: &State) -> ManifestPlan {
    let fleet = &state.fleet;
    let created = fleet.unresolved_created_revisions();
    let (runs, rollouts_started) = prepare(fleet, &created, &state.rollouts.runs);
    let inputs = deployment_inputs(fleet, &created, &runs);
    let dirty = &state.memo.dirty;
    let render = if dirty.all || state.memo.rendered.is_none() {
        RenderUpdate::Whole(render::render(&inputs, fleet.known_agents()))
    } else {
        let agents = fleet
            .known_agents()
            .into_iter()
            .filter(|(a, _)| dirty.agents.contains(*a));
        RenderUpdate::Patch {
            rendered: render::render(&inputs, agents),
            agents: dirty.agents.clone(),
        }
    };
    let (RenderUpdate::Whole(fresh)
    | RenderUpdate::Patch {
        rendered: fresh, ..
    }) = &render;
    // Only the manifests that do not stand are written; the executor's
    // compare-and-swap re-checks against the store.
    let mut writes = Vec::new();
    for (agent, resources) in &fresh.manifests {
        let floor = fleet.floor(agent);
        let known = match fleet.desired.get(agent) {
            Some(Written {
                revision,
                value: Some(m),
            }) if floor.stands(m, *revision, resources, &fleet.signing) => continue,
            Some(Written {
                revision,
                value: Some(m),
            }) => Some(Known {
                revision: *revision,
                generation: m.generation,
            }),
            _ => None,
        };
        writes.push(ManifestWrite {
            agent: agent.clone(),
            resources: resources.clone(),
            floor,
            known,
        });
    }
    ManifestPlan {
        created,
        runs,
        rollouts_started,
        agents_rendered: fresh.manifests.len(),
        render,
        writes,
    }
}

impl ManifestPlan {
    /// Takes the plan's bookkeeping into `state` — the creation order, the
    /// rollouts, the render — and hands back the writes to perform.
    pub fn adopt(self, state: &mut State) -> Vec<ManifestWrite> {
        state.fleet.resolve_created_revisions(&self.created);
        state.rollouts.runs = self.runs;
        state.rollouts.due |= self.rollouts_started;
        state.memo.dirty = Default::default();
        self.render.apply_to(&mut state.memo.rendered);
        self.writes
    }
}

/// Round two of a pass.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct RecordsPlan {
    /// Deployment statuses whose content changed.
    pub statuses: Vec<DeploymentStatus>,
    pub history: HistoryPlan,
    /// `settings.heartbeat`, when the stored value is not the fleet's own.
    pub heartbeat: Option<HeartbeatSettings>,
    /// Statuses of deployments that no longer exist.
    pub orphans: Vec<DeploymentName>,
}

/// Round two, on the state after round one's writes: a deployment status
/// from the whole render and the stored generations — one whose targets
/// are not all written yet waits for the retry rather than report a partial
/// picture (a target counts only once its stored manifest carries this
/// render) — the history, the heartbeat interval sized to the registered
/// agents, and the orphaned statuses.
pub(crate) fn plan_records(state: &State, heartbeat: &HeartbeatPolicy) -> RecordsPlan {
    let fleet = &state.fleet;
    let mut plan = RecordsPlan::default();
    if let Some(rendered) = &state.memo.rendered {
        let generations: BTreeMap<&AgentId, u64> = fleet
            .desired
            .iter()
            .filter_map(|(a, w)| {
                let m = w.value.as_ref()?;
                (rendered.manifests.get(a) == Some(&m.resources)).then_some((a, m.generation))
            })
            .collect();
        for (name, r) in &rendered.deployments {
            let Some(record) = fleet.deployments.get(name) else {
                continue;
            };
            let Some(targets) = r
                .targets
                .iter()
                .map(|a| generations.get(a).map(|&g| (a.clone(), g)))
                .collect::<Option<BTreeMap<_, _>>>()
            else {
                continue;
            };
            let status = DeploymentStatus {
                api_version: ApiVersion,
                name: name.clone(),
                observed_revision: record.revision,
                created_revision: record.created_revision.unwrap_or(record.first_seen),
                targets,
                conflicts: r.conflicts.clone(),
                render_failures: r.render_failures.clone(),
                error: r.error.clone(),
                rollout: state
                    .rollouts
                    .runs
                    .get(name)
                    .filter(|run| run.status.revision == record.revision)
                    .map(|run| run.status.clone()),
                held_back: r.held_back.clone(),
            };
            let stored = fleet.statuses.get(name).and_then(|w| w.value.as_ref());
            if stored != Some(&status) {
                plan.statuses.push(status);
            }
        }
    }
    plan.history = plan_history(fleet, &state.rollouts.runs);
    let want = heartbeat.settings(fleet.registered.len());
    let stored = fleet.heartbeat.as_ref().and_then(|w| w.value.as_ref());
    if needs_write(stored, &want) {
        plan.heartbeat = Some(want);
    }
    plan.orphans = fleet
        .statuses
        .iter()
        .filter(|(name, w)| w.value.is_some() && !fleet.deployments.contains_key(*name))
        .map(|(name, _)| name.clone())
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::kv::Operation;
    use manifest_types::AgentManifest;
    use serde_json::{Value, json};

    use super::*;
    use crate::daemon::rollouts;

    fn agent(a: &str) -> AgentId {
        AgentId::new(a).unwrap()
    }

    /// A fleet in memory, fed as the watch feeds the daemon, whose writes
    /// land as the executor's would (at the planned generation, the next KV
    /// sequence).
    struct Fleet {
        state: State,
        seq: u64,
    }

    impl Fleet {
        fn new() -> Self {
            Self {
                state: State::default(),
                seq: 0,
            }
        }

        fn put(&mut self, key: &str, value: &[u8]) -> bool {
            self.seq += 1;
            self.state.apply(key, self.seq, Operation::Put, value)
        }

        fn register(&mut self, a: &str) {
            let inventory = json!({"apiVersion": "flotilla.dev/v1", "agentId": a,
                "instanceId": "i", "agentVersion": "0.1.0", "arch": "x86_64", "os": "linux",
                "reconcilers": ["File"], "labels": {}});
            assert!(self.put(
                &format!("agents.{a}"),
                &json!(inventory).to_string().into_bytes()
            ));
        }

        fn deploy(&mut self, content: &str, agents: &[&str], rollout: Option<Value>) {
            let mut d = json!({"apiVersion": "flotilla.dev/v1", "kind": "Deployment",
                "name": "web", "selector": {"agents": agents},
                "resources": [{"id": "f", "kind": "File",
                               "spec": {"path": "/etc/f", "content": content}}]});
            if let Some(r) = rollout {
                d["rollout"] = r;
            }
            assert!(self.put("deployments.web", d.to_string().as_bytes()));
        }

        /// Round one, executed in memory: (agent, generation) per write.
        fn pass(&mut self) -> (usize, Vec<(AgentId, Option<u64>)>) {
            let plan = plan_manifests(&self.state);
            let rendered = plan.agents_rendered;
            let mut written = Vec::new();
            for w in plan.adopt(&mut self.state) {
                let planned = w.generation();
                let generation = planned.unwrap_or(w.floor.next_above(0));
                let mut m = AgentManifest::empty(w.agent.clone(), generation);
                m.resources = w.resources;
                self.seq += 1;
                self.state.fleet.wrote(m, self.seq);
                written.push((w.agent, planned));
            }
            (rendered, written)
        }

        fn resources(&self, a: &str) -> usize {
            self.state.fleet.stored(&agent(a)).unwrap().resources.len()
        }
    }

    #[test]
    fn a_new_deployment_writes_each_target_once_then_its_status() {
        let mut f = Fleet::new();
        f.register("pi-1");
        f.register("pi-2");
        f.deploy("v1", &["pi-1", "pi-2"], None);
        let (rendered, written) = f.pass();
        assert_eq!(rendered, 2);
        // Nothing readable in either key: read afresh at write time.
        assert_eq!(written, [(agent("pi-1"), None), (agent("pi-2"), None)]);
        assert_eq!((f.resources("pi-1"), f.resources("pi-2")), (1, 1));

        let records = plan_records(&f.state, &HeartbeatPolicy::default());
        assert_eq!(records.statuses.len(), 1);
        let status = &records.statuses[0];
        assert_eq!(status.targets.values().collect::<Vec<_>>(), [&1, &1]);
        assert_eq!(records.history.records.len(), 1, "revision recorded");
        assert!(records.heartbeat.is_some(), "no interval published yet");
        assert!(records.orphans.is_empty());

        // Everything stands: the next pass renders and writes nothing.
        assert!(
            !f.state
                .apply("deployments.web", f.seq - 2, Operation::Put, b"{}")
        );
        assert_eq!(plan_manifests(&f.state).writes, []);
    }

    #[test]
    fn an_update_writes_above_the_stored_generation_and_a_registration_renders_one_agent() {
        let mut f = Fleet::new();
        f.register("pi-1");
        f.register("pi-2");
        f.deploy("v1", &["pi-1", "pi-2", "pi-3"], None);
        f.pass();
        f.deploy("v2", &["pi-1", "pi-2", "pi-3"], None);
        let (rendered, written) = f.pass();
        assert_eq!(rendered, 2);
        assert_eq!(
            written,
            [(agent("pi-1"), Some(2)), (agent("pi-2"), Some(2))]
        );

        // A new agent the selector names: only it is rendered and written.
        f.register("pi-3");
        let (rendered, written) = f.pass();
        assert_eq!(rendered, 1);
        assert_eq!(written, [(agent("pi-3"), None)]);
        let rendered = f.state.memo.rendered.as_ref().unwrap();
        assert_eq!(rendered.manifests.len(), 3, "patched into the whole render");
        assert_eq!(
            rendered.deployments[&DeploymentName::new("web").unwrap()]
                .targets
                .len(),
            3
        );
    }

    #[test]
    fn a_foreign_write_to_desired_state_is_replaced_above_it() {
        let mut f = Fleet::new();
        f.register("pi-1");
        f.deploy("v1", &["pi-1"], None);
        f.pass();
        // A hand edit at a higher generation, with other resources.
        let forged = AgentManifest::empty(agent("pi-1"), 7);
        assert!(f.put("desired-state.pi-1", &forged.to_json()));
        let plan = plan_manifests(&f.state);
        assert_eq!(plan.agents_rendered, 1);
        let [write] = &plan.writes[..] else {
            panic!("{:?}", plan.writes)
        };
        assert_eq!(
            write.known.map(|k| (k.revision, k.generation)),
            Some((f.seq, 7))
        );
        assert_eq!(write.generation(), Some(8), "above the hand edit");
        assert_eq!(write.resources.len(), 1, "the rendering, not the edit");
        f.pass();
        // Junk: nothing readable, so the key is read afresh, above the floor.
        assert!(f.put("desired-state.pi-1", b"junk"));
        let (_, written) = f.pass();
        assert_eq!(written, [(agent("pi-1"), None)]);
        assert_eq!(f.state.fleet.stored(&agent("pi-1")).unwrap().generation, 9);
    }

    #[test]
    fn a_deployment_with_a_policy_starts_a_rollout_at_its_canary() {
        let mut f = Fleet::new();
        for a in ["pi-1", "pi-2", "pi-3"] {
            f.register(a);
        }
        f.deploy("v1", &["pi-1", "pi-2", "pi-3"], Some(json!({"canary": 1})));
        let plan = plan_manifests(&f.state);
        assert!(plan.rollouts_started);
        let web = DeploymentName::new("web").unwrap();
        let run = plan.runs[&web].clone();
        // Wave 1 is the canary.
        assert_eq!(
            (run.status.wave, run.status.revision),
            (1, 4),
            "{:?}",
            run.status
        );
        f.pass();
        // The judgement picks the canary among agents that beat just now
        // (none has a status yet) and asks for the fleet to be rendered again.
        let now = std::time::SystemTime::now();
        let beat = |a: &str| {
            let key = format!("heartbeat.{a}");
            let value = json!({"apiVersion": "flotilla.dev/v1", "agentId": a,
                "instanceId": "i", "seq": 1, "manifestGeneration": 1, "ready": true});
            let entry = async_nats::jetstream::kv::Entry {
                bucket: "fleet-heartbeats".into(),
                key: key.clone(),
                value: value.to_string().into(),
                revision: 1,
                delta: 0,
                created: now.into(),
                operation: Operation::Put,
                seen_current: true,
            };
            (key, entry)
        };
        f.state.rollouts.tracked = Some(Default::default());
        f.state.rollouts.beats = Some((
            tokio::time::Instant::now(),
            flotilla_nats::Snapshot {
                entries: ["pi-1", "pi-2", "pi-3"].map(beat).into_iter().collect(),
                server_time: now,
            },
        ));
        let steps = rollouts::steps(&f.state, Default::default(), &Default::default());
        let run = steps[&web].clone();
        assert_eq!(run.status.targets, 3, "{:?}", run.status);
        assert_eq!(run.moving.len(), 1, "the canary is released");
        assert!(rollouts::adopt(&mut f.state, steps));
        assert!(f.state.memo.dirty.all, "released agents are rendered again");
        f.pass();
        let carrying: Vec<usize> = ["pi-1", "pi-2", "pi-3"]
            .iter()
            .map(|a| f.resources(a))
            .collect();
        assert_eq!(
            carrying.iter().sum::<usize>(),
            1,
            "only the canary: {carrying:?}"
        );
        // The deployment status carries the rollout.
        let records = plan_records(&f.state, &HeartbeatPolicy::default());
        assert_eq!(records.statuses[0].rollout.as_ref(), Some(&run.status));
        // Planned again, the rollout is not started a second time.
        assert!(!plan_manifests(&f.state).rollouts_started);
    }
}
