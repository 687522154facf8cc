//! The fleet's NATS authority (docs/adr/0017-trust-model.md): decentralised
//! NATS auth — an operator, a system account and one fleet account with
//! JetStream — kept in an operator's *auth directory*, from which
//! `flotilla auth init`, `flotilla agent enroll` and `flotilla agent revoke`
//! work.
//!
//! - `auth init` creates the keys, the JWTs, credentials for the control
//!   plane, for operators and for pushing account updates, and
//!   `nats-auth.conf`, the block `deploy/nats/flotilla-secure.conf` includes.
//! - `agent enroll <id>` issues a device's credentials: a fresh user key
//!   whose JWT (signed by the fleet account) allows exactly the device's
//!   own subjects ([`manifest_types::keys::device_permissions`]), optionally
//!   expiring. The server stores nothing per device: 10,000 devices need no
//!   server configuration change.
//! - `auth site <name>` writes what a site's leaf node needs ([`site`]).
//! - `agent revoke <id>` revokes every key ever issued to the device in the
//!   account JWT, and pushes it to the server (`$SYS.REQ.CLAIMS.UPDATE`),
//!   which closes the device's connections and refuses new ones.
//!
//! JWTs are encoded here (header `ed25519-nkey`, claims in the NATS v2
//! shape, signed with nkeys): no crate covers operator JWTs, and the format
//! is small.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use manifest_types::keys::{self, DevicePermissions};
use manifest_types::{AgentId, BucketName};
use nkeys::KeyPair;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::exit::CliError;

pub mod site;
pub use site::{SiteIssued, SiteLayout};

/// File names in the auth directory.
const OPERATOR_SEED: &str = "operator.nk";
const SYSTEM_SEED: &str = "system-account.nk";
const ACCOUNT_SEED: &str = "fleet-account.nk";
const ACCOUNT_STATE: &str = "fleet-account.json";
const SERVER_CONF: &str = "nats-auth.conf";
const SYSTEM_CREDS: &str = "system.creds";
const CONTROL_CREDS: &str = "control.creds";
const OPERATOR_CREDS: &str = "operator.creds";
const DEVICES: &str = "devices";

/// What the auth directory remembers about the fleet account: the keys
/// revoked so far (public key → revocation time, seconds).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccountState {
    /// Where nats-server keeps account JWTs (in `nats-auth.conf`).
    resolver_dir: PathBuf,
    revocations: BTreeMap<String, u64>,
}

/// The keys issued to one device.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeviceRecord {
    agent_id: String,
    /// Every user key ever issued to the device, oldest first.
    keys: Vec<IssuedKey>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IssuedKey {
    public_key: String,
    issued_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> CliError {
    move |source| CliError::Io { context, source }
}

/// A JWT: `header.claims.signature`, signed by `issuer`. `jti` is the hash
/// of the claims, as NATS tooling makes it.
fn encode(mut claims: Value, issuer: &KeyPair) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    claims["iss"] = issuer.public_key().into();
    claims["iat"] = now().into();
    let digest = Sha256::digest(claims.to_string().as_bytes());
    claims["jti"] = digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<String>()
        .into();
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let input = format!("{header}.{body}");
    let sig = issuer.sign(input.as_bytes()).expect("a seed key signs");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn operator_jwt(operator: &KeyPair, system: &str) -> String {
    encode(
        json!({"sub": operator.public_key(), "name": "flotilla",
               "nats": {"system_account": system, "type": "operator", "version": 2}}),
        operator,
    )
}

fn account_jwt(
    operator: &KeyPair,
    account: &str,
    name: &str,
    jetstream: bool,
    state: &AccountState,
) -> String {
    let mut limits = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1,
        "exports": -1, "wildcards": true, "conn": -1, "leaf": -1});
    if jetstream {
        for k in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[k] = (-1).into();
        }
    }
    let mut nats = json!({"limits": limits, "default_permissions": {"pub": {}, "sub": {}},
        "type": "account", "version": 2});
    if !state.revocations.is_empty() {
        nats["revocations"] = json!(state.revocations);
    }
    encode(
        json!({"sub": account, "name": name, "nats": nats}),
        operator,
    )
}

/// A user of `account`: `publish`/`subscribe` are `{"allow": [...]}` /
/// `{"deny": [...]}` objects.
fn user_jwt(
    account: &KeyPair,
    user: &str,
    name: &str,
    publish: Value,
    subscribe: Value,
    expires: Option<u64>,
) -> String {
    let mut claims = json!({"sub": user, "name": name, "nats": {
        "pub": publish, "sub": subscribe, "subs": -1, "data": -1, "payload": -1,
        "type": "user", "version": 2}});
    if let Some(exp) = expires {
        claims["exp"] = exp.into();
    }
    encode(claims, account)
}

/// The `.creds` format every NATS client reads.
fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// The user JWT of a `.creds` file: the line after `-----BEGIN NATS USER
/// JWT-----` (the armour [`creds`] writes and `nsc` and every NATS client
/// read).
fn creds_jwt(text: &str) -> Option<&str> {
    let mut lines = text.lines().map(str::trim);
    lines.find(|l| l.starts_with("---") && l.contains("BEGIN NATS USER JWT"))?;
    lines
        .find(|l| !l.is_empty())
        .filter(|l| !l.starts_with("---"))
}

/// A JWT's claims (its middle, base64url segment; padding tolerated).
/// The signature is not checked: the server checked it on connecting.
fn jwt_claims(jwt: &str) -> Option<Value> {
    let mut parts = jwt.split('.');
    let (_header, body, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(body.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The `name` claim of the user JWT in the text of a `.creds` file, when it
/// has a non-empty one: who `flotilla` acts as on a server that checked
/// that JWT (`flotilla-operator` for the `operator.creds` of `auth init`).
pub fn creds_user_name(text: &str) -> Option<String> {
    let claims = jwt_claims(creds_jwt(text)?)?;
    let name = claims.get("name")?.as_str()?.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// Writes `content` to a new file only its owner can read.
fn write_secret(path: &Path, content: &str) -> Result<(), CliError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(path)
        .map_err(io(format!("cannot create {}", path.display())))?;
    f.write_all(content.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(format!("cannot write {}", path.display())))
}

/// Replaces a non-secret file atomically.
fn write_public(path: &Path, content: &str) -> Result<(), CliError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(io(format!("cannot write {}", path.display())))
}

fn load_key(path: &Path) -> Result<KeyPair, CliError> {
    let seed = std::fs::read_to_string(path).map_err(io(format!(
        "cannot read {} (is this an auth directory made by `flotilla auth init`?)",
        path.display()
    )))?;
    KeyPair::from_seed(seed.trim()).map_err(|_| CliError::InvalidDocument {
        origin: path.display().to_string(),
        message: "not an nkey seed".into(),
    })
}

fn read_json<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T, CliError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| CliError::InvalidDocument {
            origin: path.display().to_string(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(io(format!("cannot read {}", path.display()))(e)),
    }
}

/// The operator's auth directory.
#[derive(Debug)]
pub struct Authority {
    dir: PathBuf,
}

/// What `auth init` made.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Initialised {
    pub operator: String,
    pub system_account: String,
    pub fleet_account: String,
    pub server_config: PathBuf,
    pub control_creds: PathBuf,
    pub operator_creds: PathBuf,
}

/// What `agent enroll` issued.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Enrolled {
    pub agent_id: String,
    pub public_key: String,
    pub creds: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

impl Authority {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates the operator, the system and fleet accounts, the control
    /// plane's, operators' and the system user's credentials, and the
    /// server's configuration block (`resolver_dir`: where nats-server keeps
    /// account JWTs). Refuses a directory that already holds an authority.
    pub fn init(&self, bucket: &BucketName, resolver_dir: &Path) -> Result<Initialised, CliError> {
        std::fs::create_dir_all(self.path(DEVICES))
            .map_err(io(format!("cannot create {}", self.dir.display())))?;
        if self.path(OPERATOR_SEED).exists() {
            return Err(CliError::Usage(format!(
                "{} already holds an authority; nothing was changed",
                self.dir.display()
            )));
        }
        let operator = KeyPair::new_operator();
        let system = KeyPair::new_account();
        let account = KeyPair::new_account();
        for (name, key) in [
            (OPERATOR_SEED, &operator),
            (SYSTEM_SEED, &system),
            (ACCOUNT_SEED, &account),
        ] {
            write_secret(
                &self.path(name),
                &format!("{}\n", key.seed().expect("a seed")),
            )?;
        }
        let state = AccountState {
            resolver_dir: resolver_dir.to_owned(),
            ..AccountState::default()
        };
        write_public(
            &self.path(ACCOUNT_STATE),
            &serde_json::to_string_pretty(&state).expect("serialises"),
        )?;
        // The system user pushes account updates; it has the whole system account.
        let user = KeyPair::new_user();
        let jwt = user_jwt(
            &system,
            &user.public_key(),
            "flotilla-system",
            json!({}),
            json!({}),
            None,
        );
        write_secret(
            &self.path(SYSTEM_CREDS),
            &creds(&jwt, &user.seed().expect("a seed")),
        )?;
        // The control plane: the whole account, never the RePublish
        // subjects (only the server publishes committed manifests there).
        let republish = format!("flotilla.{bucket}.>");
        self.issue_user(
            &account,
            CONTROL_CREDS,
            "flotilla-control",
            json!({"deny": [republish]}),
            json!({}),
        )?;
        // Operators: deployments, values, labels, rollouts — never an
        // agent's desired state, never what a device reports (status,
        // inventory, heartbeat: status never lies), never the stream itself.
        let stream = keys::stream_name(bucket);
        let heartbeats = BucketName::new(keys::heartbeat_bucket(bucket)).expect("a valid bucket");
        let operator_deny = json!({"deny": [
            republish,
            keys::kv_subject(bucket, &format!("{}.>", keys::DESIRED_STATE)),
            keys::kv_subject(bucket, &format!("{}.>", keys::ACTUAL_STATE)),
            keys::kv_subject(bucket, &format!("{}.>", keys::AGENTS)),
            keys::kv_subject(&heartbeats, ">"),
            format!("$JS.API.STREAM.DELETE.{stream}"),
            format!("$JS.API.STREAM.PURGE.{stream}"),
            format!("$JS.API.STREAM.UPDATE.{stream}"),
            format!("$JS.API.STREAM.MSG.DELETE.{stream}"),
        ]});
        self.issue_user(
            &account,
            OPERATOR_CREDS,
            "flotilla-operator",
            operator_deny,
            json!({}),
        )?;
        let conf = self.server_config(&operator, &system, &account, &state);
        write_public(&self.path(SERVER_CONF), &conf)?;
        Ok(Initialised {
            operator: operator.public_key(),
            system_account: system.public_key(),
            fleet_account: account.public_key(),
            server_config: self.path(SERVER_CONF),
            control_creds: self.path(CONTROL_CREDS),
            operator_creds: self.path(OPERATOR_CREDS),
        })
    }

    fn issue_user(
        &self,
        account: &KeyPair,
        file: &str,
        name: &str,
        publish: Value,
        subscribe: Value,
    ) -> Result<(), CliError> {
        let user = KeyPair::new_user();
        let jwt = user_jwt(account, &user.public_key(), name, publish, subscribe, None);
        write_secret(
            &self.path(file),
            &creds(&jwt, &user.seed().expect("a seed")),
        )
    }

    /// The block nats-server includes: the operator, the system account, a
    /// full NATS-based resolver and the two accounts preloaded.
    fn server_config(
        &self,
        operator: &KeyPair,
        system: &KeyPair,
        account: &KeyPair,
        state: &AccountState,
    ) -> String {
        let sys = system.public_key();
        let acc = account.public_key();
        format!(
            "# Generated by `flotilla auth init`; `flotilla agent revoke` rewrites it.\n\
             # Include it from the server configuration (deploy/nats/flotilla-secure.conf).\n\
             operator: \"{op}\"\n\
             system_account: {sys}\n\
             resolver: {{\n  type: full\n  dir: \"{dir}\"\n  allow_delete: false\n  interval: \"2m\"\n  timeout: \"1.9s\"\n}}\n\
             resolver_preload: {{\n  {sys}: \"{sys_jwt}\"\n  {acc}: \"{acc_jwt}\"\n}}\n",
            op = operator_jwt(operator, &sys),
            dir = state.resolver_dir.display(),
            sys_jwt = account_jwt(operator, &sys, "SYS", false, &AccountState::default()),
            acc_jwt = account_jwt(operator, &acc, "flotilla", true, state),
        )
    }

    /// Issues `agent`'s credentials into `out` (mode 0600).
    pub fn enroll(
        &self,
        bucket: &BucketName,
        agent: &AgentId,
        out: &Path,
        valid_for: Option<Duration>,
    ) -> Result<Enrolled, CliError> {
        let account = load_key(&self.path(ACCOUNT_SEED))?;
        let DevicePermissions { publish, subscribe } = keys::device_permissions(bucket, agent);
        let user = KeyPair::new_user();
        let issued_at = now();
        let expires_at = valid_for.map(|d| issued_at + d.as_secs().max(1));
        let jwt = user_jwt(
            &account,
            &user.public_key(),
            agent.as_str(),
            json!({"allow": publish}),
            json!({"allow": subscribe}),
            expires_at,
        );
        write_secret(out, &creds(&jwt, &user.seed().expect("a seed")))?;
        let record_path = self.path(DEVICES).join(format!("{agent}.json"));
        let mut record: DeviceRecord = read_json(&record_path)?;
        record.agent_id = agent.to_string();
        record.keys.push(IssuedKey {
            public_key: user.public_key(),
            issued_at,
            expires_at,
        });
        write_public(
            &record_path,
            &serde_json::to_string_pretty(&record).expect("serialises"),
        )?;
        Ok(Enrolled {
            agent_id: agent.to_string(),
            public_key: user.public_key(),
            creds: out.to_owned(),
            expires_at,
        })
    }

    /// Revokes every key issued to `agent` in the fleet account; returns the
    /// new account JWT (to push) and the keys revoked.
    pub fn revoke(&self, agent: &AgentId) -> Result<(String, Vec<String>), CliError> {
        let record: DeviceRecord = read_json(&self.path(DEVICES).join(format!("{agent}.json")))?;
        if record.keys.is_empty() {
            return Err(CliError::NotFound(format!(
                "no credentials were issued to {agent} from {}",
                self.dir.display()
            )));
        }
        let operator = load_key(&self.path(OPERATOR_SEED))?;
        let system = load_key(&self.path(SYSTEM_SEED))?;
        let account = load_key(&self.path(ACCOUNT_SEED))?;
        let mut state: AccountState = read_json(&self.path(ACCOUNT_STATE))?;
        let at = now();
        let revoked: Vec<String> = record.keys.iter().map(|k| k.public_key.clone()).collect();
        for k in &revoked {
            state.revocations.insert(k.clone(), at);
        }
        write_public(
            &self.path(ACCOUNT_STATE),
            &serde_json::to_string_pretty(&state).expect("serialises"),
        )?;
        write_public(
            &self.path(SERVER_CONF),
            &self.server_config(&operator, &system, &account, &state),
        )?;
        Ok((
            account_jwt(&operator, &account.public_key(), "flotilla", true, &state),
            revoked,
        ))
    }

    /// The server's configuration block, rewritten by [`Authority::revoke`].
    pub fn server_config_path(&self) -> PathBuf {
        self.path(SERVER_CONF)
    }

    /// The system user's credentials, which may push account updates.
    pub fn system_creds(&self) -> PathBuf {
        self.path(SYSTEM_CREDS)
    }
}

/// Sends an account JWT to the server (`$SYS.REQ.CLAIMS.UPDATE`) as the
/// system user; the server applies it at once (revoked users are
/// disconnected) and stores it in its resolver directory.
pub async fn push_account(
    nats_url: &str,
    system_creds: &Path,
    tls: &flotilla_nats::Tls,
    jwt: &str,
) -> Result<(), CliError> {
    let auth = flotilla_nats::Auth::CredentialsFile(system_creds.to_owned());
    let client = flotilla_nats::Connector::new(nats_url, "flotilla-cli", auth)
        .tls(tls)
        .connect()
        .await
        .map_err(|e| CliError::Connect {
            url: nats_url.to_owned(),
            source: e.into(),
        })?;
    let reply = client
        .request("$SYS.REQ.CLAIMS.UPDATE", jwt.to_owned().into())
        .await
        .map_err(|e| CliError::nats("no reply to the account update", e))?;
    let v: Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
    match v.get("error") {
        None => Ok(()),
        Some(e) => Err(CliError::Usage(format!(
            "the server refused the account update: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operator_creds(name: &str) -> String {
        let account = KeyPair::new_account();
        let user = KeyPair::new_user();
        let jwt = user_jwt(
            &account,
            &user.public_key(),
            name,
            json!({}),
            json!({}),
            None,
        );
        creds(&jwt, &user.seed().unwrap())
    }

    #[test]
    fn the_user_name_is_read_from_the_creds_jwt() {
        assert_eq!(
            creds_user_name(&operator_creds("flotilla-operator")).as_deref(),
            Some("flotilla-operator")
        );
        // CRLF line ends and a padded body, as other tools may write them.
        let text = operator_creds("alice").replace('\n', "\r\n");
        assert_eq!(creds_user_name(&text).as_deref(), Some("alice"));
        let jwt = creds_jwt(&text).unwrap();
        let mut parts: Vec<String> = jwt.split('.').map(str::to_owned).collect();
        parts[1].push_str("==");
        assert_eq!(
            jwt_claims(&parts.join(".")).unwrap()["name"],
            json!("alice")
        );
    }

    #[test]
    fn creds_without_a_usable_name_give_none() {
        assert_eq!(creds_user_name(&operator_creds("  ")), None);
        assert_eq!(creds_user_name(""), None);
        assert_eq!(creds_user_name("not a creds file\n"), None);
        let body = |claims: &str| URL_SAFE_NO_PAD.encode(claims);
        let armoured = |jwt: String| {
            format!("-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n")
        };
        // No name claim, a name that is not a string, a body that is not JSON.
        for claims in [r#"{"sub":"U"}"#, r#"{"name":7}"#, "{"] {
            assert_eq!(
                creds_user_name(&armoured(format!("e30.{}.sig", body(claims)))),
                None,
                "{claims}"
            );
        }
        // Not three segments, or not base64url.
        assert_eq!(creds_user_name(&armoured("e30.e30".into())), None);
        assert_eq!(creds_user_name(&armoured("e30.!!!.sig".into())), None);
        // The armour with nothing inside.
        assert_eq!(
            creds_user_name("-----BEGIN NATS USER JWT-----\n\n------END NATS USER JWT------\n"),
            None
        );
    }
}
