//! User tokens verified against a JWKS document: the key is picked by `kid`, must be a
//! public signature key of the token's algorithm, and a fresh copy of the document
//! replaces the keys (rotation) without a restart. The key pairs in `tests/keys` exist
//! for these tests only; `jwks.json` publishes their public halves, plus a symmetric key
//! and an encryption key that must never verify anything.

use herald_auth::{Jwks, JwksHandle, JwtConfig, UserAuth};
use herald_protocol::UserId;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const JWKS: &[u8] = include_bytes!("keys/jwks.json");

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, sub: &str) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &json!({"sub": sub, "exp": 4_000_000_000u64}), key).expect("sign")
}

fn verifier(jwks: &[u8]) -> (UserAuth, JwksHandle) {
    let handle = JwksHandle::new(Jwks::parse(jwks).expect("jwks"));
    let auth = UserAuth::new(&JwtConfig {
        jwks: Some(handle.clone()),
        ..Default::default()
    })
    .expect("config");
    (auth, handle)
}

fn rsa() -> EncodingKey {
    EncodingKey::from_rsa_pem(include_bytes!("keys/rsa.pem")).expect("key")
}

fn ed() -> EncodingKey {
    EncodingKey::from_ed_pem(include_bytes!("keys/ed25519.pem")).expect("key")
}

#[test]
fn the_key_named_by_kid_verifies() {
    let (auth, _) = verifier(JWKS);
    let user = UserId::new("jo *").expect("id");
    let rs = sign(Algorithm::RS256, Some("rsa-1"), &rsa(), "jo *");
    assert_eq!(auth.verify(&rs).expect("RS256 by kid"), user);
    let eddsa = sign(Algorithm::EdDSA, Some("ed-1"), &ed(), "jo *");
    assert_eq!(auth.verify(&eddsa).expect("EdDSA by kid"), user);
    // The right signature under another key's kid, an unknown kid, no kid among several.
    assert!(
        auth.verify(&sign(Algorithm::RS256, Some("ed-1"), &rsa(), "jo"))
            .is_err()
    );
    assert!(
        auth.verify(&sign(Algorithm::RS256, Some("gone"), &rsa(), "jo"))
            .is_err()
    );
    assert!(
        auth.verify(&sign(Algorithm::RS256, None, &rsa(), "jo"))
            .is_err()
    );
    // A key published for RS256 only does not verify RS512.
    assert!(
        auth.verify(&sign(Algorithm::RS512, Some("rsa-1"), &rsa(), "jo"))
            .is_err()
    );
}

#[test]
fn published_symmetric_and_encryption_keys_verify_nothing() {
    let (auth, _) = verifier(JWKS);
    // Anyone can read a JWKS document: an `oct` key in it must not sign user tokens.
    let shared = EncodingKey::from_secret(b"a-secret-nobody-should-publish");
    assert!(
        auth.verify(&sign(Algorithm::HS256, Some("shared"), &shared, "jo"))
            .is_err()
    );
    assert!(
        auth.verify(&sign(Algorithm::RS256, Some("enc-1"), &rsa(), "jo"))
            .is_err()
    );
    // A document with nothing usable is refused when it is loaded.
    let only_oct = json!({"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]});
    assert!(Jwks::parse(only_oct.to_string().as_bytes()).is_err());
    assert!(Jwks::parse(b"{\"not\": \"jwks\"}").is_err());
}

#[test]
fn a_fetched_document_replaces_the_keys() {
    let all: serde_json::Value = serde_json::from_slice(JWKS).expect("json");
    let only = |kid: &str| {
        let keys: Vec<_> = all["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .filter(|k| k["kid"] == kid)
            .cloned()
            .collect();
        json!({ "keys": keys }).to_string()
    };
    let (auth, handle) = verifier(only("rsa-1").as_bytes());
    let rs = sign(Algorithm::RS256, Some("rsa-1"), &rsa(), "jo");
    let eddsa = sign(Algorithm::EdDSA, Some("ed-1"), &ed(), "jo");
    assert!(auth.verify(&rs).is_ok());
    assert!(auth.verify(&eddsa).is_err());
    // Rotated: the provider now publishes the Ed25519 key only.
    handle.replace(Jwks::parse(only("ed-1").as_bytes()).expect("jwks"));
    assert!(auth.verify(&eddsa).is_ok());
    assert!(auth.verify(&rs).is_err());
    // A set of one key verifies a token that names no kid.
    assert!(
        auth.verify(&sign(Algorithm::EdDSA, None, &ed(), "jo"))
            .is_ok()
    );
}
