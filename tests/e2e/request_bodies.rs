//! Request bodies: unknown fields and non-object bodies are refused with 400 naming the
//! field, and a body that cannot be read is a 400, not "too large".

use anyhow::{Context as _, ensure};
use herald_tests::{Herald, Nats};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The `error` object of a JSON error answer with `status`.
async fn error_of(response: reqwest::Response, status: StatusCode) -> anyhow::Result<Value> {
    let got = response.status();
    let text = response.text().await?;
    ensure!(got == status, "expected {status}, got {got}: {text}");
    let body: Value = serde_json::from_str(&text).with_context(|| format!("{text:?}"))?;
    Ok(body["error"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_and_non_objects_are_refused_naming_them() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    // Typos of real fields: each once quietly gave an inbox-only, normal, immediate 202.
    for (typo, value) in [
        ("priorty", json!("high")),
        ("channel", json!(["sms"])),
        ("sendAt", json!("2030-01-01T00:00:00Z")),
    ] {
        let mut body = json!({"user_id": "hal", "title": "OTP 1234"});
        body[typo] = value;
        let error = error_of(herald.notify(&body).await?, StatusCode::BAD_REQUEST).await?;
        ensure!(error.to_string().contains(typo), "{typo}: {error}");
        // In a batch, the item is refused the same way; the batch's other items go.
        let answer: Value = herald
            .producer(Method::POST, "/v1/notify/batch")
            .json(&json!({"notifications": [body, {"user_id": "hal", "title": "ok"}]}))
            .send()
            .await?
            .json()
            .await?;
        ensure!(answer["accepted"] == 1, "{typo}: {answer}");
        ensure!(
            answer.to_string().contains(typo),
            "{typo}: the item's error names it: {answer}"
        );
        // A topic publish is a notify body too.
        let mut publish = json!({"title": "news"});
        publish[typo] = json!(1);
        let response = herald
            .producer(Method::POST, "/v1/topics/news/publish")
            .json(&publish)
            .send()
            .await?;
        let error = error_of(response, StatusCode::BAD_REQUEST).await?;
        ensure!(error.to_string().contains(typo), "{typo}: {error}");
    }
    ensure!(
        herald.inbox("hal").await?.len() == 3,
        "only the batches' valid items were stored"
    );

    // The batch body and the read body: objects only, known fields only.
    let token = herald.token("hal");
    for (path, raw, needle) in [
        (
            "/v1/notify/batch",
            r#"[[{"user_id":"hal","title":"x"}]]"#,
            "body",
        ),
        (
            "/v1/notify/batch",
            r#"{"notifications":[{"user_id":"hal","title":"x"}],"notification":1}"#,
            "notification",
        ),
        ("/v1/me/read", "[7]", "body"),
        ("/v1/me/read", r#"{"up_to":1,"upto":2}"#, "upto"),
    ] {
        let request = match path {
            "/v1/me/read" => herald.request(Method::POST, path).bearer_auth(&token),
            _ => herald.producer(Method::POST, path),
        };
        let response = request
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await?;
        let error = error_of(response, StatusCode::BAD_REQUEST).await?;
        ensure!(error.to_string().contains(needle), "{path} {raw}: {error}");
    }
    ensure!(
        herald.inbox("hal").await?.len() == 3,
        "nothing more was stored"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_cannot_be_read_is_a_400_not_a_413() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let addr = herald.base_url().trim_start_matches("http://").to_owned();
    // Broken chunked encoding: "zz" is no chunk size.
    let mut stream = tokio::net::TcpStream::connect(&addr).await?;
    let request = format!(
        "POST /v1/notify HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n",
        herald.api_key()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    herald_tests::within(
        std::time::Duration::from_secs(10),
        "the answer",
        stream.read_to_end(&mut answer),
    )
    .await??;
    let answer = String::from_utf8_lossy(&answer);
    ensure!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").context("no body")? + 4..];
    ensure!(body.contains(r#""field":"body""#), "{answer}");

    // Over the limit is still a 413.
    let big = json!({"user_id": "u", "title": "t", "data": {"pad": "x".repeat(70 * 1024)}});
    let error = error_of(herald.notify(&big).await?, StatusCode::PAYLOAD_TOO_LARGE).await?;
    ensure!(error["code"] == "payload_too_large", "{error}");
    Ok(())
}
