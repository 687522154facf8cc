//! `flotilla auth site <name>`: what a site's leaf node needs
//! (docs/adr/0023-sites-behind-leaf-nodes.md) — its identity, an account
//! resolver that learns accounts (and revocations) from the hub, and two
//! uplink credentials:
//!
//! - `site-fleet.creds`, a fleet-account user allowed only what the
//!   sources between the site's JetStream and the hub's need
//!   ([`keys::site_uplink_permissions`]): no other stream, no stream
//!   changes, no KV writes at the hub;
//! - `site-system.creds`, a system-account user through which the site's
//!   cache resolver looks accounts up and hears their updates.
//!
//! `site.conf`, which `deploy/nats/leaf/flotilla-leaf.conf` includes, holds
//! the server name, the operator, the resolver with both accounts preloaded
//! (a site server starts and admits its devices with its uplink down) and
//! the two leaf remotes. Running the command again for the same site keeps
//! its credentials and rewrites `site.conf` with the accounts as they are
//! now (after `agent revoke`, so that a site restarted without its uplink
//! refuses the revoked devices too).

use std::path::{Path, PathBuf};

use manifest_types::BucketName;
use manifest_types::keys::{self, DevicePermissions};
use nkeys::KeyPair;
use serde::Serialize;
use serde_json::json;

use super::{
    ACCOUNT_SEED, ACCOUNT_STATE, AccountState, Authority, OPERATOR_SEED, SYSTEM_SEED, account_jwt,
    creds, io, load_key, operator_jwt, read_json, user_jwt, write_public, write_secret,
};
use crate::exit::CliError;

pub const SITE_CONF: &str = "site.conf";
pub const SITE_FLEET_CREDS: &str = "site-fleet.creds";
pub const SITE_SYSTEM_CREDS: &str = "site-system.creds";

/// Where the site server finds its files once installed.
#[derive(Debug, Clone)]
pub struct SiteLayout {
    /// The hub's leaf-node URLs (`tls://hub:7422`, one per hub node).
    pub hub: Vec<String>,
    /// The directory the credentials are installed in on the site server.
    pub install_dir: PathBuf,
    /// The CA that signed the hub's certificate, on the site server.
    pub hub_ca: PathBuf,
    /// The site server's account cache.
    pub resolver_dir: PathBuf,
    /// The hub's JetStream domain.
    pub hub_domain: String,
}

/// What `auth site` wrote.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SiteIssued {
    pub site: String,
    pub config: PathBuf,
    pub fleet_creds: PathBuf,
    pub system_creds: PathBuf,
    /// False when the credentials were already there and kept.
    pub issued_credentials: bool,
}

impl Authority {
    /// Writes `site.conf` and (once) the site's uplink credentials into `out`.
    pub fn site(
        &self,
        bucket: &BucketName,
        name: &str,
        out: &Path,
        layout: &SiteLayout,
    ) -> Result<SiteIssued, CliError> {
        flotilla_nats::site::SiteName::new(name).map_err(CliError::Usage)?;
        if layout.hub.is_empty() {
            return Err(CliError::Usage(
                "give the hub's leaf-node URL with --hub".into(),
            ));
        }
        let operator = load_key(&self.path(OPERATOR_SEED))?;
        let system = load_key(&self.path(SYSTEM_SEED))?;
        let account = load_key(&self.path(ACCOUNT_SEED))?;
        let state: AccountState = read_json(&self.path(ACCOUNT_STATE))?;
        std::fs::create_dir_all(out).map_err(io(format!("cannot create {}", out.display())))?;
        let fleet_creds = out.join(SITE_FLEET_CREDS);
        let system_creds = out.join(SITE_SYSTEM_CREDS);
        let issue = !fleet_creds.exists() || !system_creds.exists();
        if issue {
            for path in [&fleet_creds, &system_creds] {
                if path.exists() {
                    std::fs::remove_file(path)
                        .map_err(io(format!("cannot replace {}", path.display())))?;
                }
            }
            let DevicePermissions { publish, subscribe } =
                keys::site_uplink_permissions(bucket, &layout.hub_domain, name);
            let user = KeyPair::new_user();
            let jwt = user_jwt(
                &account,
                &user.public_key(),
                &format!("site-{name}"),
                json!({"allow": publish}),
                json!({"allow": subscribe}),
                None,
            );
            write_secret(&fleet_creds, &creds(&jwt, &user.seed().expect("a seed")))?;
            let user = KeyPair::new_user();
            let jwt = user_jwt(
                &system,
                &user.public_key(),
                &format!("site-{name}-resolver"),
                json!({}),
                json!({}),
                None,
            );
            write_secret(&system_creds, &creds(&jwt, &user.seed().expect("a seed")))?;
        }
        let config = out.join(SITE_CONF);
        let sys = system.public_key();
        let acc = account.public_key();
        let urls = layout
            .hub
            .iter()
            .map(|u| format!("{u:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let tls = if layout.hub.iter().any(|u| u.starts_with("tls://")) {
            format!(
                ", tls: {{ ca_file: {:?} }}",
                layout.hub_ca.display().to_string()
            )
        } else {
            String::new()
        };
        let remote = |creds: &str, account: &str| {
            format!(
                "    {{ urls: [{urls}], credentials: {:?}, account: \"{account}\"{tls} }}\n",
                layout.install_dir.join(creds).display().to_string()
            )
        };
        let text = format!(
            "# Generated by `flotilla auth site {name}`; run it again after `flotilla agent revoke`\n\
             # (it keeps the credentials and refreshes the preloaded accounts).\n\
             # Included by deploy/nats/leaf/flotilla-leaf.conf.\n\
             SITE: \"{name}\"\n\
             operator: \"{op}\"\n\
             system_account: {sys}\n\
             # Accounts come from the hub over the system remote and are cached here;\n\
             # updates (revocations) pushed to the hub reach this server the same way.\n\
             resolver: {{\n  type: cache\n  dir: {dir:?}\n  ttl: \"1h\"\n  limit: 1000\n}}\n\
             resolver_preload: {{\n  {sys}: \"{sys_jwt}\"\n  {acc}: \"{acc_jwt}\"\n}}\n\
             leafnodes {{\n  reconnect: \"1s\"\n  remotes: [\n{fleet}{system}  ]\n}}\n",
            op = operator_jwt(&operator, &sys),
            dir = layout.resolver_dir.display().to_string(),
            sys_jwt = account_jwt(&operator, &sys, "SYS", false, &AccountState::default()),
            acc_jwt = account_jwt(&operator, &acc, "flotilla", true, &state),
            fleet = remote(SITE_FLEET_CREDS, &acc),
            system = remote(SITE_SYSTEM_CREDS, &sys),
        );
        write_public(&config, &text)?;
        Ok(SiteIssued {
            site: name.to_owned(),
            config,
            fleet_creds,
            system_creds,
            issued_credentials: issue,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_keeps_its_credentials_and_refreshes_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::new(dir.path().join("auth"));
        let bucket = BucketName::default();
        authority.init(&bucket, &dir.path().join("jwt")).unwrap();
        let layout = SiteLayout {
            hub: vec!["tls://hub:7422".into()],
            install_dir: "/etc/nats".into(),
            hub_ca: "/etc/nats/tls/ca.pem".into(),
            resolver_dir: "/var/lib/nats/jwt".into(),
            hub_domain: "hub".into(),
        };
        let out = dir.path().join("shop-1");
        let first = authority.site(&bucket, "shop-1", &out, &layout).unwrap();
        assert!(first.issued_credentials);
        let creds_before = std::fs::read_to_string(&first.fleet_creds).unwrap();
        let conf = std::fs::read_to_string(&first.config).unwrap();
        assert!(conf.contains("SITE: \"shop-1\""));
        assert!(conf.contains("credentials: \"/etc/nats/site-fleet.creds\""));
        assert!(conf.contains("tls: { ca_file: \"/etc/nats/tls/ca.pem\" }"));
        assert_eq!(
            super::super::creds_user_name(&creds_before).as_deref(),
            Some("site-shop-1")
        );
        let again = authority.site(&bucket, "shop-1", &out, &layout).unwrap();
        assert!(!again.issued_credentials);
        assert_eq!(
            std::fs::read_to_string(&again.fleet_creds).unwrap(),
            creds_before
        );
    }
}
