//! The unit files and drop-ins a SystemdUnit resource gives, and the
//! ledger (`units.json`) that says which the agent wrote: plain `std::fs`,
//! run on the blocking pool by the reconciler. Ownership of a file about to
//! be created is saved before the write; a file the agent did not write is
//! never overwritten.

use std::path::{Path, PathBuf};

use manifest_types::{FailureReason, SystemdUnitSpec};

use crate::fsutil::write_atomic;
use crate::reconcile::Failure;
use crate::state::{StateDir, UnitEntry, UnitLedger};

/// The unit files and their ledger: plain `std::fs`, run on the blocking
/// pool by [`UnitReconciler`](super::UnitReconciler).
#[derive(Debug)]
pub struct UnitFiles {
    pub(super) state: StateDir,
    pub(super) ledger: UnitLedger,
    pub(super) unit_dir: PathBuf,
}

impl UnitFiles {
    pub(super) fn save(&self) -> Result<(), Failure> {
        self.state
            .save_units(&self.ledger)
            .map_err(|e| Failure::new(FailureReason::StateWriteFailed, e.to_string()))
    }

    /// Writes the unit file and drop-ins the spec gives; removes the agent's
    /// drop-ins it no longer gives. Returns whether anything changed.
    /// Ownership of a file about to be created is saved in the ledger first,
    /// so a crash cannot leave a unit file the agent would refuse as foreign.
    pub(super) fn write_files(
        &mut self,
        name: &str,
        spec: &SystemdUnitSpec,
        entry: &mut UnitEntry,
    ) -> Result<bool, Failure> {
        let unit_path = self.unit_dir.join(name);
        let dir = self.unit_dir.join(format!("{name}.d"));
        let absent = |p: &Path| !p.exists();
        let mut claimed = false;
        if spec.content.is_some() && !entry.owns_file && absent(&unit_path) {
            entry.owns_file = true;
            claimed = true;
        }
        for file in spec.drop_ins.keys() {
            if !entry.drop_ins.contains(file) && absent(&dir.join(file)) {
                entry.drop_ins.insert(file.clone());
                claimed = true;
            }
        }
        if claimed {
            self.ledger.units.insert(name.to_owned(), entry.clone());
            self.save()?;
        }

        let mut changed = false;
        match &spec.content {
            Some(content) => changed |= self.put(&unit_path, content, entry.owns_file)?,
            None if entry.owns_file => {
                remove_file(&unit_path)?;
                entry.owns_file = false;
                changed = true;
            }
            None => {}
        }
        for (file, content) in &spec.drop_ins {
            changed |= self.put(&dir.join(file), content, entry.drop_ins.contains(file))?;
        }
        let stale: Vec<String> = entry
            .drop_ins
            .iter()
            .filter(|f| !spec.drop_ins.contains_key(*f))
            .cloned()
            .collect();
        for file in stale {
            remove_file(&dir.join(&file))?;
            entry.drop_ins.remove(&file);
            changed = true;
        }
        let _ = std::fs::remove_dir(&dir); // only if empty
        Ok(changed)
    }

    /// Writes `content` at `path` unless it is already there. A file the
    /// agent does not own is refused.
    fn put(&self, path: &Path, content: &str, owned: bool) -> Result<bool, Failure> {
        match std::fs::read(path) {
            Ok(current) if current == content.as_bytes() => return Ok(false),
            Ok(_) if !owned => {
                return Err(Failure::new(
                    FailureReason::NotOwned,
                    format!(
                        "{} exists and was not written by Flotilla; refusing to overwrite it",
                        path.display()
                    ),
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Failure::new(
                    FailureReason::ReadFailed,
                    format!("{}: {e}", path.display()),
                ));
            }
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                Failure::new(
                    FailureReason::WriteFailed,
                    format!("{}: {e}", parent.display()),
                )
            })?;
        }
        write_atomic(path, content.as_bytes(), 0o644, None).map_err(|e| {
            Failure::new(
                FailureReason::WriteFailed,
                format!("{}: {e}", path.display()),
            )
        })?;
        tracing::info!(path = %path.display(), "unit file written");
        Ok(true)
    }
}

pub(super) fn remove_file(path: &Path) -> Result<(), Failure> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Failure::new(
            FailureReason::RemoveFailed,
            format!("{}: {e}", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifest_types::spec::{TriggerAction, UnitState};

    #[test]
    fn writes_only_what_changed_and_refuses_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("state")).unwrap();
        let units = dir.path().join("units");
        std::fs::create_dir_all(&units).unwrap();
        let mut r = UnitFiles {
            ledger: state.load_units().unwrap(),
            state,
            unit_dir: units.clone(),
        };
        let mut spec = SystemdUnitSpec {
            unit: manifest_types::spec::UnitName::new("app.service").unwrap(),
            content: Some("[Service]\nExecStart=/bin/true\n".into()),
            drop_ins: [(
                "10-env.conf".to_owned(),
                "[Service]\nEnvironment=A=1\n".to_owned(),
            )]
            .into(),
            enabled: None,
            state: UnitState::Running,
            on_trigger: TriggerAction::Restart,
        };
        let mut entry = UnitEntry::default();
        assert!(r.write_files("app.service", &spec, &mut entry).unwrap());
        assert!(entry.owns_file);
        assert!(units.join("app.service.d/10-env.conf").exists());
        assert!(
            !r.write_files("app.service", &spec, &mut entry).unwrap(),
            "unchanged: nothing written"
        );
        spec.drop_ins.clear();
        assert!(r.write_files("app.service", &spec, &mut entry).unwrap());
        assert!(!units.join("app.service.d").exists());

        std::fs::write(units.join("foreign.service"), "[Service]\n").unwrap();
        spec.unit = manifest_types::spec::UnitName::new("foreign.service").unwrap();
        let err = r
            .write_files("foreign.service", &spec, &mut UnitEntry::default())
            .unwrap_err();
        assert_eq!(err.reason, FailureReason::NotOwned);
        assert_eq!(
            std::fs::read_to_string(units.join("foreign.service")).unwrap(),
            "[Service]\n"
        );
    }
}
