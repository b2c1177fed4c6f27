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
    if rule_id.chars().count() > push::MAX_TEXT_CHARS {
        return Err(Error::invalid_param(format!("Rule IDs are at most {} characters", push::MAX_TEXT_CHARS)));
    }
    let body: RuleBody = push::parse(&Value::Object(body))?;
    let rule = new_rule(&kind, rule_id.clone(), body)?;
    push::modify(&state, &auth.user_id, |ruleset| {
        ruleset.insert(rule, pos.after.as_deref(), pos.before.as_deref()).map_err(push::insert_error)?;
        let inserted = ruleset.get(kind.clone(), &rule_id).map(rule_json).unwrap_or_default();
        push::check_new_rule(ruleset, kind, &rule_id, inserted)
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
        ruleset.set_actions(kind.clone(), &rule_id, actions).map_err(|_| push::rule_not_found())?;
        // Server-default rules take any actions a user rule could have.
        match ruleset.get(kind, &rule_id).map(rule_json).and_then(|r| push::rule_problem(&r)) {
            Some(problem) => Err(Error::bad_json(format!("Push rule too large: {problem}"))),
            None => Ok(()),
        }
    })
    .await?;
    Ok(axum::Json(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Everything a `PUT /pushrules/global/{kind}/{rule_id}` does with its body before storing.
    fn put(kind: &str, rule_id: &str, body: &Value) -> ApiResult<()> {
        let kind = push::parse_kind(kind)?;
        let Value::Object(body) = body else { return Err(Error::bad_json("not an object")) };
        let body: RuleBody = push::parse(&Value::Object(body.clone()))?;
        let rule = new_rule(&kind, rule_id.to_owned(), body)?;
        let mut ruleset = ruma::push::Ruleset::server_default(<&ruma::UserId>::try_from("@u:example.org").unwrap());
        ruleset.insert(rule, None, None).map_err(push::insert_error)?;
        let inserted = ruleset.get(kind.clone(), rule_id).map(rule_json).unwrap_or_default();
        push::check_new_rule(&ruleset, kind, rule_id, inserted)
    }

    #[test]
    fn long_patterns_are_refused() {
        let e = put("content", "kw", &json!({ "pattern": "?".repeat(100_000), "actions": ["notify"] })).unwrap_err();
        assert_eq!((e.status.as_u16(), e.errcode), (400, "M_BAD_JSON"));
        let cond = json!({ "kind": "event_match", "key": "content.body", "pattern": "*".repeat(20_000) });
        let e = put("override", "o", &json!({ "conditions": [cond], "actions": ["notify"] })).unwrap_err();
        assert_eq!((e.status.as_u16(), e.errcode), (400, "M_BAD_JSON"));
        assert!(put("content", "kw", &json!({ "pattern": "lunch*", "actions": ["notify"] })).is_ok());
    }

    proptest! {
        /// Any body is a rule or a 400, never a panic.
        #[test]
        fn arbitrary_bodies_are_a_rule_or_400(
            kind in proptest::sample::select(&["override", "content", "room", "sender", "underride"][..]),
            rule_id in "[!@a-z:.]{1,12}",
            body in crate::http::extract::testing::filter_like_json(),
        ) {
            if let Err(e) = put(kind, &rule_id, &body) {
                prop_assert_eq!(e.status.as_u16(), 400, "{:?}", e);
            }
        }
    }
}
