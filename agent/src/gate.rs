//! Manifest admission: the pure decision whether a value read from
//! `desired-state.<id>` becomes the manifest the agent converges to.
//!
//! Rejections keep the last good manifest running; each has a stable reason
//! code (docs/adr/0003-generations-cas-and-convergence.md):
//! the [`ManifestError`](manifest_types::ManifestError) classes, plus
//! the [`SignatureError`] reasons
//! `Unsigned`, `UntrustedKey` and `BadSignature` (checked first, against the
//! configured [`Trust`]), `WrongAgent`, `ReplayedGeneration`,
//! `PathOutsideRoots` (a File or a
//! container bind mount outside the file roots), `PrivilegeNotAllowed` (a
//! container asking for more than the device owner's [`ContainerPolicy`])
//! and `DesiredStateDeleted`.

use std::path::{Path, PathBuf};

use manifest_types::signing::{SignatureError, Trust};
use manifest_types::spec::NetworkMode;
use manifest_types::{AgentId, AgentManifest, Rejection, RejectionReason, ResourceSpec};

use crate::config::{ContainerPolicy, normalise_capability};

/// The manifest currently accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub manifest: AgentManifest,
    pub bytes: Vec<u8>,
    pub revision: u64,
}

#[derive(Debug)]
pub enum Decision {
    /// A new manifest to converge to.
    Accept(Box<Accepted>),
    /// The value is the manifest already accepted (e.g. heard twice).
    Unchanged,
    Reject(Rejection),
}

#[derive(Debug, Clone)]
pub struct Gate {
    pub agent_id: AgentId,
    pub trust: Trust,
    pub roots: Vec<PathBuf>,
    pub containers: ContainerPolicy,
}

impl Gate {
    /// Decides on `bytes` stored at KV `revision`, given the accepted manifest.
    pub fn decide(&self, bytes: &[u8], revision: u64, current: Option<&Accepted>) -> Decision {
        let reject = |reason: RejectionReason, message: String, generation: Option<u64>| {
            Decision::Reject(Rejection {
                reason,
                message,
                revision,
                generation,
            })
        };
        // Signatures first: nothing an untrusted writer put there (its agent
        // id, its generation) is believed, not even in a rejection — a
        // generation reported as observed raises the control plane's floor.
        let believed = match self.trust.admit(bytes) {
            Ok(_) => true,
            // Not JSON, or a `signatures` field of the wrong shape: the
            // parse below names the problem; nothing in it is believed.
            Err(SignatureError::Malformed(_)) => false,
            Err(e) => return reject(e.reason(), e.to_string(), None),
        };
        let manifest = match AgentManifest::from_json(bytes) {
            Ok(m) => m,
            Err(e) => {
                let generation = believed.then(|| sniff_generation(bytes)).flatten();
                return reject(e.reason(), e.to_string(), generation);
            }
        };
        let generation = Some(manifest.generation);
        if manifest.agent_id != self.agent_id {
            return reject(
                RejectionReason::WrongAgent,
                format!(
                    "manifest is addressed to agent {:?}, this is {:?}",
                    manifest.agent_id.as_str(),
                    self.agent_id.as_str()
                ),
                generation,
            );
        }
        if let Some(cur) = current {
            let floor = cur.manifest.generation;
            if manifest.generation == floor
                && (bytes == cur.bytes.as_slice() || manifest == cur.manifest)
            {
                return Decision::Unchanged;
            }
            if manifest.generation <= floor {
                return reject(
                    RejectionReason::ReplayedGeneration,
                    format!(
                        "generation {} is not above the accepted generation {floor} and differs from it",
                        manifest.generation
                    ),
                    generation,
                );
            }
        }
        if let Err(message) = self.check_roots(&manifest) {
            return reject(RejectionReason::PathOutsideRoots, message, generation);
        }
        if let Err(message) = self.check_privileges(&manifest) {
            return reject(RejectionReason::PrivilegeNotAllowed, message, generation);
        }
        Decision::Accept(Box::new(Accepted {
            manifest,
            bytes: bytes.to_vec(),
            revision,
        }))
    }

    fn check_privileges(&self, m: &AgentManifest) -> Result<(), String> {
        let policy = &self.containers;
        for r in &m.resources {
            let ResourceSpec::Container(c) = &r.spec else {
                continue;
            };
            if c.privileged && !policy.allow_privileged {
                return Err(format!(
                    "resource {}: privileged containers are not allowed on this device (agent option --allow-privileged)",
                    r.id
                ));
            }
            if c.network_mode == NetworkMode::Host && !policy.allow_host_network {
                return Err(format!(
                    "resource {}: host networking is not allowed on this device (agent option --allow-host-network)",
                    r.id
                ));
            }
            for cap in &c.cap_add {
                if !policy
                    .allowed_capabilities
                    .contains(&normalise_capability(cap))
                {
                    return Err(format!(
                        "resource {}: capability {cap} is not allowed on this device (agent option --allow-capability)",
                        r.id
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_roots(&self, m: &AgentManifest) -> Result<(), String> {
        for r in &m.resources {
            // A bind mount may be a whole root; a file must be below one.
            let (paths, root_itself): (Vec<&str>, bool) = match &r.spec {
                ResourceSpec::File(f) => (vec![f.path.as_str()], false),
                ResourceSpec::Container(c) => (
                    c.volumes
                        .iter()
                        .filter_map(|v| v.host_path.as_deref())
                        .collect(),
                    true,
                ),
                _ => (vec![], false),
            };
            for path in paths {
                let path = Path::new(path);
                if !(self.within_roots(path) || root_itself && self.roots.iter().any(|r| r == path))
                {
                    return Err(self.outside(&r.id, path));
                }
            }
        }
        Ok(())
    }

    fn outside(&self, id: &manifest_types::ResourceId, path: &Path) -> String {
        let path = path.display();
        if self.roots.is_empty() {
            format!("resource {id}: {path} — this agent has no file roots configured")
        } else {
            format!(
                "resource {id}: {path} is outside every file root ({})",
                self.roots
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }

    /// Lexical check; paths are already normalised (no `..`). Symlinks below
    /// the root are checked when the file is written.
    pub fn within_roots(&self, path: &Path) -> bool {
        self.roots
            .iter()
            .any(|root| path.starts_with(root) && path != root)
    }
}

/// The `generation` of a document that failed to parse, if it has a
/// believable one.
fn sniff_generation(bytes: &[u8]) -> Option<u64> {
    let doc = serde_json::from_slice::<serde_json::Value>(bytes).ok()?;
    manifest_types::manifest::probe_generation(&doc, "generation")
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifest_types::signing::Signer;
    use serde_json::json;

    fn gate() -> Gate {
        Gate {
            agent_id: "pi-1".parse().unwrap(),
            trust: Trust {
                keys: vec![],
                allow_unsigned: true,
            },
            roots: vec!["/srv/flotilla".into()],
            containers: ContainerPolicy::default(),
        }
    }

    fn doc(agent: &str, generation: u64, path: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "flotilla.dev/v1", "agentId": agent, "generation": generation,
            "resources": [{"id": "d/f", "kind": "File", "spec": {"path": path, "content": "x"}}]
        }))
        .unwrap()
    }

    fn accepted(bytes: &[u8]) -> Accepted {
        match gate().decide(bytes, 1, None) {
            Decision::Accept(a) => *a,
            other => panic!("{other:?}"),
        }
    }

    fn reason(d: Decision) -> String {
        match d {
            Decision::Reject(r) => r.reason.to_string(),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn accepts_newer_and_ignores_repeats() {
        let a = accepted(&doc("pi-1", 2, "/srv/flotilla/a"));
        assert!(matches!(
            gate().decide(&a.bytes, 5, Some(&a)),
            Decision::Unchanged
        ));
        assert!(matches!(
            gate().decide(&doc("pi-1", 3, "/srv/flotilla/b"), 6, Some(&a)),
            Decision::Accept(_)
        ));
    }

    #[test]
    fn rejections_are_typed() {
        let a = accepted(&doc("pi-1", 2, "/srv/flotilla/a"));
        assert_eq!(
            reason(gate().decide(b"{oops", 3, Some(&a))),
            "MalformedJson"
        );
        assert_eq!(
            reason(gate().decide(&doc("pi-2", 3, "/srv/flotilla/a"), 3, Some(&a))),
            "WrongAgent"
        );
        assert_eq!(
            reason(gate().decide(&doc("pi-1", 1, "/srv/flotilla/a"), 3, Some(&a))),
            "ReplayedGeneration"
        );
        assert_eq!(
            reason(gate().decide(&doc("pi-1", 2, "/srv/flotilla/other"), 3, Some(&a))),
            "ReplayedGeneration"
        );
        assert_eq!(
            reason(gate().decide(&doc("pi-1", 3, "/etc/passwd"), 3, Some(&a))),
            "PathOutsideRoots"
        );
        assert_eq!(
            reason(gate().decide(&doc("pi-1", 3, "/srv/flotilla"), 3, Some(&a))),
            "PathOutsideRoots"
        );
        assert_eq!(
            reason(gate().decide(&doc("pi-1", 3, "/srv/flotillaX/a"), 3, Some(&a))),
            "PathOutsideRoots"
        );
        assert_eq!(
            reason(gate().decide(&doc("pi-1", 3, "relative"), 3, Some(&a))),
            "InvalidPath"
        );
        match gate().decide(&doc("pi-1", 9, "/etc/x"), 4, None) {
            Decision::Reject(r) => {
                assert_eq!(r.generation, Some(9));
                assert_eq!(r.revision, 4);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn signatures_are_checked_first_and_their_rejections_believe_nothing() {
        let (seed, public) = Signer::generate();
        let signer = Signer::from_seed(&seed).unwrap();
        let strict = Gate {
            trust: Trust {
                keys: vec![public],
                allow_unsigned: false,
            },
            ..gate()
        };
        let signed = |agent: &str, generation: u64| {
            let mut m =
                AgentManifest::from_json(&doc(agent, generation, "/srv/flotilla/a")).unwrap();
            signer.sign(&mut m);
            m.to_json()
        };
        let good = match strict.decide(&signed("pi-1", 2), 1, None) {
            Decision::Accept(a) => *a,
            other => panic!("{other:?}"),
        };
        // An unsigned manifest with an absurd generation: rejected, and its
        // generation is not reported (it would raise the control plane's floor).
        match strict.decide(&doc("pi-1", 1 << 50, "/srv/flotilla/b"), 2, Some(&good)) {
            Decision::Reject(r) => {
                assert_eq!(r.reason, "Unsigned");
                assert_eq!(r.generation, None);
            }
            other => panic!("{other:?}"),
        }
        let mut forged: serde_json::Value = serde_json::from_slice(&signed("pi-1", 3)).unwrap();
        forged["resources"][0]["spec"]["content"] = "evil".into();
        assert_eq!(
            reason(strict.decide(forged.to_string().as_bytes(), 3, Some(&good))),
            "BadSignature"
        );
        let other = Signer::from_seed(&Signer::generate().0).unwrap();
        let mut m = AgentManifest::from_json(&doc("pi-1", 4, "/srv/flotilla/a")).unwrap();
        other.sign(&mut m);
        assert_eq!(
            reason(strict.decide(&m.to_json(), 4, Some(&good))),
            "UntrustedKey"
        );
        // A validly signed manifest for another agent is still WrongAgent.
        assert_eq!(
            reason(strict.decide(&signed("pi-2", 5), 5, Some(&good))),
            "WrongAgent"
        );
    }
}
