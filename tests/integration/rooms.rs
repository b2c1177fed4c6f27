use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

async fn send_text(s: &TestServer, u: &User, room: &str, txn: &str, body: &str) -> (StatusCode, Value) {
    s.put(
        &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room)),
        Some(&u.token),
        json!({ "msgtype": "m.text", "body": body }),
    )
    .await
}

async fn all_messages(s: &TestServer, u: &User, room: &str, dir: &str, limit: u32) -> Vec<Value> {
    let mut out = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..1000 {
        let mut path = format!("/_matrix/client/v3/rooms/{}/messages?dir={dir}&limit={limit}", enc(room));
        if let Some(f) = &from {
            path.push_str(&format!("&from={}", enc(f)));
        }
        let (st, v) = s.get(&path, Some(&u.token)).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        out.extend(v["chunk"].as_array().unwrap().iter().cloned());
        match v["end"].as_str() {
            Some(e) => from = Some(e.to_owned()),
            None => return out,
        }
    }
    panic!("pagination did not end");
}

#[tokio::test]
async fn create_room_versions_and_state() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    // Default: v12, room ID derived from the create event.
    let room = create(&s, &alice, json!({ "name": "Mairie", "topic": "Services", "room_alias_name": "mairie" })).await;
    assert!(room.starts_with('!') && !room.contains(':'), "v12 room IDs have no server part: {room}");
    let (_, create_ev) = s
        .get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.create/?format=event", enc(&room)), Some(&alice.token))
        .await;
    assert_eq!(create_ev["content"]["room_version"], "12");
    assert_eq!(create_ev["event_id"].as_str().unwrap()[1..], room[1..], "v12: room ID is the create event's hash");
    let (_, name) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.name", enc(&room)), Some(&alice.token)).await;
    assert_eq!(name, json!({ "name": "Mairie" }));
    let (_, state) = s.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(&room)), Some(&alice.token)).await;
    let types: Vec<&str> = state.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    for t in [
        "m.room.create",
        "m.room.member",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.name",
        "m.room.topic",
        "m.room.canonical_alias",
    ] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    // v12 creators are not listed in power levels (they outrank everyone).
    let (_, pl) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room)), Some(&alice.token)).await;
    assert!(pl["users"].get(&alice.user_id).is_none(), "{pl}");
    // Alias resolves.
    let (st, a) = s.get(&format!("/_matrix/client/v3/directory/room/{}", enc("#mairie:localhost")), None).await;
    assert_eq!(st, 200);
    assert_eq!(a["room_id"], room.as_str());
    assert_err(
        &s.post("/_matrix/client/v3/createRoom", Some(&alice.token), json!({ "room_alias_name": "mairie" })).await,
        400,
        "M_ROOM_IN_USE",
    );

    // Older versions: room ID with server name, creator in power levels.
    for v in ["6", "9", "10", "11"] {
        let r = create(&s, &alice, json!({ "room_version": v, "preset": "public_chat" })).await;
        assert!(r.ends_with(":localhost"), "{r}");
        let (_, c) =
            s.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.create/", enc(&r)), Some(&alice.token)).await;
        assert_eq!(c["room_version"], v);
        let (_, pl) = s
            .get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&r)), Some(&alice.token))
            .await;
        assert_eq!(pl["users"][&alice.user_id], 100);
        assert_eq!(send_text(&s, &alice, &r, "t1", "hello").await.0, 200);
    }
    assert_err(
        &s.post("/_matrix/client/v3/createRoom", Some(&alice.token), json!({ "room_version": "1" })).await,
        400,
        "M_UNSUPPORTED_ROOM_VERSION",
    );
    assert_err(
        &s.post("/_matrix/client/v3/createRoom", Some(&alice.token), json!({ "preset": "nope" })).await,
        400,
        "M_INVALID_PARAM",
    );
    let (_, caps) = s.get("/_matrix/client/v3/capabilities", Some(&alice.token)).await;
    assert_eq!(caps["capabilities"]["m.room_versions"]["default"], "12");
    s.stop().await;
}

#[tokio::test]
async fn membership_and_permissions() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let eve = s.register("eve", false).await;
    let room = create(&s, &alice, json!({ "preset": "private_chat", "name": "Privé" })).await;
    let r = enc(&room);

    // Non-members can neither read nor send; cannot join an invite-only room.
    assert_err(&send_text(&s, &eve, &room, "x", "intrusion").await, 403, "M_FORBIDDEN");
    assert_err(
        &s.get(&format!("/_matrix/client/v3/rooms/{r}/messages?dir=b"), Some(&eve.token)).await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(&s.get(&format!("/_matrix/client/v3/rooms/{r}/state"), Some(&eve.token)).await, 403, "M_FORBIDDEN");
    assert_err(
        &s.post(&format!("/_matrix/client/v3/rooms/{r}/join"), Some(&eve.token), json!({})).await,
        403,
        "M_FORBIDDEN",
    );

    // Invite, join.
    assert_eq!(
        s.post(&format!("/_matrix/client/v3/rooms/{r}/invite"), Some(&alice.token), json!({ "user_id": bob.user_id }))
            .await
            .0,
        200
    );
    let (st, j) = s.post(&format!("/_matrix/client/v3/join/{r}"), Some(&bob.token), json!({})).await;
    assert_eq!(st, 200, "{j}");
    assert_eq!(j["room_id"], room.as_str());
    let (_, jr) = s.get("/_matrix/client/v3/joined_rooms", Some(&bob.token)).await;
    assert_eq!(jr["joined_rooms"], json!([room]));
    let (_, jm) = s.get(&format!("/_matrix/client/v3/rooms/{r}/joined_members"), Some(&bob.token)).await;
    assert_eq!(jm["joined"]["@bob:localhost"]["display_name"], "bob");

    // Bob (power 0) cannot change state or kick; he can send.
    assert_err(
        &s.put(
            &format!("/_matrix/client/v3/rooms/{r}/state/m.room.name/"),
            Some(&bob.token),
            json!({ "name": "Hijack" }),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.post(&format!("/_matrix/client/v3/rooms/{r}/kick"), Some(&bob.token), json!({ "user_id": alice.user_id }))
            .await,
        403,
        "M_FORBIDDEN",
    );
    assert_eq!(send_text(&s, &bob, &room, "b1", "bonjour").await.0, 200);
    // Alice changes state.
    let (st, v) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{r}/state/m.room.name/"),
            Some(&alice.token),
            json!({ "name": "Nouveau" }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert!(v["event_id"].as_str().unwrap().starts_with('$'));
    assert_err(
        &s.put(&format!("/_matrix/client/v3/rooms/{r}/state/m.room.name/"), Some(&alice.token), json!([1])).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.put(
            &format!("/_matrix/client/v3/rooms/{r}/state/m.room.canonical_alias/"),
            Some(&alice.token),
            json!({ "alias": "#nope:localhost" }),
        )
        .await,
        400,
        "M_BAD_ALIAS",
    );

    // Kick, then ban: banned users cannot rejoin even when invited.
    assert_eq!(
        s.post(
            &format!("/_matrix/client/v3/rooms/{r}/kick"),
            Some(&alice.token),
            json!({ "user_id": bob.user_id, "reason": "test" })
        )
        .await
        .0,
        200
    );
    assert_err(&send_text(&s, &bob, &room, "b2", "still here?").await, 403, "M_FORBIDDEN");
    assert_eq!(
        s.post(&format!("/_matrix/client/v3/rooms/{r}/ban"), Some(&alice.token), json!({ "user_id": bob.user_id }))
            .await
            .0,
        200
    );
    assert_err(
        &s.post(&format!("/_matrix/client/v3/rooms/{r}/invite"), Some(&alice.token), json!({ "user_id": bob.user_id }))
            .await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.post(&format!("/_matrix/client/v3/rooms/{r}/join"), Some(&bob.token), json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    let (_, banned) = s.get(&format!("/_matrix/client/v3/rooms/{r}/members?membership=ban"), Some(&alice.token)).await;
    assert_eq!(banned["chunk"].as_array().unwrap().len(), 1);
    // Bob can still read what he saw before he left, not after.
    let (st, old) = s.get(&format!("/_matrix/client/v3/rooms/{r}/state/m.room.name/"), Some(&bob.token)).await;
    assert_eq!(st, 200);
    assert_eq!(old["name"], "Nouveau");
    // Unban, invite again, join.
    assert_err(
        &s.post(&format!("/_matrix/client/v3/rooms/{r}/unban"), Some(&alice.token), json!({ "user_id": eve.user_id }))
            .await,
        403,
        "M_FORBIDDEN",
    );
    assert_eq!(
        s.post(&format!("/_matrix/client/v3/rooms/{r}/unban"), Some(&alice.token), json!({ "user_id": bob.user_id }))
            .await
            .0,
        200
    );
    assert_eq!(
        s.post(&format!("/_matrix/client/v3/rooms/{r}/invite"), Some(&alice.token), json!({ "user_id": bob.user_id }))
            .await
            .0,
        200
    );
    assert_eq!(s.post(&format!("/_matrix/client/v3/rooms/{r}/join"), Some(&bob.token), json!({})).await.0, 200);
    // Leave and forget.
    assert_err(
        &s.post(&format!("/_matrix/client/v3/rooms/{r}/forget"), Some(&bob.token), json!({})).await,
        400,
        "M_UNKNOWN",
    );
    assert_eq!(s.post(&format!("/_matrix/client/v3/rooms/{r}/leave"), Some(&bob.token), json!({})).await.0, 200);
    assert_eq!(s.post(&format!("/_matrix/client/v3/rooms/{r}/forget"), Some(&bob.token), json!({})).await.0, 200);
    let (_, jr) = s.get("/_matrix/client/v3/joined_rooms", Some(&bob.token)).await;
    assert_eq!(jr["joined_rooms"], json!([]));

    // Public rooms: anyone joins, by alias too.
    let public = create(&s, &alice, json!({ "preset": "public_chat", "room_alias_name": "accueil" })).await;
    let (st, j) =
        s.post(&format!("/_matrix/client/v3/join/{}", enc("#accueil:localhost")), Some(&eve.token), json!({})).await;
    assert_eq!(st, 200, "{j}");
    assert_eq!(j["room_id"], public.as_str());
    assert_err(
        &s.post(&format!("/_matrix/client/v3/join/{}", enc("#nowhere:localhost")), Some(&eve.token), json!({})).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.post("/_matrix/client/v3/rooms/!unknown:localhost/join", Some(&eve.token), json!({})).await,
        404,
        "M_NOT_FOUND",
    );
    s.stop().await;
}

#[tokio::test]
async fn send_idempotency_redaction_and_pagination() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    let r = enc(&room);
    s.post(&format!("/_matrix/client/v3/rooms/{r}/join"), Some(&bob.token), json!({})).await;

    // Same txn ID, same device: same event; another device: another event.
    let (_, a1) = send_text(&s, &alice, &room, "txn-1", "one").await;
    let (_, a2) = send_text(&s, &alice, &room, "txn-1", "one (retried)").await;
    assert_eq!(a1["event_id"], a2["event_id"]);
    let (_, other_device) = s.login("alice", PASSWORD, json!({})).await;
    let other = user_from(&other_device);
    let (_, a3) = send_text(&s, &other, &room, "txn-1", "one").await;
    assert_ne!(a1["event_id"], a3["event_id"]);

    // Concurrent retries of one transaction: one event, the same ID for every answer.
    let retries: Vec<_> = (0..6).map(|_| send_text(&s, &bob, &room, "same-txn", "once")).collect();
    let answers = futures_util::future::join_all(retries).await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(st, v)| {
            assert_eq!(*st, 200, "{v}");
            v["event_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    let once: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE json LIKE '%\"once\"%'")
        .fetch_one(&s.state().db)
        .await
        .unwrap();
    assert_eq!(once, 1);

    let mut sent = vec![a1["event_id"].as_str().unwrap().to_owned(), a3["event_id"].as_str().unwrap().to_owned()];
    sent.push(ids.into_iter().next().unwrap());
    for i in 0..24 {
        let who = if i % 2 == 0 { &alice } else { &bob };
        let (st, v) = send_text(&s, who, &room, &format!("m{i}"), &format!("message {i}")).await;
        assert_eq!(st, 200, "{v}");
        sent.push(v["event_id"].as_str().unwrap().to_owned());
    }

    // The sender's device sees its transaction ID; others do not.
    let (_, ev) = s.get(&format!("/_matrix/client/v3/rooms/{r}/event/{}", enc(&sent[0])), Some(&alice.token)).await;
    assert_eq!(ev["unsigned"]["transaction_id"], "txn-1");
    assert_eq!(ev["content"]["body"], "one");
    let (_, ev) = s.get(&format!("/_matrix/client/v3/rooms/{r}/event/{}", enc(&sent[0])), Some(&bob.token)).await;
    assert!(ev["unsigned"].get("transaction_id").is_none());
    assert_err(
        &s.get(&format!("/_matrix/client/v3/rooms/{r}/event/{}", enc("$nope")), Some(&bob.token)).await,
        404,
        "M_NOT_FOUND",
    );

    // Pagination: every event exactly once, in both directions, at several page sizes.
    for limit in [1, 7, 50] {
        let back = all_messages(&s, &alice, &room, "b", limit).await;
        let fwd = all_messages(&s, &alice, &room, "f", limit).await;
        let ids = |v: &[Value]| v.iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
        let (b, mut f) = (ids(&back), ids(&fwd));
        let mut uniq = b.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), b.len(), "duplicates going backwards (limit {limit})");
        f.reverse();
        assert_eq!(b, f, "both directions see the same events (limit {limit})");
        for id in &sent {
            assert!(b.contains(id), "{id} missing (limit {limit})");
        }
        assert_eq!(back.last().unwrap()["type"], "m.room.create");
    }
    // Filters.
    let filter =
        enc(&json!({ "types": ["m.room.message"], "senders": [bob.user_id], "lazy_load_members": true }).to_string());
    let (_, page) = s
        .get(&format!("/_matrix/client/v3/rooms/{r}/messages?dir=b&limit=100&filter={filter}"), Some(&alice.token))
        .await;
    let chunk = page["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 13, "bob's 12 messages and his deduplicated one");
    assert!(chunk.iter().all(|e| e["sender"] == bob.user_id.as_str()));
    assert_eq!(page["state"].as_array().unwrap().len(), 1, "lazy-loaded member of the only sender");
    assert_err(
        &s.get(&format!("/_matrix/client/v3/rooms/{r}/messages?dir=x"), Some(&alice.token)).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.get(&format!("/_matrix/client/v3/rooms/{r}/messages?dir=b&from=garbage"), Some(&alice.token)).await,
        400,
        "M_INVALID_PARAM",
    );

    // Redaction: own event yes, someone else's only with power.
    let target = sent[4].clone(); // bob's
    assert_err(
        &s.put(&format!("/_matrix/client/v3/rooms/{r}/redact/{}/x1", enc(&sent[3])), Some(&bob.token), json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    let (st, red) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{r}/redact/{}/x2", enc(&target)),
            Some(&bob.token),
            json!({ "reason": "typo" }),
        )
        .await;
    assert_eq!(st, 200, "{red}");
    let (_, ev) = s.get(&format!("/_matrix/client/v3/rooms/{r}/event/{}", enc(&target)), Some(&alice.token)).await;
    assert_eq!(ev["content"], json!({}), "redacted content is stripped: {ev}");
    assert_eq!(ev["unsigned"]["redacted_because"]["event_id"], red["event_id"]);
    let (st, _) = s
        .put(&format!("/_matrix/client/v3/rooms/{r}/redact/{}/x3", enc(&sent[3])), Some(&alice.token), json!({}))
        .await;
    assert_eq!(st, 200, "the room creator may redact anything");
    s.stop().await;
}

#[tokio::test]
async fn profile_changes_reach_rooms() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let room = create(&s, &alice, json!({})).await;
    assert_eq!(
        s.put(
            "/_matrix/client/v3/profile/@alice:localhost/displayname",
            Some(&alice.token),
            json!({ "displayname": "Alice Dupont" })
        )
        .await
        .0,
        200
    );
    let r = enc(&room);
    for _ in 0..100 {
        let (_, m) = s
            .get(
                &format!("/_matrix/client/v3/rooms/{r}/state/m.room.member/{}", enc(&alice.user_id)),
                Some(&alice.token),
            )
            .await;
        if m["displayname"] == "Alice Dupont" {
            assert_eq!(m["membership"], "join");
            s.stop().await;
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("member event was not updated");
}

#[tokio::test]
async fn concurrent_senders_keep_a_valid_dag() {
    let s = TestServer::start_with(|c| c.database.max_connections = 16).await;
    let mut users = Vec::new();
    for i in 0..10 {
        users.push(s.register(&format!("u{i}"), false).await);
    }
    let rooms: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(create(&s, &users[0], json!({ "preset": "public_chat" })).await);
        }
        v
    };
    for u in &users[1..] {
        for r in &rooms {
            assert_eq!(
                s.post(&format!("/_matrix/client/v3/rooms/{}/join", enc(r)), Some(&u.token), json!({})).await.0,
                200
            );
        }
    }
    // 10 users × 5 rooms × 8 messages, all at once; room 0 gets everybody's burst.
    let mut tasks = Vec::new();
    for (ui, u) in users.iter().enumerate() {
        for (ri, r) in rooms.iter().enumerate() {
            let (u, r, base, http) = (u.clone(), r.clone(), s.base.clone(), s.http.clone());
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for m in 0..8 {
                    let url = format!("{base}/_matrix/client/v3/rooms/{}/send/m.room.message/c{ui}-{ri}-{m}", enc(&r));
                    let resp = http
                        .put(url)
                        .bearer_auth(&u.token)
                        .json(&json!({ "msgtype": "m.text", "body": format!("{ui}/{m}") }))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(resp.status(), 200);
                    let v: Value = resp.json().await.unwrap();
                    ids.push((r.clone(), v["event_id"].as_str().unwrap().to_owned()));
                }
                ids
            }));
        }
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.extend(t.await.unwrap());
    }
    assert_eq!(sent.len(), 400);
    let pool = &s.state().db;
    for r in &rooms {
        let all = all_messages(&s, &users[0], r, "b", 100).await;
        let ids: Vec<&str> = all.iter().map(|e| e["event_id"].as_str().unwrap()).collect();
        let mut uniq = ids.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), ids.len(), "no duplicates");
        for (_, id) in sent.iter().filter(|(room, _)| room == r) {
            assert!(ids.contains(&id.as_str()), "lost event {id}");
        }
        // A single chain: one forward extremity, every event's depth is its parent's + 1.
        let room_nid: i64 =
            sqlx::query_scalar("SELECT room_nid FROM rooms WHERE room_id = $1").bind(r).fetch_one(pool).await.unwrap();
        let extremities: i64 =
            sqlx::query_scalar("SELECT cardinality(event_nids)::bigint FROM room_extremities WHERE room_nid = $1")
                .bind(room_nid)
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(extremities, 1);
        let broken: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events e JOIN event_edges ed ON ed.event_nid = e.event_nid
             JOIN events p ON p.event_id = ed.prev_event_id
             WHERE e.room_nid = $1 AND e.depth <> p.depth + 1",
        )
        .bind(room_nid)
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(broken, 0);
        let children: i64 = sqlx::query_scalar(
            "SELECT max(c) FROM (SELECT count(*) c FROM event_edges ed JOIN events e ON e.event_nid = ed.event_nid
             WHERE e.room_nid = $1 GROUP BY ed.prev_event_id) x",
        )
        .bind(room_nid)
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(children, 1, "no forks");
    }
    s.stop().await;
}
