//! `POST /search` (room events): French stemming and accents, ranking with several words,
//! keys, filters, pagination, context, state, groupings, highlights, history visibility,
//! redactions, encrypted rooms, another language, bad input.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::common::*;
use crate::sync::send_text;

fn room_path(room: &str, rest: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/{rest}", enc(room))
}

async fn search_raw(s: &TestServer, u: &User, body: Value, next: Option<&str>) -> Value {
    let path = match next {
        Some(n) => format!("/_matrix/client/v3/search?next_batch={}", enc(n)),
        None => "/_matrix/client/v3/search".to_owned(),
    };
    let (st, v) = s.post(&path, Some(&u.token), body.clone()).await;
    assert_eq!(st, 200, "{body}: {v}");
    v["search_categories"]["room_events"].clone()
}

async fn search(s: &TestServer, u: &User, criteria: Value) -> Value {
    search_raw(s, u, json!({ "search_categories": { "room_events": criteria } }), None).await
}

/// The texts found (body, name or topic), in result order.
fn found(v: &Value) -> Vec<String> {
    v["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results: {v}"))
        .iter()
        .map(|r| {
            let c = &r["result"]["content"];
            c["body"].as_str().or(c["name"].as_str()).or(c["topic"].as_str()).unwrap_or("?").to_owned()
        })
        .collect()
}

fn set(v: &[String]) -> HashSet<String> {
    v.iter().cloned().collect()
}

fn strs(v: &[&str]) -> HashSet<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[tokio::test]
async fn french_search_ranking_filters_pagination_and_visibility() {
    let srv = TestServer::start().await;
    let alice = srv.register("se_alice", false).await;
    let bob = srv.register("se_bob", false).await;
    let carol = srv.register("se_carol", false).await;
    let dave = srv.register("se_dave", false).await;
    let (st, _) = srv
        .put(
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob.user_id)),
            Some(&bob.token),
            json!({ "displayname": "Bob Martin" }),
        )
        .await;
    assert_eq!(st, 200);
    let room = create(
        &srv,
        &alice,
        json!({
            "preset": "public_chat", "name": "Conseil municipal", "topic": "Ordre du jour des réunions",
            "initial_state": [{ "type": "m.room.history_visibility", "state_key": "", "content": { "history_visibility": "joined" } }],
        }),
    )
    .await;
    let (st, r) = srv.post(&room_path(&room, "join"), Some(&bob.token), json!({})).await;
    assert_eq!(st, 200, "{r}");
    let m1 = send_text(&srv, &alice, &room, "La réunion du conseil est reportée").await;
    send_text(&srv, &bob, &room, "Les Réunions budgétaires commencent lundi").await;
    send_text(&srv, &alice, &room, "Il faut réunir les élus").await;
    send_text(&srv, &bob, &room, "Budget 2027 : réunion préparatoire").await;
    send_text(&srv, &alice, &room, "Rien à voir").await;
    send_text(&srv, &bob, &room, "<b>reunion</b> sans accent").await;

    let all_reunion = strs(&[
        "Ordre du jour des réunions",
        "La réunion du conseil est reportée",
        "Les Réunions budgétaires commencent lundi",
        "Budget 2027 : réunion préparatoire",
        "<b>reunion</b> sans accent",
    ]);
    // Accents, case and plural do not matter; « réunir » has another French stem (« reun »).
    for term in ["réunion", "REUNION", "Réunions", "reunions"] {
        let v = search(&srv, &alice, json!({ "search_term": term })).await;
        assert_eq!(set(&found(&v)), all_reunion, "{term}: {v}");
        assert_eq!(v["count"], 5, "{v}");
        assert!(v.get("next_batch").is_none(), "{v}");
    }
    let v = search(&srv, &alice, json!({ "search_term": "réunir" })).await;
    assert_eq!(found(&v), ["Il faut réunir les élus"], "{v}");
    // Highlights: the words as written in the results, for the client to mark.
    let v = search(&srv, &alice, json!({ "search_term": "reunion" })).await;
    let hl: Vec<&str> = v["highlights"].as_array().unwrap().iter().map(|h| h.as_str().unwrap()).collect();
    for w in ["réunion", "Réunions", "réunions", "reunion"] {
        assert!(hl.contains(&w), "{w} not in {hl:?}");
    }

    // Several words: events holding all of them rank first; those holding some still come.
    let v = search(&srv, &alice, json!({ "search_term": "réunion budget", "keys": ["content.body"] })).await;
    let f = found(&v);
    assert_eq!(f[0], "Budget 2027 : réunion préparatoire", "{v}");
    assert_eq!(f.len(), 4, "every message with réunion or budget: {v}");
    assert!(v["results"][0]["rank"].as_f64().unwrap() > v["results"][1]["rank"].as_f64().unwrap());
    // Recent order: newest first.
    let v =
        search(&srv, &alice, json!({ "search_term": "réunion", "order_by": "recent", "keys": ["content.body"] })).await;
    assert_eq!(
        found(&v),
        [
            "<b>reunion</b> sans accent",
            "Budget 2027 : réunion préparatoire",
            "Les Réunions budgétaires commencent lundi",
            "La réunion du conseil est reportée"
        ]
    );

    // Keys.
    let v = search(&srv, &alice, json!({ "search_term": "conseil", "keys": ["content.name"] })).await;
    assert_eq!(found(&v), ["Conseil municipal"]);
    assert_eq!(v["results"][0]["result"]["type"], "m.room.name");
    let v = search(&srv, &alice, json!({ "search_term": "réunion", "keys": ["content.topic"] })).await;
    assert_eq!(found(&v), ["Ordre du jour des réunions"]);

    // Filters: senders, not_senders, types, rooms.
    let v = search(&srv, &alice, json!({ "search_term": "réunion", "filter": { "senders": [bob.user_id] } })).await;
    assert_eq!(
        set(&found(&v)),
        strs(&[
            "Les Réunions budgétaires commencent lundi",
            "Budget 2027 : réunion préparatoire",
            "<b>reunion</b> sans accent"
        ])
    );
    let v = search(&srv, &alice, json!({ "search_term": "réunion", "filter": { "not_senders": [bob.user_id] } })).await;
    assert_eq!(set(&found(&v)), strs(&["Ordre du jour des réunions", "La réunion du conseil est reportée"]));
    let v = search(&srv, &alice, json!({ "search_term": "réunion", "filter": { "types": ["m.room.topic"] } })).await;
    assert_eq!(found(&v), ["Ordre du jour des réunions"]);
    let v =
        search(&srv, &alice, json!({ "search_term": "réunion", "filter": { "rooms": ["!other:localhost"] } })).await;
    assert_eq!(found(&v), Vec::<String>::new());

    // Pagination: pages of two, no duplicates, everything once.
    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..10 {
        let body =
            json!({ "search_categories": { "room_events": { "search_term": "réunion", "filter": { "limit": 2 } } } });
        let v = search_raw(&srv, &alice, body, next.as_deref()).await;
        let page = found(&v);
        assert!(page.len() <= 2);
        seen.extend(page);
        match v["next_batch"].as_str() {
            Some(n) => next = Some(n.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(set(&seen), all_reunion);

    // Context, profiles, state and groupings.
    let v = search(
        &srv,
        &alice,
        json!({
            "search_term": "préparatoire",
            "event_context": { "before_limit": 1, "after_limit": 1, "include_profile": true },
            "include_state": true,
            "groupings": { "group_by": [{ "key": "room_id" }, { "key": "sender" }] },
        }),
    )
    .await;
    let r = &v["results"][0];
    assert_eq!(r["context"]["events_before"][0]["content"]["body"], "Il faut réunir les élus", "{v}");
    assert_eq!(r["context"]["events_after"][0]["content"]["body"], "Rien à voir", "{v}");
    assert_eq!(r["context"]["profile_info"][&bob.user_id]["displayname"], "Bob Martin", "{v}");
    assert!(r["context"]["start"].is_string() && r["context"]["end"].is_string());
    assert!(v["state"][&room].as_array().unwrap().iter().any(|e| e["type"] == "m.room.name"), "{v}");
    let event_id = r["result"]["event_id"].clone();
    assert_eq!(v["groups"]["room_id"][&room]["results"], json!([event_id]));
    assert_eq!(v["groups"]["room_id"][&room]["order"], 1);
    assert_eq!(v["groups"]["sender"][&bob.user_id]["results"], json!([event_id]));

    // History visibility per event: carol joins later (visibility `joined`), bob leaves.
    let (st, r) = srv.post(&room_path(&room, "join"), Some(&carol.token), json!({})).await;
    assert_eq!(st, 200, "{r}");
    send_text(&srv, &alice, &room, "réunion avec Carol").await;
    let (st, r) = srv.post(&room_path(&room, "leave"), Some(&bob.token), json!({})).await;
    assert_eq!(st, 200, "{r}");
    send_text(&srv, &alice, &room, "réunion après le départ de Bob").await;
    let v = search(&srv, &carol, json!({ "search_term": "réunion", "keys": ["content.body"] })).await;
    assert_eq!(set(&found(&v)), strs(&["réunion avec Carol", "réunion après le départ de Bob"]), "{v}");
    let v = search(&srv, &bob, json!({ "search_term": "réunion", "keys": ["content.body"] })).await;
    let f = set(&found(&v));
    assert!(f.contains("réunion avec Carol") && !f.contains("réunion après le départ de Bob"), "{v}");
    let v = search(&srv, &dave, json!({ "search_term": "réunion" })).await;
    assert_eq!((found(&v).len(), v["count"].clone()), (0, json!(0)), "a stranger finds nothing: {v}");

    // A redacted message leaves the index.
    let (st, r) = srv.put(&room_path(&room, &format!("redact/{}/r1", enc(&m1))), Some(&alice.token), json!({})).await;
    assert_eq!(st, 200, "{r}");
    let v = search(&srv, &alice, json!({ "search_term": "reportée" })).await;
    assert_eq!(found(&v), Vec::<String>::new(), "{v}");

    // Encrypted rooms: nothing to search server-side.
    let secret = create(
        &srv,
        &alice,
        json!({ "preset": "private_chat",
                "initial_state": [{ "type": "m.room.encryption", "state_key": "", "content": { "algorithm": "m.megolm.v1.aes-sha2" } }] }),
    )
    .await;
    let (st, r) = srv
        .put(
            &room_path(&secret, "send/m.room.encrypted/e1"),
            Some(&alice.token),
            json!({ "algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "réunion", "body": "réunion", "sender_key": "k", "session_id": "s", "device_id": "D" }),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let v = search(&srv, &alice, json!({ "search_term": "réunion", "filter": { "rooms": [secret] } })).await;
    assert_eq!(found(&v), Vec::<String>::new(), "{v}");

    // Bad input.
    let post = |body: Value| {
        let srv = &srv;
        let token = alice.token.clone();
        async move { srv.post("/_matrix/client/v3/search", Some(&token), body).await }
    };
    assert_err(&post(json!({})).await, 400, "M_BAD_JSON");
    assert_err(&post(json!({ "search_categories": { "room_events": {} } })).await, 400, "M_BAD_JSON");
    for criteria in [
        json!({ "search_term": " " }),
        json!({ "search_term": "x", "order_by": "oldest" }),
        json!({ "search_term": "x", "keys": ["content.msgtype"] }),
        json!({ "search_term": "x", "groupings": { "group_by": [{ "key": "type" }] } }),
        json!({ "search_term": "x", "filter": { "senders": "bob" } }),
        json!({ "search_term": (0..30).map(|i| format!("mot{i}")).collect::<Vec<_>>().join(" ") }),
    ] {
        assert_err(&post(json!({ "search_categories": { "room_events": criteria } })).await, 400, "M_INVALID_PARAM");
    }
    let (st, v) = srv
        .post(
            "/_matrix/client/v3/search?next_batch=garbage",
            Some(&alice.token),
            json!({ "search_categories": { "room_events": { "search_term": "x" } } }),
        )
        .await;
    assert_err(&(st, v), 400, "M_INVALID_PARAM");
    assert_err(&srv.post("/_matrix/client/v3/search", None, json!({})).await, 401, "M_MISSING_TOKEN");
    // No room_events category: an empty answer.
    let (st, v) = post(json!({ "search_categories": {} })).await;
    assert_eq!((st.as_u16(), v), (200, json!({ "search_categories": {} })));
    // Only stop words: nothing found, no error.
    let v = search(&srv, &alice, json!({ "search_term": "la du de" })).await;
    assert_eq!(found(&v), Vec::<String>::new());
    srv.stop().await;
}

/// `search.language` picks the stemmer; events written under another language are re-indexed
/// at start-up.
#[tokio::test]
async fn search_in_english() {
    let srv = TestServer::start_with(|c| c.search.language = "english".into()).await;
    let alice = srv.register("en_alice", false).await;
    let room = create(&srv, &alice, json!({ "preset": "private_chat" })).await;
    send_text(&srv, &alice, &room, "The meetings are cancelled").await;
    let v = search(&srv, &alice, json!({ "search_term": "meeting cancel" })).await;
    assert_eq!(found(&v), ["The meetings are cancelled"], "{v}");
    // The template database was indexed in French: the server recorded the re-index.
    let mut lang = None;
    for _ in 0..50 {
        lang = sqlx::query_scalar::<_, String>("SELECT value FROM server_meta WHERE key = 'search_language'")
            .fetch_optional(&srv.state().db)
            .await
            .unwrap();
        if lang.as_deref() == Some("english") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(lang.as_deref(), Some("english"));
    srv.stop().await;
}
