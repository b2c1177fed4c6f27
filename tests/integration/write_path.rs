//! The event write path: nothing is acknowledged that is not committed. One failing event costs
//! only its own sender, a failure of the batch as a whole is retried event by event, client
//! transaction IDs are scoped to the device and the request path, and a server killed with
//! SIGKILL in the middle of a burst of sends has every acknowledged event after restart.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection;

use crate::common::*;

fn send_path(room: &str, txn: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room))
}

/// Bodies of the room's `m.room.message` events, from `/messages` (the database).
async fn stored_bodies(s: &TestServer, u: &User, room: &str) -> Vec<String> {
    let (st, v) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1000", enc(room)), Some(&u.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap().to_owned())
        .collect()
}

/// Bodies of the room's messages as `/sync` (the cache) shows them.
async fn synced_bodies(s: &TestServer, u: &User, room: &str) -> Vec<String> {
    let filter = json!({ "room": { "timeline": { "limit": 100, "types": ["m.room.message"] } } });
    let (st, v) = s.get(&format!("/_matrix/client/v3/sync?filter={}", enc(&filter.to_string())), Some(&u.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .map(|a| a.iter().map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_default()
}

/// Holds the room's write lock from outside the server, so that the sends made meanwhile queue
/// up and are appended as one batch once it is released.
struct HeldRoom(sqlx::PgConnection);

impl HeldRoom {
    async fn hold(s: &TestServer, room: &str) -> Self {
        let url = s.state().config.database.url.clone();
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        let nid: i64 = sqlx::query_scalar("SELECT room_nid FROM rooms WHERE room_id = $1")
            .bind(room)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        // The room lock (`rooms::lock_room`): a row lock on the room's extremities row, held by an
        // open transaction.
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        sqlx::query("SELECT 1 FROM room_extremities WHERE room_nid = $1 FOR NO KEY UPDATE")
            .bind(nid)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        Self(conn)
    }

    async fn release(mut self) {
        sqlx::query("ROLLBACK").execute(&mut self.0).await.unwrap();
        self.0.close().await.unwrap();
    }
}

/// Sends `bodies` concurrently while the room is held, then releases it: the first send takes
/// the writer and waits on the lock, the others queue behind it and form one batch.
async fn burst(s: &TestServer, u: &User, room: &str, bodies: &[String]) -> Vec<(String, StatusCode, Value)> {
    let held = HeldRoom::hold(s, room).await;
    let mut tasks = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let (http, base, token, path, body) =
            (s.http.clone(), s.base.clone(), u.token.clone(), send_path(room, &format!("burst{i}")), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = http
                .put(format!("{base}{path}"))
                .bearer_auth(token)
                .json(&json!({ "msgtype": "m.text", "body": body }))
                .send()
                .await
                .unwrap();
            let st = r.status();
            (body, st, r.json::<Value>().await.unwrap_or(Value::Null))
        }));
        if i == 0 {
            // The first send must be the one waiting on the lock.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.release().await;
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Checks the outcome of a burst in which the sends whose body contains `bad` must fail with 500
/// and every other must be acknowledged, stored, readable and synced.
async fn check_burst(s: &TestServer, u: &User, room: &str, results: &[(String, StatusCode, Value)], bad: &str) {
    let mut acked = HashSet::new();
    for (body, st, v) in results {
        if body.contains(bad) {
            assert_err(&(*st, v.clone()), 500, "M_UNKNOWN");
        } else {
            assert_eq!(*st, StatusCode::OK, "{body}: {v}");
            let id = v["event_id"].as_str().unwrap();
            let (st, ev) =
                s.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room), enc(id)), Some(&u.token)).await;
            assert_eq!(st, StatusCode::OK, "acknowledged {id} must exist: {ev}");
            assert_eq!(ev["content"]["body"], body.as_str());
            acked.insert(body.clone());
        }
    }
    let stored: HashSet<String> = stored_bodies(s, u, room).await.into_iter().collect();
    let synced: HashSet<String> = synced_bodies(s, u, room).await.into_iter().collect();
    for b in &acked {
        assert!(stored.contains(b), "{b} acknowledged but not stored");
        assert!(synced.contains(b), "{b} acknowledged but not in /sync");
    }
    assert!(!stored.iter().any(|b| b.contains(bad)), "a failed event was stored");
    assert!(!synced.iter().any(|b| b.contains(bad)), "a failed event reached /sync");
}

#[tokio::test]
async fn a_failing_event_fails_only_its_sender() {
    let s = TestServer::start_with(|c| c.testing.fail_append_containing = Some("BOOM".into())).await;
    let u = s.register("alice", false).await;
    let room = create(&s, &u, json!({})).await;

    let bodies: Vec<String> =
        (0..20).map(|i| if i == 7 || i == 13 { format!("BOOM {i}") } else { format!("message {i}") }).collect();
    let results = burst(&s, &u, &room, &bodies).await;
    check_burst(&s, &u, &room, &results, "BOOM").await;

    // The room keeps working, and a failed transaction can be retried (with another content).
    let (st, v) =
        s.put(&send_path(&room, "after"), Some(&u.token), json!({ "msgtype": "m.text", "body": "after" })).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(stored_bodies(&s, &u, &room).await.contains(&"after".to_owned()));
    s.stop().await;
}

#[tokio::test]
async fn a_batch_failure_is_retried_event_by_event() {
    let s = TestServer::start_with(|c| c.testing.fail_push_containing = Some("PUSHFAIL".into())).await;
    let u = s.register("alice", false).await;
    let b = s.register("bob", false).await;
    let room = create(&s, &u, json!({ "preset": "public_chat" })).await;
    let (st, v) = s.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&b.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");

    let bodies: Vec<String> =
        (0..12).map(|i| if i == 5 { format!("PUSHFAIL {i}") } else { format!("message {i}") }).collect();
    let results = burst(&s, &u, &room, &bodies).await;
    check_burst(&s, &u, &room, &results, "PUSHFAIL").await;

    // Bob's notifications count exactly the acknowledged messages: push rows were committed
    // with their events, once.
    let (st, n) = s.get("/_matrix/client/v3/notifications?limit=100", Some(&b.token)).await;
    assert_eq!(st, StatusCode::OK, "{n}");
    let notified: Vec<&str> =
        n["notifications"].as_array().unwrap().iter().filter_map(|x| x["event"]["content"]["body"].as_str()).collect();
    assert_eq!(notified.len(), 11, "{n}");
    assert!(!notified.iter().any(|b| b.contains("PUSHFAIL")));
    s.stop().await;
}

#[tokio::test]
async fn transaction_ids_are_scoped_to_the_request_path() {
    let s = TestServer::start().await;
    let u = s.register("alice", false).await;
    let r1 = create(&s, &u, json!({})).await;
    let r2 = create(&s, &u, json!({})).await;
    let msg = |body: &str| json!({ "msgtype": "m.text", "body": body });

    let (_, a) = s.put(&send_path(&r1, "same"), Some(&u.token), msg("one")).await;
    let (_, retry) = s.put(&send_path(&r1, "same"), Some(&u.token), msg("one")).await;
    assert_eq!(a["event_id"], retry["event_id"], "a retry is the same event");
    let (st, b) = s.put(&send_path(&r2, "same"), Some(&u.token), msg("two")).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_ne!(a["event_id"], b["event_id"], "another room is another transaction");
    assert_eq!(stored_bodies(&s, &u, &r2).await, vec!["two".to_owned()]);
    // Another event type in the same room is another path.
    let (st, c) = s
        .put(&format!("/_matrix/client/v3/rooms/{}/send/org.example.custom/same", enc(&r1)), Some(&u.token), msg("x"))
        .await;
    assert_eq!(st, StatusCode::OK, "{c}");
    assert_ne!(a["event_id"], c["event_id"]);

    // A redaction with the same txn ID redacts.
    let target = a["event_id"].as_str().unwrap();
    let redact = format!("/_matrix/client/v3/rooms/{}/redact/{}/same", enc(&r1), enc(target));
    let (st, red) = s.put(&redact, Some(&u.token), json!({ "reason": "oops" })).await;
    assert_eq!(st, StatusCode::OK, "{red}");
    assert_ne!(red["event_id"], a["event_id"]);
    let (_, ev) = s.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&r1), enc(target)), Some(&u.token)).await;
    assert_eq!(ev["content"], json!({}), "the target is redacted: {ev}");
    let (_, again) = s.put(&redact, Some(&u.token), json!({ "reason": "oops" })).await;
    assert_eq!(again["event_id"], red["event_id"], "a retried redaction is the same event");

    // The same txn ID from another device of the same user is another transaction.
    let (st, login) = s.login("alice", PASSWORD, json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let other = user_from(&login);
    let (_, d) = s.put(&send_path(&r1, "same"), Some(&other.token), msg("one")).await;
    assert_ne!(d["event_id"], a["event_id"]);
    s.stop().await;
}

/// A `parvis serve` process of its own (so that it can be killed with SIGKILL), and its URL.
pub(crate) struct Process {
    db_url: String,
    db_name: String,
    port: u16,
    extra_env: Vec<(String, String)>,
    http: reqwest::Client,
}

impl Process {
    pub(crate) async fn new(extra_env: &[(&str, &str)]) -> Self {
        let (db_url, db_name) = fresh_database().await;
        Self {
            db_url,
            db_name,
            port: crate::cli::free_port(),
            extra_env: extra_env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap(),
        }
    }

    /// Another process on the same database, with `extra` added to the environment.
    pub(crate) fn peer(&self, extra: &[(&str, &str)]) -> Self {
        let mut env = self.extra_env.clone();
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        Self {
            db_url: self.db_url.clone(),
            db_name: self.db_name.clone(),
            port: crate::cli::free_port(),
            extra_env: env,
            http: self.http.clone(),
        }
    }

    /// The same process with `extra` added to its environment.
    pub(crate) fn with_env(mut self, extra: &[(&str, &str)]) -> Self {
        self.extra_env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        self
    }

    /// A peer is done (the first process owns the database).
    pub(crate) fn finish_peer(self) {}

    pub(crate) fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) async fn start(&self) -> crate::cli::Proc {
        let mut cmd = crate::cli::parvis();
        cmd.arg("serve")
            .env("PARVIS__DATABASE__URL", &self.db_url)
            .env("PARVIS__LISTEN__CLIENT", format!("127.0.0.1:{}", self.port))
            .env("PARVIS__LISTEN__METRICS", "127.0.0.1:0")
            .env("PARVIS__REGISTRATION__SHARED_SECRET", SHARED_SECRET)
            .env("PARVIS__RATE_LIMITS__ENABLED", "false")
            .env("PARVIS__MEDIA__PATH", std::env::temp_dir().join("parvis-test-media").join(&self.db_name))
            .stdout(std::process::Stdio::null());
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let log_path = std::env::temp_dir().join(format!("{}-{}.log", self.db_name, self.port));
        cmd.stderr(std::fs::File::create(&log_path).unwrap());
        let mut p = crate::cli::Proc(cmd.spawn().unwrap());
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = self.http.get(format!("{}/_matrix/client/versions", self.base())).send().await
                && r.status() == StatusCode::OK
            {
                return p;
            }
            if let Some(status) = p.0.try_wait().unwrap() {
                panic!("parvis exited with {status} before it was ready:\n{}", log());
            }
            assert!(Instant::now() < deadline, "parvis not ready after 120 s:\n{}", log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut rb = self.http.request(method, format!("{}{path}", self.base()));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let st = r.status();
        (st, r.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn register(&self, localpart: &str) -> User {
        let (_, n) = self.call(reqwest::Method::GET, "/_synapse/admin/v1/register", None, None).await;
        let nonce = n["nonce"].as_str().unwrap();
        let mac = parvis::api::admin::register::compute_mac(SHARED_SECRET, nonce, localpart, PASSWORD, false, None);
        let body = json!({ "nonce": nonce, "username": localpart, "password": PASSWORD, "admin": false, "mac": mac });
        let (st, v) = self.call(reqwest::Method::POST, "/_synapse/admin/v1/register", None, Some(body)).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        user_from(&v)
    }

    pub(crate) async fn finish(self) {
        drop_database(&self.db_name).await;
    }
}

/// SIGKILL in the middle of a burst of sends: after restart, every acknowledged event is there,
/// and retrying every send with its transaction ID yields exactly one event per transaction.
#[tokio::test]
async fn kill_9_loses_no_acknowledged_event() {
    let server = Process::new(&[]).await;
    let (base, http) = (server.base(), server.http.clone());
    let mut p = server.start().await;
    let u = server.register("alice").await;
    let (_, room) =
        server.call(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(&u.token), Some(json!({}))).await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    // Eight writers send as fast as they can (at most 960 events, one page of /messages); the
    // server is killed once 40 sends were acknowledged, in the middle of the burst.
    let stop_at = Instant::now() + Duration::from_secs(60);
    let acked_so_far = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (http, base, token, room) = (http.clone(), base.clone(), u.token.clone(), room.clone());
        let acked_so_far = acked_so_far.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut tried = Vec::new();
            for i in 0..120 {
                if Instant::now() > stop_at {
                    break;
                }
                let txn = format!("w{w}-{i}");
                tried.push(txn.clone());
                let r = http
                    .put(format!("{base}{}", send_path(&room, &txn)))
                    .bearer_auth(&token)
                    .json(&json!({ "msgtype": "m.text", "body": txn }))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        if let Some(id) = v["event_id"].as_str() {
                            acked.push((txn, id.to_owned()));
                            acked_so_far.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                    // Connection refused or reset: the server is gone.
                    _ => break,
                }
            }
            (acked, tried)
        }));
    }
    while acked_so_far.load(std::sync::atomic::Ordering::SeqCst) < 40 && Instant::now() < stop_at {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.0.kill().unwrap(); // SIGKILL
    p.0.wait().unwrap();
    let mut acked = Vec::new();
    let mut tried = Vec::new();
    for t in tasks {
        let (a, t) = t.await.unwrap();
        acked.extend(a);
        tried.extend(t);
    }
    assert!(acked.len() >= 40, "the burst ran long enough to matter ({} acknowledged)", acked.len());
    assert!(tried.len() > acked.len(), "the kill interrupted sends in flight");

    let p = server.start().await;
    for (txn, id) in &acked {
        let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(id));
        let (st, _) = server.call(reqwest::Method::GET, &path, Some(&u.token), None).await;
        assert_eq!(st, StatusCode::OK, "acknowledged {txn} ({id}) lost by SIGKILL");
    }
    // Every send retried with its transaction ID: acknowledged ones answer the same event, and in
    // the end each transaction is exactly one event.
    for txn in &tried {
        let body = json!({ "msgtype": "m.text", "body": txn });
        let (st, v) = server.call(reqwest::Method::PUT, &send_path(&room, txn), Some(&u.token), Some(body)).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        if let Some((_, id)) = acked.iter().find(|(t, _)| t == txn) {
            assert_eq!(v["event_id"].as_str(), Some(id.as_str()), "retry of {txn}");
        }
    }
    let messages = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1000", enc(&room));
    let (_, page) = server.call(reqwest::Method::GET, &messages, Some(&u.token), None).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for e in page["chunk"].as_array().unwrap().iter().filter(|e| e["type"] == "m.room.message") {
        *counts.entry(e["content"]["body"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    for txn in &tried {
        assert_eq!(counts.get(txn), Some(&1), "transaction {txn} must be exactly one event");
    }
    drop(p);
    server.finish().await;
}

/// A push gateway answering with a status the test sets, recording every request.
async fn gateway(
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/_matrix/push/v1/notify",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let (tx, status) = (tx.clone(), status.clone());
            async move {
                let code = status.load(std::sync::atomic::Ordering::SeqCst);
                let _ = tx.send(json!({ "answered": code, "body": body }));
                (axum::http::StatusCode::from_u16(code).unwrap(), axum::Json(json!({})))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://127.0.0.1:{port}/_matrix/push/v1/notify"), rx)
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> Option<Value> {
    tokio::time::timeout(Duration::from_secs(15), rx.recv()).await.ok().flatten()
}

/// A notification still being retried when the server is killed is delivered by the next
/// process, once; a delivered one is not sent again by the process after.
#[tokio::test]
async fn push_deliveries_survive_a_restart() {
    use std::sync::atomic::{AtomicU16, Ordering};
    let status = std::sync::Arc::new(AtomicU16::new(503));
    let (url, mut received) = gateway(status.clone()).await;
    let server = Process::new(&[
        ("PARVIS__PUSH__GATEWAY_IP_WHITELIST", "[\"127.0.0.1/32\"]"),
        ("PARVIS__PUSH__GATEWAY_RETRY_INITIAL_MS", "100"),
        ("PARVIS__PUSH__GATEWAY_RETRY_MAX_MS", "200"),
        ("PARVIS__PUSH__GATEWAY_MAX_ATTEMPTS", "10000"),
    ])
    .await;
    let mut p = server.start().await;
    let (alice, bob) = (server.register("alice").await, server.register("bob").await);
    let post = reqwest::Method::POST;
    let (_, room) = server
        .call(
            post.clone(),
            "/_matrix/client/v3/createRoom",
            Some(&alice.token),
            Some(json!({ "invite": [bob.user_id] })),
        )
        .await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let (st, v) = server
        .call(post.clone(), &format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&bob.token), Some(json!({})))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let pusher = json!({
        "kind": "http", "app_id": "fr.ville.test", "pushkey": "key1", "app_display_name": "Test",
        "device_display_name": "Phone", "lang": "fr", "data": { "url": url }
    });
    let (st, v) = server.call(post.clone(), "/_matrix/client/v3/pushers/set", Some(&bob.token), Some(pusher)).await;
    assert_eq!(st, StatusCode::OK, "{v}");

    let (st, sent) = server
        .call(
            reqwest::Method::PUT,
            &send_path(&room, "t1"),
            Some(&alice.token),
            Some(json!({ "msgtype": "m.text", "body": "hello" })),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{sent}");
    let event_id = sent["event_id"].as_str().unwrap().to_owned();
    // The gateway is failing: the notification is being retried when the server dies.
    for _ in 0..2 {
        let got = next(&mut received).await.expect("delivery attempts");
        assert_eq!(got["body"]["notification"]["event_id"], event_id.as_str());
        assert_eq!(got["answered"], 503);
    }
    p.0.kill().unwrap();
    p.0.wait().unwrap();
    while received.try_recv().is_ok() {}
    status.store(200, Ordering::SeqCst);

    // The next process delivers it.
    let p = server.start().await;
    let got = next(&mut received).await.expect("the notification is delivered after the restart");
    assert_eq!(got["body"]["notification"]["event_id"], event_id.as_str(), "{got}");
    assert_eq!(got["body"]["notification"]["content"]["body"], "hello");
    assert_eq!(got["body"]["notification"]["sender_display_name"], "alice", "{got}");
    assert_eq!(got["answered"], 200);
    // Its position is recorded once delivered: the process after does not send it again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(p);
    let _p = server.start().await;
    if let Ok(Some(v)) = tokio::time::timeout(Duration::from_secs(3), received.recv()).await {
        panic!("delivered twice: {v}");
    }
    server.finish().await;
}

/// Two server processes on one database write the same room in turn: each appends on the head the
/// other committed and authorises against the state the other changed (its own cached head and
/// auth state are used only while nobody else appended).
#[tokio::test]
async fn a_room_written_by_two_instances_stays_one_chain() {
    let a = TestServer::start().await;
    let alice = a.register("alice", false).await;
    let bob = a.register("bob", false).await;
    let room = create(&a, &alice, json!({ "preset": "public_chat" })).await;
    let (st, v) = a.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&bob.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let msg = |body: &str| json!({ "msgtype": "m.text", "body": body });
    for (i, u) in [&alice, &bob, &alice].into_iter().enumerate() {
        let (st, v) = a.put(&send_path(&room, &format!("a{i}")), Some(&u.token), msg("on a")).await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }

    // A second instance: same database, same configuration.
    let b = parvis::server::start(parvis::server::prepare(a.state().config.clone()).await.unwrap()).await.unwrap();
    let b_base = format!("http://{}", b.client_addr);
    let pl_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room));
    let (st, mut pl) = a.get(&pl_path, Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK, "{pl}");
    pl["events_default"] = json!(50);
    let r = a.http.put(format!("{b_base}{pl_path}")).bearer_auth(&alice.token).json(&pl).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());

    // The first instance sees the new power levels: Bob may no longer send.
    let (st, v) = a.put(&send_path(&room, "after-pl"), Some(&bob.token), msg("refused")).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    let (st, v) = a.put(&send_path(&room, "a-last"), Some(&alice.token), msg("on a again")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let r = a
        .http
        .put(format!("{b_base}{}", send_path(&room, "b-last")))
        .bearer_auth(&alice.token)
        .json(&msg("on b again"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // One chain: a single extremity, every event's prev_events is the event before it.
    let mut conn = sqlx::PgConnection::connect(&a.state().config.database.url).await.unwrap();
    let (extremities, events, linked): (i32, i64, i64) = sqlx::query_as(
        "SELECT (SELECT cardinality(x.event_nids) FROM room_extremities x WHERE x.room_nid = r.room_nid),
                (SELECT count(*) FROM events e WHERE e.room_nid = r.room_nid),
                (SELECT count(*) FROM events e JOIN event_edges g ON g.event_nid = e.event_nid
                 JOIN events p ON p.event_id = g.prev_event_id AND p.depth = e.depth - 1
                 WHERE e.room_nid = r.room_nid)
         FROM rooms r WHERE r.room_id = $1",
    )
    .bind(&room)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(extremities, 1);
    assert_eq!(linked, events - 1, "every event but the create event follows the one before it");
    conn.close().await.unwrap();
    b.shutdown().await.unwrap();
    a.stop().await;
}
