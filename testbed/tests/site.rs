//! A site behind a leaf node (docs/adr/0023): the shipped
//! `deploy/nats/leaf/flotilla-leaf.conf` with what `flotilla auth site`
//! wrote, dialling a hub that runs the shipped `flotilla-secure.conf`
//! through an uplink the test cuts and restores. Devices at the site
//! converge a deployment applied at the hub; with the uplink cut they keep
//! their workloads and last good manifest and the hub shows them Offline
//! (never Converged from old data); a change applied meanwhile reaches them
//! soon after the uplink returns. At the site, a device's credentials
//! still confine it to its own subjects, and a revocation made at the hub
//! cuts it off there.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::secure::{SecureFleet, Servers};
use testbed::site::Site;
use testbed::{SecureServer, TestPki};

/// A hub running the shipped secure configuration and one site, `shop-1`,
/// dialling it through an uplink the test can cut.
struct Hub {
    hub: SecureServer,
    site: Site,
}

impl Servers for Hub {
    fn urls(&self) -> String {
        self.hub.server.url()
    }

    fn logs(&self) -> String {
        format!(
            "--- hub\n{}\n--- site\n{}",
            self.hub.server.log(),
            self.site.server.log()
        )
    }

    fn authority(&self) -> &Path {
        &self.hub.authority
    }

    fn pki(&self) -> &TestPki {
        &self.hub.pki
    }
}

type Fleet = SecureFleet<Hub>;

/// The hub, the site, and flotilla-control keeping the site's buckets.
fn start() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let hub = SecureServer::start(dir.path());
    let site = Site::start(&hub, dir.path(), "shop-1");
    let mut fleet = SecureFleet::new(dir, Hub { hub, site });
    fleet.start_control(&["--site", "shop-1"]);
    fleet
}

fn file(fleet: &Fleet, id: &str) -> String {
    fleet.files(&[id]).remove(0)
}

const AT_SITE: [&str; 2] = ["pi-s1", "pi-s2"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_converges_rides_out_a_cut_uplink_and_catches_up() {
    let mut fleet = start();
    let site_url = fleet.servers.site.server.url();
    for id in AT_SITE {
        fleet.start_agent_resyncing(id, &site_url, "30s");
    }
    let hub_url = fleet.servers.hub.server.url();
    fleet.start_agent("pi-hub", &hub_url);
    fleet
        .wait(
            "every device registered at the hub",
            Duration::from_secs(30),
            || {
                let a = fleet.agents_via(&fleet.servers.urls())?;
                ["pi-s1", "pi-s2", "pi-hub"]
                    .iter()
                    .all(|id| a.get(*id).is_some_and(|r| r["liveness"] == "Online"))
                    .then_some(())
            },
        )
        .await;
    // The site's devices may join the deployment's targets a moment after
    // the hub's own (their inventory is sourced from the site).
    fleet.ok(&fleet.apply("v1", "", &["--wait", "--timeout", "60s"]));
    fleet
        .wait("the site's devices on v1", Duration::from_secs(30), || {
            AT_SITE
                .iter()
                .all(|id| file(&fleet, id) == "v1")
                .then_some(())
        })
        .await;
    let written = std::fs::metadata(fleet.root().join("pi-s1.motd"))
        .unwrap()
        .modified()
        .unwrap();

    // The uplink goes down: the hub shows the site's devices Offline, and
    // never Converged once their heartbeat is late.
    let logs_at_cut: std::collections::BTreeMap<&str, usize> = AT_SITE
        .iter()
        .map(|id| (*id, fleet.agent_log(id).len()))
        .collect();
    fleet.servers.site.uplink.cut();
    let cut = Instant::now();
    let offline_after = fleet
        .wait(
            "the site's devices Offline at the hub",
            Duration::from_secs(30),
            || {
                let a = fleet.agents_via(&fleet.servers.urls())?;
                for id in AT_SITE {
                    if a[id]["liveness"] != "Online" {
                        assert_ne!(a[id]["state"], "Converged", "{a:?}");
                    }
                }
                AT_SITE
                    .iter()
                    .all(|id| a[*id]["liveness"] == "Offline")
                    .then(|| cut.elapsed())
            },
        )
        .await;
    // A change at the hub while the site is cut off reaches the hub's own device.
    fleet.ok(&fleet.apply("v2", "", &[]));
    fleet
        .wait("pi-hub on v2", Duration::from_secs(30), || {
            (file(&fleet, "pi-hub") == "v2").then_some(())
        })
        .await;
    // At the site, its own JetStream answers: its devices never lose it,
    // and an operator there sees them live (Online) while the hub cannot.
    let site_url = fleet.servers.site.server.url();
    fleet
        .wait(
            "the site's devices Online at the site",
            Duration::from_secs(30),
            || {
                let a = fleet.agents_via(&site_url)?;
                AT_SITE
                    .iter()
                    .all(|id| a.get(*id).is_some_and(|r| r["liveness"] == "Online"))
                    .then_some(())
            },
        )
        .await;
    for id in AT_SITE {
        let log = fleet.agent_log(id);
        assert!(
            !log[logs_at_cut[id]..].contains("does not answer"),
            "{id} lost its JetStream while the uplink was cut:\n{log}"
        );
    }
    for id in AT_SITE {
        assert_eq!(file(&fleet, id), "v1");
    }
    assert_eq!(
        std::fs::metadata(fleet.root().join("pi-s1.motd"))
            .unwrap()
            .modified()
            .unwrap(),
        written
    );

    // The uplink returns: the change made meanwhile reaches the site
    // without waiting for a resync (30 s here), and the hub shows the
    // site's devices Online and Converged from fresh reports.
    fleet.servers.site.uplink.restore();
    let healed = Instant::now();
    let caught_up = fleet
        .wait(
            "the site's devices converged on v2",
            Duration::from_secs(25),
            || {
                AT_SITE
                    .iter()
                    .all(|id| file(&fleet, id) == "v2")
                    .then(|| healed.elapsed())
            },
        )
        .await;
    let reported = fleet
        .wait(
            "the site's devices Online and Converged at the hub",
            Duration::from_secs(25),
            || {
                let a = fleet.agents_via(&fleet.servers.urls())?;
                AT_SITE
                    .iter()
                    .all(|id| a[*id]["liveness"] == "Online" && a[*id]["state"] == "Converged")
                    .then(|| healed.elapsed())
            },
        )
        .await;
    eprintln!(
        "site uplink cut: Offline at the hub after {offline_after:?}; after the uplink returned, \
         the change applied meanwhile on the devices after {caught_up:?}, Online and Converged at \
         the hub after {reported:?}; CAS conflicts {}",
        testbed::cas_conflicts(fleet.dir.path())
    );
}

/// At the site, a device's credentials confine it to its own subjects as
/// at the hub, and a revocation made at the hub cuts it off at the site
/// (the site's account cache hears of it over the system account).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_confines_its_devices_and_follows_revocations_made_at_the_hub() {
    let mut fleet = start();
    let site_url = fleet.servers.site.server.url();
    for id in AT_SITE {
        fleet.start_agent_resyncing(id, &site_url, "30s");
    }
    fleet
        .wait(
            "the site's devices registered at the hub",
            Duration::from_secs(30),
            || {
                let a = fleet.agents_via(&fleet.servers.urls())?;
                AT_SITE
                    .iter()
                    .all(|id| a.get(*id).is_some_and(|r| r["liveness"] == "Online"))
                    .then_some(())
            },
        )
        .await;

    // pi-s1's credentials, used at the site against pi-s2's keys.
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = errors.clone();
    let thief = async_nats::ConnectOptions::with_credentials_file(fleet.device_creds("pi-s1"))
        .await
        .unwrap()
        .add_root_certificates(fleet.servers.hub.pki.ca.clone())
        .add_client_certificate(
            fleet.servers.hub.pki.client_cert.clone(),
            fleet.servers.hub.pki.client_key.clone(),
        )
        .require_tls(true)
        .custom_inbox_prefix("_INBOX.pi-s1")
        .request_timeout(Some(Duration::from_millis(500)))
        .event_callback(move |e| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = e {
                    seen.lock().unwrap().push(e.to_string().to_lowercase());
                }
            }
        })
        .connect(&site_url)
        .await
        .unwrap();
    let forged = "$KV.fleet.actual-state.pi-s2";
    let peek = "$JS.API.DIRECT.GET.KV_fleet.$KV.fleet.desired-state.pi-s2";
    thief.publish(forged, "{}".into()).await.unwrap();
    let _ = thief.request(peek, "".into()).await;
    thief.flush().await.unwrap();
    fleet
        .wait(
            "both attempts refused at the site",
            Duration::from_secs(10),
            || {
                let e = errors.lock().unwrap();
                let refused = |s: &str| {
                    e.iter().any(|m| {
                        m.contains("permissions violation") && m.contains(&s.to_lowercase())
                    })
                };
                (refused(forged) && refused(peek)).then_some(())
            },
        )
        .await;

    // Revoked at the hub; cut off at the site.
    let at = Instant::now();
    fleet.ok(&fleet.flotilla(&[
        "agent",
        "revoke",
        "pi-s1",
        "--auth-dir",
        fleet.servers.hub.authority.to_str().unwrap(),
    ]));
    fleet
        .wait("pi-s1 refused at the site", Duration::from_secs(30), || {
            fleet
                .agent_log("pi-s1")
                .contains("the NATS server refused these credentials")
                .then_some(())
        })
        .await;
    eprintln!(
        "revocation at the hub: pi-s1 refused at the site {:?} later",
        at.elapsed()
    );
    // pi-s2, not revoked, keeps working there.
    assert!(
        !fleet
            .agent_log("pi-s2")
            .contains("refused these credentials")
    );
}

/// A site whose credentials were issued by another authority: the hub
/// refuses its uplink, and the control plane says the site does not
/// answer while it serves the rest of the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_with_credentials_from_another_authority_is_refused_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let hub = SecureServer::start(dir.path());
    let other = dir.path().join("other-authority");
    let made = std::process::Command::new(testbed::binary("flotilla"))
        .args(["auth", "init", "--dir"])
        .arg(&other)
        .arg("--resolver-dir")
        .arg(dir.path().join("other-jwt"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let site = Site::issued_by(&other, &hub, dir.path(), "shop-x");
    let mut fleet = SecureFleet::new(dir, Hub { hub, site });
    fleet.start_control(&["--site", "shop-x"]);
    let hub_url = fleet.servers.urls();
    fleet.start_agent("pi-hub", &hub_url);
    fleet.ok(&fleet.apply("v1", "", &[]));
    fleet
        .wait(
            "the hub's own device on v1",
            Duration::from_secs(30),
            || (file(&fleet, "pi-hub") == "v1").then_some(()),
        )
        .await;
    let control_log =
        || std::fs::read_to_string(fleet.dir.path().join("control.log")).unwrap_or_default();
    fleet
        .wait(
            "the control plane reports the site",
            Duration::from_secs(30),
            || {
                control_log()
                    .contains("the site's JetStream does not answer")
                    .then_some(())
            },
        )
        .await;
    fleet
        .wait(
            "the hub refuses the site's uplink",
            Duration::from_secs(30),
            || {
                let log = fleet.servers.hub.server.log().to_lowercase();
                (log.contains("authorization violation") || log.contains("authentication error"))
                    .then_some(())
            },
        )
        .await;
}
