//! [`DockerEngine`]: the [`ContainerEngine`] over Docker Engine's API
//! (bollard, API negotiated, 1.41 and up). One connection, made on first
//! use and shared by concurrent callers; dropped after a transport error so
//! the next call connects and negotiates again.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bollard::Docker;
use bollard::models::{
    ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummaryStateEnum, HealthStatusEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptions,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures::StreamExt;
use manifest_types::{ContainerSpec, FailureReason};

use super::body::create_body;
use super::engine::{
    ContainerEngine, ContainerStatus, HealthStatus, Inspected, ListedState, Summary,
};
use crate::reconcile::Failure;

#[derive(Debug)]
pub struct DockerEngine {
    /// `unix://` path or None for DOCKER_HOST / the default socket.
    host: Option<String>,
    client: std::sync::Mutex<Option<Docker>>,
    /// Held while connecting, so concurrent callers (a reconcile, the
    /// removal sweep, the inventory's probe) share one connection.
    connecting: tokio::sync::Mutex<()>,
}

fn engine_failure(e: bollard::errors::Error) -> Failure {
    use bollard::errors::Error as E;
    match e {
        E::DockerResponseServerError {
            status_code,
            message,
        } => Failure::new(
            FailureReason::DockerError,
            format!("engine answered {status_code}: {message}"),
        ),
        other => Failure::new(FailureReason::DockerUnavailable, other.to_string()),
    }
}

fn status_code(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

impl DockerEngine {
    pub fn new(host: Option<String>) -> Self {
        Self {
            host,
            client: std::sync::Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self) -> Option<Docker> {
        self.client.lock().expect("docker client lock").clone()
    }

    async fn client(&self) -> Result<Docker, Failure> {
        if let Some(d) = self.cached() {
            return Ok(d);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(d) = self.cached() {
            return Ok(d);
        }
        let unavailable = |e: bollard::errors::Error| {
            Failure::new(
                FailureReason::DockerUnavailable,
                format!("cannot reach the Docker Engine: {e}"),
            )
        };
        let docker = match &self.host {
            Some(path) => Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION)
                .map_err(unavailable)?,
            None => Docker::connect_with_local_defaults().map_err(unavailable)?,
        };
        let docker = docker.negotiate_version().await.map_err(unavailable)?;
        tracing::info!(api = %docker.client_version(), "connected to the Docker Engine");
        *self.client.lock().expect("docker client lock") = Some(docker.clone());
        Ok(docker)
    }

    /// A typed failure for an engine error; forgets the connection after a
    /// transport error.
    fn fail(&self, e: bollard::errors::Error) -> Failure {
        let f = engine_failure(e);
        if f.reason.is_unavailable() {
            *self.client.lock().expect("docker client lock") = None;
        }
        f
    }

    fn check<T>(&self, r: Result<T, bollard::errors::Error>) -> Result<T, Failure> {
        r.map_err(|e| self.fail(e))
    }
}

fn inspected(i: ContainerInspectResponse) -> Inspected {
    let state = i.state.unwrap_or_default();
    let status = match state.status {
        Some(ContainerStateStatusEnum::CREATED) => ContainerStatus::Created,
        Some(ContainerStateStatusEnum::RUNNING) => ContainerStatus::Running,
        Some(ContainerStateStatusEnum::PAUSED) => ContainerStatus::Paused,
        Some(ContainerStateStatusEnum::RESTARTING) => ContainerStatus::Restarting,
        Some(ContainerStateStatusEnum::REMOVING) => ContainerStatus::Removing,
        Some(ContainerStateStatusEnum::EXITED) => ContainerStatus::Exited,
        Some(ContainerStateStatusEnum::DEAD) => ContainerStatus::Dead,
        _ => ContainerStatus::Unknown,
    };
    let health = match state.health.and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => Some(HealthStatus::Starting),
        Some(HealthStatusEnum::HEALTHY) => Some(HealthStatus::Healthy),
        Some(HealthStatusEnum::UNHEALTHY) => Some(HealthStatus::Unhealthy),
        _ => None,
    };
    Inspected {
        id: i.id.unwrap_or_default(),
        image_id: i.image.unwrap_or_default(),
        status,
        exit_code: state.exit_code.unwrap_or(0),
        restart_count: i.restart_count.unwrap_or(0).max(0) as u64,
        started_at: state.started_at.unwrap_or_default(),
        finished_at: state.finished_at.unwrap_or_default(),
        created: i
            .created
            .as_deref()
            .and_then(|c| humantime::parse_rfc3339_weak(c).ok()),
        health,
    }
}

impl ContainerEngine for DockerEngine {
    async fn version(&self) -> Result<String, Failure> {
        let docker = self.client().await?;
        let version = self.check(docker.version().await)?;
        Ok(version.version.unwrap_or_else(|| "unknown".into()))
    }

    async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<Summary>, Failure> {
        let docker = self.client().await?;
        let labels = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let filters = HashMap::from([("label".to_owned(), labels)]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let summaries = self.check(docker.list_containers(Some(options)).await)?;
        Ok(summaries
            .into_iter()
            .filter_map(|s| {
                let state = match s.state {
                    Some(ContainerSummaryStateEnum::RUNNING) => ListedState::Running,
                    Some(ContainerSummaryStateEnum::RESTARTING) => ListedState::Restarting,
                    Some(ContainerSummaryStateEnum::PAUSED) => ListedState::Paused,
                    Some(ContainerSummaryStateEnum::CREATED) => ListedState::Created,
                    Some(ContainerSummaryStateEnum::EXITED) => ListedState::Exited,
                    _ => ListedState::Gone,
                };
                Some(Summary {
                    id: s.id?,
                    state,
                    created: s.created.unwrap_or(0),
                    labels: s.labels.unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<Inspected, Failure> {
        let docker = self.client().await?;
        self.check(docker.inspect_container(id, None).await)
            .map(inspected)
    }

    async fn has_image(&self, reference: &str) -> Result<bool, Failure> {
        let docker = self.client().await?;
        match docker.inspect_image(reference).await {
            Ok(_) => Ok(true),
            Err(e) if status_code(&e) == Some(404) => Ok(false),
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn pull(
        &self,
        reference: &str,
        on_status: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), Failure> {
        let docker = self.client().await?;
        let options = CreateImageOptionsBuilder::default()
            .from_image(reference)
            .build();
        let mut stream = docker.create_image(Some(options), None, None);
        let pull_failed = |message: String| {
            Failure::new(
                FailureReason::ImagePullFailed,
                format!("{reference}: {message}"),
            )
        };
        let mut last = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(msg) = info.error_detail.and_then(|d| d.message) {
                        return Err(pull_failed(msg));
                    }
                    let status = info.status.unwrap_or_default();
                    if status != last {
                        on_status(&status);
                        last = status;
                    }
                }
                Err(bollard::errors::Error::DockerStreamError { error }) => {
                    return Err(pull_failed(error));
                }
                Err(bollard::errors::Error::DockerResponseServerError { message, .. }) => {
                    return Err(pull_failed(message));
                }
                Err(other) => return Err(self.fail(other)),
            }
        }
        Ok(())
    }

    async fn create(
        &self,
        name: &str,
        spec: &ContainerSpec,
        labels: HashMap<String, String>,
    ) -> Result<String, Failure> {
        let docker = self.client().await?;
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        match docker
            .create_container(Some(options), create_body(spec, labels))
            .await
        {
            Ok(created) => Ok(created.id),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409,
                message,
            }) => Err(Failure::new(FailureReason::NameConflict, message)),
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn start(&self, id: &str) -> Result<(), Failure> {
        let docker = self.client().await?;
        match docker.start_container(id, None).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 500,
                message,
            }) => Err(Failure::new(FailureReason::StartFailed, message)),
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn stop(&self, id: &str, timeout: Duration) -> Result<(), Failure> {
        let docker = self.client().await?;
        let t = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(t).build();
        match docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if matches!(status_code(&e), Some(304 | 404)) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), Failure> {
        let docker = self.client().await?;
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// From the container's `die` events since it was created.
    async fn last_exit_code(&self, id: &str, since: SystemTime) -> Option<i64> {
        let docker = self.client().await.ok()?;
        let since = since.duration_since(SystemTime::UNIX_EPOCH).ok()?;
        let until = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()?;
        let options = EventsOptions {
            since: Some(since.as_secs().to_string()),
            until: Some(format!("{}.{:09}", until.as_secs(), until.subsec_nanos())),
            filters: Some(HashMap::from([
                ("container".to_owned(), vec![id.to_owned()]),
                ("event".to_owned(), vec!["die".to_owned()]),
            ])),
        };
        let mut events = docker.events(Some(options));
        let mut code = None;
        // `until` ends the stream; the timeout only guards a confused engine.
        while let Ok(Some(Ok(event))) =
            tokio::time::timeout(Duration::from_secs(2), events.next()).await
        {
            code = event
                .actor
                .and_then(|a| a.attributes)
                .and_then(|a| a.get("exitCode").and_then(|c| c.parse().ok()))
                .or(code);
        }
        code
    }

    async fn image_digest(&self, image_id: &str) -> Result<Option<String>, Failure> {
        let docker = self.client().await?;
        let image = self.check(docker.inspect_image(image_id).await)?;
        Ok(image
            .repo_digests
            .unwrap_or_default()
            .into_iter()
            .next()
            .and_then(|d| d.split_once('@').map(|(_, d)| d.to_owned())))
    }
}
