//! Who is calling: producers with scoped API keys, end users with JWTs.
//!
//! Both are checked once, at the HTTP request or WebSocket/SSE upgrade; nothing inside a
//! frame ever carries a credential.

pub mod api_keys;
pub mod jwks;
pub mod jwt;

pub use api_keys::{ApiKey, ApiKeys, Scope};
pub use jwks::{Jwks, JwksHandle};
pub use jwt::{JwtConfig, JwtError, Session, UserAuth, UserClaims};

/// Extracts the token from an `Authorization: Bearer <token>` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn bearer_parsing() {
        assert_eq!(super::bearer("Bearer abc"), Some("abc"));
        assert_eq!(super::bearer("bearer  abc "), Some("abc"));
        assert_eq!(super::bearer("Basic abc"), None);
        assert_eq!(super::bearer("Bearer "), None);
        assert_eq!(super::bearer("abc"), None);
    }
}
