//! `/openapi.json` documents what the API answers: the delivery-status read, and 429 with
//! `Retry-After` on every rate-limited producer operation.

use anyhow::{Context as _, ensure};
use herald_tests::{Herald, Nats};
use reqwest::Method;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_documents_status_reads_and_rate_limits() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let doc: Value = herald
        .request(Method::GET, "/openapi.json")
        .send()
        .await?
        .json()
        .await?;
    let status = &doc["paths"]["/v1/notifications/{id}"]["get"];
    ensure!(status["operationId"] == "deliveryStatus", "{status}");
    for code in ["200", "404"] {
        ensure!(status["responses"][code].is_object(), "{code}: {status}");
    }
    ensure!(
        doc["paths"]["/v1/notifications/{id}"]["delete"]["operationId"] == "cancelScheduled",
        "cancelling stays documented"
    );
    let resolve = |response: &Value| -> Value {
        match response["$ref"].as_str() {
            Some(r) => {
                let name = r.rsplit('/').next().unwrap_or_default();
                doc["components"]["responses"][name].clone()
            }
            None => response.clone(),
        }
    };
    for path in [
        "/v1/notify",
        "/v1/notify/batch",
        "/v1/topics/{topic}/publish",
    ] {
        let limited = resolve(&doc["paths"][path]["post"]["responses"]["429"]);
        ensure!(
            limited["headers"]["Retry-After"].is_object(),
            "{path}: 429 with Retry-After: {limited}"
        );
    }
    let batch = doc["paths"]["/v1/notify/batch"]["post"]["description"]
        .as_str()
        .context("batch description")?;
    ensure!(
        !batch.contains("A store failure while sending answers 503 for the whole batch"),
        "a failure while sending fails only its items: {batch}"
    );
    ensure!(batch.contains("retryable"), "{batch}");
    Ok(())
}
