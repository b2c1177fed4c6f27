//! Delayed events (MSC4140): events a user schedules now and the server sends later, unless they
//! are cancelled or restarted first. Element Call schedules its "left the call" state event with a
//! short delay and restarts it every few seconds while the call runs: if the client disappears, the
//! server sends it.
//!
//! Rows live in `delayed_events` (migration 0022), so a scheduled event survives a restart and is
//! sent by the next process if it fell due meanwhile. [`run`] sends due events: each one under a
//! `FOR UPDATE` lock of its row, through the ordinary write path (`rooms::send`: power levels and
//! auth rules are those of the moment it is sent), then the row is finalised in the same
//! transaction, so two instances never send the same row. If the process dies between the send and
//! that commit, the next one sends it again (at least once).
//!
//! Outcomes are kept for `delayed_events.finalised_retention_secs` and listed by `GET
//! /delayed_events` (`finalised`). A state event sent by another user for the same room, type and
//! state key cancels the user's scheduled state events for it (reason `overwritten`), as Synapse
//! does: sending them later would undo that user's change. The user's own state events do not:
//! Element Call schedules its delayed "leave" before sending its "join" to the same state key.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::error::{ApiResult, Error};
use crate::rooms::{self, NewEvent, Room};
use crate::state::AppState;
use crate::storage::delayed_events::{self as store, DelayedRow, NewDelayed};
use crate::storage::now_ms;

/// Largest content of a delayed event (the same bound as an event's whole PDU).
const MAX_CONTENT_BYTES: usize = 65_536;
/// Due events sent per pass of the sender.
const BATCH: i64 = 100;
/// The sender looks at the table at least this often (events scheduled through another instance).
const MAX_SLEEP_MS: i64 = 5_000;

/// A scheduling request.
pub struct Schedule<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
    pub is_admin: bool,
    pub room: &'a Room,
    pub event_type: &'a str,
    pub state_key: Option<&'a str>,
    pub content: Value,
    pub delay_ms: u64,
    /// `(scope, transaction ID)` of a `/send` request.
    pub txn: Option<(String, &'a str)>,
}

/// Parses the `org.matrix.msc4140.delay` query parameter: milliseconds, positive, at most
/// `delayed_events.max_delay_ms` (400 `M_MAX_DELAY_EXCEEDED`, with `max_delay`).
pub fn parse_delay(state: &AppState, raw: &str) -> ApiResult<u64> {
    let delay: u64 =
        raw.parse().map_err(|_| Error::invalid_param("org.matrix.msc4140.delay must be a positive integer"))?;
    if delay == 0 {
        return Err(Error::invalid_param("org.matrix.msc4140.delay must be at least 1"));
    }
    let max = state.config.delayed_events.max_delay_ms;
    if delay > max {
        return Err(Error::new(
            axum::http::StatusCode::BAD_REQUEST,
            "M_MAX_DELAY_EXCEEDED",
            format!("The requested delay exceeds the allowed maximum of {max} ms"),
        )
        .with("max_delay", json!(max)));
    }
    Ok(delay)
}

fn random_delay_id() -> String {
    let bytes: [u8; 24] = rand::random();
    use base64::Engine;
    format!("pvd_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Schedules an event; answers its `delay_id`. Nothing is answered before the row is committed.
pub async fn schedule(state: &AppState, s: Schedule<'_>) -> ApiResult<String> {
    let cfg = &state.config.delayed_events;
    if state.config.rate_limits.enabled && !(s.is_admin && state.config.rate_limits.exempt_admins) {
        state.rtc.schedule_per_user.check(s.user_id).map_err(Error::limit_exceeded)?;
    }
    if s.event_type.is_empty() || s.event_type.len() > 255 {
        return Err(Error::invalid_param("Invalid event type"));
    }
    if s.state_key.is_some_and(|k| k.len() > 255) {
        return Err(Error::invalid_param("state_key is too long"));
    }
    // Redactions need the checks of `/redact`, canonical aliases those of `PUT /state` at the
    // time of sending: not delayed.
    if matches!(s.event_type, "m.room.redaction" | "m.room.create" | "m.room.canonical_alias") {
        return Err(Error::invalid_param(format!("{} cannot be delayed", s.event_type)));
    }
    if !s.content.is_object() {
        return Err(Error::bad_json("Event content must be a JSON object"));
    }
    if serde_json::to_vec(&s.content).map_or(usize::MAX, |v| v.len()) > MAX_CONTENT_BYTES {
        return Err(Error::too_large("Event content is too large"));
    }
    crate::rooms::client::require_joined(state, s.room, s.user_id).await?;

    let mut tx = state.db.begin().await?;
    store::lock_user(&mut *tx, s.user_id).await?;
    if let Some((scope, id)) = &s.txn
        && let Some(existing) = store::by_txn(&mut *tx, s.user_id, s.device_id, scope, id).await?
    {
        return Ok(existing);
    }
    let now = now_ms();
    let (count, next) = store::count_scheduled(&mut *tx, s.user_id).await?;
    if count >= i64::from(cfg.max_scheduled_per_user) {
        let wait = next.map_or(1000, |t| (t - now).max(1000)) as u64;
        return Err(Error::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "M_LIMIT_EXCEEDED",
            "The maximum number of delayed events has been reached",
        )
        .with("retry_after_ms", json!(wait)));
    }
    let delay_id = random_delay_id();
    let inserted = store::insert(
        &mut *tx,
        &NewDelayed {
            delay_id: &delay_id,
            user_id: s.user_id,
            device_id: s.device_id,
            room_id: s.room.room_id.as_str(),
            event_type: s.event_type,
            state_key: s.state_key,
            content: &s.content,
            delay_ms: s.delay_ms as i64,
            now,
            txn: s.txn.as_ref().map(|(scope, id)| (scope.as_str(), *id)),
        },
    )
    .await?;
    tx.commit().await?;
    if !inserted {
        // A retry of the same request committed first (the user lock makes this rare).
        if let Some((scope, id)) = &s.txn
            && let Some(existing) = store::by_txn(&state.db, s.user_id, s.device_id, scope, id).await?
        {
            return Ok(existing);
        }
        return Err(Error::internal());
    }
    crate::cluster::delayed_changed(state);
    Ok(delay_id)
}

/// A management action (`POST /delayed_events/{delay_id}[/{action}]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Cancel,
    Restart,
    Send,
}

impl Action {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cancel" => Some(Self::Cancel),
            "restart" => Some(Self::Restart),
            "send" => Some(Self::Send),
            _ => None,
        }
    }
}

fn conflict(msg: &str) -> Error {
    Error::new(axum::http::StatusCode::CONFLICT, "M_UNKNOWN", msg)
}

fn not_found() -> Error {
    Error::not_found("No scheduled delayed event with this ID")
}

/// Applies an action. The `delay_id` is the capability (MSC4140: it may be handed to a service),
/// so no ownership is checked. Retries are safe: `cancel` of a cancelled event and `send` of a
/// sent one succeed; the opposite outcome is 409 `M_UNKNOWN`; `restart` of an event that is no
/// longer scheduled is 404 `M_NOT_FOUND` (the client schedules a new one).
pub async fn manage(state: &AppState, delay_id: &str, action: Action) -> ApiResult<()> {
    if delay_id.is_empty() || delay_id.len() > 255 {
        return Err(not_found());
    }
    match action {
        Action::Restart => {
            if store::restart(&state.db, delay_id, now_ms()).await?.is_some() {
                crate::cluster::delayed_changed(state);
                return Ok(());
            }
            Err(not_found())
        }
        Action::Cancel => {
            if store::finalise(&state.db, delay_id, "cancel", "action", None, None, now_ms()).await? {
                return Ok(());
            }
            match store::get(&state.db, delay_id).await? {
                Some(r) if r.outcome.as_deref() == Some("send") => Err(conflict("The delayed event was already sent")),
                Some(_) => Ok(()),
                None => Err(not_found()),
            }
        }
        Action::Send => match fire(state, delay_id, "action").await? {
            Fired::Sent => Ok(()),
            Fired::Failed(e) => Err(e),
            Fired::NotScheduled => match store::get(&state.db, delay_id).await? {
                Some(r) if r.outcome.as_deref() == Some("send") => Ok(()),
                Some(_) => Err(conflict("The delayed event was cancelled")),
                None => Err(not_found()),
            },
        },
    }
}

enum Fired {
    Sent,
    NotScheduled,
    /// Not sent: the error a direct send would have met.
    Failed(Error),
}

/// Sends a scheduled event now (its time came, or a `send` action). `reason` is `delay` or
/// `action`. A refusal (4xx) at its due time finalises it with the error; a refusal of a `send`
/// action leaves it scheduled (MSC4140: the cause may pass before its time). A server error leaves
/// it scheduled either way (the sender retries it).
async fn fire(state: &AppState, delay_id: &str, reason: &str) -> ApiResult<Fired> {
    let mut tx = state.db.begin().await?;
    let Some(row) = store::lock_scheduled(&mut *tx, delay_id).await? else {
        return Ok(Fired::NotScheduled);
    };
    match send_row(state, &row).await {
        Ok(event_id) => {
            store::finalise(&mut *tx, delay_id, "send", reason, None, Some(&event_id), now_ms()).await?;
            tx.commit().await?;
            tracing::debug!(delay_id, event_id, "delayed event sent");
            Ok(Fired::Sent)
        }
        Err(e) if e.status.is_server_error() || reason == "action" => Ok(Fired::Failed(e)),
        Err(e) => {
            let body = json!({ "errcode": e.errcode, "error": e.message });
            store::finalise(&mut *tx, delay_id, "error", reason, Some(&body), None, now_ms()).await?;
            tx.commit().await?;
            tracing::info!(delay_id, error = %e, "delayed event could not be sent");
            Ok(Fired::Failed(e))
        }
    }
}

async fn send_row(state: &AppState, row: &DelayedRow) -> ApiResult<String> {
    let room = Room::load(state, &row.room_id).await?;
    let ev = match &row.state_key {
        Some(k) => NewEvent::state(&row.event_type, k, row.content.clone()),
        None => NewEvent::message(&row.event_type, row.content.clone()),
    };
    Ok(rooms::send(state, &room, &row.user_id, ev, None).await?.to_string())
}

/// After a state event was sent: cancels other users' scheduled state events for the same entry.
pub async fn state_overwritten(state: &AppState, room: &Room, kind: &str, state_key: &str, sender: &str) {
    match store::cancel_state_of_others(&state.db, room.room_id.as_str(), kind, state_key, sender, now_ms()).await {
        Ok(0) => {}
        Ok(n) => tracing::debug!(room = %room.room_id, kind, n, "delayed state events cancelled by a newer state"),
        Err(e) => tracing::warn!(error = %e, "could not cancel overwritten delayed state events"),
    }
}

/// The sender: sends due events, then sleeps until the next one is due (or one is scheduled or
/// restarted in this process, or `MAX_SLEEP_MS` passed). Runs at start-up first, so events that
/// fell due while no server ran are sent at once.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    loop {
        let mut wait_ms = MAX_SLEEP_MS;
        match store::due(&state.db, now_ms(), BATCH).await {
            Ok(ids) => {
                let full = ids.len() as i64 == BATCH;
                let mut server_error = false;
                for id in &ids {
                    match fire(&state, id, "delay").await {
                        Ok(Fired::Failed(e)) if e.status.is_server_error() => server_error = true,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "delayed event sender failed");
                            server_error = true;
                        }
                    }
                }
                if server_error {
                    wait_ms = 1000;
                } else if full {
                    wait_ms = 0;
                } else if let Ok(Some(next)) = store::next_due(&state.db).await {
                    wait_ms = (next - now_ms()).clamp(0, MAX_SLEEP_MS);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read due delayed events");
                wait_ms = 1000;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait_ms as u64)) => {}
            _ = state.rtc.wake.notified() => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// A delayed event as `GET /delayed_events` lists it.
pub fn item(row: &DelayedRow) -> Value {
    let mut v = json!({
        "delay_id": row.delay_id,
        "room_id": row.room_id,
        "type": row.event_type,
        "delay": row.delay_ms,
        "running_since": row.running_since,
        "content": row.content,
    });
    if let Some(k) = &row.state_key {
        v["state_key"] = json!(k);
    }
    if row.status == "finalised" {
        if let Some(e) = &row.error {
            v["error"] = e.clone();
        }
        if let Some(id) = &row.event_id {
            v["event_id"] = json!(id);
        }
        if let Some(ts) = row.finalised_ts {
            v["origin_server_ts"] = json!(ts);
        }
        v["outcome"] = json!(row.outcome);
        v["reason"] = json!(row.reason);
    }
    v
}

/// A finalised event in the `finalised` list of matrix-js-sdk's `DelayedEventInfo`.
pub fn finalised_item(row: &DelayedRow) -> Value {
    let mut inner = item(row);
    if let Some(o) = inner.as_object_mut() {
        for k in ["error", "event_id", "origin_server_ts", "outcome", "reason"] {
            o.remove(k);
        }
    }
    let mut v = json!({
        "delayed_event": inner,
        "outcome": if row.outcome.as_deref() == Some("send") { "send" } else { "cancel" },
        "reason": match row.reason.as_deref() {
            Some("delay") => "delay",
            _ if row.outcome.as_deref() == Some("error") => "error",
            _ => "action",
        },
    });
    if let Some(e) = &row.error {
        v["error"] = e.clone();
    }
    if let Some(id) = &row.event_id {
        v["event_id"] = json!(id);
    }
    if let Some(ts) = row.finalised_ts {
        v["origin_server_ts"] = json!(ts);
    }
    v
}
