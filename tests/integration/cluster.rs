//! Several instances on one database (issue 20): three instances behave as one server (messages,
//! receipts, typing, token revocation, UIA across instances); the sync watermark waits for a
//! slow writer of another instance; killing the holder of a lease hands its duty over with
//! nothing lost or delivered twice.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;
use crate::sync::{send_text, sync};

/// Fast heartbeats and leases, so that tests do not wait long.
fn quick(c: &mut parvis::config::Config) {
    c.cluster.heartbeat_ms = 200;
    c.cluster.lease_retry_ms = 200;
    c.cluster.lease_check_ms = 200;
}

async fn three(adjust_first: impl FnOnce(&mut parvis::config::Config)) -> (TestServer, TestServer, TestServer) {
    let s1 = TestServer::start_with(|c| {
        quick(c);
        adjust_first(c);
    })
    .await;
    let s2 = s1.peer(|c| c.testing = Default::default()).await;
    let s3 = s1.peer(|c| c.testing = Default::default()).await;
    // The later ones learnt of the earlier ones at start; the first learns of them by `hello`.
    for s in [&s1, &s2, &s3] {
        let start = Instant::now();
        while s.state().cluster.peers().len() < 2 || !s.state().cluster.is_multi() {
            assert!(start.elapsed() < Duration::from_secs(5), "instances did not find each other");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (s1, s2, s3)
}

fn bodies(v: &Value, room: &str) -> Vec<String> {
    v["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn ephemeral<'a>(v: &'a Value, room: &str, kind: &str) -> Option<&'a Value> {
    v["rooms"]["join"][room]["ephemeral"]["events"].as_array()?.iter().find(|e| e["type"] == kind)
}

/// Long-polls `u`'s sync on `s` until `found` says yes (or panics after `within`); returns the
/// matching response and how long it took.
async fn sync_until(
    s: &TestServer,
    u: &User,
    since: &mut String,
    within: Duration,
    found: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let start = Instant::now();
    loop {
        let v = sync(s, u, Some(since), None, 2000).await;
        *since = v["next_batch"].as_str().unwrap().to_owned();
        if found(&v) {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < within, "not seen within {within:?}");
    }
}

async fn join(s: &TestServer, u: &User, room: &str) {
    let (st, v) = s.post(&format!("/_matrix/client/v3/join/{}", enc(room)), Some(&u.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_behave_as_one_server() {
    let (s1, s2, s3) = three(|_| {}).await;
    let alice = s1.register("alice", false).await;
    let bob = s2.register("bob", false).await;
    let carol = s3.register("carol", false).await;
    let room = create(&s1, &alice, json!({ "preset": "public_chat" })).await;
    join(&s2, &bob, &room).await;
    join(&s3, &carol, &room).await;

    let mut a_since = sync(&s1, &alice, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let mut b_since = sync(&s2, &bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let mut c_since = sync(&s3, &carol, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();

    // Messages: each sees the others' through its own instance, woken within a bound.
    let bound = Duration::from_secs(3);
    let from_alice = send_text(&s1, &alice, &room, "from instance 1").await;
    let (_, t) =
        sync_until(&s2, &bob, &mut b_since, bound, |v| bodies(v, &room).contains(&"from instance 1".into())).await;
    assert!(t < bound, "bob waited {t:?}");
    sync_until(&s3, &carol, &mut c_since, bound, |v| bodies(v, &room).contains(&"from instance 1".into())).await;
    send_text(&s3, &carol, &room, "from instance 3").await;
    sync_until(&s1, &alice, &mut a_since, bound, |v| bodies(v, &room).contains(&"from instance 3".into())).await;
    sync_until(&s2, &bob, &mut b_since, bound, |v| bodies(v, &room).contains(&"from instance 3".into())).await;

    // Receipts: bob reads on instance 2, alice sees it on instance 1.
    let (st, v) = s2
        .post(
            &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&from_alice)),
            Some(&bob.token),
            json!({}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    sync_until(&s1, &alice, &mut a_since, bound, |v| {
        ephemeral(v, &room, "m.receipt").is_some_and(|r| r["content"][&from_alice]["m.read"][&bob.user_id].is_object())
    })
    .await;

    // Typing: carol types on instance 3, alice sees it on instance 1, then sees her stop.
    let typing = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&carol.user_id));
    let (st, _) = s3.put(&typing, Some(&carol.token), json!({ "typing": true, "timeout": 30000 })).await;
    assert_eq!(st, StatusCode::OK);
    sync_until(&s1, &alice, &mut a_since, bound, |v| {
        ephemeral(v, &room, "m.typing").is_some_and(|t| t["content"]["user_ids"] == json!([carol.user_id]))
    })
    .await;
    let (st, _) = s3.put(&typing, Some(&carol.token), json!({ "typing": false })).await;
    assert_eq!(st, StatusCode::OK);
    sync_until(&s1, &alice, &mut a_since, bound, |v| {
        ephemeral(v, &room, "m.typing").is_some_and(|t| t["content"]["user_ids"] == json!([]))
    })
    .await;

    // A token revoked on one instance is refused by the others at once (their caches held it).
    let (st, login) = s2.login("bob", PASSWORD, json!({})).await;
    assert_eq!(st, StatusCode::OK, "{login}");
    let second = user_from(&login);
    for s in [&s1, &s2, &s3] {
        let (st, _) = s.get("/_matrix/client/v3/account/whoami", Some(&second.token)).await;
        assert_eq!(st, StatusCode::OK);
    }
    let (st, _) = s2.post("/_matrix/client/v3/logout", Some(&second.token), json!({})).await;
    assert_eq!(st, StatusCode::OK);
    for s in [&s1, &s3, &s2] {
        let r = s.get("/_matrix/client/v3/account/whoami", Some(&second.token)).await;
        assert_err(&r, 401, "M_UNKNOWN_TOKEN");
    }

    // User-interactive auth across instances: the session starts on one, ends on another.
    let (st, login) = s1.login("alice", PASSWORD, json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let doomed = user_from(&login);
    let path = format!("/_matrix/client/v3/devices/{}", enc(&doomed.device_id));
    let (st, v) = s1.delete(&path, Some(&alice.token), json!({})).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    let session = v["session"].as_str().unwrap().to_owned();
    let auth = json!({ "auth": {
        "type": "m.login.password", "session": session, "password": PASSWORD,
        "identifier": { "type": "m.id.user", "user": "alice" } } });
    let (st, v) = s3.delete(&path, Some(&alice.token), auth).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let r = s2.get("/_matrix/client/v3/account/whoami", Some(&doomed.token)).await;
    assert_err(&r, 401, "M_UNKNOWN_TOKEN");

    // The instances count each other.
    let text = s2.http.get(format!("{}/metrics", s2.metrics)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("parvis_cluster_instances 3"), "{text}");

    s3.stop().await;
    s2.stop().await;
    s1.stop().await;
}

/// Instance 1 takes an event stream position and is slow to commit it; instance 2 commits a
/// higher position meanwhile. A client syncing on instance 3 must not be handed a token past
/// the slow position before it commits (it would then never see that event): the response that
/// brings instance 2's event also brings, or follows, instance 1's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_watermark_waits_for_another_instances_slow_writer() {
    let (s1, s2, s3) = three(|c| c.testing.stall_commit_containing = Some("SLOW".into())).await;
    let alice = s1.register("alice", false).await;
    let bob = s2.register("bob", false).await;
    let carol = s3.register("carol", false).await;
    let r1 = create(&s1, &alice, json!({ "preset": "public_chat" })).await;
    let r2 = create(&s2, &bob, json!({ "preset": "public_chat" })).await;
    join(&s3, &carol, &r1).await;
    join(&s3, &carol, &r2).await;
    let mut since = sync(&s3, &carol, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();

    let slow = {
        let (base, token, room) = (s1.base.clone(), alice.token.clone(), r1.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            let r = reqwest::Client::new()
                .put(format!("{base}/_matrix/client/v3/rooms/{}/send/m.room.message/slow1", enc(&room)))
                .bearer_auth(token)
                .json(&json!({ "msgtype": "m.text", "body": "SLOW writer" }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            start.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_text(&s2, &bob, &r2, "fast writer").await;

    let mut seen_slow = false;
    let mut seen_fast = false;
    let start = Instant::now();
    while !(seen_slow && seen_fast) {
        assert!(start.elapsed() < Duration::from_secs(15), "slow {seen_slow}, fast {seen_fast}");
        let v = sync(&s3, &carol, Some(&since), None, 1000).await;
        since = v["next_batch"].as_str().unwrap().to_owned();
        seen_slow |= bodies(&v, &r1).contains(&"SLOW writer".into());
        if bodies(&v, &r2).contains(&"fast writer".into()) {
            assert!(seen_slow, "the fast event was delivered before the slow, lower one committed: {v}");
            seen_fast = true;
        }
    }
    let took = slow.await.unwrap();
    assert!(took >= Duration::from_millis(1400), "the slow writer did not stall ({took:?})");
    s3.stop().await;
    s2.stop().await;
    s1.stop().await;
}

/// Two `parvis serve` processes share a database and an appservice. SIGKILL of the one holding
/// the appservice's lease: the other takes the lease over and delivers the rest; every message
/// reaches the appservice once (a transaction retried keeps its ID).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_lease_holder_hands_the_duty_over() {
    use crate::appservice::{AS_TOKEN, registration, start_mock};
    use reqwest::Method;
    let (mock, url) = start_mock().await;
    let file = registration(&url, "");
    let files = format!("[\"{}\"]", file.display());
    let env = [
        ("PARVIS__APPSERVICES__REGISTRATION_FILES", files.as_str()),
        ("PARVIS__APPSERVICES__RETRY_INITIAL_MS", "50"),
        ("PARVIS__APPSERVICES__RETRY_MAX_SECS", "1"),
        ("PARVIS__CLUSTER__HEARTBEAT_MS", "200"),
        ("PARVIS__CLUSTER__LEASE_RETRY_MS", "200"),
        ("PARVIS__CLUSTER__LEASE_CHECK_MS", "200"),
    ];
    let m1 = crate::cli::free_port();
    let m2 = crate::cli::free_port();
    let first = crate::write_path::Process::new(&env).await;
    let second = first.peer(&[("PARVIS__LISTEN__METRICS", &format!("127.0.0.1:{m2}"))]);
    let first = first.with_env(&[("PARVIS__LISTEN__METRICS", &format!("127.0.0.1:{m1}"))]);
    let mut p1 = first.start().await;
    let mut p2 = second.start().await;
    *mock.hs.lock() = Some(first.base());

    let human = first.register("human").await;
    let (_, room) = first
        .call(Method::POST, "/_matrix/client/v3/createRoom", Some(&human.token), Some(json!({"preset": "public_chat"})))
        .await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let reg = json!({"type": "m.login.application_service", "username": "bridge_bob", "inhibit_login": true});
    first.call(Method::POST, "/_matrix/client/v3/register", Some(AS_TOKEN), Some(reg)).await;
    let join = format!("/_matrix/client/v3/join/{}?user_id=@bridge_bob:localhost", enc(&room));
    let (st, v) = second.call(Method::POST, &join, Some(AS_TOKEN), Some(json!({}))).await;
    assert_eq!(st, 200, "{v}");

    let http = reqwest::Client::new();
    let holds = |port: u16| {
        let http = http.clone();
        async move {
            let Ok(r) = http.get(format!("http://127.0.0.1:{port}/metrics")).send().await else { return false };
            r.text().await.unwrap_or_default().contains("parvis_leases_held{lease=\"appservice:testbridge\"} 1")
        }
    };
    let start = Instant::now();
    let holder_is_first = loop {
        match (holds(m1).await, holds(m2).await) {
            (true, false) => break true,
            (false, true) => break false,
            (true, true) => panic!("both instances hold the lease"),
            (false, false) => {
                assert!(start.elapsed() < Duration::from_secs(10), "nobody took the lease");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let send = |base: String, i: usize| {
        let (token, room) = (human.token.clone(), room.clone());
        async move {
            let r = reqwest::Client::new()
                .put(format!("{base}/_matrix/client/v3/rooms/{}/send/m.room.message/h{i}", enc(&room)))
                .bearer_auth(token)
                .json(&json!({"msgtype": "m.text", "body": format!("handover {i}")}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    // Sends through both instances; the holder delivers them all.
    for i in 0..10 {
        send(if i % 2 == 0 { first.base() } else { second.base() }, i).await;
    }
    let delivered = |n: usize| {
        let b: Vec<String> =
            mock.events().iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect();
        (0..n).all(|i| b.contains(&format!("handover {i}")))
    };
    let start = Instant::now();
    while !delivered(10) {
        assert!(start.elapsed() < Duration::from_secs(20), "first ten not delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SIGKILL the holder in the middle of more sends through the survivor.
    let (survivor, survivor_metrics) = if holder_is_first { (second.base(), m2) } else { (first.base(), m1) };
    for i in 10..15 {
        send(survivor.clone(), i).await;
    }
    if holder_is_first {
        p1.0.kill().unwrap();
        p1.0.wait().unwrap();
    } else {
        p2.0.kill().unwrap();
        p2.0.wait().unwrap();
    }
    for i in 15..25 {
        send(survivor.clone(), i).await;
    }
    let start = Instant::now();
    while !delivered(25) {
        assert!(start.elapsed() < Duration::from_secs(30), "not everything delivered after the handover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(holds(survivor_metrics).await, "the survivor does not hold the lease");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bodies: Vec<String> =
        mock.events().iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect();
    for i in 0..25 {
        let n = bodies.iter().filter(|b| **b == format!("handover {i}")).count();
        assert_eq!(n, 1, "message {i} delivered {n} times (transactions: {:?})", mock.txns.lock().len());
    }
    drop((p1, p2));
    second.finish_peer();
    first.finish().await;
}
