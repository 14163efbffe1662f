//! Reading nats-server's HTTP monitoring endpoints (`/varz`, `/jsz`, `/routez`, `/healthz`).
//!
//! A dozen lines of HTTP/1.0 over a loopback socket: the endpoints are local, plain-text
//! and small, which does not justify an HTTP client dependency.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::NatsdError;

/// Upper bound for one request; the endpoints answer in milliseconds.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Monitoring answers are small; anything bigger is not what we asked for.
const MAX_RESPONSE: u64 = 4 * 1024 * 1024;

/// `GET http://127.0.0.1:{port}{path}` and parse the body as JSON, whatever the status
/// (`/healthz` answers 503 with a JSON body when unhealthy). Returns the status and body.
pub(crate) async fn get_json(
    port: u16,
    path: &str,
) -> Result<(u16, serde_json::Value), NatsdError> {
    let url = format!("http://127.0.0.1:{port}{path}");
    let fail = |reason: String| NatsdError::Monitor {
        url: url.clone(),
        reason,
    };
    let raw = tokio::time::timeout(REQUEST_TIMEOUT, fetch(port, path))
        .await
        .map_err(|_| fail(format!("no answer within {REQUEST_TIMEOUT:?}")))?
        .map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail("malformed HTTP response".to_owned()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| fail("malformed HTTP status line".to_owned()))?;
    let json = serde_json::from_str(body)
        .map_err(|e| fail(format!("status {status}, body is not JSON: {e}")))?;
    Ok((status, json))
}

async fn fetch(port: u16, path: &str) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.take(MAX_RESPONSE).read_to_end(&mut raw).await?;
    Ok(raw)
}
