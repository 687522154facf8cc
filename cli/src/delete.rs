//! `flotilla delete deployment <name>`: a KV delete of `deployments.<name>`
//! at the revision just read, so a concurrent change is reported rather than
//! deleted unseen. flotilla-control then removes its resources from the agents.

use async_nats::jetstream::kv;
use manifest_types::{DeploymentName, keys};

use crate::args::{DeleteWhat, Format, GlobalArgs};
use crate::exit::CliError;
use crate::kv::Fleet;
use crate::output;

pub async fn run(g: &GlobalArgs, what: &DeleteWhat) -> Result<(), CliError> {
    let DeleteWhat::Deployment { name } = what;
    let fleet = Fleet::open(g).await?;
    let revision = delete_deployment(&fleet, name).await?;
    match g.output {
        Format::Table => println!("{name}: deleted (was revision {revision})"),
        f => print!(
            "{}",
            output::document(
                f,
                &serde_json::json!({"name": name, "revision": revision, "result": "deleted"})
            )?
        ),
    }
    Ok(())
}

/// Deletes `deployments.<name>`; returns the revision it had.
pub async fn delete_deployment(fleet: &Fleet, name: &DeploymentName) -> Result<u64, CliError> {
    let key = keys::deployment(name);
    let not_found = || {
        CliError::NotFound(format!(
            "no deployment {name} in bucket {} ({key} does not exist)",
            fleet.store.name
        ))
    };
    let Some(entry) = fleet.entry(&key).await? else {
        return Err(not_found());
    };
    match fleet
        .store
        .delete_expect_revision(&key, Some(entry.revision))
        .await
    {
        Ok(()) => Ok(entry.revision),
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
            match fleet.entry(&key).await? {
                None => Err(not_found()),
                Some(now) => Err(CliError::Conflict(format!(
                    "conflict: {key} changed while it was being deleted (read revision {}, now {}); nothing was deleted",
                    entry.revision, now.revision
                ))),
            }
        }
        Err(e) => Err(CliError::nats(format!("cannot delete {key}"), e)),
    }
}
