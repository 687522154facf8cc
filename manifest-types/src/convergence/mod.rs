//! The one convergence rule (docs/adr/0010-one-convergence-rule.md): what an
//! operator sees for one agent, as a pure function of what was read.
//!
//! [`assess`] takes an [`AgentReport`] — the agent's status (if any) and the
//! age of its last heartbeat measured from server time — a [`Target`] (the
//! agent's whole desired generation, or one deployment's change) and
//! [`Thresholds`], and returns a [`Verdict`]: one [`State`] and, where useful,
//! a typed [`Reason`] whose `Display` is a one-line explanation.
//! [`Progress`] applies it to every target of a deployment.
//!
//! Decided in this order, most urgent first; the first that applies wins:
//! 1. **Offline / Stale**: the agent's [`Liveness`] — the last heartbeat is
//!    older than the limits of [`Thresholds::limits`] (which follow the
//!    interval the agent declares), or there is none while a status exists.
//!    A status that old says nothing about now, whatever it claims. Every
//!    verdict also carries the liveness on its own ([`Verdict::liveness`]).
//! 2. **Pending**: no status has been reported yet.
//! 3. **IdentityConflict**: another installation writes this agent's keys.
//! 4. **Rejected**: the manifest carrying the target (or a newer one) was
//!    not accepted ([`AgentStatus::rejected_at_or_after`]).
//! 5. **Converged**: see [`Target`] for what must hold.
//! 6. **Progressing**: the agent is behind the target generation, or a
//!    resource is missing, at an older revision, Pending or Reconciling.
//! 7. **Degraded**: a resource is Failed or Unsupported (or, for the whole
//!    agent, the Degraded condition is true) on the target generation.
//!
//! For a deployment's targets, [`Progress::of`] adds two rules after
//! liveness and identity conflicts: a target a staged rollout keeps on
//! another revision (`DeploymentStatus.heldBack`, ADR 0016) is Progressing
//! with [`Reason::HeldBack`]; a target the control plane could not render
//! the revision for (`DeploymentStatus.renderFailures`, ADR 0014) is
//! Degraded with [`Reason::RenderFailed`], whatever else it reports.
//!
//! No I/O and no clock: ages are inputs, measured by the caller from KV
//! server timestamps.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::ids::{DeploymentName, ResourceId};
use crate::status::{AgentStatus, ConditionType, Rejection, ResourceState};

mod liveness;
mod progress;

pub use liveness::*;
pub use progress::*;

/// What the reader asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// The agent as a whole, on the generation of its `desired-state` key
    /// (0 when it has none: nothing is desired). Converged when
    /// `manifestGeneration == generation`, the Ready condition is true and
    /// every reported resource is Ready.
    Agent { generation: u64 },
    /// One deployment's change: revision `revision` of deployment `name`,
    /// carried to this agent by manifest generation `generation`
    /// (`DeploymentStatus.targets`). `resources` are the ids the deployment
    /// renders ([`ResourceId::rendered`]); an empty list is a deployment
    /// that truly has no resources. Converged when the agent has accepted
    /// `generation` or a later one, and the resources it reports for `name`
    /// are exactly `resources`, all at `revision` and Ready. Other
    /// deployments' resources do not hold this one back; a leftover of this
    /// deployment still being removed does.
    Deployment {
        name: &'a DeploymentName,
        revision: u64,
        generation: u64,
        resources: &'a [ResourceId],
    },
}

impl Target<'_> {
    /// The manifest generation that carries the target.
    pub fn generation(&self) -> u64 {
        match *self {
            Self::Agent { generation } | Self::Deployment { generation, .. } => generation,
        }
    }
}

/// What was read about one agent.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AgentReport<'a> {
    /// `actual-state.<id>`, decoded; None: absent or unreadable.
    pub status: Option<&'a AgentStatus>,
    /// Age of `heartbeat.<id>` by server time (KV timestamp); None: no
    /// heartbeat has been read.
    pub heartbeat_age: Option<Duration>,
    /// The heartbeat's `identityConflict`, when it carries one.
    pub heartbeat_conflict: Option<&'a str>,
    /// The interval the heartbeat declares (`intervalMs`); None: older
    /// agents, [`Thresholds::assumed_interval`].
    pub heartbeat_interval: Option<Duration>,
    /// Age of the status by server time; bounds liveness when there is no
    /// heartbeat to read.
    pub status_age: Option<Duration>,
}

/// The states an operator sees, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum State {
    Offline,
    Stale,
    IdentityConflict,
    Rejected,
    Degraded,
    Progressing,
    Pending,
    Converged,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Offline => "Offline",
            Self::Stale => "Stale",
            Self::IdentityConflict => "IdentityConflict",
            Self::Rejected => "Rejected",
            Self::Degraded => "Degraded",
            Self::Progressing => "Progressing",
            Self::Pending => "Pending",
            Self::Converged => "Converged",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an agent is in its [`State`] (readers branch on these, never on text).
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// The last heartbeat is this old (server time).
    HeartbeatAge(Duration),
    /// A status exists but no heartbeat was read.
    NoHeartbeat,
    /// `actual-state.<id>` has not been written (or is unreadable).
    NoStatus,
    /// Another installation writes this agent's keys.
    OtherInstance(String),
    /// The manifest carrying the target was not accepted.
    Rejected(Rejection),
    /// The accepted manifest is older than the target generation.
    BehindGeneration { manifest: u64, target: u64 },
    /// The accepted manifest is newer than the agent's desired-state key
    /// (the key was put back or recreated below it).
    AheadOfDesired { manifest: u64, desired: u64 },
    /// A resource of the target is not reported at all.
    ResourceMissing(ResourceId),
    /// A resource is reported for an older (or other) revision.
    ResourceAtRevision {
        id: ResourceId,
        revision: Option<u64>,
        want: u64,
    },
    /// A resource of this deployment that is no longer desired is still
    /// reported (its removal has not finished).
    ResourceLeftOver(ResourceId),
    /// A resource is not Ready: Pending, Reconciling, Failed or Unsupported.
    ResourceNotReady {
        id: ResourceId,
        state: ResourceState,
    },
    /// The agent's Ready condition is false with this reason and message.
    NotReady { reason: String, message: String },
    /// The control plane could not render the deployment's revision for
    /// this agent (a reference without a value); it keeps its last render.
    RenderFailed {
        resource: ResourceId,
        message: String,
    },
    /// A staged rollout keeps this agent on another revision (its wave is
    /// not released yet, or the rollout rolled back; docs/adr/0016).
    HeldBack { revision: Option<u64> },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HeartbeatAge(age) => write!(f, "last heartbeat {}s ago", age.as_secs()),
            Self::NoHeartbeat => f.write_str("no heartbeat read"),
            Self::NoStatus => f.write_str("no status reported yet"),
            Self::OtherInstance(m) => write!(f, "identity conflict: {m}"),
            Self::Rejected(r) => f.write_str(&rejection_line(r)),
            Self::BehindGeneration { manifest, target } => {
                write!(f, "on manifest generation {manifest}, waiting for {target}")
            }
            Self::AheadOfDesired { manifest, desired } => write!(
                f,
                "on manifest generation {manifest}, above the desired generation {desired}"
            ),
            Self::ResourceMissing(id) => write!(f, "{id} not reported yet"),
            Self::ResourceAtRevision { id, revision, want } => match revision {
                Some(r) => write!(f, "{id} at revision {r}, waiting for {want}"),
                None => write!(f, "{id} has no source revision, waiting for {want}"),
            },
            Self::ResourceLeftOver(id) => write!(f, "{id} is still being removed"),
            Self::ResourceNotReady { id, state } => {
                write!(f, "{id} {}", resource_detail(state))
            }
            Self::NotReady { reason, message } if reason.is_empty() => {
                write!(f, "not Ready yet{}", prefixed(message))
            }
            Self::NotReady { reason, message } => {
                write!(f, "not Ready: {reason}{}", prefixed(message))
            }
            Self::RenderFailed { resource, message } => {
                write!(f, "cannot render {resource} for this agent: {message}")
            }
            Self::HeldBack { revision: Some(r) } => {
                write!(f, "held at revision {r} by the rollout")
            }
            Self::HeldBack { revision: None } => f.write_str("not reached by the rollout yet"),
        }
    }
}

fn prefixed(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// A [`State`] and, where useful, why; and the agent's [`Liveness`].
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub state: State,
    pub reason: Option<Reason>,
    pub liveness: Liveness,
}

impl Verdict {
    /// For a target that cannot converge whatever it reports (not rendered
    /// for it, held back by a rollout): `state` for `reason` — unless it is
    /// Offline, Stale or in an identity conflict, which come first.
    pub fn overridden(self, state: State, reason: Reason) -> Self {
        if matches!(
            self.state,
            State::Offline | State::Stale | State::IdentityConflict
        ) {
            return self;
        }
        Self {
            liveness: self.liveness,
            ..Self::new(state, reason)
        }
    }

    fn new(state: State, reason: Reason) -> Self {
        Self {
            state,
            reason: Some(reason),
            liveness: Liveness::Online,
        }
    }

    fn converged() -> Self {
        Self {
            state: State::Converged,
            reason: None,
            liveness: Liveness::Online,
        }
    }

    pub fn is_converged(&self) -> bool {
        self.state == State::Converged
    }

    /// The reason as one line, empty without one.
    pub fn detail(&self) -> String {
        self.reason
            .as_ref()
            .map(Reason::to_string)
            .unwrap_or_default()
    }

    /// The rejection, when the state is Rejected.
    pub fn rejection(&self) -> Option<&Rejection> {
        match &self.reason {
            Some(Reason::Rejected(r)) => Some(r),
            _ => None,
        }
    }
}

/// `reason: message (KV sequence S, generation G)`: S is the rejected
/// desired-state value's KV sequence (`Rejection.revision`), not a
/// deployment's revision.
pub fn rejection_line(r: &Rejection) -> String {
    let generation = r
        .generation
        .map(|g| format!(", generation {g}"))
        .unwrap_or_default();
    format!(
        "{}: {} (KV sequence {}{generation})",
        r.reason, r.message, r.revision
    )
}

/// A resource's state with its reason, for one-line summaries.
pub fn resource_detail(state: &ResourceState) -> String {
    match state {
        ResourceState::Failed {
            reason, message, ..
        } => format!("Failed: {reason}: {message}"),
        ResourceState::Unsupported { reason } => format!("Unsupported: {reason}"),
        ResourceState::Reconciling { message } if !message.is_empty() => {
            format!("Reconciling: {message}")
        }
        other => other.name().to_owned(),
    }
}

/// Where one agent stands (see the module docs for the order of the rules).
pub fn assess(o: &AgentReport<'_>, target: Target<'_>, thresholds: &Thresholds) -> Verdict {
    let (alive, why) = liveness(o, thresholds);
    let mut verdict = match (alive, why) {
        (Liveness::Offline, Some(reason)) if o.status.is_some() || o.heartbeat_age.is_some() => {
            Verdict::new(State::Offline, reason)
        }
        (Liveness::Stale, Some(reason)) => Verdict::new(State::Stale, reason),
        _ => assess_report(o, target),
    };
    verdict.liveness = alive;
    verdict
}

/// [`assess`] past liveness.
fn assess_report(o: &AgentReport<'_>, target: Target<'_>) -> Verdict {
    let Some(s) = o.status else {
        return match o.heartbeat_conflict {
            Some(m) => Verdict::new(State::IdentityConflict, Reason::OtherInstance(m.into())),
            None => Verdict::new(State::Pending, Reason::NoStatus),
        };
    };
    if let Some(m) = identity_conflict(s, o.heartbeat_conflict) {
        return Verdict::new(State::IdentityConflict, Reason::OtherInstance(m));
    }
    let generation = target.generation();
    if let Some(r) = s.rejected_at_or_after(generation) {
        return Verdict::new(State::Rejected, Reason::Rejected(r.clone()));
    }
    if s.manifest_generation < generation {
        return Verdict::new(
            State::Progressing,
            Reason::BehindGeneration {
                manifest: s.manifest_generation,
                target: generation,
            },
        );
    }
    match target {
        Target::Agent { generation } => agent_verdict(s, generation),
        Target::Deployment {
            name,
            revision,
            resources,
            ..
        } => deployment_verdict(s, name, revision, resources),
    }
}

fn identity_conflict(s: &AgentStatus, heartbeat: Option<&str>) -> Option<String> {
    if let Some(m) = heartbeat {
        return Some(m.to_owned());
    }
    s.condition(ConditionType::IdentityConflict)
        .filter(|c| c.status)
        .map(|c| {
            if c.message.is_empty() {
                c.reason.clone()
            } else {
                c.message.clone()
            }
        })
}

fn agent_verdict(s: &AgentStatus, desired: u64) -> Verdict {
    if s.manifest_generation > desired {
        return Verdict::new(
            State::Progressing,
            Reason::AheadOfDesired {
                manifest: s.manifest_generation,
                desired,
            },
        );
    }
    if let Some(v) = not_ready(s.resources.iter()) {
        return v;
    }
    if s.condition_true(ConditionType::Ready) {
        return Verdict::converged();
    }
    let (reason, message) = s
        .condition(ConditionType::Ready)
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default();
    let state = if s.condition_true(ConditionType::Degraded) {
        State::Degraded
    } else {
        State::Progressing
    };
    Verdict::new(state, Reason::NotReady { reason, message })
}

fn deployment_verdict(
    s: &AgentStatus,
    name: &DeploymentName,
    revision: u64,
    expected: &[ResourceId],
) -> Verdict {
    let mut failing = None;
    let mut progressing = None;
    for id in expected {
        let Some(r) = s.resources.get(id) else {
            progressing.get_or_insert(Reason::ResourceMissing(id.clone()));
            continue;
        };
        if let ResourceState::Failed { .. } | ResourceState::Unsupported { .. } = r.state {
            failing.get_or_insert(Reason::ResourceNotReady {
                id: id.clone(),
                state: r.state.clone(),
            });
            continue;
        }
        let at = r.source.as_ref().map(|src| src.revision);
        if at != Some(revision) {
            progressing.get_or_insert(Reason::ResourceAtRevision {
                id: id.clone(),
                revision: at,
                want: revision,
            });
        } else if !r.state.is_ready() {
            progressing.get_or_insert(Reason::ResourceNotReady {
                id: id.clone(),
                state: r.state.clone(),
            });
        }
    }
    if let Some(reason) = failing {
        return Verdict::new(State::Degraded, reason);
    }
    if let Some(reason) = progressing {
        return Verdict::new(State::Progressing, reason);
    }
    // A resource this deployment dropped whose removal failed: not done.
    if let Some(r) = s
        .removing
        .iter()
        .find(|r| !expected.contains(&r.id) && r.id.deployment() == Some(name.as_str()))
    {
        return Verdict::new(State::Degraded, Reason::ResourceLeftOver(r.id.clone()));
    }
    let left_over = s.resources.iter().find(|(id, r)| {
        !expected.contains(id)
            && (r.source.as_ref().is_some_and(|src| &src.deployment == name)
                || id.deployment() == Some(name.as_str()))
    });
    if let Some((id, _)) = left_over {
        return Verdict::new(State::Progressing, Reason::ResourceLeftOver(id.clone()));
    }
    Verdict::converged()
}

/// The first not-Ready resource: Failed/Unsupported ones (Degraded) before
/// Pending/Reconciling ones (Progressing).
fn not_ready<'a>(
    resources: impl Iterator<Item = (&'a ResourceId, &'a crate::status::ResourceStatus)>,
) -> Option<Verdict> {
    let mut progressing = None;
    for (id, r) in resources {
        let reason = || Reason::ResourceNotReady {
            id: id.clone(),
            state: r.state.clone(),
        };
        match r.state {
            ResourceState::Ready { .. } => {}
            ResourceState::Failed { .. } | ResourceState::Unsupported { .. } => {
                return Some(Verdict::new(State::Degraded, reason()));
            }
            ResourceState::Pending | ResourceState::Reconciling { .. } => {
                progressing.get_or_insert_with(reason);
            }
        }
    }
    progressing.map(|r| Verdict::new(State::Progressing, r))
}

/// The rule for a status the caller has just received, as a method of the
/// status (defined here, beside the rule, so the status type does not
/// depend on it).
impl AgentStatus {
    /// The convergence rule ([`crate::convergence::assess`]) for the whole
    /// agent on `generation`, for a status the caller has just received (its
    /// arrival is the liveness proof, so no heartbeat age is consulted): the
    /// accepted manifest is `generation`, Ready is true, every resource is
    /// Ready, and no identity conflict is reported. Readers of stored
    /// statuses call `assess` with the heartbeat's server-time age instead.
    pub fn converged_on(&self, generation: u64) -> bool {
        let report = AgentReport {
            status: Some(self),
            heartbeat_age: Some(std::time::Duration::ZERO),
            heartbeat_conflict: None,
            ..Default::default()
        };
        assess(
            &report,
            Target::Agent { generation },
            &Thresholds::default(),
        )
        .is_converged()
    }
}

#[cfg(test)]
mod tests;
