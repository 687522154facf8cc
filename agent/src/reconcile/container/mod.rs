//! The Container reconciler: Docker Engine through bollard
//! (docs/adr/0008-containers.md).
//!
//! - Labels are the single source of truth. Every container the agent
//!   creates carries [`LABEL_AGENT`], [`LABEL_RESOURCE`] and [`LABEL_HASH`];
//!   the agent lists containers by its own agent label and never looks at, or
//!   touches, any other container on the engine.
//! - The hash label is the resource's spec hash combined with the spec hashes
//!   of its `restartOn` inputs, so a changed File replaces the container and
//!   a crash halfway through cannot lose that restart.
//! - Replacing pulls first, creates the new container beside the old one
//!   (names carry the hash), then stops the old, starts the new and removes
//!   the old: the gap is one stop plus one start.
//! - Process exits are the engine's job under the restart policy; the agent
//!   repairs what the engine will not (a removed container, or one stopped by
//!   hand while its policy says it should run) and counts those repairs.
//! - A container that keeps exiting is Failed (`CrashLoopBackOff`) with the
//!   exit code, never Ready in between.
//!
//! The decisions ([`plan`], [`assess`], [`create_body`]) are pure; the
//! engine calls live in [`ContainerReconciler`].
//!
//! Layout: `planning` (the pure decisions), `body` (the create request), this
//! module (the engine calls).

mod body;
mod planning;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use bollard::Docker;
use bollard::models::{ContainerStateStatusEnum, ContainerSummaryStateEnum};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptions,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures::StreamExt;
use manifest_types::spec::PullPolicy;
use manifest_types::{
    AgentId, AgentManifest, ContainerSpec, FailureReason, ReadyDetails, ResourceId, ResourceKind,
};

pub use body::create_body;
pub use planning::{
    Listed, ListedState, Plan, assess, container_name, effective_hash, image_ref, plan,
};

use super::{Ctx, Failure, Outcome, Progress, Removals};

pub const LABEL_AGENT: &str = "io.flotilla.agent";
pub const LABEL_RESOURCE: &str = "io.flotilla.resource";
pub const LABEL_HASH: &str = "io.flotilla.spec-hash";

/// A container that restarted and has been up for less than this is crash-looping.
const CRASH_WINDOW: Duration = Duration::from_secs(10);
/// After starting a container, look again this much later before calling it
/// Ready, so a command that exits at once is never reported Ready.
const START_SETTLE: Duration = Duration::from_millis(300);
/// How soon a container whose healthcheck is still `starting` is looked at again.
const HEALTH_RECHECK: Duration = Duration::from_secs(1);

/// Talks to one Docker Engine (API negotiated, 1.41 and up). Shared by
/// concurrent reconciles: its small memory sits behind one lock that is
/// never held across an engine call.
#[derive(Debug)]
pub struct ContainerReconciler {
    agent: AgentId,
    /// `unix://` path or None for DOCKER_HOST / the default socket.
    docker_host: Option<String>,
    stop_timeout: Duration,
    memory: std::sync::Mutex<Memory>,
    /// Held while connecting, so concurrent callers (a reconcile, the
    /// removal sweep, the inventory's probe) share one connection.
    connecting: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Memory {
    docker: Option<Docker>,
    /// Repairs per resource since this agent started (for the current hash).
    repairs: BTreeMap<ResourceId, (String, u64)>,
    /// Whether the last sweep found containers (or none ran yet), so an
    /// agent without containers does not poll the engine.
    may_own: bool,
    /// When the agent last started each resource's container: it is checked
    /// again early, while a crash loop could still be starting.
    started: BTreeMap<ResourceId, std::time::Instant>,
    /// Repo digest per image id: image ids are content hashes, so the
    /// answer never changes and is asked for once, not on every drift check.
    digests: HashMap<String, Option<String>>,
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

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Whether a freshly started container is failing (so a replacement is
/// rolled back): it exited, or is crash-looping, or did not start.
fn failed_to_start(outcome: &Outcome) -> Option<&Failure> {
    match outcome {
        Outcome::Failed(
            f @ Failure {
                reason:
                    FailureReason::CrashLoopBackOff
                    | FailureReason::ContainerExited
                    | FailureReason::ContainerNotRunning
                    | FailureReason::StartFailed,
                ..
            },
        ) => Some(f),
        _ => None,
    }
}

impl ContainerReconciler {
    pub fn new(agent: AgentId, docker_host: Option<String>, stop_timeout: Duration) -> Self {
        Self {
            agent,
            docker_host,
            stop_timeout,
            memory: std::sync::Mutex::new(Memory {
                docker: None,
                repairs: BTreeMap::new(),
                may_own: true,
                started: BTreeMap::new(),
                digests: HashMap::new(),
            }),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().expect("container reconciler lock")
    }

    async fn engine(&self) -> Result<Docker, Failure> {
        if let Some(d) = &self.memory().docker {
            return Ok(d.clone());
        }
        let _connecting = self.connecting.lock().await;
        if let Some(d) = &self.memory().docker {
            return Ok(d.clone());
        }
        let unavailable = |e: bollard::errors::Error| {
            Failure::new(
                FailureReason::DockerUnavailable,
                format!("cannot reach the Docker Engine: {e}"),
            )
        };
        let docker = match &self.docker_host {
            Some(path) => Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION)
                .map_err(unavailable)?,
            None => Docker::connect_with_local_defaults().map_err(unavailable)?,
        };
        let docker = docker.negotiate_version().await.map_err(unavailable)?;
        tracing::info!(api = %docker.client_version(), "connected to the Docker Engine");
        self.memory().docker = Some(docker.clone());
        Ok(docker)
    }

    /// Whether the engine answers now: its version, or why not.
    pub async fn probe(&self) -> Result<String, Failure> {
        let docker = self.engine().await?;
        let version = self.check(docker.version().await)?;
        Ok(version.version.unwrap_or_else(|| "unknown".into()))
    }

    /// A typed failure for an engine error; forgets the engine after a
    /// transport error so the next call connects and negotiates again.
    fn fail(&self, e: bollard::errors::Error) -> Failure {
        let f = engine_failure(e);
        if f.reason.is_unavailable() {
            self.memory().docker = None;
        }
        f
    }

    fn check<T>(&self, r: Result<T, bollard::errors::Error>) -> Result<T, Failure> {
        r.map_err(|e| self.fail(e))
    }

    async fn list(
        &self,
        resource: Option<&ResourceId>,
    ) -> Result<Vec<(Listed, Option<String>)>, Failure> {
        let docker = self.engine().await?;
        let mut labels = vec![format!("{LABEL_AGENT}={}", self.agent)];
        if let Some(r) = resource {
            labels.push(format!("{LABEL_RESOURCE}={r}"));
        }
        let filters = HashMap::from([("label".to_owned(), labels)]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let summaries = self.check(docker.list_containers(Some(options)).await)?;
        Ok(summaries
            .into_iter()
            .filter_map(|s| {
                let labels = s.labels.unwrap_or_default();
                // The engine filtered by label; check again, never trust a guess.
                if labels.get(LABEL_AGENT).map(String::as_str) != Some(self.agent.as_str()) {
                    return None;
                }
                let state = match s.state {
                    Some(ContainerSummaryStateEnum::RUNNING) => ListedState::Running,
                    Some(ContainerSummaryStateEnum::RESTARTING) => ListedState::Restarting,
                    Some(ContainerSummaryStateEnum::PAUSED) => ListedState::Paused,
                    Some(ContainerSummaryStateEnum::CREATED) => ListedState::Created,
                    Some(ContainerSummaryStateEnum::EXITED) => ListedState::Exited,
                    _ => ListedState::Gone,
                };
                Some((
                    Listed {
                        id: s.id?,
                        hash: labels.get(LABEL_HASH).cloned().unwrap_or_default(),
                        state,
                        created: s.created.unwrap_or(0),
                    },
                    labels.get(LABEL_RESOURCE).cloned(),
                ))
            })
            .collect())
    }

    /// Converges one Container resource.
    pub async fn reconcile(
        &self,
        id: &ResourceId,
        spec: &ContainerSpec,
        hash: &str,
        ctx: Ctx,
    ) -> Outcome {
        let mut outcome = self
            .converge(id, spec, hash, ctx)
            .await
            .unwrap_or_else(Outcome::from);
        if let Outcome::Ready { recheck_after, .. } = &mut outcome {
            *recheck_after = self.recheck_after(id);
        }
        outcome
    }

    async fn converge(
        &self,
        id: &ResourceId,
        spec: &ContainerSpec,
        hash: &str,
        ctx: Ctx,
    ) -> Result<Outcome, Failure> {
        let Ctx {
            progress,
            mut interrupt,
        } = ctx;
        self.memory().may_own = true;
        let docker = self.engine().await?;
        let listed: Vec<Listed> = self
            .list(Some(id))
            .await?
            .into_iter()
            .map(|(l, _)| l)
            .collect();
        let (repairs, known) = match self.memory().repairs.get(id) {
            Some((h, n)) if h == hash => (*n, true),
            _ => (0, false),
        };
        let (container, remove, repaired) = match plan(hash, spec.restart_policy, &listed) {
            Plan::Create { replace } => {
                let repair = replace.is_empty() && known;
                if repair {
                    tracing::warn!(resource = %id, "container was removed outside Flotilla; recreating it");
                }
                // The only long step, and a safe point: a newer manifest
                // that changes this resource interrupts the pull.
                tokio::select! {
                    pulled = self.ensure_image(&docker, spec, &progress) => pulled?,
                    () = interrupt.requested() => return Ok(Outcome::Interrupted),
                }
                progress.report("creating container");
                let new = self.create(&docker, id, spec, hash).await?;
                // The previous containers that were running, to start again
                // should the new one fail.
                let running: Vec<String> = listed
                    .iter()
                    .filter(|c| matches!(c.state, ListedState::Running | ListedState::Restarting))
                    .map(|c| c.id.clone())
                    .collect();
                for old in &replace {
                    self.stop(&docker, old).await?;
                }
                progress.report("starting container");
                let outcome = self.start_and_settle(&docker, id, &new, repairs).await?;
                if let Some(f) = failed_to_start(&outcome).filter(|_| !running.is_empty()) {
                    return self.roll_back(&docker, id, &new, &running, f.clone()).await;
                }
                (new, replace, repair)
            }
            Plan::Start {
                id: cid,
                repair,
                remove,
            } => {
                if repair {
                    tracing::warn!(resource = %id, container = %cid, "container was stopped outside Flotilla; starting it");
                }
                progress.report("starting container");
                self.start(&docker, &cid).await?;
                self.memory()
                    .started
                    .insert(id.clone(), std::time::Instant::now());
                tokio::time::sleep(START_SETTLE).await;
                (cid, remove, repair)
            }
            Plan::Observe { id: cid, remove } => (cid, remove, false),
        };
        for old in &remove {
            self.remove(&docker, old).await?;
        }
        let repairs = if repaired { repairs + 1 } else { repairs };
        self.memory()
            .repairs
            .insert(id.clone(), (hash.to_owned(), repairs));
        self.observe(&docker, &container, repairs).await
    }

    /// Starts a freshly created container, waits [`START_SETTLE`] and
    /// reports how it is doing.
    async fn start_and_settle(
        &self,
        docker: &Docker,
        id: &ResourceId,
        container: &str,
        repairs: u64,
    ) -> Result<Outcome, Failure> {
        if let Err(f) = self.start(docker, container).await {
            return Ok(Outcome::Failed(f));
        }
        self.memory()
            .started
            .insert(id.clone(), std::time::Instant::now());
        tokio::time::sleep(START_SETTLE).await;
        self.observe(docker, container, repairs).await
    }

    /// The replacement failed to start or crash-loops: remove it and start
    /// the previous container again, so a failed update never leaves the
    /// device with nothing running.
    async fn roll_back(
        &self,
        docker: &Docker,
        id: &ResourceId,
        new: &str,
        previous: &[String],
        why: Failure,
    ) -> Result<Outcome, Failure> {
        tracing::warn!(resource = %id, container = %new, reason = %why.reason, message = %why.message,
            "the new container failed; starting the previous one again");
        self.remove(docker, new).await?;
        for old in previous {
            self.start(docker, old).await?;
        }
        self.memory().started.remove(id);
        Ok(Outcome::failed(
            FailureReason::ReplaceFailed,
            format!(
                "the new container failed ({}: {}); the previous one runs again",
                why.reason, why.message
            ),
        ))
    }

    async fn observe(
        &self,
        docker: &Docker,
        container: &str,
        repairs: u64,
    ) -> Result<Outcome, Failure> {
        let inspect = self.check(docker.inspect_container(container, None).await)?;
        let mut outcome = assess(&inspect, SystemTime::now(), repairs);
        // Running again after a crash, the engine shows the restart count but
        // no longer the exit code: the event log still has it.
        let running = inspect.state.as_ref().and_then(|s| s.status)
            == Some(ContainerStateStatusEnum::RUNNING);
        if let Outcome::Failed(f) = &mut outcome
            && f.reason == FailureReason::CrashLoopBackOff
            && running
            && let Some(code) = self
                .last_exit_code(docker, container, inspect.created.as_deref())
                .await
        {
            f.message = format!("{}; last exit code {code}", f.message);
        }
        if let Outcome::Ready {
            details:
                ReadyDetails::Container {
                    image_id,
                    image_digest,
                    ..
                },
            ..
        } = &mut outcome
        {
            *image_digest = self.digest(docker, image_id).await;
        }
        Ok(outcome)
    }

    /// The exit code of the container's last run, from the engine's event
    /// log (its `die` events since the container was created).
    async fn last_exit_code(
        &self,
        docker: &Docker,
        container: &str,
        created: Option<&str>,
    ) -> Option<i64> {
        let since = humantime::parse_rfc3339_weak(created?)
            .ok()?
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()?;
        let until = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()?;
        let options = EventsOptions {
            since: Some(since.as_secs().to_string()),
            until: Some(format!("{}.{:09}", until.as_secs(), until.subsec_nanos())),
            filters: Some(HashMap::from([
                ("container".to_owned(), vec![container.to_owned()]),
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

    async fn digest(&self, docker: &Docker, image_id: &str) -> Option<String> {
        if let Some(d) = self.memory().digests.get(image_id) {
            return d.clone();
        }
        let image = docker.inspect_image(image_id).await.ok()?;
        let digest = image
            .repo_digests
            .unwrap_or_default()
            .into_iter()
            .next()
            .and_then(|d| d.split_once('@').map(|(_, d)| d.to_owned()));
        self.memory()
            .digests
            .insert(image_id.to_owned(), digest.clone());
        digest
    }

    async fn ensure_image(
        &self,
        docker: &Docker,
        spec: &ContainerSpec,
        progress: &Progress,
    ) -> Result<(), Failure> {
        let reference = image_ref(spec);
        let present = match docker.inspect_image(&reference).await {
            Ok(_) => true,
            Err(e) if is_not_found(&e) => false,
            Err(e) => return Err(self.fail(e)),
        };
        let pull = match spec.pull_policy {
            PullPolicy::Always => true,
            PullPolicy::IfNotPresent => !present,
            PullPolicy::Never if present => false,
            PullPolicy::Never => {
                return Err(Failure::new(
                    FailureReason::ImageNotPresent,
                    format!("image {reference} is not on this device and pullPolicy is Never"),
                ));
            }
        };
        if !pull {
            return Ok(());
        }
        tracing::info!(image = %reference, "pulling image");
        progress.report(format!("pulling {reference}"));
        let options = CreateImageOptionsBuilder::default()
            .from_image(&reference)
            .build();
        let mut stream = docker.create_image(Some(options), None, None);
        let mut last = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(msg) = info.error_detail.and_then(|d| d.message) {
                        return Err(Failure::new(
                            FailureReason::ImagePullFailed,
                            format!("{reference}: {msg}"),
                        ));
                    }
                    let status = info.status.unwrap_or_default();
                    if status != last {
                        tracing::info!(image = %reference, %status, "pull progress");
                        progress.report(format!("pulling {reference}: {status}"));
                        last = status;
                    }
                }
                Err(e) => {
                    let message = match e {
                        bollard::errors::Error::DockerStreamError { error } => error,
                        bollard::errors::Error::DockerResponseServerError { message, .. } => {
                            message
                        }
                        other => {
                            return Err(self.fail(other));
                        }
                    };
                    return Err(Failure::new(
                        FailureReason::ImagePullFailed,
                        format!("{reference}: {message}"),
                    ));
                }
            }
        }
        Ok(())
    }

    async fn create(
        &self,
        docker: &Docker,
        id: &ResourceId,
        spec: &ContainerSpec,
        hash: &str,
    ) -> Result<String, Failure> {
        let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        labels.insert(LABEL_AGENT.into(), self.agent.to_string());
        labels.insert(LABEL_RESOURCE.into(), id.to_string());
        labels.insert(LABEL_HASH.into(), hash.to_owned());
        let name = container_name(&self.agent, id, hash);
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = docker
            .create_container(Some(options), create_body(spec, labels))
            .await
            .map_err(|e| match e {
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 409,
                    message,
                } => Failure::new(FailureReason::NameConflict, message),
                e => self.fail(e),
            })?;
        tracing::info!(resource = %id, container = %created.id, %name, "container created");
        #[cfg(feature = "fault-injection")]
        if std::env::var_os("FLOTILLA_FAULT_EXIT_AFTER_CREATE").is_some() {
            tracing::error!("fault injection: exiting right after creating a container");
            std::process::exit(86);
        }
        Ok(created.id)
    }

    async fn start(&self, docker: &Docker, id: &str) -> Result<(), Failure> {
        docker.start_container(id, None).await.map_err(|e| match e {
            bollard::errors::Error::DockerResponseServerError {
                status_code: 500,
                message,
            } => Failure::new(FailureReason::StartFailed, message),
            e => self.fail(e),
        })
    }

    async fn stop(&self, docker: &Docker, id: &str) -> Result<(), Failure> {
        let t = i32::try_from(self.stop_timeout.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(t).build();
        match docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304 | 404,
                ..
            }) => Ok(()),
            Err(e) => self.check(Err(e)),
        }
    }

    async fn remove(&self, docker: &Docker, id: &str) -> Result<(), Failure> {
        self.stop(docker, id).await?;
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match docker.remove_container(id, Some(options)).await {
            Ok(()) => {
                tracing::info!(container = %id, "container removed");
                Ok(())
            }
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => self.check(Err(e)),
        }
    }

    /// A container started less than [`CRASH_WINDOW`] ago is looked at again
    /// 2 s after its start and once more when the window closes, so one that
    /// dies after the settle delay is not Ready until the next drift check.
    fn recheck_after(&self, id: &ResourceId) -> Option<Duration> {
        let mut memory = self.memory();
        let age = memory.started.get(id)?.elapsed();
        let first = Duration::from_secs(2);
        if age < first {
            Some(first - age)
        } else if age < CRASH_WINDOW {
            Some(CRASH_WINDOW - age)
        } else {
            memory.started.remove(id);
            None
        }
    }

    /// Stops and removes this agent's containers whose resource id is not in
    /// `manifest` at all (removed resources and orphans of a crash). A
    /// resource still listed — even one this build cannot read
    /// (Unsupported) — keeps its container. When the engine cannot be
    /// listed, every `dropped` Container is reported as still owed.
    pub async fn remove_unlisted(
        &self,
        manifest: &AgentManifest,
        dropped: &[(ResourceId, ResourceKind)],
    ) -> Removals {
        let listed_ids: Vec<String> = manifest
            .resources
            .iter()
            .map(|r| r.id.to_string())
            .collect();
        let has_containers = manifest
            .resources
            .iter()
            .any(|r| matches!(r.spec, manifest_types::ResourceSpec::Container(_)));
        let owed: Vec<&ResourceId> = dropped
            .iter()
            .filter(|(_, k)| *k == ResourceKind::Container)
            .map(|(id, _)| id)
            .collect();
        let mut out = Removals::default();
        if !has_containers && owed.is_empty() && !self.memory().may_own {
            return out;
        }
        let listed = match self.list(None).await {
            Ok(l) => l,
            Err(f) => {
                // Without containers to remove an absent engine is normal.
                if owed.is_empty() {
                    tracing::debug!(reason = %f.reason, message = %f.message, "cannot list containers");
                }
                for id in owed {
                    out.failed
                        .push((id.clone(), ResourceKind::Container, f.clone()));
                }
                return out;
            }
        };
        let Ok(docker) = self.engine().await else {
            return out;
        };
        for (c, resource) in &listed {
            if resource.as_ref().is_some_and(|r| listed_ids.contains(r)) {
                continue;
            }
            tracing::info!(container = %c.id, resource = ?resource, "removing a container no longer in the manifest");
            if let Err(f) = self.remove(&docker, &c.id).await {
                tracing::warn!(container = %c.id, reason = %f.reason, message = %f.message, "cannot remove container");
                if let Some(id) = resource.as_ref().and_then(|r| r.parse::<ResourceId>().ok()) {
                    out.failed.push((id, ResourceKind::Container, f));
                }
            }
        }
        let mut memory = self.memory();
        memory
            .repairs
            .retain(|id, _| listed_ids.contains(&id.to_string()));
        memory.may_own = has_containers || !out.failed.is_empty();
        out
    }
}
