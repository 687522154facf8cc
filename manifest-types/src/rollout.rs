//! Staged rollouts (docs/adr/0016-revisions-and-staged-rollouts.md): the
//! policy an operator writes ([`RolloutPolicy`], in a deployment or as the
//! fleet default `settings.rollout`), the operator's switch
//! ([`RolloutControl`], `rollouts.<name>`), the state the control plane
//! keeps in `deployment-status.<name>` ([`RolloutStatus`]), and a
//! deployment's history (`revisions.<name>.<revision>`, [`RevisionRecord`]).
//!
//! Types and their wire form only; the decisions (waves, health gates,
//! halting) are pure functions in `flotilla-control`'s `rollout` module.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ApiVersion;
use crate::ids::{AgentId, DeploymentName};
use crate::selector::Selector;

/// A number of agents, or a share of a deployment's targets: `3` or `"25%"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    Count(u32),
    /// 0–100.
    Percent(u8),
}

impl Amount {
    /// How many of `total` agents this is. A share rounds up, so "10%" of
    /// 5 agents is 1, never 0 (a share of nothing is nothing).
    pub fn of(self, total: usize) -> usize {
        match self {
            Self::Count(n) => n as usize,
            Self::Percent(p) => (total * p as usize).div_ceil(100),
        }
    }

    fn is_zero(self) -> bool {
        matches!(self, Self::Count(0) | Self::Percent(0))
    }
}

impl Default for Amount {
    /// None at all.
    fn default() -> Self {
        Self::Count(0)
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for Amount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a count (3) or a percentage (\"25%\")");
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Self::Percent(p)),
                _ => Err(bad()),
            },
            None => s.trim().parse().map(Self::Count).map_err(|_| bad()),
        }
    }
}

impl Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Count(n) => s.serialize_u32(*n),
            Self::Percent(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Self::Count)
                .ok_or_else(|| serde::de::Error::custom(format!("{n} is not a count"))),
            serde_json::Value::String(s) => s.parse().map_err(serde::de::Error::custom),
            other => Err(serde::de::Error::custom(format!(
                "{other} is not a count (3) or a percentage (\"25%\")"
            ))),
        }
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for Amount {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Amount".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "oneOf": [
            { "type": "integer", "minimum": 0 },
            { "type": "string", "pattern": "^[0-9]{1,3}%$" }
        ]})
    }
}

/// How the targets after the canary are split into waves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waves {
    /// Waves of this many agents (or share of the targets) each.
    Size(Amount),
    /// One wave per selector, in order (e.g. one site first); the targets
    /// no selector picks form a last wave.
    Selectors(Vec<Selector>),
}

impl Serialize for Waves {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Size(a) => a.serialize(s),
            Self::Selectors(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Waves {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        if v.is_array() {
            serde_json::from_value(v)
                .map(Self::Selectors)
                .map_err(serde::de::Error::custom)
        } else {
            serde_json::from_value(v)
                .map(Self::Size)
                .map_err(serde::de::Error::custom)
        }
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for Waves {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Waves".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let amount = g.subschema_for::<Amount>();
        let selectors = g.subschema_for::<Vec<Selector>>();
        schemars::json_schema!({ "oneOf": [amount, selectors] })
    }
}

/// What a rollout does when its failure threshold is crossed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum OnFailure {
    /// Release no further agents; those already moved keep the new revision.
    #[default]
    Halt,
    /// Return the agents already moved to the previous revision.
    Rollback,
}

/// How a new revision of a deployment reaches its targets. Without one
/// (and without a fleet default, `settings.rollout`) every target gets a new
/// revision at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutPolicy {
    /// The first wave: this many agents (or share of the targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Amount>,
    /// The waves after the canary; default: all the rest in one wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<Waves>,
    /// At most this many agents of the released waves may be moved to the
    /// new revision and not yet converged on it at once; default: no limit
    /// (a released wave moves at once). Offline agents do not count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<Amount>,
    /// How long a wave must stay converged before the next one is released.
    #[serde(
        default,
        with = "duration_text",
        skip_serializing_if = "Duration::is_zero"
    )]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub soak: Duration,
    /// Failed agents (Degraded or Rejected on the new revision) tolerated
    /// before the rollout fails; a share counts the targets. Default 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failure_threshold: Amount,
    #[serde(default, skip_serializing_if = "is_halt")]
    pub on_failure: OnFailure,
}

fn is_zero(a: &Amount) -> bool {
    a.is_zero()
}

fn is_halt(o: &OnFailure) -> bool {
    *o == OnFailure::Halt
}

impl RolloutPolicy {
    /// Checks what serde cannot: sizes that would make a wave of nobody.
    pub fn validate(&self) -> Result<(), String> {
        if self.canary.is_some_and(Amount::is_zero) {
            return Err("rollout.canary must be at least 1 (or 1%)".into());
        }
        match &self.waves {
            Some(Waves::Size(a)) if a.is_zero() => {
                return Err("rollout.waves must be at least 1 (or 1%)".into());
            }
            Some(Waves::Selectors(s)) if s.is_empty() => {
                return Err("rollout.waves lists no selectors".into());
            }
            Some(Waves::Selectors(s))
                if s.iter()
                    .any(|s| s.agents.is_empty() && s.match_labels.is_empty()) =>
            {
                return Err("a rollout wave selector selects nothing".into());
            }
            _ => {}
        }
        if self.max_unavailable.is_some_and(Amount::is_zero) {
            return Err("rollout.maxUnavailable must be at least 1 (or 1%)".into());
        }
        Ok(())
    }
}

/// Durations as text ("30s", "2m 30s"), as operators write them.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e} (e.g. \"30s\", \"5m\")")))
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Phase {
    /// Releasing waves as each one proves healthy.
    Progressing,
    /// Stopped by the operator (`flotilla rollout pause`); nothing new is
    /// released until `resume`.
    Paused,
    /// The failure threshold was crossed (`onFailure: halt`): nothing new
    /// is released; `resume` judges the rollout again.
    Halted,
    /// The failure threshold was crossed (`onFailure: rollback`): every
    /// target is back on the previous revision.
    RolledBack,
    /// Every wave was released and proved healthy.
    Complete,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Progressing => "Progressing",
            Self::Paused => "Paused",
            Self::Halted => "Halted",
            Self::RolledBack => "RolledBack",
            Self::Complete => "Complete",
        }
    }

    /// Whether the rollout has stopped for good (until a new revision).
    pub fn is_final(self) -> bool {
        matches!(self, Self::RolledBack | Self::Complete)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Agents by where they stand on one revision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RevisionCounts {
    /// Targets the rollout puts on this revision.
    pub desired: usize,
    /// … whose stored manifest carries it.
    pub updated: usize,
    /// … converged on it (the one convergence rule).
    pub converged: usize,
    /// … Degraded or Rejected on it.
    pub failed: usize,
    /// … Offline.
    pub offline: usize,
}

/// Agents named in a rollout's status, at most this many per list.
pub const LISTED_AGENTS: usize = 20;

/// A rollout's state, kept by the control plane in
/// `deployment-status.<name>` so a restarted control plane continues where
/// the last one stopped, and the CLI and dashboards read the same truth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The revision being rolled out.
    pub revision: u64,
    /// The revision targets keep until their wave is released (and return
    /// to on rollback): the last one rolled out completely. None: none was,
    /// they keep nothing of this deployment.
    pub from: Option<u64>,
    pub phase: Phase,
    /// The policy this rollout follows, fixed when it started: changing the
    /// deployment's or the fleet's policy applies to the next revision, never
    /// halfway through this one.
    #[serde(default)]
    pub policy: RolloutPolicy,
    /// Targets of the revision.
    #[serde(default)]
    pub targets: usize,
    /// Waves released so far (1 = the first).
    pub wave: usize,
    /// Waves in all, for the targets as they are now.
    pub waves: usize,
    /// Server time (RFC 3339) since which the released waves have been
    /// healthy; the next wave is released once that is `soak` ago.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_since: Option<String>,
    /// Why the rollout halted or rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The revision of `rollouts.<name>` last acted on (a newer one with
    /// `paused: false` resumes a halted rollout).
    #[serde(default)]
    pub control_revision: u64,
    /// Counts per revision in play (the new one and `from`).
    #[serde(default)]
    pub counts: BTreeMap<u64, RevisionCounts>,
    /// Failed agents on the new revision (at most [`LISTED_AGENTS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<AgentId>,
    /// Offline targets (at most [`LISTED_AGENTS`]): counted, not waited for;
    /// they catch up when they return.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offline: Vec<AgentId>,
}

impl RolloutStatus {
    /// Counts on the revision being rolled out.
    pub fn target_counts(&self) -> RevisionCounts {
        self.counts.get(&self.revision).copied().unwrap_or_default()
    }

    /// `wave 2/5; 40 updated / 38 healthy / 1 failed / 1 offline of 100`
    pub fn line(&self) -> String {
        let c = self.target_counts();
        format!(
            "wave {}/{}; {} updated / {} healthy / {} failed / {} offline of {}",
            self.wave, self.waves, c.updated, c.converged, c.failed, c.offline, self.targets
        )
    }
}

/// The operator's switch for one deployment's rollouts (`rollouts.<name>`,
/// written by `flotilla rollout pause|resume`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutControl {
    pub api_version: ApiVersion,
    pub name: DeploymentName,
    pub paused: bool,
}

/// One revision of a deployment in its history
/// (`revisions.<name>.<revision>`, written by the control plane when it
/// first sees the revision).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionRecord {
    pub api_version: ApiVersion,
    pub name: DeploymentName,
    /// The KV revision of `deployments.<name>` that held this document.
    pub revision: u64,
    /// Server time (RFC 3339) the document was written.
    pub applied_at: String,
    /// A one-line summary of the change from the revision before.
    pub summary: String,
    /// The document exactly as stored.
    pub deployment: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn amounts_are_counts_or_shares_rounded_up() {
        let a: Amount = serde_json::from_value(json!("10%")).unwrap();
        assert_eq!(a, Amount::Percent(10));
        assert_eq!(a.of(5), 1);
        assert_eq!(a.of(0), 0);
        assert_eq!(a.of(1000), 100);
        assert_eq!(serde_json::to_value(a).unwrap(), json!("10%"));
        let c: Amount = serde_json::from_value(json!(3)).unwrap();
        assert_eq!((c, c.of(100)), (Amount::Count(3), 3));
        assert_eq!(serde_json::to_value(c).unwrap(), json!(3));
        for bad in [
            json!("101%"),
            json!("-1"),
            json!(-1),
            json!("x"),
            json!(true),
        ] {
            assert!(
                serde_json::from_value::<Amount>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn policies_parse_with_defaults_and_round_trip() {
        let p: RolloutPolicy = serde_json::from_value(json!({
            "canary": 1, "waves": "25%", "maxUnavailable": "10%", "soak": "30s",
            "failureThreshold": 2, "onFailure": "rollback"
        }))
        .unwrap();
        assert_eq!(p.soak, Duration::from_secs(30));
        assert_eq!(p.waves, Some(Waves::Size(Amount::Percent(25))));
        assert_eq!(p.on_failure, OnFailure::Rollback);
        let again: RolloutPolicy =
            serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
        assert_eq!(again, p);
        let by_site: RolloutPolicy = serde_json::from_value(
            json!({"waves": [{"matchLabels": {"site": "lab"}}, {"agents": ["pi-9"]}]}),
        )
        .unwrap();
        assert!(matches!(by_site.waves, Some(Waves::Selectors(ref s)) if s.len() == 2));
        assert_eq!(by_site.failure_threshold, Amount::Count(0));
        assert_eq!(by_site.on_failure, OnFailure::Halt);
        assert_eq!(
            serde_json::to_value(RolloutPolicy::default()).unwrap(),
            json!({})
        );
    }

    #[test]
    fn policies_that_make_empty_waves_are_refused() {
        for bad in [
            json!({"canary": 0}),
            json!({"waves": "0%"}),
            json!({"waves": []}),
            json!({"waves": [{}]}),
            json!({"maxUnavailable": 0}),
        ] {
            let p: RolloutPolicy = serde_json::from_value(bad.clone()).unwrap();
            assert!(p.validate().is_err(), "{bad}");
        }
        assert!(serde_json::from_value::<RolloutPolicy>(json!({"soak": "soon"})).is_err());
        assert!(serde_json::from_value::<RolloutPolicy>(json!({"canaries": 1})).is_err());
    }
}
