//! End-to-end encryption support: the server stores and routes keys and to-device messages; it
//! never sees plaintext. Device keys, one-time and fallback keys, cross-signing keys and
//! signatures (`keys/*`), to-device messages, and the device-list stream that tells clients whose
//! keys to re-fetch. Key backup is in [`backup`].
//!
//! Keys of remote users are asked of their servers (`federation::e2ee`, from [`query_keys`] and
//! [`claim_keys`]); other servers ask ours through the `federation_*` functions here.

pub mod backup;
pub mod dehydrated;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage;

/// To-device messages delivered per sync response.
pub const TO_DEVICE_PER_SYNC: i64 = 100;

/// The server name of a user ID (`@local:server`, where the server name may carry a port and
/// be an IPv4 or bracketed IPv6 literal), `None` if it is not a valid user ID. The server name
/// starts after the *first* colon: splitting on the last one would cut a port off.
pub fn user_server(user: &str) -> Option<&str> {
    <&ruma::UserId>::try_from(user).ok().map(|u| u.server_name().as_str())
}

fn is_local(state: &AppState, user: &str) -> bool {
    user_server(user) == Some(state.config.server_name.as_str())
}

/// Canonical JSON of `obj` without `signatures` and `unsigned`: what a signature covers.
fn signed_bytes(obj: &Value) -> Option<String> {
    let mut o = obj.as_object()?.clone();
    o.remove("signatures");
    o.remove("unsigned");
    let canonical = ruma::CanonicalJsonValue::try_from(Value::Object(o)).ok()?;
    serde_json::to_string(&canonical).ok()
}

/// Whether `obj` carries a valid ed25519 signature by `signer` with `key_id` (`ed25519:<id>`)
/// for the unpadded-base64 public key `public_key`.
pub fn verify(obj: &Value, signer: &str, key_id: &str, public_key: &str) -> bool {
    let Some(sig) = obj["signatures"][signer][key_id].as_str() else { return false };
    let (Ok(pk), Ok(sig)) = (crate::keys::decode_base64_lenient(public_key), crate::keys::decode_base64_lenient(sig))
    else {
        return false;
    };
    let (Ok(pk), Ok(sig)) = (<[u8; 32]>::try_from(pk.as_slice()), <[u8; 64]>::try_from(sig.as_slice())) else {
        return false;
    };
    let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(&pk) else { return false };
    let Some(msg) = signed_bytes(obj) else { return false };
    vk.verify_strict(msg.as_bytes(), &ed25519_dalek::Signature::from_bytes(&sig)).is_ok()
}

fn bad(msg: impl Into<String>) -> Error {
    Error::bad_json(msg.into())
}

/// Records that `user`'s devices or keys changed (inside the caller's transaction); call
/// [`device_list_committed`] after commit.
pub async fn record_device_list_change(conn: &mut sqlx::PgConnection, user: &str) -> ApiResult<i64> {
    Ok(storage::e2ee::record_device_list_change(conn, user).await?)
}

/// After a device-list change committed: raises the user's head, moves the stream and wakes the
/// user and their room-mates.
pub fn device_list_committed(state: &AppState, user: &str, pos: i64) {
    state.sync.device_list_heads.raise(&user.to_owned(), pos);
    crate::cluster::advance(state, &state.device_list_stream, pos);
    crate::appservice::sender::device_list_changed(state, user);
    device_list_woken(state, user);
    let (state, user) = (state.clone(), user.to_owned());
    tokio::spawn(async move { crate::federation::edu::device_list_out(&state, &user, pos).await });
}

/// Wakes the user and their room-mates after a change of the user's devices.
pub fn device_list_woken(state: &AppState, user: &str) {
    state.sync.wake_user(user);
    match state.sync.cached_joined_rooms(user) {
        Some(rooms) => rooms.into_iter().for_each(|r| state.sync.wake_room(r)),
        None => state.sync.wake_all(),
    }
}

/// Records a device-list change in a transaction of its own (new device, renamed or deleted
/// devices).
pub async fn devices_changed(state: &AppState, user: &str) -> ApiResult<()> {
    let mut tx = state.db.begin().await?;
    let pos = record_device_list_change(&mut tx, user).await?;
    tx.commit().await?;
    crate::cluster::key_counts_changed(state, user, None);
    device_list_committed(state, user, pos);
    Ok(())
}

/// `POST /keys/upload`.
pub async fn upload_keys(state: &AppState, user: &str, device: &str, body: &Value) -> ApiResult<Value> {
    let mut tx = state.db.begin().await?;
    let mut changed = false;
    if let Some(dk) = body.get("device_keys").filter(|v| !v.is_null()) {
        validate_device_keys(dk, user, device)?;
        if dk.get("dehydrated") == Some(&Value::Bool(true)) {
            // Only the dehydrated device (`PUT /dehydrated_device`) is one; a session's device
            // claiming it would be hidden or treated specially by other clients.
            return Err(Error::invalid_param(
                "device_keys.dehydrated: only the dehydrated device (PUT /dehydrated_device) is dehydrated",
            ));
        }
        let current = storage::e2ee::device_keys(&mut *tx, user, device).await?;
        let same = current.as_ref().is_some_and(|c| signed_bytes(c) == signed_bytes(dk));
        if !same {
            // Keep signatures made by the user's self-signing key on the previous upload only if
            // the keys are the same; new keys start with the device's own signatures.
            storage::e2ee::set_device_keys(&mut tx, user, device, dk).await?;
            changed = true;
        }
    }
    let parsed = parse_one_time_keys(body)?;
    if !parsed.is_empty() {
        let ids: Vec<String> = parsed.iter().map(|(a, k, _)| format!("{a}:{k}")).collect();
        let existing = storage::e2ee::existing_one_time_keys(&mut *tx, user, device, &ids).await?;
        for (a, k, v) in &parsed {
            if let Some(old) = existing.get(&format!("{a}:{k}"))
                && old != v
            {
                return Err(Error::invalid_param(format!(
                    "One-time key {a}:{k} already exists with different content"
                )));
            }
        }
        storage::e2ee::insert_one_time_keys(&mut tx, user, device, &parsed).await?;
    }
    for (alg, key_id, key) in parse_fallback_keys(body)? {
        storage::e2ee::set_fallback_key(&mut tx, user, device, &alg, &key_id, &key).await?;
    }
    let pos = if changed { Some(record_device_list_change(&mut tx, user).await?) } else { None };
    let counts = storage::e2ee::one_time_key_counts(&mut *tx, user, device).await?;
    tx.commit().await?;
    crate::cluster::key_counts_changed(state, user, Some(device));
    if let Some(pos) = pos {
        device_list_committed(state, user, pos);
    }
    Ok(json!({ "one_time_key_counts": counts }))
}

/// The `one_time_keys` of a `keys/upload`-shaped body: (algorithm, key ID, key).
fn parse_one_time_keys(body: &Value) -> ApiResult<Vec<(String, String, Value)>> {
    let Some(otks) = body.get("one_time_keys").filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
    let otks = otks.as_object().ok_or_else(|| bad("one_time_keys must be an object"))?;
    let mut parsed = Vec::with_capacity(otks.len());
    for (id, key) in otks {
        let (alg, key_id) = id.split_once(':').ok_or_else(|| bad(format!("invalid one-time key ID {id}")))?;
        if alg.is_empty() || key_id.is_empty() || !(key.is_object() || key.is_string()) {
            return Err(bad(format!("invalid one-time key {id}")));
        }
        if let Some(o) = key.as_object()
            && !o.get("key").is_some_and(Value::is_string)
        {
            return Err(bad(format!("one-time key {id} has no key")));
        }
        parsed.push((alg.to_owned(), key_id.to_owned(), key.clone()));
    }
    Ok(parsed)
}

/// The fallback keys of a `keys/upload`-shaped body (`fallback_keys`, or the unstable
/// `org.matrix.msc2732.fallback_keys`): (algorithm, key ID, key).
fn parse_fallback_keys(body: &Value) -> ApiResult<Vec<(String, String, Value)>> {
    let mut parsed = Vec::new();
    for field in ["fallback_keys", "org.matrix.msc2732.fallback_keys"] {
        let Some(fks) = body.get(field).filter(|v| !v.is_null()) else { continue };
        let fks = fks.as_object().ok_or_else(|| bad(format!("{field} must be an object")))?;
        for (id, key) in fks {
            let (alg, key_id) = id.split_once(':').ok_or_else(|| bad(format!("invalid fallback key ID {id}")))?;
            if !key.get("key").is_some_and(Value::is_string) {
                return Err(bad(format!("fallback key {id} has no key")));
            }
            parsed.push((alg.to_owned(), key_id.to_owned(), key.clone()));
        }
    }
    Ok(parsed)
}

/// Checks uploaded device keys: they are `user`'s, for `device` (the authenticated device, or the
/// dehydrated device being uploaded), well-formed, and signed by the device's own ed25519 key.
fn validate_device_keys(dk: &Value, user: &str, device: &str) -> ApiResult<()> {
    if dk["user_id"] != user {
        return Err(Error::invalid_param("device_keys.user_id is not the authenticated user"));
    }
    if dk["device_id"] != device {
        return Err(Error::invalid_param(format!("device_keys.device_id is not {device}")));
    }
    if dk.get("dehydrated").is_some_and(|d| !d.is_boolean()) {
        return Err(bad("device_keys.dehydrated must be a boolean"));
    }
    if !dk["algorithms"].as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
        return Err(bad("device_keys.algorithms must be a list of strings"));
    }
    let keys = dk["keys"].as_object().ok_or_else(|| bad("device_keys.keys must be an object"))?;
    if keys.values().any(|v| !v.is_string()) {
        return Err(bad("device_keys.keys values must be strings"));
    }
    let ed_id = format!("ed25519:{device}");
    let ed = keys.get(&ed_id).and_then(Value::as_str).ok_or_else(|| bad(format!("device_keys.keys lacks {ed_id}")))?;
    if !verify(dk, user, &ed_id, ed) {
        return Err(bad("device_keys are not signed by the device's ed25519 key"));
    }
    Ok(())
}

/// One-time key counts and unused fallback key types of a device (cached for sync).
pub async fn key_counts(
    state: &AppState,
    user: &str,
    device: &str,
) -> ApiResult<Arc<(HashMap<String, i64>, Vec<String>)>> {
    if let Some(c) = state.sync.key_counts(user, device) {
        return Ok(c);
    }
    let counts = storage::e2ee::one_time_key_counts(&state.db, user, device).await?;
    let fallback = storage::e2ee::unused_fallback_types(&state.db, user, device).await?;
    let c = Arc::new((counts, fallback));
    state.sync.put_key_counts(user, device, c.clone());
    Ok(c)
}

/// Most users of one `keys/query` or `keys/claim` request from another server.
pub const MAX_FEDERATION_USERS: usize = 5_000;

/// The user → device list map of a `keys/query` body: `None` for "every device" (an empty list).
pub type Wanted = Vec<(String, Option<HashSet<String>>)>;

fn parse_query(body: &Value) -> ApiResult<Wanted> {
    let wanted = body["device_keys"].as_object().ok_or_else(|| bad("device_keys must be an object"))?;
    let mut out = Vec::with_capacity(wanted.len());
    for (user, devices) in wanted {
        if user_server(user).is_none() {
            return Err(Error::invalid_param(format!("Invalid user ID {user}")));
        }
        let list: Option<HashSet<String>> = match devices.as_array() {
            Some(a) if !a.is_empty() => Some(a.iter().filter_map(|d| d.as_str().map(str::to_owned)).collect()),
            Some(_) | None if devices.is_array() || devices.is_null() => None,
            _ => return Err(bad("device_keys values must be lists of device IDs")),
        };
        out.push((user.clone(), list));
    }
    Ok(out)
}

/// Keys of local users, as `keys/query` answers them.
#[derive(Default)]
pub struct KeysAnswer {
    pub device_keys: Map<String, Value>,
    pub master: Map<String, Value>,
    pub self_signing: Map<String, Value>,
    pub user_signing: Map<String, Value>,
}

/// The keys of local users: device keys (with `unsigned.device_display_name` when
/// `include_names`), master and self-signing keys; for `requester` (a local user; `None` for
/// another server) also their own user-signing key and the signatures they made on others'
/// master keys.
pub async fn local_keys(
    state: &AppState,
    requester: Option<&str>,
    wanted: &Wanted,
    include_names: bool,
) -> ApiResult<KeysAnswer> {
    let local: Vec<String> = wanted.iter().map(|(u, _)| u.clone()).collect();
    let devices_wanted: HashMap<&str, &Option<HashSet<String>>> = wanted.iter().map(|(u, d)| (u.as_str(), d)).collect();
    let mut out = KeysAnswer::default();
    for user in &local {
        out.device_keys.insert(user.clone(), json!({}));
    }
    for d in storage::e2ee::query_device_keys(&state.db, &local).await? {
        if let Some(Some(only)) = devices_wanted.get(d.user_id.as_str())
            && !only.contains(&d.device_id)
        {
            continue;
        }
        let mut keys = d.keys;
        if let Some(name) = d.display_name.filter(|_| include_names) {
            keys["unsigned"] = json!({ "device_display_name": name });
        }
        out.device_keys.entry(d.user_id.clone()).or_insert_with(|| json!({}))[&d.device_id] = keys;
    }
    for (user, kind, key) in storage::e2ee::cross_signing_keys(&state.db, &local).await? {
        match kind.as_str() {
            "master" => {
                out.master.insert(user, key);
            }
            "self_signing" => {
                out.self_signing.insert(user, key);
            }
            "user_signing" if Some(user.as_str()) == requester => {
                out.user_signing.insert(user, key);
            }
            _ => {}
        }
    }
    if let Some(requester) = requester {
        // Signatures the requester made on others' master keys (only they see them).
        for (target, target_key, signer_key, sig) in
            storage::e2ee::cross_user_signatures_by(&state.db, requester, &local).await?
        {
            if let Some(key) = out.master.get_mut(&target)
                && key["keys"].get(&target_key).is_some()
            {
                key["signatures"][requester][signer_key] = json!(sig);
            }
        }
    }
    Ok(out)
}

/// `POST /keys/query`: device and cross-signing keys of the requested users; those of other
/// servers asked of them (`federation::e2ee`), servers that fail listed in `failures`.
pub async fn query_keys(state: &AppState, requester: &str, body: &Value) -> ApiResult<Value> {
    let (local, remote): (Wanted, Wanted) = parse_query(body)?.into_iter().partition(|(u, _)| is_local(state, u));
    let timeout = crate::federation::e2ee::request_timeout(body)?;
    let (mine, theirs) = tokio::join!(
        local_keys(state, Some(requester), &local, true),
        crate::federation::e2ee::query_remote(state, remote, timeout)
    );
    let mut out = mine?;
    let (remote, failures) = theirs;
    out.device_keys.extend(remote.device_keys);
    out.master.extend(remote.master);
    out.self_signing.extend(remote.self_signing);
    Ok(json!({
        "device_keys": out.device_keys,
        "master_keys": out.master,
        "self_signing_keys": out.self_signing,
        "user_signing_keys": out.user_signing,
        "failures": failures,
    }))
}

/// `POST /_matrix/federation/v1/user/keys/query` from another server: keys of local users
/// (display names only with `federation.allow_device_name_lookup`); 400 `M_INVALID_PARAM` for a
/// user of another server.
pub async fn federation_query_keys(state: &AppState, body: &Value) -> ApiResult<Value> {
    let wanted = parse_query(body)?;
    if wanted.len() > MAX_FEDERATION_USERS {
        return Err(Error::invalid_param(format!("At most {MAX_FEDERATION_USERS} users per request")));
    }
    if let Some((user, _)) = wanted.iter().find(|(u, _)| !is_local(state, u)) {
        return Err(Error::invalid_param(format!("{user} is not a user of this server")));
    }
    let out = local_keys(state, None, &wanted, state.config.federation.allow_device_name_lookup).await?;
    Ok(json!({
        "device_keys": out.device_keys,
        "master_keys": out.master,
        "self_signing_keys": out.self_signing,
    }))
}

/// `GET /_matrix/federation/v1/user/devices/{userId}`: a local user's devices with keys, the
/// version of that list (`stream_id`, the user's latest device-list position) and their master
/// and self-signing keys.
pub async fn federation_user_devices(state: &AppState, user: &str) -> ApiResult<Value> {
    if user_server(user).is_none() {
        return Err(Error::invalid_param("Invalid user ID"));
    }
    if !is_local(state, user) {
        return Err(Error::invalid_param(format!("{user} is not a user of this server")));
    }
    let include_names = state.config.federation.allow_device_name_lookup;
    let users = [user.to_owned()];
    let stream_id = storage::e2ee::user_device_list_position(&state.db, user).await?;
    let mut devices = Vec::new();
    for d in storage::e2ee::query_device_keys(&state.db, &users).await? {
        let mut dev = json!({ "device_id": d.device_id, "keys": d.keys });
        if let Some(name) = d.display_name.filter(|_| include_names) {
            dev["device_display_name"] = json!(name);
        }
        devices.push(dev);
    }
    let mut out = json!({ "user_id": user, "stream_id": stream_id, "devices": devices });
    for (_, kind, key) in storage::e2ee::cross_signing_keys(&state.db, &users).await? {
        match kind.as_str() {
            "master" => out["master_key"] = key,
            "self_signing" => out["self_signing_key"] = key,
            _ => {}
        }
    }
    Ok(out)
}

/// `(user, device, algorithm)` requests of a `keys/claim` body.
fn parse_claim(body: &Value) -> ApiResult<Vec<(String, String, String)>> {
    let wanted = body["one_time_keys"].as_object().ok_or_else(|| bad("one_time_keys must be an object"))?;
    let mut requests = Vec::new();
    for (user, devices) in wanted {
        if user_server(user).is_none() {
            return Err(Error::invalid_param(format!("Invalid user ID {user}")));
        }
        let devices = devices.as_object().ok_or_else(|| bad("one_time_keys values must be objects"))?;
        for (device, alg) in devices {
            let alg = alg.as_str().ok_or_else(|| bad("algorithms must be strings"))?;
            requests.push((user.clone(), device.clone(), alg.to_owned()));
        }
    }
    Ok(requests)
}

/// Claims one one-time key per local `(user, device, algorithm)` (its fallback key when none
/// is left): `{user: {device: {"alg:key_id": key}}}`.
pub async fn claim_local(
    state: &AppState,
    requests: &[(String, String, String)],
) -> ApiResult<BTreeMap<String, Map<String, Value>>> {
    let mut out: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    if requests.is_empty() {
        return Ok(out);
    }
    let mut tx = state.db.begin().await?;
    let claimed = storage::e2ee::claim_one_time_keys(&mut tx, requests).await?;
    let got: HashSet<(String, String, String)> =
        claimed.iter().map(|(u, d, a, _, _)| (u.clone(), d.clone(), a.clone())).collect();
    let missing: Vec<(String, String, String)> = requests.iter().filter(|r| !got.contains(r)).cloned().collect();
    let fallback = storage::e2ee::claim_fallback_keys(&mut tx, &missing).await?;
    tx.commit().await?;
    for (u, d, a, k, v) in claimed.into_iter().chain(fallback) {
        crate::cluster::key_counts_changed(state, &u, Some(&d));
        let dev = out.entry(u).or_default().entry(d).or_insert_with(|| json!({}));
        dev[format!("{a}:{k}")] = v;
    }
    Ok(out)
}

/// `POST /keys/claim`: one one-time key per requested device (its fallback key when none left);
/// keys of other servers' users claimed from them (`federation::e2ee`).
pub async fn claim_keys(state: &AppState, body: &Value) -> ApiResult<Value> {
    let (local, remote): (Vec<_>, Vec<_>) = parse_claim(body)?.into_iter().partition(|(u, _, _)| is_local(state, u));
    let timeout = crate::federation::e2ee::request_timeout(body)?;
    let (mine, theirs) =
        tokio::join!(claim_local(state, &local), crate::federation::e2ee::claim_remote(state, remote, timeout));
    let mut out = mine?;
    let (remote, failures) = theirs;
    out.extend(remote);
    Ok(json!({ "one_time_keys": out, "failures": failures }))
}

/// `POST /_matrix/federation/v1/user/keys/claim` from another server: local users only (400
/// `M_INVALID_PARAM` otherwise).
pub async fn federation_claim_keys(state: &AppState, body: &Value) -> ApiResult<Value> {
    let requests = parse_claim(body)?;
    if requests.len() > MAX_FEDERATION_USERS {
        return Err(Error::invalid_param(format!("At most {MAX_FEDERATION_USERS} devices per request")));
    }
    if let Some((user, _, _)) = requests.iter().find(|(u, _, _)| !is_local(state, u)) {
        return Err(Error::invalid_param(format!("{user} is not a user of this server")));
    }
    Ok(json!({ "one_time_keys": claim_local(state, &requests).await? }))
}

/// A checked `keys/device_signing/upload`: the keys it would store (every signature in them
/// verified) and whether it needs user-interactive auth.
#[derive(Debug)]
pub struct SigningUpload {
    to_store: Vec<(&'static str, Value)>,
    /// The spec lets a server skip UIA when the user has no master key yet, or when the upload
    /// changes nothing. Anything else (another key, or signatures not stored yet) needs it.
    pub needs_auth: bool,
}

/// Checks a `keys/device_signing/upload` body before anything is stored (and before UIA).
/// Self-signing and user-signing keys must be signed by the master key; every signature in an
/// uploaded key must be the user's own and verify (by the master key, or by one of the user's
/// devices): an unverifiable signature is refused (`M_INVALID_SIGNATURE`), never stored.
pub async fn prepare_signing_upload(state: &AppState, user: &str, body: &Value) -> ApiResult<SigningUpload> {
    let current: HashMap<String, Value> = storage::e2ee::cross_signing_keys(&state.db, &[user.to_owned()])
        .await?
        .into_iter()
        .map(|(_, k, v)| (k, v))
        .collect();
    let new_master = body.get("master_key").filter(|v| !v.is_null());
    if let Some(m) = new_master {
        check_cross_signing_key(m, user, "master")?;
    }
    let master =
        new_master.or_else(|| current.get("master")).ok_or_else(|| bad("master_key is required for a first upload"))?;
    let (master_id, master_pk) = single_key(master)?;
    let mut to_store = Vec::new();
    if let Some(m) = new_master {
        verify_own_signatures(state, m, user, &master_id, &master_pk, "master_key").await?;
        to_store.push(("master", m.clone()));
    }
    for (field, kind) in [("self_signing_key", "self_signing"), ("user_signing_key", "user_signing")] {
        if let Some(k) = body.get(field).filter(|v| !v.is_null()) {
            check_cross_signing_key(k, user, kind)?;
            if !verify(k, user, &master_id, &master_pk) {
                return Err(Error::invalid_signature(format!("{field} is not signed by the master key")));
            }
            verify_own_signatures(state, k, user, &master_id, &master_pk, field).await?;
            to_store.push((kind, k.clone()));
        }
    }
    // A key already stored with at least these signatures changes nothing; the same key with new
    // signatures keeps the ones already stored (they were verified too).
    to_store.retain(|(kind, k)| !current.get(*kind).is_some_and(|c| covers(c, k)));
    for (kind, k) in &mut to_store {
        if let Some(stored) = current.get(*kind)
            && signed_bytes(stored) == signed_bytes(k)
        {
            *k = merge_signatures(stored, k);
        }
    }
    let needs_auth = current.contains_key("master") && !to_store.is_empty();
    Ok(SigningUpload { to_store, needs_auth })
}

/// Stores a checked upload (after UIA when it needed it).
pub async fn store_signing_upload(state: &AppState, user: &str, upload: SigningUpload) -> ApiResult<()> {
    if upload.to_store.is_empty() {
        return Ok(());
    }
    let mut tx = state.db.begin().await?;
    for (kind, key) in &upload.to_store {
        storage::e2ee::set_cross_signing_key(&mut tx, user, kind, key).await?;
    }
    let pos = record_device_list_change(&mut tx, user).await?;
    tx.commit().await?;
    device_list_committed(state, user, pos);
    Ok(())
}

/// Whether `stored` is the same key as `uploaded` and already carries every signature of it.
fn covers(stored: &Value, uploaded: &Value) -> bool {
    if signed_bytes(stored) != signed_bytes(uploaded) {
        return false;
    }
    let Some(sigs) = uploaded.get("signatures").and_then(Value::as_object) else { return true };
    sigs.iter().all(|(signer, by_key)| {
        by_key.as_object().is_some_and(|m| m.iter().all(|(key_id, sig)| stored["signatures"][signer][key_id] == *sig))
    })
}

/// `uploaded` with the signatures of `stored` it lacks.
fn merge_signatures(stored: &Value, uploaded: &Value) -> Value {
    let mut out = uploaded.clone();
    if let Some(sigs) = stored.get("signatures").and_then(Value::as_object) {
        for (signer, by_key) in sigs {
            for (key_id, sig) in by_key.as_object().into_iter().flatten() {
                if out["signatures"][signer].get(key_id).is_none() {
                    out["signatures"][signer][key_id] = sig.clone();
                }
            }
        }
    }
    out
}

/// Verifies every signature of an uploaded cross-signing key: each must be the user's own, by
/// the master key (`master_id`) or by one of the user's devices (`ed25519:<device ID>`).
async fn verify_own_signatures(
    state: &AppState,
    key: &Value,
    user: &str,
    master_id: &str,
    master_pk: &str,
    field: &str,
) -> ApiResult<()> {
    let Some(sigs) = key.get("signatures").filter(|v| !v.is_null()) else { return Ok(()) };
    let sigs = sigs.as_object().ok_or_else(|| bad(format!("{field}.signatures must be an object")))?;
    for (signer, by_key) in sigs {
        if signer != user {
            return Err(Error::invalid_signature(format!(
                "{field}: signatures by other users cannot be uploaded here (use keys/signatures/upload)"
            )));
        }
        let by_key = by_key.as_object().ok_or_else(|| bad(format!("{field}.signatures values must be objects")))?;
        for key_id in by_key.keys() {
            let ok = if key_id == master_id {
                verify(key, user, key_id, master_pk)
            } else if let Some(device) = key_id.strip_prefix("ed25519:") {
                match storage::e2ee::device_keys(&state.db, user, device).await? {
                    Some(dk) => dk["keys"][key_id].as_str().is_some_and(|pk| verify(key, user, key_id, pk)),
                    None => false,
                }
            } else {
                false
            };
            if !ok {
                return Err(Error::invalid_signature(format!("{field}: the signature by {key_id} does not verify")));
            }
        }
    }
    Ok(())
}

fn check_cross_signing_key(k: &Value, user: &str, usage: &str) -> ApiResult<()> {
    if k["user_id"] != user {
        return Err(bad(format!("{usage} key: user_id is not the authenticated user")));
    }
    if !k["usage"].as_array().is_some_and(|u| u.iter().any(|x| x == usage)) {
        return Err(bad(format!("{usage} key: usage must include {usage}")));
    }
    single_key(k)?;
    Ok(())
}

/// A cross-signing key's only key: (`ed25519:<pk>`, public key).
fn single_key(k: &Value) -> ApiResult<(String, String)> {
    let keys = k["keys"].as_object().ok_or_else(|| bad("cross-signing key lacks keys"))?;
    if keys.len() != 1 {
        return Err(bad("a cross-signing key has exactly one key"));
    }
    let (id, pk) = keys.iter().next().ok_or_else(|| bad("cross-signing key lacks keys"))?;
    let pk = pk.as_str().ok_or_else(|| bad("cross-signing public key must be a string"))?;
    if !id.starts_with("ed25519:") {
        return Err(bad("cross-signing keys are ed25519 keys"));
    }
    Ok((id.clone(), pk.to_owned()))
}

/// `POST /keys/signatures/upload`: signatures of the user's own devices and master key (with
/// the self-signing key, or a device key), and of other users' master keys (with the
/// user-signing key). Each signature is verified; failures are reported per key.
pub async fn upload_signatures(state: &AppState, user: &str, body: &Value) -> ApiResult<Value> {
    let body = body.as_object().ok_or_else(|| bad("body must be an object"))?;
    let mut failures: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let fail = |f: &mut BTreeMap<String, Map<String, Value>>, u: &str, k: &str, code: &str, msg: &str| {
        f.entry(u.to_owned()).or_default().insert(k.to_owned(), json!({ "errcode": code, "error": msg }));
    };
    let mine: HashMap<String, Value> = storage::e2ee::cross_signing_keys(&state.db, &[user.to_owned()])
        .await?
        .into_iter()
        .map(|(_, k, v)| (k, v))
        .collect();
    let mut tx = state.db.begin().await?;
    let mut changed_users: HashSet<String> = HashSet::new();
    for (target_user, keys) in body {
        let Some(keys) = keys.as_object() else {
            fail(&mut failures, target_user, "", "M_BAD_JSON", "expected an object of keys");
            continue;
        };
        let target_cs: HashMap<String, Value> = if target_user == user {
            mine.clone()
        } else {
            storage::e2ee::cross_signing_keys(&mut *tx, std::slice::from_ref(target_user))
                .await?
                .into_iter()
                .map(|(_, k, v)| (k, v))
                .collect()
        };
        for (key_id, signed) in keys {
            let sigs = signed["signatures"][user].as_object().cloned().unwrap_or_default();
            if sigs.is_empty() {
                fail(&mut failures, target_user, key_id, "M_INVALID_SIGNATURE", "no signature by the uploader");
                continue;
            }
            if target_user == user {
                // Own device (signed by the self-signing key) or own master key (signed by a device).
                let device_keys = storage::e2ee::device_keys(&mut *tx, user, key_id).await?;
                if let Some(stored) = device_keys {
                    let Some((ss_id, ss_pk)) = mine.get("self_signing").and_then(|k| single_key(k).ok()) else {
                        fail(&mut failures, user, key_id, "M_MISSING_SIGNING_KEY", "no self-signing key");
                        continue;
                    };
                    if signed_bytes(&stored) != signed_bytes(signed) {
                        fail(
                            &mut failures,
                            user,
                            key_id,
                            "M_INVALID_SIGNATURE",
                            "signed object differs from the stored keys",
                        );
                        continue;
                    }
                    match sigs.get(&ss_id).and_then(Value::as_str) {
                        Some(sig) if verify(signed, user, &ss_id, &ss_pk) => {
                            storage::e2ee::sign_device_keys(&mut tx, user, key_id, user, &ss_id, sig).await?;
                            changed_users.insert(user.to_owned());
                        }
                        _ => fail(&mut failures, user, key_id, "M_INVALID_SIGNATURE", "invalid self-signing signature"),
                    }
                    continue;
                }
                let master = mine
                    .get("master")
                    .filter(|m| single_key(m).is_ok_and(|(id, _)| id.ends_with(&format!(":{key_id}"))));
                let Some(master) = master else {
                    fail(&mut failures, user, key_id, "M_NOT_FOUND", "unknown device or key");
                    continue;
                };
                if signed_bytes(master) != signed_bytes(signed) {
                    fail(
                        &mut failures,
                        user,
                        key_id,
                        "M_INVALID_SIGNATURE",
                        "signed object differs from the master key",
                    );
                    continue;
                }
                // Signed by one of the user's devices.
                let mut ok = false;
                for (sig_key_id, sig) in &sigs {
                    let Some(dev) = sig_key_id.strip_prefix("ed25519:") else { continue };
                    let Some(dk) = storage::e2ee::device_keys(&mut *tx, user, dev).await? else { continue };
                    let Some(pk) = dk["keys"][sig_key_id].as_str() else { continue };
                    if verify(signed, user, sig_key_id, pk)
                        && let Some(sig) = sig.as_str()
                    {
                        storage::e2ee::sign_cross_signing_key(&mut tx, user, "master", user, sig_key_id, sig).await?;
                        ok = true;
                    }
                }
                if ok {
                    changed_users.insert(user.to_owned());
                } else {
                    fail(&mut failures, user, key_id, "M_INVALID_SIGNATURE", "no valid device signature");
                }
            } else {
                // Another user's master key, signed with our user-signing key.
                let Some((us_id, us_pk)) = mine.get("user_signing").and_then(|k| single_key(k).ok()) else {
                    fail(&mut failures, target_user, key_id, "M_MISSING_SIGNING_KEY", "no user-signing key");
                    continue;
                };
                let Some(master) = target_cs.get("master") else {
                    fail(&mut failures, target_user, key_id, "M_NOT_FOUND", "this user has no master key");
                    continue;
                };
                let Ok((master_id, _)) = single_key(master) else { continue };
                if !master_id.ends_with(&format!(":{key_id}")) || signed_bytes(master) != signed_bytes(signed) {
                    fail(
                        &mut failures,
                        target_user,
                        key_id,
                        "M_INVALID_SIGNATURE",
                        "signed object differs from the master key",
                    );
                    continue;
                }
                match sigs.get(&us_id).and_then(Value::as_str) {
                    Some(sig) if verify(signed, user, &us_id, &us_pk) => {
                        storage::e2ee::insert_cross_user_signature(&mut tx, user, &us_id, target_user, &master_id, sig)
                            .await?;
                        // Only the signer sees it: their own device list "changes" for them.
                        changed_users.insert(user.to_owned());
                    }
                    _ => fail(
                        &mut failures,
                        target_user,
                        key_id,
                        "M_INVALID_SIGNATURE",
                        "invalid user-signing signature",
                    ),
                }
            }
        }
    }
    let mut positions = Vec::new();
    for u in &changed_users {
        positions.push((u.clone(), record_device_list_change(&mut tx, u).await?));
    }
    tx.commit().await?;
    for (u, pos) in positions {
        device_list_committed(state, &u, pos);
    }
    Ok(json!({ "failures": failures }))
}

/// `PUT /sendToDevice/{eventType}/{txnId}`.
pub async fn send_to_device(
    state: &AppState,
    sender: &str,
    sender_device: &str,
    event_type: &str,
    txn_id: &str,
    body: &Value,
) -> ApiResult<()> {
    let messages = body["messages"].as_object().ok_or_else(|| bad("messages must be an object"))?;
    let mut rows: Vec<(String, String, Value)> = Vec::new();
    // Messages for users of other servers, by server (sent as `m.direct_to_device` EDUs).
    let mut remote: std::collections::BTreeMap<String, serde_json::Map<String, Value>> = Default::default();
    let mut tx = state.db.begin().await?;
    if !storage::e2ee::to_device_txn(&mut tx, sender, sender_device, txn_id).await? {
        // A retry of a transaction already queued.
        return Ok(());
    }
    for (user, devices) in messages {
        let devices = devices.as_object().ok_or_else(|| bad("messages values must be objects"))?;
        let Ok(uid) = <&ruma::UserId>::try_from(user.as_str()) else {
            return Err(Error::invalid_param(format!("Invalid user ID {user}")));
        };
        if !is_local(state, user) {
            if devices.values().any(|c| !c.is_object()) {
                return Err(bad("to-device message content must be an object"));
            }
            if state.federation.enabled && state.federation.is_allowed(uid.server_name()) {
                remote
                    .entry(uid.server_name().to_string())
                    .or_default()
                    .insert(user.clone(), Value::Object(devices.clone()));
            }
            continue;
        }
        for (device, content) in devices {
            if !content.is_object() {
                return Err(bad("to-device message content must be an object"));
            }
            if device == "*" {
                for d in storage::e2ee::device_ids(&mut *tx, user).await? {
                    rows.push((user.clone(), d, content.clone()));
                }
            } else {
                rows.push((user.clone(), device.clone(), content.clone()));
            }
        }
    }
    let pos = storage::e2ee::insert_to_device(&mut tx, sender, event_type, &rows).await?;
    // Queued in the same transaction as the transaction ID: a retried request sends nothing twice.
    for (server, messages) in &remote {
        let edu = json!({ "edu_type": "m.direct_to_device", "content": {
            "sender": sender,
            "type": event_type,
            "message_id": format!("{sender_device}-{txn_id}"),
            "messages": messages,
        }});
        storage::remote::enqueue_edu(&mut *tx, std::slice::from_ref(server), &edu).await?;
    }
    tx.commit().await?;
    let servers: Vec<String> = remote.into_keys().collect();
    state.federation.sender.wake_all(&servers);
    crate::appservice::sender::to_device_sent(state, sender, event_type, &rows);
    if pos > 0 {
        crate::cluster::advance(state, &state.to_device_stream, pos);
        let users: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        for u in users {
            state.sync.to_device_heads.raise(&u.to_owned(), pos);
            state.sync.wake_user(u);
        }
    }
    Ok(())
}

/// `GET /keys/changes`: users whose keys changed between two sync tokens, among those the user
/// shares a room with; and users who left a room shared with the user in that range and share
/// none any more.
pub async fn key_changes(
    state: &AppState,
    user: &str,
    from: &crate::sync::token::SyncToken,
    to: &crate::sync::token::SyncToken,
) -> ApiResult<(Vec<String>, Vec<String>)> {
    let changed = storage::e2ee::device_list_changes_between(&state.db, from.device_lists, to.device_lists).await?;
    let shared = co_members(state, user).await?;
    let mut out: Vec<String> = changed.into_iter().filter(|u| u == user || shared.contains(u)).collect();
    out.sort();
    let mut left: Vec<String> = storage::e2ee::departures_between(&state.db, user, from.events, to.events)
        .await?
        .into_iter()
        .filter(|u| u != user && !shared.contains(u))
        .collect();
    left.sort();
    Ok((out, left))
}

/// Everyone the user shares a joined room with (themselves included).
pub async fn co_members(state: &AppState, user: &str) -> ApiResult<HashSet<String>> {
    let rooms = state.sync.user_rooms(state, user).await?;
    let joined: Vec<(String, i64)> = rooms
        .read()
        .rooms
        .values()
        .filter(|m| m.membership == "join")
        .map(|m| (m.room_id.clone(), m.room_nid))
        .collect();
    let mut out = HashSet::new();
    out.insert(user.to_owned());
    for (room_id, _) in joined {
        let room = crate::rooms::Room::load(state, &room_id).await?;
        let entry = state.sync.room(state, &room).await?;
        let e = entry.read();
        out.extend(crate::sync::cache::RoomEntry::members_of(&e.state, "join").map(str::to_owned));
    }
    Ok(out)
}

/// To-device messages from a user of another server (an `m.direct_to_device` EDU) for local
/// users' devices (`*`: all of them). Messages for users of other servers are ignored.
pub async fn receive_to_device(
    state: &AppState,
    sender: &str,
    event_type: &str,
    messages: &serde_json::Map<String, Value>,
) -> ApiResult<()> {
    let mut rows: Vec<(String, String, Value)> = Vec::new();
    let mut tx = state.db.begin().await?;
    for (user, devices) in messages.iter().take(1000) {
        if !is_local(state, user) {
            continue;
        }
        let Some(devices) = devices.as_object() else { continue };
        for (device, content) in devices.iter().take(1000) {
            if !content.is_object() {
                continue;
            }
            if device == "*" {
                for d in storage::e2ee::device_ids(&mut *tx, user).await? {
                    rows.push((user.clone(), d, content.clone()));
                }
            } else {
                rows.push((user.clone(), device.clone(), content.clone()));
            }
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    let pos = storage::e2ee::insert_to_device(&mut tx, sender, event_type, &rows).await?;
    tx.commit().await?;
    if pos > 0 {
        crate::cluster::advance(state, &state.to_device_stream, pos);
        let users: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        for u in users {
            state.sync.to_device_heads.raise(&u.to_owned(), pos);
            state.sync.wake_user(u);
        }
    }
    Ok(())
}

/// A remote user's devices changed (an `m.device_list_update` EDU): local users sharing a room
/// with them see the user in their sync's `device_lists.changed` and query the keys again.
pub async fn remote_devices_changed(state: &AppState, user: &str) -> ApiResult<()> {
    let mut tx = state.db.begin().await?;
    let pos = record_device_list_change(&mut tx, user).await?;
    tx.commit().await?;
    state.sync.device_list_heads.raise(&user.to_owned(), pos);
    crate::cluster::advance(state, &state.device_list_stream, pos);
    device_list_woken(state, user);
    Ok(())
}
