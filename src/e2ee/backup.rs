//! Server-side key backup (`/room_keys/...`): versions with their `auth_data`, and encrypted
//! session keys replaced only by better ones (the spec's rules, applied in SQL).

use serde_json::{Map, Value, json};

use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage;
use crate::storage::backup::RoomKey;

fn parse_version(v: &str) -> ApiResult<i64> {
    v.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| Error::not_found(format!("Unknown backup version {v}")))
}

fn version_json(v: &storage::backup::BackupVersion, count: i64) -> Value {
    json!({
        "version": v.version.to_string(),
        "algorithm": v.algorithm,
        "auth_data": v.auth_data,
        "etag": v.etag.to_string(),
        "count": count,
    })
}

pub async fn create_version(state: &AppState, user: &str, body: &Value) -> ApiResult<Value> {
    let algorithm = body["algorithm"].as_str().ok_or_else(|| Error::bad_json("algorithm is required"))?;
    if !body["auth_data"].is_object() {
        return Err(Error::bad_json("auth_data must be an object"));
    }
    let mut tx = state.db.begin().await?;
    let v = storage::backup::create_version(&mut tx, user, algorithm, &body["auth_data"]).await?;
    tx.commit().await?;
    Ok(json!({ "version": v.to_string() }))
}

/// `GET /room_keys/version[/{version}]`.
pub async fn get_version(state: &AppState, user: &str, version: Option<&str>) -> ApiResult<Value> {
    let n = version.map(parse_version).transpose()?;
    let v = storage::backup::version(&state.db, user, n)
        .await?
        .ok_or_else(|| Error::not_found("No current backup version"))?;
    let (_, count) = storage::backup::etag_and_count(&state.db, user, v.version).await?;
    Ok(version_json(&v, count))
}

pub async fn update_version(state: &AppState, user: &str, version: &str, body: &Value) -> ApiResult<()> {
    let n = parse_version(version)?;
    let v = storage::backup::version(&state.db, user, Some(n))
        .await?
        .ok_or_else(|| Error::not_found(format!("Unknown backup version {version}")))?;
    if body["algorithm"].as_str() != Some(v.algorithm.as_str()) {
        return Err(Error::invalid_param("algorithm does not match the version's"));
    }
    if let Some(bv) = body.get("version").and_then(Value::as_str)
        && bv != version
    {
        return Err(Error::invalid_param("version in body does not match the path"));
    }
    if !body["auth_data"].is_object() {
        return Err(Error::bad_json("auth_data must be an object"));
    }
    storage::backup::update_auth_data(&state.db, user, n, &body["auth_data"]).await?;
    Ok(())
}

pub async fn delete_version(state: &AppState, user: &str, version: &str) -> ApiResult<()> {
    let n = parse_version(version)?;
    let mut tx = state.db.begin().await?;
    if !storage::backup::delete_version(&mut tx, user, n).await? {
        return Err(Error::not_found(format!("Unknown backup version {version}")));
    }
    tx.commit().await?;
    Ok(())
}

/// The version a key request names must be the current one for writes (403
/// `M_WRONG_ROOM_KEYS_VERSION` otherwise), and must exist for reads.
async fn check_version(state: &AppState, user: &str, version: &str, write: bool) -> ApiResult<i64> {
    let n = parse_version(version)?;
    if write {
        let current = storage::backup::version(&state.db, user, None).await?;
        match current {
            Some(c) if c.version == n => Ok(n),
            Some(c) => {
                let mut e =
                    Error::new(axum::http::StatusCode::FORBIDDEN, "M_WRONG_ROOM_KEYS_VERSION", "Wrong backup version");
                e.extra.insert("current_version".into(), json!(c.version.to_string()));
                Err(e)
            }
            None => Err(Error::not_found("No current backup version")),
        }
    } else {
        storage::backup::version(&state.db, user, Some(n))
            .await?
            .map(|v| v.version)
            .ok_or_else(|| Error::not_found(format!("Unknown backup version {version}")))
    }
}

fn parse_key(room_id: &str, session_id: &str, k: &Value) -> ApiResult<RoomKey> {
    let int = |f: &str| k[f].as_i64().ok_or_else(|| Error::bad_json(format!("{f} must be an integer")));
    Ok(RoomKey {
        room_id: room_id.to_owned(),
        session_id: session_id.to_owned(),
        first_message_index: int("first_message_index")?,
        forwarded_count: int("forwarded_count")?,
        is_verified: k["is_verified"].as_bool().ok_or_else(|| Error::bad_json("is_verified must be a boolean"))?,
        session_data: k
            .get("session_data")
            .filter(|d| d.is_object())
            .cloned()
            .ok_or_else(|| Error::bad_json("session_data must be an object"))?,
    })
}

/// PUT at any of the three levels: `room_id`/`session_id` narrow what the body holds.
pub async fn put_keys(
    state: &AppState,
    user: &str,
    version: &str,
    room_id: Option<&str>,
    session_id: Option<&str>,
    body: &Value,
) -> ApiResult<Value> {
    let n = check_version(state, user, version, true).await?;
    let mut keys = Vec::new();
    match (room_id, session_id) {
        (Some(r), Some(s)) => keys.push(parse_key(r, s, body)?),
        (Some(r), None) => {
            let sessions = body["sessions"].as_object().ok_or_else(|| Error::bad_json("sessions must be an object"))?;
            for (s, k) in sessions {
                keys.push(parse_key(r, s, k)?);
            }
        }
        _ => {
            let rooms = body["rooms"].as_object().ok_or_else(|| Error::bad_json("rooms must be an object"))?;
            for (r, room) in rooms {
                let sessions =
                    room["sessions"].as_object().ok_or_else(|| Error::bad_json("sessions must be an object"))?;
                for (s, k) in sessions {
                    keys.push(parse_key(r, s, k)?);
                }
            }
        }
    }
    let mut tx = state.db.begin().await?;
    let written = storage::backup::put_keys(&mut tx, user, n, &keys).await?;
    finish_change(tx, user, n, written > 0).await
}

/// Commits a change of a version's keys: the etag moves only if something changed. Answers the
/// spec's `{etag, count}`.
async fn finish_change(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    user: &str,
    version: i64,
    changed: bool,
) -> ApiResult<Value> {
    let (etag, count) = if changed {
        storage::backup::bump_etag(&mut tx, user, version).await?
    } else {
        storage::backup::etag_and_count(&mut *tx, user, version).await?
    };
    tx.commit().await?;
    Ok(json!({ "etag": etag.to_string(), "count": count }))
}

fn key_json(k: &RoomKey) -> Value {
    json!({
        "first_message_index": k.first_message_index,
        "forwarded_count": k.forwarded_count,
        "is_verified": k.is_verified,
        "session_data": k.session_data,
    })
}

pub async fn get_keys(
    state: &AppState,
    user: &str,
    version: &str,
    room_id: Option<&str>,
    session_id: Option<&str>,
) -> ApiResult<Value> {
    let n = check_version(state, user, version, false).await?;
    let keys = storage::backup::keys(&state.db, user, n, room_id, session_id).await?;
    match (room_id, session_id) {
        (Some(_), Some(_)) => {
            keys.first().map(key_json).ok_or_else(|| Error::not_found("No such session in the backup"))
        }
        (Some(_), None) => {
            let sessions: Map<String, Value> = keys.iter().map(|k| (k.session_id.clone(), key_json(k))).collect();
            Ok(json!({ "sessions": sessions }))
        }
        _ => {
            let mut rooms: Map<String, Value> = Map::new();
            for k in &keys {
                let room = rooms.entry(k.room_id.clone()).or_insert_with(|| json!({ "sessions": {} }));
                room["sessions"][&k.session_id] = key_json(k);
            }
            Ok(json!({ "rooms": rooms }))
        }
    }
}

pub async fn delete_keys(
    state: &AppState,
    user: &str,
    version: &str,
    room_id: Option<&str>,
    session_id: Option<&str>,
) -> ApiResult<Value> {
    let n = check_version(state, user, version, false).await?;
    let mut tx = state.db.begin().await?;
    let deleted = storage::backup::delete_keys(&mut tx, user, n, room_id, session_id).await?;
    finish_change(tx, user, n, deleted > 0).await
}
