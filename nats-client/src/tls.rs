//! TLS to NATS, the same in agent, control plane and CLI: a CA file to
//! trust (TLS is then required) and, for mutual TLS, a client certificate
//! and key. The backend is async-nats' rustls with `ring`: pure Rust plus a
//! little C and assembly that cross-compiles for armv7 and aarch64, no
//! OpenSSL on the device.

use std::path::PathBuf;

/// TLS settings; the default is none (plain TCP, unless the URL says
/// `tls://` and the system roots suffice).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// PEM CA certificate(s) the server's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for servers that verify clients.
    pub client: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("a TLS client certificate was given without its key (--tls-key)")]
    CertWithoutKey,
    #[error("a TLS client key was given without its certificate (--tls-cert)")]
    KeyWithoutCert,
}

impl Tls {
    /// The settings from a CA file and a client certificate/key pair, each
    /// optional; half a pair is an error.
    ///
    /// # Errors
    /// [`TlsError`] for a certificate without a key or the reverse.
    pub fn pick(
        ca_file: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Self, TlsError> {
        let client = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (Some(_), None) => return Err(TlsError::CertWithoutKey),
            (None, Some(_)) => return Err(TlsError::KeyWithoutCert),
            (None, None) => None,
        };
        Ok(Self { ca_file, client })
    }

    pub fn is_enabled(&self) -> bool {
        self.ca_file.is_some() || self.client.is_some()
    }

    pub(crate) fn apply(
        &self,
        mut options: async_nats::ConnectOptions,
    ) -> async_nats::ConnectOptions {
        if let Some(ca) = &self.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.is_enabled() {
            options = options.require_tls(true);
        }
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_a_client_pair_is_an_error() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(Tls::pick(None, None, None), Ok(Tls::default()));
        assert!(!Tls::default().is_enabled());
        assert_eq!(Tls::pick(None, p("c"), None), Err(TlsError::CertWithoutKey));
        assert_eq!(Tls::pick(None, None, p("k")), Err(TlsError::KeyWithoutCert));
        let t = Tls::pick(p("ca"), p("c"), p("k")).unwrap();
        assert!(t.is_enabled());
        assert_eq!(t.client, Some(("c".into(), "k".into())));
    }
}
