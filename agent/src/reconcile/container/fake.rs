//! A scripted [`ContainerEngine`] for the reconciler's unit tests:
//! containers and images held in memory, starts that run, exit or are
//! refused as the test says, an engine that goes away for one call or for
//! good, and a log of every call that changes something.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use manifest_types::{ContainerSpec, FailureReason};

use super::engine::{
    ContainerEngine, ContainerStatus, HealthStatus, Inspected, ListedState, Summary,
};
use crate::reconcile::Failure;

#[derive(Debug, Clone)]
pub struct Container {
    pub name: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    pub status: ContainerStatus,
    pub exit_code: i64,
    pub started_at: String,
    pub health: Option<HealthStatus>,
    pub created: i64,
}

/// What starting a container of an image does.
#[derive(Debug, Clone, Copy, Default)]
pub enum OnStart {
    /// Runs (healthy when the image has a healthcheck, see `Engine::health`).
    #[default]
    Run,
    /// Runs and exits at once with this code.
    Exit(i64),
    /// The engine cannot start it (`StartFailed`).
    Refuse,
}

/// How the engine fails a call.
#[derive(Debug, Clone, Copy)]
pub enum Outage {
    /// This call fails as if the engine restarted just then; the next works.
    Blip,
    /// The engine goes away at this call and stays away.
    Down,
}

#[derive(Debug, Default)]
pub struct Engine {
    /// Container id (`c1`, `c2`, … in order of creation) → container.
    pub containers: BTreeMap<String, Container>,
    /// Images on the device.
    pub images: BTreeSet<String>,
    /// Images the registry serves.
    pub registry: BTreeSet<String>,
    pub on_start: BTreeMap<String, OnStart>,
    /// The health a started container of an image reports (none: no healthcheck).
    pub health: BTreeMap<String, HealthStatus>,
    /// Calls (as the log names them, e.g. `start c2`) that fail.
    pub outages: BTreeMap<String, Outage>,
    /// The engine does not answer.
    pub down: bool,
    /// Every create, start, stop, remove and pull that happened, in order.
    pub calls: Vec<String>,
    created: i64,
}

#[derive(Debug, Default)]
pub struct FakeEngine(pub Mutex<Engine>);

fn unavailable() -> Failure {
    Failure::new(
        FailureReason::DockerUnavailable,
        "cannot reach the Docker Engine: (fake) down",
    )
}

impl FakeEngine {
    pub fn with(f: impl FnOnce(&mut Engine)) -> Self {
        let mut e = Engine::default();
        f(&mut e);
        Self(Mutex::new(e))
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.0.lock().unwrap()
    }

    /// The engine, if it answers `call` (which is logged when it does).
    fn call(&self, call: &str) -> Result<std::sync::MutexGuard<'_, Engine>, Failure> {
        let mut e = self.lock();
        match e.outages.remove(call) {
            Some(Outage::Blip) => return Err(unavailable()),
            Some(Outage::Down) => e.down = true,
            None => {}
        }
        if e.down {
            return Err(unavailable());
        }
        if !call.is_empty() {
            e.calls.push(call.to_owned());
        }
        Ok(e)
    }

    /// The engine, for a call that changes nothing.
    fn read(&self) -> Result<std::sync::MutexGuard<'_, Engine>, Failure> {
        self.call("")
    }
}

fn no_such(id: &str) -> Failure {
    Failure::new(
        FailureReason::DockerError,
        format!("engine answered 404: No such container: {id}"),
    )
}

impl ContainerEngine for FakeEngine {
    async fn version(&self) -> Result<String, Failure> {
        self.read().map(|_| "27.0 (fake)".into())
    }

    async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<Summary>, Failure> {
        let e = self.read()?;
        Ok(e.containers
            .iter()
            .filter(|(_, c)| {
                labels
                    .iter()
                    .all(|(k, v)| c.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(id, c)| Summary {
                id: id.clone(),
                state: match c.status {
                    ContainerStatus::Running => ListedState::Running,
                    ContainerStatus::Restarting => ListedState::Restarting,
                    ContainerStatus::Paused => ListedState::Paused,
                    ContainerStatus::Created => ListedState::Created,
                    ContainerStatus::Exited => ListedState::Exited,
                    _ => ListedState::Gone,
                },
                created: c.created,
                labels: c.labels.clone(),
            })
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<Inspected, Failure> {
        let e = self.read()?;
        let c = e.containers.get(id).ok_or_else(|| no_such(id))?;
        Ok(Inspected {
            id: id.to_owned(),
            image_id: format!("sha256:{}", c.image),
            status: c.status,
            exit_code: c.exit_code,
            restart_count: 0,
            started_at: c.started_at.clone(),
            finished_at: String::new(),
            created: None,
            health: c.health,
        })
    }

    async fn has_image(&self, reference: &str) -> Result<bool, Failure> {
        Ok(self.read()?.images.contains(reference))
    }

    async fn pull(
        &self,
        reference: &str,
        on_status: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), Failure> {
        let mut e = self.call(&format!("pull {reference}"))?;
        if !e.registry.contains(reference) {
            return Err(Failure::new(
                FailureReason::ImagePullFailed,
                format!("{reference}: manifest unknown"),
            ));
        }
        e.images.insert(reference.to_owned());
        drop(e);
        on_status("Downloaded newer image");
        Ok(())
    }

    async fn create(
        &self,
        name: &str,
        spec: &ContainerSpec,
        labels: HashMap<String, String>,
    ) -> Result<String, Failure> {
        let mut e = self.read()?;
        let image = super::image_ref(spec);
        if !e.images.contains(&image) {
            return Err(Failure::new(
                FailureReason::DockerError,
                format!("engine answered 404: No such image: {image}"),
            ));
        }
        if e.containers.values().any(|c| c.name == name) {
            return Err(Failure::new(
                FailureReason::NameConflict,
                format!("name {name} is in use"),
            ));
        }
        e.created += 1;
        let id = format!("c{}", e.created);
        e.calls.push(format!("create {id}"));
        let created = e.created;
        e.containers.insert(
            id.clone(),
            Container {
                name: name.to_owned(),
                image,
                labels,
                status: ContainerStatus::Created,
                exit_code: 0,
                started_at: String::new(),
                health: None,
                created,
            },
        );
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), Failure> {
        let mut e = self.call(&format!("start {id}"))?;
        let image = e
            .containers
            .get(id)
            .ok_or_else(|| no_such(id))?
            .image
            .clone();
        let on_start = e.on_start.get(&image).copied().unwrap_or_default();
        let health = e.health.get(&image).copied();
        let c = e.containers.get_mut(id).expect("looked up above");
        c.started_at = humantime::format_rfc3339_nanos(SystemTime::now()).to_string();
        match on_start {
            OnStart::Run => {
                c.status = ContainerStatus::Running;
                c.health = health;
            }
            OnStart::Exit(code) => {
                c.status = ContainerStatus::Exited;
                c.exit_code = code;
            }
            OnStart::Refuse => {
                return Err(Failure::new(
                    FailureReason::StartFailed,
                    "(fake) exec: no such file or directory",
                ));
            }
        }
        Ok(())
    }

    async fn stop(&self, id: &str, _timeout: Duration) -> Result<(), Failure> {
        let mut e = self.call(&format!("stop {id}"))?;
        if let Some(c) = e.containers.get_mut(id)
            && c.status == ContainerStatus::Running
        {
            c.status = ContainerStatus::Exited;
            c.health = None;
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), Failure> {
        self.call(&format!("remove {id}"))?.containers.remove(id);
        Ok(())
    }

    async fn last_exit_code(&self, _id: &str, _since: SystemTime) -> Option<i64> {
        None
    }

    async fn image_digest(&self, image_id: &str) -> Result<Option<String>, Failure> {
        self.read().map(drop)?;
        Ok(Some(image_id.replace("sha256:", "sha256:digest-of-")))
    }
}
