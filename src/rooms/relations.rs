//! Relations (`m.relates_to`): bundled aggregations in `unsigned["m.relations"]` — the latest
//! edit (`m.replace`), thread summaries (`m.thread`) and references (`m.reference`) — computed
//! for a whole batch of events with one query.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use super::Room;
use super::client::format;
use super::visibility::Viewer;
use crate::error::ApiResult;
use crate::state::AppState;
use crate::storage;

/// Adds bundled aggregations to client-format events. Only relations `who` may see count.
pub async fn bundle(
    state: &AppState,
    room: &Room,
    viewer: (&str, &str),
    who: &Viewer,
    events: &mut [Value],
) -> ApiResult<()> {
    let ids: Vec<String> = events.iter().filter_map(|e| e["event_id"].as_str().map(str::to_owned)).collect();
    if ids.is_empty() {
        return Ok(());
    }
    let rels = storage::events::relations_to(&state.db, room.nid, &ids).await?;
    let rows: Vec<&storage::events::EventRow> = rels.iter().map(|(_, _, r)| r).collect();
    let visible = who.visible(state, &rows).await?;
    let mut by_target: HashMap<&str, Vec<(&str, &storage::events::EventRow)>> = HashMap::new();
    for ((target, rel_type, row), visible) in rels.iter().zip(visible) {
        if visible {
            by_target.entry(target.as_str()).or_default().push((rel_type.as_str(), row));
        }
    }
    for ev in events.iter_mut() {
        let Some(list) = ev["event_id"].as_str().and_then(|id| by_target.get(id)) else { continue };
        let sender = ev["sender"].as_str().unwrap_or_default().to_owned();
        let kind = ev["type"].as_str().unwrap_or_default().to_owned();
        let mut agg = Map::new();
        // Edits: only by the original sender, same type; the latest by (ts, event_id) wins.
        if let Some((_, latest)) = list
            .iter()
            .filter(|(t, r)| *t == "m.replace" && r.sender == sender && r.event_type == kind)
            .max_by(|a, b| (a.1.origin_server_ts, &a.1.event_id).cmp(&(b.1.origin_server_ts, &b.1.event_id)))
        {
            agg.insert("m.replace".into(), format(room, latest, Some(viewer)));
        }
        let thread: Vec<&storage::events::EventRow> =
            list.iter().filter(|(t, _)| *t == "m.thread").map(|(_, r)| *r).collect();
        if let Some(latest) = thread.last() {
            let participated = sender == viewer.0 || thread.iter().any(|r| r.sender == viewer.0);
            agg.insert(
                "m.thread".into(),
                json!({
                    "latest_event": format(room, latest, Some(viewer)),
                    "count": thread.len(),
                    "current_user_participated": participated,
                }),
            );
        }
        let refs: Vec<Value> =
            list.iter().filter(|(t, _)| *t == "m.reference").map(|(_, r)| json!({ "event_id": r.event_id })).collect();
        if !refs.is_empty() {
            agg.insert("m.reference".into(), json!({ "chunk": refs }));
        }
        if !agg.is_empty() {
            ev["unsigned"]["m.relations"] = Value::Object(agg);
        }
    }
    Ok(())
}
