//! Pushers: `GET /pushers`, `POST /pushers/set`. They are stored per device; delivery to push
//! gateways arrives with the sync and notification engine (see the README).

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json};
use crate::state::AppState;
use crate::storage;
use crate::storage::pushers::{NewPusher, PusherRow};

pub async fn list(State(state): State<AppState>, auth: Auth) -> ApiResult<axum::Json<Value>> {
    let pushers: Vec<Value> = storage::pushers::list(&state.db, &auth.user_id)
        .await?
        .into_iter()
        .map(|p| {
            let mut v = json!({
                "app_id": p.app_id, "pushkey": p.pushkey, "kind": p.kind,
                "app_display_name": p.app_display_name, "device_display_name": p.device_display_name,
                "lang": p.lang, "data": p.data.0,
            });
            if let Some(t) = p.profile_tag {
                v["profile_tag"] = json!(t);
            }
            v
        })
        .collect();
    Ok(axum::Json(json!({ "pushers": pushers })))
}

#[derive(Deserialize)]
pub struct SetPusher {
    app_id: String,
    pushkey: String,
    /// `null` deletes the pusher.
    kind: Option<String>,
    app_display_name: Option<String>,
    device_display_name: Option<String>,
    profile_tag: Option<String>,
    lang: Option<String>,
    data: Option<Value>,
    #[serde(default)]
    append: bool,
}

pub async fn set(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<SetPusher>,
) -> ApiResult<axum::Json<Value>> {
    if body.app_id.is_empty() || body.app_id.len() > 64 {
        return Err(Error::invalid_param("app_id must be 1 to 64 bytes"));
    }
    if body.pushkey.is_empty() || body.pushkey.len() > 512 {
        return Err(Error::invalid_param("pushkey must be 1 to 512 bytes"));
    }
    let Some(kind) = body.kind else {
        storage::pushers::delete(&state.db, &auth.user_id, &body.app_id, &body.pushkey).await?;
        return Ok(axum::Json(json!({})));
    };
    let missing = |f: &str| Error::missing_param(format!("{f} is required"));
    let app_display_name = body.app_display_name.ok_or_else(|| missing("app_display_name"))?;
    let device_display_name = body.device_display_name.ok_or_else(|| missing("device_display_name"))?;
    let lang = body.lang.ok_or_else(|| missing("lang"))?;
    let data = body.data.ok_or_else(|| missing("data"))?;
    if !data.is_object() {
        return Err(Error::bad_json("data must be an object"));
    }
    match kind.as_str() {
        "http" => {
            // The spec: the URL must be HTTP(S) and end with the push gateway path.
            let url = data["url"].as_str().ok_or_else(|| missing("data.url"))?;
            let parsed = url::Url::parse(url).map_err(|_| Error::invalid_param("data.url is not a URL"))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.path() != "/_matrix/push/v1/notify" {
                return Err(Error::invalid_param("data.url must be an http(s) URL with path /_matrix/push/v1/notify"));
            }
        }
        "email" => return Err(Error::invalid_param("Email pushers are not supported by this server")),
        _ => return Err(Error::invalid_param(format!("Unknown pusher kind {kind}"))),
    }
    let row = PusherRow {
        app_id: body.app_id,
        pushkey: body.pushkey,
        kind,
        app_display_name,
        device_display_name,
        profile_tag: body.profile_tag,
        lang,
        data: sqlx::types::Json(data),
    };
    storage::pushers::upsert(
        &state.db,
        &NewPusher { user_id: &auth.user_id, device_id: &auth.device_id, row: &row },
        body.append,
    )
    .await?;
    Ok(axum::Json(json!({})))
}
