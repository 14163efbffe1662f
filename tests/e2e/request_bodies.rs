//! Request bodies: unknown fields and non-object bodies are refused with 400 naming the
//! field.

use anyhow::{Context as _, ensure};
use herald_tests::{Herald, Nats};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

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
