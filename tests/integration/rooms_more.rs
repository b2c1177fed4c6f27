//! Relations, threads, context, directories, reports, summaries, knocking, restricted joins,
//! upgrades.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

async fn send(s: &TestServer, u: &User, room: &str, kind: &str, txn: &str, content: Value) -> String {
    let (st, v) =
        s.put(&format!("/_matrix/client/v3/rooms/{}/send/{kind}/{txn}", enc(room)), Some(&u.token), content).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["event_id"].as_str().unwrap().to_owned()
}

async fn join(s: &TestServer, u: &User, room: &str) -> (StatusCode, Value) {
    s.post(&format!("/_matrix/client/v3/join/{}", enc(room)), Some(&u.token), json!({})).await
}

#[tokio::test]
async fn relations_threads_edits_and_context() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    let r = enc(&room);
    join(&s, &bob, &room).await;
    let root =
        send(&s, &alice, &room, "m.room.message", "root", json!({ "msgtype": "m.text", "body": "Réunion à 14h" }))
            .await;
    // An edit by the sender, and an "edit" by someone else that must not count.
    let edit = send(
        &s,
        &alice,
        &room,
        "m.room.message",
        "edit",
        json!({
            "msgtype": "m.text", "body": "* Réunion à 15h",
            "m.new_content": { "msgtype": "m.text", "body": "Réunion à 15h" },
            "m.relates_to": { "rel_type": "m.replace", "event_id": root }
        }),
    )
    .await;
    send(
        &s,
        &bob,
        &room,
        "m.room.message",
        "fake-edit",
        json!({
            "msgtype": "m.text", "body": "* hacked", "m.new_content": { "msgtype": "m.text", "body": "hacked" },
            "m.relates_to": { "rel_type": "m.replace", "event_id": root }
        }),
    )
    .await;
    let reaction = send(
        &s,
        &bob,
        &room,
        "m.reaction",
        "react",
        json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": root, "key": "👍" } }),
    )
    .await;
    let mut replies = Vec::new();
    for i in 0..3 {
        replies.push(send(&s, &bob, &room, "m.room.message", &format!("t{i}"), json!({
            "msgtype": "m.text", "body": format!("reply {i}"),
            "m.relates_to": { "rel_type": "m.thread", "event_id": root, "is_falling_back": true, "m.in_reply_to": { "event_id": root } }
        })).await);
    }
    let reference = send(&s, &alice, &room, "m.room.message", "ref", json!({ "msgtype": "m.text", "body": "see above", "m.relates_to": { "rel_type": "m.reference", "event_id": root } })).await;

    // Bundled aggregations on /event and /messages.
    let (_, ev) = s.get(&format!("/_matrix/client/v3/rooms/{r}/event/{}", enc(&root)), Some(&bob.token)).await;
    let rel = &ev["unsigned"]["m.relations"];
    assert_eq!(rel["m.replace"]["event_id"], edit.as_str(), "{ev}");
    assert_eq!(rel["m.thread"]["count"], 3);
    assert_eq!(rel["m.thread"]["latest_event"]["event_id"], replies[2].as_str());
    assert_eq!(rel["m.thread"]["current_user_participated"], true);
    assert_eq!(rel["m.reference"]["chunk"], json!([{ "event_id": reference }]));
    let (_, page) = s.get(&format!("/_matrix/client/v3/rooms/{r}/messages?dir=b&limit=50"), Some(&alice.token)).await;
    let root_in_page = page["chunk"].as_array().unwrap().iter().find(|e| e["event_id"] == root.as_str()).unwrap();
    assert_eq!(root_in_page["unsigned"]["m.relations"]["m.thread"]["count"], 3);

    // /relations, with type filters and pagination.
    let (st, all) = s.get(&format!("/_matrix/client/v1/rooms/{r}/relations/{}", enc(&root)), Some(&alice.token)).await;
    assert_eq!(st, 200, "{all}");
    assert_eq!(all["chunk"].as_array().unwrap().len(), 7);
    let (_, threads_only) = s
        .get(&format!("/_matrix/client/v1/rooms/{r}/relations/{}/m.thread?limit=2", enc(&root)), Some(&alice.token))
        .await;
    let first: Vec<&str> =
        threads_only["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert_eq!(first, vec![replies[2].as_str(), replies[1].as_str()], "newest first");
    let next = threads_only["next_batch"].as_str().unwrap();
    let (_, rest) = s
        .get(
            &format!("/_matrix/client/v1/rooms/{r}/relations/{}/m.thread?limit=2&from={next}", enc(&root)),
            Some(&alice.token),
        )
        .await;
    assert_eq!(rest["chunk"][0]["event_id"], replies[0].as_str());
    assert!(rest.get("next_batch").is_none());
    let (_, reactions) = s
        .get(
            &format!("/_matrix/client/v1/rooms/{r}/relations/{}/m.annotation/m.reaction", enc(&root)),
            Some(&alice.token),
        )
        .await;
    assert_eq!(reactions["chunk"][0]["event_id"], reaction.as_str());
    let eve = s.register("eve", false).await;
    assert_err(
        &s.get(&format!("/_matrix/client/v1/rooms/{r}/relations/{}", enc(&root)), Some(&eve.token)).await,
        404,
        "M_NOT_FOUND",
    );

    // Threads list.
    let (_, threads) = s.get(&format!("/_matrix/client/v1/rooms/{r}/threads"), Some(&alice.token)).await;
    assert_eq!(threads["chunk"].as_array().unwrap().len(), 1);
    assert_eq!(threads["chunk"][0]["event_id"], root.as_str());
    let (_, mine) =
        s.get(&format!("/_matrix/client/v1/rooms/{r}/threads?include=participated"), Some(&alice.token)).await;
    assert_eq!(mine["chunk"].as_array().unwrap().len(), 1, "the root's sender participates");

    // A redacted edit no longer counts.
    s.put(&format!("/_matrix/client/v3/rooms/{r}/redact/{}/red1", enc(&edit)), Some(&alice.token), json!({})).await;
    let (_, ev) = s.get(&format!("/_matrix/client/v3/rooms/{r}/event/{}", enc(&root)), Some(&bob.token)).await;
    assert!(ev["unsigned"]["m.relations"].get("m.replace").is_none(), "{ev}");

    // Context around the root.
    let (st, ctx) =
        s.get(&format!("/_matrix/client/v3/rooms/{r}/context/{}?limit=4", enc(&root)), Some(&bob.token)).await;
    assert_eq!(st, 200, "{ctx}");
    assert_eq!(ctx["event"]["event_id"], root.as_str());
    assert_eq!(ctx["events_before"].as_array().unwrap().len(), 2);
    assert_eq!(ctx["events_after"].as_array().unwrap().len(), 2);
    assert_eq!(ctx["events_after"][0]["event_id"], edit.as_str());
    assert!(ctx["state"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.create"));
    // Paginating from the context's end continues right after it.
    let end = ctx["end"].as_str().unwrap();
    let (_, more) = s
        .get(&format!("/_matrix/client/v3/rooms/{r}/messages?dir=f&limit=1&from={}", enc(end)), Some(&bob.token))
        .await;
    assert_eq!(more["chunk"][0]["event_id"], reaction.as_str());
    assert_err(
        &s.get(&format!("/_matrix/client/v3/rooms/{r}/context/{}", enc("$missing")), Some(&bob.token)).await,
        404,
        "M_NOT_FOUND",
    );

    // timestamp_to_event.
    let (_, rootev) = s.get(&format!("/_matrix/client/v3/rooms/{r}/event/{}", enc(&root)), Some(&bob.token)).await;
    let ts = rootev["origin_server_ts"].as_i64().unwrap();
    let (st, found) =
        s.get(&format!("/_matrix/client/v1/rooms/{r}/timestamp_to_event?ts={ts}&dir=b"), Some(&bob.token)).await;
    assert_eq!(st, 200, "{found}");
    assert!(found["origin_server_ts"].as_i64().unwrap() <= ts);
    let (_, future) = s
        .get(&format!("/_matrix/client/v1/rooms/{r}/timestamp_to_event?ts={}&dir=f", ts + 3_600_000), Some(&bob.token))
        .await;
    assert_eq!(future["errcode"], "M_NOT_FOUND");
    assert_err(
        &s.get(&format!("/_matrix/client/v1/rooms/{r}/timestamp_to_event?ts=1&dir=x"), Some(&bob.token)).await,
        400,
        "M_INVALID_PARAM",
    );
    s.stop().await;
}

#[tokio::test]
async fn public_directory_user_directory_reports_and_summaries() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    s.put(
        "/_matrix/client/v3/profile/@alice:localhost/displayname",
        Some(&alice.token),
        json!({ "displayname": "Hélène Martin" }),
    )
    .await;

    let pub1 = create(
        &s,
        &alice,
        json!({ "visibility": "public", "name": "Équipe voirie", "topic": "Routes", "room_alias_name": "voirie" }),
    )
    .await;
    let pub2 = create(&s, &alice, json!({ "visibility": "public", "name": "Accueil" })).await;
    let private = create(&s, &alice, json!({ "name": "Secret" })).await;
    join(&s, &bob, &pub2).await;

    let (st, dir) = s.get("/_matrix/client/v3/publicRooms", None).await;
    assert_eq!(st, 200, "{dir}");
    let ids: Vec<&str> = dir["chunk"].as_array().unwrap().iter().map(|r| r["room_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![pub2.as_str(), pub1.as_str()], "most members first, private rooms absent");
    assert_eq!(dir["chunk"][1]["canonical_alias"], "#voirie:localhost");
    assert_eq!(dir["chunk"][0]["num_joined_members"], 2);
    assert_eq!(dir["total_room_count_estimate"], 2);
    // Search ignores accents and case; pagination.
    let (_, found) = s
        .post(
            "/_matrix/client/v3/publicRooms",
            Some(&bob.token),
            json!({ "filter": { "generic_search_term": "EQUIPE" } }),
        )
        .await;
    assert_eq!(found["chunk"].as_array().unwrap().len(), 1);
    assert_eq!(found["chunk"][0]["room_id"], pub1.as_str());
    let (_, p1) = s.get("/_matrix/client/v3/publicRooms?limit=1", None).await;
    let (_, p2) = s
        .get(&format!("/_matrix/client/v3/publicRooms?limit=1&since={}", p1["next_batch"].as_str().unwrap()), None)
        .await;
    assert_eq!(p2["chunk"][0]["room_id"], pub1.as_str());
    assert_err(&s.get("/_matrix/client/v3/publicRooms?since=zzz", None).await, 400, "M_INVALID_PARAM");

    // Directory visibility: the creator may publish, others may not.
    let (_, v) = s.get(&format!("/_matrix/client/v3/directory/list/room/{}", enc(&private)), None).await;
    assert_eq!(v["visibility"], "private");
    assert_eq!(
        s.put(
            &format!("/_matrix/client/v3/directory/list/room/{}", enc(&private)),
            Some(&alice.token),
            json!({ "visibility": "public" })
        )
        .await
        .0,
        200
    );
    let (_, v) = s.get(&format!("/_matrix/client/v3/directory/list/room/{}", enc(&private)), None).await;
    assert_eq!(v["visibility"], "public");
    assert_err(
        &s.put(
            &format!("/_matrix/client/v3/directory/list/room/{}", enc(&pub2)),
            Some(&bob.token),
            json!({ "visibility": "private" }),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );

    // User directory: "helene" finds "Hélène"; a stranger in no shared room is not found.
    let (st, res) =
        s.post("/_matrix/client/v3/user_directory/search", Some(&bob.token), json!({ "search_term": "helene" })).await;
    assert_eq!(st, 200, "{res}");
    assert_eq!(res["results"][0]["user_id"], "@alice:localhost");
    assert_eq!(res["results"][0]["display_name"], "Hélène Martin");
    s.register("stranger", false).await;
    let (_, res) =
        s.post("/_matrix/client/v3/user_directory/search", Some(&bob.token), json!({ "search_term": "strang" })).await;
    assert_eq!(res["results"], json!([]));
    assert_err(
        &s.post("/_matrix/client/v3/user_directory/search", Some(&bob.token), json!({})).await,
        400,
        "M_BAD_JSON",
    );

    // Reports.
    let ev = send(&s, &alice, &pub2, "m.room.message", "x", json!({ "msgtype": "m.text", "body": "spam?" })).await;
    assert_eq!(
        s.post(
            &format!("/_matrix/client/v3/rooms/{}/report/{}", enc(&pub2), enc(&ev)),
            Some(&bob.token),
            json!({ "reason": "spam", "score": -100 })
        )
        .await
        .0,
        200
    );
    assert_err(
        &s.post(
            &format!("/_matrix/client/v3/rooms/{}/report/{}", enc(&pub2), enc("$nope")),
            Some(&bob.token),
            json!({}),
        )
        .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.post(
            &format!("/_matrix/client/v3/rooms/{}/report/{}", enc(&pub2), enc(&ev)),
            Some(&bob.token),
            json!({ "score": 5 }),
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_eq!(
        s.post(
            &format!("/_matrix/client/v3/rooms/{}/report", enc(&pub1)),
            Some(&bob.token),
            json!({ "reason": "off-topic" })
        )
        .await
        .0,
        200
    );
    // Moderators read them through the Synapse-compatible admin API; others may not.
    let admin = s.register("moderateur", true).await;
    let (st, reports) = s.get("/_synapse/admin/v1/event_reports", Some(&admin.token)).await;
    assert_eq!(st, 200, "{reports}");
    assert_eq!(reports["total"], 2);
    assert_eq!(reports["event_reports"][0]["room_id"], pub1.as_str(), "newest first");
    assert_eq!(reports["event_reports"][1]["event_id"], ev.as_str());
    assert_eq!(reports["event_reports"][1]["reason"], "spam");
    assert_eq!(reports["event_reports"][1]["user_id"], bob.user_id.as_str());
    let (_, page) = s.get("/_synapse/admin/v1/event_reports?limit=1", Some(&admin.token)).await;
    assert_eq!(page["next_token"], 1);
    let (_, only) =
        s.get(&format!("/_synapse/admin/v1/event_reports?room_id={}", enc(&pub2)), Some(&admin.token)).await;
    assert_eq!(only["total"], 1);
    assert_err(&s.get("/_synapse/admin/v1/event_reports", Some(&bob.token)).await, 403, "M_FORBIDDEN");
    assert_err(&s.get("/_synapse/admin/v1/event_reports?limit=0", Some(&admin.token)).await, 400, "M_INVALID_PARAM");

    // Room summaries: public rooms for anyone, private rooms only for members.
    let (st, sum) = s.get(&format!("/_matrix/client/v1/room_summary/{}", enc("#voirie:localhost")), None).await;
    assert_eq!(st, 200, "{sum}");
    assert_eq!(sum["room_id"], pub1.as_str());
    assert_eq!(sum["name"], "Équipe voirie");
    assert_eq!(sum["join_rule"], "public");
    let secret = create(&s, &alice, json!({ "name": "Vraiment secret" })).await;
    assert_err(
        &s.get(&format!("/_matrix/client/v1/room_summary/{}", enc(&secret)), Some(&bob.token)).await,
        404,
        "M_NOT_FOUND",
    );
    let (_, mine) = s.get(&format!("/_matrix/client/v1/room_summary/{}", enc(&secret)), Some(&alice.token)).await;
    assert_eq!(mine["membership"], "join");
    s.stop().await;
}

#[tokio::test]
async fn knocking_restricted_joins_and_upgrades() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let carol = s.register("carol", false).await;

    // Knock: allowed on knock rooms, refused elsewhere; the knocker can then be invited.
    let knock_room = create(
        &s,
        &alice,
        json!({ "initial_state": [{ "type": "m.room.join_rules", "content": { "join_rule": "knock" } }] }),
    )
    .await;
    let (st, k) = s
        .post(
            &format!("/_matrix/client/v3/knock/{}", enc(&knock_room)),
            Some(&bob.token),
            json!({ "reason": "please" }),
        )
        .await;
    assert_eq!(st, 200, "{k}");
    let (_, m) = s
        .get(&format!("/_matrix/client/v3/rooms/{}/members?membership=knock", enc(&knock_room)), Some(&alice.token))
        .await;
    assert_eq!(m["chunk"][0]["state_key"], "@bob:localhost");
    assert_eq!(
        s.post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&knock_room)),
            Some(&alice.token),
            json!({ "user_id": bob.user_id })
        )
        .await
        .0,
        200
    );
    assert_eq!(join(&s, &bob, &knock_room).await.0, 200);
    let invite_only = create(&s, &alice, json!({})).await;
    assert_err(
        &s.post(&format!("/_matrix/client/v3/knock/{}", enc(&invite_only)), Some(&carol.token), json!({})).await,
        403,
        "M_FORBIDDEN",
    );

    // Restricted: members of the space may join, others may not.
    let space = create(&s, &alice, json!({ "creation_content": { "type": "m.space" } })).await;
    s.post(
        &format!("/_matrix/client/v3/rooms/{}/invite", enc(&space)),
        Some(&alice.token),
        json!({ "user_id": bob.user_id }),
    )
    .await;
    join(&s, &bob, &space).await;
    let restricted = create(
        &s,
        &alice,
        json!({ "initial_state": [{ "type": "m.room.join_rules", "content": {
        "join_rule": "restricted", "allow": [{ "type": "m.room_membership", "room_id": space }] } }] }),
    )
    .await;
    let (st, j) = join(&s, &bob, &restricted).await;
    assert_eq!(st, 200, "{j}");
    let (_, member) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&restricted), enc(&bob.user_id)),
            Some(&bob.token),
        )
        .await;
    assert_eq!(member["join_authorised_via_users_server"], "@alice:localhost");
    assert_err(&join(&s, &carol, &restricted).await, 403, "M_FORBIDDEN");

    // Upgrade: tombstone, predecessor, copied state, moved alias, old room restricted.
    let old = create(
        &s,
        &alice,
        json!({ "room_version": "10", "preset": "public_chat", "name": "Conseil", "room_alias_name": "conseil" }),
    )
    .await;
    join(&s, &bob, &old).await;
    assert_err(
        &s.post(
            &format!("/_matrix/client/v3/rooms/{}/upgrade", enc(&old)),
            Some(&bob.token),
            json!({ "new_version": "12" }),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.post(
            &format!("/_matrix/client/v3/rooms/{}/upgrade", enc(&old)),
            Some(&alice.token),
            json!({ "new_version": "99" }),
        )
        .await,
        400,
        "M_UNSUPPORTED_ROOM_VERSION",
    );
    let (st, up) = s
        .post(
            &format!("/_matrix/client/v3/rooms/{}/upgrade", enc(&old)),
            Some(&alice.token),
            json!({ "new_version": "12" }),
        )
        .await;
    assert_eq!(st, 200, "{up}");
    let new = up["replacement_room"].as_str().unwrap();
    let (_, tomb) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.tombstone/", enc(&old)), Some(&alice.token)).await;
    assert_eq!(tomb["replacement_room"], new);
    let (_, create_ev) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.create/", enc(new)), Some(&alice.token)).await;
    assert_eq!(create_ev["predecessor"]["room_id"], old.as_str());
    assert_eq!(create_ev["room_version"], "12");
    let (_, name) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(new)), Some(&alice.token)).await;
    assert_eq!(name["name"], "Conseil");
    let (_, jr) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.join_rules/", enc(new)), Some(&alice.token)).await;
    assert_eq!(jr["join_rule"], "public");
    let (_, alias) = s.get(&format!("/_matrix/client/v3/directory/room/{}", enc("#conseil:localhost")), None).await;
    assert_eq!(alias["room_id"], new);
    // Bob can no longer talk in the old room, but can follow to the new one.
    let (st, _) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/late", enc(&old)),
            Some(&bob.token),
            json!({ "msgtype": "m.text", "body": "hello?" }),
        )
        .await;
    assert_eq!(st, 403);
    assert_eq!(join(&s, &bob, new).await.0, 200);
    s.stop().await;
}

/// From room version 12 a room ID is the hash of its create event: rooms created at once by the
/// same user with the same options must still get distinct IDs.
#[tokio::test]
async fn concurrent_identical_creates_get_distinct_rooms() {
    let s = TestServer::start().await;
    let u = s.register("twins", false).await;
    let body = serde_json::json!({ "preset": "public_chat" });
    let creates = (0..8).map(|_| s.post("/_matrix/client/v3/createRoom", Some(&u.token), body.clone()));
    let results = futures_util::future::join_all(creates).await;
    let mut ids: Vec<String> = results
        .iter()
        .map(|(st, v)| {
            assert_eq!(*st, 200, "{v}");
            v["room_id"].as_str().unwrap().to_owned()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8);
    s.stop().await;
}
