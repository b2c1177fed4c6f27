//! The appservice WebSocket transport, against a client speaking mautrix-go's side of the
//! protocol (`appservice/websocket.go`, version 3): `GET /_matrix/client/unstable/fi.mau.as_sync`
//! with the `as_token`, transactions as `{"id", "command": "transaction", "status": "ok",
//! "txn_id", "events", ...}`, acknowledged with `{"id", "command": "response", "data":
//! {"txn_id"}}`.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::appservice::{AS_TOKEN, registration};
use crate::common::*;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn server(extra: &str) -> (TestServer, tempfile::TempPath) {
    server_with_timeout(extra, 30).await
}

async fn server_with_timeout(extra: &str, timeout_secs: u64) -> (TestServer, tempfile::TempPath) {
    let file = registration("null", extra);
    let path = file.to_path_buf();
    let s = TestServer::start_with(move |c| {
        c.appservices.registration_files = vec![path];
        c.appservices.retry_initial_ms = 50;
        c.appservices.retry_max_secs = 1;
        c.appservices.request_timeout_secs = timeout_secs;
    })
    .await;
    (s, file)
}

/// Reads until the server's close frame; returns its code and JSON reason.
async fn close_frame(ws: &mut Ws) -> (u16, Value) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("the socket closes") {
            Some(Ok(Message::Close(f))) => {
                let f = f.expect("a close frame");
                return (u16::from(f.code), serde_json::from_str(f.reason.as_str()).expect("a JSON reason"));
            }
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}

/// Connects as mautrix-go does (its headers included).
async fn connect(s: &TestServer, token: Option<&str>) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let url = format!("{}/_matrix/client/unstable/fi.mau.as_sync", s.base.replacen("http", "ws", 1));
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut().insert("Authorization", format!("Bearer {t}").parse().unwrap());
    }
    req.headers_mut().insert("X-Mautrix-Process-ID", "parvis-test".parse().unwrap());
    req.headers_mut().insert("X-Mautrix-Websocket-Version", "3".parse().unwrap());
    tokio_tungstenite::connect_async(req).await.map(|(ws, _)| ws)
}

/// Connects and reads the welcome message.
async fn connected(s: &TestServer) -> Ws {
    let mut ws = connect(s, Some(AS_TOKEN)).await.expect("websocket connects");
    assert_eq!(next(&mut ws).await, json!({"status": "connected"}));
    // The instance the socket is connected to takes the appservice's delivery lease (a moment
    // later): the tests' timelines start once it holds it.
    let start = Instant::now();
    loop {
        let text = s.http.get(format!("{}/metrics", s.metrics)).send().await.unwrap().text().await.unwrap();
        if text.contains("parvis_leases_held{lease=\"appservice:testbridge\"} 1") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the delivery lease was not taken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ws
}

/// The next JSON message (pings are answered by tungstenite); panics on close or silence.
async fn next(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a message within 20 s")
            .expect("the socket is open")
            .expect("a valid message");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON"),
            Message::Close(f) => panic!("closed by the server: {f:?}"),
            _ => {}
        }
    }
}

async fn next_txn(ws: &mut Ws) -> Value {
    let t = next(ws).await;
    assert_eq!(t["command"], "transaction", "{t}");
    assert_eq!(t["status"], "ok", "{t}");
    assert!(t["id"].as_u64().is_some_and(|i| i > 0), "{t}");
    assert!(t["txn_id"].as_str().is_some_and(|i| !i.is_empty()), "{t}");
    assert!(t["events"].is_array(), "{t}");
    t
}

/// Acknowledges a transaction as mautrix-go's `defaultHandleWebsocketTransaction` does.
async fn ack(ws: &mut Ws, t: &Value) {
    let resp = json!({"id": t["id"], "command": "response", "data": {"txn_id": t["txn_id"]}});
    ws.send(Message::Text(resp.to_string().into())).await.unwrap();
}

fn bodies(t: &Value) -> Vec<String> {
    t["events"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
}

/// Reads and acknowledges transactions until every `want` body was seen; returns the
/// transaction IDs seen, in order.
async fn ack_until(ws: &mut Ws, want: &[String]) -> Vec<String> {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut ids = Vec::new();
    while !want.iter().all(|w| seen.contains(w)) {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out; saw {seen:?}, want {want:?}");
        let t = next_txn(ws).await;
        seen.extend(bodies(&t));
        ids.push(t["txn_id"].as_str().unwrap().to_owned());
        ack(ws, &t).await;
    }
    ids
}

/// A human's room with the appservice's `@bridge_bob` in it.
async fn room_with_bridge_user(s: &TestServer) -> (User, String) {
    let human = s.register("human", false).await;
    let room = create(s, &human, json!({"preset": "public_chat"})).await;
    let (st, b) = s
        .post(
            "/_matrix/client/v3/register",
            Some(AS_TOKEN),
            json!({"type": "m.login.application_service", "username": "bridge_bob", "inhibit_login": true}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let (st, b) = s
        .post(
            &format!("/_matrix/client/v3/join/{}?user_id=@bridge_bob:localhost", enc(&room)),
            Some(AS_TOKEN),
            json!({}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    (human, room)
}

async fn say(s: &TestServer, u: &User, room: &str, body: &str) {
    let (st, b) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{}", enc(room), enc(body)),
            Some(&u.token),
            json!({"msgtype": "m.text", "body": body}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
}

fn without_request_id(t: &Value) -> Value {
    let mut t = t.clone();
    t.as_object_mut().unwrap().remove("id");
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_refuses_missing_and_wrong_tokens() {
    let (s, _file) = server("parvis.websocket: true\n").await;
    for (token, errcode) in [(None, "M_MISSING_TOKEN"), (Some("not_the_as_token"), "M_UNKNOWN_TOKEN")] {
        match connect(&s, token).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 403, "{token:?}");
                let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
                assert_eq!(body["errcode"], errcode, "{body}");
            }
            Err(e) => panic!("{token:?}: {e}"),
            Ok(_) => panic!("{token:?}: connected"),
        }
    }
    s.stop().await;
    // An appservice delivered over HTTP cannot take its transactions over a socket.
    let (s, _file) = server("").await;
    match connect(&s, Some(AS_TOKEN)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("{:?}", other.map(|_| ())),
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_delivers_acknowledges_and_redelivers() {
    let (mut s, _file) = server("parvis.websocket: true\nreceive_ephemeral: true\n").await;
    let mut ws = connected(&s).await;
    let (human, room) = room_with_bridge_user(&s).await;

    // The ping command (mautrix bridges' `ping_interval_seconds`).
    ws.send(Message::Text(json!({"id": 7, "command": "ping", "data": {"timestamp": 1}}).to_string().into()))
        .await
        .unwrap();
    // A transaction may come first: it is kept and answered after the pong.
    let mut early = Vec::new();
    let pong = loop {
        let m = next(&mut ws).await;
        if m["command"] == "transaction" {
            early.push(m);
        } else {
            break m;
        }
    };
    assert_eq!(pong["id"], 7, "{pong}");
    assert_eq!(pong["command"], "response", "{pong}");
    assert!(pong["data"]["timestamp"].as_i64().is_some_and(|t| t > 1_000_000_000_000), "{pong}");

    say(&s, &human, &room, "ws one").await;
    // The first transaction is not acknowledged: the socket closes first.
    let first = match early.first() {
        Some(t) => t.clone(),
        None => next_txn(&mut ws).await,
    };
    ws.close(None).await.unwrap();
    drop(ws);

    // On the next connection it comes again: same ID, same body.
    let mut ws = connected(&s).await;
    let again = next_txn(&mut ws).await;
    assert_eq!(again["txn_id"], first["txn_id"], "redelivered with the same txn_id");
    assert_eq!(without_request_id(&again), without_request_id(&first), "same body");
    ack(&mut ws, &again).await;
    let mut ids = vec![again["txn_id"].as_str().unwrap().to_owned()];
    ids.extend(ack_until(&mut ws, &["ws one".to_owned()]).await);
    // An acknowledged transaction is never sent again; IDs grow.
    let nums: Vec<i64> = ids.iter().map(|i| i.parse().unwrap()).collect();
    assert!(nums.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    // An unknown command is answered with an error.
    ws.send(Message::Text(json!({"id": 9, "command": "no_such_thing", "data": {}}).to_string().into())).await.unwrap();
    let err = next(&mut ws).await;
    assert_eq!(err["id"], 9, "{err}");
    assert_eq!(err["command"], "error", "{err}");
    assert!(err["data"]["message"].as_str().is_some_and(|m| m.contains("no_such_thing")), "{err}");

    // Events sent while no socket is connected, across a restart, arrive on reconnect.
    ws.close(None).await.unwrap();
    drop(ws);
    for i in 0..3 {
        say(&s, &human, &room, &format!("offline {i}")).await;
    }
    s.restart(Duration::from_millis(100)).await;
    for i in 3..5 {
        say(&s, &human, &room, &format!("offline {i}")).await;
    }
    let mut ws = connected(&s).await;
    let want: Vec<String> = (0..5).map(|i| format!("offline {i}")).collect();
    let later = ack_until(&mut ws, &want).await;
    let later_nums: Vec<i64> = later.iter().map(|i| i.parse().unwrap()).collect();
    assert!(later_nums.iter().all(|n| n > nums.last().unwrap()), "{later:?} after {ids:?}");

    // A second connection replaces the first, which is closed with 4001 `conn_replaced`.
    let mut newer = connected(&s).await;
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!(code, 4001);
    assert_eq!(reason, json!({"command": "disconnect", "status": "conn_replaced"}));
    say(&s, &human, &room, "to the newer").await;
    ack_until(&mut newer, &["to the newer".to_owned()]).await;
    // Ephemeral events (MSC2409) come the same way.
    let (st, b) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&human.user_id)),
            Some(&human.token),
            json!({"typing": true, "timeout": 30000}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(30), "no m.typing over the socket");
        let t = next_txn(&mut newer).await;
        ack(&mut newer, &t).await;
        let typing = t["ephemeral"].as_array().is_some_and(|e| {
            e.iter().any(|ev| ev["type"] == "m.typing" && ev["content"]["user_ids"][0] == human.user_id.as_str())
        });
        if typing {
            break;
        }
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_unacknowledged_times_out_and_shutdown_closes() {
    let (s, _file) = server_with_timeout("parvis.websocket: true\n", 1).await;
    let mut ws = connected(&s).await;
    let (human, room) = room_with_bridge_user(&s).await;
    say(&s, &human, &room, "never acked").await;
    let first = next_txn(&mut ws).await;
    // No acknowledgement within `request_timeout_secs`: closed with 4002.
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!(code, 4002);
    assert_eq!(reason, json!({"command": "disconnect", "status": "transactions_not_acknowledged"}));
    drop(ws);
    // It comes again on the next connection, with its ID.
    let mut ws = connected(&s).await;
    let again = next_txn(&mut ws).await;
    assert_eq!(again["txn_id"], first["txn_id"]);
    ack(&mut ws, &again).await;
    ack_until(&mut ws, &["never acked".to_owned()]).await;
    // A stopping server says so.
    let stopping = tokio::spawn(s.stop());
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!(code, 1001);
    assert_eq!(reason, json!({"command": "disconnect", "status": "server_shutting_down"}));
    stopping.await.unwrap();
}
