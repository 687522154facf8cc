//! `flotilla watch`: one line per change of agent status, inventory,
//! deployments and deployment status, until Ctrl-C.
//!
//! One KV watch (an ordered consumer, new updates only) over the four key
//! families. A watch recreates its consumer after a server restart, so an
//! error item is reported and the loop goes on.
//!
//! Heartbeats are watched too, but not printed: a line appears when an
//! agent's liveness changes (Online → Stale → Offline, and back), judged by
//! server time as everywhere else.

use std::collections::BTreeMap;
use std::time::SystemTime;

use async_nats::jetstream::kv;
use futures::StreamExt;
use manifest_types::convergence::{Liveness, Thresholds};
use manifest_types::keys::{self, Key};
use manifest_types::{
    AgentId, AgentInventory, AgentStatus, Deployment, DeploymentStatus, Heartbeat,
};
use serde::Serialize;

use crate::args::{Format, GlobalArgs};
use manifest_types::convergence::{self, AgentReport, Target, rejection_line, resource_detail};

use crate::exit::CliError;
use crate::kv::{Decode, Fleet};
use crate::output;

/// The families watched.
pub const WATCHED: [&str; 4] = [
    keys::ACTUAL_STATE,
    keys::DEPLOYMENT_STATUS,
    keys::DEPLOYMENTS,
    keys::AGENTS,
];

pub async fn run(g: &GlobalArgs) -> Result<(), CliError> {
    let fleet = Fleet::open(g).await?;
    let mut watch = fleet
        .store
        .watch_many(WATCHED.map(keys::all))
        .await
        .map_err(|e| CliError::nats("cannot start the watch", e))?;
    // Heartbeats are followed quietly, from their current values: only a
    // change of an agent's liveness is printed.
    let mut beats = fleet
        .heartbeats
        .watch(keys::all(keys::HEARTBEAT))
        .await
        .map_err(|e| CliError::nats("cannot watch heartbeats", e))?;
    eprintln!(
        "watching {} in bucket {} and liveness at {} (Ctrl-C to stop)",
        WATCHED.map(keys::all).join(", "),
        fleet.store.name,
        fleet.url
    );
    let thresholds = g.thresholds();
    // "Now" starts at the server's clock, not at the newest heartbeat: in a
    // quiet fleet that one may be long past.
    // One read after the watch started: every agent's last heartbeat and
    // the server's clock, so nothing falls between the two.
    let current = fleet.snapshot(&[keys::HEARTBEAT]).await?;
    let mut liveness = LivenessWatch {
        clock: Some((current.server_time, tokio::time::Instant::now())),
        ..LivenessWatch::default()
    };
    for entry in current.entries.values() {
        liveness.beat(entry);
    }
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            // Cancel-safe: nothing is in flight between items.
            _ = &mut ctrl_c => return Ok(()),
            item = watch.next() => match item {
                Some(Ok(entry)) => {
                    liveness.seen(&entry);
                    println!("{}", line(g.output, &entry));
                }
                Some(Err(e)) => eprintln!("warning: watch: {e}"),
                None => return Err(CliError::nats(
                    "the watch ended",
                    std::io::Error::other("consumer closed"),
                )),
            },
            // Cancel-safe: as above.
            Some(item) = beats.next() => match item {
                Ok(entry) => liveness.beat(&entry),
                Err(e) => eprintln!("warning: heartbeat watch: {e}"),
            },
            // Cancel-safe: a timer.
            _ = tick.tick() => {
                for change in liveness.changes(&thresholds) {
                    println!("{}", change.line(g.output));
                }
            }
        }
    }
}

/// Each agent's last heartbeat by server time, and the liveness last shown.
/// "Now" in server time is the newest server timestamp received plus the
/// time this process has waited since (its monotonic clock, not its
/// calendar), so an agent whose heartbeats stop goes Stale, then Offline,
/// without anything being written.
#[derive(Default)]
struct LivenessWatch {
    agents: BTreeMap<AgentId, Beat>,
    /// The newest server timestamp seen, and when it arrived here.
    clock: Option<(SystemTime, tokio::time::Instant)>,
}

struct Beat {
    at: SystemTime,
    interval: Option<std::time::Duration>,
    shown: Option<Liveness>,
}

struct LivenessChange {
    agent: AgentId,
    from: Option<Liveness>,
    to: Liveness,
    age: std::time::Duration,
    now: SystemTime,
}

impl LivenessWatch {
    fn seen(&mut self, e: &kv::Entry) {
        let t = SystemTime::from(e.created);
        if self.clock.is_none_or(|(c, _)| t > c) {
            self.clock = Some((t, tokio::time::Instant::now()));
        }
    }

    fn beat(&mut self, e: &kv::Entry) {
        self.seen(e);
        let Some(Key::Heartbeat(agent)) = Key::parse(&e.key) else {
            return;
        };
        if e.operation != kv::Operation::Put {
            return;
        }
        let interval = serde_json::from_slice::<Heartbeat>(&e.value)
            .ok()
            .and_then(|h| h.interval());
        let at = SystemTime::from(e.created);
        let b = self.agents.entry(agent).or_insert(Beat {
            at,
            interval,
            shown: None,
        });
        b.at = b.at.max(at);
        b.interval = interval;
    }

    fn now(&self) -> Option<SystemTime> {
        self.clock.map(|(t, at)| t + at.elapsed())
    }

    /// Agents whose liveness changed since last shown (the first verdict of
    /// each agent is recorded, not shown).
    fn changes(&mut self, thresholds: &Thresholds) -> Vec<LivenessChange> {
        let Some(now) = self.now() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (agent, b) in &mut self.agents {
            let age = now.duration_since(b.at).unwrap_or_default();
            let (to, _) = convergence::liveness(
                &AgentReport {
                    heartbeat_age: Some(age),
                    heartbeat_interval: b.interval,
                    ..AgentReport::default()
                },
                thresholds,
            );
            match b.shown.replace(to) {
                None => {}
                Some(from) if from == to => {}
                from => out.push(LivenessChange {
                    agent: agent.clone(),
                    from,
                    to,
                    age,
                    now,
                }),
            }
        }
        out
    }
}

impl LivenessChange {
    fn line(&self, format: Format) -> String {
        let time = output::rfc3339(self.now);
        let key = keys::heartbeat(&self.agent);
        if format != Format::Table {
            return serde_json::json!({
                "time": time, "key": key, "agent": self.agent,
                "liveness": self.to.as_str(),
                "previous": self.from.map(Liveness::as_str),
                "heartbeatAgeSeconds": self.age.as_secs(),
            })
            .to_string();
        }
        let clock = time.get(11..19).unwrap_or(&time);
        format!(
            "{clock}  {key}: {} -> {} (last heartbeat {} ago)",
            self.from.map_or("-", Liveness::as_str),
            self.to,
            output::age(self.age)
        )
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ChangeDoc<'a> {
    time: String,
    key: &'a str,
    /// The entry's KV sequence.
    kv_sequence: u64,
    /// For `deployments.<name>`: the deployment's revision (its KV sequence).
    #[serde(skip_serializing_if = "Option::is_none")]
    revision: Option<u64>,
    operation: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<serde_json::Value>,
}

fn operation(op: kv::Operation) -> &'static str {
    match op {
        kv::Operation::Put => "put",
        kv::Operation::Delete => "delete",
        kv::Operation::Purge => "purge",
    }
}

/// One output line for a change: a summary, or (JSON/YAML) a compact JSON
/// object with the value as stored.
pub fn line(format: Format, e: &kv::Entry) -> String {
    let time = output::rfc3339(SystemTime::from(e.created));
    let deployment = matches!(Key::parse(&e.key), Some(Key::Deployment(_)));
    if format != Format::Table {
        let doc = ChangeDoc {
            time,
            key: &e.key,
            kv_sequence: e.revision,
            revision: deployment.then_some(e.revision),
            operation: operation(e.operation),
            value: serde_json::from_slice(&e.value).ok(),
        };
        return serde_json::to_string(&doc).unwrap_or_default();
    }
    let clock = time.get(11..19).unwrap_or(&time);
    let what = if e.operation == kv::Operation::Put {
        summary(&e.key, &e.value)
    } else {
        format!("{}d", operation(e.operation))
    };
    // A deployment's KV sequence is its revision, and is called so.
    let counter = if deployment {
        "revision"
    } else {
        "KV sequence"
    };
    format!("{clock}  {} ({counter} {}): {what}", e.key, e.revision)
}

fn decoded<T: Decode>(bytes: &[u8]) -> Result<T, String> {
    T::decode(bytes).map_err(|m| format!("unreadable: {m}"))
}

/// A one-line summary of a stored value.
pub fn summary(key: &str, bytes: &[u8]) -> String {
    let text = match Key::parse(key) {
        Some(Key::ActualState(_)) => decoded::<AgentStatus>(bytes).map(|s| {
            // What this status says on the newest generation it looked at; a
            // status being written proves the agent alive at that instant.
            let verdict = convergence::assess(
                &AgentReport {
                    status: Some(&s),
                    heartbeat_age: Some(std::time::Duration::ZERO),
                    ..AgentReport::default()
                },
                Target::Agent {
                    generation: s.observed_generation,
                },
                &convergence::Thresholds::default(),
            );
            let mut t = format!(
                "{}, generation {}, {}/{} resources ready",
                verdict.state.as_str(),
                s.manifest_generation,
                s.ready_count(),
                s.resources.len()
            );
            if let Some(r) = &s.rejection {
                t.push_str(&format!("; rejected {}", rejection_line(r)));
            }
            if let Some((id, r)) = s.resources.iter().find(|(_, r)| !r.state.is_ready()) {
                t.push_str(&format!("; {id} {}", resource_detail(&r.state)));
            }
            t
        }),
        Some(Key::DeploymentStatus(_)) => decoded::<DeploymentStatus>(bytes).map(|s| {
            let mut t = format!(
                "rendered revision {} to {} agents",
                s.observed_revision,
                s.targets.len()
            );
            if !s.conflicts.is_empty() {
                t.push_str(&format!(", {} conflicts", s.conflicts.len()));
            }
            if let Some(e) = &s.error {
                t = format!("cannot render revision {}: {e}", s.observed_revision);
            }
            t
        }),
        Some(Key::Deployment(_)) => decoded::<Deployment>(bytes)
            .map(|d| format!("applied, {} resources", d.resources.len())),
        Some(Key::Inventory(_)) => decoded::<AgentInventory>(bytes).map(|i| {
            format!(
                "agent {} {}/{}, labels {}",
                i.agent_version,
                i.os,
                i.arch,
                output::labels(&i.labels)
            )
        }),
        _ => Ok(format!("{} bytes", bytes.len())),
    };
    text.unwrap_or_else(|e| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let status = include_str!("../../manifest-types/tests/golden/agent-status.json");
        let s = summary("actual-state.pi-01", status.as_bytes());
        assert!(
            s.starts_with("Rejected, generation 4, 2/3 resources ready"),
            "{s}"
        );
        assert!(
            s.contains("web/service Failed: ReconcilerUnavailable"),
            "{s}"
        );
        let ds = include_str!("../../manifest-types/tests/golden/deployment-status.json");
        assert_eq!(
            summary("deployment-status.web", ds.as_bytes()),
            "rendered revision 12 to 2 agents, 1 conflicts"
        );
        let d = include_str!("../../manifest-types/tests/golden/deployment.json");
        assert!(summary("deployments.web", d.as_bytes()).starts_with("applied, "));
        assert!(summary("agents.pi-1", b"{").starts_with("unreadable: "));
    }

    fn entry(key: &str, revision: u64, operation: kv::Operation) -> kv::Entry {
        kv::Entry {
            bucket: "fleet".into(),
            key: key.into(),
            value: Default::default(),
            revision,
            delta: 0,
            created: (SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(3600)).into(),
            operation,
            seen_current: true,
        }
    }

    #[test]
    fn a_deployment_has_a_revision_every_other_key_a_kv_sequence() {
        let d = entry("deployments.web", 12, kv::Operation::Delete);
        assert_eq!(
            line(Format::Table, &d),
            "01:00:00  deployments.web (revision 12): deleted"
        );
        let doc: serde_json::Value = serde_json::from_str(&line(Format::Json, &d)).unwrap();
        assert_eq!(
            (&doc["kvSequence"], &doc["revision"]),
            (&12.into(), &12.into())
        );

        let s = entry("actual-state.pi-1", 40, kv::Operation::Purge);
        assert_eq!(
            line(Format::Table, &s),
            "01:00:00  actual-state.pi-1 (KV sequence 40): purged"
        );
        let doc: serde_json::Value = serde_json::from_str(&line(Format::Json, &s)).unwrap();
        assert_eq!(doc["kvSequence"], 40);
        assert!(doc.get("revision").is_none(), "{doc}");
    }
}
