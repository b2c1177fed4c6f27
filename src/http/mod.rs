//! The HTTP edge: extractors, CORS, request spans, metrics, rate limits, error fallbacks.

pub mod extract;
pub mod metrics;
pub mod ratelimit;
pub mod ssrf;
pub mod web;

use std::any::Any;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, Method, Request, Response, header};
use axum::response::IntoResponse;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{Any as CorsAny, CorsLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::error::Error;
use crate::state::AppState;

/// Unknown endpoints: 404 `M_UNRECOGNIZED`.
pub async fn not_found() -> Error {
    Error::unrecognized("Unrecognized request")
}

/// Known endpoint, wrong method: 405 `M_UNRECOGNIZED`.
pub async fn method_not_allowed() -> Error {
    Error::method_not_allowed()
}

/// The CORS policy the spec requires of every client-server endpoint (browsers run Element Web).
pub fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(CorsAny)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS])
        .allow_headers([HeaderName::from_static("x-requested-with"), header::CONTENT_TYPE, header::AUTHORIZATION])
        .max_age(Duration::from_secs(86_400))
}

fn panic_response(err: Box<dyn Any + Send + 'static>) -> Response<axum::body::Body> {
    let detail = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = detail, "handler panicked");
    Error::internal().into_response()
}

/// Wraps the API router with the layers every request goes through.
pub fn with_layers(router: Router<AppState>, state: AppState) -> Router {
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<_>| {
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        path = %req.uri().path(),
                        user = tracing::field::Empty,
                        status = tracing::field::Empty,
                    )
                })
                .on_request(())
                .on_response(|resp: &Response<_>, latency: Duration, span: &Span| {
                    span.record("status", resp.status().as_u16());
                    tracing::debug!(latency_ms = latency.as_secs_f64() * 1000.0, "response");
                })
                .on_failure(()),
        )
        .layer(cors())
        .with_state(state)
}
