//! End-user JWTs: `sub` is the user id. HS256 with a shared secret by default; EdDSA,
//! RS256 or ES256 with a configured public key. `exp` is required and `nbf` honoured;
//! `aud` (a string or an array) and `iss` are required and checked when configured.

use crate::jwks::JwksHandle;
use herald_protocol::{UserId, UserIdError};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Claims Herald reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserClaims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// How tokens are verified (and, with a secret, minted).
#[derive(Clone, Default)]
pub struct JwtConfig {
    /// HS256 shared secret.
    pub hs256_secret: Option<Vec<u8>>,
    /// A PEM public key and its algorithm (RS256, ES256 or EdDSA).
    pub public_key: Option<(Algorithm, Vec<u8>)>,
    /// Public keys by `kid` from a JWKS document; whoever fetches the document again
    /// replaces them through [`UserAuth::jwks`].
    pub jwks: Option<JwksHandle>,
    /// Required audience.
    pub audience: Option<String>,
    /// Required issuer.
    pub issuer: Option<String>,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("public_key", &self.public_key.as_ref().map(|(a, _)| a))
            .field("jwks", &self.jwks)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish()
    }
}

/// Why a token was refused. Messages are safe to show the caller.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// No verification key configured for the token's algorithm.
    #[error("tokens signed with {0:?} are not accepted here")]
    Algorithm(Algorithm),
    /// Expired, malformed, wrongly signed, wrong audience or issuer.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// `sub` is not a valid user id.
    #[error("invalid token subject: {0}")]
    Subject(#[from] UserIdError),
    /// The token names a key the JWKS document does not hold (yet: the provider may
    /// have rotated since it was read; see [`UserAuth::refetch_for`]).
    #[error("invalid token: {0}")]
    UnknownKey(String),
    /// A key in the configuration could not be parsed.
    #[error("unusable key: {0}")]
    Key(String),
}

/// Why `jsonwebtoken` refused a token, in words for whoever sent it (its own messages
/// name its types: "InvalidToken", or serde's "unknown variant `none`, expected one of
/// …" for an `alg` it does not know).
fn why(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidToken => {
            "not a JWT: expected three base64url parts separated by dots".into()
        }
        ErrorKind::InvalidSignature => "the signature does not verify".into(),
        ErrorKind::ExpiredSignature => "expired (exp is past)".into(),
        ErrorKind::ImmatureSignature => "not valid yet (nbf is in the future)".into(),
        ErrorKind::InvalidAudience => "issued for another audience (aud)".into(),
        ErrorKind::InvalidIssuer => "issued by another issuer (iss)".into(),
        ErrorKind::InvalidSubject => "invalid subject (sub)".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the {claim} claim is missing"),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "signed with an algorithm not accepted here".into()
        }
        ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            "malformed: a part is not base64url-encoded UTF-8 JSON".into()
        }
        ErrorKind::Json(_) => "malformed header or claims: not the JSON a JWT carries \
             (alg must be one of HS256, RS256, ES256, EdDSA and the like; `none` is never accepted)"
            .into(),
        _ => e.to_string(),
    }
}

/// Verifies user tokens.
#[derive(Clone)]
pub struct UserAuth {
    hs256: Option<(EncodingKey, DecodingKey)>,
    public: Option<(Algorithm, DecodingKey)>,
    jwks: Option<JwksHandle>,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for UserAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserAuth")
    }
}

/// Tolerated clock skew, seconds.
const LEEWAY: u64 = 30;

/// The longest a session lasts on one token, however far its `exp`.
pub const MAX_SESSION: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// A verified user token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Its user.
    pub user: UserId,
    /// How long from now it stays valid (its `exp`, with the clock leeway verification
    /// allows).
    pub valid_for: std::time::Duration,
}

impl UserAuth {
    /// Builds a verifier from configuration.
    ///
    /// # Errors
    /// [`JwtError::Key`] when a PEM key does not parse or nothing is configured.
    pub fn new(config: &JwtConfig) -> Result<Self, JwtError> {
        let hs256 = config
            .hs256_secret
            .as_ref()
            .map(|s| (EncodingKey::from_secret(s), DecodingKey::from_secret(s)));
        let public = match &config.public_key {
            None => None,
            Some((alg, pem)) => {
                let key = match alg {
                    Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => {
                        DecodingKey::from_rsa_pem(pem)
                    }
                    Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
                    other => {
                        return Err(JwtError::Key(format!(
                            "{other:?} is not a public-key algorithm"
                        )));
                    }
                }
                .map_err(|e| JwtError::Key(e.to_string()))?;
                Some((*alg, key))
            }
        };
        if hs256.is_none() && public.is_none() && config.jwks.is_none() {
            return Err(JwtError::Key(
                "configure a JWT secret, a public key or a JWKS document".into(),
            ));
        }
        Ok(Self {
            hs256,
            public,
            jwks: config.jwks.clone(),
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
        })
    }

    /// Verifies a token and returns its user.
    ///
    /// # Errors
    /// [`JwtError`] for anything but a valid, unexpired token from a configured key.
    pub fn verify(&self, token: &str) -> Result<UserId, JwtError> {
        self.verify_session(token).map(|session| session.user)
    }

    /// Verifies a token and returns its user and how long it stays valid: a WebSocket or
    /// SSE session opened with it ends then, so a session never outlives its token.
    ///
    /// # Errors
    /// As [`UserAuth::verify`].
    pub fn verify_session(&self, token: &str) -> Result<Session, JwtError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| JwtError::Invalid(why(&e)))?;
        match (header.alg, &self.hs256, &self.public, &self.jwks) {
            (Algorithm::HS256, Some((_, key)), _, _) => self.verify_with(token, header.alg, key),
            (alg, _, Some((want, key)), _) if alg == *want => self.verify_with(token, alg, key),
            (alg, _, _, Some(jwks)) if alg != Algorithm::HS256 => jwks
                .with_key(header.kid.as_deref(), alg, |key| {
                    self.verify_with(token, alg, key)
                })
                .unwrap_or_else(|| {
                    Err(match &header.kid {
                        Some(kid) if jwks.lacks(Some(kid)) => {
                            JwtError::UnknownKey(format!("no key {kid:?} in the JWKS document"))
                        }
                        Some(kid) => {
                            JwtError::Invalid(format!("key {kid:?} does not verify {alg:?}"))
                        }
                        None if jwks.is_empty() => {
                            JwtError::UnknownKey("the JWKS document could not be read yet".into())
                        }
                        None => JwtError::Invalid("the token names no key (`kid`)".into()),
                    })
                }),
            (alg, _, _, _) => Err(JwtError::Algorithm(alg)),
        }
    }

    /// Before `token` is verified: when it names a key the JWKS document does not hold,
    /// asks for the document to be read again (rate-limited, see
    /// [`JwksHandle::refetch`]) and waits up to [`crate::jwks::REFETCH_WAIT`] for that
    /// read, so a token signed with a key the provider just rotated in verifies at once
    /// rather than after the next periodic read. Returns at once for any other token.
    pub async fn refetch_for(&self, token: &str) {
        let Some(jwks) = &self.jwks else {
            return;
        };
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return;
        };
        // As `verify_session` picks: HS256 never goes to the JWKS document, nor does
        // the configured public key's algorithm.
        let other_key = header.alg == Algorithm::HS256
            || self
                .public
                .as_ref()
                .is_some_and(|(alg, _)| header.alg == *alg);
        if !other_key && jwks.lacks(header.kid.as_deref()) {
            jwks.refetch(crate::jwks::REFETCH_WAIT).await;
        }
    }

    fn verify_with(
        &self,
        token: &str,
        alg: Algorithm,
        key: &DecodingKey,
    ) -> Result<Session, JwtError> {
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY;
        validation.validate_nbf = true;
        // A configured `aud` or `iss` must be present, not only right when present: the
        // library compares them only when the token carries them.
        let mut required = vec!["exp", "sub"];
        match &self.audience {
            Some(aud) => {
                required.push("aud");
                validation.set_audience(&[aud]);
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            required.push("iss");
            validation.set_issuer(&[iss]);
        }
        validation.set_required_spec_claims(&required);
        // Only `sub` is read here; the library checks the others from the raw claims,
        // where `aud` may be a string or an array (RFC 7519 §4.1.3).
        #[derive(Deserialize)]
        struct Subject {
            sub: String,
            // A NumericDate may have a fraction (RFC 7519 §2).
            exp: f64,
        }
        let data = jsonwebtoken::decode::<Subject>(token, key, &validation)
            .map_err(|e| JwtError::Invalid(why(&e)))?;
        // Valid as long as the check just passed would pass: it refuses once the whole
        // seconds of now exceed `exp` plus the leeway.
        // In `std::time` with saturation: an issuer's `exp` may be far out (milliseconds
        // by mistake, ~1.7e12), which must never overflow a date type.
        let exp = data.claims.exp.max(0.0) as u64;
        let refused_from = std::time::Duration::from_secs(exp.saturating_add(LEEWAY + 1));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Session {
            user: UserId::new(data.claims.sub)?,
            valid_for: refused_from.saturating_sub(now).min(MAX_SESSION),
        })
    }

    /// The JWKS key set, to replace when the document is fetched again.
    pub fn jwks(&self) -> Option<&JwksHandle> {
        self.jwks.as_ref()
    }

    /// Mints an HS256 token for `user`, valid for `ttl_secs`.
    ///
    /// # Errors
    /// [`JwtError::Key`] when no HS256 secret is configured.
    pub fn mint(&self, user: &UserId, ttl_secs: u64) -> Result<String, JwtError> {
        let (key, _) = self
            .hs256
            .as_ref()
            .ok_or_else(|| JwtError::Key("minting needs the HS256 secret".into()))?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
        let claims = UserClaims {
            sub: user.as_str().to_string(),
            exp: now + ttl_secs,
            iat: Some(now),
            aud: self.audience.clone(),
            iss: self.issuer.clone(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
            .map_err(|e| JwtError::Key(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn auth(secret: &[u8]) -> UserAuth {
        UserAuth::new(&JwtConfig {
            hs256_secret: Some(secret.to_vec()),
            ..Default::default()
        })
        .expect("config")
    }

    #[test]
    fn minted_tokens_verify() {
        let a = auth(b"secret");
        let user = UserId::new("a.b *").expect("valid");
        let token = a.mint(&user, 60).expect("mint");
        assert_eq!(a.verify(&token).expect("verify"), user);
    }

    #[test]
    fn a_session_is_valid_until_the_tokens_exp_and_the_leeway() {
        let a = auth(b"secret");
        let user = UserId::new("alice").expect("valid");
        let session = a
            .verify_session(&a.mint(&user, 600).expect("mint"))
            .expect("verify");
        assert_eq!(session.user, user);
        let secs = session.valid_for.as_secs();
        assert!((600 + LEEWAY - 1..=600 + LEEWAY).contains(&secs), "{secs}");
        // A fractional NumericDate (RFC 7519) is a valid `exp`.
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
        let fractional = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "alice", "exp": now + 100.5}),
            &EncodingKey::from_secret(b"secret"),
        )
        .expect("encode");
        let session = a.verify_session(&fractional).expect("fractional exp");
        assert!(session.valid_for.as_secs() >= 100, "{session:?}");
        // An `exp` in milliseconds by mistake: far out, capped, never a panic.
        let far = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "alice", "exp": now * 1000.0}),
            &EncodingKey::from_secret(b"secret"),
        )
        .expect("encode");
        let session = a.verify_session(&far).expect("far exp");
        assert_eq!(session.valid_for, MAX_SESSION);
    }

    #[test]
    fn forged_expired_and_garbage_tokens_are_refused() {
        let a = auth(b"secret");
        let user = UserId::new("alice").expect("valid");
        let forged = auth(b"other").mint(&user, 60).expect("mint");
        assert!(matches!(a.verify(&forged), Err(JwtError::Invalid(_))));
        let claims = UserClaims {
            sub: "alice".into(),
            exp: 1_000,
            iat: None,
            aud: None,
            iss: None,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"secret"),
        )
        .expect("encode");
        assert!(matches!(a.verify(&expired), Err(JwtError::Invalid(_))));
        assert!(a.verify("not.a.token").is_err());
        assert!(a.verify("").is_err());
        // `alg: none` must never pass.
        let none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(a.verify(none).is_err());

        // Each refusal says why in words, not in the library's type names.
        let message = |token: &str| a.verify(token).expect_err("refused").to_string();
        assert_eq!(
            message(&forged),
            "invalid token: the signature does not verify"
        );
        assert_eq!(message(&expired), "invalid token: expired (exp is past)");
        assert!(
            message("hk_0123").contains("not a JWT"),
            "{}",
            message("hk_0123")
        );
        let none_said = message(none);
        assert!(
            none_said.contains("`none` is never accepted") && !none_said.contains("variant"),
            "{none_said}"
        );
    }

    #[test]
    fn audience_is_enforced_when_configured() {
        let strict = UserAuth::new(&JwtConfig {
            hs256_secret: Some(b"s".to_vec()),
            audience: Some("herald".into()),
            ..Default::default()
        })
        .expect("config");
        let user = UserId::new("u").expect("valid");
        let good = strict.mint(&user, 60).expect("mint");
        assert!(strict.verify(&good).is_ok());
        let no_aud = auth(b"s").mint(&user, 60).expect("mint");
        assert!(strict.verify(&no_aud).is_err());
        // An array audience is allowed by RFC 7519, with or without one configured.
        let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 60;
        let listed = raw(
            b"s",
            json!({"sub": "u", "exp": exp, "aud": ["other", "herald"]}),
        );
        assert_eq!(strict.verify(&listed).expect("array aud"), user);
        assert_eq!(auth(b"s").verify(&listed).expect("array aud"), user);
        let elsewhere = raw(b"s", json!({"sub": "u", "exp": exp, "aud": ["other"]}));
        assert!(strict.verify(&elsewhere).is_err());
    }

    fn raw(secret: &[u8], claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("encode")
    }

    #[test]
    fn a_configured_issuer_is_required() {
        let strict = UserAuth::new(&JwtConfig {
            hs256_secret: Some(b"s".to_vec()),
            issuer: Some("herald".into()),
            ..Default::default()
        })
        .expect("config");
        let user = UserId::new("u").expect("valid");
        assert!(
            strict
                .verify(&strict.mint(&user, 60).expect("mint"))
                .is_ok()
        );
        let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 60;
        let no_iss = raw(b"s", json!({"sub": "u", "exp": exp}));
        assert!(strict.verify(&no_iss).is_err(), "a token without `iss`");
        let other = raw(b"s", json!({"sub": "u", "exp": exp, "iss": "elsewhere"}));
        assert!(strict.verify(&other).is_err());
    }

    #[test]
    fn a_token_not_valid_yet_is_refused() {
        let a = auth(b"s");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let later = raw(
            b"s",
            json!({"sub": "u", "exp": now + 3600, "nbf": now + 600}),
        );
        assert!(a.verify(&later).is_err());
        let started = raw(b"s", json!({"sub": "u", "exp": now + 3600, "nbf": now - 1}));
        assert!(a.verify(&started).is_ok());
    }
}
