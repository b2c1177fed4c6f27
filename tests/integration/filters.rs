use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn upload_and_fetch_filters() {
    let s = TestServer::start().await;
    let me = s.register("filtreur", false).await;
    let other = s.register("autre", false).await;
    let path = format!("/_matrix/client/v3/user/{}/filter", enc(&me.user_id));
    // What Element sends before its first sync, plus an unknown extension field.
    let filter = json!({
        "room": {
            "state": { "lazy_load_members": true },
            "timeline": { "limit": 20, "unread_thread_notifications": true, "not_types": ["m.call.*"] }
        },
        "event_format": "client",
        "org.example.extension": 1
    });
    let (st, created) = s.post(&path, Some(&me.token), filter.clone()).await;
    assert_eq!(st, 200, "{created}");
    let id = created["filter_id"].as_str().unwrap().to_owned();
    let (st, back) = s.get(&format!("{path}/{id}"), Some(&me.token)).await;
    assert_eq!(st, 200);
    assert_eq!(back, filter, "stored exactly as sent");
    let (_, second) = s.post(&path, Some(&me.token), json!({})).await;
    assert_ne!(second["filter_id"], created["filter_id"]);

    // Someone else's filters: neither readable nor writable.
    assert_err(&s.get(&format!("{path}/{id}"), Some(&other.token)).await, 403, "M_FORBIDDEN");
    assert_err(&s.post(&path, Some(&other.token), json!({})).await, 403, "M_FORBIDDEN");
    let other_path = format!("/_matrix/client/v3/user/{}/filter", enc(&other.user_id));
    let (_, theirs) = s.post(&other_path, Some(&other.token), json!({})).await;
    let their_id = theirs["filter_id"].as_str().unwrap();
    assert_err(&s.get(&format!("{path}/{their_id}"), Some(&me.token)).await, 404, "M_NOT_FOUND");
    assert_err(&s.get(&format!("{path}/999999"), Some(&me.token)).await, 404, "M_NOT_FOUND");
    assert_err(&s.get(&format!("{path}/not-a-number"), Some(&me.token)).await, 404, "M_NOT_FOUND");

    // Wrong types are refused with the field named.
    let bad = s.post(&path, Some(&me.token), json!({ "room": { "timeline": { "limit": "twenty" } } })).await;
    assert_err(&bad, 400, "M_BAD_JSON");
    assert!(bad.1["error"].as_str().unwrap().contains("room.timeline.limit"), "{}", bad.1);
    assert_err(&s.post(&path, Some(&me.token), json!({ "event_format": "xml" })).await, 400, "M_BAD_JSON");
    assert_err(&s.post(&path, Some(&me.token), json!({ "event_fields": "content" })).await, 400, "M_BAD_JSON");
    s.stop().await;
}
