//! The OAuth 2.0 API (Parvis as authorization server): the password flow and every failure
//! case over plain HTTP (a browser with cookies, a client speaking the token endpoint), the
//! account management pages, the `m.oauth` UIA stage; then matrix-sdk's OAuth client (what
//! Element X runs) through the real LemonLDAP::NG as upstream provider.
//!
//! The servers listen on fixed ports (19097, 19098) because their `public_baseurl` (the issuer)
//! must be the address the browser follows, and the provider accepts only registered callbacks.

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::*;
use crate::sso::{Browser, attr, issuer, provider, through_portal};

const REDIRECT: &str = "http://127.0.0.1/callback";
const SENT_REDIRECT: &str = "http://127.0.0.1:5555/callback";

fn pkce() -> (String, String) {
    let verifier = parvis::sso::random_token();
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

fn hidden(html: &str, name: &str) -> Option<String> {
    html.split("<input").skip(1).find_map(|chunk| {
        let tag = &chunk[..chunk.find('>').unwrap_or(chunk.len())];
        (attr(tag, "name").as_deref() == Some(name)).then(|| attr(tag, "value").unwrap_or_default())
    })
}

async fn form(s: &TestServer, path: &str, fields: &[(&str, &str)]) -> (StatusCode, Value) {
    let body = serde_urlencoded::to_string(fields).unwrap();
    let r = s
        .http
        .post(format!("{}{path}", s.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let st = r.status();
    let text = r.text().await.unwrap();
    (st, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn authorize_url(s: &TestServer, client_id: &str, challenge: &str, device: &str, extra: &[(&str, &str)]) -> String {
    let mut u = url::Url::parse(&format!("{}/_parvis/oauth2/authorize", s.base)).unwrap();
    {
        let mut q = u.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", SENT_REDIRECT)
            .append_pair("scope", &format!("urn:matrix:client:api:* urn:matrix:client:device:{device}"))
            .append_pair("state", "st-1")
            .append_pair("code_challenge", challenge)
            .append_pair("code_challenge_method", "S256");
        for (k, v) in extra {
            q.append_pair(k, v);
        }
    }
    u.to_string()
}

fn query_of(location: &str) -> std::collections::HashMap<String, String> {
    url::Url::parse(location).unwrap().query_pairs().into_owned().collect()
}

/// Authorize with the password form and consent: returns the redirect back to the client.
async fn password_round(
    s: &TestServer,
    b: &mut Browser,
    client_id: &str,
    challenge: &str,
    device: &str,
    allow: bool,
) -> String {
    let page = b.get(&authorize_url(s, client_id, challenge, device, &[])).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let grant = hidden(&page.body, "grant").expect("password form");
    let fields = vec![
        ("grant".to_owned(), grant),
        ("username".to_owned(), "agent".to_owned()),
        ("password".to_owned(), PASSWORD.to_owned()),
    ];
    let next = b.post_form(&format!("{}/_parvis/oauth2/login", s.base), &fields).await;
    assert_eq!(next.status, StatusCode::SEE_OTHER, "{}", next.body);
    let consent = b.get(&next.location.unwrap()).await;
    assert_eq!(consent.status, StatusCode::OK, "{}", consent.body);
    assert!(
        consent.body.contains("Test app") && consent.body.contains(device),
        "names the client and device: {}",
        consent.body
    );
    let fields = vec![
        ("grant".to_owned(), hidden(&consent.body, "grant").unwrap()),
        ("csrf".to_owned(), hidden(&consent.body, "csrf").unwrap()),
        ("action".to_owned(), if allow { "allow" } else { "deny" }.to_owned()),
    ];
    let done = b.post_form(&format!("{}/_parvis/oauth2/consent", s.base), &fields).await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    let back = done.location.unwrap();
    assert!(back.starts_with(SENT_REDIRECT), "{back}");
    back
}

async fn exchange(s: &TestServer, client_id: &str, code: &str, verifier: &str) -> (StatusCode, Value) {
    form(
        s,
        "/_parvis/oauth2/token",
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", SENT_REDIRECT),
            ("client_id", client_id),
            ("code_verifier", verifier),
        ],
    )
    .await
}

async fn whoami(s: &TestServer, token: &str) -> StatusCode {
    s.get("/_matrix/client/v3/account/whoami", Some(token)).await.0
}

#[tokio::test]
async fn oauth_password_flow_tokens_and_failures() {
    let s = TestServer::start_with(|c| {
        c.listen.client = "127.0.0.1:19097".parse().unwrap();
        c.public_baseurl = Some("http://127.0.0.1:19097/".into());
    })
    .await;
    s.register("agent", false).await;

    // Discovery.
    let (st, meta) = s.get("/_matrix/client/v1/auth_metadata", None).await;
    assert_eq!(st, StatusCode::OK, "{meta}");
    assert_eq!(meta["issuer"], "http://127.0.0.1:19097/");
    assert_eq!(meta["authorization_endpoint"], "http://127.0.0.1:19097/_parvis/oauth2/authorize");
    assert_eq!(meta["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(meta["grant_types_supported"], json!(["authorization_code", "refresh_token"]));
    assert!(
        meta["account_management_actions_supported"].as_array().unwrap().contains(&json!("org.matrix.device_delete"))
    );
    assert!(meta.get("prompt_values_supported").is_none(), "no registration without an SSO provider creating accounts");
    let (_, versions) = s.get("/_matrix/client/versions", None).await;
    assert!(versions["versions"].as_array().unwrap().contains(&json!("v1.15")));

    // Registration: identical metadata share a client_id; bad metadata get RFC 7591 errors.
    let metadata = json!({
        "client_name": "Test app", "client_uri": "https://app.example/", "application_type": "native",
        "redirect_uris": [REDIRECT], "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"], "token_endpoint_auth_method": "none",
    });
    let (st, reg) = s.post("/_parvis/oauth2/registration", None, metadata.clone()).await;
    assert_eq!(st, StatusCode::CREATED, "{reg}");
    let client_id = reg["client_id"].as_str().unwrap().to_owned();
    let (_, again) = s.post("/_parvis/oauth2/registration", None, metadata.clone()).await;
    assert_eq!(again["client_id"], client_id.as_str());
    let mut bad = metadata.clone();
    bad["redirect_uris"] = json!(["http://127.0.0.1:8080/callback"]);
    let (st, e) = s.post("/_parvis/oauth2/registration", None, bad).await;
    assert_eq!((st, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_redirect_uri")));
    let mut bad = metadata.clone();
    bad.as_object_mut().unwrap().remove("client_uri");
    let (st, e) = s.post("/_parvis/oauth2/registration", None, bad).await;
    assert_eq!((st, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_client_metadata")));

    // Authorization errors before the redirect URI is trusted are pages, after it redirects.
    let (verifier, challenge) = pkce();
    let mut b = Browser::new();
    let page = b.get(&authorize_url(&s, "pvc_unknown", &challenge, "DEV1", &[])).await;
    assert_eq!((page.status, page.location.is_none()), (StatusCode::BAD_REQUEST, true), "unknown client: no redirect");
    let mut u = authorize_url(&s, &client_id, &challenge, "DEV1", &[]);
    u = u.replace("5555%2Fcallback", "5555%2Fother");
    let page = b.get(&u).await;
    assert_eq!((page.status, page.location.is_none()), (StatusCode::BAD_REQUEST, true), "unregistered redirect URI");
    let page = b.get(&authorize_url(&s, &client_id, "tooshort", "DEV1", &[])).await;
    assert_eq!(page.status, StatusCode::FOUND);
    let q = query_of(&page.location.unwrap());
    assert_eq!((q["error"].as_str(), q["state"].as_str()), ("invalid_request", "st-1"));
    let page = b.get(&authorize_url(&s, &client_id, &challenge, "DEV1", &[("scope", "openid")])).await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST, "a repeated parameter is refused");

    // The whole flow: password form, consent, code, tokens.
    let back = password_round(&s, &mut b, &client_id, &challenge, "OAUTHDEV01", true).await;
    let q = query_of(&back);
    assert_eq!(q["state"], "st-1");
    let code = q["code"].clone();
    // The consent page cannot be replayed in another browser.
    let (st, e) = exchange(&s, &client_id, &code, "a-wrong-verifier-a-wrong-verifier-a-wrong-verifier").await;
    assert_eq!((st, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "bad PKCE verifier");
    let (st, e) = exchange(&s, &client_id, &code, &verifier).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant")),
        "a code tried with a wrong verifier is spent"
    );

    let (verifier, challenge) = pkce();
    let back = password_round(&s, &mut b, &client_id, &challenge, "OAUTHDEV01", true).await;
    let code = query_of(&back)["code"].clone();
    let (st, e) = exchange(&s, "pvc_unknown", &code, &verifier).await;
    assert_eq!((st, e["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_client")));
    let (st, tokens) = exchange(&s, &client_id, &code, &verifier).await;
    assert_eq!(st, StatusCode::OK, "{tokens}");
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 300);
    assert!(tokens["scope"].as_str().unwrap().contains("urn:matrix:client:device:OAUTHDEV01"));
    let access = tokens["access_token"].as_str().unwrap().to_owned();
    let (st, who) = s.get("/_matrix/client/v3/account/whoami", Some(&access)).await;
    assert_eq!((st, who["device_id"].as_str()), (StatusCode::OK, Some("OAUTHDEV01")), "{who}");
    assert_eq!(who["user_id"], "@agent:localhost");
    let (st, _) = s.get("/_matrix/client/v3/sync?timeout=0", Some(&access)).await;
    assert_eq!(st, StatusCode::OK);
    // A second use of the code revokes what the first one issued.
    let (st, e) = exchange(&s, &client_id, &code, &verifier).await;
    assert_eq!((st, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    assert_eq!(whoami(&s, &access).await, StatusCode::UNAUTHORIZED, "the session of a reused code ends");

    // Refresh: rotation, a retry while the new token is unused, then replay detection.
    let (verifier, challenge) = pkce();
    let back = password_round(&s, &mut b, &client_id, &challenge, "OAUTHDEV02", true).await;
    let (_, t0) = exchange(&s, &client_id, &query_of(&back)["code"], &verifier).await;
    let refresh = |rt: String| {
        let cid = client_id.clone();
        let s = &s;
        async move {
            form(
                s,
                "/_parvis/oauth2/token",
                &[("grant_type", "refresh_token"), ("refresh_token", &rt), ("client_id", &cid)],
            )
            .await
        }
    };
    let (st, t1) = refresh(t0["refresh_token"].as_str().unwrap().into()).await;
    assert_eq!(st, StatusCode::OK, "{t1}");
    assert_eq!(
        whoami(&s, t0["access_token"].as_str().unwrap()).await,
        StatusCode::UNAUTHORIZED,
        "the old access token goes"
    );
    assert_eq!(whoami(&s, t1["access_token"].as_str().unwrap()).await, StatusCode::OK);
    // The response was "lost": the client retries with the old refresh token.
    let (st, t1b) = refresh(t0["refresh_token"].as_str().unwrap().into()).await;
    assert_eq!(st, StatusCode::OK, "a retry is allowed while the new token is unused: {t1b}");
    assert_eq!(whoami(&s, t1["access_token"].as_str().unwrap()).await, StatusCode::UNAUTHORIZED);
    let (st, t2) = refresh(t1b["refresh_token"].as_str().unwrap().into()).await;
    assert_eq!(st, StatusCode::OK, "{t2}");
    let (st, e) = refresh(t1["refresh_token"].as_str().unwrap().into()).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant")),
        "a dropped token is unknown"
    );
    let (st, e) = refresh(t0["refresh_token"].as_str().unwrap().into()).await;
    assert_eq!((st, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "replay after rotation");
    assert_eq!(
        whoami(&s, t2["access_token"].as_str().unwrap()).await,
        StatusCode::UNAUTHORIZED,
        "a leaked refresh token ends the session"
    );

    // An expired refresh token.
    let (verifier, challenge) = pkce();
    let back = password_round(&s, &mut b, &client_id, &challenge, "OAUTHDEV03", true).await;
    let (_, t) = exchange(&s, &client_id, &query_of(&back)["code"], &verifier).await;
    sqlx::query("UPDATE refresh_tokens SET expires_ts = 0 WHERE device_id = 'OAUTHDEV03'")
        .execute(&s.state().db)
        .await
        .unwrap();
    let (st, e) = refresh(t["refresh_token"].as_str().unwrap().into()).await;
    assert_eq!((st, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{e}");

    // Revocation (RFC 7009) logs the device out; unknown tokens are fine.
    let (st, _) = form(
        &s,
        "/_parvis/oauth2/revoke",
        &[("token", t["access_token"].as_str().unwrap()), ("client_id", &client_id)],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(whoami(&s, t["access_token"].as_str().unwrap()).await, StatusCode::UNAUTHORIZED);
    let (st, _) = form(&s, "/_parvis/oauth2/revoke", &[("token", "nothing")]).await;
    assert_eq!(st, StatusCode::OK);
    let (st, e) = form(&s, "/_parvis/oauth2/revoke", &[]).await;
    assert_eq!((st, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
    let (st, e) = form(&s, "/_parvis/oauth2/token", &[("grant_type", "password"), ("client_id", &client_id)]).await;
    assert_eq!((st, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("unsupported_grant_type")));

    // Refusing consent goes back with access_denied; a consent from another browser is refused.
    let (_, challenge) = pkce();
    let back = password_round(&s, &mut b, &client_id, &challenge, "OAUTHDEV04", false).await;
    assert_eq!(query_of(&back)["error"], "access_denied");
    let page = b.get(&authorize_url(&s, &client_id, &challenge, "OAUTHDEV05", &[])).await;
    let grant = hidden(&page.body, "grant").unwrap();
    let other = Browser::new().get(&format!("{}/_parvis/oauth2/consent?grant={grant}", s.base)).await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    // Wrong password: the form again, no session.
    let fields = vec![
        ("grant".to_owned(), grant),
        ("username".to_owned(), "agent".to_owned()),
        ("password".to_owned(), "wrong".to_owned()),
    ];
    let again = b.post_form(&format!("{}/_parvis/oauth2/login", s.base), &fields).await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED);
    assert!(again.body.contains("incorrect"), "{}", again.body);
    s.stop().await;
}

#[tokio::test]
async fn oauth_account_pages_and_cross_signing_reset() {
    let s = TestServer::start_with(|c| {
        c.listen.client = "127.0.0.1:19099".parse().unwrap();
        c.public_baseurl = Some("http://127.0.0.1:19099/".into());
    })
    .await;
    s.register("agent", false).await;
    let (_, reg) = s
        .post(
            "/_parvis/oauth2/registration",
            None,
            json!({ "client_name": "Test app", "client_uri": "https://app.example/", "application_type": "native", "redirect_uris": [REDIRECT] }),
        )
        .await;
    let client_id = reg["client_id"].as_str().unwrap().to_owned();
    let mut b = Browser::new();
    let (verifier, challenge) = pkce();
    let back = password_round(&s, &mut b, &client_id, &challenge, "ACCTDEV1", true).await;
    let (_, t) = exchange(&s, &client_id, &query_of(&back)["code"], &verifier).await;
    let access = t["access_token"].as_str().unwrap().to_owned();

    // m.oauth: the first cross-signing upload needs nothing, a replacement the account page.
    let user =
        crate::common::User { user_id: "@agent:localhost".into(), token: access.clone(), device_id: "ACCTDEV1".into() };
    let master = crate::e2ee::cross_key(&user, "master", &crate::e2ee::key(41));
    let (st, r) =
        s.post("/_matrix/client/v3/keys/device_signing/upload", Some(&access), json!({ "master_key": master })).await;
    assert_eq!(st, StatusCode::OK, "{r}");
    let master2 = crate::e2ee::cross_key(&user, "master", &crate::e2ee::key(42));
    let (st, ch) =
        s.post("/_matrix/client/v3/keys/device_signing/upload", Some(&access), json!({ "master_key": master2 })).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{ch}");
    assert_eq!(ch["flows"], json!([{ "stages": ["m.oauth"] }]));
    let url = ch["params"]["m.oauth"]["url"].as_str().unwrap().to_owned();
    assert!(url.ends_with("/_parvis/account/?action=org.matrix.cross_signing_reset"), "{url}");
    let session = ch["session"].as_str().unwrap().to_owned();
    let body = json!({ "master_key": master2, "auth": { "session": session } });
    let (st, _) = s.post("/_matrix/client/v3/keys/device_signing/upload", Some(&access), body.clone()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "not approved yet");

    // The account page: sign in with the password, approve.
    let login = b.get(&url).await;
    assert_eq!(login.status, StatusCode::OK);
    let next = hidden(&login.body, "next").unwrap();
    assert_eq!(next, "/_parvis/account/?action=org.matrix.cross_signing_reset");
    let fields = vec![
        ("next".to_owned(), next),
        ("username".to_owned(), "agent".to_owned()),
        ("password".to_owned(), PASSWORD.to_owned()),
    ];
    let signed_in = b.post_form(&format!("{}/_parvis/account/login", s.base), &fields).await;
    assert_eq!(signed_in.status, StatusCode::SEE_OTHER, "{}", signed_in.body);
    let confirm = b.get(&format!("{}{}", s.base, signed_in.location.unwrap().trim_start_matches(&s.base))).await;
    assert_eq!(confirm.status, StatusCode::OK);
    let csrf = hidden(&confirm.body, "csrf").unwrap();
    // A form without the right CSRF token does nothing.
    let forged = vec![
        ("csrf".to_owned(), "forged".to_owned()),
        ("action".to_owned(), "org.matrix.cross_signing_reset".to_owned()),
    ];
    assert_eq!(b.post_form(&format!("{}/_parvis/account/action", s.base), &forged).await.status, StatusCode::FORBIDDEN);
    let (st, _) = s.post("/_matrix/client/v3/keys/device_signing/upload", Some(&access), body.clone()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let ok =
        vec![("csrf".to_owned(), csrf.clone()), ("action".to_owned(), "org.matrix.cross_signing_reset".to_owned())];
    assert_eq!(b.post_form(&format!("{}/_parvis/account/action", s.base), &ok).await.status, StatusCode::OK);
    let (st, r) = s.post("/_matrix/client/v3/keys/device_signing/upload", Some(&access), body).await;
    assert_eq!(st, StatusCode::OK, "{r}");

    // Devices: listed, and signed out from the page.
    let list = b.get(&format!("{}/_parvis/account/?action=org.matrix.devices_list", s.base)).await;
    assert!(list.body.contains("ACCTDEV1"), "{}", list.body);
    let view = b.get(&format!("{}/_parvis/account/?action=org.matrix.device_view&device_id=ACCTDEV1", s.base)).await;
    assert!(view.body.contains("Test app"), "the client is named: {}", view.body);
    let del = vec![
        ("csrf".to_owned(), csrf),
        ("action".to_owned(), "org.matrix.device_delete".to_owned()),
        ("device_id".to_owned(), "ACCTDEV1".to_owned()),
    ];
    assert_eq!(b.post_form(&format!("{}/_parvis/account/action", s.base), &del).await.status, StatusCode::OK);
    assert_eq!(whoami(&s, &access).await, StatusCode::UNAUTHORIZED);
    // Without the session cookie, the page asks to sign in.
    let anon = Browser::new().get(&format!("{}/_parvis/account/?action=org.matrix.devices_list", s.base)).await;
    assert!(anon.body.contains("password"), "{}", anon.body);
    assert!(!anon.body.contains("ACCTDEV1"));
    s.stop().await;
}

/// matrix-sdk's OAuth client (Element X's) with LemonLDAP::NG upstream: discovery, registration,
/// authorization through the portal, token exchange, sync, refresh, revocation.
#[tokio::test]
async fn oauth_matrix_sdk_through_lemonldap() {
    use matrix_sdk::authentication::oauth::registration::{ApplicationType, ClientMetadata, Localized, OAuthGrantType};
    use matrix_sdk::config::SyncSettings;
    use matrix_sdk::ruma::serde::Raw;
    use matrix_sdk::utils::UrlOrQuery;

    let Some(iss) = issuer() else { return };
    let s = TestServer::start_with(|c| {
        c.listen.client = "127.0.0.1:19098".parse().unwrap();
        c.public_baseurl = Some("http://127.0.0.1:19098/".into());
        c.sso.providers = vec![provider(&iss, "lemonldap", "matrix", "matrix-secret")];
        c.oauth.password_login = false;
    })
    .await;
    let (_, login_flows) = s.get("/_matrix/client/v3/login", None).await;
    assert_eq!(login_flows["flows"][1]["oauth_aware_preferred"], true, "{login_flows}");

    let client = matrix_sdk::Client::builder().homeserver_url(&s.base).build().await.unwrap();
    let oauth = client.oauth();
    let meta = oauth.server_metadata().await.expect("discovery");
    assert_eq!(meta.issuer.as_str(), "http://127.0.0.1:19098/");
    let redirect = url::Url::parse(REDIRECT).unwrap();
    let metadata = ClientMetadata::new(
        ApplicationType::Native,
        vec![OAuthGrantType::AuthorizationCode { redirect_uris: vec![redirect.clone()] }],
        Localized::new(url::Url::parse("https://parvis-test.example/").unwrap(), []),
    );
    oauth.register_client(&Raw::new(&metadata).unwrap()).await.expect("registration");
    let data = oauth.login(redirect, None, None, None).build().await.expect("authorization URL");

    // The browser: Parvis → the portal → Parvis's consent page → the client's redirect URI.
    let mut b = Browser::new();
    let first = b.get(data.url.as_str()).await;
    assert_eq!(first.status, StatusCode::FOUND, "{}", first.body);
    let to_provider = b.get(&first.location.unwrap()).await;
    assert_eq!(to_provider.status, StatusCode::FOUND, "{}", to_provider.body);
    let callback = through_portal(
        &mut b,
        &to_provider.location.unwrap(),
        "dwho",
        "dwho",
        &format!("{}/_synapse/client/oidc/callback", s.base),
    )
    .await;
    let back = b.get(&callback).await;
    assert_eq!(back.status, StatusCode::FOUND, "the consent URL gets the login token directly: {}", back.body);
    let consent = b.get(&back.location.unwrap()).await;
    assert_eq!(consent.status, StatusCode::OK, "{}", consent.body);
    assert!(
        consent.body.contains("@dwho:localhost") && consent.body.contains("parvis-test.example"),
        "{}",
        consent.body
    );
    let fields = vec![
        ("grant".to_owned(), hidden(&consent.body, "grant").unwrap()),
        ("csrf".to_owned(), hidden(&consent.body, "csrf").unwrap()),
        ("action".to_owned(), "allow".to_owned()),
    ];
    let done = b.post_form(&format!("{}/_parvis/oauth2/consent", s.base), &fields).await;
    let final_url = url::Url::parse(&done.location.expect("redirect to the client")).unwrap();
    assert_eq!(final_url.host_str(), Some("127.0.0.1"));
    oauth.finish_login(UrlOrQuery::Url(final_url)).await.expect("finish_login");

    let who = client.whoami().await.unwrap();
    assert_eq!(who.user_id.as_str(), "@dwho:localhost");
    client.sync_once(SyncSettings::default().timeout(std::time::Duration::from_secs(0))).await.expect("sync");
    let before = client.access_token().unwrap();
    oauth.refresh_access_token().await.expect("refresh");
    let after = client.access_token().unwrap();
    assert_ne!(before, after);
    assert_eq!(whoami(&s, &before).await, StatusCode::UNAUTHORIZED);
    assert_eq!(whoami(&s, &after).await, StatusCode::OK);
    // The SSO provider session is recorded for the OAuth device (back-channel logout finds it).
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM sso_device_sessions WHERE user_id = '@dwho:localhost'")
        .fetch_one(&s.state().db)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    // matrix-sdk's `logout()` revokes through the oauth2 crate, which refuses a revocation
    // endpoint without TLS (this test server speaks plain HTTP): send its request ourselves.
    assert!(matches!(oauth.logout().await, Err(matrix_sdk::authentication::oauth::OAuthError::Logout(_))));
    let cid = oauth.client_id().unwrap().as_str().to_owned();
    let (st, _) = form(
        &s,
        "/_parvis/oauth2/revoke",
        &[("token", &after), ("token_type_hint", "access_token"), ("client_id", &cid)],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(whoami(&s, &after).await, StatusCode::UNAUTHORIZED);
    s.stop().await;
}
