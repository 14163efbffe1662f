//! HTTP plumbing every provider shares: one pooled client per provider (connections are
//! reused across sends), and the parts of answer classification that do not depend on the
//! provider — transport failures, `Retry-After`, shortening answers for error details.
//!
//! An answer's body is only ever read through [`body_prefix`], at most [`MAX_BODY`]
//! bytes: a webhook URL is a tenant's, and a receiver streaming an endless error body
//! must cost the worker 64 KiB, not its memory.

pub mod spread;

use crate::SendError;
use std::time::{Duration, SystemTime};

/// How a provider's HTTP client is built.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Whole-request timeout (connect + send + answer). A timeout is a transient failure.
    pub timeout: Duration,
    /// Extra PEM root certificates to trust besides the public web PKI (a test CA, or a
    /// corporate proxy in front of the provider).
    pub extra_root_pem: Option<Vec<u8>>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            extra_root_pem: None,
        }
    }
}

/// A provider could not be set up from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A configured value is unusable (a key that does not parse, a malformed URL, ...).
    #[error("{what}: {reason}")]
    Invalid {
        /// Which setting.
        what: &'static str,
        /// Why it is unusable.
        reason: String,
    },
    /// The HTTP client could not be built (e.g. the extra root certificate is not PEM).
    #[error("http client")]
    Client(#[source] reqwest::Error),
}

/// Builds a pooled client. `http2_only` forces HTTP/2 (ALPN `h2` over TLS, prior knowledge
/// over cleartext), as APNs requires.
pub(crate) fn client(
    options: &HttpOptions,
    http2_only: bool,
) -> Result<reqwest::Client, SetupError> {
    let mut builder = reqwest::Client::builder()
        .timeout(options.timeout)
        .connect_timeout(options.timeout.min(Duration::from_secs(5)))
        .pool_idle_timeout(Duration::from_secs(300))
        // Provider answers are classified by status; a redirect is an answer, not a hop.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")));
    if http2_only {
        builder = builder
            .http2_prior_knowledge()
            .http2_keep_alive_interval(Duration::from_secs(60))
            .http2_keep_alive_while_idle(true);
    }
    if let Some(pem) = &options.extra_root_pem {
        for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(SetupError::Client)? {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(SetupError::Client)
}

/// Checks a base URL and strips its trailing slash.
pub(crate) fn base_url(what: &'static str, url: &str) -> Result<String, SetupError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| SetupError::Invalid {
        what,
        reason: format!("{url:?} is not a URL: {e}"),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(SetupError::Invalid {
            what,
            reason: format!("{url:?} must be an http:// or https:// URL"),
        });
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// A request that got no answer: refused, reset, timed out. Always worth a retry.
pub(crate) fn transport(provider: &str, error: &reqwest::Error) -> SendError {
    // Never echo the URL: webhook URLs may carry secrets in their query.
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else if error.is_body() || error.is_decode() {
        "failed reading the answer"
    } else {
        "request failed"
    };
    let mut detail = format!("{provider}: {what}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    SendError::transient(shorten(&detail))
}

/// The `Retry-After` header: delta-seconds or an HTTP date.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The most of an answer's body that is ever read. Every provider's real answer (a JSON
/// id or error) is far smaller; what lies beyond is never needed, since details keep
/// 300 characters.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// At most [`MAX_BODY`] bytes of an answer's body; the rest is never read. Reading stops
/// there and the response is dropped, which closes its connection (HTTP/1) or resets its
/// stream (HTTP/2) instead of draining it. A success answer longer than this is cut, and
/// so reads as unreadable — no provider sends one.
///
/// # Errors
/// The transport error when the body fails before its end or the limit: reset, or the
/// client's whole-request timeout.
pub(crate) async fn body_prefix(
    mut response: reqwest::Response,
) -> Result<Vec<u8>, reqwest::Error> {
    let expected = response
        .content_length()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0);
    let mut body = Vec::with_capacity(expected.min(MAX_BODY));
    while body.len() < MAX_BODY {
        let Some(chunk) = response.chunk().await? else {
            break;
        };
        let room = MAX_BODY - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    Ok(body)
}

/// At most 300 characters of a provider's answer, for error details and logs.
pub(crate) fn shorten(text: &str) -> String {
    const MAX: usize = 300;
    let text = text.trim();
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// An answer body as text for details (lossy: providers may send garbage). Only the
/// first 4 KiB are decoded: enough for the 300 characters kept.
pub(crate) fn body_text(body: &[u8]) -> String {
    shorten(&String::from_utf8_lossy(&body[..body.len().min(4096)]))
}

/// A 2xx whose body we cannot read. The provider probably accepted the message, so a retry
/// could send it twice; it is not retried but dead-lettered, where an operator sees it.
pub(crate) fn unreadable_success(provider: &str, status: u16, body: &[u8]) -> SendError {
    SendError::Permanent {
        detail: format!(
            "{provider}: answered {status} with an unreadable body (not retried, it may have been accepted): {}",
            body_text(body)
        ),
    }
}

/// The classes every REST provider shares for statuses it has no specific reason for.
pub(crate) fn by_status(
    provider: &str,
    status: u16,
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
) -> SendError {
    class_for(
        status,
        headers,
        format!("{provider}: {status}: {}", body_text(body)),
    )
}

/// The class of a status with no more specific reason: 429 throttled, 408/5xx transient
/// (with the answer's `Retry-After`, which a 503 may carry),
/// 401/403 refused credentials, anything else permanent.
pub(crate) fn class_for(
    status: u16,
    headers: &reqwest::header::HeaderMap,
    detail: String,
) -> SendError {
    match status {
        429 => SendError::Throttled {
            retry_after: retry_after(headers),
            detail,
        },
        408 | 500..=599 => SendError::Transient {
            detail,
            retry_after: retry_after(headers),
        },
        401 | 403 => credentials_refused(detail),
        _ => SendError::Permanent { detail },
    }
}

/// The provider refused *our* credentials (a rotated auth token, a revoked key, a clock
/// too far off for a signed token). Every message through it fails the same way until
/// an operator fixes it, so this is the provider's failure, not the message's: it
/// counts against the provider's circuit (which opens, and the channel's next provider
/// takes over) and the job is retried, instead of every job being dead-lettered on its
/// first attempt.
pub(crate) fn credentials_refused(detail: String) -> SendError {
    SendError::transient(format!(
        "{detail} (credentials refused: check the provider's configuration)"
    ))
}

/// The provider refuses *our* setup rather than this message: a sender number that is not
/// the account's, an account not enabled for the API, an endpoint that does not exist.
/// Classed like [`credentials_refused`], for the same reason: every message through the
/// provider fails alike until an operator fixes `setting`, so it counts against the
/// provider's circuit (which opens, and the channel's next provider takes over) and the job
/// is retried — never dead-lettered as if the message were bad.
pub(crate) fn configuration_refused(detail: String, setting: &str) -> SendError {
    SendError::transient(format!(
        "{detail} (the provider refuses our configuration: check {setting})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(120);
        let date = httpdate::fmt_http_date(later);
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&date).expect("header"));
        let got = retry_after(&headers).expect("a date parses");
        assert!(
            got > Duration::from_secs(100) && got <= Duration::from_secs(120),
            "{got:?}"
        );
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn shorten_cuts_on_a_char_boundary() {
        let long = "é".repeat(400);
        let short = shorten(&long);
        assert_eq!(short.chars().count(), 301);
        assert_eq!(shorten(" ok "), "ok");
    }
}
