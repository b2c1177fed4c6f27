//! History visibility per event (the spec's algorithm) on every read path: `/messages`, `/event`,
//! `/context`, `/relations`, `/threads`, bundled aggregations, `/state`, `/members` and `/sync`
//! (joined rooms after a rejoin, the leave section); events of ignored users; pagination tokens.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;
use crate::sync::{send_text, sync};

fn room_path(room: &str, rest: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/{rest}", enc(room))
}

/// A public room (anyone may join) with the given history visibility.
async fn room_with(s: &TestServer, owner: &User, visibility: &str) -> String {
    create(
        s,
        owner,
        json!({
            "preset": "public_chat",
            "initial_state": [{ "type": "m.room.history_visibility", "state_key": "",
                                "content": { "history_visibility": visibility } }],
        }),
    )
    .await
}

async fn set_visibility(s: &TestServer, u: &User, room: &str, visibility: &str) {
    let (st, v) = s
        .put(
            &room_path(room, "state/m.room.history_visibility/"),
            Some(&u.token),
            json!({ "history_visibility": visibility }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
}

async fn act(s: &TestServer, u: &User, room: &str, action: &str, body: Value) {
    let (st, v) = s.post(&room_path(room, action), Some(&u.token), body).await;
    assert_eq!(st, 200, "{action}: {v}");
}

/// Message bodies of a list of client events.
pub(crate) fn bodies(events: &Value) -> Vec<String> {
    events
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {events}"))
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

/// Every message body `u` gets from `/messages` paging backwards from the end (oldest first).
async fn all_messages(s: &TestServer, u: &User, room: &str) -> Vec<String> {
    let (st, v) = s.get(&room_path(room, "messages?dir=b&limit=1000"), Some(&u.token)).await;
    assert_eq!(st, 200, "{v}");
    let mut b = bodies(&v["chunk"]);
    b.reverse();
    b
}

async fn event_status(s: &TestServer, u: &User, room: &str, event_id: &str) -> StatusCode {
    s.get(&room_path(room, &format!("event/{}", enc(event_id))), Some(&u.token)).await.0
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// A member who left and rejoined: the gap is hidden under `joined` and `invited`, visible under
/// `shared` (they are joined now) — in `/messages`, `/event`, `/context` and an initial `/sync`.
async fn rejoin_gap(srv: &TestServer, visibility: &str, gap_visible: bool) {
    let alice = srv.register(&format!("gap_a_{visibility}"), false).await;
    let bob = srv.register(&format!("gap_b_{visibility}"), false).await;
    let room = room_with(srv, &alice, visibility).await;
    act(srv, &bob, &room, "join", json!({})).await;
    send_text(srv, &alice, &room, "m1").await;
    act(srv, &bob, &room, "leave", json!({})).await;
    let gap = send_text(srv, &alice, &room, "gap").await;
    act(srv, &bob, &room, "join", json!({})).await;
    let m2 = send_text(srv, &alice, &room, "m2").await;

    let want = if gap_visible { s(&["m1", "gap", "m2"]) } else { s(&["m1", "m2"]) };
    assert_eq!(all_messages(srv, &bob, &room).await, want, "{visibility}: /messages");
    let gap_status = event_status(srv, &bob, &room, &gap).await;
    assert_eq!(gap_status == 200, gap_visible, "{visibility}: /event of the gap: {gap_status}");
    // The sender always sees everything.
    assert_eq!(all_messages(srv, &alice, &room).await, s(&["m1", "gap", "m2"]));

    let (st, ctx) = srv.get(&room_path(&room, &format!("context/{}?limit=20", enc(&m2))), Some(&bob.token)).await;
    assert_eq!(st, 200, "{ctx}");
    let mut before = bodies(&ctx["events_before"]);
    before.reverse();
    let want_before: Vec<String> = want.iter().filter(|b| *b != "m2").cloned().collect();
    assert_eq!(before, want_before, "{visibility}: /context");
    let ctx_gap = srv.get(&room_path(&room, &format!("context/{}", enc(&gap))), Some(&bob.token)).await;
    assert_eq!(ctx_gap.0 == 200, gap_visible, "{visibility}: /context of the gap: {}", ctx_gap.1);

    let v = sync(srv, &bob, None, None, 0).await;
    let tl = &v["rooms"]["join"][&room]["timeline"]["events"];
    assert_eq!(bodies(tl), want, "{visibility}: initial sync {v}");
}

#[tokio::test]
async fn rejoin_does_not_leak_the_gap() {
    let srv = TestServer::start().await;
    rejoin_gap(&srv, "joined", false).await;
    rejoin_gap(&srv, "invited", false).await;
    rejoin_gap(&srv, "shared", true).await;
    rejoin_gap(&srv, "world_readable", true).await;
    srv.stop().await;
}

/// An incremental sync whose token predates a leave and a rejoin: the gap stays hidden, also
/// when the room became `shared` before the rejoin (the gap was sent under `joined`).
#[tokio::test]
async fn incremental_sync_over_a_rejoin() {
    for (cache, reopen) in [(true, false), (false, false), (true, true), (false, true)] {
        let srv = TestServer::start_with(|c| {
            if !cache {
                c.sync.room_cache_mb = 0
            }
        })
        .await;
        let alice = srv.register("inc_a", false).await;
        let bob = srv.register("inc_b", false).await;
        let room = room_with(&srv, &alice, "joined").await;
        act(&srv, &bob, &room, "join", json!({})).await;
        let t0 = sync(&srv, &bob, None, None, 0).await;
        act(&srv, &bob, &room, "leave", json!({})).await;
        send_text(&srv, &alice, &room, "gap").await;
        if reopen {
            set_visibility(&srv, &alice, &room, "shared").await;
        }
        act(&srv, &bob, &room, "join", json!({})).await;
        send_text(&srv, &alice, &room, "back").await;
        let v = sync(&srv, &bob, t0["next_batch"].as_str(), None, 0).await;
        let tl = &v["rooms"]["join"][&room]["timeline"]["events"];
        assert_eq!(bodies(tl), s(&["back"]), "cache {cache}, reopened {reopen}: {v}");
        srv.stop().await;
    }
}

/// More history than the sync cache holds: the database path of a sync timeline applies the same
/// rules (a `joined` room rejoined after 120 messages sent while away).
#[tokio::test]
async fn sync_timeline_from_the_database_hides_the_gap() {
    let srv = TestServer::start().await;
    let alice = srv.register("db_a", false).await;
    let bob = srv.register("db_b", false).await;
    let room = room_with(&srv, &alice, "joined").await;
    act(&srv, &bob, &room, "join", json!({})).await;
    send_text(&srv, &alice, &room, "seen").await;
    act(&srv, &bob, &room, "leave", json!({})).await;
    for i in 0..120 {
        send_text(&srv, &alice, &room, &format!("away {i}")).await;
    }
    act(&srv, &bob, &room, "join", json!({})).await;
    send_text(&srv, &alice, &room, "back").await;
    let filter = json!({ "room": { "timeline": { "limit": 5 } } });
    let v = sync(&srv, &bob, None, Some(&filter), 0).await;
    let tl = &v["rooms"]["join"][&room]["timeline"]["events"];
    assert_eq!(bodies(tl), s(&["seen", "back"]), "{v}");
    // The same for alice shows the latest five.
    let v = sync(&srv, &alice, None, Some(&filter), 0).await;
    assert_eq!(bodies(&v["rooms"]["join"][&room]["timeline"]["events"]).len(), 4, "{v}");
    srv.stop().await;
}

/// An invited user who never joined: `shared` history is not theirs (they never joined after
/// it), `invited` history is from their invite on, `world_readable` is everyone's.
#[tokio::test]
async fn invited_user_who_never_joined() {
    let srv = TestServer::start().await;
    for (visibility, want) in [
        ("shared", vec![]),
        ("joined", vec![]),
        ("invited", vec!["while invited"]),
        ("world_readable", vec!["before", "while invited"]),
    ] {
        let alice = srv.register(&format!("inv_a_{visibility}"), false).await;
        let bob = srv.register(&format!("inv_b_{visibility}"), false).await;
        let room = room_with(&srv, &alice, visibility).await;
        let before = send_text(&srv, &alice, &room, "before").await;
        act(&srv, &alice, &room, "invite", json!({ "user_id": bob.user_id })).await;
        let during = send_text(&srv, &alice, &room, "while invited").await;
        assert_eq!(all_messages(&srv, &bob, &room).await, s(&want), "{visibility}");
        let st = event_status(&srv, &bob, &room, &before).await;
        assert_eq!(st == 200, want.contains(&"before"), "{visibility}: /event before the invite: {st}");
        let st = event_status(&srv, &bob, &room, &during).await;
        assert_eq!(st == 200, want.contains(&"while invited"), "{visibility}: /event during the invite: {st}");
        // Their own invite is always theirs to see.
        let (_, m) = srv.get(&room_path(&room, "messages?dir=b&limit=50"), Some(&bob.token)).await;
        assert!(
            m["chunk"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.member"
                && e["state_key"] == bob.user_id.as_str()
                && e["content"]["membership"] == "invite"),
            "{visibility}: {m}"
        );
    }
    srv.stop().await;
}

/// A change of visibility mid-history applies from that event on: `shared → joined` keeps the
/// earlier events visible to a later joiner, hides those after the change; `joined → shared`
/// keeps the earlier ones hidden.
#[tokio::test]
async fn visibility_changes_apply_from_the_change_on() {
    let srv = TestServer::start().await;
    let alice = srv.register("chg_a", false).await;
    let bob = srv.register("chg_b", false).await;
    let carol = srv.register("chg_c", false).await;

    let r1 = room_with(&srv, &alice, "shared").await;
    send_text(&srv, &alice, &r1, "early").await;
    set_visibility(&srv, &alice, &r1, "joined").await;
    let late = send_text(&srv, &alice, &r1, "late").await;
    act(&srv, &bob, &r1, "join", json!({})).await;
    send_text(&srv, &alice, &r1, "after").await;
    assert_eq!(all_messages(&srv, &bob, &r1).await, s(&["early", "after"]));
    assert_eq!(event_status(&srv, &bob, &r1, &late).await, 404);
    // The visibility change itself is visible (the visibility before it allowed it).
    let (_, m) = srv.get(&room_path(&r1, "messages?dir=b&limit=50"), Some(&bob.token)).await;
    assert!(m["chunk"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.history_visibility"), "{m}");

    let r2 = room_with(&srv, &alice, "joined").await;
    send_text(&srv, &alice, &r2, "hidden").await;
    set_visibility(&srv, &alice, &r2, "shared").await;
    send_text(&srv, &alice, &r2, "shared now").await;
    act(&srv, &carol, &r2, "join", json!({})).await;
    assert_eq!(all_messages(&srv, &carol, &r2).await, s(&["shared now"]));
    srv.stop().await;
}

/// `world_readable`: anyone may read, member or not, but only what was sent while it was in
/// force; a non-member may page only while the room is world-readable (as Synapse).
#[tokio::test]
async fn world_readable_is_for_everyone_while_in_force() {
    let srv = TestServer::start().await;
    let alice = srv.register("wr_a", false).await;
    let stranger = srv.register("wr_s", false).await;
    let room = room_with(&srv, &alice, "world_readable").await;
    let open = send_text(&srv, &alice, &room, "open").await;
    assert_eq!(all_messages(&srv, &stranger, &room).await, s(&["open"]));
    set_visibility(&srv, &alice, &room, "shared").await;
    let closed = send_text(&srv, &alice, &room, "closed").await;
    assert_eq!(event_status(&srv, &stranger, &room, &open).await, 200);
    assert_eq!(event_status(&srv, &stranger, &room, &closed).await, 404);
    assert_err(&srv.get(&room_path(&room, "messages?dir=b"), Some(&stranger.token)).await, 403, "M_FORBIDDEN");
    // A member who joins later under `shared` sees both.
    act(&srv, &stranger, &room, "join", json!({})).await;
    assert_eq!(all_messages(&srv, &stranger, &room).await, s(&["open", "closed"]));

    let private = room_with(&srv, &alice, "shared").await;
    send_text(&srv, &alice, &private, "x").await;
    assert_err(&srv.get(&room_path(&private, "messages?dir=b"), Some(&stranger.token)).await, 403, "M_FORBIDDEN");
    srv.stop().await;
}

/// Relations, threads and bundled aggregations count only what the user may see.
#[tokio::test]
async fn relations_follow_visibility() {
    let srv = TestServer::start().await;
    let alice = srv.register("rel_a", false).await;
    let bob = srv.register("rel_b", false).await;
    let room = room_with(&srv, &alice, "joined").await;
    act(&srv, &bob, &room, "join", json!({})).await;
    let root = send_text(&srv, &alice, &room, "root").await;
    act(&srv, &bob, &room, "leave", json!({})).await;
    let reply = |body: &str| {
        json!({ "msgtype": "m.text", "body": body,
                "m.relates_to": { "rel_type": "m.thread", "event_id": root } })
    };
    for (i, body) in ["away 1", "away 2"].iter().enumerate() {
        let (st, v) =
            srv.put(&room_path(&room, &format!("send/m.room.message/away{i}")), Some(&alice.token), reply(body)).await;
        assert_eq!(st, 200, "{v}");
    }
    // A thread root sent while away, too.
    let hidden_root = send_text(&srv, &alice, &room, "hidden root").await;
    let (st, v) = srv
        .put(
            &room_path(&room, "send/m.room.message/hr"),
            Some(&alice.token),
            json!({ "msgtype": "m.text", "body": "r", "m.relates_to": { "rel_type": "m.thread", "event_id": hidden_root } }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    act(&srv, &bob, &room, "join", json!({})).await;
    let (st, v) = srv.put(&room_path(&room, "send/m.room.message/back"), Some(&alice.token), reply("while back")).await;
    assert_eq!(st, 200, "{v}");

    let rel_path = format!("/_matrix/client/v1/rooms/{}/relations/{}", enc(&room), enc(&root));
    let (st, rels) = srv.get(&rel_path, Some(&bob.token)).await;
    assert_eq!(st, 200, "{rels}");
    assert_eq!(bodies(&rels["chunk"]), s(&["while back"]), "{rels}");
    let (_, rels) = srv.get(&rel_path, Some(&alice.token)).await;
    assert_eq!(bodies(&rels["chunk"]).len(), 3, "{rels}");
    // Paged one at a time, bob still gets exactly what he may see.
    let (_, p1) = srv.get(&format!("{rel_path}?limit=1"), Some(&bob.token)).await;
    assert_eq!(bodies(&p1["chunk"]), s(&["while back"]), "{p1}");
    if let Some(next) = p1["next_batch"].as_str() {
        let (_, p2) = srv.get(&format!("{rel_path}?limit=1&from={}", enc(next)), Some(&bob.token)).await;
        assert!(bodies(&p2["chunk"]).is_empty(), "{p2}");
    }

    let (_, ev) = srv.get(&room_path(&room, &format!("event/{}", enc(&root))), Some(&bob.token)).await;
    let thread = &ev["unsigned"]["m.relations"]["m.thread"];
    assert_eq!(thread["count"], 1, "{ev}");
    assert_eq!(thread["latest_event"]["content"]["body"], "while back", "{ev}");
    let (_, ev) = srv.get(&room_path(&room, &format!("event/{}", enc(&root))), Some(&alice.token)).await;
    assert_eq!(ev["unsigned"]["m.relations"]["m.thread"]["count"], 3, "{ev}");

    let threads = format!("/_matrix/client/v1/rooms/{}/threads", enc(&room));
    let (_, t) = srv.get(&threads, Some(&bob.token)).await;
    let ids: Vec<&str> = t["chunk"].as_array().unwrap().iter().filter_map(|e| e["event_id"].as_str()).collect();
    assert_eq!(ids, [root.as_str()], "{t}");
    let (_, t) = srv.get(&threads, Some(&alice.token)).await;
    assert_eq!(t["chunk"].as_array().unwrap().len(), 2, "{t}");

    // Relations of a hidden event: 404.
    let hidden_rel = format!("/_matrix/client/v1/rooms/{}/relations/{}", enc(&room), enc(&hidden_root));
    assert_err(&srv.get(&hidden_rel, Some(&bob.token)).await, 404, "M_NOT_FOUND");

    // The sync bundle of the root (in bob's timeline) counts the visible reply only.
    let v = sync(&srv, &bob, None, None, 0).await;
    let tl = v["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap().clone();
    let r = tl.iter().find(|e| e["event_id"] == root.as_str()).unwrap_or_else(|| panic!("root in timeline: {v}"));
    assert_eq!(r["unsigned"]["m.relations"]["m.thread"]["count"], 1, "{r}");
    srv.stop().await;
}

/// `/sync`'s leave section: a departed member sees the timeline up to their departure and only
/// what they could see; a user banned without joining, or who rejected an invite, sees only
/// their membership event.
#[tokio::test]
async fn leave_section() {
    for cache in [true, false] {
        let srv = TestServer::start_with(|c| {
            if !cache {
                c.sync.room_cache_mb = 0
            }
        })
        .await;
        let alice = srv.register("lv_a", false).await;
        let carol = srv.register("lv_c", false).await;
        let dave = srv.register("lv_d", false).await;
        let erin = srv.register("lv_e", false).await;
        let room = room_with(&srv, &alice, "joined").await;
        send_text(&srv, &alice, &room, "before carol").await;
        act(&srv, &carol, &room, "join", json!({})).await;
        send_text(&srv, &alice, &room, "with carol").await;
        let tc = sync(&srv, &carol, None, None, 0).await;
        let td = sync(&srv, &dave, None, None, 0).await;
        act(&srv, &alice, &room, "invite", json!({ "user_id": erin.user_id })).await;
        let te = sync(&srv, &erin, None, None, 0).await;
        act(&srv, &alice, &room, "kick", json!({ "user_id": carol.user_id })).await;
        act(&srv, &alice, &room, "ban", json!({ "user_id": dave.user_id })).await;
        act(&srv, &erin, &room, "leave", json!({})).await;
        send_text(&srv, &alice, &room, "after").await;

        let archived = json!({ "room": { "include_leave": true } });
        // Carol (kicked), initial sync with archived rooms.
        let v = sync(&srv, &carol, None, Some(&archived), 0).await;
        let left = &v["rooms"]["leave"][&room];
        let tl = &left["timeline"]["events"];
        assert_eq!(bodies(tl), s(&["with carol"]), "cache {cache}: {v}");
        let last = tl.as_array().unwrap().last().unwrap();
        assert_eq!(last["content"]["membership"], "leave", "ends with the kick: {v}");
        assert!(!v.to_string().contains("\"after\""), "{v}");
        // Incremental: the kick, nothing after it.
        let v = sync(&srv, &carol, tc["next_batch"].as_str(), None, 0).await;
        let tl = &v["rooms"]["leave"][&room]["timeline"]["events"];
        assert_eq!(tl.as_array().unwrap().last().unwrap()["content"]["membership"], "leave", "{v}");
        assert!(!v.to_string().contains("\"after\""), "{v}");

        // Dave, banned without ever joining: the ban only, no state.
        for v in [
            sync(&srv, &dave, td["next_batch"].as_str(), None, 0).await,
            sync(&srv, &dave, None, Some(&archived), 0).await,
        ] {
            let left = &v["rooms"]["leave"][&room];
            let tl = left["timeline"]["events"].as_array().unwrap_or_else(|| panic!("leave section: {v}"));
            assert_eq!(tl.len(), 1, "cache {cache}: {v}");
            assert_eq!(tl[0]["content"]["membership"], "ban");
            assert!(left["state"]["events"].as_array().is_none_or(|a| a.is_empty()), "{v}");
        }
        // Erin rejected her invite: her leave only.
        let v = sync(&srv, &erin, te["next_batch"].as_str(), None, 0).await;
        let tl = v["rooms"]["leave"][&room]["timeline"]["events"].as_array().unwrap().clone();
        assert_eq!(tl.len(), 1, "{v}");
        assert_eq!(tl[0]["content"]["membership"], "leave");

        // /messages for carol after the kick: what she saw, nothing after.
        assert_eq!(all_messages(&srv, &carol, &room).await, s(&["with carol"]));
        srv.stop().await;
    }
}

/// `/state` and `/members` of a departed member are the state at their departure; a user banned
/// without ever joining reads nothing.
#[tokio::test]
async fn state_of_departed_members() {
    let srv = TestServer::start().await;
    let alice = srv.register("st_a", false).await;
    let bob = srv.register("st_b", false).await;
    let dave = srv.register("st_d", false).await;
    let room = room_with(&srv, &alice, "shared").await;
    let (st, _) =
        srv.put(&room_path(&room, "state/m.room.name/"), Some(&alice.token), json!({ "name": "Avant" })).await;
    assert_eq!(st, 200);
    act(&srv, &bob, &room, "join", json!({})).await;
    act(&srv, &bob, &room, "leave", json!({})).await;
    srv.put(&room_path(&room, "state/m.room.name/"), Some(&alice.token), json!({ "name": "Après" })).await;
    act(&srv, &alice, &room, "ban", json!({ "user_id": dave.user_id })).await;

    let (st, name) = srv.get(&room_path(&room, "state/m.room.name/"), Some(&bob.token)).await;
    assert_eq!(st, 200, "{name}");
    assert_eq!(name["name"], "Avant");
    let (_, name) = srv.get(&room_path(&room, "state/m.room.name/"), Some(&alice.token)).await;
    assert_eq!(name["name"], "Après");
    let (st, members) = srv.get(&room_path(&room, "members"), Some(&bob.token)).await;
    assert_eq!(st, 200, "{members}");
    assert!(!members.to_string().contains(&dave.user_id), "the later ban is not shown: {members}");

    assert_err(&srv.get(&room_path(&room, "state"), Some(&dave.token)).await, 403, "M_FORBIDDEN");
    assert_err(&srv.get(&room_path(&room, "members"), Some(&dave.token)).await, 403, "M_FORBIDDEN");

    // Invited again and rejecting: still the state when bob's membership `join` ended, not the
    // state at the rejection.
    act(&srv, &alice, &room, "invite", json!({ "user_id": bob.user_id })).await;
    act(&srv, &bob, &room, "leave", json!({})).await;
    let (st, name) = srv.get(&room_path(&room, "state/m.room.name/"), Some(&bob.token)).await;
    assert_eq!(st, 200, "{name}");
    assert_eq!(name["name"], "Avant");
    let (_, members) = srv.get(&room_path(&room, "members"), Some(&bob.token)).await;
    assert!(!members.to_string().contains(&dave.user_id), "{members}");
    srv.stop().await;
}

/// Events from users in `m.ignored_user_list` reach neither `/sync` nor `/messages`.
#[tokio::test]
async fn ignored_users_are_not_served() {
    let srv = TestServer::start().await;
    let alice = srv.register("ig_a", false).await;
    let bob = srv.register("ig_b", false).await;
    let room = room_with(&srv, &alice, "shared").await;
    act(&srv, &bob, &room, "join", json!({})).await;
    send_text(&srv, &alice, &room, "loud 1").await;
    let t0 = sync(&srv, &bob, None, None, 0).await;
    assert!(bodies(&t0["rooms"]["join"][&room]["timeline"]["events"]).contains(&"loud 1".to_owned()), "{t0}");

    let (st, v) = srv
        .put(
            &format!("/_matrix/client/v3/user/{}/account_data/m.ignored_user_list", enc(&bob.user_id)),
            Some(&bob.token),
            json!({ "ignored_users": { alice.user_id.clone(): {} } }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    send_text(&srv, &alice, &room, "loud 2").await;
    send_text(&srv, &bob, &room, "mine").await;
    let v = sync(&srv, &bob, t0["next_batch"].as_str(), None, 0).await;
    assert_eq!(bodies(&v["rooms"]["join"][&room]["timeline"]["events"]), s(&["mine"]), "{v}");
    let v = sync(&srv, &bob, None, None, 0).await;
    assert_eq!(bodies(&v["rooms"]["join"][&room]["timeline"]["events"]), s(&["mine"]), "{v}");
    assert_eq!(all_messages(&srv, &bob, &room).await, s(&["mine"]));
    // Alice's state events (her membership) still reach bob.
    let section = &v["rooms"]["join"][&room];
    let alice_member = |e: &&Value| e["type"] == "m.room.member" && e["state_key"] == alice.user_id.as_str();
    let in_state = section["state"]["events"].as_array().unwrap().iter().any(|e| alice_member(&e));
    let in_timeline = section["timeline"]["events"].as_array().unwrap().iter().any(|e| alice_member(&e));
    assert!(in_state || in_timeline, "{v}");
    // Unignored: back.
    srv.put(
        &format!("/_matrix/client/v3/user/{}/account_data/m.ignored_user_list", enc(&bob.user_id)),
        Some(&bob.token),
        json!({ "ignored_users": {} }),
    )
    .await;
    assert_eq!(all_messages(&srv, &bob, &room).await, s(&["loud 1", "loud 2", "mine"]));
    srv.stop().await;
}

/// Pagination tokens are positions between events: a backward page's `end` used forwards
/// returns that page again, oldest first; backward pages neither overlap nor skip; a forward
/// page's `end` continues right after it.
#[tokio::test]
async fn pagination_tokens_are_between_events() {
    let srv = TestServer::start().await;
    let alice = srv.register("tok_a", false).await;
    let room = room_with(&srv, &alice, "shared").await;
    for i in 1..=7 {
        send_text(&srv, &alice, &room, &format!("m{i}")).await;
    }
    let get = |q: String| {
        let path = room_path(&room, &format!("messages?{q}"));
        let token = alice.token.clone();
        let srv = &srv;
        async move {
            let (st, v) = srv.get(&path, Some(&token)).await;
            assert_eq!(st, 200, "{v}");
            v
        }
    };
    let p1 = get("dir=b&limit=3".into()).await;
    assert_eq!(bodies(&p1["chunk"]), s(&["m7", "m6", "m5"]));
    let end1 = p1["end"].as_str().unwrap().to_owned();
    let p2 = get(format!("dir=b&limit=3&from={}", enc(&end1))).await;
    assert_eq!(bodies(&p2["chunk"]), s(&["m4", "m3", "m2"]), "{p2}");
    let fwd = get(format!("dir=f&limit=3&from={}", enc(&end1))).await;
    assert_eq!(bodies(&fwd["chunk"]), s(&["m5", "m6", "m7"]), "{fwd}");
    let end2 = p2["end"].as_str().unwrap().to_owned();
    let f1 = get(format!("dir=f&limit=2&from={}", enc(&end2))).await;
    assert_eq!(bodies(&f1["chunk"]), s(&["m2", "m3"]), "{f1}");
    let f2 = get(format!("dir=f&limit=2&from={}", enc(f1["end"].as_str().unwrap()))).await;
    assert_eq!(bodies(&f2["chunk"]), s(&["m4", "m5"]), "{f2}");
    // Backwards from a forward page's end: that page again, newest first.
    let b = get(format!("dir=b&limit=2&from={}", enc(f2["end"].as_str().unwrap()))).await;
    assert_eq!(bodies(&b["chunk"]), s(&["m5", "m4"]), "{b}");
    // `to` bounds a page at a position: from p1's end back to p2's end is exactly p2.
    let bounded = get(format!("dir=b&limit=10&from={}&to={}", enc(&end1), enc(&end2))).await;
    assert_eq!(bodies(&bounded["chunk"]), s(&["m4", "m3", "m2"]), "{bounded}");
    srv.stop().await;
}

/// `/members?at=`: the state at a point the user could see (the `prev_batch` of their sync is
/// just before their first visible event), refused at a point they could not.
#[tokio::test]
async fn members_at_a_point() {
    let srv = TestServer::start().await;
    let alice = srv.register("at_a", false).await;
    let bob = srv.register("at_b", false).await;
    let carol = srv.register("at_c", false).await;
    let room = room_with(&srv, &alice, "joined").await;
    send_text(&srv, &alice, &room, "m0").await;
    let early = sync(&srv, &alice, None, None, 0).await;
    send_text(&srv, &alice, &room, "m1").await;
    act(&srv, &bob, &room, "join", json!({})).await;
    act(&srv, &carol, &room, "join", json!({})).await;

    let filter = json!({ "room": { "timeline": { "limit": 1 } } });
    let v = sync(&srv, &bob, None, Some(&filter), 0).await;
    let prev = v["rooms"]["join"][&room]["timeline"]["prev_batch"].as_str().unwrap().to_owned();
    let (st, m) = srv.get(&room_path(&room, &format!("members?at={}", enc(&prev))), Some(&bob.token)).await;
    assert_eq!(st, 200, "{m}");
    // Just before carol's join: alice and bob are members, carol not yet.
    let joined: Vec<&str> = m["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["content"]["membership"] == "join")
        .filter_map(|e| e["state_key"].as_str())
        .collect();
    assert!(joined.contains(&bob.user_id.as_str()) && !joined.contains(&carol.user_id.as_str()), "{m}");

    let at_early = early["next_batch"].as_str().unwrap();
    assert_err(
        &srv.get(&room_path(&room, &format!("members?at={}", enc(at_early))), Some(&bob.token)).await,
        403,
        "M_FORBIDDEN",
    );
    let (st, m) = srv.get(&room_path(&room, &format!("members?at={}", enc(at_early))), Some(&alice.token)).await;
    assert_eq!(st, 200, "{m}");
    srv.stop().await;
}

/// A departed member paging from the end of a busy room starts at their departure: the first
/// page holds what they saw, not empty pages over what came after.
#[tokio::test]
async fn departed_member_pages_from_their_departure() {
    let srv = TestServer::start().await;
    let alice = srv.register("dp_a", false).await;
    let bob = srv.register("dp_b", false).await;
    let room = room_with(&srv, &alice, "shared").await;
    act(&srv, &bob, &room, "join", json!({})).await;
    send_text(&srv, &alice, &room, "seen").await;
    act(&srv, &alice, &room, "kick", json!({ "user_id": bob.user_id })).await;
    for i in 0..550 {
        send_text(&srv, &alice, &room, &format!("later {i}")).await;
    }
    let (st, page) = srv.get(&room_path(&room, "messages?dir=b&limit=5"), Some(&bob.token)).await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(bodies(&page["chunk"]), s(&["seen"]), "{page}");
    assert_eq!(page["chunk"][0]["content"]["membership"], "leave", "the kick first: {page}");
    srv.stop().await;
}

/// `invited`: a member sees from their invite on, in `/messages` and in their first `/sync`.
#[tokio::test]
async fn invited_visibility_counts_from_the_invite() {
    for cache in [true, false] {
        let srv = TestServer::start_with(|c| {
            if !cache {
                c.sync.room_cache_mb = 0
            }
        })
        .await;
        let alice = srv.register("iv_a", false).await;
        let bob = srv.register("iv_b", false).await;
        let room = room_with(&srv, &alice, "invited").await;
        send_text(&srv, &alice, &room, "pre").await;
        act(&srv, &alice, &room, "invite", json!({ "user_id": bob.user_id })).await;
        send_text(&srv, &alice, &room, "invited").await;
        act(&srv, &bob, &room, "join", json!({})).await;
        send_text(&srv, &alice, &room, "joined").await;
        assert_eq!(all_messages(&srv, &bob, &room).await, s(&["invited", "joined"]));
        let v = sync(&srv, &bob, None, None, 0).await;
        assert_eq!(bodies(&v["rooms"]["join"][&room]["timeline"]["events"]), s(&["invited", "joined"]), "{v}");
        srv.stop().await;
    }
}
