//! Synapse's user admin API, as far as provisioning from the HR system needs it:
//! `GET`/`PUT /_synapse/admin/v2/users/{userId}` (create or modify an account, with its
//! `external_ids` per identity provider so that the agent's first SSO login finds it) and
//! `GET /_synapse/admin/v1/auth_providers/{provider}/users/{externalId}`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminAuth;
use crate::error::{ApiResult, Error};
use crate::http::extract::{Json, Path};
use crate::state::AppState;
use crate::storage::sso::ExternalId;
use crate::{storage, users};

/// Most external IDs per account.
const MAX_EXTERNAL_IDS: usize = 16;

fn local_user(state: &AppState, user_id: &str) -> ApiResult<String> {
    let parsed = ruma::UserId::parse(user_id).map_err(|_| Error::invalid_param("Invalid user ID"))?;
    if parsed.server_name().as_str() != state.config.server_name {
        return Err(Error::invalid_param("This is not a local user"));
    }
    Ok(parsed.localpart().to_owned())
}

async fn describe(state: &AppState, user_id: &str) -> ApiResult<Option<Value>> {
    let Some(u) = storage::users::get(&state.db, user_id).await? else { return Ok(None) };
    let profile = storage::profiles::get(&state.db, user_id).await?.unwrap_or_default();
    let external_ids = storage::sso::external_ids(&state.db, user_id).await?;
    let threepids = storage::sso::threepids(&state.db, user_id).await?;
    Ok(Some(json!({
        "name": u.user_id,
        "displayname": profile.get("displayname"),
        "avatar_url": profile.get("avatar_url"),
        "admin": u.is_admin,
        "deactivated": u.deactivated,
        "user_type": u.user_type,
        "creation_ts": u.created_ts,
        "is_guest": false,
        "password_hash_set": u.password_hash.is_some(),
        "external_ids": external_ids,
        "threepids": threepids,
    })))
}

pub async fn get(
    State(state): State<AppState>,
    _: AdminAuth,
    Path(user_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    local_user(&state, &user_id)?;
    describe(&state, &user_id).await?.map(axum::Json).ok_or_else(|| Error::not_found("User not found"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutUser {
    password: Option<String>,
    #[serde(default = "yes")]
    logout_devices: bool,
    displayname: Option<String>,
    admin: Option<bool>,
    deactivated: Option<bool>,
    user_type: Option<String>,
    external_ids: Option<Vec<ExternalId>>,
    threepids: Option<Vec<Threepid>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threepid {
    medium: String,
    address: String,
}

fn yes() -> bool {
    true
}

/// `PUT /_synapse/admin/v2/users/{userId}`: 201 with the account when created, 200 when modified.
pub async fn put(
    State(state): State<AppState>,
    _: AdminAuth,
    Path(user_id): Path<String>,
    Json(body): Json<PutUser>,
) -> ApiResult<Response> {
    let localpart = local_user(&state, &user_id)?;
    if let Some(ids) = &body.external_ids {
        if ids.len() > MAX_EXTERNAL_IDS {
            return Err(Error::invalid_param(format!("At most {MAX_EXTERNAL_IDS} external_ids")));
        }
        if ids.iter().any(|e| {
            e.auth_provider.is_empty()
                || e.external_id.is_empty()
                || e.external_id.len() > 255
                || e.auth_provider.len() > 64
        }) {
            return Err(Error::invalid_param("external_ids entries need a non-empty auth_provider and external_id"));
        }
    }
    let email = match &body.threepids {
        None => None,
        Some(list) => {
            if list.len() > 1 || list.iter().any(|t| t.medium != "email") {
                return Err(Error::invalid_param("threepids: at most one, of medium `email`"));
            }
            match list.first() {
                Some(t) if !t.address.contains('@') || t.address.len() > 320 => {
                    return Err(Error::invalid_param("threepids: invalid e-mail address"));
                }
                Some(t) => Some(Some(t.address.to_lowercase())),
                None => Some(None),
            }
        }
    };
    if let Some(name) = &body.displayname
        && name.len() > 256
    {
        return Err(Error::invalid_param("displayname is too long"));
    }
    let existing = storage::users::get(&state.db, &user_id).await?;
    let created = existing.is_none();
    if let Some(u) = &existing {
        if u.deactivated && body.deactivated == Some(false) {
            return Err(Error::invalid_param("Reactivating an account is not supported"));
        }
        if let Some(p) = &body.password {
            users::check_password_policy(&state, p)?;
            let hash = state.passwords.hash(p).await?;
            storage::users::set_password_hash(&state.db, &user_id, Some(&hash)).await?;
            if body.logout_devices {
                crate::auth::delete_other_devices(&state, &user_id, None).await?;
            }
        }
        if let Some(a) = body.admin {
            storage::users::set_admin(&state.db, &user_id, a).await?;
        }
        if let Some(name) = &body.displayname {
            users::profile::set_field(&state, &user_id, "displayname", Some(json!(name))).await?;
        }
    } else {
        if body.deactivated == Some(true) {
            return Err(Error::invalid_param("Cannot create a deactivated account"));
        }
        users::create_account(
            &state,
            users::NewAccount {
                localpart: &localpart,
                password: body.password.as_deref(),
                is_admin: body.admin.unwrap_or(false),
                user_type: body.user_type.as_deref(),
                displayname: body.displayname.as_deref(),
                registration_token: None,
            },
        )
        .await?;
    }
    let mut tx = state.db.begin().await?;
    if let Some(ids) = &body.external_ids
        && let Err(msg) = storage::sso::set_external_ids(&mut tx, &user_id, ids).await?
    {
        return Err(Error::new(StatusCode::CONFLICT, "M_UNKNOWN", msg));
    }
    if let Some(email) = &email {
        match email {
            Some(addr) => {
                if !storage::sso::set_email(&mut tx, &user_id, addr).await? {
                    return Err(Error::new(
                        StatusCode::CONFLICT,
                        "M_THREEPID_IN_USE",
                        "This e-mail address belongs to another account",
                    ));
                }
            }
            None => storage::sso::clear_email(&mut *tx, &user_id).await?,
        }
    }
    tx.commit().await?;
    if body.deactivated == Some(true) && existing.as_ref().is_some_and(|u| !u.deactivated) {
        users::deactivate::deactivate(&state, &user_id, false).await?;
    }
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    let desc = describe(&state, &user_id).await?.ok_or_else(Error::internal)?;
    Ok((status, axum::Json(desc)).into_response())
}

/// `GET /_synapse/admin/v1/auth_providers/{provider}/users/{externalId}`.
pub async fn by_external_id(
    State(state): State<AppState>,
    _: AdminAuth,
    Path((provider, external_id)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let user_id = storage::sso::user_by_external_id(&state.db, &provider, &external_id)
        .await?
        .ok_or_else(|| Error::not_found("User not found"))?;
    Ok(axum::Json(json!({ "user_id": user_id })))
}
