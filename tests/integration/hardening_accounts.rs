//! Issue 11, accounts part: regression tests over HTTP for aliases, deactivation, room
//! summaries, cross-signing signatures, UIA bound to its request, `account/3pid`, media ranges
//! past `u64`, server names with ports in `keys/query`, duplicate annotations; and property
//! tests for the user-ID parsing `keys/query` relies on.

use ed25519_dalek::{Signer, SigningKey};
use proptest::prelude::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

// ---- helpers ------------------------------------------------------------------------------

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn public(k: &SigningKey) -> String {
    b64(k.verifying_key().as_bytes())
}

/// Signs `obj` (canonical JSON without `signatures`/`unsigned`) as `signer` with `key_id`.
fn sign(obj: &mut Value, signer: &str, key_id: &str, k: &SigningKey) {
    let mut bare = obj.as_object().unwrap().clone();
    bare.remove("signatures");
    bare.remove("unsigned");
    let canonical = ruma::CanonicalJsonValue::try_from(Value::Object(bare)).unwrap();
    let sig = k.sign(serde_json::to_string(&canonical).unwrap().as_bytes());
    obj["signatures"][signer][key_id] = json!(b64(&sig.to_bytes()));
}

fn device_keys(u: &User, k: &SigningKey) -> Value {
    let mut dk = json!({
        "user_id": u.user_id, "device_id": u.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{}", u.device_id): b64(&[7u8; 32]),
            format!("ed25519:{}", u.device_id): public(k),
        }
    });
    sign(&mut dk, &u.user_id, &format!("ed25519:{}", u.device_id), k);
    dk
}

fn cross_key(u: &User, usage: &str, k: &SigningKey) -> Value {
    json!({ "user_id": u.user_id, "usage": [usage], "keys": { format!("ed25519:{}", public(k)): public(k) } })
}

fn password_auth(session: &Value, user: &str, password: &str) -> Value {
    json!({
        "type": "m.login.password", "session": session, "password": password,
        "identifier": { "type": "m.id.user", "user": user },
    })
}

async fn join(s: &TestServer, u: &User, room: &str) {
    let (st, v) = s.post(&format!("/_matrix/client/v3/join/{}", enc(room)), Some(&u.token), json!({})).await;
    assert_eq!(st, 200, "{v}");
}

async fn invite(s: &TestServer, by: &User, room: &str, who: &User) {
    let (st, v) = s
        .post(&format!("/_matrix/client/v3/rooms/{}/invite", enc(room)), Some(&by.token), json!({ "user_id": who.user_id }))
        .await;
    assert_eq!(st, 200, "{v}");
}

/// The membership of `who` in `room`, as `by` (a member) reads it from the room's state.
async fn membership_of(s: &TestServer, by: &User, room: &str, who: &User) -> Value {
    let (st, v) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(room), enc(&who.user_id)),
            Some(&by.token),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    v["membership"].clone()
}

async fn send(s: &TestServer, u: &User, room: &str, kind: &str, txn: &str, content: Value) -> (StatusCode, Value) {
    s.put(&format!("/_matrix/client/v3/rooms/{}/send/{kind}/{txn}", enc(room)), Some(&u.token), content).await
}

async fn query_keys(s: &TestServer, u: &User, who: &str) -> Value {
    let (st, q) =
        s.post("/_matrix/client/v3/keys/query", Some(&u.token), json!({ "device_keys": { who: [] } })).await;
    assert_eq!(st, 200, "{q}");
    q
}

// ---- 11. UIA bound to its request --------------------------------------------------------

#[tokio::test]
async fn uia_session_is_bound_to_its_request() {
    let s = TestServer::start().await;
    let me = s.register("ui_jeanne", false).await;
    let (_, d2) = s.login("ui_jeanne", PASSWORD, json!({})).await;
    let d2 = user_from(&d2);
    let (_, d3) = s.login("ui_jeanne", PASSWORD, json!({})).await;
    let d3 = user_from(&d3);
    let device_exists = |id: String| {
        let (s, token) = (&s, me.token.clone());
        async move { s.get(&format!("/_matrix/client/v3/devices/{id}"), Some(&token)).await.0 == 200 }
    };

    // A session started to delete d2 cannot delete d3.
    let path = "/_matrix/client/v3/delete_devices";
    let (st, ch) = s.post(path, Some(&me.token), json!({ "devices": [d2.device_id] })).await;
    assert_eq!(st, 401);
    let auth = password_auth(&ch["session"], "ui_jeanne", PASSWORD);
    let swapped = s.post(path, Some(&me.token), json!({ "devices": [d3.device_id], "auth": auth })).await;
    assert_err(&swapped, 403, "M_FORBIDDEN");
    assert!(device_exists(d3.device_id.clone()).await && device_exists(d2.device_id.clone()).await);
    // Nor through another endpoint's path.
    let other_path = s
        .delete(&format!("/_matrix/client/v3/devices/{}", d3.device_id), Some(&me.token), json!({ "auth": auth }))
        .await;
    assert_err(&other_path, 403, "M_FORBIDDEN");
    assert!(device_exists(d3.device_id.clone()).await);
    // The request it was started for completes (key order in the body does not matter).
    let (st, v) = s.post(path, Some(&me.token), json!({ "auth": auth, "devices": [d2.device_id] })).await;
    assert_eq!(st, 200, "{v}");
    assert!(!device_exists(d2.device_id.clone()).await && device_exists(d3.device_id.clone()).await);

    // DELETE /devices/{id}: the path is bound too.
    let (st, ch) = s.delete(&format!("/_matrix/client/v3/devices/{}", d3.device_id), Some(&me.token), json!({})).await;
    assert_eq!(st, 401);
    let auth = password_auth(&ch["session"], "ui_jeanne", PASSWORD);
    assert_err(
        &s.delete(&format!("/_matrix/client/v3/devices/{}", me.device_id), Some(&me.token), json!({ "auth": auth }))
            .await,
        403,
        "M_FORBIDDEN",
    );
    assert_eq!(s.get("/_matrix/client/v3/account/whoami", Some(&me.token)).await.0, 200);
    s.stop().await;
}
