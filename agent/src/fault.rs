//! Fault injection for the crash tests (feature `fault-injection`, never in
//! a release build): `FLOTILLA_FAULT_EXIT_AT=<step>` makes the agent exit
//! with code 86 right after that step of an apply, as a SIGKILL or a power
//! cut there would (no destructors run, nothing else is written). The steps:
//! `file-recorded` (the ledger has the intent, the file is not written),
//! `file-written`, `unit-files-written`, `unit-reloaded`,
//! `container-created`, `container-started`, `old-container-removed`.

/// Exits here when the fault asks for `step`.
#[cfg(feature = "fault-injection")]
pub fn exit_at(step: &str) {
    if std::env::var("FLOTILLA_FAULT_EXIT_AT").is_ok_and(|s| s == step) {
        tracing::error!(step, "fault injection: exiting");
        std::process::exit(86);
    }
}

/// Without the feature: nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn exit_at(_step: &str) {}
