//! Where user tokens come from: one fixed token, or a provider asked again whenever the
//! server may have refused the current one (expired, rotated).

use crate::error::ClientError;
use futures::future::BoxFuture;
use std::sync::{Arc, Mutex};

/// Makes a fresh user token.
pub type TokenProvider =
    Arc<dyn Fn() -> BoxFuture<'static, Result<String, ClientError>> + Send + Sync>;

/// A token source.
#[derive(Clone)]
pub enum Token {
    /// This token, always.
    Static(String),
    /// Asked for the first token and after every refusal.
    Provider(TokenProvider),
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Token::Static(_) => f.write_str("Token::Static(..)"),
            Token::Provider(_) => f.write_str("Token::Provider(..)"),
        }
    }
}

/// The current token, refreshed on demand.
#[derive(Debug)]
pub(crate) struct Tokens {
    source: Token,
    current: Mutex<Option<String>>,
}

impl Tokens {
    pub(crate) fn new(source: Token) -> Self {
        let current = match &source {
            Token::Static(t) => Some(t.clone()),
            Token::Provider(_) => None,
        };
        Self {
            source,
            current: Mutex::new(current),
        }
    }

    /// Whether a refused token can be replaced.
    pub(crate) fn can_refresh(&self) -> bool {
        matches!(self.source, Token::Provider(_))
    }

    /// The token to use; a new one from the provider when `refresh` or none yet.
    pub(crate) async fn get(&self, refresh: bool) -> Result<String, ClientError> {
        let cached = self.current.lock().map(|c| c.clone()).unwrap_or_default();
        match (&self.source, cached) {
            (Token::Static(t), _) => Ok(t.clone()),
            (Token::Provider(_), Some(t)) if !refresh => Ok(t),
            (Token::Provider(make), _) => {
                let fresh = make().await?;
                if let Ok(mut current) = self.current.lock() {
                    *current = Some(fresh.clone());
                }
                Ok(fresh)
            }
        }
    }
}
