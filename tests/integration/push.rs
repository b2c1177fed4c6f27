//! Push: rule evaluation at send time, unread counts, `GET /notifications`, and delivery to a real
//! push gateway (an HTTP server inside the test) over real HTTP.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use parvis::storage;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::common::*;

const APP_ID: &str = "fr.ville.messagerie";

/// A push gateway: records every request body, answers from a script (then 200 `{}`), and lists
/// the pushkeys of `reject` as rejected.
struct Gateway {
    /// `http://127.0.0.1:<port>/_matrix/push/v1/notify`
    url: String,
    port: u16,
    rx: mpsc::UnboundedReceiver<Value>,
}

impl Gateway {
    async fn start(script: Vec<(u16, Value)>) -> Self {
        Self::rejecting(script, &[]).await
    }

    async fn rejecting(script: Vec<(u16, Value)>, reject: &[&str]) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let script = Arc::new(parking_lot::Mutex::new(VecDeque::from(script)));
        let reject: Arc<Vec<String>> = Arc::new(reject.iter().map(|s| (*s).to_owned()).collect());
        let app = axum::Router::new().route(
            "/_matrix/push/v1/notify",
            post(move |axum::Json(body): axum::Json<Value>| {
                let (tx, script, reject) = (tx.clone(), script.clone(), reject.clone());
                async move {
                    let pushkey = body["notification"]["devices"][0]["pushkey"].as_str().unwrap_or("").to_owned();
                    let _ = tx.send(body);
                    let (status, mut answer) = script.lock().pop_front().unwrap_or((200, json!({})));
                    if reject.contains(&pushkey) {
                        answer = json!({ "rejected": [pushkey] });
                    }
                    (axum::http::StatusCode::from_u16(status).unwrap(), axum::Json(answer))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url: format!("http://127.0.0.1:{port}/_matrix/push/v1/notify"), port, rx }
    }

    /// The next request, or a panic after a few seconds.
    async fn next(&mut self) -> Value {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("the gateway received a notification in time")
            .unwrap()
    }

    /// Asserts that nothing arrives within `ms`.
    async fn nothing_for(&mut self, ms: u64) {
        if let Ok(Some(v)) = tokio::time::timeout(Duration::from_millis(ms), self.rx.recv()).await {
            panic!("unexpected notification: {v}");
        }
    }
}

/// A server whose gateways may live on 127.0.0.1, with fast retries.
async fn server() -> TestServer {
    TestServer::start_with(|c| {
        c.push.gateway_ip_whitelist = vec!["127.0.0.1/32".into()];
        c.push.gateway_retry_initial_ms = 50;
    })
    .await
}

async fn set_pusher(s: &TestServer, u: &User, pushkey: &str, data: Value) {
    let body = json!({
        "app_id": APP_ID, "pushkey": pushkey, "kind": "http", "app_display_name": "Messagerie",
        "device_display_name": "Téléphone", "lang": "fr", "data": data,
    });
    let (st, v) = s.post("/_matrix/client/v3/pushers/set", Some(&u.token), body).await;
    assert_eq!(st, 200, "{v}");
}

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

fn text(body: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body })
}

async fn receipt(s: &TestServer, u: &User, room: &str, event: &str, thread: Option<&str>) {
    let body = thread.map(|t| json!({ "thread_id": t })).unwrap_or_else(|| json!({}));
    let path = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(room), enc(event));
    let (st, v) = s.post(&path, Some(&u.token), body).await;
    assert_eq!(st, 200, "{v}");
}

/// A public room of `owner` named "Mairie" that `others` joined.
async fn room_with(s: &TestServer, owner: &User, others: &[&User]) -> String {
    let room = create(s, owner, json!({ "preset": "public_chat", "name": "Mairie" })).await;
    for u in others {
        join(s, u, &room).await;
    }
    room
}

async fn metric(s: &TestServer, outcome: &str) -> u64 {
    let text = s.http.get(format!("{}/metrics", s.metrics)).send().await.unwrap().text().await.unwrap();
    let prefix = format!("parvis_push_deliveries_total{{outcome=\"{outcome}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().parse().unwrap()).unwrap_or(0)
}

/// Waits until the `outcome` counter reaches `n`.
async fn wait_metric(s: &TestServer, outcome: &str, n: u64) {
    for _ in 0..200 {
        if metric(s, outcome).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("parvis_push_deliveries_total{{outcome={outcome:?}}} never reached {n}");
}

#[tokio::test]
async fn gateway_receives_message_notification() {
    let s = server().await;
    let mut gw = Gateway::start(vec![]).await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = room_with(&s, &alice, &[&bob]).await;
    set_pusher(&s, &bob, "bob-key", json!({ "url": gw.url, "brand": "ville" })).await;
    set_pusher(&s, &alice, "alice-key", json!({ "url": gw.url })).await;

    let event_id = send(&s, &alice, &room, "t1", text("Bonjour Bob")).await;
    let n = gw.next().await["notification"].clone();
    assert_eq!(n["event_id"], event_id);
    assert_eq!(n["room_id"], room);
    assert_eq!(n["type"], "m.room.message");
    assert_eq!(n["sender"], alice.user_id);
    assert_eq!(n["sender_display_name"], "alice");
    assert_eq!(n["room_name"], "Mairie");
    assert_eq!(n["prio"], "high");
    assert_eq!(n["content"], text("Bonjour Bob"));
    assert_eq!(n["counts"], json!({ "unread": 1 }));
    assert!(n.get("room_alias").is_none() && n.get("user_is_target").is_none(), "{n}");
    let devices = n["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "{n}");
    assert_eq!(devices[0]["app_id"], APP_ID);
    assert_eq!(devices[0]["pushkey"], "bob-key");
    assert!(devices[0]["pushkey_ts"].as_i64().unwrap() > 1_600_000_000, "seconds: {n}");
    // The pusher's data without its URL; a two-member room rings (.m.rule.room_one_to_one).
    assert_eq!(devices[0]["data"], json!({ "brand": "ville" }));
    assert_eq!(devices[0]["tweaks"], json!({ "sound": "default" }));
    // Nothing for alice: it was her own message.
    gw.nothing_for(300).await;

    // Bob answers: only alice's pusher hears of it, and bob's count grows no further.
    let answer = send(&s, &bob, &room, "t2", text("Bonjour Alice")).await;
    let n = gw.next().await["notification"].clone();
    assert_eq!((n["event_id"].as_str(), n["devices"][0]["pushkey"].as_str()), (Some(&*answer), Some("alice-key")));
    gw.nothing_for(300).await;
    // A second unread message: bob's badge says 2.
    send(&s, &alice, &room, "t3", text("Tu es là ?")).await;
    assert_eq!(gw.next().await["notification"]["counts"], json!({ "unread": 2 }));
    wait_metric(&s, "delivered", 3).await;
    s.stop().await;
}

#[tokio::test]
async fn event_id_only_format() {
    let s = server().await;
    let mut gw = Gateway::start(vec![]).await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let carol = s.register("carol", false).await;
    let room = room_with(&s, &alice, &[&bob, &carol]).await;
    set_pusher(&s, &bob, "bob-key", json!({ "url": gw.url, "format": "event_id_only" })).await;

    let event_id = send(&s, &alice, &room, "t1", text("Réunion à 14h")).await;
    let n = gw.next().await["notification"].clone();
    let mut keys: Vec<&str> = n.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["counts", "devices", "event_id", "prio", "room_id"], "{n}");
    assert_eq!(n["event_id"], event_id);
    assert_eq!(n["room_id"], room);
    assert_eq!(n["counts"], json!({ "unread": 1 }));
    assert_eq!(n["devices"][0]["data"], json!({ "format": "event_id_only" }));
    // Three members: .m.rule.message (notify, no sound).
    assert_eq!(n["devices"][0]["tweaks"], json!({}));
    s.stop().await;
}

#[tokio::test]
async fn gateway_retry_after_500() {
    let s = server().await;
    let mut gw = Gateway::start(vec![(500, json!({ "error": "busy" }))]).await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = room_with(&s, &alice, &[&bob]).await;
    set_pusher(&s, &bob, "bob-key", json!({ "url": gw.url })).await;

    let event_id = send(&s, &alice, &room, "t1", text("Bonjour")).await;
    assert_eq!(gw.next().await["notification"]["event_id"], event_id);
    assert_eq!(gw.next().await["notification"]["event_id"], event_id, "retried after the 500");
    wait_metric(&s, "delivered", 1).await;
    assert_eq!(metric(&s, "retried").await, 1);
    gw.nothing_for(300).await;
    s.stop().await;
}

#[tokio::test]
async fn gateway_final_4xx_is_not_retried() {
    let s = server().await;
    let mut gw = Gateway::start(vec![(400, json!({}))]).await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = room_with(&s, &alice, &[&bob]).await;
    set_pusher(&s, &bob, "bob-key", json!({ "url": gw.url })).await;
    send(&s, &alice, &room, "t1", text("Bonjour")).await;
    gw.next().await;
    wait_metric(&s, "failed", 1).await;
    gw.nothing_for(300).await;
    assert_eq!(metric(&s, "retried").await, 0);
    s.stop().await;
}

#[tokio::test]
async fn rejected_pushkey_removes_pusher() {
    let s = server().await;
    let mut gw = Gateway::rejecting(vec![], &["bob-key"]).await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = room_with(&s, &alice, &[&bob]).await;
    set_pusher(&s, &bob, "bob-key", json!({ "url": gw.url })).await;
    set_pusher(&s, &bob, "bob-other-key", json!({ "url": format!("{}?second", gw.url) })).await;
    let (_, list) = s.get("/_matrix/client/v3/pushers", Some(&bob.token)).await;
    assert_eq!(list["pushers"].as_array().unwrap().len(), 2);

    send(&s, &alice, &room, "t1", text("Bonjour")).await;
    gw.next().await;
    gw.next().await;
    wait_metric(&s, "rejected", 1).await;
    let (_, list) = s.get("/_matrix/client/v3/pushers", Some(&bob.token)).await;
    let keys: Vec<&str> = list["pushers"].as_array().unwrap().iter().map(|p| p["pushkey"].as_str().unwrap()).collect();
    assert_eq!(keys, ["bob-other-key"], "only the rejected pushkey's pusher is gone");
    s.stop().await;
}

#[tokio::test]
async fn blacklisted_gateway_is_not_contacted() {
    // The default configuration: loopback and private ranges are off limits.
    let s = TestServer::start().await;
    let mut gw = Gateway::start(vec![]).await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = room_with(&s, &alice, &[&bob]).await;
    set_pusher(&s, &bob, "literal", json!({ "url": gw.url })).await;
    // A host name that resolves to loopback is refused just the same.
    let by_name = format!("http://localhost:{}/_matrix/push/v1/notify", gw.port);
    set_pusher(&s, &bob, "by-name", json!({ "url": by_name })).await;

    send(&s, &alice, &room, "t1", text("Bonjour")).await;
    wait_metric(&s, "refused", 2).await;
    gw.nothing_for(500).await;
    assert_eq!(metric(&s, "delivered").await, 0);
    // The notification itself exists: only its delivery was refused.
    let (_, list) = s.get("/_matrix/client/v3/notifications", Some(&bob.token)).await;
    assert_eq!(list["notifications"].as_array().unwrap().len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn notifications_list_read_and_highlight() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let carol = s.register("carol", false).await;
    let (st, v) = s
        .put(
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob.user_id)),
            Some(&bob.token),
            json!({ "displayname": "Robert Bricoleur" }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let room = room_with(&s, &alice, &[&bob, &carol]).await;

    let plain = send(&s, &alice, &room, "t1", text("Bonjour à tous")).await;
    let mention = send(
        &s,
        &alice,
        &room,
        "t2",
        json!({ "msgtype": "m.text", "body": "Bob ?", "m.mentions": { "user_ids": [bob.user_id] } }),
    )
    .await;
    // The current server-default rules ignore display names; a rule of bob's own makes it count.
    let by_name_default = send(&s, &alice, &room, "t3", text("Robert Bricoleur, tu viens ?")).await;
    let (st, v) = s
        .put(
            "/_matrix/client/v3/pushrules/global/override/display-name",
            Some(&bob.token),
            json!({
                "conditions": [{ "kind": "contains_display_name" }],
                "actions": ["notify", { "set_tweak": "highlight" }]
            }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let by_name = send(&s, &alice, &room, "t4", text("Robert Bricoleur, tu viens ?")).await;
    // Carol's name is not bob's: this one is not a highlight for bob.
    let other_name = send(&s, &alice, &room, "t5", text("carol, tu viens ?")).await;

    let (st, list) = s.get("/_matrix/client/v3/notifications", Some(&bob.token)).await;
    assert_eq!(st, 200, "{list}");
    let items = list["notifications"].as_array().unwrap();
    let ids: Vec<&str> = items.iter().map(|n| n["event"]["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [&*other_name, &*by_name, &*by_name_default, &*mention, &*plain], "newest first");
    assert!(list.get("next_token").is_none(), "{list}");
    for n in items {
        assert_eq!(n["room_id"], room);
        assert_eq!(n["read"], false);
        assert!(n["ts"].as_i64().unwrap() > 0);
        assert_eq!(n["event"]["room_id"], room);
        assert_eq!(n["event"]["sender"], alice.user_id);
        assert!(n["actions"].as_array().unwrap().contains(&json!("notify")), "{n}");
    }
    assert_eq!(items[1]["actions"], json!(["notify", { "set_tweak": "highlight" }]));

    let (_, hl) = s.get("/_matrix/client/v3/notifications?only=highlight", Some(&bob.token)).await;
    let ids: Vec<&str> =
        hl["notifications"].as_array().unwrap().iter().map(|n| n["event"]["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [&*by_name, &*mention]);

    // Pagination.
    let (_, page) = s.get("/_matrix/client/v3/notifications?limit=2", Some(&bob.token)).await;
    assert_eq!(page["notifications"].as_array().unwrap().len(), 2);
    let token = page["next_token"].as_str().expect("next_token").to_owned();
    let (_, rest) = s.get(&format!("/_matrix/client/v3/notifications?limit=10&from={token}"), Some(&bob.token)).await;
    let ids: Vec<&str> =
        rest["notifications"].as_array().unwrap().iter().map(|n| n["event"]["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [&*by_name_default, &*mention, &*plain]);

    // A receipt reads its event and everything before it.
    receipt(&s, &bob, &room, &by_name_default, None).await;
    let (_, list) = s.get("/_matrix/client/v3/notifications", Some(&bob.token)).await;
    let read: Vec<bool> = list["notifications"].as_array().unwrap().iter().map(|n| n["read"] == true).collect();
    assert_eq!(read, [false, false, true, true, true]);

    // The sender has no notifications of their own messages.
    let (_, mine) = s.get("/_matrix/client/v3/notifications", Some(&alice.token)).await;
    assert_eq!(mine["notifications"], json!([]));

    // Bad parameters.
    for q in ["limit=abc", "limit=0", "limit=-3", "from=abc", "from=-1"] {
        assert_err(
            &s.get(&format!("/_matrix/client/v3/notifications?{q}"), Some(&bob.token)).await,
            400,
            "M_INVALID_PARAM",
        );
    }
    assert_err(&s.get("/_matrix/client/r0/notifications", None).await, 401, "M_MISSING_TOKEN");
    // Legacy prefix.
    assert_eq!(s.get("/_matrix/client/r0/notifications?limit=1", Some(&bob.token)).await.0, 200);

    // After leaving, later events of the room are not listed (nor notified).
    let (st, _) = s.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(&bob.token), json!({})).await;
    assert_eq!(st, 200);
    send(&s, &alice, &room, "t6", text("Bob est parti")).await;
    let (_, list) = s.get("/_matrix/client/v3/notifications", Some(&bob.token)).await;
    assert_eq!(list["notifications"].as_array().unwrap().len(), 5);
    s.stop().await;
}

#[tokio::test]
async fn unread_counts_follow_threads_and_receipts() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let carol = s.register("carol", false).await;
    let room = room_with(&s, &alice, &[&bob, &carol]).await;
    let quiet = create(&s, &bob, json!({ "preset": "private_chat" })).await;
    let db = &s.state().db;
    let nid = storage::rooms::by_id(db, &room).await.unwrap().unwrap().room_nid;
    let quiet_nid = storage::rooms::by_id(db, &quiet).await.unwrap().unwrap().room_nid;
    let counts = |threaded: bool| {
        let user = bob.user_id.clone();
        async move {
            if threaded {
                storage::push::unread_counts(db, &user, &[nid, quiet_nid]).await.unwrap()
            } else {
                storage::push::unread_counts_unthreaded(db, &user, &[nid, quiet_nid]).await.unwrap()
            }
        }
    };
    // Creating rooms and joining (member events) notifies nobody; every room is in the map.
    let c = counts(true).await;
    assert_eq!(c.len(), 2);
    assert_eq!(c[&nid], storage::push::RoomCounts::default());
    assert_eq!(c[&quiet_nid], storage::push::RoomCounts::default());

    let m1 = send(&s, &alice, &room, "m1", text("un")).await;
    let root = send(&s, &alice, &room, "root", text("fil")).await;
    let in_thread = |body: &str, mention: bool| {
        let mut c = json!({ "msgtype": "m.text", "body": body,
                            "m.relates_to": { "rel_type": "m.thread", "event_id": root } });
        if mention {
            c["m.mentions"] = json!({ "user_ids": [bob.user_id] });
        }
        c
    };
    let t1 = send(&s, &alice, &room, "t1", in_thread("réponse", false)).await;
    let t2 = send(&s, &alice, &room, "t2", in_thread("Bob ?", true)).await;

    let c = counts(true).await;
    assert_eq!((c[&nid].notification_count, c[&nid].highlight_count), (2, 0), "main timeline: m1 and the root");
    assert_eq!(c[&nid].threads, [(root.clone(), (2, 1))].into_iter().collect());
    assert_eq!(c[&nid].total(), (4, 1));
    let u = counts(false).await;
    assert_eq!((u[&nid].notification_count, u[&nid].highlight_count), (4, 1));
    assert!(u[&nid].threads.is_empty());

    // A main-timeline receipt reads the main timeline only.
    receipt(&s, &bob, &room, &root, Some("main")).await;
    let c = counts(true).await;
    assert_eq!((c[&nid].notification_count, c[&nid].threads[&root]), (0, (2, 1)));
    // A thread receipt reads that thread up to its event.
    receipt(&s, &bob, &room, &t1, Some(&root)).await;
    let c = counts(true).await;
    assert_eq!(c[&nid].threads[&root], (1, 1));
    assert_eq!(counts(false).await[&nid].notification_count, 1);

    let m3 = send(&s, &alice, &room, "m3", text("trois")).await;
    let c = counts(true).await;
    assert_eq!(c[&nid].notification_count, 1);
    assert_eq!(storage::push::unread_totals(db, std::slice::from_ref(&bob.user_id)).await.unwrap()[&bob.user_id], 2);

    // An unthreaded receipt reads everything up to its event, threads included.
    receipt(&s, &bob, &room, &t2, None).await;
    let c = counts(true).await;
    assert_eq!(c[&nid].notification_count, 1, "m3 came after t2");
    assert!(c[&nid].threads.is_empty(), "{:?}", c[&nid]);
    receipt(&s, &bob, &room, &m3, None).await;
    assert_eq!(counts(false).await[&nid], storage::push::RoomCounts::default());
    assert!(storage::push::unread_totals(db, std::slice::from_ref(&bob.user_id)).await.unwrap().is_empty());
    let _ = m1;

    // A private read receipt counts as much as a public one.
    let m4 = send(&s, &alice, &room, "m4", text("quatre")).await;
    assert_eq!(counts(false).await[&nid].notification_count, 1);
    let path = format!("/_matrix/client/v3/rooms/{}/receipt/m.read.private/{}", enc(&room), enc(&m4));
    assert_eq!(s.post(&path, Some(&bob.token), json!({})).await.0, 200);
    assert_eq!(counts(false).await[&nid].notification_count, 0);
    s.stop().await;
}

#[tokio::test]
async fn push_rule_changes_apply_to_the_next_event() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let carol = s.register("carol", false).await;
    let room = room_with(&s, &alice, &[&bob, &carol]).await;
    send(&s, &alice, &room, "t1", text("un")).await;
    // Bob mutes the room; his cached ruleset must not outlive the change.
    let (st, v) = s
        .put(
            &format!("/_matrix/client/v3/pushrules/global/room/{}", enc(&room)),
            Some(&bob.token),
            json!({ "actions": [] }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    send(&s, &alice, &room, "t2", text("deux")).await;
    let (_, list) = s.get("/_matrix/client/v3/notifications", Some(&bob.token)).await;
    assert_eq!(list["notifications"].as_array().unwrap().len(), 1);
    // Carol ignores alice: nothing from her notifies carol any more.
    let (st, _) = s
        .put(
            &format!("/_matrix/client/v3/user/{}/account_data/m.ignored_user_list", enc(&carol.user_id)),
            Some(&carol.token),
            json!({ "ignored_users": { alice.user_id.clone(): {} } }),
        )
        .await;
    assert_eq!(st, 200);
    send(&s, &alice, &room, "t3", text("trois")).await;
    let (_, list) = s.get("/_matrix/client/v3/notifications", Some(&carol.token)).await;
    assert_eq!(list["notifications"].as_array().unwrap().len(), 2, "t1 and t2 only");
    s.stop().await;
}

#[tokio::test]
async fn invite_notifies_the_invitee() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({ "preset": "private_chat", "invite": [bob.user_id] })).await;
    let (_, list) = s.get("/_matrix/client/v3/notifications", Some(&bob.token)).await;
    let items = list["notifications"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["event"]["type"], "m.room.member");
    assert_eq!(items[0]["event"]["state_key"], bob.user_id);
    assert_eq!(items[0]["room_id"], room);
    assert_eq!(StatusCode::OK, s.get("/_matrix/client/v3/notifications", Some(&alice.token)).await.0);
    s.stop().await;
}

/// Who an event notified, from the push actions table: `(user, highlight)`, sorted.
async fn notified(s: &TestServer, event_id: &str) -> Vec<(String, bool)> {
    sqlx::query_as(
        "SELECT a.user_id, a.highlight FROM event_push_actions a JOIN events e ON e.event_nid = a.event_nid
         WHERE e.event_id = $1 ORDER BY a.user_id",
    )
    .bind(event_id)
    .fetch_all(&s.state().db)
    .await
    .unwrap()
}

#[tokio::test]
async fn recipients_follow_membership_and_display_names() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let carol = s.register("carol", false).await;
    let room = room_with(&s, &alice, &[&bob]).await;
    let m1 = send(&s, &alice, &room, "m1", text("un")).await;
    assert_eq!(notified(&s, &m1).await, [(bob.user_id.clone(), false)]);

    join(&s, &carol, &room).await;
    let m2 = send(&s, &alice, &room, "m2", text("deux")).await;
    assert_eq!(notified(&s, &m2).await, [(bob.user_id.clone(), false), (carol.user_id.clone(), false)]);

    let (st, _) = s.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(&bob.token), json!({})).await;
    assert_eq!(st, 200);
    let m3 = send(&s, &alice, &room, "m3", text("trois")).await;
    assert_eq!(notified(&s, &m3).await, [(carol.user_id.clone(), false)]);

    // Carol highlights her display name, then takes a new one in this room only.
    let (st, v) = s
        .put(
            "/_matrix/client/v3/pushrules/global/override/display-name",
            Some(&carol.token),
            json!({ "conditions": [{ "kind": "contains_display_name" }], "actions": ["notify", { "set_tweak": "highlight" }] }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(&carol.user_id));
    let (st, v) =
        s.put(&path, Some(&carol.token), json!({ "membership": "join", "displayname": "Caroline Dupont" })).await;
    assert_eq!(st, 200, "{v}");
    let old_name = send(&s, &alice, &room, "m4", text("carol ?")).await;
    assert_eq!(notified(&s, &old_name).await, [(carol.user_id.clone(), false)]);
    let new_name = send(&s, &alice, &room, "m5", text("Caroline Dupont ?")).await;
    assert_eq!(notified(&s, &new_name).await, [(carol.user_id.clone(), true)]);
    s.stop().await;
}
