//! Where user-token keys come from when an identity provider publishes them as a JWKS
//! document (SPEC §2): a file or an `http(s)` URL, read when Herald starts and again
//! every `refresh`, so a key rotation at the provider needs no restart. A failed refresh
//! keeps the keys already loaded and says so in the log and in
//! `herald_jwks_refreshes_total{result="failed"}`.
//!
//! A token naming a key the document lacks has it read again at once (at most every
//! [`REFETCH_MIN_INTERVAL`]), so tokens signed with a key the provider just rotated in
//! verify without waiting for the next periodic read. A URL that does not answer when
//! Herald starts is read again with back-off until it does; user tokens are refused
//! meanwhile, everything else works.

use herald_auth::jwks::FetchTicket;
use herald_auth::{Jwks, JwksHandle};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Longest a JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest JWKS document read (providers publish a few keys: a few KiB).
const MAX_DOCUMENT: usize = 1024 * 1024;

/// Least time between two reads asked for by tokens naming an unknown key.
pub const REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// Longest pause between reads while the document could never be read.
const UNLOADED_RETRY_MAX: Duration = Duration::from_secs(30);

/// Where the document is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A file.
    File(PathBuf),
    /// An `http` or `https` URL.
    Url(String),
}

impl JwksSource {
    /// `https://…` and `http://…` are URLs; anything else is a file path.
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if value.is_empty() {
            return Err("jwt_jwks is empty: give a file path or an https:// URL".into());
        }
        if value.starts_with("https://") || value.starts_with("http://") {
            reqwest::Url::parse(value).map_err(|e| format!("jwt_jwks {value:?}: {e}"))?;
            Ok(Self::Url(value.to_owned()))
        } else {
            Ok(Self::File(PathBuf::from(value)))
        }
    }
}

impl std::fmt::Display for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Url(url) => f.write_str(url),
        }
    }
}

/// A JWKS document and how often it is read again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksSettings {
    /// Where it is.
    pub source: JwksSource,
    /// How often it is read again.
    pub refresh: Duration,
}

impl JwksSettings {
    /// Reads and parses the document.
    ///
    /// # Errors
    /// What went wrong, naming the source: unreadable, not a JWKS document, no usable key.
    pub async fn load(&self, http: &reqwest::Client) -> Result<Jwks, String> {
        let bytes = match &self.source {
            JwksSource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| format!("reading {}: {e}", path.display()))?,
            JwksSource::Url(url) => fetch(http, url).await?,
        };
        if bytes.len() > MAX_DOCUMENT {
            return Err(format!("{}: larger than {MAX_DOCUMENT} bytes", self.source));
        }
        Jwks::parse(&bytes).map_err(|e| format!("{}: {e}", self.source))
    }

    /// Reads the document when Herald starts. A file that cannot be read is an error; a
    /// URL that cannot is logged, and the keys start empty until [`refresh`] reads it.
    ///
    /// # Errors
    /// As [`JwksSettings::load`], for a file.
    pub async fn load_at_start(&self, http: &reqwest::Client) -> Result<JwksHandle, String> {
        match self.load(http).await {
            Ok(keys) => {
                tracing::info!(source = %self.source, keys = keys.len(), "JWKS loaded");
                Ok(JwksHandle::new(keys))
            }
            Err(e) if matches!(self.source, JwksSource::Url(_)) => {
                tracing::warn!(
                    error = %e,
                    "the JWKS document could not be read; user tokens are refused until it is (retrying)"
                );
                metrics::counter!("herald_jwks_refreshes_total", "result" => "failed").increment(1);
                Ok(JwksHandle::new(Jwks::empty()))
            }
            Err(e) => Err(e),
        }
    }
}

/// The HTTP client JWKS documents are fetched with. Redirects are not followed: the
/// configured URL is the one trusted to name the signing keys, and a redirect could
/// take the fetch to another host (or from `https` to `http`).
///
/// # Errors
/// When the client cannot be built (TLS set-up).
pub fn client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(FETCH_TIMEOUT)
        .build()
        .map_err(|e| format!("JWKS HTTP client: {e}"))
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let mut response = http
        .get(url)
        .timeout(FETCH_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("fetching {url}: {e}"))?;
    if response.status().is_redirection() {
        return Err(format!(
            "fetching {url}: HTTP {} (redirects are not followed: configure the final URL)",
            response.status()
        ));
    }
    if !response.status().is_success() {
        return Err(format!("fetching {url}: HTTP {}", response.status()));
    }
    let too_large = || format!("fetching {url}: larger than {MAX_DOCUMENT} bytes");
    if response
        .content_length()
        .is_some_and(|n| n > MAX_DOCUMENT as u64)
    {
        return Err(too_large());
    }
    // Read with the cap, not whole and then measured: a document without a length (or
    // with a false one) never buffers more than the cap.
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("fetching {url}: {e}"))?
    {
        if body.len() + chunk.len() > MAX_DOCUMENT {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads the document again every `settings.refresh`, and whenever a token names a key
/// it lacks (at most every [`REFETCH_MIN_INTERVAL`]), until `stop`, replacing the keys
/// of `handle` with each good copy. While the document was never read, it is read again
/// sooner, with back-off from 1 s up to 30 s.
pub async fn refresh(
    settings: JwksSettings,
    handle: JwksHandle,
    http: reqwest::Client,
    stop: CancellationToken,
) {
    let every = settings.refresh.max(Duration::from_secs(1));
    handle.serve_refetches(REFETCH_MIN_INTERVAL);
    let mut failures = 0u32;
    loop {
        let pause = if handle.is_empty() {
            Duration::from_secs(1 << failures.min(5))
                .min(UNLOADED_RETRY_MAX)
                .min(every)
        } else {
            every
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
            _ = handle.refetch_requested() => {}
        }
        let ticket = handle.fetching();
        read(&settings, &handle, &http, ticket, &mut failures).await;
    }
}

async fn read(
    settings: &JwksSettings,
    handle: &JwksHandle,
    http: &reqwest::Client,
    ticket: FetchTicket,
    failures: &mut u32,
) {
    match settings.load(http).await {
        Ok(keys) => {
            tracing::debug!(source = %settings.source, keys = keys.len(), "JWKS refreshed");
            if handle.is_empty() {
                tracing::info!(source = %settings.source, keys = keys.len(), "JWKS loaded");
            }
            handle.replace(keys);
            *failures = 0;
            metrics::counter!("herald_jwks_refreshes_total", "result" => "ok").increment(1);
        }
        Err(e) => {
            *failures = failures.saturating_add(1);
            tracing::warn!(error = %e, "JWKS refresh failed; keeping the keys loaded before");
            metrics::counter!("herald_jwks_refreshes_total", "result" => "failed").increment(1);
        }
    }
    handle.fetched(ticket);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths_are_told_apart() {
        assert_eq!(
            JwksSource::parse(" https://id.example.com/.well-known/jwks.json "),
            Ok(JwksSource::Url(
                "https://id.example.com/.well-known/jwks.json".into()
            ))
        );
        assert_eq!(
            JwksSource::parse("/etc/herald/jwks.json"),
            Ok(JwksSource::File("/etc/herald/jwks.json".into()))
        );
        assert!(JwksSource::parse("").is_err());
        assert!(JwksSource::parse("https://").is_err());
    }
}
