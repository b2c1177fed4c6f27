//! Federation endpoints of rooms: transactions, joins and leaves as the resident server, and the
//! room history other servers read. Handlers only parse and answer; the work is in
//! `federation::{inbound, membership}`.

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::routing::{get, post, put};
use serde_json::Value;

use crate::error::{ApiResult, Error};
use crate::federation::auth::{Origin, Signed};
use crate::federation::{inbound, membership};
use crate::http::extract::Path;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/_matrix/federation/v1/send/{txn_id}", put(send))
        .route("/_matrix/federation/v1/make_join/{room_id}/{user_id}", get(make_join))
        .route("/_matrix/federation/v2/send_join/{room_id}/{event_id}", put(send_join))
        .route("/_matrix/federation/v1/make_leave/{room_id}/{user_id}", get(make_leave))
        .route("/_matrix/federation/v1/make_knock/{room_id}/{user_id}", get(make_knock))
        .route("/_matrix/federation/v1/send_knock/{room_id}/{event_id}", put(send_knock))
        .route("/_matrix/federation/v2/send_leave/{room_id}/{event_id}", put(send_leave))
        .route("/_matrix/federation/v2/invite/{room_id}/{event_id}", put(invite))
        .route("/_matrix/federation/v1/query/directory", get(query_directory))
        .route("/_matrix/federation/v1/publicRooms", get(public_rooms_get).post(public_rooms_post))
        .route("/_matrix/federation/v1/event/{event_id}", get(event))
        .route("/_matrix/federation/v1/state_ids/{room_id}", get(state_ids))
        .route("/_matrix/federation/v1/state/{room_id}", get(state_pdus))
        .route("/_matrix/federation/v1/event_auth/{room_id}/{event_id}", get(event_auth))
        .route("/_matrix/federation/v1/get_missing_events/{room_id}", post(get_missing_events))
        .route("/_matrix/federation/v1/backfill/{room_id}", get(backfill))
        .route("/_matrix/federation/v1/timestamp_to_event/{room_id}", get(timestamp_to_event))
}

fn query_values(query: &Option<String>, key: &str) -> Vec<String> {
    crate::http::extract::query_values(query.as_deref(), key)
}

/// The room versions a joining server supports (`ver`, repeated); `1` when it names none.
fn room_versions(query: &Option<String>) -> Vec<String> {
    let versions = query_values(query, "ver");
    if versions.is_empty() { vec!["1".into()] } else { versions }
}

fn body(signed: &Signed) -> ApiResult<&Value> {
    signed.content.as_ref().filter(|v| v.is_object()).ok_or_else(|| Error::bad_json("Expected a JSON object"))
}

type Answer = ApiResult<axum::Json<Value>>;

async fn send(State(state): State<AppState>, Path(txn_id): Path<String>, signed: Signed) -> Answer {
    Ok(axum::Json(inbound::transaction(&state, &signed.origin, &txn_id, body(&signed)?).await?))
}

async fn make_join(
    State(state): State<AppState>,
    Path((room_id, user_id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    Origin(origin): Origin,
) -> Answer {
    let versions = room_versions(&query);
    Ok(axum::Json(membership::make_membership(&state, &origin, &room_id, &user_id, "join", &versions).await?))
}

async fn send_join(
    State(state): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Answer {
    let v = membership::send_membership(&state, &signed.origin, &room_id, &event_id, "join", body(&signed)?).await?;
    Ok(axum::Json(v))
}

async fn make_leave(
    State(state): State<AppState>,
    Path((room_id, user_id)): Path<(String, String)>,
    Origin(origin): Origin,
) -> Answer {
    Ok(axum::Json(membership::make_membership(&state, &origin, &room_id, &user_id, "leave", &[]).await?))
}

async fn send_leave(
    State(state): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Answer {
    let v = membership::send_membership(&state, &signed.origin, &room_id, &event_id, "leave", body(&signed)?).await?;
    Ok(axum::Json(v))
}

async fn event(State(state): State<AppState>, Path(event_id): Path<String>, Origin(origin): Origin) -> Answer {
    Ok(axum::Json(inbound::event(&state, &origin, &event_id).await?))
}

fn event_id_param(query: &Option<String>) -> ApiResult<String> {
    query_values(query, "event_id").into_iter().next().ok_or_else(|| Error::missing_param("Missing event_id"))
}

async fn state_ids(
    State(state): State<AppState>,
    Path(room_id): Path<String>,
    RawQuery(q): RawQuery,
    Origin(origin): Origin,
) -> Answer {
    Ok(axum::Json(inbound::state_at(&state, &origin, &room_id, &event_id_param(&q)?, true).await?))
}

async fn state_pdus(
    State(state): State<AppState>,
    Path(room_id): Path<String>,
    RawQuery(q): RawQuery,
    Origin(origin): Origin,
) -> Answer {
    Ok(axum::Json(inbound::state_at(&state, &origin, &room_id, &event_id_param(&q)?, false).await?))
}

async fn event_auth(
    State(state): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    Origin(origin): Origin,
) -> Answer {
    Ok(axum::Json(inbound::event_auth(&state, &origin, &room_id, &event_id).await?))
}

async fn get_missing_events(State(state): State<AppState>, Path(room_id): Path<String>, signed: Signed) -> Answer {
    Ok(axum::Json(inbound::missing_events(&state, &signed.origin, &room_id, body(&signed)?).await?))
}

async fn backfill(
    State(state): State<AppState>,
    Path(room_id): Path<String>,
    RawQuery(q): RawQuery,
    Origin(origin): Origin,
) -> Answer {
    let from = query_values(&q, "v");
    let limit = query_values(&q, "limit")
        .first()
        .map(|l| l.parse::<i64>().map_err(|_| Error::invalid_param("limit must be an integer")))
        .transpose()?
        .unwrap_or(10);
    Ok(axum::Json(inbound::backfill(&state, &origin, &room_id, &from, limit).await?))
}

async fn invite(
    State(state): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Answer {
    let v = membership::receive_invite(&state, &signed.origin, &room_id, &event_id, body(&signed)?).await?;
    Ok(axum::Json(v))
}

/// `GET /query/directory?room_alias=`: a local alias's room and the servers in it.
async fn query_directory(State(state): State<AppState>, RawQuery(q): RawQuery, Origin(origin): Origin) -> Answer {
    let alias =
        query_values(&q, "room_alias").into_iter().next().ok_or_else(|| Error::missing_param("Missing room_alias"))?;
    let a = ruma::RoomAliasId::parse(&alias).map_err(|_| Error::invalid_param("Invalid room alias"))?;
    if a.server_name().as_str() != state.config.server_name {
        return Err(Error::invalid_param("The alias is not one of this server"));
    }
    let (room_id, room_nid, _) = crate::storage::rooms::resolve_alias(&state.db, &alias)
        .await?
        .ok_or_else(|| Error::not_found("Room alias not found"))?;
    tracing::debug!(%origin, alias, "federation directory query");
    let servers = crate::storage::remote::joined_servers(&state.db, room_nid, "").await?;
    Ok(axum::Json(serde_json::json!({ "room_id": room_id, "servers": servers })))
}

async fn make_knock(
    State(state): State<AppState>,
    Path((room_id, user_id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    Origin(origin): Origin,
) -> Answer {
    let versions = room_versions(&query);
    Ok(axum::Json(membership::make_membership(&state, &origin, &room_id, &user_id, "knock", &versions).await?))
}

async fn send_knock(
    State(state): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Answer {
    let v = membership::send_membership(&state, &signed.origin, &room_id, &event_id, "knock", body(&signed)?).await?;
    Ok(axum::Json(v))
}

async fn timestamp_to_event(
    State(state): State<AppState>,
    Path(room_id): Path<String>,
    RawQuery(q): RawQuery,
    Origin(origin): Origin,
) -> Answer {
    let ts = query_values(&q, "ts")
        .first()
        .ok_or_else(|| Error::missing_param("Missing ts"))?
        .parse::<i64>()
        .map_err(|_| Error::invalid_param("ts must be an integer"))?;
    let forward = match query_values(&q, "dir").first().map(String::as_str) {
        Some("f") => true,
        Some("b") => false,
        _ => return Err(Error::invalid_param("dir must be f or b")),
    };
    Ok(axum::Json(inbound::timestamp_to_event(&state, &origin, &room_id, ts, forward).await?))
}

/// `GET /publicRooms?limit=&since=`: this server's published rooms.
async fn public_rooms_get(State(state): State<AppState>, RawQuery(q): RawQuery, Origin(_): Origin) -> Answer {
    let limit = query_values(&q, "limit").first().and_then(|l| l.parse().ok());
    let since = query_values(&q, "since").into_iter().next();
    Ok(axum::Json(crate::rooms::directory::public_rooms(&state, limit, since.as_deref(), None, None).await?))
}

/// `POST /publicRooms` with `limit`, `since` and `filter` (`generic_search_term`, `room_types`).
async fn public_rooms_post(State(state): State<AppState>, signed: Signed) -> Answer {
    let b = body(&signed)?;
    let limit = b["limit"].as_i64();
    let since = b["since"].as_str();
    let term = b["filter"]["generic_search_term"].as_str();
    let room_types: Option<Vec<Option<String>>> = b["filter"]["room_types"]
        .as_array()
        .map(|a| a.iter().take(20).map(|t| t.as_str().map(str::to_owned)).collect());
    Ok(axum::Json(crate::rooms::directory::public_rooms(&state, limit, since, term, room_types).await?))
}
