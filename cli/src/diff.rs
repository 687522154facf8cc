//! `flotilla diff -f FILE`: what applying the file would change, before it
//! is applied — resources added, changed (field by field) and removed, the
//! selector and the rollout policy ([`manifest_types::diff`]) — and how many
//! registered agents each change reaches (by the labels its selector sees, as the
//! control plane selects them). Writes nothing; exits 0 whether or not
//! anything differs.

use manifest_types::diff::{DeploymentDiff, diff};
use manifest_types::{Deployment, keys};
use serde::Serialize;

use crate::args::{DiffArgs, Format, GlobalArgs};
use crate::exit::CliError;
use crate::kv::Fleet;
use crate::output;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DiffDoc<'a> {
    name: &'a str,
    /// The stored revision compared against (None: a new deployment).
    revision: Option<u64>,
    #[serde(flatten)]
    diff: &'a DeploymentDiff,
    /// Registered agents the new document selects (added and changed
    /// resources reach them).
    agents_selected: usize,
    /// Registered agents the stored document selects (removed resources
    /// leave them).
    agents_selected_before: usize,
}

pub async fn run(g: &GlobalArgs, args: &DiffArgs) -> Result<(), CliError> {
    let new = crate::apply::load(&args.file)?;
    let fleet = Fleet::open(g).await?;
    let stored = match fleet
        .read::<Deployment>(keys::deployment(&new.name))
        .await?
    {
        Some(Ok(v)) => Some(v),
        Some(Err(message)) => {
            return Err(CliError::InvalidDocument {
                origin: keys::deployment(&new.name),
                message,
            });
        }
        None => None,
    };
    let old = stored.as_ref().map(|v| &v.value);
    let d = diff(old, &new);
    let snap = fleet.snapshot(&[keys::AGENTS, keys::VALUES]).await?;
    let agents = crate::fleet::agents(&snap, &g.thresholds());
    let reach = |dep: Option<&Deployment>| {
        dep.map_or(0, |dep| {
            agents
                .iter()
                .filter(|a| {
                    a.inventory.is_some()
                        && dep
                            .selector
                            .selects_agent(&a.id, a.labels(), a.reported_labels())
                })
                .count()
        })
    };
    let doc = DiffDoc {
        name: new.name.as_str(),
        revision: stored.as_ref().map(|v| v.revision),
        diff: &d,
        agents_selected: reach(Some(&new)),
        agents_selected_before: reach(old),
    };
    match g.output {
        Format::Table => print!("{}", table(&doc)),
        f => print!("{}", output::document(f, &doc)?),
    }
    Ok(())
}

fn table(doc: &DiffDoc<'_>) -> String {
    let mut out = String::new();
    let against = match doc.revision {
        Some(r) => format!("revision {r}"),
        None => "nothing (a new deployment)".into(),
    };
    out.push_str(&format!("{}: against {against}\n", doc.name));
    let d = doc.diff;
    if d.is_empty() {
        out.push_str("no changes\n");
        return out;
    }
    let now = doc.agents_selected;
    for id in &d.added {
        out.push_str(&format!("+ {id}  (added on {now} agents)\n"));
    }
    for c in &d.changed {
        out.push_str(&format!("~ {}  (changed on {now} agents)\n", c.id));
        for f in &c.fields {
            let show = |v: &Option<serde_json::Value>| {
                v.as_ref()
                    .map_or_else(|| "(none)".to_owned(), ToString::to_string)
            };
            out.push_str(&format!(
                "    {}: {} -> {}\n",
                f.path,
                show(&f.old),
                show(&f.new)
            ));
        }
    }
    for id in &d.removed {
        out.push_str(&format!(
            "- {id}  (removed from {} agents)\n",
            doc.agents_selected_before
        ));
    }
    if let Some((old, new)) = &d.selector {
        out.push_str(&format!(
            "selector: {} -> {}  ({} agents -> {now})\n",
            serde_json::to_string(old).unwrap_or_default(),
            serde_json::to_string(new).unwrap_or_default(),
            doc.agents_selected_before
        ));
    }
    if d.rollout_changed {
        out.push_str("rollout policy changed\n");
    }
    out
}
