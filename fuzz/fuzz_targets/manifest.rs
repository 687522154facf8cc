//! What an agent does with the bytes of `desired-state.<id>` before it
//! trusts them: signature verification over the received value, then
//! decoding and validation. None of it may panic, and a manifest that
//! decodes must survive a round trip unchanged (what is signed is what runs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use manifest_types::AgentManifest;
use manifest_types::signing::{Trust, verify};

/// A fixed public key (nothing verifies against it; the code paths do run).
const KEY: &str = "OCSWFORHACS6JMBNMIJYAUGTHDJC5QS6SKF335FLLZMPQRHAKCH3XOXB";

fuzz_target!(|data: &[u8]| {
    let _ = verify(data, &[KEY.to_owned()]);
    let dev = Trust {
        keys: vec![],
        allow_unsigned: true,
    };
    let _ = dev.admit(data);
    if let Ok(m) = AgentManifest::from_json(data) {
        let again = AgentManifest::from_json(&m.to_json()).expect("a decoded manifest re-decodes");
        assert_eq!(again, m, "round trip");
        let _ = m.signing_input();
        for r in &m.resources {
            let _ = r.spec_hash();
        }
    }
});
