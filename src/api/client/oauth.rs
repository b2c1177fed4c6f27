//! HTTP side of the OAuth 2.0 authorization server (`crate::oauth`): discovery, dynamic client
//! registration, the authorization endpoint with its login and consent pages, the token and
//! revocation endpoints. Errors follow the RFCs: JSON `{error, error_description}` at the
//! token, registration and revocation endpoints; a redirect to the client for authorization
//! errors once the client and its redirect URI are known, a page before that.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::error::{ApiResult, Error};
use crate::http::extract::ClientIp;
use crate::oauth::{self, AuthorizationRequest, pages};
use crate::sso::pages as sso_pages;
use crate::state::AppState;
use crate::storage::{self, now_ms};

/// Parses a query string or form body; a parameter given twice is an error (RFC 6749 3.1).
fn params(raw: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in url::form_urlencoded::parse(raw) {
        if k.len() > 64 || v.len() > 8192 {
            return Err(format!("parameter {k} is too long"));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("parameter {k} is repeated"));
        }
    }
    Ok(out)
}

fn no_store(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    no_store((status, axum::Json(json!({ "error": error, "error_description": description }))).into_response())
}

fn redirect(status: StatusCode, to: &str) -> Response {
    let mut r = status.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    no_store(r)
}

fn page_error(status: StatusCode, fr: &str, en: &str) -> Response {
    sso_pages::error(status, fr, en)
}

fn enabled(state: &AppState) -> ApiResult<String> {
    oauth::base(state).ok_or_else(|| {
        Error::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "The OAuth 2.0 API is not enabled on this server")
    })
}

/// `GET /_matrix/client/v1/auth_metadata` (and the MSC2965 unstable path).
pub async fn auth_metadata(State(state): State<AppState>) -> ApiResult<axum::Json<Value>> {
    enabled(&state)?;
    oauth::server_metadata(&state).map(axum::Json).ok_or_else(Error::internal)
}

/// `GET /.well-known/openid-configuration` at the issuer: the same metadata, as OpenID Provider
/// discovery (Parvis issues no id_tokens: there are no keys to publish).
pub async fn openid_configuration(State(state): State<AppState>) -> ApiResult<axum::Json<Value>> {
    auth_metadata(State(state)).await
}

// ---------------------------------------------------------------- registration

/// `POST` registration endpoint (RFC 7591).
pub async fn register(State(state): State<AppState>, ClientIp(ip): ClientIp, body: Bytes) -> Response {
    if enabled(&state).is_err() {
        return oauth_error(StatusCode::NOT_FOUND, "not_found", "the OAuth 2.0 API is not enabled");
    }
    if state.rate_limits.check(&state.rate_limits.registration_per_ip, &ip.to_string()).is_err() {
        return oauth_error(StatusCode::TOO_MANY_REQUESTS, "slow_down", "too many client registrations");
    }
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_client_metadata", "the body is not JSON");
    };
    let client = match oauth::validate_client_metadata(&value) {
        Ok(c) => c,
        Err(e) => return oauth_error(StatusCode::BAD_REQUEST, e.error, &e.description),
    };
    let hash = oauth::metadata_hash(&client.metadata);
    let new_id = format!("pvc_{}", &oauth::random()[..22]);
    let id = match storage::oauth::register_client(
        &state.db,
        &new_id,
        &client.application_type,
        &client.redirect_uris,
        &client.metadata,
        &hash,
    )
    .await
    {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, "client registration failed");
            return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal error");
        }
    };
    let mut resp = client.metadata;
    resp["client_id"] = json!(id);
    resp["client_id_issued_at"] = json!(now_ms() / 1000);
    no_store((StatusCode::CREATED, axum::Json(resp)).into_response())
}

// ---------------------------------------------------------------- authorization

fn grant_cookie_name(grant_id: &str) -> String {
    format!("parvis_oauth_{}", &hex::encode(oauth::browser_hash(grant_id))[..16])
}

/// The grant of a browser request: it exists, is unexpired, and the browser holds its cookie.
async fn browser_grant(
    state: &AppState,
    headers: &HeaderMap,
    grant_id: &str,
) -> Result<storage::oauth::Grant, Response> {
    let g = match storage::oauth::grant(&state.db, grant_id).await {
        Ok(Some(g)) if g.expires_ts >= now_ms() => g,
        Ok(_) => {
            return Err(page_error(
                StatusCode::BAD_REQUEST,
                "Cette demande de connexion est inconnue ou a expiré. Recommencez depuis votre application.",
                "This login request is unknown or has expired. Please start again from your application.",
            ));
        }
        Err(e) => {
            tracing::error!(error = %e, "grant lookup failed");
            return Err(page_error(StatusCode::INTERNAL_SERVER_ERROR, "Erreur interne.", "Internal error."));
        }
    };
    let ok = crate::http::web::cookie(headers, &grant_cookie_name(grant_id))
        .is_some_and(|c| bool::from(oauth::browser_hash(c).ct_eq(g.browser_hash.as_slice())));
    if !ok {
        return Err(page_error(
            StatusCode::FORBIDDEN,
            "Cette demande de connexion a été commencée dans un autre navigateur.",
            "This login request was started in another browser.",
        ));
    }
    Ok(g)
}

fn login_page(state: &AppState, g: &storage::oauth::Grant, client_name: &str, error: Option<&str>) -> Response {
    let providers: Vec<(String, String)> = state
        .sso
        .providers()
        .map(|p| {
            (
                p.name.clone(),
                format!(
                    "{}?{}",
                    oauth::UPSTREAM_PATH,
                    crate::http::web::query(&[("grant", &g.grant_id), ("idp", &p.id)])
                ),
            )
        })
        .collect();
    let hidden = [("grant", g.grant_id.as_str())];
    let password = state.config.oauth.password_login.then_some((oauth::LOGIN_PATH, &hidden[..]));
    if providers.is_empty() && password.is_none() {
        return page_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Aucun moyen de connexion n'est configuré sur ce serveur.",
            "No way to sign in is configured on this server.",
        );
    }
    pages::login(Some(client_name), &providers, password, error, None)
}

/// `GET` authorization endpoint.
pub async fn authorize(State(state): State<AppState>, ClientIp(ip): ClientIp, RawQuery(query): RawQuery) -> Response {
    if enabled(&state).is_err() {
        return page_error(StatusCode::NOT_FOUND, "OAuth n'est pas activé.", "OAuth is not enabled.");
    }
    if state.rate_limits.check(&state.rate_limits.login_per_ip, &ip.to_string()).is_err() {
        return page_error(StatusCode::TOO_MANY_REQUESTS, "Trop de tentatives.", "Too many attempts.");
    }
    let q = match params(query.as_deref().unwrap_or("").as_bytes()) {
        Ok(q) => q,
        Err(e) => {
            return page_error(
                StatusCode::BAD_REQUEST,
                &format!("Requête invalide : {e}"),
                &format!("Invalid request: {e}"),
            );
        }
    };
    // Until the client and its redirect URI are known, errors are pages: never redirect to an
    // unverified URI (RFC 6749 4.1.2.1).
    let client_id = q.get("client_id").map(String::as_str).unwrap_or("");
    let client = match storage::oauth::client(&state.db, client_id).await {
        Ok(Some(c)) => c,
        Ok(None) => return page_error(StatusCode::BAD_REQUEST, "Application inconnue.", "Unknown client."),
        Err(e) => {
            tracing::error!(error = %e, "client lookup failed");
            return page_error(StatusCode::INTERNAL_SERVER_ERROR, "Erreur interne.", "Internal error.");
        }
    };
    let redirect_uri = q.get("redirect_uri").map(String::as_str).unwrap_or("");
    if !oauth::redirect_registered(&client.redirect_uris, redirect_uri) {
        return page_error(
            StatusCode::BAD_REQUEST,
            "L'adresse de retour n'est pas enregistrée pour cette application.",
            "The redirect URI is not registered for this client.",
        );
    }
    let state_param = q.get("state").cloned();
    let mode = q.get("response_mode").map(String::as_str).filter(|m| *m == "fragment").unwrap_or("query");
    let req = match AuthorizationRequest::parse(&q) {
        Ok(r) => r,
        Err(e) => {
            let mut p = vec![("error", e.error), ("error_description", e.description.as_str())];
            if let Some(s) = &state_param {
                p.push(("state", s));
            }
            return redirect(StatusCode::FOUND, &oauth::client_redirect(redirect_uri, mode, &p));
        }
    };
    let grant_id = oauth::random();
    let browser = oauth::random();
    let csrf = oauth::random();
    let inserted = storage::oauth::insert_grant(
        &state.db,
        &storage::oauth::NewGrant {
            grant_id: &grant_id,
            browser_hash: &oauth::browser_hash(&browser),
            client_id: &client.client_id,
            redirect_uri,
            response_mode: &req.response_mode,
            scope: &req.scope,
            device_id: &req.device_id,
            state: state_param.as_deref(),
            code_challenge: &req.code_challenge,
            prompt: req.prompt.as_deref(),
            csrf: &csrf,
            expires_ts: now_ms() + state.config.oauth.grant_lifetime_secs as i64 * 1000,
        },
    )
    .await;
    if let Err(e) = inserted {
        tracing::error!(error = %e, "grant insert failed");
        return page_error(StatusCode::INTERNAL_SERVER_ERROR, "Erreur interne.", "Internal error.");
    }
    let g = match storage::oauth::grant(&state.db, &grant_id).await {
        Ok(Some(g)) => g,
        _ => return page_error(StatusCode::INTERNAL_SERVER_ERROR, "Erreur interne.", "Internal error."),
    };
    let name = oauth::client_display_name(&client.metadata.0);
    let providers: Vec<_> = state.sso.providers().collect();
    // One provider and no password form: straight to it.
    let mut resp = if providers.len() == 1 && !state.config.oauth.password_login {
        let q = crate::http::web::query(&[("grant", &grant_id), ("idp", &providers[0].id)]);
        redirect(StatusCode::FOUND, &format!("{}?{q}", oauth::UPSTREAM_PATH))
    } else {
        login_page(&state, &g, &name, None)
    };
    let secure = state.config.public_baseurl.as_deref().is_some_and(|b| b.starts_with("https:"));
    let c = format!(
        "{}={browser}; Path=/_parvis/oauth2; Max-Age={}; HttpOnly; SameSite=Lax{}",
        grant_cookie_name(&grant_id),
        state.config.oauth.grant_lifetime_secs,
        if secure { "; Secure" } else { "" }
    );
    if let Ok(v) = HeaderValue::from_str(&c) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// `GET /_parvis/oauth2/upstream?grant=&idp=`: the login at an SSO provider, which comes back
/// to the consent page with a login token.
pub async fn upstream(State(state): State<AppState>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    let Ok(q) = params(query.as_deref().unwrap_or("").as_bytes()) else {
        return page_error(StatusCode::BAD_REQUEST, "Requête invalide.", "Invalid request.");
    };
    let (Some(grant_id), Some(idp)) = (q.get("grant"), q.get("idp")) else {
        return page_error(StatusCode::BAD_REQUEST, "Requête invalide.", "Invalid request.");
    };
    let g = match browser_grant(&state, &headers, grant_id).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let Some(base) = oauth::base(&state) else {
        return page_error(StatusCode::NOT_FOUND, "OAuth n'est pas activé.", "OAuth is not enabled.");
    };
    let mut back = url::Url::parse(&format!("{base}{}", oauth::CONSENT_PATH)).expect("base URL checked at start-up");
    back.query_pairs_mut().append_pair("grant", &g.grant_id);
    match state.sso.start(&state.db, idp, Some(back.as_str()), None).await {
        Ok(flow) => super::sso::to_provider(&state, flow),
        Err(e) => e.render(),
    }
}

/// `POST /_parvis/oauth2/login`: the password form.
pub async fn password_login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(f) = params(&body) else {
        return page_error(StatusCode::BAD_REQUEST, "Requête invalide.", "Invalid request.");
    };
    let g = match browser_grant(&state, &headers, f.get("grant").map(String::as_str).unwrap_or("")).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    if !state.config.oauth.password_login {
        return page_error(
            StatusCode::FORBIDDEN,
            "Connexion par mot de passe désactivée.",
            "Password login is disabled.",
        );
    }
    let name = match storage::oauth::client(&state.db, &g.client_id).await {
        Ok(Some(c)) => oauth::client_display_name(&c.metadata.0),
        _ => "?".into(),
    };
    match check_password(&state, &ip.to_string(), f.get("username"), f.get("password")).await {
        Ok(user_id) => {
            if let Err(e) = storage::oauth::authenticate_grant(&state.db, &g.grant_id, &user_id, None).await {
                tracing::error!(error = %e, "grant update failed");
                return page_error(StatusCode::INTERNAL_SERVER_ERROR, "Erreur interne.", "Internal error.");
            }
            let q = crate::http::web::query(&[("grant", &g.grant_id)]);
            redirect(StatusCode::SEE_OTHER, &format!("{}?{q}", oauth::CONSENT_PATH))
        }
        Err(msg) => login_page(&state, &g, &name, Some(&msg)),
    }
}

/// Checks a user name and password like `POST /login` (rate limits, same answer and time for
/// unknown users and wrong passwords). Returns the user ID or a message for the page.
pub(crate) async fn check_password(
    state: &AppState,
    ip: &str,
    username: Option<&String>,
    password: Option<&String>,
) -> Result<String, String> {
    const WRONG: &str = "Identifiant ou mot de passe incorrect. / Invalid user name or password.";
    if state.rate_limits.check(&state.rate_limits.login_per_ip, ip).is_err() {
        return Err("Trop de tentatives : patientez un moment. / Too many attempts: please wait.".into());
    }
    let (Some(name), Some(password)) = (username, password) else { return Err(WRONG.into()) };
    let Ok((user_id, _)) = crate::users::parse_login_user(name.trim(), &state.config.server_name) else {
        return Err(WRONG.into());
    };
    if state.rate_limits.check(&state.rate_limits.login_per_account, &user_id).is_err() {
        return Err("Trop de tentatives : patientez un moment. / Too many attempts: please wait.".into());
    }
    let user =
        storage::users::get(&state.db, &user_id).await.map_err(|_| "Erreur interne. / Internal error.".to_owned())?;
    let hash = user.as_ref().and_then(|u| u.password_hash.as_deref());
    if !state.passwords.verify(password, hash).await {
        tracing::info!(user_id, "failed password login (web)");
        return Err(WRONG.into());
    }
    if user.as_ref().is_some_and(|u| u.deactivated) {
        return Err("Ce compte est désactivé. / This account is deactivated.".into());
    }
    Ok(user_id)
}

/// `GET /_parvis/oauth2/consent?grant=[&loginToken=]`: after the login, the consent page.
pub async fn consent_page(State(state): State<AppState>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    let Ok(q) = params(query.as_deref().unwrap_or("").as_bytes()) else {
        return page_error(StatusCode::BAD_REQUEST, "Requête invalide.", "Invalid request.");
    };
    let mut g = match browser_grant(&state, &headers, q.get("grant").map(String::as_str).unwrap_or("")).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    if let Some(token) = q.get("loginToken") {
        // Back from the SSO provider: the login token says who logged in (single use).
        let taken = match state.db.acquire().await {
            Ok(mut conn) => storage::sso::take_login_token(&mut conn, &crate::auth::hash_token(token)).await,
            Err(e) => Err(e),
        };
        let lt = match taken {
            Ok(Some(t)) if t.expires_ts >= now_ms() => t,
            Ok(_) => {
                return page_error(
                    StatusCode::FORBIDDEN,
                    "Jeton de connexion invalide ou expiré.",
                    "Invalid or expired login token.",
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "login token lookup failed");
                return page_error(StatusCode::INTERNAL_SERVER_ERROR, "Erreur interne.", "Internal error.");
            }
        };
        let upstream = serde_json::to_value(oauth::UpstreamSession::from_login_token(&lt)).ok();
        if let Err(e) = storage::oauth::authenticate_grant(&state.db, &g.grant_id, &lt.user_id, upstream.as_ref()).await
        {
            tracing::error!(error = %e, "grant update failed");
            return page_error(StatusCode::INTERNAL_SERVER_ERROR, "Erreur interne.", "Internal error.");
        }
        g.user_id = Some(lt.user_id);
    }
    let Some(user_id) = &g.user_id else {
        return page_error(StatusCode::FORBIDDEN, "Vous n'êtes pas connecté.", "You are not signed in.");
    };
    let (name, uri) = match storage::oauth::client(&state.db, &g.client_id).await {
        Ok(Some(c)) => (
            oauth::client_display_name(&c.metadata.0),
            c.metadata.0.get("client_uri").and_then(Value::as_str).unwrap_or("").to_owned(),
        ),
        _ => return page_error(StatusCode::BAD_REQUEST, "Application inconnue.", "Unknown client."),
    };
    pages::consent(
        &name,
        &uri,
        user_id,
        &g.device_id,
        oauth::CONSENT_PATH,
        &[("grant", &g.grant_id), ("csrf", &g.csrf)],
    )
}

/// `POST /_parvis/oauth2/consent`: allow (a code goes to the client) or deny.
pub async fn consent_submit(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(f) = params(&body) else {
        return page_error(StatusCode::BAD_REQUEST, "Requête invalide.", "Invalid request.");
    };
    let g = match browser_grant(&state, &headers, f.get("grant").map(String::as_str).unwrap_or("")).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let csrf_ok = f.get("csrf").is_some_and(|c| bool::from(c.as_bytes().ct_eq(g.csrf.as_bytes())));
    let Some(user_id) = g.user_id.clone().filter(|_| csrf_ok) else {
        return page_error(StatusCode::FORBIDDEN, "Formulaire invalide.", "Invalid form.");
    };
    // The grant is spent whatever the answer.
    match storage::oauth::take_grant(&state.db, &g.grant_id).await {
        Ok(true) => {}
        Ok(false) => return page_error(StatusCode::BAD_REQUEST, "Demande déjà traitée.", "Request already handled."),
        Err(e) => {
            tracing::error!(error = %e, "grant delete failed");
            return page_error(StatusCode::INTERNAL_SERVER_ERROR, "Erreur interne.", "Internal error.");
        }
    }
    let mut p: Vec<(&str, &str)> = Vec::new();
    let code;
    if f.get("action").map(String::as_str) == Some("allow") {
        code = oauth::random();
        let inserted = storage::oauth::insert_code(
            &state.db,
            &storage::oauth::NewCode {
                code_hash: &oauth::code_hash(&code),
                client_id: &g.client_id,
                redirect_uri: &g.redirect_uri,
                scope: &g.scope,
                device_id: &g.device_id,
                user_id: &user_id,
                code_challenge: &g.code_challenge,
                upstream: g.upstream.as_ref().map(|u| &u.0),
                expires_ts: now_ms() + state.config.oauth.code_lifetime_secs as i64 * 1000,
            },
        )
        .await;
        if let Err(e) = inserted {
            tracing::error!(error = %e, "code insert failed");
            return page_error(StatusCode::INTERNAL_SERVER_ERROR, "Erreur interne.", "Internal error.");
        }
        p.push(("code", &code));
    } else {
        p.push(("error", "access_denied"));
        p.push(("error_description", "The user denied the request"));
    }
    if let Some(s) = &g.state {
        p.push(("state", s));
    }
    let mut resp = redirect(StatusCode::SEE_OTHER, &oauth::client_redirect(&g.redirect_uri, &g.response_mode, &p));
    if let Ok(v) =
        HeaderValue::from_str(&format!("{}=; Path=/_parvis/oauth2; Max-Age=0", grant_cookie_name(&g.grant_id)))
    {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

// ---------------------------------------------------------------- token and revocation

/// `POST` token endpoint.
pub async fn token(State(state): State<AppState>, ClientIp(ip): ClientIp, body: Bytes) -> Response {
    if enabled(&state).is_err() {
        return oauth_error(StatusCode::NOT_FOUND, "not_found", "the OAuth 2.0 API is not enabled");
    }
    let f = match params(&body) {
        Ok(f) => f,
        Err(e) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &e),
    };
    if state.rate_limits.check(&state.rate_limits.login_per_ip, &ip.to_string()).is_err() {
        return oauth_error(StatusCode::TOO_MANY_REQUESTS, "slow_down", "too many requests");
    }
    let client_id = f.get("client_id").map(String::as_str).unwrap_or("");
    match storage::oauth::client(&state.db, client_id).await {
        Ok(Some(_)) => {}
        Ok(None) => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "unknown client_id"),
        Err(_) => return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal error"),
    }
    let get = |k: &str| f.get(k).map(String::as_str);
    let result = match get("grant_type") {
        Some("authorization_code") => {
            let (Some(code), Some(redirect_uri), Some(verifier)) =
                (get("code"), get("redirect_uri"), get("code_verifier"))
            else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "code, redirect_uri and code_verifier are required",
                );
            };
            oauth::exchange_code(&state, code, client_id, redirect_uri, verifier).await
        }
        Some("refresh_token") => {
            let Some(rt) = get("refresh_token") else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "refresh_token is required");
            };
            oauth::refresh(&state, rt, client_id).await
        }
        Some(_) => return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "unsupported grant_type"),
        None => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "grant_type is required"),
    };
    match result {
        Ok(t) => no_store(
            axum::Json(json!({
                "access_token": t.access_token,
                "token_type": "Bearer",
                "expires_in": t.expires_in,
                "refresh_token": t.refresh_token,
                "scope": t.scope,
            }))
            .into_response(),
        ),
        Err(e) => {
            tracing::info!(error = e.error, description = %e.description, "token request refused");
            oauth_error(StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST), e.error, &e.description)
        }
    }
}

/// `POST` revocation endpoint (RFC 7009): the device of the token is logged out.
pub async fn revoke(State(state): State<AppState>, body: Bytes) -> Response {
    if enabled(&state).is_err() {
        return oauth_error(StatusCode::NOT_FOUND, "not_found", "the OAuth 2.0 API is not enabled");
    }
    let f = match params(&body) {
        Ok(f) => f,
        Err(e) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &e),
    };
    let Some(token) = f.get("token").filter(|t| !t.is_empty()) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "token is required");
    };
    if let Some(hint) = f.get("token_type_hint")
        && !matches!(hint.as_str(), "access_token" | "refresh_token")
    {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_token_type",
            "token_type_hint must be access_token or refresh_token",
        );
    }
    match oauth::revoke(&state, token).await {
        Ok(()) => no_store(StatusCode::OK.into_response()),
        Err(e) => {
            oauth_error(StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST), e.error, &e.description)
        }
    }
}
