//! A small WebSocket client for Herald's `/v1/ws`: JSON frames in, bounded reads.

use anyhow::{Context as _, anyhow, bail};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Bound on waiting for one frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected WebSocket.
#[derive(Debug)]
pub struct WsClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    /// Connects to `url`, with `Authorization: Bearer <token>` when given.
    ///
    /// # Errors
    /// When the upgrade fails (see [`WsClient::upgrade_status`] for the HTTP status).
    pub async fn connect(url: &str, bearer: Option<&str>) -> anyhow::Result<WsClient> {
        let mut request = url.into_client_request().context("websocket url")?;
        if let Some(token) = bearer {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))?;
            request.headers_mut().insert(header::AUTHORIZATION, value);
        }
        let connect = tokio_tungstenite::connect_async(request);
        let (socket, _) = crate::within(FRAME_TIMEOUT, "websocket upgrade", connect)
            .await?
            .with_context(|| format!("websocket upgrade of {url}"))?;
        Ok(WsClient { socket })
    }

    /// The HTTP status a refused upgrade was answered with (e.g. 401), or `None` when the
    /// upgrade succeeded.
    ///
    /// # Errors
    /// When the connection failed for another reason.
    pub async fn upgrade_status(
        url: &str,
        bearer: Option<&str>,
    ) -> anyhow::Result<Option<StatusCode>> {
        match Self::connect(url, bearer).await {
            Ok(_) => Ok(None),
            Err(e) => match e.downcast_ref::<tungstenite::Error>() {
                Some(tungstenite::Error::Http(response)) => Ok(Some(response.status())),
                _ => Err(e),
            },
        }
    }

    /// The next JSON text frame, skipping pings and pongs.
    ///
    /// # Errors
    /// On timeout, a close, a non-text frame or text that is not JSON.
    pub async fn next_frame(&mut self) -> anyhow::Result<Value> {
        loop {
            let msg = crate::within(FRAME_TIMEOUT, "next websocket frame", self.socket.next())
                .await?
                .ok_or_else(|| anyhow!("websocket ended"))?
                .context("websocket read")?;
            match msg {
                Message::Text(text) => {
                    return serde_json::from_str(text.as_str())
                        .with_context(|| format!("frame is not JSON: {text}"));
                }
                Message::Ping(_) | Message::Pong(_) => {}
                Message::Close(frame) => bail!("websocket closed by the server: {frame:?}"),
                other => bail!("unexpected websocket message: {other:?}"),
            }
        }
    }

    /// The `hello` frame, which must come first.
    ///
    /// # Errors
    /// When the next frame is not a hello.
    pub async fn hello(&mut self) -> anyhow::Result<Value> {
        let frame = self.next_frame().await?;
        anyhow::ensure!(
            frame["type"] == "hello",
            "first frame is not hello: {frame}"
        );
        Ok(frame)
    }

    /// The next notifications: a `notification` frame, or the items of a `batch` frame.
    /// `read` frames (read-position announcements) in between are passed over.
    ///
    /// # Errors
    /// When the next frame is anything else.
    pub async fn next_notifications(&mut self) -> anyhow::Result<Vec<Value>> {
        loop {
            let frame = self.next_frame().await?;
            match frame["type"].as_str() {
                Some("notification") => return Ok(vec![frame]),
                Some("batch") => return Ok(frame["items"].as_array().cloned().unwrap_or_default()),
                Some("read") => continue,
                _ => bail!("expected a notification or batch frame, got {frame}"),
            }
        }
    }

    /// Reads notifications until `count` have arrived.
    ///
    /// # Errors
    /// As [`WsClient::next_notifications`].
    pub async fn take(&mut self, count: usize) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            out.extend(self.next_notifications().await?);
        }
        Ok(out)
    }

    /// Sends a message.
    ///
    /// # Errors
    /// When the socket is closed.
    pub async fn send(&mut self, msg: Message) -> anyhow::Result<()> {
        self.socket.send(msg).await.context("websocket send")
    }

    /// Sends a ping and reads until its pong: every frame sent before has then been read
    /// and handled by the server (it handles a connection's frames in order). Frames that
    /// arrive meanwhile are returned.
    ///
    /// # Errors
    /// On timeout or a close.
    pub async fn round_trip(&mut self) -> anyhow::Result<Vec<Value>> {
        let token = uuid::Uuid::new_v4().to_string();
        self.send(Message::Ping(token.clone().into_bytes().into()))
            .await?;
        let mut frames = Vec::new();
        loop {
            let msg = crate::within(FRAME_TIMEOUT, "pong", self.socket.next())
                .await?
                .ok_or_else(|| anyhow!("websocket ended"))?
                .context("websocket read")?;
            match msg {
                Message::Pong(payload) if payload.as_ref() == token.as_bytes() => {
                    return Ok(frames);
                }
                Message::Text(text) => frames.push(serde_json::from_str(text.as_str())?),
                Message::Close(frame) => bail!("websocket closed by the server: {frame:?}"),
                _ => {}
            }
        }
    }

    /// Reads until the server closes the connection and returns the close code.
    ///
    /// # Errors
    /// When no close frame arrives within the frame timeout or the stream ends without one.
    pub async fn closed_with(&mut self) -> anyhow::Result<u16> {
        loop {
            let msg = crate::within(FRAME_TIMEOUT, "websocket close frame", self.socket.next())
                .await?
                .ok_or_else(|| anyhow!("websocket ended without a close frame"))?
                .context("websocket read while waiting for close")?;
            if let Message::Close(frame) = msg {
                let frame = frame.ok_or_else(|| anyhow!("close frame without a code"))?;
                return Ok(u16::from(frame.code));
            }
        }
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}
