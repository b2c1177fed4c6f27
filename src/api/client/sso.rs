//! The browser side of single sign-on (`sso`): `/login/sso/redirect`, the provider callback,
//! the UIA fallback page for `m.login.sso`, back-channel logout and RP-initiated logout.
//! Handlers only translate between HTTP and [`crate::sso`].

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, ClientIp, Path, Query};
use crate::sso::{self, SsoError, StartedFlow, pages};
use crate::state::AppState;
use crate::storage::{self, now_ms};

/// Longest `redirectUrl` accepted.
const MAX_REDIRECT_URL: usize = 2048;

#[derive(Deserialize)]
pub struct RedirectQuery {
    #[serde(rename = "redirectUrl")]
    redirect_url: Option<String>,
}

fn check_enabled(state: &AppState) -> ApiResult<()> {
    if state.sso.enabled() {
        Ok(())
    } else {
        Err(Error::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "Single sign-on is not configured on this server"))
    }
}

fn client_redirect(q: &RedirectQuery) -> ApiResult<&str> {
    let url = q.redirect_url.as_deref().ok_or_else(|| Error::missing_param("redirectUrl is required"))?;
    if url.len() > MAX_REDIRECT_URL {
        return Err(Error::invalid_param(format!("redirectUrl is longer than {MAX_REDIRECT_URL} bytes")));
    }
    match url::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "javascript" | "data" | "vbscript") => {
            Err(Error::invalid_param("redirectUrl must not be a script URL"))
        }
        Ok(_) => Ok(url),
        Err(_) => Err(Error::invalid_param("redirectUrl must be an absolute URL")),
    }
}

/// A redirect to the provider, with the browser-binding cookie.
pub(crate) fn to_provider(state: &AppState, flow: StartedFlow) -> Response {
    let secure = state.config.public_baseurl.as_deref().is_some_and(|b| b.starts_with("https:"));
    let cookie = format!(
        "{}={}; Path=/_synapse/client/oidc; Max-Age={}; HttpOnly; SameSite=Lax{}",
        flow.cookie_name,
        flow.cookie_value,
        flow.cookie_max_age_secs,
        if secure { "; Secure" } else { "" }
    );
    let mut resp = StatusCode::FOUND.into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&flow.url) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        h.insert(header::SET_COOKIE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `GET /login/sso/redirect?redirectUrl=`: straight to the only provider, or a page to choose.
pub async fn redirect(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(q): Query<RedirectQuery>,
) -> ApiResult<Response> {
    check_enabled(&state)?;
    state.rate_limits.check(&state.rate_limits.login_per_ip, &ip.to_string())?;
    let redirect = client_redirect(&q)?;
    let providers: Vec<_> = state.sso.providers().collect();
    if let [only] = providers.as_slice() {
        let flow = state.sso.start(&state.db, &only.id, Some(redirect), None).await.map_err(page_error_to_api)?;
        return Ok(to_provider(&state, flow));
    }
    let links = providers
        .iter()
        .map(|p| {
            let q = crate::http::web::query(&[("redirectUrl", redirect)]);
            (p.name.clone(), format!("/_matrix/client/v3/login/sso/redirect/{}?{q}", p.id))
        })
        .collect::<Vec<_>>();
    Ok(pages::pick_provider(&links))
}

/// `GET /login/sso/redirect/{idpId}?redirectUrl=`.
pub async fn redirect_idp(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(idp): Path<String>,
    Query(q): Query<RedirectQuery>,
) -> ApiResult<Response> {
    check_enabled(&state)?;
    state.rate_limits.check(&state.rate_limits.login_per_ip, &ip.to_string())?;
    let redirect = client_redirect(&q)?;
    if state.sso.provider(&idp).is_none() {
        return Err(Error::not_found(format!("Unknown identity provider {idp}")));
    }
    let flow = state.sso.start(&state.db, &idp, Some(redirect), None).await.map_err(page_error_to_api)?;
    Ok(to_provider(&state, flow))
}

/// Before the browser reaches the provider, errors are Matrix errors (the client may show them).
fn page_error_to_api(e: SsoError) -> Error {
    let errcode = match e.status {
        StatusCode::NOT_FOUND => "M_NOT_FOUND",
        StatusCode::INTERNAL_SERVER_ERROR => "M_UNKNOWN",
        StatusCode::BAD_GATEWAY => "M_UNKNOWN",
        _ => "M_FORBIDDEN",
    };
    Error::new(e.status, errcode, e.en)
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// `GET /_synapse/client/oidc/callback`: the provider's answer.
pub async fn callback(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Response {
    match handle_callback(&state, &ip.to_string(), &headers, q).await {
        Ok(resp) => resp,
        Err(e) => e.render(),
    }
}

async fn handle_callback(
    state: &AppState,
    ip: &str,
    headers: &HeaderMap,
    q: CallbackQuery,
) -> Result<Response, SsoError> {
    if state.rate_limits.check(&state.rate_limits.login_per_ip, ip).is_err() {
        return Err(SsoError {
            status: StatusCode::TOO_MANY_REQUESTS,
            fr: "Trop de tentatives de connexion. Patientez un moment.".into(),
            en: "Too many login attempts. Please wait a moment.".into(),
        });
    }
    let Some(st) = q.state.as_deref().filter(|s| !s.is_empty() && s.len() <= 512) else {
        return Err(SsoError {
            status: StatusCode::BAD_REQUEST,
            fr: "Paramètre state absent.".into(),
            en: "The state parameter is missing.".into(),
        });
    };
    if let Some(err) = q.error.as_deref() {
        // The request is over either way: consume it so that it cannot be finished later.
        let _ = storage::sso::take_auth_session(&state.db, &crate::auth::hash_token(st)).await;
        let desc = q.error_description.as_deref().unwrap_or("");
        let shown: String = format!("{err} {desc}").chars().take(300).collect();
        tracing::info!(error = err, description = desc, "SSO provider returned an error");
        return Err(SsoError {
            status: StatusCode::FORBIDDEN,
            fr: format!("Le fournisseur d'identité a refusé la connexion : {shown}"),
            en: format!("The identity provider refused the login: {shown}"),
        });
    }
    let code = q.code.as_deref().unwrap_or("");
    let browser = crate::http::web::cookie(headers, &sso::cookie_name(st));
    let ident = state.sso.finish(&state.db, st, code, browser).await?;
    let mut resp = match &ident.uia_session_id {
        Some(session) => finish_uia(state, session, &ident).await?,
        None => {
            let user_id = state.sso.resolve_user(state, &ident).await?;
            let token = state.sso.issue_login_token(&state.db, &user_id, &ident).await?;
            let target = ident.client_redirect_url.as_deref().unwrap_or("");
            let mut url = url::Url::parse(target).map_err(|_| SsoError {
                status: StatusCode::BAD_REQUEST,
                fr: "Adresse de retour invalide.".into(),
                en: "Invalid return address.".into(),
            })?;
            url.query_pairs_mut().append_pair("loginToken", &token);
            tracing::info!(user_id, provider = %ident.provider, "SSO login");
            if state.sso.whitelisted(target) {
                let mut r = StatusCode::FOUND.into_response();
                if let Ok(v) = HeaderValue::from_str(url.as_str()) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            } else {
                pages::confirm_redirect(&user_id, url.as_str())
            }
        }
    };
    // The binding cookie has served.
    if let Ok(v) = HeaderValue::from_str(&format!("{}=; Path=/_synapse/client/oidc; Max-Age=0", sso::cookie_name(st))) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(resp)
}

async fn finish_uia(state: &AppState, session: &str, ident: &sso::Identity) -> Result<Response, SsoError> {
    let min_ts = now_ms() - state.config.auth.uia_session_lifetime_secs as i64 * 1000;
    let s = storage::uia::get(&state.db, session, min_ts).await?.ok_or_else(|| SsoError {
        status: StatusCode::BAD_REQUEST,
        fr: "Cette demande d'authentification a expiré.".into(),
        en: "This authentication request has expired.".into(),
    })?;
    let linked = state.sso.linked_user(&state.db, ident).await?;
    if linked.is_none() || linked != s.user_id {
        tracing::warn!(session, provider = %ident.provider, "SSO re-authentication by another account refused");
        return Err(SsoError {
            status: StatusCode::FORBIDDEN,
            fr: "Vous vous êtes authentifié avec un autre compte que celui de la session.".into(),
            en: "You authenticated as another account than the session's.".into(),
        });
    }
    storage::uia::complete_stage(&state.db, session, sso::UIA_STAGE, None).await?;
    Ok(pages::uia_done())
}

#[derive(Deserialize)]
pub struct FallbackQuery {
    session: Option<String>,
    idp: Option<String>,
}

/// `GET /_matrix/client/v3/auth/m.login.sso/fallback/web?session=`: the spec's fallback page
/// for the `m.login.sso` stage. With `idp`, starts the provider login bound to the session.
pub async fn uia_fallback(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(q): Query<FallbackQuery>,
) -> Response {
    match handle_fallback(&state, &ip.to_string(), q).await {
        Ok(r) => r,
        Err(e) => e.render(),
    }
}

async fn handle_fallback(state: &AppState, ip: &str, q: FallbackQuery) -> Result<Response, SsoError> {
    let bad = |fr: &str, en: &str| SsoError { status: StatusCode::BAD_REQUEST, fr: fr.into(), en: en.into() };
    if state.rate_limits.check(&state.rate_limits.login_per_ip, ip).is_err() {
        return Err(SsoError {
            status: StatusCode::TOO_MANY_REQUESTS,
            fr: "Trop de tentatives. Patientez un moment.".into(),
            en: "Too many attempts. Please wait a moment.".into(),
        });
    }
    let session = q
        .session
        .as_deref()
        .filter(|s| !s.is_empty() && s.len() <= 255)
        .ok_or_else(|| bad("Paramètre session absent.", "The session parameter is missing."))?;
    let min_ts = now_ms() - state.config.auth.uia_session_lifetime_secs as i64 * 1000;
    let s = storage::uia::get(&state.db, session, min_ts).await?.ok_or_else(|| {
        bad("Session d'authentification inconnue ou expirée.", "Unknown or expired authentication session.")
    })?;
    let Some(user_id) = s.user_id else {
        return Err(bad(
            "Cette session ne s'authentifie pas par SSO.",
            "This session does not authenticate through SSO.",
        ));
    };
    let linked: Vec<String> =
        storage::sso::external_ids(&state.db, &user_id).await?.into_iter().map(|e| e.auth_provider).collect();
    let usable: Vec<_> = state.sso.providers().filter(|p| linked.contains(&p.id)).collect();
    if usable.is_empty() {
        return Err(bad(
            "Ce compte n'est lié à aucun fournisseur d'identité.",
            "This account is not linked to any identity provider.",
        ));
    }
    match q.idp.as_deref() {
        Some(idp) => {
            if !usable.iter().any(|p| p.id == idp) {
                return Err(bad("Fournisseur d'identité inconnu.", "Unknown identity provider."));
            }
            let flow = state.sso.start(&state.db, idp, None, Some(session)).await?;
            Ok(to_provider(state, flow))
        }
        None => {
            let links = usable
                .iter()
                .map(|p| {
                    let q = crate::http::web::query(&[("session", session), ("idp", &p.id)]);
                    (p.name.clone(), format!("/_matrix/client/v3/auth/m.login.sso/fallback/web?{q}"))
                })
                .collect::<Vec<_>>();
            Ok(pages::uia_start(&links))
        }
    }
}

/// `POST /_synapse/client/oidc/backchannel_logout` (OIDC Back-Channel Logout 1.0): the provider
/// ends a session; its devices are logged out.
pub async fn backchannel_logout(State(state): State<AppState>, body: Bytes) -> Response {
    let token = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body)
        .ok()
        .and_then(|pairs| pairs.into_iter().find(|(k, _)| k == "logout_token").map(|(_, v)| v));
    let result = match token {
        Some(t) => state.sso.backchannel_logout(&state.db, &t).await,
        None => Err("logout_token is required".into()),
    };
    let mut resp = match result {
        Ok(devices) => {
            let mut ok = true;
            for (user_id, device_id) in &devices {
                if let Err(e) = crate::auth::delete_devices(&state, user_id, std::slice::from_ref(device_id)).await {
                    tracing::error!(user_id, device_id, error = %e.message, "back-channel logout failed");
                    ok = false;
                }
            }
            tracing::info!(devices = devices.len(), "SSO back-channel logout");
            if ok {
                StatusCode::OK.into_response()
            } else {
                (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({ "error": "server_error" }))).into_response()
            }
        }
        Err(msg) => {
            tracing::warn!(error = %msg, "back-channel logout token refused");
            (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": "invalid_request", "error_description": msg })))
                .into_response()
        }
    };
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `POST /_parvis/client/v1/logout/sso`: logs this device out (as `/logout`) and answers where
/// to send the browser to end the provider session too (RP-initiated logout), when the device
/// was logged in through a provider that supports it.
pub async fn logout_sso(State(state): State<AppState>, auth: Auth) -> ApiResult<axum::Json<Value>> {
    let session = storage::sso::device_session(&state.db, &auth.user_id, &auth.device_id).await?;
    let url = match &session {
        Some(s) => state.sso.end_session_url(&s.provider, s.id_token.as_deref()).await,
        None => None,
    };
    crate::auth::delete_devices(&state, &auth.user_id, &[auth.device_id.to_string()]).await?;
    storage::tokens::delete_access(&state.db, &auth.token_hash).await?;
    state.auth.evict_one(&auth.token_hash).await;
    Ok(axum::Json(json!({ "end_session_url": url })))
}

/// `GET /_parvis/client/sso/logged_out`: where RP-initiated logout lands by default.
pub async fn logged_out() -> Response {
    pages::logged_out()
}
