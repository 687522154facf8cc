//! The SystemdUnit reconciler: systemd's manager over D-Bus (zbus), never
//! `systemctl` (docs/adr/0009-systemd-units.md).
//!
//! - Unit files and drop-ins the manifest gives are written atomically into
//!   the unit directory (default `/etc/systemd/system`) and recorded in
//!   `units.json` before the write. A file the agent did not write is never
//!   overwritten.
//! - Changed files → `Reload` → restart if running; unchanged → nothing touched.
//! - Enable/disable with `EnableUnitFiles`/`DisableUnitFiles`; start, stop,
//!   restart and reload with mode "replace", waiting for the job's
//!   `JobRemoved` signal and reading its result.
//! - Triggers are level-based: the ledger keeps the hash of the unit's files
//!   and of its `restartOn` inputs at the last (re)start; a difference means
//!   a restart (or reload) is owed, even after a crash.
//! - Removed from the manifest: a unit whose file the agent wrote is stopped,
//!   disabled and deleted; any other unit is only let go of (its drop-ins
//!   written by the agent are removed), never stopped or disabled.
//!
//! The decisions ([`plan_action`], [`assess`]) are pure.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use futures::StreamExt;
use manifest_types::spec::{TriggerAction, UnitState};
use std::sync::{Arc, Mutex};

use manifest_types::{
    AgentManifest, FailureReason, ReadyDetails, ReleasedResource, ResourceId, ResourceKind,
    ResourceSpec, SystemdUnitSpec,
};
use zbus_systemd::systemd1::{ManagerProxy, ServiceProxy, UnitProxy};

use super::{Ctx, Failure, Interrupt, Outcome, Removals};
use crate::fsutil::write_atomic;
use crate::state::{StateDir, UnitEntry, UnitLedger};

pub const DEFAULT_UNIT_DIR: &str = "/etc/systemd/system";
/// How a unit job ended, as far as the agent waited for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    /// systemd's result: `done`, `failed`, `timeout`, `canceled`,
    /// `dependency` or `skipped`.
    Ended(String),
    /// Still queued or running after the agent's job timeout; the unit's
    /// state says the rest.
    StillRunning,
    /// A newer manifest interrupted the wait (the job carries on in systemd).
    Interrupted,
}

impl JobResult {
    fn is_done(&self) -> bool {
        matches!(self, Self::Ended(r) if r == "done")
    }
}

// ------------------------------------------------------------ pure part ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    Start,
    Stop,
    Restart,
    Reload,
}

fn is_up(active_state: &str) -> bool {
    matches!(active_state, "active" | "activating" | "reloading")
}

/// What to do to the unit's run state. `files_changed`: its files differ
/// from those it was last started with; `inputs_changed`: likewise for its
/// `restartOn` inputs.
pub fn plan_action(
    want: UnitState,
    active_state: &str,
    files_changed: bool,
    inputs_changed: bool,
    on_trigger: TriggerAction,
) -> Action {
    match want {
        UnitState::Stopped if is_up(active_state) => Action::Stop,
        UnitState::Stopped => Action::None,
        UnitState::Running if !is_up(active_state) => Action::Start,
        UnitState::Running if files_changed => Action::Restart,
        UnitState::Running if inputs_changed => match on_trigger {
            TriggerAction::Restart => Action::Restart,
            TriggerAction::Reload => Action::Reload,
        },
        UnitState::Running => Action::None,
    }
}

/// What systemd says about a unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub active_state: String,
    pub sub_state: String,
    /// Service units only.
    pub n_restarts: u32,
    pub main_pid: u32,
    /// Service result (`success`, `exit-code`, `timeout`, …).
    pub result: String,
    pub exit_status: i32,
    /// Microseconds since the epoch; 0 when never active.
    pub active_enter_usec: u64,
}

pub fn assess(want: UnitState, o: &Observed) -> Outcome {
    let ready = || {
        Outcome::ready(ReadyDetails::SystemdUnit {
            active_state: o.active_state.clone(),
            sub_state: o.sub_state.clone(),
            n_restarts: o.n_restarts,
            main_pid: (o.main_pid > 0).then_some(o.main_pid),
            active_since: (o.active_enter_usec > 0).then(|| {
                humantime::format_rfc3339_seconds(
                    UNIX_EPOCH + Duration::from_micros(o.active_enter_usec),
                )
                .to_string()
            }),
        })
    };
    let why = || {
        let mut m = format!("unit is {} ({})", o.active_state, o.sub_state);
        if !o.result.is_empty() && o.result != "success" {
            m.push_str(&format!(", result {}", o.result));
        }
        if o.exit_status != 0 {
            m.push_str(&format!(", exit status {}", o.exit_status));
        }
        m
    };
    match (want, o.active_state.as_str()) {
        (UnitState::Running, "active" | "reloading") => ready(),
        (UnitState::Running, "failed") => Outcome::failed(FailureReason::UnitFailed, why()),
        (UnitState::Running, "activating") => Outcome::failed(FailureReason::UnitActivating, why()),
        (UnitState::Running, _) => Outcome::failed(FailureReason::UnitNotRunning, why()),
        (UnitState::Stopped, "inactive" | "failed") => ready(),
        (UnitState::Stopped, _) => Outcome::failed(FailureReason::UnitNotStopped, why()),
    }
}

/// Hash of the files the spec asks for (content and drop-ins).
pub fn files_hash(spec: &SystemdUnitSpec) -> String {
    let mut all = Vec::new();
    if let Some(c) = &spec.content {
        all.extend_from_slice(b"unit\0");
        all.extend_from_slice(c.as_bytes());
    }
    for (name, content) in &spec.drop_ins {
        all.extend_from_slice(format!("\0drop-in\0{name}\0").as_bytes());
        all.extend_from_slice(content.as_bytes());
    }
    super::file::sha256_hex(&all)
}

// ---------------------------------------------------------- D-Bus part ----

/// The unit files and their ledger: plain `std::fs`, run on the blocking
/// pool by [`UnitReconciler`].
#[derive(Debug)]
pub struct UnitFiles {
    state: StateDir,
    ledger: UnitLedger,
    unit_dir: PathBuf,
}

/// Shared by concurrent reconciles: the ledger sits behind a lock taken only
/// for file work, and systemd's job waits run outside it, so one unit's slow
/// job never holds up another unit.
#[derive(Debug)]
pub struct UnitReconciler {
    files: Arc<Mutex<UnitFiles>>,
    /// D-Bus address; None: the system bus.
    bus: Option<String>,
    manager: Mutex<Option<ManagerProxy<'static>>>,
    job_timeout: Duration,
}

fn dbus(context: &str) -> impl FnOnce(zbus::Error) -> Failure + '_ {
    move |e| Failure::new(FailureReason::SystemdError, format!("{context}: {e}"))
}

impl UnitReconciler {
    pub fn new(
        state: StateDir,
        unit_dir: PathBuf,
        bus: Option<String>,
        job_timeout: Duration,
    ) -> Result<Self, crate::state::StateError> {
        Ok(Self {
            files: Arc::new(Mutex::new(UnitFiles {
                ledger: state.load_units()?,
                state,
                unit_dir,
            })),
            bus,
            manager: Mutex::new(None),
            job_timeout,
        })
    }

    /// Runs `f` on the unit files, on the blocking pool.
    async fn with_files<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut UnitFiles) -> Result<T, Failure> + Send + 'static,
    ) -> Result<T, Failure> {
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || f(&mut files.lock().expect("unit ledger lock")))
            .await
            .map_err(|e| {
                Failure::new(
                    FailureReason::WriteFailed,
                    format!("unit file task failed: {e}"),
                )
            })?
    }

    fn forget_manager(&self) {
        *self.manager.lock().expect("manager lock") = None;
    }

    /// The manager proxy, connecting (and subscribing to job signals) on
    /// first use or after an error dropped the connection.
    async fn manager(&self) -> Result<ManagerProxy<'static>, Failure> {
        if let Some(m) = &*self.manager.lock().expect("manager lock") {
            return Ok(m.clone());
        }
        let unavailable = |e: zbus::Error| {
            Failure::new(
                FailureReason::SystemdUnavailable,
                format!("cannot reach systemd over D-Bus: {e}"),
            )
        };
        let conn = match &self.bus {
            Some(addr) => zbus::connection::Builder::address(addr.as_str())
                .build()
                .await
                .map_err(unavailable)?,
            None => zbus::Connection::system().await.map_err(unavailable)?,
        };
        let m = ManagerProxy::new(&conn).await.map_err(unavailable)?;
        // Job results arrive as JobRemoved signals, sent to subscribers only.
        m.subscribe().await.map_err(unavailable)?;
        tracing::info!("connected to systemd over D-Bus");
        *self.manager.lock().expect("manager lock") = Some(m.clone());
        Ok(m)
    }

    pub async fn reconcile(
        &self,
        id: &ResourceId,
        spec: &SystemdUnitSpec,
        inputs: &str,
        ctx: Ctx,
    ) -> Outcome {
        let r = self.converge(id, spec, inputs, ctx.interrupt).await;
        if let Err(f) = &r
            && matches!(
                f.reason,
                FailureReason::SystemdUnavailable | FailureReason::SystemdError
            )
        {
            // Reconnect next time: the bus or systemd may have restarted.
            self.forget_manager();
        }
        r.unwrap_or_else(Outcome::from)
    }

    async fn converge(
        &self,
        id: &ResourceId,
        spec: &SystemdUnitSpec,
        inputs: &str,
        interrupt: Interrupt,
    ) -> Result<Outcome, Failure> {
        let name = spec.unit.as_str().to_owned();
        let manager = self.manager().await?;
        let (entry, changed) = {
            let (id, spec, name) = (id.clone(), spec.clone(), name.clone());
            self.with_files(move |files| {
                let mut entry = files.ledger.units.get(&name).cloned().unwrap_or_default();
                entry.resource = Some(id);
                let changed = files.write_files(&name, &spec, &mut entry)?;
                files.ledger.units.insert(name, entry.clone());
                files.save()?;
                Ok((entry, changed))
            })
            .await?
        };

        let path = manager
            .load_unit(name.clone())
            .await
            .map_err(dbus("LoadUnit"))?;
        let unit = Self::unit_proxy(&manager, &path).await?;
        if changed || unit.need_daemon_reload().await.unwrap_or(false) {
            tracing::info!(unit = %name, "unit files changed; reloading systemd");
            manager.reload().await.map_err(dbus("Reload"))?;
        }
        match unit.load_state().await.map_err(dbus("LoadState"))?.as_str() {
            "loaded" => {}
            "not-found" => {
                return Ok(Outcome::failed(
                    FailureReason::UnitNotFound,
                    format!(
                        "systemd has no unit {name} (give `content` to have the agent write it)"
                    ),
                ));
            }
            other => {
                return Ok(Outcome::failed(
                    FailureReason::UnitInvalid,
                    format!("systemd could not load {name}: load state {other}"),
                ));
            }
        }
        if let Some(want) = spec.enabled {
            self.set_enabled(&manager, &name, want).await?;
        }

        let files = files_hash(spec);
        let active = unit.active_state().await.map_err(dbus("ActiveState"))?;
        let files_changed = entry
            .started_files
            .as_ref()
            .map_or(changed, |h| *h != files);
        let inputs_changed = entry.started_inputs.as_ref().is_some_and(|h| h != inputs);
        let action = plan_action(
            spec.state,
            &active,
            files_changed,
            inputs_changed,
            spec.on_trigger,
        );
        let mut job_result = None;
        if action != Action::None {
            tracing::info!(unit = %name, ?action, active = %active, "changing unit state");
            let result = self.run_job(&manager, &name, action, interrupt).await?;
            if result == JobResult::Interrupted {
                // The ledger still holds the old levels: the next reconcile
                // decides again from what systemd then says.
                return Ok(Outcome::Interrupted);
            }
            job_result = Some(result);
        }
        if spec.state == UnitState::Running && job_result.as_ref().is_none_or(JobResult::is_done) {
            let (name, inputs) = (name.clone(), inputs.to_owned());
            self.with_files(move |f| {
                let e = f.ledger.units.entry(name).or_default();
                if e.started_files.as_deref() != Some(&files)
                    || e.started_inputs.as_deref() != Some(&inputs)
                {
                    e.started_files = Some(files);
                    e.started_inputs = Some(inputs);
                    f.save()?;
                }
                Ok(())
            })
            .await?;
        }
        let observed = Self::observe(&manager, &unit, &path).await?;
        let outcome = assess(spec.state, &observed);
        let note = |r: &JobResult| match r {
            JobResult::StillRunning => {
                format!("{action:?} job still running after {:?}", self.job_timeout)
            }
            JobResult::Ended(r) => format!("{action:?} job ended {r}"),
            JobResult::Interrupted => format!("{action:?} job interrupted"),
        };
        Ok(match (job_result, outcome) {
            (Some(r), Outcome::Ready { .. }) if !r.is_done() => {
                Outcome::failed(FailureReason::JobFailed, format!("{}: {name}", note(&r)))
            }
            (Some(r), Outcome::Failed(f)) if !r.is_done() => Outcome::Failed(Failure {
                reason: f.reason,
                message: format!("{}; {}", note(&r), f.message),
            }),
            (_, o) => o,
        })
    }
}

impl UnitFiles {
    fn save(&self) -> Result<(), Failure> {
        self.state
            .save_units(&self.ledger)
            .map_err(|e| Failure::new(FailureReason::StateWriteFailed, e.to_string()))
    }

    /// Writes the unit file and drop-ins the spec gives; removes the agent's
    /// drop-ins it no longer gives. Returns whether anything changed.
    /// Ownership of a file about to be created is saved in the ledger first,
    /// so a crash cannot leave a unit file the agent would refuse as foreign.
    fn write_files(
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

impl UnitReconciler {
    async fn unit_proxy(
        manager: &ManagerProxy<'_>,
        path: &zbus::OwnedObjectPath,
    ) -> Result<UnitProxy<'static>, Failure> {
        UnitProxy::builder(manager.inner().connection())
            .path(path.clone())
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(dbus("unit proxy"))
    }

    async fn observe(
        manager: &ManagerProxy<'_>,
        unit: &UnitProxy<'_>,
        path: &zbus::OwnedObjectPath,
    ) -> Result<Observed, Failure> {
        let mut o = Observed {
            active_state: unit.active_state().await.map_err(dbus("ActiveState"))?,
            sub_state: unit.sub_state().await.map_err(dbus("SubState"))?,
            active_enter_usec: unit.active_enter_timestamp().await.unwrap_or(0),
            ..Observed::default()
        };
        // Service-only properties; other unit types simply lack them.
        if let Ok(service) = ServiceProxy::builder(manager.inner().connection())
            .path(path.clone())
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
        {
            o.n_restarts = service.n_restarts().await.unwrap_or(0);
            o.main_pid = service.main_pid().await.unwrap_or(0);
            o.result = service.result().await.unwrap_or_default();
            o.exit_status = service.exec_main_status().await.unwrap_or(0);
        }
        Ok(o)
    }

    async fn set_enabled(
        &self,
        manager: &ManagerProxy<'_>,
        name: &str,
        want: bool,
    ) -> Result<(), Failure> {
        let state = manager
            .get_unit_file_state(name.to_owned())
            .await
            .map_err(dbus("GetUnitFileState"))?;
        let enabled = matches!(state.as_str(), "enabled" | "enabled-runtime" | "alias");
        if want && !enabled && state != "static" {
            tracing::info!(unit = %name, "enabling");
            manager
                .enable_unit_files(vec![name.to_owned()], false, true)
                .await
                .map_err(dbus("EnableUnitFiles"))?;
            manager.reload().await.map_err(dbus("Reload"))?;
        } else if !want && enabled {
            tracing::info!(unit = %name, "disabling");
            manager
                .disable_unit_files(vec![name.to_owned()], false)
                .await
                .map_err(dbus("DisableUnitFiles"))?;
            manager.reload().await.map_err(dbus("Reload"))?;
        }
        Ok(())
    }

    /// Starts a job in mode "replace" and waits for its JobRemoved signal —
    /// at most the job timeout, and only until `interrupt` is raised.
    async fn run_job(
        &self,
        manager: &ManagerProxy<'_>,
        name: &str,
        action: Action,
        mut interrupt: Interrupt,
    ) -> Result<JobResult, Failure> {
        // Listen before starting, or a fast job's signal is missed.
        let mut removed = manager
            .receive_job_removed()
            .await
            .map_err(dbus("JobRemoved"))?;
        let (n, mode) = (name.to_owned(), "replace".to_owned());
        let job = match action {
            Action::Start => manager.start_unit(n, mode).await,
            Action::Stop => manager.stop_unit(n, mode).await,
            Action::Restart => manager.restart_unit(n, mode).await,
            Action::Reload => manager.reload_unit(n, mode).await,
            Action::None => return Ok(JobResult::Ended("done".into())),
        }
        .map_err(dbus("unit job"))?;
        let wait = async {
            while let Some(signal) = removed.next().await {
                if let Ok(args) = signal.args()
                    && args.job().as_str() == job.as_str()
                {
                    return Some(args.result().to_owned());
                }
            }
            None
        };
        let waited = tokio::select! {
            waited = tokio::time::timeout(self.job_timeout, wait) => waited,
            () = interrupt.requested() => return Ok(JobResult::Interrupted),
        };
        match waited {
            Ok(Some(result)) => Ok(JobResult::Ended(result)),
            Ok(None) => Err(Failure::new(
                FailureReason::SystemdUnavailable,
                "D-Bus connection closed while waiting for a job",
            )),
            // The job stays queued in systemd; the unit's state says the rest
            // (typically "activating"), and the next pass looks again.
            Err(_) => Ok(JobResult::StillRunning),
        }
    }

    /// Lets go of units no resource of `manifest` names: units whose file the
    /// agent wrote are stopped, disabled and deleted; others are left
    /// running. A unit whose resource is still listed but Unsupported is kept
    /// exactly as it is.
    pub async fn remove_unlisted(&self, manifest: &AgentManifest) -> Removals {
        let wanted: BTreeSet<String> = manifest
            .resources
            .iter()
            .filter_map(|r| match &r.spec {
                ResourceSpec::SystemdUnit(u) => Some(u.unit.as_str().to_owned()),
                _ => None,
            })
            .collect();
        let gone: Vec<(String, UnitEntry)> = self
            .files
            .lock()
            .expect("unit ledger lock")
            .ledger
            .units
            .iter()
            .filter(|(n, e)| {
                !wanted.contains(*n)
                    && e.resource
                        .as_ref()
                        .is_none_or(|id| manifest.resource(id).is_none())
            })
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        let mut out = Removals::default();
        for (name, entry) in gone {
            match self.let_go(&name, &entry).await {
                Ok(()) => {
                    let n = name.clone();
                    if let Err(f) = self
                        .with_files(move |f| {
                            f.ledger.units.remove(&n);
                            f.save()
                        })
                        .await
                    {
                        tracing::error!(message = %f.message, "cannot save the unit ledger");
                    }
                    if !entry.owns_file
                        && let Some(id) = entry.resource
                    {
                        out.released.push(ReleasedResource {
                            id,
                            target: name,
                            reason: "NotCreatedByAgent".into(),
                        });
                    }
                }
                Err(f) => {
                    tracing::warn!(unit = %name, reason = %f.reason, message = %f.message, "cannot remove unit; will retry");
                    if f.reason.is_unavailable() || f.reason == FailureReason::SystemdError {
                        self.forget_manager();
                    }
                    if let Some(id) = entry.resource {
                        out.failed.push((id, ResourceKind::SystemdUnit, f));
                    }
                }
            }
        }
        out
    }

    async fn let_go(&self, name: &str, entry: &UnitEntry) -> Result<(), Failure> {
        let manager = self.manager().await?;
        if entry.owns_file {
            tracing::info!(unit = %name, "removing a unit the agent created");
            let path = manager
                .load_unit(name.to_owned())
                .await
                .map_err(dbus("LoadUnit"))?;
            let unit = Self::unit_proxy(&manager, &path).await?;
            if is_up(&unit.active_state().await.map_err(dbus("ActiveState"))?) {
                match self
                    .run_job(&manager, name, Action::Stop, Interrupt::never())
                    .await?
                {
                    JobResult::Ended(r) if r == "done" => {}
                    other => {
                        return Err(Failure::new(
                            FailureReason::JobFailed,
                            format!("stop job for {name}: {other:?}"),
                        ));
                    }
                }
            }
            self.set_enabled(&manager, name, false).await?;
        } else {
            tracing::info!(unit = %name, "no longer managing a unit the agent did not create; leaving it as it is");
        }
        let (n, e) = (name.to_owned(), entry.clone());
        self.with_files(move |f| {
            if e.owns_file {
                remove_file(&f.unit_dir.join(&n))?;
            }
            let dir = f.unit_dir.join(format!("{n}.d"));
            for file in &e.drop_ins {
                remove_file(&dir.join(file))?;
            }
            let _ = std::fs::remove_dir(&dir);
            Ok(())
        })
        .await?;
        if entry.owns_file || !entry.drop_ins.is_empty() {
            manager.reload().await.map_err(dbus("Reload"))?;
        }
        Ok(())
    }
}

fn remove_file(path: &Path) -> Result<(), Failure> {
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

    #[test]
    fn actions_follow_the_wanted_state_and_the_levels() {
        use Action::*;
        use TriggerAction as T;
        use UnitState::*;
        assert_eq!(
            plan_action(Running, "inactive", false, false, T::Restart),
            Start
        );
        assert_eq!(
            plan_action(Running, "failed", true, true, T::Restart),
            Start
        );
        assert_eq!(
            plan_action(Running, "active", false, false, T::Restart),
            None
        );
        assert_eq!(
            plan_action(Running, "active", true, false, T::Reload),
            Restart
        );
        assert_eq!(
            plan_action(Running, "active", false, true, T::Restart),
            Restart
        );
        assert_eq!(
            plan_action(Running, "active", false, true, T::Reload),
            Reload
        );
        assert_eq!(plan_action(Stopped, "active", true, true, T::Restart), Stop);
        assert_eq!(
            plan_action(Stopped, "inactive", true, true, T::Restart),
            None
        );
        assert_eq!(
            plan_action(Stopped, "failed", false, false, T::Restart),
            None
        );
    }

    fn observed(active: &str, sub: &str) -> Observed {
        Observed {
            active_state: active.into(),
            sub_state: sub.into(),
            n_restarts: 2,
            main_pid: 42,
            result: "exit-code".into(),
            exit_status: 1,
            active_enter_usec: 1_700_000_000_000_000,
        }
    }

    #[test]
    fn assess_reports_ready_failed_and_activating() {
        match assess(UnitState::Running, &observed("active", "running")) {
            Outcome::Ready {
                details:
                    ReadyDetails::SystemdUnit {
                        n_restarts,
                        main_pid,
                        active_since,
                        ..
                    },
                ..
            } => {
                assert_eq!(n_restarts, 2);
                assert_eq!(main_pid, Some(42));
                assert_eq!(active_since.as_deref(), Some("2023-11-14T22:13:20Z"));
            }
            o => panic!("{o:?}"),
        }
        match assess(UnitState::Running, &observed("failed", "failed")) {
            Outcome::Failed(Failure { reason, message }) => {
                assert_eq!(reason, FailureReason::UnitFailed);
                assert!(message.contains("result exit-code"), "{message}");
                assert!(message.contains("exit status 1"), "{message}");
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            assess(UnitState::Running, &observed("activating", "auto-restart")),
            Outcome::Failed(Failure {
                reason: FailureReason::UnitActivating,
                ..
            })
        ));
        assert!(matches!(
            assess(UnitState::Stopped, &observed("inactive", "dead")),
            Outcome::Ready { .. }
        ));
        assert!(matches!(
            assess(UnitState::Stopped, &observed("active", "running")),
            Outcome::Failed(Failure {
                reason: FailureReason::UnitNotStopped,
                ..
            })
        ));
    }

    #[test]
    fn files_hash_covers_content_and_drop_ins() {
        let spec = |content: Option<&str>, drop: Option<&str>| SystemdUnitSpec {
            unit: manifest_types::spec::UnitName::new("a.service").unwrap(),
            content: content.map(Into::into),
            drop_ins: drop
                .map(|d| [("x.conf".to_owned(), d.to_owned())].into())
                .unwrap_or_default(),
            enabled: None,
            state: UnitState::Running,
            on_trigger: TriggerAction::Restart,
        };
        let a = files_hash(&spec(Some("1"), None));
        assert_ne!(a, files_hash(&spec(Some("2"), None)));
        assert_ne!(a, files_hash(&spec(Some("1"), Some("d"))));
        assert_eq!(a, files_hash(&spec(Some("1"), None)));
    }

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
