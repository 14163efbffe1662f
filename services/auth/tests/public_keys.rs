//! User tokens signed with EdDSA or RS256 verify against the configured public key, and
//! only against it. The key pairs in `tests/keys` exist for these tests only.

use herald_auth::{JwtConfig, UserAuth, UserClaims};
use herald_protocol::UserId;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

fn sign(alg: Algorithm, key: &EncodingKey, sub: &str) -> String {
    let claims = UserClaims {
        sub: sub.into(),
        exp: 4_000_000_000,
        iat: None,
        aud: None,
        iss: None,
    };
    jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("sign")
}

fn verifier(alg: Algorithm, public_pem: &[u8]) -> UserAuth {
    UserAuth::new(&JwtConfig {
        public_key: Some((alg, public_pem.to_vec())),
        ..Default::default()
    })
    .expect("config")
}

#[test]
fn eddsa_tokens_verify_with_the_configured_key() {
    let private = EncodingKey::from_ed_pem(include_bytes!("keys/ed25519.pem")).expect("key");
    let auth = verifier(Algorithm::EdDSA, include_bytes!("keys/ed25519.pub.pem"));
    let token = sign(Algorithm::EdDSA, &private, "eve.*");
    assert_eq!(
        auth.verify(&token).expect("valid"),
        UserId::new("eve.*").expect("id")
    );
    // An HS256 token is refused: no secret is configured.
    let hs = sign(Algorithm::HS256, &EncodingKey::from_secret(b"guess"), "eve");
    assert!(auth.verify(&hs).is_err());
}

#[test]
fn rs256_tokens_verify_and_tampering_is_refused() {
    let private = EncodingKey::from_rsa_pem(include_bytes!("keys/rsa.pem")).expect("key");
    let auth = verifier(Algorithm::RS256, include_bytes!("keys/rsa.pub.pem"));
    let token = sign(Algorithm::RS256, &private, "rita");
    assert!(auth.verify(&token).is_ok());
    // Swap the payload for another user's, keep the signature.
    let forged_payload = sign(Algorithm::RS256, &private, "mallory");
    let parts: Vec<&str> = token.split('.').collect();
    let other: Vec<&str> = forged_payload.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], other[1], parts[2]);
    assert!(auth.verify(&tampered).is_err());
    // An EdDSA token is refused by an RS256 verifier.
    let ed = EncodingKey::from_ed_pem(include_bytes!("keys/ed25519.pem")).expect("key");
    assert!(auth.verify(&sign(Algorithm::EdDSA, &ed, "rita")).is_err());
}
