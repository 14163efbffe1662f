//! One error type for every HTTP handler. Client errors are answered plainly and logged
//! at debug; internal detail is logged and never sent.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_protocol::{ErrorBody, FieldError};

/// An HTTP error with its JSON body.
#[derive(Debug)]
pub struct AppError {
    status: StatusCode,
    body: ErrorBody,
    retry_after: Option<u64>,
}

impl AppError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody::new(code, message),
            retry_after: None,
        }
    }

    /// 400 naming a field.
    pub fn field(e: FieldError) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            body: e.into(),
            retry_after: None,
        }
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is over the {limit}-byte limit"),
        )
    }

    /// 503: NATS is unreachable. Logged here, once, with the cause.
    pub fn unavailable(cause: &dyn std::error::Error) -> Self {
        tracing::warn!(error = %error_chain(cause), "answering 503");
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: ErrorBody::new(
                "unavailable",
                "the message store did not confirm the request; retry it (for a notify, with the same Idempotency-Key so a retry can never deliver twice)",
            ),
            retry_after: Some(1),
        }
    }

    /// 500: a bug or a crashed task. Logged with the cause; clients see no detail.
    pub fn internal(cause: &dyn std::error::Error) -> Self {
        tracing::error!(error = %error_chain(cause), "answering 500");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred; it has been logged",
        )
    }

    /// Adds a `Retry-After` of `secs` seconds.
    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// The `Retry-After` seconds, if any.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
    }

    /// The JSON body.
    pub fn into_body(self) -> ErrorBody {
        self.body
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

/// `a: b: c` from an error and its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Gives every error answer the contract's JSON body (`{"error":{"code","message"}}`).
/// Herald's handlers answer with [`AppError`] already; this catches what answers before
/// or around them — axum's own rejections (a path segment that is not UTF-8, a query
/// that does not parse, a WebSocket request without its upgrade headers), an unknown
/// route, a wrong method — which are plain text or empty. Their status and headers
/// (`Allow`, `Retry-After`) are kept; the text becomes the message.
pub async fn json_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    // Rejection texts are a line or two; a body over 4 KiB is not buffered, and the
    // status's reason phrase stands in for it.
    let text = axum::body::to_bytes(body, 4_096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        t => t.to_owned(),
    };
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let mut answer = (status, Json(ErrorBody::new(code, message))).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().append(name, value.clone());
        }
    }
    answer
}

impl From<crate::accept::AcceptError> for AppError {
    /// 400 naming the field, 413 for a notification too large to store, 503 otherwise.
    fn from(e: crate::accept::AcceptError) -> Self {
        use crate::accept::AcceptError;
        use herald_store::InboxError;
        match e {
            AcceptError::Invalid(f) => Self::field(f),
            AcceptError::Store(e @ InboxError::TooLarge(_)) => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                e.to_string(),
            ),
            AcceptError::Store(e) => Self::unavailable(&e),
        }
    }
}
