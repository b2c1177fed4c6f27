//! Message retention policies (MSC1763, `m.room.retention`), off unless `retention.enabled`.
//!
//! **Policy.** A room's policy is the content of its current `m.room.retention` state event
//! (`max_lifetime`, `min_lifetime`: milliseconds, as Synapse reads them; MSC1763's text says
//! seconds, every implementation uses milliseconds), or the server's `retention.default_policy`
//! when the room has none or its content is invalid (a lifetime that is not a non-negative
//! integer or null). An absent or null `max_lifetime` means "forever". As MSC1763 says,
//! `max_lifetime` is raised to `min_lifetime` when lower. A room's lifetime is then clamped to
//! `[allowed_lifetime_min, allowed_lifetime_max]` (a room asking for "forever" gets the maximum);
//! a finite default is clamped too, an infinite default stays infinite.
//!
//! **What expires.** Non-state events whose `origin_server_ts` is older than `now - max_lifetime`
//! (MSC1763: "Retention is only considered for non-state events"). State events (name, topic,
//! members, power levels...) are kept whatever their age: they are the room's state, the auth
//! events of later events, and the members of state groups that history visibility reads.
//!
//! **Hidden at once.** Every read path that goes through [`Viewer`](super::visibility::Viewer)
//! (`/messages`, `/context`, `/event`, `/relations`, `/threads`, bundled aggregations, receipts
//! and reports on an event) and the `/sync` timelines leave expired events out from the moment
//! they expire, so the purge's interval only decides how long they stay in the database.
//!
//! **Purged periodically** ([`purge_pass`]): deleted, not redacted (MSC1763: "We consciously do
//! not redact the event"; Synapse deletes non-state events and keeps state events the same
//! way). Per room, batches of `retention.batch_size` events, each in its own short transaction
//! that takes no room lock: their push actions, prev and auth edges and rows go; the room's
//! forward extremities (its latest event, which the next event names in `prev_events`) are never
//! candidates, so a room always keeps at least one event and stays writable. Events that remain
//! may name purged events (`prev_events`, `m.relates_to`, redactions, receipts): every reader
//! already treats an unknown event ID as absent. Afterwards the room's sync cache entry is
//! dropped. Local media that only purged events referenced (`content.url`, `content.file.url`,
//! `content.info.thumbnail_url`, `content.info.thumbnail_file.url`) and that no remaining event,
//! profile or account data mentions is deleted from the store and the database. One instance
//! purges at a time (a session advisory lock).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::Value;

use super::Room;
use crate::config::RetentionConfig;
use crate::error::ApiResult;
use crate::state::AppState;
use crate::storage::{self, now_ms};
use crate::sync::cache::RoomEntry;

pub const RETENTION: &str = "m.room.retention";

/// Largest integer a lifetime may be (JSON's safe integer range).
const MAX_SAFE: u64 = (1 << 53) - 1;

/// A retention policy, lifetimes in milliseconds (`None`: forever).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub min_lifetime: Option<u64>,
    pub max_lifetime: Option<u64>,
}

impl Policy {
    /// The policy of an `m.room.retention` content, or `None` if the content is invalid: not an
    /// object, or a lifetime that is neither null nor a non-negative integer.
    pub fn from_content(content: &Value) -> Option<Self> {
        let obj = content.as_object()?;
        let lifetime = |key: &str| -> Result<Option<u64>, ()> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => n.as_u64().filter(|v| *v <= MAX_SAFE).map(Some).ok_or(()),
                Some(_) => Err(()),
            }
        };
        Some(Self { min_lifetime: lifetime("min_lifetime").ok()?, max_lifetime: lifetime("max_lifetime").ok()? })
    }
}

/// The server's retention rules, from `[retention]`, in milliseconds.
#[derive(Clone, Debug)]
pub struct Rules {
    pub enabled: bool,
    pub default: Policy,
    pub allowed_min: Option<u64>,
    pub allowed_max: Option<u64>,
}

impl Rules {
    pub fn from_config(c: &RetentionConfig) -> Self {
        let ms = |s: Option<u64>| s.map(|s| s * 1000);
        Self {
            enabled: c.enabled,
            default: Policy {
                min_lifetime: ms(c.default_policy.min_lifetime_secs),
                max_lifetime: ms(c.default_policy.max_lifetime_secs),
            },
            allowed_min: ms(c.allowed_lifetime_min_secs),
            allowed_max: ms(c.allowed_lifetime_max_secs),
        }
    }

    /// The maximum lifetime of a room's messages given its `m.room.retention` content (`None`
    /// when it has none), or `None` for "forever".
    pub fn max_lifetime(&self, room_content: Option<&Value>) -> Option<u64> {
        let room_policy = room_content.and_then(Policy::from_content);
        let p = room_policy.unwrap_or(self.default);
        let mut max = match (p.max_lifetime, p.min_lifetime) {
            (Some(max), Some(min)) => Some(max.max(min)),
            (max, _) => max,
        };
        if let Some(lo) = self.allowed_min {
            max = max.map(|m| m.max(lo));
        }
        if let Some(hi) = self.allowed_max {
            max = match max {
                Some(m) => Some(m.min(hi)),
                // A room may not ask for more than the maximum, "forever" included.
                None if room_policy.is_some() => Some(hi),
                None => None,
            };
        }
        max
    }

    /// Events of the room sent before this timestamp (ms) have expired at `now`; `i64::MIN` when
    /// nothing expires (retention disabled, or kept forever).
    pub fn cutoff(&self, room_content: Option<&Value>, now: i64) -> i64 {
        if !self.enabled {
            return i64::MIN;
        }
        match self.max_lifetime(room_content) {
            Some(max) => now.saturating_sub(i64::try_from(max).unwrap_or(i64::MAX)),
            None => i64::MIN,
        }
    }
}

/// The expiry cut-off of a room now, for the read paths (one indexed lookup when enabled).
pub async fn read_cutoff(state: &AppState, room: &Room) -> ApiResult<i64> {
    if !state.config.retention.enabled {
        return Ok(i64::MIN);
    }
    let content = super::current_content(state, room, RETENTION, "").await?;
    Ok(Rules::from_config(&state.config.retention).cutoff(content.as_ref(), now_ms()))
}

/// The same from a sync cache entry's current state (no query).
pub fn cached_cutoff(state: &AppState, entry: &RoomEntry) -> i64 {
    if !state.config.retention.enabled {
        return i64::MIN;
    }
    let content = entry.state.get(&(RETENTION.to_owned(), String::new())).map(|e| &e.client["content"]);
    Rules::from_config(&state.config.retention).cutoff(content, now_ms())
}

/// The local media an event's content attaches: `url`, `file.url`, `info.thumbnail_url` and
/// `info.thumbnail_file.url` naming `mxc://<server_name>/<id>`. Returns the media IDs.
pub fn attached_media(json: &str, server_name: &str) -> Vec<String> {
    let Ok(ev) = serde_json::from_str::<Value>(json) else { return Vec::new() };
    let c = &ev["content"];
    let prefix = format!("mxc://{server_name}/");
    [&c["url"], &c["file"]["url"], &c["info"]["thumbnail_url"], &c["info"]["thumbnail_file"]["url"]]
        .into_iter()
        .filter_map(Value::as_str)
        .filter_map(|u| u.strip_prefix(prefix.as_str()))
        .filter(|id| crate::media::valid_media_id(id))
        .map(str::to_owned)
        .collect()
}

/// What one purge pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Rooms in which events were deleted.
    pub rooms: u64,
    pub events: u64,
    pub media: u64,
}

/// Runs one purge pass over every room as of `now` (ms since the epoch): what the periodic job
/// does, callable on its own (tests pass a future `now` rather than waiting). `None` when another
/// session (another instance) is purging; an empty report when retention is disabled.
pub async fn purge_pass(state: &AppState, now: i64) -> anyhow::Result<Option<PassReport>> {
    let rules = Rules::from_config(&state.config.retention);
    if !rules.enabled {
        return Ok(Some(PassReport::default()));
    }
    // A session lock on a connection of its own, held for the pass; the batches use other
    // connections. It must never go back to the pool still locked.
    let mut lock = state.db.acquire().await?;
    if !storage::retention::try_lock_purge(&mut lock).await? {
        tracing::debug!("retention: another instance is purging");
        return Ok(None);
    }
    let result = run_pass(state, &rules, now).await;
    if !matches!(storage::retention::unlock_purge(&mut lock).await, Ok(true)) {
        // Closing the session releases its locks.
        let _ = sqlx::Connection::close(lock.detach()).await;
    }
    result.map(Some)
}

async fn run_pass(state: &AppState, rules: &Rules, now: i64) -> anyhow::Result<PassReport> {
    let policies: HashMap<i64, Value> = storage::retention::room_policies(&state.db)
        .await?
        .into_iter()
        .map(|(nid, json)| {
            let content = serde_json::from_str::<Value>(&json).map(|mut v| v["content"].take()).unwrap_or(Value::Null);
            (nid, content)
        })
        .collect();
    // Without a finite default, only rooms with a policy of their own can expire anything.
    let rooms: Vec<i64> = if rules.max_lifetime(None).is_some() {
        storage::retention::all_rooms(&state.db).await?
    } else {
        let mut r: Vec<i64> = policies.keys().copied().collect();
        r.sort_unstable();
        r
    };
    let batch = i64::from(state.config.retention.batch_size.max(1));
    let mut report = PassReport::default();
    for room_nid in rooms {
        let cutoff = rules.cutoff(policies.get(&room_nid), now);
        if cutoff == i64::MIN {
            continue;
        }
        match purge_room(state, room_nid, cutoff, batch).await {
            Ok((0, _)) => {}
            Ok((events, media)) => {
                report.rooms += 1;
                report.events += events;
                report.media += media;
                tracing::info!(room_nid, events, media, cutoff_ts = cutoff, "retention: expired events purged");
            }
            // One room's failure (a bug, a database error) must not stop the others.
            Err(e) => tracing::warn!(room_nid, error = %e, "retention: purging a room failed"),
        }
    }
    Ok(report)
}

/// Purges one room's events sent before `cutoff`, in batches; returns (events, media) deleted.
async fn purge_room(state: &AppState, room_nid: i64, cutoff: i64, batch: i64) -> anyhow::Result<(u64, u64)> {
    let (mut events, mut media) = (0, 0);
    loop {
        let mut tx = state.db.begin().await?;
        let expired = storage::retention::expired_batch(&mut tx, room_nid, cutoff, batch).await?;
        if expired.is_empty() {
            return Ok((events, media));
        }
        let attached: BTreeSet<String> =
            expired.iter().flat_map(|e| attached_media(&e.json, &state.config.server_name)).collect();
        let deleted = storage::retention::delete_events(&mut tx, room_nid, &expired).await?;
        tx.commit().await?;
        // The next read reloads the room from the database. A read that loaded it just before
        // the commit may still cache purged events: they are expired, and every read path hides
        // expired events.
        crate::cluster::room_invalidated(state, room_nid);
        events += deleted;
        media += purge_media(state, attached.into_iter().collect()).await?;
        if (expired.len() as i64) < batch {
            return Ok((events, media));
        }
        tokio::task::yield_now().await;
    }
}

/// Deletes the local uploads among `media_ids` that nothing mentions any more; returns how many.
///
/// A message referencing one of them sent between the check and the deletion (a forward of an
/// expired attachment, within milliseconds) would be left pointing at deleted media.
async fn purge_media(state: &AppState, media_ids: Vec<String>) -> anyhow::Result<u64> {
    if media_ids.is_empty() {
        return Ok(0);
    }
    let server = &state.config.server_name;
    let refs: Vec<String> = media_ids.iter().map(|id| format!("{server}/{id}")).collect();
    let referenced = storage::retention::still_referenced(&state.db, &refs).await?;
    let unreferenced: Vec<String> =
        media_ids.into_iter().filter(|id| !referenced.contains(&format!("{server}/{id}"))).collect();
    let mut deleted = 0;
    for id in storage::retention::local_uploads(&state.db, server, &unreferenced).await? {
        if crate::media::delete(state, server, &id).await? {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// The periodic purge job (spawned when `retention.enabled`): the first pass after
/// `min(purge_interval_secs, 10 min)`, then every `purge_interval_secs`.
pub async fn purge_loop(state: AppState, mut stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let every = Duration::from_secs(state.config.retention.purge_interval_secs.max(1));
    let first = tokio::time::Instant::now() + every.min(Duration::from_secs(600));
    let mut tick = tokio::time::interval_at(first, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        match purge_pass(&state, now_ms()).await {
            Ok(Some(r)) if r.events > 0 => {
                tracing::info!(rooms = r.rooms, events = r.events, media = r.media, "retention: purge pass done")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention: purge pass failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rules(default_max: Option<u64>, min: Option<u64>, max: Option<u64>) -> Rules {
        Rules {
            enabled: true,
            default: Policy { min_lifetime: None, max_lifetime: default_max },
            allowed_min: min,
            allowed_max: max,
        }
    }

    #[test]
    fn content_validation() {
        assert_eq!(
            Policy::from_content(&json!({ "max_lifetime": 1000 })),
            Some(Policy { min_lifetime: None, max_lifetime: Some(1000) })
        );
        assert_eq!(Policy::from_content(&json!({ "max_lifetime": null })), Some(Policy::default()));
        assert_eq!(Policy::from_content(&json!({})), Some(Policy::default()));
        for bad in [
            json!({ "max_lifetime": "1000" }),
            json!({ "max_lifetime": -1 }),
            json!({ "max_lifetime": 1.5 }),
            json!({ "max_lifetime": true }),
            json!({ "min_lifetime": "x", "max_lifetime": 1000 }),
            json!({ "max_lifetime": 1u64 << 60 }),
            json!("x"),
            json!(null),
        ] {
            assert_eq!(Policy::from_content(&bad), None, "{bad}");
        }
    }

    #[test]
    fn effective_lifetimes() {
        let day = 86_400_000;
        // No policy, no default: forever.
        assert_eq!(rules(None, None, None).max_lifetime(None), None);
        // The default applies to rooms without a policy and to invalid ones.
        let r = rules(Some(30 * day), None, None);
        assert_eq!(r.max_lifetime(None), Some(30 * day));
        assert_eq!(r.max_lifetime(Some(&json!({ "max_lifetime": "soon" }))), Some(30 * day));
        // A valid room policy wins, even "forever" (MSC1763).
        assert_eq!(r.max_lifetime(Some(&json!({ "max_lifetime": day }))), Some(day));
        assert_eq!(r.max_lifetime(Some(&json!({}))), None);
        // max_lifetime is raised to min_lifetime.
        assert_eq!(r.max_lifetime(Some(&json!({ "max_lifetime": day, "min_lifetime": 2 * day }))), Some(2 * day));
        // Clamped to the allowed range; a room's "forever" becomes the maximum.
        let r = rules(None, Some(day), Some(365 * day));
        assert_eq!(r.max_lifetime(Some(&json!({ "max_lifetime": 1000 }))), Some(day));
        assert_eq!(r.max_lifetime(Some(&json!({ "max_lifetime": 1000 * day }))), Some(365 * day));
        assert_eq!(r.max_lifetime(Some(&json!({}))), Some(365 * day));
        // A room without a policy and no default keeps everything.
        assert_eq!(r.max_lifetime(None), None);
        // Cut-offs.
        assert_eq!(r.cutoff(Some(&json!({ "max_lifetime": 1000 })), 10 * day as i64), 9 * day as i64);
        assert_eq!(r.cutoff(None, 10), i64::MIN);
        let off = Rules { enabled: false, ..rules(Some(day), None, None) };
        assert_eq!(off.cutoff(None, 10 * day as i64), i64::MIN);
    }

    #[test]
    fn attached_media_fields() {
        let ev = json!({ "content": {
            "url": "mxc://localhost/img1",
            "file": { "url": "mxc://localhost/enc1" },
            "info": { "thumbnail_url": "mxc://localhost/th1", "thumbnail_file": { "url": "mxc://localhost/th2" } },
            "body": "mxc://localhost/notanattachment"
        }});
        let mut ids = attached_media(&ev.to_string(), "localhost");
        ids.sort();
        assert_eq!(ids, ["enc1", "img1", "th1", "th2"]);
        let remote = json!({ "content": { "url": "mxc://other.org/img1" } });
        assert!(attached_media(&remote.to_string(), "localhost").is_empty());
        let bad = json!({ "content": { "url": "mxc://localhost/../etc" } });
        assert!(attached_media(&bad.to_string(), "localhost").is_empty());
    }
}
