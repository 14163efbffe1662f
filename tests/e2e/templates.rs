//! Templates: rendered at acceptance in the recipient's locale, a 400 naming the missing
//! variable (never a half-rendered message), and reloadable while serving.

use anyhow::{Context as _, ensure};
use herald_tests::{Herald, Nats};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SHIPPED: &str = r#"
[default]
title = "Your order {{ order }} shipped"
body = "It arrives {{ eta }}."
push.title = "Shipped: {{ order }}"
email.html = "<p>Order <b>{{ order }}</b></p>"

[de]
title = "Bestellung {{ order }} ist unterwegs"
"#;

async fn field_of_400(response: reqwest::Response) -> anyhow::Result<(String, String)> {
    let status = response.status();
    let body: Value = response.json().await?;
    ensure!(
        status == StatusCode::BAD_REQUEST,
        "expected 400, got {status}: {body}"
    );
    Ok((
        body["error"]["field"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_render_in_the_users_locale_and_name_missing_variables() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("order_shipped.toml"), SHIPPED)?;
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .templates(herald_templates::Templates::load(dir.path())?)
        .start()
        .await?;

    let vars = json!({"order": 42, "eta": "Monday"});
    herald
        .accept(&json!({"user_id": "vic", "template": "order_shipped", "vars": vars}))
        .await?;
    let r = herald
        .user(Method::PUT, "/v1/me/preferences", "wim")
        .json(&json!({"locale": "de-DE"}))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::OK, "PUT locale: {}", r.status());
    herald
        .accept(&json!({"user_id": "wim", "template": "order_shipped", "vars": vars}))
        .await?;
    let en = herald.inbox("vic").await?;
    ensure!(
        en[0]["title"] == "Your order 42 shipped" && en[0]["body"] == "It arrives Monday.",
        "{en:?}"
    );
    let de = herald.inbox("wim").await?;
    ensure!(
        de[0]["title"] == "Bestellung 42 ist unterwegs",
        "German title: {de:?}"
    );
    ensure!(
        de[0]["body"] == "It arrives Monday.",
        "body falls back to default: {de:?}"
    );

    let (field, message) = field_of_400(
        herald
            .notify(&json!({"user_id": "vic", "template": "order_shipped", "vars": {"order": 1}}))
            .await?,
    )
    .await?;
    ensure!(
        field == "vars.eta",
        "missing variable named: {field} {message}"
    );
    let (field, _) = field_of_400(
        herald
            .notify(&json!({"user_id": "vic", "template": "nope", "vars": {}}))
            .await?,
    )
    .await?;
    ensure!(field == "template", "unknown template: {field}");
    ensure!(
        herald.inbox("vic").await?.len() == 1,
        "nothing half-rendered was stored"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_reload_and_a_broken_folder_keeps_the_old_ones() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("order_shipped.toml"), SHIPPED)?;
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .templates(herald_templates::Templates::load(dir.path())?)
        .start()
        .await?;
    let reload = || {
        herald
            .producer(Method::POST, "/v1/admin/templates/reload")
            .send()
    };

    std::fs::write(
        dir.path().join("welcome.toml"),
        "[default]\ntitle = \"Welcome, {{ name }}\"\n",
    )?;
    let ok: Value = reload().await?.json().await?;
    ensure!(
        ok["templates"] == json!(["order_shipped", "welcome"]),
        "reloaded: {ok}"
    );
    herald
        .accept(&json!({"user_id": "xia", "template": "welcome", "vars": {"name": "Xia"}}))
        .await?;
    ensure!(
        herald.inbox("xia").await?[0]["title"] == "Welcome, Xia",
        "new template used"
    );

    std::fs::write(
        dir.path().join("broken.toml"),
        "[default]\ntitle = \"{% if %}\"\n",
    )?;
    let broken = reload().await?;
    let status = broken.status();
    let body: Value = broken.json().await?;
    ensure!(
        status == StatusCode::BAD_REQUEST,
        "broken folder: {status} {body}"
    );
    let message = body["error"]["message"].as_str().context("message")?;
    ensure!(message.contains("broken.toml"), "names the file: {message}");
    herald
        .accept(&json!({"user_id": "xia", "template": "welcome", "vars": {"name": "Xia"}}))
        .await?;
    let listed: Value = herald
        .producer(Method::GET, "/v1/admin/templates")
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        listed["templates"] == json!(["order_shipped", "welcome"]),
        "old set kept: {listed}"
    );
    Ok(())
}
