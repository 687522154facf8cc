//! The agent's state directory: what must survive a reboot with no network.
//!
//! - `instance-id`: a UUID made once per installation (tells "I restarted"
//!   from "someone else writes my status key").
//! - `manifest.json` + `manifest.meta.json`: the exact bytes of the last
//!   accepted manifest and the KV revision they came from; re-validated on load.
//! - `ledger.json`: what the agent owns on this device (files it wrote, with
//!   the hash written), the source of truth for removal and adoption.
//!
//! Every write is atomic (see [`crate::fsutil`]).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use manifest_types::ResourceId;
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// The cached manifest: exact bytes plus where they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedManifest {
    pub bytes: Vec<u8>,
    pub revision: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestMeta {
    revision: u64,
}

/// Files the agent wrote, keyed by absolute path.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ledger {
    #[serde(default)]
    pub files: BTreeMap<PathBuf, FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    pub resource: ResourceId,
    /// SHA-256 of the content the agent wrote (or is about to write: the
    /// entry is recorded before the write, so a crash cannot orphan a file).
    pub sha256: String,
    /// The file existed before the agent took it over (adopt: true); on
    /// removal it is released, not deleted.
    #[serde(default)]
    pub adopted: bool,
}

/// Units the agent manages, keyed by unit name (`units.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitLedger {
    #[serde(default)]
    pub units: BTreeMap<String, UnitEntry>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitEntry {
    pub resource: Option<ResourceId>,
    /// The agent wrote the unit file (so removal stops, disables and deletes it).
    #[serde(default)]
    pub owns_file: bool,
    /// Drop-in file names the agent wrote under `<unit>.d/`.
    #[serde(default)]
    pub drop_ins: std::collections::BTreeSet<String>,
    /// Hash of the unit's files when the unit was last (re)started.
    #[serde(default)]
    pub started_files: Option<String>,
    /// Hash of the `restartOn` inputs when the unit was last (re)started or
    /// reloaded: the level that triggers survive a crash with.
    #[serde(default)]
    pub started_inputs: Option<String>,
    /// `state: completed`: how the start job queued for the run at
    /// `started_files`/`started_inputs` ended (`done`, `failed`, ...), once
    /// the agent saw it end. The levels are recorded as soon as the job is
    /// queued, so a run is never repeated for the same levels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_job: Option<String>,
}

impl StateDir {
    /// Opens (creating if needed, mode 0700) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
            path: dir.to_owned(),
            source,
        })?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn io(&self, name: &str) -> impl FnOnce(io::Error) -> StateError {
        let path = self.file(name);
        move |source| StateError::Io { path, source }
    }

    fn read_opt(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        match std::fs::read(self.file(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(name)(e)),
        }
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        write_atomic(&self.file(name), bytes, 0o600, None).map_err(self.io(name))
    }

    /// The installation's instance id, created on first use.
    pub fn instance_id(&self) -> Result<String, StateError> {
        if let Some(b) = self.read_opt("instance-id")? {
            let id = String::from_utf8_lossy(&b).trim().to_owned();
            if uuid::Uuid::parse_str(&id).is_ok() {
                return Ok(id);
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        self.write("instance-id", format!("{id}\n").as_bytes())?;
        Ok(id)
    }

    pub fn load_manifest(&self) -> Result<Option<CachedManifest>, StateError> {
        let Some(bytes) = self.read_opt("manifest.json")? else {
            return Ok(None);
        };
        let revision = match self.read_opt("manifest.meta.json")? {
            Some(m) => {
                serde_json::from_slice::<ManifestMeta>(&m)
                    .map_err(|source| StateError::Corrupt {
                        path: self.file("manifest.meta.json"),
                        source,
                    })?
                    .revision
            }
            None => 0,
        };
        Ok(Some(CachedManifest { bytes, revision }))
    }

    /// Persists an accepted manifest (bytes first, then its metadata).
    pub fn save_manifest(&self, m: &CachedManifest) -> Result<(), StateError> {
        self.write("manifest.json", &m.bytes)?;
        let meta = serde_json::to_vec(&ManifestMeta {
            revision: m.revision,
        })
        .expect("meta serialises");
        self.write("manifest.meta.json", &meta)
    }

    pub fn load_ledger(&self) -> Result<Ledger, StateError> {
        match self.read_opt("ledger.json")? {
            None => Ok(Ledger::default()),
            Some(b) => serde_json::from_slice(&b).map_err(|source| StateError::Corrupt {
                path: self.file("ledger.json"),
                source,
            }),
        }
    }

    pub fn load_units(&self) -> Result<UnitLedger, StateError> {
        match self.read_opt("units.json")? {
            None => Ok(UnitLedger::default()),
            Some(b) => serde_json::from_slice(&b).map_err(|source| StateError::Corrupt {
                path: self.file("units.json"),
                source,
            }),
        }
    }

    pub fn save_units(&self, units: &UnitLedger) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(units).expect("unit ledger serialises");
        self.write("units.json", &bytes)
    }

    pub fn save_ledger(&self, ledger: &Ledger) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(ledger).expect("ledger serialises");
        self.write("ledger.json", &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_keeps_instance_id() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(&dir.path().join("state")).unwrap();
        let id = s.instance_id().unwrap();
        assert_eq!(StateDir::open(s.path()).unwrap().instance_id().unwrap(), id);
        assert_eq!(s.load_manifest().unwrap(), None);
        let m = CachedManifest {
            bytes: b"{\"x\":1}".to_vec(),
            revision: 7,
        };
        s.save_manifest(&m).unwrap();
        assert_eq!(s.load_manifest().unwrap(), Some(m));
        let mut l = Ledger::default();
        l.files.insert(
            "/a".into(),
            FileEntry {
                resource: "d/a".parse().unwrap(),
                sha256: "00".into(),
                adopted: false,
            },
        );
        s.save_ledger(&l).unwrap();
        assert_eq!(s.load_ledger().unwrap(), l);
    }
}
