//! One shutdown path: SIGINT or SIGTERM cancels a token every service watches.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGINT/SIGTERM. A second signal exits at once.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down (signal again to force)");
        cancel.cancel();
        wait_for_signal().await;
        tracing::warn!("forced exit");
        // No destructor runs on exit: a child nats-server (its own process group, so the
        // terminal's Ctrl-C never reached it) would outlive us and keep its store locked.
        herald_natsd::kill_all();
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
