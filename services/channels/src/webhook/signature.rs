//! The webhook signature scheme, for senders and receivers.
//!
//! Every webhook request carries
//!
//! ```text
//! Herald-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>
//! ```
//!
//! A receiver recomputes the HMAC over the timestamp, a `.`, and the *raw* request body (as
//! bytes, before any JSON parsing), compares it in constant time with any `v1` value (more
//! than one may appear while a secret is rotated), and rejects timestamps outside its
//! tolerance (e.g. 5 minutes) so a captured request cannot be replayed later. Receivers
//! should also dedup by the `Herald-Id` header: a retried delivery is signed again, with a
//! new timestamp, but keeps its id.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;

type HmacSha256 = Hmac<Sha256>;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "Herald-Signature";
/// The header carrying the notification id (stable across retries).
pub const ID_HEADER: &str = "Herald-Id";

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header is not `t=<int>,v1=<hex>[,v1=<hex>…]`.
    #[error("malformed signature header")]
    Malformed,
    /// The timestamp is further from now than the tolerance.
    #[error("signature timestamp outside the tolerance")]
    Stale,
    /// No `v1` matches the body under the secret.
    #[error("signature does not match")]
    Mismatch,
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length.
    let mut mac = HmacSha256::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("hmac takes any key length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `Herald-Signature` value for `body` sent at `timestamp` (Unix seconds).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let digest = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(digest))
}

/// Verifies a `Herald-Signature` header against the raw body, at time `now` (Unix seconds).
///
/// # Errors
/// [`SignatureError`] when the header is malformed, too old or too new, or matches no
/// signature.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => {
                timestamp = Some(t.parse::<i64>().map_err(|_| SignatureError::Malformed)?)
            }
            Some(("v1", v)) => {
                candidates.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?)
            }
            Some(_) => {} // other schemes, for forward compatibility
            None => return Err(SignatureError::Malformed),
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if candidates.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now.abs_diff(timestamp) > tolerance.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    let expected = mac(secret, timestamp, body);
    if candidates
        .iter()
        .any(|c| expected.clone().verify_slice(c).is_ok())
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE_MIN: Duration = Duration::from_secs(300);

    #[test]
    fn a_signature_verifies_and_its_tampered_twins_do_not() {
        let header = sign(b"s3cret", 1_700_000_000, br#"{"id":"1"}"#);
        assert!(header.starts_with("t=1700000000,v1="));
        assert_eq!(
            verify(
                b"s3cret",
                &header,
                br#"{"id":"1"}"#,
                1_700_000_010,
                FIVE_MIN
            ),
            Ok(())
        );
        assert_eq!(
            verify(
                b"s3cret",
                &header,
                br#"{"id":"2"}"#,
                1_700_000_010,
                FIVE_MIN
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"other", &header, br#"{"id":"1"}"#, 1_700_000_010, FIVE_MIN),
            Err(SignatureError::Mismatch)
        );
        let moved = header.replace("t=1700000000", "t=1700000001");
        assert_eq!(
            verify(b"s3cret", &moved, br#"{"id":"1"}"#, 1_700_000_010, FIVE_MIN),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn old_and_malformed_headers_are_refused() {
        let header = sign(b"k", 1_000, b"x");
        assert_eq!(
            verify(b"k", &header, b"x", 2_000, FIVE_MIN),
            Err(SignatureError::Stale)
        );
        for bad in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=zz", "garbage"] {
            assert_eq!(
                verify(b"k", bad, b"x", 1, FIVE_MIN),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn any_of_several_v1_values_may_match_during_rotation() {
        let new = sign(b"new", 50, b"body");
        let old = sign(b"old", 50, b"body");
        let v1_old = old.split_once(",v1=").map(|(_, v)| v).unwrap_or_default();
        let both = format!("{new},v1={v1_old}");
        assert_eq!(verify(b"old", &both, b"body", 50, FIVE_MIN), Ok(()));
        assert_eq!(verify(b"new", &both, b"body", 50, FIVE_MIN), Ok(()));
    }
}
