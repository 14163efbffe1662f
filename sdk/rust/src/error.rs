//! What can go wrong when talking to Herald, as one error type.

/// A failed SDK call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL cannot be used.
    #[error("invalid Herald URL {url:?}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The HTTP request did not complete.
    #[error("HTTP request to Herald failed")]
    Http(#[from] reqwest::Error),
    /// Herald answered with an error status.
    #[error("Herald answered {status}: {body}")]
    Status {
        /// The HTTP status.
        status: reqwest::StatusCode,
        /// The (JSON error) body.
        body: String,
    },
    /// The token provider failed.
    #[error("getting a user token failed: {0}")]
    Token(String),
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
}
