//! Message retention (MSC1763): expired messages hidden from every read path, then purged with
//! the media only they referenced, while state, the latest event, receipts, notifications and
//! sync keep working. Time is controlled by running a purge pass "as of" a chosen timestamp
//! (`rooms::retention::purge_pass`) rather than by waiting; only the read-time filter is tested
//! with a real (3 s) expiry.

use std::collections::HashSet;
use std::time::Duration;

use image::ImageFormat;
use parvis::config::Config;
use parvis::rooms::retention::{PassReport, purge_pass};
use parvis::storage::now_ms;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;
use crate::media::{picture, upload};
use crate::sync::sync;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

async fn start(adjust: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(|c| {
        c.retention.enabled = true;
        // The periodic job stays out of the way: the tests run passes themselves.
        c.retention.purge_interval_secs = 86_400;
        adjust(c);
    })
    .await
}

async fn send(s: &TestServer, u: &User, room: &str, kind: &str, content: Value) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let txn = format!("r{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let (st, v) =
        s.put(&format!("/_matrix/client/v3/rooms/{}/send/{kind}/{txn}", enc(room)), Some(&u.token), content).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["event_id"].as_str().unwrap().to_owned()
}

async fn text(s: &TestServer, u: &User, room: &str, body: &str) -> String {
    send(s, u, room, "m.room.message", json!({ "msgtype": "m.text", "body": body })).await
}

async fn put_state(s: &TestServer, u: &User, room: &str, kind: &str, content: Value) -> String {
    let (st, v) =
        s.put(&format!("/_matrix/client/v3/rooms/{}/state/{kind}/", enc(room)), Some(&u.token), content).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["event_id"].as_str().unwrap().to_owned()
}

async fn join(s: &TestServer, u: &User, room: &str) {
    let (st, v) = s.post(&format!("/_matrix/client/v3/join/{}", enc(room)), Some(&u.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
}

async fn upload_image(s: &TestServer, u: &User, seed: u32) -> String {
    let (st, v) = upload(s, Some(&u.token), "image/png", None, picture(8 + seed, 8, ImageFormat::Png)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["content_uri"].as_str().unwrap().to_owned()
}

async fn download(s: &TestServer, u: &User, mxc: &str) -> StatusCode {
    let path = mxc.strip_prefix("mxc://").unwrap();
    s.get(&format!("/_matrix/client/v1/media/download/{path}"), Some(&u.token)).await.0
}

/// The event IDs `/messages` returns, newest first (up to 100).
async fn messages(s: &TestServer, u: &User, room: &str) -> Vec<String> {
    let (st, v) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(room)), Some(&u.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    ids(&v["chunk"])
}

fn ids(events: &Value) -> Vec<String> {
    events.as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect()
}

async fn event_status(s: &TestServer, u: &User, room: &str, id: &str) -> StatusCode {
    s.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room), enc(id)), Some(&u.token)).await.0
}

/// A fresh initial sync of one room: its timeline's event IDs, and the types of the events of
/// its state and timeline.
async fn initial_sync(s: &TestServer, u: &User, room: &str) -> (Vec<String>, HashSet<String>) {
    let filter = json!({ "room": { "timeline": { "limit": 100 } } });
    let v = sync(s, u, None, Some(&filter), 0).await;
    let r = &v["rooms"]["join"][room];
    let types = r["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .chain(r["timeline"]["events"].as_array().unwrap())
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    (ids(&r["timeline"]["events"]), types)
}

/// The event IDs of a user's notifications (`GET /notifications`).
async fn notified(s: &TestServer, u: &User) -> Vec<String> {
    let (st, v) = s.get("/_matrix/client/v3/notifications", Some(&u.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["notifications"].as_array().unwrap().iter().map(|n| n["event"]["event_id"].as_str().unwrap().to_owned()).collect()
}

async fn pass(s: &TestServer, as_of: i64) -> PassReport {
    purge_pass(s.state(), as_of).await.expect("purge pass").expect("not locked by another instance")
}

/// A timestamp strictly between the events sent before and after it.
async fn boundary() -> i64 {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t = now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    t
}

async fn event_rows(s: &TestServer, ids: &[&String]) -> i64 {
    let ids: Vec<String> = ids.iter().map(|s| (*s).clone()).collect();
    sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE event_id = ANY($1)")
        .bind(&ids)
        .fetch_one(&s.state().db)
        .await
        .unwrap()
}

#[tokio::test]
async fn expired_messages_and_their_media_are_purged_safely() {
    let s = start(|c| c.retention.default_policy.max_lifetime_secs = Some(3600)).await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({ "name": "Conseil municipal", "preset": "public_chat" })).await;
    join(&s, &bob, &room).await;
    let other = create(&s, &alice, json!({ "name": "Archives" })).await;

    // Old: messages, an image with its thumbnail, another image, a reaction, a topic change.
    let image_a = upload_image(&s, &alice, 1).await;
    let thumb_a = upload_image(&s, &alice, 2).await;
    let image_b = upload_image(&s, &alice, 3).await;
    let image_c = upload_image(&s, &alice, 4).await;
    let m1 = text(&s, &alice, &room, "ordre du jour").await;
    let m2 = send(
        &s,
        &alice,
        &room,
        "m.room.message",
        json!({ "msgtype": "m.image", "body": "plan.png", "url": image_a, "info": { "thumbnail_url": thumb_a } }),
    )
    .await;
    let m3 =
        send(&s, &alice, &room, "m.room.message", json!({ "msgtype": "m.image", "body": "b.png", "url": image_b }))
            .await;
    let m4 =
        send(&s, &alice, &room, "m.room.message", json!({ "msgtype": "m.image", "body": "c.png", "url": image_c }))
            .await;
    let reaction = send(
        &s,
        &bob,
        &room,
        "m.reaction",
        json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": m1, "key": "👍" } }),
    )
    .await;
    let topic = put_state(&s, &alice, &room, "m.room.topic", json!({ "topic": "Séance du lundi" })).await;
    // Bob reads up to an event that will be purged; his client cached the room meanwhile.
    let (st, v) = s
        .post(
            &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&m2)),
            Some(&bob.token),
            json!({}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let before = sync(&s, &bob, None, None, 0).await;
    let since = before["next_batch"].as_str().unwrap().to_owned();
    assert!(notified(&s, &bob).await.contains(&m1));

    let t = boundary().await;

    // Recent: a message, image C again elsewhere (forwarded to another room), a reply relating
    // to an old message.
    let fresh = text(&s, &alice, &room, "compte rendu").await;
    let forwarded =
        send(&s, &alice, &other, "m.room.message", json!({ "msgtype": "m.image", "body": "c.png", "url": image_c }))
            .await;
    let late_reaction = send(
        &s,
        &bob,
        &room,
        "m.reaction",
        json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": m1, "key": "✅" } }),
    )
    .await;
    let last = text(&s, &bob, &room, "merci").await;

    // Nothing has expired yet.
    assert_eq!(pass(&s, now_ms()).await, PassReport::default());
    assert_eq!(messages(&s, &alice, &room).await.iter().filter(|e| **e == m1).count(), 1);

    // One hour after the boundary: the old messages expire.
    let report = pass(&s, t + HOUR).await;
    assert_eq!(report.events, 5, "{report:?}"); // m1, m2, m3, m4 and the old reaction
    assert_eq!(report.media, 3, "{report:?}"); // image A, its thumbnail, image B (not C)
    assert_eq!(report.rooms, 1);

    let expired = [&m1, &m2, &m3, &m4, &reaction];
    assert_eq!(event_rows(&s, &expired).await, 0);
    let chunk = messages(&s, &alice, &room).await;
    for id in expired {
        assert!(!chunk.contains(id), "{id} still in /messages");
        assert_eq!(event_status(&s, &alice, &room, id).await, StatusCode::NOT_FOUND);
        let (st, _) =
            s.get(&format!("/_matrix/client/v3/rooms/{}/context/{}", enc(&room), enc(id)), Some(&alice.token)).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
    }
    // What is recent, and every state event, old ones included, stays.
    for id in [&fresh, &late_reaction, &last, &topic] {
        assert!(chunk.contains(id), "{id} missing from /messages");
        assert_eq!(event_status(&s, &alice, &room, id).await, StatusCode::OK);
    }
    let (st, v) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/context/{}", enc(&room), enc(&fresh)), Some(&bob.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let around: Vec<String> = ids(&v["events_before"]).into_iter().chain(ids(&v["events_after"])).collect();
    assert!(expired.iter().all(|e| !around.contains(e)), "{v}");
    for (kind, key) in [("m.room.name", ""), ("m.room.topic", ""), ("m.room.power_levels", ""), ("m.room.create", "")] {
        let (st, v) =
            s.get(&format!("/_matrix/client/v3/rooms/{}/state/{kind}/{key}", enc(&room)), Some(&bob.token)).await;
        assert_eq!(st, StatusCode::OK, "{kind}: {v}");
    }
    let (st, v) = s.get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)), Some(&bob.token)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["joined"].as_object().unwrap().len(), 2, "{v}");
    // An orphaned relation is served as it is; the purged target's relations are 404.
    let (st, _) =
        s.get(&format!("/_matrix/client/v1/rooms/{}/relations/{}", enc(&room), enc(&m1)), Some(&alice.token)).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // A fresh initial sync (the room was cached before the purge) shows none of it.
    let (timeline, types) = initial_sync(&s, &bob, &room).await;
    assert!(expired.iter().all(|e| !timeline.contains(e)), "{timeline:?}");
    assert!(timeline.contains(&last) && timeline.contains(&fresh), "{timeline:?}");
    for kind in ["m.room.create", "m.room.name", "m.room.topic", "m.room.member", "m.room.power_levels"] {
        assert!(types.contains(kind), "{kind} missing: {types:?}");
    }

    // Media: only what nothing else references is gone.
    assert_eq!(download(&s, &alice, &image_a).await, StatusCode::NOT_FOUND);
    assert_eq!(download(&s, &alice, &thumb_a).await, StatusCode::NOT_FOUND);
    assert_eq!(download(&s, &alice, &image_b).await, StatusCode::NOT_FOUND);
    assert_eq!(download(&s, &alice, &image_c).await, StatusCode::OK);
    let (st, _) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&other), enc(&forwarded)), Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK);

    // Notifications of purged events are gone; receipts pointing at them do not break sync.
    let notified = notified(&s, &bob).await;
    assert!(expired.iter().all(|e| !notified.contains(e)), "{notified:?}");
    assert!(notified.contains(&fresh), "{notified:?}");
    let pushes: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM event_push_actions e LEFT JOIN events v USING (event_nid) WHERE v.event_nid IS NULL",
    )
    .fetch_one(&s.state().db)
    .await
    .unwrap();
    assert_eq!(pushes, 0);

    // The room goes on: a new message reaches an incremental sync from before the purge.
    let after = text(&s, &alice, &room, "nouvelle séance").await;
    let inc = sync(&s, &bob, Some(&since), None, 0).await;
    let tl = ids(&inc["rooms"]["join"][&room]["timeline"]["events"]);
    assert!(tl.contains(&after), "{inc}");
    assert!(expired.iter().all(|e| !tl.contains(e)), "{tl:?}");
    let next = inc["next_batch"].as_str().unwrap().to_owned();
    let again = text(&s, &bob, &room, "bien reçu").await;
    let inc = sync(&s, &alice, Some(&next), None, 0).await;
    assert!(ids(&inc["rooms"]["join"][&room]["timeline"]["events"]).contains(&again), "{inc}");

    // A second pass at the same time has nothing left to do.
    assert_eq!(pass(&s, t + HOUR).await, PassReport::default());
    s.stop().await;
}

#[tokio::test]
async fn the_latest_event_survives_and_the_room_stays_usable() {
    let s = start(|c| c.retention.default_policy.max_lifetime_secs = Some(3600)).await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    join(&s, &bob, &room).await;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(text(&s, &alice, &room, &format!("message {i}")).await);
    }
    let last = sent.pop().unwrap();
    // Everything has expired, a day later.
    let report = pass(&s, now_ms() + DAY).await;
    assert_eq!(report.events, 4, "{report:?}");
    assert_eq!(event_rows(&s, &sent.iter().collect::<Vec<_>>()).await, 0);
    assert_eq!(event_rows(&s, &[&last]).await, 1);
    // The forward extremity is kept; everyone can still write, read and sync.
    assert_eq!(event_status(&s, &bob, &room, &last).await, StatusCode::OK);
    let before = sync(&s, &bob, None, None, 0).await;
    let next_msg = text(&s, &bob, &room, "toujours là").await;
    let inc = sync(&s, &bob, Some(before["next_batch"].as_str().unwrap()), None, 0).await;
    assert!(ids(&inc["rooms"]["join"][&room]["timeline"]["events"]).contains(&next_msg), "{inc}");
    let chunk = messages(&s, &alice, &room).await;
    assert_eq!(&chunk[..2], [next_msg.clone(), last.clone()]);
    // Pagination from the sync's prev_batch into the purged range works.
    let prev = before["rooms"]["join"][&room]["timeline"]["prev_batch"].as_str().unwrap().to_owned();
    let (st, v) = s
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&from={}", enc(&room), enc(&prev)), Some(&bob.token))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // Now only the new message is the extremity: the old last one goes on the next pass.
    let report = pass(&s, now_ms() + DAY).await;
    assert_eq!(report.events, 1, "{report:?}");
    assert_eq!(event_status(&s, &bob, &room, &last).await, StatusCode::NOT_FOUND);
    assert_eq!(event_status(&s, &bob, &room, &next_msg).await, StatusCode::OK);
    s.stop().await;
}

#[tokio::test]
async fn nothing_is_purged_when_disabled_or_without_policy() {
    // Disabled: even a room asking for 1 ms keeps and shows everything.
    let s = TestServer::start_with(|c| c.retention.default_policy.max_lifetime_secs = Some(1)).await;
    let alice = s.register("alice", false).await;
    let room = create(&s, &alice, json!({})).await;
    put_state(&s, &alice, &room, "m.room.retention", json!({ "max_lifetime": 1 })).await;
    let m = text(&s, &alice, &room, "gardé").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(purge_pass(s.state(), now_ms() + 365 * DAY).await.unwrap(), Some(PassReport::default()));
    assert!(messages(&s, &alice, &room).await.contains(&m));
    assert!(initial_sync(&s, &alice, &room).await.0.contains(&m));
    assert_eq!(event_status(&s, &alice, &room, &m).await, StatusCode::OK);
    s.stop().await;

    // Enabled without a default policy: only rooms with a policy of their own expire.
    let s = start(|_| {}).await;
    let alice = s.register("alice", false).await;
    let plain = create(&s, &alice, json!({})).await;
    let limited = create(&s, &alice, json!({})).await;
    put_state(&s, &alice, &limited, "m.room.retention", json!({ "max_lifetime": DAY })).await;
    let keep = [text(&s, &alice, &plain, "1").await, text(&s, &alice, &plain, "2").await];
    let gone = text(&s, &alice, &limited, "3").await;
    text(&s, &alice, &limited, "4").await;
    let report = pass(&s, now_ms() + 10 * 365 * DAY).await;
    assert_eq!(report, PassReport { rooms: 1, events: 1, media: 0 });
    assert_eq!(event_rows(&s, &keep.iter().collect::<Vec<_>>()).await, 2);
    assert_eq!(event_rows(&s, &[&gone]).await, 0);
    s.stop().await;
}

#[tokio::test]
async fn room_policies_are_clamped_and_invalid_ones_ignored() {
    let s = start(|c| {
        c.retention.default_policy.max_lifetime_secs = Some(10 * 86_400);
        c.retention.allowed_lifetime_min_secs = Some(3600);
        c.retention.allowed_lifetime_max_secs = Some(30 * 86_400);
    })
    .await;
    let alice = s.register("alice", false).await;
    let short = create(&s, &alice, json!({})).await; // asks for 1 s: raised to 1 hour
    let long = create(&s, &alice, json!({})).await; // asks for 100 days: lowered to 30
    let forever = create(&s, &alice, json!({})).await; // asks for forever: lowered to 30 days
    let invalid = create(&s, &alice, json!({})).await; // invalid content: the default, 10 days
    let default = create(&s, &alice, json!({})).await; // no policy: the default
    put_state(&s, &alice, &short, "m.room.retention", json!({ "max_lifetime": 1000 })).await;
    put_state(&s, &alice, &long, "m.room.retention", json!({ "max_lifetime": 100 * DAY })).await;
    put_state(&s, &alice, &forever, "m.room.retention", json!({ "max_lifetime": null })).await;
    put_state(&s, &alice, &invalid, "m.room.retention", json!({ "max_lifetime": "1000" })).await;
    let mut probe = std::collections::HashMap::new();
    for r in [&short, &long, &forever, &invalid, &default] {
        let first = text(&s, &alice, r, "expirera").await;
        text(&s, &alice, r, "dernier").await; // the room's latest event, always kept
        probe.insert(r.clone(), first);
    }
    let t = boundary().await;
    let alive = |s: &TestServer, r: &String| {
        let id = probe[r].clone();
        let s_db = s.state().db.clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM events WHERE event_id = $1)")
                .bind(id)
                .fetch_one(&s_db)
                .await
                .unwrap()
        }
    };
    // The 1 s room is not read as 1 s either: its messages are still served after 1.5 s.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(messages(&s, &alice, &short).await.contains(&probe[&short]));

    // Half an hour: nothing (the short room's lifetime was raised to an hour).
    assert_eq!(pass(&s, t + HOUR / 2).await.events, 0);
    // Two hours: the short room only.
    assert_eq!(pass(&s, t + 2 * HOUR).await.events, 1);
    assert!(!alive(&s, &short).await && alive(&s, &long).await && alive(&s, &invalid).await);
    // Eleven days: the invalid-policy room and the room without a policy (default 10 days).
    assert_eq!(pass(&s, t + 11 * DAY).await.events, 2);
    assert!(!alive(&s, &invalid).await && !alive(&s, &default).await);
    assert!(alive(&s, &long).await && alive(&s, &forever).await);
    // Thirty-one days: 100 days and "forever" were both lowered to 30.
    assert_eq!(pass(&s, t + 31 * DAY).await.events, 2);
    assert!(!alive(&s, &long).await && !alive(&s, &forever).await);
    s.stop().await;
}

/// Expired messages are hidden before any purge: `/messages`, `/event`, `/context`, `/sync`
/// (from the cache, and with no cache at all).
async fn hidden_before_purge(cache_mb: u64) {
    let s = start(|c| c.sync.room_cache_mb = cache_mb).await;
    let alice = s.register("alice", false).await;
    let room = create(&s, &alice, json!({ "name": "Éphémère" })).await;
    put_state(&s, &alice, &room, "m.room.retention", json!({ "max_lifetime": 3000 })).await;
    let old = text(&s, &alice, &room, "bientôt expiré").await;
    // Cached before it expires.
    assert!(initial_sync(&s, &alice, &room).await.0.contains(&old));
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let new = text(&s, &alice, &room, "récent").await;

    let chunk = messages(&s, &alice, &room).await;
    assert!(!chunk.contains(&old) && chunk.contains(&new), "{chunk:?}");
    assert_eq!(event_status(&s, &alice, &room, &old).await, StatusCode::NOT_FOUND);
    let (st, _) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/context/{}", enc(&room), enc(&old)), Some(&alice.token)).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, v) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/context/{}", enc(&room), enc(&new)), Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(!ids(&v["events_before"]).contains(&old), "{v}");
    let (timeline, types) = initial_sync(&s, &alice, &room).await;
    assert!(!timeline.contains(&old) && timeline.contains(&new), "{timeline:?}");
    // State is never subject to retention.
    assert!(types.contains("m.room.name") && types.contains("m.room.retention"), "{types:?}");
    assert_eq!(
        s.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room)), Some(&alice.token)).await.0,
        StatusCode::OK
    );
    // Search does not find it either (it goes through the same visibility), nor after the purge.
    let search = |term: &'static str| {
        let (s, token) = (&s, alice.token.clone());
        async move {
            let body = json!({ "search_categories": { "room_events": { "search_term": term } } });
            let (st, v) = s.post("/_matrix/client/v3/search", Some(&token), body).await;
            assert_eq!(st, StatusCode::OK, "{v}");
            let results = v["search_categories"]["room_events"]["results"].as_array().unwrap();
            ids(&Value::Array(results.iter().map(|r| r["result"].clone()).collect()))
        }
    };
    assert!(!search("expiré").await.contains(&old));
    assert!(search("récent").await.contains(&new));
    // Still in the database until a purge.
    assert_eq!(event_rows(&s, &[&old]).await, 1);
    assert_eq!(pass(&s, now_ms()).await.events, 1);
    assert_eq!(event_rows(&s, &[&old]).await, 0);
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM event_search WHERE vector @@ plainto_tsquery('parvis_french', 'expiré')",
    )
    .fetch_one(&s.state().db)
    .await
    .unwrap();
    assert_eq!(left, 0, "the index row went with the event");
    s.stop().await;
}

#[tokio::test]
async fn expired_messages_are_hidden_before_the_purge() {
    hidden_before_purge(256).await;
}

#[tokio::test]
async fn expired_messages_are_hidden_before_the_purge_without_cache() {
    hidden_before_purge(0).await;
}

#[tokio::test]
async fn one_instance_purges_at_a_time() {
    let s = start(|c| c.retention.default_policy.max_lifetime_secs = Some(60)).await;
    let alice = s.register("alice", false).await;
    let room = create(&s, &alice, json!({})).await;
    let m = text(&s, &alice, &room, "a").await;
    text(&s, &alice, &room, "b").await;
    // Another session (another instance) holds the purge lock: this pass does nothing.
    let mut other = s.state().db.acquire().await.unwrap();
    assert!(parvis::storage::retention::try_lock_purge(&mut other).await.unwrap());
    assert_eq!(purge_pass(s.state(), now_ms() + DAY).await.unwrap(), None);
    assert_eq!(event_rows(&s, &[&m]).await, 1);
    assert!(parvis::storage::retention::unlock_purge(&mut other).await.unwrap());
    drop(other);
    assert_eq!(pass(&s, now_ms() + DAY).await.events, 1);
    // The pass released its lock: the next one runs too.
    assert!(purge_pass(s.state(), now_ms() + DAY).await.unwrap().is_some());
    s.stop().await;
}
