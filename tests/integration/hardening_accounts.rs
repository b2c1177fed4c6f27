//! Issue 11, accounts part: regression tests over HTTP for aliases, deactivation, room
//! summaries, cross-signing signatures, UIA bound to its request, `account/3pid`, media ranges
//! past `u64`, server names with ports in `keys/query`, duplicate annotations; and property
//! tests for the user-ID parsing `keys/query` relies on.

use proptest::prelude::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;
use crate::e2ee::{b64, cross_key, device_keys, key, public, sign};

// ---- helpers ------------------------------------------------------------------------------

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
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(room)),
            Some(&by.token),
            json!({ "user_id": who.user_id }),
        )
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
    let (st, q) = s.post("/_matrix/client/v3/keys/query", Some(&u.token), json!({ "device_keys": { who: [] } })).await;
    assert_eq!(st, 200, "{q}");
    q
}

// ---- 7. aliases ---------------------------------------------------------------------------

#[tokio::test]
async fn aliases_need_membership_and_power() {
    let s = TestServer::start().await;
    let alice = s.register("al_alice", false).await;
    let mallory = s.register("al_mallory", false).await;
    let carol = s.register("al_carol", false).await;
    let admin = s.register("al_admin", true).await;
    let private = create(&s, &alice, json!({ "preset": "private_chat", "name": "Privé" })).await;
    let alias_path = |a: &str| format!("/_matrix/client/v3/directory/room/{}", enc(a));

    // Someone outside the room cannot point an alias at it, and nothing is created.
    assert_err(
        &s.put(&alias_path("#piege:localhost"), Some(&mallory.token), json!({ "room_id": private })).await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(&s.get(&alias_path("#piege:localhost"), None).await, 404, "M_NOT_FOUND");
    // An invitee is not joined either.
    invite(&s, &alice, &private, &carol).await;
    assert_err(
        &s.put(&alias_path("#invite:localhost"), Some(&carol.token), json!({ "room_id": private })).await,
        403,
        "M_FORBIDDEN",
    );
    // Members may; server admins may without being in the room.
    assert_eq!(s.put(&alias_path("#prive:localhost"), Some(&alice.token), json!({ "room_id": private })).await.0, 200);
    assert_eq!(s.put(&alias_path("#admin:localhost"), Some(&admin.token), json!({ "room_id": private })).await.0, 200);
    let (_, a) = s.get(&alias_path("#prive:localhost"), None).await;
    assert_eq!(a["room_id"], private.as_str());

    // Deleting: not by an outsider, not by a joined member without power; by the alias's
    // creator, by a member with the power over `m.room.canonical_alias`, by an admin.
    assert_err(&s.delete(&alias_path("#prive:localhost"), Some(&mallory.token), json!({})).await, 403, "M_FORBIDDEN");
    join(&s, &carol, &private).await;
    assert_err(&s.delete(&alias_path("#prive:localhost"), Some(&carol.token), json!({})).await, 403, "M_FORBIDDEN");
    assert_eq!(s.put(&alias_path("#carol:localhost"), Some(&carol.token), json!({ "room_id": private })).await.0, 200);
    assert_eq!(s.delete(&alias_path("#carol:localhost"), Some(&carol.token), json!({})).await.0, 200, "own alias");
    assert_eq!(s.delete(&alias_path("#admin:localhost"), Some(&alice.token), json!({})).await.0, 200, "room admin");
    assert_eq!(s.delete(&alias_path("#prive:localhost"), Some(&admin.token), json!({})).await.0, 200, "server admin");
    assert_err(&s.get(&alias_path("#prive:localhost"), None).await, 404, "M_NOT_FOUND");
    s.stop().await;
}

// ---- 8. deactivation ----------------------------------------------------------------------

#[tokio::test]
async fn deactivation_leaves_rooms_rejects_invites_and_hides_itself() {
    let s = TestServer::start().await;
    let alice = s.register("de_alice", false).await;
    let victim = s.register("de_partant", false).await;
    let joined = create(&s, &alice, json!({ "preset": "public_chat", "name": "Joined" })).await;
    let invited = create(&s, &alice, json!({ "preset": "private_chat" })).await;
    let knocked = create(
        &s,
        &alice,
        json!({ "preset": "private_chat",
                "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }] }),
    )
    .await;
    join(&s, &victim, &joined).await;
    invite(&s, &alice, &invited, &victim).await;
    let (st, v) = s.post(&format!("/_matrix/client/v3/knock/{}", enc(&knocked)), Some(&victim.token), json!({})).await;
    assert_eq!(st, 200, "{v}");
    let pusher = json!({
        "app_id": "fr.ville.test", "pushkey": "pk-victim", "kind": "http", "app_display_name": "M",
        "device_display_name": "D", "lang": "fr", "data": { "url": "https://push.example/_matrix/push/v1/notify" }
    });
    assert_eq!(s.post("/_matrix/client/v3/pushers/set", Some(&victim.token), pusher).await.0, 200);
    let search = |who: &User| {
        let token = who.token.clone();
        let s = &s;
        async move {
            let (_, r) = s
                .post("/_matrix/client/v3/user_directory/search", Some(&token), json!({ "search_term": "partant" }))
                .await;
            r["results"].as_array().unwrap().iter().any(|r| r["user_id"] == "@de_partant:localhost")
        }
    };
    assert!(search(&alice).await, "in the directory before");
    assert_eq!(membership_of(&s, &alice, &knocked, &victim).await, "knock");

    let path = "/_matrix/client/v3/account/deactivate";
    let (st, ch) = s.post(path, Some(&victim.token), json!({})).await;
    assert_eq!(st, 401);
    let (st, ok) = s
        .post(path, Some(&victim.token), json!({ "auth": password_auth(&ch["session"], "de_partant", PASSWORD) }))
        .await;
    assert_eq!(st, 200, "{ok}");

    // Every room left, the invite rejected, the knock withdrawn: through real leave events.
    for room in [&joined, &invited, &knocked] {
        assert_eq!(membership_of(&s, &alice, room, &victim).await, "leave", "{room}");
    }
    let (_, members) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&joined)), Some(&alice.token)).await;
    assert!(members["joined"].get(&victim.user_id).is_none(), "{members}");
    assert!(!search(&alice).await, "gone from the directory");
    assert_err(&s.get("/_matrix/client/v3/account/whoami", Some(&victim.token)).await, 401, "M_UNKNOWN_TOKEN");
    let db = &s.state().db;
    let devices: i64 = sqlx::query_scalar("SELECT count(*) FROM devices WHERE user_id = $1")
        .bind(&victim.user_id)
        .fetch_one(db)
        .await
        .unwrap();
    let pushers: i64 = sqlx::query_scalar("SELECT count(*) FROM pushers WHERE user_id = $1")
        .bind(&victim.user_id)
        .fetch_one(db)
        .await
        .unwrap();
    assert_eq!((devices, pushers), (0, 0));
    // Nobody can invite the account back into a room.
    assert_err(
        &s.post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&joined)),
            Some(&alice.token),
            json!({ "user_id": victim.user_id }),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    assert_eq!(membership_of(&s, &alice, &joined, &victim).await, "leave");

    // Login: a wrong password gets exactly what any wrong password gets; only the right one
    // learns that the account is deactivated.
    let wrong = s.login("de_partant", "not the password", json!({})).await;
    assert_err(&wrong, 403, "M_FORBIDDEN");
    let unknown = s.login("de_nobody", "not the password", json!({})).await;
    assert_eq!(wrong.1["error"], unknown.1["error"]);
    assert_err(&s.login("de_partant", PASSWORD, json!({})).await, 403, "M_USER_DEACTIVATED");
    s.stop().await;
}

#[tokio::test]
async fn deactivation_with_erase_clears_the_profile() {
    let s = TestServer::start().await;
    let alice = s.register("er_alice", false).await;
    let victim = s.register("er_partant", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    join(&s, &victim, &room).await;
    let name_path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&victim.user_id));
    assert_eq!(s.put(&name_path, Some(&victim.token), json!({ "displayname": "Jean Partant" })).await.0, 200);
    let path = "/_matrix/client/v3/account/deactivate";
    let (_, ch) = s.post(path, Some(&victim.token), json!({ "erase": true })).await;
    let (st, v) = s
        .post(
            path,
            Some(&victim.token),
            json!({ "erase": true, "auth": password_auth(&ch["session"], "er_partant", PASSWORD) }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let fields: Value = sqlx::query_scalar("SELECT fields FROM profiles WHERE user_id = $1")
        .bind(&victim.user_id)
        .fetch_one(&s.state().db)
        .await
        .unwrap();
    assert_eq!(fields, json!({}));
    assert_eq!(membership_of(&s, &alice, &room, &victim).await, "leave");
    s.stop().await;
}

// ---- 9. room summary, publicRooms --------------------------------------------------------

#[tokio::test]
async fn room_summary_follows_the_preview_rules() {
    let s = TestServer::start().await;
    let alice = s.register("su_alice", false).await;
    let bob = s.register("su_bob", false).await;
    let summary = |id: String, token: Option<String>| {
        let s = &s;
        async move { s.get(&format!("/_matrix/client/v1/room_summary/{}", enc(&id)), token.as_deref()).await }
    };
    let parent = create(&s, &alice, json!({ "preset": "private_chat", "name": "Parent" })).await;
    let restricted = create(
        &s,
        &alice,
        json!({ "preset": "private_chat", "name": "Restreint", "topic": "secret topic",
                "room_alias_name": "restreint",
                "initial_state": [{ "type": "m.room.join_rules", "state_key": "",
                    "content": { "join_rule": "restricted", "allow": [{ "type": "m.room_membership", "room_id": parent }] } }] }),
    )
    .await;
    let private = create(&s, &alice, json!({ "preset": "private_chat", "name": "Privé" })).await;
    let knock = create(
        &s,
        &alice,
        json!({ "preset": "private_chat", "name": "Frapper",
                "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }] }),
    )
    .await;
    let readable = create(
        &s,
        &alice,
        json!({ "preset": "private_chat", "name": "Lisible",
                "initial_state": [{ "type": "m.room.history_visibility", "state_key": "",
                                    "content": { "history_visibility": "world_readable" } }] }),
    )
    .await;

    // Without a token: only rooms anyone may ask to enter or read.
    for room in [&restricted, &private] {
        let r = summary(room.clone(), None).await;
        assert_err(&r, 404, "M_NOT_FOUND");
        assert!(r.1.get("name").is_none() && r.1.get("topic").is_none(), "{}", r.1);
    }
    assert_err(&summary("#restreint:localhost".into(), None).await, 404, "M_NOT_FOUND");
    assert_eq!(summary(knock.clone(), None).await.1["name"], "Frapper");
    let (st, r) = summary(readable.clone(), None).await;
    assert_eq!((st.as_u16(), &r["world_readable"]), (200, &json!(true)), "{r}");
    assert!(r.get("membership").is_none(), "no membership without a token");
    // Same answer as for a room that does not exist.
    let missing = summary("!nowhere:localhost".into(), None).await;
    assert_eq!(missing.1["error"], summary(private.clone(), None).await.1["error"]);

    // Bob, not in the allowed room: not found; once joined to it: the restricted room shows.
    assert_err(&summary(restricted.clone(), Some(bob.token.clone())).await, 404, "M_NOT_FOUND");
    invite(&s, &alice, &parent, &bob).await;
    join(&s, &bob, &parent).await;
    let (st, r) = summary(restricted.clone(), Some(bob.token.clone())).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["topic"], "secret topic");
    assert_eq!(r["membership"], "leave");
    assert_eq!(r["allowed_room_ids"], json!([parent]));
    // An invitee sees the private room; the unstable paths answer the same.
    assert_err(&summary(private.clone(), Some(bob.token.clone())).await, 404, "M_NOT_FOUND");
    invite(&s, &alice, &private, &bob).await;
    let (st, r) = summary(private.clone(), Some(bob.token.clone())).await;
    assert_eq!((st.as_u16(), &r["membership"]), (200, &json!("invite")), "{r}");
    for p in [
        format!("/_matrix/client/unstable/im.nheko.summary/summary/{}", enc(&private)),
        format!("/_matrix/client/unstable/im.nheko.summary/rooms/{}/summary", enc(&private)),
    ] {
        assert_eq!(s.get(&p, Some(&bob.token)).await.1["name"], "Privé");
        assert_err(&s.get(&p, None).await, 404, "M_NOT_FOUND");
    }

    // publicRooms lists published rooms only, whatever their join rule.
    let unpublished = create(&s, &alice, json!({ "preset": "public_chat", "name": "Pas publié" })).await;
    let published =
        create(&s, &alice, json!({ "preset": "public_chat", "visibility": "public", "name": "Publié" })).await;
    let (_, list) = s.get("/_matrix/client/v3/publicRooms", None).await;
    let ids: Vec<&str> = list["chunk"].as_array().unwrap().iter().filter_map(|r| r["room_id"].as_str()).collect();
    assert_eq!(ids, vec![published.as_str()], "{list}");
    assert!(!ids.contains(&unpublished.as_str()));
    s.stop().await;
}

// ---- 10. cross-signing --------------------------------------------------------------------

#[tokio::test]
async fn cross_signing_signatures_are_stored_and_verified() {
    let s = TestServer::start().await;
    let alice = s.register("cs_alice", false).await;
    let bob = s.register("cs_bob", false).await;
    let (kd, km) = (key(41), key(42));
    let (st, v) = s
        .post("/_matrix/client/v3/keys/upload", Some(&alice.token), json!({ "device_keys": device_keys(&alice, &kd) }))
        .await;
    assert_eq!(st, 200, "{v}");
    let master = cross_key(&alice, "master", &km);
    let mid = format!("ed25519:{}", public(&km));
    let did = format!("ed25519:{}", alice.device_id);
    let upload_path = "/_matrix/client/v3/keys/device_signing/upload";
    assert_eq!(s.post(upload_path, Some(&alice.token), json!({ "master_key": master })).await.0, 200);

    // A valid device signature of the master key (which has no `signatures` yet) is stored.
    let mut signed = master.clone();
    sign(&mut signed, &alice.user_id, &did, &kd);
    let (st, v) = s
        .post(
            "/_matrix/client/v3/keys/signatures/upload",
            Some(&alice.token),
            json!({ &alice.user_id: { public(&km): signed } }),
        )
        .await;
    assert_eq!((st.as_u16(), &v["failures"]), (200, &json!({})), "{v}");
    let q = query_keys(&s, &bob, &alice.user_id).await;
    let stored_sig = q["master_keys"][&alice.user_id]["signatures"][&alice.user_id][&did].clone();
    assert_eq!(stored_sig, signed["signatures"][&alice.user_id][&did], "{q}");

    // Re-uploading the same master key with an extra signature that does not verify is
    // refused, with or without UIA, and nothing of it is served.
    let mut forged = master.clone();
    forged["signatures"] = json!({ &alice.user_id: { &did: b64(&[1u8; 64]) } });
    assert_err(
        &s.post(upload_path, Some(&alice.token), json!({ "master_key": forged })).await,
        400,
        "M_INVALID_SIGNATURE",
    );
    let mut other_device = master.clone();
    sign(&mut other_device, &alice.user_id, "ed25519:NOSUCHDEVICE", &key(43));
    assert_err(
        &s.post(upload_path, Some(&alice.token), json!({ "master_key": other_device })).await,
        400,
        "M_INVALID_SIGNATURE",
    );
    let mut by_bob = master.clone();
    sign(&mut by_bob, &bob.user_id, &format!("ed25519:{}", bob.device_id), &key(44));
    assert_err(
        &s.post(upload_path, Some(&alice.token), json!({ "master_key": by_bob })).await,
        400,
        "M_INVALID_SIGNATURE",
    );
    let q = query_keys(&s, &bob, &alice.user_id).await;
    assert_eq!(q["master_keys"][&alice.user_id]["signatures"], json!({ &alice.user_id: { &did: stored_sig } }), "{q}");

    // The same key with what is stored (or less) changes nothing and needs no UIA.
    assert_eq!(s.post(upload_path, Some(&alice.token), json!({ "master_key": master })).await.0, 200);
    let mut again = master.clone();
    again["signatures"] = json!({ &alice.user_id: { &did: stored_sig } });
    assert_eq!(s.post(upload_path, Some(&alice.token), json!({ "master_key": again })).await.0, 200);
    // A valid new signature (the master key's own) is a change: UIA first, then stored, with
    // the device signature stored before (the upload does not repeat it).
    let mut self_signed = master.clone();
    sign(&mut self_signed, &alice.user_id, &mid, &km);
    let (st, ch) = s.post(upload_path, Some(&alice.token), json!({ "master_key": self_signed })).await;
    assert_eq!(st, 401, "{ch}");
    let q = query_keys(&s, &bob, &alice.user_id).await;
    assert!(q["master_keys"][&alice.user_id]["signatures"][&alice.user_id].get(&mid).is_none(), "not before UIA");
    let (st, v) = s
        .post(
            upload_path,
            Some(&alice.token),
            json!({ "master_key": self_signed, "auth": password_auth(&ch["session"], &alice.user_id, PASSWORD) }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let q = query_keys(&s, &bob, &alice.user_id).await;
    let both = json!({ &alice.user_id: { &did: stored_sig, &mid: self_signed["signatures"][&alice.user_id][&mid] } });
    assert_eq!(q["master_keys"][&alice.user_id]["signatures"], both, "{q}");
    s.stop().await;
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

// ---- 12. smaller ones ---------------------------------------------------------------------

#[tokio::test]
async fn third_party_identifiers() {
    let s = TestServer::start().await;
    let u = s.register("tp_alice", false).await;
    assert_err(&s.get("/_matrix/client/v3/account/3pid", None).await, 401, "M_MISSING_TOKEN");
    let (st, v) = s.get("/_matrix/client/v3/account/3pid", Some(&u.token)).await;
    assert_eq!((st.as_u16(), v), (200, json!({ "threepids": [] })));
    let creds = json!({ "client_secret": "d0nt", "sid": "abc123" });
    for p in ["/_matrix/client/v3/account/3pid/add", "/_matrix/client/v3/account/3pid/bind"] {
        assert_err(&s.post(p, Some(&u.token), creds.clone()).await, 400, "M_THREEPID_AUTH_FAILED");
    }
    let (st, v) = s
        .post(
            "/_matrix/client/v3/account/3pid/delete",
            Some(&u.token),
            json!({ "medium": "email", "address": "a@b.c" }),
        )
        .await;
    assert_eq!((st.as_u16(), &v["id_server_unbind_result"]), (200, &json!("no-support")), "{v}");
    let (st, v) = s
        .post(
            "/_matrix/client/v3/account/3pid/email/requestToken",
            None,
            json!({ "client_secret": "d0nt", "email": "a@b.c", "send_attempt": 1 }),
        )
        .await;
    assert_eq!((st.as_u16(), &v["errcode"]), (400, &json!("M_THREEPID_MEDIUM_NOT_SUPPORTED")), "{v}");
    s.stop().await;
}

#[tokio::test]
async fn media_range_end_past_u64_is_the_end() {
    let s = TestServer::start().await;
    let u = s.register("mr_alice", false).await;
    let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let (st, v) = crate::media::upload(&s, Some(&u.token), "application/octet-stream", None, data.clone()).await;
    assert_eq!(st, 200, "{v}");
    let mxc = v["content_uri"].as_str().unwrap().strip_prefix("mxc://").unwrap().to_owned();
    for (range, from) in [
        ("bytes=10-18446744073709551615", 10usize),
        ("bytes=0-99999999999999999999999999", 0),
        ("bytes=-99999999999999999999", 0),
    ] {
        let r = s
            .http
            .get(format!("{}/_matrix/client/v1/media/download/{mxc}", s.base))
            .bearer_auth(&u.token)
            .header("range", range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(r.headers()["content-range"].to_str().unwrap(), format!("bytes {from}-999/1000"));
        assert_eq!(r.bytes().await.unwrap().as_ref(), &data[from..]);
    }
    s.stop().await;
}

#[tokio::test]
async fn keys_query_and_claim_understand_ports() {
    // A server whose own name carries a port: its users are local.
    let s = TestServer::start_with(|c| c.server_name = "localhost:8448".into()).await;
    let alice = s.register("kp_alice", false).await;
    assert_eq!(alice.user_id, "@kp_alice:localhost:8448");
    let kd = key(51);
    let (st, v) = s
        .post("/_matrix/client/v3/keys/upload", Some(&alice.token), json!({ "device_keys": device_keys(&alice, &kd) }))
        .await;
    assert_eq!(st, 200, "{v}");
    let remote = ["@u:example.org:8448", "@u:[::1]:8448", "@u:192.0.2.1:8448", "@u:example.org"];
    let mut wanted = json!({ &alice.user_id: [] });
    for r in remote {
        wanted[r] = json!([]);
    }
    let (st, q) = s.post("/_matrix/client/v3/keys/query", Some(&alice.token), json!({ "device_keys": wanted })).await;
    assert_eq!(st, 200, "{q}");
    assert!(q["device_keys"][&alice.user_id][&alice.device_id].is_object(), "local user is local: {q}");
    let mut failures: Vec<&String> = q["failures"].as_object().unwrap().keys().collect();
    failures.sort();
    assert_eq!(failures, vec!["192.0.2.1:8448", "[::1]:8448", "example.org", "example.org:8448"], "{q}");

    let mut claim = json!({});
    for r in remote {
        claim[r] = json!({ "DEV": "signed_curve25519" });
    }
    let (st, c) = s.post("/_matrix/client/v3/keys/claim", Some(&alice.token), json!({ "one_time_keys": claim })).await;
    assert_eq!(st, 200, "{c}");
    let mut failures: Vec<&String> = c["failures"].as_object().unwrap().keys().collect();
    failures.sort();
    assert_eq!(failures, vec!["192.0.2.1:8448", "[::1]:8448", "example.org", "example.org:8448"], "{c}");
    assert_err(
        &s.post("/_matrix/client/v3/keys/claim", Some(&alice.token), json!({ "one_time_keys": { "nobody": {} } }))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    s.stop().await;
}

#[tokio::test]
async fn second_identical_reaction_is_refused() {
    let s = TestServer::start().await;
    let alice = s.register("re_alice", false).await;
    let bob = s.register("re_bob", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    join(&s, &bob, &room).await;
    let (_, m) = send(&s, &alice, &room, "m.room.message", "m1", json!({ "msgtype": "m.text", "body": "hi" })).await;
    let target = m["event_id"].as_str().unwrap().to_owned();
    let thumbs = json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": target, "key": "👍" } });

    let (st, first) = send(&s, &alice, &room, "m.reaction", "r1", thumbs.clone()).await;
    assert_eq!(st, 200, "{first}");
    // A retry of the same transaction is answered with the same event, not refused.
    let (st, retry) = send(&s, &alice, &room, "m.reaction", "r1", thumbs.clone()).await;
    assert_eq!((st.as_u16(), &retry["event_id"]), (200, &first["event_id"]));
    // The same annotation again: refused.
    assert_err(&send(&s, &alice, &room, "m.reaction", "r2", thumbs.clone()).await, 400, "M_DUPLICATE_ANNOTATION");
    // Another key, or another sender: fine.
    let heart = json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": target, "key": "❤️" } });
    assert_eq!(send(&s, &alice, &room, "m.reaction", "r3", heart).await.0, 200);
    assert_eq!(send(&s, &bob, &room, "m.reaction", "r1", thumbs.clone()).await.0, 200);
    // Once redacted, the annotation may be sent again.
    let first_id = first["event_id"].as_str().unwrap();
    let (st, v) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/redact/{}/x1", enc(&room), enc(first_id)),
            Some(&alice.token),
            json!({}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(send(&s, &alice, &room, "m.reaction", "r4", thumbs).await.0, 200);
    s.stop().await;
}

// ---- property tests: user IDs and server names as keys/query reads them -------------------

fn server_name() -> impl Strategy<Value = String> {
    let label = "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?";
    let dns = proptest::collection::vec(label, 1..4).prop_map(|l| l.join("."));
    let ipv4 = (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}"));
    let ipv6 = any::<[u16; 8]>().prop_map(|p| format!("[{}]", std::net::Ipv6Addr::from(p)));
    let host = prop_oneof![dns, ipv4, ipv6];
    (host, proptest::option::of(1u16..)).prop_map(|(h, port)| match port {
        Some(p) => format!("{h}:{p}"),
        None => h,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever a client sends as a user ID, parsing never panics, and a server name it finds
    /// is the user ID's tail after the localpart.
    #[test]
    fn user_server_never_panics(s in any::<String>()) {
        if let Some(server) = parvis::e2ee::user_server(&s) {
            prop_assert!(s.starts_with('@'));
            prop_assert!(s.ends_with(server));
            prop_assert_eq!(s.as_bytes()[s.len() - server.len() - 1], b':');
        }
    }

    /// Also for inputs shaped like user IDs, colons and brackets included.
    #[test]
    fn user_server_never_panics_on_id_like_input(s in "@[a-z0-9:\\[\\]._=-]{0,40}") {
        let _ = parvis::e2ee::user_server(&s);
    }

    /// Valid user IDs round-trip: the server name comes back whole, port included.
    #[test]
    fn valid_user_ids_round_trip(local in "[a-z0-9._=/+-]{1,20}", server in server_name()) {
        let user = format!("@{local}:{server}");
        prop_assert_eq!(parvis::e2ee::user_server(&user), Some(server.as_str()));
    }
}
