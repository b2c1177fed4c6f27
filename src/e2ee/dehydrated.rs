//! Dehydrated devices (MSC3814, unstable prefix `org.matrix.msc3814.v1`).
//!
//! A user may keep one device on the server whose private keys the client stored, encrypted, as
//! `device_data`. Other users encrypt to it like to any device (it has device keys, one-time and
//! fallback keys, and gets to-device messages); a new device of the user later downloads the
//! data, "rehydrates" the device locally and reads the messages queued for it to recover the
//! room keys. The server only stores and routes:
//!
//! - `PUT` creates it together with its keys in one transaction (replacing, and so deleting with
//!   its keys and queued messages, the previous one), `GET` returns `device_id` and
//!   `device_data`, `DELETE` removes it.
//! - `/dehydrated_device/{device_id}/events` pages through its queued messages. As MSC3814 says
//!   ("unlike the `/sync` endpoint, the server should *not* delete any to-device messages
//!   delivered in previous batches") and as Synapse does, reading acknowledges nothing: an
//!   interrupted rehydration can start again from another device. The messages go with the
//!   device (replaced or deleted) and, like every queue, past `limits.max_pending_to_device`.
//! - The device is a row of `devices` (see migration 0014): it shows in `GET /devices` as in
//!   Synapse (clients hide it by its keys' `dehydrated: true` flag), can be deleted by the
//!   device endpoints as MSC3814 allows, and no login may take it over.

use serde_json::{Value, json};

use super::{bad, device_list_committed, parse_fallback_keys, parse_one_time_keys, validate_device_keys};
use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage;

/// Largest `device_data` (serialised): an encrypted pickle of the device with at most 100
/// one-time keys is a few KiB.
pub const MAX_DEVICE_DATA_BYTES: usize = 64 * 1024;
/// Most one-time keys uploaded with a dehydrated device (clients upload 50).
pub const MAX_ONE_TIME_KEYS: usize = 100;
/// Most fallback keys uploaded with a dehydrated device (one per algorithm).
pub const MAX_FALLBACK_KEYS: usize = 10;
/// Most to-device messages per `/events` page (and the default page size).
pub const EVENTS_PER_PAGE: i64 = 100;
const MAX_DEVICE_ID_BYTES: usize = 255;
const MAX_DISPLAY_NAME_BYTES: usize = 1024;

/// `PUT /dehydrated_device`: creates (or replaces) the user's dehydrated device with its keys;
/// returns its device ID.
pub async fn put(state: &AppState, user: &str, body: &Value) -> ApiResult<String> {
    let device_id =
        body.get("device_id").and_then(Value::as_str).ok_or_else(|| bad("device_id is required (a string)"))?;
    if device_id.is_empty() || device_id.len() > MAX_DEVICE_ID_BYTES {
        return Err(Error::invalid_param(format!("device_id must be 1 to {MAX_DEVICE_ID_BYTES} bytes")));
    }
    let data = body.get("device_data").ok_or_else(|| bad("device_data is required"))?;
    let data_obj = data.as_object().ok_or_else(|| bad("device_data must be an object"))?;
    if !data_obj.get("algorithm").is_some_and(Value::is_string) {
        return Err(bad("device_data.algorithm must be a string"));
    }
    // Serialising a parsed value cannot fail; the size is what it would take to store.
    let data_len = serde_json::to_vec(data).map_or(usize::MAX, |v| v.len());
    if data_len > MAX_DEVICE_DATA_BYTES {
        return Err(Error::too_large(format!("device_data is larger than {MAX_DEVICE_DATA_BYTES} bytes")));
    }
    let display_name = match body.get("initial_device_display_name") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) if n.len() > MAX_DISPLAY_NAME_BYTES => {
            return Err(Error::invalid_param(format!(
                "initial_device_display_name is longer than {MAX_DISPLAY_NAME_BYTES} bytes"
            )));
        }
        Some(Value::String(n)) => Some(n.as_str()),
        Some(_) => return Err(bad("initial_device_display_name must be a string")),
    };
    let dk = body.get("device_keys").filter(|v| !v.is_null()).ok_or_else(|| bad("device_keys is required"))?;
    validate_device_keys(dk, user, device_id)?;
    // MSC3814: "We add a new optional property to the device keys: `dehydrated`, which is set
    // to `true` for dehydrated devices." Other clients rely on it (they must not encrypt to a
    // dehydrated device that is not cross-signed, and do not send it verification requests).
    if dk.get("dehydrated") != Some(&Value::Bool(true)) {
        return Err(Error::invalid_param("device_keys.dehydrated must be true for a dehydrated device"));
    }
    let one_time_keys = parse_one_time_keys(body)?;
    if one_time_keys.len() > MAX_ONE_TIME_KEYS {
        return Err(Error::invalid_param(format!("At most {MAX_ONE_TIME_KEYS} one-time keys")));
    }
    let fallback_keys = parse_fallback_keys(body)?;
    if fallback_keys.len() > MAX_FALLBACK_KEYS {
        return Err(Error::invalid_param(format!("At most {MAX_FALLBACK_KEYS} fallback keys")));
    }

    let mut tx = state.db.begin().await?;
    storage::dehydrated::lock_user(&mut tx, user).await?;
    let old = storage::dehydrated::remove(&mut tx, user).await?;
    // Dropping `tx` on an error rolls the removal back: a refused upload changes nothing.
    if !storage::dehydrated::create(&mut tx, user, device_id, display_name, data).await? {
        return Err(Error::invalid_param(format!(
            "device_id {device_id} is one of the user's devices; a dehydrated device needs an unused ID"
        )));
    }
    storage::e2ee::set_device_keys(&mut tx, user, device_id, dk).await?;
    storage::e2ee::insert_one_time_keys(&mut tx, user, device_id, &one_time_keys).await?;
    for (alg, key_id, key) in &fallback_keys {
        storage::e2ee::set_fallback_key(&mut tx, user, device_id, alg, key_id, key).await?;
    }
    // A new device (and the old one gone): news for everyone who encrypts for this user.
    let pos = super::record_device_list_change(&mut tx, user).await?;
    tx.commit().await?;
    if let Some(old) = &old {
        crate::cluster::key_counts_changed(state, user, Some(old));
    }
    crate::cluster::key_counts_changed(state, user, Some(device_id));
    device_list_committed(state, user, pos);
    tracing::debug!(user, device_id, replaced = ?old, "dehydrated device stored");
    Ok(device_id.to_owned())
}

/// `GET /dehydrated_device`: `{ device_id, device_data }`, 404 `M_NOT_FOUND` if there is none.
pub async fn get(state: &AppState, user: &str) -> ApiResult<Value> {
    let (device_id, device_data) = storage::dehydrated::get(&state.db, user)
        .await?
        .ok_or_else(|| Error::not_found("No dehydrated device available"))?;
    Ok(json!({ "device_id": device_id, "device_data": device_data }))
}

/// `DELETE /dehydrated_device`: removes it with its keys and queued messages; returns its ID.
pub async fn delete(state: &AppState, user: &str) -> ApiResult<String> {
    let mut tx = state.db.begin().await?;
    storage::dehydrated::lock_user(&mut tx, user).await?;
    let device_id = storage::dehydrated::remove(&mut tx, user)
        .await?
        .ok_or_else(|| Error::not_found("No dehydrated device available"))?;
    let pos = super::record_device_list_change(&mut tx, user).await?;
    tx.commit().await?;
    crate::cluster::key_counts_changed(state, user, Some(&device_id));
    device_list_committed(state, user, pos);
    Ok(device_id)
}

/// How a client asked for `/events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventsStyle {
    /// `POST` with `{ "next_batch": ... }`, as ruma/matrix-rust-sdk (and so Element X and Element
    /// Web) send it: `next_batch` is always returned, the client stops at an empty page.
    Post,
    /// `GET ?from=`, MSC3814's latest text: `next_batch` only when more messages wait.
    Get,
}

/// `/dehydrated_device/{device_id}/events`: a page of the messages queued for the user's
/// dehydrated device after `from` (a `next_batch` token, `d<stream position>` as in Synapse).
/// 403 `M_FORBIDDEN` if `device_id` is not the user's current dehydrated device (MSC3814).
pub async fn events(
    state: &AppState,
    user: &str,
    device_id: &str,
    from: Option<&str>,
    limit: Option<i64>,
    style: EventsStyle,
) -> ApiResult<Value> {
    match storage::dehydrated::device_id(&state.db, user).await? {
        None => return Err(Error::forbidden("No dehydrated device exists")),
        Some(current) if current != device_id => {
            return Err(Error::forbidden("You may only fetch messages for your dehydrated device"));
        }
        Some(_) => {}
    }
    let since = match from.filter(|f| !f.is_empty()) {
        None => 0,
        Some(token) => parse_token(token)?,
    };
    let limit = limit.unwrap_or(EVENTS_PER_PAGE).clamp(1, EVENTS_PER_PAGE);
    // Only positions every writer has committed: nothing below the token can appear later.
    let upto = *state.to_device_stream.borrow();
    let mut rows = storage::e2ee::to_device_page(&state.db, user, device_id, since, upto, limit + 1).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    // With more to come the next page starts after this one; without, every position up to the
    // watermark has been looked at.
    let next = match rows.last() {
        Some(last) if more => last.0,
        _ => upto.max(since),
    };
    let events: Vec<Value> = rows
        .into_iter()
        .map(|(_, sender, kind, content)| json!({ "sender": sender, "type": kind, "content": content }))
        .collect();
    let mut out = json!({ "events": events });
    if more || style == EventsStyle::Post {
        out["next_batch"] = json!(format!("d{next}"));
    }
    Ok(out)
}

fn parse_token(token: &str) -> ApiResult<i64> {
    token
        .strip_prefix('d')
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<i64>().ok())
        .ok_or_else(|| Error::invalid_param("Invalid next_batch token"))
}

#[cfg(test)]
mod tests {
    use super::parse_token;

    #[test]
    fn tokens() {
        assert_eq!(parse_token("d0").unwrap(), 0);
        assert_eq!(parse_token("d42").unwrap(), 42);
        for bad in ["42", "d", "d-1", "d+1", "x1", "d1x", "d99999999999999999999"] {
            assert_eq!(parse_token(bad).unwrap_err().errcode, "M_INVALID_PARAM", "{bad}");
        }
    }
}
