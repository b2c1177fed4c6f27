//! Issue 18, Element Call side: delayed events (MSC4140) at the unstable paths matrix-js-sdk uses,
//! fired on time, restarted, cancelled, sent on demand, cancelled by another user's state, and
//! fired by the next process after a restart; `state_after` in `/sync` (MSC4222).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;
use crate::sync::{send_text, sync};

const DELAYED: &str = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events";

fn delay_send(room: &str, kind: &str, txn: &str, delay: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/send/{kind}/{txn}?org.matrix.msc4140.delay={delay}", enc(room))
}

fn delay_state(room: &str, kind: &str, key: &str, delay: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/state/{kind}/{}?org.matrix.msc4140.delay={delay}", enc(room), enc(key))
}

async fn schedule(s: &TestServer, u: &User, path: &str, content: Value) -> String {
    let (st, v) = s.put(path, Some(&u.token), content).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v.get("event_id").is_none(), "{v}");
    v["delay_id"].as_str().expect("delay_id").to_owned()
}

async fn state_content(s: &TestServer, u: &User, room: &str, kind: &str, key: &str) -> Option<Value> {
    let (st, v) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/state/{kind}/{}", enc(room), enc(key)), Some(&u.token)).await;
    (st == StatusCode::OK).then_some(v)
}

/// Waits until the state has `content` (or panics after `within`); returns how long it took.
async fn wait_state(
    s: &TestServer,
    u: &User,
    room: &str,
    kind: &str,
    key: &str,
    want: &Value,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        if state_content(s, u, room, kind, key).await.as_ref() == Some(want) {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{kind}/{key} never became {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn list(s: &TestServer, u: &User, query: &str) -> Value {
    let (st, v) = s.get(&format!("{DELAYED}{query}"), Some(&u.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v
}

async fn action(s: &TestServer, id: &str, a: &str) -> (StatusCode, Value) {
    // The MSC's current form: no access token, the delay ID is the credential.
    s.post(&format!("{DELAYED}/{}/{a}", enc(id)), None, json!({})).await
}

async fn setup(s: &TestServer) -> (User, User, String) {
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(s, &alice, json!({ "preset": "trusted_private_chat", "invite": [bob.user_id] })).await;
    let (st, v) = s.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&bob.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    (alice, bob, room)
}

#[tokio::test]
async fn delayed_events_fire_on_time_and_are_listed() {
    let s = TestServer::start().await;
    let (alice, bob, room) = setup(&s).await;
    let key = format!("_{}_DEVICE", alice.user_id);
    let leave = json!({});
    // Element Call: the delayed "leave" first, then the "join" to the same state key, which
    // must not cancel it (it is the same user's).
    let t0 = Instant::now();
    let id =
        schedule(&s, &alice, &delay_state(&room, "org.matrix.msc3401.call.member", &key, "1500"), leave.clone()).await;
    let joined = json!({ "application": "m.call", "call_id": "", "device_id": "DEVICE" });
    let (st, v) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/state/org.matrix.msc3401.call.member/{}", enc(&room), enc(&key)),
            Some(&alice.token),
            joined.clone(),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");

    let v = list(&s, &alice, "").await;
    assert_eq!(v["delayed_events"].as_array().unwrap().len(), 1, "{v}");
    let item = &v["scheduled"][0];
    assert_eq!(item["delay_id"], id.as_str());
    assert_eq!(item["room_id"], room.as_str());
    assert_eq!(item["type"], "org.matrix.msc3401.call.member");
    assert_eq!(item["state_key"], key.as_str());
    assert_eq!(item["delay"], 1500);
    assert_eq!(item["content"], leave);
    assert!(item["running_since"].as_i64().unwrap() > 0);
    assert_eq!(list(&s, &bob, "").await["scheduled"], json!([]), "another user's events are not listed");
    let (st, one) = s.get(&format!("{DELAYED}/{}", enc(&id)), Some(&alice.token)).await;
    assert_eq!((st, &one["delay_id"]), (StatusCode::OK, &json!(id)));
    assert_err(&s.get(&format!("{DELAYED}/{}", enc(&id)), Some(&bob.token)).await, 404, "M_NOT_FOUND");

    // Not before its time, then promptly.
    assert_eq!(state_content(&s, &bob, &room, "org.matrix.msc3401.call.member", &key).await, Some(joined));
    wait_state(&s, &bob, &room, "org.matrix.msc3401.call.member", &key, &leave, Duration::from_secs(10)).await;
    let elapsed = t0.elapsed();
    assert!(elapsed >= Duration::from_millis(1500), "sent early: {elapsed:?}");
    assert!(elapsed < Duration::from_millis(4000), "sent late: {elapsed:?}");

    // Finalised: listed with its outcome and event ID; retries of `send` succeed, `cancel` conflicts.
    let v = list(&s, &alice, "").await;
    assert_eq!(v["scheduled"], json!([]), "{v}");
    let fin = &v["finalised"][0];
    assert_eq!(fin["delayed_event"]["delay_id"], id.as_str(), "{v}");
    assert_eq!((&fin["outcome"], &fin["reason"]), (&json!("send"), &json!("delay")), "{v}");
    assert!(fin["event_id"].as_str().unwrap().starts_with('$'));
    let v = list(&s, &alice, "?status=finalised").await;
    assert_eq!(v["delayed_events"][0]["event_id"], fin["event_id"], "{v}");
    assert!(v.get("scheduled").is_none(), "{v}");
    assert_eq!(action(&s, &id, "send").await.0, StatusCode::OK);
    assert_err(&action(&s, &id, "cancel").await, 409, "M_UNKNOWN");
    assert_err(&action(&s, &id, "restart").await, 404, "M_NOT_FOUND");

    // A delayed message, idempotent per transaction.
    let p = delay_send(&room, "m.room.message", "txn1", "300");
    let body = json!({ "msgtype": "m.text", "body": "je reviens" });
    let id1 = schedule(&s, &alice, &p, body.clone()).await;
    assert_eq!(schedule(&s, &alice, &p, body.clone()).await, id1, "a retried PUT schedules nothing new");
    let start = Instant::now();
    loop {
        let (_, m) =
            s.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=5", enc(&room)), Some(&bob.token)).await;
        if m["chunk"].as_array().unwrap().iter().any(|e| e["content"]["body"] == "je reviens") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "delayed message never sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = list(&s, &alice, "?status=finalised").await;
    assert_eq!(v["finalised"].as_array().unwrap().len(), 2, "{v}");
    s.stop().await;
}

#[tokio::test]
async fn restart_postpones_cancel_prevents_send_sends_now() {
    let s = TestServer::start().await;
    let (alice, bob, room) = setup(&s).await;
    let kind = "com.example.status";
    let r = schedule(&s, &alice, &delay_state(&room, kind, "r", "1200"), json!({ "v": "restarted" })).await;
    let c = schedule(&s, &alice, &delay_state(&room, kind, "c", "600"), json!({ "v": "cancelled" })).await;
    let n = schedule(&s, &alice, &delay_state(&room, kind, "n", "60000"), json!({ "v": "now" })).await;
    // Cancelled (the older body form, without an access token): never sent; cancelling again is
    // fine, sending it conflicts.
    let (st, v) = s.post(&format!("{DELAYED}/{}", enc(&c)), None, json!({ "action": "cancel" })).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(action(&s, &c, "cancel").await.0, StatusCode::OK);
    assert_err(&action(&s, &c, "send").await, 409, "M_UNKNOWN");

    // Restarted every 600 ms (the MSC's path form, then the older body form): not sent meanwhile.
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let resp = if i % 2 == 0 {
            action(&s, &r, "restart").await
        } else {
            s.post(&format!("{DELAYED}/{}", enc(&r)), Some(&alice.token), json!({ "action": "restart" })).await
        };
        assert_eq!(resp.0, StatusCode::OK, "{}", resp.1);
        assert!(state_content(&s, &bob, &room, kind, "r").await.is_none(), "sent although restarted");
    }
    // Sent on demand, long before its time.
    assert_eq!(action(&s, &n, "send").await.0, StatusCode::OK);
    assert_eq!(state_content(&s, &bob, &room, kind, "n").await, Some(json!({ "v": "now" })));
    // The restarted one goes once the restarts stop.
    wait_state(&s, &bob, &room, kind, "r", &json!({ "v": "restarted" }), Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(state_content(&s, &bob, &room, kind, "c").await.is_none(), "a cancelled event was sent");
    let v = list(&s, &alice, "?status=finalised").await;
    let outcome = |id: &str| {
        v["finalised"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["delayed_event"]["delay_id"] == id)
            .map(|f| (f["outcome"].clone(), f["reason"].clone()))
    };
    assert_eq!(outcome(&c), Some((json!("cancel"), json!("action"))), "{v}");
    assert_eq!(outcome(&n), Some((json!("send"), json!("action"))), "{v}");
    assert_eq!(outcome(&r), Some((json!("send"), json!("delay"))), "{v}");

    // Unknown IDs and actions.
    assert_err(&action(&s, "pvd_nope", "restart").await, 404, "M_NOT_FOUND");
    assert_err(&action(&s, &r, "explode").await, 404, "M_UNRECOGNIZED");
    assert_err(
        &s.post(&format!("{DELAYED}/{}", enc(&r)), None, json!({ "action": "explode" })).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(&s.post(&format!("{DELAYED}/{}", enc(&r)), None, json!({})).await, 400, "M_MISSING_PARAM");
    s.stop().await;
}

#[tokio::test]
async fn bad_requests_and_limits() {
    let s = TestServer::start_with(|c| {
        c.delayed_events.max_delay_ms = 10_000;
        c.delayed_events.max_scheduled_per_user = 3;
    })
    .await;
    let (alice, _bob, room) = setup(&s).await;
    let carol = s.register("carol", false).await;
    let r = s.put(&delay_send(&room, "m.room.message", "a", "10001"), Some(&alice.token), json!({})).await;
    assert_err(&r, 400, "M_MAX_DELAY_EXCEEDED");
    assert_eq!(r.1["max_delay"], 10_000);
    for bad in ["0", "-5", "abc", "1.5", ""] {
        let r = s.put(&delay_send(&room, "m.room.message", "b", bad), Some(&alice.token), json!({})).await;
        assert_err(&r, 400, "M_INVALID_PARAM");
    }
    assert_err(
        &s.put(&delay_send(&room, "m.room.message", "c", "1000"), Some(&carol.token), json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.put(&delay_send("!nope:localhost", "m.room.message", "c", "1000"), Some(&alice.token), json!({})).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.put(&delay_send(&room, "m.room.message", "d", "1000"), Some(&alice.token), json!([1])).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.put(&delay_send(&room, "m.room.message", "d", "1000"), None, json!({})).await,
        401,
        "M_MISSING_TOKEN",
    );
    let big = json!({ "body": "x".repeat(70_000) });
    let r = s.put(&delay_send(&room, "m.room.message", "e", "1000"), Some(&alice.token), big).await;
    assert!(r.0 == StatusCode::PAYLOAD_TOO_LARGE, "{:?}", r);
    assert_err(&s.get(&format!("{DELAYED}?status=pending"), Some(&alice.token)).await, 400, "M_INVALID_PARAM");
    assert_err(&s.get(&format!("{DELAYED}?from=garbage"), Some(&alice.token)).await, 400, "M_INVALID_PARAM");
    assert_err(&s.get(DELAYED, None).await, 401, "M_MISSING_TOKEN");
    // At most 3 scheduled at once: the 4th is refused with when to retry.
    for i in 0..3 {
        schedule(&s, &alice, &delay_send(&room, "m.room.message", &format!("l{i}"), "9000"), json!({})).await;
    }
    let r = s.put(&delay_send(&room, "m.room.message", "l3", "9000"), Some(&alice.token), json!({})).await;
    assert_err(&r, 429, "M_LIMIT_EXCEEDED");
    assert!(r.1["retry_after_ms"].as_u64().unwrap() > 1000, "{}", r.1);
    s.stop().await;

    // Scheduling is rate limited per user.
    let s = TestServer::start_with(|c| {
        c.rate_limits.enabled = true;
        c.delayed_events.schedule_per_user = rate(0.01, 2);
    })
    .await;
    let (alice, _bob, room) = setup(&s).await;
    for i in 0..2 {
        schedule(&s, &alice, &delay_send(&room, "m.room.message", &format!("r{i}"), "9000"), json!({})).await;
    }
    assert_err(
        &s.put(&delay_send(&room, "m.room.message", "r2", "9000"), Some(&alice.token), json!({})).await,
        429,
        "M_LIMIT_EXCEEDED",
    );
    s.stop().await;
}

/// Another user's state for the same key cancels a scheduled state event (sending it later would
/// undo their change); the user's own does not.
#[tokio::test]
async fn state_overwritten_by_another_user_cancels() {
    let s = TestServer::start().await;
    let (alice, bob, room) = setup(&s).await;
    let kind = "com.example.shared";
    let id = schedule(&s, &alice, &delay_state(&room, kind, "k", "800"), json!({ "by": "alice-later" })).await;
    let (st, v) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/state/{kind}/k", enc(&room)),
            Some(&bob.token),
            json!({ "by": "bob" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let v = list(&s, &alice, "").await;
    assert_eq!(v["scheduled"], json!([]), "cancelled as soon as the overwrite is acknowledged: {v}");
    assert_eq!(v["finalised"][0]["delayed_event"]["delay_id"], id.as_str());
    assert_eq!(v["finalised"][0]["outcome"], "cancel");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(state_content(&s, &alice, &room, kind, "k").await, Some(json!({ "by": "bob" })));
    s.stop().await;
}

/// A delayed "leave" that fell due while no server ran is sent by the next one at start-up.
#[tokio::test]
async fn delayed_event_fires_after_a_restart() {
    let mut s = TestServer::start().await;
    let (alice, bob, room) = setup(&s).await;
    let key = format!("_{}_D", alice.user_id);
    let kind = "org.matrix.msc3401.call.member";
    schedule(&s, &alice, &delay_state(&room, kind, &key, "1000"), json!({})).await;
    let later = schedule(&s, &alice, &delay_state(&room, kind, "later", "60000"), json!({})).await;
    s.restart(Duration::from_millis(1500)).await;
    let took = wait_state(&s, &bob, &room, kind, &key, &json!({}), Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(3), "sent {took:?} after the restart");
    // One not yet due is still scheduled, and still manageable.
    let v = list(&s, &alice, "?status=scheduled").await;
    assert_eq!(v["delayed_events"][0]["delay_id"], later.as_str(), "{v}");
    assert_eq!(action(&s, &later, "cancel").await.0, StatusCode::OK);
    s.stop().await;
}

/// MSC4222: with `use_state_after`, joined rooms carry `state_after`, the state at the end of the
/// timeline, instead of `state`.
#[tokio::test]
async fn sync_state_after() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let room = create(&s, &alice, json!({ "name": "A" })).await;
    let name_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room));
    assert_eq!(s.put(&name_path, Some(&alice.token), json!({ "name": "B" })).await.0, StatusCode::OK);
    let one = json!({ "room": { "timeline": { "limit": 1 } } });
    let name_in = |v: &Value, section: &str| -> Option<String> {
        v["rooms"]["join"][&room][section]["events"]
            .as_array()?
            .iter()
            .find(|e| e["type"] == "m.room.name")
            .map(|e| e["content"]["name"].as_str().unwrap().to_owned())
    };
    let path = |flag: &str, since: Option<&str>| {
        let mut p = format!("/_matrix/client/v3/sync?filter={}&{flag}=true", enc(&one.to_string()));
        if let Some(t) = since {
            p.push_str(&format!("&since={}", enc(t)));
        }
        p
    };
    // Initial sync: the timeline is the rename; `state` is the state before it, `state_after` after.
    let plain = sync(&s, &alice, None, Some(&one), 0).await;
    assert_eq!(name_in(&plain, "state").as_deref(), Some("A"));
    for flag in ["use_state_after", "org.matrix.msc4222.use_state_after"] {
        let (st, v) = s.get(&path(flag, None), Some(&alice.token)).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert!(v["rooms"]["join"][&room].get("state").is_none(), "{v}");
        assert_eq!(name_in(&v, "state_after").as_deref(), Some("B"), "{flag}: {v}");
        assert!(
            v["rooms"]["join"][&room]["state_after"]["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["type"] == "m.room.create")
        );
    }
    let since = plain["next_batch"].as_str().unwrap().to_owned();
    // Incremental, gappy: a rename then more messages than the timeline holds.
    assert_eq!(s.put(&name_path, Some(&alice.token), json!({ "name": "C" })).await.0, StatusCode::OK);
    send_text(&s, &alice, &room, "un").await;
    send_text(&s, &alice, &room, "deux").await;
    let (_, v) = s.get(&path("use_state_after", Some(&since)), Some(&alice.token)).await;
    assert_eq!(v["rooms"]["join"][&room]["timeline"]["limited"], true, "{v}");
    assert_eq!(name_in(&v, "state_after").as_deref(), Some("C"), "{v}");
    let since = v["next_batch"].as_str().unwrap().to_owned();
    // Incremental, not gappy: the rename is in the timeline and in `state_after` too (unlike `state`).
    assert_eq!(s.put(&name_path, Some(&alice.token), json!({ "name": "D" })).await.0, StatusCode::OK);
    let (_, v) = s.get(&path("use_state_after", Some(&since)), Some(&alice.token)).await;
    assert_eq!(v["rooms"]["join"][&room]["timeline"]["limited"], false, "{v}");
    assert_eq!(name_in(&v, "state_after").as_deref(), Some("D"), "{v}");
    let plain = sync(&s, &alice, Some(&since), Some(&one), 0).await;
    assert_eq!(name_in(&plain, "state"), None, "{plain}");
    assert_err(&s.get("/_matrix/client/v3/sync?use_state_after=yes", Some(&alice.token)).await, 400, "M_INVALID_PARAM");
    s.stop().await;
}
