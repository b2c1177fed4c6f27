//! Account data, tags, receipts, read markers and typing: over HTTP, and the storage/service
//! read functions sync will use, observed through the server's state.

use std::time::Duration;

use parvis::storage;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

async fn join(s: &TestServer, u: &User, room: &str) {
    let (st, v) = s.post(&format!("/_matrix/client/v3/rooms/{}/join", enc(room)), Some(&u.token), json!({})).await;
    assert_eq!(st, 200, "{v}");
}

async fn send(s: &TestServer, u: &User, room: &str, txn: &str, content: Value) -> String {
    let (st, v) = s
        .put(&format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room)), Some(&u.token), content)
        .await;
    assert_eq!(st, 200, "{v}");
    v["event_id"].as_str().unwrap().to_owned()
}

async fn send_text(s: &TestServer, u: &User, room: &str, txn: &str) -> String {
    send(s, u, room, txn, json!({ "msgtype": "m.text", "body": txn })).await
}

async fn room_nid(s: &TestServer, room: &str) -> i64 {
    storage::rooms::by_id(&s.state().db, room).await.unwrap().expect("room exists").room_nid
}

/// Sends a raw (possibly non-JSON) body.
async fn put_raw(s: &TestServer, path: &str, token: &str, body: &'static str) -> (StatusCode, Value) {
    let resp = s.http.put(format!("{}{path}", s.base)).bearer_auth(token).body(body).send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn global_path(user: &User, kind: &str) -> String {
    format!("/_matrix/client/v3/user/{}/account_data/{kind}", enc(&user.user_id))
}

fn room_path(user: &User, room: &str, kind: &str) -> String {
    format!("/_matrix/client/v3/user/{}/rooms/{}/account_data/{kind}", enc(&user.user_id), enc(room))
}

#[tokio::test]
async fn account_data_global_and_per_room() {
    let s = TestServer::start().await;
    let db = &s.state().db;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let admin = s.register("admin", true).await;
    let room = create(&s, &alice, json!({})).await;
    let cfg = global_path(&alice, "org.example.cfg");

    assert_err(&s.get(&cfg, Some(&alice.token)).await, 404, "M_NOT_FOUND");
    assert_eq!(storage::account_data::current_stream_position(db).await.unwrap(), 0);

    assert_eq!(s.put(&cfg, Some(&alice.token), json!({ "theme": "dark" })).await.0, 200);
    assert_eq!(s.get(&cfg, Some(&alice.token)).await, (StatusCode::OK, json!({ "theme": "dark" })));
    let pos1 = storage::account_data::current_stream_position(db).await.unwrap();
    assert!(pos1 > 0);
    assert_eq!(*s.state().account_data_stream.borrow(), pos1, "writers wake sync");

    // Replaced, not merged; the legacy prefix serves the same data.
    assert_eq!(s.put(&cfg, Some(&alice.token), json!({ "size": 2 })).await.0, 200);
    let r0 = cfg.replace("/v3/", "/r0/");
    assert_eq!(s.get(&r0, Some(&alice.token)).await, (StatusCode::OK, json!({ "size": 2 })));
    let pos2 = storage::account_data::current_stream_position(db).await.unwrap();
    assert!(pos2 > pos1, "{pos2} > {pos1}");

    // Private to the user, even from admins.
    for u in [&bob, &admin] {
        assert_err(&s.get(&cfg, Some(&u.token)).await, 403, "M_FORBIDDEN");
        assert_err(&s.put(&cfg, Some(&u.token), json!({ "x": 1 })).await, 403, "M_FORBIDDEN");
        assert_err(&s.get(&room_path(&alice, &room, "org.x"), Some(&u.token)).await, 403, "M_FORBIDDEN");
        assert_err(&s.put(&room_path(&alice, &room, "org.x"), Some(&u.token), json!({})).await, 403, "M_FORBIDDEN");
    }
    assert_err(&s.get(&cfg, None).await, 401, "M_MISSING_TOKEN");

    // The body must be a JSON object.
    assert_err(&put_raw(&s, &cfg, &alice.token, "{not json").await, 400, "M_NOT_JSON");
    assert_err(&put_raw(&s, &cfg, &alice.token, "[1, 2]").await, 400, "M_BAD_JSON");
    assert_err(&put_raw(&s, &cfg, &alice.token, "\"text\"").await, 400, "M_BAD_JSON");
    assert_err(&put_raw(&s, &room_path(&alice, &room, "org.x"), &alice.token, "42").await, 400, "M_BAD_JSON");
    assert_eq!(s.get(&cfg, Some(&alice.token)).await.1, json!({ "size": 2 }), "failed writes change nothing");

    // Server-maintained types are refused with the spec's 405 M_BAD_JSON.
    for kind in ["m.fully_read", "m.push_rules"] {
        assert_err(&s.put(&global_path(&alice, kind), Some(&alice.token), json!({})).await, 405, "M_BAD_JSON");
        assert_err(&s.put(&room_path(&alice, &room, kind), Some(&alice.token), json!({})).await, 405, "M_BAD_JSON");
    }

    // Room account data is separate from global account data of the same type.
    let in_room = room_path(&alice, &room, "org.example.cfg");
    assert_err(&s.get(&in_room, Some(&alice.token)).await, 404, "M_NOT_FOUND");
    assert_eq!(s.put(&in_room, Some(&alice.token), json!({ "muted": true })).await.0, 200);
    assert_eq!(s.get(&in_room, Some(&alice.token)).await.1, json!({ "muted": true }));
    assert_eq!(s.get(&cfg, Some(&alice.token)).await.1, json!({ "size": 2 }));
    assert_err(&s.get(&room_path(&bob, &room, "org.example.cfg"), Some(&bob.token)).await, 404, "M_NOT_FOUND");

    // Unknown rooms are 404, malformed room IDs 400.
    let unknown = room_path(&alice, "!unknown:localhost", "org.x");
    assert_err(&s.put(&unknown, Some(&alice.token), json!({})).await, 404, "M_NOT_FOUND");
    assert_err(&s.get(&unknown, Some(&alice.token)).await, 404, "M_NOT_FOUND");
    let bad = room_path(&alice, "@not-a-room:localhost", "org.x");
    assert_err(&s.put(&bad, Some(&alice.token), json!({})).await, 400, "M_INVALID_PARAM");
    assert_err(&s.get(&bad, Some(&alice.token)).await, 400, "M_INVALID_PARAM");

    // What sync reads: each user's changes in stream order, only after the given position.
    assert_eq!(s.put(&global_path(&bob, "org.bob"), Some(&bob.token), json!({ "b": 1 })).await.0, 200);
    let all = storage::account_data::changed_since(db, &alice.user_id, 0).await.unwrap();
    let seen: Vec<(Option<&str>, &str)> = all.iter().map(|r| (r.room_id.as_deref(), r.data_type.as_str())).collect();
    assert_eq!(seen, vec![(None, "org.example.cfg"), (Some(room.as_str()), "org.example.cfg")]);
    assert_eq!(all[1].content.0, json!({ "muted": true }));
    assert!(all.windows(2).all(|w| w[0].stream_ordering < w[1].stream_ordering));
    let after = storage::account_data::changed_since(db, &alice.user_id, all[0].stream_ordering).await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].room_id.as_deref(), Some(room.as_str()));
    let bobs = storage::account_data::changed_since(db, &bob.user_id, 0).await.unwrap();
    assert_eq!(bobs.len(), 1);
    assert_eq!(storage::account_data::current_stream_position(db).await.unwrap(), bobs[0].stream_ordering);
    s.stop().await;
}

#[tokio::test]
async fn room_tags() {
    let s = TestServer::start().await;
    let db = &s.state().db;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({})).await;
    let tags = format!("/_matrix/client/v3/user/{}/rooms/{}/tags", enc(&alice.user_id), enc(&room));
    let tag = |t: &str| format!("{tags}/{}", enc(t));

    assert_eq!(s.get(&tags, Some(&alice.token)).await, (StatusCode::OK, json!({ "tags": {} })));
    assert_eq!(s.put(&tag("m.favourite"), Some(&alice.token), json!({ "order": 0.25 })).await.0, 200);
    assert_eq!(s.put(&tag("u.work"), Some(&alice.token), json!({})).await.0, 200);
    assert_eq!(
        s.get(&tags, Some(&alice.token)).await.1,
        json!({ "tags": { "m.favourite": { "order": 0.25 }, "u.work": {} } })
    );
    // Stored as room account data `m.tag`, so sync delivers it like Synapse.
    assert_eq!(
        s.get(&room_path(&alice, &room, "m.tag"), Some(&alice.token)).await.1,
        json!({ "tags": { "m.favourite": { "order": 0.25 }, "u.work": {} } })
    );
    let rows = storage::account_data::changed_since(db, &alice.user_id, 0).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].data_type, "m.tag");
    assert_eq!(rows[0].room_id.as_deref(), Some(room.as_str()));

    // Updating a tag replaces its content; order must be a number.
    assert_eq!(s.put(&tag("m.favourite"), Some(&alice.token), json!({ "order": 0.5 })).await.0, 200);
    assert_eq!(s.get(&tags, Some(&alice.token)).await.1["tags"]["m.favourite"], json!({ "order": 0.5 }));
    assert_err(&s.put(&tag("m.favourite"), Some(&alice.token), json!({ "order": "high" })).await, 400, "M_BAD_JSON");
    assert_err(&put_raw(&s, &tag("u.x"), &alice.token, "not json").await, 400, "M_NOT_JSON");

    // Delete; deleting again succeeds without a new stream position (nothing changed).
    assert_eq!(s.delete(&tag("m.favourite"), Some(&alice.token), json!({})).await.0, 200);
    assert_eq!(s.get(&tags, Some(&alice.token)).await.1, json!({ "tags": { "u.work": {} } }));
    let pos = storage::account_data::current_stream_position(db).await.unwrap();
    assert_eq!(s.delete(&tag("m.favourite"), Some(&alice.token), json!({})).await.0, 200);
    assert_eq!(storage::account_data::current_stream_position(db).await.unwrap(), pos);

    // Someone else's tags, unknown rooms.
    assert_err(&s.get(&tags, Some(&bob.token)).await, 403, "M_FORBIDDEN");
    assert_err(&s.put(&tag("u.evil"), Some(&bob.token), json!({})).await, 403, "M_FORBIDDEN");
    assert_err(&s.delete(&tag("u.work"), Some(&bob.token), json!({})).await, 403, "M_FORBIDDEN");
    let unknown = format!("/_matrix/client/v3/user/{}/rooms/{}/tags", enc(&alice.user_id), enc("!nope:localhost"));
    assert_err(&s.get(&unknown, Some(&alice.token)).await, 404, "M_NOT_FOUND");
    assert_err(&s.put(&format!("{unknown}/u.x"), Some(&alice.token), json!({})).await, 404, "M_NOT_FOUND");

    // Concurrent tag changes merge (no lost update).
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..12 {
        let req = s.http.put(format!("{}{}", s.base, tag(&format!("u.t{i}")))).bearer_auth(&alice.token);
        puts.spawn(req.json(&json!({ "order": i as f64 / 20.0 })).send());
    }
    while let Some(resp) = puts.join_next().await {
        assert_eq!(resp.unwrap().unwrap().status(), 200);
    }
    let (_, all) = s.get(&tags, Some(&alice.token)).await;
    assert_eq!(all["tags"].as_object().unwrap().len(), 13, "{all}");
    s.stop().await;
}

fn receipt_path(room: &str, kind: &str, event: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/receipt/{kind}/{}", enc(room), enc(event))
}

#[tokio::test]
async fn receipts_and_read_markers() {
    let s = TestServer::start().await;
    let db = &s.state().db;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let eve = s.register("eve", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    let other_room = create(&s, &alice, json!({})).await;
    join(&s, &bob, &room).await;
    let nid = room_nid(&s, &room).await;
    let e1 = send_text(&s, &alice, &room, "one").await;
    let e2 = send_text(&s, &bob, &room, "two").await;
    let foreign = send_text(&s, &alice, &other_room, "elsewhere").await;
    assert_eq!(storage::receipts::current_stream_position(db).await.unwrap(), 0);

    assert_eq!(s.post(&receipt_path(&room, "m.read", &e1), Some(&bob.token), json!({})).await.0, 200);
    let rows = storage::receipts::for_rooms_since(db, &[nid], &alice.user_id, 0).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].user_id.as_str(), rows[0].receipt_type.as_str()), (bob.user_id.as_str(), "m.read"));
    assert_eq!((rows[0].event_id.as_str(), rows[0].thread_id.as_deref()), (e1.as_str(), None));
    assert!(rows[0].ts > 0);
    let p1 = storage::receipts::current_stream_position(db).await.unwrap();
    assert_eq!(p1, rows[0].stream_ordering);
    assert_eq!(*s.state().receipt_stream.borrow(), p1, "writers wake sync");

    // Moves forwards, never backwards.
    assert_eq!(s.post(&receipt_path(&room, "m.read", &e2), Some(&bob.token), json!({})).await.0, 200);
    let p2 = storage::receipts::current_stream_position(db).await.unwrap();
    assert!(p2 > p1);
    assert_eq!(s.post(&receipt_path(&room, "m.read", &e1), Some(&bob.token), json!({})).await.0, 200);
    let current = storage::receipts::get(db, nid, &bob.user_id, "m.read", None).await.unwrap().unwrap();
    assert_eq!(current.event_id, e2);
    assert_eq!(storage::receipts::current_stream_position(db).await.unwrap(), p2, "ignored receipt is no change");
    let since_p1 = storage::receipts::for_rooms_since(db, &[nid], &alice.user_id, p1).await.unwrap();
    assert_eq!(since_p1.iter().map(|r| r.event_id.as_str()).collect::<Vec<_>>(), vec![e2.as_str()]);

    // Private receipts are visible to their owner only; threads are separate receipts.
    assert_eq!(s.post(&receipt_path(&room, "m.read.private", &e2), Some(&alice.token), json!({})).await.0, 200);
    assert_eq!(
        s.post(&receipt_path(&room, "m.read", &e1), Some(&alice.token), json!({ "thread_id": "main" })).await.0,
        200
    );
    let for_bob = storage::receipts::for_rooms_since(db, &[nid], &bob.user_id, p2).await.unwrap();
    assert_eq!(for_bob.len(), 1, "{for_bob:?}");
    assert_eq!((for_bob[0].receipt_type.as_str(), for_bob[0].thread_id.as_deref()), ("m.read", Some("main")));
    let for_alice = storage::receipts::for_rooms_since(db, &[nid], &alice.user_id, p2).await.unwrap();
    assert_eq!(for_alice.len(), 2);
    assert_eq!(for_alice[0].receipt_type, "m.read.private");
    assert!(
        storage::receipts::for_rooms_since(db, &[room_nid(&s, &other_room).await], &alice.user_id, 0)
            .await
            .unwrap()
            .is_empty()
    );

    // Thread receipts: for the root or an event in that thread only.
    let reply = send(
        &s,
        &bob,
        &room,
        "reply",
        json!({ "msgtype": "m.text", "body": "in thread", "m.relates_to": { "rel_type": "m.thread", "event_id": e1 } }),
    )
    .await;
    let thread = json!({ "thread_id": e1 });
    assert_eq!(s.post(&receipt_path(&room, "m.read", &reply), Some(&alice.token), thread.clone()).await.0, 200);
    assert_eq!(s.post(&receipt_path(&room, "m.read", &e1), Some(&bob.token), thread.clone()).await.0, 200);
    assert_err(&s.post(&receipt_path(&room, "m.read", &e2), Some(&alice.token), thread).await, 400, "M_INVALID_PARAM");
    let threaded = storage::receipts::get(db, nid, &alice.user_id, "m.read", Some(&e1)).await.unwrap().unwrap();
    assert_eq!(threaded.event_id, reply);

    // Invalid requests.
    for body in [json!({ "thread_id": 5 }), json!({ "thread_id": "" }), json!({ "thread_id": null })] {
        assert_err(&s.post(&receipt_path(&room, "m.read", &e1), Some(&bob.token), body).await, 400, "M_INVALID_PARAM");
    }
    assert_err(
        &s.post(&receipt_path(&room, "m.fully_read", &e1), Some(&bob.token), json!({ "thread_id": "main" })).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.post(&receipt_path(&room, "m.unknown", &e1), Some(&bob.token), json!({})).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(&s.post(&receipt_path(&room, "m.read", "$nope"), Some(&bob.token), json!({})).await, 404, "M_NOT_FOUND");
    assert_err(
        &s.post(&receipt_path(&room, "m.read", &foreign), Some(&bob.token), json!({})).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.post(&receipt_path("!nope:localhost", "m.read", &e1), Some(&bob.token), json!({})).await,
        404,
        "M_NOT_FOUND",
    );
    // Non-members, including former members.
    assert_err(&s.post(&receipt_path(&room, "m.read", &e2), Some(&eve.token), json!({})).await, 403, "M_FORBIDDEN");
    let before = storage::receipts::current_stream_position(db).await.unwrap();
    // m.read.private of someone who can see the room but is not joined is refused too.
    assert_err(
        &s.post(&receipt_path(&room, "m.read.private", &e1), Some(&eve.token), json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_eq!(storage::receipts::current_stream_position(db).await.unwrap(), before);

    // m.fully_read through /receipt is room account data, not a receipt.
    let marker = room_path(&bob, &room, "m.fully_read");
    assert_err(&s.get(&marker, Some(&bob.token)).await, 404, "M_NOT_FOUND");
    assert_eq!(s.post(&receipt_path(&room, "m.fully_read", &e1), Some(&bob.token), json!({})).await.0, 200);
    assert_eq!(s.get(&marker, Some(&bob.token)).await.1, json!({ "event_id": e1 }));
    assert!(storage::receipts::get(db, nid, &bob.user_id, "m.fully_read", None).await.unwrap().is_none());

    // /read_markers: all three at once; the marker only moves forwards.
    let markers = format!("/_matrix/client/v3/rooms/{}/read_markers", enc(&room));
    let (st, v) =
        s.post(&markers, Some(&bob.token), json!({ "m.fully_read": e2, "m.read": reply, "m.read.private": e2 })).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(s.get(&marker, Some(&bob.token)).await.1, json!({ "event_id": e2 }));
    assert_eq!(storage::receipts::get(db, nid, &bob.user_id, "m.read", None).await.unwrap().unwrap().event_id, reply);
    assert_eq!(
        storage::receipts::get(db, nid, &bob.user_id, "m.read.private", None).await.unwrap().unwrap().event_id,
        e2
    );
    assert_eq!(s.post(&markers, Some(&bob.token), json!({ "m.fully_read": e1 })).await.0, 200);
    assert_eq!(s.get(&marker, Some(&bob.token)).await.1, json!({ "event_id": e2 }));
    let rows = storage::account_data::changed_since(db, &bob.user_id, 0).await.unwrap();
    assert_eq!(rows.iter().filter(|r| r.data_type == "m.fully_read").count(), 1, "delivered to sync as account data");
    // A bad event ID anywhere changes nothing.
    let before = storage::account_data::current_stream_position(db).await.unwrap();
    assert_err(
        &s.post(&markers, Some(&alice.token), json!({ "m.fully_read": e2, "m.read": "$nope" })).await,
        404,
        "M_NOT_FOUND",
    );
    assert_eq!(storage::account_data::current_stream_position(db).await.unwrap(), before);
    assert_err(&s.get(&room_path(&alice, &room, "m.fully_read"), Some(&alice.token)).await, 404, "M_NOT_FOUND");
    assert_err(&s.post(&markers, Some(&bob.token), json!({ "m.read": 1 })).await, 400, "M_BAD_JSON");
    assert_err(&s.post(&markers, Some(&eve.token), json!({ "m.read": e2 })).await, 403, "M_FORBIDDEN");
    assert_err(
        &s.post("/_matrix/client/v3/rooms/!nope:localhost/read_markers", Some(&bob.token), json!({})).await,
        404,
        "M_NOT_FOUND",
    );

    // After leaving, no more receipts.
    assert_eq!(
        s.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(&bob.token), json!({})).await.0,
        200
    );
    assert_err(&s.post(&receipt_path(&room, "m.read", &e2), Some(&bob.token), json!({})).await, 403, "M_FORBIDDEN");
    s.stop().await;
}

/// Concurrent receipts are committed in batches (one stream lock and one commit per batch): every
/// receipt lands with its own position, the watermark covers them all, and a batch orders two
/// receipts of the same key as sequential writes would.
#[tokio::test]
async fn receipts_group_commit() {
    let s = TestServer::start().await;
    let db = &s.state().db;
    let owner = s.register("owner", false).await;
    let rooms = [
        create(&s, &owner, json!({ "preset": "public_chat" })).await,
        create(&s, &owner, json!({ "preset": "public_chat" })).await,
    ];
    let mut users = Vec::new();
    for i in 0..12 {
        let u = s.register(&format!("reader{i}"), false).await;
        join(&s, &u, &rooms[i % 2]).await;
        users.push(u);
    }
    let events = [send_text(&s, &owner, &rooms[0], "a").await, send_text(&s, &owner, &rooms[1], "b").await];
    let posts = users.iter().enumerate().map(|(i, u)| {
        let path = receipt_path(&rooms[i % 2], "m.read", &events[i % 2]);
        let s = &s;
        async move { s.post(&path, Some(&u.token), json!({})).await.0 }
    });
    let statuses = futures_util::future::join_all(posts).await;
    assert!(statuses.iter().all(|st| *st == 200), "{statuses:?}");
    let nids = [room_nid(&s, &rooms[0]).await, room_nid(&s, &rooms[1]).await];
    let rows = storage::receipts::for_rooms_since(db, &nids, &owner.user_id, 0).await.unwrap();
    assert_eq!(rows.len(), 12);
    let mut positions: Vec<i64> = rows.iter().map(|r| r.stream_ordering).collect();
    positions.dedup();
    assert_eq!(positions.len(), 12, "one position each");
    let top = storage::receipts::current_stream_position(db).await.unwrap();
    assert_eq!(*s.state().receipt_stream.borrow(), top, "the watermark covers the whole batch");

    // Within one batch, later receipts see earlier ones: forwards is recorded, backwards ignored.
    let later = send_text(&s, &owner, &rooms[0], "c").await;
    let later_stream = storage::events::by_id(db, &later).await.unwrap().unwrap().stream_ordering;
    let first_stream = storage::events::by_id(db, &events[0]).await.unwrap().unwrap().stream_ordering;
    let receipt = |event_id, event_stream| storage::receipts::NewReceipt {
        room_nid: nids[0],
        user_id: "@owner:localhost",
        receipt_type: "m.read",
        thread_id: None,
        event_id,
        event_stream,
    };
    let got = storage::receipts::upsert_batch(db, &[receipt(&events[0], first_stream), receipt(&later, later_stream)])
        .await
        .unwrap();
    assert!(got[0].is_some() && got[1].is_some() && got[1] > got[0], "{got:?}");
    let got = storage::receipts::upsert_batch(db, &[receipt(&events[0], first_stream)]).await.unwrap();
    assert_eq!(got, vec![None]);
    let current = storage::receipts::get(db, nids[0], "@owner:localhost", "m.read", None).await.unwrap().unwrap();
    assert_eq!(current.event_id, later);
    s.stop().await;
}

#[tokio::test]
async fn typing_notifications() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let eve = s.register("eve", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    join(&s, &bob, &room).await;
    let nid = room_nid(&s, &room).await;
    let typing = &s.state().typing;
    let path = |u: &User| format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&u.user_id));

    assert!(typing.typing_users(nid).is_empty());
    let p0 = typing.current_position();
    assert_eq!(s.put(&path(&alice), Some(&alice.token), json!({ "typing": true, "timeout": 30000 })).await.0, 200);
    assert_eq!(s.put(&path(&bob), Some(&bob.token), json!({ "typing": true })).await.0, 200);
    let mut both = vec![alice.user_id.clone(), bob.user_id.clone()];
    both.sort();
    assert_eq!(typing.typing_users(nid), both);
    let p1 = typing.current_position();
    assert!(p1 > p0);
    assert_eq!(typing.room_position(nid), p1);

    // Stop: a change; stopping again is none.
    assert_eq!(s.put(&path(&alice), Some(&alice.token), json!({ "typing": false })).await.0, 200);
    assert_eq!(typing.typing_users(nid), vec![bob.user_id.clone()]);
    let p2 = typing.current_position();
    assert!(p2 > p1);
    assert_eq!(s.put(&path(&alice), Some(&alice.token), json!({ "typing": false })).await.0, 200);
    assert_eq!(typing.current_position(), p2);

    // Refusals.
    assert_err(&s.put(&path(&bob), Some(&alice.token), json!({ "typing": true })).await, 403, "M_FORBIDDEN");
    assert_err(&s.put(&path(&eve), Some(&eve.token), json!({ "typing": true })).await, 403, "M_FORBIDDEN");
    assert_err(&s.put(&path(&alice), Some(&alice.token), json!({ "timeout": 1000 })).await, 400, "M_BAD_JSON");
    assert_err(&s.put(&path(&alice), Some(&alice.token), json!({ "typing": "yes" })).await, 400, "M_BAD_JSON");
    assert_err(&put_raw(&s, &path(&alice), &alice.token, "{").await, 400, "M_NOT_JSON");
    let unknown = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc("!nope:localhost"), enc(&alice.user_id));
    assert_err(&s.put(&unknown, Some(&alice.token), json!({ "typing": true })).await, 404, "M_NOT_FOUND");
    assert_eq!(typing.typing_users(nid), vec![bob.user_id.clone()], "refused requests change nothing");

    // Expiry: the typing set empties after the timeout, and watchers are woken by the expiry
    // itself (no one reads the set meanwhile).
    assert_eq!(s.put(&path(&bob), Some(&bob.token), json!({ "typing": false })).await.0, 200);
    let mut rx = typing.subscribe();
    rx.mark_unchanged();
    assert_eq!(s.put(&path(&alice), Some(&alice.token), json!({ "typing": true, "timeout": 300 })).await.0, 200);
    assert!(rx.has_changed().unwrap(), "start wakes watchers");
    let started = rx.borrow_and_update().to_owned();
    assert_eq!(typing.typing_users(nid), vec![alice.user_id.clone()]);
    tokio::time::timeout(Duration::from_secs(5), rx.changed()).await.expect("expiry wakes watchers").unwrap();
    assert!(*rx.borrow() > started);
    assert!(typing.typing_users(nid).is_empty());
    assert_eq!(typing.room_position(nid), typing.current_position());
    s.stop().await;
}
