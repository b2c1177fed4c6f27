//! Every endpoint that takes a pagination token accepts every form this server hands out:
//! `/sync` `next_batch` and `prev_batch`, `/messages` `start`/`end`, `/context` `start`/`end`
//! (as `members?at`, `/messages` `from`/`to`, `/relations` `from`/`to`); `/sync` `since` takes
//! its own tokens; anything else is 400 `M_INVALID_PARAM`.

use serde_json::{Value, json};

use crate::common::*;
use crate::sync::{send_text, sync};
use crate::visibility::bodies;

fn room_path(room: &str, rest: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/{rest}", enc(room))
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// The users `u` sees joined at `at` (`members?not_membership=leave&at=`, as Element asks).
async fn joined_at(srv: &TestServer, u: &User, room: &str, at: &str) -> Vec<String> {
    let path = room_path(room, &format!("members?not_membership=leave&at={}", enc(at)));
    let (st, v) = srv.get(&path, Some(&u.token)).await;
    assert_eq!(st, 200, "members?at={at}: {v}");
    let mut joined: Vec<String> = v["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["content"]["membership"] == "join")
        .filter_map(|e| e["state_key"].as_str().map(str::to_owned))
        .collect();
    joined.sort();
    joined
}

async fn messages(srv: &TestServer, u: &User, room: &str, query: &str) -> Value {
    let (st, v) = srv.get(&room_path(room, &format!("messages?{query}")), Some(&u.token)).await;
    assert_eq!(st, 200, "messages?{query}: {v}");
    v
}

#[tokio::test]
async fn every_token_form_is_accepted_where_the_spec_allows_it() {
    let srv = TestServer::start().await;
    let alice = srv.register("tok_a", false).await;
    let bob = srv.register("tok_b", false).await;
    let room = create(&srv, &alice, json!({ "preset": "private_chat" })).await;
    let m1 = send_text(&srv, &alice, &room, "m1").await;
    send_text(&srv, &alice, &room, "m2").await;

    // First sync: the timeline holds m1 and m2; prev_batch (a topological token) is just
    // before m1, next_batch (a stream token) just after m2.
    let filter = json!({ "room": { "timeline": { "limit": 2 } } });
    let first = sync(&srv, &alice, None, Some(&filter), 0).await;
    let n0 = first["next_batch"].as_str().unwrap().to_owned();
    let p0 = first["rooms"]["join"][&room]["timeline"]["prev_batch"].as_str().unwrap().to_owned();
    assert_eq!(bodies(&first["rooms"]["join"][&room]["timeline"]["events"]), s(&["m1", "m2"]));
    assert!(n0.starts_with('s') && p0.starts_with('t'), "{n0} {p0}");

    let (st, v) = srv.post(&room_path(&room, "invite"), Some(&alice.token), json!({ "user_id": bob.user_id })).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = srv.post(&room_path(&room, "join"), Some(&bob.token), json!({})).await;
    assert_eq!(st, 200, "{v}");
    let m3 = send_text(&srv, &alice, &room, "m3").await;
    send_text(&srv, &bob, &room, "m4").await;
    let second = sync(&srv, &alice, Some(&n0), Some(&json!({ "room": { "timeline": { "limit": 10 } } })), 0).await;
    let n1 = second["next_batch"].as_str().unwrap().to_owned();
    let p1 = second["rooms"]["join"][&room]["timeline"]["prev_batch"].as_str().unwrap().to_owned();
    assert_eq!(bodies(&second["rooms"]["join"][&room]["timeline"]["events"]), s(&["m3", "m4"]));

    let only_alice = vec![alice.user_id.clone()];
    let mut both = vec![alice.user_id.clone(), bob.user_id.clone()];
    both.sort();

    // members?at= with /sync tokens: next_batch (what Element sends) and prev_batch.
    assert_eq!(joined_at(&srv, &alice, &room, &n0).await, only_alice, "at next_batch before bob");
    assert_eq!(joined_at(&srv, &alice, &room, &p0).await, only_alice, "at prev_batch before m1");
    assert_eq!(joined_at(&srv, &alice, &room, &n1).await, both, "at the latest next_batch");
    assert_eq!(joined_at(&srv, &alice, &room, &p1).await, only_alice, "just before the invite");
    // Bob, who joined after n0, reads the state from his own sync's tokens too.
    let bob_sync = sync(&srv, &bob, None, None, 0).await;
    assert_eq!(joined_at(&srv, &bob, &room, bob_sync["next_batch"].as_str().unwrap()).await, both);

    // /messages from and to, with sync tokens of both kinds.
    let v = messages(&srv, &alice, &room, &format!("dir=f&from={}&to={}", enc(&p0), enc(&n0))).await;
    assert_eq!(bodies(&v["chunk"]), s(&["m1", "m2"]), "forwards from prev_batch to next_batch: {v}");
    let v = messages(&srv, &alice, &room, &format!("dir=b&from={}&to={}", enc(&n1), enc(&n0))).await;
    assert_eq!(bodies(&v["chunk"]), s(&["m4", "m3"]), "backwards between two next_batches: {v}");
    assert_eq!(v["chunk"].as_array().unwrap().len(), 4, "the invite and the join are in the gap too: {v}");
    assert!(v.get("end").is_none(), "reaching `to` ends the pagination: {v}");
    let v = messages(&srv, &alice, &room, &format!("dir=f&from={}", enc(&n0))).await;
    assert_eq!(bodies(&v["chunk"]), s(&["m3", "m4"]), "forwards from a next_batch: {v}");

    // /messages start and end tokens, fed back to /messages and members?at.
    let page = messages(&srv, &alice, &room, &format!("dir=b&from={}&limit=2", enc(&n1))).await;
    assert_eq!(bodies(&page["chunk"]), s(&["m4", "m3"]));
    let end = page["end"].as_str().unwrap().to_owned();
    let start = page["start"].as_str().unwrap().to_owned();
    assert_eq!(start, n1, "start is the token given");
    assert_eq!(joined_at(&srv, &alice, &room, &end).await, both, "before m3, bob has joined");
    let v = messages(&srv, &alice, &room, &format!("dir=f&from={}&to={}", enc(&end), enc(&start))).await;
    assert_eq!(bodies(&v["chunk"]), s(&["m3", "m4"]), "a backward page's end, forwards to its start: {v}");
    let v = messages(&srv, &alice, &room, &format!("dir=b&from={}&to={}", enc(&end), enc(&p0))).await;
    assert_eq!(bodies(&v["chunk"]), s(&["m2", "m1"]), "from an end back to a prev_batch: {v}");

    // /context start and end tokens.
    let (st, ctx) = srv.get(&room_path(&room, &format!("context/{}?limit=2", enc(&m3))), Some(&alice.token)).await;
    assert_eq!(st, 200, "{ctx}");
    let (cs, ce) = (ctx["start"].as_str().unwrap().to_owned(), ctx["end"].as_str().unwrap().to_owned());
    let v = messages(&srv, &alice, &room, &format!("dir=f&from={}&to={}", enc(&cs), enc(&ce))).await;
    assert_eq!(bodies(&v["chunk"]), s(&["m3", "m4"]), "context start to end: {v}");
    assert_eq!(v["chunk"].as_array().unwrap().len(), 3, "the join before m3, m3, m4: {v}");
    let v = messages(&srv, &alice, &room, &format!("dir=b&from={}&limit=1", enc(&cs))).await;
    assert_eq!(v["chunk"][0]["type"], "m.room.member", "before the context's start: the invite: {v}");
    assert_eq!(joined_at(&srv, &alice, &room, &cs).await, only_alice, "context start is before bob's join");
    assert_eq!(joined_at(&srv, &alice, &room, &ce).await, both);

    // /relations from and to with timeline tokens: reactions to m1 sent after n1.
    for (u, key, txn) in [(&alice, "👍", "ra"), (&bob, "🎉", "rb")] {
        let body = json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": m1, "key": key } });
        let (st, v) = srv.put(&room_path(&room, &format!("send/m.reaction/{txn}")), Some(&u.token), body).await;
        assert_eq!(st, 200, "{v}");
    }
    let n2 = sync(&srv, &alice, Some(&n1), None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let rel = |q: String| {
        let path = format!("/_matrix/client/v1/rooms/{}/relations/{}?{q}", enc(&room), enc(&m1));
        let srv = &srv;
        let token = alice.token.clone();
        async move {
            let (st, v) = srv.get(&path, Some(&token)).await;
            assert_eq!(st, 200, "{path}: {v}");
            v["chunk"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["content"]["m.relates_to"]["key"].clone())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(rel(format!("dir=f&from={}", enc(&n1))).await, vec![json!("👍"), json!("🎉")]);
    assert_eq!(rel(format!("dir=b&from={}", enc(&n2))).await, vec![json!("🎉"), json!("👍")]);
    assert!(rel(format!("dir=b&from={}", enc(&n1))).await.is_empty(), "nothing before n1");
    assert_eq!(rel(format!("dir=b&to={}", enc(&n1))).await.len(), 2);
    assert!(rel(format!("dir=f&from={}&to={}", enc(&n1), enc(&n1))).await.is_empty());
    assert_eq!(rel(format!("dir=f&from={}", enc(&end))).await.len(), 2, "a /messages token");
    // Their own tokens still page.
    let (st, v) = srv
        .get(
            &format!("/_matrix/client/v1/rooms/{}/relations/{}?dir=f&limit=1", enc(&room), enc(&m1)),
            Some(&alice.token),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let next = v["next_batch"].as_str().unwrap();
    assert_eq!(rel(format!("dir=f&limit=1&from={}", enc(next))).await, vec![json!("🎉")]);

    // /sync since takes its own tokens, including a shorter one of an older version.
    let short = n1.split('_').next().unwrap().to_owned();
    let v = sync(&srv, &alice, Some(&short), None, 0).await;
    assert!(v["rooms"]["join"][&room]["timeline"]["events"].as_array().is_some_and(|e| e.len() == 2), "{v}");

    // Garbage and tokens of the wrong kind are 400 M_INVALID_PARAM everywhere.
    for bad in ["", "x", "t1", "t1_", "tx_1", "s", "s-1", "r5", "s1_2_3_4_5_6_7_8", "%00", "t99999999999999999999_1"] {
        let b = enc(bad);
        for path in [
            room_path(&room, &format!("members?at={b}")),
            room_path(&room, &format!("messages?dir=b&from={b}")),
            room_path(&room, &format!("messages?dir=f&to={b}")),
        ] {
            assert_err(&srv.get(&path, Some(&alice.token)).await, 400, "M_INVALID_PARAM");
        }
    }
    for bad in ["x", &p0, "s-1", "sx"] {
        let path = format!("/_matrix/client/v3/sync?timeout=0&since={}", enc(bad));
        assert_err(&srv.get(&path, Some(&alice.token)).await, 400, "M_INVALID_PARAM");
    }
    let path = format!("/_matrix/client/v1/rooms/{}/relations/{}?from=x", enc(&room), enc(&m1));
    assert_err(&srv.get(&path, Some(&alice.token)).await, 400, "M_INVALID_PARAM");
    srv.stop().await;
}
