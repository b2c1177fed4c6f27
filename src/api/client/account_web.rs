//! The account management pages (`account_management_uri` of the OAuth metadata; spec
//! "Account management", MSC4191 actions): profile, devices (list, view, sign out), account
//! deactivation and cross-signing reset approval (the `m.oauth` UIA stage). The browser signs
//! in as on the OAuth login page (an SSO provider or the password form); the session is a
//! cookie (`parvis_account`, stored hashed) and every form carries its CSRF token.

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::http::extract::ClientIp;
use crate::oauth::{self, pages};
use crate::sso::pages::{error as page_error, escape};
use crate::state::AppState;
use crate::storage::{self, now_ms};

const COOKIE: &str = "parvis_account";
const BASE: &str = oauth::ACCOUNT_PATH;

fn params(raw: &[u8]) -> std::collections::BTreeMap<String, String> {
    url::form_urlencoded::parse(raw)
        .filter(|(k, v)| k.len() <= 64 && v.len() <= 4096)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn see_other(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn internal() -> Response {
    page_error(StatusCode::INTERNAL_SERVER_ERROR, "Erreur interne.", "Internal error.")
}

/// `action` and `device_id` of the page asked for, checked (never a URL: no open redirect).
fn target(q: &std::collections::BTreeMap<String, String>) -> String {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    if let Some(a) = q.get("action").filter(|a| oauth::ACCOUNT_ACTIONS.contains(&a.as_str())) {
        pairs.push(("action", a));
    }
    if let Some(d) = q.get("device_id").filter(|d| !d.is_empty() && d.len() <= 255) {
        pairs.push(("device_id", d));
    }
    if pairs.is_empty() { BASE.to_owned() } else { format!("{BASE}?{}", crate::http::web::query(&pairs)) }
}

/// The page to show after signing in: the `next` parameter, reduced to a checked target.
fn next_of(q: &std::collections::BTreeMap<String, String>) -> String {
    q.get("next")
        .map_or_else(|| BASE.to_owned(), |n| target(&params(n.split_once('?').map_or("", |(_, q)| q).as_bytes())))
}

/// The signed-in user and the session's CSRF token.
async fn session(state: &AppState, headers: &HeaderMap) -> Option<(String, String)> {
    let c = crate::http::web::cookie(headers, COOKIE)?;
    storage::oauth::web_session(&state.db, &crate::auth::hash_token(c)).await.ok().flatten()
}

async fn start_session(state: &AppState, user_id: &str, to: &str) -> Response {
    let token = oauth::random();
    let csrf = oauth::random();
    let lifetime = state.config.oauth.account_session_lifetime_secs;
    if storage::oauth::insert_web_session(
        &state.db,
        &crate::auth::hash_token(&token),
        user_id,
        &csrf,
        now_ms() + lifetime as i64 * 1000,
    )
    .await
    .is_err()
    {
        return internal();
    }
    let secure = state.config.public_baseurl.as_deref().is_some_and(|b| b.starts_with("https:"));
    let mut r = see_other(to);
    let c = format!(
        "{COOKIE}={token}; Path={BASE}; Max-Age={lifetime}; HttpOnly; SameSite=Lax{}",
        if secure { "; Secure" } else { "" }
    );
    if let Ok(v) = HeaderValue::from_str(&c) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    tracing::info!(user_id, "account page session started");
    r
}

fn login_page(state: &AppState, next: &str, error: Option<&str>) -> Response {
    let providers: Vec<(String, String)> = state
        .sso
        .providers()
        .map(|p| {
            (p.name.clone(), format!("{BASE}upstream?{}", crate::http::web::query(&[("idp", &p.id), ("next", next)])))
        })
        .collect();
    let login_action = format!("{BASE}login");
    let hidden = [("next", next)];
    let password = state.config.oauth.password_login.then_some((login_action.as_str(), &hidden[..]));
    pages::login(None, &providers, password, error, None)
}

/// `GET /_parvis/account/?action=&device_id=`.
pub async fn page(State(state): State<AppState>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    if oauth::base(&state).is_none() {
        return page_error(StatusCode::NOT_FOUND, "Page introuvable.", "Not found.");
    }
    let q = params(query.as_deref().unwrap_or("").as_bytes());
    let next = target(&q);
    let Some((user_id, csrf)) = session(&state, &headers).await else {
        return login_page(&state, &next, None);
    };
    let action = q.get("action").map(String::as_str).unwrap_or("org.matrix.profile");
    let device = q.get("device_id").map(String::as_str);
    let form = |action: &str, device: Option<&str>, button: &str| -> String {
        format!(
            "<form method=\"post\" action=\"{BASE}action\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <input type=\"hidden\" name=\"action\" value=\"{}\"><input type=\"hidden\" name=\"device_id\" value=\"{}\">\
             <button type=\"submit\">{}</button></form>",
            escape(&csrf),
            escape(action),
            escape(device.unwrap_or("")),
            escape(button)
        )
    };
    match action {
        "org.matrix.devices_list" | "org.matrix.sessions_list" => {
            let devices = match storage::devices::list(&state.db, &user_id).await {
                Ok(d) => d,
                Err(_) => return internal(),
            };
            let mut rows = String::new();
            for d in &devices {
                let seen = d.last_seen_ts.map(|t| format!("{}", t / 1000)).unwrap_or_else(|| "—".into());
                rows.push_str(&format!(
                    "<tr><td><code>{id}</code></td><td>{name}</td><td data-ts=\"{seen}\">{seen}</td>\
                     <td><a href=\"{BASE}?action=org.matrix.device_view&amp;device_id={idq}\">Voir / View</a></td></tr>",
                    id = escape(&d.device_id),
                    name = escape(d.display_name.as_deref().unwrap_or("")),
                    idq = url::form_urlencoded::byte_serialize(d.device_id.as_bytes()).collect::<String>(),
                ));
            }
            pages::raw(
                "Appareils / Devices",
                &format!(
                    "<h1>Vos appareils</h1><p class=\"en\" lang=\"en\">Your devices</p>\
                     <table><tr><th>ID</th><th>Nom / Name</th><th>Vu / Last seen</th><th></th></tr>{rows}</table>\
                     <p><a href=\"{BASE}\">Profil / Profile</a></p>"
                ),
            )
        }
        "org.matrix.device_view"
        | "org.matrix.session_view"
        | "org.matrix.device_delete"
        | "org.matrix.session_end" => {
            let Some(device_id) = device else {
                return see_other(&format!("{BASE}?action=org.matrix.devices_list"));
            };
            let d = match storage::devices::get(&state.db, &user_id, device_id).await {
                Ok(Some(d)) => d,
                Ok(None) => return page_error(StatusCode::NOT_FOUND, "Appareil introuvable.", "Device not found."),
                Err(_) => return internal(),
            };
            let client = match storage::oauth::session(&state.db, &user_id, device_id).await {
                Ok(Some(s)) => match storage::oauth::client(&state.db, &s.client_id).await {
                    Ok(Some(c)) => oauth::client_display_name(&c.metadata.0),
                    _ => s.client_id,
                },
                _ => "—".into(),
            };
            pages::raw(
                "Appareil / Device",
                &format!(
                    "<h1>Appareil <code>{id}</code></h1><p>Nom / Name : {name}</p><p>Application : {client}</p>\
                     <p>Dernière adresse / Last IP : {ip}</p><h2>Déconnecter cet appareil / Sign out this device</h2>{f}\
                     <p><a href=\"{BASE}?action=org.matrix.devices_list\">Tous les appareils / All devices</a></p>",
                    id = escape(&d.device_id),
                    name = escape(d.display_name.as_deref().unwrap_or("")),
                    client = escape(&client),
                    ip = escape(d.last_seen_ip.as_deref().unwrap_or("—")),
                    f = form("org.matrix.device_delete", Some(device_id), "Déconnecter / Sign out"),
                ),
            )
        }
        "org.matrix.account_deactivate" => pages::confirm(
            "Désactiver le compte / Deactivate the account",
            "Votre compte sera désactivé définitivement : vous quitterez tous vos salons et ne pourrez plus vous connecter.",
            "Your account will be deactivated for good: you will leave every room and cannot sign in again.",
            &format!("{BASE}action"),
            &[("csrf", &csrf), ("action", "org.matrix.account_deactivate")],
            "Désactiver / Deactivate",
        ),
        "org.matrix.cross_signing_reset" => pages::confirm(
            "Réinitialiser la signature croisée / Reset cross-signing",
            "Votre application pourra remplacer vos clés de signature croisée pendant quelques minutes. Les autres appareils devront être vérifiés à nouveau.",
            "Your application will be allowed to replace your cross-signing keys for a few minutes. Your other devices will need verifying again.",
            &format!("{BASE}action"),
            &[("csrf", &csrf), ("action", "org.matrix.cross_signing_reset")],
            "Autoriser / Allow",
        ),
        _ => {
            // org.matrix.profile
            let profile = storage::profiles::get(&state.db, &user_id).await.ok().flatten().unwrap_or_default();
            let name = profile.get("displayname").and_then(|v| v.as_str()).unwrap_or("");
            let emails: String = storage::sso::threepids(&state.db, &user_id)
                .await
                .unwrap_or_default()
                .iter()
                .map(|t| format!("<li>{}</li>", escape(&t.address)))
                .collect();
            let mut providers = String::new();
            for e in storage::sso::external_ids(&state.db, &user_id).await.unwrap_or_default() {
                if let Some(p) = state.sso.provider(&e.auth_provider) {
                    providers.push_str(&format!("<li>{}", escape(&p.cfg.name)));
                    if let Some(url) = &p.cfg.password_change_url {
                        providers.push_str(&format!(
                            " — <a href=\"{}\">changer le mot de passe / change the password</a>",
                            escape(url)
                        ));
                    }
                    providers.push_str("</li>");
                }
            }
            pages::raw(
                "Votre compte / Your account",
                &format!(
                    "<h1>Votre compte</h1><p><code>{uid}</code></p>\
                     <form method=\"post\" action=\"{BASE}action\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                     <input type=\"hidden\" name=\"action\" value=\"org.matrix.profile\">\
                     <label>Nom affiché / Display name <input name=\"displayname\" value=\"{name}\" maxlength=\"256\"></label>\
                     <button type=\"submit\">Enregistrer / Save</button></form>\
                     <h2>Adresses / E-mail</h2><ul>{emails}</ul><h2>Connexion / Sign-in</h2><ul>{providers}</ul>\
                     <p><a href=\"{BASE}?action=org.matrix.devices_list\">Vos appareils / Your devices</a></p>\
                     <p><a href=\"{BASE}?action=org.matrix.account_deactivate\">Désactiver le compte / Deactivate the account</a></p>\
                     <form method=\"post\" action=\"{BASE}logout\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                     <button type=\"submit\">Quitter cette page / Sign out of this page</button></form>",
                    uid = escape(&user_id),
                    csrf = escape(&csrf),
                    name = escape(name),
                ),
            )
        }
    }
}

/// `GET /_parvis/account/upstream?idp=&next=`: sign in to the account pages at a provider.
pub async fn upstream(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let q = params(query.as_deref().unwrap_or("").as_bytes());
    let Some(base) = oauth::base(&state) else {
        return page_error(StatusCode::NOT_FOUND, "Page introuvable.", "Not found.");
    };
    let next = next_of(&q);
    let mut back = url::Url::parse(&format!("{base}{BASE}sso_done")).expect("base URL checked at start-up");
    back.query_pairs_mut().append_pair("next", &next);
    match state.sso.start(&state.db, q.get("idp").map(String::as_str).unwrap_or(""), Some(back.as_str()), None).await {
        Ok(flow) => super::sso::to_provider(&state, flow),
        Err(e) => e.render(),
    }
}

/// `GET /_parvis/account/sso_done?next=&loginToken=`: back from the provider.
pub async fn sso_done(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let q = params(query.as_deref().unwrap_or("").as_bytes());
    let next = next_of(&q);
    let Some(token) = q.get("loginToken") else {
        return page_error(StatusCode::BAD_REQUEST, "Jeton de connexion absent.", "The login token is missing.");
    };
    let taken = match state.db.acquire().await {
        Ok(mut c) => storage::sso::take_login_token(&mut c, &crate::auth::hash_token(token)).await,
        Err(e) => Err(e),
    };
    match taken {
        Ok(Some(t)) if t.expires_ts >= now_ms() => start_session(&state, &t.user_id, &next).await,
        Ok(_) => page_error(
            StatusCode::FORBIDDEN,
            "Jeton de connexion invalide ou expiré.",
            "Invalid or expired login token.",
        ),
        Err(_) => internal(),
    }
}

/// `POST /_parvis/account/login`: the password form.
pub async fn password_login(State(state): State<AppState>, ClientIp(ip): ClientIp, body: Bytes) -> Response {
    let f = params(&body);
    let next = next_of(&f);
    if !state.config.oauth.password_login || oauth::base(&state).is_none() {
        return page_error(
            StatusCode::FORBIDDEN,
            "Connexion par mot de passe désactivée.",
            "Password login is disabled.",
        );
    }
    match super::oauth::check_password(&state, &ip.to_string(), f.get("username"), f.get("password")).await {
        Ok(user_id) => start_session(&state, &user_id, &next).await,
        Err(msg) => login_page(&state, &next, Some(&msg)),
    }
}

/// `POST /_parvis/account/action`: what the forms ask, checked against the session's CSRF token.
pub async fn action(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let f = params(&body);
    let Some((user_id, csrf)) = session(&state, &headers).await else {
        return login_page(&state, BASE, None);
    };
    if !f.get("csrf").is_some_and(|c| bool::from(c.as_bytes().ct_eq(csrf.as_bytes()))) {
        return page_error(StatusCode::FORBIDDEN, "Formulaire invalide.", "Invalid form.");
    }
    match f.get("action").map(String::as_str) {
        Some("org.matrix.profile") => {
            let name = f.get("displayname").map(|s| s.trim()).unwrap_or("");
            let value = (!name.is_empty()).then(|| serde_json::json!(name));
            match crate::users::profile::set_field(&state, &user_id, "displayname", value).await {
                Ok(()) => see_other(BASE),
                Err(e) => page_error(StatusCode::BAD_REQUEST, &e.message, &e.message),
            }
        }
        Some("org.matrix.device_delete" | "org.matrix.session_end") => {
            let Some(device_id) = f.get("device_id").filter(|d| !d.is_empty()) else {
                return page_error(StatusCode::BAD_REQUEST, "Appareil absent.", "No device given.");
            };
            match crate::auth::delete_devices(&state, &user_id, std::slice::from_ref(device_id)).await {
                Ok(()) => {
                    tracing::info!(user_id, device_id, "device signed out from the account page");
                    pages::message(
                        "Appareil déconnecté / Device signed out",
                        "L'appareil est déconnecté.",
                        "The device is signed out.",
                        Some((&format!("{BASE}?action=org.matrix.devices_list"), "Vos appareils / Your devices")),
                    )
                }
                Err(_) => internal(),
            }
        }
        Some("org.matrix.account_deactivate") => {
            match crate::users::deactivate::deactivate(&state, &user_id, false).await {
                Ok(()) => pages::message(
                    "Compte désactivé / Account deactivated",
                    "Votre compte est désactivé.",
                    "Your account is deactivated.",
                    None,
                ),
                Err(_) => internal(),
            }
        }
        Some("org.matrix.cross_signing_reset") => {
            let until = now_ms() + state.config.oauth.cross_signing_reset_secs as i64 * 1000;
            match storage::oauth::approve_cross_signing_reset(&state.db, &user_id, until).await {
                Ok(()) => pages::message(
                    "Réinitialisation autorisée / Reset allowed",
                    "Retournez dans votre application pour terminer la réinitialisation.",
                    "Go back to your application to finish the reset.",
                    None,
                ),
                Err(_) => internal(),
            }
        }
        _ => page_error(StatusCode::BAD_REQUEST, "Action inconnue.", "Unknown action."),
    }
}

/// `POST /_parvis/account/logout`: ends the account page session.
pub async fn logout(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let f = params(&body);
    if let (Some((_, csrf)), Some(c)) = (session(&state, &headers).await, crate::http::web::cookie(&headers, COOKIE))
        && f.get("csrf").is_some_and(|x| bool::from(x.as_bytes().ct_eq(csrf.as_bytes())))
    {
        let _ = storage::oauth::delete_web_session(&state.db, &crate::auth::hash_token(c)).await;
    }
    let mut r = see_other(BASE);
    if let Ok(v) = HeaderValue::from_str(&format!("{COOKIE}=; Path={BASE}; Max-Age=0")) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}
