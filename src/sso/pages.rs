//! The few HTML pages of the SSO flow, in French and English (the agents are French; partners
//! and visitors may not be). Every interpolated value is escaped.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

pub use crate::http::web::escape;

/// A page: `body` is trusted HTML built by this module's callers from escaped parts.
pub fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"fr\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:36em;margin:3em auto;padding:0 1em;color:#17191c}}\
         .en{{color:#5c6470}}a.button{{display:inline-block;padding:.6em 1.2em;margin:.3em 0;background:#0b6e4f;color:#fff;\
         border-radius:6px;text-decoration:none}}code{{word-break:break-all}}</style></head>\
         <body>{body}</body></html>",
        title = escape(title),
    );
    let mut resp = (status, html).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}

/// An error page: what went wrong, in both languages, with a hint of what to do.
pub fn error(status: StatusCode, fr: &str, en: &str) -> Response {
    page(
        status,
        "Connexion impossible / Login failed",
        &format!(
            "<h1>Connexion impossible</h1><p>{}</p><p class=\"en\" lang=\"en\"><strong>Login failed.</strong> {}</p>",
            escape(fr),
            escape(en)
        ),
    )
}

/// Asks the user to confirm before a login token goes to a client URL not in `client_whitelist`.
pub fn confirm_redirect(user_id: &str, redirect: &str) -> Response {
    let host = url::Url::parse(redirect)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| redirect.to_owned());
    page(
        StatusCode::OK,
        "Continuer ? / Continue?",
        &format!(
            "<h1>Continuer vers {host} ?</h1>\
             <p>Vous êtes connecté en tant que <code>{user}</code>. L'application <code>{host}</code> \
             demande l'accès à votre compte. Continuez seulement si vous venez de lancer cette connexion.</p>\
             <p class=\"en\" lang=\"en\">You are signed in as <code>{user}</code>. The application <code>{host}</code> \
             asks for access to your account. Only continue if you just started this login.</p>\
             <p><a class=\"button\" href=\"{href}\">Continuer / Continue</a></p>",
            host = escape(&host),
            user = escape(user_id),
            href = escape(redirect),
        ),
    )
}

/// The identity provider picker of `/login/sso/redirect` without a provider.
pub fn pick_provider(links: &[(String, String)]) -> Response {
    let buttons: String = links
        .iter()
        .map(|(name, href)| format!("<p><a class=\"button\" href=\"{}\">{}</a></p>", escape(href), escape(name)))
        .collect();
    page(
        StatusCode::OK,
        "Connexion / Sign in",
        &format!(
            "<h1>Connexion</h1><p>Choisissez votre compte.</p><p class=\"en\" lang=\"en\">Choose how to sign in.</p>{buttons}"
        ),
    )
}

/// The start page of the UIA fallback for `m.login.sso`.
pub fn uia_start(links: &[(String, String)]) -> Response {
    let buttons: String = links
        .iter()
        .map(|(name, href)| format!("<p><a class=\"button\" href=\"{}\">{}</a></p>", escape(href), escape(name)))
        .collect();
    page(
        StatusCode::OK,
        "Confirmez votre identité / Confirm your identity",
        &format!(
            "<h1>Confirmez votre identité</h1><p>Cette action demande de vous authentifier à nouveau.</p>\
             <p class=\"en\" lang=\"en\">This action needs you to sign in again.</p>{buttons}"
        ),
    )
}

/// The end page of the UIA fallback: tells the client the stage is done (spec: fallback).
pub fn uia_done() -> Response {
    page(
        StatusCode::OK,
        "Authentification réussie / Authentication complete",
        "<h1>Authentification réussie</h1><p>Vous pouvez fermer cette fenêtre.</p>\
         <p class=\"en\" lang=\"en\">Authentication complete: you may close this window.</p>\
         <script>if (window.onAuthDone) { window.onAuthDone(); } \
         else if (window.opener && window.opener.postMessage) { window.opener.postMessage(\"authDone\", \"*\"); }</script>",
    )
}

/// After RP-initiated logout, when no client page asked to be shown.
pub fn logged_out() -> Response {
    page(
        StatusCode::OK,
        "Déconnecté / Signed out",
        "<h1>Vous êtes déconnecté</h1><p class=\"en\" lang=\"en\">You are signed out.</p>",
    )
}
