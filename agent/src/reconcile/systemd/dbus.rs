//! [`DbusUnits`]: the real [`UnitManager`] — systemd's manager over D-Bus
//! with zbus and the generated `zbus_systemd` proxies, never `systemctl`.
//!
//! One connection, made on first use; after any D-Bus error it is dropped
//! and made again by the next call (the bus or systemd may have restarted).
//! The connection subscribes to the manager once, so `JobRemoved` signals
//! arrive. Property proxies never cache (several properties are declared
//! constant and would otherwise be read once).

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use manifest_types::FailureReason;
use manifest_types::spec::UnitState;
use zbus_systemd::systemd1::{JobRemovedStream, ManagerProxy, ServiceProxy, TimerProxy, UnitProxy};

use super::manager::{JobEnd, JobResult, LoadState, UnitManager};
use super::planning::{Action, ActiveState, Observed};
use crate::reconcile::{Failure, Interrupt};

#[derive(Debug)]
pub struct DbusUnits {
    /// D-Bus address; None: the system bus.
    bus: Option<String>,
    manager: Mutex<Option<ManagerProxy<'static>>>,
    /// Units this connection holds a reference on (`RefUnit`), so systemd
    /// keeps an inactive oneshot loaded — and its last run's result and
    /// times with it — instead of collecting it the moment it finishes.
    referenced: Mutex<BTreeSet<String>>,
}

/// A job systemd has accepted, and the signal stream its end arrives on
/// (opened before the job was queued, so a fast job's signal is not missed).
pub struct DbusJob {
    removed: JobRemovedStream,
    job: Option<zbus::OwnedObjectPath>,
}

impl std::fmt::Debug for DbusJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbusJob").field("job", &self.job).finish()
    }
}

impl DbusUnits {
    pub fn new(bus: Option<String>) -> Self {
        Self {
            bus,
            manager: Mutex::new(None),
            referenced: Mutex::default(),
        }
    }

    /// Drops the connection; the next call connects again. References end
    /// with the connection that held them.
    fn forget(&self) {
        *self.manager.lock().expect("manager lock") = None;
        self.referenced.lock().expect("refs lock").clear();
    }

    /// A D-Bus error as a typed failure; the connection is dropped.
    fn error(&self, context: &str) -> impl FnOnce(zbus::Error) -> Failure + '_ {
        let context = context.to_owned();
        move |e| {
            self.forget();
            Failure::new(FailureReason::SystemdError, format!("{context}: {e}"))
        }
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

    async fn unit(
        &self,
        manager: &ManagerProxy<'_>,
        name: &str,
    ) -> Result<(UnitProxy<'static>, zbus::OwnedObjectPath), Failure> {
        let path = manager
            .load_unit(name.to_owned())
            .await
            .map_err(self.error("LoadUnit"))?;
        Ok((self.unit_at(manager, &path).await?, path))
    }

    async fn unit_at(
        &self,
        manager: &ManagerProxy<'_>,
        path: &zbus::OwnedObjectPath,
    ) -> Result<UnitProxy<'static>, Failure> {
        UnitProxy::builder(manager.inner().connection())
            .path(path.clone())
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(self.error("unit proxy"))
    }
}

impl UnitManager for DbusUnits {
    type Job = DbusJob;

    async fn probe(&self) -> Result<String, Failure> {
        let manager = self.manager().await?;
        // A method call, so the bus is really asked (the proxy caches
        // properties such as Version, which systemd declares constant).
        match manager.get_default_target().await {
            Ok(_) => Ok(manager.version().await.unwrap_or_else(|_| "unknown".into())),
            Err(e) => {
                self.forget();
                Err(Failure::new(
                    FailureReason::SystemdUnavailable,
                    format!("systemd does not answer over D-Bus: {e}"),
                ))
            }
        }
    }

    async fn load(&self, name: &str, files_changed: bool) -> Result<LoadState, Failure> {
        let manager = self.manager().await?;
        let (unit, _) = self.unit(&manager, name).await?;
        if files_changed || unit.need_daemon_reload().await.unwrap_or(false) {
            tracing::info!(unit = %name, "unit files changed; reloading systemd");
            manager.reload().await.map_err(self.error("Reload"))?;
        }
        let state = unit.load_state().await.map_err(self.error("LoadState"))?;
        Ok(match state.as_str() {
            "loaded" => LoadState::Loaded,
            "not-found" => LoadState::NotFound,
            _ => LoadState::Other(state),
        })
    }

    async fn reload(&self) -> Result<(), Failure> {
        let manager = self.manager().await?;
        manager.reload().await.map_err(self.error("Reload"))
    }

    async fn unit_file_state(&self, name: &str) -> Result<String, Failure> {
        let manager = self.manager().await?;
        manager
            .get_unit_file_state(name.to_owned())
            .await
            .map_err(self.error("GetUnitFileState"))
    }

    async fn enable(&self, name: &str) -> Result<(), Failure> {
        let manager = self.manager().await?;
        manager
            .enable_unit_files(vec![name.to_owned()], false, true)
            .await
            .map(drop)
            .map_err(self.error("EnableUnitFiles"))
    }

    async fn disable(&self, name: &str) -> Result<(), Failure> {
        let manager = self.manager().await?;
        manager
            .disable_unit_files(vec![name.to_owned()], false)
            .await
            .map(drop)
            .map_err(self.error("DisableUnitFiles"))
    }

    async fn observe(&self, name: &str, want: UnitState) -> Result<Observed, Failure> {
        let manager = self.manager().await?;
        let (unit, path) = self.unit(&manager, name).await?;
        let mut o = Observed {
            active_state: ActiveState::parse(
                &unit
                    .active_state()
                    .await
                    .map_err(self.error("ActiveState"))?,
            ),
            sub_state: unit.sub_state().await.map_err(self.error("SubState"))?,
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
                .map_err(self.error("service proxy"))?;
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
                .map_err(self.error("timer proxy"))?;
            o.result = timer.result().await.unwrap_or_default();
            o.last_trigger_usec = timer.last_trigger_u_sec().await.unwrap_or(0);
            o.next_elapse_usec = timer.next_elapse_u_sec_realtime().await.unwrap_or(0);
        }
        if want == UnitState::Stopped {
            for trigger in unit
                .triggered_by()
                .await
                .map_err(self.error("TriggeredBy"))?
            {
                let Ok(p) = manager.get_unit(trigger.clone()).await else {
                    continue; // not loaded: not active either
                };
                let t = self.unit_at(&manager, &p).await?;
                let state = t.active_state().await.map_err(self.error("ActiveState"))?;
                if ActiveState::parse(&state).is_up() {
                    o.active_triggers.push(trigger);
                }
            }
        }
        Ok(o)
    }

    async fn queue(&self, name: &str, action: Action) -> Result<DbusJob, Failure> {
        let manager = self.manager().await?;
        let removed = manager
            .receive_job_removed()
            .await
            .map_err(self.error("JobRemoved"))?;
        let (n, mode) = (name.to_owned(), "replace".to_owned());
        let job = match action {
            Action::Start => manager.start_unit(n, mode).await,
            Action::Stop => manager.stop_unit(n, mode).await,
            Action::Restart => manager.restart_unit(n, mode).await,
            Action::Reload => manager.reload_unit(n, mode).await,
            Action::None => return Ok(DbusJob { removed, job: None }),
        }
        .map_err(self.error("unit job"))?;
        Ok(DbusJob {
            removed,
            job: Some(job),
        })
    }

    async fn wait(
        &self,
        queued: DbusJob,
        timeout: Duration,
        mut interrupt: Interrupt,
    ) -> Result<JobResult, Failure> {
        let DbusJob { mut removed, job } = queued;
        let Some(job) = job else {
            return Ok(JobResult::Ended(JobEnd::Done));
        };
        let wait = async {
            while let Some(signal) = removed.next().await {
                if let Ok(args) = signal.args()
                    && args.job().as_str() == job.as_str()
                {
                    return Some(JobEnd::parse(args.result()));
                }
            }
            None
        };
        let waited = tokio::select! {
            waited = tokio::time::timeout(timeout, wait) => waited,
            () = interrupt.requested() => return Ok(JobResult::Interrupted),
        };
        match waited {
            Ok(Some(end)) => Ok(JobResult::Ended(end)),
            Ok(None) => {
                self.forget();
                Err(Failure::new(
                    FailureReason::SystemdUnavailable,
                    "D-Bus connection closed while waiting for a job",
                ))
            }
            // The job stays queued in systemd; the unit's state says the rest
            // (typically "activating"), and the next pass looks again.
            Err(_) => Ok(JobResult::StillRunning),
        }
    }

    async fn keep_loaded(&self, name: &str) -> Result<(), Failure> {
        let manager = self.manager().await?;
        if self.referenced.lock().expect("refs lock").contains(name) {
            return Ok(());
        }
        // Once per connection: systemd counts every RefUnit.
        manager
            .ref_unit(name.to_owned())
            .await
            .map_err(self.error("RefUnit"))?;
        self.referenced
            .lock()
            .expect("refs lock")
            .insert(name.to_owned());
        Ok(())
    }

    async fn let_unload(&self, name: &str) -> Result<(), Failure> {
        if !self.referenced.lock().expect("refs lock").remove(name) {
            return Ok(());
        }
        let manager = self.manager().await?;
        manager
            .unref_unit(name.to_owned())
            .await
            .map_err(self.error("UnrefUnit"))
    }
}
