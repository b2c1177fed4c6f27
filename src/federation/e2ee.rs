//! E2EE keys of users on other servers, for local clients: `keys/query` and `keys/claim` fan
//! out to `POST /_matrix/federation/v1/user/keys/query|claim` of each server concerned, one
//! request per server, concurrently, within the request's `timeout` (default 10 s). Servers
//! that fail (unreachable, refusing, timing out, answering nonsense) are listed in `failures`.
//! Answers are checked: only the users (and devices) asked for, each key object naming the
//! user and device it is filed under.
//!
//! Nothing is cached: remote device lists are asked every time. Caching them needs the
//! `m.device_list_update` EDUs that invalidate them (room federation); until then a cache could
//! hand out a revoked device's keys.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use axum::http::Method;
use futures_util::StreamExt;
use ruma::OwnedServerName;
use serde_json::{Map, Value, json};

use super::client::FedError;
use crate::e2ee::{KeysAnswer, Wanted, user_server};
use crate::error::{ApiResult, Error};
use crate::state::AppState;

/// Most servers one request fans out to; the others are reported in `failures`.
pub const MAX_SERVERS: usize = 100;
/// Most users asked of one server in one request; beyond, the server is reported in `failures`.
pub const MAX_USERS_PER_SERVER: usize = 1_000;
/// Servers asked at once.
const CONCURRENCY: usize = 16;
const DEFAULT_TIMEOUT_MS: u64 = 10_000;
const MAX_TIMEOUT_MS: u64 = 60_000;

/// The `timeout` of a `keys/query` or `keys/claim` body (milliseconds; default 10 s, at most
/// 60 s).
pub fn request_timeout(body: &Value) -> ApiResult<Duration> {
    let ms = match body.get("timeout") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT_MS,
        Some(v) => v.as_u64().ok_or_else(|| Error::bad_json("timeout must be a non-negative integer"))?,
    };
    Ok(Duration::from_millis(ms.min(MAX_TIMEOUT_MS)))
}

/// A `failures` entry (the format Synapse uses: the status and a message).
fn failure(e: &FedError) -> Value {
    match e {
        FedError::Disabled => json!({ "status": 503, "message": "Federation is not available" }),
        FedError::NotAllowed(_) => json!({ "status": 403, "message": e.to_string() }),
        FedError::Status { status, body } => {
            json!({ "status": status, "message": body["error"].as_str().unwrap_or("remote error") })
        }
        _ => json!({ "status": 503, "message": e.to_string() }),
    }
}

/// Groups items by the server of their user; items of invalid users are dropped (the callers
/// validated them already).
fn by_server<T>(items: Vec<T>, user: impl Fn(&T) -> &str) -> BTreeMap<String, Vec<T>> {
    let mut out: BTreeMap<String, Vec<T>> = BTreeMap::new();
    for item in items {
        if let Some(server) = user_server(user(&item)) {
            out.entry(server.to_owned()).or_default().push(item);
        }
    }
    out
}

/// Splits `groups` into the servers to ask (within the bounds) and the failures of the others.
fn bounded<T>(groups: BTreeMap<String, Vec<T>>, failures: &mut Map<String, Value>) -> Vec<(OwnedServerName, Vec<T>)> {
    let mut out = Vec::new();
    for (server, items) in groups {
        let Ok(name) = ruma::ServerName::parse(&server) else { continue };
        if out.len() >= MAX_SERVERS {
            failures.insert(server, json!({ "status": 400, "message": "Too many servers in one request" }));
        } else if items.len() > MAX_USERS_PER_SERVER {
            let msg = format!("More than {MAX_USERS_PER_SERVER} users of this server in one request");
            failures.insert(server, json!({ "status": 400, "message": msg }));
        } else {
            out.push((name, items));
        }
    }
    out
}

/// Runs `ask` for every server, `CONCURRENCY` at a time, each bounded by the deadline.
async fn fan_out<T, F, Fut>(
    servers: Vec<(OwnedServerName, T)>,
    timeout: Duration,
    ask: F,
) -> Vec<(OwnedServerName, T, Result<Value, FedError>)>
where
    F: Fn(OwnedServerName, &T) -> Fut,
    Fut: Future<Output = Result<Value, FedError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let ask = &ask;
    futures_util::stream::iter(servers)
        .map(|(server, items)| async move {
            let r = match tokio::time::timeout_at(deadline, ask(server.clone(), &items)).await {
                Ok(r) => r,
                Err(_) => Err(FedError::Transport("timed out".into())),
            };
            (server, items, r)
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

/// Asks each server concerned for its users' keys.
pub async fn query_remote(state: &AppState, wanted: Wanted, timeout: Duration) -> (KeysAnswer, Map<String, Value>) {
    let mut out = KeysAnswer::default();
    let mut failures = Map::new();
    if wanted.is_empty() {
        return (out, failures);
    }
    let servers = bounded(by_server(wanted, |(u, _)| u), &mut failures);
    let results = fan_out(servers, timeout, |server, users: &Wanted| {
        let device_keys: Map<String, Value> = users
            .iter()
            .map(|(u, d)| (u.clone(), json!(d.as_ref().map(|d| d.iter().collect::<Vec<_>>()).unwrap_or_default())))
            .collect();
        let body = json!({ "device_keys": device_keys });
        async move {
            state
                .federation
                .request(Method::POST, &server, "/_matrix/federation/v1/user/keys/query", Some(&body), true, usize::MAX)
                .await
        }
    })
    .await;
    for (server, users, r) in results {
        match r {
            Ok(resp) => accept_query(&users, &resp, &mut out),
            Err(e) => {
                tracing::info!(%server, error = %e, "remote keys/query failed");
                failures.insert(server.to_string(), failure(&e));
            }
        }
    }
    (out, failures)
}

/// Keeps what a server answered about the users asked of it, when well-formed.
fn accept_query(users: &Wanted, resp: &Value, out: &mut KeysAnswer) {
    let asked: HashMap<&str, &Option<HashSet<String>>> = users.iter().map(|(u, d)| (u.as_str(), d)).collect();
    if let Some(dk) = resp["device_keys"].as_object() {
        for (user, devices) in dk {
            let (Some(only), Some(devices)) = (asked.get(user.as_str()), devices.as_object()) else { continue };
            let mut kept = Map::new();
            for (device, keys) in devices {
                let wanted = only.as_ref().is_none_or(|o| o.contains(device));
                if wanted && keys["user_id"] == user.as_str() && keys["device_id"] == device.as_str() {
                    kept.insert(device.clone(), keys.clone());
                }
            }
            out.device_keys.insert(user.clone(), Value::Object(kept));
        }
    }
    for (field, map) in [("master_keys", &mut out.master), ("self_signing_keys", &mut out.self_signing)] {
        if let Some(keys) = resp[field].as_object() {
            for (user, key) in keys {
                if asked.contains_key(user.as_str()) && key["user_id"] == user.as_str() && key["keys"].is_object() {
                    map.insert(user.clone(), key.clone());
                }
            }
        }
    }
}

/// Claims one-time keys of remote devices from their servers.
pub async fn claim_remote(
    state: &AppState,
    wanted: Vec<(String, String, String)>,
    timeout: Duration,
) -> (BTreeMap<String, Map<String, Value>>, Map<String, Value>) {
    let mut out: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut failures = Map::new();
    if wanted.is_empty() {
        return (out, failures);
    }
    let servers = bounded(by_server(wanted, |(u, _, _)| u), &mut failures);
    let results = fan_out(servers, timeout, |server, requests: &Vec<(String, String, String)>| {
        let mut one_time_keys: Map<String, Value> = Map::new();
        for (u, d, a) in requests {
            one_time_keys.entry(u.clone()).or_insert_with(|| json!({}))[d] = json!(a);
        }
        let body = json!({ "one_time_keys": one_time_keys });
        async move {
            state
                .federation
                .request(Method::POST, &server, "/_matrix/federation/v1/user/keys/claim", Some(&body), true, usize::MAX)
                .await
        }
    })
    .await;
    for (server, requests, r) in results {
        match r {
            Ok(resp) => {
                for (u, d, a) in &requests {
                    let Some(keys) = resp["one_time_keys"][u][d].as_object() else { continue };
                    // One key of the algorithm asked for.
                    if let Some((id, key)) = keys.iter().find(|(id, _)| id.split_once(':').is_some_and(|(x, _)| x == a))
                    {
                        out.entry(u.clone()).or_default().insert(d.clone(), json!({ id.clone(): key.clone() }));
                    }
                }
            }
            Err(e) => {
                tracing::info!(%server, error = %e, "remote keys/claim failed");
                failures.insert(server.to_string(), failure(&e));
            }
        }
    }
    (out, failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_answers_keep_only_what_was_asked() {
        let wanted: Wanted =
            vec![("@a:b.example".into(), None), ("@c:b.example".into(), Some(HashSet::from(["ONLY".to_owned()])))];
        let dev = |u: &str, d: &str| json!({ "user_id": u, "device_id": d, "keys": {} });
        let resp = json!({
            "device_keys": {
                "@a:b.example": { "D1": dev("@a:b.example", "D1"), "D2": dev("@z:b.example", "D2"), "D3": dev("@a:b.example", "X") },
                "@c:b.example": { "ONLY": dev("@c:b.example", "ONLY"), "OTHER": dev("@c:b.example", "OTHER") },
                "@intrus:b.example": { "D": dev("@intrus:b.example", "D") },
            },
            "master_keys": {
                "@a:b.example": { "user_id": "@a:b.example", "usage": ["master"], "keys": { "ed25519:k": "k" } },
                "@c:b.example": { "user_id": "@a:b.example", "usage": ["master"], "keys": { "ed25519:k": "k" } },
                "@intrus:b.example": { "user_id": "@intrus:b.example", "keys": {} },
            },
            "self_signing_keys": "not a map",
        });
        let mut out = KeysAnswer::default();
        accept_query(&wanted, &resp, &mut out);
        let a: Vec<&String> = out.device_keys["@a:b.example"].as_object().unwrap().keys().collect();
        assert_eq!(a, ["D1"]);
        let c: Vec<&String> = out.device_keys["@c:b.example"].as_object().unwrap().keys().collect();
        assert_eq!(c, ["ONLY"]);
        assert!(!out.device_keys.contains_key("@intrus:b.example"));
        assert_eq!(out.master.keys().collect::<Vec<_>>(), ["@a:b.example"]);
        assert!(out.self_signing.is_empty());
        // Nonsense answers are ignored, never a panic.
        for bad in [json!(null), json!([]), json!({"device_keys": []}), json!({"device_keys": {"@a:b.example": 3}})] {
            accept_query(&wanted, &bad, &mut KeysAnswer::default());
        }
    }

    #[test]
    fn fan_out_bounds_and_timeouts() {
        let mut failures = Map::new();
        let mut groups: BTreeMap<String, Vec<u32>> =
            (1..=MAX_SERVERS + 2).map(|p| (format!("127.0.0.1:{p}"), vec![1])).collect();
        groups.insert("big.example".into(), vec![0; MAX_USERS_PER_SERVER + 1]);
        let asked = bounded(groups, &mut failures);
        assert_eq!(asked.len(), MAX_SERVERS);
        assert_eq!(failures.len(), 3);
        assert!(failures.contains_key("big.example"));
        assert_eq!(request_timeout(&json!({})).unwrap(), Duration::from_secs(10));
        assert_eq!(request_timeout(&json!({"timeout": 1500})).unwrap(), Duration::from_millis(1500));
        assert_eq!(request_timeout(&json!({"timeout": u64::MAX})).unwrap(), Duration::from_secs(60));
        assert!(request_timeout(&json!({"timeout": -1})).is_err());
        assert!(request_timeout(&json!({"timeout": "10"})).is_err());
    }
}
