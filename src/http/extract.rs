//! Request extractors that turn every malformed input into the right Matrix error.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::{HeaderMap, header, request::Parts};
use serde::de::DeserializeOwned;

use crate::auth::Session;
use crate::error::Error;
use crate::state::AppState;
use crate::storage;

/// The authenticated caller. Accepts `Authorization: Bearer <token>` and, for older clients, the
/// `access_token` query parameter.
pub struct Auth(pub Arc<Session>);

impl std::ops::Deref for Auth {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.0
    }
}

pub fn access_token(parts: &Parts) -> Option<String> {
    if let Some(h) = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        && let Some(t) = h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer "))
    {
        return Some(t.trim().to_owned());
    }
    let query = parts.uri.query()?;
    url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "access_token").map(|(_, v)| v.into_owned())
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        let token = access_token(parts).ok_or_else(Error::missing_token)?;
        let session = state.auth.authenticate(&state.db, &token).await?;
        tracing::Span::current().record("user", &*session.user_id);
        if state.auth.should_touch(&session) {
            let ip = client_ip(parts, state).to_string();
            let ua = parts
                .headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.chars().take(512).collect::<String>());
            let (db, s) = (state.db.clone(), session.clone());
            tokio::spawn(async move {
                if let Err(e) = storage::devices::touch(&db, &s.user_id, &s.device_id, &ip, ua.as_deref()).await {
                    tracing::warn!(error = %e, "could not record device activity");
                }
            });
        }
        Ok(Auth(session))
    }
}

/// The client's IP address: the peer address, or the last untrusted hop of `X-Forwarded-For` when
/// the peer is a configured trusted proxy.
pub struct ClientIp(pub IpAddr);

pub fn client_ip(parts: &Parts, state: &AppState) -> IpAddr {
    let peer =
        parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()).unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let proxies = &state.config.listen.trusted_proxies;
    if proxies.contains(&peer) {
        return forwarded_for(&parts.headers, proxies).unwrap_or(peer);
    }
    peer
}

fn forwarded_for(headers: &HeaderMap, proxies: &[IpAddr]) -> Option<IpAddr> {
    let list = headers.get("x-forwarded-for")?.to_str().ok()?;
    // Walk from the nearest hop back; the first address that is not one of our proxies is the client.
    list.rsplit(',').filter_map(|s| s.trim().parse::<IpAddr>().ok()).find(|ip| !proxies.contains(ip))
}

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = Error;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        Ok(ClientIp(client_ip(parts, state)))
    }
}

/// A JSON request body: `M_NOT_JSON` if it is not JSON, `M_BAD_JSON` (naming the field) if it
/// does not have the expected shape, `M_TOO_LARGE` past `limits.max_request_body_bytes`.
/// An empty body counts as `{}` (some clients send no body to endpoints whose fields are optional).
pub struct Json<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Json<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Error> {
        let limit = state.config.limits.max_request_body_bytes;
        let bytes = read_body(req, limit).await?;
        parse_json(&bytes).map(Json)
    }
}

pub async fn read_body(req: Request, limit: usize) -> Result<axum::body::Bytes, Error> {
    if let Some(len) =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok())
        && len > limit
    {
        return Err(Error::too_large(format!("Request body is larger than {limit} bytes")));
    }
    axum::body::to_bytes(req.into_body(), limit).await.map_err(|e| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut too_large = false;
        while let Some(s) = source {
            too_large |= s.is::<http_body_util::LengthLimitError>();
            source = s.source();
        }
        if too_large {
            Error::too_large(format!("Request body is larger than {limit} bytes"))
        } else {
            Error::bad_json("Could not read request body")
        }
    })
}

/// Parses a body as a JSON object into `T`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let value: serde_json::Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Object(Default::default())
    } else {
        serde_json::from_slice(bytes).map_err(|e| Error::not_json(format!("Content not JSON: {e}")))?
    };
    if !value.is_object() {
        return Err(Error::bad_json("Request body must be a JSON object"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            Error::bad_json(e.inner().to_string())
        } else {
            Error::bad_json(format!("{path}: {}", e.inner()))
        }
    })
}

/// Query parameters: `M_MISSING_PARAM` for a missing required one, `M_INVALID_PARAM` otherwise.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for Query<T> {
    type Rejection = Error;
    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Error> {
        let q = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(url::form_urlencoded::parse(q.as_bytes()));
        serde_path_to_error::deserialize(de).map(Query).map_err(|e| {
            let msg = e.inner().to_string();
            if msg.starts_with("missing field") {
                Error::missing_param(msg)
            } else {
                Error::invalid_param(format!("{}: {msg}", e.path()))
            }
        })
    }
}

/// Path parameters, with `M_INVALID_PARAM` on failure (e.g. invalid percent-encoding).
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for Path<T> {
    type Rejection = Error;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| Error::invalid_param(e.body_text()))
    }
}

/// An optional caller: `None` without a token; an invalid token is still an error.
pub struct MaybeAuth(pub Option<Auth>);

impl FromRequestParts<AppState> for MaybeAuth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        if access_token(parts).is_none() {
            return Ok(MaybeAuth(None));
        }
        Auth::from_request_parts(parts, state).await.map(|a| MaybeAuth(Some(a)))
    }
}
