//! Agent configuration: command-line flags, `FLOTILLA_*` environment variables
//! and an optional TOML file, in that order of precedence.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use manifest_types::signing::Trust;
use manifest_types::{AgentId, BucketName};
use serde::Deserialize;

/// Everything the agent needs to run, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub nats_url: String,
    pub agent_id: AgentId,
    pub bucket: BucketName,
    pub state_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    /// Canonical directories File resources may live under.
    pub file_roots: Vec<PathBuf>,
    pub resync_interval: Duration,
    pub heartbeat_interval: Duration,
    pub auth: NatsAuth,
    /// TLS to NATS: a CA file, optionally a client certificate (mTLS).
    pub tls: flotilla_nats::Tls,
    /// Docker Engine socket (`unix://…`); None: `DOCKER_HOST` or the default socket.
    pub docker_host: Option<String>,
    /// Grace period of a container stop before the engine kills it.
    pub container_stop_timeout: Duration,
    /// What containers may ask for; the manifest alone never grants it.
    pub container_policy: ContainerPolicy,
    /// Where unit files and drop-ins given in manifests are written.
    pub unit_dir: PathBuf,
    /// D-Bus address of systemd's bus; None: the system bus.
    pub systemd_bus: Option<String>,
    /// How long a reconcile waits for a unit's start/stop job before
    /// reporting the unit's state and moving on.
    pub unit_job_timeout: Duration,
    /// Reconciles in flight at once (at least 1).
    pub reconcile_concurrency: usize,
    /// Which manifests the agent converges to: signed by one of these keys,
    /// or (development only) unsigned.
    pub trust: Trust,
}

/// The device owner's limits on containers. Bind mounts are always limited
/// to the file roots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerPolicy {
    pub allow_privileged: bool,
    pub allow_host_network: bool,
    /// Capabilities `capAdd` may name (upper case, without `CAP_`).
    pub allowed_capabilities: Vec<String>,
}

/// How the agent authenticates to NATS: the one [`flotilla_nats::Auth`]
/// (precedence creds file > nkey seed file > user/password > none).
pub use flotilla_nats::Auth as NatsAuth;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    ParseFile {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("missing {0}: give it as a flag, a FLOTILLA_* variable or in the config file")]
    Missing(&'static str),
    #[error(transparent)]
    Id(#[from] manifest_types::IdError),
    #[error(transparent)]
    Auth(#[from] flotilla_nats::AuthError),
    #[error("invalid label {0:?}: expected key=value")]
    Label(String),
    #[error("{0}")]
    LabelValue(String),
    #[error(
        "file root {path} is unusable (it must be an absolute path to a directory, created if missing)"
    )]
    FileRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no trusted signing key: give --trusted-key (the control plane's public key, from `flotilla keys generate`), or --allow-unsigned for a development fleet"
    )]
    NoTrust,
    #[error(transparent)]
    Tls(#[from] flotilla_nats::TlsError),
    #[error("trusted key: {0}")]
    TrustedKey(#[from] manifest_types::signing::KeyError),
    #[error("invalid duration {value:?} for {what}: {source}")]
    Duration {
        what: &'static str,
        value: String,
        #[source]
        source: humantime::DurationError,
    },
}

/// Command-line flags; each also reads a `FLOTILLA_*` variable.
#[derive(Debug, Parser)]
#[command(
    name = "flotilla-agent",
    version,
    about = "Flotilla edge agent: converges this device to its manifest in NATS KV"
)]
pub struct Args {
    /// TOML config file; flags and environment variables override it.
    #[arg(long, env = "FLOTILLA_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub nats: flotilla_nats::NatsArgs,
    /// This device's agent id (lowercase letters, digits, '-', '_').
    #[arg(long, env = "FLOTILLA_ID")]
    pub id: Option<String>,
    /// KV bucket holding the fleet state.
    #[arg(long, env = "FLOTILLA_BUCKET")]
    pub bucket: Option<String>,
    /// Directory for the agent's own state (instance id, cached manifest, ledger).
    #[arg(long, env = "FLOTILLA_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// A label this device reports about itself, key=value (repeatable):
    /// a hint; selectors match the operator's labels (docs/adr/0017).
    #[arg(long = "label", env = "FLOTILLA_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Directory File resources may write under (repeatable). No roots: no File resources.
    #[arg(long = "file-root", env = "FLOTILLA_FILE_ROOTS", value_delimiter = ',')]
    pub file_roots: Vec<PathBuf>,
    /// Period of the drift check and desired-state resync (jittered), e.g. "60s".
    #[arg(long, env = "FLOTILLA_RESYNC_INTERVAL")]
    pub resync_interval: Option<String>,
    /// Period of the heartbeat (jittered), e.g. "15s".
    #[arg(long, env = "FLOTILLA_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<String>,
    /// Docker Engine socket, e.g. unix:///var/run/docker.sock (default: DOCKER_HOST or that).
    #[arg(long, env = "FLOTILLA_DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Grace period when stopping a container, e.g. "10s".
    #[arg(long, env = "FLOTILLA_CONTAINER_STOP_TIMEOUT")]
    pub container_stop_timeout: Option<String>,
    /// Let manifests run privileged containers.
    #[arg(long, env = "FLOTILLA_ALLOW_PRIVILEGED")]
    pub allow_privileged: bool,
    /// Let manifests run containers on the host network.
    #[arg(long, env = "FLOTILLA_ALLOW_HOST_NETWORK")]
    pub allow_host_network: bool,
    /// Capability containers may add (repeatable), e.g. NET_ADMIN.
    #[arg(
        long = "allow-capability",
        env = "FLOTILLA_ALLOW_CAPABILITIES",
        value_delimiter = ','
    )]
    pub allow_capabilities: Vec<String>,
    /// Directory for unit files and drop-ins given in manifests.
    #[arg(long, env = "FLOTILLA_UNIT_DIR")]
    pub unit_dir: Option<PathBuf>,
    /// D-Bus address of systemd (default: the system bus), e.g. unix:path=/run/dbus/system_bus_socket.
    #[arg(long, env = "FLOTILLA_SYSTEMD_BUS")]
    pub systemd_bus: Option<String>,
    /// How long to wait for a unit's start/stop job, e.g. "90s".
    #[arg(long, env = "FLOTILLA_UNIT_JOB_TIMEOUT")]
    pub unit_job_timeout: Option<String>,
    /// Resources reconciled at once (default 4); a slow pull or unit job
    /// occupies one of them, never the others.
    #[arg(long, env = "FLOTILLA_RECONCILE_CONCURRENCY")]
    pub reconcile_concurrency: Option<usize>,
    /// Public key of the control plane whose signed manifests this agent
    /// converges to (repeatable: old and new key while one is rotated).
    #[arg(
        long = "trusted-key",
        env = "FLOTILLA_TRUSTED_KEYS",
        value_delimiter = ','
    )]
    pub trusted_keys: Vec<String>,
    /// Accept unsigned manifests (a development fleet). Without trusted keys,
    /// signatures are then not checked at all.
    #[arg(long, env = "FLOTILLA_ALLOW_UNSIGNED")]
    pub allow_unsigned: bool,
}

/// The config file's shape (every key optional).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileConfig {
    pub nats_url: Option<String>,
    pub id: Option<String>,
    pub bucket: Option<String>,
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub file_roots: Vec<PathBuf>,
    pub resync_interval: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub creds: Option<PathBuf>,
    pub nkey_seed_file: Option<PathBuf>,
    pub nats_user: Option<String>,
    pub nats_password: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub docker_host: Option<String>,
    pub container_stop_timeout: Option<String>,
    #[serde(default)]
    pub allow_privileged: bool,
    #[serde(default)]
    pub allow_host_network: bool,
    #[serde(default)]
    pub allow_capabilities: Vec<String>,
    pub unit_dir: Option<PathBuf>,
    pub systemd_bus: Option<String>,
    pub unit_job_timeout: Option<String>,
    pub reconcile_concurrency: Option<usize>,
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    #[serde(default)]
    pub allow_unsigned: bool,
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/flotilla";
/// Reconciles in flight at once, by default (`reconcile-concurrency`).
pub const DEFAULT_CONCURRENCY: usize = 4;
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(60);
/// The contract's heartbeat period, from which liveness thresholds derive.
pub const DEFAULT_HEARTBEAT: Duration = manifest_types::convergence::DEFAULT_HEARTBEAT_INTERVAL;
pub const DEFAULT_CONTAINER_STOP_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_UNIT_JOB_TIMEOUT: Duration = Duration::from_secs(90);

impl Config {
    /// Merges flags/env over the optional file over defaults, and validates.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let id = args.id.or(file.id).ok_or(ConfigError::Missing("--id"))?;
        let mut labels = file.labels;
        for l in &args.labels {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| ConfigError::Label(l.clone()))?;
            labels.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        for (k, v) in &labels {
            manifest_types::inventory::validate_label(k, v).map_err(ConfigError::LabelValue)?;
        }
        let roots = if args.file_roots.is_empty() {
            file.file_roots
        } else {
            args.file_roots
        };
        let trust = Trust {
            keys: if args.trusted_keys.is_empty() {
                file.trusted_keys
            } else {
                args.trusted_keys
            }
            .into_iter()
            .map(|k| k.trim().to_owned())
            .collect(),
            allow_unsigned: args.allow_unsigned || file.allow_unsigned,
        };
        for key in &trust.keys {
            manifest_types::signing::check_public_key(key)?;
        }
        let nats = args.nats.or(flotilla_nats::NatsArgs {
            nats_url: file.nats_url,
            creds: file.creds,
            nkey_seed_file: file.nkey_seed_file,
            nats_user: file.nats_user,
            nats_password: file.nats_password,
            tls_ca: file.tls_ca,
            tls_cert: file.tls_cert,
            tls_key: file.tls_key,
        });
        let auth = nats.auth()?;
        let tls = nats.tls()?;
        let config = Self {
            nats_url: nats.url().to_owned(),
            agent_id: AgentId::new(id)?,
            bucket: match args.bucket.or(file.bucket) {
                Some(b) => BucketName::new(b)?,
                None => BucketName::default(),
            },
            state_dir: args
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            labels,
            file_roots: canonical_roots(&roots)?,
            resync_interval: duration(
                "resync-interval",
                args.resync_interval.or(file.resync_interval),
                DEFAULT_RESYNC,
            )?,
            heartbeat_interval: duration(
                "heartbeat-interval",
                args.heartbeat_interval.or(file.heartbeat_interval),
                DEFAULT_HEARTBEAT,
            )?,
            auth,
            tls,
            docker_host: args.docker_host.or(file.docker_host),
            container_stop_timeout: duration(
                "container-stop-timeout",
                args.container_stop_timeout.or(file.container_stop_timeout),
                DEFAULT_CONTAINER_STOP_TIMEOUT,
            )?,
            container_policy: ContainerPolicy {
                allow_privileged: args.allow_privileged || file.allow_privileged,
                allow_host_network: args.allow_host_network || file.allow_host_network,
                allowed_capabilities: if args.allow_capabilities.is_empty() {
                    file.allow_capabilities
                } else {
                    args.allow_capabilities
                }
                .iter()
                .map(|c| normalise_capability(c))
                .collect(),
            },
            unit_dir: args
                .unit_dir
                .or(file.unit_dir)
                .unwrap_or_else(|| crate::reconcile::systemd::DEFAULT_UNIT_DIR.into()),
            systemd_bus: args.systemd_bus.or(file.systemd_bus),
            unit_job_timeout: duration(
                "unit-job-timeout",
                args.unit_job_timeout.or(file.unit_job_timeout),
                DEFAULT_UNIT_JOB_TIMEOUT,
            )?,
            reconcile_concurrency: args
                .reconcile_concurrency
                .or(file.reconcile_concurrency)
                .unwrap_or(DEFAULT_CONCURRENCY)
                .max(1),
            trust,
        };
        if config.trust.keys.is_empty() && !config.trust.allow_unsigned {
            return Err(ConfigError::NoTrust);
        }
        Ok(config)
    }

    /// A config for tests and embedding: defaults plus the given essentials,
    /// accepting unsigned manifests (set [`Config::trust`] to require
    /// signatures, as the binary does).
    pub fn new(
        nats_url: impl Into<String>,
        agent_id: AgentId,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            nats_url: nats_url.into(),
            agent_id,
            bucket: BucketName::default(),
            state_dir: state_dir.into(),
            labels: BTreeMap::new(),
            file_roots: Vec::new(),
            resync_interval: DEFAULT_RESYNC,
            heartbeat_interval: DEFAULT_HEARTBEAT,
            auth: NatsAuth::None,
            tls: flotilla_nats::Tls::default(),
            docker_host: None,
            container_stop_timeout: DEFAULT_CONTAINER_STOP_TIMEOUT,
            container_policy: ContainerPolicy::default(),
            unit_dir: crate::reconcile::systemd::DEFAULT_UNIT_DIR.into(),
            systemd_bus: None,
            unit_job_timeout: DEFAULT_UNIT_JOB_TIMEOUT,
            reconcile_concurrency: DEFAULT_CONCURRENCY,
            trust: Trust {
                keys: Vec::new(),
                allow_unsigned: true,
            },
        }
    }

    /// Adds a file root (canonicalised; it must exist).
    pub fn with_file_root(mut self, root: &Path) -> Result<Self, ConfigError> {
        self.file_roots
            .extend(canonical_roots(&[root.to_path_buf()])?);
        Ok(self)
    }
}

/// `cap_net_admin` and `NET_ADMIN` name the same capability.
pub fn normalise_capability(c: &str) -> String {
    let upper = c.trim().to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_owned()
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::ParseFile {
        path: path.to_owned(),
        source,
    })
}

/// The roots, canonicalised. A configured root that does not exist yet is
/// created (mode 0755, with its missing parents): the device owner listed
/// it, and a Pi owner following the install steps should not meet a restart
/// loop over an empty directory. Relative roots are refused.
fn canonical_roots(roots: &[PathBuf]) -> Result<Vec<PathBuf>, ConfigError> {
    roots
        .iter()
        .map(|r| {
            if !r.is_absolute() {
                return Err(ConfigError::FileRoot {
                    path: r.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "not an absolute path",
                    ),
                });
            }
            if std::fs::symlink_metadata(r).is_err() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(r)
                    .map_err(|source| ConfigError::FileRoot {
                        path: r.clone(),
                        source,
                    })?;
            }
            let canon = r.canonicalize().map_err(|source| ConfigError::FileRoot {
                path: r.clone(),
                source,
            })?;
            if canon.is_dir() {
                Ok(canon)
            } else {
                Err(ConfigError::FileRoot {
                    path: r.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotADirectory,
                        "not a directory",
                    ),
                })
            }
        })
        .collect()
}

fn duration(
    what: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(&v).map_err(|source| ConfigError::Duration {
            what,
            value: v,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["flotilla-agent"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn flags_override_file_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            format!(
                "id = \"from-file\"\nnats-url = \"nats://file:4222\"\nresync-interval = \"5s\"\nfile-roots = [{:?}]\n[labels]\nrole = \"kiosk\"\n",
                dir.path()
            ),
        )
        .unwrap();
        let c = Config::from_args(args(&[
            "--config",
            file.to_str().unwrap(),
            "--id",
            "pi-9",
            "--label",
            "site=a",
            "--allow-unsigned",
        ]))
        .unwrap();
        assert_eq!(c.agent_id.as_str(), "pi-9");
        assert_eq!(c.nats_url, "nats://file:4222");
        assert_eq!(c.resync_interval, Duration::from_secs(5));
        assert_eq!(c.heartbeat_interval, DEFAULT_HEARTBEAT);
        assert_eq!(c.labels.get("role").map(String::as_str), Some("kiosk"));
        assert_eq!(c.labels.get("site").map(String::as_str), Some("a"));
        assert_eq!(c.file_roots, vec![dir.path().canonicalize().unwrap()]);
        assert_eq!(c.bucket.as_str(), "fleet");
        assert_eq!(c.reconcile_concurrency, DEFAULT_CONCURRENCY);
        let c = Config::from_args(args(&[
            "--config",
            file.to_str().unwrap(),
            "--reconcile-concurrency",
            "0",
            "--allow-unsigned",
        ]))
        .unwrap();
        assert_eq!(c.reconcile_concurrency, 1, "at least one");
    }

    #[test]
    fn the_shipped_example_parses_and_its_placeholder_key_says_what_it_wants() {
        let example: FileConfig =
            toml::from_str(include_str!("../../deploy/systemd/agent.toml.example"))
                .expect("agent.toml.example has only known keys");
        assert_eq!(example.trusted_keys.len(), 1);
        let err = manifest_types::signing::check_public_key(&example.trusted_keys[0])
            .expect_err("the placeholder is not a key");
        assert!(
            err.to_string().contains("is not a public nkey (O…"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_typed_errors() {
        assert!(matches!(
            Config::from_args(args(&[])),
            Err(ConfigError::Missing(_))
        ));
        assert!(matches!(
            Config::from_args(args(&["--id", "Bad.Id"])),
            Err(ConfigError::Id(_))
        ));
        assert!(matches!(
            Config::from_args(args(&["--id", "a", "--label", "novalue"])),
            Err(ConfigError::Label(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let a_file = dir.path().join("file");
        std::fs::write(&a_file, "").unwrap();
        for root in [
            "relative/root".to_owned(),
            a_file.display().to_string(),
            a_file.join("below-a-file").display().to_string(),
        ] {
            assert!(
                matches!(
                    Config::from_args(args(&["--id", "a", "--file-root", &root])),
                    Err(ConfigError::FileRoot { .. })
                ),
                "{root}"
            );
        }
        // A missing root is the owner's to name and the agent's to create.
        let missing = dir.path().join("opt/kiosk");
        let c = Config::from_args(args(&[
            "--id",
            "a",
            "--allow-unsigned",
            "--file-root",
            missing.to_str().unwrap(),
        ]))
        .unwrap();
        assert_eq!(c.file_roots, vec![missing.canonicalize().unwrap()]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&missing).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(matches!(
            Config::from_args(args(&[
                "--id",
                "a",
                "--allow-unsigned",
                "--resync-interval",
                "soon"
            ])),
            Err(ConfigError::Duration { .. })
        ));
        // Signed manifests only, unless explicitly a development agent.
        assert!(matches!(
            Config::from_args(args(&["--id", "a"])),
            Err(ConfigError::NoTrust)
        ));
        assert!(matches!(
            Config::from_args(args(&["--id", "a", "--trusted-key", "OBOGUS"])),
            Err(ConfigError::TrustedKey(_))
        ));
        let (_, public) = manifest_types::signing::Signer::generate();
        let c = Config::from_args(args(&["--id", "a", "--trusted-key", &public])).unwrap();
        assert_eq!(c.trust.keys, vec![public]);
        assert!(!c.trust.allow_unsigned);
    }
}
