use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn presence_status() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let carol = s.register("carol", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat" })).await;
    s.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&bob.token), json!({})).await;
    let alice_path = format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id));

    // Never set: offline.
    let (st, p) = s.get(&alice_path, Some(&bob.token)).await;
    assert_eq!((st.as_u16(), p), (200, json!({ "presence": "offline" })));

    let before = *s.state().presence_stream.borrow();
    assert_eq!(
        s.put(&alice_path, Some(&alice.token), json!({ "presence": "online", "status_msg": "En réunion" })).await.0,
        200
    );
    assert!(*s.state().presence_stream.borrow() > before, "the presence stream advanced");
    let (_, p) = s.get(&alice_path, Some(&bob.token)).await;
    assert_eq!(p["presence"], "online");
    assert_eq!(p["status_msg"], "En réunion");
    assert_eq!(p["currently_active"], true);
    assert!(p["last_active_ago"].as_i64().unwrap() < 60_000);
    s.put(&alice_path, Some(&alice.token), json!({ "presence": "unavailable" })).await;
    let (_, p) = s.get(&alice_path, Some(&alice.token)).await;
    assert_eq!(p["presence"], "unavailable");
    assert_eq!(p["currently_active"], false);
    assert!(p.get("status_msg").is_none());

    // Only for oneself; only shared with room-mates; errors.
    assert_err(&s.put(&alice_path, Some(&bob.token), json!({ "presence": "offline" })).await, 403, "M_FORBIDDEN");
    assert_err(&s.get(&alice_path, Some(&carol.token)).await, 403, "M_FORBIDDEN");
    assert_err(&s.put(&alice_path, Some(&alice.token), json!({ "presence": "busy" })).await, 400, "M_INVALID_PARAM");
    assert_err(&s.put(&alice_path, Some(&alice.token), json!({})).await, 400, "M_BAD_JSON");
    assert_err(
        &s.get("/_matrix/client/v3/presence/@nobody:localhost/status", Some(&alice.token)).await,
        404,
        "M_NOT_FOUND",
    );
    s.stop().await;

    // Disabled by configuration: said plainly.
    let s = TestServer::start_with(|c| c.presence.enabled = false).await;
    let u = s.register("u", false).await;
    let path = format!("/_matrix/client/v3/presence/{}/status", enc(&u.user_id));
    assert_err(&s.put(&path, Some(&u.token), json!({ "presence": "online" })).await, 403, "M_FORBIDDEN");
    assert_err(&s.get(&path, Some(&u.token)).await, 403, "M_FORBIDDEN");
    s.stop().await;
}
