//! Push rules (`/pushrules/...`): the caller's own ruleset only (the API has no user in its
//! paths). Storage and merging with the server defaults live in `crate::push`.

use axum::extract::State;
use ruma::push::{
    Action, AnyPushRuleRef, NewConditionalPushRule, NewPatternedPushRule, NewPushRule, NewSimplePushRule,
    PushCondition, RuleKind,
};
use ruma::{OwnedRoomId, OwnedUserId};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json, Path, Query};
use crate::push;
use crate::state::AppState;

type RulePath = Path<(String, String, String)>;

/// Scope and kind from the path, validated (400 `M_INVALID_PARAM` for anything unknown).
fn kind_in(scope: &str, kind: &str) -> ApiResult<RuleKind> {
    push::check_scope(scope)?;
    push::parse_kind(kind)
}

fn rule_json(rule: AnyPushRuleRef<'_>) -> Value {
    let v = match rule {
        AnyPushRuleRef::Override(r) | AnyPushRuleRef::Underride(r) => serde_json::to_value(r),
        AnyPushRuleRef::Content(r) => serde_json::to_value(r),
        AnyPushRuleRef::Room(r) => serde_json::to_value(r),
        AnyPushRuleRef::Sender(r) => serde_json::to_value(r),
        // Kinds outside the spec are never reachable through `parse_kind`.
        _ => Ok(json!({ "rule_id": rule.rule_id(), "enabled": rule.enabled(), "actions": rule.actions() })),
    };
    v.unwrap_or_else(|_| json!({}))
}

/// `GET /pushrules/` (and without the slash).
pub async fn get_all(State(state): State<AppState>, auth: Auth) -> ApiResult<axum::Json<Value>> {
    let ruleset = push::ruleset(&state, &auth.user_id).await?;
    Ok(axum::Json(json!({ "global": push::to_json(&ruleset) })))
}

/// `GET /pushrules/global/` (and without the slash).
pub async fn get_scope(
    State(state): State<AppState>,
    auth: Auth,
    Path(scope): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    push::check_scope(&scope)?;
    let ruleset = push::ruleset(&state, &auth.user_id).await?;
    Ok(axum::Json(push::to_json(&ruleset)))
}

pub async fn get_rule(
    State(state): State<AppState>,
    auth: Auth,
    Path((scope, kind, rule_id)): RulePath,
) -> ApiResult<axum::Json<Value>> {
    let kind = kind_in(&scope, &kind)?;
    let ruleset = push::ruleset(&state, &auth.user_id).await?;
    let rule = ruleset.get(kind, &rule_id).ok_or_else(push::rule_not_found)?;
    Ok(axum::Json(rule_json(rule)))
}

#[derive(Deserialize)]
pub struct Position {
    before: Option<String>,
    after: Option<String>,
}

#[derive(Deserialize)]
struct RuleBody {
    actions: Vec<Action>,
    #[serde(default)]
    conditions: Option<Vec<PushCondition>>,
    #[serde(default)]
    pattern: Option<String>,
}

/// The rule a `PUT` describes. Room and sender rule IDs must be room and user IDs; `conditions`
/// only apply to override/underride rules and `pattern` (required) to content rules, other fields
/// are ignored like Synapse does.
fn new_rule(kind: &RuleKind, rule_id: String, body: RuleBody) -> ApiResult<NewPushRule> {
    let RuleBody { actions, conditions, pattern } = body;
    Ok(match kind {
        RuleKind::Override => {
            NewPushRule::Override(NewConditionalPushRule::new(rule_id, conditions.unwrap_or_default(), actions))
        }
        RuleKind::Underride => {
            NewPushRule::Underride(NewConditionalPushRule::new(rule_id, conditions.unwrap_or_default(), actions))
        }
        RuleKind::Content => {
            let pattern = pattern.ok_or_else(|| Error::bad_json("pattern: required for content rules"))?;
            NewPushRule::Content(NewPatternedPushRule::new(rule_id, pattern, actions))
        }
        RuleKind::Room => {
            let room_id = OwnedRoomId::try_from(rule_id.as_str())
                .map_err(|_| Error::invalid_param("The rule ID of a room rule must be a room ID"))?;
            NewPushRule::Room(NewSimplePushRule::new(room_id, actions))
        }
        RuleKind::Sender => {
            let user_id = OwnedUserId::try_from(rule_id.as_str())
                .map_err(|_| Error::invalid_param("The rule ID of a sender rule must be a user ID"))?;
            NewPushRule::Sender(NewSimplePushRule::new(user_id, actions))
        }
        _ => return Err(Error::invalid_param("Unknown push rule kind")),
    })
}

pub async fn put_rule(
    State(state): State<AppState>,
    auth: Auth,
    Path((scope, kind, rule_id)): RulePath,
    Query(pos): Query<Position>,
    Json(body): Json<Map<String, Value>>,
) -> ApiResult<axum::Json<Value>> {
    let kind = kind_in(&scope, &kind)?;
    // Reserved and malformed IDs first: ruma checks them too, but a room/sender rule ID must
    // also parse as an ID, and that error should not hide the more specific one.
    if rule_id.starts_with('.') {
        return Err(push::insert_error(ruma::push::InsertPushRuleError::ServerDefaultRuleId));
    }
    if rule_id.contains(['/', '\\']) {
        return Err(push::insert_error(ruma::push::InsertPushRuleError::InvalidRuleId));
    }
    let body: RuleBody = push::parse(&Value::Object(body))?;
    let rule = new_rule(&kind, rule_id, body)?;
    push::modify(&state, &auth.user_id, |ruleset| {
        ruleset.insert(rule, pos.after.as_deref(), pos.before.as_deref()).map_err(push::insert_error)
    })
    .await?;
    Ok(axum::Json(json!({})))
}

pub async fn delete_rule(
    State(state): State<AppState>,
    auth: Auth,
    Path((scope, kind, rule_id)): RulePath,
) -> ApiResult<axum::Json<Value>> {
    let kind = kind_in(&scope, &kind)?;
    push::modify(&state, &auth.user_id, |ruleset| ruleset.remove(kind, &rule_id).map_err(push::remove_error)).await?;
    Ok(axum::Json(json!({})))
}

pub async fn get_enabled(
    State(state): State<AppState>,
    auth: Auth,
    Path((scope, kind, rule_id)): RulePath,
) -> ApiResult<axum::Json<Value>> {
    let kind = kind_in(&scope, &kind)?;
    let ruleset = push::ruleset(&state, &auth.user_id).await?;
    let rule = ruleset.get(kind, &rule_id).ok_or_else(push::rule_not_found)?;
    Ok(axum::Json(json!({ "enabled": rule.enabled() })))
}

#[derive(Deserialize)]
pub struct EnabledBody {
    enabled: bool,
}

pub async fn put_enabled(
    State(state): State<AppState>,
    auth: Auth,
    Path((scope, kind, rule_id)): RulePath,
    Json(body): Json<EnabledBody>,
) -> ApiResult<axum::Json<Value>> {
    let kind = kind_in(&scope, &kind)?;
    push::modify(&state, &auth.user_id, |ruleset| {
        ruleset.set_enabled(kind, &rule_id, body.enabled).map_err(|_| push::rule_not_found())
    })
    .await?;
    Ok(axum::Json(json!({})))
}

pub async fn get_actions(
    State(state): State<AppState>,
    auth: Auth,
    Path((scope, kind, rule_id)): RulePath,
) -> ApiResult<axum::Json<Value>> {
    let kind = kind_in(&scope, &kind)?;
    let ruleset = push::ruleset(&state, &auth.user_id).await?;
    let rule = ruleset.get(kind, &rule_id).ok_or_else(push::rule_not_found)?;
    Ok(axum::Json(json!({ "actions": rule.actions() })))
}

#[derive(Deserialize)]
struct ActionsBody {
    actions: Vec<Action>,
}

pub async fn put_actions(
    State(state): State<AppState>,
    auth: Auth,
    Path((scope, kind, rule_id)): RulePath,
    Json(body): Json<Map<String, Value>>,
) -> ApiResult<axum::Json<Value>> {
    let kind = kind_in(&scope, &kind)?;
    let ActionsBody { actions } = push::parse(&Value::Object(body))?;
    push::modify(&state, &auth.user_id, |ruleset| {
        ruleset.set_actions(kind, &rule_id, actions).map_err(|_| push::rule_not_found())
    })
    .await?;
    Ok(axum::Json(json!({})))
}
