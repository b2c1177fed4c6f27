//! `/sync`: every section and filter, long-poll wake-ups, gappy timelines, lazy-loaded members,
//! leave/ban/rejoin, archived rooms; also with a cache too small to hold anything, so every read
//! takes the database path.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

pub async fn sync(s: &TestServer, u: &User, since: Option<&str>, filter: Option<&Value>, timeout_ms: u64) -> Value {
    let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
    if let Some(t) = since {
        path.push_str(&format!("&since={}", enc(t)));
    }
    if let Some(f) = filter {
        path.push_str(&format!("&filter={}", enc(&f.to_string())));
    }
    let (st, v) = s.get(&path, Some(&u.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["next_batch"].is_string(), "{v}");
    v
}

fn next(v: &Value) -> String {
    v["next_batch"].as_str().unwrap().to_owned()
}

pub async fn send_text(s: &TestServer, u: &User, room: &str, body: &str) -> String {
    let txn = format!("t{}", rand_suffix());
    let (st, v) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room)),
            Some(&u.token),
            json!({ "msgtype": "m.text", "body": body }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    v["event_id"].as_str().unwrap().to_owned()
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn put_state(s: &TestServer, u: &User, room: &str, kind: &str, key: &str, content: Value) -> String {
    let (st, v) =
        s.put(&format!("/_matrix/client/v3/rooms/{}/state/{kind}/{key}", enc(room)), Some(&u.token), content).await;
    assert_eq!(st, 200, "{v}");
    v["event_id"].as_str().unwrap().to_owned()
}

async fn membership(s: &TestServer, u: &User, room: &str, action: &str, body: Value) {
    let (st, v) = s.post(&format!("/_matrix/client/v3/rooms/{}/{action}", enc(room)), Some(&u.token), body).await;
    assert_eq!(st, 200, "{action}: {v}");
}

fn timeline_bodies(room: &Value) -> Vec<String> {
    room["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

fn events_of<'a>(section: &'a Value, kind: &str) -> Vec<&'a Value> {
    section["events"].as_array().map(|a| a.iter().filter(|e| e["type"] == kind).collect()).unwrap_or_default()
}

/// Initial sync, then incremental ones: timeline, state, summary, invites, transaction IDs.
async fn scenario_basics(s: &TestServer) {
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(s, &alice, json!({ "name": "Mairie", "invite": [bob.user_id] })).await;
    send_text(s, &alice, &room, "bonjour").await;

    // Alice: the room is joined, with its state and the message in the timeline.
    let a0 = sync(s, &alice, None, None, 0).await;
    let r = &a0["rooms"]["join"][&room];
    assert_eq!(timeline_bodies(r), ["bonjour"], "{r}");
    let tl = r["timeline"]["events"].as_array().unwrap();
    let msg = tl.last().unwrap();
    assert!(msg["unsigned"]["transaction_id"].is_string(), "own message carries its txn id: {msg}");
    assert!(msg["unsigned"]["age"].is_i64());
    // Everything before the timeline is in `state`; state and timeline do not overlap.
    let all: Vec<&Value> = r["state"]["events"].as_array().unwrap().iter().chain(tl.iter()).collect();
    for kind in ["m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.name"] {
        assert_eq!(all.iter().filter(|e| e["type"] == kind).count(), 1, "{kind} once: {r}");
    }
    assert_eq!(r["summary"]["m.joined_member_count"], 1);
    assert_eq!(r["summary"]["m.invited_member_count"], 1);
    assert_eq!(r["summary"]["m.heroes"], json!([bob.user_id]));

    // Bob: an invite with stripped state naming the room and the inviter.
    let b0 = sync(s, &bob, None, None, 0).await;
    let inv = &b0["rooms"]["invite"][&room]["invite_state"]["events"];
    let kinds: Vec<&str> = inv.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"m.room.name") && kinds.contains(&"m.room.create"), "{inv}");
    let me = inv.as_array().unwrap().iter().find(|e| e["state_key"] == bob.user_id).expect("own invite");
    assert_eq!(me["content"]["membership"], "invite");
    assert_eq!(me["sender"], alice.user_id);
    assert!(b0["rooms"]["join"].get(&room).is_none());

    // Nothing new: an incremental sync is empty and returns at once.
    let a1 = sync(s, &alice, Some(&next(&a0)), None, 0).await;
    assert!(a1.get("rooms").is_none(), "{a1}");

    // Bob joins: Alice sees the join in her timeline, Bob gets the room as joined with history.
    membership(s, &bob, &room, "join", json!({})).await;
    let a2 = sync(s, &alice, Some(&next(&a1)), None, 0).await;
    let joins = events_of(&a2["rooms"]["join"][&room]["timeline"], "m.room.member");
    assert_eq!(joins.len(), 1, "{a2}");
    assert_eq!(joins[0]["content"]["membership"], "join");
    assert_eq!(joins[0]["unsigned"]["prev_content"]["membership"], "invite", "prev_content: {}", joins[0]);
    assert_eq!(a2["rooms"]["join"][&room]["summary"]["m.joined_member_count"], 2);
    let b1 = sync(s, &bob, Some(&next(&b0)), None, 0).await;
    let br = &b1["rooms"]["join"][&room];
    assert!(timeline_bodies(br).contains(&"bonjour".to_owned()), "{b1}");
    assert!(
        !events_of(&br["state"], "m.room.create").is_empty() || !events_of(&br["timeline"], "m.room.create").is_empty()
    );
    assert!(b1["rooms"].get("invite").is_none());

    // The token keeps moving forwards and is usable again.
    send_text(s, &bob, &room, "salut").await;
    let a3 = sync(s, &alice, Some(&next(&a2)), None, 0).await;
    assert_eq!(timeline_bodies(&a3["rooms"]["join"][&room]), ["salut"]);
    let m = &a3["rooms"]["join"][&room]["timeline"]["events"][0];
    assert!(m["unsigned"].get("transaction_id").is_none(), "others do not see the txn id: {m}");
    let again = sync(s, &alice, Some(&next(&a2)), None, 0).await;
    assert_eq!(timeline_bodies(&again["rooms"]["join"][&room]), ["salut"], "same since, same answer");

    // prev_batch paginates backwards from the start of the timeline.
    let prev = a3["rooms"]["join"][&room]["timeline"]["prev_batch"].as_str().unwrap();
    let (st, page) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50&from={}", enc(&room), enc(prev)),
            Some(&alice.token),
        )
        .await;
    assert_eq!(st, 200, "{page}");
    let bodies: Vec<&str> =
        page["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert_eq!(bodies, ["bonjour"], "{page}");

    // A sync token works as a pagination start too: backwards from it, forwards after it.
    send_text(s, &alice, &room, "plus tard").await;
    let token = next(&a3);
    let (st, back) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=2&from={}", enc(&room), enc(&token)),
            Some(&alice.token),
        )
        .await;
    assert_eq!(st, 200, "{back}");
    assert_eq!(back["chunk"][0]["content"]["body"], "salut", "{back}");
    let (st, fwd) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{}/messages?dir=f&limit=5&from={}", enc(&room), enc(&token)),
            Some(&alice.token),
        )
        .await;
    assert_eq!(st, 200, "{fwd}");
    let bodies: Vec<&str> =
        fwd["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert_eq!(bodies, ["plus tard"], "{fwd}");
}

/// More events than the limit: `limited`, with the state changes of the gap in `state`.
async fn scenario_gappy(s: &TestServer) {
    let alice = s.register("gap_alice", false).await;
    let room = create(s, &alice, json!({ "name": "Avant" })).await;
    let filter = json!({ "room": { "timeline": { "limit": 3 } } });
    let t0 = sync(s, &alice, None, Some(&filter), 0).await;
    put_state(s, &alice, &room, "m.room.name", "", json!({ "name": "Après" })).await;
    put_state(s, &alice, &room, "m.room.topic", "", json!({ "topic": "t1" })).await;
    for i in 0..6 {
        send_text(s, &alice, &room, &format!("m{i}")).await;
    }
    let t1 = sync(s, &alice, Some(&next(&t0)), Some(&filter), 0).await;
    let r = &t1["rooms"]["join"][&room];
    assert_eq!(r["timeline"]["limited"], true, "{r}");
    assert_eq!(timeline_bodies(r), ["m3", "m4", "m5"]);
    let names = events_of(&r["state"], "m.room.name");
    assert_eq!(names.len(), 1, "{r}");
    assert_eq!(names[0]["content"]["name"], "Après");
    assert_eq!(events_of(&r["state"], "m.room.topic").len(), 1);
    assert!(events_of(&r["state"], "m.room.create").is_empty(), "only the gap's changes: {r}");

    // Not gappy: no state section content, not limited.
    send_text(s, &alice, &room, "m6").await;
    let t2 = sync(s, &alice, Some(&next(&t1)), Some(&filter), 0).await;
    let r = &t2["rooms"]["join"][&room];
    assert_eq!(r["timeline"]["limited"], false);
    assert_eq!(timeline_bodies(r), ["m6"]);

    // A long absence: more events than the cache keeps (100) since the token.
    for i in 0..110 {
        send_text(s, &alice, &room, &format!("x{i}")).await;
        if i == 50 {
            put_state(s, &alice, &room, "m.room.topic", "", json!({ "topic": "t2" })).await;
        }
    }
    let t3 = sync(s, &alice, Some(&next(&t2)), Some(&filter), 0).await;
    let r = &t3["rooms"]["join"][&room];
    assert_eq!(r["timeline"]["limited"], true);
    assert_eq!(timeline_bodies(r), ["x107", "x108", "x109"]);
    let topics = events_of(&r["state"], "m.room.topic");
    assert_eq!(topics.len(), 1, "{r}");
    assert_eq!(topics[0]["content"]["topic"], "t2");

    // An initial sync with the full state at the start of a limited timeline.
    let full = sync(s, &alice, None, Some(&filter), 0).await;
    let r = &full["rooms"]["join"][&room];
    assert_eq!(r["timeline"]["limited"], true);
    assert_eq!(events_of(&r["state"], "m.room.topic")[0]["content"]["topic"], "t2");
    assert_eq!(events_of(&r["state"], "m.room.name")[0]["content"]["name"], "Après");
}

/// Leave, ban, rejoin; archived rooms with `include_leave`; forget.
async fn scenario_leave(s: &TestServer) {
    let alice = s.register("lv_alice", false).await;
    let bob = s.register("lv_bob", false).await;
    let room = create(s, &alice, json!({ "preset": "public_chat" })).await;
    membership(s, &bob, &room, "join", json!({})).await;
    send_text(s, &alice, &room, "avant").await;
    let b0 = sync(s, &bob, None, None, 0).await;
    assert!(b0["rooms"]["join"].get(&room).is_some());

    send_text(s, &alice, &room, "pendant").await;
    membership(s, &bob, &room, "leave", json!({})).await;
    send_text(s, &alice, &room, "après").await;
    let b1 = sync(s, &bob, Some(&next(&b0)), None, 0).await;
    let left = &b1["rooms"]["leave"][&room];
    let bodies = timeline_bodies(left);
    assert_eq!(bodies, ["pendant"], "history up to the departure only: {left}");
    let last = left["timeline"]["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["content"]["membership"], "leave");
    assert!(b1["rooms"].get("join").is_none_or(|j| j.get(&room).is_none()));

    // Nothing more about the room afterwards.
    send_text(s, &alice, &room, "encore").await;
    let b2 = sync(s, &bob, Some(&next(&b1)), None, 0).await;
    assert!(b2.get("rooms").is_none(), "{b2}");

    // Archived rooms: only with include_leave on an initial sync.
    let plain = sync(s, &bob, None, None, 0).await;
    assert!(plain.get("rooms").is_none_or(|r| r.get("leave").is_none()), "{plain}");
    let archived = sync(s, &bob, None, Some(&json!({ "room": { "include_leave": true } })), 0).await;
    assert!(timeline_bodies(&archived["rooms"]["leave"][&room]).contains(&"pendant".to_owned()), "{archived}");
    assert!(!timeline_bodies(&archived["rooms"]["leave"][&room]).contains(&"encore".to_owned()));

    // Rejoin: the room is joined again, with the state.
    membership(s, &bob, &room, "join", json!({})).await;
    let b3 = sync(s, &bob, Some(&next(&b2)), None, 0).await;
    let r = &b3["rooms"]["join"][&room];
    assert!(
        !r["state"]["events"].as_array().unwrap().is_empty() || !r["timeline"]["events"].as_array().unwrap().is_empty()
    );
    assert!(timeline_bodies(r).contains(&"encore".to_owned()), "history visible again (shared): {r}");

    // Ban: in `leave` with the ban event.
    membership(s, &alice, &room, "ban", json!({ "user_id": bob.user_id, "reason": "spam" })).await;
    let b4 = sync(s, &bob, Some(&next(&b3)), None, 0).await;
    let ev = b4["rooms"]["leave"][&room]["timeline"]["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(ev["content"]["membership"], "ban", "{b4}");

    // Forgotten rooms leave the archive.
    membership(s, &bob, &room, "forget", json!({})).await;
    let archived = sync(s, &bob, None, Some(&json!({ "room": { "include_leave": true } })), 0).await;
    assert!(archived.get("rooms").is_none_or(|r| r["leave"].get(&room).is_none()), "{archived}");
}

/// Lazy-loaded members: only the senders' member events, a newcomer's when they speak, and not
/// twice unless `include_redundant_members`.
async fn scenario_lazy(s: &TestServer) {
    let alice = s.register("lz_alice", false).await;
    let bob = s.register("lz_bob", false).await;
    let carol = s.register("lz_carol", false).await;
    let room = create(s, &alice, json!({ "preset": "public_chat" })).await;
    membership(s, &bob, &room, "join", json!({})).await;
    membership(s, &carol, &room, "join", json!({})).await;
    for i in 0..4 {
        send_text(s, &alice, &room, &format!("a{i}")).await;
    }
    let lazy = json!({ "room": { "timeline": { "limit": 2 }, "state": { "lazy_load_members": true } } });
    let c0 = sync(s, &carol, None, Some(&lazy), 0).await;
    let r = &c0["rooms"]["join"][&room];
    let mut members: Vec<String> =
        events_of(&r["state"], "m.room.member").iter().map(|e| e["state_key"].as_str().unwrap().to_owned()).collect();
    members.sort();
    let mut want = vec![alice.user_id.clone(), carol.user_id.clone()];
    want.sort();
    assert_eq!(members, want, "senders and self only: {r}");
    assert_eq!(r["summary"]["m.joined_member_count"], 3, "counts stay complete: {r}");

    send_text(s, &bob, &room, "b0").await;
    send_text(s, &alice, &room, "a4").await;
    let c1 = sync(s, &carol, Some(&next(&c0)), Some(&lazy), 0).await;
    let r = &c1["rooms"]["join"][&room];
    let members: Vec<&str> =
        events_of(&r["state"], "m.room.member").iter().map(|e| e["state_key"].as_str().unwrap()).collect();
    assert_eq!(members, [bob.user_id.as_str()], "bob appears when he speaks, alice not resent: {r}");

    let redundant = json!({ "room": { "state": { "lazy_load_members": true, "include_redundant_members": true } } });
    send_text(s, &alice, &room, "a5").await;
    let c2 = sync(s, &carol, Some(&next(&c1)), Some(&redundant), 0).await;
    let members: Vec<&str> = events_of(&c2["rooms"]["join"][&room]["state"], "m.room.member")
        .iter()
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    assert_eq!(members, [alice.user_id.as_str()], "{c2}");

    // Without lazy loading, an initial sync carries every member (in state or timeline).
    let full = sync(s, &carol, None, None, 0).await;
    let r = &full["rooms"]["join"][&room];
    let mut all: Vec<&str> = events_of(&r["state"], "m.room.member")
        .into_iter()
        .chain(events_of(&r["timeline"], "m.room.member"))
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 3, "{r}");
}

/// Timeline, state, room and account data filters; a stored filter; event_fields; bad filters.
async fn scenario_filters(s: &TestServer) {
    let alice = s.register("fl_alice", false).await;
    let bob = s.register("fl_bob", false).await;
    let r1 = create(s, &alice, json!({ "preset": "public_chat" })).await;
    let r2 = create(s, &alice, json!({})).await;
    membership(s, &bob, &r1, "join", json!({})).await;
    send_text(s, &alice, &r1, "from alice").await;
    send_text(s, &bob, &r1, "from bob").await;
    let (st, _) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/img1", enc(&r1)),
            Some(&alice.token),
            json!({ "msgtype": "m.image", "body": "photo.png", "url": "mxc://localhost/abc" }),
        )
        .await;
    assert_eq!(st, 200);
    send_text(s, &alice, &r2, "other room").await;

    let f = json!({ "room": { "rooms": [r1], "timeline": { "senders": [bob.user_id] } } });
    let v = sync(s, &alice, None, Some(&f), 0).await;
    assert!(v["rooms"]["join"].get(&r2).is_none(), "rooms filter: {v}");
    assert_eq!(timeline_bodies(&v["rooms"]["join"][&r1]), ["from bob"]);

    let f = json!({ "room": { "not_rooms": [r1], "timeline": { "not_senders": [bob.user_id], "types": ["m.room.message"] } } });
    let v = sync(s, &alice, None, Some(&f), 0).await;
    assert!(v["rooms"]["join"].get(&r1).is_none());
    assert_eq!(timeline_bodies(&v["rooms"]["join"][&r2]), ["other room"]);

    let f = json!({ "room": { "timeline": { "contains_url": true } } });
    let v = sync(s, &alice, None, Some(&f), 0).await;
    assert_eq!(timeline_bodies(&v["rooms"]["join"][&r1]), ["photo.png"]);
    let f =
        json!({ "room": { "timeline": { "not_types": ["m.room.mem*", "m.room.create"] , "contains_url": false } } });
    let v = sync(s, &alice, None, Some(&f), 0).await;
    let tl = v["rooms"]["join"][&r1]["timeline"]["events"].as_array().unwrap();
    assert!(
        tl.iter()
            .all(|e| e["type"] != "m.room.member" && e["type"] != "m.room.create" && e["content"]["url"].is_null())
    );

    // State filter: only the name... and types wildcard.
    let f = json!({ "room": { "timeline": { "limit": 1 }, "state": { "types": ["m.room.join_*"] } } });
    let v = sync(s, &alice, None, Some(&f), 0).await;
    let kinds: Vec<&str> = v["rooms"]["join"][&r1]["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["m.room.join_rules"]);

    // Stored filter by ID, with event_fields.
    let (st, fid) = s
        .post(
            &format!("/_matrix/client/v3/user/{}/filter", enc(&alice.user_id)),
            Some(&alice.token),
            json!({ "event_fields": ["type", "content.body"], "room": { "rooms": [r2], "timeline": { "limit": 1 } } }),
        )
        .await;
    assert_eq!(st, 200);
    let id = fid["filter_id"].as_str().unwrap();
    let (st, v) = s.get(&format!("/_matrix/client/v3/sync?filter={id}"), Some(&alice.token)).await;
    assert_eq!(st, 200);
    assert_eq!(
        v["rooms"]["join"][&r2]["timeline"]["events"],
        json!([{ "type": "m.room.message", "content": { "body": "other room" } }])
    );

    // Account data, global and per room, with tags.
    let (st, _) = s
        .put(
            &format!("/_matrix/client/v3/user/{}/account_data/org.example.x", enc(&alice.user_id)),
            Some(&alice.token),
            json!({ "a": 1 }),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = s
        .put(
            &format!("/_matrix/client/v3/user/{}/rooms/{}/tags/m.favourite", enc(&alice.user_id), enc(&r1)),
            Some(&alice.token),
            json!({ "order": 0.5 }),
        )
        .await;
    assert_eq!(st, 200);
    let v = sync(s, &alice, None, None, 0).await;
    assert_eq!(events_of(&v["account_data"], "org.example.x")[0]["content"]["a"], 1, "{v}");
    assert!(
        events_of(&v["rooms"]["join"][&r1]["account_data"], "m.tag")[0]["content"]["tags"]["m.favourite"].is_object()
    );
    let v2 = sync(
        s,
        &alice,
        None,
        Some(
            &json!({ "account_data": { "not_types": ["org.example.*"] }, "room": { "account_data": { "types": [] } } }),
        ),
        0,
    )
    .await;
    assert!(events_of(&v2["account_data"], "org.example.x").is_empty());
    assert!(events_of(&v2["rooms"]["join"][&r1]["account_data"], "m.tag").is_empty());
    let (st, _) = s
        .put(
            &format!("/_matrix/client/v3/user/{}/account_data/org.example.x", enc(&alice.user_id)),
            Some(&alice.token),
            json!({ "a": 2 }),
        )
        .await;
    assert_eq!(st, 200);
    let v3 = sync(s, &alice, Some(&next(&v)), None, 0).await;
    assert_eq!(events_of(&v3["account_data"], "org.example.x")[0]["content"]["a"], 2, "{v3}");

    // Bad tokens and filters are clear errors.
    for (q, status, code) in [
        ("since=garbage", 400, "M_INVALID_PARAM"),
        ("since=s1_x", 400, "M_INVALID_PARAM"),
        ("filter=%7Bnot%20json", 400, "M_INVALID_PARAM"),
        ("filter=%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A%22ten%22%7D%7D%7D", 400, "M_INVALID_PARAM"),
        ("filter=99999", 404, "M_NOT_FOUND"),
        ("timeout=-5", 400, "M_INVALID_PARAM"),
        ("set_presence=busy", 400, "M_INVALID_PARAM"),
        ("full_state=yes", 400, "M_INVALID_PARAM"),
    ] {
        let resp = s.get(&format!("/_matrix/client/v3/sync?{q}"), Some(&alice.token)).await;
        assert_err(&resp, status, code);
    }
    assert_err(&s.get("/_matrix/client/v3/sync", None).await, 401, "M_MISSING_TOKEN");

    // full_state: the whole state again on an incremental sync.
    let (st, v4) =
        s.get(&format!("/_matrix/client/v3/sync?full_state=true&since={}", enc(&next(&v3))), Some(&alice.token)).await;
    assert_eq!(st, 200);
    let r = &v4["rooms"]["join"][&r1];
    assert!(!events_of(&r["state"], "m.room.create").is_empty(), "{v4}");
    assert_eq!(r["timeline"]["events"], json!([]), "the timeline still starts at the token: {v4}");
    assert!(v4["rooms"]["join"].get(&r2).is_some(), "every room: {v4}");
}

/// Long-polls wake within milliseconds of a message, typing, a receipt, an invite.
async fn scenario_wakeups(s: &TestServer) {
    let alice = s.register("wk_alice", false).await;
    let bob = s.register("wk_bob", false).await;
    let room = create(s, &alice, json!({ "preset": "public_chat" })).await;
    membership(s, &bob, &room, "join", json!({})).await;
    let b0 = sync(s, &bob, None, None, 0).await;
    let since = next(&b0);

    async fn woken<F: std::future::Future<Output = ()>>(
        s: &TestServer,
        who: &User,
        since: &str,
        act: F,
    ) -> (Value, Duration) {
        woken_within(s, who, since, 20_000, act).await
    }
    async fn woken_within<F: std::future::Future<Output = ()>>(
        s: &TestServer,
        who: &User,
        since: &str,
        timeout_ms: u64,
        act: F,
    ) -> (Value, Duration) {
        let poll = async {
            let start = Instant::now();
            let v = sync(s, who, Some(since), None, timeout_ms).await;
            (v, start.elapsed())
        };
        let act = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            act.await;
        };
        let (r, ()) = tokio::join!(poll, act);
        r
    }

    let (v, took) = woken(s, &bob, &since, async {
        send_text(s, &alice, &room, "wake").await;
    })
    .await;
    assert_eq!(timeline_bodies(&v["rooms"]["join"][&room]), ["wake"]);
    assert!(took < Duration::from_secs(5), "woken by the message, not the timeout: {took:?}");
    let since = next(&v);

    let (v, took) = woken(s, &bob, &since, async {
        let (st, _) = s
            .put(
                &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&alice.user_id)),
                Some(&alice.token),
                json!({ "typing": true, "timeout": 10000 }),
            )
            .await;
        assert_eq!(st, 200);
    })
    .await;
    let typing = events_of(&v["rooms"]["join"][&room]["ephemeral"], "m.typing");
    assert_eq!(typing[0]["content"]["user_ids"], json!([alice.user_id]), "{v}");
    assert!(took < Duration::from_secs(5));
    let since = next(&v);

    let last = send_text(s, &bob, &room, "read me").await;
    let mid = sync(s, &bob, Some(&since), None, 0).await;
    let since = next(&mid);
    let (v, took) = woken(s, &bob, &since, async {
        let (st, _) = s
            .post(
                &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&last)),
                Some(&alice.token),
                json!({}),
            )
            .await;
        assert_eq!(st, 200);
    })
    .await;
    let receipts = events_of(&v["rooms"]["join"][&room]["ephemeral"], "m.receipt");
    assert!(receipts[0]["content"][&last]["m.read"][&alice.user_id]["ts"].is_i64(), "{v}");
    assert!(took < Duration::from_secs(5));
    let since = next(&v);

    let other = create(s, &alice, json!({})).await;
    let (v, took) = woken(s, &bob, &since, async {
        membership(s, &alice, &other, "invite", json!({ "user_id": bob.user_id })).await;
    })
    .await;
    assert!(v["rooms"]["invite"].get(&other).is_some(), "{v}");
    assert!(took < Duration::from_secs(5));

    // With nothing relevant, the long-poll waits out its timeout (and an unrelated room's
    // message does not end it).
    let since = next(&v);
    let (v, took) = woken_within(s, &bob, &since, 1500, async {
        send_text(s, &alice, &other, "not for bob yet").await;
    })
    .await;
    assert!(v.get("rooms").is_none(), "{v}");
    assert!(took >= Duration::from_millis(1400), "{took:?}");
    let start = Instant::now();
    let quiet = sync(s, &alice, Some(&next(&sync(s, &alice, None, None, 0).await)), None, 700).await;
    assert!(start.elapsed() >= Duration::from_millis(650), "timeout honoured");
    assert!(quiet.get("rooms").is_none(), "{quiet}");
}

/// Presence of room-mates in sync; `set_presence`; disabled presence.
async fn scenario_presence(s: &TestServer) {
    let alice = s.register("pr_alice", false).await;
    let bob = s.register("pr_bob", false).await;
    let room = create(s, &alice, json!({ "preset": "public_chat" })).await;
    membership(s, &bob, &room, "join", json!({})).await;
    let (st, _) = s
        .put(
            &format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id)),
            Some(&alice.token),
            json!({ "presence": "unavailable", "status_msg": "en réunion" }),
        )
        .await;
    assert_eq!(st, 200);
    let b0 = sync(s, &bob, None, None, 0).await;
    let p = b0["presence"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["sender"] == alice.user_id)
        .cloned()
        .expect("alice's presence");
    assert_eq!(p["content"]["presence"], "unavailable");
    assert_eq!(p["content"]["status_msg"], "en réunion");
    // Bob's own sync marked him online.
    let a = sync(s, &alice, None, None, 0).await;
    let pb = a["presence"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["sender"] == bob.user_id)
        .cloned()
        .expect("bob online");
    assert_eq!(pb["content"]["presence"], "online");
    // set_presence=offline does not mark online.
    let carol = s.register("pr_carol", false).await;
    membership(s, &carol, &room, "join", json!({})).await;
    let (st, _) = s.get("/_matrix/client/v3/sync?set_presence=offline", Some(&carol.token)).await;
    assert_eq!(st, 200);
    let a2 = sync(s, &alice, Some(&next(&a)), None, 0).await;
    assert!(a2["presence"]["events"].as_array().is_none_or(|e| e.iter().all(|p| p["sender"] != carol.user_id)), "{a2}");
}

/// Unread notification and highlight counts go up with messages and mentions, down with
/// receipts; threads are counted apart when the filter asks.
async fn scenario_counts(s: &TestServer) {
    let alice = s.register("ct_alice", false).await;
    let bob = s.register("ct_bob", false).await;
    let room = create(s, &alice, json!({ "preset": "public_chat" })).await;
    membership(s, &bob, &room, "join", json!({})).await;
    let b0 = sync(s, &bob, None, None, 0).await;
    assert_eq!(b0["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 0, "{b0}");

    send_text(s, &alice, &room, "un").await;
    let second = send_text(s, &alice, &room, "deux").await;
    let b1 = sync(s, &bob, Some(&next(&b0)), None, 0).await;
    let counts = &b1["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!(counts["notification_count"], 2, "{b1}");
    assert_eq!(counts["highlight_count"], 0);

    // A mention highlights.
    let (st, v) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/mention1", enc(&room)),
            Some(&alice.token),
            json!({ "msgtype": "m.text", "body": "ct_bob: urgent", "m.mentions": { "user_ids": [bob.user_id] } }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let mention = v["event_id"].as_str().unwrap().to_owned();
    let b2 = sync(s, &bob, Some(&next(&b1)), None, 0).await;
    let counts = &b2["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!((counts["notification_count"].as_i64(), counts["highlight_count"].as_i64()), (Some(3), Some(1)), "{b2}");
    // Alice's own messages do not count for her.
    let a = sync(s, &alice, None, None, 0).await;
    assert_eq!(a["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 0);

    // A receipt on the second message leaves the mention unread; one on the mention clears all.
    async fn receipt(s: &TestServer, u: &User, room: &str, ev: &str) {
        let path = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(room), enc(ev));
        let (st, v) = s.post(&path, Some(&u.token), json!({})).await;
        assert_eq!(st, 200, "{v}");
    }
    receipt(s, &bob, &room, &second).await;
    let b3 = sync(s, &bob, Some(&next(&b2)), None, 0).await;
    let counts = &b3["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!((counts["notification_count"].as_i64(), counts["highlight_count"].as_i64()), (Some(1), Some(1)), "{b3}");
    receipt(s, &bob, &room, &mention).await;
    let b4 = sync(s, &bob, Some(&next(&b3)), None, 0).await;
    let counts = &b4["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!((counts["notification_count"].as_i64(), counts["highlight_count"].as_i64()), (Some(0), Some(0)), "{b4}");

    // Threads: with unread_thread_notifications, a thread reply counts in its thread.
    let (st, _) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/thr1", enc(&room)),
            Some(&alice.token),
            json!({ "msgtype": "m.text", "body": "in thread", "m.relates_to": { "rel_type": "m.thread", "event_id": mention } }),
        )
        .await;
    assert_eq!(st, 200);
    let threaded = json!({ "room": { "timeline": { "unread_thread_notifications": true } } });
    let b5 = sync(s, &bob, Some(&next(&b4)), Some(&threaded), 0).await;
    let r = &b5["rooms"]["join"][&room];
    assert_eq!(r["unread_notifications"]["notification_count"], 0, "{r}");
    assert_eq!(r["unread_thread_notifications"][&mention]["notification_count"], 1, "{r}");
    let b5u = sync(s, &bob, Some(&next(&b4)), None, 0).await;
    assert_eq!(b5u["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 1, "folded in: {b5u}");
}

/// A knock shows in `rooms.knock` with stripped state; being let in moves the room to `join`.
async fn scenario_knock(s: &TestServer) {
    let alice = s.register("kn_alice", false).await;
    let bob = s.register("kn_bob", false).await;
    let room = create(s, &alice, json!({ "name": "Sur demande", "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }] })).await;
    let b0 = sync(s, &bob, None, None, 0).await;
    let (st, v) = s
        .post(&format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(&bob.token), json!({ "reason": "accès" }))
        .await;
    assert_eq!(st, 200, "{v}");
    let b1 = sync(s, &bob, Some(&next(&b0)), None, 0).await;
    let ks = &b1["rooms"]["knock"][&room]["knock_state"]["events"];
    let me = ks.as_array().unwrap().iter().find(|e| e["type"] == "m.room.member").expect("own knock");
    assert_eq!(me["content"]["membership"], "knock", "{b1}");
    assert!(ks.as_array().unwrap().iter().any(|e| e["type"] == "m.room.name"));
    membership(s, &alice, &room, "invite", json!({ "user_id": bob.user_id })).await;
    membership(s, &bob, &room, "join", json!({})).await;
    let b2 = sync(s, &bob, Some(&next(&b1)), None, 0).await;
    assert!(b2["rooms"]["join"].get(&room).is_some(), "{b2}");
}

/// Edits, threads and references are bundled into the timeline events they relate to, from the
/// cache and from the database path alike.
async fn scenario_bundles(s: &TestServer) {
    let alice = s.register("bd_alice", false).await;
    let room = create(s, &alice, json!({})).await;
    let root = send_text(s, &alice, &room, "original").await;
    let put = |txn: &'static str, content: Value| {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(&room));
        let token = alice.token.clone();
        async move {
            let (st, v) = s.put(&path, Some(&token), content).await;
            assert_eq!(st, 200, "{v}");
        }
    };
    put("e1", json!({ "msgtype": "m.text", "body": "* edited", "m.new_content": { "msgtype": "m.text", "body": "edited" }, "m.relates_to": { "rel_type": "m.replace", "event_id": root } })).await;
    put(
        "th1",
        json!({ "msgtype": "m.text", "body": "reply", "m.relates_to": { "rel_type": "m.thread", "event_id": root } }),
    )
    .await;
    let v = sync(s, &alice, None, None, 0).await;
    let tl = v["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap();
    let ev = tl.iter().find(|e| e["event_id"] == root).expect("root in timeline");
    let rel = &ev["unsigned"]["m.relations"];
    assert_eq!(rel["m.replace"]["content"]["m.new_content"]["body"], "edited", "{ev}");
    assert_eq!(rel["m.thread"]["count"], 1);
    assert_eq!(rel["m.thread"]["current_user_participated"], true);
    assert_eq!(rel["m.thread"]["latest_event"]["content"]["body"], "reply");
}

#[tokio::test]
async fn sync_unread_counts() {
    let s = TestServer::start().await;
    scenario_counts(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn sync_sections_and_filters() {
    let s = TestServer::start().await;
    scenario_basics(&s).await;
    scenario_gappy(&s).await;
    scenario_leave(&s).await;
    scenario_lazy(&s).await;
    scenario_filters(&s).await;
    scenario_knock(&s).await;
    scenario_bundles(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn sync_long_polls_and_presence() {
    let s = TestServer::start().await;
    scenario_wakeups(&s).await;
    scenario_presence(&s).await;
    s.stop().await;
}

/// The same scenarios with a cache that holds nothing: every entry is evicted at once, so each
/// sync reloads from the database, which must give the same answers.
#[tokio::test]
async fn sync_is_correct_without_cache() {
    let s = TestServer::start_with(|c| c.sync.room_cache_mb = 0).await;
    scenario_basics(&s).await;
    scenario_gappy(&s).await;
    scenario_leave(&s).await;
    scenario_lazy(&s).await;
    scenario_bundles(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn presence_disabled_is_absent_from_sync() {
    let s = TestServer::start_with(|c| c.presence.enabled = false).await;
    let alice = s.register("pd_alice", false).await;
    create(&s, &alice, json!({})).await;
    let v = sync(&s, &alice, None, None, 0).await;
    assert!(v.get("presence").is_none(), "{v}");
    s.stop().await;
}
