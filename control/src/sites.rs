//! Sites with a JetStream domain of their own (`--site`, docs/adr/0023):
//! one task keeps every site's buckets and the hub's sources as
//! `flotilla_nats::site` defines them. A site whose uplink is down is
//! retried every few seconds (its devices work on their own meanwhile);
//! one that answers is checked again every half minute, so a site server
//! rebuilt without its store gets its buckets back.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use flotilla_nats::site::{SiteName, ensure_hub_sources, ensure_site};
use manifest_types::BucketName;

/// How soon a site that did not answer is tried again.
const RETRY: Duration = Duration::from_secs(2);
/// How often sites that answered are checked again.
const RECHECK: Duration = Duration::from_secs(30);

/// Runs until aborted.
pub async fn keep(
    client: async_nats::Client,
    js: jetstream::Context,
    bucket: BucketName,
    sites: Vec<SiteName>,
    hub_domain: String,
) {
    let mut hub_ready = false;
    let mut ready = BTreeSet::new();
    let mut warned = BTreeSet::new();
    loop {
        match ensure_hub_sources(&js, &bucket, &sites).await {
            Ok(changed) => {
                if changed || !hub_ready {
                    tracing::info!(sites = ?sites.iter().map(SiteName::as_str).collect::<Vec<_>>(), "the hub's buckets source from every site");
                }
                hub_ready = true;
            }
            Err(error) => {
                hub_ready = false;
                tracing::warn!(error = %crate::daemon::execute::error_chain(&error), "cannot set the hub's sources from the sites; retrying");
            }
        }
        for site in &sites {
            match ensure_site(&client, &bucket, site, &hub_domain).await {
                Ok(changed) => {
                    if ready.insert(site.clone()) || changed {
                        tracing::info!(%site, changed, "site's buckets source from the hub");
                    }
                    warned.remove(site);
                }
                Err(error) => {
                    ready.remove(site);
                    // Once per outage, not every retry.
                    if warned.insert(site.clone()) {
                        tracing::warn!(%site, error = %crate::daemon::execute::error_chain(&error), "the site's JetStream does not answer (uplink down, or not configured as a site?); its devices keep working on their own and catch up when it answers; retrying");
                    }
                }
            }
        }
        let all = hub_ready && ready.len() == sites.len();
        tokio::time::sleep(if all { RECHECK } else { RETRY }).await;
    }
}
