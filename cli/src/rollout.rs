//! `flotilla rollout status|pause|resume|history|undo <name>`: a
//! deployment's staged rollout and its history (docs/adr/0016).
//!
//! - `status` prints the rollout flotilla-control keeps in
//!   `deployment-status.<name>`: phase, wave, and per revision how many
//!   targets are desired, updated, converged, failed and offline. It exits 8
//!   when the rollout halted and 9 when it rolled back, like `apply --wait`.
//! - `pause` / `resume` write the operator's switch `rollouts.<name>`;
//!   every resume is a new write of it (a new KV sequence, not a deployment
//!   revision), which also resumes a halted rollout (judged again from
//!   scratch).
//! - `history` lists the revisions kept in `revisions.<name>.<revision>`.
//! - `default [--set FILE | --clear]` shows or changes the fleet's default
//!   policy (`settings.rollout`) for deployments that carry none.
//! - `undo` writes an earlier revision's document as a new revision
//!   (compare-and-swap against the current one): history is never rewritten.

use manifest_types::rollout::{Phase, RevisionRecord, RolloutControl, RolloutPolicy};
use manifest_types::{ApiVersion, ChangeNote, Deployment, DeploymentName, DeploymentStatus, keys};
use serde::Serialize;

use crate::args::{Format, GlobalArgs, RolloutAction};
use crate::exit::CliError;
use crate::kv::Fleet;
use crate::output;

pub async fn run(g: &GlobalArgs, action: &RolloutAction) -> Result<(), CliError> {
    match action {
        RolloutAction::Status { name } => status(g, name).await,
        RolloutAction::Pause { name } => switch(g, name, true).await,
        RolloutAction::Resume { name } => switch(g, name, false).await,
        RolloutAction::History { name } => history(g, name).await,
        RolloutAction::Default { set, clear } => default(g, set.as_deref(), *clear).await,
        RolloutAction::Undo {
            name,
            to_revision,
            cause,
        } => undo(g, name, *to_revision, cause.clone()).await,
    }
}

async fn read_status(fleet: &Fleet, name: &DeploymentName) -> Result<DeploymentStatus, CliError> {
    match fleet
        .read::<DeploymentStatus>(keys::deployment_status(name))
        .await?
    {
        Some(Ok(s)) => Ok(s.value),
        Some(Err(message)) => Err(CliError::InvalidDocument {
            origin: keys::deployment_status(name),
            message,
        }),
        None => Err(CliError::NotFound(format!(
            "deployment {name} has no status (not applied, or flotilla-control has not rendered it yet)"
        ))),
    }
}

async fn status(g: &GlobalArgs, name: &DeploymentName) -> Result<(), CliError> {
    let fleet = Fleet::open(g).await?;
    let s = read_status(&fleet, name).await?;
    let Some(r) = &s.rollout else {
        match g.output {
            Format::Table => println!(
                "{name}: no staged rollout; revision {} goes to every target at once",
                s.observed_revision
            ),
            f => print!("{}", output::document(f, &serde_json::Value::Null)?),
        }
        return Ok(());
    };
    match g.output {
        Format::Table => {
            println!("Deployment:  {name}");
            println!("Revision:    {}", r.revision);
            println!(
                "From:        {}",
                r.from
                    .map_or_else(|| "(none)".to_owned(), |f| f.to_string())
            );
            println!("Phase:       {}", r.phase);
            println!("Wave:        {}/{}", r.wave, r.waves);
            if let Some(since) = &r.healthy_since {
                println!("Healthy since: {since}");
            }
            if let Some(m) = &r.message {
                println!("Message:     {m}");
            }
            println!();
            println!(
                "{:<10} {:>8} {:>8} {:>10} {:>7} {:>8}",
                "REVISION", "DESIRED", "UPDATED", "CONVERGED", "FAILED", "OFFLINE"
            );
            for (rev, c) in &r.counts {
                println!(
                    "{:<10} {:>8} {:>8} {:>10} {:>7} {:>8}",
                    rev, c.desired, c.updated, c.converged, c.failed, c.offline
                );
            }
            if !r.failed.is_empty() {
                println!("\nFailed:  {}", join(&r.failed));
            }
            if !r.offline.is_empty() {
                println!("Offline: {}", join(&r.offline));
            }
        }
        f => print!("{}", output::document(f, r)?),
    }
    match r.phase {
        Phase::Halted => Err(CliError::Halted(format!(
            "{name}: the rollout of revision {} is halted: {}",
            r.revision,
            r.message.as_deref().unwrap_or_default()
        ))),
        Phase::RolledBack => Err(CliError::RolledBack(format!(
            "{name}: the rollout of revision {} rolled back: {}",
            r.revision,
            r.message.as_deref().unwrap_or_default()
        ))),
        _ => Ok(()),
    }
}

async fn default(
    g: &GlobalArgs,
    set: Option<&std::path::Path>,
    clear: bool,
) -> Result<(), CliError> {
    let key = keys::ROLLOUT_SETTINGS;
    if let Some(path) = set {
        let (origin, value) = crate::apply::load_value(path)?;
        let invalid = |message: String| CliError::InvalidDocument {
            origin: origin.clone(),
            message,
        };
        let policy: RolloutPolicy =
            serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        policy.validate().map_err(invalid)?;
        let fleet = Fleet::open_or_create(g).await?;
        let bytes = serde_json::to_vec(&policy).expect("serialises");
        fleet
            .store
            .put(key, bytes.into())
            .await
            .map_err(|e| CliError::nats(format!("cannot write {key}"), e))?;
        println!("fleet default rollout policy set");
        return Ok(());
    }
    let fleet = Fleet::open(g).await?;
    if clear {
        fleet
            .store
            .delete(key)
            .await
            .map_err(|e| CliError::nats(format!("cannot delete {key}"), e))?;
        println!("fleet default rollout policy cleared: revisions go to every target at once");
        return Ok(());
    }
    let policy = match fleet.entry(key).await? {
        Some(e) => Some(
            serde_json::from_slice::<RolloutPolicy>(&e.value).map_err(|e| {
                CliError::InvalidDocument {
                    origin: key.into(),
                    message: e.to_string(),
                }
            })?,
        ),
        None => None,
    };
    match (g.output, policy) {
        (Format::Table, None) => println!("no fleet default rollout policy"),
        (Format::Table, Some(p)) => print!("{}", output::document(Format::Yaml, &p)?),
        (f, p) => print!("{}", output::document(f, &p)?),
    }
    Ok(())
}

fn join(agents: &[manifest_types::AgentId]) -> String {
    agents
        .iter()
        .map(|a| a.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn switch(g: &GlobalArgs, name: &DeploymentName, paused: bool) -> Result<(), CliError> {
    let fleet = Fleet::open(g).await?;
    if fleet.entry(keys::deployment(name)).await?.is_none() {
        return Err(CliError::NotFound(format!("no deployment {name}")));
    }
    let control = RolloutControl {
        api_version: ApiVersion,
        name: name.clone(),
        paused,
    };
    let key = keys::rollout(name);
    let bytes = serde_json::to_vec(&control).expect("serialises");
    fleet
        .store
        .put(&key, bytes.into())
        .await
        .map_err(|e| CliError::nats(format!("cannot write {key}"), e))?;
    let what = if paused { "paused" } else { "resumed" };
    println!("{name}: rollout {what}");
    Ok(())
}

/// One line of `rollout history`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct HistoryLine {
    revision: u64,
    applied_at: String,
    by: Option<String>,
    summary: String,
    current: bool,
}

async fn records(fleet: &Fleet, name: &DeploymentName) -> Result<Vec<RevisionRecord>, CliError> {
    let snap = fleet.snapshot_keys(&[keys::revisions_of(name)]).await?;
    let mut out: Vec<RevisionRecord> = snap
        .entries
        .values()
        .filter_map(|e| serde_json::from_slice::<RevisionRecord>(&e.value).ok())
        .filter(|r| &r.name == name)
        .collect();
    out.sort_by_key(|r| r.revision);
    Ok(out)
}

async fn history(g: &GlobalArgs, name: &DeploymentName) -> Result<(), CliError> {
    let fleet = Fleet::open(g).await?;
    let current = fleet
        .entry(keys::deployment(name))
        .await?
        .map(|e| e.revision);
    let records = records(&fleet, name).await?;
    if records.is_empty() && current.is_none() {
        return Err(CliError::NotFound(format!("no deployment {name}")));
    }
    let lines: Vec<HistoryLine> = records
        .into_iter()
        .map(|r| HistoryLine {
            current: Some(r.revision) == current,
            by: Deployment::from_value(r.deployment)
                .ok()
                .and_then(|d| d.change)
                .and_then(|c| c.by),
            revision: r.revision,
            applied_at: r.applied_at,
            summary: r.summary,
        })
        .collect();
    match g.output {
        Format::Table => {
            println!("{:<9} {:<25} {:<20} SUMMARY", "REVISION", "APPLIED", "BY");
            for l in &lines {
                let mark = if l.current { "*" } else { " " };
                println!(
                    "{:<9} {:<25} {:<20} {}",
                    format!("{}{mark}", l.revision),
                    l.applied_at,
                    l.by.as_deref().unwrap_or("-"),
                    l.summary
                );
            }
        }
        f => print!("{}", output::document(f, &lines)?),
    }
    Ok(())
}

async fn undo(
    g: &GlobalArgs,
    name: &DeploymentName,
    to: Option<u64>,
    cause: Option<String>,
) -> Result<(), CliError> {
    let fleet = Fleet::open(g).await?;
    let current = fleet
        .read::<Deployment>(keys::deployment(name))
        .await?
        .ok_or_else(|| CliError::NotFound(format!("no deployment {name}")))?;
    let current_revision = match &current {
        Ok(v) => v.revision,
        Err(_) => fleet
            .entry(keys::deployment(name))
            .await?
            .map_or(0, |e| e.revision),
    };
    let records = records(&fleet, name).await?;
    let target = match to {
        Some(n) => records.iter().find(|r| r.revision == n).ok_or_else(|| {
            let kept: Vec<String> = records.iter().map(|r| r.revision.to_string()).collect();
            CliError::NotFound(format!(
                "revision {n} of {name} is not in its history (kept: {})",
                kept.join(", ")
            ))
        })?,
        None => records
            .iter()
            .rev()
            .find(|r| r.revision < current_revision)
            .ok_or_else(|| {
                CliError::NotFound(format!(
                    "{name} has no revision before {current_revision} in its history"
                ))
            })?,
    };
    let mut doc = Deployment::from_value(target.deployment.clone()).map_err(|e| {
        CliError::InvalidDocument {
            origin: keys::revision(name, target.revision),
            message: e.to_string(),
        }
    })?;
    doc.change = Some(ChangeNote {
        by: Some(crate::apply::who(g.nats.creds.as_deref())),
        cause: Some(cause.unwrap_or_else(|| format!("undo to revision {}", target.revision))),
    });
    match crate::apply::write(&fleet, &doc, Some(current_revision)).await? {
        (crate::apply::Outcome::Unchanged, revision) => println!(
            "{name}: revision {revision} already asks for what revision {} did; nothing written",
            target.revision
        ),
        (_, revision) => println!(
            "{name}: revision {} restored as revision {revision}",
            target.revision
        ),
    }
    Ok(())
}
