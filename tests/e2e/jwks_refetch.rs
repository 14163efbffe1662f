//! The JWKS document is read when a token needs it, not only on the refresh period: a
//! token signed with a key the provider just rotated in verifies on its first request,
//! tokens naming made-up keys cannot make Herald hammer the provider, a provider down
//! when Herald starts does not stop it, redirects are not followed, and an endless
//! document is cut at the size cap.

use anyhow::{Context as _, ensure};
use herald::jwks::{JwksSettings, JwksSource};
use herald_tests::{Herald, Nats, WsClient, eventually, within};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const JWKS: &[u8] = include_bytes!("../../services/auth/tests/keys/jwks.json");

/// Long enough that no periodic read happens during a test.
const NEVER: Duration = Duration::from_secs(3600);

/// The published document with the keys named.
fn only(kids: &[&str]) -> anyhow::Result<String> {
    let all: Value = serde_json::from_slice(JWKS)?;
    let keys: Vec<Value> = all["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|k| kids.iter().any(|kid| k["kid"] == *kid))
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

fn rsa() -> anyhow::Result<EncodingKey> {
    Ok(EncodingKey::from_rsa_pem(include_bytes!(
        "../../services/auth/tests/keys/rsa.pem"
    ))?)
}

fn ed() -> anyhow::Result<EncodingKey> {
    Ok(EncodingKey::from_ed_pem(include_bytes!(
        "../../services/auth/tests/keys/ed25519.pem"
    ))?)
}

/// An identity provider's JWKS endpoint that counts its reads: `/jwks.json` serves
/// `document` (503 while `down`), `/moved` redirects there, `/endless` never ends.
#[derive(Clone, Default)]
struct Provider {
    document: Arc<Mutex<String>>,
    down: Arc<AtomicBool>,
    reads: Arc<AtomicU32>,
}

impl Provider {
    async fn start(&self) -> anyhow::Result<String> {
        let served = self.clone();
        let app = axum::Router::new()
            .route(
                "/jwks.json",
                axum::routing::get(move || {
                    let p = served.clone();
                    async move {
                        p.reads.fetch_add(1, Ordering::SeqCst);
                        if p.down.load(Ordering::SeqCst) {
                            return (StatusCode::SERVICE_UNAVAILABLE, String::new());
                        }
                        let body = p.document.lock().map(|d| d.clone()).unwrap_or_default();
                        (StatusCode::OK, body)
                    }
                }),
            )
            .route(
                "/moved",
                axum::routing::get(|| async { axum::response::Redirect::temporary("/jwks.json") }),
            )
            .route(
                "/endless",
                axum::routing::get(|| async {
                    let chunk = bytes::Bytes::from(vec![b' '; 64 * 1024]);
                    let stream = futures::stream::repeat_with(move || {
                        Ok::<_, std::convert::Infallible>(chunk.clone())
                    });
                    axum::body::Body::from_stream(stream)
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(base)
    }

    fn publish(&self, document: String) -> anyhow::Result<()> {
        *self.document.lock().map_err(|_| anyhow::anyhow!("lock"))? = document;
        Ok(())
    }

    fn reads(&self) -> u32 {
        self.reads.load(Ordering::SeqCst)
    }
}

async fn herald_reading(nats: &Nats, url: String) -> anyhow::Result<Herald> {
    Herald::builder(nats)
        .jwks(JwksSettings {
            source: JwksSource::Url(url),
            refresh: NEVER,
        })
        .start()
        .await
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
async fn a_key_rotated_in_verifies_on_its_first_request_and_unknown_kids_are_rate_limited()
-> anyhow::Result<()> {
    let provider = Provider::default();
    provider.publish(only(&["rsa-1"])?)?;
    let base = provider.start().await?;
    let nats = Nats::single().await?;
    let herald = herald_reading(&nats, format!("{base}/jwks.json")).await?;
    let old = token(Algorithm::RS256, "rsa-1", &rsa()?, "lea")?;
    ensure!(unread(&herald, &old).await? == StatusCode::OK);
    let reads_at_start = provider.reads();

    // The provider starts signing with a new key; the periodic read is an hour away.
    // A browser opens a WebSocket with it (token in the query, verified in the gateway).
    provider.publish(only(&["rsa-1", "ed-1"])?)?;
    let new = token(Algorithm::EdDSA, "ed-1", &ed()?, "lea")?;
    let url = herald.ws_url(&format!("/v1/ws?access_token={new}"));
    let mut ws = WsClient::connect(&url, None)
        .await
        .context("the first upgrade under the rotated-in key")?;
    ensure!(ws.hello().await?["user_id"] == "lea");
    ensure!(unread(&herald, &new).await? == StatusCode::OK);
    ensure!(provider.reads() == reads_at_start + 1, "one read for both");

    // Tokens under made-up keys: refused, and at most one more read for all of them
    // (on-demand reads are at least 10 s apart; the one above was just now).
    let bogus = token(Algorithm::EdDSA, "made-up", &ed()?, "lea")?;
    for _ in 0..20 {
        ensure!(unread(&herald, &bogus).await? == StatusCode::UNAUTHORIZED);
    }
    let reads = provider.reads() - reads_at_start - 1;
    ensure!(
        reads <= 1,
        "20 unknown-kid requests read the document {reads} times"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_down_at_start_is_read_once_it_answers() -> anyhow::Result<()> {
    let provider = Provider::default();
    provider.publish(only(&["rsa-1"])?)?;
    provider.down.store(true, Ordering::SeqCst);
    let base = provider.start().await?;
    let nats = Nats::single().await?;
    let herald = herald_reading(&nats, format!("{base}/jwks.json"))
        .await
        .context("Herald starts while the JWKS URL answers 503")?;
    let user = token(Algorithm::RS256, "rsa-1", &rsa()?, "max")?;
    ensure!(unread(&herald, &user).await? == StatusCode::UNAUTHORIZED);
    let producer = herald.send("max", "hello").await?;
    ensure!(producer.seq > 0, "producers are served meanwhile");

    provider.down.store(false, Ordering::SeqCst);
    eventually(
        Duration::from_secs(20),
        "the document is read once it answers",
        || async {
            ensure!(unread(&herald, &user).await? == StatusCode::OK);
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_jwks_url_is_not_followed() -> anyhow::Result<()> {
    let provider = Provider::default();
    provider.publish(only(&["rsa-1"])?)?;
    let base = provider.start().await?;
    let nats = Nats::single().await?;
    let herald = herald_reading(&nats, format!("{base}/moved")).await?;
    let user = token(Algorithm::RS256, "rsa-1", &rsa()?, "noa")?;
    ensure!(unread(&herald, &user).await? == StatusCode::UNAUTHORIZED);
    ensure!(provider.reads() == 0, "the redirect's target was read");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_jwks_document_is_cut_at_the_cap() -> anyhow::Result<()> {
    let base = Provider::default().start().await?;
    let settings = JwksSettings {
        source: JwksSource::Url(format!("{base}/endless")),
        refresh: NEVER,
    };
    let http = herald::jwks::client().map_err(anyhow::Error::msg)?;
    // The fetch timeout is 10 s: an endless body read whole would run into it.
    let error = within(
        Duration::from_secs(5),
        "the capped read",
        settings.load(&http),
    )
    .await?
    .err()
    .context("an endless document loaded")?;
    ensure!(error.contains("larger than"), "{error}");
    Ok(())
}
