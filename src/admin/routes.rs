//! The admin endpoints, their bearer-token check and their deadline.
//!
//! Handlers that read the spool do it on a blocking thread: a read may wait for a reopen after
//! an I/O error (invariant 9), which must not hold a runtime worker.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::status::{QueueStatus, Status};
use super::AdminState;
use crate::metrics::{metrics, SpoolGauges};
use crate::spool::{DeadKind, Spool, SpoolError};
use crate::view::{dead_letter_export, record_events, DeadLetterRow, RecordRow};

/// Most records one `/api/records` page returns.
pub const MAX_RECORDS_PAGE: usize = 10_000;
/// Records a page returns when `limit` is not given.
const DEFAULT_RECORDS_PAGE: usize = 100;

type Shared = State<Arc<AdminState>>;

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/retry", post(retry))
        .route("/api/status", get(status))
        .route("/api/records", get(records))
        .route("/api/records/{key}", get(record))
        .route("/api/dead-letters", get(dead_letters))
        .route("/api/dead-letters/export", get(dead_letters_export))
        .route("/api/dead-letters/requeue", post(requeue))
        .route("/api/dead-letters/purge", post(purge))
        .route("/api/upgrade", post(upgrade))
        .route("/api/reload", post(reload))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(state.clone(), deadline))
        .with_state(state)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

fn json_error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

fn ndjson(lines: Vec<serde_json::Value>) -> Response {
    let mut body = String::new();
    for line in lines {
        body.push_str(&line.to_string());
        body.push('\n');
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response()
}

/// Run `read` on a blocking thread; a spool error becomes 503.
async fn blocking<T: Send + 'static>(
    spool: &Spool,
    read: impl FnOnce(&Spool) -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, Response> {
    let spool = spool.clone();
    match tokio::task::spawn_blocking(move || read(&spool)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(json_error(StatusCode::SERVICE_UNAVAILABLE, e)),
        Err(e) => Err(json_error(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

/// `admin.request_timeout` as in force when the request came.
async fn deadline(State(state): Shared, request: Request, next: Next) -> Response {
    let timeout = state.settings.current().request_timeout.0;
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no answer within admin.request_timeout ({timeout:?})\n"),
        ),
    }
}

/// Equal without telling by its timing how much of it matched.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

async fn authorize(State(state): Shared, request: Request, next: Next) -> Response {
    let settings = state.settings.current();
    let Some(token) = &settings.token else {
        return next.run(request).await;
    };
    let path = request.uri().path().to_string();
    // Probes stay simple for load balancers; they tell nothing an attacker could use.
    if path == "/health" || path == "/ready" {
        return next.run(request).await;
    }
    let given = bearer(request.headers());
    if given.is_some_and(|g| same_token(g.as_bytes(), token.expose().as_bytes())) {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    tracing::warn!(%peer, %path, reason = if given.is_some() { "wrong token" } else { "no token" },
        "admin request refused: it needs `Authorization: Bearer <admin.token>`");
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "admin.token required: send `Authorization: Bearer <token>`\n",
    )
        .into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "not found\n")
}

async fn metrics_text(State(state): Shared) -> Response {
    let spool = state.spool.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        let stats = spool.stats();
        let oldest = spool.oldest_received_ms();
        metrics()
            .destinations
            .set_queued(&spool.queued_by_destination());
        metrics().set_spool(SpoolGauges {
            records: stats.records,
            bytes: stats.bytes,
            max_bytes: stats.max_bytes,
            dead_letter_bytes: stats.dead_letter_bytes,
            commits: stats.commits,
            oldest_age_seconds: oldest
                .map(|ms| crate::clock::now_ms().saturating_sub(ms) as f64 / 1000.0)
                .unwrap_or(0.0),
        });
        metrics().render()
    })
    .await;
    match rendered {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

async fn health(State(state): Shared) -> Response {
    if state.spool.stats().available {
        text(StatusCode::OK, "ok\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "spool unavailable: it cannot be opened again after an I/O error\n",
        )
    }
}

async fn ready(State(state): Shared) -> Response {
    let stats = state.spool.stats();
    let why_not = if !stats.available {
        Some("spool unavailable")
    } else if !state.accepting.load(Ordering::Acquire) {
        Some("not accepting")
    } else if stats.disk_full {
        Some("spool disk full")
    } else if stats.full {
        Some("spool full")
    } else {
        None
    };
    match why_not {
        Some(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        None => text(StatusCode::OK, "ready\n"),
    }
}

async fn retry(State(state): Shared) -> Response {
    let mut count = state.dispatcher.retry_now().await;
    for (_, pipeline) in state.router.iter().flat_map(|r| r.all()) {
        count += pipeline.dispatcher.retry_now().await;
    }
    text(
        StatusCode::OK,
        format!("{count} record(s) waiting for a retry are sent now\n"),
    )
}

/// Re-read the config file, as SIGHUP does: 200 with what changed; 422 (the file does not
/// validate, or something it names cannot be built) or 409 (a change needs a restart) with
/// the key and why. Either way the outcome is in `/api/status`.
async fn reload(State(state): Shared) -> Response {
    let outcome = state
        .reloader
        .reload(crate::lifecycle::reload::Trigger::Api)
        .await;
    let code = match &outcome {
        Ok(_) => StatusCode::OK,
        Err(e) if e.needs_restart() => StatusCode::CONFLICT,
        Err(_) => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let body = match outcome {
        Ok(applied) => json!({
            "config": state.reloader.path().display().to_string(),
            "changed": applied.changed,
        }),
        Err(e) => json!({
            "config": state.reloader.path().display().to_string(),
            "error": e.to_string(),
            "key": e.key(),
        }),
    };
    (code, Json(body)).into_response()
}

async fn status(State(state): Shared) -> Response {
    let mut queue = QueueStatus {
        in_flight: 0,
        waiting_retry: 0,
        buffered: 0,
    };
    let routed = state.router.iter().flat_map(|r| r.all());
    let dispatchers =
        std::iter::once(state.dispatcher.clone()).chain(routed.map(|(_, p)| p.dispatcher.clone()));
    for dispatcher in dispatchers {
        let audit = dispatcher.audit().await;
        queue.in_flight += audit.in_flight.len() as u64;
        queue.waiting_retry += audit.retrying.len() as u64;
        queue.buffered += audit.buffered.len() as u64;
    }
    let reader = state.clone();
    match tokio::task::spawn_blocking(move || Status::read(&reader, queue)).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Ask the supervisor for an upgrade; it answers in the worker it starts (or, if it fails, in
/// this one's `lifecycle.last_notice`): `ackgate upgrade` watches `/api/status` for either.
async fn upgrade(State(state): Shared) -> Response {
    if state.lifecycle.supervisor_pid.is_none() {
        return json_error(
            StatusCode::CONFLICT,
            "no supervisor: this relay was not started by `ackgate run`",
        );
    }
    crate::lifecycle::notify::request_upgrade();
    (
        StatusCode::ACCEPTED,
        Json(json!({
            "requested": true,
            "worker_pid": state.lifecycle.worker_pid,
            "worker_started_ms": state.lifecycle.started_ms,
        })),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct RecordsQuery {
    from: Option<u64>,
    limit: Option<usize>,
}

async fn records(State(state): Shared, Query(query): Query<RecordsQuery>) -> Response {
    let from = query.from.unwrap_or(1);
    let limit = query
        .limit
        .unwrap_or(DEFAULT_RECORDS_PAGE)
        .clamp(1, MAX_RECORDS_PAGE);
    // One more than asked, to tell whether there is a next page.
    let batch = blocking(&state.spool, move |s| {
        s.read_from(from, limit + 1, usize::MAX)
    })
    .await;
    let batch = match batch {
        Ok(batch) => batch,
        Err(response) => return response,
    };
    let mut rows: Vec<RecordRow> = batch.records.iter().map(RecordRow::of).collect();
    rows.extend(batch.damaged.iter().map(RecordRow::damaged));
    rows.sort_by_key(|r| r.key);
    let next_from = (rows.len() > limit).then(|| rows[limit].key);
    rows.truncate(limit);
    Json(json!({ "records": rows, "next_from": next_from })).into_response()
}

async fn record(State(state): Shared, Path(key): Path<u64>) -> Response {
    match blocking(&state.spool, move |s| s.read(key)).await {
        Ok(Some(Ok(record))) => ndjson(record_events(&record)),
        Ok(Some(Err(damaged))) => json_error(
            StatusCode::CONFLICT,
            format!("record {key} does not decode: {}", damaged.error),
        ),
        Ok(None) => json_error(
            StatusCode::NOT_FOUND,
            format!("no record {key} in the spool"),
        ),
        Err(response) => response,
    }
}

async fn dead_letters(State(state): Shared) -> Response {
    match blocking(&state.spool, |s| s.dead_letters(0, usize::MAX)).await {
        Ok(all) => {
            let rows: Vec<DeadLetterRow> = all.iter().map(DeadLetterRow::of).collect();
            Json(json!({ "dead_letters": rows })).into_response()
        }
        Err(response) => response,
    }
}

async fn dead_letters_export(State(state): Shared) -> Response {
    match blocking(&state.spool, |s| s.dead_letters(0, usize::MAX)).await {
        Ok(all) => ndjson(all.iter().map(dead_letter_export).collect()),
        Err(response) => response,
    }
}

#[derive(Debug, Deserialize)]
struct RequeueQuery {
    id: Option<u64>,
    all: Option<bool>,
}

async fn requeue(State(state): Shared, Query(query): Query<RequeueQuery>) -> Response {
    let ids: Vec<u64> = match (query.id, query.all.unwrap_or(false)) {
        (Some(id), _) => vec![id],
        (None, true) => match blocking(&state.spool, |s| s.dead_letters(0, usize::MAX)).await {
            Ok(all) => all
                .iter()
                .filter(|d| d.kind == DeadKind::Record)
                .map(|d| d.id)
                .collect(),
            Err(response) => return response,
        },
        (None, false) => {
            return json_error(StatusCode::BAD_REQUEST, "give ?id=N or ?all=true");
        }
    };
    let mut requeued = Vec::new();
    for id in ids {
        match state.spool.requeue_dead(id).await {
            Ok(Ok(Some(key))) => requeued.push(json!({ "id": id, "key": key })),
            Ok(Ok(None)) => {
                return json_error(StatusCode::NOT_FOUND, format!("no dead letter {id}"));
            }
            Ok(Err(e)) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e),
            Err(_) => return json_error(StatusCode::SERVICE_UNAVAILABLE, SpoolError::Closed),
        }
    }
    Json(json!({ "requeued": requeued })).into_response()
}

#[derive(Debug, Deserialize)]
struct PurgeQuery {
    confirm: Option<String>,
}

async fn purge(State(state): Shared, Query(query): Query<PurgeQuery>) -> Response {
    if query.confirm.as_deref() != Some("yes") {
        return json_error(
            StatusCode::BAD_REQUEST,
            "purging deletes every dead letter for good: add ?confirm=yes",
        );
    }
    match state.spool.purge_dead().await {
        Ok(Ok(purged)) => Json(json!({ "purged": purged })).into_response(),
        Ok(Err(e)) => json_error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(_) => json_error(StatusCode::SERVICE_UNAVAILABLE, SpoolError::Closed),
    }
}
