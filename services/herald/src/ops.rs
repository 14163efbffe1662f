//! Ops endpoints: `/healthz` (the process runs), `/readyz` (NATS is connected),
//! `/metrics` (Prometheus text), `/openapi.json` (the HTTP contract).

use axum::Json;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often the recorder drains recorded histogram samples into its summaries.
const UPKEEP: Duration = Duration::from_secs(5);

/// The process-wide metrics recorder. The first call installs it and starts its upkeep,
/// so call it before anything takes a metric handle: a handle taken before a recorder
/// exists records nowhere, for good.
///
/// The upkeep matters: the recorder keeps every histogram sample until it is drained,
/// and only a scrape or the upkeep drains them — without it a process nobody scrapes
/// grows by every send's latency sample (megabytes a minute for a busy worker). It runs
/// on a thread of its own, so it outlives any one async runtime of the process.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let handle = PrometheusBuilder::new().install_recorder().ok()?;
            let upkept = handle.clone();
            let started = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP);
                        upkept.run_upkeep();
                    }
                });
            if let Err(e) = started {
                tracing::warn!(error = %e, "no metrics upkeep thread; histograms drain only when scraped");
            }
            Some(handle)
        })
        .as_ref()
}

/// The ops routes.
pub fn routes(nats: herald_store::Nats) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/readyz",
            get(move || {
                let connected = nats.is_connected();
                async move {
                    if connected {
                        (StatusCode::OK, Json(serde_json::json!({"status": "ready"})))
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            Json(serde_json::json!({"status": "nats_unreachable"})),
                        )
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                let body = prometheus()
                    .map(PrometheusHandle::render)
                    .unwrap_or_default();
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
            }),
        )
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    include_str!("../assets/openapi.json"),
                )
                    .into_response()
            }),
        )
}
