//! Application services against a mock appservice (an axum server in the test): registration
//! files, `as_token` masquerading, `m.login.application_service`, exclusive namespaces, user and
//! alias queries, ping, and durable transaction delivery across restarts.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Path as AxPath, State as AxState};
use axum::http::{HeaderMap, StatusCode as AxStatus};
use axum::routing::{get, post, put};
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::common::*;

pub const AS_TOKEN: &str = "as_secret_token_for_tests";
pub const HS_TOKEN: &str = "hs_secret_token_for_tests";

/// What the mock appservice saw.
#[derive(Default)]
pub struct Mock {
    /// Every transaction request, in arrival order: (txn ID, body).
    pub txns: Mutex<Vec<(String, Value)>>,
    /// Answer 500 to transactions while set.
    pub fail: AtomicBool,
    pub bad_auth: AtomicU32,
    pub user_queries: Mutex<Vec<String>>,
    pub alias_queries: Mutex<Vec<String>>,
    pub pings: Mutex<Vec<Value>>,
    /// The homeserver, for the query handlers that create what was asked.
    pub hs: Mutex<Option<String>>,
}

impl Mock {
    /// Events of acknowledged-or-not transactions, deduplicated by transaction ID.
    pub fn events(&self) -> Vec<Value> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (id, body) in self.txns.lock().iter() {
            if seen.insert(id.clone()) {
                out.extend(body["events"].as_array().cloned().unwrap_or_default());
            }
        }
        out
    }
}

fn authorized(m: &Mock, headers: &HeaderMap) -> bool {
    let ok = headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {HS_TOKEN}"));
    if !ok {
        m.bad_auth.fetch_add(1, Ordering::SeqCst);
    }
    ok
}

async fn txn(
    AxState(m): AxState<Arc<Mock>>,
    AxPath(id): AxPath<String>,
    headers: HeaderMap,
    body: axum::Json<Value>,
) -> (AxStatus, axum::Json<Value>) {
    if !authorized(&m, &headers) {
        return (AxStatus::FORBIDDEN, axum::Json(json!({"errcode": "M_FORBIDDEN"})));
    }
    m.txns.lock().push((id, body.0));
    if m.fail.load(Ordering::SeqCst) {
        return (AxStatus::INTERNAL_SERVER_ERROR, axum::Json(json!({})));
    }
    (AxStatus::OK, axum::Json(json!({})))
}

async fn user_query(AxState(m): AxState<Arc<Mock>>, AxPath(user): AxPath<String>, headers: HeaderMap) -> AxStatus {
    if !authorized(&m, &headers) {
        return AxStatus::FORBIDDEN;
    }
    m.user_queries.lock().push(user.clone());
    let hs = m.hs.lock().clone().unwrap();
    let localpart = user.trim_start_matches('@').split(':').next().unwrap().to_owned();
    let r = reqwest::Client::new()
        .post(format!("{hs}/_matrix/client/v3/register"))
        .bearer_auth(AS_TOKEN)
        .json(&json!({"type": "m.login.application_service", "username": localpart, "inhibit_login": true}))
        .send()
        .await
        .unwrap();
    if r.status().is_success() { AxStatus::OK } else { AxStatus::NOT_FOUND }
}

async fn alias_query(AxState(m): AxState<Arc<Mock>>, AxPath(alias): AxPath<String>, headers: HeaderMap) -> AxStatus {
    if !authorized(&m, &headers) {
        return AxStatus::FORBIDDEN;
    }
    m.alias_queries.lock().push(alias.clone());
    let hs = m.hs.lock().clone().unwrap();
    let name = alias.trim_start_matches('#').split(':').next().unwrap().to_owned();
    let r = reqwest::Client::new()
        .post(format!("{hs}/_matrix/client/v3/createRoom"))
        .bearer_auth(AS_TOKEN)
        .json(&json!({"room_alias_name": name, "preset": "public_chat"}))
        .send()
        .await
        .unwrap();
    if r.status().is_success() { AxStatus::OK } else { AxStatus::NOT_FOUND }
}

async fn ping(AxState(m): AxState<Arc<Mock>>, headers: HeaderMap, body: axum::Json<Value>) -> AxStatus {
    if !authorized(&m, &headers) {
        return AxStatus::FORBIDDEN;
    }
    m.pings.lock().push(body.0);
    AxStatus::OK
}

/// Starts the mock appservice; returns its state and URL.
pub async fn start_mock() -> (Arc<Mock>, String) {
    let m = Arc::new(Mock::default());
    let app = axum::Router::new()
        .route("/_matrix/app/v1/transactions/{id}", put(txn))
        .route("/_matrix/app/v1/users/{user}", get(user_query))
        .route("/_matrix/app/v1/rooms/{alias}", get(alias_query))
        .route("/_matrix/app/v1/ping", post(ping))
        .with_state(m.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (m, url)
}

/// Writes a registration file for the mock (namespace `@bridge_.*`, `#bridge_.*`).
pub fn registration(url: &str, extra: &str) -> tempfile::TempPath {
    let text = format!(
        "id: testbridge\nurl: {url}\nas_token: {AS_TOKEN}\nhs_token: {HS_TOKEN}\nsender_localpart: bridgebot\n\
         namespaces:\n  users:\n    - exclusive: true\n      regex: '@bridge_.*'\n  aliases:\n    - exclusive: true\n      regex: '#bridge_.*'\n\
         rate_limited: false\n{extra}"
    );
    let f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f.into_temp_path()
}

pub async fn server_with_appservice(file: &std::path::Path, mock: &Mock) -> TestServer {
    let path = file.to_owned();
    let s = TestServer::start_with(move |c| {
        c.appservices.registration_files = vec![path];
        c.appservices.retry_initial_ms = 50;
        c.appservices.retry_max_secs = 1;
    })
    .await;
    *mock.hs.lock() = Some(s.base.clone());
    s
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn bodies(events: &[Value]) -> Vec<String> {
    events.iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_masquerading_and_namespaces() {
    let (mock, url) = start_mock().await;
    let file = registration(&url, "receive_ephemeral: true\n");
    let s = server_with_appservice(&file, &mock).await;

    // The sender exists from start-up; whoami with the as_token is the sender.
    let (st, me) = s.get("/_matrix/client/v3/account/whoami", Some(AS_TOKEN)).await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["user_id"], "@bridgebot:localhost");

    // m.login.application_service registration: in the namespace only.
    let reg = |user: &str| json!({"type": "m.login.application_service", "username": user});
    let (st, b) = s.post("/_matrix/client/v3/register", Some(AS_TOKEN), reg("bridge_alice")).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["user_id"], "@bridge_alice:localhost");
    assert!(b["access_token"].is_string());
    assert_err(&s.post("/_matrix/client/v3/register", Some(AS_TOKEN), reg("alice")).await, 400, "M_EXCLUSIVE");
    assert_err(&s.post("/_matrix/client/v3/register", Some("wrong"), reg("bridge_x")).await, 401, "M_UNKNOWN_TOKEN");
    assert_err(&s.post("/_matrix/client/v3/register", None, reg("bridge_x")).await, 401, "M_MISSING_TOKEN");

    // Ordinary registration and admin creation cannot take the exclusive namespace.
    let (_, n) = s.get("/_synapse/admin/v1/register", None).await;
    let nonce = n["nonce"].as_str().unwrap().to_owned();
    let mac = parvis::api::admin::register::compute_mac(SHARED_SECRET, &nonce, "bridge_mallory", PASSWORD, false, None);
    let r = s
        .post(
            "/_synapse/admin/v1/register",
            None,
            json!({"nonce": nonce, "username": "bridge_mallory", "password": PASSWORD, "admin": false, "mac": mac}),
        )
        .await;
    assert_err(&r, 400, "M_EXCLUSIVE");

    // m.login.application_service login.
    let login =
        json!({"type": "m.login.application_service", "identifier": {"type": "m.id.user", "user": "bridge_alice"}});
    let (st, b) = s.post("/_matrix/client/v3/login", Some(AS_TOKEN), login.clone()).await;
    assert_eq!(st, 200, "{b}");
    let alice_device = b["device_id"].as_str().unwrap().to_owned();
    assert_err(&s.post("/_matrix/client/v3/login", None, login).await, 401, "M_MISSING_TOKEN");
    let outside = json!({"type": "m.login.application_service", "identifier": {"type": "m.id.user", "user": "nobody"}});
    assert_err(&s.post("/_matrix/client/v3/login", Some(AS_TOKEN), outside).await, 403, "M_FORBIDDEN");

    // Masquerading: user_id inside the namespace, registered; device_id must be theirs.
    let (st, me) = s.get("/_matrix/client/v3/account/whoami?user_id=@bridge_alice:localhost", Some(AS_TOKEN)).await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["user_id"], "@bridge_alice:localhost");
    let (st, me) = s
        .get(
            &format!("/_matrix/client/v3/account/whoami?user_id=@bridge_alice:localhost&device_id={alice_device}"),
            Some(AS_TOKEN),
        )
        .await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["device_id"], alice_device.as_str());
    let r =
        s.get("/_matrix/client/v3/account/whoami?user_id=@bridge_alice:localhost&device_id=NOPE", Some(AS_TOKEN)).await;
    assert_err(&r, 400, "M_UNKNOWN_DEVICE");
    let r = s
        .get(
            "/_matrix/client/v3/account/whoami?user_id=@bridge_alice:localhost&org.matrix.msc3202.device_id=NOPE",
            Some(AS_TOKEN),
        )
        .await;
    assert_err(&r, 400, "M_UNKNOWN_DEVICE");
    let human = s.register("human", false).await;
    let r = s.get("/_matrix/client/v3/account/whoami?user_id=@human:localhost", Some(AS_TOKEN)).await;
    assert_err(&r, 403, "M_FORBIDDEN");
    let r = s.get("/_matrix/client/v3/account/whoami?user_id=@bridge_ghost:localhost", Some(AS_TOKEN)).await;
    assert_err(&r, 403, "M_FORBIDDEN");

    // Aliases: the exclusive namespace is the appservice's.
    let room = create(&s, &human, json!({"preset": "public_chat"})).await;
    let r = s
        .put("/_matrix/client/v3/directory/room/%23bridge_x:localhost", Some(&human.token), json!({"room_id": room}))
        .await;
    assert_err(&r, 400, "M_EXCLUSIVE");
    let r = s.post("/_matrix/client/v3/createRoom", Some(&human.token), json!({"room_alias_name": "bridge_y"})).await;
    assert_err(&r, 400, "M_EXCLUSIVE");
    let (st, b) = s
        .put("/_matrix/client/v3/directory/room/%23bridge_x:localhost", Some(AS_TOKEN), json!({"room_id": room}))
        .await;
    assert_eq!(st, 200, "{b}");

    // Queries: an unknown alias / user in the namespace is asked of the appservice.
    let (st, b) = s.get("/_matrix/client/v3/directory/room/%23bridge_lobby:localhost", Some(&human.token)).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(mock.alias_queries.lock().as_slice(), ["#bridge_lobby:localhost"]);
    let (st, b) = s.get("/_matrix/client/v3/profile/@bridge_bob:localhost", Some(&human.token)).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(mock.user_queries.lock().as_slice(), ["@bridge_bob:localhost"]);
    assert_err(&s.get("/_matrix/client/v3/profile/@nobody:localhost", Some(&human.token)).await, 404, "M_NOT_FOUND");
    assert_eq!(mock.user_queries.lock().len(), 1, "users outside the namespace are not asked");

    // Ping: only with the appservice's own token.
    let (st, b) =
        s.post("/_matrix/client/v1/appservice/testbridge/ping", Some(AS_TOKEN), json!({"transaction_id": "p1"})).await;
    assert_eq!(st, 200, "{b}");
    assert!(b["duration_ms"].is_u64(), "{b}");
    assert_eq!(mock.pings.lock()[0]["transaction_id"], "p1");
    let r = s.post("/_matrix/client/v1/appservice/testbridge/ping", Some(&human.token), json!({})).await;
    assert_err(&r, 403, "M_FORBIDDEN");
    let r = s.post("/_matrix/client/v1/appservice/other/ping", Some(AS_TOKEN), json!({})).await;
    assert_err(&r, 403, "M_FORBIDDEN");
    assert_eq!(mock.bad_auth.load(Ordering::SeqCst), 0, "every request carried the hs_token");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_carry_events_of_interest_and_ephemeral() {
    let (mock, url) = start_mock().await;
    let file = registration(&url, "receive_ephemeral: true\nde.sorunome.msc2409.push_ephemeral: true\n");
    let s = server_with_appservice(&file, &mock).await;
    let human = s.register("human", false).await;
    let other = s.register("other", false).await;
    // A room without the appservice's users: nothing of it is sent.
    let private = create(&s, &other, json!({})).await;
    s.put(
        &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/p1", enc(&private)),
        Some(&other.token),
        json!({"msgtype": "m.text", "body": "private"}),
    )
    .await;

    let room = create(&s, &human, json!({"preset": "public_chat"})).await;
    s.post(
        "/_matrix/client/v3/register",
        Some(AS_TOKEN),
        json!({"type": "m.login.application_service", "username": "bridge_bob"}),
    )
    .await;
    let (st, b) = s
        .post(
            &format!("/_matrix/client/v3/join/{}?user_id=@bridge_bob:localhost", enc(&room)),
            Some(AS_TOKEN),
            json!({}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let (st, b) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t1", enc(&room)),
            Some(&human.token),
            json!({"msgtype": "m.text", "body": "hello bridge"}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    // The masqueraded user answers.
    let (st, b) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t2?user_id=@bridge_bob:localhost", enc(&room)),
            Some(AS_TOKEN),
            json!({"msgtype": "m.text", "body": "hello human"}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let (_, ev) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(b["event_id"].as_str().unwrap())),
            Some(&human.token),
        )
        .await;
    assert_eq!(ev["sender"], "@bridge_bob:localhost");
    // Typing and a receipt of the human: ephemeral events of a room the appservice is in.
    s.put(
        &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&human.user_id)),
        Some(&human.token),
        json!({"typing": true, "timeout": 10000}),
    )
    .await;
    let (st, b) = s
        .post(
            &format!(
                "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
                enc(&room),
                enc(ev["event_id"].as_str().unwrap())
            ),
            Some(&human.token),
            json!({}),
        )
        .await;
    assert_eq!(st, 200, "{b}");

    wait_for("events and ephemeral", Duration::from_secs(20), || {
        let b = bodies(&mock.events());
        let eph: Vec<Value> =
            mock.txns.lock().iter().flat_map(|(_, t)| t["ephemeral"].as_array().cloned().unwrap_or_default()).collect();
        b.contains(&"hello human".to_owned())
            && eph.iter().any(|e| e["type"] == "m.typing")
            && eph.iter().any(|e| e["type"] == "m.receipt")
    })
    .await;
    let events = mock.events();
    let b = bodies(&events);
    assert!(b.contains(&"hello bridge".to_owned()), "{b:?}");
    assert!(!b.contains(&"private".to_owned()), "rooms without the appservice's users are not sent: {b:?}");
    assert!(events.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == "@bridge_bob:localhost"));
    assert!(events.iter().all(|e| e["room_id"].is_string() && e["event_id"].is_string()));
    let txns = mock.txns.lock().clone();
    assert!(txns.iter().any(|(_, t)| t["de.sorunome.msc2409.ephemeral"].is_array()), "unstable key too");
    // Transaction IDs increase and never repeat (no retries happened).
    let ids: Vec<u64> = txns.iter().map(|(id, _)| id.parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_survives_failures_and_restarts() {
    let (mock, url) = start_mock().await;
    let file = registration(&url, "");
    let mut s = server_with_appservice(&file, &mock).await;
    let human = s.register("human", false).await;
    let room = create(&s, &human, json!({"preset": "public_chat"})).await;
    s.post(
        "/_matrix/client/v3/register",
        Some(AS_TOKEN),
        json!({"type": "m.login.application_service", "username": "bridge_bob", "inhibit_login": true}),
    )
    .await;
    s.post(&format!("/_matrix/client/v3/join/{}?user_id=@bridge_bob:localhost", enc(&room)), Some(AS_TOKEN), json!({}))
        .await;

    // The appservice fails: transactions are retried with the same ID.
    mock.fail.store(true, Ordering::SeqCst);
    let send = |s: &TestServer, i: usize| {
        let (base, token, room) = (s.base.clone(), human.token.clone(), room.clone());
        let http = s.http.clone();
        async move {
            let r = http
                .put(format!("{base}/_matrix/client/v3/rooms/{}/send/m.room.message/m{i}", enc(&room)))
                .bearer_auth(token)
                .json(&json!({"msgtype": "m.text", "body": format!("msg {i}")}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    for i in 0..10 {
        send(&s, i).await;
    }
    // Generous: the whole suite runs beside it (Synapse peers included) on two cores.
    wait_for("retries", Duration::from_secs(60), || {
        let t = mock.txns.lock();
        t.len() >= 3 && t.iter().filter(|(id, _)| *id == t[0].0).count() >= 2
    })
    .await;
    // Restart while it still fails, and while events keep coming.
    s.restart(Duration::from_millis(200)).await;
    *mock.hs.lock() = Some(s.base.clone());
    for i in 10..20 {
        send(&s, i).await;
    }
    s.restart(Duration::from_millis(200)).await;
    for i in 20..30 {
        send(&s, i).await;
    }
    let failed_ids: BTreeSet<String> = mock.txns.lock().iter().map(|(id, _)| id.clone()).collect();
    mock.fail.store(false, Ordering::SeqCst);
    wait_for("every message", Duration::from_secs(30), || {
        let b = bodies(&mock.events());
        (0..30).all(|i| b.contains(&format!("msg {i}")))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Each message is in exactly one transaction ID (a retry repeats the ID, never the event
    // under a new ID), and the transactions that failed were retried with their IDs.
    let events = mock.events();
    let b = bodies(&events);
    for i in 0..30 {
        assert_eq!(b.iter().filter(|x| **x == format!("msg {i}")).count(), 1, "msg {i}: {b:?}");
    }
    let txns = mock.txns.lock().clone();
    for id in &failed_ids {
        let bodies_of: Vec<&Value> = txns.iter().filter(|(i, _)| i == id).map(|(_, b)| b).collect();
        assert!(bodies_of.len() >= 2, "failed transaction {id} retried");
        assert!(bodies_of.windows(2).all(|w| w[0] == w[1]), "a retry carries the same body");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registration_files_stop_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ok = "id: a\nurl: null\nas_token: t1\nhs_token: t2\nsender_localpart: abot\nnamespaces:\n  users:\n    - exclusive: true\n      regex: '@a_.*'\n";
    let cases = [
        (vec![write("bad_regex.yaml", &ok.replace("@a_.*", "@a_(.*"))], "invalid regex"),
        (vec![write("a.yaml", ok), write("dup.yaml", &ok.replace("abot", "bbot").replace("id: a", "id: b"))], "token"),
        (
            vec![
                write("a2.yaml", ok),
                write(
                    "overlap.yaml",
                    &ok.replace("t1", "t3").replace("t2", "t4").replace("abot", "bbot").replace("id: a", "id: b"),
                ),
            ],
            "overlaps",
        ),
        (vec![dir.path().join("missing.yaml")], "cannot read"),
    ];
    for (files, expected) in cases {
        let (db_url, db_name) = fresh_database().await;
        let mut c = test_config(&db_url);
        c.appservices.registration_files = files;
        let err = parvis::server::prepare(c).await.err().expect("start-up refused").to_string();
        assert!(err.contains("appservices.registration_files") && err.contains(expected), "{err}");
        drop_database(&db_name).await;
    }
}

/// `kill -9` of a real `parvis serve` while transactions fail and while a burst is delivered:
/// after restart every event is delivered, none under two transaction IDs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_delivery_loses_and_duplicates_nothing() {
    use reqwest::Method;
    let (mock, url) = start_mock().await;
    let file = registration(&url, "");
    let files = format!("[\"{}\"]", file.display());
    let server = crate::write_path::Process::new(&[
        ("PARVIS__APPSERVICES__REGISTRATION_FILES", &files),
        ("PARVIS__APPSERVICES__RETRY_INITIAL_MS", "50"),
        ("PARVIS__APPSERVICES__RETRY_MAX_SECS", "1"),
    ])
    .await;
    let mut p = server.start().await;
    *mock.hs.lock() = Some(server.base());
    let human = server.register("human").await;
    let (_, room) = server
        .call(Method::POST, "/_matrix/client/v3/createRoom", Some(&human.token), Some(json!({"preset": "public_chat"})))
        .await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let reg = json!({"type": "m.login.application_service", "username": "bridge_bob", "inhibit_login": true});
    server.call(Method::POST, "/_matrix/client/v3/register", Some(AS_TOKEN), Some(reg)).await;
    let join = format!("/_matrix/client/v3/join/{}?user_id=@bridge_bob:localhost", enc(&room));
    let (st, v) = server.call(Method::POST, &join, Some(AS_TOKEN), Some(json!({}))).await;
    assert_eq!(st, 200, "{v}");
    let send = |i: usize| {
        let (base, token, room) = (server.base(), human.token.clone(), room.clone());
        async move {
            let r = reqwest::Client::new()
                .put(format!("{base}/_matrix/client/v3/rooms/{}/send/m.room.message/k{i}", enc(&room)))
                .bearer_auth(token)
                .json(&json!({"msgtype": "m.text", "body": format!("kill {i}")}))
                .send()
                .await;
            matches!(r, Ok(r) if r.status() == 200)
        }
    };

    // Phase 1: the appservice fails; the server is killed while it retries.
    mock.fail.store(true, Ordering::SeqCst);
    for i in 0..15 {
        assert!(send(i).await);
    }
    // Generous: the whole suite runs beside it (Synapse peers included) on two cores.
    wait_for("retries", Duration::from_secs(60), || {
        let t = mock.txns.lock();
        t.len() >= 2 && t.iter().filter(|(id, _)| *id == t[0].0).count() >= 2
    })
    .await;
    p.0.kill().unwrap(); // SIGKILL
    p.0.wait().unwrap();
    let failed: Vec<(String, Value)> = mock.txns.lock().clone();
    mock.fail.store(false, Ordering::SeqCst);
    let mut p = server.start().await;

    // Phase 2: a burst while it accepts; killed in the middle.
    let mut acked = Vec::new();
    for i in 15..45 {
        if send(i).await {
            acked.push(i);
        }
        if i == 30 {
            p.0.kill().unwrap();
            p.0.wait().unwrap();
            break;
        }
    }
    let _p = server.start().await;
    wait_for("every acknowledged message", Duration::from_secs(30), || {
        let b = bodies(&mock.events());
        (0..15).chain(acked.iter().copied()).all(|i| b.contains(&format!("kill {i}")))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = bodies(&mock.events());
    for i in (0..15).chain(acked.iter().copied()) {
        assert_eq!(
            b.iter().filter(|x| **x == format!("kill {i}")).count(),
            1,
            "kill {i} under one transaction ID: {b:?}"
        );
    }
    // The transactions refused before the kill were resent after it with the same ID and body.
    let txns = mock.txns.lock().clone();
    for (id, body) in &failed {
        assert!(
            txns.iter().skip(failed.len()).any(|(i, b)| i == id && b == body),
            "transaction {id} resent after the kill"
        );
    }
    server.finish().await;
}
