//! Producer API keys. Keys are kept only as SHA-256 digests, so a leaked config or memory
//! dump does not leak usable keys; each key carries scopes.

use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Send notifications to users.
    Notify,
    /// Publish to topics.
    Publish,
    /// Read users' inboxes and status (service-side reads).
    Read,
    /// Erase users, manage dead letters.
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 4] = [Self::Notify, Self::Publish, Self::Read, Self::Admin];

    /// The scope's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Notify => "notify",
            Self::Publish => "publish",
            Self::Read => "read",
            Self::Admin => "admin",
        }
    }
}

/// One configured key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Stable name of the producer that owns the key (used to namespace idempotency keys).
    pub producer: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

impl ApiKey {
    /// True when the key has `scope` (admin implies every scope).
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }
}

/// The set of keys a server accepts.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    by_digest: HashMap<[u8; 32], ApiKey>,
}

impl ApiKeys {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key given in clear text.
    pub fn insert(&mut self, key: &str, api_key: ApiKey) {
        self.by_digest.insert(digest(key), api_key);
    }

    /// Adds a key given as the hex SHA-256 of its text.
    ///
    /// # Errors
    /// When `hex_digest` is not 64 hex digits.
    pub fn insert_digest(&mut self, hex_digest: &str, api_key: ApiKey) -> Result<(), String> {
        let bytes = hex::decode(hex_digest).map_err(|e| format!("not hex: {e}"))?;
        let digest: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "a SHA-256 digest is 64 hex digits".to_string())?;
        self.by_digest.insert(digest, api_key);
        Ok(())
    }

    /// The key matching `presented`, if any.
    pub fn verify(&self, presented: &str) -> Option<&ApiKey> {
        self.by_digest.get(&digest(presented))
    }

    /// How many keys are configured.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// True when no key is configured.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A fresh random key, `hk_` followed by 43 base64url characters (256 bits).
pub fn generate() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    format!(
        "hk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The hex SHA-256 of a key, for configs that should not hold the key itself.
pub fn digest_hex(key: &str) -> String {
    hex::encode(digest(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_verify_by_digest_and_scope() {
        let mut keys = ApiKeys::new();
        let k = generate();
        keys.insert(
            &k,
            ApiKey {
                producer: "shop".into(),
                scopes: vec![Scope::Notify],
            },
        );
        let found = keys.verify(&k).expect("known key");
        assert!(found.allows(Scope::Notify));
        assert!(!found.allows(Scope::Admin));
        assert!(keys.verify("hk_wrong").is_none());
        let mut by_digest = ApiKeys::new();
        by_digest
            .insert_digest(&digest_hex(&k), found.clone())
            .expect("valid digest");
        assert!(by_digest.verify(&k).is_some());
    }
}
