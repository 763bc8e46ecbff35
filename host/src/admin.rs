//! The admin HTTP endpoint: `GET /healthz`, `GET /metrics`, `POST /publish/{subject}`,
//! `POST /reload`.
//!
//! Bind it to loopback (the default in the sample manifest): `/publish` injects events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Broker, Outgoing};
use crate::limits;
use crate::metrics::Metrics;
use crate::reload::{Cause, Reloader};
use crate::subject::check_subject;

#[derive(Clone)]
pub struct AdminState {
    pub ready: Arc<AtomicBool>,
    pub broker: Broker,
    pub metrics: Arc<Metrics>,
    pub reloader: Reloader,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/publish/{subject}", post(publish))
        .route("/reload", post(reload))
        // Room for the largest payload plus some slack; bigger bodies get 413.
        .layer(DefaultBodyLimit::max(limits::MAX_PUBLISH_PAYLOAD + 1024))
        .with_state(state)
}

/// Serve until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

async fn healthz(State(state): State<AdminState>) -> Response {
    if !state.ready.load(Ordering::Acquire) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: subscriptions not confirmed yet\n",
        )
            .into_response()
    } else if !state.broker.is_connected() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "broker disconnected; reconnecting\n",
        )
            .into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Publish the request body on `subject`. Event headers come from repeated
/// `?header=name:value` query parameters.
async fn publish(
    State(state): State<AdminState>,
    Path(subject): Path<String>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    if let Err(e) = check_subject(&subject) {
        return bad_request(format!("invalid subject {subject:?}: {e}"));
    }
    let mut headers = Vec::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if key != "header" {
            return bad_request(format!(
                "unknown query parameter {key:?}; use header=name:value"
            ));
        }
        let Some((name, value)) = value.split_once(':') else {
            return bad_request(format!("header {value:?} must be written name:value"));
        };
        if let Err(e) = broker::validate_header(name, value) {
            return bad_request(e.to_string());
        }
        headers.push((name.to_string(), value.to_string()));
    }
    if body.len() > state.broker.max_payload() {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "payload is larger than {} bytes\n",
                state.broker.max_payload()
            ),
        )
            .into_response();
    }
    let delivered = match &state.broker {
        Broker::Memory(b) => b.publish(&subject, None, &headers, body).await.map(Some),
        Broker::Nats(b) => {
            let message = Outgoing::new(subject.clone(), body).with_headers(headers);
            b.publish(message).await.map(|()| None)
        }
    };
    match delivered {
        Ok(delivered) => (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({ "subject": subject, "delivered": delivered })),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

/// Reload the manifest now and answer with the report: 200 when everything applied, 422
/// when something was refused (the body says what and why).
async fn reload(State(state): State<AdminState>) -> Response {
    match state.reloader.reload(Cause::AdminRequest).await {
        Some(report) => {
            let status = if report.is_ok() {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            (status, axum::Json(report)).into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down; not reloading\n",
        )
            .into_response(),
    }
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response()
}
