//! Simplified sliding sync (MSC4186) over HTTP, with the bodies matrix-rust-sdk (Element X) sends:
//! list ordering by bump stamp, windows and range growth, incremental `pos`, `required_state`
//! with `*`, `$ME` and `$LAZY`, filters, subscriptions raising the timeline limit, invites, joins
//! and leaves, long-polls, the extensions, unread counts, `M_UNKNOWN_POS` and bad bodies.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;
use crate::e2ee::{device_keys, key, sign};
use crate::sync::send_text;

const SS: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

async fn ss_raw(s: &TestServer, u: &User, pos: Option<&str>, timeout: u64, body: Value) -> (StatusCode, Value) {
    let mut path = format!("{SS}?timeout={timeout}");
    if let Some(p) = pos {
        path.push_str(&format!("&pos={}", enc(p)));
    }
    s.post(&path, Some(&u.token), body).await
}

async fn ss(s: &TestServer, u: &User, pos: Option<&str>, timeout: u64, body: Value) -> Value {
    let (st, v) = ss_raw(s, u, pos, timeout, body).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["pos"].is_string(), "{v}");
    v
}

fn pos(v: &Value) -> String {
    v["pos"].as_str().unwrap().to_owned()
}

/// The room IDs of a list's first window.
fn window(v: &Value, list: &str) -> Vec<String> {
    v["lists"][list]["ops"][0]["room_ids"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect()
}

fn rooms(v: &Value) -> Vec<String> {
    let mut r: Vec<String> = v["rooms"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    r.sort();
    r
}

fn bodies(room: &Value) -> Vec<String> {
    room["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

/// What the room list of Element X asks for (matrix-sdk-ui's `all_rooms` list).
fn room_list(range_end: u64, timeline_limit: u64) -> Value {
    json!({
        "conn_id": "room-list",
        "lists": { "all_rooms": {
            "ranges": [[0, range_end]],
            "timeline_limit": timeline_limit,
            "required_state": [
                ["m.room.encryption", ""], ["m.room.member", "$LAZY"], ["m.room.member", "$ME"],
                ["m.room.name", ""], ["m.room.avatar", ""], ["m.room.create", ""], ["m.room.power_levels", ""]
            ],
            "filters": { "not_room_types": ["m.space"] },
            "include_heroes": true
        }},
        "extensions": {
            "account_data": { "enabled": true }, "receipts": { "enabled": true, "rooms": ["*"] },
            "typing": { "enabled": true }
        }
    })
}

async fn join(s: &TestServer, u: &User, room: &str) {
    let (st, v) = s.post(&format!("/_matrix/client/v3/rooms/{}/join", enc(room)), Some(&u.token), json!({})).await;
    assert_eq!(st, 200, "{v}");
}

async fn named_room(s: &TestServer, u: &User, name: &str) -> String {
    create(s, u, json!({ "name": name })).await
}

#[tokio::test]
async fn advertised_in_versions() {
    let s = TestServer::start().await;
    let (_, v) = s.get("/_matrix/client/versions", None).await;
    assert_eq!(v["unstable_features"]["org.matrix.simplified_msc3575"], true, "{v}");
    s.stop().await;
}

#[tokio::test]
async fn room_list_ordering_incremental_and_range_growth() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let mut created = Vec::new();
    for i in 0..5 {
        let r = named_room(&s, &alice, &format!("salle {i}")).await;
        send_text(&s, &alice, &r, &format!("bonjour {i}")).await;
        created.push(r);
    }
    // A space is filtered out by `not_room_types`.
    create(&s, &alice, json!({ "name": "espace", "creation_content": { "type": "m.space" } })).await;

    let v = ss(&s, &alice, None, 0, room_list(2, 1)).await;
    assert_eq!(v["lists"]["all_rooms"]["count"], 5, "{v}");
    assert_eq!(v["lists"]["all_rooms"]["ops"][0]["op"], "SYNC");
    // Newest activity first.
    assert_eq!(window(&v, "all_rooms"), vec![created[4].clone(), created[3].clone(), created[2].clone()]);
    assert_eq!(rooms(&v).len(), 3, "only the window's rooms: {v}");
    let r4 = &v["rooms"][&created[4]];
    assert_eq!(r4["name"], "salle 4");
    assert_eq!(r4["initial"], true);
    assert_eq!(bodies(r4), vec!["bonjour 4"]);
    assert_eq!(r4["limited"], true, "more history than timeline_limit");
    assert_eq!(r4["joined_count"], 1);
    assert_eq!(r4["invited_count"], 0);
    assert_eq!(r4["notification_count"], 0);
    assert_eq!(r4["highlight_count"], 0);
    assert!(r4["bump_stamp"].as_i64().unwrap() > v["rooms"][&created[3]]["bump_stamp"].as_i64().unwrap());
    // required_state: the asked entries, $ME (alice's member event).
    let rs = r4["required_state"].as_array().unwrap();
    for t in ["m.room.name", "m.room.create", "m.room.power_levels", "m.room.member"] {
        assert!(rs.iter().any(|e| e["type"] == t), "{t} in {r4}");
    }
    assert!(!rs.iter().any(|e| e["type"] == "m.room.join_rules"), "not asked: {r4}");
    // prev_batch works with /messages.
    let pb = r4["prev_batch"].as_str().unwrap();
    let (st, m) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=5&from={}", enc(&created[4]), enc(pb)),
            Some(&alice.token),
        )
        .await;
    assert_eq!(st, 200, "{m}");
    assert!(!m["chunk"].as_array().unwrap().is_empty(), "older events before prev_batch: {m}");
    assert!(!m["chunk"].as_array().unwrap().iter().any(|e| e["content"]["body"] == "bonjour 4"));
    // Account data extension: the push rules are not stored yet, but the shape is there.
    assert!(v["extensions"]["account_data"].is_object(), "{v}");
    let p1 = pos(&v);

    // Nothing new: the same position, no rooms.
    let started = Instant::now();
    let v = ss(&s, &alice, Some(&p1), 300, room_list(2, 1)).await;
    assert!(started.elapsed() >= Duration::from_millis(290), "long-polled until the timeout");
    assert_eq!(pos(&v), p1);
    assert!(rooms(&v).is_empty(), "{v}");
    assert_eq!(v["lists"]["all_rooms"]["count"], 5);

    // A message in the oldest room moves it to the top; only that room is sent.
    send_text(&s, &alice, &created[0], "du nouveau").await;
    let v = ss(&s, &alice, Some(&p1), 0, room_list(2, 1)).await;
    assert_ne!(pos(&v), p1);
    assert_eq!(window(&v, "all_rooms"), vec![created[0].clone(), created[4].clone(), created[3].clone()]);
    assert_eq!(rooms(&v), vec![created[0].clone()], "{v}");
    let r0 = &v["rooms"][&created[0]];
    assert_eq!(r0["initial"], true, "new to the connection");
    assert_eq!(bodies(r0), vec!["du nouveau"]);
    let p2 = pos(&v);

    // Another message in a room already sent: incremental, not initial, num_live counts it.
    send_text(&s, &alice, &created[4], "encore").await;
    let v = ss(&s, &alice, Some(&p2), 0, room_list(2, 1)).await;
    assert_eq!(rooms(&v), vec![created[4].clone()]);
    let r = &v["rooms"][&created[4]];
    assert!(r.get("initial").is_none(), "{r}");
    assert_eq!(bodies(r), vec!["encore"]);
    assert_eq!(r["num_live"], 1);
    assert_eq!(r["limited"], false);
    assert!(r.get("required_state").is_none(), "no state changed: {r}");
    assert_eq!(window(&v, "all_rooms")[0], created[4]);
    let p3 = pos(&v);

    // Growing the range sends only the newly covered rooms.
    let v = ss(&s, &alice, Some(&p3), 0, room_list(4, 1)).await;
    assert_eq!(v["lists"]["all_rooms"]["ops"][0]["room_ids"].as_array().unwrap().len(), 5);
    // (rooms 0, 2, 3 and 4 were sent already: only room 1 is new)
    let expected = vec![created[1].clone()];
    assert_eq!(rooms(&v), expected, "{v}");
    let p4 = pos(&v);

    // A retried request (its response lost) is answered again from the same position.
    let again = ss(&s, &alice, Some(&p3), 0, room_list(4, 1)).await;
    assert_eq!(rooms(&again), expected);

    // The position survives a restart (stored in PostgreSQL), with nothing resent.
    let mut s = s;
    s.restart(Duration::from_millis(10)).await;
    let v = ss(&s, &alice, Some(&p4), 0, room_list(4, 1)).await;
    assert!(rooms(&v).is_empty(), "{v}");
    send_text(&s, &alice, &created[2], "après redémarrage").await;
    let v = ss(&s, &alice, Some(&p4), 0, room_list(4, 1)).await;
    assert_eq!(rooms(&v), vec![created[2].clone()]);
    assert_eq!(bodies(&v["rooms"][&created[2]]), vec!["après redémarrage"]);
    s.stop().await;
}

#[tokio::test]
async fn long_poll_wakes_on_each_stream() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    join(&s, &bob, &room).await;
    let e1 = send_text(&s, &bob, &room, "premier").await;
    let body = json!({
        "conn_id": "c",
        "lists": { "l": { "ranges": [[0, 10]], "timeline_limit": 1 } },
        "extensions": {
            "to_device": { "enabled": true }, "e2ee": { "enabled": true },
            "account_data": { "enabled": true }, "receipts": { "enabled": true }, "typing": { "enabled": true }
        }
    });
    let v = ss(&s, &alice, None, 0, body.clone()).await;
    let mut p = pos(&v);
    let mut td = v["extensions"]["to_device"]["next_batch"].as_str().unwrap().to_owned();

    // Each kind of change wakes a waiting request well before its timeout.
    for what in ["message", "typing", "receipt", "account data", "to-device", "device list"] {
        let mut b = body.clone();
        b["extensions"]["to_device"]["since"] = json!(td);
        let poll = {
            let (base, token, p) = (s.base.clone(), alice.token.clone(), p.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let r = reqwest::Client::new()
                    .post(format!("{base}{SS}?timeout=20000&pos={p}"))
                    .bearer_auth(token)
                    .json(&b)
                    .send()
                    .await
                    .unwrap();
                (started.elapsed(), r.json::<Value>().await.unwrap())
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        match what {
            "message" => {
                send_text(&s, &bob, &room, "réveil").await;
            }
            "typing" => {
                let (st, _) = s
                    .put(
                        &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&bob.user_id)),
                        Some(&bob.token),
                        json!({ "typing": true, "timeout": 30000 }),
                    )
                    .await;
                assert_eq!(st, 200);
            }
            "receipt" => {
                let (st, _) = s
                    .post(
                        &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&e1)),
                        Some(&bob.token),
                        json!({}),
                    )
                    .await;
                assert_eq!(st, 200);
            }
            "account data" => {
                let (st, _) = s
                    .put(
                        &format!("/_matrix/client/v3/user/{}/account_data/org.example.x", enc(&alice.user_id)),
                        Some(&alice.token),
                        json!({ "k": 1 }),
                    )
                    .await;
                assert_eq!(st, 200);
            }
            "to-device" => {
                let (st, _) = s
                    .put(
                        "/_matrix/client/v3/sendToDevice/org.example.ping/t1",
                        Some(&bob.token),
                        json!({ "messages": { &alice.user_id: { &alice.device_id: { "n": 1 } } } }),
                    )
                    .await;
                assert_eq!(st, 200);
            }
            _ => {
                // Bob logs in a new device: his device list changed.
                let (st, _) = s.login("bob", PASSWORD, json!({})).await;
                assert_eq!(st, 200);
            }
        }
        let (took, v) = poll.await.unwrap();
        assert!(took < Duration::from_secs(10), "{what}: woke after {took:?}: {v}");
        let ext = &v["extensions"];
        match what {
            "message" => assert_eq!(bodies(&v["rooms"][&room]), vec!["réveil"], "{v}"),
            "typing" => assert_eq!(ext["typing"]["rooms"][&room]["content"]["user_ids"], json!([bob.user_id]), "{v}"),
            "receipt" => {
                assert!(ext["receipts"]["rooms"][&room]["content"][&e1]["m.read"][&bob.user_id].is_object(), "{v}")
            }
            "account data" => {
                assert_eq!(ext["account_data"]["global"][0]["type"], "org.example.x", "{v}");
                assert_eq!(ext["account_data"]["global"].as_array().unwrap().len(), 1, "only the change: {v}");
            }
            "to-device" => {
                let evs = ext["to_device"]["events"].as_array().unwrap();
                assert_eq!(evs.len(), 1, "{v}");
                assert_eq!(evs[0]["type"], "org.example.ping");
                assert_eq!(evs[0]["sender"], bob.user_id);
            }
            _ => assert_eq!(ext["e2ee"]["device_lists"]["changed"], json!([bob.user_id]), "{v}"),
        }
        p = pos(&v);
        td = ext["to_device"]["next_batch"].as_str().unwrap().to_owned();
    }
    s.stop().await;
}

#[tokio::test]
async fn lazy_members_me_and_wildcards() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let carol = s.register("carol", false).await;
    let dave = s.register("dave", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat", "name": "lazy" })).await;
    for u in [&bob, &carol, &dave] {
        join(&s, u, &room).await;
    }
    send_text(&s, &bob, &room, "b1").await;
    send_text(&s, &carol, &room, "c1").await;
    let lazy = |tl: u64| {
        json!({ "lists": { "l": { "ranges": [[0, 0]], "timeline_limit": tl,
            "required_state": [["m.room.member", "$LAZY"], ["m.room.create", ""]] } } })
    };
    let members = |r: &Value| -> Vec<String> {
        let mut m: Vec<String> = r["required_state"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|e| e["type"] == "m.room.member")
                    .map(|e| e["state_key"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        m.sort();
        m
    };
    let v = ss(&s, &alice, None, 0, lazy(2)).await;
    let r = &v["rooms"][&room];
    assert_eq!(bodies(r), vec!["b1", "c1"]);
    assert_eq!(members(r), vec![bob.user_id.clone(), carol.user_id.clone()], "senders only: {r}");
    assert!(r["required_state"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.create"));
    assert_eq!(r["joined_count"], 4);
    assert_eq!(r["heroes"].as_array().unwrap().len(), 3, "{r}");
    let p = pos(&v);

    // A new sender's member event comes with their message; a known sender's does not.
    send_text(&s, &dave, &room, "d1").await;
    send_text(&s, &bob, &room, "b2").await;
    let v = ss(&s, &alice, Some(&p), 0, lazy(2)).await;
    let r = &v["rooms"][&room];
    assert_eq!(bodies(r), vec!["d1", "b2"]);
    assert_eq!(members(r), vec![dave.user_id.clone()], "{r}");
    assert!(r.get("initial").is_none());

    // $ME and wildcards.
    let v = ss(
        &s,
        &alice,
        None,
        0,
        json!({ "conn_id": "me", "lists": { "l": { "ranges": [[0, 0]], "timeline_limit": 0,
            "required_state": [["m.room.member", "$ME"]] } } }),
    )
    .await;
    let r = &v["rooms"][&room];
    assert_eq!(members(r), vec![alice.user_id.clone()]);
    assert!(r["timeline"].as_array().unwrap().is_empty());
    assert!(r["prev_batch"].is_string(), "a room with no timeline still gives a way back: {r}");
    let v = ss(
        &s,
        &alice,
        None,
        0,
        json!({ "conn_id": "all", "lists": { "l": { "ranges": [[0, 0]], "timeline_limit": 1,
            "required_state": [["*", "*"]] } } }),
    )
    .await;
    let r = &v["rooms"][&room];
    assert_eq!(members(r).len(), 4);
    assert!(r["required_state"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.join_rules"));
    let v = ss(
        &s,
        &alice,
        None,
        0,
        json!({ "conn_id": "members", "lists": { "l": { "ranges": [[0, 0]], "timeline_limit": 1,
            "required_state": [["m.room.member", "*"]] } } }),
    )
    .await;
    let r = &v["rooms"][&room];
    assert_eq!(members(r).len(), 4);
    assert!(r["required_state"].as_array().unwrap().iter().all(|e| e["type"] == "m.room.member"));
    s.stop().await;
}

#[tokio::test]
async fn subscriptions_raise_the_timeline_limit_and_required_state() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let room = named_room(&s, &alice, "abonnement").await;
    for i in 0..6 {
        send_text(&s, &alice, &room, &format!("m{i}")).await;
    }
    let list = json!({ "lists": { "l": { "ranges": [[0, 0]], "timeline_limit": 1 } } });
    let v = ss(&s, &alice, None, 0, list.clone()).await;
    assert_eq!(bodies(&v["rooms"][&room]), vec!["m5"]);
    let p = pos(&v);
    // Opening the room: a subscription with a larger timeline sends the older events.
    let mut sub = list.clone();
    sub["room_subscriptions"] = json!({ &room: { "timeline_limit": 4, "required_state": [["m.room.name", ""]] } });
    let v = ss(&s, &alice, Some(&p), 0, sub.clone()).await;
    let r = &v["rooms"][&room];
    assert_eq!(bodies(r), vec!["m2", "m3", "m4", "m5"], "{r}");
    assert_eq!(r["unstable_expanded_timeline"], true);
    assert_eq!(r["required_state"][0]["type"], "m.room.name", "new required_state sent: {r}");
    let p = pos(&v);
    // Nothing more to send with the same subscription.
    let v = ss(&s, &alice, Some(&p), 0, sub.clone()).await;
    assert!(rooms(&v).is_empty(), "{v}");
    assert_eq!(pos(&v), p);
    // A subscription to a room the user is not in is ignored.
    let bob = s.register("bob", false).await;
    let other = create(&s, &bob, json!({})).await;
    let mut sub2 = sub.clone();
    sub2["room_subscriptions"][&other] = json!({ "timeline_limit": 5 });
    let v = ss(&s, &alice, Some(&p), 0, sub2).await;
    assert!(v["rooms"].get(&other).is_none(), "{v}");
    s.stop().await;
}

#[tokio::test]
async fn invites_joins_and_leaves() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({ "name": "invitation", "is_direct": true, "invite": [bob.user_id] })).await;
    send_text(&s, &alice, &room, "viens").await;
    let body = json!({ "lists": {
        "invites": { "ranges": [[0, 9]], "timeline_limit": 1, "filters": { "is_invite": true } },
        "rooms": { "ranges": [[0, 9]], "timeline_limit": 1, "filters": { "is_invite": false },
                   "required_state": [["m.room.member", "$ME"]] },
        "dms": { "ranges": [[0, 9]], "timeline_limit": 0, "filters": { "is_dm": true } }
    }});
    let v = ss(&s, &bob, None, 0, body.clone()).await;
    assert_eq!(window(&v, "invites"), vec![room.clone()]);
    assert!(window(&v, "rooms").is_empty());
    assert_eq!(window(&v, "dms"), vec![room.clone()], "is_direct invite counts as a DM");
    let r = &v["rooms"][&room];
    let invite_state = r["invite_state"].as_array().unwrap();
    assert!(invite_state.iter().any(|e| e["type"] == "m.room.name"), "{r}");
    assert!(invite_state.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id));
    assert!(r.get("timeline").is_none(), "no history for an invite: {r}");
    let p = pos(&v);

    join(&s, &bob, &room).await;
    let v = ss(&s, &bob, Some(&p), 0, body.clone()).await;
    assert!(window(&v, "invites").is_empty());
    assert_eq!(window(&v, "rooms"), vec![room.clone()]);
    let r = &v["rooms"][&room];
    assert_eq!(r["initial"], true, "joined: the room is sent anew: {r}");
    assert_eq!(r["required_state"][0]["content"]["membership"], "join");
    assert_eq!(r["joined_count"], 2);
    let p = pos(&v);

    let (st, _) = s.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(&bob.token), json!({})).await;
    assert_eq!(st, 200);
    let v = ss(&s, &bob, Some(&p), 0, body.clone()).await;
    assert_eq!(window(&v, "rooms"), vec![room.clone()], "shown once more with the leave: {v}");
    let r = &v["rooms"][&room];
    let tl = r["timeline"].as_array().unwrap();
    assert_eq!(tl.last().unwrap()["content"]["membership"], "leave", "{r}");
    let p = pos(&v);
    alice_sends_after_leave(&s, &alice, &room).await;
    let v = ss(&s, &bob, Some(&p), 0, body).await;
    assert!(window(&v, "rooms").is_empty(), "gone from the lists: {v}");
    assert_eq!(v["lists"]["rooms"]["count"], 0);
    assert!(rooms(&v).is_empty(), "{v}");
    s.stop().await;
}

async fn alice_sends_after_leave(s: &TestServer, alice: &User, room: &str) {
    send_text(s, alice, room, "après ton départ").await;
}

#[tokio::test]
async fn filters_dm_spaces_encrypted() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let plain = named_room(&s, &alice, "simple").await;
    let enc_room = create(
        &s,
        &alice,
        json!({ "initial_state": [{ "type": "m.room.encryption", "state_key": "",
            "content": { "algorithm": "m.megolm.v1.aes-sha2" } }] }),
    )
    .await;
    let dm = named_room(&s, &alice, "dm").await;
    let (st, _) = s
        .put(
            &format!("/_matrix/client/v3/user/{}/account_data/m.direct", enc(&alice.user_id)),
            Some(&alice.token),
            json!({ "@bob:localhost": [dm] }),
        )
        .await;
    assert_eq!(st, 200);
    let space = create(&s, &alice, json!({ "creation_content": { "type": "m.space" } })).await;
    let (st, _) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/state/m.space.child/{}", enc(&space), enc(&plain)),
            Some(&alice.token),
            json!({ "via": ["localhost"] }),
        )
        .await;
    assert_eq!(st, 200);
    let list = |filters: Value| json!({ "ranges": [[0, 20]], "timeline_limit": 0, "filters": filters });
    let v = ss(
        &s,
        &alice,
        None,
        0,
        json!({ "lists": {
            "dms": list(json!({ "is_dm": true })),
            "not_dms": list(json!({ "is_dm": false, "not_room_types": ["m.space"] })),
            "spaces": list(json!({ "room_types": ["m.space"] })),
            "untyped": list(json!({ "room_types": [null] })),
            "in_space": list(json!({ "spaces": [space] })),
            "encrypted": list(json!({ "is_encrypted": true })),
        }}),
    )
    .await;
    let mut not_dms = window(&v, "not_dms");
    not_dms.sort();
    let mut expected = vec![plain.clone(), enc_room.clone()];
    expected.sort();
    assert_eq!(window(&v, "dms"), vec![dm.clone()]);
    assert_eq!(not_dms, expected);
    assert_eq!(window(&v, "spaces"), vec![space.clone()]);
    assert_eq!(v["lists"]["untyped"]["count"], 3);
    assert_eq!(window(&v, "in_space"), vec![plain.clone()]);
    assert_eq!(window(&v, "encrypted"), vec![enc_room.clone()]);
    s.stop().await;
}

fn otk(u: &User, k: &ed25519_dalek::SigningKey, n: u8) -> Value {
    use base64::Engine;
    let mut o = json!({ "key": base64::engine::general_purpose::STANDARD_NO_PAD.encode([n; 32]) });
    sign(&mut o, &u.user_id, &format!("ed25519:{}", u.device_id), k);
    o
}

#[tokio::test]
async fn to_device_and_e2ee_extensions() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let carol = s.register("carol", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    join(&s, &bob, &room).await;
    join(&s, &carol, &room).await;
    let k = key(3);
    let (st, v) = s
        .post(
            "/_matrix/client/v3/keys/upload",
            Some(&alice.token),
            json!({
                "device_keys": device_keys(&alice, &k),
                "one_time_keys": { "signed_curve25519:AAAAAQ": otk(&alice, &k, 1), "signed_curve25519:AAAAAg": otk(&alice, &k, 2) },
                "fallback_keys": { "signed_curve25519:AAAAAw": otk(&alice, &k, 3) },
            }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    // Element X's encryption connection: no lists, only these two extensions.
    let enc_body = |since: Option<&str>| {
        let mut b = json!({ "conn_id": "encryption", "extensions": {
            "to_device": { "enabled": true }, "e2ee": { "enabled": true } } });
        if let Some(t) = since {
            b["extensions"]["to_device"]["since"] = json!(t);
        }
        b
    };
    let v = ss(&s, &alice, None, 0, enc_body(None)).await;
    let e2ee = &v["extensions"]["e2ee"];
    assert_eq!(e2ee["device_one_time_keys_count"]["signed_curve25519"], 2, "{v}");
    assert_eq!(e2ee["device_unused_fallback_key_types"], json!(["signed_curve25519"]));
    let p = pos(&v);
    let t0 = v["extensions"]["to_device"]["next_batch"].as_str().unwrap().to_owned();

    for (n, txn) in [(1, "a"), (2, "b")] {
        let (st, _) = s
            .put(
                &format!("/_matrix/client/v3/sendToDevice/m.room_key_request/{txn}"),
                Some(&bob.token),
                json!({ "messages": { &alice.user_id: { &alice.device_id: { "n": n } } } }),
            )
            .await;
        assert_eq!(st, 200);
    }
    let v = ss(&s, &alice, Some(&p), 0, enc_body(Some(&t0))).await;
    let evs = v["extensions"]["to_device"]["events"].as_array().unwrap().clone();
    assert_eq!(evs.iter().map(|e| e["content"]["n"].as_i64().unwrap()).collect::<Vec<_>>(), vec![1, 2], "{v}");
    let t1 = v["extensions"]["to_device"]["next_batch"].as_str().unwrap().to_owned();
    let p = pos(&v);
    // Not acknowledged (the old `since`): delivered again.
    let v = ss(&s, &alice, Some(&p), 0, enc_body(Some(&t0))).await;
    assert_eq!(v["extensions"]["to_device"]["events"].as_array().unwrap().len(), 2, "redelivered: {v}");
    // Acknowledged: gone.
    let v = ss(&s, &alice, Some(&p), 0, enc_body(Some(&t1))).await;
    assert!(v["extensions"]["to_device"]["events"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(pos(&v), p, "nothing new: same position");

    // A claimed key lowers the count; a room-mate's new device and a departure show in device_lists.
    let (st, _) = s
        .post(
            "/_matrix/client/v3/keys/claim",
            Some(&bob.token),
            json!({ "one_time_keys": { &alice.user_id: { &alice.device_id: "signed_curve25519" } } }),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = s.login("bob", PASSWORD, json!({})).await;
    assert_eq!(st, 200);
    let (st, _) =
        s.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(&carol.token), json!({})).await;
    assert_eq!(st, 200);
    let v = ss(&s, &alice, Some(&p), 0, enc_body(Some(&t1))).await;
    let e2ee = &v["extensions"]["e2ee"];
    assert_eq!(e2ee["device_lists"]["changed"], json!([bob.user_id]), "{v}");
    assert_eq!(e2ee["device_lists"]["left"], json!([carol.user_id]), "{v}");
    assert_eq!(e2ee["device_one_time_keys_count"]["signed_curve25519"], 1);
    s.stop().await;
}

#[tokio::test]
async fn unread_counts_from_the_push_engine() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    join(&s, &bob, &room).await;
    let list = json!({ "lists": { "l": { "ranges": [[0, 0]], "timeline_limit": 1 } } });
    let v = ss(&s, &alice, None, 0, list.clone()).await;
    let p = pos(&v);
    send_text(&s, &bob, &room, "salut").await;
    let (st, sent) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/mention", enc(&room)),
            Some(&bob.token),
            json!({ "msgtype": "m.text", "body": "alice: tu es là ?", "m.mentions": { "user_ids": [alice.user_id] } }),
        )
        .await;
    assert_eq!(st, 200, "{sent}");
    let last = sent["event_id"].as_str().unwrap().to_owned();
    let v = ss(&s, &alice, Some(&p), 0, list.clone()).await;
    let r = &v["rooms"][&room];
    assert_eq!(r["notification_count"], 2, "{r}");
    assert_eq!(r["highlight_count"], 1, "the mention of her name highlights: {r}");
    let p = pos(&v);
    // Her read receipt clears them: the room is sent again with the new counts.
    let (st, _) = s
        .post(
            &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&last)),
            Some(&alice.token),
            json!({}),
        )
        .await;
    assert_eq!(st, 200);
    let v = ss(&s, &alice, Some(&p), 0, list).await;
    let r = &v["rooms"][&room];
    assert_eq!((r["notification_count"].as_i64(), r["highlight_count"].as_i64()), (Some(0), Some(0)), "{v}");
    s.stop().await;
}

#[tokio::test]
async fn unknown_pos_and_bad_bodies() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    named_room(&s, &alice, "x").await;
    let body = json!({ "conn_id": "main", "lists": { "l": { "ranges": [[0, 5]], "timeline_limit": 1 } } });
    let v = ss(&s, &alice, None, 0, body.clone()).await;
    let p = pos(&v);
    for bad in ["abc", "-1", "99999999999999999999999", "", "1.5", "999999999"] {
        assert_err(&ss_raw(&s, &alice, Some(bad), 0, body.clone()).await, 400, "M_UNKNOWN_POS");
    }
    // Another user's position, another device's, another connection's.
    assert_err(&ss_raw(&s, &bob, Some(&p), 0, body.clone()).await, 400, "M_UNKNOWN_POS");
    let (st, l) = s.login("alice", PASSWORD, json!({})).await;
    assert_eq!(st, 200);
    let alice2 = user_from(&l);
    assert_err(&ss_raw(&s, &alice2, Some(&p), 0, body.clone()).await, 400, "M_UNKNOWN_POS");
    let mut other_conn = body.clone();
    other_conn["conn_id"] = json!("other");
    assert_err(&ss_raw(&s, &alice, Some(&p), 0, other_conn).await, 400, "M_UNKNOWN_POS");
    // A new connection with the same conn_id forgets the old positions.
    let v2 = ss(&s, &alice, None, 0, body.clone()).await;
    assert_err(&ss_raw(&s, &alice, Some(&p), 0, body.clone()).await, 400, "M_UNKNOWN_POS");
    ss(&s, &alice, Some(&pos(&v2)), 0, body.clone()).await;
    // Expired: a connection unused for more than a week.
    sqlx_exec(&s, "UPDATE sliding_sync_connections SET last_used_ts = 0").await;
    s.state().sliding.clear();
    assert_err(&ss_raw(&s, &alice, Some(&pos(&v2)), 0, body.clone()).await, 400, "M_UNKNOWN_POS");

    // Wrong types and out-of-bounds values: 400 with a Matrix errcode, never 500.
    let cases: Vec<(Value, &str)> = vec![
        (json!({ "lists": "x" }), "M_BAD_JSON"),
        (json!({ "lists": { "l": { "ranges": "x" } } }), "M_BAD_JSON"),
        (json!({ "lists": { "l": { "ranges": [[0, -1]] } } }), "M_BAD_JSON"),
        (json!({ "lists": { "l": { "ranges": [[0.5, 1]] } } }), "M_BAD_JSON"),
        (json!({ "lists": { "l": { "ranges": [[5, 1]] } } }), "M_INVALID_PARAM"),
        (json!({ "lists": { "l": { "ranges": [[0, 1]], "timeline_limit": -1 } } }), "M_BAD_JSON"),
        (json!({ "lists": { "l": { "ranges": [[0, 1]], "timeline_limit": "5" } } }), "M_BAD_JSON"),
        (json!({ "lists": { "l": { "ranges": [[0, 1]], "timeline_limit": 5000 } } }), "M_INVALID_PARAM"),
        (json!({ "lists": { "l": { "required_state": [["a"]] } } }), "M_BAD_JSON"),
        (json!({ "lists": { "l": { "required_state": [[1, 2]] } } }), "M_BAD_JSON"),
        (json!({ "lists": { "l": { "filters": { "is_dm": "yes" } } } }), "M_BAD_JSON"),
        (json!({ "lists": { "l": { "filters": { "spaces": "!a:b" } } } }), "M_BAD_JSON"),
        (json!({ "room_subscriptions": { "not-a-room": { "timeline_limit": 1 } } }), "M_INVALID_PARAM"),
        (json!({ "room_subscriptions": [] }), "M_BAD_JSON"),
        (json!({ "conn_id": 5 }), "M_BAD_JSON"),
        (json!({ "extensions": { "to_device": { "enabled": true, "since": "abc" } } }), "M_INVALID_PARAM"),
        (json!({ "extensions": { "to_device": { "enabled": "yes" } } }), "M_BAD_JSON"),
        (json!({ "extensions": { "receipts": { "enabled": true, "lists": "x" } } }), "M_BAD_JSON"),
        (json!({ "lists": { "x".repeat(65): { "ranges": [[0, 1]] } } }), "M_INVALID_PARAM"),
        (json!({ "lists": { "l": { "ranges": vec![[0, 1]; 17] } } }), "M_INVALID_PARAM"),
        (json!({ "lists": { "l": { "required_state": vec![["a", "b"]; 257] } } }), "M_INVALID_PARAM"),
        (json!([1, 2]), "M_BAD_JSON"),
    ];
    for (b, code) in cases {
        let r = ss_raw(&s, &alice, None, 0, b.clone()).await;
        assert_err(&r, 400, code);
        let _ = b;
    }
    let many: serde_json::Map<String, Value> =
        (0..101).map(|i| (format!("l{i}"), json!({ "ranges": [[0, 1]] }))).collect();
    assert_err(&ss_raw(&s, &alice, None, 0, json!({ "lists": many })).await, 400, "M_INVALID_PARAM");
    let (st, v) = s.post(&format!("{SS}?timeout=abc"), Some(&alice.token), json!({})).await;
    assert_eq!((st.as_u16(), v["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{v}");
    // Huge ranges are fine (clipped to the list).
    let v = ss(
        &s,
        &alice,
        None,
        0,
        json!({ "lists": { "l": { "ranges": [[0, 9007199254740991u64]], "timeline_limit": 0 } } }),
    )
    .await;
    assert_eq!(v["lists"]["l"]["count"], 1);
    // No token: the usual 401.
    let (st, _) = s.post(SS, None, json!({})).await;
    assert_eq!(st, 401);
    s.stop().await;
}

async fn sqlx_exec(s: &TestServer, sql: &str) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).execute(&s.state().db).await.unwrap();
}
