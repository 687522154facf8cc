//! `flotilla values get|set|unset <agent>`, `flotilla label agent <agent>` and
//! `flotilla label adopt-reported`:
//! the operator's per-agent document `values.<id>` — values
//! (docs/adr/0014-per-device-values.md) and the labels selectors match
//! (docs/adr/0017-trust-model.md). Changes are
//! compare-and-swap against the KV sequence just read and retried on a lost race
//! (each change is a merge of named keys, so a retry on fresh state is what
//! the operator asked for). flotilla-control renders every deployment that
//! references a changed value again for that agent.

use std::collections::BTreeMap;

use async_nats::jetstream::kv;
use manifest_types::{AgentId, AgentInventory, AgentValues, keys};

use crate::args::{Format, GlobalArgs, LabelChange, ValuesAction};
use crate::exit::CliError;
use crate::kv::{Fleet, Versioned};
use crate::output;

/// How many times a change is tried against a moving key.
const ATTEMPTS: usize = 5;

pub async fn run(g: &GlobalArgs, action: &ValuesAction) -> Result<(), CliError> {
    match action {
        ValuesAction::Get { agent } => {
            let fleet = Fleet::open(g).await?;
            let (values, _) = read(&fleet, agent).await?;
            print!("{}", render(g.output, &values)?);
            Ok(())
        }
        ValuesAction::Set { agent, pairs } => {
            let fleet = Fleet::open_or_create(g).await?;
            let values = change(&fleet, agent, |v| {
                v.values.extend(pairs.iter().cloned());
            })
            .await?;
            print!("{}", render(g.output, &values)?);
            Ok(())
        }
        ValuesAction::Unset { agent, keys } => {
            let fleet = Fleet::open(g).await?;
            let values = change(&fleet, agent, |v| {
                for k in keys {
                    v.values.remove(k);
                }
            })
            .await?;
            print!("{}", render(g.output, &values)?);
            Ok(())
        }
    }
}

/// `flotilla label agent <id> [k=v|k-]...`: changes the operator's labels
/// in the same document and with the same compare-and-swap as values.
pub async fn label(
    g: &GlobalArgs,
    agent: &AgentId,
    changes: &[LabelChange],
) -> Result<(), CliError> {
    let values = if changes.is_empty() {
        read(&Fleet::open(g).await?, agent).await?.0
    } else {
        set_labels(g, agent, changes).await?
    };
    if g.output != Format::Table {
        print!("{}", output::document(g.output, &values)?);
    } else if values.labels.is_empty() {
        println!("{agent}: no labels");
    } else {
        println!("{agent}: {}", output::labels(&values.labels));
    }
    Ok(())
}

/// `flotilla label adopt-reported <id>...|--all`: copies each device's
/// reported labels into its operator labels where the operator has no label
/// of that key (the operator's own labels always win). A reported label that
/// is not a valid label is left out and named.
pub async fn adopt_reported(g: &GlobalArgs, agents: &[AgentId], all: bool) -> Result<(), CliError> {
    let fleet = Fleet::open(g).await?;
    let mut named = agents.to_vec();
    named.sort();
    named.dedup();
    let filters: Vec<String> = match all {
        true => vec![keys::all(keys::AGENTS)],
        false => named.iter().map(keys::inventory).collect(),
    };
    let snap = fleet.snapshot_keys(&filters).await?;
    let mut reported = Vec::new();
    for (key, entry) in &snap.entries {
        let Some(keys::Key::Inventory(id)) = keys::Key::parse(key) else {
            continue;
        };
        match Versioned::<AgentInventory>::decode(entry) {
            Ok(inv) if inv.value.agent_id == id => reported.push((id, inv.value.labels)),
            Ok(inv) => eprintln!("{id}: skipped: {key} names agent {}", inv.value.agent_id),
            Err(message) => eprintln!("{id}: skipped: {message}"),
        }
    }
    if let Some(missing) = named
        .iter()
        .find(|a| !reported.iter().any(|(id, _)| id == *a))
    {
        return Err(CliError::NotFound(format!(
            "no readable {} for agent {missing}; nothing was written",
            keys::inventory(missing)
        )));
    }
    // Each agent is its own change: one that fails is reported and the
    // others still go ahead; the command then fails with the first error.
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for (id, labels) in reported {
        match adopt_one(&fleet, id.clone(), labels).await {
            Ok(a) => {
                if g.output == Format::Table {
                    println!("{}", a.line());
                }
                done.push(a);
            }
            Err(e) => failed.push((id, e)),
        }
    }
    if g.output != Format::Table {
        print!("{}", output::document(g.output, &done)?);
    }
    let mut failed = failed.into_iter();
    let Some((first_id, first)) = failed.next() else {
        return Ok(());
    };
    for (id, e) in failed {
        eprintln!("{id}: nothing adopted: {}", e.report());
    }
    eprintln!("{first_id}: nothing adopted:");
    Err(first)
}

/// What `adopt-reported` did for one agent.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Adoption {
    agent_id: AgentId,
    /// Reported labels now the operator's.
    adopted: BTreeMap<String, String>,
    /// The operator's own value, where the device reports another.
    kept: BTreeMap<String, String>,
    /// Reported labels that are not valid labels.
    left_out: BTreeMap<String, String>,
    /// The operator's labels after the change.
    labels: BTreeMap<String, String>,
}

impl Adoption {
    fn line(&self) -> String {
        let mut line = format!(
            "{}: adopted {}",
            self.agent_id,
            output::labels(&self.adopted)
        );
        if !self.kept.is_empty() {
            line += &format!("; operator's kept: {}", output::labels(&self.kept));
        }
        if !self.left_out.is_empty() {
            line += &format!(
                "; not valid labels, left out: {}",
                output::labels(&self.left_out)
            );
        }
        line
    }
}

async fn adopt_one(
    fleet: &Fleet,
    id: AgentId,
    reported: BTreeMap<String, String>,
) -> Result<Adoption, CliError> {
    let (valid, left_out): (Labels, Labels) = reported
        .into_iter()
        .partition(|(k, v)| manifest_types::inventory::validate_label(k, v).is_ok());
    let (current, _) = read(fleet, &id).await?;
    let (mut adopted, mut kept) = adoptable(&current.labels, &valid);
    let values = match adopted.is_empty() {
        true => current,
        false => {
            change(fleet, &id, |v| {
                (adopted, kept) = adoptable(&v.labels, &valid);
                v.labels.extend(adopted.iter().cloned());
            })
            .await?
        }
    };
    Ok(Adoption {
        agent_id: id,
        adopted: adopted.into_iter().collect(),
        kept: kept.into_iter().collect(),
        left_out: left_out.into_iter().collect(),
        labels: values.labels,
    })
}

/// Which reported labels the operator has no label of that key for
/// (adopted), and which the operator labelled differently (kept).
type Labels = Vec<(String, String)>;
fn adoptable(operator: &BTreeMap<String, String>, reported: &Labels) -> (Labels, Labels) {
    let mut adopted = Vec::new();
    let mut kept = Vec::new();
    for (k, v) in reported {
        match operator.get(k) {
            None => adopted.push((k.clone(), v.clone())),
            Some(own) if own != v => kept.push((k.clone(), own.clone())),
            Some(_) => {}
        }
    }
    (adopted, kept)
}

/// Applies `changes` to the operator's labels of `agent`.
pub async fn set_labels(
    g: &GlobalArgs,
    agent: &AgentId,
    changes: &[LabelChange],
) -> Result<AgentValues, CliError> {
    let fleet = Fleet::open_or_create(g).await?;
    change(&fleet, agent, |v| {
        for c in changes {
            match c {
                LabelChange::Set(k, val) => {
                    v.labels.insert(k.clone(), val.clone());
                }
                LabelChange::Remove(k) => {
                    v.labels.remove(k);
                }
            }
        }
    })
    .await
}

/// The stored values (empty when there are none) and the KV sequence to
/// compare against (0: the key does not exist).
async fn read(fleet: &Fleet, agent: &AgentId) -> Result<(AgentValues, u64), CliError> {
    let key = keys::values(agent);
    match fleet.raw_entry(&key).await? {
        Some(e) if e.operation == kv::Operation::Put => {
            let mut v = Versioned::<AgentValues>::decode(&e).map_err(|message| {
                CliError::InvalidDocument {
                    origin: key.clone(),
                    message,
                }
            })?;
            // A document naming another agent is ignored by the control
            // plane; a change writes it back under the right name.
            v.value.agent_id = agent.clone();
            Ok((v.value, e.revision))
        }
        Some(marker) => Ok((AgentValues::new(agent.clone()), marker.revision)),
        None => Ok((AgentValues::new(agent.clone()), 0)),
    }
}

async fn change(
    fleet: &Fleet,
    agent: &AgentId,
    mut edit: impl FnMut(&mut AgentValues),
) -> Result<AgentValues, CliError> {
    let key = keys::values(agent);
    for _ in 0..ATTEMPTS {
        let (mut values, revision) = read(fleet, agent).await?;
        edit(&mut values);
        values.validate().map_err(CliError::Usage)?;
        let bytes = serde_json::to_vec(&values)
            .expect("values serialise")
            .into();
        match fleet.store.update(&key, bytes, revision).await {
            Ok(_) => return Ok(values),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => return Err(CliError::nats(format!("cannot write {key}"), e)),
        }
    }
    Err(CliError::Conflict(format!(
        "conflict: {key} changed on each of {ATTEMPTS} attempts; nothing was written"
    )))
}

fn render(format: Format, values: &AgentValues) -> Result<String, CliError> {
    if format != Format::Table {
        return output::document(format, values);
    }
    if values.values.is_empty() {
        return Ok(format!("{}: no values\n", values.agent_id));
    }
    let mut t = output::Table::new(["KEY", "VALUE"]);
    for (k, v) in &values.values {
        t.row([k.clone(), v.clone()]);
    }
    Ok(t.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Labels {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn adopting_never_overrides_the_operator() {
        let operator: BTreeMap<String, String> = pairs(&[("role", "kiosk"), ("site", "berlin")])
            .into_iter()
            .collect();
        let reported = pairs(&[("role", "gateway"), ("site", "berlin"), ("rack", "r7")]);
        let (adopted, kept) = adoptable(&operator, &reported);
        assert_eq!(adopted, pairs(&[("rack", "r7")]));
        assert_eq!(kept, pairs(&[("role", "kiosk")]));
        let (adopted, kept) = adoptable(&BTreeMap::new(), &reported);
        assert_eq!(adopted, reported);
        assert!(kept.is_empty());
    }
}
