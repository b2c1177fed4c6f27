//! Delivery of notifications to push gateways (HTTP pushers), in the Push Gateway API's format
//! (`POST <data.url>` with `{"notification": {...}}`, as Sygnal expects).
//!
//! [`dispatch`] is called after the events' transaction committed and returns at once: the
//! pushers and badge counts are read (one query each for the whole batch) and every delivery runs
//! in a task of its own. A delivery is retried with exponential backoff on network errors, 5xx
//! and 429 answers, within `push.gateway_max_attempts` and `push.gateway_retry_total_secs`; any
//! other 4xx is final. Pushkeys the gateway reports as `rejected` lose their pusher.
//!
//! Deliveries survive restarts and database outages. Each pusher has a durable position
//! (`pushers.last_stream_ordering`): every notification up to it was delivered or given up. The
//! process tracks per pusher which positions are in flight and which finished
//! ([`Gateway::begin`], [`Gateway::end`]) and records the position below the oldest one in flight
//! (never past the event-stream watermark, below which every position has committed and been
//! dispatched). [`resume`] runs at start-up for the notifications of earlier processes, then every
//! minute for those that a failure between commit and dispatch left behind (older than a
//! minute), and hands them to the same delivery path; `begin` makes sure one process delivers a
//! notification to a pusher once. Delivery is at least once: a crash between a delivery and the
//! write of its position sends it again after restart. Notifications older than
//! `push.gateway_retry_total_secs` are given up rather than resumed.
//!
//! The URL comes from a client, so the gateway's host is resolved by a resolver that drops the
//! addresses of `push.gateway_ip_blacklist` (unless in `push.gateway_ip_whitelist`): the check
//! applies to the very addresses connected to, so DNS rebinding cannot slip past it. IP literals
//! are checked before sending; redirects are not followed and no proxy is used.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ruma::push::{Action, HighlightTweakValue, Tweak};
use serde_json::{Map, Value, json};

use super::eval::PushJob;
use crate::config::PushConfig;
use crate::state::AppState;
use crate::storage;
use crate::storage::pushers::UserPusher;

/// Largest gateway answer read (its only useful content is a list of rejected pushkeys).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

use crate::http::ssrf::{GuardedResolver, is_refused};
pub use crate::http::ssrf::{IpPolicy, IpRange};

impl IpPolicy {
    pub fn new(config: &PushConfig) -> Result<Self, String> {
        Self::from_lists(&config.gateway_ip_blacklist, &config.gateway_ip_whitelist)
    }
}

/// The HTTP client and policy for push gateways (one per process).
pub struct Gateway {
    client: reqwest::Client,
    policy: Arc<IpPolicy>,
    /// Deliveries (attempts) under way at once.
    slots: Arc<tokio::sync::Semaphore>,
    max_attempts: u32,
    retry_initial: Duration,
    retry_max: Duration,
    retry_total: Duration,
    /// Delivery progress per pusher `(user, app_id, pushkey)` in this process.
    progress: parking_lot::Mutex<HashMap<PusherKey, Progress>>,
    /// When this process started (ms): notifications from before are resumed at start-up.
    started_ms: i64,
}

type PusherKey = (String, String, String);

/// What one pusher's deliveries are doing in this process.
#[derive(Default)]
struct Progress {
    in_flight: BTreeSet<i64>,
    /// Finished above `persisted` (an older one was still in flight).
    finished: BTreeSet<i64>,
    done_max: i64,
    persisted: i64,
}

impl Gateway {
    pub fn new(config: &PushConfig) -> anyhow::Result<Self> {
        let policy = Arc::new(IpPolicy::new(config).map_err(|e| anyhow::anyhow!("push gateway IP ranges: {e}"))?);
        let timeout = Duration::from_secs(config.gateway_timeout_secs.max(1));
        let client = reqwest::Client::builder()
            .dns_resolver(GuardedResolver(policy.clone()))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(timeout)
            .timeout(timeout)
            .user_agent(concat!("Parvis/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            policy,
            slots: Arc::new(tokio::sync::Semaphore::new(config.gateway_max_concurrency.max(1))),
            max_attempts: config.gateway_max_attempts.max(1),
            retry_initial: Duration::from_millis(config.gateway_retry_initial_ms),
            retry_max: Duration::from_millis(config.gateway_retry_max_ms.max(config.gateway_retry_initial_ms)),
            retry_total: Duration::from_secs(config.gateway_retry_total_secs),
            progress: Default::default(),
            started_ms: storage::now_ms(),
        })
    }

    /// Registers the delivery of the notification at `stream` to a pusher; `false` if this
    /// process already delivers or delivered it.
    fn begin(&self, key: &PusherKey, stream: i64) -> bool {
        let mut map = self.progress.lock();
        let p = map.entry(key.clone()).or_default();
        if stream <= p.persisted || p.in_flight.contains(&stream) || p.finished.contains(&stream) {
            return false;
        }
        p.in_flight.insert(stream);
        true
    }

    /// The delivery at `stream` ended (delivered or given up). Returns the position to record if
    /// it moved: below the oldest delivery still in flight, and not past `watermark`.
    fn end(&self, key: &PusherKey, stream: i64, watermark: i64) -> Option<i64> {
        let mut map = self.progress.lock();
        let p = map.get_mut(key)?;
        p.in_flight.remove(&stream);
        p.finished.insert(stream);
        p.done_max = p.done_max.max(stream);
        let safe = p.in_flight.first().map_or(p.done_max, |oldest| oldest - 1).min(watermark);
        if safe <= p.persisted {
            return None;
        }
        p.persisted = safe;
        p.finished.retain(|s| *s > safe);
        if p.in_flight.is_empty() && p.finished.is_empty() {
            map.remove(key);
        }
        Some(safe)
    }
}

/// How a delivery ended (the `outcome` label of `parvis_push_deliveries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// The gateway rejected the pushkey: the pusher was removed.
    Rejected,
    /// The gateway's address is forbidden (SSRF protection).
    Refused,
    /// Given up (a final 4xx, or retries exhausted).
    Failed,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Rejected => "rejected",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

enum Attempt {
    Done { rejected: Vec<String> },
    Refused,
    Retry(String),
    Fatal(String),
}

/// One notification for one pusher.
struct Delivery {
    /// The notification's event-stream position.
    stream: i64,
    user_id: String,
    app_id: String,
    pushkey: String,
    url: String,
    body: Value,
}

/// Hands the push jobs of a committed batch to background delivery; never blocks the caller.
pub fn dispatch(state: &AppState, jobs: Vec<PushJob>) {
    if jobs.is_empty() {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        // On failure, the periodic `resume` delivers them once the database answers again.
        if let Err(e) = fan_out(&state, jobs, false).await {
            tracing::warn!(error = %e, "push delivery could not start");
        }
    });
}

/// Starts a delivery of every job to every HTTP pusher of its user. `resumed`: the jobs come
/// from the database ([`resume`]), so pushers already past a job's position skip it.
async fn fan_out(state: &AppState, jobs: Vec<PushJob>, resumed: bool) -> sqlx::Result<()> {
    let users: Vec<String> = jobs.iter().map(|j| j.user_id.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    let pushers = storage::pushers::http_for_users(&state.db, &users).await?;
    if pushers.is_empty() {
        return Ok(());
    }
    let mut by_user: HashMap<&str, Vec<&UserPusher>> = HashMap::new();
    for p in &pushers {
        by_user.entry(p.user_id.as_str()).or_default().push(p);
    }
    let with_pushers: Vec<String> = by_user.keys().map(|u| (*u).to_owned()).collect();
    let unread = storage::push::unread_totals(&state.db, &with_pushers).await?;
    for job in &jobs {
        for p in by_user.get(job.user_id.as_str()).into_iter().flatten() {
            if resumed && job.stream <= p.last_stream_ordering {
                continue;
            }
            let Some(url) = p.row.data.0.get("url").and_then(Value::as_str) else { continue };
            if !state.push_gateway.begin(&(p.user_id.clone(), p.row.app_id.clone(), p.row.pushkey.clone()), job.stream)
            {
                continue;
            }
            let delivery = Delivery {
                stream: job.stream,
                user_id: p.user_id.clone(),
                app_id: p.row.app_id.clone(),
                pushkey: p.row.pushkey.clone(),
                url: url.to_owned(),
                body: notification(job, p, unread.get(&job.user_id).copied().unwrap_or(0)),
            };
            tokio::spawn(deliver(state.clone(), delivery));
        }
    }
    Ok(())
}

/// The tweaks of the actions, as the gateway's `devices[].tweaks` (`{"sound": "default"}`...).
pub fn tweaks(actions: &[Action]) -> Map<String, Value> {
    let mut out = Map::new();
    for a in actions {
        if let Action::SetTweak(t) = a {
            match t {
                Tweak::Highlight(h) => {
                    out.insert("highlight".into(), json!(matches!(h, HighlightTweakValue::Yes)));
                }
                other => {
                    if let Ok(Value::Object(o)) = serde_json::to_value(other)
                        && let Some(name) = o.get("set_tweak").and_then(Value::as_str)
                    {
                        out.insert(name.to_owned(), o.get("value").cloned().unwrap_or(json!(true)));
                    }
                }
            }
        }
    }
    out
}

/// The request body for one job and one pusher. `unread`: the user's unread notifications
/// across their rooms (omitted when zero, as the spec asks of counts).
fn notification(job: &PushJob, pusher: &UserPusher, unread: i64) -> Value {
    let ev = &job.event;
    let tweaks = tweaks(&job.actions);
    let urgent = job.highlight
        || tweaks.contains_key("sound")
        || matches!(ev.event_type.as_str(), "m.room.message" | "m.room.encrypted");
    let mut data = pusher.row.data.0.as_object().cloned().unwrap_or_default();
    data.remove("url");
    let event_id_only = data.get("format").and_then(Value::as_str) == Some("event_id_only");
    let mut counts = Map::new();
    if unread > 0 {
        counts.insert("unread".into(), json!(unread));
    }
    let mut n = json!({
        "event_id": ev.event_id,
        "room_id": ev.room_id,
        "prio": if urgent { "high" } else { "low" },
        "counts": counts,
        "devices": [{
            "app_id": pusher.row.app_id,
            "pushkey": pusher.row.pushkey,
            "pushkey_ts": pusher.created_ts / 1000,
            "data": data,
            "tweaks": tweaks,
        }],
    });
    if !event_id_only {
        n["type"] = json!(ev.event_type);
        n["sender"] = json!(ev.sender);
        n["content"] = ev.content.clone();
        for (key, value) in [
            ("sender_display_name", &ev.sender_display_name),
            ("room_name", &ev.room_name),
            ("room_alias", &ev.room_alias),
        ] {
            if let Some(v) = value {
                n[key] = json!(v);
            }
        }
        if ev.event_type == "m.room.member" && ev.state_key.as_deref() == Some(job.user_id.as_str()) {
            n["user_is_target"] = json!(true);
        }
    }
    json!({ "notification": n })
}

async fn deliver(state: AppState, d: Delivery) {
    let outcome = attempts(&state, &d).await;
    if outcome == Outcome::Rejected
        && let Err(e) = storage::pushers::delete(&state.db, &d.user_id, &d.app_id, &d.pushkey).await
    {
        tracing::warn!(error = %e, "could not remove a rejected pusher");
    }
    state.metrics.push_delivery(outcome.label());
    finished(&state, (d.user_id, d.app_id, d.pushkey), d.stream).await;
}

/// Ends a pusher's delivery at `stream` and records its position if it moved. A failed write
/// only means the notification may be sent again after a restart.
async fn finished(state: &AppState, key: PusherKey, stream: i64) {
    let watermark = *state.event_stream.borrow();
    if let Some(position) = state.push_gateway.end(&key, stream, watermark)
        && let Err(e) = storage::pushers::advance_position(&state.db, &key.0, &key.1, &key.2, position).await
    {
        tracing::warn!(error = %e, "could not record a pusher's position");
    }
}

/// Most notifications resumed per pusher in one pass.
const RESUME_BATCH: i64 = 100;

/// Hands the notifications that HTTP pushers have not delivered to the delivery path:
/// `first` (at start-up), those of earlier processes; later, those older than a minute (a
/// failure between commit and dispatch, such as a database outage, left them behind). Returns
/// how many were handed over.
pub async fn resume(state: &AppState, first: bool) -> anyhow::Result<usize> {
    let gw = &state.push_gateway;
    let now = storage::now_ms();
    let before = if first { gw.started_ms } else { now - 60_000 };
    let oldest = now - gw.retry_total.as_millis() as i64;
    let rows = storage::pushers::undelivered(&state.db, before, RESUME_BATCH).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let events: HashMap<i64, storage::events::EventRow> = storage::events::by_nids(
        &state.db,
        &rows.iter().map(|r| r.event_nid).collect::<BTreeSet<_>>().into_iter().collect::<Vec<_>>(),
    )
    .await?
    .into_iter()
    .map(|e| (e.event_nid, e))
    .collect();
    // Each room's names and its senders' display names: one state read per room.
    let mut senders: HashMap<i64, BTreeSet<&str>> = HashMap::new();
    for e in events.values() {
        senders.entry(e.room_nid).or_default().insert(e.sender.as_str());
    }
    let mut rooms: HashMap<i64, RoomNames> = HashMap::new();
    for (room_nid, senders) in senders {
        if let Some(names) = room_names(state, room_nid, &senders).await? {
            rooms.insert(room_nid, names);
        }
    }
    let mut jobs = Vec::new();
    let mut seen = HashSet::new();
    for r in rows {
        let key = (r.user_id.clone(), r.app_id.clone(), r.pushkey.clone());
        let event = events.get(&r.event_nid);
        // Too old to be useful, or redacted since: given up.
        if r.ts < oldest || event.is_none_or(|e| e.redacted_by.is_some()) {
            if gw.begin(&key, r.stream_ordering) {
                finished(state, key, r.stream_ordering).await;
            }
            continue;
        }
        let Some(e) = event else { continue };
        if !seen.insert((r.user_id.clone(), r.stream_ordering)) {
            continue;
        }
        let Some(names) = rooms.get(&e.room_nid) else { continue };
        let pdu: Value = serde_json::from_str(&e.json).unwrap_or(Value::Null);
        let sender_display_name = names.display_names.get(&e.sender).cloned();
        let Ok(event_id) = ruma::OwnedEventId::try_from(e.event_id.as_str()) else { continue };
        jobs.push(PushJob {
            user_id: r.user_id,
            stream: r.stream_ordering,
            event: Arc::new(super::eval::NotifiedEvent {
                room_id: names.room_id.clone(),
                event_id,
                event_type: e.event_type.clone(),
                sender: e.sender.clone(),
                state_key: e.state_key.clone(),
                content: pdu.get("content").cloned().unwrap_or_else(|| json!({})),
                sender_display_name,
                room_name: names.name.clone(),
                room_alias: names.alias.clone(),
            }),
            actions: serde_json::from_value(r.actions.0).unwrap_or_default(),
            highlight: r.highlight,
        });
    }
    let n = jobs.len();
    fan_out(state, jobs, true).await?;
    Ok(n)
}

/// What a resumed notification says of its room, from the room's current state.
struct RoomNames {
    room_id: ruma::OwnedRoomId,
    name: Option<String>,
    alias: Option<String>,
    /// Display names of the senders asked for.
    display_names: HashMap<String, String>,
}

/// A room's ID, name, canonical alias and the display names of `senders` (one state read).
async fn room_names(state: &AppState, room_nid: i64, senders: &BTreeSet<&str>) -> sqlx::Result<Option<RoomNames>> {
    let Some(room) = storage::rooms::by_nid(&state.db, room_nid).await? else { return Ok(None) };
    let Ok(room_id) = ruma::OwnedRoomId::try_from(room.room_id.as_str()) else { return Ok(None) };
    let mut keys =
        vec![("m.room.name".to_owned(), String::new()), ("m.room.canonical_alias".to_owned(), String::new())];
    keys.extend(senders.iter().map(|s| ("m.room.member".to_owned(), (*s).to_owned())));
    let mut names = RoomNames { room_id, name: None, alias: None, display_names: HashMap::new() };
    for row in storage::rooms::current_state_for(&state.db, room_nid, &keys).await? {
        let content = serde_json::from_str::<Value>(&row.json).map(|v| v["content"].clone()).unwrap_or(Value::Null);
        match (row.event_type.as_str(), row.state_key) {
            ("m.room.name", _) => names.name = content["name"].as_str().map(str::to_owned),
            ("m.room.canonical_alias", _) => names.alias = content["alias"].as_str().map(str::to_owned),
            (_, Some(user)) => {
                if let Some(d) = content["displayname"].as_str() {
                    names.display_names.insert(user, d.to_owned());
                }
            }
            _ => {}
        }
    }
    Ok(Some(names))
}

/// Resumes undelivered notifications at start-up, then every minute, until `stop`.
pub async fn resume_loop(state: AppState, mut stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut first = true;
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        match resume(&state, first).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(notifications = n, "resumed push deliveries"),
            Err(e) => {
                tracing::warn!(error = %e, "resuming push deliveries failed");
                continue;
            }
        }
        first = false;
    }
}

async fn attempts(state: &AppState, d: &Delivery) -> Outcome {
    let gw = &state.push_gateway;
    let started = Instant::now();
    let mut delay = gw.retry_initial;
    let mut attempt = 1;
    loop {
        let result = match gw.slots.clone().acquire_owned().await {
            Ok(_slot) => attempt_once(gw, d).await,
            Err(_) => return Outcome::Failed,
        };
        match result {
            Attempt::Done { rejected } if rejected.contains(&d.pushkey) => {
                tracing::info!(user_id = %d.user_id, app_id = %d.app_id, "push gateway rejected a pushkey; pusher removed");
                return Outcome::Rejected;
            }
            Attempt::Done { .. } => return Outcome::Delivered,
            Attempt::Refused => {
                tracing::warn!(user_id = %d.user_id, url = %d.url, "push gateway address is forbidden; not contacted");
                return Outcome::Refused;
            }
            Attempt::Fatal(why) => {
                tracing::warn!(user_id = %d.user_id, url = %d.url, reason = %why, "push delivery failed");
                return Outcome::Failed;
            }
            Attempt::Retry(why) => {
                if attempt >= gw.max_attempts || started.elapsed() + delay > gw.retry_total {
                    tracing::warn!(user_id = %d.user_id, url = %d.url, reason = %why, attempt, "push delivery abandoned");
                    return Outcome::Failed;
                }
                tracing::debug!(url = %d.url, reason = %why, attempt, "push delivery will be retried");
                state.metrics.push_delivery("retried");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(gw.retry_max);
                attempt += 1;
            }
        }
    }
}

async fn attempt_once(gw: &Gateway, d: &Delivery) -> Attempt {
    let url = match url::Url::parse(&d.url) {
        Ok(u) => u,
        Err(e) => return Attempt::Fatal(format!("bad URL: {e}")),
    };
    let literal = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        Some(url::Host::Domain(_)) => None,
        None => return Attempt::Fatal("URL without a host".into()),
    };
    // The resolver does not see IP literals.
    if literal.is_some_and(|ip| !gw.policy.allows(ip)) {
        return Attempt::Refused;
    }
    let mut resp = match gw.client.post(url).json(&d.body).send().await {
        Ok(r) => r,
        Err(e) if is_refused(&e) => return Attempt::Refused,
        Err(e) => return Attempt::Retry(e.to_string()),
    };
    let status = resp.status();
    if status.is_success() {
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_RESPONSE_BYTES {
                break;
            }
        }
        let rejected = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("rejected").and_then(Value::as_array).cloned())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        Attempt::Done { rejected }
    } else if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        Attempt::Retry(format!("gateway answered {status}"))
    } else {
        Attempt::Fatal(format!("gateway answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(black: &[&str], white: &[&str]) -> IpPolicy {
        let config = PushConfig {
            gateway_ip_blacklist: black.iter().map(|s| (*s).to_owned()).collect(),
            gateway_ip_whitelist: white.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        };
        IpPolicy::new(&config).unwrap()
    }

    #[test]
    fn ranges() {
        let r = IpRange::parse("10.0.0.0/8").unwrap();
        assert!(r.contains("10.255.1.2".parse().unwrap()));
        assert!(!r.contains("11.0.0.1".parse().unwrap()));
        assert!(!r.contains("::ffff:10.0.0.1".parse().unwrap()), "families never mix");
        assert!(IpRange::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(IpRange::parse("fc00::/7").unwrap().contains("fd12::1".parse().unwrap()));
        assert!(IpRange::parse("192.0.2.1").unwrap().contains("192.0.2.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "::/129", "1.2.3.4/x"] {
            assert!(IpRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_policy_blocks_internal_addresses() {
        let p = IpPolicy::new(&PushConfig::default()).unwrap();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!p.allows(ip.parse().unwrap()), "{ip} must be refused");
        }
        for ip in ["8.8.8.8", "2a00:1450:4007:80c::200e", "172.32.0.1", "100.128.0.1"] {
            assert!(p.allows(ip.parse().unwrap()), "{ip} must be allowed");
        }
        let p = policy(&["127.0.0.0/8"], &["127.0.0.1/32"]);
        assert!(p.allows("127.0.0.1".parse().unwrap()));
        assert!(!p.allows("127.0.0.2".parse().unwrap()));
    }

    #[test]
    fn tweaks_from_actions() {
        let actions: Vec<Action> = serde_json::from_value(json!([
            "notify",
            { "set_tweak": "sound", "value": "default" },
            { "set_tweak": "highlight" }
        ]))
        .unwrap();
        assert_eq!(Value::Object(tweaks(&actions)), json!({ "sound": "default", "highlight": true }));
        let actions: Vec<Action> =
            serde_json::from_value(json!(["notify", { "set_tweak": "highlight", "value": false }])).unwrap();
        assert_eq!(Value::Object(tweaks(&actions)), json!({ "highlight": false }));
    }
}
