//! The shutdown signal every daemon waits on.

use std::future::Future;

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed when
/// this is called (not when the future is first polled), so a signal that
/// arrives during start-up is not lost.
///
/// # Errors
/// The signal handlers cannot be installed.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
