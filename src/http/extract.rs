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
        // An application service's `as_token` (with `user_id`/`device_id` masquerading).
        if let Some(reg) = state.appservices.by_token(&token) {
            let session = crate::appservice::auth::session(state, reg, &token, parts.uri.query()).await?;
            tracing::Span::current().record("user", &*session.user_id);
            return Ok(Auth(session));
        }
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

/// The server's one policy for text PostgreSQL cannot store: U+0000 (`jsonb` and `text` refuse
/// it). Every request body parsed as JSON ([`Json`], [`parse_json`]), every query string
/// ([`Query`]) and every path ([`Path`]) is checked here, at the edge, before any handler runs:
/// such a request is refused with 400 (`M_BAD_JSON` for a body, `M_INVALID_PARAM` for a path or
/// query parameter) and nothing of it is stored. Handlers therefore never see U+0000 in client
/// input, and nothing a user stores can make a shared endpoint fail for others.
pub const NUL_MESSAGE: &str = "Text must not contain U+0000";

/// Whether any string of `value` (object keys included, at any depth) contains U+0000. One walk
/// over the parsed value with an explicit stack: linear time, no recursion.
pub fn json_has_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) if s.contains('\0') => return true,
            Value::Array(a) => stack.extend(a),
            Value::Object(o) => {
                for (k, v) in o {
                    if k.contains('\0') {
                        return true;
                    }
                    stack.push(v);
                }
            }
            _ => {}
        }
    }
    false
}

/// U+0000 in a query string: in a percent-decoded name or value (`%00`).
pub fn query_has_nul(query: &str) -> bool {
    // Only `%00` decodes to U+0000 (a raw NUL cannot appear in a URI); decoding is the exact test.
    query.contains("%00")
        && url::form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k.contains('\0') || v.contains('\0'))
}

/// U+0000 in a path: a percent-decoded segment holds it exactly when the raw path has `%00`.
pub fn path_has_nul(path: &str) -> bool {
    path.contains("%00")
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
    if json_has_nul(&value) {
        return Err(Error::bad_json(NUL_MESSAGE));
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
        if query_has_nul(q) {
            return Err(Error::invalid_param(NUL_MESSAGE));
        }
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
        if path_has_nul(parts.uri.path()) {
            return Err(Error::invalid_param(NUL_MESSAGE));
        }
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

/// Strategies shared by the property tests of the parsers that take client JSON.
#[cfg(test)]
pub(crate) mod testing {
    use proptest::prelude::*;
    use serde_json::Value;

    /// Keys the parsers know (filters, push rules), mixed with arbitrary ones, so generated
    /// values reach deep into the expected shapes.
    const KEYS: &[&str] = &[
        "room",
        "timeline",
        "state",
        "ephemeral",
        "account_data",
        "presence",
        "types",
        "not_types",
        "senders",
        "not_senders",
        "rooms",
        "not_rooms",
        "limit",
        "event_fields",
        "event_format",
        "include_leave",
        "contains_url",
        "lazy_load_members",
        "kind",
        "key",
        "pattern",
        "actions",
        "conditions",
        "is",
        "value",
        "set_tweak",
        "highlight",
        "sound",
        "event_match",
        "content.body",
    ];

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![3 => proptest::sample::select(KEYS).prop_map(str::to_owned), 1 => any::<String>()]
    }

    /// Arbitrary JSON (strings with any Unicode, U+0000 included).
    pub fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[a-z.*?]{0,8}".prop_map(Value::String),
            proptest::sample::select(KEYS).prop_map(|k| Value::String(k.to_owned())),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::btree_map(key(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// An arbitrary JSON object.
    pub fn filter_like_json() -> impl Strategy<Value = Value> {
        proptest::collection::btree_map(key(), json(), 0..8).prop_map(|m| Value::Object(m.into_iter().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn reference(v: &Value) -> bool {
        match v {
            Value::String(s) => s.chars().any(|c| c == '\0'),
            Value::Array(a) => a.iter().any(reference),
            Value::Object(o) => o.iter().any(|(k, v)| k.chars().any(|c| c == '\0') || reference(v)),
            _ => false,
        }
    }

    #[test]
    fn nul_anywhere_is_bad_json() {
        for body in [
            r#"{"displayname": "a\u0000b"}"#,
            r#"{"a": {"b": [1, {"c": "\u0000"}]}}"#,
            r#"{"a\u0000": 1}"#,
            r#"{"deep": [[[[{"x\u0000y": null}]]]]}"#,
        ] {
            let e = parse_json::<Value>(body.as_bytes()).unwrap_err();
            assert_eq!((e.status.as_u16(), e.errcode), (400, "M_BAD_JSON"), "{body}");
        }
        // An escaped backslash followed by `u0000` is text, not U+0000.
        let v: Value = parse_json(br#"{"a": "\\u0000"}"#).unwrap();
        assert_eq!(v, json!({ "a": "\\u0000" }));
        assert!(query_has_nul("a=1&filename=x%00y"));
        assert!(query_has_nul("a%00=1"));
        assert!(!query_has_nul("a=%2500"));
        assert!(path_has_nul("/_matrix/client/v3/rooms/!r/state/m.x/a%00b"));
        assert!(!path_has_nul("/_matrix/client/v3/rooms/!r/state/m.x/a%2500b"));
    }

    proptest! {
        #[test]
        fn json_scanner_agrees_with_reference(v in testing::json()) {
            prop_assert_eq!(json_has_nul(&v), reference(&v));
            // Through the text a client would send, too.
            let obj = json!({ "v": v });
            let text = obj.to_string();
            match parse_json::<Value>(text.as_bytes()) {
                Ok(_) => prop_assert!(!reference(&obj)),
                Err(e) => {
                    prop_assert!(reference(&obj));
                    prop_assert_eq!((e.status.as_u16(), e.errcode), (400, "M_BAD_JSON"));
                }
            }
        }

        #[test]
        fn query_and_path_scanners_agree_with_decoding(k in any::<String>(), v in any::<String>()) {
            let q = url::form_urlencoded::Serializer::new(String::new()).append_pair(&k, &v).finish();
            prop_assert_eq!(query_has_nul(&q), k.contains('\0') || v.contains('\0'));
            let seg: String = url::form_urlencoded::byte_serialize(v.as_bytes()).collect();
            prop_assert_eq!(path_has_nul(&format!("/_matrix/client/v3/profile/{seg}")), v.contains('\0'));
        }
    }
}

/// The values of a query parameter that may repeat (`via=a&via=b`), decoded; at most 100.
pub fn query_values(query: Option<&str>, key: &str) -> Vec<String> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .take(100)
        .collect()
}
