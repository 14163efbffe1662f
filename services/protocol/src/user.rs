//! User ids and the subject tokens derived from them.
//!
//! A user id is opaque: any UTF-8 of 1–128 bytes, so ids like `*`, `a.b` or `bob.>` are
//! legal. They never enter a subject raw; [`UserToken`] is the only way in.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::fmt;

/// Longest user id accepted, in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;

/// A validated user id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct UserId(String);

/// Why a string is not a user id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserIdError {
    /// The id is the empty string.
    #[error("user id must not be empty")]
    Empty,
    /// The id is longer than [`MAX_USER_ID_BYTES`].
    #[error("user id is {0} bytes long; the limit is 128")]
    TooLong(usize),
    /// A subject token did not decode to a UTF-8 user id.
    #[error("not a user token")]
    BadToken,
}

impl UserId {
    /// Validates `raw` as a user id.
    ///
    /// # Errors
    /// [`UserIdError`] when it is empty or over 128 bytes.
    pub fn new(raw: impl Into<String>) -> Result<Self, UserIdError> {
        let raw = raw.into();
        match raw.len() {
            0 => Err(UserIdError::Empty),
            n if n > MAX_USER_ID_BYTES => Err(UserIdError::TooLong(n)),
            _ => Ok(Self(raw)),
        }
    }

    /// The id as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The subject token for this id.
    pub fn token(&self) -> UserToken {
        UserToken(URL_SAFE_NO_PAD.encode(self.0.as_bytes()))
    }

    /// The partition that owns this user, in `0..partitions`.
    ///
    /// FNV-1a over the id's bytes: stable across processes, versions and platforms, which
    /// matters because the partition is part of the stored subject.
    pub fn partition(&self, partitions: u16) -> u16 {
        let mut hash: u32 = 0x811c_9dc5;
        for byte in self.0.as_bytes() {
            hash ^= u32::from(*byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        (hash % u32::from(partitions.max(1))) as u16
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for UserId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        UserId::new(raw).map_err(serde::de::Error::custom)
    }
}

/// A user id encoded as one NATS subject token (unpadded base64url of its bytes).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserToken(String);

impl UserToken {
    /// The token text, safe to place between two dots of a subject.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Decodes a token back into the user id it came from.
    ///
    /// # Errors
    /// [`UserIdError::BadToken`] when `token` is not one of ours.
    pub fn decode(token: &str) -> Result<UserId, UserIdError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| UserIdError::BadToken)?;
        let raw = String::from_utf8(bytes).map_err(|_| UserIdError::BadToken)?;
        UserId::new(raw)
    }
}

impl fmt::Display for UserToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_ids_become_plain_tokens() {
        for raw in [
            "*",
            ">",
            "a.b",
            "bob.*",
            "bob.>",
            "with space",
            "ünïcødé 🚀",
            "$JS.API.>",
        ] {
            let id = UserId::new(raw).expect("valid id");
            let token = id.token();
            assert!(
                token
                    .as_str()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{raw:?} gave token {token}"
            );
            assert_eq!(UserToken::decode(token.as_str()), Ok(id));
        }
    }

    #[test]
    fn distinct_ids_never_share_a_token() {
        let a = UserId::new("bob").expect("valid");
        let b = UserId::new("bob.*").expect("valid");
        assert_ne!(a.token(), b.token());
    }

    #[test]
    fn length_limits() {
        assert_eq!(UserId::new(""), Err(UserIdError::Empty));
        assert!(UserId::new("x".repeat(128)).is_ok());
        assert_eq!(UserId::new("x".repeat(129)), Err(UserIdError::TooLong(129)));
        // 128 bytes, not 128 characters.
        assert_eq!(UserId::new("é".repeat(65)), Err(UserIdError::TooLong(130)));
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        let id = UserId::new("alice").expect("valid");
        assert_eq!(id.partition(16), id.partition(16));
        for n in [1, 2, 7, 16, 1024] {
            assert!(id.partition(n) < n);
        }
        // Pinned value: the partition is part of stored subjects and must never change.
        // FNV-1a("alice") = 0x872213e7.
        assert_eq!(id.partition(16), 7);
    }
}
