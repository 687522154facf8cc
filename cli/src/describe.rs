//! `flotilla describe agent|deployment`: everything known about one of them.

use std::fmt::Write as _;

use flotilla_nats::AgentReports;
use manifest_types::convergence::{Progress, Thresholds, rejection_line};
use manifest_types::{
    AgentId, AgentStatus, DeploymentName, DeploymentResource, ReadyDetails, ResourceSpec,
    ResourceState, keys,
};

use crate::args::{DescribeWhat, Format, GlobalArgs};
use crate::exit::CliError;
use crate::fleet::{AgentEntries, AgentView, DeploymentView};
use crate::kv::Fleet;
use crate::output::{self, Table};

pub async fn run(g: &GlobalArgs, what: &DescribeWhat) -> Result<(), CliError> {
    let fleet = Fleet::open(g).await?;
    match what {
        DescribeWhat::Agent { id } => {
            let view = read_agent(&fleet, id, &g.thresholds()).await?;
            let text = match g.output {
                Format::Table => render_agent(&view),
                f => output::document(f, &view.doc(true))?,
            };
            print!("{text}");
        }
        DescribeWhat::Deployment { name } => {
            let (view, progress) = read_deployment(&fleet, name, &g.thresholds()).await?;
            let text = match g.output {
                Format::Table => render_deployment(&view, progress.as_ref()),
                f => output::document(f, &view.doc(progress.as_ref()))?,
            };
            print!("{text}");
        }
    }
    Ok(())
}

/// One agent's four keys, in one read that also carries the server's clock.
pub async fn read_agent(
    fleet: &Fleet,
    id: &AgentId,
    thresholds: &Thresholds,
) -> Result<AgentView, CliError> {
    let snap = fleet
        .snapshot_keys(&[
            keys::inventory(id),
            keys::actual_state(id),
            keys::heartbeat(id),
            keys::desired_state(id),
            keys::values(id),
        ])
        .await?;
    let entries = AgentEntries::of(&snap, id);
    if entries.is_empty() {
        return Err(CliError::NotFound(format!(
            "no agent {id} in bucket {}: none of {}, {}, {}, {} exists",
            fleet.store.name,
            keys::inventory(id),
            keys::actual_state(id),
            keys::heartbeat(id),
            keys::desired_state(id),
        )));
    }
    Ok(AgentView::from_entries(
        id.clone(),
        entries,
        snap.server_time,
        thresholds,
    ))
}

pub async fn read_deployment(
    fleet: &Fleet,
    name: &DeploymentName,
    thresholds: &Thresholds,
) -> Result<(DeploymentView, Option<Progress>), CliError> {
    let (d, s) = futures::try_join!(
        fleet.entry(keys::deployment(name)),
        fleet.entry(keys::deployment_status(name)),
    )?;
    if d.is_none() && s.is_none() {
        return Err(CliError::NotFound(format!(
            "no deployment {name} in bucket {} ({} does not exist)",
            fleet.store.name,
            keys::deployment(name)
        )));
    }
    let view = DeploymentView::from_entries(name.clone(), d.as_ref(), s.as_ref());
    let progress = match view.current_status() {
        Some(s) => {
            let snap = crate::wait::read_targets(fleet, s.targets.keys()).await?;
            view.progress(&AgentReports::from_snapshot(&snap), thresholds)
        }
        None => None,
    };
    Ok((view, progress))
}

fn field(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{:<14}{value}", format!("{name}:"));
}

fn section(out: &mut String, title: &str, table: &Table) {
    let _ = writeln!(out, "\n{title}:");
    out.push_str(&table.render_indented("  "));
}

pub fn render_agent(a: &AgentView) -> String {
    let mut out = String::new();
    field(&mut out, "Agent", &a.id);
    let status = match a.verdict.detail() {
        d if d.is_empty() => a.verdict.state.to_string(),
        d => format!("{} ({d})", a.verdict.state),
    };
    field(&mut out, "Status", status);
    let every = a
        .heartbeat
        .as_ref()
        .and_then(|h| h.value.interval())
        .map(|i| format!(", heartbeat every {}", output::age(i)))
        .unwrap_or_default();
    field(
        &mut out,
        "Liveness",
        format!("{}{every}", a.verdict.liveness),
    );
    let hb = a
        .heartbeat
        .as_ref()
        .map(|h| format!(" (heartbeat #{})", h.value.seq))
        .unwrap_or_default();
    field(
        &mut out,
        "Last seen",
        format!("{}{hb}", a.last_seen_column()),
    );
    if let Some(h) = &a.heartbeat
        && let Some(other) = &h.value.identity_conflict
    {
        field(
            &mut out,
            "Conflict",
            format!(
                "installation {} cannot write its status: {} is written by installation {other}",
                h.value.instance_id,
                keys::actual_state(&a.id)
            ),
        );
    }
    field(&mut out, "Labels", output::labels(a.labels()));
    if let Some(inv) = &a.inventory {
        let i = &inv.value;
        field(&mut out, "Instance", &i.instance_id);
        field(
            &mut out,
            "Agent build",
            format!("{} {}/{}", i.agent_version, i.os, i.arch),
        );
        if let Some(h) = &i.hostname {
            field(&mut out, "Hostname", h);
        }
        field(&mut out, "Reconcilers", reconcilers(i));
        // What the device says about itself: hints, matched only by
        // selectors with `deviceLabels: true` (ADR 0017).
        field(
            &mut out,
            "Reported",
            format!("{} (the device's own labels)", output::labels(&i.labels)),
        );
    } else {
        field(&mut out, "Inventory", "none reported");
    }
    let desired = a
        .desired_generation()
        .map_or("none".to_owned(), |g| g.to_string());
    match a.status() {
        Some(s) => {
            field(
                &mut out,
                "Generations",
                format!(
                    "manifest {}, observed {} (KV sequence {}), desired {desired}",
                    s.manifest_generation, s.observed_generation, s.observed_revision
                ),
            );
            render_status_sections(&mut out, s);
        }
        None => {
            field(&mut out, "Generations", format!("desired {desired}"));
            let _ = writeln!(out, "\nNo status reported yet.");
        }
    }
    for p in &a.problems {
        let _ = writeln!(out, "\nWarning: {p}");
    }
    out
}

fn render_status_sections(out: &mut String, s: &AgentStatus) {
    let mut t = Table::new(["TYPE", "STATUS", "REASON", "MESSAGE"]);
    for c in &s.conditions {
        t.row([
            format!("{:?}", c.type_),
            if c.status { "True" } else { "False" }.to_owned(),
            c.reason.clone(),
            c.message.clone(),
        ]);
    }
    if !t.is_empty() {
        section(out, "Conditions", &t);
    }
    let mut t = Table::new(["RESOURCE", "KIND", "STATE", "DETAIL"]);
    for (id, r) in &s.resources {
        t.row([
            id.to_string(),
            r.kind.clone(),
            r.state.name().to_owned(),
            state_detail(&r.state),
        ]);
    }
    if t.is_empty() {
        let _ = writeln!(out, "\nResources:    none");
    } else {
        section(out, "Resources", &t);
    }
    if let Some(r) = &s.rejection {
        let _ = writeln!(out);
        field(out, "Rejection", rejection_line(r));
    }
    let mut t = Table::new(["RESOURCE", "TARGET", "REASON"]);
    for r in &s.released {
        let why = match &r.message {
            Some(m) => format!("{}: {m}", r.reason),
            None => r.reason.to_string(),
        };
        t.row([r.id.to_string(), r.target.clone(), why]);
    }
    if !t.is_empty() {
        section(out, "Released (left in place)", &t);
    }
}

/// The DETAIL column: what "Ready" means for the kind, or why not.
pub fn state_detail(state: &ResourceState) -> String {
    match state {
        ResourceState::Pending => String::new(),
        ResourceState::Reconciling { message } => message.clone(),
        ResourceState::Ready { details, .. } => match details {
            ReadyDetails::File {
                sha256,
                size,
                mode,
                uid,
                gid,
            } => format!(
                "sha256 {} mode {mode} size {size} owner {uid}:{gid}",
                output::short_hash(sha256)
            ),
            ReadyDetails::Container {
                container_id,
                image_id,
                image_digest,
                restart_count,
                repairs,
                health,
                ..
            } => {
                let image = image_digest.as_deref().unwrap_or(image_id);
                let health = health
                    .as_deref()
                    .map(|h| format!(" {h}"))
                    .unwrap_or_default();
                format!(
                    "container {} image {} restarts {restart_count} repairs {repairs}{health}",
                    output::short_hash(container_id),
                    output::short_hash(image)
                )
            }
            ReadyDetails::SystemdUnit {
                active_state,
                sub_state,
                n_restarts,
                main_pid,
                last_run,
                next_elapse,
                ..
            } => {
                let pid = main_pid.map(|p| format!(" pid {p}")).unwrap_or_default();
                let mut line = format!("{active_state}/{sub_state} restarts {n_restarts}{pid}");
                if let Some(run) = last_run {
                    let when = run.ended_at.as_deref().or(run.started_at.as_deref());
                    line.push_str(&format!(
                        "; last run {} (exit {}){}",
                        run.result,
                        run.exit_status,
                        when.map(|t| format!(" at {t}")).unwrap_or_default()
                    ));
                }
                if let Some(next) = next_elapse {
                    line.push_str(&format!("; next {next}"));
                }
                line
            }
        },
        ResourceState::Failed {
            reason,
            message,
            attempts,
            retry_after_seconds,
            ..
        } => {
            let retry = retry_after_seconds
                .map(|s| format!(", retry in {s}s"))
                .unwrap_or_default();
            format!("{reason}: {message} (attempt {attempts}{retry})")
        }
        ResourceState::Unsupported { reason } => reason.clone(),
    }
}

/// What a deployment resource manages, for the Resources table.
fn resource_target(spec: &ResourceSpec) -> String {
    match spec {
        ResourceSpec::File(f) => format!("{} ({})", f.path, f.mode),
        ResourceSpec::Container(c) => c.image.clone(),
        ResourceSpec::SystemdUnit(u) => u.unit.to_string(),
        ResourceSpec::Unsupported(u) => u.reason.clone(),
    }
}

/// A deployment resource's target as written: a templated one shows its
/// template (`/etc/${agent.id}.conf`), not the stand-in agent it was checked
/// with.
fn written_target(r: &DeploymentResource) -> String {
    let field = match &r.spec {
        ResourceSpec::File(_) => "path",
        ResourceSpec::Container(_) => "image",
        ResourceSpec::SystemdUnit(_) => "unit",
        ResourceSpec::Unsupported(_) => return resource_target(&r.spec),
    };
    let written = r.template.as_ref().and_then(|t| t.get(field)?.as_str());
    match (written, &r.spec) {
        (Some(path), ResourceSpec::File(f)) => format!("{path} ({})", f.mode),
        (Some(target), _) => target.to_owned(),
        (None, spec) => resource_target(spec),
    }
}

pub fn render_deployment(d: &DeploymentView, progress: Option<&Progress>) -> String {
    let mut out = String::new();
    field(&mut out, "Name", &d.name);
    match &d.deployment {
        Some(v) => {
            field(
                &mut out,
                "Revision",
                format!(
                    "{} (applied {} ago)",
                    v.revision,
                    output::age(output::since(v.created))
                ),
            );
            let s = &v.value.selector;
            let mut parts = Vec::new();
            if !s.match_labels.is_empty() {
                parts.push(format!("matchLabels {}", output::labels(&s.match_labels)));
            }
            if !s.agents.is_empty() {
                let ids: Vec<&str> = s.agents.iter().map(|a| a.as_str()).collect();
                parts.push(format!("agents {}", ids.join(", ")));
            }
            field(&mut out, "Selector", parts.join("; "));
        }
        None => field(&mut out, "Revision", "deleted"),
    }
    let rendered = match (&d.status, d.current_status()) {
        (_, Some(s)) => format!(
            "revision {} (first seen at revision {})",
            s.observed_revision, s.created_revision
        ),
        (Some(s), None) => format!(
            "not yet: flotilla-control last rendered revision {}",
            s.value.observed_revision
        ),
        (None, None) => "not yet: no deployment-status from flotilla-control".into(),
    };
    field(&mut out, "Rendered", rendered);
    if let Some(e) = d.current_status().and_then(|s| s.error.as_ref()) {
        field(&mut out, "Error", e);
    }
    if let Some(r) = d.current_status().and_then(|s| s.rollout.as_ref()) {
        let from = r
            .from
            .map_or_else(|| "nothing".to_owned(), |f| format!("revision {f}"));
        field(
            &mut out,
            "Rollout",
            format!("{} from {from}; {}", r.phase, r.line()),
        );
        if let Some(m) = &r.message {
            field(&mut out, "Rollout note", m);
        }
    }
    if let Some(v) = &d.deployment {
        let mut t = Table::new(["ID", "KIND", "TARGET", "RESTART ON"]);
        for r in &v.value.resources {
            let restart: Vec<&str> = r.restart_on.iter().map(|x| x.as_str()).collect();
            t.row([
                r.id.to_string(),
                r.spec.kind_str().to_owned(),
                written_target(r),
                restart.join(","),
            ]);
        }
        if t.is_empty() {
            let _ = writeln!(out, "\nResources:    none");
        } else {
            section(&mut out, "Resources", &t);
        }
    }
    if let (Some(s), Some(p)) = (d.current_status(), progress) {
        let mut t = Table::new(["AGENT", "GENERATION", "STATE", "LIVENESS", "DETAIL"]);
        for (agent, verdict) in &p.targets {
            let generation = s.targets.get(agent).copied().unwrap_or_default();
            t.row([
                agent.to_string(),
                generation.to_string(),
                verdict.state.as_str().to_owned(),
                verdict.liveness.as_str().to_owned(),
                verdict.detail(),
            ]);
        }
        if t.is_empty() {
            let _ = writeln!(out, "\nTargets:      none selected");
        } else {
            let title = format!(
                "Targets ({}/{} converged on revision {})",
                p.converged(),
                p.total(),
                s.observed_revision
            );
            section(&mut out, &title, &t);
        }
        let mut t = Table::new(["AGENT", "RESOURCE", "HELD BY", "TARGET"]);
        for c in &s.conflicts {
            t.row([
                c.agent.to_string(),
                c.resource.to_string(),
                c.held_by.to_string(),
                c.target.clone(),
            ]);
        }
        if !t.is_empty() {
            section(
                &mut out,
                "Conflicts (left out of these agents' manifests)",
                &t,
            );
        }
        let mut t = Table::new(["AGENT", "RESOURCE", "WHY"]);
        for f in &s.render_failures {
            t.row([
                f.agent.to_string(),
                f.resource.to_string(),
                f.message.clone(),
            ]);
        }
        if !t.is_empty() {
            section(
                &mut out,
                "Not rendered (these agents keep their last render of this deployment)",
                &t,
            );
        }
    }
    for p in &d.problems {
        let _ = writeln!(out, "\nWarning: {p}");
    }
    out
}

/// The kinds an agent can converge, each with whether its engine answered
/// when the agent last asked: `Container (Docker Engine not reachable)`.
fn reconcilers(i: &manifest_types::AgentInventory) -> String {
    let kinds: Vec<String> = i
        .reconcilers
        .iter()
        .map(|k| match i.engines.iter().find(|e| e.kind == *k) {
            Some(e) if !e.reachable => format!("{} ({} not reachable)", k.as_str(), e.engine),
            _ => k.as_str().to_owned(),
        })
        .collect();
    kinds.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_per_state() {
        let file = ResourceState::Ready {
            since: "t".into(),
            details: ReadyDetails::File {
                sha256: "9f86d081884c7d659a2feaa0c55ad015".into(),
                size: 4,
                mode: "0644".into(),
                uid: 0,
                gid: 0,
            },
        };
        assert_eq!(
            state_detail(&file),
            "sha256 9f86d081884c mode 0644 size 4 owner 0:0"
        );
        let failed = ResourceState::Failed {
            since: "t".into(),
            reason: "ReconcilerUnavailable".into(),
            message: "not here".into(),
            attempts: 3,
            retry_after_seconds: Some(40),
        };
        assert_eq!(
            state_detail(&failed),
            "ReconcilerUnavailable: not here (attempt 3, retry in 40s)"
        );
        let unit = ResourceState::Ready {
            since: "t".into(),
            details: ReadyDetails::SystemdUnit {
                active_state: "active".into(),
                sub_state: "running".into(),
                n_restarts: 1,
                main_pid: Some(42),
                active_since: None,
                last_run: None,
                last_trigger: None,
                next_elapse: None,
            },
        };
        assert_eq!(state_detail(&unit), "active/running restarts 1 pid 42");
        let job = ResourceState::Ready {
            since: "t".into(),
            details: ReadyDetails::SystemdUnit {
                active_state: "inactive".into(),
                sub_state: "dead".into(),
                n_restarts: 0,
                main_pid: None,
                active_since: None,
                last_run: Some(manifest_types::UnitRun {
                    result: "success".into(),
                    exit_status: 0,
                    started_at: Some("2026-12-06T10:00:00Z".into()),
                    ended_at: Some("2026-12-06T10:00:20Z".into()),
                }),
                last_trigger: None,
                next_elapse: None,
            },
        };
        assert_eq!(
            state_detail(&job),
            "inactive/dead restarts 0; last run success (exit 0) at 2026-12-06T10:00:20Z"
        );
        assert_eq!(state_detail(&ResourceState::Pending), "");
    }

    #[test]
    fn a_templated_target_is_shown_as_written() {
        let d = manifest_types::Deployment::from_json(
            br#"{"apiVersion": "flotilla.dev/v1", "kind": "Deployment", "name": "hello",
                "selector": {"matchLabels": {"role": "kiosk"}}, "resources": [
                {"id": "motd", "kind": "File", "spec": {"path": "/etc/${agent.id}.motd", "content": "hi"}},
                {"id": "plain", "kind": "File", "spec": {"path": "/etc/plain", "content": "${values.x}"}}]}"#,
        )
        .unwrap();
        let targets: Vec<String> = d.resources.iter().map(written_target).collect();
        assert_eq!(
            targets,
            ["/etc/${agent.id}.motd (0644)", "/etc/plain (0644)"]
        );
    }
}
