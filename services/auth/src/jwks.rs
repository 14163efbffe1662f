//! Public keys from a JWKS document (RFC 7517), picked by the token's `kid`: how an
//! identity provider publishes the keys it signs user tokens with, and rotates them.
//!
//! Only signature keys of public-key families are taken (RSA, EC P-256/P-384, Ed25519);
//! a symmetric (`oct`) key in a published set would let anyone who can read the set sign
//! tokens, so it is skipped, as are keys marked for encryption. A key that names its
//! `alg` verifies only tokens of that algorithm; one that does not, only the algorithms
//! of its family. The set is swapped whole when it is fetched again
//! ([`JwksHandle::replace`]), so a rotation needs no restart.

use crate::jwt::JwtError;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::sync::{Arc, RwLock};

/// The usable keys of one JWKS document.
#[derive(Clone)]
pub struct Jwks {
    keys: Vec<Key>,
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (&k.kid, &k.algorithms)))
            .finish()
    }
}

impl Jwks {
    /// Parses a JWKS document and keeps its usable signature keys.
    ///
    /// # Errors
    /// [`JwtError::Key`] when it is not a JWKS document or holds no usable key.
    pub fn parse(json: &[u8]) -> Result<Self, JwtError> {
        let set: JwkSet = serde_json::from_slice(json)
            .map_err(|e| JwtError::Key(format!("not a JWKS document: {e}")))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let family: &[Algorithm] = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => &[
                    Algorithm::RS256,
                    Algorithm::RS384,
                    Algorithm::RS512,
                    Algorithm::PS256,
                    Algorithm::PS384,
                    Algorithm::PS512,
                ],
                AlgorithmParameters::EllipticCurve(p) => match p.curve {
                    EllipticCurve::P256 => &[Algorithm::ES256],
                    EllipticCurve::P384 => &[Algorithm::ES384],
                    _ => continue,
                },
                AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                    EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
                    _ => continue,
                },
                AlgorithmParameters::OctetKey(_) => continue,
            };
            let algorithms: Vec<Algorithm> = match jwk.common.key_algorithm {
                None => family.to_vec(),
                Some(named) => match named.to_string().parse::<Algorithm>() {
                    Ok(alg) if family.contains(&alg) => vec![alg],
                    _ => continue,
                },
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                algorithms,
                key,
            });
        }
        if keys.is_empty() {
            return Err(JwtError::Key(
                "the JWKS document holds no RSA, EC (P-256, P-384) or Ed25519 signature key".into(),
            ));
        }
        Ok(Self { keys })
    }

    /// The key for a token signed with `alg` under `kid`. Without a `kid`, only a set of
    /// one key answers.
    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&DecodingKey> {
        let key = match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid))?,
            None if self.keys.len() == 1 => &self.keys[0],
            None => return None,
        };
        key.algorithms.contains(&alg).then_some(&key.key)
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether it holds none (never, once parsed).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The current key set, shared between the verifier and whatever refreshes it.
#[derive(Debug, Clone)]
pub struct JwksHandle(Arc<RwLock<Arc<Jwks>>>);

impl JwksHandle {
    /// A handle holding `jwks`.
    pub fn new(jwks: Jwks) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(jwks))))
    }

    /// Replaces the key set (a fresh fetch of the document).
    pub fn replace(&self, jwks: Jwks) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(jwks);
    }

    fn current(&self) -> Arc<Jwks> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs `f` with the key for `kid` and `alg`, if the current set has one.
    pub(crate) fn with_key<T>(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
        f: impl FnOnce(&DecodingKey) -> T,
    ) -> Option<T> {
        let set = self.current();
        set.find(kid, alg).map(f)
    }
}
