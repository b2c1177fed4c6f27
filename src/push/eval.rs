//! Push rule evaluation: which local users each new event notifies, recorded in the event's own
//! write transaction (so unread counts never miss or double-count an event), and the push jobs
//! handed to the gateway after commit.
//!
//! Per batch of events of one room: the room state before the batch (joined members with their
//! display names, power levels, create event, name, canonical alias), from the view the previous
//! batch left in memory or else one query, walked forward through the batch's own state events;
//! at most one query for the push settings of users missing from the cache; one `INSERT` for all
//! resulting rows. Each event is
//! flattened once and evaluated against the rulesets of every joined member but its sender, plus
//! the invitee of an invite. The rules decide everything else (member events, notices, edits...
//! are `dont_notify` by the server-default rules).
//!
//! Room version features (`room_version_supports`) are an unstable condition that no stable
//! room version has any feature for; ruma only exposes them behind an unstable feature, so they
//! are not set.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ruma::events::room::power_levels::{RoomPowerLevels, RoomPowerLevelsEventContent, RoomPowerLevelsSource};
use ruma::push::{
    Action, AnyPushRuleRef, FlattenedJson, PredefinedContentRuleId, PredefinedOverrideRuleId, PushCondition,
    PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset,
};
use ruma::serde::Raw;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, UInt, UserId};
use serde_json::{Value, json};
use sqlx::PgConnection;

use crate::config::PushConfig;
use crate::error::ApiResult;
use crate::rooms::{Appended, Room};
use crate::state::AppState;
use crate::storage::{self, now_ms, push::NewPushAction};

/// The account data type of the ignore list, which suppresses notifications from those users.
pub const IGNORED_USERS_TYPE: &str = "m.ignored_user_list";

/// An event that notified someone, as the push gateway describes it.
#[derive(Debug)]
pub struct NotifiedEvent {
    pub room_id: OwnedRoomId,
    pub event_id: OwnedEventId,
    pub event_type: String,
    pub sender: String,
    pub state_key: Option<String>,
    pub content: Value,
    /// The sender's display name in the room, when they have one.
    pub sender_display_name: Option<String>,
    pub room_name: Option<String>,
    pub room_alias: Option<String>,
}

/// One user notified by one event: what the gateway delivers to that user's pushers.
#[derive(Debug, Clone)]
pub struct PushJob {
    pub user_id: String,
    /// The event's stream position (pushers record how far they delivered).
    pub stream: i64,
    pub event: Arc<NotifiedEvent>,
    /// The actions of the rule that matched (they include `notify`).
    pub actions: Vec<Action>,
    pub highlight: bool,
}

/// A user's push settings as evaluation uses them.
#[derive(Debug)]
pub struct UserPushSettings {
    pub ruleset: Ruleset,
    /// Users whose events notify nobody here (`m.ignored_user_list`).
    pub ignored: HashSet<String>,
}

/// Per-user push settings in memory. Changes through this process evict at once (see
/// [`RulesCache::invalidate`]); the TTL bounds staleness for changes made by other instances.
pub struct RulesCache {
    cache: moka::sync::Cache<String, Arc<UserPushSettings>>,
    /// Bumped by every eviction: a load that raced with one is used but not cached, so a ruleset
    /// read just before a change commits cannot outlive the change in the cache.
    generation: AtomicU64,
}

impl RulesCache {
    pub fn new(config: &PushConfig) -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(config.ruleset_cache_capacity)
                .time_to_live(Duration::from_secs(config.ruleset_cache_ttl_secs.max(1)))
                .build(),
            generation: AtomicU64::new(0),
        }
    }

    /// Forgets a user's settings; call after their change committed.
    pub fn invalidate(&self, user_id: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate(user_id);
    }

    /// A user's settings if cached (no query).
    pub fn cached(&self, user: &str) -> Option<Arc<UserPushSettings>> {
        self.cache.get(user)
    }

    /// The settings of `users`, from the cache or, for all the missing ones, one query.
    pub async fn get_many(
        &self,
        conn: &mut PgConnection,
        users: &[&str],
    ) -> sqlx::Result<HashMap<String, Arc<UserPushSettings>>> {
        let mut out = HashMap::with_capacity(users.len());
        let mut missing = Vec::new();
        for u in users {
            match self.cache.get(*u) {
                Some(s) => {
                    out.insert((*u).to_owned(), s);
                }
                None => missing.push((*u).to_owned()),
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let rows = storage::account_data::global_for_users(
            &mut *conn,
            &missing,
            &[super::ACCOUNT_DATA_TYPE, IGNORED_USERS_TYPE],
        )
        .await?;
        let mut stored: HashMap<&str, (Option<&Value>, Option<&Value>)> = HashMap::new();
        for (user, data_type, content) in &rows {
            let entry = stored.entry(user.as_str()).or_default();
            if data_type == super::ACCOUNT_DATA_TYPE {
                entry.0 = Some(&content.0);
            } else {
                entry.1 = Some(&content.0);
            }
        }
        let mut loaded = Vec::with_capacity(missing.len());
        for user in &missing {
            let Ok(uid) = <&UserId>::try_from(user.as_str()) else { continue };
            let (rules, ignore_list) = stored.get(user.as_str()).copied().unwrap_or_default();
            let ruleset = super::effective(uid, rules).unwrap_or_else(|e| {
                tracing::error!(user_id = %user, error = %e.message, "unreadable push rules; using the defaults");
                Ruleset::server_default(uid)
            });
            let ignored = ignore_list
                .and_then(|c| c.get("ignored_users"))
                .and_then(Value::as_object)
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            loaded.push((user.clone(), Arc::new(UserPushSettings { ruleset, ignored })));
        }
        let cacheable = self.generation.load(Ordering::SeqCst) == generation;
        for (user, settings) in loaded {
            if cacheable {
                self.cache.insert(user.clone(), settings.clone());
            }
            out.insert(user, settings);
        }
        Ok(out)
    }
}

/// Most joined members (summed over rooms) whose room views are kept in memory.
const VIEW_CACHE_MEMBERS: u64 = 500_000;

/// The room view after the last batch of each recently written room, keyed by the state group it
/// describes. State groups never change and their IDs are never reused, so an entry is valid
/// exactly when the next batch starts from the same group (always, for a room written only by
/// this process): the state query is then skipped. A group from a rolled-back transaction simply
/// never matches.
pub struct ViewCache(moka::sync::Cache<i64, Arc<(i64, RoomView)>>);

impl Default for ViewCache {
    fn default() -> Self {
        Self(
            moka::sync::Cache::builder()
                .max_capacity(VIEW_CACHE_MEMBERS)
                .weigher(|_, v: &Arc<(i64, RoomView)>| u32::try_from(v.1.members.len() + 1).unwrap_or(u32::MAX))
                .build(),
        )
    }
}

impl ViewCache {
    fn get(&self, room_nid: i64, group: i64) -> Option<RoomView> {
        self.0.get(&room_nid).filter(|e| e.0 == group).map(|e| e.1.clone())
    }

    fn put(&self, room_nid: i64, group: i64, view: RoomView) {
        self.0.insert(room_nid, Arc::new((group, view)));
    }

    fn forget(&self, room_nid: i64) {
        self.0.invalidate(&room_nid);
    }
}

/// Evicts cached push settings after a change of account data that affects them.
pub fn account_data_changed(state: &AppState, user_id: &str, data_type: &str) {
    if data_type == IGNORED_USERS_TYPE || data_type == super::ACCOUNT_DATA_TYPE {
        state.push_rules.invalidate(user_id);
    }
}

/// A joined member: the parsed ID (parsed once per batch, not per event) and display name.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: OwnedUserId,
    pub display_name: Option<String>,
}

/// The room as evaluation sees it just before an event: joined members (with their display
/// names) and the state that push conditions and the gateway need.
#[derive(Default, Clone)]
pub struct RoomView {
    /// Joined members (those with a valid user ID) by user ID.
    pub members: HashMap<String, Member>,
    pub power_levels: Option<Value>,
    /// The create event's sender and content (for v12 creators).
    pub create: Option<(String, Value)>,
    pub name: Option<String>,
    pub alias: Option<String>,
    /// Built from `power_levels` and `create` on first use.
    pl_ctx: Option<Option<PushConditionPowerLevelsCtx>>,
}

impl RoomView {
    fn from_rows(rows: Vec<storage::push::PushStateRow>) -> Self {
        let mut view = Self::default();
        for r in rows {
            view.apply(&r.event_type, &r.state_key, &r.sender, &r.content.0, true);
        }
        view
    }

    /// Applies a state event (`joined`: the member rows of the query are joined members with
    /// only their display name).
    fn apply(&mut self, event_type: &str, state_key: &str, sender: &str, content: &Value, joined: bool) {
        let text = |key: &str| content.get(key).and_then(Value::as_str).map(str::to_owned);
        match event_type {
            "m.room.member" => {
                if joined || content.get("membership").and_then(Value::as_str) == Some("join") {
                    if let Ok(id) = OwnedUserId::try_from(state_key) {
                        self.members.insert(state_key.to_owned(), Member { id, display_name: text("displayname") });
                    }
                } else {
                    self.members.remove(state_key);
                }
            }
            "m.room.power_levels" => {
                self.power_levels = Some(content.clone());
                self.pl_ctx = None;
            }
            "m.room.create" => {
                self.create = Some((sender.to_owned(), content.clone()));
                self.pl_ctx = None;
            }
            "m.room.name" => self.name = text("name").filter(|n| !n.is_empty()),
            "m.room.canonical_alias" => self.alias = text("alias"),
            _ => {}
        }
    }

    fn power_levels_ctx(&mut self, room: &Room) -> Option<PushConditionPowerLevelsCtx> {
        if self.pl_ctx.is_none() {
            self.pl_ctx = Some(build_pl_ctx(room, self.power_levels.as_ref(), self.create.as_ref()));
        }
        self.pl_ctx.clone().flatten()
    }
}

fn build_pl_ctx(
    room: &Room,
    pl: Option<&Value>,
    create: Option<&(String, Value)>,
) -> Option<PushConditionPowerLevelsCtx> {
    let mut creators: Vec<OwnedUserId> = Vec::new();
    if let Some((sender, content)) = create {
        creators.extend(OwnedUserId::try_from(sender.as_str()).ok());
        if room.rules.authorization.additional_room_creators {
            creators.extend(
                content["additional_creators"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .filter_map(|u| OwnedUserId::try_from(u).ok()),
            );
        }
    }
    let source = match pl.map(|c| serde_json::from_value::<RoomPowerLevelsEventContent>(c.clone())) {
        Some(Ok(content)) => RoomPowerLevelsSource::Original(content),
        Some(Err(e)) => {
            tracing::warn!(room_id = %room.room_id, error = %e, "unreadable power levels; @room needs the default");
            RoomPowerLevelsSource::None
        }
        None => RoomPowerLevelsSource::None,
    };
    Some(RoomPowerLevels::new(source, &room.rules.authorization, creators).into())
}

/// The thread an event belongs to: its `m.thread` root, else the main timeline.
pub fn thread_of(content: &Value) -> String {
    let rel = &content["m.relates_to"];
    match (rel["rel_type"].as_str(), rel["event_id"].as_str()) {
        (Some("m.thread"), Some(root)) => root.to_owned(),
        _ => "main".to_owned(),
    }
}

/// What the rules say for one member.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub user_id: String,
    pub actions: Vec<Action>,
    pub highlight: bool,
}

/// The event as push rules see it (client format without `unsigned`), flattened once.
pub fn flatten(room: &Room, event_type: &str, sender: &str, state_key: Option<&str>, content: &Value) -> FlattenedJson {
    let mut ev = json!({
        "type": event_type,
        "sender": sender,
        "room_id": room.room_id,
        "content": content,
    });
    if let Some(sk) = state_key {
        ev["state_key"] = json!(sk);
    }
    let raw = serde_json::value::to_raw_value(&ev)
        .unwrap_or_else(|_| serde_json::value::to_raw_value(&json!({})).expect("an empty object serializes"));
    FlattenedJson::from_raw(&Raw::<Value>::from_json(raw))
}

/// The first matching rule's actions in `ruleset`, as ruma's `Ruleset::get_actions` but over an
/// event flattened once by the caller. A user without a display name in the room is never
/// matched by a display-name condition.
///
/// Rules are evaluated here, not by ruma, wherever a glob pattern is involved (content rules,
/// room and sender rules, `event_match` and display-name conditions): ruma compiles a regex from
/// each pattern at every evaluation and panics when it is too large (a long pattern, or a long
/// display name full of `?`), and its word matching recurses once per occurrence of the
/// pattern in the body. [`crate::glob::Glob`] matches in O(n·⌈m/64⌉) and cannot panic. Other
/// conditions (member count, sender permission, exact property matches) are ruma's.
pub async fn actions_for<'a>(ruleset: &'a Ruleset, event: &FlattenedJson, ctx: &PushConditionRoomCtx) -> &'a [Action] {
    if event.get_str("sender").is_some_and(|sender| sender == ctx.user_id) {
        return &[];
    }
    let has_display_name = !ctx.user_display_name.is_empty();
    for rule in ruleset.iter() {
        if !has_display_name && uses_display_name(rule) {
            continue;
        }
        if rule_applies(rule, event, ctx).await {
            return rule.actions();
        }
    }
    &[]
}

/// ruma's `AnyPushRuleRef::applies`, with patterns matched by [`pattern_matches`].
#[allow(deprecated)]
async fn rule_applies(rule: AnyPushRuleRef<'_>, event: &FlattenedJson, ctx: &PushConditionRoomCtx) -> bool {
    match rule {
        AnyPushRuleRef::Override(r) | AnyPushRuleRef::Underride(r) => {
            if !r.enabled {
                return false;
            }
            // The old mention rules are disabled when an m.mentions field is present.
            if (r.rule_id == PredefinedOverrideRuleId::RoomNotif.as_str()
                || r.rule_id == PredefinedOverrideRuleId::ContainsDisplayName.as_str())
                && event.contains_mentions()
            {
                return false;
            }
            for c in &r.conditions {
                if !condition_applies(c, event, ctx).await {
                    return false;
                }
            }
            true
        }
        AnyPushRuleRef::Content(r) => {
            if r.rule_id == PredefinedContentRuleId::ContainsUserName.as_str() && event.contains_mentions() {
                return false;
            }
            r.enabled && event_match(event, "content.body", &r.pattern, ctx)
        }
        AnyPushRuleRef::Room(r) => r.enabled && event_match(event, "room_id", r.rule_id.as_str(), ctx),
        AnyPushRuleRef::Sender(r) => r.enabled && event_match(event, "sender", r.rule_id.as_str(), ctx),
        // Kinds outside the spec (unstable features): only ever server defaults.
        other => other.applies(event, ctx).await,
    }
}

#[allow(deprecated)]
async fn condition_applies(c: &PushCondition, event: &FlattenedJson, ctx: &PushConditionRoomCtx) -> bool {
    match c {
        PushCondition::EventMatch(d) => event_match(event, &d.key, &d.pattern, ctx),
        PushCondition::ContainsDisplayName => {
            event.get_str("content.body").is_some_and(|body| pattern_matches(&ctx.user_display_name, body, true))
        }
        other => other.applies(event, ctx).await,
    }
}

/// The spec's `event_match`: `room_id` from the context, other keys from the event; the whole
/// value must match, except for `content.body` where a word-bounded part of it must.
fn event_match(event: &FlattenedJson, key: &str, pattern: &str, ctx: &PushConditionRoomCtx) -> bool {
    let value = match key {
        "room_id" => ctx.room_id.as_str(),
        _ => match event.get_str(key) {
            Some(v) => v,
            None => return false,
        },
    };
    pattern_matches(pattern, value, key == "content.body")
}

/// Case-insensitive glob (`*`, `?`) match of `pattern` against all of `value`, or with `words`
/// against a part of it that starts and ends on word boundaries.
pub fn pattern_matches(pattern: &str, value: &str, words: bool) -> bool {
    if !words && !pattern.contains(['*', '?']) {
        // Most conditions (`type`, `content.msgtype`...): a comparison, without allocating.
        return pattern.chars().flat_map(char::to_lowercase).eq(value.chars().flat_map(char::to_lowercase));
    }
    let glob = crate::glob::Glob::new(&pattern.to_lowercase());
    let value = value.to_lowercase();
    if words { glob.is_match_words(&value) } else { glob.is_match(&value) }
}

#[allow(deprecated)]
fn uses_display_name(rule: AnyPushRuleRef<'_>) -> bool {
    let conditions = match rule {
        AnyPushRuleRef::Override(r) | AnyPushRuleRef::Underride(r) => &r.conditions,
        _ => return false,
    };
    conditions.iter().any(|c| matches!(c, PushCondition::ContainsDisplayName))
}

/// Evaluates one event for its recipients against their settings. `view` is the room just
/// before the event.
#[allow(clippy::too_many_arguments)]
pub async fn evaluate_event(
    room: &Room,
    view: &mut RoomView,
    settings: &HashMap<String, Arc<UserPushSettings>>,
    server_name: &str,
    event_type: &str,
    sender: &str,
    state_key: Option<&str>,
    content: &Value,
) -> Vec<Outcome> {
    let recipients = recipients(view, server_name, event_type, sender, state_key, content);
    if recipients.is_empty() {
        return Vec::new();
    }
    let flat = flatten(room, event_type, sender, state_key, content);
    let member_count = UInt::try_from(view.members.len() as u64).unwrap_or(UInt::MAX);
    let Ok(placeholder) = OwnedUserId::try_from(sender) else { return Vec::new() };
    let mut ctx = PushConditionRoomCtx::new(room.room_id.clone(), member_count, placeholder, String::new());
    ctx.power_levels = view.power_levels_ctx(room);
    let mut out = Vec::new();
    for member in recipients {
        let Some(s) = settings.get(member.id.as_str()) else { continue };
        if s.ignored.contains(sender) {
            continue;
        }
        ctx.user_id = member.id;
        ctx.user_display_name = member.display_name.unwrap_or_default();
        let actions = actions_for(&s.ruleset, &flat, &ctx).await;
        if actions.iter().any(Action::should_notify) {
            out.push(Outcome {
                user_id: ctx.user_id.to_string(),
                highlight: actions.iter().any(Action::is_highlight),
                actions: actions.to_vec(),
            });
        }
    }
    out
}

/// Who an event is evaluated for: local joined members but the sender, and the local invitee of
/// an invite, each with their display name in the room.
fn recipients(
    view: &RoomView,
    server_name: &str,
    event_type: &str,
    sender: &str,
    state_key: Option<&str>,
    content: &Value,
) -> Vec<Member> {
    let mut out: Vec<Member> = view
        .members
        .values()
        .filter(|m| m.id.as_str() != sender && m.id.server_name() == server_name)
        .cloned()
        .collect();
    if event_type == "m.room.member"
        && content["membership"] == "invite"
        && let Some(invitee) = state_key
        && invitee != sender
        && !view.members.contains_key(invitee)
        && let Ok(id) = OwnedUserId::try_from(invitee)
        && id.server_name() == server_name
    {
        out.push(Member { id, display_name: content["displayname"].as_str().map(str::to_owned) });
    }
    out
}

/// Evaluates push rules for a batch of events just appended to `room` (in order, inside the
/// caller's transaction, before commit) and records who they notify. Returns the push jobs to
/// hand to [`super::gateway::dispatch`] after commit. An error is a database error: the
/// transaction is then unusable and the caller's commit fails.
pub async fn record_batch(
    state: &AppState,
    conn: &mut PgConnection,
    room: &Room,
    events: &[Appended],
) -> ApiResult<Vec<PushJob>> {
    record(state, conn, room, events).await.inspect_err(|e| {
        tracing::error!(room_id = %room.room_id, error = %e.message, "push rule evaluation failed");
    })
}

async fn record(
    state: &AppState,
    conn: &mut PgConnection,
    room: &Room,
    events: &[Appended],
) -> ApiResult<Vec<PushJob>> {
    let Some(first) = events.first() else { return Ok(Vec::new()) };
    let started = std::time::Instant::now();
    let mut view = match first.row.state_before {
        Some(group) => match state.push_views.get(room.nid, group) {
            Some(view) => view,
            None => RoomView::from_rows(storage::push::room_push_state(&mut *conn, group).await?),
        },
        None => RoomView::default(),
    };

    // Everyone who can be a recipient in this batch: the members before it, those who join
    // during it, and invitees.
    let mut candidates: HashSet<&str> = view.members.keys().map(String::as_str).collect();
    for a in events {
        if a.row.event_type == "m.room.member"
            && let Some(sk) = &a.row.state_key
        {
            candidates.insert(sk);
        }
    }
    let server_name = state.config.server_name.as_str();
    let candidates: Vec<&str> = candidates.into_iter().filter(|u| crate::users::is_local(u, server_name)).collect();
    let settings = state.push_rules.get_many(&mut *conn, &candidates).await?;

    let mut rows = Vec::new();
    let mut jobs = Vec::new();
    let mut joins: Vec<(String, i64)> = Vec::new();
    for a in events {
        let row = &a.row;
        let outcomes = evaluate_event(
            room,
            &mut view,
            &settings,
            server_name,
            &row.event_type,
            &row.sender,
            row.state_key.as_deref(),
            &a.content,
        )
        .await;
        if !outcomes.is_empty() {
            let thread_id = thread_of(&a.content);
            let event = Arc::new(NotifiedEvent {
                room_id: room.room_id.clone(),
                event_id: a.event_id.clone(),
                event_type: row.event_type.clone(),
                sender: row.sender.clone(),
                state_key: row.state_key.clone(),
                content: a.content.clone(),
                sender_display_name: view.members.get(&row.sender).and_then(|m| m.display_name.clone()),
                room_name: view.name.clone(),
                room_alias: view.alias.clone(),
            });
            for o in outcomes {
                rows.push(NewPushAction {
                    user_id: o.user_id.clone(),
                    event_nid: a.event_nid,
                    stream_ordering: a.stream,
                    thread_id: thread_id.clone(),
                    notify: true,
                    highlight: o.highlight,
                    actions: serde_json::to_value(&o.actions).unwrap_or_else(|_| json!(["notify"])),
                });
                jobs.push(PushJob {
                    user_id: o.user_id,
                    stream: a.stream,
                    event: event.clone(),
                    actions: o.actions,
                    highlight: o.highlight,
                });
            }
        }
        if let Some(sk) = &row.state_key {
            // A local user joining: what was notified before (their invite, typically) was for
            // a room they could not read, and is not unread in the room they now see.
            if row.event_type == "m.room.member"
                && a.content["membership"] == "join"
                && !view.members.contains_key(sk)
                && crate::users::is_local(sk, server_name)
            {
                joins.push((sk.clone(), a.stream));
            }
            view.apply(&row.event_type, sk, &row.sender, &a.content, false);
        }
    }
    for (user, stream) in &joins {
        storage::push::clear_before(&mut *conn, room.nid, user, *stream).await?;
    }
    // Only users with an HTTP pusher need a delivery job. A pusher registered while this
    // transaction runs (after the statement's snapshot) starts at the position of its user's
    // newest notification already committed, so it still gets these events, from the periodic
    // `gateway::resume` rather than right after the commit.
    let with_pushers: HashSet<String> =
        storage::push::insert_actions(conn, room.nid, now_ms(), &rows).await?.into_iter().collect();
    jobs.retain(|j| with_pushers.contains(&j.user_id));
    // A redaction can blank a display name or the room name without a new state group.
    match events.last().and_then(|a| a.row.state_after) {
        Some(group) if !events.iter().any(|a| a.row.event_type == "m.room.redaction") => {
            state.push_views.put(room.nid, group, view)
        }
        _ => state.push_views.forget(room.nid),
    }
    tracing::debug!(
        room = %room.room_id,
        events = events.len(),
        notifications = rows.len(),
        micros = started.elapsed().as_micros() as u64,
        "push rules evaluated"
    );
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room() -> Room {
        let (version, rules) = crate::rooms::rules_for("12").unwrap();
        Room { nid: 1, room_id: OwnedRoomId::try_from("!room:example.org").unwrap(), version, rules }
    }

    fn settings_for(users: &[String]) -> HashMap<String, Arc<UserPushSettings>> {
        users
            .iter()
            .map(|u| {
                let uid = <&UserId>::try_from(u.as_str()).unwrap();
                (
                    u.clone(),
                    Arc::new(UserPushSettings { ruleset: Ruleset::server_default(uid), ignored: HashSet::new() }),
                )
            })
            .collect()
    }

    fn view_with(users: &[String]) -> RoomView {
        let mut view = RoomView::default();
        view.apply("m.room.create", "", &users[0], &json!({ "room_version": "12" }), false);
        view.apply(
            "m.room.power_levels",
            "",
            &users[0],
            &json!({ "users": {}, "notifications": { "room": 50 } }),
            false,
        );
        for (i, u) in users.iter().enumerate() {
            view.apply(
                "m.room.member",
                u,
                u,
                &json!({ "membership": "join", "displayname": format!("User {i}") }),
                false,
            );
        }
        view
    }

    fn users(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("@u{i}:example.org")).collect()
    }

    #[tokio::test]
    async fn message_notifies_everyone_but_the_sender() {
        let users = users(3);
        let (room, settings, mut view) = (room(), settings_for(&users), view_with(&users));
        let content = json!({ "msgtype": "m.text", "body": "hello" });
        let mut out =
            evaluate_event(&room, &mut view, &settings, "example.org", "m.room.message", &users[0], None, &content)
                .await;
        out.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        assert_eq!(out.iter().map(|o| o.user_id.as_str()).collect::<Vec<_>>(), [&users[1], &users[2]]);
        assert!(out.iter().all(|o| !o.highlight));
    }

    #[tokio::test]
    async fn mentions_highlight_and_member_events_do_not_notify() {
        let users = users(3);
        let (room, settings, mut view) = (room(), settings_for(&users), view_with(&users));
        let content = json!({ "msgtype": "m.text", "body": "hey", "m.mentions": { "user_ids": [users[2]] } });
        let out =
            evaluate_event(&room, &mut view, &settings, "example.org", "m.room.message", &users[0], None, &content)
                .await;
        assert_eq!(out.iter().filter(|o| o.highlight).map(|o| o.user_id.as_str()).collect::<Vec<_>>(), [&users[2]]);

        // @room needs notifications.room (50): user 1 (level 0) cannot, the v12 creator can.
        let room_mention = json!({ "msgtype": "m.text", "body": "all", "m.mentions": { "room": true } });
        let out = evaluate_event(
            &room,
            &mut view,
            &settings,
            "example.org",
            "m.room.message",
            &users[1],
            None,
            &room_mention,
        )
        .await;
        assert!(out.iter().all(|o| !o.highlight), "{out:?}");
        let out = evaluate_event(
            &room,
            &mut view,
            &settings,
            "example.org",
            "m.room.message",
            &users[0],
            None,
            &room_mention,
        )
        .await;
        assert!(out.iter().all(|o| o.highlight) && out.len() == 2, "{out:?}");

        let join = json!({ "membership": "join", "displayname": "New" });
        let out = evaluate_event(
            &room,
            &mut view,
            &settings,
            "example.org",
            "m.room.member",
            "@new:example.org",
            Some("@new:example.org"),
            &join,
        )
        .await;
        assert!(out.is_empty(), "{out:?}");
    }

    #[tokio::test]
    async fn invitee_is_notified_and_ignored_senders_are_not() {
        let users = users(2);
        let invitee = "@guest:example.org".to_owned();
        let mut all = users.clone();
        all.push(invitee.clone());
        let (room, mut settings, mut view) = (room(), settings_for(&all), view_with(&users));
        let invite = json!({ "membership": "invite", "displayname": "Guest" });
        let out = evaluate_event(
            &room,
            &mut view,
            &settings,
            "example.org",
            "m.room.member",
            &users[0],
            Some(&invitee),
            &invite,
        )
        .await;
        assert_eq!(out.iter().map(|o| o.user_id.as_str()).collect::<Vec<_>>(), [invitee.as_str()]);

        let uid = <&UserId>::try_from(users[1].as_str()).unwrap();
        settings.insert(
            users[1].clone(),
            Arc::new(UserPushSettings {
                ruleset: Ruleset::server_default(uid),
                ignored: [users[0].clone()].into_iter().collect(),
            }),
        );
        let msg = json!({ "msgtype": "m.text", "body": "hello" });
        let out =
            evaluate_event(&room, &mut view, &settings, "example.org", "m.room.message", &users[0], None, &msg).await;
        assert!(out.is_empty(), "{out:?}");
    }

    fn ctx(room: &Room, user: &str, display_name: &str) -> PushConditionRoomCtx {
        PushConditionRoomCtx::new(
            room.room_id.clone(),
            UInt::from(3u32),
            OwnedUserId::try_from(user).unwrap(),
            display_name.to_owned(),
        )
    }

    /// A ruleset with one user content rule, inserted past the limits on purpose: evaluation
    /// itself must stay safe whatever the ruleset holds.
    fn with_content_rule(user: &str, pattern: &str) -> Ruleset {
        let mut ruleset = Ruleset::server_default(<&UserId>::try_from(user).unwrap());
        let rule = ruma::push::NewPushRule::Content(ruma::push::NewPatternedPushRule::new(
            "kw".into(),
            pattern.into(),
            vec![Action::Notify, Action::SetTweak(ruma::push::Tweak::Highlight(ruma::push::HighlightTweakValue::Yes))],
        ));
        ruleset.insert(rule, None, None).unwrap();
        ruleset
    }

    #[tokio::test]
    async fn huge_patterns_neither_panic_nor_stall() {
        let room = room();
        let body = format!("{} end", "word ".repeat(10_000));
        let flat =
            flatten(&room, "m.room.message", "@s:example.org", None, &json!({ "msgtype": "m.text", "body": body }));
        let started = std::time::Instant::now();
        for pattern in ["?".repeat(100_000), "*".repeat(20_000), format!("{}x", "*a".repeat(500))] {
            let ruleset = with_content_rule("@u:example.org", &pattern);
            // ruma would panic building a regex for the first one.
            let _ = actions_for(&ruleset, &flat, &ctx(&room, "@u:example.org", "U")).await;
        }
        // A display name full of wildcards is a pattern too (the display-name rule).
        let ruleset = Ruleset::server_default(<&UserId>::try_from("@u:example.org").unwrap());
        let _ = actions_for(&ruleset, &flat, &ctx(&room, "@u:example.org", &"?".repeat(256))).await;
        assert!(started.elapsed().as_secs() < 10, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn keyword_rules_match_words_case_insensitively() {
        let room = room();
        let ruleset = with_content_rule("@u:example.org", "caf?");
        let ctx = ctx(&room, "@u:example.org", "U");
        for (body, hit) in [("Lunch at the CAFE?", true), ("cafeteria", false), ("a cafe", true), ("café", true)] {
            let flat =
                flatten(&room, "m.room.message", "@s:example.org", None, &json!({ "msgtype": "m.text", "body": body }));
            let actions = actions_for(&ruleset, &flat, &ctx).await;
            assert_eq!(actions.iter().any(Action::is_highlight), hit, "{body}");
        }
        // Own events never notify.
        let flat = flatten(&room, "m.room.message", "@u:example.org", None, &json!({ "body": "cafe" }));
        assert!(actions_for(&ruleset, &flat, &ctx).await.is_empty());
    }

    proptest::proptest! {
        /// Our evaluation of patterns agrees with ruma's (on ASCII input without newlines, where
        /// ruma's regexes and the spec agree).
        #[test]
        fn event_match_agrees_with_ruma(pattern in "[abA_ .*?]{0,6}", value in "[abA_ .]{0,10}", body in proptest::bool::ANY) {
            // ruma reads a wildcard right after another as a literal (`*?` is `.*\?`): not
            // compared.
            proptest::prop_assume!(!pattern.contains("**") && !pattern.contains("*?") && !pattern.contains("?*") && !pattern.contains("??"));
            let room = room();
            let key = if body { "content.body" } else { "content.x" };
            let flat = flatten(&room, "m.room.message", "@s:example.org", None, &json!({ "body": value, "x": value }));
            let ctx = ctx(&room, "@u:example.org", "U");
            let cond = PushCondition::EventMatch(ruma::push::EventMatchConditionData::new(key.into(), pattern.clone()));
            let ours = futures_util::FutureExt::now_or_never(condition_applies(&cond, &flat, &ctx)).unwrap();
            let theirs = futures_util::FutureExt::now_or_never(cond.applies(&flat, &ctx)).unwrap();
            proptest::prop_assert_eq!(ours, theirs, "pattern {:?} value {:?} key {}", pattern, value, key);
        }
    }

    #[test]
    fn threads() {
        assert_eq!(thread_of(&json!({ "body": "x" })), "main");
        assert_eq!(thread_of(&json!({ "m.relates_to": { "rel_type": "m.thread", "event_id": "$root" } })), "$root");
        assert_eq!(thread_of(&json!({ "m.relates_to": { "rel_type": "m.replace", "event_id": "$x" } })), "main");
    }

    /// The cost of evaluation in a room of 100 members (run with `--nocapture` to see it).
    #[tokio::test]
    async fn evaluation_cost_for_100_members() {
        let users = users(100);
        let (room, settings, mut view) = (room(), settings_for(&users), view_with(&users));
        let content = json!({ "msgtype": "m.text", "body": "a message of ordinary length for a town hall chat" });
        let rounds = 200;
        let started = std::time::Instant::now();
        let mut notified = 0;
        for _ in 0..rounds {
            notified +=
                evaluate_event(&room, &mut view, &settings, "example.org", "m.room.message", &users[0], None, &content)
                    .await
                    .len();
        }
        let per_event = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
        assert_eq!(notified, 99 * rounds);
        println!("push evaluation, 100 members: {per_event:.0} µs per event, {:.2} µs per member", per_event / 99.0);
    }
}
