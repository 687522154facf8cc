//! `flotilla values get|set|unset <agent>` and `flotilla label agent <agent>`:
//! the operator's per-agent document `values.<id>` — values
//! (docs/adr/0014-per-device-values.md) and the labels selectors match
//! (docs/adr/0017-trust-model.md). Changes are
//! compare-and-swap against the revision just read and retried on a lost race
//! (each change is a merge of named keys, so a retry on fresh state is what
//! the operator asked for). flotilla-control renders every deployment that
//! references a changed value again for that agent.

use async_nats::jetstream::kv;
use manifest_types::{AgentId, AgentValues, keys};

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

/// The stored values (empty when there are none) and the revision to
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
    edit: impl Fn(&mut AgentValues),
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
