//! Rooms across two Parvis servers over TLS (issue 13): join by a remote alias, messages and
//! state both ways, typing and receipts, an invite to a user of the other server and its
//! rejection, leave, kick and ban (a banned user cannot rejoin), concurrent state changes that
//! resolve to the same state on both servers, a server that was down catching up, and hostile
//! transactions refused.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_err, enc};
use crate::fed_harness::{self, Ca, ClientApi};

/// A Parvis named `127.0.0.1:<port>` with its TLS federation listener on that port.
async fn server(dir: &Path, label: &str, ca: &Ca) -> (TestServer, String) {
    let fed = fed_harness::start(dir, label, ca, ca, |_| {}).await;
    (fed.server, fed.name.to_string())
}

/// Polls `check` until it returns `Some`, for at most 20 s.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The bodies of the last messages of a room as `user` sees them.
pub async fn bodies(s: &impl ClientApi, token: &str, room: &str) -> Vec<String> {
    let (st, v) = s.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(room)), Some(token)).await;
    if st != StatusCode::OK {
        return Vec::new();
    }
    v["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

pub async fn send_text(s: &impl ClientApi, token: &str, room: &str, body: &str) -> String {
    let (st, v) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{}", enc(room), rand_txn()),
            Some(token),
            json!({ "msgtype": "m.text", "body": body }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["event_id"].as_str().unwrap().to_owned()
}

fn rand_txn() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("t{}", N.fetch_add(1, Ordering::Relaxed))
}

pub async fn state_content(s: &impl ClientApi, token: &str, room: &str, kind: &str, key: &str) -> Option<Value> {
    let (st, v) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/state/{kind}/{}", enc(room), enc(key)), Some(token)).await;
    (st == StatusCode::OK).then_some(v)
}

pub async fn membership(s: &impl ClientApi, token: &str, room: &str, who: &str) -> Option<String> {
    state_content(s, token, room, "m.room.member", who).await.and_then(|v| v["membership"].as_str().map(str::to_owned))
}

pub async fn initial_sync(s: &impl ClientApi, token: &str) -> Value {
    let (st, v) = s.get("/_matrix/client/v3/sync?timeout=0", Some(token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v
}

#[tokio::test]
async fn two_parvis_servers_share_a_room() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "rooms");
    let (a, a_name) = server(dir.path(), "a", &ca).await;
    let (b, _b_name) = server(dir.path(), "b", &ca).await;
    let alice = a.register("alice", false).await;
    let bob = b.register("bob", false).await;
    let carol = b.register("carol", false).await;

    // --- A room on A with an alias; bob joins it from B by that alias.
    let (st, v) = a
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice.token),
            json!({ "preset": "public_chat", "room_alias_name": "town", "name": "Mairie" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    send_text(&a, &alice.token, &room, "before bob").await;
    let alias = format!("#town:{a_name}");
    let (st, v) = b.post(&format!("/_matrix/client/v3/join/{}", enc(&alias)), Some(&bob.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["room_id"], room.as_str());
    // B now has the room's state; A has bob's join.
    assert_eq!(state_content(&b, &bob.token, &room, "m.room.name", "").await.unwrap()["name"], "Mairie");
    assert_eq!(membership(&b, &bob.token, &room, &alice.user_id).await.as_deref(), Some("join"));
    eventually("bob's join on A", || async {
        (membership(&a, &alice.token, &room, &bob.user_id).await.as_deref() == Some("join")).then_some(())
    })
    .await;
    let sync = initial_sync(&b, &bob.token).await;
    assert!(sync["rooms"]["join"][&room].is_object(), "{sync}");

    // --- History from before bob's join: B backfills it from A when bob pages back.
    let (st, v) =
        b.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(&room)), Some(&bob.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let history = bodies(&b, &bob.token, &room).await;
    assert!(history.contains(&"before bob".to_owned()), "{history:?} {v}");
    let chunk = v["chunk"].as_array().unwrap();
    assert_eq!(chunk.last().unwrap()["type"], "m.room.create", "the whole history down to the room's creation: {v}");
    // Backfilled history is not new to /sync.
    let sync = initial_sync(&b, &bob.token).await;
    let timeline = sync["rooms"]["join"][&room]["timeline"]["events"].as_array().cloned().unwrap_or_default();
    assert!(!timeline.iter().any(|e| e["content"]["body"] == "before bob"), "{sync}");

    // --- A's public room directory, read from B.
    let (st, _) = a
        .put(
            &format!("/_matrix/client/v3/directory/list/room/{}", enc(&room)),
            Some(&alice.token),
            json!({ "visibility": "public" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = b.get(&format!("/_matrix/client/v3/publicRooms?server={}", enc(&a_name)), Some(&bob.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(
        v["chunk"].as_array().unwrap().iter().any(|r| r["room_id"] == room.as_str() && r["name"] == "Mairie"),
        "{v}"
    );
    let (st, v) = b
        .post(
            &format!("/_matrix/client/v3/publicRooms?server={}", enc(&a_name)),
            Some(&bob.token),
            json!({ "filter": { "generic_search_term": "nothing like it" } }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["chunk"].as_array().unwrap().len(), 0, "{v}");

    // --- Messages both ways.
    send_text(&b, &bob.token, &room, "hello from B").await;
    eventually("bob's message on A", || async {
        bodies(&a, &alice.token, &room).await.contains(&"hello from B".to_owned()).then_some(())
    })
    .await;
    send_text(&a, &alice.token, &room, "hello from A").await;
    eventually("alice's message on B", || async {
        bodies(&b, &bob.token, &room).await.contains(&"hello from A".to_owned()).then_some(())
    })
    .await;
    // A burst, in order.
    for i in 0..10 {
        send_text(&a, &alice.token, &room, &format!("burst {i}")).await;
    }
    let seen = eventually("the burst on B", || async {
        let b = bodies(&b, &bob.token, &room).await;
        b.contains(&"burst 9".to_owned()).then_some(b)
    })
    .await;
    let burst: Vec<&String> = seen.iter().filter(|b| b.starts_with("burst")).collect();
    assert_eq!(burst.len(), 10, "{seen:?}");
    assert_eq!(burst.first().map(|s| s.as_str()), Some("burst 9"), "newest first: {seen:?}");

    // --- State from B reaches A (bob may set the topic in a public room? No: only alice may).
    let (st, _) = b
        .put(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&room)),
            Some(&bob.token),
            json!({ "topic": "x" }),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "bob lacks the power to set the topic");
    let (st, _) = a
        .put(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&room)),
            Some(&alice.token),
            json!({ "topic": "Conseil" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    eventually("the topic on B", || async {
        (state_content(&b, &bob.token, &room, "m.room.topic", "").await?["topic"] == "Conseil").then_some(())
    })
    .await;

    // --- Typing and receipts.
    let (st, _) = b
        .put(
            &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&bob.user_id)),
            Some(&bob.token),
            json!({ "typing": true, "timeout": 20000 }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    eventually("bob typing on A", || async {
        let s = initial_sync(&a, &alice.token).await;
        let eph = s["rooms"]["join"][&room]["ephemeral"]["events"].as_array().cloned().unwrap_or_default();
        eph.iter()
            .any(|e| {
                e["type"] == "m.typing"
                    && e["content"]["user_ids"].as_array().is_some_and(|u| u.contains(&json!(bob.user_id)))
            })
            .then_some(())
    })
    .await;
    let last = send_text(&b, &bob.token, &room, "read me").await;
    eventually("bob's message on A", || async {
        bodies(&a, &alice.token, &room).await.contains(&"read me".to_owned()).then_some(())
    })
    .await;
    let (st, _) = a
        .post(
            &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&last)),
            Some(&alice.token),
            json!({}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    eventually("alice's receipt on B", || async {
        let s = initial_sync(&b, &bob.token).await;
        let eph = s["rooms"]["join"][&room]["ephemeral"]["events"].as_array().cloned().unwrap_or_default();
        eph.iter()
            .any(|e| e["type"] == "m.receipt" && e["content"][&last]["m.read"][&alice.user_id].is_object())
            .then_some(())
    })
    .await;

    // --- Invite a user of B; carol sees it, rejects it; is invited again and joins.
    let invite = |who: String| {
        let (a, alice, room) = (&a, &alice, &room);
        async move {
            a.post(
                &format!("/_matrix/client/v3/rooms/{}/invite", enc(room)),
                Some(&alice.token),
                json!({ "user_id": who }),
            )
            .await
        }
    };
    // A private room: carol's server is not in it.
    let (st, v) = a
        .post("/_matrix/client/v3/createRoom", Some(&alice.token), json!({ "preset": "private_chat", "name": "Privé" }))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let private = v["room_id"].as_str().unwrap().to_owned();
    let (st, v) = a
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&private)),
            Some(&alice.token),
            json!({ "user_id": carol.user_id }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let s = initial_sync(&b, &carol.token).await;
    let inv = &s["rooms"]["invite"][&private]["invite_state"]["events"];
    assert!(
        inv.as_array().is_some_and(|e| e.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Privé")),
        "{s}"
    );
    assert!(
        inv.as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.member" && e["state_key"] == carol.user_id.as_str()),
        "{s}"
    );
    // Rejected: A sees carol's leave.
    let (st, v) =
        b.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&private)), Some(&carol.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(membership(&a, &alice.token, &private, &carol.user_id).await.as_deref(), Some("leave"));
    let s = initial_sync(&b, &carol.token).await;
    assert!(s["rooms"]["invite"][&private].is_null(), "{s}");
    // Invited again, and joins (through the inviter's server).
    let (st, v) = a
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&private)),
            Some(&alice.token),
            json!({ "user_id": carol.user_id }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) =
        b.post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&private)), Some(&carol.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(membership(&a, &alice.token, &private, &carol.user_id).await.as_deref(), Some("join"));
    send_text(&b, &carol.token, &private, "merci").await;
    eventually("carol's message on A", || async {
        bodies(&a, &alice.token, &private).await.contains(&"merci".to_owned()).then_some(())
    })
    .await;
    let _ = invite;

    // --- Knocking on a room of A from B; A lets carol in.
    let (st, v) = a
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice.token),
            json!({ "preset": "private_chat", "name": "Guichet", "initial_state": [
                { "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }
            ] }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let knock_room = v["room_id"].as_str().unwrap().to_owned();
    let (st, v) = b
        .post(
            &format!("/_matrix/client/v3/knock/{}?via={}", enc(&knock_room), enc(&a_name)),
            Some(&carol.token),
            json!({ "reason": "rendez-vous" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(membership(&a, &alice.token, &knock_room, &carol.user_id).await.as_deref(), Some("knock"));
    let s = initial_sync(&b, &carol.token).await;
    let ks = &s["rooms"]["knock"][&knock_room]["knock_state"]["events"];
    assert!(
        ks.as_array()
            .is_some_and(|e| e.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Guichet")),
        "{s}"
    );
    let (st, v) = a
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&knock_room)),
            Some(&alice.token),
            json!({ "user_id": carol.user_id }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) =
        b.post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&knock_room)), Some(&carol.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(membership(&a, &alice.token, &knock_room, &carol.user_id).await.as_deref(), Some("join"));

    // --- To-device messages across servers, and device list changes.
    let (st, v) = b
        .put(
            "/_matrix/client/v3/sendToDevice/m.test.ping/td1",
            Some(&bob.token),
            json!({ "messages": { alice.user_id.clone(): { alice.device_id.clone(): { "n": 1 } } } }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    eventually("bob's to-device message on A", || async {
        let s = initial_sync(&a, &alice.token).await;
        s["to_device"]["events"]
            .as_array()
            .is_some_and(|e| {
                e.iter().any(|e| {
                    e["type"] == "m.test.ping" && e["sender"] == bob.user_id.as_str() && e["content"]["n"] == 1
                })
            })
            .then_some(())
    })
    .await;
    let since = initial_sync(&b, &bob.token).await["next_batch"].as_str().unwrap().to_owned();
    let (st, v) = a
        .post(
            "/_matrix/client/v3/keys/upload",
            Some(&alice.token),
            json!({ "device_keys": {
                "user_id": alice.user_id, "device_id": alice.device_id,
                "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
                "keys": { format!("curve25519:{}", alice.device_id): "c2lnbmVk", format!("ed25519:{}", alice.device_id): "c2lnbmVk" },
                "signatures": {}
            } }),
        )
        .await;
    assert!(st == StatusCode::OK || st == StatusCode::BAD_REQUEST, "{v}");
    let (st, v) = a
        .put(
            &format!("/_matrix/client/v3/devices/{}", enc(&alice.device_id)),
            Some(&alice.token),
            json!({ "display_name": "Mairie PC" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    eventually("alice's device list change on B", || async {
        let (_, s) =
            b.get(&format!("/_matrix/client/v3/sync?timeout=1000&since={}", enc(&since)), Some(&bob.token)).await;
        s["device_lists"]["changed"].as_array().is_some_and(|c| c.contains(&json!(alice.user_id))).then_some(())
    })
    .await;

    // --- A restricted room of A, open to members of `room`: bob (in it) joins, vouched for by
    // alice's server; carol (not in it) cannot.
    let (st, v) = a
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice.token),
            json!({ "preset": "private_chat", "room_version": "11", "initial_state": [
                { "type": "m.room.join_rules", "state_key": "", "content": {
                    "join_rule": "restricted", "allow": [{ "type": "m.room_membership", "room_id": room }] } }
            ] }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let restricted = v["room_id"].as_str().unwrap().to_owned();
    let (st, v) = b
        .post(
            &format!("/_matrix/client/v3/join/{}?via={}", enc(&restricted), enc(&a_name)),
            Some(&bob.token),
            json!({}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, member) = a
        .get(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&restricted), enc(&bob.user_id)),
            Some(&alice.token),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{member}");
    assert_eq!(member["join_authorised_via_users_server"], alice.user_id.as_str());
    let r = b
        .post(
            &format!("/_matrix/client/v3/join/{}?via={}", enc(&restricted), enc(&a_name)),
            Some(&carol.token),
            json!({}),
        )
        .await;
    // A server in the room (B, now) refuses carol itself: nobody there vouches for her.
    assert_err(&r, 403, "M_FORBIDDEN");
    // Asked directly, A (the resident) cannot vouch for her either.
    let r = b
        .state()
        .federation
        .request(
            reqwest::Method::GET,
            &ruma::ServerName::parse(&a_name).unwrap(),
            &format!("/_matrix/federation/v1/make_join/{}/{}?ver=11", enc(&restricted), enc(&carol.user_id)),
            None,
            true,
            1 << 16,
        )
        .await;
    match r {
        Err(parvis::federation::client::FedError::Status { status: 400, body }) => {
            assert_eq!(body["errcode"], "M_UNABLE_TO_AUTHORISE_JOIN", "{body}")
        }
        other => panic!("expected M_UNABLE_TO_AUTHORISE_JOIN, got {other:?}"),
    }

    // --- A remote profile, and timestamp_to_event over federation.
    let (st, v) = b.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)), Some(&bob.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v.is_object(), "{v}");
    let r = b.get(&format!("/_matrix/client/v3/profile/{}", enc(&format!("@nobody:{a_name}"))), Some(&bob.token)).await;
    assert_err(&r, 404, "M_NOT_FOUND");
    let answer = b
        .state()
        .federation
        .request(
            reqwest::Method::GET,
            &ruma::ServerName::parse(&a_name).unwrap(),
            &format!("/_matrix/federation/v1/timestamp_to_event/{}?ts=0&dir=f", enc(&room)),
            None,
            true,
            1 << 16,
        )
        .await
        .expect("timestamp_to_event answered");
    assert!(answer["event_id"].as_str().is_some_and(|e| e.starts_with('$')), "{answer}");

    // --- Kick and ban; a banned user cannot rejoin.
    let (st, _) = a
        .post(
            &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)),
            Some(&alice.token),
            json!({ "user_id": bob.user_id }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    eventually("bob's kick on B", || async {
        (membership(&b, &bob.token, &room, &bob.user_id).await.as_deref() == Some("leave")).then_some(())
    })
    .await;
    let (st, v) = b.post(&format!("/_matrix/client/v3/join/{}", enc(&alias)), Some(&bob.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "bob may rejoin a public room after a kick: {v}");
    let (st, _) = a
        .post(
            &format!("/_matrix/client/v3/rooms/{}/ban", enc(&room)),
            Some(&alice.token),
            json!({ "user_id": bob.user_id, "reason": "spam" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    eventually("bob's ban on B", || async {
        (membership(&b, &bob.token, &room, &bob.user_id).await.as_deref() == Some("ban")).then_some(())
    })
    .await;
    let r = b.post(&format!("/_matrix/client/v3/join/{}", enc(&alias)), Some(&bob.token), json!({})).await;
    assert_err(&r, 403, "M_FORBIDDEN");

    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn concurrent_state_changes_resolve_alike_and_a_server_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "rooms");
    let (a, a_host) = server(dir.path(), "a", &ca).await;
    let (mut b, _) = server(dir.path(), "b", &ca).await;
    let alice = a.register("alice", false).await;
    let bob = b.register("bob", false).await;
    let (st, v) = a
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice.token),
            json!({ "preset": "public_chat", "power_level_content_override": { "users": { bob.user_id.clone(): 100 } } }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    let (st, v) = b
        .post(&format!("/_matrix/client/v3/join/{}?via={}", enc(&room), enc(&a_host)), Some(&bob.token), json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");

    // --- Both servers change the topic at the same time: a fork, resolved alike on both.
    for round in 0..3 {
        let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&room));
        let (ra, rb) = tokio::join!(
            a.put(&path, Some(&alice.token), json!({ "topic": format!("A{round}") })),
            b.put(&path, Some(&bob.token), json!({ "topic": format!("B{round}") })),
        );
        assert_eq!(ra.0, StatusCode::OK, "{}", ra.1);
        assert_eq!(rb.0, StatusCode::OK, "{}", rb.1);
    }
    // Both servers converge on the same topic once each has the other's events.
    let topic = eventually("the same topic on both servers", || async {
        let ta = state_content(&a, &alice.token, &room, "m.room.topic", "").await?["topic"].clone();
        let tb = state_content(&b, &bob.token, &room, "m.room.topic", "").await?["topic"].clone();
        (ta == tb).then_some(ta)
    })
    .await;
    assert!(topic.as_str().is_some_and(|t| t.ends_with('2')), "the last round wins: {topic}");
    // A message after the fork joins it; both servers still agree, and keep talking.
    send_text(&a, &alice.token, &room, "after the fork").await;
    eventually("the message on B", || async {
        bodies(&b, &bob.token, &room).await.contains(&"after the fork".to_owned()).then_some(())
    })
    .await;

    // --- B goes down; A's messages wait in its outbox and arrive when B is back.
    b.restart_after(|| async {
        for i in 0..5 {
            send_text(&a, &alice.token, &room, &format!("while B was down {i}")).await;
        }
    })
    .await;
    // B talks to A again: A ends its back-off from B at once (without this A would retry on its
    // own schedule, 0.5 s doubling) and sends the backlog.
    send_text(&b, &bob.token, &room, "B is back").await;
    let seen = eventually("the backlog on B", || async {
        let got = bodies(&b, &bob.token, &room).await;
        got.contains(&"while B was down 4".to_owned()).then_some(got)
    })
    .await;
    for i in 0..5 {
        assert!(seen.contains(&format!("while B was down {i}")), "{seen:?}");
    }

    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn hostile_transactions_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "rooms");
    let (a, a_name) = server(dir.path(), "a", &ca).await;
    let alice = a.register("alice", false).await;
    let room = crate::common::create(&a, &alice, json!({ "preset": "public_chat", "name": "N" })).await;
    let http = fed_harness::https_client(&[&ca]);
    // Unsigned: 401.
    let r = http
        .put(format!("https://{a_name}/_matrix/federation/v1/send/x"))
        .json(&json!({ "pdus": [] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errcode"], "M_UNAUTHORIZED");
    // A signed request from a server with a real key (a second Parvis), carrying a forged event
    // (an m.room.name "from" alice, signed by the wrong server) and a PDU for a room the
    // sender is not in: both refused, the room unchanged.
    let (evil, evil_name) = server(dir.path(), "evil", &ca).await;
    let forged = json!({
        "type": "m.room.name", "state_key": "", "sender": alice.user_id, "room_id": room,
        "content": { "name": "pwned" }, "origin_server_ts": 1, "depth": 100,
        "prev_events": [], "auth_events": [], "hashes": { "sha256": "AAAA" },
        "signatures": { evil_name.clone(): { "ed25519:x": "AAAA" } },
    });
    let es = evil.state();
    let body = json!({ "origin": evil_name, "origin_server_ts": 1, "pdus": [forged] });
    let answer = es
        .federation
        .request(
            reqwest::Method::PUT,
            &ruma::ServerName::parse(&a_name).unwrap(),
            "/_matrix/federation/v1/send/1",
            Some(&body),
            true,
            1 << 20,
        )
        .await
        .expect("the transaction is answered");
    let results = answer["pdus"].as_object().unwrap();
    assert_eq!(results.len(), 1, "{answer}");
    assert!(results.values().all(|r| r["error"].is_string()), "{answer}");
    assert_eq!(state_content(&a, &alice.token, &room, "m.room.name", "").await.unwrap()["name"], "N");
    // Too many PDUs: refused whole.
    let many: Vec<Value> = (0..51).map(|_| json!({})).collect();
    let r = es
        .federation
        .request(
            reqwest::Method::PUT,
            &ruma::ServerName::parse(&a_name).unwrap(),
            "/_matrix/federation/v1/send/2",
            Some(&json!({ "pdus": many })),
            true,
            1 << 20,
        )
        .await;
    assert!(matches!(r, Err(parvis::federation::client::FedError::Status { status: 413, .. })), "{r:?}");
    // The server still serves.
    send_text(&a, &alice.token, &room, "still here").await;
    evil.stop().await;
    a.stop().await;
}
