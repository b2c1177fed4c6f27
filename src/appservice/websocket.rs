//! The WebSocket transport for appservices Parvis cannot reach: the appservice connects out to
//! Parvis and receives its transactions over that connection. Parvis speaks the server side of
//! mautrix's "appservice websocket" (protocol version 3 of mautrix-go's `appservice` package, the
//! side mautrix-wsproxy and mautrix-asmux implement):
//!
//! - `GET /_matrix/client/unstable/fi.mau.as_sync` with `Authorization: Bearer <as_token>`
//!   (mautrix-go also sends `X-Mautrix-Process-ID` and `X-Mautrix-Websocket-Version: 3`; they are
//!   only logged). A missing token is 403 `M_MISSING_TOKEN`, an unknown one 403
//!   `M_UNKNOWN_TOKEN` (as wsproxy answers); an appservice whose registration lacks
//!   `parvis.websocket: true` gets 403 `M_FORBIDDEN`.
//! - After the upgrade Parvis sends `{"status": "connected"}`. One live connection per
//!   appservice: a new one replaces the old, which is closed with code 4001 and reason
//!   `{"command": "disconnect", "status": "conn_replaced"}`.
//! - A transaction is one text message: the transaction body (`events`, `ephemeral`, ...) plus
//!   `"status": "ok"`, `"txn_id"`, and a request `"id"` with `"command": "transaction"`. The
//!   appservice acknowledges with `{"id": <id>, "command": "response", "data": {"txn_id": ...}}`
//!   (mautrix-go does this after handling it); `"command": "error"` is a failure (retried with
//!   backoff). The transaction row is deleted only after the acknowledgement; a connection that
//!   closes first gets it again (same `txn_id`, same body) on the next connection, and mautrix-go
//!   drops a transaction ID it already processed. No acknowledgement within
//!   `appservices.request_timeout_secs`: the connection is closed with 4002
//!   `transactions_not_acknowledged`.
//! - Commands from the appservice (`{"id", "command", "data"}`): `ping` is answered with
//!   `{"id", "command": "response", "data": {"timestamp": <ms>}}` (mautrix bridges'
//!   `ping_interval_seconds`), others with `"command": "error"`.
//! - WebSocket pings every 30 s; a connection silent for 90 s is dropped. Incoming messages are
//!   bounded (1 MiB). On shutdown: close 1001 with `{"command": "disconnect", "status":
//!   "server_shutting_down"}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use super::Registration;
use crate::error::Error;
use crate::state::AppState;

pub const PATH: &str = "/_matrix/client/unstable/fi.mau.as_sync";

/// Largest message (and frame) accepted from an appservice: commands and acknowledgements.
const MAX_INCOMING: usize = 1 << 20;
const PING_EVERY: Duration = Duration::from_secs(30);
const SILENCE_LIMIT: Duration = Duration::from_secs(90);
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_CONN_REPLACED: u16 = 4001;
const CLOSE_TXN_NOT_ACKNOWLEDGED: u16 = 4002;

/// Why a transaction was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// The connection ended first: send it again on the next connection (no backoff).
    #[error("the websocket closed before the acknowledgement")]
    Closed,
    /// The appservice answered `error`, or did not answer in time.
    #[error("{0}")]
    Failed(String),
}

enum Out {
    Text(String),
    Close(u16, &'static str),
}

/// The answer a delivery waits for: acknowledged, or the appservice's error.
type Ack = oneshot::Sender<Result<(), String>>;

/// One live connection.
struct Socket {
    id: u64,
    out: mpsc::Sender<Out>,
    /// Request ID → (transaction ID, the waiting delivery).
    waiting: Mutex<HashMap<u64, (String, Ack)>>,
    next_request: AtomicU64,
}

/// The live connection of each websocket appservice.
pub struct Sockets {
    live: Mutex<HashMap<String, watch::Sender<Option<Arc<Socket>>>>>,
    next_id: AtomicU64,
    shutdown: watch::Sender<bool>,
}

impl Default for Sockets {
    fn default() -> Self {
        Self { live: Mutex::default(), next_id: AtomicU64::new(1), shutdown: watch::Sender::new(false) }
    }
}

impl Sockets {
    fn slot(&self, appservice: &str) -> watch::Sender<Option<Arc<Socket>>> {
        self.live.lock().entry(appservice.to_owned()).or_insert_with(|| watch::Sender::new(None)).clone()
    }

    /// Whether the appservice's socket is connected to this instance.
    pub fn is_connected(&self, appservice: &str) -> bool {
        self.live.lock().get(appservice).is_some_and(|s| s.borrow().is_some())
    }

    /// Closes every connection (`server_shutting_down`) and refuses new ones.
    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
    }

    /// Sends one transaction over the appservice's connection (waiting until there is one) and
    /// waits for its acknowledgement.
    pub async fn deliver(
        &self,
        appservice: &str,
        txn_id: i64,
        body: &Value,
        timeout: Duration,
    ) -> Result<(), DeliverError> {
        let mut rx = self.slot(appservice).subscribe();
        let socket = match rx.wait_for(|s| s.is_some()).await {
            Ok(s) => s.clone().expect("waited for a socket"),
            Err(_) => return Err(DeliverError::Closed),
        };
        let request = socket.next_request.fetch_add(1, Ordering::Relaxed);
        let txn = txn_id.to_string();
        let mut msg = body.clone();
        let Some(obj) = msg.as_object_mut() else {
            return Err(DeliverError::Failed("transaction body is not an object".into()));
        };
        obj.insert("id".into(), json!(request));
        obj.insert("command".into(), json!("transaction"));
        obj.insert("status".into(), json!("ok"));
        obj.insert("txn_id".into(), json!(txn));
        let (tx, ack) = oneshot::channel();
        socket.waiting.lock().insert(request, (txn, tx));
        if socket.out.send(Out::Text(msg.to_string())).await.is_err() {
            socket.waiting.lock().remove(&request);
            return Err(DeliverError::Closed);
        }
        match tokio::time::timeout(timeout, ack).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(DeliverError::Failed(e)),
            Ok(Err(_)) => Err(DeliverError::Closed),
            Err(_) => {
                socket.waiting.lock().remove(&request);
                let _ = socket.out.try_send(Out::Close(CLOSE_TXN_NOT_ACKNOWLEDGED, "transactions_not_acknowledged"));
                Err(DeliverError::Failed(format!("not acknowledged within {timeout:?}")))
            }
        }
    }

    /// Makes `socket` the appservice's connection; returns the one it replaces.
    fn install(&self, appservice: &str, socket: Arc<Socket>) -> Option<Arc<Socket>> {
        self.slot(appservice).send_replace(Some(socket))
    }

    /// Forgets the connection `id` if it is still the appservice's.
    fn remove(&self, appservice: &str, id: u64) {
        self.slot(appservice).send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|s| s.id == id) {
                *cur = None;
                true
            } else {
                false
            }
        });
    }
}

fn refuse(errcode: &'static str, message: &str) -> Response {
    Error::new(StatusCode::FORBIDDEN, errcode, message).into_response()
}

/// `GET /_matrix/client/unstable/fi.mau.as_sync`: authenticates the `as_token`, then upgrades.
pub async fn connect(
    State(state): State<AppState>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty());
    let Some(token) = token else { return refuse("M_MISSING_TOKEN", "Missing authorization header") };
    let Some(reg) = state.appservices.by_token(token).cloned() else {
        return refuse("M_UNKNOWN_TOKEN", "Unknown authorization token");
    };
    if !reg.websocket {
        return refuse(
            "M_FORBIDDEN",
            "This application service does not use the websocket transport (`parvis.websocket: true` in its registration)",
        );
    }
    if *state.appservice_sockets.shutdown.borrow() {
        return Error::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "The server is shutting down").into_response();
    }
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let header_text =
        |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(|v| v.chars().take(64).collect::<String>());
    let process = header_text("x-mautrix-process-id").unwrap_or_default();
    let version = header_text("x-mautrix-websocket-version").unwrap_or_default();
    upgrade
        .max_message_size(MAX_INCOMING)
        .max_frame_size(MAX_INCOMING)
        .on_upgrade(move |socket| serve(state, reg, socket, process, version))
}

/// One connection, from the welcome message to the close.
async fn serve(state: AppState, reg: Arc<Registration>, mut ws: WebSocket, process: String, version: String) {
    let sockets = &state.appservice_sockets;
    let (tx, mut rx) = mpsc::channel(16);
    let socket = Arc::new(Socket {
        id: sockets.next_id.fetch_add(1, Ordering::Relaxed),
        out: tx,
        waiting: Mutex::default(),
        next_request: AtomicU64::new(1),
    });
    if ws.send(Message::Text(r#"{"status":"connected"}"#.into())).await.is_err() {
        return;
    }
    tracing::info!(appservice = %reg.id, connection = socket.id, %process, %version, "appservice websocket connected");
    if let Some(old) = sockets.install(&reg.id, socket.clone()) {
        let _ = old.out.try_send(Out::Close(CLOSE_CONN_REPLACED, "conn_replaced"));
    }
    let mut shutdown = sockets.shutdown.subscribe();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let mut last_heard = Instant::now();
    let close = loop {
        tokio::select! {
            msg = ws.recv() => match msg {
                Some(Ok(Message::Text(text))) => {
                    last_heard = Instant::now();
                    if let Some(reply) = handle(&socket, &reg, text.as_str())
                        && ws.send(Message::Text(reply.into())).await.is_err()
                    {
                        break None;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break None,
                Some(Ok(_)) => last_heard = Instant::now(),
            },
            out = rx.recv() => match out {
                Some(Out::Text(text)) => {
                    if ws.send(Message::Text(text.into())).await.is_err() {
                        break None;
                    }
                }
                Some(Out::Close(code, status)) => break Some((code, status)),
                None => break None,
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > SILENCE_LIMIT {
                    tracing::info!(appservice = %reg.id, connection = socket.id, "appservice websocket silent; closing");
                    break Some((CLOSE_GOING_AWAY, "timeout"));
                }
                if ws.send(Message::Ping(Default::default())).await.is_err() {
                    break None;
                }
            }
            // (Mapped to `()`: the `watch::Ref` it yields must not live across the awaits above.)
            _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => {
                break Some((CLOSE_GOING_AWAY, "server_shutting_down"));
            }
        }
    };
    // Refuse further messages, forget it, then fail its waiting deliveries: they go out again
    // on the next one. (In that order: a delivery whose message was accepted had registered
    // its waiter before, so it is cleared here; later ones fail to send.)
    rx.close();
    sockets.remove(&reg.id, socket.id);
    socket.waiting.lock().clear();
    if let Some((code, status)) = close {
        let reason = json!({ "command": "disconnect", "status": status }).to_string();
        let frame = CloseFrame { code, reason: reason.into() };
        let _ = tokio::time::timeout(Duration::from_secs(3), ws.send(Message::Close(Some(frame)))).await;
    }
    tracing::info!(appservice = %reg.id, connection = socket.id, ?close, "appservice websocket closed");
}

/// One text message from the appservice; returns the reply to send, if any.
fn handle(socket: &Socket, reg: &Registration, text: &str) -> Option<String> {
    let Ok(msg) = serde_json::from_str::<Value>(text) else {
        tracing::debug!(appservice = %reg.id, "ignoring a websocket message that is not JSON");
        return None;
    };
    let id = msg["id"].as_u64().unwrap_or(0);
    let command = msg["command"].as_str().unwrap_or("");
    match command {
        "response" | "error" => {
            let waiting = socket.waiting.lock().remove(&id);
            let Some((txn_id, tx)) = waiting else {
                tracing::debug!(appservice = %reg.id, id, "response to no waiting request");
                return None;
            };
            let result = if command == "error" {
                let m = msg["data"]["message"].as_str().unwrap_or("no message");
                Err(format!("the appservice answered error: {}", m.chars().take(200).collect::<String>()))
            } else {
                match msg["data"]["txn_id"].as_str() {
                    Some(acked) if acked != txn_id => Err(format!("acknowledged {acked:.64} for {txn_id}")),
                    _ => Ok(()),
                }
            };
            let _ = tx.send(result);
            None
        }
        "ping" => (id != 0)
            .then(|| json!({ "id": id, "command": "response", "data": { "timestamp": crate::storage::now_ms() } }))
            .map(|v| v.to_string()),
        "connect" | "" => None,
        other => (id != 0)
            .then(|| {
                json!({ "id": id, "command": "error",
                    "data": { "code": "M_UNRECOGNIZED", "message": format!("unknown command {other:.64}") } })
            })
            .map(|v| v.to_string()),
    }
}
