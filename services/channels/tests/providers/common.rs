//! Deliveries and client options shared by the provider tests.

use herald_channels::{Delivery, HttpOptions, SendError, Target};
use herald_protocol::{Channel, Priority, UserId};
use std::future::Future;
use std::time::Duration;

/// A delivery with a UUID id, title and body.
pub fn delivery(channel: Channel, target: Target) -> Delivery {
    Delivery {
        id: uuid::Uuid::now_v7().to_string(),
        seq: 7,
        user_id: UserId::new("user-1").expect("valid user id"),
        channel,
        priority: Priority::Normal,
        category: Some("like".into()),
        title: Some("New like".into()),
        body: Some("Ada liked your photo".into()),
        data: serde_json::Map::new(),
        collapse_key: None,
        expires_at: None,
        target,
        unsubscribe_url: None,
        html: None,
    }
}

/// Client options trusting `ca_pem`, with a short timeout so hangs are quick to detect.
pub fn http(ca_pem: Option<&str>) -> HttpOptions {
    HttpOptions {
        timeout: Duration::from_millis(2500),
        extra_root_pem: ca_pem.map(|p| p.as_bytes().to_vec()),
    }
}

/// Short names for asserting classes.
pub fn class(result: &Result<herald_channels::Sent, SendError>) -> &'static str {
    match result {
        Ok(_) => "sent",
        Err(SendError::Throttled { .. }) => "throttled",
        Err(SendError::Transient { .. }) => "transient",
        Err(SendError::Permanent { .. }) => "permanent",
        Err(SendError::InvalidTarget { .. }) => "invalid-target",
    }
}

/// Polls `attempt` until it returns `Some`, at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, mut attempt: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = attempt().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
