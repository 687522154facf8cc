//! The File reconciler: atomic writes, ownership through the ledger, drift
//! repair, adoption and careful removal (docs/adr/0005-file-ownership.md).
//!
//! - A path that holds a file the agent did not write is refused unless the
//!   resource says `adopt: true`.
//! - Content or metadata drift on an owned file is repaired.
//! - On removal from the manifest, a file is deleted only if it still holds
//!   exactly what the agent wrote; otherwise (or if it was adopted) it is
//!   released: left in place and reported.
//! - No symlinks anywhere between the file root and the file, also under
//!   races: the file's directory is reached with an `O_NOFOLLOW` walk from
//!   the root and every operation on the file goes through that open handle
//!   ([`crate::fsutil::AnchoredDir`]); the file itself is opened
//!   `O_NOFOLLOW` and replaced by rename, which never follows a symlink.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use manifest_types::spec::Principal;
use std::io::Read;
use std::sync::{Arc, Mutex};

use manifest_types::{
    AgentManifest, FailureReason, FileSpec, ReadyDetails, ReleaseReason, ReleasedResource,
    ResourceId, ResourceKind, ResourceSpec,
};
use sha2::{Digest, Sha256};

use super::{Failure, Outcome, Removals};
use crate::fsutil::{
    AnchoredDir, is_not_a_directory, is_symlink_error, open_nofollow, write_atomic,
};
use crate::state::{FileEntry, Ledger, StateDir};

/// What is on disk at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub regular_file: bool,
    pub sha256: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// What the spec asks for, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub sha256: String,
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    InSync,
    /// Write content and metadata; `adopting` when taking over a foreign file.
    Write {
        adopting: bool,
    },
    FixMetadata,
    Refuse {
        reason: FailureReason,
        message: String,
    },
}

/// The pure decision for one file.
pub fn plan(
    desired: &Desired,
    observed: Option<&Observed>,
    owned: Option<&FileEntry>,
    adopt: bool,
) -> Plan {
    let Some(obs) = observed else {
        return Plan::Write { adopting: false };
    };
    if !obs.regular_file {
        return Plan::Refuse {
            reason: FailureReason::NotARegularFile,
            message: "path exists and is not a regular file (symlinks and directories are never replaced)".into(),
        };
    }
    if owned.is_none() && !adopt {
        return Plan::Refuse {
            reason: FailureReason::NotOwned,
            message: "a file the agent did not write already exists here; set adopt: true to take it over".into(),
        };
    }
    if obs.sha256 != desired.sha256 {
        return Plan::Write {
            adopting: owned.is_none(),
        };
    }
    let meta_ok = obs.mode == desired.mode
        && desired.uid.is_none_or(|u| u == obs.uid)
        && desired.gid.is_none_or(|g| g == obs.gid);
    match (meta_ok, owned.is_none()) {
        (true, false) => Plan::InSync,
        // Adopting a file that already matches: record ownership by writing.
        (_, true) => Plan::Write { adopting: true },
        (false, false) => Plan::FixMetadata,
    }
}

/// The File reconciler as the worker uses it: every filesystem call (reads,
/// hashing, writes, fsync) runs on tokio's blocking pool, never on the
/// runtime's threads, so a slow SD card never stalls the event loop or the
/// watchdog. One file operation at a time (the ledger is one file).
#[derive(Debug, Clone)]
pub struct FileReconciler {
    files: Arc<Mutex<Files>>,
}

impl FileReconciler {
    pub fn new(state: StateDir, roots: Vec<PathBuf>) -> Result<Self, crate::state::StateError> {
        Ok(Self {
            files: Arc::new(Mutex::new(Files::new(state, roots)?)),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Files) -> T + Send + 'static,
    ) -> Result<T, Failure> {
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || f(&mut files.lock().expect("file reconciler lock")))
            .await
            .map_err(|e| Failure::new(FailureReason::WriteFailed, format!("file task failed: {e}")))
    }

    pub async fn reconcile(&self, id: &ResourceId, spec: &FileSpec) -> Outcome {
        let (id, spec) = (id.clone(), spec.clone());
        self.blocking(move |f| f.reconcile(&id, &spec))
            .await
            .unwrap_or_else(Outcome::from)
    }

    pub async fn remove_unlisted(&self, manifest: &AgentManifest) -> Removals {
        let manifest = manifest.clone();
        self.blocking(move |f| f.remove_unlisted(&manifest))
            .await
            .unwrap_or_else(|f| {
                // Which files are owed is unknown without the ledger; the
                // sweep is retried at the next drift check.
                tracing::error!(message = %f.message, "file removal sweep failed");
                Removals::default()
            })
    }
}

/// The synchronous File reconciler (plain `std::fs`).
#[derive(Debug)]
pub struct Files {
    state: StateDir,
    ledger: Ledger,
    roots: Vec<PathBuf>,
}

impl Files {
    pub fn new(state: StateDir, roots: Vec<PathBuf>) -> Result<Self, crate::state::StateError> {
        let ledger = state.load_ledger()?;
        Ok(Self {
            state,
            ledger,
            roots,
        })
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn reconcile(&mut self, id: &ResourceId, spec: &FileSpec) -> Outcome {
        match self.try_reconcile(id, spec) {
            Ok(details) => Outcome::ready(details),
            Err(f) => Outcome::Failed(f),
        }
    }

    fn try_reconcile(&mut self, id: &ResourceId, spec: &FileSpec) -> Result<ReadyDetails, Failure> {
        let path = PathBuf::from(&spec.path);
        let content = spec
            .decoded_content()
            .map_err(|e| Failure::new(FailureReason::InvalidContent, e.to_string()))?;
        let desired = Desired {
            sha256: sha256_hex(&content),
            mode: spec.mode.bits(),
            uid: spec
                .owner
                .as_ref()
                .map(|p| resolve(p, "/etc/passwd"))
                .transpose()?,
            gid: spec
                .group
                .as_ref()
                .map(|p| resolve(p, "/etc/group"))
                .transpose()?,
        };
        // `at` names the file through its anchored directory: nothing below
        // may redirect it out of the root between here and the last read.
        let (_dir, at) = self.anchor(&path, true)?;
        let observed = observe(&at).map_err(|e| io_failure(FailureReason::ReadFailed, &path, e))?;
        let owned = self.ledger.files.get(&path).cloned();
        match plan(&desired, observed.as_ref(), owned.as_ref(), spec.adopt) {
            Plan::InSync => {}
            Plan::Refuse { reason, message } => return Err(Failure::new(reason, message)),
            Plan::Write { adopting } => {
                // Record intent first: a crash after the write must not leave
                // a file the agent would later refuse as not its own.
                let adopted = owned.map(|e| e.adopted).unwrap_or(false) || adopting;
                self.record(
                    path.clone(),
                    FileEntry {
                        resource: id.clone(),
                        sha256: desired.sha256.clone(),
                        adopted,
                    },
                )?;
                crate::fault::exit_at("file-recorded");
                write_atomic(
                    &at,
                    &content,
                    desired.mode,
                    Some((desired.uid, desired.gid)),
                )
                .map_err(|e| io_failure(FailureReason::WriteFailed, &path, e))?;
                tracing::info!(resource = %id, path = %path.display(), "file written");
                crate::fault::exit_at("file-written");
            }
            Plan::FixMetadata => {
                // Through a descriptor of the file itself (never a path a
                // symlink could replace); chown first: it clears
                // setuid/setgid, which the chmod restores.
                open_nofollow(&at)
                    .and_then(|f| {
                        std::os::unix::fs::fchown(&f, desired.uid, desired.gid)?;
                        f.set_permissions(fs::Permissions::from_mode(desired.mode))
                    })
                    .map_err(|e| io_failure(FailureReason::WriteFailed, &path, e))?;
                tracing::info!(resource = %id, path = %path.display(), "file metadata repaired");
            }
        }
        if self
            .ledger
            .files
            .get(&path)
            .is_some_and(|e| &e.resource != id)
        {
            let entry = FileEntry {
                resource: id.clone(),
                ..self.ledger.files[&path].clone()
            };
            self.record(path.clone(), entry)?;
        }
        let now = observe(&at)
            .map_err(|e| io_failure(FailureReason::ReadFailed, &path, e))?
            .ok_or_else(|| {
                Failure::new(
                    FailureReason::WriteFailed,
                    format!("{} vanished after writing", path.display()),
                )
            })?;
        Ok(ReadyDetails::File {
            sha256: now.sha256,
            size: now.size,
            mode: format!("{:04o}", now.mode),
            uid: now.uid,
            gid: now.gid,
        })
    }

    /// The directory holding `path`, reached from its file root without
    /// following any symlink ([`AnchoredDir`]; missing directories are
    /// created, 0755, when `create`), and the file's name resolved through
    /// it: every later operation on the file goes through that handle.
    fn anchor(&self, path: &Path, create: bool) -> Result<(AnchoredDir, PathBuf), Failure> {
        let root = self
            .roots
            .iter()
            .find(|r| path.starts_with(r) && path != r.as_path())
            .ok_or_else(|| {
                Failure::new(
                    FailureReason::PathOutsideRoots,
                    format!("{} is outside every file root", path.display()),
                )
            })?;
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(Failure::new(
                FailureReason::PathOutsideRoots,
                format!("{} has no file name", path.display()),
            ));
        };
        let below = parent.strip_prefix(root).unwrap_or(Path::new(""));
        let dir = AnchoredDir::open(root, below, create).map_err(|e| {
            if is_symlink_error(&e) {
                Failure::new(
                    FailureReason::SymlinkInPath,
                    format!(
                        "a directory on the way to {} is a symlink; File paths may not traverse symlinks",
                        path.display()
                    ),
                )
            } else if is_not_a_directory(&e) {
                Failure::new(
                    FailureReason::NotADirectory,
                    format!("something on the way to {} is not a directory", path.display()),
                )
            } else if create {
                io_failure(FailureReason::CreateDirFailed, parent, e)
            } else {
                io_failure(FailureReason::ReadFailed, parent, e)
            }
        })?;
        let at = dir.entry(name);
        Ok((dir, at))
    }

    fn record(&mut self, path: PathBuf, entry: FileEntry) -> Result<(), Failure> {
        self.ledger.files.insert(path, entry);
        self.state
            .save_ledger(&self.ledger)
            .map_err(|e| Failure::new(FailureReason::StateWriteFailed, e.to_string()))
    }

    /// Deletes owned files no File resource of `manifest` wants any more —
    /// only when they still hold what the agent wrote.
    pub fn remove_unlisted(&mut self, manifest: &AgentManifest) -> Removals {
        let wanted: BTreeSet<PathBuf> = manifest
            .resources
            .iter()
            .filter_map(|r| match &r.spec {
                ResourceSpec::File(f) => Some(PathBuf::from(&f.path)),
                _ => None,
            })
            .collect();
        let stale: Vec<(PathBuf, FileEntry)> = self
            .ledger
            .files
            .iter()
            // A resource still in the manifest whose spec this agent cannot
            // read (Unsupported) keeps its file: never half-apply, never delete.
            .filter(|(p, e)| {
                !wanted.contains(*p)
                    && !manifest
                        .resource(&e.resource)
                        .is_some_and(|r| matches!(r.spec, ResourceSpec::Unsupported(_)))
            })
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect();
        let mut out = Removals::default();
        for (path, entry) in stale {
            let release = |reason: ReleaseReason, message: &str| {
                tracing::warn!(resource = %entry.resource, path = %path.display(), %reason, message, "file released");
                ReleasedResource {
                    id: entry.resource.clone(),
                    target: path.display().to_string(),
                    reason,
                    message: Some(message.to_owned()),
                }
            };
            let anchored = match self.anchor(&path, false) {
                Ok(a) => Some(a),
                // Its directory is gone: so is the file.
                Err(f) if f.reason == FailureReason::ReadFailed && !path_exists(&path) => None,
                Err(_) => {
                    out.released.push(release(
                        ReleaseReason::PathChanged,
                        "the way to it changed (a symlink or a non-directory); left in place",
                    ));
                    self.forget(&path);
                    continue;
                }
            };
            let Some((dir, at)) = anchored else {
                self.forget(&path);
                continue;
            };
            match observe(&at) {
                Ok(None) => {}
                Ok(Some(_)) if entry.adopted => {
                    out.released.push(release(
                        ReleaseReason::Adopted,
                        "adopted (existed before the agent took it over); left in place",
                    ));
                }
                Ok(Some(obs)) if !obs.regular_file || obs.sha256 != entry.sha256 => {
                    out.released.push(release(
                        ReleaseReason::ChangedSinceWritten,
                        "changed by someone else since the agent wrote it; left in place",
                    ));
                }
                Ok(Some(_)) => {
                    if let Err(e) = fs::remove_file(&at).and_then(|()| dir.sync()) {
                        out.failed.push((
                            entry.resource.clone(),
                            ResourceKind::File,
                            io_failure(FailureReason::RemoveFailed, &path, e),
                        ));
                        continue;
                    }
                    tracing::info!(resource = %entry.resource, path = %path.display(), "file removed");
                }
                Err(e) => {
                    out.failed.push((
                        entry.resource.clone(),
                        ResourceKind::File,
                        io_failure(FailureReason::ReadFailed, &path, e),
                    ));
                    continue;
                }
            }
            self.forget(&path);
        }
        out
    }

    fn forget(&mut self, path: &Path) {
        self.ledger.files.remove(path);
        if let Err(e) = self.state.save_ledger(&self.ledger) {
            tracing::error!(error = %e, "cannot save ledger");
        }
    }
}

fn path_exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn observe(path: &Path) -> io::Result<Option<Observed>> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let regular_file = meta.file_type().is_file();
    let sha256 = if regular_file {
        sha256_file(path)?
    } else {
        String::new()
    };
    Ok(Some(Observed {
        regular_file,
        sha256,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    }))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes a file by streaming it in 64 KiB chunks: a large file on a
/// device is never read into memory whole.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = open_nofollow(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex(&hasher.finalize()))
}

fn io_failure(reason: FailureReason, path: &Path, e: io::Error) -> Failure {
    let reason = if e.kind() == io::ErrorKind::PermissionDenied {
        FailureReason::PermissionDenied
    } else {
        reason
    };
    Failure::new(reason, format!("{}: {e}", path.display()))
}

/// Resolves a user or group name through `/etc/passwd` / `/etc/group`.
fn resolve(p: &Principal, db: &str) -> Result<u32, Failure> {
    match p {
        Principal::Id(id) => Ok(*id),
        Principal::Name(name) => lookup_id(&fs::read_to_string(db).unwrap_or_default(), name)
            .ok_or_else(|| {
                Failure::new(
                    FailureReason::UnknownPrincipal,
                    format!("{name:?} is not in {db}"),
                )
            }),
    }
}

fn lookup_id(db: &str, name: &str) -> Option<u32> {
    db.lines().find_map(|line| {
        let mut f = line.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(sha: &str, mode: u32) -> Desired {
        Desired {
            sha256: sha.into(),
            mode,
            uid: None,
            gid: None,
        }
    }

    fn obs(sha: &str, mode: u32) -> Observed {
        Observed {
            regular_file: true,
            sha256: sha.into(),
            size: 1,
            mode,
            uid: 1000,
            gid: 1000,
        }
    }

    fn entry(sha: &str) -> FileEntry {
        FileEntry {
            resource: "d/f".parse().unwrap(),
            sha256: sha.into(),
            adopted: false,
        }
    }

    #[test]
    fn plan_covers_ownership_rules() {
        let d = desired("new", 0o644);
        assert_eq!(plan(&d, None, None, false), Plan::Write { adopting: false });
        assert_eq!(
            plan(&d, Some(&obs("new", 0o644)), Some(&entry("new")), false),
            Plan::InSync
        );
        assert_eq!(
            plan(&d, Some(&obs("old", 0o644)), Some(&entry("old")), false),
            Plan::Write { adopting: false }
        );
        // drift on an owned file
        assert_eq!(
            plan(&d, Some(&obs("edited", 0o644)), Some(&entry("new")), false),
            Plan::Write { adopting: false }
        );
        assert_eq!(
            plan(&d, Some(&obs("new", 0o600)), Some(&entry("new")), false),
            Plan::FixMetadata
        );
        assert!(matches!(
            plan(&d, Some(&obs("x", 0o644)), None, false),
            Plan::Refuse {
                reason: FailureReason::NotOwned,
                ..
            }
        ));
        assert_eq!(
            plan(&d, Some(&obs("x", 0o644)), None, true),
            Plan::Write { adopting: true }
        );
        assert_eq!(
            plan(&d, Some(&obs("new", 0o644)), None, true),
            Plan::Write { adopting: true }
        );
        let mut dir = obs("", 0o755);
        dir.regular_file = false;
        assert!(matches!(
            plan(&d, Some(&dir), Some(&entry("x")), true),
            Plan::Refuse {
                reason: FailureReason::NotARegularFile,
                ..
            }
        ));
        let owner = Desired {
            uid: Some(0),
            ..d.clone()
        };
        assert_eq!(
            plan(&owner, Some(&obs("new", 0o644)), Some(&entry("new")), false),
            Plan::FixMetadata
        );
    }

    #[test]
    fn looks_up_names() {
        let db = "root:x:0:0:root:/root:/bin/sh\npi:x:1000:1000::/home/pi:/bin/bash\n";
        assert_eq!(lookup_id(db, "pi"), Some(1000));
        assert_eq!(lookup_id(db, "root"), Some(0));
        assert_eq!(lookup_id(db, "nobody"), None);
        let groups = "adm:x:4:syslog\n";
        assert_eq!(lookup_id(groups, "adm"), Some(4));
    }

    fn reconciler() -> (tempfile::TempDir, Files, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let root = root.canonicalize().unwrap();
        let state = StateDir::open(&dir.path().join("state")).unwrap();
        let r = Files::new(state, vec![root.clone()]).unwrap();
        (dir, r, root)
    }

    fn spec(path: &Path, content: &str) -> FileSpec {
        serde_json::from_value(serde_json::json!({"path": path, "content": content})).unwrap()
    }

    #[test]
    fn writes_then_touches_nothing_then_removes() {
        let (_d, mut r, root) = reconciler();
        let id: ResourceId = "d/f".parse().unwrap();
        let p = root.join("sub/dir/f.conf");
        let out = r.reconcile(&id, &spec(&p, "hello"));
        assert!(
            matches!(
                out,
                Outcome::Ready {
                    details: ReadyDetails::File { size: 5, .. },
                    ..
                }
            ),
            "{out:?}"
        );
        let ino = fs::metadata(&p).unwrap().ino();
        assert!(matches!(
            r.reconcile(&id, &spec(&p, "hello")),
            Outcome::Ready { .. }
        ));
        assert_eq!(
            fs::metadata(&p).unwrap().ino(),
            ino,
            "in-sync file was rewritten"
        );
        let empty = AgentManifest::empty("a".parse().unwrap(), 2);
        assert_eq!(r.remove_unlisted(&empty), Removals::default());
        assert!(!p.exists());
        assert!(r.ledger().files.is_empty());
    }

    #[test]
    fn a_resource_turned_unsupported_keeps_its_file() {
        let (_d, mut r, root) = reconciler();
        let id: ResourceId = "d/f".parse().unwrap();
        let p = root.join("f");
        assert!(matches!(
            r.reconcile(&id, &spec(&p, "v1")),
            Outcome::Ready { .. }
        ));
        let newer = serde_json::json!({
            "apiVersion": "flotilla.dev/v1", "agentId": "a", "generation": 2,
            "resources": [{"id": "d/f", "kind": "File", "spec": {"path": p, "content": "v2", "fromTheFuture": 1}}]
        });
        let m = AgentManifest::from_json(newer.to_string().as_bytes()).unwrap();
        assert_eq!(r.remove_unlisted(&m), Removals::default());
        assert_eq!(fs::read_to_string(&p).unwrap(), "v1");
    }

    #[test]
    fn refuses_foreign_files_and_symlinks_and_releases_edited_ones() {
        let (_d, mut r, root) = reconciler();
        let id: ResourceId = "d/f".parse().unwrap();
        let foreign = root.join("foreign");
        fs::write(&foreign, "mine").unwrap();
        assert!(matches!(
            r.reconcile(&id, &spec(&foreign, "x")),
            Outcome::Failed(Failure {
                reason: FailureReason::NotOwned,
                ..
            })
        ));
        assert_eq!(fs::read_to_string(&foreign).unwrap(), "mine");

        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
        let through = root.join("link/f");
        assert!(matches!(
            r.reconcile(&id, &spec(&through, "x")),
            Outcome::Failed(Failure {
                reason: FailureReason::SymlinkInPath,
                ..
            })
        ));
        assert!(!outside.path().join("f").exists());

        let p = root.join("owned");
        assert!(matches!(
            r.reconcile(&id, &spec(&p, "v1")),
            Outcome::Ready { .. }
        ));
        fs::write(&p, "edited by hand").unwrap();
        let released = r
            .remove_unlisted(&AgentManifest::empty("a".parse().unwrap(), 2))
            .released;
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].reason, ReleaseReason::ChangedSinceWritten);
        assert_eq!(fs::read_to_string(&p).unwrap(), "edited by hand");
    }

    /// While another process swaps a directory on the way for a symlink out
    /// of the root and back, as fast as it can, writes, repairs and removals
    /// either land inside the root or fail: nothing ever appears outside.
    #[test]
    fn a_symlink_raced_into_the_path_never_redirects_a_write_out_of_the_root() {
        let (_dir, mut r, root) = reconciler();
        let outside = tempfile::tempdir().unwrap();
        let dir = root.join("dir");
        fs::create_dir(&dir).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swaps = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let flipper = {
            let (stop, swaps) = (stop.clone(), swaps.clone());
            let (dir, real, target) = (
                dir.clone(),
                root.join("dir.real"),
                outside.path().to_owned(),
            );
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if fs::rename(&dir, &real).is_ok() {
                        let _ = std::os::unix::fs::symlink(&target, &dir);
                        let _ = fs::remove_file(&dir);
                        let _ = fs::rename(&real, &dir);
                        swaps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        };
        let id: ResourceId = "d/f".parse().unwrap();
        let path = dir.join("f");
        let (mut ready, mut refused) = (0, 0);
        for i in 0..1500 {
            let mut s = spec(&path, &format!("v{}", i % 3));
            s.mode = manifest_types::spec::FileMode::new(if i % 2 == 0 { 0o644 } else { 0o600 })
                .unwrap();
            match r.reconcile(&id, &s) {
                Outcome::Ready { .. } => ready += 1,
                Outcome::Failed(_) => refused += 1,
                other => panic!("{other:?}"),
            }
            if i % 100 == 99 {
                r.remove_unlisted(&AgentManifest::empty("pi-1".parse().unwrap(), 1));
            }
            let leaked: Vec<_> = fs::read_dir(outside.path()).unwrap().collect();
            assert!(leaked.is_empty(), "written outside the root: {leaked:?}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flipper.join().unwrap();
        assert!(
            swaps.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "the race ran"
        );
        assert!(
            ready > 0 && refused + ready == 1500,
            "{ready} ready, {refused} refused"
        );
    }
}
