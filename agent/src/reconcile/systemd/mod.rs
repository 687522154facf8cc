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
//! The decisions ([`plan_action`], [`assess`]) are pure (`planning`); the
//! unit files and their ledger are `files`; this module drives systemd.

mod files;
mod planning;

pub use files::UnitFiles;
pub use planning::{Action, Levels, Observed, assess, files_hash, plan_action};

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use manifest_types::spec::UnitState;
use manifest_types::{
    AgentManifest, FailureReason, ReleaseReason, ReleasedResource, ResourceId, ResourceKind,
    ResourceSpec, SystemdUnitSpec,
};
use zbus_systemd::systemd1::{ManagerProxy, ServiceProxy, TimerProxy, UnitProxy};

use super::{Ctx, Failure, Interrupt, Outcome, Removals};
use crate::state::{StateDir, UnitEntry};
use files::remove_file;
use planning::is_up;

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

/// A job systemd has accepted, and the signal stream its end arrives on.
struct QueuedJob {
    removed: zbus_systemd::systemd1::JobRemovedStream,
    job: Option<zbus::OwnedObjectPath>,
}

impl JobResult {
    fn is_done(&self) -> bool {
        matches!(self, Self::Ended(r) if r == "done")
    }
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
    /// Units this connection holds a reference on (`RefUnit`), so systemd
    /// keeps an inactive oneshot loaded — and its last run's result and
    /// times with it — instead of collecting it the moment it finishes.
    referenced: Mutex<BTreeSet<String>>,
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
            referenced: Mutex::default(),
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
        // References end with the connection that held them.
        self.referenced.lock().expect("refs lock").clear();
    }

    /// Holds a reference on `name` for as long as this connection lives
    /// (once per connection: systemd counts every `RefUnit`).
    async fn keep_loaded(&self, manager: &ManagerProxy<'_>, name: &str) -> Result<(), Failure> {
        if self.referenced.lock().expect("refs lock").contains(name) {
            return Ok(());
        }
        manager
            .ref_unit(name.to_owned())
            .await
            .map_err(dbus("RefUnit"))?;
        self.referenced
            .lock()
            .expect("refs lock")
            .insert(name.to_owned());
        Ok(())
    }

    /// Drops the reference [`Self::keep_loaded`] took, if any.
    async fn let_unload(&self, manager: &ManagerProxy<'_>, name: &str) -> Result<(), Failure> {
        if !self.referenced.lock().expect("refs lock").remove(name) {
            return Ok(());
        }
        manager
            .unref_unit(name.to_owned())
            .await
            .map_err(dbus("UnrefUnit"))
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

    /// Whether systemd answers over D-Bus now: its version, or why not.
    pub async fn probe(&self) -> Result<String, Failure> {
        let manager = self.manager().await?;
        // A method call, so the bus is really asked (the proxy caches
        // properties such as Version, which systemd declares constant).
        let answered = manager.get_default_target().await;
        match answered {
            Ok(_) => Ok(manager.version().await.unwrap_or_else(|_| "unknown".into())),
            Err(e) => {
                self.forget_manager();
                Err(Failure::new(
                    FailureReason::SystemdUnavailable,
                    format!("systemd does not answer over D-Bus: {e}"),
                ))
            }
        }
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

        if matches!(spec.state, UnitState::Triggered | UnitState::Completed) {
            self.keep_loaded(&manager, &name).await?;
        } else {
            self.let_unload(&manager, &name).await?;
        }
        let files = files_hash(spec);
        let observed = Self::observe(&manager, &unit, &path, &name, spec.state).await?;
        let levels = match spec.state {
            // A run is owed for every new version of the unit and its inputs.
            UnitState::Completed => Levels {
                files_changed: entry.started_files.as_ref() != Some(&files),
                inputs_changed: entry.started_inputs.as_deref() != Some(inputs),
            },
            _ => Levels {
                files_changed: entry
                    .started_files
                    .as_ref()
                    .map_or(changed, |h| *h != files),
                inputs_changed: entry.started_inputs.as_ref().is_some_and(|h| h != inputs),
            },
        };
        let action = plan_action(spec.state, &observed, levels, spec.on_trigger);
        let mut run_job = entry.run_job.clone();
        let mut job_result = None;
        if action != Action::None {
            tracing::info!(unit = %name, ?action, active = %observed.active_state, "changing unit state");
            let job = self.queue_job(&manager, &name, action).await?;
            if spec.state == UnitState::Completed {
                // Recorded once systemd has the job: a crash from here on
                // never runs it twice for the same levels.
                run_job = None;
                self.record_levels(&name, &files, inputs, None).await?;
            }
            let result = self.await_job(job, interrupt).await?;
            if result == JobResult::Interrupted {
                // The ledger still holds the old levels (or, for a queued
                // run, the new ones): the next reconcile decides again from
                // what systemd then says.
                return Ok(Outcome::Interrupted);
            }
            if spec.state == UnitState::Completed
                && let JobResult::Ended(r) = &result
            {
                run_job = Some(r.clone());
                self.record_levels(&name, &files, inputs, Some(r.clone()))
                    .await?;
            }
            job_result = Some(result);
        }
        if spec.state == UnitState::Running && job_result.as_ref().is_none_or(JobResult::is_done) {
            self.record_levels(&name, &files, inputs, None).await?;
        }
        let observed = if action == Action::None {
            observed
        } else {
            Self::observe(&manager, &unit, &path, &name, spec.state).await?
        };
        let outcome = assess(spec.state, &observed, run_job.as_deref());
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

    /// Saves the levels the unit was (re)started or run with; `run_job` is
    /// the `completed` run's job result, when known.
    async fn record_levels(
        &self,
        name: &str,
        files: &str,
        inputs: &str,
        run_job: Option<String>,
    ) -> Result<(), Failure> {
        let (name, files, inputs) = (name.to_owned(), files.to_owned(), inputs.to_owned());
        self.with_files(move |f| {
            let e = f.ledger.units.entry(name).or_default();
            if e.started_files.as_deref() != Some(&files)
                || e.started_inputs.as_deref() != Some(&inputs)
                || e.run_job != run_job
            {
                e.started_files = Some(files);
                e.started_inputs = Some(inputs);
                e.run_job = run_job;
                f.save()?;
            }
            Ok(())
        })
        .await
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
        name: &str,
        want: UnitState,
    ) -> Result<Observed, Failure> {
        let mut o = Observed {
            active_state: unit.active_state().await.map_err(dbus("ActiveState"))?,
            sub_state: unit.sub_state().await.map_err(dbus("SubState"))?,
            active_enter_usec: unit.active_enter_timestamp().await.unwrap_or(0),
            ..Observed::default()
        };
        let conn = manager.inner().connection();
        if name.ends_with(".service") {
            let service = ServiceProxy::builder(conn)
                .path(path.clone())
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await
                .map_err(dbus("service proxy"))?;
            o.n_restarts = service.n_restarts().await.unwrap_or(0);
            o.main_pid = service.main_pid().await.unwrap_or(0);
            o.result = service.result().await.unwrap_or_default();
            o.exit_status = service.exec_main_status().await.unwrap_or(0);
            o.exec_start_usec = service.exec_main_start_timestamp().await.unwrap_or(0);
            o.exec_exit_usec = service.exec_main_exit_timestamp().await.unwrap_or(0);
            if want == UnitState::Running {
                o.never_stays_active = service.type_property().await.unwrap_or_default()
                    == "oneshot"
                    && !service.remain_after_exit().await.unwrap_or(true);
            }
        } else if name.ends_with(".timer") {
            let timer = TimerProxy::builder(conn)
                .path(path.clone())
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await
                .map_err(dbus("timer proxy"))?;
            o.result = timer.result().await.unwrap_or_default();
            o.last_trigger_usec = timer.last_trigger_u_sec().await.unwrap_or(0);
            o.next_elapse_usec = timer.next_elapse_u_sec_realtime().await.unwrap_or(0);
        }
        if want == UnitState::Stopped {
            for trigger in unit.triggered_by().await.map_err(dbus("TriggeredBy"))? {
                let Ok(p) = manager.get_unit(trigger.clone()).await else {
                    continue; // not loaded: not active either
                };
                let t = Self::unit_proxy(manager, &p).await?;
                if is_up(&t.active_state().await.map_err(dbus("ActiveState"))?) {
                    o.active_triggers.push(trigger);
                }
            }
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

    /// Queues a job in mode "replace", listening for its JobRemoved signal
    /// before systemd has it (or a fast job's signal is missed).
    async fn queue_job(
        &self,
        manager: &ManagerProxy<'_>,
        name: &str,
        action: Action,
    ) -> Result<QueuedJob, Failure> {
        let removed = manager
            .receive_job_removed()
            .await
            .map_err(dbus("JobRemoved"))?;
        let (n, mode) = (name.to_owned(), "replace".to_owned());
        let job = match action {
            Action::Start => manager.start_unit(n, mode).await,
            Action::Stop => manager.stop_unit(n, mode).await,
            Action::Restart => manager.restart_unit(n, mode).await,
            Action::Reload => manager.reload_unit(n, mode).await,
            Action::None => return Ok(QueuedJob { removed, job: None }),
        }
        .map_err(dbus("unit job"))?;
        Ok(QueuedJob {
            removed,
            job: Some(job),
        })
    }

    /// Waits for a queued job's JobRemoved signal — at most the job timeout,
    /// and only until `interrupt` is raised.
    async fn await_job(
        &self,
        queued: QueuedJob,
        mut interrupt: Interrupt,
    ) -> Result<JobResult, Failure> {
        let QueuedJob { mut removed, job } = queued;
        let Some(job) = job else {
            return Ok(JobResult::Ended("done".into()));
        };
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

    async fn run_job(
        &self,
        manager: &ManagerProxy<'_>,
        name: &str,
        action: Action,
        interrupt: Interrupt,
    ) -> Result<JobResult, Failure> {
        let queued = self.queue_job(manager, name, action).await?;
        self.await_job(queued, interrupt).await
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
                            reason: ReleaseReason::NotCreatedByAgent,
                            message: Some(
                                "the agent did not create this unit; it keeps running as it was"
                                    .into(),
                            ),
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
        self.let_unload(&manager, name).await?;
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
