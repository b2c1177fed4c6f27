//! Parvis as an OAuth 2.0 authorization server: the Matrix "OAuth 2.0 API" (spec v1.15+, MSC2964,
//! MSC2965, MSC2966, MSC2967, MSC4191) that Element X logs in with, built in (Synapse needs MAS).
//!
//! - Discovery: [`server_metadata`] at `/_matrix/client/v1/auth_metadata` (and the OpenID
//!   Provider metadata at the issuer).
//! - Dynamic client registration: [`validate_client_metadata`] (RFC 7591 with the spec's redirect
//!   URI rules); identical registrations share a `client_id`.
//! - Authorization code grant with PKCE S256: [`AuthorizationRequest::parse`] (scopes, device
//!   ID), then the user logs in through an SSO provider (`crate::sso`) or the password form,
//!   consents, and gets a single-use code.
//! - Token endpoint: code exchange ([`exchange_code`]: a normal Parvis device with expiring
//!   access tokens), refresh with rotation and a grace for lost responses ([`refresh`]),
//!   revocation (RFC 7009) logging the device out.
//! - Account management pages (`api::client::account_web`).
//!
//! Everything lives in PostgreSQL (`storage::oauth`), so any instance continues any flow.

pub mod config;
pub mod pages;

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::auth::{hash_token, new_token};
use crate::state::AppState;
use crate::storage::{self, now_ms};

pub const AUTHORIZE_PATH: &str = "/_parvis/oauth2/authorize";
pub const TOKEN_PATH: &str = "/_parvis/oauth2/token";
pub const REGISTRATION_PATH: &str = "/_parvis/oauth2/registration";
pub const REVOCATION_PATH: &str = "/_parvis/oauth2/revoke";
pub const LOGIN_PATH: &str = "/_parvis/oauth2/login";
pub const UPSTREAM_PATH: &str = "/_parvis/oauth2/upstream";
pub const CONSENT_PATH: &str = "/_parvis/oauth2/consent";
pub const ACCOUNT_PATH: &str = "/_parvis/account/";

/// The API scope, stable and as MSC2967 had it (matrix-rust-sdk still sends the latter).
pub const API_SCOPES: &[&str] = &["urn:matrix:client:api:*", "urn:matrix:org.matrix.msc2967.client:api:*"];
pub const DEVICE_SCOPE_PREFIXES: &[&str] =
    &["urn:matrix:client:device:", "urn:matrix:org.matrix.msc2967.client:device:"];

/// Account management actions (spec v1.18, and the names MSC4191 first gave some of them).
pub const ACCOUNT_ACTIONS: &[&str] = &[
    "org.matrix.profile",
    "org.matrix.devices_list",
    "org.matrix.device_view",
    "org.matrix.device_delete",
    "org.matrix.account_deactivate",
    "org.matrix.cross_signing_reset",
    "org.matrix.sessions_list",
    "org.matrix.session_view",
    "org.matrix.session_end",
];

/// The issuer and endpoints, or `None` when OAuth is off (disabled, or no `public_baseurl`).
pub fn base(state: &AppState) -> Option<String> {
    if !state.config.oauth.enabled {
        return None;
    }
    state.config.public_baseurl.as_deref().map(|b| b.trim_end_matches('/').to_owned())
}

/// Whether a new user can get an account through the login page (for `prompt=create`): an SSO
/// provider creates accounts at first login. (There is no in-browser password registration.)
fn registration_open(state: &AppState) -> bool {
    state.sso.providers().any(|p| p.enable_registration)
}

/// RFC 8414 authorization server metadata, with the spec's account management fields.
pub fn server_metadata(state: &AppState) -> Option<Value> {
    let b = base(state)?;
    let mut m = json!({
        "issuer": format!("{b}/"),
        "authorization_endpoint": format!("{b}{AUTHORIZE_PATH}"),
        "token_endpoint": format!("{b}{TOKEN_PATH}"),
        "registration_endpoint": format!("{b}{REGISTRATION_PATH}"),
        "revocation_endpoint": format!("{b}{REVOCATION_PATH}"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query", "fragment"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "scopes_supported": ["urn:matrix:client:api:*", "urn:matrix:client:device:*"],
        "account_management_uri": format!("{b}{ACCOUNT_PATH}"),
        "account_management_actions_supported": ACCOUNT_ACTIONS,
    });
    if registration_open(state) {
        m["prompt_values_supported"] = json!(["create"]);
    }
    Some(m)
}

/// A random URL-safe secret (256 bits).
pub fn random() -> String {
    crate::sso::random_token()
}

// ---------------------------------------------------------------- client registration

/// A registration refused (RFC 7591 3.2.2).
#[derive(Debug)]
pub struct RegistrationError {
    pub error: &'static str,
    pub description: String,
}

fn invalid_metadata(d: impl Into<String>) -> RegistrationError {
    RegistrationError { error: "invalid_client_metadata", description: d.into() }
}

fn invalid_redirect(d: impl Into<String>) -> RegistrationError {
    RegistrationError { error: "invalid_redirect_uri", description: d.into() }
}

/// Whether `host` is `base` or one of its subdomains.
fn same_site(host: &str, base: &str) -> bool {
    host == base || host.ends_with(&format!(".{base}"))
}

fn https_url(field: &str, value: &str) -> Result<url::Url, RegistrationError> {
    let u = url::Url::parse(value).map_err(|e| invalid_metadata(format!("{field}: {e}")))?;
    if u.scheme() != "https" || !u.username().is_empty() || u.password().is_some() || u.host_str().is_none() {
        return Err(invalid_metadata(format!("{field} must be an https URL without user information")));
    }
    Ok(u)
}

/// Checks a redirect URI against the spec's rules for the application type.
pub fn check_redirect_uri(application_type: &str, client_host: &str, uri: &str) -> Result<(), RegistrationError> {
    let u = url::Url::parse(uri).map_err(|e| invalid_redirect(format!("{uri}: {e}")))?;
    if u.fragment().is_some() {
        return Err(invalid_redirect(format!("{uri}: no fragment allowed")));
    }
    let https_ok = |u: &url::Url| {
        u.scheme() == "https"
            && u.username().is_empty()
            && u.password().is_none()
            && u.host_str().is_some_and(|h| same_site(h, client_host))
    };
    match application_type {
        "web" => {
            if https_ok(&u) {
                Ok(())
            } else {
                Err(invalid_redirect(format!("{uri}: a web client redirects to https on the host of client_uri")))
            }
        }
        _ => {
            if https_ok(&u) {
                return Ok(());
            }
            if u.scheme() == "http" {
                let loopback = matches!(u.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
                if loopback && u.port().is_none() {
                    return Ok(());
                }
                return Err(invalid_redirect(format!("{uri}: http is for the loopback interface, without a port")));
            }
            // Private-use scheme: the reverse-DNS of the client's host, and no authority.
            let reversed: Vec<&str> = client_host.split('.').rev().collect();
            let reversed = reversed.join(".");
            let scheme = u.scheme();
            let prefix_ok = scheme == reversed || scheme.starts_with(&format!("{reversed}."));
            // The parsed form: the raw string may carry white space the parser trimmed.
            let no_authority = !u.as_str().get(scheme.len() + 1..).unwrap_or("").starts_with("//");
            if prefix_ok && no_authority && u.host_str().is_none() {
                Ok(())
            } else {
                Err(invalid_redirect(format!(
                    "{uri}: a native client uses a scheme starting with {reversed} (no authority), loopback http or https"
                )))
            }
        }
    }
}

/// A validated registration: what is stored and answered.
#[derive(Debug)]
pub struct ValidClient {
    pub application_type: String,
    pub redirect_uris: Vec<String>,
    pub metadata: Value,
}

/// Validates client metadata (RFC 7591 as the spec profiles it). Unknown values of
/// `grant_types` and `response_types` are ignored, as the spec says; unknown fields dropped.
pub fn validate_client_metadata(body: &Value) -> Result<ValidClient, RegistrationError> {
    let obj = body.as_object().ok_or_else(|| invalid_metadata("the body must be a JSON object"))?;
    let string = |k: &str| -> Result<Option<&str>, RegistrationError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.len() <= 2048 => Ok(Some(s.as_str())),
            Some(_) => Err(invalid_metadata(format!("{k} must be a string of at most 2048 bytes"))),
        }
    };
    let client_uri = string("client_uri")?.ok_or_else(|| invalid_metadata("client_uri is required"))?;
    let client_url = https_url("client_uri", client_uri)?;
    let client_host = client_url.host_str().unwrap_or_default().to_owned();
    let application_type = string("application_type")?.unwrap_or("web");
    if !matches!(application_type, "web" | "native") {
        return Err(invalid_metadata("application_type must be web or native"));
    }
    if let Some(m) = string("token_endpoint_auth_method")?
        && m != "none"
    {
        return Err(invalid_metadata("only public clients are supported: token_endpoint_auth_method must be none"));
    }
    let list = |k: &str| -> Result<Option<Vec<String>>, RegistrationError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) if a.len() <= 20 => a
                .iter()
                .map(|v| v.as_str().filter(|s| s.len() <= 2048).map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| invalid_metadata(format!("{k} must be strings"))),
            Some(_) => Err(invalid_metadata(format!("{k} must be an array of at most 20 strings"))),
        }
    };
    let grant_types: Vec<String> = list("grant_types")?
        .unwrap_or_else(|| vec!["authorization_code".into()])
        .into_iter()
        .filter(|g| matches!(g.as_str(), "authorization_code" | "refresh_token"))
        .collect();
    let response_types: Vec<String> =
        list("response_types")?.unwrap_or_else(|| vec!["code".into()]).into_iter().filter(|r| r == "code").collect();
    if !grant_types.iter().any(|g| g == "authorization_code") || response_types.is_empty() {
        return Err(invalid_metadata("the client must use the authorization_code grant and the code response type"));
    }
    let redirect_uris = list("redirect_uris")?.unwrap_or_default();
    if redirect_uris.is_empty() {
        return Err(invalid_redirect("redirect_uris is required for the authorization code grant"));
    }
    for r in &redirect_uris {
        check_redirect_uri(application_type, &client_host, r)?;
    }
    let mut metadata = Map::new();
    metadata.insert("client_uri".into(), json!(client_uri));
    metadata.insert("application_type".into(), json!(application_type));
    metadata.insert("redirect_uris".into(), json!(redirect_uris));
    metadata.insert("grant_types".into(), json!(grant_types));
    metadata.insert("response_types".into(), json!(response_types));
    metadata.insert("token_endpoint_auth_method".into(), json!("none"));
    // Human-readable values, localised or not (`client_name#fr`), at most 64 of them.
    let human = obj
        .keys()
        .filter(|k| k.starts_with("client_name") || k.ends_with("_uri") && !matches!(k.as_str(), "client_uri"))
        .count();
    if human > 64 {
        return Err(invalid_metadata("too many localised values (64 at most)"));
    }
    for (k, v) in obj {
        let (field, lang) = k.split_once('#').map_or((k.as_str(), None), |(f, l)| (f, Some(l)));
        if !matches!(field, "client_name" | "logo_uri" | "tos_uri" | "policy_uri") {
            continue;
        }
        if lang
            .is_some_and(|l| l.is_empty() || l.len() > 35 || !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(invalid_metadata(format!("{k}: invalid language tag")));
        }
        let Some(s) = v.as_str() else { return Err(invalid_metadata(format!("{k} must be a string"))) };
        if field == "client_name" {
            if s.is_empty() || s.chars().count() > 256 {
                return Err(invalid_metadata(format!("{k} must be 1 to 256 characters")));
            }
        } else {
            let u = https_url(k, s)?;
            if !u.host_str().is_some_and(|h| same_site(h, &client_host)) {
                return Err(invalid_metadata(format!("{k} must be on the host of client_uri")));
            }
        }
        metadata.insert(k.clone(), json!(s));
    }
    Ok(ValidClient { application_type: application_type.into(), redirect_uris, metadata: Value::Object(metadata) })
}

/// A stable hash of the normalised metadata, so identical registrations share a `client_id`.
pub fn metadata_hash(metadata: &Value) -> [u8; 32] {
    let sorted: BTreeMap<&String, &Value> = metadata.as_object().map(|o| o.iter().collect()).unwrap_or_default();
    Sha256::digest(serde_json::to_vec(&sorted).unwrap_or_default()).into()
}

/// The client's name for people, in French when it gave one.
pub fn client_display_name(metadata: &Value) -> String {
    for k in ["client_name#fr", "client_name#fr-FR", "client_name"] {
        if let Some(s) = metadata.get(k).and_then(Value::as_str) {
            return s.to_owned();
        }
    }
    metadata
        .get("client_uri")
        .and_then(Value::as_str)
        .and_then(|u| url::Url::parse(u).ok())
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Whether a redirect URI sent in a request matches a registered one: exactly, or a loopback
/// URI registered without a port used with any port (RFC 8252 7.3).
pub fn redirect_registered(registered: &[String], sent: &str) -> bool {
    if registered.iter().any(|r| r == sent) {
        return true;
    }
    let Ok(s) = url::Url::parse(sent) else { return false };
    if s.scheme() != "http" || !matches!(s.host_str(), Some("localhost" | "127.0.0.1" | "[::1]")) {
        return false;
    }
    let mut without_port = s.clone();
    if without_port.set_port(None).is_err() {
        return false;
    }
    registered.iter().any(|r| *r == without_port.as_str())
}

// ---------------------------------------------------------------- authorization requests

/// An authorization error sent back to the client (RFC 6749 4.1.2.1).
#[derive(Debug)]
pub struct AuthzError {
    pub error: &'static str,
    pub description: String,
}

fn authz_error(error: &'static str, d: impl Into<String>) -> AuthzError {
    AuthzError { error, description: d.into() }
}

/// The parts of an authorization request checked once the client and redirect URI are known.
pub struct AuthorizationRequest {
    pub response_mode: String,
    pub scope: String,
    pub device_id: String,
    pub code_challenge: String,
    pub prompt: Option<String>,
}

/// The device ID of a scope: exactly one device token with a valid ID (RFC 3986 unreserved).
pub fn parse_scope(scope: &str) -> Result<String, AuthzError> {
    let mut api = false;
    let mut device = None;
    for token in scope.split(' ').filter(|t| !t.is_empty()) {
        if API_SCOPES.contains(&token) {
            api = true;
        } else if let Some(id) = DEVICE_SCOPE_PREFIXES.iter().find_map(|p| token.strip_prefix(p)) {
            if device.is_some() {
                return Err(authz_error("invalid_scope", "exactly one device scope is allowed"));
            }
            let valid =
                (1..=255).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
            if !valid {
                return Err(authz_error("invalid_scope", "the device ID must be 1 to 255 unreserved characters"));
            }
            device = Some(id.to_owned());
        } else if token == "openid" {
        } else {
            return Err(authz_error("invalid_scope", format!("unknown scope {token}")));
        }
    }
    if !api {
        return Err(authz_error("invalid_scope", "the scope must include urn:matrix:client:api:*"));
    }
    device.ok_or_else(|| authz_error("invalid_scope", "the scope must include urn:matrix:client:device:<device_id>"))
}

impl AuthorizationRequest {
    pub fn parse(q: &BTreeMap<String, String>) -> Result<Self, AuthzError> {
        match q.get("response_type").map(String::as_str) {
            Some("code") => {}
            Some(_) => {
                return Err(authz_error("unsupported_response_type", "only the code response type is supported"));
            }
            None => return Err(authz_error("invalid_request", "response_type is required")),
        }
        let response_mode = match q.get("response_mode").map(String::as_str) {
            None | Some("query") => "query",
            Some("fragment") => "fragment",
            Some(_) => return Err(authz_error("invalid_request", "response_mode must be query or fragment")),
        };
        match q.get("code_challenge_method").map(String::as_str) {
            Some("S256") => {}
            _ => return Err(authz_error("invalid_request", "PKCE with code_challenge_method=S256 is required")),
        }
        let challenge = q.get("code_challenge").map(String::as_str).unwrap_or("");
        if challenge.len() != 43 || !challenge.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(authz_error("invalid_request", "code_challenge must be a base64url SHA-256"));
        }
        let scope = q.get("scope").map(String::as_str).unwrap_or("");
        if scope.len() > 2048 {
            return Err(authz_error("invalid_scope", "the scope is too long"));
        }
        let device_id = parse_scope(scope)?;
        let prompt = q.get("prompt").filter(|p| !p.is_empty()).cloned();
        if let Some(p) = &prompt
            && !p.split(' ').all(|v| matches!(v, "create" | "login" | "consent" | "none"))
        {
            return Err(authz_error("invalid_request", "unsupported prompt value"));
        }
        if prompt.as_deref() == Some("none") {
            return Err(authz_error("login_required", "the user must log in"));
        }
        Ok(Self {
            response_mode: response_mode.into(),
            scope: scope.into(),
            device_id,
            code_challenge: challenge.into(),
            prompt,
        })
    }
}

/// The URL that sends the authorization result back to the client.
pub fn client_redirect(redirect_uri: &str, response_mode: &str, params: &[(&str, &str)]) -> String {
    let Ok(mut u) = url::Url::parse(redirect_uri) else { return redirect_uri.to_owned() };
    if response_mode == "fragment" {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in params {
            s.append_pair(k, v);
        }
        u.set_fragment(Some(&s.finish()));
    } else {
        let mut q = u.query_pairs_mut();
        for (k, v) in params {
            q.append_pair(k, v);
        }
    }
    u.to_string()
}

/// PKCE S256 (RFC 7636 4.6), compared in constant time.
pub fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    if !(43..=128).contains(&verifier.len())
        || !verifier.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
    {
        return false;
    }
    let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    bool::from(computed.as_bytes().ct_eq(challenge.as_bytes()))
}

// ---------------------------------------------------------------- token endpoint

/// A token endpoint error (RFC 6749 5.2).
#[derive(Debug)]
pub struct TokenError {
    pub status: u16,
    pub error: &'static str,
    pub description: String,
}

fn invalid_grant(d: impl Into<String>) -> TokenError {
    TokenError { status: 400, error: "invalid_grant", description: d.into() }
}

impl From<sqlx::Error> for TokenError {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "database error at the token endpoint");
        TokenError { status: 500, error: "server_error", description: "internal error".into() }
    }
}

impl From<crate::error::Error> for TokenError {
    fn from(e: crate::error::Error) -> Self {
        let status = e.status.as_u16();
        if status >= 500 {
            TokenError { status, error: "server_error", description: e.message }
        } else {
            invalid_grant(e.message)
        }
    }
}

/// Tokens handed out.
pub struct Tokens {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: i64,
    pub scope: String,
}

fn access_lifetime_ms(state: &AppState) -> i64 {
    state.config.auth.access_token_lifetime_secs as i64 * 1000
}

async fn issue(
    state: &AppState,
    tx: &mut sqlx::PgConnection,
    user_id: &str,
    device_id: &str,
    parent: Option<i64>,
    scope: &str,
) -> Result<Tokens, TokenError> {
    let access = new_token("pva_");
    let refresh = new_token("pvr_");
    let now = now_ms();
    let rid = storage::oauth::insert_refresh(
        tx,
        &hash_token(&refresh),
        user_id,
        device_id,
        parent,
        now + state.config.oauth.refresh_token_lifetime_secs as i64 * 1000,
    )
    .await?;
    storage::tokens::insert_access(
        &mut *tx,
        &hash_token(&access),
        user_id,
        device_id,
        Some(now + access_lifetime_ms(state)),
        Some(rid),
    )
    .await?;
    Ok(Tokens {
        access_token: access,
        refresh_token: refresh,
        expires_in: access_lifetime_ms(state) / 1000,
        scope: scope.into(),
    })
}

/// `grant_type=authorization_code`: checks the code (single use, unexpired, same client and
/// redirect URI, PKCE) and opens the device. A second use of a code revokes what the first
/// one issued (RFC 6749 4.1.2).
pub async fn exchange_code(
    state: &AppState,
    code: &str,
    client_id: &str,
    redirect_uri: &str,
    verifier: &str,
) -> Result<Tokens, TokenError> {
    let hash = hash_token(code);
    let mut tx = state.db.begin().await?;
    let Some(c) = storage::oauth::lock_code(&mut tx, &hash).await? else {
        return Err(invalid_grant("unknown authorization code"));
    };
    if c.used_ts.is_some() {
        if let Some(device) = &c.issued_device {
            tracing::warn!(user_id = %c.user_id, device, "authorization code reused: revoking its session");
            let revoked = storage::devices::delete(
                &mut *tx,
                &c.user_id,
                storage::devices::Selection::These(std::slice::from_ref(device)),
            )
            .await?;
            storage::oauth::mark_code_used(&mut tx, &hash, None).await?;
            tx.commit().await?;
            state.auth.evict(&revoked).await;
            crate::e2ee::devices_changed(state, &c.user_id).await.ok();
        }
        return Err(invalid_grant("the authorization code was already used"));
    }
    if c.expires_ts < now_ms() {
        return Err(invalid_grant("the authorization code has expired"));
    }
    if c.client_id != client_id {
        return Err(invalid_grant("the authorization code was issued to another client"));
    }
    if c.redirect_uri != redirect_uri {
        return Err(invalid_grant("redirect_uri differs from the authorization request's"));
    }
    if !pkce_matches(verifier, &c.code_challenge) {
        // A wrong verifier spends the code too: it cannot be guessed at.
        storage::oauth::mark_code_used(&mut tx, &hash, None).await?;
        tx.commit().await?;
        return Err(invalid_grant("code_verifier does not match the code_challenge"));
    }
    let user = storage::users::get(&mut *tx, &c.user_id).await?;
    if user.as_ref().is_none_or(|u| u.deactivated) {
        return Err(invalid_grant("the account is deactivated"));
    }
    if !storage::devices::upsert(&mut *tx, &c.user_id, &c.device_id, None, None).await? {
        return Err(invalid_grant("this device ID cannot be used"));
    }
    storage::oauth::insert_session(&mut tx, &c.user_id, &c.device_id, &c.client_id, &c.scope).await?;
    if let Some(up) = &c.upstream
        && let Ok(t) = serde_json::from_value::<UpstreamSession>(up.0.clone())
    {
        storage::sso::insert_device_session(&mut tx, &c.user_id, &c.device_id, &t.into_login_token(&c.user_id)).await?;
    }
    let tokens = issue(state, &mut tx, &c.user_id, &c.device_id, None, &c.scope).await?;
    storage::oauth::mark_code_used(&mut tx, &hash, Some(&c.device_id)).await?;
    let pos = crate::e2ee::record_device_list_change(&mut tx, &c.user_id).await?;
    tx.commit().await?;
    crate::e2ee::device_list_committed(state, &c.user_id, pos);
    tracing::info!(user_id = %c.user_id, device_id = %c.device_id, client_id, "OAuth session started");
    Ok(tokens)
}

/// `grant_type=refresh_token`: rotation. The previous refresh token may be used once more while
/// its successor is unused (the client lost the response); used again after that, the token
/// leaked and the session ends.
pub async fn refresh(state: &AppState, refresh_token: &str, client_id: &str) -> Result<Tokens, TokenError> {
    let mut tx = state.db.begin().await?;
    let Some(r) = storage::oauth::lock_refresh(&mut tx, &hash_token(refresh_token)).await? else {
        return Err(invalid_grant("unknown refresh token"));
    };
    let Some(session) = storage::oauth::session(&mut *tx, &r.user_id, &r.device_id).await? else {
        return Err(invalid_grant("this refresh token is not an OAuth session's"));
    };
    if session.client_id != client_id {
        return Err(invalid_grant("the refresh token was issued to another client"));
    }
    if r.expires_ts.is_some_and(|e| e < now_ms()) {
        return Err(invalid_grant("the refresh token has expired"));
    }
    let mut revoked = Vec::new();
    if r.used_ts.is_some() {
        match storage::oauth::successor(&mut tx, r.id).await? {
            Some((next, false)) => revoked.extend(storage::oauth::drop_refresh(&mut tx, next).await?),
            _ => {
                tracing::warn!(user_id = %r.user_id, device_id = %r.device_id, "refresh token replayed: ending the session");
                let gone = storage::devices::delete(
                    &mut *tx,
                    &r.user_id,
                    storage::devices::Selection::These(std::slice::from_ref(&r.device_id)),
                )
                .await?;
                tx.commit().await?;
                state.auth.evict(&gone).await;
                crate::e2ee::devices_changed(state, &r.user_id).await.ok();
                return Err(invalid_grant("the refresh token was already used"));
            }
        }
    } else {
        revoked.extend(storage::oauth::use_refresh(&mut tx, r.id).await?);
    }
    let tokens = issue(state, &mut tx, &r.user_id, &r.device_id, Some(r.id), &session.scope).await?;
    tx.commit().await?;
    state.auth.evict(&revoked).await;
    Ok(tokens)
}

/// RFC 7009: revokes the session (device) of an access or refresh token. Unknown tokens are
/// not an error.
pub async fn revoke(state: &AppState, token: &str) -> Result<(), TokenError> {
    let hash = hash_token(token);
    let owner = match storage::tokens::lookup_access(&state.db, &hash).await? {
        Some(o) => Some((o.user_id, o.device_id)),
        None => storage::oauth::refresh_owner(&state.db, &hash).await?,
    };
    if let Some((user_id, device_id)) = owner {
        crate::auth::delete_devices(state, &user_id, std::slice::from_ref(&device_id)).await?;
        tracing::info!(user_id, device_id, "OAuth token revoked: device logged out");
    }
    Ok(())
}

/// The upstream SSO login behind a grant, kept until the device exists (for logout).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UpstreamSession {
    pub provider: String,
    pub subject: String,
    pub sid: Option<String>,
    pub id_token: Option<String>,
}

impl UpstreamSession {
    pub fn from_login_token(t: &storage::sso::LoginToken) -> Self {
        Self {
            provider: t.provider.clone(),
            subject: t.subject.clone(),
            sid: t.sid.clone(),
            id_token: t.id_token.clone(),
        }
    }
    fn into_login_token(self, user_id: &str) -> storage::sso::LoginToken {
        storage::sso::LoginToken {
            user_id: user_id.into(),
            provider: self.provider,
            subject: self.subject,
            sid: self.sid,
            id_token: self.id_token,
            expires_ts: 0,
        }
    }
}

/// Hash of a code, as stored.
pub fn code_hash(code: &str) -> [u8; 32] {
    hash_token(code)
}

/// Hash of a browser-binding cookie, as stored.
pub fn browser_hash(cookie: &str) -> [u8; 32] {
    hash_token(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_uri_rules_of_the_spec() {
        for ok in [
            "https://example.com/callback",
            "https://app.example.com/callback",
            "https://example.com:5173/?query=value",
        ] {
            assert!(check_redirect_uri("web", "example.com", ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://example.com/callback#fragment",
            "http://example.com/callback",
            "http://localhost/",
            "https://evil.com/",
        ] {
            assert!(check_redirect_uri("web", "example.com", bad).is_err(), "{bad}");
        }
        for ok in [
            "com.example.app:/callback",
            "com.example:/",
            "com.example:callback",
            "http://localhost/callback",
            "http://127.0.0.1/callback",
            "http://[::1]/callback",
        ] {
            assert!(check_redirect_uri("native", "example.com", ok).is_ok(), "{ok}");
        }
        for bad in [
            "example:/callback",
            "com.example.app://callback",
            "https://localhost/callback",
            "http://localhost:1234/callback",
        ] {
            assert!(check_redirect_uri("native", "example.com", bad).is_err(), "{bad}");
        }
        let reg = vec!["http://127.0.0.1/callback".to_owned()];
        assert!(redirect_registered(&reg, "http://127.0.0.1:45678/callback"));
        assert!(!redirect_registered(&reg, "http://127.0.0.1:45678/other"));
        assert!(!redirect_registered(&["https://a.example/cb".to_owned()], "https://a.example/cb/"));
    }

    #[test]
    fn scopes_and_pkce() {
        assert_eq!(parse_scope("urn:matrix:client:api:* urn:matrix:client:device:ABCDEFGHIJ").unwrap(), "ABCDEFGHIJ");
        assert_eq!(
            parse_scope("urn:matrix:org.matrix.msc2967.client:api:* urn:matrix:org.matrix.msc2967.client:device:x_y")
                .unwrap(),
            "x_y"
        );
        assert!(parse_scope("urn:matrix:client:api:*").is_err());
        assert!(parse_scope("urn:matrix:client:device:A urn:matrix:client:device:B urn:matrix:client:api:*").is_err());
        assert!(parse_scope("urn:matrix:client:api:* urn:matrix:client:device:a/b").is_err());
        assert!(parse_scope("urn:matrix:client:api:* urn:matrix:client:device:a admin").is_err());
        // RFC 7636 appendix B.
        assert!(pkce_matches(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        ));
        assert!(!pkce_matches(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXj",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        ));
        assert!(!pkce_matches("short", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"));
    }

    #[test]
    fn client_metadata() {
        let ok = json!({
            "client_name": "Element X", "client_name#fr": "Element X (fr)", "client_uri": "https://element.io/",
            "logo_uri": "https://element.io/logo.png", "redirect_uris": ["io.element:/callback"],
            "application_type": "native", "grant_types": ["authorization_code", "refresh_token", "urn:x"],
            "token_endpoint_auth_method": "none", "response_types": ["code"], "unknown": 1,
        });
        let v = validate_client_metadata(&ok).unwrap();
        assert_eq!(v.metadata["grant_types"], json!(["authorization_code", "refresh_token"]));
        assert!(v.metadata.get("unknown").is_none());
        assert_eq!(client_display_name(&v.metadata), "Element X (fr)");
        let mut bad = ok.clone();
        bad["logo_uri"] = json!("https://evil.example/logo.png");
        assert_eq!(validate_client_metadata(&bad).unwrap_err().error, "invalid_client_metadata");
        let mut bad = ok.clone();
        bad["redirect_uris"] = json!(["https://evil.example/cb"]);
        assert_eq!(validate_client_metadata(&bad).unwrap_err().error, "invalid_redirect_uri");
        let mut bad = ok.clone();
        bad["client_uri"] = json!("http://element.io/");
        assert!(validate_client_metadata(&bad).is_err());
        let mut bad = ok.clone();
        bad["token_endpoint_auth_method"] = json!("client_secret_basic");
        assert!(validate_client_metadata(&bad).is_err());
        let mut bad = ok.clone();
        for i in 0..100 {
            bad[format!("client_name#x{i}")] = json!("n");
        }
        assert!(validate_client_metadata(&bad).is_err(), "localised values are bounded");
        // White space the URL parser trims must not shift (or break) the authority check.
        assert!(check_redirect_uri("native", "element.io", " io.element:/callback").is_ok());
        assert!(check_redirect_uri("native", "element.io", "\u{a0}é:/x").is_err());
        let _ = ok;
        assert_eq!(metadata_hash(&json!({"a": 1, "b": 2})), metadata_hash(&json!({"b": 2, "a": 1})));
    }
}
