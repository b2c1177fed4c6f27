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

/// Longest text in a user's rule, in characters: the pattern of a content rule, the key and
/// pattern of a condition, the rule ID, any other string (tweak values...). Keywords and
/// conditions are short; evaluation time grows linearly with pattern length.
pub const MAX_TEXT_CHARS: usize = 1000;
/// Most conditions in one override/underride rule.
pub const MAX_CONDITIONS: usize = 20;
/// Largest user rule, as JSON.
pub const MAX_RULE_BYTES: usize = 16 * 1024;
/// Most user-defined rules of one kind (server defaults are not counted).
pub const MAX_RULES_PER_KIND: usize = 100;
/// Largest ruleset (defaults included, about 5 KiB), as JSON: it is evaluated for every event of
/// every room the user is in, and sent to their clients as `m.push_rules`.
pub const MAX_RULESET_BYTES: usize = 64 * 1024;

/// What is wrong with a user rule (its JSON as the API shows it), if anything: more than
/// [`MAX_CONDITIONS`] conditions, a string longer than [`MAX_TEXT_CHARS`], more than
/// [`MAX_RULE_BYTES`] of JSON. Linear in the rule's size.
pub fn rule_problem(rule: &Value) -> Option<String> {
    if rule.get("conditions").and_then(Value::as_array).is_some_and(|c| c.len() > MAX_CONDITIONS) {
        return Some(format!("conditions: more than {MAX_CONDITIONS}"));
    }
    let mut stack = vec![rule];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) if s.len() > MAX_TEXT_CHARS && s.chars().count() > MAX_TEXT_CHARS => {
                return Some(format!("a pattern or other text is longer than {MAX_TEXT_CHARS} characters"));
            }
            Value::Array(a) => stack.extend(a),
            Value::Object(o) => {
                if o.keys().any(|k| k.len() > MAX_TEXT_CHARS) {
                    return Some(format!("a key is longer than {MAX_TEXT_CHARS} bytes"));
                }
                stack.extend(o.values());
            }
            _ => {}
        }
    }
    if serde_json::to_vec(rule).map_or(usize::MAX, |b| b.len()) > MAX_RULE_BYTES {
        return Some(format!("the rule is larger than {MAX_RULE_BYTES} bytes"));
    }
    None
}

/// Drops the user rules a ruleset must not have (see [`rule_problem`], [`MAX_RULES_PER_KIND`]:
/// the lowest-priority ones beyond it), logging each. Rules stored before these limits existed
/// must not make evaluation slow, and must not block the user's next change.
fn sanitize(user_id: &UserId, ruleset: &mut Ruleset) {
    macro_rules! sanitize_kind {
        ($set:expr, $kind:literal) => {{
            let mut user_rules = 0;
            $set.retain(|r| {
                if r.default {
                    return true;
                }
                let problem = rule_problem(&serde_json::to_value(r).unwrap_or(Value::Null)).or_else(|| {
                    user_rules += 1;
                    (user_rules > MAX_RULES_PER_KIND)
                        .then(|| format!("more than {MAX_RULES_PER_KIND} rules of this kind"))
                });
                if let Some(problem) = &problem {
                    tracing::warn!(%user_id, kind = $kind, rule_id = %r.rule_id, %problem, "ignoring a stored push rule");
                }
                problem.is_none()
            });
        }};
    }
    sanitize_kind!(ruleset.override_, "override");
    sanitize_kind!(ruleset.content, "content");
    sanitize_kind!(ruleset.room, "room");
    sanitize_kind!(ruleset.sender, "sender");
    sanitize_kind!(ruleset.underride, "underride");
}

/// Checks the rule `rule_id` of `kind` just inserted into `ruleset` against the limits: 400
/// `M_BAD_JSON` for the rule itself, `M_INVALID_PARAM` for too many rules of its kind.
pub fn check_new_rule(ruleset: &Ruleset, kind: RuleKind, rule_id: &str, rule_json: Value) -> ApiResult<()> {
    if let Some(problem) = rule_problem(&rule_json) {
        return Err(Error::bad_json(format!("Push rule too large: {problem}")));
    }
    let user_rules = match kind {
        RuleKind::Override => ruleset.override_.iter().filter(|r| !r.default).count(),
        RuleKind::Underride => ruleset.underride.iter().filter(|r| !r.default).count(),
        RuleKind::Content => ruleset.content.iter().filter(|r| !r.default).count(),
        RuleKind::Room => ruleset.room.iter().filter(|r| !r.default).count(),
        RuleKind::Sender => ruleset.sender.iter().filter(|r| !r.default).count(),
        _ => 0,
    };
    if user_rules > MAX_RULES_PER_KIND {
        return Err(Error::invalid_param(format!(
            "Cannot add {rule_id:?}: at most {MAX_RULES_PER_KIND} rules of one kind"
        )));
    }
    Ok(())
}

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
    sanitize(user_id, &mut ruleset);
    Ok(ruleset)
}

fn json_len(v: &Value) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |b| b.len())
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
        let before = json_len(&to_json(&ruleset));
        out = Some(change(&mut ruleset)?);
        let content = to_json(&ruleset);
        // Growing past the limit is refused; a change that shrinks (or keeps) an oversized
        // ruleset from before the limit is not.
        let after = json_len(&content);
        if after > MAX_RULESET_BYTES && after > before {
            return Err(Error::invalid_param(format!("Push rules would exceed {MAX_RULESET_BYTES} bytes")));
        }
        Ok::<_, Error>(Some(json!({ "global": content })))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stored_with(content_rules: Vec<Value>) -> Value {
        let uid = <&UserId>::try_from("@u:example.org").unwrap();
        let mut global = to_json(&Ruleset::server_default(uid));
        global["content"].as_array_mut().unwrap().extend(content_rules);
        json!({ "global": global })
    }

    fn user_rule(id: &str, pattern: &str) -> Value {
        json!({ "rule_id": id, "pattern": pattern, "enabled": true, "default": false, "actions": ["notify"] })
    }

    #[test]
    fn stored_rules_past_the_limits_are_ignored() {
        let uid = <&UserId>::try_from("@u:example.org").unwrap();
        let mut rules = vec![user_rule("huge", &"?".repeat(100_000)), user_rule("ok", "lunch")];
        rules.extend((0..150).map(|i| user_rule(&format!("k{i}"), "x")));
        let ruleset = effective(uid, Some(&stored_with(rules))).unwrap();
        let user: Vec<&str> = ruleset.content.iter().filter(|r| !r.default).map(|r| r.rule_id.as_str()).collect();
        assert!(!user.contains(&"huge"));
        assert_eq!(user.len(), MAX_RULES_PER_KIND);
        assert_eq!(user[0], "ok");
        // The server defaults are all there.
        assert_eq!(ruleset.content.iter().filter(|r| r.default).count(), Ruleset::server_default(uid).content.len());
    }

    #[test]
    fn rule_problems() {
        assert_eq!(rule_problem(&user_rule("a", "lunch")), None);
        assert!(rule_problem(&user_rule("a", &"*".repeat(MAX_TEXT_CHARS + 1))).is_some());
        assert_eq!(rule_problem(&user_rule("a", &"é".repeat(MAX_TEXT_CHARS))), None);
        let conditions: Vec<Value> =
            (0..=MAX_CONDITIONS).map(|_| json!({ "kind": "event_match", "key": "type", "pattern": "x" })).collect();
        assert!(rule_problem(&json!({ "rule_id": "a", "conditions": conditions, "actions": [] })).is_some());
        let tweaks: Vec<Value> = (0..40).map(|_| json!({ "set_tweak": "x", "value": "y".repeat(900) })).collect();
        assert!(rule_problem(&json!({ "rule_id": "a", "conditions": [], "actions": tweaks })).is_some());
    }
}
