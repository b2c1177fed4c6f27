//! Spaces: `GET /rooms/{roomId}/hierarchy`: depth-first order, the spec's child ordering, who
//! sees which room, pagination, `max_depth`, `suggested_only`, cycles and bad input.

use serde_json::{Value, json};

use crate::common::*;

fn room_path(room: &str, rest: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/{rest}", enc(room))
}

async fn add_child(s: &TestServer, u: &User, space: &str, child: &str, content: Value) {
    let (st, v) =
        s.put(&room_path(space, &format!("state/m.space.child/{}", enc(child))), Some(&u.token), content).await;
    assert_eq!(st, 200, "{v}");
}

async fn hierarchy(s: &TestServer, u: &User, space: &str, query: &str) -> Value {
    let path = format!("/_matrix/client/v1/rooms/{}/hierarchy?{query}", enc(space));
    let (st, v) = s.get(&path, Some(&u.token)).await;
    assert_eq!(st, 200, "{query}: {v}");
    v
}

fn names(v: &Value) -> Vec<String> {
    v["rooms"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap_or("?").to_owned()).collect()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[tokio::test]
async fn space_hierarchy() {
    let srv = TestServer::start().await;
    let alice = srv.register("sp_a", false).await;
    let bob = srv.register("sp_b", false).await;
    let carol = srv.register("sp_c", false).await;
    let space =
        |name: &str, preset: &str| json!({ "preset": preset, "name": name, "creation_content": { "type": "m.space" } });
    let root = create(&srv, &alice, space("Mairie", "public_chat")).await;
    let a = create(&srv, &alice, json!({ "preset": "public_chat", "name": "Accueil" })).await;
    let b = create(&srv, &alice, json!({ "preset": "private_chat", "name": "Bureau" })).await;
    let sub = create(&srv, &alice, space("Services", "public_chat")).await;
    let d = create(&srv, &alice, json!({ "preset": "public_chat", "name": "Dechets" })).await;
    let e = create(
        &srv,
        &alice,
        json!({
            "preset": "private_chat", "name": "Elus", "room_version": "10",
            "initial_state": [{ "type": "m.room.join_rules", "state_key": "",
                                "content": { "join_rule": "restricted",
                                             "allow": [{ "type": "m.room_membership", "room_id": root }] } }],
        }),
    )
    .await;
    let via = json!(["localhost"]);
    add_child(&srv, &alice, &root, &a, json!({ "via": via, "order": "b" })).await;
    add_child(&srv, &alice, &root, &b, json!({ "via": via, "order": "a" })).await;
    add_child(&srv, &alice, &root, &sub, json!({ "via": via })).await;
    add_child(&srv, &alice, &root, &e, json!({ "via": via, "suggested": true })).await;
    // Not children: no `via`, or an empty one (a removed child).
    add_child(&srv, &alice, &root, "!gone:localhost", json!({})).await;
    add_child(&srv, &alice, &root, &d, json!({ "via": [] })).await;
    add_child(&srv, &alice, &sub, &d, json!({ "via": via })).await;
    add_child(&srv, &alice, &sub, &root, json!({ "via": via })).await; // a cycle
    // A child on another server is left out (no federation yet).
    add_child(&srv, &alice, &sub, "!far:elsewhere.example", json!({ "via": ["elsewhere.example"] })).await;

    // Alice sees everything: depth first, children by `order`, then by event time.
    let v = hierarchy(&srv, &alice, &root, "").await;
    assert_eq!(names(&v), s(&["Mairie", "Bureau", "Accueil", "Services", "Dechets", "Elus"]), "{v}");
    assert!(v.get("next_batch").is_none());
    let first = &v["rooms"][0];
    assert_eq!(first["room_type"], "m.space");
    assert_eq!(first["room_id"], root);
    assert_eq!(first["num_joined_members"], 1);
    assert_eq!(first["join_rule"], "public");
    let mut kids: Vec<&str> =
        first["children_state"].as_array().unwrap().iter().map(|c| c["state_key"].as_str().unwrap()).collect();
    kids.sort();
    let mut want = vec![a.as_str(), b.as_str(), sub.as_str(), e.as_str()];
    want.sort();
    assert_eq!(kids, want, "only children with a via: {first}");
    assert!(first["children_state"][0]["origin_server_ts"].is_i64());
    assert_eq!(v["rooms"][1]["children_state"], json!([]), "a room that is not a space has no children");

    // Bob joined the space: the private room is hidden, the restricted one allowed through it.
    let (st, r) = srv.post(&room_path(&root, "join"), Some(&bob.token), json!({})).await;
    assert_eq!(st, 200, "{r}");
    let v = hierarchy(&srv, &bob, &root, "").await;
    assert_eq!(names(&v), s(&["Mairie", "Accueil", "Services", "Dechets", "Elus"]), "{v}");
    // Carol, in nothing, does not see the restricted room.
    let v = hierarchy(&srv, &carol, &root, "").await;
    assert_eq!(names(&v), s(&["Mairie", "Accueil", "Services", "Dechets"]), "{v}");

    // Pagination: pages of two, the last without next_batch.
    let mut pages = Vec::new();
    let mut from: Option<String> = None;
    loop {
        let q = match &from {
            Some(f) => format!("limit=2&from={}", enc(f)),
            None => "limit=2".to_owned(),
        };
        let v = hierarchy(&srv, &bob, &root, &q).await;
        pages.push(names(&v));
        match v["next_batch"].as_str() {
            Some(n) => from = Some(n.to_owned()),
            None => break,
        }
        assert!(pages.len() < 10, "pagination does not end");
    }
    assert_eq!(pages, vec![s(&["Mairie", "Accueil"]), s(&["Services", "Dechets"]), s(&["Elus"])]);

    // max_depth and suggested_only.
    assert_eq!(
        names(&hierarchy(&srv, &bob, &root, "max_depth=1").await),
        s(&["Mairie", "Accueil", "Services", "Elus"])
    );
    assert_eq!(names(&hierarchy(&srv, &bob, &root, "max_depth=0").await), s(&["Mairie"]));
    assert_eq!(names(&hierarchy(&srv, &bob, &root, "suggested_only=true").await), s(&["Mairie", "Elus"]));

    // Bad input and rooms one may not see.
    let path = |room: &str, q: &str| format!("/_matrix/client/v1/rooms/{}/hierarchy?{q}", enc(room));
    let v = hierarchy(&srv, &bob, &root, "limit=1").await;
    let next = v["next_batch"].as_str().unwrap();
    assert_err(
        &srv.get(&path(&root, &format!("from={}&max_depth=1", enc(next))), Some(&bob.token)).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &srv.get(&path(&root, &format!("from={}&suggested_only=true", enc(next))), Some(&bob.token)).await,
        400,
        "M_INVALID_PARAM",
    );
    for q in ["from=garbage", "from=h1_2", "limit=0", "limit=-5", "max_depth=-1", "limit=x", "suggested_only=maybe"] {
        assert_err(&srv.get(&path(&root, q), Some(&bob.token)).await, 400, "M_INVALID_PARAM");
    }
    assert_err(&srv.get(&path(&b, ""), Some(&carol.token)).await, 403, "M_FORBIDDEN");
    assert_err(&srv.get(&path("!nope:localhost", ""), Some(&carol.token)).await, 403, "M_FORBIDDEN");
    assert_err(&srv.get(&path(&root, ""), None).await, 401, "M_MISSING_TOKEN");
    let (st, r) = srv.post(&room_path(&root, "ban"), Some(&alice.token), json!({ "user_id": carol.user_id })).await;
    assert_eq!(st, 200, "{r}");
    assert_err(&srv.get(&path(&root, ""), Some(&carol.token)).await, 403, "M_FORBIDDEN");
    srv.stop().await;
}
