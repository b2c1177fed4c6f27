//! Prometheus metrics: request counts and latency histograms per endpoint (the route template,
//! never the raw path, to keep cardinality bounded), and database pool gauges.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::state::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub method: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    push_deliveries: Family<OutcomeLabels, Counter>,
    latency: Family<EndpointLabels, Histogram>,
    db_connections: Gauge,
    db_idle: Gauge,
    cluster_instances: Gauge,
    leases: Family<LeaseLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    pub lease: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("parvis");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
        });
        let db_connections = Gauge::default();
        let db_idle = Gauge::default();
        let push_deliveries = Family::<OutcomeLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests handled", requests.clone());
        registry.register("http_request_duration_seconds", "HTTP request latency", latency.clone());
        registry.register("db_pool_connections", "Open database connections", db_connections.clone());
        registry.register("db_pool_idle_connections", "Idle database connections", db_idle.clone());
        registry.register(
            "push_deliveries",
            "Push gateway deliveries by outcome (delivered, rejected, refused, failed) and retried attempts",
            push_deliveries.clone(),
        );
        let cluster_instances = Gauge::default();
        let leases = Family::<LeaseLabels, Gauge>::default();
        registry.register(
            "cluster_instances",
            "Live instances on this database, this one included",
            cluster_instances.clone(),
        );
        registry.register(
            "leases_held",
            "Singleton duties whose lease this instance holds (1) or not (0)",
            leases.clone(),
        );
        Self { registry, requests, push_deliveries, latency, db_connections, db_idle, cluster_instances, leases }
    }

    /// Counts a push delivery outcome (see `push::gateway::Outcome`) or a retried attempt.
    pub fn push_delivery(&self, outcome: &str) {
        self.push_deliveries.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() }).inc();
    }

    pub fn set_cluster_instances(&self, n: i64) {
        self.cluster_instances.set(n);
    }

    pub fn lease_held(&self, lease: &str, held: bool) {
        self.leases.get_or_create(&LeaseLabels { lease: lease.to_owned() }).set(i64::from(held));
    }

    /// The text exposition, with the pool gauges refreshed.
    pub fn render(&self, pool: &sqlx::PgPool) -> String {
        self.db_connections.set(pool.size() as i64);
        self.db_idle.set(pool.num_idle() as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// Middleware recording every request.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().as_str().to_owned();
    let endpoint =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".to_owned());
    let resp = next.run(req).await;
    let m = &state.metrics;
    m.latency
        .get_or_create(&EndpointLabels { method: method.clone(), endpoint: endpoint.clone() })
        .observe(start.elapsed().as_secs_f64());
    m.requests.get_or_create(&RequestLabels { method, endpoint, status: resp.status().as_u16() }).inc();
    resp
}
