//! Where user-token keys come from when an identity provider publishes them as a JWKS
//! document (SPEC §2): a file or an `http(s)` URL, read when Herald starts and again
//! every `refresh`, so a key rotation at the provider needs no restart. A failed refresh
//! keeps the keys already loaded and says so in the log and in
//! `herald_jwks_refreshes_total{result="failed"}`.

use herald_auth::{Jwks, JwksHandle};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Longest a JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest JWKS document read (providers publish a few keys: a few KiB).
const MAX_DOCUMENT: usize = 1024 * 1024;

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
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let response = http
        .get(url)
        .timeout(FETCH_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("fetching {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("fetching {url}: HTTP {}", response.status()));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("fetching {url}: {e}"))?;
    Ok(body.to_vec())
}

/// Reads the document again every `settings.refresh` until `stop`, replacing the keys
/// of `handle` with each good copy.
pub async fn refresh(
    settings: JwksSettings,
    handle: JwksHandle,
    http: reqwest::Client,
    stop: CancellationToken,
) {
    let every = settings.refresh.max(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match settings.load(&http).await {
            Ok(keys) => {
                tracing::debug!(source = %settings.source, keys = keys.len(), "JWKS refreshed");
                handle.replace(keys);
                metrics::counter!("herald_jwks_refreshes_total", "result" => "ok").increment(1);
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refresh failed; keeping the keys loaded before");
                metrics::counter!("herald_jwks_refreshes_total", "result" => "failed").increment(1);
            }
        }
    }
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
