//! Spaces: `GET /rooms/{roomId}/hierarchy` (spec v1.2), the rooms of a space tree, depth first.
//!
//! The walk is bounded (`MAX_DEPTH`, `MAX_ROOMS` rooms looked at per request, `MAX_CHILDREN`
//! children per space) and stateless: the `from` token records how many rooms earlier pages
//! returned and the parameters they used, and the next page walks the tree again and skips them.
//! Only local rooms are described; children on other servers are left out until federation.

use std::collections::HashSet;

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Path, Query};
use crate::rooms::summary::Summary;
use crate::state::AppState;
use crate::storage;

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 100;
const MAX_DEPTH: i64 = 50;
/// Rooms looked at per request, whatever the tree (cycles and fan-out included).
const MAX_ROOMS: usize = 1000;
/// `m.space.child` events read per space.
const MAX_CHILDREN: i64 = 500;

#[derive(Deserialize)]
pub struct HierarchyQuery {
    from: Option<String>,
    limit: Option<i64>,
    max_depth: Option<i64>,
    suggested_only: Option<bool>,
}

/// Where a page starts: rooms already returned, and the parameters of the first request.
struct Cursor {
    skip: usize,
    max_depth: i64,
    suggested_only: bool,
}

impl Cursor {
    fn token(&self) -> String {
        format!("h{}_{}_{}", self.skip, self.max_depth, u8::from(self.suggested_only))
    }

    fn parse(t: &str) -> ApiResult<Self> {
        let bad = || Error::invalid_param("Unknown pagination token");
        let mut parts = t.strip_prefix('h').ok_or_else(bad)?.split('_');
        let mut next = || parts.next().ok_or_else(bad);
        let skip = next()?.parse::<usize>().map_err(|_| bad())?;
        let max_depth = next()?.parse::<i64>().map_err(|_| bad())?;
        let suggested_only = match next()? {
            "0" => false,
            "1" => true,
            _ => return Err(bad()),
        };
        if parts.next().is_some() || !(0..=MAX_DEPTH).contains(&max_depth) {
            return Err(bad());
        }
        Ok(Self { skip, max_depth, suggested_only })
    }
}

/// A child as its `m.space.child` event names it; only events with a non-empty `via` count.
struct Child {
    room_id: String,
    order: Option<String>,
    suggested: bool,
    ts: i64,
    stripped: Value,
}

fn child_of(row: &storage::events::EventRow) -> Option<Child> {
    let v: Value = serde_json::from_str(&row.json).ok()?;
    let content = &v["content"];
    let via = content["via"].as_array()?;
    if via.is_empty() || !via.iter().all(Value::is_string) {
        return None;
    }
    let room_id = row.state_key.clone()?;
    if !room_id.starts_with('!') {
        return None;
    }
    // `order`: printable ASCII, at most 50 characters; anything else is as if absent.
    let order = content["order"]
        .as_str()
        .filter(|o| o.len() <= 50 && o.bytes().all(|b| (0x20..=0x7e).contains(&b)))
        .map(str::to_owned);
    Some(Child {
        order,
        suggested: content["suggested"] == json!(true),
        ts: row.origin_server_ts,
        stripped: json!({
            "type": "m.space.child",
            "state_key": room_id,
            "content": content,
            "sender": row.sender,
            "origin_server_ts": row.origin_server_ts,
        }),
        room_id,
    })
}

/// The spec's ordering of a space's children: by `order` (rooms with one first), then by the
/// `m.space.child` event's timestamp, then by room ID.
fn sort_children(children: &mut [Child]) {
    children.sort_by(|a, b| {
        let by_order = match (&a.order, &b.order) {
            (Some(x), Some(y)) => x.cmp(y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        };
        by_order.then(a.ts.cmp(&b.ts)).then_with(|| a.room_id.cmp(&b.room_id))
    });
}

pub async fn hierarchy(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<HierarchyQuery>,
) -> ApiResult<axum::Json<Value>> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit < 1 {
        return Err(Error::invalid_param("limit must be greater than zero"));
    }
    let limit = limit.min(MAX_LIMIT) as usize;
    let max_depth = q.max_depth.unwrap_or(MAX_DEPTH);
    if max_depth < 0 {
        return Err(Error::invalid_param("max_depth must not be negative"));
    }
    let max_depth = max_depth.min(MAX_DEPTH);
    let suggested_only = q.suggested_only.unwrap_or(false);
    let cursor = match q.from.as_deref() {
        Some(t) => {
            let c = Cursor::parse(t)?;
            if c.max_depth != max_depth || c.suggested_only != suggested_only {
                return Err(Error::invalid_param("max_depth and suggested_only cannot change during pagination"));
            }
            c
        }
        None => Cursor { skip: 0, max_depth, suggested_only },
    };

    let user = Some(&*auth.user_id);
    let forbidden = || Error::forbidden("You may not view this room");
    let root = storage::rooms::by_id(&state.db, &room_id).await?.ok_or_else(forbidden)?;
    let root_summary = Summary::load(&state, &root, user).await?;
    if root_summary.membership.as_deref() == Some("ban") || !root_summary.visible_to(&state, user).await? {
        return Err(forbidden());
    }

    let mut rooms = Vec::new();
    let mut seen = HashSet::new();
    let mut index = 0usize;
    let mut more = false;
    // Depth-first, children in the spec's order: the stack holds them reversed.
    let mut stack: Vec<(String, i64, Option<Summary>)> = vec![(room_id, 0, Some(root_summary))];
    while let Some((id, depth, known)) = stack.pop() {
        if seen.len() >= MAX_ROOMS {
            break;
        }
        if !seen.insert(id.clone()) {
            continue;
        }
        let summary = match known {
            Some(s) => s,
            None => {
                let Some(row) = storage::rooms::by_id(&state.db, &id).await? else { continue };
                let s = Summary::load(&state, &row, user).await?;
                if !s.visible_to(&state, user).await? {
                    continue;
                }
                s
            }
        };
        let mut children: Vec<Child> = if summary.is_space() {
            storage::rooms::current_state_of_type(&state.db, summary.room_nid, "m.space.child", MAX_CHILDREN)
                .await?
                .iter()
                .filter_map(child_of)
                .collect()
        } else {
            Vec::new()
        };
        sort_children(&mut children);
        if rooms.len() == limit {
            more = true;
            break;
        }
        if index >= cursor.skip {
            let mut entry = summary.fields;
            entry["children_state"] = Value::Array(children.iter().map(|c| c.stripped.clone()).collect());
            rooms.push(entry);
        }
        index += 1;
        if depth < max_depth {
            for c in children.into_iter().rev() {
                if !cursor.suggested_only || c.suggested {
                    stack.push((c.room_id, depth + 1, None));
                }
            }
        }
    }
    let mut resp = json!({ "rooms": rooms });
    if more {
        resp["next_batch"] = json!(Cursor { skip: index, max_depth, suggested_only }.token());
    }
    Ok(axum::Json(resp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_garbage() {
        let c = Cursor { skip: 12, max_depth: 3, suggested_only: true };
        let p = Cursor::parse(&c.token()).unwrap();
        assert_eq!((p.skip, p.max_depth, p.suggested_only), (12, 3, true));
        for bad in ["", "h", "h1", "h1_2", "h1_2_3", "h1_2_1_4", "x1_2_1", "h-1_2_1", "h1_999_0", "h1_-1_0"] {
            assert_eq!(Cursor::parse(bad).err().unwrap().errcode, "M_INVALID_PARAM", "{bad}");
        }
    }

    #[test]
    fn children_order() {
        let mk = |id: &str, order: Option<&str>, ts: i64| Child {
            room_id: id.into(),
            order: order.map(Into::into),
            suggested: false,
            ts,
            stripped: Value::Null,
        };
        let mut c = vec![
            mk("!d", None, 1),
            mk("!c", None, 1),
            mk("!b", Some("b"), 9),
            mk("!a", Some("a"), 9),
            mk("!e", None, 0),
        ];
        sort_children(&mut c);
        let ids: Vec<&str> = c.iter().map(|c| c.room_id.as_str()).collect();
        assert_eq!(ids, ["!a", "!b", "!e", "!c", "!d"]);
    }
}
