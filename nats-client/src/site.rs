//! Sites with a JetStream domain of their own
//! (docs/adr/0023-sites-behind-leaf-nodes.md).
//!
//! A site's leaf node runs JetStream in the domain named after the site.
//! Its fleet bucket has the hub's configuration (RePublish rule included)
//! and *sources* from the hub's fleet bucket what its devices read
//! (`desired-state.>`, `settings.heartbeat`); the hub's fleet bucket
//! sources from each site what its devices write (`actual-state.>`,
//! `agents.>`), and the hub's heartbeat bucket each site's heartbeats.
//! Devices at a site use the site's JetStream exactly as they would the
//! hub's — same subjects, same credentials — so it answers while the
//! uplink is down, and both directions catch up from where they stopped
//! when it returns. The control plane keeps these sources
//! ([`ensure_site`] remotely through `$JS.<site>.API`, [`ensure_hub_sources`]
//! at the hub); nothing here is written by hand.

use async_nats::jetstream::{
    self,
    stream::{External, Source, SubjectTransform},
};
use manifest_types::{BucketName, keys};

use crate::bucket::{BucketError, Replicas, ensure_bucket};

/// The JetStream domain of the hub in the shipped configurations.
pub const DEFAULT_HUB_DOMAIN: &str = "hub";

/// A site's name: its leaf node's server name and its JetStream domain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SiteName(String);

impl SiteName {
    /// 1–64 letters, digits, `-` or `_` (a server name and a subject token).
    pub fn new(name: &str) -> Result<Self, String> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(format!(
                "site name {name:?}: use 1-64 letters, digits, '-' or '_'"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SiteName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::new(s)
    }
}

impl std::fmt::Display for SiteName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The subjects a site's fleet bucket takes from the hub: what its devices read.
pub fn from_hub(bucket: &BucketName) -> Vec<String> {
    vec![
        keys::kv_subject(bucket, &format!("{}.>", keys::DESIRED_STATE)),
        keys::kv_subject(bucket, keys::HEARTBEAT_SETTINGS),
    ]
}

/// The subjects the hub's fleet bucket takes from a site: what its devices write.
pub fn from_site(bucket: &BucketName) -> Vec<String> {
    vec![
        keys::kv_subject(bucket, &format!("{}.>", keys::ACTUAL_STATE)),
        keys::kv_subject(bucket, &format!("{}.>", keys::AGENTS)),
    ]
}

/// Stream `stream` in JetStream domain `domain`, limited to `subjects`.
fn source(stream: String, domain: &str, subjects: Vec<String>) -> Source {
    Source {
        name: stream,
        external: Some(External {
            api_prefix: format!("$JS.{domain}.API"),
            delivery_prefix: None,
        }),
        subject_transforms: subjects
            .into_iter()
            .map(|s| SubjectTransform {
                source: s.clone(),
                destination: s,
            })
            .collect(),
        ..Default::default()
    }
}

/// What identifies a source here: stream, API prefix, subjects.
fn identity(s: &Source) -> (String, Option<String>, Vec<String>) {
    (
        s.name.clone(),
        s.external.as_ref().map(|e| e.api_prefix.clone()),
        s.subject_transforms
            .iter()
            .map(|t| t.source.clone())
            .collect(),
    )
}

fn same_sources(have: Option<&Vec<Source>>, want: &[Source]) -> bool {
    let mut a: Vec<_> = have.into_iter().flatten().map(identity).collect();
    let mut b: Vec<_> = want.iter().map(identity).collect();
    a.sort();
    b.sort();
    a == b
}

/// Sets the sources of stream `name` in `js` to exactly `want`.
async fn set_sources(
    js: &jetstream::Context,
    bucket: &BucketName,
    name: &str,
    want: Vec<Source>,
) -> Result<bool, BucketError> {
    let read = |e: async_nats::Error| BucketError::Read {
        bucket: bucket.clone(),
        source: e,
    };
    let mut stream = js.get_stream(name).await.map_err(|e| read(e.into()))?;
    let info = stream.info().await.map_err(|e| read(e.into()))?;
    if same_sources(info.config.sources.as_ref(), &want) {
        return Ok(false);
    }
    let mut config = info.config.clone();
    config.sources = (!want.is_empty()).then_some(want);
    js.update_stream(config)
        .await
        .map_err(|e| BucketError::Create {
            bucket: bucket.clone(),
            source: e.into(),
        })?;
    Ok(true)
}

/// Makes (or corrects) site `site`'s buckets through `$JS.<site>.API`: its
/// fleet bucket, sourcing [`from_hub`] from the hub's in domain
/// `hub_domain`, and its heartbeat bucket. Returns whether anything changed.
///
/// # Errors
/// A [`BucketError`] when the site's JetStream does not answer (its uplink
/// is down, or it is not configured as a site) or refuses.
pub async fn ensure_site(
    client: &async_nats::Client,
    bucket: &BucketName,
    site: &SiteName,
    hub_domain: &str,
) -> Result<bool, BucketError> {
    let js = jetstream::with_domain(client.clone(), site.as_str());
    // The hub's configuration (the RePublish rule included), one replica.
    let before = js.get_stream(keys::stream_name(bucket)).await.is_ok();
    ensure_bucket(&js, bucket, Replicas::ONE).await?;
    let mut changed = !before;
    let fleet = keys::stream_name(bucket);
    let want = vec![source(fleet.clone(), hub_domain, from_hub(bucket))];
    changed |= set_sources(&js, bucket, &fleet, want).await?;
    Ok(changed)
}

/// Makes the hub's fleet and heartbeat buckets source from every site in
/// `sites` (and from no other). Returns whether anything changed.
///
/// # Errors
/// A [`BucketError`] when the hub refuses.
pub async fn ensure_hub_sources(
    js: &jetstream::Context,
    bucket: &BucketName,
    sites: &[SiteName],
) -> Result<bool, BucketError> {
    let fleet = keys::stream_name(bucket);
    let heartbeat_bucket = BucketName::new(keys::heartbeat_bucket(bucket)).expect("a valid bucket");
    let heartbeats = keys::stream_name(&heartbeat_bucket);
    let fleet_sources = sites
        .iter()
        .map(|s| source(fleet.clone(), s.as_str(), from_site(bucket)))
        .collect();
    let heartbeat_sources = sites
        .iter()
        .map(|s| {
            source(
                heartbeats.clone(),
                s.as_str(),
                vec![keys::kv_subject(&heartbeat_bucket, ">")],
            )
        })
        .collect();
    let a = set_sources(js, bucket, &fleet, fleet_sources).await?;
    let b = set_sources(js, bucket, &heartbeats, heartbeat_sources).await?;
    Ok(a || b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_names_are_server_names_and_domains() {
        for ok in ["shop-12", "b_2", "S1"] {
            assert!(SiteName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a.b", "x/y", "hub>", &"s".repeat(65)] {
            assert!(SiteName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_side_takes_only_what_the_other_writes() {
        let b = BucketName::default();
        assert_eq!(
            from_hub(&b),
            ["$KV.fleet.desired-state.>", "$KV.fleet.settings.heartbeat"]
        );
        assert_eq!(
            from_site(&b),
            ["$KV.fleet.actual-state.>", "$KV.fleet.agents.>"]
        );
        let s = source("KV_fleet".into(), "shop-1", from_site(&b));
        assert_eq!(s.external.unwrap().api_prefix, "$JS.shop-1.API");
    }

    #[test]
    fn sources_compare_by_stream_domain_and_subjects_in_any_order() {
        let b = BucketName::default();
        let one = source("KV_fleet".into(), "a", from_site(&b));
        let two = source("KV_fleet".into(), "b", from_site(&b));
        assert!(same_sources(
            Some(&vec![two.clone(), one.clone()]),
            &[one.clone(), two.clone()]
        ));
        assert!(!same_sources(Some(&vec![one.clone()]), &[one.clone(), two]));
        assert!(same_sources(None, &[]));
        assert!(!same_sources(None, &[one]));
    }
}
