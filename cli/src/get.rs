//! `flotilla get agents|deployments`: one row per agent or deployment;
//! `flotilla get control`: the control-plane instance that acts.

use flotilla_nats::AgentReports;
use manifest_types::convergence::Progress;

use crate::args::{Format, GetWhat, GlobalArgs};
use crate::exit::CliError;
use crate::fleet::{self, AgentView, DeploymentView};
use crate::kv::Fleet;
use crate::output::{self, Table};

pub async fn run(g: &GlobalArgs, what: &GetWhat) -> Result<(), CliError> {
    if let GetWhat::Control = what {
        let lease = crate::kv::control_lease(g).await?;
        print!("{}", render_control(g.output, lease.as_ref())?);
        return Ok(());
    }
    let fleet = Fleet::open(g).await?;
    match what {
        GetWhat::Agents => {
            let snap = fleet.snapshot(&fleet::AGENT_FAMILIES).await?;
            let agents = fleet::agents(&snap, &g.thresholds());
            print!("{}", render_agents(g.output, &agents)?);
            warn(g.output, agents.iter().flat_map(|a| &a.problems));
        }
        GetWhat::Deployments => {
            let snap = fleet.snapshot(&fleet::DEPLOYMENT_FAMILIES).await?;
            let deployments = fleet::deployments(&snap);
            let reports = AgentReports::from_snapshot(&snap);
            let thresholds = g.thresholds();
            let rows: Vec<(DeploymentView, Option<Progress>)> = deployments
                .into_iter()
                .map(|d| {
                    let p = d.progress(&reports, &thresholds);
                    (d, p)
                })
                .collect();
            print!("{}", render_deployments(g.output, &rows)?);
            warn(g.output, rows.iter().flat_map(|(d, _)| &d.problems));
        }
        GetWhat::Control => unreachable!("answered above"),
    }
    Ok(())
}

/// The acting instance (JSON/YAML: its lease record and `renewedAt`).
pub fn render_control(
    format: Format,
    lease: Option<&(manifest_types::lease::ControlLease, std::time::SystemTime)>,
) -> Result<String, CliError> {
    if format != Format::Table {
        let doc = lease.map(|(l, at)| {
            let mut doc = serde_json::to_value(l).expect("a lease serialises");
            doc["renewedAt"] = humantime::format_rfc3339_millis(*at).to_string().into();
            doc
        });
        return output::document(format, &doc);
    }
    let Some((l, at)) = lease else {
        return Ok("no flotilla-control instance holds the control lease (none runs, or the last one stopped less than its lease time ago)\n".into());
    };
    let mut t = Table::new([
        "INSTANCE", "HOST", "PID", "VERSION", "SINCE", "RENEWED", "LEASE",
    ]);
    t.row([
        l.instance.clone(),
        l.host.clone(),
        l.pid.to_string(),
        l.version.clone(),
        l.since.clone(),
        humantime::format_rfc3339_seconds(*at).to_string(),
        format!("{} ms", l.ttl_ms),
    ]);
    Ok(t.render())
}

/// Unreadable values, on stderr (machine formats carry them as `problems`).
fn warn<'a>(format: Format, problems: impl Iterator<Item = &'a String>) {
    if format == Format::Table {
        for p in problems {
            eprintln!("warning: {p}");
        }
    }
}

pub fn render_agents(format: Format, agents: &[AgentView]) -> Result<String, CliError> {
    if format != Format::Table {
        let docs: Vec<_> = agents.iter().map(|a| a.doc(false)).collect();
        return output::document(format, &docs);
    }
    if agents.is_empty() {
        return Ok("no agents\n".into());
    }
    let mut t = Table::new([
        "AGENT",
        "READY",
        "GENERATION",
        "STATUS",
        "LAST SEEN",
        "LABELS",
    ]);
    for a in agents {
        t.row([
            a.id.to_string(),
            a.ready_column(),
            a.generation_column(),
            a.verdict.state.as_str().to_owned(),
            a.last_seen_column(),
            output::labels(a.labels()),
        ]);
    }
    Ok(t.render())
}

pub fn render_deployments(
    format: Format,
    rows: &[(DeploymentView, Option<Progress>)],
) -> Result<String, CliError> {
    if format != Format::Table {
        let docs: Vec<_> = rows.iter().map(|(d, p)| d.doc(p.as_ref())).collect();
        return output::document(format, &docs);
    }
    if rows.is_empty() {
        return Ok("no deployments\n".into());
    }
    let mut t = Table::new([
        "NAME",
        "REVISION",
        "TARGETS",
        "CONVERGED",
        "CONFLICTS",
        "ROLLOUT",
    ]);
    for (d, p) in rows {
        let status = d.current_status();
        let rollout = status
            .and_then(|s| s.rollout.as_ref())
            .map_or("-".into(), |r| {
                format!("{} {}/{}", r.phase, r.wave, r.waves)
            });
        t.row([
            d.name.to_string(),
            d.revision()
                .map_or("deleted".into(), |r: u64| r.to_string()),
            status.map_or("-".into(), |s| s.targets.len().to_string()),
            d.converged_column(p.as_ref()),
            status.map_or("-".into(), |s| s.conflicts.len().to_string()),
            rollout,
        ]);
    }
    Ok(t.render())
}
