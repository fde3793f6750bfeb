//! Shutdown plumbing shared by every long-running task: a `watch<bool>`
//! that flips to true once, and the OS signals that flip it.

use tokio::sync::watch;

/// Completes when `rx` turns true (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it right here.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// Completes on SIGINT or SIGTERM.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
