//! Push rules: the server-default ruleset, user rules and their order, changes to default rules,
//! errors, privacy, and the `m.push_rules` account data that sync delivers.

use parvis::storage;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

const BASE: &str = "/_matrix/client/v3/pushrules";

fn rule(kind: &str, id: &str) -> String {
    format!("{BASE}/global/{kind}/{}", enc(id))
}

fn ids(ruleset: &Value, kind: &str) -> Vec<String> {
    ruleset[kind]
        .as_array()
        .unwrap_or_else(|| panic!("{kind} is an array: {ruleset}"))
        .iter()
        .map(|r| r["rule_id"].as_str().unwrap().to_owned())
        .collect()
}

fn find<'a>(ruleset: &'a Value, kind: &str, id: &str) -> Option<&'a Value> {
    ruleset[kind].as_array()?.iter().find(|r| r["rule_id"] == id)
}

async fn global(s: &TestServer, u: &User) -> Value {
    let (st, v) = s.get(&format!("{BASE}/global/"), Some(&u.token)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v
}

async fn put_raw(s: &TestServer, path: &str, token: &str, body: &'static str) -> (StatusCode, Value) {
    let resp = s.http.put(format!("{}{path}", s.base)).bearer_auth(token).body(body).send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn position(s: &TestServer) -> i64 {
    storage::account_data::current_stream_position(&s.state().db).await.unwrap()
}

#[tokio::test]
async fn default_ruleset() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;

    let (st, all) = s.get(&format!("{BASE}/"), Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK, "{all}");
    let g = &all["global"];
    for kind in ["override", "content", "room", "sender", "underride"] {
        assert!(g[kind].is_array(), "{kind} present: {g}");
    }
    // The master rule comes first and is disabled; mentions of alice and messages notify.
    assert_eq!(ids(g, "override")[0], ".m.rule.master");
    let master = find(g, "override", ".m.rule.master").unwrap();
    assert_eq!((master["enabled"].clone(), master["default"].clone()), (json!(false), json!(true)));
    let mention = find(g, "override", ".m.rule.is_user_mention").expect("is_user_mention");
    assert!(mention["conditions"].to_string().contains("@alice:localhost"), "{mention}");
    assert!(find(g, "override", ".m.rule.invite_for_me").unwrap().to_string().contains("@alice:localhost"));
    assert!(find(g, "underride", ".m.rule.message").is_some(), "{g}");
    assert_eq!(g["room"], json!([]));

    // Without the trailing slash, the drill-down, and the legacy prefix agree.
    assert_eq!(s.get(BASE, Some(&alice.token)).await, (StatusCode::OK, all.clone()));
    assert_eq!(global(&s, &alice).await, *g);
    assert_eq!(s.get(&format!("{BASE}/global"), Some(&alice.token)).await.1, *g);
    assert_eq!(s.get(&format!("{}/", BASE.replace("/v3/", "/r0/")), Some(&alice.token)).await.1, all);

    // Single rules and their parts.
    assert_eq!(s.get(&rule("override", ".m.rule.master"), Some(&alice.token)).await, (StatusCode::OK, master.clone()));
    let enabled = format!("{}/enabled", rule("override", ".m.rule.master"));
    assert_eq!(s.get(&enabled, Some(&alice.token)).await, (StatusCode::OK, json!({ "enabled": false })));
    let actions = format!("{}/actions", rule("underride", ".m.rule.message"));
    let (st, a) = s.get(&actions, Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(a["actions"], find(g, "underride", ".m.rule.message").unwrap()["actions"]);
    assert_eq!(a["actions"][0], "notify");

    // Reading creates nothing: no account data, no stream position.
    assert_eq!(position(&s).await, 0);
    let ad = format!("/_matrix/client/v3/user/{}/account_data/m.push_rules", enc(&alice.user_id));
    assert_err(&s.get(&ad, Some(&alice.token)).await, 404, "M_NOT_FOUND");
    assert_err(&s.get(&format!("{BASE}/"), None).await, 401, "M_MISSING_TOKEN");
    s.stop().await;
}

#[tokio::test]
async fn user_rules_order_update_delete() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let t = Some(alice.token.as_str());

    // A content rule.
    assert_eq!(
        s.put(&rule("content", "cake"), t, json!({ "pattern": "cake*lie", "actions": ["notify"] })).await.0,
        200
    );
    assert_eq!(
        s.get(&rule("content", "cake"), t).await,
        (
            StatusCode::OK,
            json!({ "rule_id": "cake", "pattern": "cake*lie", "actions": ["notify"], "enabled": true, "default": false })
        )
    );

    // New override rules go first among user rules, after the master rule and before the defaults.
    let cond = json!([{ "kind": "event_match", "key": "content.body", "pattern": "x" }]);
    for id in ["a", "b"] {
        let (st, v) = s.put(&rule("override", id), t, json!({ "actions": [], "conditions": cond })).await;
        assert_eq!(st, 200, "{v}");
    }
    let user_ids =
        |g: &Value| -> Vec<String> { ids(g, "override").into_iter().filter(|id| !id.starts_with('.')).collect() };
    let g = global(&s, &alice).await;
    assert_eq!(ids(&g, "override")[..3], [".m.rule.master", "b", "a"]);
    assert_eq!(find(&g, "override", "a").unwrap()["conditions"], cond);

    // after / before place relative to user rules; with both, `before` wins.
    assert_eq!(s.put(&format!("{}?after=a", rule("override", "c")), t, json!({ "actions": [] })).await.0, 200);
    assert_eq!(s.put(&format!("{}?before=b", rule("override", "d")), t, json!({ "actions": [] })).await.0, 200);
    assert_eq!(user_ids(&global(&s, &alice).await), ["d", "b", "a", "c"]);
    assert_eq!(s.put(&format!("{}?after=d&before=a", rule("override", "c")), t, json!({ "actions": [] })).await.0, 200);
    assert_eq!(user_ids(&global(&s, &alice).await), ["d", "b", "c", "a"]);

    // Updating keeps the position and the enabled flag.
    assert_eq!(s.put(&format!("{}/enabled", rule("override", "b")), t, json!({ "enabled": false })).await.0, 200);
    assert_eq!(s.put(&rule("override", "b"), t, json!({ "actions": ["notify"] })).await.0, 200);
    let g = global(&s, &alice).await;
    assert_eq!(user_ids(&g), ["d", "b", "c", "a"]);
    let b = find(&g, "override", "b").unwrap();
    assert_eq!(
        (b["enabled"].clone(), b["actions"].clone(), b["conditions"].clone()),
        (json!(false), json!(["notify"]), json!([]))
    );

    // Placing relative to a missing rule: the spec's 400 (its example errcode M_UNKNOWN);
    // relative to a server-default rule, or before a rule ranked above `after`: refused.
    let before = |id: &str, q: &str| format!("{}?{q}", rule("override", id));
    assert_err(&s.put(&before("e", "before=nope"), t, json!({ "actions": [] })).await, 400, "M_UNKNOWN");
    assert_err(&s.put(&before("e", "after=nope"), t, json!({ "actions": [] })).await, 400, "M_UNKNOWN");
    assert_err(&s.put(&before("e", "after=.m.rule.master"), t, json!({ "actions": [] })).await, 400, "M_INVALID_PARAM");
    assert_err(&s.put(&before("e", "after=a&before=d"), t, json!({ "actions": [] })).await, 400, "M_INVALID_PARAM");
    assert!(find(&global(&s, &alice).await, "override", "e").is_none(), "refused rules are not stored");

    // Room and sender rules are named by room and user IDs.
    let room_rule = rule("room", "!abc:localhost");
    assert_eq!(s.put(&room_rule, t, json!({ "actions": [] })).await.0, 200);
    assert_eq!(s.get(&room_rule, t).await.1["rule_id"], "!abc:localhost");
    assert_eq!(s.put(&rule("sender", "@bob:localhost"), t, json!({ "actions": ["notify"] })).await.0, 200);
    let g = global(&s, &alice).await;
    assert_eq!(ids(&g, "room"), ["!abc:localhost"]);
    assert_eq!(ids(&g, "sender"), ["@bob:localhost"]);
    assert_err(&s.put(&rule("sender", "bob"), t, json!({ "actions": [] })).await, 400, "M_INVALID_PARAM");
    assert_err(&s.put(&rule("room", "#alias:localhost"), t, json!({ "actions": [] })).await, 400, "M_INVALID_PARAM");

    // Delete.
    assert_eq!(s.delete(&rule("override", "b"), t, json!({})).await, (StatusCode::OK, json!({})));
    assert_err(&s.get(&rule("override", "b"), t).await, 404, "M_NOT_FOUND");
    assert_err(&s.delete(&rule("override", "b"), t, json!({})).await, 404, "M_NOT_FOUND");
    assert_eq!(user_ids(&global(&s, &alice).await), ["d", "c", "a"]);
    assert_eq!(s.delete(&room_rule, t, json!({})).await.0, 200);
    assert_eq!(global(&s, &alice).await["room"], json!([]));
    // A rule of another kind with the same ID is another rule.
    assert_err(&s.delete(&rule("underride", "a"), t, json!({})).await, 404, "M_NOT_FOUND");
    s.stop().await;
}

#[tokio::test]
async fn default_rules_can_change_but_not_go() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let t = Some(alice.token.as_str());
    let master = rule("override", ".m.rule.master");

    assert_eq!(s.put(&format!("{master}/enabled"), t, json!({ "enabled": true })).await, (StatusCode::OK, json!({})));
    assert_eq!(s.get(&format!("{master}/enabled"), t).await.1, json!({ "enabled": true }));
    assert_eq!(s.get(&master, t).await.1["enabled"], true);
    assert_eq!(s.put(&format!("{master}/enabled"), t, json!({ "enabled": false })).await.0, 200);
    assert_eq!(s.get(&master, t).await.1["enabled"], false);

    let message = format!("{}/actions", rule("underride", ".m.rule.message"));
    let actions = json!(["notify", { "set_tweak": "sound", "value": "bell" }]);
    assert_eq!(s.put(&message, t, json!({ "actions": actions })).await.0, 200);
    assert_eq!(s.get(&message, t).await.1, json!({ "actions": actions }));
    let g = global(&s, &alice).await;
    let m = find(&g, "underride", ".m.rule.message").unwrap();
    assert_eq!((m["actions"].clone(), m["default"].clone()), (actions.clone(), json!(true)));

    // Server-default rules can neither be deleted nor created/replaced.
    assert_err(&s.delete(&master, t, json!({})).await, 400, "M_INVALID_PARAM");
    assert_err(&s.put(&master, t, json!({ "actions": ["notify"] })).await, 400, "M_INVALID_PARAM");
    assert_err(&s.put(&rule("override", ".my.rule"), t, json!({ "actions": [] })).await, 400, "M_INVALID_PARAM");
    let g = global(&s, &alice).await;
    assert_eq!(find(&g, "override", ".m.rule.master").unwrap()["actions"], json!([]));
    assert!(find(&g, "override", ".my.rule").is_none());

    // Unknown rules: 404 for every operation on them.
    let nope = rule("override", "nope");
    assert_err(&s.put(&format!("{nope}/enabled"), t, json!({ "enabled": true })).await, 404, "M_NOT_FOUND");
    assert_err(&s.put(&format!("{nope}/actions"), t, json!({ "actions": [] })).await, 404, "M_NOT_FOUND");
    assert_err(&s.get(&format!("{nope}/enabled"), t).await, 404, "M_NOT_FOUND");
    assert_err(&s.get(&format!("{nope}/actions"), t).await, 404, "M_NOT_FOUND");
    assert_err(&s.get(&nope, t).await, 404, "M_NOT_FOUND");
    // A default rule under the wrong kind does not exist either.
    assert_err(&s.get(&rule("underride", ".m.rule.master"), t).await, 404, "M_NOT_FOUND");
    s.stop().await;
}

#[tokio::test]
async fn bad_requests() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let t = Some(alice.token.as_str());
    assert_eq!(s.put(&rule("override", "keep"), t, json!({ "actions": ["notify"] })).await.0, 200);
    let before = global(&s, &alice).await;
    let pos = position(&s).await;

    // Unknown scope or kind.
    assert_err(&s.get(&format!("{BASE}/device/"), t).await, 400, "M_INVALID_PARAM");
    assert_err(&s.get(&format!("{BASE}/device/override/keep"), t).await, 400, "M_INVALID_PARAM");
    assert_err(&s.put(&format!("{BASE}/device/override/x"), t, json!({ "actions": [] })).await, 400, "M_INVALID_PARAM");
    assert_err(&s.get(&rule("bogus", "keep"), t).await, 400, "M_INVALID_PARAM");
    assert_err(&s.put(&rule("postcontent", "x"), t, json!({ "actions": [] })).await, 400, "M_INVALID_PARAM");
    assert_err(&s.delete(&rule("bogus", "keep"), t, json!({})).await, 400, "M_INVALID_PARAM");
    assert_err(
        &s.put(&format!("{}/enabled", rule("bogus", "keep")), t, json!({ "enabled": true })).await,
        400,
        "M_INVALID_PARAM",
    );

    // Rule IDs with a slash (encoded in the path) or a backslash.
    assert_err(&s.put(&rule("override", "a/b"), t, json!({ "actions": [] })).await, 400, "M_INVALID_PARAM");
    assert_err(&s.put(&rule("override", "a\\b"), t, json!({ "actions": [] })).await, 400, "M_INVALID_PARAM");

    // Bodies: not JSON, wrong shapes, missing fields, invalid actions and conditions.
    let x = rule("override", "x");
    assert_err(&put_raw(&s, &x, &alice.token, "{nope").await, 400, "M_NOT_JSON");
    assert_err(&put_raw(&s, &x, &alice.token, "[]").await, 400, "M_BAD_JSON");
    assert_err(&s.put(&x, t, json!({})).await, 400, "M_BAD_JSON");
    assert_err(&s.put(&x, t, json!({ "actions": "notify" })).await, 400, "M_BAD_JSON");
    assert_err(&s.put(&x, t, json!({ "actions": [42] })).await, 400, "M_BAD_JSON");
    assert_err(
        &s.put(&x, t, json!({ "actions": [{ "set_tweak": "highlight", "value": "very" }] })).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.put(&x, t, json!({ "actions": [], "conditions": [{ "kind": "event_match", "pattern": "p" }] })).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(&s.put(&x, t, json!({ "actions": [], "conditions": {} })).await, 400, "M_BAD_JSON");
    assert_err(&s.put(&rule("content", "c"), t, json!({ "actions": [] })).await, 400, "M_BAD_JSON");
    let keep = rule("override", "keep");
    assert_err(&s.put(&format!("{keep}/enabled"), t, json!({ "enabled": "yes" })).await, 400, "M_BAD_JSON");
    assert_err(&s.put(&format!("{keep}/enabled"), t, json!({})).await, 400, "M_BAD_JSON");
    assert_err(&put_raw(&s, &format!("{keep}/enabled"), &alice.token, "true").await, 400, "M_BAD_JSON");
    assert_err(&s.put(&format!("{keep}/actions"), t, json!({ "actions": [1] })).await, 400, "M_BAD_JSON");
    assert_err(&s.put(&format!("{keep}/actions"), t, json!({})).await, 400, "M_BAD_JSON");

    // Nothing of that was stored, and the account data stream did not move.
    assert_eq!(global(&s, &alice).await, before);
    assert_eq!(position(&s).await, pos);

    // Unknown condition kinds and legacy actions are kept as given (the spec: unknown conditions
    // never match; `dont_notify` is a no-op).
    let legacy = json!({ "actions": ["dont_notify"], "conditions": [{ "kind": "org.example.future", "x": 1 }] });
    assert_eq!(s.put(&x, t, legacy.clone()).await.0, 200);
    let (_, got) = s.get(&x, t).await;
    assert_eq!(
        (got["actions"].clone(), got["conditions"].clone()),
        (legacy["actions"].clone(), legacy["conditions"].clone())
    );
    s.stop().await;
}

#[tokio::test]
async fn private_and_delivered_as_account_data() {
    let s = TestServer::start().await;
    let db = &s.state().db;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let ad = |u: &User| format!("/_matrix/client/v3/user/{}/account_data/m.push_rules", enc(&u.user_id));

    assert_eq!(s.put(&rule("override", "secret"), Some(&alice.token), json!({ "actions": [] })).await.0, 200);
    let p1 = position(&s).await;
    assert!(p1 > 0);
    assert_eq!(*s.state().account_data_stream.borrow(), p1, "writers wake sync");

    // The stored account data is the full ruleset, exactly what the API serves.
    let g = global(&s, &alice).await;
    assert_eq!(s.get(&ad(&alice), Some(&alice.token)).await, (StatusCode::OK, json!({ "global": g })));
    let rows = storage::account_data::changed_since(db, &alice.user_id, 0).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].room_id.as_deref(), rows[0].data_type.as_str()), (None, "m.push_rules"));
    assert_eq!(rows[0].stream_ordering, p1);

    // Each change is a new position with the new content.
    assert_eq!(
        s.put(
            &format!("{}/enabled", rule("override", ".m.rule.master")),
            Some(&alice.token),
            json!({ "enabled": true })
        )
        .await
        .0,
        200
    );
    let p2 = position(&s).await;
    assert!(p2 > p1, "{p2} > {p1}");
    assert_eq!(*s.state().account_data_stream.borrow(), p2);
    let stored = storage::account_data::get(db, &alice.user_id, None, "m.push_rules").await.unwrap().unwrap();
    assert_eq!(find(&stored["global"], "override", ".m.rule.master").unwrap()["enabled"], true);
    assert_eq!(s.delete(&rule("override", "secret"), Some(&alice.token), json!({})).await.0, 200);
    assert!(position(&s).await > p2);
    let stored = storage::account_data::get(db, &alice.user_id, None, "m.push_rules").await.unwrap().unwrap();
    assert!(find(&stored["global"], "override", "secret").is_none());
    assert_eq!(s.put(&rule("override", "secret"), Some(&alice.token), json!({ "actions": [] })).await.0, 200);

    // Bob sees and changes only his own rules (the defaults, with his ID).
    let bg = global(&s, &bob).await;
    assert!(find(&bg, "override", "secret").is_none());
    assert_eq!(find(&bg, "override", ".m.rule.master").unwrap()["enabled"], false);
    assert!(!bg.to_string().contains("@alice:localhost"), "{bg}");
    assert_err(&s.get(&rule("override", "secret"), Some(&bob.token)).await, 404, "M_NOT_FOUND");
    assert_err(&s.delete(&rule("override", "secret"), Some(&bob.token), json!({})).await, 404, "M_NOT_FOUND");
    assert!(find(&global(&s, &alice).await, "override", "secret").is_some());
    assert_err(&s.get(&ad(&alice), Some(&bob.token)).await, 403, "M_FORBIDDEN");
    // ... and still cannot write m.push_rules directly.
    assert_err(&s.put(&ad(&alice), Some(&alice.token), json!({ "global": {} })).await, 405, "M_BAD_JSON");

    // Concurrent changes all land (no lost update), including the very first write.
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..12 {
        let req = s.http.put(format!("{}{}", s.base, rule("content", &format!("w{i}")))).bearer_auth(&bob.token);
        puts.spawn(req.json(&json!({ "pattern": format!("w{i}"), "actions": ["notify"] })).send());
    }
    while let Some(resp) = puts.join_next().await {
        assert_eq!(resp.unwrap().unwrap().status(), 200);
    }
    let mut got = ids(&global(&s, &bob).await, "content");
    got.sort();
    let mut want: Vec<String> = (0..12).map(|i| format!("w{i}")).collect();
    want.sort();
    assert_eq!(got, want);
    s.stop().await;
}

#[tokio::test]
async fn stored_rules_merge_with_current_defaults() {
    let s = TestServer::start().await;
    let db = &s.state().db;
    let alice = s.register("alice", false).await;
    let t = Some(alice.token.as_str());
    assert_eq!(s.put(&rule("override", "mine"), t, json!({ "actions": ["notify"] })).await.0, 200);
    assert_eq!(
        s.put(&format!("{}/enabled", rule("override", ".m.rule.master")), t, json!({ "enabled": true })).await.0,
        200
    );

    // As if written by an older version: a default rule missing, another with an outdated
    // definition, and one that no longer exists.
    let mut stored = storage::account_data::get(db, &alice.user_id, None, "m.push_rules").await.unwrap().unwrap();
    let over = stored["global"]["override"].as_array_mut().unwrap();
    over.retain(|r| r["rule_id"] != ".m.rule.tombstone");
    for r in over.iter_mut() {
        if r["rule_id"] == ".m.rule.suppress_notices" {
            r["conditions"] = json!([]);
        }
    }
    over.push(
        json!({ "rule_id": ".m.rule.retired", "default": true, "enabled": true, "actions": [], "conditions": [] }),
    );
    storage::account_data::set(db, &alice.user_id, None, "m.push_rules", &stored).await.unwrap();

    let g = global(&s, &alice).await;
    assert!(find(&g, "override", ".m.rule.tombstone").is_some(), "new default rules appear: {g}");
    assert!(find(&g, "override", ".m.rule.retired").is_none(), "retired default rules go");
    assert_ne!(find(&g, "override", ".m.rule.suppress_notices").unwrap()["conditions"], json!([]));
    assert_eq!(find(&g, "override", ".m.rule.master").unwrap()["enabled"], true, "the user's choices stay");
    assert_eq!(ids(&g, "override")[..2], [".m.rule.master", "mine"]);
    s.stop().await;
}
