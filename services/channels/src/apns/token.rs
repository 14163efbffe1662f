//! APNs provider tokens: ES256 JWTs signed with the team's `.p8` key.
//!
//! Apple rejects tokens older than an hour (`ExpiredProviderToken`) and throttles tokens
//! refreshed more often than every 20 minutes (`TooManyProviderTokenUpdates`), so one token
//! is shared by every request and replaced after [`REFRESH_AFTER`], or at once when APNs
//! says it expired.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::http::SetupError;

/// A token is replaced after 50 minutes: inside Apple's hour, outside its 20-minute floor.
pub const REFRESH_AFTER: u64 = 50 * 60;

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

struct Cached {
    jwt: String,
    iat: u64,
}

/// Signs and caches provider tokens.
pub struct ProviderTokens {
    key: EncodingKey,
    key_id: String,
    team_id: String,
    cached: Mutex<Option<Cached>>,
}

impl ProviderTokens {
    /// Reads the `.p8` key (PKCS#8 PEM of a P-256 key).
    ///
    /// # Errors
    /// [`SetupError::Invalid`] when the key does not parse.
    pub fn new(p8_pem: &[u8], key_id: &str, team_id: &str) -> Result<Self, SetupError> {
        let key = EncodingKey::from_ec_pem(p8_pem).map_err(|e| SetupError::Invalid {
            what: "APNs key",
            reason: format!("not a PKCS#8 PEM P-256 (.p8) key: {e}"),
        })?;
        let tokens = Self {
            key,
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            cached: Mutex::new(None),
        };
        // Fail at start, not on the first push, if the key cannot sign.
        tokens.sign(now())?;
        Ok(tokens)
    }

    /// The current token, signing a new one when the cached one is due.
    ///
    /// # Errors
    /// [`SetupError`] if signing fails (it does not once [`Self::new`] succeeded).
    pub fn current(&self) -> Result<String, SetupError> {
        self.current_at(now())
    }

    /// [`Self::current`] at a given Unix time (for tests of the refresh schedule).
    ///
    /// # Errors
    /// As [`Self::current`].
    pub fn current_at(&self, now: u64) -> Result<String, SetupError> {
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(c) = cached.as_ref()
            && now.saturating_sub(c.iat) < REFRESH_AFTER
            && now >= c.iat
        {
            return Ok(c.jwt.clone());
        }
        let jwt = self.sign(now)?;
        *cached = Some(Cached {
            jwt: jwt.clone(),
            iat: now,
        });
        Ok(jwt)
    }

    /// Drops `stale` (APNs said it expired) so the next call signs a fresh one. A token
    /// already replaced by a concurrent request is left alone.
    pub fn discard(&self, stale: &str) {
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if cached.as_ref().is_some_and(|c| c.jwt == stale) {
            *cached = None;
        }
    }

    fn sign(&self, iat: u64) -> Result<String, SetupError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = Claims {
            iss: &self.team_id,
            iat,
        };
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| SetupError::Invalid {
            what: "APNs key",
            reason: format!("cannot sign ES256: {e}"),
        })
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
