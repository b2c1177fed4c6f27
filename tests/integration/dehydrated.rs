//! Dehydrated devices (MSC3814) over HTTP with real ed25519 signatures, and end to end with the
//! matrix-rust-sdk crypto machine (`sdk_rehydration_decrypts_what_was_sent_while_offline`).

use ed25519_dalek::SigningKey;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;
use crate::e2ee::{b64, key, public, sign};
use crate::sync::sync;

const BASE: &str = "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device";

/// A device ID as MSC3814 wants it (the Curve25519 key in unpadded base64), with the `/` and `+`
/// that make it awkward in a path.
const DEVICE_A: &str = "a/b+cDehydratedDeviceIdentityKeyAAAAAAAAAAA";
const DEVICE_B: &str = "Zz+9/DehydratedDeviceIdentityKeyBBBBBBBBBBB";

fn events_path(device_id: &str) -> String {
    format!("{BASE}/{}/events", enc(device_id))
}

/// Device keys of `device_id` for `u`, self-signed with `k`; `dehydrated` as MSC3814 says.
fn keys_of(u: &User, device_id: &str, k: &SigningKey, dehydrated: Option<Value>) -> Value {
    let mut dk = json!({
        "user_id": u.user_id, "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device_id}"): b64(&[5u8; 32]),
            format!("ed25519:{device_id}"): public(k),
        }
    });
    if let Some(d) = dehydrated {
        dk["dehydrated"] = d;
    }
    sign(&mut dk, &u.user_id, &format!("ed25519:{device_id}"), k);
    dk
}

fn signed_key(u: &User, device_id: &str, k: &SigningKey, n: u8, fallback: bool) -> Value {
    let mut o = json!({ "key": b64(&[n; 32]) });
    if fallback {
        o["fallback"] = json!(true);
    }
    sign(&mut o, &u.user_id, &format!("ed25519:{device_id}"), k);
    o
}

/// A valid `PUT /dehydrated_device` body: two one-time keys and a fallback key.
fn put_body(u: &User, device_id: &str, k: &SigningKey) -> Value {
    json!({
        "device_id": device_id,
        "device_data": { "algorithm": "org.matrix.msc3814.v2", "device_pickle": "cGlja2xl", "nonce": "bm9uY2U" },
        "initial_device_display_name": "Dehydrated device",
        "device_keys": keys_of(u, device_id, k, Some(json!(true))),
        "one_time_keys": {
            "signed_curve25519:AAAAAQ": signed_key(u, device_id, k, 1, false),
            "signed_curve25519:AAAAAg": signed_key(u, device_id, k, 2, false),
        },
        "fallback_keys": { "signed_curve25519:AAAAAw": signed_key(u, device_id, k, 3, true) },
    })
}

async fn query(s: &TestServer, asker: &User, target: &User) -> Value {
    let (st, q) = s
        .post("/_matrix/client/v3/keys/query", Some(&asker.token), json!({ "device_keys": { &target.user_id: [] } }))
        .await;
    assert_eq!(st, 200, "{q}");
    q["device_keys"][&target.user_id].clone()
}

async fn send_to_device(s: &TestServer, from: &User, txn: &str, messages: Value) {
    let (st, v) = s
        .put(
            &format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/{txn}"),
            Some(&from.token),
            json!({ "messages": messages }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
}

async fn events(s: &TestServer, u: &User, device_id: &str, next_batch: Option<&str>, limit: Option<u32>) -> Value {
    let mut path = events_path(device_id);
    if let Some(l) = limit {
        path.push_str(&format!("?limit={l}"));
    }
    let body = match next_batch {
        Some(t) => json!({ "next_batch": t }),
        None => json!({}),
    };
    let (st, v) = s.post(&path, Some(&u.token), body).await;
    assert_eq!(st, 200, "{v}");
    v
}

/// Every message queued for the device, page by page as matrix-rust-sdk reads them (`POST`,
/// until an empty page).
async fn all_events(s: &TestServer, u: &User, device_id: &str, limit: Option<u32>) -> (Vec<Value>, usize) {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let v = events(s, u, device_id, token.as_deref(), limit).await;
        pages += 1;
        let page = v["events"].as_array().unwrap().clone();
        if page.is_empty() {
            return (out, pages);
        }
        out.extend(page);
        token = Some(v["next_batch"].as_str().expect("POST always answers next_batch").to_owned());
        assert!(pages < 1000, "pagination does not end");
    }
}

#[tokio::test]
async fn create_get_replace_delete_and_refusals() {
    let s = TestServer::start().await;
    let alice = s.register("dh_alice", false).await;
    let bob = s.register("dh_bob", false).await;
    let k = key(41);

    // Nothing yet.
    assert_err(&s.get(BASE, Some(&alice.token)).await, 404, "M_NOT_FOUND");
    assert_err(&s.delete(BASE, Some(&alice.token), json!({})).await, 404, "M_NOT_FOUND");
    assert_err(&s.post(&events_path(DEVICE_A), Some(&alice.token), json!({})).await, 403, "M_FORBIDDEN");
    assert_err(&s.get(BASE, None).await, 401, "M_MISSING_TOKEN");
    assert_err(&s.post(BASE, Some(&alice.token), json!({})).await, 405, "M_UNRECOGNIZED");
    assert_err(&s.put(BASE, None, put_body(&alice, DEVICE_A, &k)).await, 401, "M_MISSING_TOKEN");

    // Malformed bodies.
    let put = |body: Value| {
        let s = &s;
        let token = alice.token.clone();
        async move { s.put(BASE, Some(&token), body).await }
    };
    let without = |field: &str| {
        let mut b = put_body(&alice, DEVICE_A, &k);
        b.as_object_mut().unwrap().remove(field);
        b
    };
    assert_err(&put(without("device_id")).await, 400, "M_BAD_JSON");
    assert_err(&put(without("device_data")).await, 400, "M_BAD_JSON");
    assert_err(&put(without("device_keys")).await, 400, "M_BAD_JSON");
    let mut b = put_body(&alice, DEVICE_A, &k);
    b["device_data"] = json!({ "device_pickle": "no algorithm" });
    assert_err(&put(b).await, 400, "M_BAD_JSON");
    let mut b = put_body(&alice, DEVICE_A, &k);
    b["device_data"] = json!("not an object");
    assert_err(&put(b).await, 400, "M_BAD_JSON");
    let mut b = put_body(&alice, DEVICE_A, &k);
    b["device_id"] = json!("");
    assert_err(&put(b).await, 400, "M_INVALID_PARAM");

    // Device keys are checked as keys/upload checks them.
    let mut b = put_body(&alice, DEVICE_A, &k);
    b["device_keys"] = keys_of(&bob, DEVICE_A, &k, Some(json!(true)));
    assert_err(&put(b).await, 400, "M_INVALID_PARAM");
    let mut b = put_body(&alice, DEVICE_A, &k);
    b["device_keys"] = keys_of(&alice, DEVICE_B, &k, Some(json!(true)));
    assert_err(&put(b).await, 400, "M_INVALID_PARAM");
    let mut forged = put_body(&alice, DEVICE_A, &k);
    forged["device_keys"]["keys"][format!("ed25519:{DEVICE_A}")] = json!(public(&key(42)));
    assert_err(&put(forged).await, 400, "M_BAD_JSON");
    let mut tampered = put_body(&alice, DEVICE_A, &k);
    tampered["device_keys"]["algorithms"] = json!(["m.olm.v1.curve25519-aes-sha2"]);
    assert_err(&put(tampered).await, 400, "M_BAD_JSON");
    // MSC3814: the keys of a dehydrated device say so.
    let mut b = put_body(&alice, DEVICE_A, &k);
    b["device_keys"] = keys_of(&alice, DEVICE_A, &k, None);
    assert_err(&put(b).await, 400, "M_INVALID_PARAM");
    let mut b = put_body(&alice, DEVICE_A, &k);
    b["device_keys"] = keys_of(&alice, DEVICE_A, &k, Some(json!(false)));
    assert_err(&put(b).await, 400, "M_INVALID_PARAM");
    let mut b = put_body(&alice, DEVICE_A, &k);
    b["device_keys"] = keys_of(&alice, DEVICE_A, &k, Some(json!("yes")));
    assert_err(&put(b).await, 400, "M_BAD_JSON");
    let mut b = put_body(&alice, DEVICE_A, &k);
    b["one_time_keys"] = json!({ "no-colon": "x" });
    assert_err(&put(b).await, 400, "M_BAD_JSON");

    // Sizes are bounded.
    let mut b = put_body(&alice, DEVICE_A, &k);
    b["device_data"]["device_pickle"] = json!("A".repeat(70 * 1024));
    assert_err(&put(b).await, 413, "M_TOO_LARGE");
    let mut b = put_body(&alice, DEVICE_A, &k);
    let many: serde_json::Map<String, Value> =
        (0..101).map(|i| (format!("signed_curve25519:K{i}"), json!({ "key": b64(&[i as u8; 32]) }))).collect();
    b["one_time_keys"] = Value::Object(many);
    assert_err(&put(b).await, 400, "M_INVALID_PARAM");
    let mut b = put_body(&alice, DEVICE_A, &k);
    let many: serde_json::Map<String, Value> =
        (0..11).map(|i| (format!("alg{i}:K"), json!({ "key": b64(&[i as u8; 32]) }))).collect();
    b["fallback_keys"] = Value::Object(many);
    assert_err(&put(b).await, 400, "M_INVALID_PARAM");
    let mut b = put_body(&alice, DEVICE_A, &k);
    b["initial_device_display_name"] = json!("n".repeat(2000));
    assert_err(&put(b).await, 400, "M_INVALID_PARAM");
    assert_err(&s.get(BASE, Some(&alice.token)).await, 404, "M_NOT_FOUND");

    // The ID of one of the user's own devices is not taken over: the device keeps its keys and
    // its session.
    let own = &alice.device_id;
    let mut b = put_body(&alice, own, &k);
    b["device_keys"] = keys_of(&alice, own, &k, Some(json!(true)));
    assert_err(&put(b).await, 400, "M_INVALID_PARAM");
    assert_err(&s.get(BASE, Some(&alice.token)).await, 404, "M_NOT_FOUND");
    let (st, who) = s.get("/_matrix/client/v3/account/whoami", Some(&alice.token)).await;
    assert_eq!((st, who["device_id"].as_str()), (StatusCode::OK, Some(own.as_str())));

    // Created, and read back as uploaded.
    let (st, v) = put(put_body(&alice, DEVICE_A, &k)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v, json!({ "device_id": DEVICE_A }));
    let (st, v) = s.get(BASE, Some(&alice.token)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["device_id"], DEVICE_A);
    assert_eq!(v["device_data"], put_body(&alice, DEVICE_A, &k)["device_data"]);
    // Another user sees their own (none), not alice's.
    assert_err(&s.get(BASE, Some(&bob.token)).await, 404, "M_NOT_FOUND");
    assert_err(&s.post(&events_path(DEVICE_A), Some(&bob.token), json!({})).await, 403, "M_FORBIDDEN");

    // Replaced: the old device is gone with its keys.
    let k2 = key(43);
    let (st, v) = put(put_body(&alice, DEVICE_B, &k2)).await;
    assert_eq!(st, 200, "{v}");
    let (_, v) = s.get(BASE, Some(&alice.token)).await;
    assert_eq!(v["device_id"], DEVICE_B);
    let devices = query(&s, &bob, &alice).await;
    assert!(devices.get(DEVICE_A).is_none(), "{devices}");
    assert_eq!(devices[DEVICE_B]["dehydrated"], true, "{devices}");
    assert_err(&s.post(&events_path(DEVICE_A), Some(&alice.token), json!({})).await, 403, "M_FORBIDDEN");
    let (_, claimed) = s
        .post(
            "/_matrix/client/v3/keys/claim",
            Some(&bob.token),
            json!({ "one_time_keys": { &alice.user_id: { DEVICE_A: "signed_curve25519" } } }),
        )
        .await;
    assert_eq!(claimed["one_time_keys"], json!({}), "the replaced device's keys are gone: {claimed}");

    // A refused replacement leaves the current one as it was.
    let mut b = put_body(&alice, DEVICE_A, &k);
    b["device_keys"]["algorithms"] = json!([]);
    assert_err(&put(b).await, 400, "M_BAD_JSON");
    assert_eq!(s.get(BASE, Some(&alice.token)).await.1["device_id"], DEVICE_B);

    // Deleted.
    let (st, v) = s.delete(BASE, Some(&alice.token), json!({})).await;
    assert_eq!((st, v), (StatusCode::OK, json!({ "device_id": DEVICE_B })));
    assert_err(&s.get(BASE, Some(&alice.token)).await, 404, "M_NOT_FOUND");
    assert_err(&s.delete(BASE, Some(&alice.token), json!({})).await, 404, "M_NOT_FOUND");
    assert!(query(&s, &bob, &alice).await.get(DEVICE_B).is_none());
    s.stop().await;
}

#[tokio::test]
async fn keys_query_claim_and_to_device_messages() {
    let s = TestServer::start().await;
    let alice = s.register("dk_alice", false).await;
    let bob = s.register("dk_bob", false).await;
    let k = key(51);
    let (st, v) = s.put(BASE, Some(&alice.token), put_body(&alice, DEVICE_A, &k)).await;
    assert_eq!(st, 200, "{v}");

    // keys/query: the device with its keys as uploaded (dehydrated flag included) and its name.
    let devices = query(&s, &bob, &alice).await;
    let dev = &devices[DEVICE_A];
    assert_eq!(dev["dehydrated"], true, "{devices}");
    assert_eq!(dev["keys"][format!("ed25519:{DEVICE_A}")], public(&k));
    assert_eq!(dev["unsigned"]["device_display_name"], "Dehydrated device");

    // keys/claim: its one-time keys, each once, then its fallback key.
    let claim = || async {
        let (st, v) = s
            .post(
                "/_matrix/client/v3/keys/claim",
                Some(&bob.token),
                json!({ "one_time_keys": { &alice.user_id: { DEVICE_A: "signed_curve25519" } } }),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        v["one_time_keys"][&alice.user_id][DEVICE_A].as_object().unwrap().keys().next().unwrap().clone()
    };
    let mut got = vec![claim().await, claim().await, claim().await, claim().await];
    got.sort();
    assert_eq!(
        got,
        [
            "signed_curve25519:AAAAAQ",
            "signed_curve25519:AAAAAg",
            "signed_curve25519:AAAAAw",
            "signed_curve25519:AAAAAw"
        ]
    );

    // To-device messages from another user: to the device by ID, and to all of alice's devices.
    send_to_device(&s, &bob, "t1", json!({ &alice.user_id: { DEVICE_A: { "n": 1 } } })).await;
    send_to_device(&s, &bob, "t2", json!({ &alice.user_id: { "*": { "n": 2 } } })).await;
    send_to_device(&s, &bob, "t2", json!({ &alice.user_id: { "*": { "n": 2 } } })).await; // a retry
    let (evs, _) = all_events(&s, &alice, DEVICE_A, None).await;
    assert_eq!(evs.len(), 2, "{evs:?}");
    assert_eq!(evs[0], json!({ "sender": bob.user_id, "type": "m.room.encrypted", "content": { "n": 1 } }));
    assert_eq!(evs[1]["content"], json!({ "n": 2 }));
    // The `*` message reached alice's real device as well, through sync.
    let v = sync(&s, &alice, None, None, 0).await;
    assert_eq!(v["to_device"]["events"][0]["content"], json!({ "n": 2 }), "{v}");
    assert_eq!(v["to_device"]["events"].as_array().map(Vec::len), Some(1), "{v}");

    // Reading acknowledges nothing (MSC3814): an interrupted rehydration can start over.
    let (again, _) = all_events(&s, &alice, DEVICE_A, None).await;
    assert_eq!(again, evs);

    // Pages: `limit` (at most 100), `next_batch` after each page.
    for i in 3..=5 {
        send_to_device(&s, &bob, &format!("t{i}"), json!({ &alice.user_id: { DEVICE_A: { "n": i } } })).await;
    }
    let (paged, pages) = all_events(&s, &alice, DEVICE_A, Some(2)).await;
    let ns: Vec<i64> = paged.iter().map(|e| e["content"]["n"].as_i64().unwrap()).collect();
    assert_eq!(ns, [1, 2, 3, 4, 5]);
    assert_eq!(pages, 4, "2 + 2 + 1, then an empty page");
    let first = events(&s, &alice, DEVICE_A, None, Some(2)).await;
    let token = first["next_batch"].as_str().unwrap().to_owned();
    let second = events(&s, &alice, DEVICE_A, Some(&token), Some(2)).await;
    assert_eq!(second["events"][0]["content"]["n"], 3, "{second}");
    // The same token again gives the same page.
    assert_eq!(events(&s, &alice, DEVICE_A, Some(&token), Some(2)).await, second);

    // GET with `from` (MSC3814's latest revision): `next_batch` only while more are waiting.
    let path = events_path(DEVICE_A);
    let (st, g1) = s.get(&format!("{path}?limit=3"), Some(&alice.token)).await;
    assert_eq!(st, 200, "{g1}");
    assert_eq!(g1["events"].as_array().unwrap().len(), 3);
    let from = g1["next_batch"].as_str().expect("more to come");
    let (_, g2) = s.get(&format!("{path}?limit=3&from={}", enc(from)), Some(&alice.token)).await;
    assert_eq!(g2["events"].as_array().unwrap().len(), 2, "{g2}");
    assert!(g2.get("next_batch").is_none(), "the last page has no next_batch: {g2}");

    // Bad tokens.
    for bad in ["x12", "d", "d-3", "12"] {
        assert_err(&s.post(&path, Some(&alice.token), json!({ "next_batch": bad })).await, 400, "M_INVALID_PARAM");
    }
    assert_err(&s.post(&path, Some(&alice.token), json!({ "next_batch": 12 })).await, 400, "M_BAD_JSON");

    // A page holds at most 100 messages, whatever the client asks.
    for i in 6..=105 {
        send_to_device(&s, &bob, &format!("t{i}"), json!({ &alice.user_id: { DEVICE_A: { "n": i } } })).await;
    }
    let big = events(&s, &alice, DEVICE_A, None, Some(1000)).await;
    assert_eq!(big["events"].as_array().unwrap().len(), 100);
    let (everything, pages) = all_events(&s, &alice, DEVICE_A, None).await;
    assert_eq!((everything.len(), pages), (105, 3));

    // Replacing the device (even under the same ID) drops what was queued for the old one.
    let (st, _) = s.put(BASE, Some(&alice.token), put_body(&alice, DEVICE_A, &key(52))).await;
    assert_eq!(st, 200);
    assert_eq!(events(&s, &alice, DEVICE_A, None, None).await["events"], json!([]));
    s.stop().await;
}

#[tokio::test]
async fn device_lists_device_endpoints_and_no_session() {
    let s = TestServer::start().await;
    let alice = s.register("dl_alice", false).await;
    let bob = s.register("dl_bob", false).await;
    let room = create(&s, &alice, json!({ "invite": [bob.user_id] })).await;
    let (st, _) = s.post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), Some(&bob.token), json!({})).await;
    assert_eq!(st, 200);
    let since = sync(&s, &bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();

    // A new dehydrated device is a device-list change for those who share a room.
    let (st, _) = s.put(BASE, Some(&alice.token), put_body(&alice, DEVICE_A, &key(61))).await;
    assert_eq!(st, 200);
    let b = sync(&s, &bob, Some(&since), None, 0).await;
    assert_eq!(b["device_lists"]["changed"], json!([alice.user_id]), "{b}");
    let since = b["next_batch"].as_str().unwrap().to_owned();

    // It is listed among the user's devices, as Synapse does (clients tell it apart by its keys).
    let (st, list) = s.get("/_matrix/client/v3/devices", Some(&alice.token)).await;
    assert_eq!(st, 200);
    let listed: Vec<&str> =
        list["devices"].as_array().unwrap().iter().filter_map(|d| d["device_id"].as_str()).collect();
    assert!(listed.contains(&DEVICE_A) && listed.contains(&alice.device_id.as_str()), "{list}");
    let (st, one) = s.get(&format!("/_matrix/client/v3/devices/{}", enc(DEVICE_A)), Some(&alice.token)).await;
    assert_eq!((st, &one["display_name"]), (StatusCode::OK, &json!("Dehydrated device")));

    // No session can be opened on it: login with its ID is refused and leaves it alone.
    let r = s.login("dl_alice", PASSWORD, json!({ "device_id": DEVICE_A })).await;
    assert_err(&r, 400, "M_INVALID_PARAM");
    assert_eq!(s.get(BASE, Some(&alice.token)).await.1["device_id"], DEVICE_A);
    let (st, v) = s.login("dl_alice", PASSWORD, json!({})).await;
    assert_eq!(st, 200, "{v}");
    assert_ne!(v["device_id"], DEVICE_A);

    // Keys uploaded by a session's device cannot claim to be dehydrated.
    let k = key(62);
    let (st, v) = s
        .post(
            "/_matrix/client/v3/keys/upload",
            Some(&alice.token),
            json!({ "device_keys": keys_of(&alice, &alice.device_id, &k, Some(json!(true))) }),
        )
        .await;
    assert_err(&(st, v), 400, "M_INVALID_PARAM");
    let (st, v) = s
        .post(
            "/_matrix/client/v3/keys/upload",
            Some(&alice.token),
            json!({ "device_keys": keys_of(&alice, &alice.device_id, &k, Some(json!(false))) }),
        )
        .await;
    assert_eq!(st, 200, "{v}");

    // Messages queued for it, then it is deleted through the ordinary device endpoint (UIA):
    // gone, with its keys and messages, and a device-list change again.
    send_to_device(&s, &bob, "q1", json!({ &alice.user_id: { DEVICE_A: { "n": 1 } } })).await;
    let path = format!("/_matrix/client/v3/devices/{}", enc(DEVICE_A));
    let (st, challenge) = s.delete(&path, Some(&alice.token), json!({})).await;
    assert_eq!(st, 401, "{challenge}");
    let auth = json!({
        "type": "m.login.password", "session": challenge["session"],
        "identifier": { "type": "m.id.user", "user": "dl_alice" }, "password": PASSWORD,
    });
    let (st, v) = s.delete(&path, Some(&alice.token), json!({ "auth": auth })).await;
    assert_eq!(st, 200, "{v}");
    assert_err(&s.get(BASE, Some(&alice.token)).await, 404, "M_NOT_FOUND");
    assert!(query(&s, &bob, &alice).await.get(DEVICE_A).is_none());
    let b = sync(&s, &bob, Some(&since), None, 0).await;
    assert_eq!(b["device_lists"]["changed"], json!([alice.user_id]), "{b}");
    let queued: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM to_device_messages WHERE recipient_device = $1")
        .bind(DEVICE_A)
        .fetch_one(&s.state().db)
        .await
        .unwrap();
    assert_eq!(queued, 0, "a deleted device's queue goes with it");

    // Deleting it through DELETE /dehydrated_device is a device-list change too.
    let (st, _) = s.put(BASE, Some(&alice.token), put_body(&alice, DEVICE_B, &key(63))).await;
    assert_eq!(st, 200);
    let since = sync(&s, &bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let (st, _) = s.delete(BASE, Some(&alice.token), json!({})).await;
    assert_eq!(st, 200);
    let b = sync(&s, &bob, Some(&since), None, 0).await;
    assert_eq!(b["device_lists"]["changed"], json!([alice.user_id]), "{b}");
    s.stop().await;
}

/// End to end with matrix-rust-sdk's crypto (`matrix-sdk-crypto`'s `OlmMachine`, which Element X
/// and Element Web run): alice's first device sets up cross-signing and uploads a dehydrated
/// device; bob (a matrix-sdk client) sends an encrypted message while alice has no device
/// online to receive the room key except the dehydrated one; alice's new device rehydrates it,
/// reads its to-device messages and decrypts the message. matrix-sdk 0.18 has no high-level
/// dehydration API (only `OlmMachine::dehydrated_devices()`), so alice's devices drive their
/// `OlmMachine` over HTTP themselves.
#[tokio::test]
async fn sdk_rehydration_decrypts_what_was_sent_while_offline() {
    use matrix_sdk::config::SyncSettings;
    use matrix_sdk::ruma::api::client::keys::upload_keys;
    use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
    use matrix_sdk::ruma::serde::Raw;
    use matrix_sdk::ruma::{OwnedDeviceId, OwnedRoomId, OwnedUserId, UInt};
    use matrix_sdk_crypto::store::types::DehydratedDeviceKey;
    use matrix_sdk_crypto::types::requests::AnyOutgoingRequest;
    use matrix_sdk_crypto::{DecryptionSettings, OlmMachine, TrustRequirement};
    use std::collections::BTreeMap;

    let s = TestServer::start().await;
    let alice = s.register("dhx_alice", false).await;
    s.register("dhx_bob", false).await;
    let alice_id = OwnedUserId::try_from(alice.user_id.as_str()).unwrap();

    // Alice's first device: device keys, cross-signing (master, self-signing, user-signing).
    let a1 = OlmMachine::new(&alice_id, &OwnedDeviceId::from(alice.device_id.as_str())).await;
    let boot = a1.bootstrap_cross_signing(true).await.expect("cross-signing bootstrap");
    if let Some(req) = &boot.upload_keys_req
        && let AnyOutgoingRequest::KeysUpload(up) = req.request()
    {
        let (st, v) = s
            .post(
                "/_matrix/client/v3/keys/upload",
                Some(&alice.token),
                json!({ "device_keys": up.device_keys, "one_time_keys": up.one_time_keys, "fallback_keys": up.fallback_keys }),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        let counts: BTreeMap<_, UInt> = serde_json::from_value(v["one_time_key_counts"].clone()).unwrap();
        a1.mark_request_as_sent(req.request_id(), &upload_keys::v3::Response::new(counts)).await.unwrap();
    }
    let signing = &boot.upload_signing_keys_req;
    let (st, v) = s
        .post(
            "/_matrix/client/v3/keys/device_signing/upload",
            Some(&alice.token),
            json!({
                "master_key": signing.master_key, "self_signing_key": signing.self_signing_key,
                "user_signing_key": signing.user_signing_key,
            }),
        )
        .await;
    assert_eq!(st, 200, "{v}");

    // The dehydrated device, signed by alice's self-signing key, uploaded as the SDK builds it.
    let pickle_key = DehydratedDeviceKey::new();
    let dehydrated = a1.dehydrated_devices().create().await.expect("dehydrated device");
    let put = dehydrated.keys_for_upload("Appareil déshydraté".to_owned(), &pickle_key).await.expect("upload request");
    let dehydrated_id = put.device_id.to_string();
    let (st, v) = s
        .put(
            BASE,
            Some(&alice.token),
            json!({
                "device_id": put.device_id, "initial_device_display_name": put.initial_device_display_name,
                "device_data": put.device_data, "device_keys": put.device_keys,
                "one_time_keys": put.one_time_keys, "fallback_keys": put.fallback_keys,
            }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["device_id"], dehydrated_id);

    // An encrypted room with bob, who uses matrix-sdk.
    let room = create(
        &s,
        &alice,
        json!({
            "invite": ["@dhx_bob:localhost"],
            "initial_state": [{ "type": "m.room.encryption", "state_key": "", "content": { "algorithm": "m.megolm.v1.aes-sha2" } }],
        }),
    )
    .await;
    let room_id = OwnedRoomId::try_from(room.as_str()).unwrap();
    let bob = matrix_sdk::Client::builder().homeserver_url(&s.base).build().await.unwrap();
    bob.matrix_auth().login_username("dhx_bob", PASSWORD).send().await.expect("bob logs in");
    bob.sync_once(SyncSettings::default()).await.unwrap();
    bob.encryption().wait_for_e2ee_initialization_tasks().await;
    let bob_room = bob.join_room_by_id(&room_id).await.expect("bob joins");
    bob.sync_once(SyncSettings::default()).await.unwrap();

    // Alice's devices are all offline. Bob sends; the SDK shares the room key with the
    // dehydrated device (it is cross-signed by alice, as the SDK requires of dehydrated devices).
    let sent = bob_room
        .send(RoomMessageEventContent::text_plain("rendez-vous à 14 h, salle du conseil"))
        .await
        .expect("send")
        .response
        .event_id;
    let devices = query(&s, &alice, &alice).await;
    assert_eq!(devices[&dehydrated_id]["dehydrated"], true, "{devices}");
    assert!(
        devices[&dehydrated_id]["signatures"][&alice.user_id].as_object().unwrap().len() >= 2,
        "self-signed and cross-signed: {devices}"
    );

    // Alice logs in on a new device, finds the dehydrated device and rehydrates it.
    let (st, v) = s.login("dhx_alice", PASSWORD, json!({})).await;
    assert_eq!(st, 200, "{v}");
    let alice2 = user_from(&v);
    let a2 = OlmMachine::new(&alice_id, &OwnedDeviceId::from(alice2.device_id.as_str())).await;
    let (st, got) = s.get(BASE, Some(&alice2.token)).await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(got["device_id"], dehydrated_id);
    // `Raw` values are parsed from text (a `RawValue` keeps the JSON as it came).
    let data: Raw<_> = serde_json::from_str(&got["device_data"].to_string()).unwrap();
    let device_id = OwnedDeviceId::from(dehydrated_id.as_str());
    let rehydrated =
        a2.dehydrated_devices().rehydrate(&pickle_key, &device_id, data).await.expect("rehydrated with the key");

    // Its to-device messages, read as the SDK reads them (POST until an empty page).
    let settings = DecryptionSettings { sender_device_trust_requirement: TrustRequirement::Untrusted };
    let mut room_keys = Vec::new();
    let mut next_batch: Option<String> = None;
    loop {
        let v = events(&s, &alice2, &dehydrated_id, next_batch.as_deref(), None).await;
        let page: Vec<Raw<_>> = serde_json::from_str(&v["events"].to_string()).unwrap();
        if page.is_empty() {
            break;
        }
        next_batch = v["next_batch"].as_str().map(str::to_owned);
        room_keys.extend(rehydrated.receive_events(page, &settings).await.expect("to-device events decrypted"));
    }
    assert!(room_keys.iter().any(|k| k.room_id == room_id), "the room key reached the dehydrated device");

    // The message, as stored on the server, decrypts on the new device.
    let (st, ev) = s
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(sent.as_str())), Some(&alice2.token))
        .await;
    assert_eq!(st, 200, "{ev}");
    assert_eq!(ev["type"], "m.room.encrypted");
    let raw: Raw<_> = serde_json::from_str(&ev.to_string()).unwrap();
    let decrypted = a2.decrypt_room_event(&raw, &room_id, &settings).await.expect("decrypted");
    let clear: Value = decrypted.event.deserialize_as().unwrap();
    assert_eq!(clear["content"]["body"], "rendez-vous à 14 h, salle du conseil", "{clear}");

    // Done: the client replaces the dehydrated device (the old one goes with its messages).
    let fresh = a1.dehydrated_devices().create().await.unwrap();
    let put = fresh.keys_for_upload("Appareil déshydraté".to_owned(), &pickle_key).await.unwrap();
    let (st, v) = s
        .put(
            BASE,
            Some(&alice2.token),
            json!({
                "device_id": put.device_id, "device_data": put.device_data, "device_keys": put.device_keys,
                "one_time_keys": put.one_time_keys, "fallback_keys": put.fallback_keys,
            }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_err(&s.post(&events_path(&dehydrated_id), Some(&alice2.token), json!({})).await, 403, "M_FORBIDDEN");
    s.stop().await;
}
