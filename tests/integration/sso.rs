//! Single sign-on against a real LemonLDAP::NG (tests/peers/lemonldap/setup.sh, which `.ci/run`
//! starts): the browser side is driven by an HTTP client with a cookie jar per host (portal
//! login form, redirects, callback), the client side by plain Matrix requests.
//!
//! Each test runs its Parvis on a fixed loopback port whose callback is registered at the
//! provider (gen_conf.py: 19091-19096). Without `PARVIS_TEST_LLNG_ISSUER` the tests say how to
//! run them and pass; in CI (`CI` set) they fail instead.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use serde_json::{Value, json};

use crate::common::*;

pub(crate) fn issuer() -> Option<String> {
    match std::env::var("PARVIS_TEST_LLNG_ISSUER") {
        Ok(i) if !i.is_empty() => Some(i),
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "CI must run the SSO tests: .ci/run starts LemonLDAP::NG and sets PARVIS_TEST_LLNG_ISSUER"
            );
            eprintln!(
                "SKIPPED: no LemonLDAP::NG. Run `sudo bash tests/peers/lemonldap/setup.sh`, then \
                 `PARVIS_TEST_LLNG_ISSUER=http://auth.sso.localhost:19080/ cargo test --test integration sso`"
            );
            None
        }
    }
}

fn llng_home() -> std::path::PathBuf {
    std::env::var("PARVIS_TEST_LLNG_HOME")
        .map(Into::into)
        .unwrap_or_else(|_| std::env::temp_dir().join("parvis-lemonldap"))
}

const REDIRECT: &str = "https://element.ville.example/#/login";

/// A browser: follows nothing by itself, keeps cookies per host.
pub(crate) struct Browser {
    http: reqwest::Client,
    jar: HashMap<String, HashMap<String, String>>,
}

pub(crate) struct Page {
    pub status: StatusCode,
    pub location: Option<String>,
    pub body: String,
    pub url: String,
}

impl Browser {
    pub(crate) fn new() -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            jar: HashMap::new(),
        }
    }

    fn host_of(url: &str) -> String {
        let u = url::Url::parse(url).unwrap();
        format!("{}:{}", u.host_str().unwrap(), u.port_or_known_default().unwrap())
    }

    async fn send(&mut self, rb: reqwest::RequestBuilder, url: &str) -> Page {
        let host = Self::host_of(url);
        let cookies =
            self.jar.get(&host).map(|c| c.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; "));
        let rb = match cookies {
            Some(c) if !c.is_empty() => rb.header(COOKIE, c),
            _ => rb,
        };
        let resp = rb.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        for sc in resp.headers().get_all(SET_COOKIE) {
            let sc = sc.to_str().unwrap();
            let first = sc.split(';').next().unwrap();
            let (k, v) = first.split_once('=').unwrap();
            let jar = self.jar.entry(host.clone()).or_default();
            if v.is_empty() || sc.contains("Max-Age=0") || sc.to_ascii_lowercase().contains("expires=thu, 01 jan 1970")
            {
                jar.remove(k.trim());
            } else {
                jar.insert(k.trim().to_owned(), v.to_owned());
            }
        }
        let status = resp.status();
        let location = resp
            .headers()
            .get(LOCATION)
            .map(|l| url::Url::parse(url).unwrap().join(l.to_str().unwrap()).unwrap().to_string());
        let body = resp.text().await.unwrap();
        Page { status, location, body, url: url.to_owned() }
    }

    pub(crate) async fn get(&mut self, url: &str) -> Page {
        let rb = self.http.get(url);
        self.send(rb, url).await
    }

    pub(crate) async fn post_form(&mut self, url: &str, fields: &[(String, String)]) -> Page {
        let rb = self
            .http
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string(fields).unwrap());
        self.send(rb, url).await
    }

    fn has_cookie_for(&self, url: &str, prefix: &str) -> bool {
        self.jar.get(&Self::host_of(url)).is_some_and(|c| c.keys().any(|k| k.starts_with(prefix)))
    }
}

fn html_unescape(s: &str) -> String {
    s.replace("&amp;", "&").replace("&quot;", "\"").replace("&#39;", "'").replace("&lt;", "<").replace("&gt;", ">")
}

pub(crate) fn attr(tag: &str, name: &str) -> Option<String> {
    let needle = format!("{name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let end = tag[start..].find('"')? + start;
    Some(html_unescape(&tag[start..end]))
}

/// The hidden fields of the portal's login form.
fn login_form_fields(html: &str) -> Option<Vec<(String, String)>> {
    let start = html.find("id=\"lform\"")?;
    let form = &html[start..start + html[start..].find("</form>")?];
    let mut fields = Vec::new();
    for chunk in form.split("<input").skip(1) {
        let tag = &chunk[..chunk.find('>').unwrap_or(chunk.len())];
        if attr(tag, "type").as_deref() == Some("hidden")
            && let Some(name) = attr(tag, "name")
        {
            fields.push((name, attr(tag, "value").unwrap_or_default()));
        }
    }
    Some(fields)
}

/// From the provider's authorization URL to Parvis's callback URL: logs in at the portal when it
/// shows its form (or goes straight through on a live SSO session).
pub(crate) async fn through_portal(
    b: &mut Browser,
    authorize: &str,
    user: &str,
    password: &str,
    callback_prefix: &str,
) -> String {
    let mut page = b.get(authorize).await;
    let mut sent = false;
    for _ in 0..10 {
        if let Some(loc) = &page.location {
            if loc.starts_with(callback_prefix) {
                return loc.clone();
            }
            page = b.get(&loc.clone()).await;
            continue;
        }
        assert_eq!(page.status, StatusCode::OK, "portal at {}: {}", page.url, &page.body[..page.body.len().min(500)]);
        let mut fields = login_form_fields(&page.body)
            .unwrap_or_else(|| panic!("no login form at {}: {}", page.url, &page.body[..page.body.len().min(800)]));
        assert!(!sent, "the portal refused the credentials of {user}");
        fields.push(("user".into(), user.into()));
        fields.push(("password".into(), password.into()));
        sent = true;
        let target = page.url.split('#').next().unwrap().to_owned();
        page = b.post_form(&target, &fields).await;
    }
    panic!("the portal never sent the browser back to {callback_prefix}");
}

pub(crate) fn provider(
    issuer: &str,
    id: &str,
    client_id: &str,
    secret: &str,
) -> parvis::sso::config::SsoProviderConfig {
    parvis::sso::config::SsoProviderConfig {
        id: id.into(),
        name: "Compte agent".into(),
        issuer: issuer.into(),
        client_id: client_id.into(),
        client_secret: Some(secret.into()),
        display_name_template: Some("{{ user.name }}".into()),
        ..Default::default()
    }
}

async fn sso_server(port: u16, adjust: impl FnOnce(&mut parvis::config::Config)) -> TestServer {
    TestServer::start_with(|c| {
        c.listen.client = format!("127.0.0.1:{port}").parse().unwrap();
        c.public_baseurl = Some(format!("http://127.0.0.1:{port}/"));
        adjust(c);
    })
    .await
}

/// Redirect → portal → callback. Returns the callback's page (after the portal).
async fn sso_round(s: &TestServer, b: &mut Browser, idp: &str, user: &str, redirect: &str) -> Page {
    let mut u = url::Url::parse(&format!("{}/_matrix/client/v3/login/sso/redirect/{idp}", s.base)).unwrap();
    u.query_pairs_mut().append_pair("redirectUrl", redirect);
    let start = b.get(u.as_str()).await;
    assert_eq!(start.status, StatusCode::FOUND, "{}", start.body);
    let authorize = start.location.unwrap();
    assert!(b.has_cookie_for(&s.base, "parvis_sso_"), "the flow is bound to the browser");
    let q: HashMap<String, String> = url::Url::parse(&authorize).unwrap().query_pairs().into_owned().collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["code_challenge_method"], "S256");
    assert!(q["state"].len() >= 32 && q["nonce"].len() >= 32);
    assert_eq!(q["redirect_uri"], format!("{}/_synapse/client/oidc/callback", s.base));
    let callback =
        through_portal(b, &authorize, user, user, &format!("{}/_synapse/client/oidc/callback", s.base)).await;
    b.get(&callback).await
}

fn login_token_from(location: &str) -> String {
    url::Url::parse(location)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "loginToken")
        .map(|(_, v)| v.into_owned())
        .expect("loginToken")
}

async fn token_login(s: &TestServer, token: &str) -> (StatusCode, Value) {
    s.post("/_matrix/client/v3/login", None, json!({ "type": "m.login.token", "token": token })).await
}

#[tokio::test]
async fn sso_login_profile_uia_and_logout_with_lemonldap() {
    let Some(iss) = issuer() else { return };
    let s = sso_server(19091, |c| {
        c.sso.providers = vec![provider(&iss, "lemonldap", "matrix", "matrix-secret")];
        c.sso.client_whitelist = vec!["https://element.ville.example/".into()];
    })
    .await;

    // GET /login advertises the provider and m.login.token.
    let (st, flows) = s.get("/_matrix/client/v3/login", None).await;
    assert_eq!(st, StatusCode::OK);
    let types: Vec<&str> = flows["flows"].as_array().unwrap().iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["m.login.password", "m.login.sso", "m.login.token"]);
    assert_eq!(flows["flows"][1]["identity_providers"], json!([{ "id": "lemonldap", "name": "Compte agent" }]));

    // First login: the account is created from the claims.
    let mut b = Browser::new();
    let page = sso_round(&s, &mut b, "lemonldap", "dwho", REDIRECT).await;
    assert_eq!(page.status, StatusCode::FOUND, "whitelisted client goes straight back: {}", page.body);
    let back = page.location.unwrap();
    assert!(back.starts_with("https://element.ville.example/?loginToken="), "{back}");
    assert!(back.ends_with("#/login"), "the fragment stays after the query: {back}");
    let token = login_token_from(&back);
    let (st, login) = token_login(&s, &token).await;
    assert_eq!(st, StatusCode::OK, "{login}");
    assert_eq!(login["user_id"], "@dwho:localhost");
    let dwho = user_from(&login);
    // Single use.
    let (st, again) = token_login(&s, &token).await;
    assert_eq!((st, again["errcode"].as_str()), (StatusCode::FORBIDDEN, Some("M_FORBIDDEN")));

    let (_, profile) = s.get("/_matrix/client/v3/profile/@dwho:localhost", None).await;
    assert_eq!(profile["displayname"], "Doctor Who");
    let (_, tp) = s.get("/_matrix/client/v3/account/3pid", Some(&dwho.token)).await;
    assert_eq!(tp["threepids"][0]["address"], "dwho@badwolf.org");
    let (st, sync) = s.get("/_matrix/client/v3/sync?timeout=0", Some(&dwho.token)).await;
    assert_eq!(st, StatusCode::OK, "{sync}");

    // No password: password login is refused like a wrong password.
    let (st, pw) = s.login("dwho", "dwho", json!({})).await;
    assert_eq!((st, pw["errcode"].as_str()), (StatusCode::FORBIDDEN, Some("M_FORBIDDEN")));

    // The administrator finds the account by provider subject.
    let admin = s.register("admin", true).await;
    let (st, found) = s.get("/_synapse/admin/v1/auth_providers/lemonldap/users/dwho", Some(&admin.token)).await;
    assert_eq!((st, found["user_id"].as_str()), (StatusCode::OK, Some("@dwho:localhost")));
    let (_, desc) = s.get("/_synapse/admin/v2/users/@dwho:localhost", Some(&admin.token)).await;
    assert_eq!(desc["external_ids"], json!([{ "auth_provider": "lemonldap", "external_id": "dwho" }]));
    assert_eq!(desc["password_hash_set"], false);

    // The display name follows the provider at each login; the URL not in the whitelist gets a
    // confirmation page; the live portal session logs in without the form.
    let (st, _) = s
        .put(
            "/_matrix/client/v3/profile/@dwho:localhost/displayname",
            Some(&dwho.token),
            json!({ "displayname": "Someone" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let page = sso_round(&s, &mut b, "lemonldap", "dwho", "https://other.example/app").await;
    assert_eq!(page.status, StatusCode::OK, "confirmation page");
    assert!(page.body.contains("other.example") && page.body.contains("@dwho:localhost"), "{}", page.body);
    let href = page.body.split("href=\"").nth(1).unwrap().split('"').next().unwrap().replace("&amp;", "&");
    assert!(href.starts_with("https://other.example/app?loginToken="), "{href}");
    let (st, second) = token_login(&s, &login_token_from(&href)).await;
    assert_eq!((st, second["user_id"].as_str()), (StatusCode::OK, Some("@dwho:localhost")));
    let second = user_from(&second);
    let (_, profile) = s.get("/_matrix/client/v3/profile/@dwho:localhost", None).await;
    assert_eq!(profile["displayname"], "Doctor Who");

    // UIA for an SSO user: m.login.sso through the fallback page.
    let path = format!("/_matrix/client/v3/devices/{}", second.device_id);
    let (st, challenge) = s.delete(&path, Some(&dwho.token), json!({})).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(challenge["flows"], json!([{ "stages": ["m.login.sso"] }]));
    let session = challenge["session"].as_str().unwrap().to_owned();
    // Retrying before the fallback is done changes nothing.
    let (st, _) = s.delete(&path, Some(&dwho.token), json!({ "auth": { "session": session } })).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let fallback = format!("{}/_matrix/client/v3/auth/m.login.sso/fallback/web?session={session}", s.base);
    let start = b.get(&fallback).await;
    assert_eq!(start.status, StatusCode::OK);
    let href = start.body.split("href=\"").nth(1).unwrap().split('"').next().unwrap().replace("&amp;", "&");
    let go = b.get(&format!("{}{href}", s.base)).await;
    assert_eq!(go.status, StatusCode::FOUND);
    let cb = through_portal(
        &mut b,
        &go.location.unwrap(),
        "dwho",
        "dwho",
        &format!("{}/_synapse/client/oidc/callback", s.base),
    )
    .await;
    let done = b.get(&cb).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert!(done.body.contains("authDone"), "the page tells the client: {}", done.body);
    let (st, body) = s.delete(&path, Some(&dwho.token), json!({ "auth": { "session": session } })).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, _) = s.get("/_matrix/client/v3/account/whoami", Some(&second.token)).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "the device is gone");

    // Another account cannot complete dwho's UIA session: rtyler logs in...
    let mut b2 = Browser::new();
    let page = sso_round(&s, &mut b2, "lemonldap", "rtyler", REDIRECT).await;
    let (st, rose) = token_login(&s, &login_token_from(&page.location.unwrap())).await;
    assert_eq!((st, rose["user_id"].as_str()), (StatusCode::OK, Some("@rtyler:localhost")));
    // ...and answers dwho's session with her own provider login.
    let (_, challenge) =
        s.delete(&format!("/_matrix/client/v3/devices/{}", dwho.device_id), Some(&dwho.token), json!({})).await;
    let session = challenge["session"].as_str().unwrap().to_owned();
    let go = b2
        .get(&format!("{}/_matrix/client/v3/auth/m.login.sso/fallback/web?session={session}&idp=lemonldap", s.base))
        .await;
    let cb = through_portal(
        &mut b2,
        &go.location.unwrap(),
        "rtyler",
        "rtyler",
        &format!("{}/_synapse/client/oidc/callback", s.base),
    )
    .await;
    let refused = b2.get(&cb).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    let (st, _) = s
        .delete(
            &format!("/_matrix/client/v3/devices/{}", dwho.device_id),
            Some(&dwho.token),
            json!({ "auth": { "session": session } }),
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    // RP-initiated logout: the device goes, then the provider session.
    let (st, out) = s.post("/_parvis/client/v1/logout/sso", Some(&dwho.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{out}");
    let end = out["end_session_url"].as_str().expect("LemonLDAP::NG has an end_session_endpoint").to_owned();
    assert!(end.contains("id_token_hint="), "{end}");
    let (st, _) = s.get("/_matrix/client/v3/account/whoami", Some(&dwho.token)).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let bye = b.get(&end).await;
    assert_eq!(bye.status, StatusCode::FOUND, "{}", bye.body);
    let landing = bye.location.unwrap();
    assert!(landing.starts_with(&format!("{}/_parvis/client/sso/logged_out", s.base)), "{landing}");
    assert_eq!(b.get(&landing).await.status, StatusCode::OK);
    // The portal session is over: a new login needs the form again.
    let mut u = url::Url::parse(&format!("{}/_matrix/client/v3/login/sso/redirect", s.base)).unwrap();
    u.query_pairs_mut().append_pair("redirectUrl", REDIRECT);
    let start = b.get(u.as_str()).await;
    let portal = b.get(&start.location.unwrap()).await;
    assert_eq!(portal.status, StatusCode::OK);
    assert!(login_form_fields(&portal.body).is_some(), "the portal asks for credentials again");
    s.stop().await;
}

#[tokio::test]
async fn sso_signed_userinfo_acr_email_matching_and_domains() {
    let Some(iss) = issuer() else { return };
    // ProConnect's shape: id_token without profile claims, userinfo as a signed JWT without
    // iss/aud, accounts matched by e-mail, an allow-list of domains, acr_values.
    let mut p = provider(&iss, "proconnect", "matrix-jwt", "matrix-jwt-secret");
    p.client_auth_method = parvis::sso::config::ClientAuthMethod::ClientSecretPost;
    p.match_by = parvis::sso::config::MatchBy::Email;
    p.localpart_template = "{{ user.email | localpart_from_email | lower }}".into();
    p.allowed_email_domains = vec!["badwolf.org".into()];
    p.acr_values = Some("loa-1".into());
    let s = sso_server(19092, |c| {
        c.sso.providers = vec![p];
        c.sso.client_whitelist = vec!["https://element.ville.example/".into()];
    })
    .await;
    let admin = s.register("admin", true).await;
    // An account pre-provisioned with the agent's address, under another localpart.
    let (st, made) = s
        .put(
            "/_synapse/admin/v2/users/@docteur:localhost",
            Some(&admin.token),
            json!({ "displayname": "Le Docteur", "threepids": [{ "medium": "email", "address": "dwho@badwolf.org" }] }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{made}");

    let mut b = Browser::new();
    let page = sso_round(&s, &mut b, "proconnect", "dwho", REDIRECT).await;
    assert_eq!(page.status, StatusCode::FOUND, "{}", page.body);
    let (st, login) = token_login(&s, &login_token_from(&page.location.unwrap())).await;
    assert_eq!(st, StatusCode::OK, "{login}");
    assert_eq!(login["user_id"], "@docteur:localhost", "matched by e-mail, not by the mapped localpart");
    // The profile came from the signed userinfo (the id_token has no `name`).
    let (_, profile) = s.get("/_matrix/client/v3/profile/@docteur:localhost", None).await;
    assert_eq!(profile["displayname"], "Doctor Who");
    let (_, desc) = s.get("/_synapse/admin/v2/users/@docteur:localhost", Some(&admin.token)).await;
    assert_eq!(desc["external_ids"], json!([{ "auth_provider": "proconnect", "external_id": "dwho" }]));

    s.stop().await;

    // An address outside the allowed domains: a clear page in both languages, no account.
    let mut p = provider(&iss, "lemonldap", "matrix", "matrix-secret");
    p.allowed_email_domains = vec!["ville.example".into()];
    let s = sso_server(19096, |c| c.sso.providers = vec![p]).await;
    let mut b = Browser::new();
    let page = sso_round(&s, &mut b, "lemonldap", "dwho", REDIRECT).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN, "{}", page.body);
    assert!(page.body.contains("domaine autorisé") && page.body.contains("allowed on this service"), "{}", page.body);
    let admin = s.register("admin", true).await;
    let (st, _) = s.get("/_synapse/admin/v2/users/@dwho:localhost", Some(&admin.token)).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    s.stop().await;

    // An authentication level the provider does not give is refused, and creates nobody.
    let mut p = provider(&iss, "lemonldap", "matrix", "matrix-secret");
    p.acr_values = Some("eidas3".into());
    let s = sso_server(19093, |c| c.sso.providers = vec![p]).await;
    let mut b = Browser::new();
    let page = sso_round(&s, &mut b, "lemonldap", "rtyler", REDIRECT).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN, "{}", page.body);
    assert!(page.body.contains("niveau d&#39;authentification"), "{}", page.body);
    let admin = s.register("admin", true).await;
    let (st, _) = s.get("/_synapse/admin/v2/users/@rtyler:localhost", Some(&admin.token)).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    s.stop().await;
}

#[tokio::test]
async fn sso_bad_and_replayed_callbacks_create_nobody() {
    let Some(iss) = issuer() else { return };
    let mut p = provider(&iss, "lemonldap", "matrix", "matrix-secret");
    p.attribute_requirements = vec![parvis::sso::config::AttributeRequirement {
        attribute: "preferred_username".into(),
        value: None,
        one_of: Some(vec!["dwho".into(), "rtyler".into()]),
    }];
    let s = sso_server(19094, |c| {
        c.sso.providers = vec![p];
        c.sso.client_whitelist = vec!["https://element.ville.example/".into()];
    })
    .await;
    let admin = s.register("admin", true).await;
    let callback = format!("{}/_synapse/client/oidc/callback", s.base);
    let user_count = |s: &TestServer| {
        let db = s.state().db.clone();
        async move { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users").fetch_one(&db).await.unwrap() }
    };
    let before = user_count(&s).await;

    // Requests that never came from /login/sso/redirect.
    let mut b = Browser::new();
    for (q, status) in [
        ("code=x&state=unknown-state-unknown-state-unknown", StatusCode::BAD_REQUEST),
        ("code=x", StatusCode::BAD_REQUEST),
        ("error=access_denied&state=whatever", StatusCode::FORBIDDEN),
    ] {
        let page = b.get(&format!("{callback}?{q}")).await;
        assert_eq!(page.status, status, "{q}: {}", page.body);
        assert!(page.body.contains("Connexion impossible"), "a clear page: {}", page.body);
    }

    // Bad client input at the start.
    let (st, e) = s.get("/_matrix/client/v3/login/sso/redirect/lemonldap", None).await;
    assert_eq!((st, e["errcode"].as_str()), (StatusCode::BAD_REQUEST, Some("M_MISSING_PARAM")));
    let (st, e) = s.get("/_matrix/client/v3/login/sso/redirect/nope?redirectUrl=https://a.example/", None).await;
    assert_eq!((st, e["errcode"].as_str()), (StatusCode::NOT_FOUND, Some("M_NOT_FOUND")));
    let (st, e) = s.get("/_matrix/client/v3/login/sso/redirect/lemonldap?redirectUrl=javascript:alert(1)", None).await;
    assert_eq!((st, e["errcode"].as_str()), (StatusCode::BAD_REQUEST, Some("M_INVALID_PARAM")));

    // A real provider answer, replayed: the second use finds nothing.
    let mut u = url::Url::parse(&format!("{}/_matrix/client/v3/login/sso/redirect/lemonldap", s.base)).unwrap();
    u.query_pairs_mut().append_pair("redirectUrl", REDIRECT);
    let start = b.get(u.as_str()).await;
    let cb = through_portal(&mut b, &start.location.unwrap(), "rtyler", "rtyler", &callback).await;
    // In another browser (no binding cookie): refused, and the request is spent.
    let mut thief = Browser::new();
    let stolen = thief.get(&cb).await;
    assert_eq!(stolen.status, StatusCode::FORBIDDEN, "{}", stolen.body);
    let replay = b.get(&cb).await;
    assert_eq!(replay.status, StatusCode::BAD_REQUEST, "{}", replay.body);
    assert_eq!(user_count(&s).await, before, "no account from refused callbacks");

    // A nonce that does not match the id_token's (as if the id_token were replayed from
    // another login): refused.
    let start = b.get(u.as_str()).await;
    sqlx::query("UPDATE sso_auth_sessions SET nonce = 'not-the-nonce-sent'").execute(&s.state().db).await.unwrap();
    let cb = through_portal(&mut b, &start.location.unwrap(), "rtyler", "rtyler", &callback).await;
    let page = b.get(&cb).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN, "{}", page.body);
    assert_eq!(user_count(&s).await, before);

    // Attribute requirements: msmith is not among the allowed.
    let mut b2 = Browser::new();
    let page = sso_round(&s, &mut b2, "lemonldap", "msmith", REDIRECT).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN, "{}", page.body);
    assert_eq!(user_count(&s).await, before);

    // An expired login token is refused (and spent).
    let page = sso_round(&s, &mut b, "lemonldap", "rtyler", REDIRECT).await;
    let token = login_token_from(&page.location.unwrap());
    sqlx::query("UPDATE sso_login_tokens SET expires_ts = 0").execute(&s.state().db).await.unwrap();
    let (st, e) = token_login(&s, &token).await;
    assert_eq!((st, e["errcode"].as_str()), (StatusCode::FORBIDDEN, Some("M_FORBIDDEN")));
    let (st, e) = token_login(&s, "pvl_forged").await;
    assert_eq!((st, e["errcode"].as_str()), (StatusCode::FORBIDDEN, Some("M_FORBIDDEN")));
    let (st, e) = s.post("/_matrix/client/v3/login", None, json!({ "type": "m.login.token" })).await;
    assert_eq!((st, e["errcode"].as_str()), (StatusCode::BAD_REQUEST, Some("M_BAD_JSON")));
    let (st, _) = s.get("/_synapse/admin/v2/users/@msmith:localhost", Some(&admin.token)).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    s.stop().await;
}

/// Signs a JWT with the provider's own key (LemonLDAP::NG 2.16 cannot send back-channel logout
/// tokens itself; a later provider would send exactly this).
fn sign_with_provider_key(claims: &Value) -> String {
    use base64::Engine;
    use openidconnect::PrivateSigningKey;
    use openidconnect::core::{CoreJwsSigningAlgorithm, CoreRsaPrivateSigningKey};
    let home = llng_home();
    let pem = std::fs::read_to_string(home.join("keys/oidc-sig.key")).expect("provider signing key (run as root)");
    let kid = std::fs::read_to_string(home.join("keys/oidc-sig.kid")).unwrap().trim().to_owned();
    let key = CoreRsaPrivateSigningKey::from_pem(&pem, Some(openidconnect::JsonWebKeyId::new(kid.clone()))).unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(json!({ "alg": "RS256", "kid": kid, "typ": "logout+jwt" }).to_string());
    let payload = b64.encode(claims.to_string());
    let input = format!("{header}.{payload}");
    let sig = key.sign(&CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256, input.as_bytes()).unwrap();
    format!("{input}.{}", b64.encode(sig))
}

#[tokio::test]
async fn sso_backchannel_logout_ends_the_provider_session_devices() {
    let Some(iss) = issuer() else { return };
    let mut p = provider(&iss, "lemonldap", "matrix", "matrix-secret");
    p.backchannel_logout_enabled = true;
    let s = sso_server(19095, |c| {
        c.sso.providers = vec![p];
        c.sso.client_whitelist = vec!["https://element.ville.example/".into()];
    })
    .await;
    let mut b = Browser::new();
    let page = sso_round(&s, &mut b, "lemonldap", "dwho", REDIRECT).await;
    let (_, l1) = token_login(&s, &login_token_from(&page.location.unwrap())).await;
    let d1 = user_from(&l1);
    let page = sso_round(&s, &mut b, "lemonldap", "dwho", REDIRECT).await;
    let (_, l2) = token_login(&s, &login_token_from(&page.location.unwrap())).await;
    let d2 = user_from(&l2);
    let mut b2 = Browser::new();
    let page = sso_round(&s, &mut b2, "lemonldap", "rtyler", REDIRECT).await;
    let (_, l3) = token_login(&s, &login_token_from(&page.location.unwrap())).await;
    let rose = user_from(&l3);

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = |jti: &str, aud: &str| {
        json!({
            "iss": iss, "aud": aud, "iat": now, "exp": now + 120, "jti": jti, "sub": "dwho",
            "events": { "http://schemas.openid.net/event/backchannel-logout": {} },
        })
    };
    let post = |token: String| {
        let url = format!("{}/_synapse/client/oidc/backchannel_logout", s.base);
        let body = serde_urlencoded::to_string([("logout_token", token)]).unwrap();
        async move {
            reqwest::Client::new()
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    // Refused: another audience, a nonce, no event, a forged signature, no token at all.
    let mut forged = sign_with_provider_key(&claims("j0", "matrix"));
    forged.replace_range(forged.len() - 6.., "AAAAAA");
    let mut with_nonce = claims("j1", "matrix");
    with_nonce["nonce"] = json!("n");
    let mut no_event = claims("j2", "matrix");
    no_event["events"] = json!({});
    for token in [
        sign_with_provider_key(&claims("j3", "someone-else")),
        sign_with_provider_key(&with_nonce),
        sign_with_provider_key(&no_event),
        forged,
        "not.a.jwt".to_owned(),
    ] {
        let r = post(token).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request");
    }
    for t in [&d1, &d2, &rose] {
        assert_eq!(s.get("/_matrix/client/v3/account/whoami", Some(&t.token)).await.0, StatusCode::OK);
    }
    // The real thing: both of dwho's devices go, Rose stays.
    let good = sign_with_provider_key(&claims("j4", "matrix"));
    let r = post(good.clone()).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers().get("cache-control").unwrap(), "no-store");
    for t in [&d1, &d2] {
        assert_eq!(s.get("/_matrix/client/v3/account/whoami", Some(&t.token)).await.0, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(s.get("/_matrix/client/v3/account/whoami", Some(&rose.token)).await.0, StatusCode::OK);
    // A replayed token is refused.
    assert_eq!(post(good).await.status(), StatusCode::BAD_REQUEST);
    s.stop().await;
}

/// Without a provider, SSO is not offered; with one, the flow is rate-limited like password
/// login (the limit applies before the provider is even contacted).
#[tokio::test]
async fn sso_absent_or_rate_limited() {
    let s = TestServer::start().await;
    let (_, flows) = s.get("/_matrix/client/v3/login", None).await;
    assert_eq!(flows["flows"], json!([{ "type": "m.login.password" }]));
    let (st, e) = s.get("/_matrix/client/v3/login/sso/redirect?redirectUrl=https://a.example/", None).await;
    assert_eq!((st, e["errcode"].as_str()), (StatusCode::NOT_FOUND, Some("M_UNRECOGNIZED")));
    let (st, e) = s.post("/_matrix/client/v3/login", None, json!({ "type": "m.login.token", "token": "x" })).await;
    assert_eq!((st, e["errcode"].as_str()), (StatusCode::FORBIDDEN, Some("M_FORBIDDEN")));
    s.stop().await;

    let s = TestServer::start_with(|c| {
        c.public_baseurl = Some("http://127.0.0.1:1/".into());
        c.rate_limits.enabled = true;
        c.rate_limits.login_per_ip = rate(0.01, 2);
        // Nothing listens on port 9: the provider is unreachable.
        c.sso.providers = vec![provider("http://127.0.0.1:9/", "down", "matrix", "secret")];
    })
    .await;
    let path = "/_matrix/client/v3/login/sso/redirect/down?redirectUrl=https://a.example/";
    for _ in 0..2 {
        let (st, e) = s.get(path, None).await;
        assert_eq!((st, e["errcode"].as_str()), (StatusCode::BAD_GATEWAY, Some("M_UNKNOWN")), "{e}");
    }
    let (st, e) = s.get(path, None).await;
    assert_eq!((st, e["errcode"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("M_LIMIT_EXCEEDED")));
    let page = Browser::new().get(&format!("{}/_synapse/client/oidc/callback?state=x&code=y", s.base)).await;
    assert_eq!(page.status, StatusCode::TOO_MANY_REQUESTS);
    s.stop().await;
}
