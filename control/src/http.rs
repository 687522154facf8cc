//! flotilla-control's HTTP surface, first part (docs/adr/0025-http-surface.md):
//! `/healthz` (the process answers), `/readyz` (connected to NATS and the
//! fleet view loaded; says whether this instance acts or follows) and
//! `/metrics` (Prometheus/OpenMetrics text via `prometheus-client`: the
//! [`crate::census`] of the fleet, the daemon's counters, the render pass
//! histogram, compare-and-swap conflicts, NATS reconnects, leadership).
//! Every instance serves it, leader or follower. Read-only: writes stay in
//! the CLI and KV.
//!
//! A bearer token (`--http-token-file`) guards everything but `/healthz`
//! and `/readyz`; an address beyond loopback needs one. Unknown routes get a
//! JSON 404. A port that cannot be bound is logged as an error and the
//! control plane runs on without HTTP: the fleet's work does not depend on it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::census;
use crate::daemon::Metrics;

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Required as `Authorization: Bearer <token>` on everything but the probes.
    pub token: Option<String>,
}

#[derive(Clone)]
struct App {
    metrics: Arc<Metrics>,
    census: census::Shared,
    client: async_nats::Client,
    token: Option<Arc<str>>,
}

/// Binds `config.listen` and serves until `shutdown`; logs the address it
/// listens on (a port 0 becomes the one the kernel chose).
pub async fn serve(
    config: HttpConfig,
    metrics: Arc<Metrics>,
    census: census::Shared,
    client: async_nats::Client,
) {
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(error) => {
            tracing::error!(listen = %config.listen, %error, "cannot listen for HTTP; the API and /metrics are off (the control plane runs on)");
            return;
        }
    };
    let addr = listener.local_addr().map_or(config.listen, |a| a);
    tracing::info!(listen = %addr, auth = if config.token.is_some() { "bearer token" } else { "none" }, "HTTP listening");
    let app = App {
        metrics,
        census,
        client,
        token: config.token.map(Arc::from),
    };
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(app);
    if let Err(error) = axum::serve(listener, router).await {
        tracing::error!(%error, "the HTTP server stopped");
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

/// A 401 when a token is configured and not presented; `None` when the
/// request may go on.
fn refused(app: &App, headers: &HeaderMap) -> Option<Response> {
    let token = app.token.as_ref()?;
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.as_bytes()) => None,
        Some(_) => Some(error(StatusCode::UNAUTHORIZED, "wrong bearer token")),
        None => Some(error(
            StatusCode::UNAUTHORIZED,
            "this server requires 'Authorization: Bearer <token>'",
        )),
    }
}

/// Compares without returning early on the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<App>) -> Response {
    let connected = matches!(
        app.client.connection_state(),
        async_nats::connection::State::Connected
    );
    let loaded = app.metrics.view_loaded();
    let role = if app.metrics.acting() {
        "acting"
    } else {
        "following"
    };
    let body = json!({"ready": connected && loaded, "natsConnected": connected, "fleetViewLoaded": loaded, "role": role});
    let status = if connected && loaded {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error(StatusCode::NOT_FOUND, format!("no route {}", uri.path()))
}

type Labels = Vec<(String, String)>;

fn family(registry: &mut Registry, name: &str, help: &str, values: Vec<(Labels, u64)>) {
    let f = Family::<Labels, Gauge>::default();
    for (labels, n) in values {
        f.get_or_create(&labels)
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    registry.register(name, help, f);
}

fn counter(registry: &mut Registry, name: &str, help: &str, n: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(n);
    registry.register(name, help, c);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, n: i64) {
    let g = Gauge::<i64>::default();
    g.set(n);
    registry.register(name, help, g);
}

/// The registry of one scrape: counters and gauges read now, the census as
/// last counted.
fn registry(app: &App) -> Registry {
    let mut r = Registry::default();
    let census = app.census.read().expect("census lock").clone();
    let one = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
    family(
        &mut r,
        "flotilla_agents",
        "Agents by liveness (heartbeats by server time)",
        census
            .liveness
            .iter()
            .map(|(l, n)| (one("liveness", l), *n))
            .collect(),
    );
    family(
        &mut r,
        "flotilla_agents_by_state",
        "Agents by convergence state on their desired generation",
        census
            .states
            .iter()
            .map(|(s, n)| (one("state", s), *n))
            .collect(),
    );
    family(
        &mut r,
        "flotilla_resources_failing",
        "Failed resources by kind and reason",
        census
            .failing
            .iter()
            .map(|((k, reason), n)| {
                (
                    vec![
                        ("kind".to_owned(), k.clone()),
                        ("reason".to_owned(), reason.clone()),
                    ],
                    *n,
                )
            })
            .collect(),
    );
    family(
        &mut r,
        "flotilla_manifests_rejected",
        "Agents whose last manifest was rejected, by reason",
        census
            .rejected
            .iter()
            .map(|(reason, n)| (one("reason", reason), *n))
            .collect(),
    );
    family(
        &mut r,
        "flotilla_deployments",
        "Deployments by rollout phase (None: no staged rollout)",
        census
            .deployments
            .iter()
            .map(|(p, n)| (one("phase", p), *n))
            .collect(),
    );
    let age = census
        .at
        .and_then(|t| t.elapsed().ok())
        .map_or(-1, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    gauge(
        &mut r,
        "flotilla_census_age_seconds",
        "Seconds since the fleet was last counted (-1: not yet)",
        age,
    );
    let m = &app.metrics;
    counter(
        &mut r,
        "flotilla_control_passes",
        "Reconcile passes run",
        m.passes(),
    );
    counter(
        &mut r,
        "flotilla_control_manifests_written",
        "Desired-state values written",
        m.manifests_written(),
    );
    counter(
        &mut r,
        "flotilla_control_statuses_written",
        "Deployment-status values written",
        m.statuses_written(),
    );
    counter(
        &mut r,
        "flotilla_control_kv_conflicts",
        "Compare-and-swap writes that lost to another writer and were retried on fresh state",
        crate::publish::CAS_CONFLICTS.load(Ordering::Relaxed),
    );
    counter(
        &mut r,
        "flotilla_control_nats_reconnects",
        "Reconnections to NATS after the first connection",
        app.client
            .statistics()
            .connects
            .load(Ordering::Relaxed)
            .saturating_sub(1),
    );
    gauge(
        &mut r,
        "flotilla_control_acting",
        "1 while this instance holds the control lease and acts, 0 while it follows",
        i64::from(m.acting()),
    );
    r.register(
        "flotilla_control_pass_seconds",
        "Duration of reconcile passes",
        m.pass_seconds().clone(),
    );
    r
}

async fn metrics_text(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(denied) = refused(&app, &headers) {
        return denied;
    }
    let mut text = String::new();
    if let Err(e) = encode(&mut text, &registry(&app)) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
