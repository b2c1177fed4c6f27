//! `X-Matrix` request authentication, both directions
//! (<https://spec.matrix.org/latest/server-server-api/#request-authentication>).
//!
//! A request is signed over the canonical JSON of `{method, uri, origin, destination, content}`
//! (`content` only when there is a body) and carries `Authorization: X-Matrix origin=...,
//! destination=...,key=...,sig=...`. Incoming requests go through the [`Signed`] / [`Origin`]
//! extractors: the header is parsed strictly, `destination` must be us, the origin must be
//! allowed (`federation.allowed_servers`, else 403 `M_FORBIDDEN`), and the signature must verify
//! with the origin's current key (fetched and cached by `keys`); anything else is 401
//! `M_UNAUTHORIZED`.

use axum::extract::{FromRequest, OriginalUri, Request};
use axum::http::{HeaderMap, Method, StatusCode, header};
use ed25519_dalek::Signature;
use ruma::{OwnedServerName, ServerName};
use serde_json::{Map, Value};

use super::Signer;
use crate::error::Error;
use crate::state::AppState;

/// Longest `Authorization` header we parse.
pub const MAX_HEADER_BYTES: usize = 4096;
/// Most `Authorization` headers of one request looked at.
const MAX_HEADERS: usize = 4;

/// A parsed `X-Matrix` authorization header.
#[derive(Debug, Clone)]
pub struct XMatrix {
    pub origin: OwnedServerName,
    pub destination: OwnedServerName,
    /// `ed25519:<version>`
    pub key: String,
    pub sig: Signature,
}

fn unauthorized(msg: impl Into<String>) -> Error {
    Error::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", msg)
}

/// Whether a key ID is `ed25519:` followed by 1..=100 of `[A-Za-z0-9_]`.
pub fn valid_key_id(id: &str) -> bool {
    id.strip_prefix("ed25519:")
        .is_some_and(|v| (1..=100).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
}

/// Parses `X-Matrix origin=...,destination=...,key="...",sig="..."`. Values may be quoted
/// strings (with `\` escapes) or bare tokens; parameter names are case-insensitive; a repeated
/// parameter, a missing one, or anything malformed is an error.
pub fn parse_x_matrix(value: &str) -> Result<XMatrix, &'static str> {
    if value.len() > MAX_HEADER_BYTES {
        return Err("authorization header too long");
    }
    let (scheme, rest) = value.split_once([' ', '\t']).ok_or("not an X-Matrix authorization")?;
    if !scheme.eq_ignore_ascii_case("X-Matrix") {
        return Err("not an X-Matrix authorization");
    }
    let (mut origin, mut destination, mut key, mut sig) = (None, None, None, None);
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| matches!(c, ' ' | '\t' | ',')).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut name = String::new();
        while let Some(c) = chars.next_if(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')) {
            name.push(c.to_ascii_lowercase());
        }
        if name.is_empty() {
            return Err("malformed authorization parameter");
        }
        while chars.next_if(|c| matches!(c, ' ' | '\t')).is_some() {}
        if chars.next() != Some('=') {
            return Err("malformed authorization parameter");
        }
        while chars.next_if(|c| matches!(c, ' ' | '\t')).is_some() {}
        let mut val = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next() {
                    None => return Err("unterminated quoted string"),
                    Some('"') => break,
                    Some('\\') => val.push(chars.next().ok_or("unterminated quoted string")?),
                    Some(c) if c.is_control() => return Err("control character in authorization"),
                    Some(c) => val.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !matches!(c, ',' | ' ' | '\t' | '"')) {
                if c.is_control() {
                    return Err("control character in authorization");
                }
                val.push(c);
            }
            if val.is_empty() {
                return Err("empty authorization parameter");
            }
        }
        while chars.next_if(|c| matches!(c, ' ' | '\t')).is_some() {}
        if !matches!(chars.peek(), None | Some(',')) {
            return Err("malformed authorization parameter");
        }
        let slot = match name.as_str() {
            "origin" => &mut origin,
            "destination" => &mut destination,
            "key" => &mut key,
            "sig" => &mut sig,
            _ => continue, // unknown parameters are ignored, as the spec's extensibility wants
        };
        if slot.replace(val).is_some() {
            return Err("repeated authorization parameter");
        }
    }
    let origin = ServerName::parse(origin.ok_or("missing origin")?).map_err(|_| "invalid origin")?;
    let destination =
        ServerName::parse(destination.ok_or("missing destination")?).map_err(|_| "invalid destination")?;
    let key = key.ok_or("missing key")?;
    if !valid_key_id(&key) {
        return Err("invalid key ID");
    }
    let sig = super::decode_signature(&sig.ok_or("missing sig")?).ok_or("invalid signature encoding")?;
    Ok(XMatrix { origin, destination, key, sig })
}

/// The JSON a request signature covers.
fn request_json(method: &str, uri: &str, origin: &str, destination: &str, content: Option<&Value>) -> Value {
    let mut o = Map::new();
    o.insert("method".into(), Value::String(method.to_owned()));
    o.insert("uri".into(), Value::String(uri.to_owned()));
    o.insert("origin".into(), Value::String(origin.to_owned()));
    o.insert("destination".into(), Value::String(destination.to_owned()));
    if let Some(c) = content {
        o.insert("content".into(), c.clone());
    }
    Value::Object(o)
}

/// The `Authorization` header value for an outgoing request (`uri`: path and query, as sent).
pub fn sign_request(
    signer: &Signer,
    method: &Method,
    uri: &str,
    destination: &ServerName,
    content: Option<&Value>,
) -> Result<String, String> {
    let json = request_json(method.as_str(), uri, signer.server_name.as_str(), destination.as_str(), content);
    let sig = signer.sign_bytes(super::canonical_json(&json)?.as_bytes());
    Ok(format!(
        "X-Matrix origin=\"{}\",destination=\"{}\",key=\"{}\",sig=\"{sig}\"",
        signer.server_name, destination, signer.key_id
    ))
}

/// Verifies an incoming request; returns its origin and its parsed body (`None` when empty).
pub async fn verify_request(
    state: &AppState,
    method: &Method,
    uri: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(OwnedServerName, Option<Value>), Error> {
    let fed = &state.federation;
    let candidates: Vec<&str> = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .take(MAX_HEADERS)
        .filter_map(|v| v.to_str().ok())
        .filter(|v| v.len() >= 9 && v[..9].eq_ignore_ascii_case("X-Matrix "))
        .collect();
    if candidates.is_empty() {
        return Err(unauthorized("Missing X-Matrix authorization"));
    }
    let parsed: Vec<XMatrix> = candidates
        .iter()
        .map(|c| parse_x_matrix(c))
        .collect::<Result<_, _>>()
        .map_err(|e| unauthorized(format!("Invalid X-Matrix authorization: {e}")))?;
    let origin = parsed[0].origin.clone();
    if parsed.iter().any(|p| p.origin != origin) {
        return Err(unauthorized("X-Matrix authorizations name different origins"));
    }
    if parsed.iter().any(|p| p.destination != *fed.server_name()) {
        return Err(unauthorized("X-Matrix destination is not this server"));
    }
    if origin == *fed.server_name() {
        return Err(unauthorized("X-Matrix origin is this server"));
    }
    if !fed.is_allowed(&origin) {
        return Err(Error::forbidden(format!("Federation with {origin} is not allowed")));
    }
    let content = if body.is_empty() {
        None
    } else {
        Some(serde_json::from_slice::<Value>(body).map_err(|_| Error::not_json("Request body is not JSON"))?)
    };
    let json = request_json(method.as_str(), uri, origin.as_str(), fed.server_name().as_str(), content.as_ref());
    let signed = super::canonical_json(&json)
        .map_err(|e| Error::bad_json(format!("Request body is not canonical JSON: {e}")))?;
    let mut last = unauthorized("No usable signing key of the origin");
    for p in &parsed {
        match super::keys::request_key(state, &origin, &p.key).await {
            Some(key) => {
                if key.verify_strict(signed.as_bytes(), &p.sig).is_ok() {
                    return Ok((origin, content));
                }
                last = unauthorized("Invalid X-Matrix signature");
            }
            None => last = unauthorized(format!("Unknown signing key {} of {origin}", p.key)),
        }
    }
    Err(last)
}

/// An authenticated federation request: the verified origin and the JSON body, if any.
pub struct Signed {
    pub origin: OwnedServerName,
    pub content: Option<Value>,
}

impl FromRequest<AppState> for Signed {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Error> {
        let uri = req.extensions().get::<OriginalUri>().map(|u| u.0.clone()).unwrap_or_else(|| req.uri().clone());
        let uri = uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
        let (method, headers) = (req.method().clone(), req.headers().clone());
        let body = crate::http::extract::read_body(req, state.config.limits.max_request_body_bytes).await?;
        let (origin, content) = verify_request(state, &method, &uri, &headers, &body).await?;
        tracing::Span::current().record("user", origin.as_str());
        // The server's one U+0000 policy (see `http::extract`), for remote servers too.
        if content.as_ref().is_some_and(crate::http::extract::json_has_nul) {
            return Err(Error::bad_json(crate::http::extract::NUL_MESSAGE));
        }
        Ok(Signed { origin, content })
    }
}

/// The verified origin server of a federation request (see [`Signed`]).
pub struct Origin(pub OwnedServerName);

impl FromRequest<AppState> for Origin {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Error> {
        Signed::from_request(req, state).await.map(|s| Origin(s.origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::ServerKey;
    use serde_json::json;

    const SIG: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

    fn h(params: &str) -> String {
        format!("X-Matrix {params}")
    }

    #[test]
    fn parses_the_spec_example_and_variants() {
        let x = parse_x_matrix(&h(&format!(
            r#"origin="origin.hs.example.com",destination="destination.hs.example.com",key="ed25519:key1",sig="{SIG}""#
        )))
        .unwrap();
        assert_eq!(x.origin, "origin.hs.example.com");
        assert_eq!(x.destination, "destination.hs.example.com");
        assert_eq!(x.key, "ed25519:key1");
        // Bare tokens, spaces around `=` and `,`, other case, IP literals with ports, unknown params.
        let x = parse_x_matrix(&format!(
            r#"x-matrix Origin = [::1]:8448 , destination=127.0.0.1:9000, key="ed25519:a_b",sig={SIG},future="x,y""#
        ))
        .unwrap();
        assert_eq!(x.origin, "[::1]:8448");
        assert_eq!(x.destination, "127.0.0.1:9000");
        // Escapes inside quoted strings.
        let x =
            parse_x_matrix(&h(&format!(r#"origin="a\.fr",destination="b.fr",key="ed25519:k",sig="{SIG}""#))).unwrap();
        assert_eq!(x.origin, "a.fr");
    }

    #[test]
    fn refuses_hostile_headers() {
        let ok = format!(r#"origin="a.fr",destination="b.fr",key="ed25519:k",sig="{SIG}""#);
        assert!(parse_x_matrix(&h(&ok)).is_ok());
        for bad in [
            // missing fields
            format!(r#"destination="b.fr",key="ed25519:k",sig="{SIG}""#),
            format!(r#"origin="a.fr",key="ed25519:k",sig="{SIG}""#),
            format!(r#"origin="a.fr",destination="b.fr",sig="{SIG}""#),
            r#"origin="a.fr",destination="b.fr",key="ed25519:k""#.to_owned(),
            // duplicates (also in another case)
            format!(r#"origin="a.fr",origin="c.fr",destination="b.fr",key="ed25519:k",sig="{SIG}""#),
            format!(r#"origin="a.fr",ORIGIN="a.fr",destination="b.fr",key="ed25519:k",sig="{SIG}""#),
            // quoting
            format!(r#"origin="a.fr,destination="b.fr",key="ed25519:k",sig="{SIG}""#),
            format!(r#"origin="a.fr"x,destination="b.fr",key="ed25519:k",sig="{SIG}""#),
            format!(r#"origin=a"b,destination="b.fr",key="ed25519:k",sig="{SIG}""#),
            format!(r#"origin="a.fr",destination="b.fr",key="ed25519:k",sig="{SIG}"#),
            format!("origin=\"a\u{1}.fr\",destination=\"b.fr\",key=\"ed25519:k\",sig=\"{SIG}\""),
            // bad values
            format!(r#"origin="a fr",destination="b.fr",key="ed25519:k",sig="{SIG}""#),
            format!(r#"origin="",destination="b.fr",key="ed25519:k",sig="{SIG}""#),
            format!(r#"origin=,destination="b.fr",key="ed25519:k",sig="{SIG}""#),
            format!(r#"origin="a.fr",destination="b.fr:99999",key="ed25519:k",sig="{SIG}""#),
            format!(r#"origin="a.fr",destination="b.fr",key="rsa:k",sig="{SIG}""#),
            format!(r#"origin="a.fr",destination="b.fr",key="ed25519:",sig="{SIG}""#),
            format!(r#"origin="a.fr",destination="b.fr",key="ed25519:k/../x",sig="{SIG}""#),
            r#"origin="a.fr",destination="b.fr",key="ed25519:k",sig="c2hvcnQ""#.to_owned(),
            r#"origin="a.fr",destination="b.fr",key="ed25519:k",sig="!!!""#.to_owned(),
            // syntax
            format!(r#"=x,origin="a.fr",destination="b.fr",key="ed25519:k",sig="{SIG}""#),
            format!(r#"origin "a.fr",destination="b.fr",key="ed25519:k",sig="{SIG}""#),
            // huge values
            format!(r#"origin="{}",destination="b.fr",key="ed25519:k",sig="{SIG}""#, "a".repeat(5000)),
            format!(r#"origin="a.fr",destination="b.fr",key="ed25519:{}",sig="{SIG}""#, "k".repeat(101)),
        ] {
            assert!(parse_x_matrix(&h(&bad)).is_err(), "accepted: {bad}");
        }
        assert!(parse_x_matrix(&format!("Bearer {ok}")).is_err());
        assert!(parse_x_matrix("X-Matrix").is_err());
        assert!(parse_x_matrix("").is_err());
        let many_unknown = format!("{ok},{}", "x=y,".repeat(2000));
        assert!(parse_x_matrix(&h(&many_unknown)).is_err());
    }

    #[test]
    fn signed_header_parses_and_verifies() {
        let k = ServerKey::generate();
        let signer = Signer {
            server_name: ServerName::parse("[::1]:8448").unwrap(),
            key_id: k.key_id.clone(),
            key: k.signing_key.clone(),
        };
        let dest = ServerName::parse("1.2.3.4:8448").unwrap();
        let body = json!({"a": [1, 2], "b": "é"});
        let header =
            sign_request(&signer, &Method::PUT, "/_matrix/federation/v1/send/1?x=y", &dest, Some(&body)).unwrap();
        let x = parse_x_matrix(&header).unwrap();
        assert_eq!(x.origin, "[::1]:8448");
        assert_eq!(x.destination, dest);
        let vk = k.signing_key.verifying_key();
        let json = request_json("PUT", "/_matrix/federation/v1/send/1?x=y", "[::1]:8448", "1.2.3.4:8448", Some(&body));
        let bytes = crate::federation::canonical_json(&json).unwrap();
        assert!(vk.verify_strict(bytes.as_bytes(), &x.sig).is_ok());
        let other = request_json("PUT", "/_matrix/federation/v1/send/2?x=y", "[::1]:8448", "1.2.3.4:8448", Some(&body));
        let bytes = crate::federation::canonical_json(&other).unwrap();
        assert!(vk.verify_strict(bytes.as_bytes(), &x.sig).is_err());
    }
}
