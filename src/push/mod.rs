//! Push rules: each user's ruleset, kept as global account data of type `m.push_rules` so that
//! sync delivers it to clients like any other account data.
//!
//! What is stored is the user's *full* ruleset, `{"global": <ruleset>}` (server-default rules with
//! the user's `enabled`/`actions` choices, and the user's own rules in priority order), which is
//! the content clients expect to find in `m.push_rules`. A user who never changed anything has no
//! row: the server defaults apply. On every read the stored ruleset is merged with the current
//! server defaults (`Ruleset::update_with_server_default`), so default rules added by a later ruma
//! keep their definition from ruma, keep the user's `enabled`/`actions`, and new ones appear.
//!
//! Rule semantics (ordering, `before`/`after`, reserved IDs) are ruma's; this module maps its
//! errors to the spec's and does the read-modify-write atomically.
//!
//! `eval` evaluates the rules for every new event (recording notifications for unread counts and
//! `GET /notifications`); `gateway` delivers them to HTTP pushers.

pub mod eval;
pub mod gateway;

use ruma::UserId;
use ruma::push::{InsertPushRuleError, RemovePushRuleError, RuleKind, Ruleset};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage;

/// The account data type the ruleset is stored under.
pub const ACCOUNT_DATA_TYPE: &str = "m.push_rules";

/// The kinds the spec defines, in priority order.
pub const KINDS: [&str; 5] = ["override", "content", "room", "sender", "underride"];

/// The only scope the spec has.
pub fn check_scope(scope: &str) -> ApiResult<()> {
    if scope != "global" {
        return Err(Error::invalid_param(format!("Unknown push rule scope {scope:?}: only \"global\" exists")));
    }
    Ok(())
}

/// A kind named in a path: one of [`KINDS`], else 400 `M_INVALID_PARAM`.
pub fn parse_kind(kind: &str) -> ApiResult<RuleKind> {
    if !KINDS.contains(&kind) {
        return Err(Error::invalid_param(format!("Unknown push rule kind {kind:?}")));
    }
    Ok(RuleKind::from(kind))
}

/// Deserialises JSON into ruma's push types. Goes through text because some of them (conditions)
/// buffer raw JSON, which only a text deserializer provides. Shape errors are `M_BAD_JSON` naming
/// the field.
pub fn from_json<T: DeserializeOwned>(value: &Value) -> Result<T, serde_path_to_error::Error<serde_json::Error>> {
    let text = value.to_string();
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(&text))
}

fn bad_json(e: serde_path_to_error::Error<serde_json::Error>) -> Error {
    let path = e.path().to_string();
    if path == "." { Error::bad_json(e.inner().to_string()) } else { Error::bad_json(format!("{path}: {}", e.inner())) }
}

/// Parses `value` as `T` with `M_BAD_JSON` (naming the field) on failure.
pub fn parse<T: DeserializeOwned>(value: &Value) -> ApiResult<T> {
    from_json(value).map_err(bad_json)
}

/// The ruleset as the API and `m.push_rules` show it: all five kinds present (empty ones as `[]`).
pub fn to_json(ruleset: &Ruleset) -> Value {
    let mut v = serde_json::to_value(ruleset).unwrap_or_else(|_| json!({}));
    if let Some(obj) = v.as_object_mut() {
        for kind in KINDS {
            obj.entry(kind).or_insert_with(|| json!([]));
        }
    }
    v
}

/// The effective ruleset from stored `m.push_rules` content (or none): stored choices merged with
/// the current server defaults.
pub(crate) fn effective(user_id: &UserId, stored: Option<&Value>) -> ApiResult<Ruleset> {
    let defaults = Ruleset::server_default(user_id);
    let Some(global) = stored.and_then(|c| c.get("global")) else {
        return Ok(defaults);
    };
    // Only this module writes `m.push_rules`; an unreadable one is a bug (or an incompatible ruma)
    // and must not be silently replaced by the defaults on the next write.
    let mut ruleset: Ruleset = from_json(global).map_err(|e| {
        anyhow::anyhow!("stored m.push_rules of {user_id} is unreadable at {}: {}", e.path(), e.inner())
    })?;
    ruleset.update_with_server_default(defaults);
    Ok(ruleset)
}

fn user_id(user_id: &str) -> ApiResult<&UserId> {
    <&UserId>::try_from(user_id)
        .map_err(|_| anyhow::anyhow!("session user ID {user_id:?} is not a valid user ID").into())
}

/// The user's effective ruleset.
pub async fn ruleset(state: &AppState, user: &str) -> ApiResult<Ruleset> {
    let uid = user_id(user)?;
    let stored = storage::account_data::get(&state.db, user, None, ACCOUNT_DATA_TYPE).await?;
    effective(uid, stored.as_ref())
}

/// Applies `change` to the user's ruleset and stores the result, atomically: concurrent changes of
/// the same user serialise, none is lost. The account data stream advances (sync delivers the new
/// `m.push_rules`). An error from `change` stores nothing.
pub async fn modify<T>(
    state: &AppState,
    user: &str,
    change: impl FnOnce(&mut Ruleset) -> ApiResult<T>,
) -> ApiResult<T> {
    let uid = user_id(user)?;
    let mut out = None;
    let pos = storage::account_data::update(&state.db, user, None, ACCOUNT_DATA_TYPE, |stored| {
        let mut ruleset = effective(uid, stored.as_ref())?;
        out = Some(change(&mut ruleset)?);
        Ok::<_, Error>(Some(json!({ "global": to_json(&ruleset) })))
    })
    .await?;
    if let Some(pos) = pos {
        state.push_rules.invalidate(user);
        crate::sync::account_data_changed(state, user, pos);
    }
    out.ok_or_else(|| anyhow::anyhow!("push rule change did not run").into())
}

pub fn rule_not_found() -> Error {
    Error::not_found("The push rule was not found")
}

/// The spec's answer to each way ruma refuses an insertion.
pub fn insert_error(e: InsertPushRuleError) -> Error {
    match e {
        InsertPushRuleError::ServerDefaultRuleId => {
            Error::invalid_param("Rule IDs starting with a dot are reserved for server-default rules")
        }
        InsertPushRuleError::InvalidRuleId => Error::invalid_param("Rule IDs must not contain '/' or '\\'"),
        InsertPushRuleError::RelativeToServerDefaultRule => {
            Error::invalid_param("A rule cannot be placed relative to a server-default rule")
        }
        // The spec's 400 "problem configuring this push rule", with its example's errcode.
        InsertPushRuleError::UnknownRuleId => Error::unknown("before/after rule not found"),
        InsertPushRuleError::BeforeHigherThanAfter => {
            Error::invalid_param("The 'before' rule has a higher priority than the 'after' rule")
        }
        e => Error::invalid_param(e.to_string()),
    }
}

pub fn remove_error(e: RemovePushRuleError) -> Error {
    match e {
        RemovePushRuleError::ServerDefault => Error::invalid_param("Server-default rules cannot be deleted"),
        RemovePushRuleError::NotFound => rule_not_found(),
        e => Error::invalid_param(e.to_string()),
    }
}
