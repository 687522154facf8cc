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
//! unit files and their ledger are `files`; systemd is reached through the
//! [`UnitManager`] seam (`manager`), whose real implementation is
//! [`DbusUnits`] (`dbus`); this module drives the three.

mod dbus;
#[cfg(test)]
mod fake;
mod files;
mod manager;
mod planning;

pub use dbus::DbusUnits;
pub use files::UnitFiles;
pub use manager::{JobEnd, JobResult, LoadState, UnitManager};
pub use planning::{Action, ActiveState, Levels, Observed, assess, files_hash, plan_action};

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use manifest_types::spec::UnitState;
use manifest_types::{
    AgentManifest, FailureReason, ReleaseReason, ReleasedResource, ResourceId, ResourceKind,
    ResourceSpec, SystemdUnitSpec,
};

use super::{Ctx, Failure, Interrupt, Outcome, Removals};
use crate::state::{StateDir, UnitEntry};
use files::remove_file;

pub const DEFAULT_UNIT_DIR: &str = "/etc/systemd/system";

/// Shared by concurrent reconciles: the ledger sits behind a lock taken only
/// for file work, and systemd's job waits run outside it, so one unit's slow
/// job never holds up another unit.
#[derive(Debug)]
pub struct UnitReconciler<M = DbusUnits> {
    files: Arc<Mutex<UnitFiles>>,
    units: M,
    job_timeout: Duration,
}

impl UnitReconciler<DbusUnits> {
    /// Over D-Bus: `bus` is its address, None the system bus.
    pub fn new(
        state: StateDir,
        unit_dir: PathBuf,
        bus: Option<String>,
        job_timeout: Duration,
    ) -> Result<Self, crate::state::StateError> {
        Self::with_manager(state, unit_dir, DbusUnits::new(bus), job_timeout)
    }
}

impl<M: UnitManager> UnitReconciler<M> {
    pub fn with_manager(
        state: StateDir,
        unit_dir: PathBuf,
        units: M,
        job_timeout: Duration,
    ) -> Result<Self, crate::state::StateError> {
        Ok(Self {
            files: Arc::new(Mutex::new(UnitFiles {
                ledger: state.load_units()?,
                state,
                unit_dir,
            })),
            units,
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

    /// Whether systemd answers now: its version, or why not.
    pub async fn probe(&self) -> Result<String, Failure> {
        self.units.probe().await
    }

    pub async fn reconcile(
        &self,
        id: &ResourceId,
        spec: &SystemdUnitSpec,
        inputs: &str,
        ctx: Ctx,
    ) -> Outcome {
        self.converge(id, spec, inputs, ctx.interrupt)
            .await
            .unwrap_or_else(Outcome::from)
    }

    async fn converge(
        &self,
        id: &ResourceId,
        spec: &SystemdUnitSpec,
        inputs: &str,
        interrupt: Interrupt,
    ) -> Result<Outcome, Failure> {
        let name = spec.unit.as_str().to_owned();
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
        crate::fault::exit_at("unit-files-written");

        let loaded = self.units.load(&name, changed).await?;
        if changed {
            crate::fault::exit_at("unit-reloaded");
        }
        match loaded {
            LoadState::Loaded => {}
            LoadState::NotFound => {
                return Ok(Outcome::failed(
                    FailureReason::UnitNotFound,
                    format!(
                        "systemd has no unit {name} (give `content` to have the agent write it)"
                    ),
                ));
            }
            LoadState::Other(other) => {
                return Ok(Outcome::failed(
                    FailureReason::UnitInvalid,
                    format!("systemd could not load {name}: load state {other}"),
                ));
            }
        }
        if let Some(want) = spec.enabled {
            self.set_enabled(&name, want).await?;
        }

        if matches!(spec.state, UnitState::Triggered | UnitState::Completed) {
            self.units.keep_loaded(&name).await?;
        } else {
            self.units.let_unload(&name).await?;
        }
        let files = files_hash(spec);
        let observed = self.units.observe(&name, spec.state).await?;
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
            let job = self.units.queue(&name, action).await?;
            if spec.state == UnitState::Completed {
                // Recorded once systemd has the job: a crash from here on
                // never runs it twice for the same levels.
                run_job = None;
                self.record_levels(&name, &files, inputs, None).await?;
            }
            let result = self.units.wait(job, self.job_timeout, interrupt).await?;
            if result == JobResult::Interrupted {
                // The ledger still holds the old levels (or, for a queued
                // run, the new ones): the next reconcile decides again from
                // what systemd then says.
                return Ok(Outcome::Interrupted);
            }
            if spec.state == UnitState::Completed
                && let JobResult::Ended(end) = &result
            {
                run_job = Some(end.as_str().to_owned());
                self.record_levels(&name, &files, inputs, run_job.clone())
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
            self.units.observe(&name, spec.state).await?
        };
        let outcome = assess(spec.state, &observed, run_job.as_deref());
        let note = |r: &JobResult| match r {
            JobResult::StillRunning => {
                format!("{action:?} job still running after {:?}", self.job_timeout)
            }
            JobResult::Ended(end) => format!("{action:?} job ended {}", end.as_str()),
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

    /// Enables or disables `name` when its unit file state differs (`static`
    /// units are left alone), then reloads systemd.
    async fn set_enabled(&self, name: &str, want: bool) -> Result<(), Failure> {
        let state = self.units.unit_file_state(name).await?;
        let enabled = matches!(state.as_str(), "enabled" | "enabled-runtime" | "alias");
        if want && !enabled && state != "static" {
            tracing::info!(unit = %name, "enabling");
            self.units.enable(name).await?;
            self.units.reload().await?;
        } else if !want && enabled {
            tracing::info!(unit = %name, "disabling");
            self.units.disable(name).await?;
            self.units.reload().await?;
        }
        Ok(())
    }

    async fn run_job(&self, name: &str, action: Action) -> Result<JobResult, Failure> {
        let job = self.units.queue(name, action).await?;
        self.units
            .wait(job, self.job_timeout, Interrupt::never())
            .await
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
                    if let Some(id) = entry.resource {
                        out.failed.push((id, ResourceKind::SystemdUnit, f));
                    }
                }
            }
        }
        out
    }

    async fn let_go(&self, name: &str, entry: &UnitEntry) -> Result<(), Failure> {
        self.units.let_unload(name).await?;
        if entry.owns_file {
            tracing::info!(unit = %name, "removing a unit the agent created");
            self.units.load(name, false).await?;
            let observed = self.units.observe(name, UnitState::Running).await?;
            if observed.active_state.is_up() {
                match self.run_job(name, Action::Stop).await? {
                    r if r.is_done() => {}
                    other => {
                        return Err(Failure::new(
                            FailureReason::JobFailed,
                            format!("stop job for {name}: {other:?}"),
                        ));
                    }
                }
            }
            self.set_enabled(name, false).await?;
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
            self.units.reload().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The reconciler against the scripted fake, with paused time: failure
    //! paths a real systemd reaches only slowly or not on cue.

    use super::fake::{FakeUnits, Script, Units};
    use super::*;
    use manifest_types::spec::{TriggerAction, UnitName};

    const JOB_TIMEOUT: Duration = Duration::from_secs(90);

    struct Rig {
        r: UnitReconciler<FakeUnits>,
        units_dir: PathBuf,
        _dir: tempfile::TempDir,
    }

    fn rig(f: impl FnOnce(&mut Units)) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("state")).unwrap();
        let units_dir = dir.path().join("units");
        std::fs::create_dir_all(&units_dir).unwrap();
        let r =
            UnitReconciler::with_manager(state, units_dir.clone(), FakeUnits::with(f), JOB_TIMEOUT)
                .unwrap();
        Rig {
            r,
            units_dir,
            _dir: dir,
        }
    }

    fn unit(active: &str, sub: &str) -> Observed {
        Observed {
            active_state: ActiveState::parse(active),
            sub_state: sub.into(),
            ..Observed::default()
        }
    }

    fn spec(name: &str, state: UnitState) -> SystemdUnitSpec {
        SystemdUnitSpec {
            unit: UnitName::new(name).unwrap(),
            content: Some("[Service]\nExecStart=/bin/true\n".into()),
            drop_ins: Default::default(),
            enabled: None,
            state,
            on_trigger: TriggerAction::Restart,
        }
    }

    fn id() -> ResourceId {
        "d/u".parse().unwrap()
    }

    fn failure(o: &Outcome) -> (FailureReason, String) {
        match o {
            Outcome::Failed(f) => (f.reason, f.message.clone()),
            other => panic!("not Failed: {other:?}"),
        }
    }

    /// `app.service`, inactive, whose start job never ends (it stays activating).
    fn stuck_starting(u: &mut Units) {
        u.units
            .insert("app.service".into(), unit("inactive", "dead"));
        u.scripts.insert(
            ("app.service".into(), Action::Start),
            Script {
                end: None,
                active_state: "activating",
                sub_state: "start",
            },
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_job_that_never_ends_is_reported_activating_after_the_job_timeout() {
        let rig = rig(stuck_starting);
        let t0 = tokio::time::Instant::now();
        let o = rig
            .r
            .converge(
                &id(),
                &spec("app.service", UnitState::Running),
                "",
                Interrupt::never(),
            )
            .await
            .unwrap();
        assert!(t0.elapsed() >= JOB_TIMEOUT, "waited the job timeout");
        let (reason, message) = failure(&o);
        assert_eq!(reason, FailureReason::UnitActivating);
        assert!(
            message.contains("Start job still running after 90s"),
            "{message}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_newer_manifest_interrupts_the_wait_for_a_job() {
        let rig = rig(stuck_starting);
        let (raise, interrupt) = Interrupt::new();
        let spec = spec("app.service", UnitState::Running);
        let id = id();
        let converge = rig.r.converge(&id, &spec, "", interrupt);
        let raise_later = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            raise.send_replace(true);
            std::future::pending::<()>().await
        };
        let o = tokio::select! {
            o = converge => o.unwrap(),
            () = raise_later => unreachable!(),
        };
        assert_eq!(o, Outcome::Interrupted);
    }

    #[tokio::test]
    async fn a_stop_job_that_fails_keeps_the_unit_owed_for_removal() {
        let rig = rig(|u| {
            u.units
                .insert("app.service".into(), unit("inactive", "dead"));
        });
        let o = rig
            .r
            .converge(
                &id(),
                &spec("app.service", UnitState::Running),
                "",
                Interrupt::never(),
            )
            .await
            .unwrap();
        assert!(matches!(o, Outcome::Ready { .. }), "{o:?}");
        rig.r.units.lock().scripts.insert(
            ("app.service".into(), Action::Stop),
            Script {
                end: Some(JobEnd::Failed),
                active_state: "failed",
                sub_state: "failed",
            },
        );
        let empty = AgentManifest::empty("a".parse().unwrap(), 2);
        let out = rig.r.remove_unlisted(&empty).await;
        assert_eq!(out.failed.len(), 1, "{out:?}");
        let (failed_id, kind, f) = &out.failed[0];
        assert_eq!((failed_id, *kind), (&id(), ResourceKind::SystemdUnit));
        assert_eq!(f.reason, FailureReason::JobFailed);
        assert!(
            rig.units_dir.join("app.service").exists(),
            "nothing deleted while the unit may still run"
        );

        // The next sweep: the stop goes through, the unit is gone.
        rig.r.units.lock().scripts.clear();
        rig.r
            .units
            .lock()
            .units
            .get_mut("app.service")
            .unwrap()
            .active_state = ActiveState::Active;
        let out = rig.r.remove_unlisted(&empty).await;
        assert!(out.failed.is_empty() && out.released.is_empty(), "{out:?}");
        assert!(!rig.units_dir.join("app.service").exists());
        let calls = rig.r.units.lock().calls.clone();
        assert_eq!(
            calls,
            vec!["Start app.service", "Stop app.service", "Stop app.service"]
        );
    }

    #[tokio::test]
    async fn systemd_going_away_is_unavailable_and_its_return_converges() {
        let rig = rig(|u| {
            u.down = true;
            u.units
                .insert("app.service".into(), unit("inactive", "dead"));
        });
        let spec = spec("app.service", UnitState::Running);
        let err = rig
            .r
            .converge(&id(), &spec, "", Interrupt::never())
            .await
            .unwrap_err();
        assert_eq!(err.reason, FailureReason::SystemdUnavailable);
        assert!(rig.r.probe().await.is_err());

        rig.r.units.lock().down = false;
        assert!(rig.r.probe().await.is_ok());
        let o = rig
            .r
            .converge(&id(), &spec, "", Interrupt::never())
            .await
            .unwrap();
        assert!(matches!(o, Outcome::Ready { .. }), "{o:?}");
    }

    #[tokio::test]
    async fn a_triggered_unit_is_never_started_stopped_or_repaired() {
        let rig = rig(|u| {
            u.units.insert(
                "job.service".into(),
                Observed {
                    result: "exit-code".into(),
                    exit_status: 2,
                    ..unit("failed", "failed")
                },
            );
        });
        let spec = spec("job.service", UnitState::Triggered);
        for _ in 0..3 {
            let o = rig
                .r
                .converge(&id(), &spec, "", Interrupt::never())
                .await
                .unwrap();
            assert_eq!(failure(&o).0, FailureReason::UnitLastRunFailed);
        }
        // Its timer runs it again, successfully.
        rig.r
            .units
            .lock()
            .units
            .insert("job.service".into(), unit("inactive", "dead"));
        let o = rig
            .r
            .converge(&id(), &spec, "", Interrupt::never())
            .await
            .unwrap();
        assert!(matches!(o, Outcome::Ready { .. }), "{o:?}");
        assert!(rig.r.units.lock().calls.is_empty(), "no job, ever");
    }
}
