//! # flotilla-control — the control plane
//!
//! (Tour written with the rest of the crate.)

pub mod bucket;
