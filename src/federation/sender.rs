//! The outbound federation sender: one worker per destination server sends what the outbox
//! (`federation_outbox`, written in the transaction that appended each event) holds for it, as
//! `PUT /_matrix/federation/v1/send/{txnId}` transactions of at most 50 PDUs and 100 EDUs, in
//! order. An acknowledged transaction's rows are deleted; a failure backs the destination off
//! exponentially (persisted, so a restart does not hammer a server that is down), and the
//! backlog is sent when it returns: any request from that server ends its back-off at once.
//!
//! The transaction ID is derived from the outbox rows it carries, so a transaction retried after
//! a crash or a lost answer is recognised by the destination as the same one.
//!
//! One instance sends for all (the `federation-sender` lease, see `cluster::lease`); the others
//! only write to the outbox. The holder also looks at the outbox every few seconds, for rows
//! written by other instances.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use ruma::ServerName;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, watch};

use crate::state::AppState;
use crate::storage::{self, now_ms};

/// The lease of the sender.
pub const LEASE: &str = "federation-sender";
/// Most PDUs and EDUs of one transaction (the spec's limits).
const MAX_PDUS: usize = 50;
const MAX_EDUS: usize = 100;
/// First and longest back-off after failures.
const BACKOFF_BASE_MS: i64 = 500;
const BACKOFF_MAX_MS: i64 = 10 * 60 * 1000;
/// How often the outbox is looked at without a wake-up (rows of other instances).
const POLL: Duration = Duration::from_secs(2);
/// Largest answer read from `/send`.
const MAX_SEND_RESPONSE: usize = 1024 * 1024;

/// The handle the room engine wakes destinations through.
pub struct Sender {
    tx: mpsc::UnboundedSender<Wake>,
    rx: parking_lot::Mutex<Option<mpsc::UnboundedReceiver<Wake>>>,
}

enum Wake {
    /// Something was queued for this destination.
    Queued(String),
    /// This server talked to us: it is up, end its back-off.
    Contact(String),
}

impl Default for Sender {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self { tx, rx: parking_lot::Mutex::new(Some(rx)) }
    }
}

impl Sender {
    /// Wakes the workers of `destinations` (after a commit that queued something for them).
    pub fn wake_all(&self, destinations: &[String]) {
        for d in destinations {
            let _ = self.tx.send(Wake::Queued(d.clone()));
        }
    }

    /// `server` just sent us an authenticated request: it is up.
    pub fn contact(&self, server: &str) {
        let _ = self.tx.send(Wake::Contact(server.to_owned()));
    }
}

/// Runs the sender while this instance holds its lease.
pub fn spawn(state: &AppState, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let s = state.clone();
    let rx = Arc::new(tokio::sync::Mutex::new(state.federation.sender.rx.lock().take()));
    tokio::spawn(crate::cluster::lease::run(state.clone(), LEASE.to_owned(), stop, None, move |stop| {
        let (state, rx) = (s.clone(), rx.clone());
        async move {
            let mut guard = rx.lock().await;
            match guard.as_mut() {
                Some(rx) => run(state, rx, stop).await,
                None => Ok(()),
            }
        }
    }))
}

struct Worker {
    notify: Arc<Notify>,
    /// Set when the destination contacted us: skip the rest of the back-off.
    contact: Arc<Notify>,
}

async fn run(
    state: AppState,
    rx: &mut mpsc::UnboundedReceiver<Wake>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if !state.federation.enabled {
        let _ = stop.wait_for(|s| *s).await;
        return Ok(());
    }
    let mut workers: HashMap<String, Worker> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let mut poll = tokio::time::interval(POLL);
    let worker_stop = stop.clone();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let wake = tokio::select! {
            r = stop.changed() => { if r.is_err() { return Ok(()) } None }
            w = rx.recv() => match w { Some(w) => Some(w), None => return Ok(()) },
            Some(d) = done_rx.recv() => { workers.remove(&d); None }
            _ = poll.tick() => {
                match storage::remote::pending_destinations(&state.db).await {
                    Ok(ds) => {
                        for d in ds {
                            ensure(&state, &mut workers, &d, &worker_stop, &done_tx).notify.notify_one();
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "federation outbox poll failed"),
                }
                None
            }
        };
        match wake {
            Some(Wake::Queued(d)) => ensure(&state, &mut workers, &d, &worker_stop, &done_tx).notify.notify_one(),
            Some(Wake::Contact(d)) => {
                if let Some(w) = workers.get(&d) {
                    w.contact.notify_one();
                }
            }
            None => {}
        }
    }
}

fn ensure<'a>(
    state: &AppState,
    workers: &'a mut HashMap<String, Worker>,
    destination: &str,
    stop: &watch::Receiver<bool>,
    done: &mpsc::UnboundedSender<String>,
) -> &'a Worker {
    workers.entry(destination.to_owned()).or_insert_with(|| {
        let w = Worker { notify: Arc::new(Notify::new()), contact: Arc::new(Notify::new()) };
        let (state, dest, stop, done) = (state.clone(), destination.to_owned(), stop.clone(), done.clone());
        let (notify, contact) = (w.notify.clone(), w.contact.clone());
        tokio::spawn(async move {
            worker(&state, &dest, notify, contact, stop).await;
            let _ = done.send(dest);
        });
        w
    })
}

/// An idle worker ends after this long (the next item starts a new one).
const IDLE: Duration = Duration::from_secs(300);

async fn worker(
    state: &AppState,
    destination: &str,
    notify: Arc<Notify>,
    contact: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(server) = ServerName::parse(destination) else {
        tracing::warn!(destination, "outbox rows for an invalid server name are dropped");
        let _ = storage::remote::drop_destination(&state.db, destination).await;
        return;
    };
    loop {
        if *stop.borrow() {
            return;
        }
        // Back-off after failures (persisted), cut short when the destination contacts us.
        if let Ok(Some((failures, retry_after))) = storage::remote::backoff(&state.db, destination).await
            && failures > 0
            && retry_after > now_ms()
        {
            let wait = Duration::from_millis((retry_after - now_ms()).max(0) as u64);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = contact.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        let items = match storage::remote::queued(&state.db, destination, (MAX_PDUS + MAX_EDUS) as i64).await {
            Ok(items) => items,
            Err(e) => {
                tracing::warn!(destination, error = %e, "reading the federation outbox failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if items.is_empty() {
            tokio::select! {
                _ = notify.notified() => continue,
                _ = tokio::time::sleep(IDLE) => return,
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        let (mut pdus, mut edus, mut first, mut last) = (Vec::new(), Vec::new(), None, 0);
        for item in &items {
            match (&item.json, &item.edu) {
                (Some(json), _) if pdus.len() < MAX_PDUS => {
                    if let Ok(v) = serde_json::from_str::<Value>(json) {
                        pdus.push(v);
                    }
                }
                (None, Some(edu)) if edus.len() < MAX_EDUS => edus.push(edu.clone()),
                // An event deleted since (retention) leaves a row without JSON: skipped.
                (None, None) => {}
                _ => break,
            }
            first.get_or_insert(item.seq);
            last = item.seq;
        }
        let txn_id = format!("{}-{}", first.unwrap_or(last), last);
        let body = json!({
            "origin": state.config.server_name,
            "origin_server_ts": now_ms(),
            "pdus": pdus,
            "edus": edus,
        });
        let path = format!("/_matrix/federation/v1/send/{txn_id}");
        let started = std::time::Instant::now();
        match state.federation.request(Method::PUT, &server, &path, Some(&body), true, MAX_SEND_RESPONSE).await {
            Ok(answer) => {
                if let Some(results) = answer.get("pdus").and_then(Value::as_object) {
                    for (id, r) in results {
                        if let Some(err) = r.get("error") {
                            tracing::info!(destination, event_id = %id, error = %err, "destination refused a PDU");
                        }
                    }
                }
                tracing::debug!(
                    destination,
                    txn_id,
                    pdus = pdus.len(),
                    edus = edus.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "federation transaction sent"
                );
                if let Err(e) = storage::remote::acknowledged(&state.db, destination, last).await {
                    tracing::warn!(destination, error = %e, "recording a sent transaction failed");
                }
            }
            Err(e) => {
                let failures = storage::remote::backoff(&state.db, destination).await.ok().flatten().map_or(0, |b| b.0);
                let delay = BACKOFF_BASE_MS.saturating_mul(1 << failures.clamp(0, 20)).min(BACKOFF_MAX_MS);
                tracing::info!(destination, error = %e, retry_in_ms = delay, "federation transaction failed");
                if let Err(e) = storage::remote::failed(&state.db, destination, now_ms() + delay).await {
                    tracing::warn!(destination, error = %e, "recording a failed transaction failed");
                }
            }
        }
    }
}

/// Ends the back-off of `server` (it contacted us), in the database too, so that its backlog
/// goes out now.
pub async fn contacted(state: &AppState, server: &str) {
    if let Ok(Some((failures, _))) = storage::remote::backoff(&state.db, server).await
        && failures > 0
    {
        let _ = storage::remote::reset_backoff(&state.db, server).await;
        state.federation.sender.contact(server);
        state.federation.sender.wake_all(&[server.to_owned()]);
    }
}
