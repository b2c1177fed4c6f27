use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

const REGISTER: &str = "/_matrix/client/v3/register";

#[tokio::test]
async fn registration_is_closed_by_default() {
    let s = TestServer::start().await;
    assert_err(&s.post(REGISTER, None, json!({ "username": "eve", "password": PASSWORD })).await, 403, "M_FORBIDDEN");
    assert_err(&s.get("/_matrix/client/v3/register/available?username=eve", None).await, 403, "M_FORBIDDEN");
    assert_err(
        &s.get("/_matrix/client/v1/register/m.login.registration_token/validity?token=x", None).await,
        403,
        "M_FORBIDDEN",
    );
    s.stop().await;
}

#[tokio::test]
async fn registration_with_dummy_uia_round_trip() {
    let s = TestServer::start_with(|c| {
        c.registration.enabled = true;
        c.registration.reserved_localparts = vec!["admin".into()];
    })
    .await;
    // First call: the UIA challenge.
    let (st, ch) = s.post(REGISTER, None, json!({ "username": "agent.dupont", "password": PASSWORD })).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{ch}");
    assert_eq!(ch["flows"], json!([{ "stages": ["m.login.dummy"] }]));
    assert!(ch.get("errcode").is_none(), "a plain challenge has no errcode: {ch}");
    let session = ch["session"].as_str().unwrap();
    assert_eq!(ch["completed"], json!([]));

    // A stage that is not offered is refused.
    let r = s
        .post(REGISTER, None, json!({ "username": "agent.dupont", "password": PASSWORD, "auth": { "type": "m.login.registration_token", "token": "x", "session": session } }))
        .await;
    assert_err(&r, 400, "M_UNRECOGNIZED");
    // Unknown session.
    let r = s
        .post(REGISTER, None, json!({ "username": "agent.dupont", "password": PASSWORD, "auth": { "type": "m.login.dummy", "session": "nope" } }))
        .await;
    assert_err(&r, 400, "M_UNKNOWN");

    let (st, body) = s
        .post(
            REGISTER,
            None,
            json!({
                "username": "agent.dupont", "password": PASSWORD,
                "initial_device_display_name": "Element Web",
                "auth": { "type": "m.login.dummy", "session": session }
            }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "@agent.dupont:localhost");
    let u = user_from(&body);
    let (_, who) = s.get("/_matrix/client/v3/account/whoami", Some(&u.token)).await;
    assert_eq!(who, json!({ "user_id": u.user_id, "device_id": u.device_id, "is_guest": false }));
    let (_, dev) = s.get(&format!("/_matrix/client/v3/devices/{}", u.device_id), Some(&u.token)).await;
    assert_eq!(dev["display_name"], "Element Web");
    // The session is consumed.
    let r = s
        .post(REGISTER, None, json!({ "username": "other", "password": PASSWORD, "auth": { "type": "m.login.dummy", "session": session } }))
        .await;
    assert_err(&r, 400, "M_UNKNOWN");
    // The localpart is the initial display name.
    let (_, p) = s.get("/_matrix/client/v3/profile/@agent.dupont:localhost", None).await;
    assert_eq!(p["displayname"], "agent.dupont");

    // Taken, invalid and reserved names fail before any UIA.
    assert_err(
        &s.post(REGISTER, None, json!({ "username": "agent.dupont", "password": PASSWORD })).await,
        400,
        "M_USER_IN_USE",
    );
    for bad in ["hélène", "a b", "a:b", "", "x#"] {
        assert_err(
            &s.post(REGISTER, None, json!({ "username": bad, "password": PASSWORD })).await,
            400,
            "M_INVALID_USERNAME",
        );
    }
    assert_err(&s.post(REGISTER, None, json!({ "username": "admin", "password": PASSWORD })).await, 400, "M_EXCLUSIVE");
    assert_err(
        &s.post(REGISTER, None, json!({ "username": "shortpw", "password": "abc" })).await,
        400,
        "M_WEAK_PASSWORD",
    );
    assert_err(&s.post(&format!("{REGISTER}?kind=guest"), None, json!({})).await, 403, "M_GUEST_ACCESS_FORBIDDEN");

    // Availability.
    let (st, v) = s.get("/_matrix/client/v3/register/available?username=free.name", None).await;
    assert_eq!((st, v), (StatusCode::OK, json!({ "available": true })));
    assert_err(&s.get("/_matrix/client/v3/register/available?username=agent.dupont", None).await, 400, "M_USER_IN_USE");
    assert_err(
        &s.get("/_matrix/client/v3/register/available?username=Bad%20Name", None).await,
        400,
        "M_INVALID_USERNAME",
    );
    assert_err(&s.get("/_matrix/client/v3/register/available", None).await, 400, "M_MISSING_PARAM");

    // inhibit_login: an account, no session.
    let (st, ch) = s.post(REGISTER, None, json!({ "username": "nologin", "password": PASSWORD })).await;
    assert_eq!(st, 401);
    let (st, body) = s
        .post(REGISTER, None, json!({ "username": "nologin", "password": PASSWORD, "inhibit_login": true, "auth": { "type": "m.login.dummy", "session": ch["session"] } }))
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "@nologin:localhost");
    assert!(body.get("access_token").is_none());
    s.stop().await;
}

#[tokio::test]
async fn registration_tokens() {
    let s = TestServer::start_with(|c| {
        c.registration.enabled = true;
        c.registration.require_token = true;
    })
    .await;
    let admin = s.register("root", true).await;
    let plain = s.register("plain", false).await;
    // Admin API guards.
    assert_err(
        &s.post("/_synapse/admin/v1/registration_tokens/new", Some(&plain.token), json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    let (st, t) = s
        .post(
            "/_synapse/admin/v1/registration_tokens/new",
            Some(&admin.token),
            json!({ "token": "mairie-2026", "uses_allowed": 1 }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{t}");
    assert_eq!(t["token"], "mairie-2026");

    let validity = "/_matrix/client/v1/register/m.login.registration_token/validity?token=";
    assert_eq!(s.get(&format!("{validity}mairie-2026"), None).await.1, json!({ "valid": true }));
    assert_eq!(s.get(&format!("{validity}wrong"), None).await.1, json!({ "valid": false }));

    let (st, ch) = s.post(REGISTER, None, json!({ "username": "newagent", "password": PASSWORD })).await;
    assert_eq!(st, 401);
    assert_eq!(ch["flows"], json!([{ "stages": ["m.login.registration_token"] }]));
    let session = ch["session"].clone();
    // Wrong token: 401 with M_UNAUTHORIZED and the challenge again.
    let (st, bad) = s
        .post(REGISTER, None, json!({ "username": "newagent", "password": PASSWORD, "auth": { "type": "m.login.registration_token", "token": "wrong", "session": session } }))
        .await;
    assert_eq!(st, 401);
    assert_eq!(bad["errcode"], "M_UNAUTHORIZED");
    assert_eq!(bad["session"], session);
    let (st, ok) = s
        .post(REGISTER, None, json!({ "username": "newagent", "password": PASSWORD, "auth": { "type": "m.login.registration_token", "token": "mairie-2026", "session": session } }))
        .await;
    assert_eq!(st, StatusCode::OK, "{ok}");
    // Single use: now spent.
    assert_eq!(s.get(&format!("{validity}mairie-2026"), None).await.1, json!({ "valid": false }));
    let (_, t) = s.get("/_synapse/admin/v1/registration_tokens/mairie-2026", Some(&admin.token)).await;
    assert_eq!(t["completed"], 1);
    let (st, list) = s.get("/_synapse/admin/v1/registration_tokens", Some(&admin.token)).await;
    assert_eq!(st, 200);
    assert_eq!(list["registration_tokens"].as_array().unwrap().len(), 1);
    assert_eq!(
        s.delete("/_synapse/admin/v1/registration_tokens/mairie-2026", Some(&admin.token), json!({})).await.0,
        200
    );
    assert_err(
        &s.get("/_synapse/admin/v1/registration_tokens/mairie-2026", Some(&admin.token)).await,
        404,
        "M_NOT_FOUND",
    );
    s.stop().await;
}

#[tokio::test]
async fn shared_secret_registration_like_synapse() {
    let s = TestServer::start().await;
    let (st, n) = s.get("/_synapse/admin/v1/register", None).await;
    assert_eq!(st, 200);
    let nonce = n["nonce"].as_str().unwrap().to_owned();
    // The MAC is computed exactly as Synapse's register_new_matrix_user does (HMAC-SHA1, hex).
    let mac =
        parvis::api::admin::register::compute_mac(SHARED_SECRET, &nonce, "bot.alerts", PASSWORD, false, Some("bot"));
    let wrong =
        parvis::api::admin::register::compute_mac("not-the-secret", &nonce, "bot.alerts", PASSWORD, false, Some("bot"));
    let body = |mac: &str| json!({ "nonce": nonce, "username": "bot.alerts", "password": PASSWORD, "admin": false, "user_type": "bot", "displayname": "Alertes", "mac": mac });
    assert_err(&s.post("/_synapse/admin/v1/register", None, body(&wrong)).await, 403, "M_FORBIDDEN");
    // The nonce was consumed by the failed attempt.
    assert_err(&s.post("/_synapse/admin/v1/register", None, body(&mac)).await, 400, "M_UNKNOWN");
    let (_, n) = s.get("/_synapse/admin/v1/register", None).await;
    let nonce = n["nonce"].as_str().unwrap().to_owned();
    let mac =
        parvis::api::admin::register::compute_mac(SHARED_SECRET, &nonce, "bot.alerts", PASSWORD, false, Some("bot"));
    let (st, ok) = s
        .post("/_synapse/admin/v1/register", None, json!({ "nonce": nonce, "username": "bot.alerts", "password": PASSWORD, "user_type": "bot", "displayname": "Alertes", "mac": mac }))
        .await;
    assert_eq!(st, 200, "{ok}");
    assert_eq!(ok["user_id"], "@bot.alerts:localhost");
    assert_eq!(ok["home_server"], "localhost");
    let (_, p) = s.get("/_matrix/client/v3/profile/@bot.alerts:localhost/displayname", None).await;
    assert_eq!(p, json!({ "displayname": "Alertes" }));
    assert_err(&s.post("/_synapse/admin/v1/register", None, json!({ "username": "x" })).await, 400, "M_MISSING_PARAM");
    s.stop().await;

    // Disabled when no secret is configured.
    let s = TestServer::start_with(|c| c.registration.shared_secret = None).await;
    assert_err(&s.get("/_synapse/admin/v1/register", None).await, 400, "M_UNKNOWN");
    s.stop().await;
}

#[tokio::test]
async fn login_logout_and_tokens() {
    let s = TestServer::start().await;
    s.register("marie", false).await;
    let (st, flows) = s.get("/_matrix/client/v3/login", None).await;
    assert_eq!(st, 200);
    assert_eq!(flows["flows"][0]["type"], "m.login.password");

    // Wrong password, unknown user: the same 403.
    assert_err(&s.login("marie", "wrong password", json!({})).await, 403, "M_FORBIDDEN");
    assert_err(&s.login("nobody", PASSWORD, json!({})).await, 403, "M_FORBIDDEN");
    assert_err(&s.login("@marie:elsewhere.example", PASSWORD, json!({})).await, 403, "M_FORBIDDEN");
    let unknown_type = s.post("/_matrix/client/v3/login", None, json!({ "type": "m.login.foo" })).await;
    assert_err(&unknown_type, 400, "M_UNKNOWN");
    assert_err(&s.post("/_matrix/client/v3/login", None, json!({ "identifier": {} })).await, 400, "M_BAD_JSON");

    // Localpart, full MXID, legacy `user` field, any case.
    let (st, a) = s.login("marie", PASSWORD, json!({ "initial_device_display_name": "Poste mairie" })).await;
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["user_id"], "@marie:localhost");
    let (st, b) = s.login("@Marie:localhost", PASSWORD, json!({})).await;
    assert_eq!(st, 200, "{b}");
    let (st, c) = s
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({ "type": "m.login.password", "user": "marie", "password": PASSWORD }),
        )
        .await;
    assert_eq!(st, 200, "{c}");
    let a = user_from(&a);
    let b = user_from(&b);
    let c = user_from(&c);
    assert_ne!(a.device_id, b.device_id);

    // device_id reuse: same device, new token, display name kept.
    let (st, a2) =
        s.login("marie", PASSWORD, json!({ "device_id": a.device_id, "initial_device_display_name": "ignored" })).await;
    assert_eq!(st, 200);
    let a2 = user_from(&a2);
    assert_eq!(a2.device_id, a.device_id);
    assert_ne!(a2.token, a.token);
    let (_, devs) = s.get("/_matrix/client/v3/devices", Some(&a2.token)).await;
    assert_eq!(devs["devices"].as_array().unwrap().len(), 4, "registration device + 3 logins: {devs}");
    let (_, d) = s.get(&format!("/_matrix/client/v3/devices/{}", a.device_id), Some(&a2.token)).await;
    assert_eq!(d["display_name"], "Poste mairie");

    // Tokens: header and legacy query parameter; missing and unknown.
    assert_err(&s.get("/_matrix/client/v3/account/whoami", None).await, 401, "M_MISSING_TOKEN");
    let unknown = s.get("/_matrix/client/v3/account/whoami", Some("pva_nope")).await;
    assert_err(&unknown, 401, "M_UNKNOWN_TOKEN");
    assert_eq!(unknown.1["soft_logout"], false);
    let (st, who) = s.get(&format!("/_matrix/client/v3/account/whoami?access_token={}", b.token), None).await;
    assert_eq!(st, 200);
    assert_eq!(who["device_id"], b.device_id);
    // r0 paths work too.
    assert_eq!(s.get("/_matrix/client/r0/account/whoami", Some(&b.token)).await.0, 200);

    // Logout deletes the device and revokes its token.
    assert_eq!(s.post("/_matrix/client/v3/logout", Some(&b.token), json!({})).await.0, 200);
    assert_err(&s.get("/_matrix/client/v3/account/whoami", Some(&b.token)).await, 401, "M_UNKNOWN_TOKEN");
    let (_, devs) = s.get("/_matrix/client/v3/devices", Some(&c.token)).await;
    assert!(!devs["devices"].as_array().unwrap().iter().any(|d| d["device_id"] == b.device_id.as_str()));

    // Logout all.
    assert_eq!(s.post("/_matrix/client/v3/logout/all", Some(&c.token), json!({})).await.0, 200);
    for t in [&a.token, &a2.token, &c.token] {
        assert_err(&s.get("/_matrix/client/v3/account/whoami", Some(t)).await, 401, "M_UNKNOWN_TOKEN");
    }
    s.stop().await;
}

#[tokio::test]
async fn refresh_tokens_and_soft_logout() {
    let s = TestServer::start_with(|c| c.auth.access_token_lifetime_secs = 2).await;
    s.register("paul", false).await;
    let (st, l) = s.login("paul", PASSWORD, json!({ "refresh_token": true })).await;
    assert_eq!(st, 200, "{l}");
    assert_eq!(l["expires_in_ms"], 2000);
    let rt = l["refresh_token"].as_str().unwrap().to_owned();
    let at = l["access_token"].as_str().unwrap().to_owned();
    assert_eq!(s.get("/_matrix/client/v3/account/whoami", Some(&at)).await.0, 200);

    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    let expired = s.get("/_matrix/client/v3/account/whoami", Some(&at)).await;
    assert_err(&expired, 401, "M_UNKNOWN_TOKEN");
    assert_eq!(expired.1["soft_logout"], true);

    let (st, r) = s.post("/_matrix/client/v3/refresh", None, json!({ "refresh_token": rt })).await;
    assert_eq!(st, 200, "{r}");
    let at2 = r["access_token"].as_str().unwrap();
    let rt2 = r["refresh_token"].as_str().unwrap();
    assert_ne!(rt2, rt);
    assert_eq!(r["expires_in_ms"], 2000);
    let (st, who) = s.get("/_matrix/client/v3/account/whoami", Some(at2)).await;
    assert_eq!(st, 200);
    assert_eq!(who["device_id"], l["device_id"]);
    // A refresh token works once.
    let reused = s.post("/_matrix/client/v3/refresh", None, json!({ "refresh_token": rt })).await;
    assert_err(&reused, 401, "M_UNKNOWN_TOKEN");
    assert_err(&s.post("/_matrix/client/v3/refresh", None, json!({})).await, 400, "M_BAD_JSON");

    // Without refresh_token: a non-expiring token, no refresh token.
    let (_, l) = s.login("paul", PASSWORD, json!({})).await;
    assert!(l.get("refresh_token").is_none() && l.get("expires_in_ms").is_none(), "{l}");
    s.stop().await;
}

fn password_auth(session: &Value, user: &str, password: &str) -> Value {
    json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": user },
        "password": password,
        "session": session,
    })
}

#[tokio::test]
async fn change_password_with_uia() {
    let s = TestServer::start().await;
    let me = s.register("jeanne", false).await;
    let (_, other) = s.login("jeanne", PASSWORD, json!({})).await;
    let other = user_from(&other);
    let path = "/_matrix/client/v3/account/password";
    let new = "an even better passphrase";

    assert_err(&s.post(path, None, json!({ "new_password": new })).await, 401, "M_MISSING_TOKEN");
    let (st, ch) = s.post(path, Some(&me.token), json!({ "new_password": new })).await;
    assert_eq!(st, 401);
    assert_eq!(ch["flows"], json!([{ "stages": ["m.login.password"] }]));
    // Wrong password: 401, M_FORBIDDEN, same session offered again.
    let (st, bad) = s
        .post(
            path,
            Some(&me.token),
            json!({ "new_password": new, "auth": password_auth(&ch["session"], "jeanne", "nope") }),
        )
        .await;
    assert_eq!(st, 401);
    assert_eq!(bad["errcode"], "M_FORBIDDEN");
    assert_eq!(bad["session"], ch["session"]);
    // Someone else's password does not authenticate jeanne.
    s.register("intruder", false).await;
    let (st, _) = s
        .post(
            path,
            Some(&me.token),
            json!({ "new_password": new, "auth": password_auth(&ch["session"], "intruder", PASSWORD) }),
        )
        .await;
    assert_eq!(st, 401);
    // A session belongs to one operation.
    let wrong_op = s
        .post(
            "/_matrix/client/v3/account/deactivate",
            Some(&me.token),
            json!({ "auth": password_auth(&ch["session"], "jeanne", PASSWORD) }),
        )
        .await;
    assert_err(&wrong_op, 403, "M_FORBIDDEN");

    assert_err(&s.post(path, Some(&me.token), json!({ "new_password": "short" })).await, 400, "M_WEAK_PASSWORD");
    let (st, ok) = s
        .post(
            path,
            Some(&me.token),
            json!({ "new_password": new, "auth": password_auth(&ch["session"], "jeanne", PASSWORD) }),
        )
        .await;
    assert_eq!(st, 200, "{ok}");
    // Other devices are logged out; this one stays.
    assert_eq!(s.get("/_matrix/client/v3/account/whoami", Some(&me.token)).await.0, 200);
    assert_err(&s.get("/_matrix/client/v3/account/whoami", Some(&other.token)).await, 401, "M_UNKNOWN_TOKEN");
    assert_err(&s.login("jeanne", PASSWORD, json!({})).await, 403, "M_FORBIDDEN");
    assert_eq!(s.login("jeanne", new, json!({})).await.0, 200);

    // logout_devices: false keeps the other sessions.
    let (_, third) = s.login("jeanne", new, json!({})).await;
    let third = user_from(&third);
    // (The request stays the same through a UIA session, as the spec requires.)
    let (_, ch) = s.post(path, Some(&me.token), json!({ "new_password": PASSWORD, "logout_devices": false })).await;
    let (st, _) = s
        .post(path, Some(&me.token), json!({ "new_password": PASSWORD, "logout_devices": false, "auth": password_auth(&ch["session"], "@jeanne:localhost", new) }))
        .await;
    assert_eq!(st, 200);
    assert_eq!(s.get("/_matrix/client/v3/account/whoami", Some(&third.token)).await.0, 200);
    s.stop().await;
}

#[tokio::test]
async fn deactivate_account() {
    let s = TestServer::start().await;
    let me = s.register("partant", false).await;
    let (_, other) = s.login("partant", PASSWORD, json!({})).await;
    let other = user_from(&other);
    let path = "/_matrix/client/v3/account/deactivate";
    let (st, ch) = s.post(path, Some(&me.token), json!({ "erase": true })).await;
    assert_eq!(st, 401);
    let (st, ok) = s
        .post(
            path,
            Some(&me.token),
            json!({ "erase": true, "auth": password_auth(&ch["session"], "partant", PASSWORD) }),
        )
        .await;
    assert_eq!(st, 200, "{ok}");
    assert_eq!(ok["id_server_unbind_result"], "no-support");
    for t in [&me.token, &other.token] {
        assert_err(&s.get("/_matrix/client/v3/account/whoami", Some(t)).await, 401, "M_UNKNOWN_TOKEN");
    }
    assert_err(&s.login("partant", PASSWORD, json!({})).await, 403, "M_USER_DEACTIVATED");
    assert_err(&s.get("/_matrix/client/v3/profile/@partant:localhost", None).await, 404, "M_NOT_FOUND");
    // The name stays taken forever.
    let u = s.state();
    assert!(parvis::storage::users::exists(&u.db, "@partant:localhost").await.unwrap());
    s.stop().await;
}
