//! User tokens from an identity provider that publishes its keys as a JWKS document over
//! HTTP: Herald fetches it at start, verifies each token with the key its `kid` names,
//! and reads the document again so a key rotation takes effect without a restart.

use anyhow::ensure;
use herald::jwks::{JwksSettings, JwksSource};
use herald_tests::{Herald, Nats, eventually};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const JWKS: &[u8] = include_bytes!("../../services/auth/tests/keys/jwks.json");

/// The published document with only the key `kid`.
fn only(kid: &str) -> anyhow::Result<String> {
    let all: Value = serde_json::from_slice(JWKS)?;
    let keys: Vec<Value> = all["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|k| k["kid"] == kid)
        .cloned()
        .collect();
    Ok(json!({ "keys": keys }).to_string())
}

fn token(alg: Algorithm, kid: &str, key: &EncodingKey, user: &str) -> anyhow::Result<String> {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 600;
    Ok(jsonwebtoken::encode(
        &header,
        &json!({"sub": user, "exp": exp}),
        key,
    )?)
}

/// A provider's JWKS endpoint, serving whatever `document` holds.
async fn provider(document: Arc<Mutex<String>>) -> anyhow::Result<String> {
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let document = document.clone();
            async move {
                let body = document.lock().map(|d| d.clone()).unwrap_or_default();
                ([("content-type", "application/json")], body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/.well-known/jwks.json", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

async fn unread(herald: &Herald, token: &str) -> anyhow::Result<StatusCode> {
    Ok(herald
        .request(Method::GET, "/v1/me/unread")
        .bearer_auth(token)
        .send()
        .await?
        .status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_verify_against_a_fetched_jwks_and_its_rotation() -> anyhow::Result<()> {
    let document = Arc::new(Mutex::new(only("rsa-1")?));
    let url = provider(document.clone()).await?;
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .jwks(JwksSettings {
            source: JwksSource::Url(url),
            refresh: Duration::from_secs(1),
        })
        .start()
        .await?;
    let rsa = EncodingKey::from_rsa_pem(include_bytes!("../../services/auth/tests/keys/rsa.pem"))?;
    let ed =
        EncodingKey::from_ed_pem(include_bytes!("../../services/auth/tests/keys/ed25519.pem"))?;
    let old = token(Algorithm::RS256, "rsa-1", &rsa, "jay")?;
    let new = token(Algorithm::EdDSA, "ed-1", &ed, "jay")?;
    ensure!(
        unread(&herald, &old).await? == StatusCode::OK,
        "RS256 by kid"
    );
    let refused = herald
        .request(Method::GET, "/v1/me/unread")
        .bearer_auth(&new)
        .send()
        .await?;
    ensure!(
        refused.status() == StatusCode::UNAUTHORIZED,
        "{}",
        refused.status()
    );
    let body: Value = refused.json().await?;
    ensure!(body["error"]["code"].is_string(), "a JSON error: {body}");

    // The provider rotates: it now publishes the Ed25519 key only.
    *document.lock().map_err(|_| anyhow::anyhow!("lock"))? = only("ed-1")?;
    eventually(
        Duration::from_secs(20),
        "the rotated key is used",
        || async {
            ensure!(unread(&herald, &new).await? == StatusCode::OK);
            Ok(())
        },
    )
    .await?;
    ensure!(
        unread(&herald, &old).await? == StatusCode::UNAUTHORIZED,
        "a key the provider no longer publishes"
    );
    // A broken document later keeps the keys already loaded.
    *document.lock().map_err(|_| anyhow::anyhow!("lock"))? = "<html>oops</html>".into();
    eventually(
        Duration::from_secs(20),
        "a failed refresh is counted",
        || async {
            let metrics = herald.metrics().await?;
            ensure!(metrics.contains("herald_jwks_refreshes_total{result=\"failed\"}"));
            Ok(())
        },
    )
    .await?;
    ensure!(unread(&herald, &new).await? == StatusCode::OK, "keys kept");
    Ok(())
}
