//! Delivery of notifications to push gateways (HTTP pushers), in the Push Gateway API's format
//! (`POST <data.url>` with `{"notification": {...}}`, as Sygnal expects).
//!
//! [`dispatch`] is called after the events' transaction committed and returns at once: the
//! pushers and badge counts are read (one query each for the whole batch) and every delivery runs
//! in a task of its own. A delivery is retried with exponential backoff on network errors, 5xx
//! and 429 answers, within `push.gateway_max_attempts` and `push.gateway_retry_total_secs`; any
//! other 4xx is final. Pushkeys the gateway reports as `rejected` lose their pusher.
//!
//! The URL comes from a client, so the gateway's host is resolved by a resolver that drops the
//! addresses of `push.gateway_ip_blacklist` (unless in `push.gateway_ip_whitelist`): the check
//! applies to the very addresses connected to, so DNS rebinding cannot slip past it. IP literals
//! are checked before sending; redirects are not followed and no proxy is used.

use std::collections::{BTreeSet, HashMap};
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
        })
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
        if let Err(e) = fan_out(&state, jobs).await {
            tracing::warn!(error = %e, "push delivery could not start");
        }
    });
}

async fn fan_out(state: &AppState, jobs: Vec<PushJob>) -> sqlx::Result<()> {
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
            let Some(url) = p.row.data.0.get("url").and_then(Value::as_str) else { continue };
            let delivery = Delivery {
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
