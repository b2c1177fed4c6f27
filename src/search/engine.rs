//! `POST /search` for `room_events`: request validation, the bounded search walk through the
//! index with visibility, context, state and groupings.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::api::client::rooms::{Walk, readable_state, token, walk};
use crate::error::{ApiResult, Error};
use crate::rooms::client::format;
use crate::rooms::visibility::{Ignored, Viewer};
use crate::rooms::{Room, relations::bundle};
use crate::state::AppState;
use crate::storage;
use crate::sync::filter::RoomEventFilter;

use super::{KEYS, text_config};

const DEFAULT_LIMIT: i64 = 10;
const MAX_LIMIT: i64 = 50;
const MAX_TERM_BYTES: usize = 500;
const MAX_WORDS: usize = 20;
const MAX_CONTEXT: i64 = 20;
/// Matches counted for `count` (an approximate count, as the spec allows): the ranked ones.
const COUNT_CAP: i64 = storage::search::RANKED_MATCHES;
/// Index pages read per request while filling the chunk with visible events.
const MAX_PAGES: usize = 10;
/// Marks around matched words in `ts_headline` output (private-use characters).
const OPEN: &str = "\u{E000}";
const CLOSE: &str = "\u{E001}";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    search_categories: Categories,
}

#[derive(Deserialize)]
pub struct Categories {
    room_events: Option<RoomEventsCriteria>,
}

#[derive(Deserialize)]
pub struct RoomEventsCriteria {
    search_term: String,
    keys: Option<Vec<String>>,
    filter: Option<Value>,
    order_by: Option<String>,
    event_context: Option<EventContext>,
    #[serde(default)]
    include_state: bool,
    groupings: Option<Groupings>,
}

#[derive(Deserialize)]
pub struct EventContext {
    before_limit: Option<i64>,
    after_limit: Option<i64>,
    #[serde(default)]
    include_profile: bool,
}

#[derive(Deserialize)]
pub struct Groupings {
    #[serde(default)]
    group_by: Vec<Group>,
}

#[derive(Deserialize)]
pub struct Group {
    key: String,
}

/// The validated criteria.
struct Criteria {
    words: Vec<String>,
    keys: Vec<&'static str>,
    filter: RoomEventFilter,
    by_rank: bool,
    limit: i64,
    context: Option<(i64, i64, bool)>,
    include_state: bool,
    group_by_room: bool,
    group_by_sender: bool,
}

fn criteria(c: RoomEventsCriteria) -> ApiResult<Criteria> {
    let term = c.search_term.trim();
    if term.is_empty() {
        return Err(Error::invalid_param("search_term is empty"));
    }
    if term.len() > MAX_TERM_BYTES {
        return Err(Error::invalid_param(format!("search_term is longer than {MAX_TERM_BYTES} bytes")));
    }
    let mut words: Vec<String> = Vec::new();
    for w in term.split_whitespace() {
        if !words.iter().any(|x| x == w) {
            words.push(w.to_owned());
        }
    }
    if words.len() > MAX_WORDS {
        return Err(Error::invalid_param(format!("search_term has more than {MAX_WORDS} words")));
    }
    let keys = match c.keys {
        None => KEYS.iter().map(|k| k.0).collect(),
        Some(list) => {
            let mut keys = Vec::new();
            for k in &list {
                let known = KEYS
                    .iter()
                    .find(|x| x.0 == k)
                    .ok_or_else(|| Error::invalid_param(format!("unknown search key {k:?}")))?;
                if !keys.contains(&known.0) {
                    keys.push(known.0);
                }
            }
            if keys.is_empty() {
                return Err(Error::invalid_param("keys is empty"));
            }
            keys
        }
    };
    let filter = match c.filter {
        None | Some(Value::Null) => RoomEventFilter::default(),
        Some(v @ Value::Object(_)) => {
            let f: RoomEventFilter = serde_path_to_error::deserialize(v)
                .map_err(|e| Error::invalid_param(format!("Invalid filter at {}: {}", e.path(), e.inner())))?;
            f.check_limits("filter").map_err(|e| Error::invalid_param(format!("Filter too large: {e}")))?;
            f
        }
        Some(_) => return Err(Error::invalid_param("filter must be an object")),
    };
    let by_rank = match c.order_by.as_deref() {
        None | Some("rank") => true,
        Some("recent") => false,
        Some(o) => return Err(Error::invalid_param(format!("order_by must be rank or recent, not {o:?}"))),
    };
    let limit = filter.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let context = c.event_context.map(|e| {
        (
            e.before_limit.unwrap_or(5).clamp(0, MAX_CONTEXT),
            e.after_limit.unwrap_or(5).clamp(0, MAX_CONTEXT),
            e.include_profile,
        )
    });
    let (mut group_by_room, mut group_by_sender) = (false, false);
    for g in c.groupings.map(|g| g.group_by).unwrap_or_default() {
        match g.key.as_str() {
            "room_id" => group_by_room = true,
            "sender" => group_by_sender = true,
            k => return Err(Error::invalid_param(format!("cannot group by {k:?}"))),
        }
    }
    Ok(Criteria {
        words,
        keys,
        filter,
        by_rank,
        limit,
        context,
        include_state: c.include_state,
        group_by_room,
        group_by_sender,
    })
}

/// `next_batch` tokens: the number of index matches already read.
fn parse_batch(t: &str) -> ApiResult<i64> {
    t.strip_prefix('p')
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| Error::invalid_param("Unknown next_batch token"))
}

/// A room the user may search, loaded once per request.
struct SearchRoom {
    room: Room,
    viewer: Viewer,
}

pub async fn search(
    state: &AppState,
    user: &str,
    device: &str,
    body: SearchRequest,
    next_batch: Option<&str>,
) -> ApiResult<Value> {
    let Some(criteria_in) = body.search_categories.room_events else {
        return Ok(json!({ "search_categories": {} }));
    };
    let c = criteria(criteria_in)?;
    let mut offset = next_batch.map(parse_batch).transpose()?.unwrap_or(0);

    // The rooms to search: every room the user is in or was in (history visibility decides
    // per event what a departed member may still find), narrowed by the filter.
    let memberships = storage::rooms::user_memberships(&state.db, user).await?;
    let mut rooms: HashMap<i64, String> = HashMap::new();
    let mut joined_since: HashMap<i64, i64> = HashMap::new();
    for m in memberships {
        if matches!(m.membership.as_str(), "join" | "leave" | "ban") && c.filter.allows_room(&m.room_id) {
            if m.membership == "join" {
                joined_since.insert(m.room_nid, m.stream_ordering);
            }
            rooms.insert(m.room_nid, m.room_id);
        }
    }
    let room_nids: Vec<i64> = rooms.keys().copied().collect();
    let config = text_config(&state.config.search.language);
    let (any, all) = storage::search::prepare(&state.db, &config, &c.words).await?;
    // Only stop words: nothing can match.
    let room_nids = if any.is_empty() { Vec::new() } else { room_nids };
    let query = storage::search::Query {
        config: &config,
        any: &any,
        all: &all,
        rooms: &room_nids,
        keys: &c.keys,
        senders: c.filter.senders.as_deref(),
        not_senders: c.filter.not_senders.as_deref(),
        by_rank: c.by_rank,
    };
    let ignored = Ignored::load(state, user).await?;
    let mut loaded: HashMap<i64, SearchRoom> = HashMap::new();
    let mut results: Vec<(storage::events::EventRow, f64)> = Vec::new();
    let mut more = false;
    // The first page asks for one more match than the chunk holds; further pages (when
    // visibility or the filter dropped some) for four times as many, up to 200.
    let mut page_size = c.limit + 1;
    if !room_nids.is_empty() {
        'pages: for _ in 0..MAX_PAGES {
            let hits = storage::search::page(&state.db, &query, offset, page_size).await?;
            let exhausted = (hits.len() as i64) < page_size;
            page_size = (page_size * 4).min(200);
            let nids: Vec<i64> = hits.iter().map(|h| h.event_nid).collect();
            let mut rows: HashMap<i64, storage::events::EventRow> =
                storage::events::by_nids(&state.db, &nids).await?.into_iter().map(|r| (r.event_nid, r)).collect();
            // The rooms of these candidates not loaded yet, in one query; a joined user's viewer
            // needs no query (their membership came with the room list).
            let missing: Vec<i64> = rows
                .values()
                .map(|r| r.room_nid)
                .filter(|n| !loaded.contains_key(n))
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            for row in storage::rooms::by_nids(&state.db, &missing).await? {
                let room = Room::from_row(&row)?;
                let viewer = match joined_since.get(&row.room_nid) {
                    Some(&since) => Viewer {
                        expired_before: crate::rooms::retention::read_cutoff(state, &room).await?,
                        ..Viewer::joined(user, since)
                    },
                    None => Viewer::load(state, &room, user).await?,
                };
                loaded.insert(row.room_nid, SearchRoom { room, viewer });
            }
            // Visibility per room, for this page's candidates at once.
            let mut visible: HashSet<i64> = HashSet::new();
            let mut per_room: HashMap<i64, Vec<&storage::events::EventRow>> = HashMap::new();
            for r in rows.values() {
                per_room.entry(r.room_nid).or_default().push(r);
            }
            for (room_nid, candidates) in per_room {
                let Some(sr) = loaded.get(&room_nid) else { continue };
                for (row, ok) in candidates.iter().zip(sr.viewer.visible(state, &candidates).await?) {
                    if ok {
                        visible.insert(row.event_nid);
                    }
                }
            }
            for hit in &hits {
                if results.len() as i64 == c.limit {
                    // A match remains unread (visible or not: the next page will tell).
                    more = true;
                    break 'pages;
                }
                offset += 1;
                let Some(row) = rows.remove(&hit.event_nid) else { continue };
                if visible.contains(&row.event_nid) && c.filter.allows_row(&row) && !ignored.hides(&row) {
                    let rank = f64::from(hit.rank) + if hit.all_words { 1.0 } else { 0.0 };
                    results.push((row, rank));
                }
            }
            more = !exhausted;
            if exhausted {
                break;
            }
        }
    }

    let count = if room_nids.is_empty() { 0 } else { storage::search::count(&state.db, &query, COUNT_CAP).await? };
    let result_nids: Vec<i64> = results.iter().map(|(r, _)| r.event_nid).collect();
    let highlights = highlights(state, &config, &any, &c.words, &result_nids).await?;

    let viewer_dev = (user, device);
    // Client format, then bundled aggregations once per room (not once per result).
    let mut formatted: Vec<Value> =
        results.iter().map(|(row, _)| format(&loaded[&row.room_nid].room, row, Some(viewer_dev))).collect();
    let mut by_room: HashMap<i64, Vec<usize>> = HashMap::new();
    for (i, (row, _)) in results.iter().enumerate() {
        by_room.entry(row.room_nid).or_default().push(i);
    }
    for (room_nid, idx) in &by_room {
        let sr = &loaded[room_nid];
        let mut evs: Vec<Value> = idx.iter().map(|&i| std::mem::take(&mut formatted[i])).collect();
        bundle(state, &sr.room, viewer_dev, &sr.viewer, &mut evs).await?;
        for (&i, ev) in idx.iter().zip(evs) {
            formatted[i] = ev;
        }
    }
    let mut out_results = Vec::with_capacity(results.len());
    for ((row, rank), ev) in results.iter().zip(formatted) {
        let sr = &loaded[&row.room_nid];
        let mut entry = json!({ "rank": rank, "result": ev });
        if let Some((before, after, profile)) = c.context {
            entry["context"] = context(state, sr, row, before, after, profile, &ignored, viewer_dev).await?;
        }
        out_results.push(entry);
    }

    let mut room_events = json!({ "count": count, "highlights": highlights, "results": out_results });
    if more {
        room_events["next_batch"] = json!(format!("p{offset}"));
    }
    if c.include_state {
        let mut st = Map::new();
        let result_rooms: HashSet<i64> = results.iter().map(|(r, _)| r.room_nid).collect();
        for nid in result_rooms {
            let sr = &loaded[&nid];
            // The state the user may read (none for a room they were only ever banned from).
            let rows = match readable_state(state, &sr.room, user).await {
                Ok(rows) => rows,
                Err(e) if e.errcode == "M_FORBIDDEN" => Vec::new(),
                Err(e) => return Err(e),
            };
            st.insert(
                sr.room.room_id.to_string(),
                Value::Array(rows.iter().map(|r| format(&sr.room, r, None)).collect()),
            );
        }
        room_events["state"] = Value::Object(st);
    }
    if c.group_by_room || c.group_by_sender {
        let mut groups = Map::new();
        if c.group_by_room {
            groups.insert("room_id".into(), group(&results, |r| rooms[&r.room_nid].clone()));
        }
        if c.group_by_sender {
            groups.insert("sender".into(), group(&results, |r| r.sender.clone()));
        }
        room_events["groups"] = Value::Object(groups);
    }
    Ok(json!({ "search_categories": { "room_events": room_events } }))
}

/// The words that matched, as written in the results (`ts_headline` marks them), for clients
/// to highlight: « Réunions » for a search of « reunion ».
async fn highlights(
    state: &AppState,
    config: &str,
    any: &str,
    words: &[String],
    nids: &[i64],
) -> ApiResult<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    if !nids.is_empty() {
        for text in storage::search::marked_texts(&state.db, config, any, nids, OPEN, CLOSE).await? {
            for piece in text.split(OPEN).skip(1) {
                if let Some((word, _)) = piece.split_once(CLOSE)
                    && !word.is_empty()
                    && !out.iter().any(|w| w == word)
                {
                    out.push(word.to_owned());
                }
            }
        }
    }
    for w in words {
        if !out.iter().any(|x| x == w) {
            out.push(w.clone());
        }
    }
    out.truncate(100);
    Ok(out)
}

/// Results grouped by a key: each group's event IDs in result order and its order among groups.
fn group(results: &[(storage::events::EventRow, f64)], key: impl Fn(&storage::events::EventRow) -> String) -> Value {
    let mut groups = Map::new();
    for (row, _) in results {
        let k = key(row);
        let order = groups.len() + 1;
        let g = groups.entry(k).or_insert_with(|| json!({ "results": [], "order": order }));
        if let Some(list) = g["results"].as_array_mut() {
            list.push(json!(row.event_id));
        }
    }
    Value::Object(groups)
}

#[allow(clippy::too_many_arguments)]
async fn context(
    state: &AppState,
    sr: &SearchRoom,
    row: &storage::events::EventRow,
    before: i64,
    after: i64,
    include_profile: bool,
    ignored: &Ignored,
    viewer_dev: (&str, &str),
) -> ApiResult<Value> {
    let filter = RoomEventFilter::default();
    let at = (row.depth, row.stream_ordering);
    let after_at = (row.depth, row.stream_ordering.saturating_add(1));
    let Walk { events: ev_before, cursor: start, .. } =
        walk(state, &sr.room, &sr.viewer, ignored, &filter, true, at, None, before).await?;
    let Walk { events: ev_after, cursor: end, .. } =
        walk(state, &sr.room, &sr.viewer, ignored, &filter, false, after_at, None, after).await?;
    let mut out = json!({
        "start": token(start.0, start.1),
        "end": token(end.0, end.1),
        "events_before": ev_before.iter().map(|r| format(&sr.room, r, Some(viewer_dev))).collect::<Vec<_>>(),
        "events_after": ev_after.iter().map(|r| format(&sr.room, r, Some(viewer_dev))).collect::<Vec<_>>(),
    });
    if include_profile {
        let mut senders: Vec<String> =
            ev_before.iter().chain(ev_after.iter()).chain([row]).map(|r| r.sender.clone()).collect();
        senders.sort();
        senders.dedup();
        let keys: Vec<(String, String)> = senders.iter().map(|s| ("m.room.member".to_owned(), s.clone())).collect();
        let mut profiles = Map::new();
        for m in storage::rooms::current_state_for(&state.db, sr.room.nid, &keys).await? {
            let v: Value = serde_json::from_str(&m.json).unwrap_or(Value::Null);
            let mut p = Map::new();
            for (field, name) in [("displayname", "displayname"), ("avatar_url", "avatar_url")] {
                if let Some(x) = v["content"][field].as_str() {
                    p.insert(name.into(), json!(x));
                }
            }
            if let Some(sk) = m.state_key {
                profiles.insert(sk, Value::Object(p));
            }
        }
        out["profile_info"] = Value::Object(profiles);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crit(v: Value) -> ApiResult<Criteria> {
        criteria(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn validation() {
        let c = crit(json!({ "search_term": "  réunion  budget réunion " })).unwrap();
        assert_eq!(c.words, ["réunion", "budget"]);
        assert_eq!(c.keys.len(), 3);
        assert!(c.by_rank);
        assert_eq!(c.limit, DEFAULT_LIMIT);
        for bad in [
            json!({ "search_term": "   " }),
            json!({ "search_term": "x", "keys": ["content.msgtype"] }),
            json!({ "search_term": "x", "keys": [] }),
            json!({ "search_term": "x", "order_by": "oldest" }),
            json!({ "search_term": "x", "filter": "{}" }),
            json!({ "search_term": "x", "filter": { "limit": "ten" } }),
            json!({ "search_term": "x", "groupings": { "group_by": [{ "key": "type" }] } }),
            json!({ "search_term": (0..21).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ") }),
            json!({ "search_term": "é".repeat(300) }),
        ] {
            assert_eq!(crit(bad.clone()).err().map(|e| e.errcode), Some("M_INVALID_PARAM"), "{bad}");
        }
        let c =
            crit(json!({ "search_term": "x", "filter": { "limit": 1000 }, "event_context": { "before_limit": 99 } }))
                .unwrap();
        assert_eq!(c.limit, MAX_LIMIT);
        assert_eq!(c.context, Some((MAX_CONTEXT, 5, false)));
    }

    #[test]
    fn batch_tokens() {
        assert_eq!(parse_batch("p0").unwrap(), 0);
        assert_eq!(parse_batch("p42").unwrap(), 42);
        for bad in ["", "p", "p-1", "42", "px", "p99999999999999999999"] {
            assert!(parse_batch(bad).is_err(), "{bad}");
        }
    }
}
