//! Hostile input (issue 11): text PostgreSQL cannot store (U+0000) is refused at the edge with
//! 400 for every body, path and query parameter; sync filters and push rules with adversarial
//! patterns are bounded and neither stall nor break anything; nothing one user stores makes an
//! endpoint fail for others.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::*;

const C: &str = "/_matrix/client/v3";

async fn send(s: &TestServer, u: &User, room: &str, txn: &str, body: &str) -> (StatusCode, Value) {
    s.put(
        &format!("{C}/rooms/{}/send/m.room.message/{txn}", enc(room)),
        Some(&u.token),
        json!({ "msgtype": "m.text", "body": body }),
    )
    .await
}

/// Bodies of the room's messages, newest first.
async fn bodies(s: &TestServer, u: &User, room: &str) -> Vec<String> {
    let (st, v) = s.get(&format!("{C}/rooms/{}/messages?dir=b&limit=50", enc(room)), Some(&u.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
}

async fn join(s: &TestServer, u: &User, room: &str) {
    let (st, v) = s.post(&format!("{C}/rooms/{}/join", enc(room)), Some(&u.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
}

/// A raw request body (so that `\u0000` escapes reach the server as the client wrote them).
async fn raw(s: &TestServer, method: Method, path: &str, token: &str, body: &str) -> (StatusCode, Value) {
    let resp = s
        .http
        .request(method, format!("{}{path}", s.base))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn nul_in_member_display_name_is_refused_and_the_room_keeps_working() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    join(&s, &bob, &room).await;

    // The member event with U+0000 in its display name: refused before anything is written.
    let r = s
        .put(
            &format!("{C}/rooms/{}/state/m.room.member/{}", enc(&room), enc(&bob.user_id)),
            Some(&bob.token),
            json!({ "membership": "join", "displayname": "bob\u{0}" }),
        )
        .await;
    assert_err(&r, 400, "M_BAD_JSON");
    // The same through the profile (which would rewrite every member event of the user).
    let r = s
        .put(
            &format!("{C}/profile/{}/displayname", enc(&bob.user_id)),
            Some(&bob.token),
            json!({ "displayname": "b\u{0}" }),
        )
        .await;
    assert_err(&r, 400, "M_BAD_JSON");
    // In a key at depth.
    let r = raw(
        &s,
        Method::PUT,
        &format!("{C}/rooms/{}/send/m.room.message/deep", enc(&room)),
        &bob.token,
        r#"{"msgtype":"m.text","body":"x","a":{"b":[{"c\u0000":1}]}}"#,
    )
    .await;
    assert_err(&r, 400, "M_BAD_JSON");
    // An escaped backslash before `u0000` is ordinary text and is stored as sent.
    let r = raw(
        &s,
        Method::PUT,
        &format!("{C}/rooms/{}/send/m.room.message/esc", enc(&room)),
        &bob.token,
        r#"{"msgtype":"m.text","body":"\\u0000"}"#,
    )
    .await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);

    // Everyone's sends into the room still work and are stored.
    for (i, u) in [&alice, &bob, &alice].into_iter().enumerate() {
        let (st, v) = send(&s, u, &room, &format!("t{i}"), &format!("after {i}")).await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    let b = bodies(&s, &alice, &room).await;
    assert_eq!(&b[..4], ["after 2", "after 1", "after 0", "\\u0000"], "{b:?}");
    // Bob's profile is intact and still changeable.
    let r = s
        .put(
            &format!("{C}/profile/{}/displayname", enc(&bob.user_id)),
            Some(&bob.token),
            json!({ "displayname": "Bob" }),
        )
        .await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    let (st, p) = s.get(&format!("{C}/profile/{}", enc(&bob.user_id)), None).await;
    assert_eq!((st, p["displayname"].as_str()), (StatusCode::OK, Some("Bob")), "{p}");
    s.stop().await;
}

#[tokio::test]
async fn nul_in_a_public_topic_is_refused_and_public_rooms_stays_up() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let carol = s.register("carol", false).await;
    let r = s
        .post(
            &format!("{C}/createRoom"),
            Some(&alice.token),
            json!({ "preset": "public_chat", "visibility": "public", "topic": "t\u{0}" }),
        )
        .await;
    assert_err(&r, 400, "M_BAD_JSON");
    let room = create(&s, &alice, json!({ "preset": "public_chat", "visibility": "public", "topic": "fine" })).await;
    let r = s
        .put(&format!("{C}/rooms/{}/state/m.room.topic", enc(&room)), Some(&alice.token), json!({ "topic": "x\u{0}y" }))
        .await;
    assert_err(&r, 400, "M_BAD_JSON");
    let r = s
        .put(&format!("{C}/rooms/{}/state/m.room.name", enc(&room)), Some(&alice.token), json!({ "name": "\u{0}" }))
        .await;
    assert_err(&r, 400, "M_BAD_JSON");

    // Another user's directory listing is unaffected.
    for path in [format!("{C}/publicRooms"), format!("{C}/publicRooms?limit=10")] {
        let (st, v) = s.get(&path, Some(&carol.token)).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["chunk"][0]["topic"], "fine", "{v}");
    }
    let (st, v) = s
        .post(&format!("{C}/publicRooms"), Some(&carol.token), json!({ "filter": { "generic_search_term": "fi" } }))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // A search term with U+0000 is refused, not a 500.
    let r = s
        .post(&format!("{C}/publicRooms"), Some(&carol.token), json!({ "filter": { "generic_search_term": "\u{0}" } }))
        .await;
    assert_err(&r, 400, "M_BAD_JSON");
    let r = s.get(&format!("{C}/publicRooms?since=%00"), Some(&carol.token)).await;
    assert_err(&r, 400, "M_INVALID_PARAM");
    s.stop().await;
}

#[tokio::test]
async fn nul_in_state_keys_and_txn_ids_is_an_invalid_param() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let room = create(&s, &alice, json!({})).await;
    let r =
        s.put(&format!("{C}/rooms/{}/state/m.custom/a%00b", enc(&room)), Some(&alice.token), json!({ "x": 1 })).await;
    assert_err(&r, 400, "M_INVALID_PARAM");
    let r =
        s.put(&format!("{C}/rooms/{}/state/m.cus%00tom/k", enc(&room)), Some(&alice.token), json!({ "x": 1 })).await;
    assert_err(&r, 400, "M_INVALID_PARAM");
    let r = s
        .put(&format!("{C}/rooms/{}/send/m.room.message/t%00x", enc(&room)), Some(&alice.token), json!({ "body": "x" }))
        .await;
    assert_err(&r, 400, "M_INVALID_PARAM");
    let r = s.get(&format!("{C}/rooms/{}/state/m.custom/a%00b", enc(&room)), Some(&alice.token)).await;
    assert_err(&r, 400, "M_INVALID_PARAM");
    // `%2500` is the text `%00`, a valid state key.
    let r =
        s.put(&format!("{C}/rooms/{}/state/m.custom/a%2500b", enc(&room)), Some(&alice.token), json!({ "x": 2 })).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    let (st, v) = s.get(&format!("{C}/rooms/{}/state/m.custom/a%2500b", enc(&room)), Some(&alice.token)).await;
    assert_eq!((st, v), (StatusCode::OK, json!({ "x": 2 })));
    let (st, v) = send(&s, &alice, &room, "t1", "still works").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(bodies(&s, &alice, &room).await[0], "still works");
    s.stop().await;
}

#[tokio::test]
async fn nul_in_a_kick_reason_is_refused_and_the_target_can_read() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    join(&s, &bob, &room).await;
    let (st, _) = send(&s, &alice, &room, "t0", "before").await;
    assert_eq!(st, StatusCode::OK);
    for (action, reason) in [("kick", "r\u{0}"), ("ban", "\u{0}")] {
        let path = format!("{C}/rooms/{}/{action}", enc(&room));
        let r = s.post(&path, Some(&alice.token), json!({ "user_id": bob.user_id, "reason": reason })).await;
        assert_err(&r, 400, "M_BAD_JSON");
    }
    // The kick with a clean reason works, and the target's history is readable.
    let r = s
        .post(
            &format!("{C}/rooms/{}/kick", enc(&room)),
            Some(&alice.token),
            json!({ "user_id": bob.user_id, "reason": "bye" }),
        )
        .await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    let (st, v) = s.get(&format!("{C}/rooms/{}/messages?dir=b", enc(&room)), Some(&bob.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["chunk"].as_array().unwrap().iter().any(|e| e["content"]["body"] == "before"), "{v}");
    s.stop().await;
}

#[tokio::test]
async fn nul_anywhere_else_is_refused_with_the_right_errcode() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    join(&s, &bob, &room).await;
    let (_, ev) = send(&s, &alice, &room, "t0", "hello").await;
    let event_id = ev["event_id"].as_str().unwrap().to_owned();
    let (a, r, e) = (enc(&alice.user_id), enc(&room), enc(&event_id));
    let (_, backup) = s
        .post(
            &format!("{C}/room_keys/version"),
            Some(&alice.token),
            json!({ "algorithm": "m.megolm_backup.v1", "auth_data": {} }),
        )
        .await;
    let version = backup["version"].as_str().unwrap_or("1").to_owned();

    let bad_bodies: Vec<(Method, String, Value)> = vec![
        (Method::PUT, format!("{C}/user/{a}/account_data/m.x"), json!({ "k": "\u{0}" })),
        (Method::PUT, format!("{C}/user/{a}/account_data/m.x"), json!({ "k\u{0}": 1 })),
        (Method::PUT, format!("{C}/user/{a}/rooms/{r}/account_data/m.x"), json!({ "k": ["\u{0}"] })),
        (Method::PUT, format!("{C}/user/{a}/rooms/{r}/tags/t"), json!({ "order": 0.5, "x": "\u{0}" })),
        (Method::PUT, format!("{C}/rooms/{r}/send/m.room.message/t1"), json!({ "body": "\u{0}" })),
        (Method::PUT, format!("{C}/rooms/{r}/state/m.custom/k"), json!({ "a": { "b": "\u{0}" } })),
        (Method::PUT, format!("{C}/rooms/{r}/redact/{e}/t2"), json!({ "reason": "\u{0}" })),
        (
            Method::PUT,
            format!("{C}/sendToDevice/m.x/t3"),
            json!({ "messages": { (alice.user_id.clone()): { "*": { "a": "\u{0}" } } } }),
        ),
        (Method::POST, format!("{C}/keys/upload"), json!({ "one_time_keys": { "signed_curve25519:A\u{0}": "x" } })),
        (Method::POST, format!("{C}/keys/query"), json!({ "device_keys": { "@x\u{0}:localhost": [] } })),
        (Method::POST, format!("{C}/user/{a}/filter"), json!({ "room": { "timeline": { "types": ["\u{0}"] } } })),
        (
            Method::PUT,
            format!("{C}/pushrules/global/content/kw"),
            json!({ "pattern": "a\u{0}", "actions": ["notify"] }),
        ),
        (Method::PUT, format!("{C}/devices/{}", enc(&alice.device_id)), json!({ "display_name": "phone\u{0}" })),
        (Method::POST, format!("{C}/rooms/{r}/report/{e}"), json!({ "reason": "\u{0}" })),
        (Method::POST, format!("{C}/rooms/{r}/report"), json!({ "reason": "spam\u{0}" })),
        (Method::PUT, format!("{C}/profile/{a}/avatar_url"), json!({ "avatar_url": "mxc://x/\u{0}" })),
        (
            Method::POST,
            format!("{C}/pushers/set"),
            json!({ "kind": "http", "app_id": "a\u{0}", "pushkey": "k", "app_display_name": "A", "device_display_name": "D", "lang": "en", "data": { "url": "https://push.example.org/_matrix/push/v1/notify" } }),
        ),
        (
            Method::PUT,
            format!("{C}/room_keys/keys/{r}/sess?version={version}"),
            json!({ "first_message_index": 0, "forwarded_count": 0, "is_verified": false, "session_data": { "x": "\u{0}" } }),
        ),
        (Method::PUT, format!("{C}/presence/{a}/status"), json!({ "presence": "online", "status_msg": "\u{0}" })),
        (Method::POST, format!("{C}/user_directory/search"), json!({ "search_term": "\u{0}" })),
        (Method::PUT, format!("{C}/directory/room/{}", enc("#a\u{0}:localhost")), json!({ "room_id": room })),
        (
            Method::PUT,
            format!("{C}/directory/room/{}", enc("#ok:localhost")),
            json!({ "room_id": "!x\u{0}:localhost" }),
        ),
    ];
    for (method, path, body) in bad_bodies {
        let expected = if path.contains("%00") { "M_INVALID_PARAM" } else { "M_BAD_JSON" };
        let r = s.request(method.clone(), &path, Some(&alice.token), Some(body)).await;
        assert_eq!(r.0.as_u16(), 400, "{method} {path}: {}", r.1);
        assert_eq!(r.1["errcode"], expected, "{method} {path}: {}", r.1);
    }

    let bad_params = [
        format!("{C}/keys/changes?from=s%00&to=s1"),
        format!("{C}/sync?since=%00"),
        format!("{C}/sync?filter=%7B%22a%22%3A%22%00%22%7D"),
        format!("{C}/rooms/{r}/messages?dir=b&from=%00"),
        format!("{C}/rooms/{r}/messages?dir=b&filter=%7B%22types%22%3A%5B%22%00%22%5D%7D"),
        format!("{C}/user/{a}/account_data/m.%00"),
        format!("{C}/profile/@x%00:localhost"),
        format!("{C}/rooms/{r}/event/%24x%00"),
        format!("/_matrix/client/v1/rooms/{r}/relations/{e}?from=%00"),
        format!("{C}/notifications?from=%00"),
        "/_matrix/client/v1/media/download/localhost/ab%00c".to_owned(),
    ];
    for path in bad_params {
        let r = s.get(&path, Some(&alice.token)).await;
        assert_err(&r, 400, "M_INVALID_PARAM");
    }
    // A media upload with U+0000 in its file name.
    let resp = s
        .http
        .post(format!("{}/_matrix/media/v3/upload?filename=a%00.txt", s.base))
        .bearer_auth(&alice.token)
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.json::<Value>().await.unwrap()["errcode"], "M_INVALID_PARAM");

    // Nothing broke for anyone: bob syncs, queries keys, reads changes and the room.
    let (st, v) = s.get(&format!("{C}/sync"), Some(&bob.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let since = v["next_batch"].as_str().unwrap().to_owned();
    let (st, v) = s.get(&format!("{C}/keys/changes?from={since}&to={since}"), Some(&bob.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = s
        .post(&format!("{C}/keys/query"), Some(&bob.token), json!({ "device_keys": { (alice.user_id.clone()): [] } }))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = send(&s, &bob, &room, "b1", "fine").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(bodies(&s, &alice, &room).await[0], "fine");
    s.stop().await;
}

/// One `/sync` with ~20 wildcards against a long account data type used to pin a core; a
/// non-ASCII pattern used to panic.
#[tokio::test]
async fn adversarial_filter_patterns_answer_quickly() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let long_type = "a".repeat(250);
    let r = s
        .put(
            &format!("{C}/user/{}/account_data/{long_type}", enc(&alice.user_id)),
            Some(&alice.token),
            json!({ "x": 1 }),
        )
        .await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    let r = s
        .put(
            &format!("{C}/user/{}/account_data/{}", enc(&alice.user_id), enc("é.ü")),
            Some(&alice.token),
            json!({ "x": 2 }),
        )
        .await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);

    let stalling = format!("{}b", "*a".repeat(20));
    let started = Instant::now();
    let filter =
        json!({ "account_data": { "types": [stalling, "é*", "*ü"] }, "room": { "timeline": { "types": ["*ü*"] } } });
    let (st, v) = s.get(&format!("{C}/sync?filter={}", enc(&filter.to_string())), Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let types: Vec<&str> =
        v["account_data"]["events"].as_array().unwrap().iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types, ["é.ü"], "{v}");
    // The same filter uploaded, then used by ID.
    let (st, f) = s.post(&format!("{C}/user/{}/filter", enc(&alice.user_id)), Some(&alice.token), filter).await;
    assert_eq!(st, StatusCode::OK, "{f}");
    let (st, v) = s.get(&format!("{C}/sync?filter={}", f["filter_id"].as_str().unwrap()), Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    s.stop().await;
}

#[tokio::test]
async fn filter_size_limits_are_400() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let path = format!("{C}/user/{}/filter", enc(&alice.user_id));
    let many: Vec<String> = (0..501).map(|i| format!("m.t{i}")).collect();
    let too_many = json!({ "room": { "timeline": { "not_types": many } } });
    let too_long = json!({ "room": { "rooms": ["!".repeat(300)] } });
    let too_big = json!({ "event_fields": (0..400).map(|i| format!("content.field_number_{i:04}_padding_padding")).collect::<Vec<_>>() });
    for f in [&too_many, &too_long, &too_big] {
        assert_err(&s.post(&path, Some(&alice.token), f.clone()).await, 400, "M_BAD_JSON");
        let r = s.get(&format!("{C}/sync?filter={}", enc(&f.to_string())), Some(&alice.token)).await;
        assert_err(&r, 400, "M_INVALID_PARAM");
    }
    // Within the limits: accepted both ways.
    let ok = json!({ "room": { "timeline": { "types": ["m.room.*"], "limit": 10 } } });
    let (st, v) = s.post(&path, Some(&alice.token), ok.clone()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = s.get(&format!("{C}/sync?filter={}", enc(&ok.to_string())), Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");

    // /messages and /context take the same RoomEventFilter, with the same limits and globs.
    let room = create(&s, &alice, json!({})).await;
    let (st, v) = send(&s, &alice, &room, "f1", "bonjour").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let event = v["event_id"].as_str().unwrap().to_owned();
    let messages = |f: &Value| format!("{C}/rooms/{}/messages?dir=b&filter={}", enc(&room), enc(&f.to_string()));
    let context =
        |f: &Value| format!("{C}/rooms/{}/context/{}?filter={}", enc(&room), enc(&event), enc(&f.to_string()));
    let too_many_room = json!({ "not_types": (0..501).map(|i| format!("m.t{i}")).collect::<Vec<_>>() });
    for f in [&too_many_room, &json!({ "types": ["x".repeat(300)] }), &json!({ "types": vec!["*"; 2000] })] {
        assert_err(&s.get(&messages(f), Some(&alice.token)).await, 400, "M_INVALID_PARAM");
        assert_err(&s.get(&context(f), Some(&alice.token)).await, 400, "M_INVALID_PARAM");
    }
    // A wildcard anywhere in the pattern, as in sync filters.
    let (st, v) = s.get(&messages(&json!({ "types": ["*.message"] })), Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let kinds: Vec<&str> = v["chunk"].as_array().unwrap().iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds, ["m.room.message"], "{v}");
    s.stop().await;
}

const RULES: &str = "/_matrix/client/v3/pushrules/global";

#[tokio::test]
async fn huge_push_patterns_are_400_and_sends_keep_working() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    join(&s, &bob, &room).await;

    let r = s
        .put(
            &format!("{RULES}/content/many"),
            Some(&bob.token),
            json!({ "pattern": "?".repeat(100_000), "actions": ["notify"] }),
        )
        .await;
    assert_err(&r, 400, "M_BAD_JSON");
    let r = s
        .put(
            &format!("{RULES}/content/stars"),
            Some(&bob.token),
            json!({ "pattern": "*".repeat(20_000), "actions": ["notify"] }),
        )
        .await;
    assert_err(&r, 400, "M_BAD_JSON");
    let cond = json!({ "kind": "event_match", "key": "content.body", "pattern": "?".repeat(100_000) });
    let r = s
        .put(&format!("{RULES}/override/o"), Some(&bob.token), json!({ "conditions": [cond], "actions": ["notify"] }))
        .await;
    assert_err(&r, 400, "M_BAD_JSON");
    let conds: Vec<Value> = (0..21).map(|_| json!({ "kind": "event_match", "key": "type", "pattern": "x" })).collect();
    let r = s
        .put(&format!("{RULES}/override/o"), Some(&bob.token), json!({ "conditions": conds, "actions": ["notify"] }))
        .await;
    assert_err(&r, 400, "M_BAD_JSON");
    let r = s
        .put(
            &format!("{RULES}/content/{}", "r".repeat(1001)),
            Some(&bob.token),
            json!({ "pattern": "x", "actions": [] }),
        )
        .await;
    assert_err(&r, 400, "M_INVALID_PARAM");
    // Refused rules were not stored.
    let (st, v) = s.get(&format!("{RULES}/content/many"), Some(&bob.token)).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");

    // Too many rules of one kind.
    for i in 0..100 {
        let r = s
            .put(
                &format!("{RULES}/content/k{i}"),
                Some(&bob.token),
                json!({ "pattern": format!("w{i}"), "actions": [] }),
            )
            .await;
        assert_eq!(r.0, StatusCode::OK, "{i}: {}", r.1);
    }
    let r = s.put(&format!("{RULES}/content/k100"), Some(&bob.token), json!({ "pattern": "w", "actions": [] })).await;
    assert_err(&r, 400, "M_INVALID_PARAM");

    // A bounded keyword with wildcards works and highlights; the room takes everyone's sends.
    let r = s
        .put(
            &format!("{RULES}/content/k0"),
            Some(&bob.token),
            json!({ "pattern": "lun?h*", "actions": ["notify", { "set_tweak": "highlight" }] }),
        )
        .await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    for i in 0..3 {
        let (st, v) = send(&s, &alice, &room, &format!("a{i}"), &format!("LUNCHTIME {i}? {}", "x ".repeat(5000))).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let (st, v) = send(&s, &bob, &room, &format!("b{i}"), "hi").await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    assert_eq!(bodies(&s, &alice, &room).await.len(), 6);
    let (st, n) = s.get(&format!("{C}/notifications"), Some(&bob.token)).await;
    assert_eq!(st, StatusCode::OK, "{n}");
    let notes = n["notifications"].as_array().unwrap();
    assert_eq!(notes.len(), 3, "{n}");
    assert!(
        notes.iter().all(|x| x["actions"].as_array().unwrap().iter().any(|a| a["set_tweak"] == "highlight")),
        "{n}"
    );
    s.stop().await;
}

/// A rule stored before the limits existed (written straight to the database) is ignored, with
/// a warning: sends keep working, and the owner can still manage their rules.
#[tokio::test]
async fn a_stored_huge_rule_does_not_break_sends() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    join(&s, &bob, &room).await;

    // Bob's ruleset as the API shows it, plus two rules no API accepts any more.
    let (_, mut global) = s.get(&format!("{RULES}/"), Some(&bob.token)).await;
    let content = global["content"].as_array_mut().unwrap();
    for (id, pattern) in [("many", "?".repeat(100_000)), ("stars", "*".repeat(20_000))] {
        content.push(
            json!({ "rule_id": id, "pattern": pattern, "enabled": true, "default": false, "actions": ["notify"] }),
        );
    }
    let stored = json!({ "global": global });
    sqlx::query(
        "INSERT INTO account_data (user_id, room_id, data_type, content, stream_ordering)
         VALUES ($1, '', 'm.push_rules', $2, nextval('account_data_stream_seq'))
         ON CONFLICT (user_id, room_id, data_type) DO UPDATE SET content = EXCLUDED.content",
    )
    .bind(&bob.user_id)
    .bind(sqlx::types::Json(&stored))
    .execute(&s.state().db)
    .await
    .unwrap();
    s.state().push_rules.invalidate(&bob.user_id);

    for i in 0..3 {
        let (st, v) = send(&s, &alice, &room, &format!("a{i}"), &format!("{} hello {i}", "word ".repeat(2000))).await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    assert_eq!(bodies(&s, &bob, &room).await.len(), 3);
    // Bob is still notified by his other rules (the defaults: a message in a room).
    let (st, n) = s.get(&format!("{C}/notifications"), Some(&bob.token)).await;
    assert_eq!((st, n["notifications"].as_array().map(Vec::len)), (StatusCode::OK, Some(3)), "{n}");
    // The bad rules are not shown, and a change of bob's rules works (and drops them for good).
    let (st, v) = s.get(&format!("{RULES}/content/many"), Some(&bob.token)).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    let r = s
        .put(&format!("{RULES}/content/lunch"), Some(&bob.token), json!({ "pattern": "lunch", "actions": ["notify"] }))
        .await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    let (st, v) = s.get(&format!("{RULES}/content/lunch"), Some(&bob.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    s.stop().await;
}
