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
    ResourceSpec, SystemdUnitSpec, UnitRun,
};
use zbus_systemd::systemd1::{ManagerProxy, ServiceProxy, TimerProxy, UnitProxy};

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

/// A job (or a run its trigger started) is under way.
fn in_transition(active_state: &str) -> bool {
    matches!(active_state, "activating" | "deactivating" | "reloading")
}

/// Where the unit's files and `restartOn` inputs stand against the levels
/// it was last (re)started — for `completed`, last run — with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Levels {
    pub files_changed: bool,
    pub inputs_changed: bool,
}

/// What to do to the unit's run state. Only `running`, `stopped` and a run
/// owed to `completed` ever start or stop anything; `triggered` never does.
pub fn plan_action(
    want: UnitState,
    o: &Observed,
    levels: Levels,
    on_trigger: TriggerAction,
) -> Action {
    let active = o.active_state.as_str();
    match want {
        // Starting it would only run it once more: refused in `assess`.
        UnitState::Running if o.never_stays_active => Action::None,
        UnitState::Running if !is_up(active) => Action::Start,
        UnitState::Running if levels.files_changed => Action::Restart,
        UnitState::Running if levels.inputs_changed => match on_trigger {
            TriggerAction::Restart => Action::Restart,
            TriggerAction::Reload => Action::Reload,
        },
        UnitState::Running => Action::None,
        // A run its active trigger started is not the agent's to stop.
        UnitState::Stopped if !o.active_triggers.is_empty() => Action::None,
        UnitState::Stopped if is_up(active) => Action::Stop,
        UnitState::Stopped => Action::None,
        UnitState::Triggered => Action::None,
        // A run in progress (the agent's or a trigger's) is waited for.
        UnitState::Completed if in_transition(active) => Action::None,
        UnitState::Completed if levels.files_changed || levels.inputs_changed => {
            if active == "active" {
                Action::Restart
            } else {
                Action::Start
            }
        }
        UnitState::Completed => Action::None,
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
    /// A oneshot service without `RemainAfterExit=yes`: never stays active.
    pub never_stays_active: bool,
    /// Active units (timers, paths, sockets) that trigger this one; read
    /// only when the unit is wanted stopped.
    pub active_triggers: Vec<String>,
    /// The main process's last start and exit (µs since the epoch; 0: none).
    pub exec_start_usec: u64,
    pub exec_exit_usec: u64,
    /// Timers only (µs since the epoch; 0: none or not on the calendar).
    pub last_trigger_usec: u64,
    pub next_elapse_usec: u64,
}

/// A systemd timestamp as RFC 3339; `None` for 0 ("never") and for
/// `USEC_INFINITY` or anything past year 9999 ("not scheduled").
fn rfc3339(usec: u64) -> Option<String> {
    const YEAR_10000_USEC: u64 = 253_402_300_800_000_000;
    (usec > 0 && usec < YEAR_10000_USEC).then(|| {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_micros(usec)).to_string()
    })
}

/// Judges the unit against the wanted state. `run_job`: for `completed`,
/// how the start job of the current run ended, if the agent saw it end.
pub fn assess(want: UnitState, o: &Observed, run_job: Option<&str>) -> Outcome {
    let with_run = matches!(want, UnitState::Triggered | UnitState::Completed);
    let ready = || {
        Outcome::ready(ReadyDetails::SystemdUnit {
            active_state: o.active_state.clone(),
            sub_state: o.sub_state.clone(),
            n_restarts: o.n_restarts,
            main_pid: (o.main_pid > 0).then_some(o.main_pid),
            active_since: rfc3339(o.active_enter_usec),
            last_run: (with_run && o.exec_start_usec > 0).then(|| UnitRun {
                result: o.result.clone(),
                exit_status: o.exit_status,
                started_at: rfc3339(o.exec_start_usec),
                ended_at: rfc3339(o.exec_exit_usec),
            }),
            last_trigger: rfc3339(o.last_trigger_usec),
            next_elapse: rfc3339(o.next_elapse_usec),
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
        if let Some(t) = rfc3339(o.exec_exit_usec).filter(|_| with_run) {
            m.push_str(&format!(", last run ended {t}"));
        }
        m
    };
    let active = o.active_state.as_str();
    match want {
        UnitState::Running if o.never_stays_active => Outcome::failed(
            FailureReason::UnitNeverStaysActive,
            "a oneshot service without RemainAfterExit=yes never stays active, so the agent \
             does not start it: use state `triggered` (a timer or another unit runs it) or \
             `completed` (run once per change)",
        ),
        UnitState::Running => match active {
            "active" | "reloading" => ready(),
            "failed" => Outcome::failed(FailureReason::UnitFailed, why()),
            "activating" => Outcome::failed(FailureReason::UnitActivating, why()),
            _ => Outcome::failed(FailureReason::UnitNotRunning, why()),
        },
        UnitState::Stopped if !o.active_triggers.is_empty() => Outcome::failed(
            FailureReason::UnitTriggered,
            format!(
                "{}; it is triggered by {}, which is active, and the agent does not stop what a \
                 trigger starts: use state `triggered`, or stop the trigger",
                why(),
                o.active_triggers.join(", ")
            ),
        ),
        UnitState::Stopped => match active {
            "inactive" | "failed" => ready(),
            _ => Outcome::failed(FailureReason::UnitNotStopped, why()),
        },
        UnitState::Triggered => match active {
            "failed" => Outcome::failed(FailureReason::UnitLastRunFailed, why()),
            _ => ready(),
        },
        UnitState::Completed => match (active, run_job) {
            ("activating" | "deactivating" | "reloading", _) => Outcome::Waiting {
                message: format!("the run is in progress ({})", o.sub_state),
                recheck_after: Duration::from_secs(2),
            },
            ("failed", _) => Outcome::failed(FailureReason::UnitRunFailed, why()),
            (_, Some(job)) if job != "done" => Outcome::failed(
                FailureReason::UnitRunFailed,
                format!("the run's start job ended {job}; {}", why()),
            ),
            _ => ready(),
        },
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

    fn unit(active: &str) -> Observed {
        Observed {
            active_state: active.into(),
            ..Observed::default()
        }
    }

    const SAME: Levels = Levels {
        files_changed: false,
        inputs_changed: false,
    };
    const FILES: Levels = Levels {
        files_changed: true,
        inputs_changed: false,
    };
    const INPUTS: Levels = Levels {
        files_changed: false,
        inputs_changed: true,
    };

    #[test]
    fn actions_follow_the_wanted_state_and_the_levels() {
        use Action::*;
        use TriggerAction as T;
        use UnitState::*;
        let plan = |want, o: &Observed, l, t| plan_action(want, o, l, t);
        assert_eq!(plan(Running, &unit("inactive"), SAME, T::Restart), Start);
        assert_eq!(plan(Running, &unit("failed"), FILES, T::Restart), Start);
        assert_eq!(plan(Running, &unit("active"), SAME, T::Restart), None);
        assert_eq!(plan(Running, &unit("active"), FILES, T::Reload), Restart);
        assert_eq!(plan(Running, &unit("active"), INPUTS, T::Restart), Restart);
        assert_eq!(plan(Running, &unit("active"), INPUTS, T::Reload), Reload);
        assert_eq!(plan(Stopped, &unit("active"), FILES, T::Restart), Stop);
        assert_eq!(plan(Stopped, &unit("inactive"), FILES, T::Restart), None);
        assert_eq!(plan(Stopped, &unit("failed"), SAME, T::Restart), None);
    }

    #[test]
    fn a_oneshot_that_never_stays_active_is_never_started_for_running() {
        let o = Observed {
            never_stays_active: true,
            ..unit("inactive")
        };
        for levels in [SAME, FILES, INPUTS] {
            assert_eq!(
                plan_action(UnitState::Running, &o, levels, TriggerAction::Restart),
                Action::None
            );
        }
        assert!(matches!(
            assess(UnitState::Running, &o, None),
            Outcome::Failed(Failure {
                reason: FailureReason::UnitNeverStaysActive,
                ..
            })
        ));
    }

    #[test]
    fn triggered_units_are_never_started_or_stopped() {
        for active in ["inactive", "failed", "activating", "active", "deactivating"] {
            for levels in [SAME, FILES, INPUTS] {
                assert_eq!(
                    plan_action(
                        UnitState::Triggered,
                        &unit(active),
                        levels,
                        TriggerAction::Restart
                    ),
                    Action::None,
                    "{active} {levels:?}"
                );
            }
        }
        // A run in progress or a good last run is Ready, with the run.
        let ran = Observed {
            result: "success".into(),
            exec_start_usec: 1_700_000_000_000_000,
            exec_exit_usec: 1_700_000_020_000_000,
            ..unit("inactive")
        };
        match assess(UnitState::Triggered, &ran, None) {
            Outcome::Ready {
                details: ReadyDetails::SystemdUnit { last_run, .. },
                ..
            } => {
                let run = last_run.expect("the last run");
                assert_eq!(run.result, "success");
                assert_eq!(run.started_at.as_deref(), Some("2023-11-14T22:13:20Z"));
                assert_eq!(run.ended_at.as_deref(), Some("2023-11-14T22:13:40Z"));
            }
            o => panic!("{o:?}"),
        }
        let unscheduled = Observed {
            next_elapse_usec: u64::MAX,
            last_trigger_usec: 1_700_000_000_000_000,
            ..unit("active")
        };
        match assess(UnitState::Running, &unscheduled, None) {
            Outcome::Ready {
                details:
                    ReadyDetails::SystemdUnit {
                        next_elapse,
                        last_trigger,
                        ..
                    },
                ..
            } => {
                assert_eq!(next_elapse, Option::None, "USEC_INFINITY: not scheduled");
                assert_eq!(last_trigger.as_deref(), Some("2023-11-14T22:13:20Z"));
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            assess(UnitState::Triggered, &unit("activating"), None),
            Outcome::Ready { .. }
        ));
        // A failed last run is reported, not repaired.
        let failed = Observed {
            result: "exit-code".into(),
            exit_status: 3,
            ..unit("failed")
        };
        match assess(UnitState::Triggered, &failed, None) {
            Outcome::Failed(Failure { reason, message }) => {
                assert_eq!(reason, FailureReason::UnitLastRunFailed);
                assert!(message.contains("exit status 3"), "{message}");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn stopped_never_stops_what_an_active_trigger_starts() {
        let o = Observed {
            active_triggers: vec!["job.timer".into()],
            ..unit("activating")
        };
        assert_eq!(
            plan_action(UnitState::Stopped, &o, SAME, TriggerAction::Restart),
            Action::None
        );
        match assess(UnitState::Stopped, &o, None) {
            Outcome::Failed(Failure { reason, message }) => {
                assert_eq!(reason, FailureReason::UnitTriggered);
                assert!(message.contains("job.timer"), "{message}");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn completed_runs_once_per_change_and_waits_for_a_run_in_progress() {
        let plan =
            |o: &Observed, l| plan_action(UnitState::Completed, o, l, TriggerAction::Restart);
        assert_eq!(plan(&unit("inactive"), FILES), Action::Start);
        assert_eq!(plan(&unit("failed"), INPUTS), Action::Start);
        assert_eq!(
            plan(&unit("active"), FILES),
            Action::Restart,
            "RemainAfterExit=yes"
        );
        assert_eq!(plan(&unit("activating"), FILES), Action::None);
        assert_eq!(plan(&unit("inactive"), SAME), Action::None);
        assert_eq!(
            plan(&unit("failed"), SAME),
            Action::None,
            "a failed run is not repeated"
        );

        assert!(matches!(
            assess(UnitState::Completed, &unit("activating"), None),
            Outcome::Waiting { .. }
        ));
        assert!(matches!(
            assess(UnitState::Completed, &unit("inactive"), Some("done")),
            Outcome::Ready { .. }
        ));
        for (o, job) in [
            (unit("failed"), None),
            (unit("inactive"), Some("dependency")),
        ] {
            assert!(matches!(
                assess(UnitState::Completed, &o, job),
                Outcome::Failed(Failure {
                    reason: FailureReason::UnitRunFailed,
                    ..
                })
            ));
        }
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
            ..Observed::default()
        }
    }

    #[test]
    fn assess_reports_ready_failed_and_activating() {
        match assess(UnitState::Running, &observed("active", "running"), None) {
            Outcome::Ready {
                details:
                    ReadyDetails::SystemdUnit {
                        n_restarts,
                        main_pid,
                        active_since,
                        last_run,
                        ..
                    },
                ..
            } => {
                assert_eq!(n_restarts, 2);
                assert_eq!(main_pid, Some(42));
                assert_eq!(active_since.as_deref(), Some("2023-11-14T22:13:20Z"));
                assert_eq!(last_run, Option::None);
            }
            o => panic!("{o:?}"),
        }
        match assess(UnitState::Running, &observed("failed", "failed"), None) {
            Outcome::Failed(Failure { reason, message }) => {
                assert_eq!(reason, FailureReason::UnitFailed);
                assert!(message.contains("result exit-code"), "{message}");
                assert!(message.contains("exit status 1"), "{message}");
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            assess(
                UnitState::Running,
                &observed("activating", "auto-restart"),
                None
            ),
            Outcome::Failed(Failure {
                reason: FailureReason::UnitActivating,
                ..
            })
        ));
        assert!(matches!(
            assess(UnitState::Stopped, &observed("inactive", "dead"), None),
            Outcome::Ready { .. }
        ));
        assert!(matches!(
            assess(UnitState::Stopped, &observed("active", "running"), None),
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
