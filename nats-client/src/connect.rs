//! The one way a Flotilla process connects to NATS.

use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;

use async_nats::{ConnectOptions, Event, ServerAddr, ServerError};

use crate::auth::Auth;
use crate::tls::Tls;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no NATS server given (expected a comma-separated list of URLs)")]
    NoServers,
    #[error("invalid NATS server address {addr:?}")]
    BadServer {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read NATS credentials file {path}")]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read nkey seed file {path}")]
    ReadSeed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not hold a valid nkey seed")]
    InvalidSeed {
        path: PathBuf,
        #[source]
        source: nkeys::error::Error,
    },
    #[error("cannot connect to NATS at {servers}")]
    Connect {
        servers: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

/// Logs a connection event at the level it matters to whoever runs the
/// process. A server's refusal is an error and says what usually causes it,
/// since the operation it refused otherwise only surfaces as a timeout:
/// credentials that are not this process's own (another device's, or an
/// operator's on a device), or revoked or expired ones (the server closes
/// the connection; reconnecting then fails with an authorization violation,
/// which async-nats logs itself). A connection made is info and one lost is
/// a warning, so a daemon's log shows every outage and its end.
pub fn log_event(event: &Event) {
    let refusal = match event {
        Event::ServerError(ServerError::AuthorizationViolation) => {
            Some("authorization violation".to_owned())
        }
        Event::ServerError(ServerError::Other(e)) => {
            let e = e.to_lowercase();
            ["permissions violation", "authentication", "authorization"]
                .iter()
                .any(|n| e.contains(n))
                .then_some(e)
        }
        _ => None,
    };
    match (refusal, event) {
        (Some(e), _) if e.contains("permissions violation") => tracing::error!(
            error = %e,
            "the NATS server refused an operation these credentials do not allow: are they this process's own (a device's from `flotilla agent enroll <id>` for that id)?"
        ),
        (Some(e), _) => tracing::error!(
            error = %e,
            "the NATS server refused these credentials: revoked, expired, or not issued for this server"
        ),
        (
            None,
            Event::ServerError(_)
            | Event::ClientError(_)
            | Event::SlowConsumer(_)
            | Event::LameDuckMode,
        ) => {
            tracing::warn!(event = %event, "NATS")
        }
        (None, Event::Connected) => tracing::info!("connected to NATS"),
        (None, Event::Disconnected) => {
            tracing::warn!("disconnected from NATS; reconnecting (writes wait until then)")
        }
        (None, _) => tracing::debug!(event = %event, "NATS"),
    }
}

/// Connection settings: a server list, the caller's name, [`Auth`], and
/// optionally an inbox prefix, retry on first connect and an event callback.
#[derive(Debug)]
pub struct Connector {
    servers: String,
    auth: Auth,
    options: ConnectOptions,
}

impl Connector {
    /// `servers` is one URL or a comma-separated list (`nats://a:4222,nats://b:4222`);
    /// `name` is the client name the server shows (`flotilla-agent pi-1`).
    pub fn new(servers: impl Into<String>, name: impl Into<String>, auth: Auth) -> Self {
        Self {
            servers: servers.into(),
            auth,
            options: ConnectOptions::new()
                .name(name.into())
                .event_callback(|event| async move { log_event(&event) }),
        }
    }

    /// Replies go to `<prefix>.…` instead of `_INBOX.…`, so a server can
    /// confine a device to its own inbox.
    pub fn inbox_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.options = self.options.custom_inbox_prefix(prefix.into());
        self
    }

    /// TLS settings ([`Tls`]); none by default.
    pub fn tls(mut self, tls: &Tls) -> Self {
        self.options = tls.apply(self.options);
        self
    }

    /// Keep trying in the background when no server answers yet, instead of
    /// failing (daemons on devices that boot before the network).
    pub fn retry_on_initial_connect(mut self) -> Self {
        self.options = self.options.retry_on_initial_connect();
        self
    }

    /// Called on every connection event (Connected, Disconnected, …),
    /// instead of [`log_event`]; pass the events it does not handle on to
    /// [`log_event`].
    pub fn event_callback<F, Fut>(mut self, callback: F) -> Self
    where
        F: Fn(Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + Sync + 'static,
    {
        self.options = self.options.event_callback(callback);
        self
    }

    /// The parsed server list.
    ///
    /// # Errors
    /// [`ConnectError::NoServers`] for an empty list,
    /// [`ConnectError::BadServer`] for an entry that is not a NATS URL.
    pub fn server_addrs(&self) -> Result<Vec<ServerAddr>, ConnectError> {
        let addrs = self
            .servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                ServerAddr::from_str(s).map_err(|source| ConnectError::BadServer {
                    addr: s.to_owned(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if addrs.is_empty() {
            return Err(ConnectError::NoServers);
        }
        Ok(addrs)
    }

    /// Connects (or, with [`Connector::retry_on_initial_connect`], returns a
    /// client that keeps trying).
    ///
    /// # Errors
    /// A bad server list, an unreadable credentials or seed file, an invalid
    /// seed, or the connection itself failing.
    pub async fn connect(self) -> Result<async_nats::Client, ConnectError> {
        let addrs = self.server_addrs()?;
        let options = match self.auth {
            Auth::None => self.options,
            Auth::CredentialsFile(path) => self
                .options
                .credentials_file(&path)
                .await
                .map_err(|source| ConnectError::Credentials { path, source })?,
            Auth::NkeySeedFile(path) => {
                let seed = tokio::fs::read_to_string(&path).await.map_err(|source| {
                    ConnectError::ReadSeed {
                        path: path.clone(),
                        source,
                    }
                })?;
                let seed = seed.trim().to_owned();
                if let Err(source) = nkeys::KeyPair::from_seed(&seed) {
                    return Err(ConnectError::InvalidSeed { path, source });
                }
                self.options.nkey(seed)
            }
            Auth::UserPassword { user, password } => self.options.user_and_password(user, password),
        };
        options
            .connect(addrs)
            .await
            .map_err(|source| ConnectError::Connect {
                servers: self.servers,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists_are_split_and_checked() {
        let c = Connector::new(" nats://a:4222, nats://b:4223 ,", "t", Auth::None);
        assert_eq!(c.server_addrs().unwrap().len(), 2);
        let c = Connector::new(" , ", "t", Auth::None);
        assert!(matches!(c.server_addrs(), Err(ConnectError::NoServers)));
        let c = Connector::new("nats://a:4222,http://b", "t", Auth::None);
        assert!(matches!(
            c.server_addrs(),
            Err(ConnectError::BadServer { addr, .. }) if addr == "http://b"
        ));
    }
}
