//! `apply --wait`: poll until every target agent has converged on the
//! written revision, one agent rejects it, or the time runs out.
//!
//! 1. Wait for `deployment-status.<name>` with `observedRevision >=` the
//!    written revision (flotilla-control has rendered it); its `error` ends
//!    the wait as a rejection.
//! 2. Poll each target's `actual-state.<agent>` and `heartbeat.<agent>` (one
//!    read of just those keys per poll, [`read_targets`]) and print a
//!    progress line whenever the converged count changes. The decisions are
//!    the one convergence rule's ([`manifest_types::convergence`], ADR 0010):
//!    an agent whose heartbeat is old is Stale/Offline, never converged. If
//!    the status key disappears (the deployment was deleted by someone else)
//!    the wait ends as a conflict.
//!
//! 3. Under a staged rollout (docs/adr/0016), print the rollout's line
//!    (wave k/n; updated / healthy / failed / offline) whenever it changes;
//!    targets held on another revision are not converged yet. A rollout
//!    that halts ends the wait with [`CliError::Halted`], one that rolls
//!    back with [`CliError::RolledBack`].
//!
//! Polling rather than watching: a `actual-state.>` watch would replay the
//! whole fleet's statuses to wait on a handful of agents.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use flotilla_nats::AgentReports;
use manifest_types::convergence::{self, Progress, State, Thresholds, rejection_line};
use manifest_types::rollout::Phase;
use manifest_types::{AgentId, Deployment, DeploymentName, DeploymentStatus, keys};
use tokio::time::Instant;

use crate::exit::CliError;
use crate::kv::{Fleet, Snapshot};

/// Where progress lines go: stdout for tables, stderr when stdout carries a
/// JSON/YAML document.
#[derive(Debug, Clone, Copy)]
pub struct Reporter {
    pub to_stderr: bool,
}

impl Reporter {
    pub fn line(&self, s: &str) {
        if self.to_stderr {
            eprintln!("{s}");
        } else {
            println!("{s}");
        }
    }
}

/// How often the status keys are read.
fn poll_interval(targets: usize) -> Duration {
    // 250 ms for a few agents, slower for large fleets (one get per target).
    Duration::from_millis(250 + (targets as u64).min(7_500) / 4)
}

/// Pending agents named in a timeout message.
const PENDING_SHOWN: usize = 5;

pub async fn wait(
    fleet: &Fleet,
    name: &DeploymentName,
    revision: u64,
    timeout: Duration,
    thresholds: &Thresholds,
    out: &Reporter,
) -> Result<(), CliError> {
    let deadline = Instant::now() + timeout;
    let status_key = keys::deployment_status(name);

    // 1. Rendered?
    let mut said_waiting = false;
    let mut status = loop {
        let current = read_status(fleet, &status_key).await?;
        if let Some(s) = current.as_ref().filter(|s| s.observed_revision >= revision) {
            break s.clone();
        }
        if !said_waiting {
            out.line(&format!(
                "{name}: waiting for flotilla-control to render revision {revision}"
            ));
            said_waiting = true;
        }
        if Instant::now() >= deadline {
            let seen = match current {
                Some(s) => format!("{status_key} is at revision {}", s.observed_revision),
                None => format!("there is no {status_key}"),
            };
            return Err(CliError::Timeout {
                after: timeout,
                detail: format!(
                    "flotilla-control has not rendered revision {revision} of {name} ({seen}) — is flotilla-control running?"
                ),
            });
        }
        sleep_until_next(poll_interval(0), deadline).await;
    };

    // 2. Converged?
    let mut last_line: Option<(usize, usize, u64)> = None;
    let mut last_rollout: Option<String> = None;
    let mut following = revision;
    loop {
        if let Some(error) = &status.error {
            return Err(CliError::Rejected(format!(
                "{name}: flotilla-control cannot use revision {}: {error}",
                status.observed_revision
            )));
        }
        if status.observed_revision > following {
            out.line(&format!(
                "{name}: revision {following} was superseded by revision {} (applied by someone else); following it",
                status.observed_revision
            ));
            following = status.observed_revision;
        }
        if let Some(r) = status
            .rollout
            .as_ref()
            .filter(|r| r.revision == status.observed_revision)
        {
            let line = format!(
                "{name}: rollout of revision {} {}: {}",
                r.revision,
                r.phase,
                r.line()
            );
            if last_rollout.as_deref() != Some(line.as_str()) {
                out.line(&line);
                last_rollout = Some(line);
            }
            let why = r.message.clone().unwrap_or_default();
            match r.phase {
                Phase::Halted => {
                    return Err(CliError::Halted(format!(
                        "{name}: the rollout of revision {} halted at wave {}/{}: {why}. Fix and `flotilla rollout resume {name}`, or `flotilla rollout undo {name}`.",
                        r.revision, r.wave, r.waves
                    )));
                }
                Phase::RolledBack => {
                    return Err(CliError::RolledBack(format!(
                        "{name}: the rollout of revision {} failed and rolled back: {why}",
                        r.revision
                    )));
                }
                _ => {}
            }
        }
        if status.targets.is_empty() {
            out.line(&format!(
                "{name}: revision {} selects no agents; nothing to wait for",
                status.observed_revision
            ));
            return Ok(());
        }
        let resources = match fleet.read::<Deployment>(keys::deployment(name)).await? {
            Some(Ok(d)) => convergence::deployment_resources(&d.value),
            _ => Vec::new(),
        };
        let snap = read_targets(fleet, status.targets.keys()).await?;
        let reports = AgentReports::from_snapshot(&snap);
        let progress = Progress::of(&status, &resources, |a| reports.report(a), thresholds);
        let rejected: Vec<_> = progress.rejected().collect();
        // Under a rollout, a rejection is a failure the rollout judges
        // (halt or roll back, within its threshold).
        if !rejected.is_empty() && status.rollout.is_none() {
            for (agent, r) in &rejected {
                out.line(&format!("  {agent} rejected it: {}", rejection_line(r)));
            }
            let (agent, r) = rejected[0];
            return Err(CliError::Rejected(format!(
                "{name}: {} of {} agents rejected revision {}; first: {agent}: {}: {}",
                rejected.len(),
                progress.total(),
                status.observed_revision,
                r.reason,
                r.message
            )));
        }
        if !status.render_failures.is_empty() {
            for f in &status.render_failures {
                out.line(&format!(
                    "  {}: cannot render {}: {}",
                    f.agent, f.resource, f.message
                ));
            }
            let f = &status.render_failures[0];
            return Err(CliError::Rejected(format!(
                "{name}: revision {} cannot be rendered for {} of {} agents (they keep their last render); first: {}: {}",
                status.observed_revision,
                status.render_failures.len(),
                progress.total(),
                f.agent,
                f.message
            )));
        }
        let offline: Vec<_> = progress
            .targets
            .iter()
            .filter(|(_, v)| v.state == State::Offline)
            .collect();
        let now = (
            progress.converged(),
            progress.total(),
            status.observed_revision,
        );
        if last_line != Some(now) {
            let mut line = progress.line(name, status.observed_revision);
            if !offline.is_empty() {
                line.push_str(&format!(", {} offline", offline.len()));
            }
            out.line(&line);
            last_line = Some(now);
        }
        // Under a rollout, done once it is Complete (the last wave soaked).
        let complete = status
            .rollout
            .as_ref()
            .is_none_or(|r| r.phase == Phase::Complete);
        if progress.is_done() && complete {
            return Ok(());
        }
        // Offline targets (heard of, then silent past the Offline limit) are
        // reported, not waited on: they converge on their own when they come
        // back. A target never heard of yet is Pending and waited for.
        if !offline.is_empty()
            && complete
            && progress.converged() + offline.len() == progress.total()
        {
            for (agent, v) in &offline {
                out.line(&format!(
                    "  {agent} is Offline ({}); it converges when it returns",
                    v.detail()
                ));
            }
            return Err(CliError::Offline(format!(
                "{name}: {}/{} agents converged on revision {}; {} Offline: {}",
                progress.converged(),
                progress.total(),
                status.observed_revision,
                offline.len(),
                offline
                    .iter()
                    .take(PENDING_SHOWN)
                    .map(|(a, _)| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if Instant::now() >= deadline {
            let pending: Vec<String> = progress
                .not_converged()
                .take(PENDING_SHOWN)
                .map(|(a, v)| match v.detail() {
                    d if d.is_empty() => format!("{a} ({})", v.state),
                    d => format!("{a} ({}: {d})", v.state),
                })
                .collect();
            let more = progress.total() - progress.converged() - pending.len();
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            return Err(CliError::Timeout {
                after: timeout,
                detail: format!(
                    "{}; pending: {}{more}",
                    progress.line(name, status.observed_revision),
                    pending.join(", ")
                ),
            });
        }
        sleep_until_next(poll_interval(progress.total()), deadline).await;
        // Targets change when agents join or leave, or a newer revision lands.
        match fleet.read::<DeploymentStatus>(status_key.as_str()).await? {
            Some(Ok(s)) if s.value.observed_revision >= status.observed_revision => {
                status = s.value
            }
            Some(_) => {}
            // flotilla-control removes the status when the deployment is deleted.
            None => {
                return Err(CliError::Conflict(format!(
                    "{name}: deleted by someone else while waiting ({status_key} is gone)"
                )));
            }
        }
    }
}

async fn sleep_until_next(interval: Duration, deadline: Instant) {
    tokio::time::sleep_until(deadline.min(Instant::now() + interval)).await;
}

/// `deployment-status.<name>`, if present and readable. An unreadable one
/// is treated as not yet rendered (a newer control plane may be mid-upgrade).
async fn read_status(fleet: &Fleet, key: &str) -> Result<Option<DeploymentStatus>, CliError> {
    Ok(fleet
        .read::<DeploymentStatus>(key)
        .await?
        .and_then(Result::ok)
        .map(|v| v.value))
}

/// Above this many targets a poll reads the whole `actual-state` and
/// `heartbeat` families instead of naming every key in the consumer filter.
const NAMED_TARGETS_MAX: usize = 500;

/// The `actual-state` and `heartbeat` keys of `agents`, in one read with the
/// server's clock.
pub async fn read_targets<'a>(
    fleet: &Fleet,
    agents: impl Iterator<Item = &'a AgentId>,
) -> Result<Snapshot, CliError> {
    let agents: Vec<&AgentId> = agents.collect();
    if agents.is_empty() {
        return Ok(Snapshot {
            entries: BTreeMap::new(),
            server_time: SystemTime::UNIX_EPOCH,
        });
    }
    if agents.len() > NAMED_TARGETS_MAX {
        return fleet.snapshot(&[keys::ACTUAL_STATE, keys::HEARTBEAT]).await;
    }
    let names: Vec<String> = agents
        .iter()
        .flat_map(|a| [keys::actual_state(a), keys::heartbeat(a)])
        .collect();
    fleet.snapshot_keys(&names).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_interval_grows_with_the_fleet_and_is_capped() {
        assert_eq!(poll_interval(0), Duration::from_millis(250));
        assert_eq!(poll_interval(400), Duration::from_millis(350));
        assert_eq!(poll_interval(1_000_000), Duration::from_millis(2_125));
    }
}
