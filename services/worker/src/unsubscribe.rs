//! One-click unsubscribe links (RFC 8058): `POST <base>/v1/unsubscribe?token=…`, where the
//! token names a user and a category and is signed with HMAC-SHA256, so a link opts out
//! exactly the user and category it was made for and cannot be forged or altered.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use herald_protocol::UserId;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// User id.
    u: String,
    /// Category (absent: all email).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<String>,
}

/// Makes and checks unsubscribe links.
#[derive(Clone)]
pub struct Links {
    key: Vec<u8>,
    /// Keys that signed links before a rotation; they verify, never sign.
    old_keys: Vec<Vec<u8>>,
    base_url: String,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("base_url", &self.base_url)
            .finish()
    }
}

/// A token that does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid unsubscribe token")]
pub struct BadToken;

impl Links {
    /// Links under `base_url` (Herald's public origin, e.g. `https://herald.example.com`),
    /// signed with `key`.
    pub fn new(key: &[u8], base_url: &str) -> Self {
        Self {
            key: key.to_vec(),
            old_keys: Vec::new(),
            base_url: base_url.trim_end_matches('/').to_string(),
        }
    }

    /// Also accepts links signed with `old` keys (mailed before a key rotation).
    pub fn with_old_keys(mut self, old: &[Vec<u8>]) -> Self {
        self.old_keys = old.to_vec();
        self
    }

    fn mac(&self) -> HmacSha256 {
        mac_with(&self.key)
    }

    /// The signed token for `user` and `category`.
    pub fn token(&self, user: &UserId, category: Option<&str>) -> String {
        let claims = Claims {
            u: user.as_str().to_string(),
            c: category.map(str::to_string),
        };
        let body = B64.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        let sig = B64.encode(mac.finalize().into_bytes());
        format!("{body}.{sig}")
    }

    /// The full one-click URL.
    pub fn url(&self, user: &UserId, category: Option<&str>) -> String {
        format!(
            "{}/v1/unsubscribe?token={}",
            self.base_url,
            self.token(user, category)
        )
    }

    /// The user and category a token names, when its signature verifies.
    ///
    /// # Errors
    /// [`BadToken`] when it is malformed or not signed with this key.
    pub fn verify(&self, token: &str) -> Result<(UserId, Option<String>), BadToken> {
        let (body, sig) = token.split_once('.').ok_or(BadToken)?;
        let sig = B64.decode(sig).map_err(|_| BadToken)?;
        let signed_by = |key: &[u8]| {
            let mut mac = mac_with(key);
            mac.update(body.as_bytes());
            mac.verify_slice(&sig).is_ok()
        };
        if !std::iter::once(&self.key)
            .chain(&self.old_keys)
            .any(|key| signed_by(key))
        {
            return Err(BadToken);
        }
        let claims: Claims = serde_json::from_slice(&B64.decode(body).map_err(|_| BadToken)?)
            .map_err(|_| BadToken)?;
        let user = UserId::new(claims.u).map_err(|_| BadToken)?;
        Ok((user, claims.c))
    }
}

fn mac_with(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_unaltered_and_with_the_key() {
        let links = Links::new(b"k1", "http://h/");
        let user = UserId::new("ann.*").expect("valid");
        let token = links.token(&user, Some("marketing"));
        assert_eq!(
            links.verify(&token),
            Ok((user.clone(), Some("marketing".into())))
        );
        assert!(
            links
                .url(&user, None)
                .starts_with("http://h/v1/unsubscribe?token=")
        );
        assert_eq!(Links::new(b"k2", "http://h").verify(&token), Err(BadToken));
        let forged = links.token(&UserId::new("bob").expect("valid"), Some("marketing"));
        let (_, sig) = token.split_once('.').expect("dot");
        let (body, _) = forged.split_once('.').expect("dot");
        assert_eq!(links.verify(&format!("{body}.{sig}")), Err(BadToken));
        assert_eq!(links.verify("garbage"), Err(BadToken));
    }

    #[test]
    fn links_mailed_before_a_key_rotation_still_verify() {
        let before = Links::new(b"k1", "http://h");
        let user = UserId::new("ann").expect("valid");
        let mailed = before.token(&user, Some("news"));
        let rotated = Links::new(b"k2", "http://h").with_old_keys(&[b"k1".to_vec()]);
        assert_eq!(
            rotated.verify(&mailed),
            Ok((user.clone(), Some("news".into())))
        );
        // New links are signed with the new key only.
        let fresh = rotated.token(&user, None);
        assert_eq!(
            Links::new(b"k2", "http://h").verify(&fresh),
            Ok((user, None))
        );
        assert_eq!(before.verify(&fresh), Err(BadToken));
        assert_eq!(Links::new(b"k3", "http://h").verify(&mailed), Err(BadToken));
    }
}
