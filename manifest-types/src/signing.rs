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
    /// The rejection reason (`Rejection.reason`).
    pub fn reason(&self) -> crate::RejectionReason {
        use crate::RejectionReason as R;
        match self {
            Self::Unsigned => R::Unsigned,
            Self::UntrustedKey { .. } => R::UntrustedKey,
            Self::BadSignature { .. } | Self::Malformed(_) => R::BadSignature,
        }
    }
}

/// Why a key cannot be used; the message names the kind of key wanted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

/// Checks that `key` is a public nkey an agent can trust.
pub fn check_public_key(key: &str) -> Result<(), KeyError> {
    if key.starts_with('S') && nkeys::KeyPair::from_seed(key).is_ok() {
        // Never echo a seed.
        return Err(KeyError(
            "a trusted key must be a public nkey (O…), but this is a seed (S…), the secret              signing key: give the public key `flotilla keys public` prints for it, and keep              the seed off the device"
                .into(),
        ));
    }
    nkeys::KeyPair::from_public_key(key)
        .map(drop)
        .map_err(|e| {
            KeyError(format!(
                "{key:?} is not a public nkey (O… and 56 characters, as `flotilla keys                  generate` prints): {e}"
            ))
        })
}

/// What an agent accepts: manifests signed by one of `keys` and, only when
/// configured for development, unsigned ones (docs/adr/0017-trust-model.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// Public keys of the control plane (several while one is rotated).
    pub keys: Vec<String>,
    /// Accept unsigned manifests; with no `keys`, signatures are not checked
    /// at all. For development fleets only.
    pub allow_unsigned: bool,
}

impl Trust {
    /// Whether `bytes` (a manifest as received) may be converged to; Ok: the
    /// key that signed it, if one was checked.
    pub fn admit(&self, bytes: &[u8]) -> Result<Option<String>, SignatureError> {
        match verify(bytes, &self.keys) {
            Ok(key) => Ok(Some(key)),
            Err(SignatureError::Unsigned) if self.allow_unsigned => Ok(None),
            Err(SignatureError::UntrustedKey { .. })
                if self.allow_unsigned && self.keys.is_empty() =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

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
            .map_err(|e| KeyError(format!("not an nkey seed (SO…): {e}")))
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
        manifest.signatures = vec![self.signature(&manifest.signing_input())];
    }

    fn signature(&self, input: &[u8]) -> Signature {
        let sig = self.key.sign(input).expect("a seed key signs");
        Signature {
            key_id: self.public_key(),
            sig: URL_SAFE_NO_PAD.encode(sig),
        }
    }
}

/// The keys the control plane signs with: usually one; two while a key is
/// rotated (every manifest then carries both signatures, so agents trusting
/// either accept it — docs/adr/0017-trust-model.md). Empty: manifests are
/// written unsigned (development fleets whose agents run with
/// `--allow-unsigned`).
#[derive(Debug, Default)]
pub struct SigningKeys {
    signers: Vec<Signer>,
}

impl SigningKeys {
    pub fn new(signers: Vec<Signer>) -> Self {
        Self { signers }
    }

    pub fn is_empty(&self) -> bool {
        self.signers.is_empty()
    }

    /// The public keys, in signing order.
    pub fn key_ids(&self) -> Vec<String> {
        self.signers.iter().map(Signer::public_key).collect()
    }

    /// Replaces `manifest`'s signatures with one by each key (none without keys).
    pub fn sign(&self, manifest: &mut AgentManifest) {
        let input = manifest.signing_input();
        manifest.signatures = self.signers.iter().map(|s| s.signature(&input)).collect();
    }

    /// Whether `manifest` carries exactly a signature by each of these keys
    /// (by key id; [`Self::keep_verified`] has dropped forged ones).
    pub fn carries(&self, manifest: &AgentManifest) -> bool {
        manifest.signatures.len() == self.signers.len()
            && self.signers.iter().all(|s| {
                manifest
                    .signatures
                    .iter()
                    .any(|g| g.key_id == s.public_key())
            })
    }

    /// Drops `manifest`'s signatures (parsed from `bytes`) unless every one
    /// of them is by one of these keys and verifies: a stored value whose
    /// signatures are not all the control plane's own, valid, never stands.
    pub fn keep_verified(&self, bytes: &[u8], manifest: &mut AgentManifest) {
        let ours = self.key_ids();
        let all_valid = manifest.signatures.iter().all(|s| {
            ours.contains(&s.key_id) && verify(bytes, std::slice::from_ref(&s.key_id)).is_ok()
        });
        if !all_valid {
            manifest.signatures.clear();
        }
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
    fn a_key_set_signs_with_each_key_and_keeps_only_its_own_valid_signatures() {
        let (old, new) = (signer(), signer());
        let (old_id, new_id) = (old.public_key(), new.public_key());
        let both = SigningKeys::new(vec![old, new]);
        let mut m = manifest();
        both.sign(&mut m);
        let bytes = m.to_json();
        assert!(both.carries(&m));
        // Agents trusting either key accept it: rotation without downtime.
        assert_eq!(
            verify(&bytes, std::slice::from_ref(&old_id)),
            Ok(old_id.clone())
        );
        assert_eq!(verify(&bytes, std::slice::from_ref(&new_id)), Ok(new_id));
        let mut parsed = AgentManifest::from_json(&bytes).unwrap();
        both.keep_verified(&bytes, &mut parsed);
        assert!(both.carries(&parsed));
        // A forged signature under our key id is dropped: the value never stands.
        let mut forged: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        forged["signatures"][0]["sig"] = URL_SAFE_NO_PAD.encode([1u8; 64]).into();
        let forged = forged.to_string().into_bytes();
        let mut parsed = AgentManifest::from_json(&forged).unwrap();
        both.keep_verified(&forged, &mut parsed);
        assert!(parsed.signatures.is_empty() && !both.carries(&parsed));
        // Unsigned keys: carries only unsigned manifests.
        let none = SigningKeys::default();
        assert!(!none.carries(&m));
        none.sign(&mut m);
        assert!(m.signatures.is_empty() && none.carries(&m));
    }

    #[test]
    fn trust_rejects_unsigned_unless_configured_for_development() {
        let s = signer();
        let mut m = manifest();
        s.sign(&mut m);
        let (signed, plain) = (m.to_json(), manifest().to_json());
        let strict = Trust {
            keys: vec![s.public_key()],
            allow_unsigned: false,
        };
        assert_eq!(strict.admit(&signed), Ok(Some(s.public_key())));
        assert_eq!(strict.admit(&plain), Err(SignatureError::Unsigned));
        let nobody = Trust::default();
        assert!(matches!(
            nobody.admit(&signed),
            Err(SignatureError::UntrustedKey { .. })
        ));
        let transition = Trust {
            allow_unsigned: true,
            ..strict.clone()
        };
        assert_eq!(transition.admit(&plain), Ok(None));
        assert!(matches!(
            transition.admit(&signer().sign_copy(&manifest())),
            Err(SignatureError::UntrustedKey { .. })
        ));
        let dev = Trust {
            keys: vec![],
            allow_unsigned: true,
        };
        assert_eq!(dev.admit(&plain), Ok(None));
        assert_eq!(dev.admit(&signed), Ok(None));
        assert!(check_public_key(&s.public_key()).is_ok());
        let short = check_public_key("OABC").unwrap_err().to_string();
        assert!(short.contains("is not a public nkey (O…"), "{short}");
        let seed = nkeys::KeyPair::new_operator().seed().unwrap();
        let given_seed = check_public_key(&seed).unwrap_err().to_string();
        assert!(given_seed.contains("this is a seed"), "{given_seed}");
        assert!(!given_seed.contains(&seed), "the seed is never echoed");
    }

    impl Signer {
        fn sign_copy(&self, m: &AgentManifest) -> Vec<u8> {
            let mut m = m.clone();
            self.sign(&mut m);
            m.to_json()
        }
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
