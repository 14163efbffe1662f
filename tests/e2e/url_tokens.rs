//! A user token in a URL (`?access_token=`) ends up in logs and browser history: Herald
//! takes one only where SPEC §2 allows it — the WebSocket and SSE requests, which
//! browsers cannot give headers — and its request logs never show one.

use anyhow::{Context as _, ensure};
use herald_tests::{Herald, Nats, SseClient, WsClient};
use reqwest::{Method, StatusCode};
use std::io::Write;
use std::sync::{Arc, Mutex};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_tokens_in_urls_are_taken_on_websocket_and_sse_only() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let token = herald.token("ola");
    herald.send("ola", "one").await?;

    let mut ws = WsClient::connect(
        &herald.ws_url(&format!("/v1/ws?access_token={token}")),
        None,
    )
    .await?;
    ensure!(ws.hello().await?["user_id"] == "ola");
    let mut sse = SseClient::open(
        herald
            .http()
            .get(format!("{}/v1/sse?access_token={token}", herald.base_url())),
    )
    .await?;
    let hello = sse.next_event().await?;
    ensure!(hello.event == "hello", "{hello:?}");

    for path in [
        "/v1/me/unread",
        "/v1/me/notifications",
        "/v1/me/preferences",
    ] {
        let refused = herald
            .request(Method::GET, &format!("{path}?access_token={token}"))
            .send()
            .await?;
        ensure!(
            refused.status() == StatusCode::UNAUTHORIZED,
            "{path}: {}",
            refused.status()
        );
        let body: serde_json::Value = refused.json().await?;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        ensure!(message.contains("Authorization"), "{path}: {body}");
        let by_header = herald
            .request(Method::GET, path)
            .bearer_auth(&token)
            .send()
            .await?;
        ensure!(by_header.status() == StatusCode::OK, "{path} by header");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_page_s_notify_takes_the_token_in_the_header_only() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).dev_mode().start().await?;
    let token = herald.token("pia");
    let body = serde_json::json!({"title": "hi"});
    let refused = herald
        .request(Method::POST, &format!("/dev/notify?access_token={token}"))
        .json(&body)
        .send()
        .await?;
    ensure!(
        refused.status() == StatusCode::UNAUTHORIZED,
        "/dev/notify with a URL token: {}",
        refused.status()
    );
    let accepted = herald
        .request(Method::POST, "/dev/notify")
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await?;
    ensure!(
        accepted.status() == StatusCode::ACCEPTED,
        "/dev/notify by header: {}",
        accepted.status()
    );
    Ok(())
}

/// Log lines written by the subscriber of this test's thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> anyhow::Result<String> {
        let bytes = self
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

// One thread: the mesh's tasks all run where this test's subscriber is the default, and
// no other test's lines mix in.
#[tokio::test(flavor = "current_thread")]
async fn request_logs_never_show_an_access_token() -> anyhow::Result<()> {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "tower_http=debug,herald::mesh=debug",
        ))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let token = herald.token("pia");
    let mut ws = WsClient::connect(
        &herald.ws_url(&format!("/v1/ws?after=0&access_token={token}")),
        None,
    )
    .await?;
    ensure!(ws.hello().await?["user_id"] == "pia");
    // A token where it is not taken is not logged either.
    herald
        .request(Method::GET, &format!("/v1/me/unread?access_token={token}"))
        .send()
        .await?;

    let logs = captured.text()?;
    let request_line = logs
        .lines()
        .find(|l| l.contains("/v1/ws"))
        .with_context(|| format!("no request log line for /v1/ws in:\n{logs}"))?;
    ensure!(
        request_line.contains("after=0") && request_line.contains("access_token=REDACTED"),
        "{request_line}"
    );
    ensure!(!logs.contains(&token), "a token in the logs:\n{logs}");
    Ok(())
}
