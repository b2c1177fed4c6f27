//! Server keys (<https://spec.matrix.org/latest/server-server-api/#retrieving-server-keys>):
//!
//! - ours: `GET /_matrix/key/v2/server`, signed with our key, `valid_until_ts` =
//!   now + `federation.key_validity_secs`, our expired keys under `old_verify_keys`;
//! - others': fetched directly (`GET /_matrix/key/v2/server` on that server), else through the
//!   `federation.trusted_key_servers` notaries, verified (the response must be self-signed by
//!   its keys, and a notary's answer also signed by the notary), cached in memory and in
//!   PostgreSQL (`federation_server_keys`, `federation_key_responses`);
//! - the notary: `/_matrix/key/v2/query` serves the responses we hold (fetching missing or
//!   stale ones) with our signature added.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::Method;
use ed25519_dalek::VerifyingKey;
use futures_util::StreamExt;
use ruma::{OwnedServerName, ServerName};
use serde_json::{Map, Value, json};

use super::auth::valid_key_id;
use super::{decode_public_key, verify_json};
use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage::federation::RemoteKey;
use crate::storage::{self, now_ms};

/// Largest key response accepted from a server.
pub const MAX_KEY_RESPONSE_BYTES: usize = 64 * 1024;
/// Largest notary answer accepted.
pub const MAX_NOTARY_RESPONSE_BYTES: usize = 1024 * 1024;
/// Most keys (current plus old) of one response.
pub const MAX_KEYS: usize = 32;
/// Most servers in one notary query.
pub const MAX_QUERY_SERVERS: usize = 100;
/// After a failed fetch, a server's keys are not fetched again for this long (hostile requests
/// naming unknown keys cannot make us hammer a server).
const FETCH_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct CachedKey {
    key: VerifyingKey,
    valid_until_ts: i64,
    expired_ts: Option<i64>,
}

/// In-memory caches in front of the tables.
pub struct KeyCache {
    keys: moka::sync::Cache<(String, String), CachedKey>,
    failed: moka::sync::Cache<String, ()>,
}

impl Default for KeyCache {
    fn default() -> Self {
        Self {
            keys: moka::sync::Cache::new(100_000),
            failed: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(FETCH_BACKOFF).build(),
        }
    }
}

/// Our key document, signed.
pub async fn own_document(state: &AppState) -> ApiResult<Value> {
    let fed = &state.federation;
    let valid_until_ts = now_ms() + state.config.federation.key_validity_secs as i64 * 1000;
    let mut old = Map::new();
    for (key_id, seed, expired_ts) in storage::federation::own_expired_keys(&state.db).await? {
        if key_id == fed.signer.key_id {
            continue;
        }
        if let Ok(k) = crate::keys::ServerKey::from_seed(key_id.clone(), &seed) {
            old.insert(key_id, json!({ "key": k.public_key_base64(), "expired_ts": expired_ts }));
        }
    }
    let mut doc = json!({
        "server_name": fed.server_name().as_str(),
        "valid_until_ts": valid_until_ts,
        "verify_keys": { fed.signer.key_id.clone(): { "key": fed.signer.public_key_base64() } },
        "old_verify_keys": old,
    });
    fed.signer.sign_json(&mut doc).map_err(|e| {
        tracing::error!(error = %e, "cannot sign our key document");
        Error::internal()
    })?;
    Ok(doc)
}

/// A verified key response.
#[derive(Debug)]
pub struct VerifiedKeys {
    pub keys: Vec<RemoteKey>,
    pub valid_until_ts: i64,
    /// The response as canonical JSON (what the notary serves back).
    pub canonical: String,
}

/// Checks a key response of `server`: its shape and bounds, and that it is signed by its own
/// current keys (at least one, and every signature by a current key valid).
pub fn verify_key_response(server: &ServerName, v: &Value) -> Result<VerifiedKeys, String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    if obj.get("server_name").and_then(Value::as_str) != Some(server.as_str()) {
        return Err(format!("server_name is not {server}"));
    }
    let valid_until_ts =
        obj.get("valid_until_ts").and_then(Value::as_i64).filter(|t| *t > 0).ok_or("invalid valid_until_ts")?;
    let verify_keys = obj.get("verify_keys").and_then(Value::as_object).ok_or("missing verify_keys")?;
    let old = match obj.get("old_verify_keys") {
        None => None,
        Some(o) => Some(o.as_object().ok_or("old_verify_keys is not an object")?),
    };
    if verify_keys.len() + old.map_or(0, |o| o.len()) > MAX_KEYS {
        return Err(format!("more than {MAX_KEYS} keys"));
    }
    let mut keys = Vec::new();
    let mut current = Vec::new();
    for (id, k) in verify_keys {
        if !id.starts_with("ed25519:") {
            continue; // other algorithms are not used by anyone; ignore them
        }
        let b64 = k.get("key").and_then(Value::as_str).ok_or_else(|| format!("key {id} has no `key`"))?;
        let key = decode_public_key(b64).filter(|_| valid_key_id(id)).ok_or_else(|| format!("invalid key {id}"))?;
        current.push((id.clone(), key));
        keys.push(RemoteKey { key_id: id.clone(), public_key: b64.to_owned(), valid_until_ts, expired_ts: None });
    }
    if current.is_empty() {
        return Err("no ed25519 key in verify_keys".into());
    }
    for (id, k) in old.into_iter().flatten() {
        if !id.starts_with("ed25519:") || verify_keys.contains_key(id) {
            continue;
        }
        let b64 = k.get("key").and_then(Value::as_str).ok_or_else(|| format!("old key {id} has no `key`"))?;
        let expired_ts =
            k.get("expired_ts").and_then(Value::as_i64).ok_or_else(|| format!("old key {id}: expired_ts"))?;
        if decode_public_key(b64).is_none() || !valid_key_id(id) {
            return Err(format!("invalid old key {id}"));
        }
        keys.push(RemoteKey {
            key_id: id.clone(),
            public_key: b64.to_owned(),
            valid_until_ts,
            expired_ts: Some(expired_ts),
        });
    }
    let sigs = v
        .get("signatures")
        .and_then(|s| s.get(server.as_str()))
        .and_then(Value::as_object)
        .ok_or("not signed by the server")?;
    let mut signed = false;
    for (id, key) in &current {
        if sigs.contains_key(id) {
            if !verify_json(v, server.as_str(), id, key) {
                return Err(format!("invalid self-signature by {id}"));
            }
            signed = true;
        }
    }
    if !signed {
        return Err("not self-signed by any of its verify_keys".into());
    }
    let canonical = super::canonical_json(v)?;
    Ok(VerifiedKeys { keys, valid_until_ts, canonical })
}

async fn store(state: &AppState, server: &ServerName, verified: &VerifiedKeys) {
    for k in &verified.keys {
        if let Some(key) = decode_public_key(&k.public_key) {
            state.federation.keys.keys.insert(
                (server.to_string(), k.key_id.clone()),
                CachedKey { key, valid_until_ts: k.valid_until_ts, expired_ts: k.expired_ts },
            );
        }
    }
    if let Err(e) = storage::federation::store_response(
        &state.db,
        server.as_str(),
        &verified.keys,
        &verified.canonical,
        verified.valid_until_ts,
        now_ms(),
    )
    .await
    {
        tracing::warn!(%server, error = %e, "could not store server keys");
    }
}

/// Fetches `server`'s keys from the server itself, verifies and stores them.
pub async fn fetch_direct(state: &AppState, server: &ServerName) -> Result<VerifiedKeys, String> {
    let v = state
        .federation
        .request(Method::GET, server, "/_matrix/key/v2/server", None, false, MAX_KEY_RESPONSE_BYTES)
        .await
        .map_err(|e| e.to_string())?;
    let verified = verify_key_response(server, &v)?;
    store(state, server, &verified).await;
    Ok(verified)
}

/// Fetches `server`'s keys through a notary: the answer must be the server's self-signed
/// response, also signed by the notary (whose own keys are fetched directly). Naming the wanted
/// key matters: Synapse as a notary fetches only keys asked for by ID (otherwise it answers from
/// its cache), and requires `minimum_valid_until_ts` with each.
pub async fn fetch_via_notary(
    state: &AppState,
    notary: &ServerName,
    server: &ServerName,
    key_id: Option<&str>,
) -> Result<VerifiedKeys, String> {
    let criteria = match key_id {
        Some(id) => json!({ id: { "minimum_valid_until_ts": now_ms() } }),
        None => json!({}),
    };
    let body = json!({ "server_keys": { server.as_str(): criteria } });
    let v = state
        .federation
        .request(Method::POST, notary, "/_matrix/key/v2/query", Some(&body), false, MAX_NOTARY_RESPONSE_BYTES)
        .await
        .map_err(|e| e.to_string())?;
    let list = v.get("server_keys").and_then(Value::as_array).ok_or("notary answer without server_keys")?;
    let mut last = format!("notary {notary} has no keys of {server}");
    for entry in list.iter().take(MAX_QUERY_SERVERS) {
        if entry.get("server_name").and_then(Value::as_str) != Some(server.as_str()) {
            continue;
        }
        let verified = match verify_key_response(server, entry) {
            Ok(k) => k,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let notary_sigs = entry.get("signatures").and_then(|s| s.get(notary.as_str())).and_then(Value::as_object);
        let mut by_notary = false;
        for key_id in notary_sigs.into_iter().flat_map(|s| s.keys()).take(MAX_KEYS) {
            if let Some(k) = notary_key(state, notary, key_id).await
                && verify_json(entry, notary.as_str(), key_id, &k)
            {
                by_notary = true;
                break;
            }
        }
        if !by_notary {
            last = format!("answer about {server} not signed by notary {notary}");
            continue;
        }
        store(state, server, &verified).await;
        return Ok(verified);
    }
    Err(last)
}

/// A current key of a notary: cached, or fetched from the notary itself (never through another
/// notary).
async fn notary_key(state: &AppState, notary: &ServerName, key_id: &str) -> Option<VerifyingKey> {
    if let Some(k) = cached_key(state, notary, key_id, now_ms()).await {
        return Some(k);
    }
    fetch_direct(state, notary).await.ok()?;
    cached_key(state, notary, key_id, now_ms()).await
}

/// A current (unexpired, `valid_until_ts` not past `min_valid`) key from memory or the database.
async fn cached_key(state: &AppState, server: &ServerName, key_id: &str, min_valid: i64) -> Option<VerifyingKey> {
    let cache = &state.federation.keys.keys;
    let id = (server.to_string(), key_id.to_owned());
    let usable = |c: &CachedKey| c.expired_ts.is_none() && c.valid_until_ts >= min_valid;
    if let Some(c) = cache.get(&id) {
        return usable(&c).then_some(c.key);
    }
    let row = storage::federation::key(&state.db, server.as_str(), key_id).await.ok()??;
    let c = CachedKey {
        key: decode_public_key(&row.public_key)?,
        valid_until_ts: row.valid_until_ts,
        expired_ts: row.expired_ts,
    };
    cache.insert(id, c.clone());
    usable(&c).then_some(c.key)
}

/// The key `key_id` of `server` to verify an event signature made at `origin_ts` with: a key
/// valid at that time, or an old key that expired after it (the spec's rules for old keys);
/// fetched when unknown, as [`request_key`] does. Our own current key is known without a fetch.
pub async fn event_key(state: &AppState, server: &ServerName, key_id: &str, origin_ts: i64) -> Option<VerifyingKey> {
    let fed = &state.federation;
    if server == fed.server_name() && key_id == fed.signer.key_id {
        return decode_public_key(&fed.signer.public_key_base64());
    }
    let cache = &fed.keys.keys;
    let id = (server.to_string(), key_id.to_owned());
    let usable = |c: &CachedKey| match c.expired_ts {
        Some(expired) => expired > origin_ts,
        None => c.valid_until_ts >= origin_ts,
    };
    let cached = match cache.get(&id) {
        Some(c) => Some(c),
        None => storage::federation::key(&state.db, server.as_str(), key_id).await.ok().flatten().and_then(|row| {
            let c = CachedKey {
                key: decode_public_key(&row.public_key)?,
                valid_until_ts: row.valid_until_ts,
                expired_ts: row.expired_ts,
            };
            cache.insert(id.clone(), c.clone());
            Some(c)
        }),
    };
    if let Some(c) = cached.filter(|c| usable(c)) {
        return Some(c.key);
    }
    // Unknown, or known but not valid at that time: a fresh fetch may bring a newer validity.
    request_key(state, server, key_id).await?;
    cache.get(&id).filter(|c| usable(c)).map(|c| c.key)
}

/// The key `key_id` of `server` to verify a request with: current and valid now; fetched
/// (directly, then through the trusted notaries) when unknown or stale. `None` when it cannot
/// be had; failed fetches are not retried for 30 seconds.
pub async fn request_key(state: &AppState, server: &ServerName, key_id: &str) -> Option<VerifyingKey> {
    let now = now_ms();
    if let Some(k) = cached_key(state, server, key_id, now).await {
        return Some(k);
    }
    let fed = &state.federation;
    if fed.keys.failed.contains_key(server.as_str()) {
        return None;
    }
    match fetch_direct(state, server).await {
        Ok(_) => {
            if let Some(k) = cached_key(state, server, key_id, now).await {
                return Some(k);
            }
        }
        Err(e) => tracing::info!(%server, error = %e, "direct key fetch failed"),
    }
    for notary in &state.config.federation.trusted_key_servers {
        let Ok(notary) = ServerName::parse(notary) else { continue };
        if *notary == *server {
            continue;
        }
        match fetch_via_notary(state, &notary, server, Some(key_id)).await {
            Ok(_) => {
                if let Some(k) = cached_key(state, server, key_id, now).await {
                    return Some(k);
                }
            }
            Err(e) => tracing::info!(%server, %notary, error = %e, "key fetch through notary failed"),
        }
    }
    fed.keys.failed.insert(server.to_string(), ());
    None
}

/// The notary: for each requested server, its key response valid at least until the requested
/// time (ours for our name; cached, else fetched; a stale one if the fetch fails), with our
/// signature added. Servers we may not contact are left out.
pub async fn notary_query(state: &AppState, wanted: Vec<(OwnedServerName, i64)>) -> ApiResult<Vec<Value>> {
    if wanted.len() > MAX_QUERY_SERVERS {
        return Err(Error::invalid_param(format!("At most {MAX_QUERY_SERVERS} servers per query")));
    }
    let results: Vec<Option<Value>> = futures_util::stream::iter(wanted)
        .map(|(server, min_valid)| async move { notary_one(state, &server, min_valid).await })
        .buffer_unordered(8)
        .collect()
        .await;
    Ok(results.into_iter().flatten().collect())
}

async fn notary_one(state: &AppState, server: &ServerName, min_valid: i64) -> Option<Value> {
    let fed = &state.federation;
    if server == fed.server_name() {
        return own_document(state).await.ok();
    }
    if !fed.enabled || !fed.is_allowed(server) {
        return None;
    }
    let cached = storage::federation::response(&state.db, server.as_str()).await.ok().flatten();
    let text = match cached {
        Some((text, valid_until)) if valid_until >= min_valid => text,
        // A server that just failed is not asked again (a query cannot make us hammer it).
        stale if fed.keys.failed.contains_key(server.as_str()) => stale?.0,
        stale => match fetch_direct(state, server).await {
            Ok(v) => v.canonical,
            Err(e) => {
                tracing::info!(%server, error = %e, "notary: key fetch failed");
                fed.keys.failed.insert(server.to_string(), ());
                stale?.0
            }
        },
    };
    let mut v: Value = serde_json::from_str(&text).ok()?;
    fed.signer.sign_json(&mut v).ok()?;
    Some(v)
}

/// Parses a notary query body: `{"server_keys": {server: {key_id: {"minimum_valid_until_ts"}}}}`.
/// The minimum for a server is the largest of its key criteria, or now.
pub fn parse_query(body: &Value) -> ApiResult<Vec<(OwnedServerName, i64)>> {
    let servers = body
        .get("server_keys")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::bad_json("server_keys must be an object"))?;
    if servers.len() > MAX_QUERY_SERVERS {
        return Err(Error::invalid_param(format!("At most {MAX_QUERY_SERVERS} servers per query")));
    }
    let now = now_ms();
    let mut out = BTreeMap::new();
    for (name, criteria) in servers {
        let server =
            ServerName::parse(name).map_err(|_| Error::invalid_param(format!("Invalid server name {name}")))?;
        let criteria = criteria.as_object().ok_or_else(|| Error::bad_json("key criteria must be an object"))?;
        if criteria.len() > MAX_KEYS {
            return Err(Error::invalid_param(format!("At most {MAX_KEYS} key IDs per server")));
        }
        let mut min = now;
        for c in criteria.values() {
            match c.get("minimum_valid_until_ts") {
                None | Some(Value::Null) => {}
                Some(t) => {
                    min =
                        min.max(t.as_i64().ok_or_else(|| Error::bad_json("minimum_valid_until_ts must be an integer"))?)
                }
            }
        }
        out.insert(server, min);
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::Signer;
    use crate::keys::ServerKey;

    fn signer(name: &str) -> Signer {
        let k = ServerKey::generate();
        Signer { server_name: ServerName::parse(name).unwrap(), key_id: k.key_id, key: k.signing_key }
    }

    fn doc(s: &Signer) -> Value {
        let mut v = json!({
            "server_name": s.server_name.as_str(),
            "valid_until_ts": 4_000_000_000_000i64,
            "verify_keys": { s.key_id.clone(): { "key": s.public_key_base64() } },
            "old_verify_keys": { "ed25519:old": { "key": s.public_key_base64(), "expired_ts": 1000 } },
        });
        s.sign_json(&mut v).unwrap();
        v
    }

    #[test]
    fn accepts_a_self_signed_response() {
        let s = signer("127.0.0.1:8448");
        let k = verify_key_response(&s.server_name, &doc(&s)).unwrap();
        assert_eq!(k.keys.len(), 2);
        assert_eq!(k.valid_until_ts, 4_000_000_000_000);
        assert_eq!(k.keys.iter().filter(|k| k.expired_ts.is_some()).count(), 1);
        // A notary's added signature does not break it.
        let mut v = doc(&s);
        signer("notary.fr").sign_json(&mut v).unwrap();
        assert!(verify_key_response(&s.server_name, &v).is_ok());
    }

    #[test]
    fn refuses_bad_responses() {
        let s = signer("a.fr");
        let other = signer("b.fr");
        let name = s.server_name.clone();
        // Wrong server.
        assert!(verify_key_response(&other.server_name, &doc(&s)).is_err());
        // Tampered after signing.
        let mut v = doc(&s);
        v["valid_until_ts"] = json!(5_000_000_000_000i64);
        assert!(verify_key_response(&name, &v).is_err());
        // Signed by another key than the ones listed.
        let mut v = json!({
            "server_name": "a.fr", "valid_until_ts": 1,
            "verify_keys": { s.key_id.clone(): { "key": s.public_key_base64() } },
        });
        let mut forged = v.clone();
        other.sign_json(&mut forged).unwrap();
        let sig = forged["signatures"]["b.fr"][&other.key_id].clone();
        v["signatures"] = json!({ "a.fr": { s.key_id.clone(): sig } });
        assert!(verify_key_response(&name, &v).is_err());
        // Unsigned.
        let mut v = doc(&s);
        v.as_object_mut().unwrap().remove("signatures");
        assert!(verify_key_response(&name, &v).is_err());
        // Shapes.
        for bad in [
            json!([]),
            json!({"server_name": "a.fr"}),
            json!({"server_name": "a.fr", "valid_until_ts": "x", "verify_keys": {}}),
            json!({"server_name": "a.fr", "valid_until_ts": 1, "verify_keys": {}}),
            json!({"server_name": "a.fr", "valid_until_ts": 1, "verify_keys": {"ed25519:a": {"key": "short"}}}),
            json!({"server_name": "a.fr", "valid_until_ts": 1, "verify_keys": {"ed25519:a/b": {"key": s.public_key_base64()}}}),
        ] {
            assert!(verify_key_response(&name, &bad).is_err(), "{bad}");
        }
        // Too many keys.
        let many: Map<String, Value> =
            (0..40).map(|i| (format!("ed25519:k{i}"), json!({"key": s.public_key_base64()}))).collect();
        let v = json!({"server_name": "a.fr", "valid_until_ts": 1, "verify_keys": many});
        assert!(verify_key_response(&name, &v).unwrap_err().contains("more than"));
    }

    #[test]
    fn notary_query_bodies() {
        let q = parse_query(&json!({"server_keys": {
            "a.fr": {"ed25519:x": {"minimum_valid_until_ts": 9_000_000_000_000i64}},
            "[::1]:8448": {},
        }}))
        .unwrap();
        assert_eq!(q.len(), 2);
        assert!(q.iter().any(|(s, t)| s == "a.fr" && *t == 9_000_000_000_000));
        assert!(parse_query(&json!({"server_keys": {"bad name!": {}}})).is_err());
        assert!(parse_query(&json!({"server_keys": []})).is_err());
        assert!(parse_query(&json!({})).is_err());
        assert!(parse_query(&json!({"server_keys": {"a.fr": {"k": {"minimum_valid_until_ts": "soon"}}}})).is_err());
        let many: Map<String, Value> = (0..101).map(|i| (format!("s{i}.fr"), json!({}))).collect();
        assert!(parse_query(&json!({ "server_keys": many })).is_err());
    }
}
