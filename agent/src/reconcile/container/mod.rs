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
//! The decisions ([`plan`], [`assess`]) are pure (`planning`); the engine
//! is reached through the [`ContainerEngine`] seam (`engine`), whose real
//! implementation is [`DockerEngine`] (`docker`, with `body`, the engine's
//! create request); this module drives them. The unit tests below run the
//! reconciler against a scripted engine (`fake`).

mod body;
mod docker;
mod engine;
#[cfg(test)]
mod fake;
mod planning;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use manifest_types::spec::PullPolicy;
use manifest_types::{
    AgentId, AgentManifest, ContainerSpec, FailureReason, ReadyDetails, ResourceId, ResourceKind,
};

pub use docker::DockerEngine;
pub use engine::{ContainerEngine, ContainerStatus, HealthStatus, Inspected, ListedState, Summary};
pub use planning::{Listed, Plan, assess, container_name, effective_hash, image_ref, plan};

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

/// Converges Container resources on one engine. Shared by concurrent
/// reconciles: its small memory sits behind one lock that is never held
/// across an engine call.
#[derive(Debug)]
pub struct ContainerReconciler<E = DockerEngine> {
    agent: AgentId,
    engine: E,
    stop_timeout: Duration,
    memory: std::sync::Mutex<Memory>,
}

#[derive(Debug)]
struct Memory {
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

/// Whether a freshly started replacement is failing, so the replacement is
/// rolled back: it exited, crash-loops or did not start — or the engine
/// went away or refused in the middle of the swap.
fn failed_to_start(outcome: &Outcome) -> Option<&Failure> {
    match outcome {
        Outcome::Failed(
            f @ Failure {
                reason:
                    FailureReason::CrashLoopBackOff
                    | FailureReason::ContainerExited
                    | FailureReason::ContainerNotRunning
                    | FailureReason::StartFailed
                    | FailureReason::DockerUnavailable
                    | FailureReason::DockerError,
                ..
            },
        ) => Some(f),
        _ => None,
    }
}

impl ContainerReconciler<DockerEngine> {
    /// On Docker Engine at `docker_host` (a `unix://` path), or at
    /// DOCKER_HOST / the default socket when None.
    pub fn new(agent: AgentId, docker_host: Option<String>, stop_timeout: Duration) -> Self {
        Self::with_engine(agent, DockerEngine::new(docker_host), stop_timeout)
    }
}

impl<E: ContainerEngine> ContainerReconciler<E> {
    pub fn with_engine(agent: AgentId, engine: E, stop_timeout: Duration) -> Self {
        Self {
            agent,
            engine,
            stop_timeout,
            memory: std::sync::Mutex::new(Memory {
                repairs: BTreeMap::new(),
                may_own: true,
                started: BTreeMap::new(),
                digests: HashMap::new(),
            }),
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().expect("container reconciler lock")
    }

    /// Whether the engine answers now: its version, or why not.
    pub async fn probe(&self) -> Result<String, Failure> {
        self.engine.version().await
    }

    /// This agent's containers (of one resource, or all), each with its
    /// resource label.
    async fn list(
        &self,
        resource: Option<&ResourceId>,
    ) -> Result<Vec<(Listed, Option<String>)>, Failure> {
        let agent = self.agent.as_str();
        let resource = resource.map(ToString::to_string);
        let mut labels = vec![(LABEL_AGENT, agent)];
        if let Some(r) = &resource {
            labels.push((LABEL_RESOURCE, r.as_str()));
        }
        let summaries = self.engine.list(&labels).await?;
        Ok(summaries
            .into_iter()
            .filter_map(|s| {
                // The engine filtered by label; check again, never trust a guess.
                if s.labels.get(LABEL_AGENT).map(String::as_str) != Some(agent) {
                    return None;
                }
                Some((
                    Listed {
                        id: s.id,
                        hash: s.labels.get(LABEL_HASH).cloned().unwrap_or_default(),
                        state: s.state,
                        created: s.created,
                    },
                    s.labels.get(LABEL_RESOURCE).cloned(),
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
            Plan::Create { clear, replace } => {
                let repair = replace.is_empty() && known;
                if repair {
                    tracing::warn!(resource = %id, "container was removed outside Flotilla; recreating it");
                }
                // The only long step, and a safe point: a newer manifest
                // that changes this resource interrupts the pull.
                tokio::select! {
                    pulled = self.ensure_image(spec, &progress) => pulled?,
                    () = interrupt.requested() => return Ok(Outcome::Interrupted),
                }
                // A dead container of this hash still holds its name.
                for gone in &clear {
                    self.engine.remove(gone).await?;
                    tracing::info!(resource = %id, container = %gone, "removed a dead container holding the name");
                }
                progress.report("creating container");
                let new = self.create(id, spec, hash).await?;
                // The previous containers that were running, to start again
                // should the new one fail.
                let running: Vec<String> = listed
                    .iter()
                    .filter(|c| matches!(c.state, ListedState::Running | ListedState::Restarting))
                    .map(|c| c.id.clone())
                    .collect();
                for old in &replace {
                    self.engine.stop(old, self.stop_timeout).await?;
                }
                progress.report("starting container");
                let outcome = self.start_and_settle(id, &new, repairs).await;
                if let Some(f) = failed_to_start(&outcome).filter(|_| !running.is_empty()) {
                    return self.roll_back(id, &new, &running, f.clone()).await;
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
                self.engine.start(&cid).await?;
                self.memory()
                    .started
                    .insert(id.clone(), std::time::Instant::now());
                tokio::time::sleep(START_SETTLE).await;
                (cid, remove, repair)
            }
            Plan::Observe { id: cid, remove } => (cid, remove, false),
        };
        for old in &remove {
            self.remove(old).await?;
            crate::fault::exit_at("old-container-removed");
        }
        let repairs = if repaired { repairs + 1 } else { repairs };
        self.memory()
            .repairs
            .insert(id.clone(), (hash.to_owned(), repairs));
        self.observe(&container, repairs).await
    }

    /// Starts a freshly created container, waits [`START_SETTLE`] and
    /// reports how it is doing; any failure, the engine's included, is the
    /// outcome.
    async fn start_and_settle(&self, id: &ResourceId, container: &str, repairs: u64) -> Outcome {
        if let Err(f) = self.engine.start(container).await {
            return Outcome::Failed(f);
        }
        self.memory()
            .started
            .insert(id.clone(), std::time::Instant::now());
        crate::fault::exit_at("container-started");
        tokio::time::sleep(START_SETTLE).await;
        self.observe(container, repairs)
            .await
            .unwrap_or_else(Outcome::Failed)
    }

    /// The replacement failed to start or crash-loops: remove it and start
    /// the previous container again, so a failed update never leaves the
    /// device with nothing running.
    async fn roll_back(
        &self,
        id: &ResourceId,
        new: &str,
        previous: &[String],
        why: Failure,
    ) -> Result<Outcome, Failure> {
        tracing::warn!(resource = %id, container = %new, reason = %why.reason, message = %why.message,
            "the new container failed; starting the previous one again");
        self.remove(new).await?;
        for old in previous {
            self.engine.start(old).await?;
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

    async fn observe(&self, container: &str, repairs: u64) -> Result<Outcome, Failure> {
        let inspect = self.engine.inspect(container).await?;
        let mut outcome = assess(&inspect, SystemTime::now(), repairs);
        // Running again after a crash, the engine shows the restart count but
        // no longer the exit code: the event log still has it.
        if let Outcome::Failed(f) = &mut outcome
            && f.reason == FailureReason::CrashLoopBackOff
            && inspect.status == ContainerStatus::Running
            && let Some(created) = inspect.created
            && let Some(code) = self.engine.last_exit_code(container, created).await
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
            *image_digest = self.digest(image_id).await;
        }
        Ok(outcome)
    }

    async fn digest(&self, image_id: &str) -> Option<String> {
        if let Some(d) = self.memory().digests.get(image_id) {
            return d.clone();
        }
        let digest = self.engine.image_digest(image_id).await.ok()?;
        self.memory()
            .digests
            .insert(image_id.to_owned(), digest.clone());
        digest
    }

    async fn ensure_image(&self, spec: &ContainerSpec, progress: &Progress) -> Result<(), Failure> {
        let reference = image_ref(spec);
        let present = self.engine.has_image(&reference).await?;
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
        let on_status = |status: &str| {
            tracing::info!(image = %reference, %status, "pull progress");
            progress.report(format!("pulling {reference}: {status}"));
        };
        self.engine.pull(&reference, &on_status).await
    }

    async fn create(
        &self,
        id: &ResourceId,
        spec: &ContainerSpec,
        hash: &str,
    ) -> Result<String, Failure> {
        let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        labels.insert(LABEL_AGENT.into(), self.agent.to_string());
        labels.insert(LABEL_RESOURCE.into(), id.to_string());
        labels.insert(LABEL_HASH.into(), hash.to_owned());
        let name = container_name(&self.agent, id, hash);
        let created = self.engine.create(&name, spec, labels).await?;
        tracing::info!(resource = %id, container = %created, %name, "container created");
        crate::fault::exit_at("container-created");
        Ok(created)
    }

    /// Stops, then removes, a container.
    async fn remove(&self, id: &str) -> Result<(), Failure> {
        self.engine.stop(id, self.stop_timeout).await?;
        self.engine.remove(id).await?;
        tracing::info!(container = %id, "container removed");
        Ok(())
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
        for (c, resource) in &listed {
            if resource.as_ref().is_some_and(|r| listed_ids.contains(r)) {
                continue;
            }
            tracing::info!(container = %c.id, resource = ?resource, "removing a container no longer in the manifest");
            if let Err(f) = self.remove(&c.id).await {
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

/// The reconciler against a scripted engine: the failure paths a real
/// Docker Engine reaches only slowly and not on cue.
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use manifest_types::{ManagedResource, ResourceSpec};

    use super::fake::{Engine, FakeEngine, OnStart, Outage};
    use super::*;
    use crate::reconcile::Interrupt;
    use crate::status::StatusBoard;

    const V1: &str = "app:1";
    const V2: &str = "app:2";

    fn rig(f: impl FnOnce(&mut Engine)) -> ContainerReconciler<FakeEngine> {
        ContainerReconciler::with_engine(
            AgentId::new("pi-1").unwrap(),
            FakeEngine::with(|e| {
                e.images.extend([V1.to_owned(), V2.to_owned()]);
                f(e);
            }),
            Duration::from_secs(10),
        )
    }

    fn id() -> ResourceId {
        "web/app".parse().unwrap()
    }

    fn spec(image: &str) -> ContainerSpec {
        serde_json::from_value(serde_json::json!({ "image": image })).unwrap()
    }

    fn ctx_for(spec: &ContainerSpec) -> Ctx {
        let resource = Arc::new(ManagedResource {
            id: id(),
            spec: ResourceSpec::Container(spec.clone()),
            restart_on: vec![],
            source: None,
        });
        let (board, _) = StatusBoard::new(AgentId::new("pi-1").unwrap(), "test".into());
        Ctx {
            progress: Progress::new(board, resource),
            interrupt: Interrupt::new().1,
        }
    }

    async fn run(r: &ContainerReconciler<FakeEngine>, image: &str) -> Outcome {
        let spec = spec(image);
        // One hash per image: the version is the spec.
        let hash = crate::reconcile::file::sha256_hex(image.as_bytes());
        r.reconcile(&id(), &spec, &hash, ctx_for(&spec)).await
    }

    /// The container the Ready outcome names.
    fn ready(o: &Outcome) -> (String, u64) {
        match o {
            Outcome::Ready {
                details:
                    ReadyDetails::Container {
                        container_id,
                        repairs,
                        ..
                    },
                ..
            } => (container_id.clone(), *repairs),
            other => panic!("not Ready: {other:?}"),
        }
    }

    fn failure(o: &Outcome) -> (FailureReason, String) {
        match o {
            Outcome::Failed(f) => (f.reason, f.message.clone()),
            other => panic!("not Failed: {other:?}"),
        }
    }

    fn status(r: &ContainerReconciler<FakeEngine>, id: &str) -> Option<ContainerStatus> {
        r.engine.lock().containers.get(id).map(|c| c.status)
    }

    fn calls(r: &ContainerReconciler<FakeEngine>) -> Vec<String> {
        std::mem::take(&mut r.engine.lock().calls)
    }

    #[tokio::test(start_paused = true)]
    async fn creates_starts_and_then_only_observes() {
        let r = rig(|_| {});
        assert_eq!(ready(&run(&r, V1).await), ("c1".into(), 0));
        assert_eq!(calls(&r), ["create c1", "start c1"]);
        assert_eq!(ready(&run(&r, V1).await), ("c1".into(), 0));
        assert!(calls(&r).is_empty(), "a converged container is not touched");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_container_holding_the_name_is_removed_before_the_create() {
        let r = rig(|_| {});
        ready(&run(&r, V1).await);
        // The container died (the engine marks it dead, or is removing it)
        // and still holds the deterministic name.
        r.engine.lock().containers.get_mut("c1").unwrap().status = ContainerStatus::Dead;
        calls(&r);
        // Recreated, and counted as a repair.
        assert_eq!(ready(&run(&r, V1).await), ("c2".into(), 1));
        assert_eq!(calls(&r), ["remove c1", "create c2", "start c2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_engine_gone_in_the_middle_of_a_replace_starts_the_previous_container_again() {
        let r = rig(|_| {});
        ready(&run(&r, V1).await);
        calls(&r);
        // The engine restarts just as the new container is started.
        r.engine
            .lock()
            .outages
            .insert("start c2".into(), Outage::Blip);
        let (reason, message) = failure(&run(&r, V2).await);
        assert_eq!(reason, FailureReason::ReplaceFailed);
        assert!(message.contains("DockerUnavailable"), "{message}");
        assert_eq!(status(&r, "c1"), Some(ContainerStatus::Running));
        assert_eq!(status(&r, "c2"), None, "the failed replacement is removed");
        assert_eq!(
            calls(&r),
            ["create c2", "stop c1", "stop c2", "remove c2", "start c1"]
        );
        // The engine answers again: the next pass replaces for real.
        assert_eq!(ready(&run(&r, V2).await), ("c3".into(), 0));
        assert_eq!(status(&r, "c1"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_engine_that_stays_gone_mid_replace_is_unavailable_until_it_returns() {
        let r = rig(|_| {});
        ready(&run(&r, V1).await);
        r.engine
            .lock()
            .outages
            .insert("start c2".into(), Outage::Down);
        let (reason, _) = failure(&run(&r, V2).await);
        assert_eq!(reason, FailureReason::DockerUnavailable);
        assert_eq!(
            failure(&run(&r, V2).await).0,
            FailureReason::DockerUnavailable
        );
        // Back: the created replacement is started, the old one removed.
        r.engine.lock().down = false;
        calls(&r);
        assert_eq!(ready(&run(&r, V2).await), ("c2".into(), 0));
        assert_eq!(calls(&r), ["start c2", "stop c1", "remove c1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replacement_that_exits_or_cannot_start_is_rolled_back() {
        for on_start in [OnStart::Exit(3), OnStart::Refuse] {
            let r = rig(|e| {
                e.on_start.insert(V2.into(), on_start);
            });
            ready(&run(&r, V1).await);
            let (reason, message) = failure(&run(&r, V2).await);
            assert_eq!(reason, FailureReason::ReplaceFailed, "{on_start:?}");
            assert!(
                message.contains("ContainerExited") || message.contains("StartFailed"),
                "{message}"
            );
            assert_eq!(status(&r, "c1"), Some(ContainerStatus::Running));
            assert_eq!(status(&r, "c2"), None);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_health_check_turning_unhealthy_after_ready_is_failed_until_it_recovers() {
        let r = rig(|e| {
            e.health.insert(V1.into(), HealthStatus::Starting);
        });
        assert!(matches!(run(&r, V1).await, Outcome::Waiting { .. }));
        let set = |h| r.engine.lock().containers.get_mut("c1").unwrap().health = Some(h);
        set(HealthStatus::Healthy);
        ready(&run(&r, V1).await);
        set(HealthStatus::Unhealthy);
        assert_eq!(failure(&run(&r, V1).await).0, FailureReason::Unhealthy);
        set(HealthStatus::Healthy);
        assert_eq!(ready(&run(&r, V1).await), ("c1".into(), 0));
        // Restarting an unhealthy container is the engine's business.
        assert_eq!(calls(&r), ["create c1", "start c1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn containers_removed_or_stopped_by_hand_are_repaired_and_counted() {
        let r = rig(|_| {});
        ready(&run(&r, V1).await);
        r.engine.lock().containers.remove("c1");
        assert_eq!(ready(&run(&r, V1).await), ("c2".into(), 1));
        // `always` (the default policy): a stop by hand is repaired too.
        r.engine.lock().containers.get_mut("c2").unwrap().status = ContainerStatus::Exited;
        assert_eq!(ready(&run(&r, V1).await), ("c2".into(), 2));
    }

    #[tokio::test(start_paused = true)]
    async fn pull_failures_are_typed_and_nothing_is_created() {
        let r = rig(|e| {
            e.registry.insert("app:3".into());
        });
        assert_eq!(ready(&run(&r, "app:3").await).0, "c1");
        assert_eq!(calls(&r), ["pull app:3", "create c1", "start c1"]);
        let (reason, message) = failure(&run(&r, "app:404").await);
        assert_eq!(reason, FailureReason::ImagePullFailed);
        assert!(message.contains("app:404"), "{message}");
        let mut never = spec("app:404");
        never.pull_policy = PullPolicy::Never;
        assert_eq!(
            r.converge(&id(), &never, "h", ctx_for(&never))
                .await
                .unwrap_err()
                .reason,
            FailureReason::ImageNotPresent
        );
        assert_eq!(status(&r, "c1"), Some(ContainerStatus::Running));
        assert_eq!(calls(&r), ["pull app:404"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_removal_sweep_touches_only_this_agents_unlisted_containers() {
        let foreign = |labels: &[(&str, &str)]| fake::Container {
            name: format!("foreign-{}", labels.len()),
            image: V1.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            status: ContainerStatus::Running,
            exit_code: 0,
            started_at: String::new(),
            health: None,
            created: 0,
        };
        let r = rig(|e| {
            e.containers.insert("someone-else".into(), foreign(&[]));
            e.containers.insert(
                "other-agent".into(),
                foreign(&[(LABEL_AGENT, "pi-2"), (LABEL_RESOURCE, "web/app")]),
            );
        });
        ready(&run(&r, V1).await);
        let empty = AgentManifest {
            agent_id: AgentId::new("pi-1").unwrap(),
            generation: 2,
            resources: vec![],
            signatures: vec![],
        };
        let dropped = [(id(), ResourceKind::Container)];
        // The engine is away: the container is still owed, not forgotten.
        r.engine.lock().down = true;
        let owed = r.remove_unlisted(&empty, &dropped).await;
        assert_eq!(owed.failed.len(), 1);
        assert_eq!(owed.failed[0].2.reason, FailureReason::DockerUnavailable);
        r.engine.lock().down = false;
        let done = r.remove_unlisted(&empty, &dropped).await;
        assert!(done.failed.is_empty(), "{:?}", done.failed);
        let left: Vec<String> = r.engine.lock().containers.keys().cloned().collect();
        assert_eq!(left, ["other-agent", "someone-else"]);
    }
}
