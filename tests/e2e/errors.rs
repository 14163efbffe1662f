//! Bad input and bad credentials get clear JSON errors with the right status, and change
//! nothing.

use anyhow::{Context as _, ensure};
use herald_auth::Scope;
use herald_tests::{Herald, Nats, WsClient};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::{SystemTime, UNIX_EPOCH};

/// Checks the SPEC's error shape and returns the `error` object.
async fn error_of(response: reqwest::Response, status: StatusCode) -> anyhow::Result<Value> {
    let got = response.status();
    let text = response.text().await?;
    ensure!(got == status, "expected {status}, got {got}: {text}");
    let body: Value = serde_json::from_str(&text)
        .with_context(|| format!("{status} body is not JSON: {text:?}"))?;
    let error = body["error"].clone();
    ensure!(
        error["code"].as_str().is_some_and(|c| !c.is_empty()),
        "no error.code: {body}"
    );
    ensure!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no error.message: {body}"
    );
    Ok(error)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_notify_bodies_get_400_naming_the_field() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let cases = [
        ("this is not json", "body"),
        (r#"{"user_id":"u1","title":"x"} trailing"#, "body"),
        ("[1,2]", "body"),
        (r#"{"title":"for nobody"}"#, "user_id"),
        (r#"{"user_id":5,"title":"x"}"#, "user_id"),
        (r#"{"user_id":"","title":"x"}"#, "user_id"),
        (r#"{"user_id":"u1","title":7}"#, "title"),
        (r#"{"user_id":"u1"}"#, "title"),
        (
            r#"{"user_id":"u1","title":"x","priority":"urgent"}"#,
            "priority",
        ),
        (
            r#"{"user_id":"u1","title":"x","channels":["inbox","pigeon"]}"#,
            "channels[1]",
        ),
        (r#"{"user_id":"u1","title":"x","data":[1]}"#, "data"),
        (
            r#"{"user_id":"u1","title":"x","ttl_seconds":-1}"#,
            "ttl_seconds",
        ),
    ];
    for (body, field) in cases {
        let response = herald
            .producer(Method::POST, "/v1/notify")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let error = error_of(response, StatusCode::BAD_REQUEST)
            .await
            .context(body)?;
        assert_eq!(error["field"], field, "{body}: {error}");
        assert_eq!(error["code"], "invalid_field", "{body}: {error}");
    }
    assert!(
        herald.inbox("u1").await?.is_empty(),
        "nothing invalid was stored"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_64_kib_get_413() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let body = json!({"user_id": "u1", "title": "big", "data": {"pad": "x".repeat(65 * 1024)}});
    let error = error_of(herald.notify(&body).await?, StatusCode::PAYLOAD_TOO_LARGE).await?;
    assert_eq!(error["code"], "payload_too_large");
    // Just under the limit is not refused for its size.
    let body = json!({"user_id": "u1", "title": "fits", "data": {"pad": "x".repeat(60 * 1024)}});
    herald.accept(&body).await?;
    assert_eq!(herald.inbox("u1").await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_endpoints_need_a_known_key_with_the_scope() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let notify_only = herald_auth::api_keys::generate();
    let herald = Herald::builder(&nats)
        .key(&notify_only, &[Scope::Notify])
        .start()
        .await?;
    let body = json!({"user_id": "u1", "title": "x"});
    let post = |key: Option<&str>| {
        let request = herald.request(Method::POST, "/v1/notify").json(&body);
        match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    };
    error_of(post(None).send().await?, StatusCode::UNAUTHORIZED).await?;
    error_of(
        post(Some("hk_not-a-key")).send().await?,
        StatusCode::UNAUTHORIZED,
    )
    .await?;
    let user_token = herald.token("u1");
    let error = error_of(
        post(Some(&user_token)).send().await?,
        StatusCode::UNAUTHORIZED,
    )
    .await
    .context("a user token is no API key")?;
    ensure!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("this is a user token")),
        "the mix-up is named: {error}"
    );
    // And the other way round: a producer's key on a user endpoint.
    let error = error_of(
        herald
            .request(Method::GET, "/v1/me/unread")
            .bearer_auth(&notify_only)
            .send()
            .await?,
        StatusCode::UNAUTHORIZED,
    )
    .await?;
    ensure!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("this is an API key")),
        "the mix-up is named: {error}"
    );
    let read = herald.request(Method::GET, "/v1/users/u1/notifications");
    error_of(
        read.bearer_auth(&user_token).send().await?,
        StatusCode::UNAUTHORIZED,
    )
    .await?;

    // A key with only `notify` may notify but not read inboxes.
    herald_tests::herald::accepted(post(Some(&notify_only)).send().await?).await?;
    let read = herald.request(Method::GET, "/v1/users/u1/notifications");
    let error = error_of(
        read.bearer_auth(&notify_only).send().await?,
        StatusCode::FORBIDDEN,
    )
    .await?;
    assert_eq!(error["code"], "forbidden");
    assert_eq!(
        herald.inbox("u1").await?.len(),
        1,
        "only the notify-scoped send was stored"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_user_tokens_get_401_on_every_user_path() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let hs256 = |claims: Value, secret: &[u8]| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
    };
    let expired = hs256(
        json!({"sub": "alice", "exp": now() - 3600}),
        herald.jwt_secret(),
    )?;
    let forged = hs256(
        json!({"sub": "alice", "exp": now() + 3600}),
        b"some other secret",
    )?;
    let no_exp = hs256(json!({"sub": "alice"}), herald.jwt_secret())?;
    // {"alg":"none"} . {"sub":"alice","exp":9999999999} . (no signature)
    let alg_none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.".to_string();
    // {"alg":"HS256","typ":"JWT"} with the same claims and an empty signature.
    let unsigned =
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0."
            .to_string();
    let bad = [
        ("expired", expired),
        ("forged", forged),
        ("without exp", no_exp),
        ("alg none", alg_none),
        ("unsigned", unsigned),
        ("garbage", "garbage".to_string()),
        ("dots", "a.b.c".to_string()),
    ];
    let good = herald.token("alice");
    for (what, token) in bad
        .iter()
        .map(|(w, t)| (*w, t.as_str()))
        .chain([("valid", good.as_str())])
    {
        let want = if what == "valid" {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        for path in ["/v1/me/notifications", "/v1/me/unread"] {
            let response = herald
                .request(Method::GET, path)
                .bearer_auth(token)
                .send()
                .await?;
            if want == StatusCode::OK {
                ensure!(
                    response.status() == StatusCode::OK,
                    "{what} on {path}: {}",
                    response.status()
                );
            } else {
                error_of(response, want)
                    .await
                    .with_context(|| format!("{what} token on {path}"))?;
            }
        }
        let sse = herald
            .request(Method::GET, "/v1/sse")
            .bearer_auth(token)
            .send()
            .await?;
        ensure!(
            sse.status() == want,
            "{what} token on /v1/sse: {}",
            sse.status()
        );
        let header_status = WsClient::upgrade_status(&herald.ws_url("/v1/ws"), Some(token)).await?;
        let query_status = WsClient::upgrade_status(
            &herald.ws_url(&format!(
                "/v1/ws?access_token={}",
                herald_tests::encode(token)
            )),
            None,
        )
        .await?;
        let want_ws = (want != StatusCode::OK).then_some(StatusCode::UNAUTHORIZED.as_u16());
        let as_u16 =
            |s: Option<tokio_tungstenite::tungstenite::http::StatusCode>| s.map(|s| s.as_u16());
        assert_eq!(
            as_u16(header_status),
            want_ws,
            "{what} token on the WebSocket upgrade (header)"
        );
        assert_eq!(
            as_u16(query_status),
            want_ws,
            "{what} token on the WebSocket upgrade (access_token)"
        );
    }
    // No credentials at all.
    error_of(
        herald
            .request(Method::GET, "/v1/me/notifications")
            .send()
            .await?,
        StatusCode::UNAUTHORIZED,
    )
    .await?;
    let status = WsClient::upgrade_status(&herald.ws_url("/v1/ws"), None).await?;
    assert_eq!(status.map(|s| s.as_u16()), Some(401));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_over_its_rate_gets_429_with_retry_after() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .rates(herald_api::RateConfig {
            default_per_s: std::num::NonZeroU32::new(1),
            per_producer: Default::default(),
        })
        .start()
        .await?;
    // One per second: back-to-back sends hit the limit within a few tries.
    let mut throttled = None;
    for i in 0..5 {
        let response = herald
            .notify(&json!({"user_id": "yara", "title": format!("n{i}")}))
            .await?;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            throttled = Some(response);
            break;
        }
        ensure!(
            response.status() == StatusCode::ACCEPTED,
            "send {i}: {}",
            response.status()
        );
    }
    let response = throttled.context("no 429 in five back-to-back sends at 1/s")?;
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .context("429 without Retry-After")?
        .to_str()?
        .parse()?;
    ensure!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let error = error_of(response, StatusCode::TOO_MANY_REQUESTS).await?;
    ensure!(error["code"] == "rate_limited", "{error}");
    // A batch larger than the bucket can ever hold is refused as a whole, as a client
    // error: no Retry-After would ever let it through.
    let batch = herald
        .producer(Method::POST, "/v1/notify/batch")
        .json(&json!({"notifications": [{"user_id": "yara", "title": "a"}, {"user_id": "yara", "title": "b"}]}))
        .send()
        .await?;
    ensure!(!batch.headers().contains_key("retry-after"));
    let error = error_of(batch, StatusCode::BAD_REQUEST).await?;
    ensure!(error["field"] == "notifications", "{error}");
    Ok(())
}

/// Answers that come from outside Herald's handlers — axum's rejections, an unknown route,
/// a wrong method, a WebSocket request that is not an upgrade — have the contract's JSON
/// error body too, with their status and headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_from_outside_the_handlers_are_json_errors() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;

    let unknown = herald
        .producer(Method::GET, "/v1/nothing-here")
        .send()
        .await?;
    assert_eq!(
        error_of(unknown, StatusCode::NOT_FOUND).await?["code"],
        "not_found"
    );

    let wrong_method = herald.producer(Method::DELETE, "/v1/notify").send().await?;
    ensure!(
        wrong_method.headers().contains_key("allow"),
        "405 keeps its Allow header"
    );
    let error = error_of(wrong_method, StatusCode::METHOD_NOT_ALLOWED).await?;
    assert_eq!(error["code"], "method_not_allowed");

    // A path segment that is not UTF-8 once decoded: axum's own rejection.
    let bad_segment = herald
        .producer(Method::GET, "/v1/users/%FF%FE/preferences")
        .send()
        .await?;
    let error = error_of(bad_segment, StatusCode::BAD_REQUEST).await?;
    assert_eq!(error["code"], "bad_request");

    // A WebSocket request without the upgrade headers.
    let not_an_upgrade = herald
        .request(Method::GET, "/v1/ws")
        .bearer_auth(herald.token("ann"))
        .send()
        .await?;
    let status = not_an_upgrade.status();
    ensure!(status.is_client_error(), "{status}");
    error_of(not_an_upgrade, status).await?;
    Ok(())
}

/// A session never outlives its token: a WebSocket is closed with 4001 when the token it
/// was opened with expires (its `exp` plus the 30 s clock leeway verification allows), an
/// SSE stream ends then, and both resume with a fresh token losing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_when_their_token_expires() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    // Expired 28 s ago: still accepted within the leeway, for 2 s more.
    let short = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "tess", "exp": now() - 28}),
        &EncodingKey::from_secret(herald.jwt_secret()),
    )?;
    let first = herald.send("tess", "before").await?;
    let mut ws = WsClient::connect(&herald.ws_url("/v1/ws?after=0"), Some(&short)).await?;
    ws.hello().await?;
    assert_eq!(ws.take(1).await?[0]["seq"], first.seq);
    let mut sse = herald_tests::SseClient::open(
        herald
            .request(Method::GET, "/v1/sse?after=0")
            .bearer_auth(&short),
    )
    .await?;
    assert_eq!(sse.next_notification().await?["seq"], first.seq);
    assert_eq!(
        ws.closed_with().await?,
        4001,
        "closed when the token expired"
    );
    let ended = loop {
        match sse.next_event().await {
            Ok(_) => continue,
            Err(e) => break e.to_string(),
        }
    };
    ensure!(ended.contains("ended"), "the SSE stream ended: {ended}");
    // The same token is refused now; a fresh one resumes where the session stopped.
    let r = herald
        .request(Method::GET, "/v1/me/notifications")
        .bearer_auth(&short)
        .send()
        .await?;
    ensure!(r.status() == StatusCode::UNAUTHORIZED, "{}", r.status());
    let second = herald.send("tess", "after").await?;
    let mut again = herald
        .ws("tess", herald_tests::Resume::After(first.seq))
        .await?;
    again.hello().await?;
    assert_eq!(again.take(1).await?[0]["seq"], second.seq);
    Ok(())
}
