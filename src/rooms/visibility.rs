//! History visibility: which events of a room a user may see, per the spec's algorithm
//! (client-server API, "History visibility", server behaviour), decided at each event from the
//! `m.room.history_visibility` in force at that event and the user's membership at that event.
//!
//! An event is visible to a user if:
//! 1. the visibility at the event was `world_readable`, or
//! 2. the user's membership at the event was `join`, or
//! 3. the visibility was `shared` and the user was joined at some point after the event, or
//! 4. the visibility was `invited` and the user's membership at the event was `invite`.
//!
//! "At the event" is the state before it; for `m.room.history_visibility` events the visibility
//! before *or* after counts, for the user's own member events the membership before or after
//! (so that a user sees the event that ends their access). The user's own member events are
//! always visible to them (as Synapse does for leaves: a rejected invite or a ban must reach the
//! user's client).
//!
//! Facts come from the state groups of the events (one query for all the distinct groups of a
//! batch, [`storage::state::visibility_facts`]) or, for `/sync`, from the room's cached timeline
//! rewound in memory. The common case needs neither: an event inside the user's current (or
//! last) join period is visible by rule 2 ([`Viewer::surely_visible`]).

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use super::Room;
use crate::error::ApiResult;
use crate::state::AppState;
use crate::storage;
use crate::storage::events::EventRow;
use crate::sync::cache::RoomEntry;

pub const HISTORY_VISIBILITY: &str = "m.room.history_visibility";

/// A value of `history_visibility`. Unknown or missing values count as `shared` (the spec's
/// default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hv {
    WorldReadable,
    Shared,
    Invited,
    Joined,
}

impl Hv {
    pub fn parse(v: Option<&str>) -> Self {
        match v {
            Some("world_readable") => Self::WorldReadable,
            Some("invited") => Self::Invited,
            Some("joined") => Self::Joined,
            _ => Self::Shared,
        }
    }

    pub fn of_content(content: &Value) -> Self {
        Self::parse(content["history_visibility"].as_str())
    }
}

/// A membership as visibility sees it (`knock` and unknown values are "not a member").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mem {
    Join,
    Invite,
    Other,
}

impl Mem {
    pub fn parse(v: Option<&str>) -> Self {
        match v {
            Some("join") => Self::Join,
            Some("invite") => Self::Invite,
            _ => Self::Other,
        }
    }
}

/// What visibility needs to know about one event for one user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facts {
    pub stream: i64,
    pub vis_before: Hv,
    /// Differs from `vis_before` only for a history visibility event.
    pub vis_after: Hv,
    pub mem_before: Mem,
    /// Differs from `mem_before` only for the user's own member event.
    pub mem_after: Mem,
    /// The event is the user's own member event.
    pub own_membership: bool,
}

/// The spec's decision for one event. `joined_until`: the end of the user's last period of
/// membership `join` (`i64::MAX` while joined, `i64::MIN` if never joined); "joined at some point
/// after the event" is then `stream < joined_until`.
pub fn decide(f: &Facts, joined_until: i64) -> bool {
    if f.own_membership {
        return true;
    }
    let allowed = |vis: Hv, mem: Mem| match (vis, mem) {
        (Hv::WorldReadable, _) | (_, Mem::Join) => true,
        (Hv::Shared, _) => f.stream < joined_until,
        (Hv::Invited, Mem::Invite) => true,
        _ => false,
    };
    allowed(f.vis_before, f.mem_before) || allowed(f.vis_after, f.mem_after)
}

/// From a user's membership events in a room (oldest first, `(membership, stream)`): the start
/// and end of their last join period (`end = i64::MAX` while joined), if they ever joined.
pub fn last_join_period(history: &[(String, i64)]) -> Option<(i64, i64)> {
    let mut period: Option<(i64, i64)> = None;
    let mut joined_at: Option<i64> = None;
    for (m, s) in history {
        match (m.as_str(), joined_at) {
            ("join", None) => joined_at = Some(*s),
            ("join", Some(_)) => {}
            (_, Some(j)) => {
                period = Some((j, *s));
                joined_at = None;
            }
            (_, None) => {}
        }
    }
    joined_at.map(|j| (j, i64::MAX)).or(period)
}

/// One user looking at one room.
#[derive(Clone, Debug)]
pub struct Viewer {
    pub user: String,
    /// The user's current membership, if any.
    pub membership: Option<String>,
    /// The user has, or had, a membership event in the room.
    pub ever_member: bool,
    /// When the user's current membership is `leave` or `ban`: the stream position of that event.
    pub departed_at: Option<i64>,
    /// Their last join period `(join, end)`: events from the join to the end are visible without
    /// looking at them (`end` is `i64::MAX` while joined).
    pub join_period: Option<(i64, i64)>,
    /// Retention (MSC1763): non-state events sent before this timestamp have expired and are
    /// never shown (`i64::MIN`: none has).
    pub expired_before: i64,
}

impl Viewer {
    /// A joined user needs only their current membership (one primary-key lookup); the others
    /// their membership history in the room (one more query).
    pub async fn load(state: &AppState, room: &Room, user: &str) -> ApiResult<Self> {
        let expired_before = super::retention::read_cutoff(state, room).await?;
        if let Some((m, _, stream)) = storage::rooms::membership(&state.db, room.nid, user).await?
            && m == "join"
        {
            return Ok(Self { expired_before, ..Self::joined(user, stream) });
        }
        let history = storage::rooms::membership_history(&state.db, room.nid, user).await?;
        Ok(Self { expired_before, ..Self::from_history(user, &history) })
    }

    pub fn from_history(user: &str, history: &[(String, i64)]) -> Self {
        Self {
            user: user.to_owned(),
            membership: history.last().map(|(m, _)| m.clone()),
            ever_member: !history.is_empty(),
            departed_at: history.last().filter(|(m, _)| m == "leave" || m == "ban").map(|(_, s)| *s),
            join_period: last_join_period(history),
            expired_before: i64::MIN,
        }
    }

    /// A user known to be joined since their membership event at `since` (perhaps joined
    /// earlier: events before it are then checked, and found visible).
    pub fn joined(user: &str, since: i64) -> Self {
        Self {
            user: user.to_owned(),
            membership: Some("join".into()),
            ever_member: true,
            departed_at: None,
            join_period: Some((since, i64::MAX)),
            expired_before: i64::MIN,
        }
    }

    /// The same viewer, with the room's retention cut-off (see [`Viewer::expired`]).
    pub fn with_expiry(self, expired_before: i64) -> Self {
        Self { expired_before, ..self }
    }

    /// The event expired under the room's retention policy (MSC1763: non-state events only):
    /// it is never shown, whatever the rest of the rules say.
    pub fn expired(&self, row: &EventRow) -> bool {
        row.state_key.is_none() && row.origin_server_ts < self.expired_before
    }

    pub fn is_joined(&self) -> bool {
        self.membership.as_deref() == Some("join")
    }

    pub fn joined_until(&self) -> i64 {
        self.join_period.map_or(i64::MIN, |p| p.1)
    }

    /// Visible without looking: inside the user's last join period (rule 2); its ends are the
    /// user's own member events.
    pub fn surely_visible(&self, stream: i64) -> bool {
        self.join_period.is_some_and(|(from, to)| stream >= from && stream <= to)
    }

    /// The last stream position worth reading for the user: after leaving (or being banned) only
    /// `world_readable` events could be visible, so unless the room is world-readable now, reads
    /// stop at the departure (as Synapse's).
    pub async fn read_limit(&self, state: &AppState, room: &Room) -> ApiResult<i64> {
        match self.departed_at {
            Some(d) if current(state, room).await? != Hv::WorldReadable => Ok(d),
            _ => Ok(i64::MAX),
        }
    }

    /// The user's membership event that ended the last join period, when they are not joined.
    pub fn departed_from_join(&self) -> Option<i64> {
        self.join_period.map(|p| p.1).filter(|e| *e != i64::MAX)
    }

    /// Facts for an event given the visibility and the user's membership before it.
    pub fn facts(&self, row: &EventRow, vis_before: Hv, mem_before: Mem) -> Facts {
        let mut f = Facts {
            stream: row.stream_ordering,
            vis_before,
            vis_after: vis_before,
            mem_before,
            mem_after: mem_before,
            own_membership: false,
        };
        match (row.event_type.as_str(), row.state_key.as_deref()) {
            (HISTORY_VISIBILITY, Some("")) => f.vis_after = Hv::of_content(&content(row)),
            ("m.room.member", Some(k)) if k == self.user => {
                f.own_membership = true;
                f.mem_after = Mem::parse(content(row)["membership"].as_str());
            }
            _ => {}
        }
        f
    }

    /// Which of `rows` (events of one room) the user may see: one query for the state groups of
    /// those outside the user's join period, none when there are none.
    pub async fn visible<R: Borrow<EventRow>>(&self, state: &AppState, rows: &[R]) -> ApiResult<Vec<bool>> {
        let groups: HashSet<i64> = rows
            .iter()
            .map(Borrow::borrow)
            .filter(|r| !self.surely_visible(r.stream_ordering) && !self.expired(r))
            .filter_map(|r| r.state_before)
            .collect();
        let facts = if groups.is_empty() {
            HashMap::new()
        } else {
            let groups: Vec<i64> = groups.into_iter().collect();
            storage::state::visibility_facts(&state.db, &groups, &self.user).await?
        };
        let until = self.joined_until();
        Ok(rows
            .iter()
            .map(Borrow::borrow)
            .map(|r| {
                if self.expired(r) {
                    return false;
                }
                if self.surely_visible(r.stream_ordering) {
                    return true;
                }
                let (vis, mem) = r.state_before.and_then(|g| facts.get(&g).cloned()).unwrap_or_default();
                decide(&self.facts(r, Hv::parse(vis.as_deref()), Mem::parse(mem.as_deref())), until)
            })
            .collect())
    }

    /// Keeps the rows the user may see.
    pub async fn retain(&self, state: &AppState, rows: Vec<EventRow>) -> ApiResult<Vec<EventRow>> {
        let keep = self.visible(state, &rows).await?;
        Ok(rows.into_iter().zip(keep).filter_map(|(r, k)| k.then_some(r)).collect())
    }

    /// Whether the user may see one event.
    pub async fn sees(&self, state: &AppState, row: &EventRow) -> ApiResult<bool> {
        Ok(self.visible(state, std::slice::from_ref(row)).await?.first().copied().unwrap_or(false))
    }

    /// Events of the cached timeline with stream positions above `after` that the user may NOT
    /// see, computed in memory by rewinding the cached state from the newest event. `None` when
    /// every such event is inside the join period (nothing to compute).
    pub fn hidden_in_cache(&self, entry: &RoomEntry, after: i64) -> Option<HashSet<i64>> {
        if entry.timeline.iter().rev().take_while(|e| e.stream() > after).all(|e| self.surely_visible(e.stream())) {
            return None;
        }
        let vis_key = (HISTORY_VISIBILITY.to_owned(), String::new());
        let mem_key = ("m.room.member".to_owned(), self.user.clone());
        let mut vis = entry.state.get(&vis_key).map_or(Hv::Shared, |e| Hv::of_content(&e.client["content"]));
        let mut mem = Mem::parse(entry.state.get(&mem_key).and_then(|e| e.membership()));
        let until = self.joined_until();
        let mut hidden = HashSet::new();
        for ev in entry.timeline.iter().rev() {
            if ev.stream() <= after {
                break;
            }
            // `vis` and `mem` hold the state after `ev`; rewind them to before it.
            match ev.key() {
                Some(k) if k == vis_key => {
                    vis = ev.replaces.as_ref().map_or(Hv::Shared, |p| Hv::of_content(&p.client["content"]))
                }
                Some(k) if k == mem_key => mem = Mem::parse(ev.replaces.as_ref().and_then(|p| p.membership())),
                _ => {}
            }
            if !self.surely_visible(ev.stream()) && !decide(&self.facts(&ev.row, vis, mem), until) {
                hidden.insert(ev.stream());
            }
        }
        Some(hidden)
    }
}

fn content(row: &EventRow) -> Value {
    serde_json::from_str::<Value>(&row.json).map(|mut v| v["content"].take()).unwrap_or(Value::Null)
}

/// Whether `user` may see `row` (an event of `room`): for single-event endpoints.
pub async fn event_visible(state: &AppState, room: &Room, user: &str, row: &EventRow) -> ApiResult<bool> {
    Viewer::load(state, room, user).await?.sees(state, row).await
}

/// The room's current history visibility (one indexed lookup).
pub async fn current(state: &AppState, room: &Room) -> ApiResult<Hv> {
    let c = super::current_content(state, room, HISTORY_VISIBILITY, "").await?;
    Ok(c.map_or(Hv::Shared, |c| Hv::of_content(&c)))
}

/// The users whose events a user ignores (`m.ignored_user_list`).
#[derive(Clone, Default)]
pub struct Ignored(Option<Arc<crate::push::eval::UserPushSettings>>);

impl Ignored {
    /// From the push settings cache when it holds the user (no query), else one query.
    pub async fn load(state: &AppState, user: &str) -> ApiResult<Self> {
        if let Some(s) = state.push_rules.cached(user) {
            return Ok(Self(Some(s)));
        }
        let mut conn = state.db.acquire().await?;
        let mut settings = state.push_rules.get_many(&mut conn, &[user]).await?;
        Ok(Self(settings.remove(user)))
    }

    /// Events from ignored users are not served, except state events (membership must stay
    /// coherent for the client).
    pub fn hides(&self, row: &EventRow) -> bool {
        row.state_key.is_none() && self.0.as_ref().is_some_and(|s| s.ignored.contains(&row.sender))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    const USER: &str = "@v:example.org";

    /// One event of a linear history, as the model sees it.
    #[derive(Clone, Debug)]
    enum Ev {
        Message,
        /// `m.room.history_visibility` with this value (possibly not a known one).
        SetVis(&'static str),
        /// The viewer's own member event with this membership.
        Own(&'static str),
        /// Someone else's member event.
        Other(&'static str),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        let vis = prop_oneof![Just("world_readable"), Just("shared"), Just("invited"), Just("joined"), Just("bogus")];
        let mem = || prop_oneof![Just("join"), Just("invite"), Just("leave"), Just("ban"), Just("knock")];
        prop_oneof![
            2 => Just(Ev::Message),
            1 => vis.prop_map(Ev::SetVis),
            2 => mem().prop_map(Ev::Own),
            1 => mem().prop_map(Ev::Other),
        ]
    }

    fn row(i: usize, e: &Ev) -> EventRow {
        let (kind, key, content) = match e {
            Ev::Message => ("m.room.message", None, json!({ "body": "x" })),
            Ev::SetVis(v) => (HISTORY_VISIBILITY, Some(""), json!({ "history_visibility": v })),
            Ev::Own(m) => ("m.room.member", Some(USER), json!({ "membership": m })),
            Ev::Other(m) => ("m.room.member", Some("@o:example.org"), json!({ "membership": m })),
        };
        EventRow {
            event_nid: i as i64,
            event_id: format!("${i}"),
            room_nid: 1,
            stream_ordering: i as i64,
            depth: i as i64,
            event_type: kind.into(),
            state_key: key.map(str::to_owned),
            sender: "@s:example.org".into(),
            origin_server_ts: 0,
            json: json!({ "type": kind, "content": content }).to_string(),
            redacted_by: None,
            txn_device: None,
            txn_id: None,
            state_before: None,
            state_after: None,
        }
    }

    /// The spec's rules, evaluated directly on the replayed history.
    fn model(events: &[Ev]) -> Vec<bool> {
        // State after each event: (visibility string, viewer membership string).
        let mut vis: Option<&str> = None;
        let mut mem: Option<&str> = None;
        let mut before = Vec::new();
        let mut after = Vec::new();
        for e in events {
            before.push((vis, mem));
            match e {
                Ev::SetVis(v) => vis = Some(v),
                Ev::Own(m) => mem = Some(m),
                _ => {}
            }
            after.push((vis, mem));
        }
        let shared = |v: Option<&str>| !matches!(v, Some("world_readable" | "invited" | "joined"));
        (0..events.len())
            .map(|i| {
                let joined_later = (i..events.len()).any(|j| after[j].1 == Some("join"));
                let allowed = |(v, m): (Option<&str>, Option<&str>)| {
                    v == Some("world_readable")
                        || m == Some("join")
                        || (shared(v) && joined_later)
                        || (v == Some("invited") && m == Some("invite"))
                };
                matches!(events[i], Ev::Own(_)) || allowed(before[i]) || allowed(after[i])
            })
            .collect()
    }

    /// The implementation: facts from the state before each event, the join period from the
    /// viewer's membership history.
    fn implementation(events: &[Ev]) -> (Viewer, Vec<bool>) {
        let history: Vec<(String, i64)> = events
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                Ev::Own(m) => Some((m.to_string(), i as i64)),
                _ => None,
            })
            .collect();
        let viewer = Viewer::from_history(USER, &history);
        let mut vis = Hv::Shared;
        let mut mem = Mem::Other;
        let mut out = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let r = row(i, e);
            out.push(decide(&viewer.facts(&r, vis, mem), viewer.joined_until()));
            match e {
                Ev::SetVis(v) => vis = Hv::parse(Some(v)),
                Ev::Own(m) => mem = Mem::parse(Some(m)),
                _ => {}
            }
        }
        (viewer, out)
    }

    proptest! {
        #[test]
        fn decision_matches_the_spec_model(events in proptest::collection::vec(ev(), 0..40)) {
            let want = model(&events);
            let (viewer, got) = implementation(&events);
            prop_assert_eq!(&got, &want);
            // The fast path never shows what the rules hide.
            for (i, visible) in want.iter().enumerate() {
                if viewer.surely_visible(i as i64) {
                    prop_assert!(*visible, "event {} is in the join period but hidden", i);
                }
            }
        }
    }

    #[test]
    fn join_periods() {
        let h = |v: &[(&str, i64)]| v.iter().map(|(m, s)| (m.to_string(), *s)).collect::<Vec<_>>();
        assert_eq!(last_join_period(&h(&[])), None);
        assert_eq!(last_join_period(&h(&[("invite", 1), ("leave", 2)])), None);
        assert_eq!(last_join_period(&h(&[("join", 1), ("join", 3)])), Some((1, i64::MAX)));
        assert_eq!(last_join_period(&h(&[("join", 1), ("leave", 2), ("invite", 5), ("leave", 6)])), Some((1, 2)));
        assert_eq!(last_join_period(&h(&[("join", 1), ("ban", 2), ("leave", 3), ("join", 7)])), Some((7, i64::MAX)));
    }
}
