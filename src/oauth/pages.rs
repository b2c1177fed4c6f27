//! The OAuth login, consent and account pages (French first, English beside it). Every
//! interpolated value is escaped; forms carry a CSRF token and the cookies are `SameSite=Lax`.

use axum::http::StatusCode;
use axum::response::Response;

use crate::sso::pages::{escape, page};

/// A provider button: label and link.
pub type Link = (String, String);

/// The login page of an authorization request or of the account pages.
pub fn login(
    client: Option<&str>,
    providers: &[Link],
    password_action: Option<(&str, &[(&str, &str)])>,
    error: Option<&str>,
    hint: Option<&str>,
) -> Response {
    let mut body = String::from("<h1>Connexion</h1>");
    if let Some(c) = client {
        body.push_str(&format!(
            "<p>Connectez-vous pour continuer vers <strong>{c}</strong>.</p>\
             <p class=\"en\" lang=\"en\">Sign in to continue to <strong>{c}</strong>.</p>",
            c = escape(c)
        ));
    }
    if let Some(e) = error {
        body.push_str(&format!("<p role=\"alert\"><strong>{}</strong></p>", escape(e)));
    }
    for (name, href) in providers {
        body.push_str(&format!("<p><a class=\"button\" href=\"{}\">{}</a></p>", escape(href), escape(name)));
    }
    if let Some((action, hidden)) = password_action {
        let hidden: String = hidden
            .iter()
            .map(|(k, v)| format!("<input type=\"hidden\" name=\"{}\" value=\"{}\">", escape(k), escape(v)))
            .collect();
        body.push_str(&format!(
            "<form method=\"post\" action=\"{action}\">{hidden}\
             <p><label>Identifiant / User name<br><input name=\"username\" autocomplete=\"username\" value=\"{hint}\" required></label></p>\
             <p><label>Mot de passe / Password<br><input name=\"password\" type=\"password\" autocomplete=\"current-password\" required></label></p>\
             <p><button type=\"submit\">Se connecter / Sign in</button></p></form>",
            action = escape(action),
            hint = escape(hint.unwrap_or("")),
        ));
    }
    page(if error.is_some() { StatusCode::UNAUTHORIZED } else { StatusCode::OK }, "Connexion / Sign in", &body)
}

/// The consent page: which client, for which account and device.
pub fn consent(
    client_name: &str,
    client_uri: &str,
    user_id: &str,
    device_id: &str,
    action: &str,
    hidden: &[(&str, &str)],
) -> Response {
    let hidden: String = hidden
        .iter()
        .map(|(k, v)| format!("<input type=\"hidden\" name=\"{}\" value=\"{}\">", escape(k), escape(v)))
        .collect();
    page(
        StatusCode::OK,
        "Autoriser l'application ? / Allow the application?",
        &format!(
            "<h1>Autoriser {name} ?</h1>\
             <p><strong>{name}</strong> (<code>{uri}</code>) demande l'accès complet à votre compte <code>{user}</code> \
             comme appareil <code>{device}</code> : lire et envoyer vos messages, gérer vos salons et vos clés.</p>\
             <p class=\"en\" lang=\"en\"><strong>{name}</strong> (<code>{uri}</code>) asks for full access to your account \
             <code>{user}</code> as device <code>{device}</code>: read and send your messages, manage your rooms and keys.</p>\
             <form method=\"post\" action=\"{action}\">{hidden}\
             <button type=\"submit\" name=\"action\" value=\"allow\">Autoriser / Allow</button> \
             <button type=\"submit\" name=\"action\" value=\"deny\">Refuser / Deny</button></form>",
            name = escape(client_name),
            uri = escape(client_uri),
            user = escape(user_id),
            device = escape(device_id),
            action = escape(action),
        ),
    )
}

/// A page with a message and a link onwards (used by the account pages).
pub fn message(title: &str, fr: &str, en: &str, link: Option<(&str, &str)>) -> Response {
    let link = link
        .map(|(href, label)| format!("<p><a href=\"{}\">{}</a></p>", escape(href), escape(label)))
        .unwrap_or_default();
    page(
        StatusCode::OK,
        title,
        &format!("<h1>{}</h1><p>{}</p><p class=\"en\" lang=\"en\">{}</p>{link}", escape(title), escape(fr), escape(en)),
    )
}

/// A confirmation form (POST with CSRF).
pub fn confirm(title: &str, fr: &str, en: &str, action: &str, hidden: &[(&str, &str)], button: &str) -> Response {
    let hidden: String = hidden
        .iter()
        .map(|(k, v)| format!("<input type=\"hidden\" name=\"{}\" value=\"{}\">", escape(k), escape(v)))
        .collect();
    page(
        StatusCode::OK,
        title,
        &format!(
            "<h1>{t}</h1><p>{fr}</p><p class=\"en\" lang=\"en\">{en}</p>\
             <form method=\"post\" action=\"{a}\">{hidden}<button type=\"submit\">{b}</button></form>\
             <p><a href=\"{back}\">Annuler / Cancel</a></p>",
            t = escape(title),
            fr = escape(fr),
            en = escape(en),
            a = escape(action),
            b = escape(button),
            back = crate::oauth::ACCOUNT_PATH,
        ),
    )
}

/// Raw page body built by the account module from escaped parts.
pub fn raw(title: &str, body: &str) -> Response {
    page(StatusCode::OK, title, body)
}
