//! What Element asks a homeserver at start-up and on day one, beyond the core: `/versions`
//! contents (each advertised feature answers), `GET /rooms/{id}/initialSync` (peeking and
//! invite previews) and user reports.

use serde_json::json;

use crate::common::*;
use crate::sync::send_text;

fn room_path(room: &str, rest: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/{rest}", enc(room))
}

#[tokio::test]
async fn versions_advertise_exactly_what_is_implemented() {
    let s = TestServer::start().await;
    let (st, v) = s.get("/_matrix/client/versions", None).await;
    assert_eq!(st, 200, "{v}");
    let versions: Vec<&str> = v["versions"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    for want in ["r0.6.1", "v1.1", "v1.4", "v1.11", "v1.12", "v1.13", "v1.14", "v1.15"] {
        assert!(versions.contains(&want), "{want} missing: {v}");
    }
    // v1.16 (and later) features are not all there yet.
    for not_yet in ["v1.16", "v1.17"] {
        assert!(!versions.contains(&not_yet), "{not_yet} advertised: {v}");
    }
    let features = v["unstable_features"].as_object().unwrap();
    let mut names: Vec<&str> = features.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "org.matrix.e2e_cross_signing",
            "org.matrix.msc2285.stable",
            "org.matrix.msc2432",
            "org.matrix.msc3440.stable",
            "org.matrix.msc3771",
            "org.matrix.msc3773",
            "org.matrix.msc3814",
            "org.matrix.msc3827.stable",
            "org.matrix.msc4140",
            "org.matrix.msc4222",
            "org.matrix.simplified_msc3575",
            "uk.tcpip.msc4133.stable",
        ],
        "{v}"
    );
    assert!(features.values().all(|x| x == &json!(true)), "{v}");

    // Each advertised feature answers (not 404 M_UNRECOGNIZED).
    let alice = s.register("ver_a", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat", "room_alias_name": "ver" })).await;
    let ev = send_text(&s, &alice, &room, "hello").await;
    // e2e_cross_signing: the first cross-signing upload needs no UIA (v1.11).
    let master = crate::e2ee::cross_key(&alice, "master", &crate::e2ee::key(40));
    let (st, r) = s
        .post("/_matrix/client/v3/keys/device_signing/upload", Some(&alice.token), json!({ "master_key": master }))
        .await;
    assert_eq!(st, 200, "{r}");
    // msc2432: the room's aliases.
    let (st, r) = s.get(&room_path(&room, "aliases"), Some(&alice.token)).await;
    assert_eq!((st.as_u16(), r["aliases"][0].as_str()), (200, Some("#ver:localhost")), "{r}");
    // msc2285: private read receipts; msc3771: threaded receipts.
    let (st, r) =
        s.post(&room_path(&room, &format!("receipt/m.read.private/{}", enc(&ev))), Some(&alice.token), json!({})).await;
    assert_eq!(st, 200, "{r}");
    let (st, r) = s
        .post(
            &room_path(&room, &format!("receipt/m.read/{}", enc(&ev))),
            Some(&alice.token),
            json!({ "thread_id": "main" }),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    // msc3827: room type filter in the directory.
    let (st, r) = s
        .post("/_matrix/client/v3/publicRooms", Some(&alice.token), json!({ "filter": { "room_types": [null] } }))
        .await;
    assert_eq!(st, 200, "{r}");
    // msc3440 / msc3773: threads list and per-thread notification counts.
    let (st, r) = s.get(&format!("/_matrix/client/v1/rooms/{}/threads", enc(&room)), Some(&alice.token)).await;
    assert_eq!(st, 200, "{r}");
    // msc3814: dehydrated devices (none yet: 404 M_NOT_FOUND, not M_UNRECOGNIZED).
    assert_err(
        &s.get("/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device", Some(&alice.token)).await,
        404,
        "M_NOT_FOUND",
    );
    // msc4133: custom profile fields.
    let (st, r) = s
        .put(
            &format!("/_matrix/client/v3/profile/{}/m.tz", enc(&alice.user_id)),
            Some(&alice.token),
            json!({ "m.tz": "Europe/Paris" }),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    // msc4140: delayed events are listed.
    let (st, r) = s.get("/_matrix/client/unstable/org.matrix.msc4140/delayed_events", Some(&alice.token)).await;
    assert_eq!(st, 200, "{r}");
    // msc4222: /sync with use_state_after answers state_after.
    let (st, r) = s.get("/_matrix/client/v3/sync?timeout=0&use_state_after=true", Some(&alice.token)).await;
    assert_eq!(st, 200, "{r}");
    assert!(r["rooms"]["join"][&room].get("state_after").is_some(), "{r}");
    // simplified_msc3575: sliding sync lists the room.
    let (st, r) = s
        .post(
            "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?timeout=0",
            Some(&alice.token),
            json!({ "lists": { "all": { "ranges": [[0, 10]], "timeline_limit": 1 } } }),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert!(r["rooms"].get(&room).is_some(), "{r}");
    s.stop().await;
}

#[tokio::test]
async fn room_initial_sync() {
    let s = TestServer::start().await;
    let alice = s.register("is_a", false).await;
    let bob = s.register("is_b", false).await;
    let carol = s.register("is_c", false).await;
    let room = create(&s, &alice, json!({ "preset": "private_chat", "name": "Conseil" })).await;
    for i in 0..4 {
        send_text(&s, &alice, &room, &format!("m{i}")).await;
    }
    let (st, r) = s
        .put(
            &format!("/_matrix/client/v3/user/{}/rooms/{}/tags/u.work", enc(&alice.user_id), enc(&room)),
            Some(&alice.token),
            json!({ "order": 0.5 }),
        )
        .await;
    assert_eq!(st, 200, "{r}");

    // A member: current state, the latest messages oldest first, tokens /messages takes.
    let (st, v) = s.get(&room_path(&room, "initialSync?limit=3"), Some(&alice.token)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["room_id"], room);
    assert_eq!(v["membership"], "join");
    assert_eq!(v["visibility"], "private");
    let bodies: Vec<&str> =
        v["messages"]["chunk"].as_array().unwrap().iter().map(|e| e["content"]["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["m1", "m2", "m3"], "{v}");
    let state: Vec<&str> = v["state"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(state.contains(&"m.room.create") && state.contains(&"m.room.name"), "{v}");
    assert!(
        v["account_data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.tag" && e["content"]["tags"]["u.work"].is_object()),
        "{v}"
    );
    let start = v["messages"]["start"].as_str().unwrap();
    let (st, older) =
        s.get(&room_path(&room, &format!("messages?dir=b&limit=1&from={}", enc(start))), Some(&alice.token)).await;
    assert_eq!(st, 200, "{older}");
    assert_eq!(older["chunk"][0]["content"]["body"], "m0", "{older}");
    let end = v["messages"]["end"].as_str().unwrap();
    send_text(&s, &alice, &room, "m4").await;
    let (st, newer) = s.get(&room_path(&room, &format!("messages?dir=f&from={}", enc(end))), Some(&alice.token)).await;
    assert_eq!(st, 200, "{newer}");
    assert_eq!(newer["chunk"][0]["content"]["body"], "m4", "{newer}");

    // A stranger cannot peek into a private room; an invitee neither (the spec's peeking is for
    // world-readable rooms; Element falls back to the invite's stripped state).
    assert_err(&s.get(&room_path(&room, "initialSync"), Some(&carol.token)).await, 403, "M_FORBIDDEN");
    let (st, r) = s.post(&room_path(&room, "invite"), Some(&alice.token), json!({ "user_id": bob.user_id })).await;
    assert_eq!(st, 200, "{r}");
    assert_err(&s.get(&room_path(&room, "initialSync"), Some(&bob.token)).await, 403, "M_FORBIDDEN");

    // A departed member sees the room as they left it.
    let (st, r) = s.post(&room_path(&room, "join"), Some(&bob.token), json!({})).await;
    assert_eq!(st, 200, "{r}");
    send_text(&s, &alice, &room, "while bob is here").await;
    let (st, r) = s.post(&room_path(&room, "leave"), Some(&bob.token), json!({})).await;
    assert_eq!(st, 200, "{r}");
    send_text(&s, &alice, &room, "after bob left").await;
    let (st, r) =
        s.put(&room_path(&room, "state/m.room.name/"), Some(&alice.token), json!({ "name": "Renamed" })).await;
    assert_eq!(st, 200, "{r}");
    let (st, v) = s.get(&room_path(&room, "initialSync"), Some(&bob.token)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["membership"], "leave");
    let texts: Vec<&str> =
        v["messages"]["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert!(texts.contains(&"while bob is here") && !texts.contains(&"after bob left"), "{v}");
    let name = v["state"].as_array().unwrap().iter().find(|e| e["type"] == "m.room.name").unwrap();
    assert_eq!(name["content"]["name"], "Conseil", "the state when bob left: {v}");

    // A world-readable room can be peeked by anyone.
    let public = create(&s, &alice, json!({
        "preset": "public_chat",
        "initial_state": [{ "type": "m.room.history_visibility", "state_key": "", "content": { "history_visibility": "world_readable" } }],
    }))
    .await;
    send_text(&s, &alice, &public, "for everyone").await;
    let (st, v) = s.get(&room_path(&public, "initialSync"), Some(&carol.token)).await;
    assert_eq!(st, 200, "{v}");
    assert!(v.get("membership").is_none(), "carol has no membership: {v}");
    assert_eq!(v["messages"]["chunk"].as_array().unwrap().last().unwrap()["content"]["body"], "for everyone");

    // Bad input.
    assert_err(&s.get(&room_path("!nope:localhost", "initialSync"), Some(&alice.token)).await, 404, "M_NOT_FOUND");
    assert_err(&s.get(&room_path(&room, "initialSync?limit=x"), Some(&alice.token)).await, 400, "M_INVALID_PARAM");
    assert_err(&s.get(&room_path(&room, "initialSync"), None).await, 401, "M_MISSING_TOKEN");
    s.stop().await;
}

#[tokio::test]
async fn user_reports() {
    let s = TestServer::start().await;
    let alice = s.register("ur_a", false).await;
    let bob = s.register("ur_b", false).await;
    let path = |u: &str| format!("/_matrix/client/v3/users/{}/report", enc(u));
    let (st, v) = s.post(&path(&bob.user_id), Some(&alice.token), json!({ "reason": "spam" })).await;
    assert_eq!((st.as_u16(), v), (200, json!({})));
    // Blank is allowed; missing is not.
    let (st, _) = s.post(&path(&bob.user_id), Some(&alice.token), json!({ "reason": "" })).await;
    assert_eq!(st, 200);
    assert_err(&s.post(&path(&bob.user_id), Some(&alice.token), json!({})).await, 400, "M_BAD_JSON");
    assert_err(
        &s.post(&path("@ghost:localhost"), Some(&alice.token), json!({ "reason": "x" })).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.post(&path("not-a-user"), Some(&alice.token), json!({ "reason": "x" })).await,
        400,
        "M_INVALID_PARAM",
    );
    let long = "x".repeat(1001);
    assert_err(
        &s.post(&path(&bob.user_id), Some(&alice.token), json!({ "reason": long })).await,
        400,
        "M_INVALID_PARAM",
    );
    // A remote user cannot be checked without federation: the report is kept.
    let (st, _) = s.post(&path("@someone:elsewhere.example"), Some(&alice.token), json!({ "reason": "x" })).await;
    assert_eq!(st, 200);
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT target_user, reporter, reason FROM user_reports ORDER BY id")
            .fetch_all(&s.state().db)
            .await
            .unwrap();
    let expected: Vec<(String, String, String)> = vec![
        (bob.user_id.clone(), alice.user_id.clone(), "spam".into()),
        (bob.user_id.clone(), alice.user_id.clone(), "".into()),
        ("@someone:elsewhere.example".into(), alice.user_id.clone(), "x".into()),
    ];
    assert_eq!(rows, expected);
    s.stop().await;
}
