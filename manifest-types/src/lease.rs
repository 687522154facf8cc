//! [`ControlLease`]: who acts for the fleet. Several `flotilla-control`
//! instances may run; the one holding `lease` in the control bucket
//! ([`crate::keys::control_bucket`]) renders, signs and writes, the others
//! follow (docs/adr/0022-one-acting-control-plane.md). Anyone can read it:
//! `flotilla get control`, or `nats kv get fleet-control lease`.

use serde::{Deserialize, Serialize};

use crate::ApiVersion;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlLease {
    pub api_version: ApiVersion,
    /// This process's id, fresh at every start.
    pub instance: String,
    pub host: String,
    pub pid: u32,
    /// `flotilla-control`'s version.
    pub version: String,
    /// When this instance took the lease (RFC 3339, its own clock).
    pub since: String,
    /// The lease time: the value expires this long after its last renewal
    /// (server time), and a follower may then take over.
    pub ttl_ms: u64,
    /// The public keys this instance signs manifests with. An instance with
    /// other keys does not campaign while this one leads: agents trusting
    /// only these would reject its manifests.
    #[serde(default)]
    pub signing_keys: Vec<String>,
}
