//! The NATS connection flags every Flotilla program takes, defined once and
//! flattened into the agent, flotilla-control and the `flotilla` CLI: the
//! server URL, the four ways to authenticate ([`Auth::pick`] decides which
//! wins) and TLS ([`Tls::pick`]). Each flag also reads its `FLOTILLA_*`
//! environment variable.

use std::path::PathBuf;

use crate::{Auth, AuthError, Tls, TlsError};

/// The server every program connects to unless told otherwise.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL, or a comma-separated list [default: nats://127.0.0.1:4222].
    #[arg(long, global = true, env = "FLOTILLA_NATS_URL", value_name = "URL")]
    pub nats_url: Option<String>,
    /// NATS credentials file (.creds: JWT + nkey seed). Wins over every other method.
    #[arg(long, global = true, env = "FLOTILLA_CREDS", value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// File holding an nkey user seed. Wins over user/password.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_NKEY_SEED_FILE",
        value_name = "FILE"
    )]
    pub nkey_seed_file: Option<PathBuf>,
    /// NATS user (with --nats-password / FLOTILLA_NATS_PASSWORD).
    #[arg(long, global = true, env = "FLOTILLA_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password (with --nats-user).
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_NATS_PASSWORD",
        hide_env_values = true
    )]
    pub nats_password: Option<String>,
    /// CA certificate (PEM) the NATS server's certificate must chain to; TLS
    /// is then required.
    #[arg(long, global = true, env = "FLOTILLA_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that verify clients (mutual TLS).
    #[arg(long, global = true, env = "FLOTILLA_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, global = true, env = "FLOTILLA_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

impl NatsArgs {
    /// The server URL(s), [`DEFAULT_NATS_URL`] when none was given.
    pub fn url(&self) -> &str {
        self.nats_url.as_deref().unwrap_or(DEFAULT_NATS_URL)
    }

    /// How to authenticate: the first method given, by [`Auth::pick`]'s
    /// precedence.
    pub fn auth(&self) -> Result<Auth, AuthError> {
        Auth::pick(
            self.creds.clone(),
            self.nkey_seed_file.clone(),
            self.nats_user.clone(),
            self.nats_password.clone(),
        )
    }

    /// TLS to the server, if a CA (and optionally a client certificate) was given.
    pub fn tls(&self) -> Result<Tls, TlsError> {
        Tls::pick(
            self.tls_ca.clone(),
            self.tls_cert.clone(),
            self.tls_key.clone(),
        )
    }

    /// Each setting from `self`, else from `other` (flags over a config file).
    pub fn or(self, other: NatsArgs) -> NatsArgs {
        NatsArgs {
            nats_url: self.nats_url.or(other.nats_url),
            creds: self.creds.or(other.creds),
            nkey_seed_file: self.nkey_seed_file.or(other.nkey_seed_file),
            nats_user: self.nats_user.or(other.nats_user),
            nats_password: self.nats_password.or(other.nats_password),
            tls_ca: self.tls_ca.or(other.tls_ca),
            tls_cert: self.tls_cert.or(other.tls_cert),
            tls_key: self.tls_key.or(other.tls_key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        nats: NatsArgs,
    }

    #[test]
    fn flags_parse_and_flags_win_over_a_file() {
        let cli = Cli::try_parse_from([
            "x",
            "--nats-url",
            "nats://a:4222,nats://b:4222",
            "--creds",
            "/etc/flotilla/device.creds",
            "--nats-user",
            "u",
        ])
        .unwrap();
        assert_eq!(cli.nats.url(), "nats://a:4222,nats://b:4222");
        assert_eq!(
            cli.nats.auth().unwrap(),
            Auth::CredentialsFile("/etc/flotilla/device.creds".into()),
            "a credentials file wins"
        );
        let file = NatsArgs {
            nats_url: Some("nats://file:4222".into()),
            tls_ca: Some("/ca.pem".into()),
            ..NatsArgs::default()
        };
        let merged = cli.nats.or(file);
        assert_eq!(merged.url(), "nats://a:4222,nats://b:4222");
        assert_eq!(
            merged.tls_ca.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert_eq!(NatsArgs::default().url(), DEFAULT_NATS_URL);
    }
}
