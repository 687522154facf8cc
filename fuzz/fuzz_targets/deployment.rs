//! What the control plane does with the bytes of `deployments.<name>`:
//! decoding, validation, and rendering for an agent (templates included).
//! None of it may panic; what renders must be a valid manifest.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use manifest_types::template::Context;
use manifest_types::{AgentId, AgentManifest, Deployment};

fuzz_target!(|data: &[u8]| {
    let Ok(d) = Deployment::from_json(data) else {
        return;
    };
    let agent = AgentId::new("pi-1").expect("a valid id");
    let labels: BTreeMap<String, String> = [("site".to_owned(), "a".to_owned())].into();
    let values: BTreeMap<String, String> = [("x".to_owned(), "${values.x}".to_owned())].into();
    let ctx = Context {
        agent: &agent,
        labels: &labels,
        values: &values,
    };
    let _ = d.render_resources(7);
    if let Ok(resources) = d.render_for(7, &ctx) {
        let mut m = AgentManifest::empty(agent.clone(), 1);
        m.resources = resources;
        m.validate().expect("a rendered manifest is valid");
    }
});
