//! Compare-and-swap writes of what the control plane owns: agent manifests
//! (`desired-state.<id>`) and deployment statuses (`deployment-status.<name>`).
//!
//! Manifest rules (docs/ARCHITECTURE.md "Generations, admission and
//! compare-and-swap", docs/adr/0003 and 0012):
//! - a desired-state key is never deleted, and generations strictly increase;
//! - the stored manifest stands (no write) only when it is the control
//!   plane's own rendering of the same resources and the agent can accept it:
//!   its generation is not below the [`Floor`] (the agent's accepted and
//!   observed generations, the highest generation this control plane wrote)
//!   and the agent did not reject it as a replayed generation;
//! - otherwise a new value is written above both the stored generation and
//!   the floor, with `update(key, value, revision)` against the KV sequence
//!   just read — whether the resources changed or someone else put a value
//!   there (a hand edit, an older value put back, a restored backup);
//! - no readable manifest (key missing, DEL/PURGE marker, unreadable bytes,
//!   another agent's id) → the key is (re)created above whatever generation
//!   can still be read there, the floor and the agent's `observedGeneration`
//!   read afresh, so the agent never sees a replayed generation;
//! - a lost race (`WrongLastRevision`) re-reads and retries on fresh state,
//!   at most [`MAX_ATTEMPTS`] times.
//!
//! Both kinds of write go through one loop, `cas`: read the key, decide
//! (keep what is stored, or write these bytes), `update` against the KV
//! sequence read, and on a lost race read and decide again.

use async_nats::jetstream::kv::{self, Operation, Store, UpdateErrorKind};
use bytes::Bytes;
use manifest_types::manifest::probe_generation;
use manifest_types::signing::SigningKeys;
use manifest_types::{
    AgentId, AgentManifest, DeploymentStatus, ManagedResource, RejectionReason, keys,
};

/// How many times a write is tried before a lost CAS race is an error.
pub const MAX_ATTEMPTS: usize = 5;

/// What the agent and this control plane have already seen of one agent's
/// key. A stored manifest below it cannot stand; a new one is written above it
/// (docs/adr/0012-the-control-plane-owns-desired-state.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Floor {
    /// The highest of the agent's accepted (`manifestGeneration`) and
    /// observed (`observedGeneration`) generations and the highest generation
    /// this control plane has written for the agent.
    pub generation: u64,
    /// The KV sequence of a desired-state value the agent rejected as a
    /// replayed generation: that value never stands.
    pub replayed_revision: Option<u64>,
}

impl Floor {
    /// Whether a stored value at `generation` and KV sequence `revision` can
    /// be one the agent accepts, judged by what it reported.
    pub fn admits(&self, generation: u64, revision: u64) -> bool {
        generation >= self.generation && self.replayed_revision != Some(revision)
    }

    /// The generation a new manifest is written at over a stored one at
    /// `generation`: one above both.
    pub fn next_above(&self, generation: u64) -> u64 {
        generation.max(self.generation) + 1
    }

    /// Whether `stored` (at KV sequence `revision`, addressed to the agent) is the
    /// control plane's own rendering of `resources`, signed by exactly
    /// `signing`'s keys, that the agent can accept, so it stands and nothing
    /// is written. A key added or retired is thus a rewrite of every
    /// manifest. `stored`'s signatures must have been checked
    /// ([`SigningKeys::keep_verified`]) when it was read.
    pub fn stands(
        &self,
        stored: &AgentManifest,
        revision: u64,
        resources: &[ManagedResource],
        signing: &SigningKeys,
    ) -> bool {
        self.admits(stored.generation, revision)
            && stored.resources == resources
            && signing.carries(stored)
    }
}

/// What [`publish_manifest`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// The stored manifest (at this KV sequence) already is the rendering.
    Unchanged { generation: u64, revision: u64 },
    /// A new generation was written at this KV sequence.
    Written { generation: u64, revision: u64 },
}

impl PublishOutcome {
    /// The generation now stored for the agent.
    pub fn generation(&self) -> u64 {
        match *self {
            Self::Unchanged { generation, .. } | Self::Written { generation, .. } => generation,
        }
    }
}

/// What [`publish_manifest_above`] and [`publish_manifest_over`] did, and
/// the manifest now stored (signed as written, or the stored one that
/// stands), so the caller caches it without signing it again.
#[derive(Debug, Clone)]
pub struct Published {
    pub outcome: PublishOutcome,
    pub manifest: AgentManifest,
}

/// What [`publish_deployment_status`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOutcome {
    Unchanged { revision: u64 },
    Written { revision: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read {key}")]
    Read {
        key: String,
        #[source]
        source: kv::EntryError,
    },
    #[error("cannot write {key}")]
    Write {
        key: String,
        #[source]
        source: kv::UpdateError,
    },
    #[error("cannot delete {key}")]
    Delete {
        key: String,
        #[source]
        source: kv::DeleteError,
    },
    #[error("gave up writing {key}: another writer changed it on each of {attempts} attempts")]
    Contended { key: String, attempts: usize },
    #[error("refusing to publish an invalid manifest for {agent}")]
    InvalidManifest {
        agent: AgentId,
        #[source]
        source: manifest_types::ManifestError,
    },
}

/// Publishes `resources` as the (unsigned) manifest of `agent`, knowing of
/// the agent only what the key and its status say; see the module docs.
pub async fn publish_manifest(
    store: &Store,
    agent: &AgentId,
    resources: Vec<ManagedResource>,
) -> Result<PublishOutcome, PublishError> {
    publish_manifest_above(
        store,
        agent,
        resources,
        Floor::default(),
        &SigningKeys::default(),
    )
    .await
    .map(|p| p.outcome)
}

/// Publishes `resources` as the manifest of `agent`, signed with `signing`:
/// the stored value stands only if it reaches `floor`, and a new one is
/// written above it.
pub async fn publish_manifest_above(
    store: &Store,
    agent: &AgentId,
    resources: Vec<ManagedResource>,
    floor: Floor,
    signing: &SigningKeys,
) -> Result<Published, PublishError> {
    let key = keys::desired_state(agent);
    let mut write = ManifestWrite {
        store,
        agent,
        floor,
        signing,
        manifest: checked(agent, resources)?,
    };
    Ok(match cas(store, &key, &mut write).await? {
        Cas::Kept(published) => published,
        Cas::Written(revision) => Published {
            outcome: PublishOutcome::Written {
                generation: write.manifest.generation,
                revision,
            },
            manifest: write.manifest,
        },
    })
}

/// The manifest rules of the module docs as a `cas` decision: `manifest`
/// (the rendering) stands as stored, or is written signed, one generation
/// above everything that is known of the key.
struct ManifestWrite<'a> {
    store: &'a Store,
    agent: &'a AgentId,
    floor: Floor,
    signing: &'a SigningKeys,
    /// The rendering; after a write, the manifest last written.
    manifest: AgentManifest,
}

impl Decide for ManifestWrite<'_> {
    type Kept = Published;

    async fn decide(
        &mut self,
        current: Option<&kv::Entry>,
    ) -> Result<Step<Published>, PublishError> {
        let Self {
            store,
            agent,
            floor,
            signing,
            manifest,
        } = self;
        // The highest generation the new one goes above (with the floor):
        // the stored one, or when there is no readable manifest whatever can
        // still be read there and the agent's `observedGeneration`.
        let above = match current {
            Some(entry) if entry.operation == Operation::Put => {
                match AgentManifest::from_json(&entry.value) {
                    Ok(mut stored) if stored.agent_id == **agent => {
                        signing.keep_verified(&entry.value, &mut stored);
                        if floor.stands(&stored, entry.revision, &manifest.resources, signing) {
                            return Ok(Step::Keep(Published {
                                outcome: PublishOutcome::Unchanged {
                                    generation: stored.generation,
                                    revision: entry.revision,
                                },
                                manifest: stored,
                            }));
                        }
                        stored.generation
                    }
                    // Unreadable or misaddressed: recreate above anything
                    // either side has seen.
                    _ => {
                        // Above what any manifest may carry: never written
                        // by us, never accepted by the agent; not believed.
                        let stored = serde_json::from_slice(&entry.value)
                            .ok()
                            .and_then(|doc| probe_generation(&doc, "generation"))
                            .unwrap_or(0);
                        stored.max(observed_generation(store, agent).await?)
                    }
                }
            }
            // A DEL/PURGE marker, or never written.
            _ => observed_generation(store, agent).await?,
        };
        manifest.generation = floor.next_above(above);
        signing.sign(manifest);
        Ok(Step::Write(Bytes::from(manifest.to_json())))
    }
}

/// [`publish_manifest_above`] for a caller that knows what the key holds: a
/// readable manifest of the agent's at `known.revision` with generation
/// `known.generation` (the daemon's watched copy). The new manifest is
/// written above it and the floor with one CAS against that KV sequence — no
/// read — and only when the key has moved since does it fall back to
/// reading it afresh.
pub async fn publish_manifest_over(
    store: &Store,
    agent: &AgentId,
    resources: Vec<ManagedResource>,
    floor: Floor,
    known: Known,
    signing: &SigningKeys,
) -> Result<Published, PublishError> {
    let key = keys::desired_state(agent);
    let mut manifest = checked(agent, resources)?;
    let generation = floor.next_above(known.generation);
    manifest.generation = generation;
    signing.sign(&mut manifest);
    match update(store, &key, Bytes::from(manifest.to_json()), known.revision).await? {
        Some(revision) => Ok(Published {
            outcome: PublishOutcome::Written {
                generation,
                revision,
            },
            manifest,
        }),
        None => publish_manifest_above(store, agent, manifest.resources, floor, signing).await,
    }
}

/// `resources` as a manifest of `agent` (generation still to be set), if
/// valid.
fn checked(
    agent: &AgentId,
    resources: Vec<ManagedResource>,
) -> Result<AgentManifest, PublishError> {
    let mut manifest = AgentManifest::empty(agent.clone(), 0);
    manifest.resources = resources;
    manifest
        .validate()
        .map_err(|source| PublishError::InvalidManifest {
            agent: agent.clone(),
            source,
        })?;
    Ok(manifest)
}

/// What the caller knows a desired-state key holds: a readable manifest of
/// its agent, at this KV sequence and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub revision: u64,
    pub generation: u64,
}

/// The highest generation the agent reports having looked at (or accepted),
/// read leniently from `actual-state.<id>`; 0 when there is nothing readable.
pub async fn observed_generation(store: &Store, agent: &AgentId) -> Result<u64, PublishError> {
    let key = keys::actual_state(agent);
    Ok(match read(store, &key).await? {
        Some(entry) if entry.operation == Operation::Put => reported_floor(&entry.value).generation,
        _ => 0,
    })
}

/// The floor an agent's status document (`actual-state.<id>`) sets, read
/// leniently so any version of the document counts: its accepted and
/// observed generations, and the KV sequence it rejected as a replayed
/// generation, if that is its current rejection.
pub fn reported_floor(status: &[u8]) -> Floor {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(status) else {
        return Floor::default();
    };
    // A generation no manifest may carry was never accepted or looked at
    // as a manifest: it is not believed (it would push every later
    // generation towards overflow).
    let field = |name: &str| probe_generation(&doc, name);
    let rejection = doc.get("rejection");
    Floor {
        generation: field("observedGeneration")
            .unwrap_or(0)
            .max(field("manifestGeneration").unwrap_or(0)),
        replayed_revision: rejection
            .filter(|r| {
                r.get("reason")
                    .and_then(serde_json::Value::as_str)
                    .map(RejectionReason::parse)
                    == Some(RejectionReason::ReplayedGeneration)
            })
            .and_then(|r| r.get("revision"))
            .and_then(serde_json::Value::as_u64),
    }
}

/// Writes `status` to `deployment-status.<name>` unless it is already stored
/// there, with CAS against the revision read.
pub async fn publish_deployment_status(
    store: &Store,
    status: &DeploymentStatus,
) -> Result<StatusOutcome, PublishError> {
    let key = keys::deployment_status(&status.name);
    let mut write = StatusWrite {
        status,
        value: Bytes::from(serde_json::to_vec(status).expect("deployment status serialises")),
    };
    Ok(match cas(store, &key, &mut write).await? {
        Cas::Kept(revision) => StatusOutcome::Unchanged { revision },
        Cas::Written(revision) => StatusOutcome::Written { revision },
    })
}

/// A deployment status as a `cas` decision: the stored value stands when it
/// reads as `status`; otherwise `value` (`status` serialised) is written.
struct StatusWrite<'a> {
    status: &'a DeploymentStatus,
    value: Bytes,
}

impl Decide for StatusWrite<'_> {
    /// The KV sequence of the stored status that stands.
    type Kept = u64;

    async fn decide(&mut self, current: Option<&kv::Entry>) -> Result<Step<u64>, PublishError> {
        Ok(match current {
            Some(entry)
                if entry.operation == Operation::Put
                    && serde_json::from_slice::<DeploymentStatus>(&entry.value)
                        .ok()
                        .as_ref()
                        == Some(self.status) =>
            {
                Step::Keep(entry.revision)
            }
            _ => Step::Write(self.value.clone()),
        })
    }
}

/// What a writer makes of its key as `cas` read it: `None` when it was never
/// written, a DEL/PURGE marker as it is.
///
/// A trait rather than an async closure: the daemon's futures must be `Send`,
/// and rustc cannot yet prove that of a future holding an async closure's
/// call (rust-lang/rust#139475).
trait Decide {
    /// What a decision that keeps the stored value answers.
    type Kept;

    fn decide(
        &mut self,
        current: Option<&kv::Entry>,
    ) -> impl Future<Output = Result<Step<Self::Kept>, PublishError>> + Send;
}

/// What a `cas` decision makes of the key as read.
enum Step<T> {
    /// What is stored stands: nothing is written, and `T` is the answer.
    Keep(T),
    /// Write these bytes over what was read.
    Write(Bytes),
}

/// What `cas` did.
#[derive(Debug, PartialEq, Eq)]
enum Cas<T> {
    /// The decision kept what was stored.
    Kept(T),
    /// The bytes of the last decision were written at this KV sequence.
    Written(u64),
}

/// The one compare-and-swap loop of this module: reads `key`, asks `writer`
/// what to make of it, and writes its bytes with `update` against the KV
/// sequence just read (a DEL/PURGE marker's, or 0 — a create — when the key
/// was never written). A lost race re-reads and decides again on fresh
/// state, at most [`MAX_ATTEMPTS`] times, then is [`PublishError::Contended`].
async fn cas<D: Decide + Send>(
    store: &Store,
    key: &str,
    writer: &mut D,
) -> Result<Cas<D::Kept>, PublishError> {
    for _ in 0..MAX_ATTEMPTS {
        let current = read(store, key).await?;
        let value = match writer.decide(current.as_ref()).await? {
            Step::Keep(kept) => return Ok(Cas::Kept(kept)),
            Step::Write(value) => value,
        };
        let expected = current.map_or(0, |entry| entry.revision);
        if let Some(revision) = update(store, key, value, expected).await? {
            return Ok(Cas::Written(revision));
        }
    }
    Err(PublishError::Contended {
        key: key.to_owned(),
        attempts: MAX_ATTEMPTS,
    })
}

/// Compare-and-swap writes of this process that lost to another writer
/// (`flotilla_control_kv_conflicts_total` on `/metrics`).
pub static CAS_CONFLICTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `value` written at `key` if its last KV sequence still is `expected`
/// (0: the key was never written): the new sequence, or `None` when another
/// writer got there first (`WrongLastRevision`).
async fn update(
    store: &Store,
    key: &str,
    value: Bytes,
    expected: u64,
) -> Result<Option<u64>, PublishError> {
    match store.update(key, value, expected).await {
        Ok(revision) => Ok(Some(revision)),
        Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
            CAS_CONFLICTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Counted by the fault campaign (docs/FAULTS.md): keep the words.
            tracing::info!(
                key,
                expected,
                "compare-and-swap conflict: another writer got there first; re-reading"
            );
            Ok(None)
        }
        Err(source) => Err(PublishError::Write {
            key: key.to_owned(),
            source,
        }),
    }
}

/// Removes the status of a deployment that no longer exists (a DEL marker,
/// so `nats kv history` still shows what it was).
pub async fn remove_deployment_status(
    store: &Store,
    name: &manifest_types::DeploymentName,
) -> Result<(), PublishError> {
    let key = keys::deployment_status(name);
    store
        .delete(&key)
        .await
        .map_err(|source| PublishError::Delete { key, source })
}

async fn read(store: &Store, key: &str) -> Result<Option<kv::Entry>, PublishError> {
    store.entry(key).await.map_err(|source| PublishError::Read {
        key: key.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_floor_from_any_status_document() {
        let status = br#"{"manifestGeneration":4,"observedGeneration":7,"rejection":
            {"reason":"ReplayedGeneration","message":"m","revision":31,"generation":3}}"#;
        let floor = reported_floor(status);
        assert_eq!(floor.generation, 7);
        assert_eq!(floor.replayed_revision, Some(31));
        assert!(
            !floor.admits(7, 31),
            "a value the agent rejected as replayed"
        );
        assert!(floor.admits(7, 32));
        assert!(!floor.admits(6, 32), "below what the agent has seen");
        let other = br#"{"manifestGeneration":9,"observedGeneration":2,"rejection":
            {"reason":"PathOutsideRoots","message":"m","revision":40}}"#;
        assert_eq!(
            reported_floor(other),
            Floor {
                generation: 9,
                replayed_revision: None
            }
        );
        assert_eq!(reported_floor(b"{not json"), Floor::default());
        let absurd = br#"{"manifestGeneration":3,"observedGeneration":18446744073709551615}"#;
        assert_eq!(reported_floor(absurd).generation, 3, "not believed");
    }

    /// Writes "mine", but another writer puts the key between each of the
    /// first `races` reads and the write that follows.
    struct Raced<'a> {
        store: &'a Store,
        races: usize,
        /// The value each decision was shown.
        seen: Vec<Option<Bytes>>,
    }

    const KEY: &str = "deployment-status.web";

    impl Decide for Raced<'_> {
        type Kept = ();

        async fn decide(&mut self, current: Option<&kv::Entry>) -> Result<Step<()>, PublishError> {
            self.seen.push(current.map(|e| e.value.clone()));
            if self.seen.len() <= self.races {
                let racer = format!("racer {}", self.seen.len());
                self.store.put(KEY, racer.into()).await.unwrap();
            }
            Ok(Step::Write(Bytes::from_static(b"mine")))
        }
    }

    #[tokio::test]
    async fn cas_decides_again_after_each_lost_race_then_gives_up() {
        let server = testbed::NatsServer::start();
        let js = async_nats::jetstream::new(server.client().await);
        let store = crate::bucket::ensure_bucket(
            &js,
            &manifest_types::BucketName::default(),
            flotilla_nats::Replicas::ONE,
        )
        .await
        .expect("fleet bucket");

        let mut always = Raced {
            store: &store,
            races: MAX_ATTEMPTS,
            seen: Vec::new(),
        };
        let done = cas(&store, KEY, &mut always).await;
        assert!(
            matches!(
                done,
                Err(PublishError::Contended {
                    attempts: MAX_ATTEMPTS,
                    ..
                })
            ),
            "{done:?}"
        );
        assert_eq!(always.seen.len(), MAX_ATTEMPTS, "one decision per attempt");
        assert_eq!(always.seen[0], None, "never written");
        for (i, value) in always.seen.iter().enumerate().skip(1) {
            assert_eq!(value.as_deref(), Some(format!("racer {i}").as_bytes()));
        }

        // One lost race: the second decision sees the racer's value and the
        // write lands above it.
        let mut once = Raced {
            store: &store,
            races: 1,
            seen: Vec::new(),
        };
        let done = cas(&store, KEY, &mut once).await.unwrap();
        let stored = store.entry(KEY).await.unwrap().unwrap();
        assert_eq!(done, Cas::Written(stored.revision));
        assert_eq!(stored.value.as_ref(), b"mine");
        assert_eq!(once.seen.len(), 2);
        assert_eq!(once.seen[1].as_deref(), Some(b"racer 1".as_slice()));
    }

    #[test]
    fn outcome_reports_the_stored_generation() {
        assert_eq!(
            PublishOutcome::Unchanged {
                generation: 4,
                revision: 9
            }
            .generation(),
            4
        );
        assert_eq!(
            PublishOutcome::Written {
                generation: 5,
                revision: 90
            }
            .generation(),
            5
        );
    }
}
