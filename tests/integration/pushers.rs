use serde_json::{Value, json};

use crate::common::*;

fn pusher(pushkey: &str) -> Value {
    json!({
        "app_id": "fr.ville.messagerie.ios",
        "pushkey": pushkey,
        "kind": "http",
        "app_display_name": "Messagerie",
        "device_display_name": "iPhone de service",
        "lang": "fr",
        "data": { "url": "https://push.ville.example/_matrix/push/v1/notify", "format": "event_id_only" }
    })
}

#[tokio::test]
async fn pushers_set_list_delete() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let (_, empty) = s.get("/_matrix/client/v3/pushers", Some(&alice.token)).await;
    assert_eq!(empty, json!({ "pushers": [] }));

    assert_eq!(s.post("/_matrix/client/v3/pushers/set", Some(&alice.token), pusher("key-1")).await.0, 200);
    let (_, list) = s.get("/_matrix/client/v3/pushers", Some(&alice.token)).await;
    assert_eq!(list["pushers"].as_array().unwrap().len(), 1);
    assert_eq!(list["pushers"][0]["data"]["url"], "https://push.ville.example/_matrix/push/v1/notify");
    assert_eq!(list["pushers"][0]["lang"], "fr");
    // Updating the same (app_id, pushkey) replaces it.
    let mut renamed = pusher("key-1");
    renamed["device_display_name"] = json!("iPhone (renommé)");
    s.post("/_matrix/client/v3/pushers/set", Some(&alice.token), renamed).await;
    let (_, list) = s.get("/_matrix/client/v3/pushers", Some(&alice.token)).await;
    assert_eq!(list["pushers"].as_array().unwrap().len(), 1);
    assert_eq!(list["pushers"][0]["device_display_name"], "iPhone (renommé)");

    // The same pushkey registered by another user takes it over unless `append`.
    s.post("/_matrix/client/v3/pushers/set", Some(&bob.token), pusher("key-1")).await;
    let (_, list) = s.get("/_matrix/client/v3/pushers", Some(&alice.token)).await;
    assert_eq!(list["pushers"], json!([]));
    let mut appended = pusher("key-1");
    appended["append"] = json!(true);
    s.post("/_matrix/client/v3/pushers/set", Some(&alice.token), appended).await;
    let (_, bobs) = s.get("/_matrix/client/v3/pushers", Some(&bob.token)).await;
    assert_eq!(bobs["pushers"].as_array().unwrap().len(), 1, "append keeps bob's");

    // kind: null deletes.
    let mut del = pusher("key-1");
    del["kind"] = Value::Null;
    assert_eq!(s.post("/_matrix/client/v3/pushers/set", Some(&bob.token), del).await.0, 200);
    let (_, bobs) = s.get("/_matrix/client/v3/pushers", Some(&bob.token)).await;
    assert_eq!(bobs["pushers"], json!([]));

    // Validation.
    let mut bad = pusher("k");
    bad["data"]["url"] = json!("https://push.ville.example/somewhere");
    assert_err(&s.post("/_matrix/client/v3/pushers/set", Some(&alice.token), bad).await, 400, "M_INVALID_PARAM");
    let mut bad = pusher("k");
    bad["kind"] = json!("email");
    assert_err(&s.post("/_matrix/client/v3/pushers/set", Some(&alice.token), bad).await, 400, "M_INVALID_PARAM");
    let mut bad = pusher("k");
    bad.as_object_mut().unwrap().remove("lang");
    assert_err(&s.post("/_matrix/client/v3/pushers/set", Some(&alice.token), bad).await, 400, "M_MISSING_PARAM");
    assert_err(
        &s.post("/_matrix/client/v3/pushers/set", Some(&alice.token), json!({ "app_id": "x" })).await,
        400,
        "M_BAD_JSON",
    );

    // Pushers belong to the device that set them: logging out removes them.
    let (_, other) = s.login("alice", PASSWORD, json!({})).await;
    let other = user_from(&other);
    s.post("/_matrix/client/v3/pushers/set", Some(&other.token), pusher("key-2")).await;
    let (_, list) = s.get("/_matrix/client/v3/pushers", Some(&alice.token)).await;
    assert_eq!(list["pushers"].as_array().unwrap().len(), 2);
    s.post("/_matrix/client/v3/logout", Some(&other.token), json!({})).await;
    let (_, list) = s.get("/_matrix/client/v3/pushers", Some(&alice.token)).await;
    assert_eq!(list["pushers"].as_array().unwrap().len(), 1);
    assert_eq!(list["pushers"][0]["pushkey"], "key-1");
    s.stop().await;
}
