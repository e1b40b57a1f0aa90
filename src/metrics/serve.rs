//! `GET /metrics` on its own TCP listener (`--metrics-addr`), apart from the API socket: a
//! monitoring system reaches it over the network, and it must never give access to the API.
//! It has no authentication: bind it to an address only the monitoring system reaches
//! (docs/metrics.md).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

/// OpenMetrics text, which prometheus-client encodes and Prometheus scrapes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the metrics listener. Called before the daemon registers, so that a taken port or
/// an address not on this host stops the start-up with a clear error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { scrape(&registry) }
            }),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "vxnet serves only GET /metrics here\n",
            )
        })
}

fn scrape(registry: &Registry) -> axum::response::Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        // Writing into a String fails only if a series' own encoding does.
        Err(e) => {
            tracing::warn!(error = %e, "encoding the metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding the metrics failed; see the daemon's log\n",
            )
                .into_response()
        }
    }
}

/// Serves scrapes until the task is aborted.
pub fn spawn(
    listener: tokio::net::TcpListener,
    registry: Registry,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let app = router(Arc::new(registry));
    tokio::spawn(async move { axum::serve(listener, app).await })
}
