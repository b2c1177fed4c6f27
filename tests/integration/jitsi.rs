//! Issue 18, Jitsi side: OpenID tokens as Jitsi's matrix-user-verification service checks them
//! (request → userinfo on the federation listener → membership and power through the admin API),
//! discovery, and meeting rooms created by `parvis meeting create`.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

fn jitsi_config(c: &mut parvis::config::Config) {
    c.listen.federation = Some("127.0.0.1:0".parse().unwrap());
    c.public_baseurl = Some("https://matrix.ville.example/".into());
    c.jitsi.domain = Some("visio.ville.example".into());
    c.jitsi.openid_auth = true;
    c.matrix_rtc.livekit_service_urls = vec!["https://livekit-jwt.ville.example".into()];
}

async fn raw_get(s: &TestServer, url: &str) -> (StatusCode, Value) {
    let resp = s.http.get(url).send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn token_path(user: &str) -> String {
    format!("/_matrix/client/v3/user/{}/openid/request_token", enc(user))
}

/// What the verification service does: the user's client requests an OpenID token, Jitsi asks the
/// server name's federation address who it belongs to, then the admin API whether that user is in
/// the room (and with which power).
#[tokio::test]
async fn jitsi_verification_flow() {
    let s = TestServer::start_with(jitsi_config).await;
    let fed = s.federation.clone().expect("federation listener");
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let carol = s.register("carol", false).await;
    let service = s.register("verifier", true).await;
    let room = create(&s, &alice, json!({ "name": "Conseil", "invite": [bob.user_id] })).await;
    let (st, v) = s.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&bob.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");

    // The client's request.
    let (st, tok) = s.post(&token_path(&alice.user_id), Some(&alice.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{tok}");
    assert_eq!(tok["token_type"], "Bearer");
    assert_eq!(tok["matrix_server_name"], "localhost");
    assert_eq!(tok["expires_in"], 3600);
    let openid = tok["access_token"].as_str().unwrap().to_owned();
    assert_ne!(openid, alice.token);
    // Only for oneself.
    assert_err(&s.post(&token_path(&bob.user_id), Some(&alice.token), json!({})).await, 403, "M_FORBIDDEN");
    assert_err(&s.post(&token_path(&alice.user_id), None, json!({})).await, 401, "M_MISSING_TOKEN");

    // Jitsi asks the federation listener, and the client listener answers the same.
    let userinfo =
        |base: &str, t: &str| format!("{base}/_matrix/federation/v1/openid/userinfo?access_token={}", enc(t));
    let (st, v) = raw_get(&s, &userinfo(&fed, &openid)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "sub": alice.user_id }));
    let (st, v) = raw_get(&s, &userinfo(&s.base, &openid)).await;
    assert_eq!((st, &v["sub"]), (StatusCode::OK, &json!(alice.user_id)), "{v}");
    // A token is reusable until it expires (Jitsi may verify again on reconnection).
    assert_eq!(raw_get(&s, &userinfo(&fed, &openid)).await.1["sub"], alice.user_id.as_str());

    // Refused: an access token, a forged token, a missing one.
    for bad in [alice.token.as_str(), "pvo_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "", &"x".repeat(600)] {
        let r = raw_get(&s, &userinfo(&fed, bad)).await;
        assert_err(&r, 401, "M_UNKNOWN_TOKEN");
    }
    assert_err(&raw_get(&s, &format!("{fed}/_matrix/federation/v1/openid/userinfo")).await, 401, "M_UNKNOWN_TOKEN");
    // The OpenID token grants nothing else: not an access token anywhere.
    assert_err(&s.get("/_matrix/client/v3/account/whoami", Some(&openid)).await, 401, "M_UNKNOWN_TOKEN");
    assert_err(
        &s.get(&format!("/_synapse/admin/v1/rooms/{}/members", enc(&room)), Some(&openid)).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    // The federation listener serves no client API (federation itself: federation_keys.rs).
    for path in ["/_matrix/client/versions", "/_matrix/federation/v1/no/such/endpoint"] {
        assert_err(&raw_get(&s, &format!("{fed}{path}")).await, 404, "M_UNRECOGNIZED");
    }
    // Federation endpoints want an X-Matrix signature.
    assert_err(&raw_get(&s, &format!("{fed}/_matrix/federation/v1/state/x")).await, 401, "M_UNAUTHORIZED");

    // Membership and power, as the service asks a Synapse.
    let members = format!("/_synapse/admin/v1/rooms/{}/members", enc(&room));
    let (st, v) = s.get(&members, Some(&service.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let list: Vec<&str> = v["members"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    assert!(list.contains(&alice.user_id.as_str()) && list.contains(&bob.user_id.as_str()), "{v}");
    assert!(!list.contains(&carol.user_id.as_str()), "{v}");
    assert_eq!(v["total"], 2);
    let (st, v) = s.get(&format!("/_synapse/admin/v1/rooms/{}/state", enc(&room)), Some(&service.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let state = v["state"].as_array().unwrap();
    let find = |t: &str, k: &str| state.iter().find(|e| e["type"] == t && e["state_key"] == k).cloned();
    assert_eq!(find("m.room.member", &bob.user_id).unwrap()["content"]["membership"], "join");
    assert_eq!(find("m.room.create", "").unwrap()["sender"], alice.user_id.as_str());
    assert!(find("m.room.power_levels", "").is_some(), "{v}");
    assert!(find("m.room.member", &carol.user_id).is_none());
    // Admins only; unknown rooms are 404.
    assert_err(&s.get(&members, Some(&alice.token)).await, 403, "M_FORBIDDEN");
    assert_err(
        &s.get("/_synapse/admin/v1/rooms/!nope:localhost/state", Some(&service.token)).await,
        404,
        "M_NOT_FOUND",
    );

    // A deactivated account's tokens stop working.
    let (st, tok) = s.post(&token_path(&carol.user_id), Some(&carol.token), json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let carol_openid = tok["access_token"].as_str().unwrap().to_owned();
    assert_eq!(raw_get(&s, &userinfo(&fed, &carol_openid)).await.0, StatusCode::OK);
    sqlx::query("UPDATE users SET deactivated = true WHERE user_id = $1")
        .bind(&carol.user_id)
        .execute(&s.state().db)
        .await
        .unwrap();
    assert_err(&raw_get(&s, &userinfo(&fed, &carol_openid)).await, 401, "M_UNKNOWN_TOKEN");
    s.stop().await;
}

#[tokio::test]
async fn openid_tokens_expire() {
    let s = TestServer::start_with(|c| c.openid.token_lifetime_secs = 1).await;
    let alice = s.register("alice", false).await;
    let (st, tok) = s.post(&token_path(&alice.user_id), Some(&alice.token), json!({})).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(tok["expires_in"], 1);
    let t = tok["access_token"].as_str().unwrap();
    let path = format!("/_matrix/federation/v1/openid/userinfo?access_token={}", enc(t));
    assert_eq!(s.get(&path, None).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_err(&s.get(&path, None).await, 401, "M_UNKNOWN_TOKEN");
    s.stop().await;
}

#[tokio::test]
async fn discovery_of_jitsi_and_rtc_foci() {
    let s = TestServer::start_with(jitsi_config).await;
    let alice = s.register("alice", false).await;
    let (st, v) = s.get("/.well-known/matrix/client", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["im.vector.riot.jitsi"], json!({ "preferredDomain": "visio.ville.example" }));
    assert_eq!(
        v["org.matrix.msc4143.rtc_foci"],
        json!([{ "type": "livekit", "livekit_service_url": "https://livekit-jwt.ville.example" }])
    );
    assert_eq!(v["m.homeserver"]["base_url"], "https://matrix.ville.example/");
    let transports = "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports";
    let (st, v) = s.get(transports, Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["rtc_transports"][0]["livekit_service_url"], "https://livekit-jwt.ville.example");
    assert_err(&s.get(transports, None).await, 401, "M_MISSING_TOKEN");
    let (_, v) = s.get("/_matrix/client/versions", None).await;
    assert_eq!(v["unstable_features"]["org.matrix.msc4140"], true, "{v}");
    assert_eq!(v["unstable_features"]["org.matrix.msc4222"], true, "{v}");
    s.stop().await;

    // Nothing configured: nothing advertised, the transports endpoint does not exist.
    let s = TestServer::start_with(|c| c.public_baseurl = Some("https://m.example/".into())).await;
    let alice = s.register("alice", false).await;
    let (_, v) = s.get("/.well-known/matrix/client", None).await;
    assert!(v.get("im.vector.riot.jitsi").is_none() && v.get("org.matrix.msc4143.rtc_foci").is_none(), "{v}");
    assert_err(&s.get(transports, Some(&alice.token)).await, 404, "M_UNRECOGNIZED");
    // Meeting rooms need Jitsi.
    let admin = s.register("admin", true).await;
    let r = s.post("/_parvis/admin/v1/meetings", Some(&admin.token), json!({ "name": "x" })).await;
    assert_err(&r, 404, "M_UNRECOGNIZED");
    s.stop().await;
}

/// Runs the CLI off the test's runtime thread (the server under test runs on it).
async fn run(mut cmd: std::process::Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
}

fn base32(bytes: &[u8]) -> String {
    // An independent encoder (bit string, then 5-bit groups), to check the server's.
    let bits: String = bytes.iter().map(|b| format!("{b:08b}")).collect();
    bits.as_bytes()
        .chunks(5)
        .map(|c| {
            let mut s = String::from_utf8(c.to_vec()).unwrap();
            while s.len() < 5 {
                s.push('0');
            }
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[usize::from_str_radix(&s, 2).unwrap()] as char
        })
        .collect()
}

/// `parvis meeting create` goes through the running server's admin API: the room has the widget
/// Element Web adds when an agent starts a Jitsi call (compared field by field with
/// `WidgetUtils.addJitsiWidget`), its creator sees it in `/sync` at once, the invitee is invited.
#[tokio::test]
async fn meeting_room_created_by_the_cli() {
    let s = TestServer::start_with(jitsi_config).await;
    let admin = s.register("admin", true).await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let (_, first) = s.get("/_matrix/client/v3/sync", Some(&alice.token)).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();

    let mut cmd = crate::cli::parvis();
    cmd.args(["meeting", "create", "--name", "Conseil municipal", "--topic", "Séance du lundi"])
        .args(["--creator", &alice.user_id, "--invite", &bob.user_id, "--server-url", &s.base])
        .env("PARVIS_ADMIN_TOKEN", &admin.token);
    let out = run(cmd).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meeting: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let room = meeting["room_id"].as_str().unwrap().to_owned();
    let conf = base32(room.as_bytes());
    assert_eq!(meeting["conference_id"], conf.as_str());
    assert_eq!(meeting["jitsi_url"], format!("https://visio.ville.example/{conf}"));
    let widget_id = meeting["widget_id"].as_str().unwrap().to_owned();
    assert_eq!(widget_id.len(), 24);

    // The creator's next sync has the room, with the widget and layout state.
    let (st, v) = s.get(&format!("/_matrix/client/v3/sync?since={since}"), Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let joined = &v["rooms"]["join"][&room];
    assert!(joined.is_object(), "the new room is in the creator's sync: {v}");
    let events: Vec<Value> = ["state", "timeline"]
        .iter()
        .flat_map(|k| joined[k]["events"].as_array().cloned().unwrap_or_default())
        .collect();
    let widget = events
        .iter()
        .find(|e| e["type"] == "im.vector.modular.widgets" && e["state_key"] == widget_id.as_str())
        .expect("widget state in sync")
        .clone();
    assert_eq!(widget["sender"], alice.user_id.as_str());
    let c = &widget["content"];
    assert_eq!(c["type"], "jitsi");
    assert_eq!(c["name"], "Jitsi");
    assert_eq!(
        c["data"],
        json!({
            "conferenceId": conf, "domain": "visio.ville.example", "isAudioOnly": false,
            "isVideoChannel": false, "roomName": "Conseil municipal", "auth": "openidtoken-jwt",
        })
    );
    let url = c["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("https://app.element.io/jitsi.html?confId={conf}#")), "{url}");
    for part in [
        "conferenceDomain=$domain",
        "conferenceId=$conferenceId",
        "isAudioOnly=$isAudioOnly",
        "userId=$matrix_user_id",
        "roomId=$matrix_room_id",
        "auth=openidtoken-jwt",
    ] {
        assert!(url.contains(part), "{part} missing from {url}");
    }
    let layout = events.iter().find(|e| e["type"] == "io.element.widgets.layout").expect("layout state");
    assert_eq!(layout["state_key"], "");
    assert_eq!(layout["content"]["widgets"][&widget_id]["container"], "top");
    // Name, topic, and the invitation.
    let (_, name) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room)), Some(&alice.token)).await;
    assert_eq!(name["name"], "Conseil municipal");
    let (_, bv) = s.get("/_matrix/client/v3/sync", Some(&bob.token)).await;
    assert!(bv["rooms"]["invite"][&room].is_object(), "{bv}");

    // The plain Jitsi link the prosody module accepts: the conference name decodes to the room.
    assert_eq!(base32(room.as_bytes()), conf);

    // A non-admin token is refused, and the CLI says so.
    let mut cmd = crate::cli::parvis();
    cmd.args(["meeting", "create", "--name", "x", "--server-url", &s.base, "--access-token", &alice.token]);
    let out = run(cmd).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("M_FORBIDDEN"), "{}", String::from_utf8_lossy(&out.stderr));
    // The admin API directly: audio only, bad inputs.
    let (st, v) =
        s.post("/_parvis/admin/v1/meetings", Some(&admin.token), json!({ "name": "Point", "audio_only": true })).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (_, st2) = s
        .get(&format!("/_matrix/client/v3/rooms/{}/state", enc(v["room_id"].as_str().unwrap())), Some(&admin.token))
        .await;
    let w = st2.as_array().unwrap().iter().find(|e| e["type"] == "im.vector.modular.widgets").unwrap().clone();
    assert_eq!(w["content"]["data"]["isAudioOnly"], true);
    assert_err(
        &s.post("/_parvis/admin/v1/meetings", Some(&admin.token), json!({ "name": "" })).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.post("/_parvis/admin/v1/meetings", Some(&admin.token), json!({ "nom": "x" })).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.post(
            "/_parvis/admin/v1/meetings",
            Some(&admin.token),
            json!({ "name": "x", "creator": "@ghost:localhost" }),
        )
        .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.post("/_parvis/admin/v1/meetings", Some(&admin.token), json!({ "name": "x", "creator": "@a:elsewhere" }))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    s.stop().await;
}
