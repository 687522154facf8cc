//! The fleet bucket, as defined once in [`flotilla_nats::bucket`] (the CLI
//! creates it from there too, without linking the control plane).

pub use flotilla_nats::bucket::*;
