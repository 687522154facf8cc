//! flotilla-control's command line: [`Args`] (clap; the NATS connection
//! flags are `flotilla_nats::NatsArgs`, shared with the agent and the CLI)
//! and [`Args::config`], which loads the signing keys and builds the
//! daemon's [`Config`]. `main.rs` only sets up logging and runs it, so tests
//! can start exactly this code in-process.

use std::path::PathBuf;

use clap::Parser;
use flotilla_nats::{AuthError, NatsArgs, TlsError};
use manifest_types::BucketName;
use manifest_types::signing::{KeyError, Signer, SigningKeys};

use crate::daemon::Config;

#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("{0}")]
    Http(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot read the signing key file {file}")]
    ReadKey {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The message never contains the seed.
    #[error("{file} does not hold an nkey seed")]
    NotASeed {
        file: PathBuf,
        #[source]
        source: KeyError,
    },
}

/// Flotilla's control plane: renders deployments into per-agent manifests.
#[derive(Debug, Parser)]
#[command(name = "flotilla-control", version)]
pub struct Args {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// JetStream KV bucket holding the fleet.
    #[arg(long, env = "FLOTILLA_BUCKET", default_value = manifest_types::keys::DEFAULT_BUCKET)]
    pub bucket: BucketName,
    /// How many servers hold each bucket the control plane creates: 3 on a
    /// 3-node cluster. An existing bucket with fewer replicas is scaled up
    /// in place (never recreated); more are left as they are.
    #[arg(long, env = "FLOTILLA_REPLICAS", default_value_t = flotilla_nats::Replicas::ONE)]
    pub replicas: flotilla_nats::Replicas,
    /// Heartbeats per second the whole fleet may send: the published
    /// heartbeat interval grows with the fleet to keep under it.
    #[arg(long, env = "FLOTILLA_HEARTBEAT_MAX_RATE", default_value_t = 500)]
    pub heartbeat_max_rate: u64,
    /// Shortest heartbeat interval published (agents whose own is longer keep theirs).
    #[arg(long, env = "FLOTILLA_HEARTBEAT_MIN_INTERVAL", value_parser = humantime::parse_duration, default_value = "100ms")]
    pub heartbeat_min_interval: std::time::Duration,
    /// Longest heartbeat interval published, however large the fleet.
    #[arg(long, env = "FLOTILLA_HEARTBEAT_MAX_INTERVAL", value_parser = humantime::parse_duration, default_value = "10m")]
    pub heartbeat_max_interval: std::time::Duration,
    /// Fixed age of the last heartbeat (server time) after which a rollout
    /// counts an agent Stale; default: 3 of the intervals it declares.
    #[arg(long, env = "FLOTILLA_STALE_AFTER", value_parser = humantime::parse_duration)]
    pub stale_after: Option<std::time::Duration>,
    /// … and Offline (not waited for); default: 10 declared intervals.
    #[arg(long, env = "FLOTILLA_OFFLINE_AFTER", value_parser = humantime::parse_duration)]
    pub offline_after: Option<std::time::Duration>,
    /// While a rollout is in progress, judge it at least this often.
    #[arg(long, env = "FLOTILLA_ROLLOUT_RECHECK", value_parser = humantime::parse_duration, default_value = "1s")]
    pub rollout_recheck: std::time::Duration,
    /// The control lease's time (docs/adr/0022): with several instances,
    /// one acts and renews its lease every third of this; when it stops,
    /// another takes over within this time plus one pass.
    #[arg(long, env = "FLOTILLA_LEASE_TTL", value_parser = parse_lease_ttl, default_value = "6s")]
    pub lease_ttl: std::time::Duration,
    /// Sites whose leaf nodes run JetStream in a domain of their own
    /// (docs/adr/0023; `flotilla auth site`): their buckets are made and
    /// kept sourcing from the hub's, and the hub's from theirs. Every
    /// instance takes the same list.
    #[arg(
        long = "site",
        env = "FLOTILLA_SITES",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub sites: Vec<flotilla_nats::site::SiteName>,
    /// The hub's JetStream domain (`domain` in its `jetstream` block).
    #[arg(long, env = "FLOTILLA_HUB_DOMAIN", default_value = flotilla_nats::site::DEFAULT_HUB_DOMAIN)]
    pub hub_domain: String,
    /// Where to serve `/healthz`, `/readyz` and `/metrics` (docs/adr/0025);
    /// `off` for nowhere. An address beyond loopback needs
    /// --http-token-file.
    #[arg(
        long,
        env = "FLOTILLA_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR|off"
    )]
    pub listen: String,
    /// A file holding the bearer token HTTP clients present
    /// (`Authorization: Bearer <token>`) for everything but the probes.
    #[arg(long, env = "FLOTILLA_HTTP_TOKEN_FILE", value_name = "FILE")]
    pub http_token_file: Option<PathBuf>,
    /// How often the fleet is counted for `/metrics`.
    #[arg(long, env = "FLOTILLA_CENSUS_INTERVAL", value_parser = humantime::parse_duration, default_value = "15s")]
    pub census_interval: std::time::Duration,
    /// File holding the nkey seed manifests are signed with (`flotilla keys
    /// generate`). Repeat it while rotating: every manifest then carries a
    /// signature by each key. None: manifests are unsigned, and only agents
    /// run with --allow-unsigned accept them.
    #[arg(
        long = "signing-key-file",
        env = "FLOTILLA_SIGNING_KEY_FILES",
        value_delimiter = ',',
        value_name = "FILE"
    )]
    pub signing_key_files: Vec<PathBuf>,
}

impl Args {
    /// The daemon's configuration: connection, bucket, heartbeat policy,
    /// thresholds and the signing keys read from their files.
    pub fn config(self) -> Result<Config, ArgsError> {
        let mut config = Config::new(self.nats.url());
        config.auth = self.nats.auth()?;
        config.tls = self.nats.tls()?;
        config.bucket = self.bucket;
        config.replicas = self.replicas;
        config.heartbeat = crate::heartbeat::HeartbeatPolicy {
            max_per_second: self.heartbeat_max_rate.max(1),
            min_interval: self.heartbeat_min_interval,
            max_interval: self.heartbeat_max_interval,
        };
        config.thresholds.stale_after = self.stale_after;
        config.thresholds.offline_after = self.offline_after;
        config.rollout_recheck = self.rollout_recheck;
        config.lease_ttl = self.lease_ttl;
        config.sites = self.sites;
        config.http = http_config(&self.listen, self.http_token_file.as_deref())?;
        config.census_interval = self.census_interval;
        config.hub_domain = self.hub_domain;
        config.signing = std::sync::Arc::new(signing_keys(&self.signing_key_files)?);
        Ok(config)
    }
}

/// A lease time of at least 1 s (renewals go out every third of it).
fn parse_lease_ttl(s: &str) -> Result<std::time::Duration, String> {
    let ttl = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if ttl < std::time::Duration::from_secs(1) {
        return Err(format!(
            "{s}: a lease time under 1 s leaves no room for a renewal"
        ));
    }
    Ok(ttl)
}

/// The signing keys from their seed files; the seed itself never reaches a
/// log or an error message.
pub fn signing_keys(files: &[PathBuf]) -> Result<SigningKeys, ArgsError> {
    let mut signers = Vec::new();
    for file in files {
        let seed = std::fs::read_to_string(file).map_err(|source| ArgsError::ReadKey {
            file: file.clone(),
            source,
        })?;
        let signer = Signer::from_seed(&seed).map_err(|source| ArgsError::NotASeed {
            file: file.clone(),
            source,
        })?;
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(file) {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(file = %file.display(), mode = format!("{:o}", mode & 0o777), "the signing key file is readable by others than its owner; chmod 600 it");
            }
        }
        signers.push(signer);
    }
    Ok(SigningKeys::new(signers))
}

/// `--listen` and `--http-token-file` as the daemon's HTTP configuration.
fn http_config(
    listen: &str,
    token_file: Option<&std::path::Path>,
) -> Result<Option<crate::http::HttpConfig>, ArgsError> {
    if listen == "off" {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = listen.parse().map_err(|e| {
        ArgsError::Http(format!(
            "--listen {listen:?}: {e} (e.g. 127.0.0.1:8080, or off)"
        ))
    })?;
    let token = match token_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ArgsError::Http(format!(
                    "cannot read --http-token-file {}: {e}",
                    path.display()
                ))
            })?;
            let token = text.trim().to_owned();
            if token.is_empty() {
                return Err(ArgsError::Http(format!(
                    "--http-token-file {} is empty",
                    path.display()
                )));
            }
            Some(token)
        }
    };
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(ArgsError::Http(format!(
            "--listen {addr} is beyond loopback: give --http-token-file, or listen on 127.0.0.1"
        )));
    }
    Ok(Some(crate::http::HttpConfig {
        listen: addr,
        token,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_the_daemon_config_and_a_bad_key_file_is_named_not_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = {
            let (seed, public) = Signer::generate();
            let p = dir.path().join("signing.nk");
            std::fs::write(&p, seed).unwrap();
            (p, public)
        };
        let config = Args::try_parse_from([
            "flotilla-control",
            "--nats-url",
            "nats://a:4222",
            "--bucket",
            "lab",
            "--signing-key-file",
            key.to_str().unwrap(),
        ])
        .unwrap()
        .config()
        .unwrap();
        assert_eq!(config.nats_url, "nats://a:4222");
        assert_eq!(config.bucket.as_str(), "lab");
        assert_eq!(config.signing.key_ids(), vec![public]);

        let bad = dir.path().join("bad.nk");
        std::fs::write(&bad, "SOTHISISNOTASEED").unwrap();
        let err = Args::try_parse_from([
            "flotilla-control",
            "--signing-key-file",
            bad.to_str().unwrap(),
        ])
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
        assert!(err.contains("bad.nk does not hold an nkey seed"), "{err}");
        assert!(!err.contains("SOTHISISNOTASEED"), "{err}");
    }

    #[test]
    fn http_listens_on_loopback_by_default_and_needs_a_token_beyond_it() {
        let c = http_config("127.0.0.1:8080", None).unwrap().unwrap();
        assert!(c.token.is_none());
        assert!(http_config("off", None).unwrap().is_none());
        let e = http_config("0.0.0.0:8080", None).unwrap_err().to_string();
        assert!(e.contains("--http-token-file"), "{e}");
        assert!(http_config("nonsense", None).is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, " t0ken \n").unwrap();
        let c = http_config("0.0.0.0:8080", Some(&f)).unwrap().unwrap();
        assert_eq!(c.token.as_deref(), Some("t0ken"));
        std::fs::write(&f, "\n").unwrap();
        assert!(http_config("0.0.0.0:8080", Some(&f)).is_err());
    }
}
