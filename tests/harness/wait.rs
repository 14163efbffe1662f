//! Bounded waiting. Every wait has a deadline and says what it was waiting for.

use anyhow::{Context as _, anyhow};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// Interval between two attempts of [`eventually`].
const POLL: Duration = Duration::from_millis(50);

/// Runs `check` until it returns `Ok`, at most for `timeout`.
///
/// # Errors
/// The last error of `check`, with `what` and the timeout, when it never held.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        let attempt = match tokio::time::timeout_at(deadline, check()).await {
            Ok(attempt) => attempt,
            Err(_) => Err(match last_error.take() {
                Some(previous) => {
                    anyhow!("the last attempt was still running; the one before: {previous:#}")
                }
                None => anyhow!("the first attempt was still running"),
            }),
        };
        match attempt {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{what}: did not hold within {timeout:?}")));
            }
            Err(e) => {
                last_error = Some(e);
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

/// Awaits `fut`, failing with `what` when it takes longer than `timeout`.
///
/// # Errors
/// A timeout naming `what`.
pub async fn within<T>(
    timeout: Duration,
    what: &str,
    fut: impl Future<Output = T>,
) -> anyhow::Result<T> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("timed out"))
        .with_context(|| format!("{what}: nothing within {timeout:?}"))
}
