//! A Server-Sent Events reader over a streaming HTTP response: enough of the
//! `text/event-stream` format for Herald (`id:`, `event:`, `data:`, comments).

use anyhow::{Context as _, anyhow, ensure};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::Value;
use std::time::Duration;

/// Bound on waiting for one event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `id:` field, if any.
    pub id: Option<String>,
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

impl SseEvent {
    /// The data as JSON.
    ///
    /// # Errors
    /// When it is not JSON.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.data)
            .with_context(|| format!("event data is not JSON: {}", self.data))
    }
}

/// An open event stream.
#[derive(Debug)]
pub struct SseClient {
    response: Response,
    /// Bytes received but not yet split into lines (a chunk may end mid-line, even
    /// mid-character).
    pending: Vec<u8>,
}

impl SseClient {
    /// Sends `request` and checks it is answered with a 200 event stream.
    ///
    /// # Errors
    /// When it is not.
    pub async fn open(request: RequestBuilder) -> anyhow::Result<SseClient> {
        let response = crate::within(EVENT_TIMEOUT, "SSE response", request.send())
            .await?
            .context("SSE request")?;
        let status = response.status();
        if status != StatusCode::OK {
            let body = response.text().await.unwrap_or_default();
            return Err(anyhow!("SSE answered {status}: {body}"));
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        ensure!(
            content_type.starts_with("text/event-stream"),
            "SSE content type is {content_type:?}"
        );
        Ok(SseClient {
            response,
            pending: Vec::new(),
        })
    }

    /// The next event (comments and keep-alives skipped).
    ///
    /// # Errors
    /// On timeout or when the stream ends.
    pub async fn next_event(&mut self) -> anyhow::Result<SseEvent> {
        let (mut id, mut event, mut data): (Option<String>, Option<String>, Vec<String>) =
            (None, None, Vec::new());
        loop {
            let Some(line) = self.next_line().await? else {
                continue;
            };
            if line.is_empty() {
                if data.is_empty() && event.is_none() && id.is_none() {
                    continue;
                }
                return Ok(SseEvent {
                    id,
                    event: event.unwrap_or_else(|| "message".into()),
                    data: data.join("\n"),
                });
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line.as_str(), ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_string();
            match field {
                "id" => id = Some(value),
                "event" => event = Some(value),
                "data" => data.push(value),
                _ => {}
            }
        }
    }

    /// The next `notification` event's JSON, skipping other events (`hello`).
    ///
    /// # Errors
    /// As [`SseClient::next_event`], or when its `id` is not its `seq`.
    pub async fn next_notification(&mut self) -> anyhow::Result<Value> {
        loop {
            let event = self.next_event().await?;
            if event.event != "notification" {
                continue;
            }
            let n = event.json()?;
            ensure!(
                event.id.as_deref().and_then(|id| id.parse::<u64>().ok()) == n["seq"].as_u64(),
                "SSE id {:?} is not the seq of {n}",
                event.id
            );
            return Ok(n);
        }
    }

    /// Reads notifications until `count` have arrived.
    ///
    /// # Errors
    /// As [`SseClient::next_notification`].
    pub async fn take(&mut self, count: usize) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            out.push(self.next_notification().await?);
        }
        Ok(out)
    }

    /// The next comment line (`: ...`, keep-alives included), skipping everything else.
    ///
    /// # Errors
    /// On timeout or when the stream ends.
    pub async fn next_comment(&mut self) -> anyhow::Result<String> {
        loop {
            if let Some(line) = self.next_line().await?
                && let Some(comment) = line.strip_prefix(':')
            {
                return Ok(comment.trim().to_string());
            }
        }
    }

    /// One line without its terminator, or `None` when more bytes were needed and read.
    async fn next_line(&mut self) -> anyhow::Result<Option<String>> {
        if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.pending.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some(
                String::from_utf8(line).context("SSE line is not UTF-8")?,
            ));
        }
        let chunk = crate::within(EVENT_TIMEOUT, "next SSE bytes", self.response.chunk())
            .await?
            .context("SSE read")?
            .ok_or_else(|| anyhow!("SSE stream ended"))?;
        self.pending.extend_from_slice(&chunk);
        Ok(None)
    }
}
