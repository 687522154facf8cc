//! Signing and verifying manifests (docs/adr/0004-signed-document-format.md):
//! ed25519 signatures by nkeys, over the RFC 8785 canonical form of the
//! document without its `signatures` field.
//!
//! - [`Signer`] (the control plane): signs the manifest it is about to write,
//!   over exactly the JSON it writes ([`AgentManifest::signing_input`]).
//! - [`verify`] (the agent): checks the bytes it received against the keys
//!   it trusts, over the canonical form of the *received* JSON value without
//!   `signatures` — so a field an older agent does not understand is still
//!   covered, and one added in transit breaks the signature (ADR 0004's open
//!   point, settled this way).
//!
//! Each failure is a typed [`SignatureError`] whose [`SignatureError::reason`]
//! is the stable rejection code an agent reports.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::canonical::canonical_json;
use crate::manifest::{AgentManifest, Signature};

/// Why a manifest's signatures do not admit it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No signature at all, and the agent requires one.
    #[error("the manifest is not signed, and this agent accepts only signed manifests")]
    Unsigned,
    /// Signed only by keys this agent does not trust.
    #[error("signed by {keys}, none of which this agent trusts")]
    UntrustedKey { keys: String },
    /// A signature by a trusted key does not verify: the content was changed
    /// after signing, or the signature is forged.
    #[error("the signature by trusted key {key} does not verify")]
    BadSignature { key: String },
    /// The document or a signature entry is not in the signed format.
    #[error("malformed signature: {0}")]
    Malformed(String),
}

impl SignatureError {
    /// The stable rejection code (`Rejection.reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unsigned => "Unsigned",
            Self::UntrustedKey { .. } => "UntrustedKey",
            Self::BadSignature { .. } => "BadSignature",
            Self::Malformed(_) => "BadSignature",
        }
    }
}

/// Why a signing key cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("not an nkey seed: {0}")]
pub struct KeyError(String);

/// The control plane's signing key (an nkey seed, `SO…`).
pub struct Signer {
    key: nkeys::KeyPair,
}

impl std::fmt::Debug for Signer {
    /// Never the seed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("public_key", &self.public_key())
            .finish()
    }
}

impl Signer {
    pub fn from_seed(seed: &str) -> Result<Self, KeyError> {
        nkeys::KeyPair::from_seed(seed.trim())
            .map(|key| Self { key })
            .map_err(|e| KeyError(e.to_string()))
    }

    /// A new random key pair; `(seed, public key)`.
    pub fn generate() -> (String, String) {
        let key = nkeys::KeyPair::new_operator();
        let seed = key.seed().expect("a generated key has a seed");
        (seed, key.public_key())
    }

    /// The key id agents trust: the public nkey (`O…`).
    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// Replaces `manifest`'s signatures with this key's signature over
    /// [`AgentManifest::signing_input`].
    pub fn sign(&self, manifest: &mut AgentManifest) {
        let sig = self
            .key
            .sign(&manifest.signing_input())
            .expect("a seed key signs");
        manifest.signatures = vec![Signature {
            key_id: self.public_key(),
            sig: URL_SAFE_NO_PAD.encode(sig),
        }];
    }
}

/// The signing input of a received document: the canonical form of its
/// JSON value without `signatures`.
pub fn received_signing_input(value: &serde_json::Value) -> Vec<u8> {
    let mut v = value.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("signatures");
    }
    canonical_json(&v).into_bytes()
}

/// Checks `bytes` (a manifest as received) against `trusted` public keys.
/// Ok: the id of the trusted key whose signature verifies. A signature by a
/// trusted key that does not verify is [`SignatureError::BadSignature`]
/// even when another one would.
pub fn verify(bytes: &[u8], trusted: &[String]) -> Result<String, SignatureError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| SignatureError::Malformed(e.to_string()))?;
    let sigs: Vec<Signature> = match value.get("signatures") {
        None => Vec::new(),
        Some(s) => serde_json::from_value(s.clone())
            .map_err(|e| SignatureError::Malformed(e.to_string()))?,
    };
    if sigs.is_empty() {
        return Err(SignatureError::Unsigned);
    }
    let input = received_signing_input(&value);
    let mut verified = None;
    for s in sigs.iter().filter(|s| trusted.contains(&s.key_id)) {
        let bad = || SignatureError::BadSignature {
            key: s.key_id.clone(),
        };
        let raw = URL_SAFE_NO_PAD.decode(&s.sig).map_err(|_| bad())?;
        let key = nkeys::KeyPair::from_public_key(&s.key_id).map_err(|_| bad())?;
        key.verify(&input, &raw).map_err(|_| bad())?;
        verified.get_or_insert_with(|| s.key_id.clone());
    }
    verified.ok_or_else(|| SignatureError::UntrustedKey {
        keys: sigs
            .iter()
            .map(|s| s.key_id.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> AgentManifest {
        let m = serde_json::json!({
            "apiVersion": "flotilla.dev/v1", "agentId": "pi-1", "generation": 4,
            "resources": [{"id": "d/f", "kind": "File", "spec": {"path": "/etc/f", "content": "x"}}]
        });
        AgentManifest::from_json(m.to_string().as_bytes()).unwrap()
    }

    fn signer() -> Signer {
        Signer::from_seed(&Signer::generate().0).unwrap()
    }

    #[test]
    fn a_signed_manifest_verifies_against_its_key_only() {
        let s = signer();
        let mut m = manifest();
        s.sign(&mut m);
        let bytes = m.to_json();
        assert_eq!(verify(&bytes, &[s.public_key()]), Ok(s.public_key()));
        // Rotation: trusting old and new keys.
        let other = signer();
        assert_eq!(
            verify(&bytes, &[other.public_key(), s.public_key()]),
            Ok(s.public_key())
        );
        assert!(matches!(
            verify(&bytes, &[other.public_key()]),
            Err(SignatureError::UntrustedKey { .. })
        ));
        let plain = manifest().to_json();
        assert_eq!(
            verify(&plain, &[s.public_key()]),
            Err(SignatureError::Unsigned)
        );
    }

    #[test]
    fn any_change_after_signing_breaks_the_signature() {
        let s = signer();
        let key = [s.public_key()];
        let mut m = manifest();
        s.sign(&mut m);
        let signed: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        let tamper = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = signed.clone();
            f(&mut v);
            verify(v.to_string().as_bytes(), &key)
        };
        let bad = Err(SignatureError::BadSignature {
            key: s.public_key(),
        });
        assert_eq!(tamper(&|v| v["generation"] = 5.into()), bad);
        assert_eq!(tamper(&|v| v["agentId"] = "pi-2".into()), bad);
        assert_eq!(
            tamper(&|v| v["resources"][0]["spec"]["content"] = "evil".into()),
            bad
        );
        // A field nobody understands yet is covered too.
        assert_eq!(tamper(&|v| v["extra"] = true.into()), bad);
        // Re-serialised with other key order and whitespace: still valid.
        let pretty = serde_json::to_string_pretty(&signed).unwrap();
        assert!(verify(pretty.as_bytes(), &key).is_ok());
        // A forged signature, and garbage.
        assert_eq!(
            tamper(&|v| v["signatures"][0]["sig"] = URL_SAFE_NO_PAD.encode([7u8; 64]).into()),
            bad
        );
        assert_eq!(tamper(&|v| v["signatures"][0]["sig"] = "!!".into()), bad);
        assert!(matches!(
            tamper(&|v| v["signatures"] = 3.into()),
            Err(SignatureError::Malformed(_))
        ));
    }

    #[test]
    fn the_seed_never_shows_in_debug_output() {
        let (seed, public) = Signer::generate();
        let s = Signer::from_seed(&seed).unwrap();
        let shown = format!("{s:?}");
        assert!(shown.contains(&public) && !shown.contains(&seed), "{shown}");
        assert!(Signer::from_seed("not a seed").is_err());
    }
}
