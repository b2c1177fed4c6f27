//! Encryption endpoints over HTTP, with real ed25519 signatures: keys upload/query/claim/changes,
//! cross-signing, signature uploads, to-device messages, device lists in sync, key backup.

use ed25519_dalek::{Signer, SigningKey};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;
use crate::sync::sync;

pub(crate) fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

pub(crate) fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

pub(crate) fn public(k: &SigningKey) -> String {
    b64(k.verifying_key().as_bytes())
}

/// Signs `obj` (canonical JSON without `signatures`/`unsigned`) as `signer` with `key_id`.
pub(crate) fn sign(obj: &mut Value, signer: &str, key_id: &str, k: &SigningKey) {
    let mut bare = obj.as_object().unwrap().clone();
    bare.remove("signatures");
    bare.remove("unsigned");
    let canonical = ruma::CanonicalJsonValue::try_from(Value::Object(bare)).unwrap();
    let sig = k.sign(serde_json::to_string(&canonical).unwrap().as_bytes());
    obj["signatures"][signer][key_id] = json!(b64(&sig.to_bytes()));
}

pub(crate) fn device_keys(u: &User, k: &SigningKey) -> Value {
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

fn otk(u: &User, k: &SigningKey, n: u8) -> Value {
    let mut o = json!({ "key": b64(&[n; 32]) });
    sign(&mut o, &u.user_id, &format!("ed25519:{}", u.device_id), k);
    o
}

pub(crate) fn cross_key(u: &User, usage: &str, k: &SigningKey) -> Value {
    json!({ "user_id": u.user_id, "usage": [usage], "keys": { format!("ed25519:{}", public(k)): public(k) } })
}

async fn upload(s: &TestServer, u: &User, body: Value) -> (StatusCode, Value) {
    s.post("/_matrix/client/v3/keys/upload", Some(&u.token), body).await
}

async fn claim(s: &TestServer, u: &User, target: &User) -> Value {
    let (st, v) = s
        .post(
            "/_matrix/client/v3/keys/claim",
            Some(&u.token),
            json!({ "one_time_keys": { &target.user_id: { &target.device_id: "signed_curve25519" } } }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    v["one_time_keys"][&target.user_id][&target.device_id].clone()
}

#[tokio::test]
async fn device_keys_one_time_keys_and_claims() {
    let s = TestServer::start().await;
    let alice = s.register("k_alice", false).await;
    let bob = s.register("k_bob", false).await;
    let ka = key(1);

    // Malformed or foreign device keys are refused.
    let mut wrong_user = device_keys(&alice, &ka);
    wrong_user["user_id"] = json!(bob.user_id);
    assert_err(&upload(&s, &alice, json!({ "device_keys": wrong_user })).await, 400, "M_INVALID_PARAM");
    let mut wrong_device = device_keys(&alice, &ka);
    wrong_device["device_id"] = json!("OTHER");
    assert_err(&upload(&s, &alice, json!({ "device_keys": wrong_device })).await, 400, "M_INVALID_PARAM");
    let mut forged = device_keys(&alice, &ka);
    forged["algorithms"] = json!(["m.olm.v1.curve25519-aes-sha2"]);
    assert_err(&upload(&s, &alice, json!({ "device_keys": forged })).await, 400, "M_BAD_JSON");
    assert_err(&upload(&s, &alice, json!({ "one_time_keys": { "no-colon": {} } })).await, 400, "M_BAD_JSON");

    let (st, v) = upload(
        &s,
        &alice,
        json!({
            "device_keys": device_keys(&alice, &ka),
            "one_time_keys": { "signed_curve25519:AAAA": otk(&alice, &ka, 1), "signed_curve25519:AAAB": otk(&alice, &ka, 2) },
            "fallback_keys": { "signed_curve25519:FFFF": { "key": b64(&[9; 32]), "fallback": true } },
        }),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["one_time_key_counts"]["signed_curve25519"], 2);
    // The same key again is fine; the same ID with another key is not.
    let (st, _) =
        upload(&s, &alice, json!({ "one_time_keys": { "signed_curve25519:AAAA": otk(&alice, &ka, 1) } })).await;
    assert_eq!(st, 200);
    assert_err(
        &upload(&s, &alice, json!({ "one_time_keys": { "signed_curve25519:AAAA": otk(&alice, &ka, 3) } })).await,
        400,
        "M_INVALID_PARAM",
    );

    // Sync reports the counts and the unused fallback key.
    let v = sync(&s, &alice, None, None, 0).await;
    assert_eq!(v["device_one_time_keys_count"]["signed_curve25519"], 2, "{v}");
    assert_eq!(v["device_unused_fallback_key_types"], json!(["signed_curve25519"]));

    // Query: bob sees alice's device with its display name; a remote user is a failure.
    let (st, q) = s
        .post(
            "/_matrix/client/v3/keys/query",
            Some(&bob.token),
            json!({ "device_keys": { &alice.user_id: [], "@someone:elsewhere.example": [] } }),
        )
        .await;
    assert_eq!(st, 200, "{q}");
    let dev = &q["device_keys"][&alice.user_id][&alice.device_id];
    assert_eq!(dev["keys"][format!("ed25519:{}", alice.device_id)], public(&ka));
    assert!(dev["unsigned"]["device_display_name"].is_string() || dev["unsigned"].is_null());
    assert!(q["failures"]["elsewhere.example"].is_object(), "{q}");
    let (_, q2) = s
        .post("/_matrix/client/v3/keys/query", Some(&bob.token), json!({ "device_keys": { &alice.user_id: ["NOPE"] } }))
        .await;
    assert_eq!(q2["device_keys"][&alice.user_id], json!({}), "only the devices asked for");

    // Claims: each one-time key once (concurrent claimers get different keys), then the
    // fallback key, which stays.
    let (c1, c2) = tokio::join!(claim(&s, &bob, &alice), claim(&s, &bob, &alice));
    let k1: Vec<&String> = c1.as_object().unwrap().keys().collect();
    let k2: Vec<&String> = c2.as_object().unwrap().keys().collect();
    assert_eq!(k1.len(), 1);
    assert_eq!(k2.len(), 1);
    assert_ne!(k1, k2, "a one-time key is never handed out twice");
    assert!(k1[0].starts_with("signed_curve25519:AAA"));
    let c3 = claim(&s, &bob, &alice).await;
    assert!(c3["signed_curve25519:FFFF"]["fallback"].as_bool().unwrap(), "exhausted: fallback key {c3}");
    let c4 = claim(&s, &bob, &alice).await;
    assert!(c4.get("signed_curve25519:FFFF").is_some(), "the fallback key is reused");
    let v = sync(&s, &alice, None, None, 0).await;
    assert_eq!(v["device_one_time_keys_count"], json!({}), "{v}");
    assert_eq!(v["device_unused_fallback_key_types"], json!([]));
    // A device without keys: nothing, no error.
    let (st, v) = s
        .post(
            "/_matrix/client/v3/keys/claim",
            Some(&alice.token),
            json!({ "one_time_keys": { &bob.user_id: { &bob.device_id: "signed_curve25519" } } }),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["one_time_keys"], json!({}));
    s.stop().await;
}

#[tokio::test]
async fn cross_signing_and_signature_uploads() {
    let s = TestServer::start().await;
    let alice = s.register("x_alice", false).await;
    let bob = s.register("x_bob", false).await;
    let (kd, km, kss, kus) = (key(11), key(12), key(13), key(14));
    assert_eq!(upload(&s, &alice, json!({ "device_keys": device_keys(&alice, &kd) })).await.0, 200);

    let master = cross_key(&alice, "master", &km);
    let mid = format!("ed25519:{}", public(&km));
    let mut ss = cross_key(&alice, "self_signing", &kss);
    let mut us = cross_key(&alice, "user_signing", &kus);
    // A self-signing key not signed by the master key is refused.
    assert_err(
        &s.post(
            "/_matrix/client/v3/keys/device_signing/upload",
            Some(&alice.token),
            json!({ "master_key": master, "self_signing_key": ss }),
        )
        .await,
        400,
        "M_INVALID_SIGNATURE",
    );
    sign(&mut ss, &alice.user_id, &mid, &km);
    sign(&mut us, &alice.user_id, &mid, &km);
    // First upload: no UIA needed.
    let (st, v) = s
        .post(
            "/_matrix/client/v3/keys/device_signing/upload",
            Some(&alice.token),
            json!({ "master_key": master, "self_signing_key": ss, "user_signing_key": us }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    // Replacing the master key needs authentication.
    let new_master = cross_key(&alice, "master", &key(15));
    let (st, v) = s
        .post("/_matrix/client/v3/keys/device_signing/upload", Some(&alice.token), json!({ "master_key": new_master }))
        .await;
    assert_eq!(st, 401, "{v}");
    assert!(v["flows"].is_array() && v["session"].is_string());
    let session = v["session"].as_str().unwrap().to_owned();
    // (Re-uploading the same keys changes nothing and needs none.)
    let (st, _) = s
        .post("/_matrix/client/v3/keys/device_signing/upload", Some(&alice.token), json!({ "master_key": master }))
        .await;
    assert_eq!(st, 200);

    // Alice signs her device with the self-signing key; a bad signature is a per-key failure.
    let (_, q) = s
        .post("/_matrix/client/v3/keys/query", Some(&alice.token), json!({ "device_keys": { &alice.user_id: [] } }))
        .await;
    let mut dev = q["device_keys"][&alice.user_id][&alice.device_id].clone();
    dev.as_object_mut().unwrap().remove("unsigned");
    let ssid = format!("ed25519:{}", public(&kss));
    let mut good = dev.clone();
    good["signatures"] = json!({});
    sign(&mut good, &alice.user_id, &ssid, &kss);
    let mut bad = dev.clone();
    bad["signatures"] = json!({});
    sign(&mut bad, &alice.user_id, &ssid, &key(99));
    let (st, v) = s
        .post(
            "/_matrix/client/v3/keys/signatures/upload",
            Some(&alice.token),
            json!({ &alice.user_id: { &alice.device_id: bad } }),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["failures"][&alice.user_id][&alice.device_id]["errcode"], "M_INVALID_SIGNATURE", "{v}");
    let (st, v) = s
        .post(
            "/_matrix/client/v3/keys/signatures/upload",
            Some(&alice.token),
            json!({ &alice.user_id: { &alice.device_id: good } }),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["failures"], json!({}), "{v}");
    let (_, q) = s
        .post("/_matrix/client/v3/keys/query", Some(&bob.token), json!({ "device_keys": { &alice.user_id: [] } }))
        .await;
    assert!(q["device_keys"][&alice.user_id][&alice.device_id]["signatures"][&alice.user_id][&ssid].is_string(), "{q}");
    assert_eq!(q["master_keys"][&alice.user_id]["keys"][&mid], public(&km));
    assert!(q["self_signing_keys"][&alice.user_id].is_object());
    assert!(q["user_signing_keys"].get(&alice.user_id).is_none(), "only alice sees her user-signing key");

    // Alice signs Bob's master key with her user-signing key: only Alice sees that signature.
    let bm = key(21);
    let bob_master = cross_key(&bob, "master", &bm);
    assert_eq!(
        s.post("/_matrix/client/v3/keys/device_signing/upload", Some(&bob.token), json!({ "master_key": bob_master }))
            .await
            .0,
        200
    );
    let usid = format!("ed25519:{}", public(&kus));
    let mut signed = bob_master.clone();
    sign(&mut signed, &alice.user_id, &usid, &kus);
    let (st, v) = s
        .post(
            "/_matrix/client/v3/keys/signatures/upload",
            Some(&alice.token),
            json!({ &bob.user_id: { public(&bm): signed } }),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["failures"], json!({}), "{v}");
    let bmid = format!("ed25519:{}", public(&bm));
    let (_, qa) = s
        .post("/_matrix/client/v3/keys/query", Some(&alice.token), json!({ "device_keys": { &bob.user_id: [] } }))
        .await;
    assert!(qa["master_keys"][&bob.user_id]["signatures"][&alice.user_id][&usid].is_string(), "{qa}");
    let (_, qb) =
        s.post("/_matrix/client/v3/keys/query", Some(&bob.token), json!({ "device_keys": { &bob.user_id: [] } })).await;
    assert!(qb["master_keys"][&bob.user_id]["signatures"].get(&alice.user_id).is_none(), "{qb}");
    assert_eq!(qb["master_keys"][&bob.user_id]["keys"][&bmid], public(&bm));

    // Completing the password stage replaces the master key.
    let auth = json!({
        "type": "m.login.password", "session": session, "password": PASSWORD,
        "identifier": { "type": "m.id.user", "user": alice.user_id },
    });
    let (st, v) = s
        .post(
            "/_matrix/client/v3/keys/device_signing/upload",
            Some(&alice.token),
            json!({ "master_key": new_master, "auth": auth }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (_, q) = s
        .post("/_matrix/client/v3/keys/query", Some(&bob.token), json!({ "device_keys": { &alice.user_id: [] } }))
        .await;
    assert_eq!(q["master_keys"][&alice.user_id]["keys"][format!("ed25519:{}", public(&key(15)))], public(&key(15)));
    s.stop().await;
}

#[tokio::test]
async fn to_device_messages_and_device_lists() {
    let s = TestServer::start().await;
    let alice = s.register("td_alice", false).await;
    let bob = s.register("td_bob", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    let (st, _) = s.post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), Some(&bob.token), json!({})).await;
    assert_eq!(st, 200);
    let b0 = sync(&s, &bob, None, None, 0).await;
    let since = b0["next_batch"].as_str().unwrap().to_owned();

    // To one device, then to all of bob's devices, with a retried transaction in between.
    let send = |txn: &'static str, device: String, n: i64| {
        let path = format!("/_matrix/client/v3/sendToDevice/m.room_key_request/{txn}");
        let body = json!({ "messages": { &bob.user_id: { device: { "n": n } } } });
        let token = alice.token.clone();
        let s = &s;
        async move { s.put(&path, Some(&token), body).await }
    };
    assert_eq!(send("t1", bob.device_id.clone(), 1).await.0, 200);
    assert_eq!(send("t1", bob.device_id.clone(), 1).await.0, 200, "a retry is accepted");
    assert_eq!(send("t2", "*".into(), 2).await.0, 200);
    let b1 = sync(&s, &bob, Some(&since), None, 0).await;
    let evs = b1["to_device"]["events"].as_array().expect("to_device").clone();
    assert_eq!(evs.len(), 2, "the retry is not delivered twice: {b1}");
    assert_eq!(evs[0]["sender"], alice.user_id);
    assert_eq!(evs[0]["type"], "m.room_key_request");
    assert_eq!(evs[0]["content"]["n"], 1);
    assert_eq!(evs[1]["content"]["n"], 2);
    // Acknowledged by the next sync: not delivered again, and deleted.
    let b2 = sync(&s, &bob, Some(b1["next_batch"].as_str().unwrap()), None, 0).await;
    assert!(b2.get("to_device").is_none(), "{b2}");
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM to_device_messages WHERE recipient_user = $1")
        .bind(&bob.user_id)
        .fetch_one(&s.state().db)
        .await
        .unwrap();
    assert_eq!(left, 0, "acknowledged messages are deleted");
    assert_err(
        &s.put(
            "/_matrix/client/v3/sendToDevice/m.x/t3",
            Some(&alice.token),
            json!({ "messages": { &bob.user_id: { "D": "not an object" } } }),
        )
        .await,
        400,
        "M_BAD_JSON",
    );

    // A long-poll wakes for a to-device message.
    let since = b2["next_batch"].as_str().unwrap().to_owned();
    let poll = sync(&s, &bob, Some(&since), None, 10_000);
    let act = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        send("t4", bob.device_id.clone(), 4).await;
    };
    let start = std::time::Instant::now();
    let (b3, _) = tokio::join!(poll, act);
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(b3["to_device"]["events"][0]["content"]["n"], 4, "{b3}");

    // Device lists: alice's new keys show up for bob; keys/changes agrees.
    let since = b3["next_batch"].as_str().unwrap().to_owned();
    assert_eq!(upload(&s, &alice, json!({ "device_keys": device_keys(&alice, &key(31)) })).await.0, 200);
    let b4 = sync(&s, &bob, Some(&since), None, 0).await;
    assert_eq!(b4["device_lists"]["changed"], json!([alice.user_id]), "{b4}");
    let (st, ch) = s
        .get(
            &format!(
                "/_matrix/client/v3/keys/changes?from={}&to={}",
                enc(&since),
                enc(b4["next_batch"].as_str().unwrap())
            ),
            Some(&bob.token),
        )
        .await;
    assert_eq!(st, 200, "{ch}");
    assert_eq!(ch["changed"], json!([alice.user_id]));
    assert_err(&s.get("/_matrix/client/v3/keys/changes?from=x&to=y", Some(&bob.token)).await, 400, "M_INVALID_PARAM");

    // A stranger's key change is not reported; a newcomer to a shared room is; a leaver is `left`.
    let carol = s.register("td_carol", false).await;
    let since = b4["next_batch"].as_str().unwrap().to_owned();
    assert_eq!(upload(&s, &carol, json!({ "device_keys": device_keys(&carol, &key(32)) })).await.0, 200);
    let b5 = sync(&s, &bob, Some(&since), None, 0).await;
    assert!(b5.get("device_lists").is_none(), "{b5}");
    let (st, _) = s.post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), Some(&carol.token), json!({})).await;
    assert_eq!(st, 200);
    let b6 = sync(&s, &bob, Some(b5["next_batch"].as_str().unwrap()), None, 0).await;
    assert_eq!(b6["device_lists"]["changed"], json!([carol.user_id]), "{b6}");
    let (st, _) =
        s.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(&carol.token), json!({})).await;
    assert_eq!(st, 200);
    let b7 = sync(&s, &bob, Some(b6["next_batch"].as_str().unwrap()), None, 0).await;
    assert_eq!(b7["device_lists"]["left"], json!([carol.user_id]), "{b7}");
    let (_, ch) = s
        .get(
            &format!(
                "/_matrix/client/v3/keys/changes?from={}&to={}",
                enc(b6["next_batch"].as_str().unwrap()),
                enc(b7["next_batch"].as_str().unwrap())
            ),
            Some(&bob.token),
        )
        .await;
    assert_eq!(ch["left"], json!([carol.user_id]), "{ch}");
    s.stop().await;
}

#[tokio::test]
async fn key_backup_versions_and_replacement_rules() {
    let s = TestServer::start().await;
    let u = s.register("bk_user", false).await;
    let t = Some(u.token.as_str());
    assert_err(&s.get("/_matrix/client/v3/room_keys/version", t).await, 404, "M_NOT_FOUND");
    let algo = "m.megolm_backup.v1.curve25519-aes-sha2";
    let (st, v) = s
        .post(
            "/_matrix/client/v3/room_keys/version",
            t,
            json!({ "algorithm": algo, "auth_data": { "public_key": "abc" } }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["version"], "1");
    let (_, v) = s.get("/_matrix/client/v3/room_keys/version", t).await;
    assert_eq!((v["version"].as_str(), v["count"].as_i64(), v["algorithm"].as_str()), (Some("1"), Some(0), Some(algo)));

    let session = |fmi: i64, fc: i64, verified: bool, tag: &str| json!({ "first_message_index": fmi, "forwarded_count": fc, "is_verified": verified, "session_data": { "ciphertext": tag } });
    let path = "/_matrix/client/v3/room_keys/keys/!r:localhost/sess1?version=1";
    let (st, v) = s.put(path, t, session(5, 1, false, "a")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["count"], 1);
    let etag1 = v["etag"].as_str().unwrap().to_owned();
    // Worse keys do not replace; better ones do (lower index, then verified, then fewer forwards).
    let (_, v) = s.put(path, t, session(10, 0, false, "worse")).await;
    assert_eq!(v["etag"], etag1, "nothing changed, same etag");
    assert_eq!(s.get(path, t).await.1["session_data"]["ciphertext"], "a");
    s.put(path, t, session(2, 1, false, "b")).await;
    assert_eq!(s.get(path, t).await.1["session_data"]["ciphertext"], "b");
    s.put(path, t, session(3, 0, true, "c")).await;
    assert_eq!(s.get(path, t).await.1["session_data"]["ciphertext"], "c", "verified beats unverified");
    s.put(path, t, session(0, 0, false, "d")).await;
    assert_eq!(s.get(path, t).await.1["session_data"]["ciphertext"], "c", "unverified never replaces verified");
    s.put(path, t, session(3, 0, true, "e")).await;
    assert_eq!(s.get(path, t).await.1["session_data"]["ciphertext"], "c", "equal is not better");

    // Room and whole-backup levels.
    let (st, v) = s
        .put(
            "/_matrix/client/v3/room_keys/keys?version=1",
            t,
            json!({ "rooms": { "!r2:localhost": { "sessions": { "s2": session(0, 0, false, "x") } } } }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["count"], 2);
    let (_, all) = s.get("/_matrix/client/v3/room_keys/keys?version=1", t).await;
    assert!(
        all["rooms"]["!r:localhost"]["sessions"]["sess1"].is_object()
            && all["rooms"]["!r2:localhost"]["sessions"]["s2"].is_object(),
        "{all}"
    );
    let (_, room) = s.get("/_matrix/client/v3/room_keys/keys/!r2:localhost?version=1", t).await;
    assert_eq!(room["sessions"]["s2"]["session_data"]["ciphertext"], "x");
    assert_err(&s.get("/_matrix/client/v3/room_keys/keys/!r:localhost/nope?version=1", t).await, 404, "M_NOT_FOUND");
    assert_err(&s.get("/_matrix/client/v3/room_keys/keys", t).await, 400, "M_MISSING_PARAM");
    assert_err(&s.put(path, t, json!({ "first_message_index": "x" })).await, 400, "M_BAD_JSON");

    // A new version: writes to the old one are refused with the current version.
    let (_, v2) = s
        .post(
            "/_matrix/client/v3/room_keys/version",
            t,
            json!({ "algorithm": algo, "auth_data": { "public_key": "def" } }),
        )
        .await;
    assert_eq!(v2["version"], "2");
    let resp = s.put(path, t, session(0, 0, true, "z")).await;
    assert_err(&resp, 403, "M_WRONG_ROOM_KEYS_VERSION");
    assert_eq!(resp.1["current_version"], "2");
    // Updating auth_data must keep the algorithm.
    assert_err(
        &s.put("/_matrix/client/v3/room_keys/version/2", t, json!({ "algorithm": "other", "auth_data": {} })).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_eq!(
        s.put(
            "/_matrix/client/v3/room_keys/version/2",
            t,
            json!({ "algorithm": algo, "auth_data": { "public_key": "ghi" } })
        )
        .await
        .0,
        200
    );
    assert_eq!(s.get("/_matrix/client/v3/room_keys/version/2", t).await.1["auth_data"]["public_key"], "ghi");
    // Deleting keys and versions.
    let (_, d) = s.delete("/_matrix/client/v3/room_keys/keys/!r:localhost?version=1", t, json!({})).await;
    assert_eq!(d["count"], 1, "{d}");
    assert_eq!(s.delete("/_matrix/client/v3/room_keys/version/2", t, json!({})).await.0, 200);
    assert_err(&s.get("/_matrix/client/v3/room_keys/version/2", t).await, 404, "M_NOT_FOUND");
    assert_eq!(s.get("/_matrix/client/v3/room_keys/version", t).await.1["version"], "1");
    assert_err(&s.get("/_matrix/client/v3/room_keys/version/abc", t).await, 404, "M_NOT_FOUND");
    s.stop().await;
}

/// One-time keys are handed out in upload order (spec v1.13), not in key ID order.
#[tokio::test]
async fn one_time_keys_are_claimed_in_upload_order() {
    let s = TestServer::start().await;
    let alice = s.register("ko_alice", false).await;
    let bob = s.register("ko_bob", false).await;
    let ka = key(7);
    let (st, v) = upload(
        &s,
        &alice,
        json!({ "device_keys": device_keys(&alice, &ka), "one_time_keys": { "signed_curve25519:ZZZZ": otk(&alice, &ka, 1) } }),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    for id in ["MMMM", "AAAA"] {
        let (st, v) = upload(
            &s,
            &alice,
            json!({ "one_time_keys": { format!("signed_curve25519:{id}"): otk(&alice, &ka, id.as_bytes()[0]) } }),
        )
        .await;
        assert_eq!(st, 200, "{v}");
    }
    for expected in ["ZZZZ", "MMMM", "AAAA"] {
        let c = claim(&s, &bob, &alice).await;
        assert!(c.get(format!("signed_curve25519:{expected}")).is_some(), "expected {expected}, got {c}");
    }
    s.stop().await;
}
