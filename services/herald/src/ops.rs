//! Ops endpoints: `/healthz` (the process runs), `/readyz` (NATS is connected),
//! `/metrics` (Prometheus text), `/openapi.json` (the HTTP contract).

use axum::Json;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide metrics recorder, installed on first use.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .as_ref()
}

/// The ops routes.
pub fn routes(nats: herald_store::Nats) -> Router {
    let _ = prometheus();
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
