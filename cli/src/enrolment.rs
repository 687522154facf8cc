//! `flotilla auth init|site` and `flotilla agent enroll|revoke`: the commands
//! over [`crate::authority`], and their output.

use serde_json::json;

use crate::args::{AgentAction, AuthAction, Format, GlobalArgs};
use crate::authority::{self, Authority};
use crate::exit::CliError;

pub fn auth(g: &GlobalArgs, action: &AuthAction) -> Result<(), CliError> {
    match action {
        AuthAction::Init { dir, resolver_dir } => {
            let made = Authority::new(dir).init(&g.bucket, resolver_dir)?;
            if g.output == Format::Json {
                println!("{}", serde_json::to_string(&made).expect("serialises"));
            } else {
                println!(
                    "authority created in {dir}\n\
                     operator        {op}\n\
                     fleet account   {acc}\n\
                     server config   {conf} (include it from nats-server's configuration)\n\
                     control plane   {control}\n\
                     operators       {operators}\n\
                     Keep {dir} on one operator machine, never on a server or device: it holds the keys that issue every credential.",
                    dir = dir.display(),
                    op = made.operator,
                    acc = made.fleet_account,
                    conf = made.server_config.display(),
                    control = made.control_creds.display(),
                    operators = made.operator_creds.display(),
                );
            }
            Ok(())
        }
        AuthAction::Site {
            name,
            dir,
            out,
            hub,
            install_dir,
            hub_ca,
            resolver_dir,
            hub_domain,
        } => {
            let layout = authority::SiteLayout {
                hub: hub.clone(),
                install_dir: install_dir.clone(),
                hub_ca: hub_ca.clone(),
                resolver_dir: resolver_dir.clone(),
                hub_domain: hub_domain.clone(),
            };
            let made = Authority::new(dir).site(&g.bucket, name, out, &layout)?;
            if g.output == Format::Json {
                println!("{}", serde_json::to_string(&made).expect("serialises"));
            } else {
                println!(
                    "site {name}: {conf} ({creds})\n\
                     Install site.conf, {fleet} and {system} in {install} on the site server.",
                    conf = made.config.display(),
                    creds = if made.issued_credentials {
                        "new uplink credentials issued"
                    } else {
                        "uplink credentials kept"
                    },
                    fleet = authority::site::SITE_FLEET_CREDS,
                    system = authority::site::SITE_SYSTEM_CREDS,
                    install = install_dir.display(),
                );
            }
            Ok(())
        }
    }
}

pub async fn agent(g: &GlobalArgs, action: &AgentAction) -> Result<(), CliError> {
    match action {
        AgentAction::Enroll {
            agent,
            auth_dir,
            out,
            expires,
            labels,
        } => {
            let enrolled = Authority::new(auth_dir).enroll(&g.bucket, agent, out, *expires)?;
            if !labels.is_empty() {
                crate::values::set_labels(g, agent, labels).await?;
            }
            if g.output == Format::Json {
                println!("{}", serde_json::to_string(&enrolled).expect("serialises"));
            } else {
                println!(
                    "{agent}: credentials in {} (user {})",
                    out.display(),
                    enrolled.public_key
                );
            }
            Ok(())
        }
        AgentAction::Revoke { agent, auth_dir } => {
            let authority = Authority::new(auth_dir);
            let (jwt, revoked) = authority.revoke(agent)?;
            let tls = g.nats.tls().map_err(|e| CliError::Usage(e.to_string()))?;
            authority::push_account(g.nats.url(), &authority.system_creds(), &tls, &jwt).await?;
            // The running server stored the change in its resolver
            // directory; the preloaded copy in its configuration must carry
            // it too, or a server rebuilt without that directory would admit
            // the revoked keys again.
            let conf = authority.server_config_path();
            if g.output == Format::Json {
                println!(
                    "{}",
                    json!({"agentId": agent, "revoked": revoked, "serverConfig": conf})
                );
            } else {
                println!(
                    "{agent}: {} credential(s) revoked; the server refuses them now",
                    revoked.len()
                );
                println!(
                    "install the rewritten {} on every nats-server beside its configuration, as after `flotilla auth init`",
                    conf.display()
                );
            }
            Ok(())
        }
    }
}
