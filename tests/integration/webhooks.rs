//! Alert webhooks through the real HTTP endpoint, their admin API, server notices and bot
//! accounts' rate-limit exemption.

use serde_json::{Value, json};

use crate::common::*;

const ALERTMANAGER: &str = include_str!("../data/webhooks/alertmanager.json");
const GRAFANA: &str = include_str!("../data/webhooks/grafana.json");

async fn messages(s: &TestServer, u: &User, room: &str) -> Vec<Value> {
    let (st, b) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(room)), Some(&u.token)).await;
    assert_eq!(st, 200, "{b}");
    let mut evs: Vec<Value> =
        b["chunk"].as_array().unwrap().iter().filter(|e| e["type"] == "m.room.message").cloned().collect();
    evs.reverse();
    evs
}

async fn post_hook(s: &TestServer, hook: &str, secret: Option<&str>, body: &str) -> (u16, Value) {
    let mut rb = s
        .http
        .post(format!("{}/_parvis/webhook/{hook}", s.base))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(t) = secret {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_webhook_end_to_end() {
    let s = TestServer::start_with(|c| {
        c.webhooks.per_hook = rate(0.01, 6);
    })
    .await;
    let admin = s.register("admin", true).await;
    let agent = s.register("agent", false).await;
    let room = create(&s, &admin, json!({"name": "Astreinte", "invite": [agent.user_id]})).await;
    s.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&agent.token), json!({})).await;

    // Only admins manage hooks.
    let req = json!({"room_id": room, "name": "Prometheus", "bot": "alertbot", "mention_severities": ["critical"]});
    assert_err(&s.post("/_parvis/admin/v1/webhooks", Some(&agent.token), req.clone()).await, 403, "M_FORBIDDEN");
    let (st, hook) = s.post("/_parvis/admin/v1/webhooks", Some(&admin.token), req).await;
    assert_eq!(st, 200, "{hook}");
    let (id, secret) = (hook["hook_id"].as_str().unwrap().to_owned(), hook["secret"].as_str().unwrap().to_owned());
    assert_eq!(hook["bot_user_id"], "@alertbot:localhost");
    assert_eq!(hook["path"], format!("/_parvis/webhook/{id}"));
    let (_, list) = s.get("/_parvis/admin/v1/webhooks", Some(&admin.token)).await;
    assert_eq!(list["webhooks"][0]["hook_id"], id.as_str());
    assert!(
        list["webhooks"][0].get("secret").is_none() && list.to_string().find(&secret).is_none(),
        "the secret is shown once"
    );
    // The bot is a bot account.
    let (_, u) = s.get("/_synapse/admin/v2/users/@alertbot:localhost", Some(&admin.token)).await;
    assert_eq!(u["user_type"], "bot", "{u}");

    // Wrong or missing secret, unknown hook: 403, nothing posted.
    assert_eq!(post_hook(&s, &id, Some("pvw_wrong"), ALERTMANAGER).await.0, 403);
    assert_eq!(post_hook(&s, &id, None, ALERTMANAGER).await.0, 403);
    assert_eq!(post_hook(&s, "nohook", Some(&secret), ALERTMANAGER).await.0, 403);
    // Bad payloads: 400 with the reason, nothing posted.
    let (st, b) = post_hook(&s, &id, Some(&secret), "{\"alerts\": [{\"status\": \"burning\"}]}").await;
    assert_eq!((st, b["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{b}");
    assert!(b["error"].as_str().unwrap().contains("alerts[0].status"), "{b}");
    let (st, b) = post_hook(&s, &id, Some(&secret), "not json").await;
    assert_eq!((st, b["errcode"].as_str()), (400, Some("M_NOT_JSON")), "{b}");
    assert!(messages(&s, &agent, &room).await.is_empty(), "nothing posted so far");

    // Alertmanager, Grafana, plain text (query-string secret).
    let (st, b) = post_hook(&s, &id, Some(&secret), ALERTMANAGER).await;
    assert_eq!(st, 200, "{b}");
    let (st, b) = post_hook(&s, &id, Some(&secret), GRAFANA).await;
    assert_eq!(st, 200, "{b}");
    let r = s
        .http
        .post(format!("{}/_parvis/webhook/{id}?token={secret}", s.base))
        .json(&json!({"text": "Sauvegarde terminée", "html": "<b>Sauvegarde</b> terminée"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let msgs = messages(&s, &agent, &room).await;
    assert_eq!(msgs.len(), 3, "{msgs:#?}");
    assert!(msgs.iter().all(|m| m["sender"] == "@alertbot:localhost"));
    let am = &msgs[0]["content"];
    assert!(am["body"].as_str().unwrap().starts_with("@room 🔥 [FIRING:1 firing, 1 resolved] InstanceDown"), "{am}");
    assert_eq!(am["m.mentions"]["room"], true);
    assert_eq!(am["msgtype"], "m.text");
    assert!(am["formatted_body"].as_str().unwrap().contains("<a href="));
    assert_eq!(msgs[1]["content"]["msgtype"], "m.notice", "no critical firing alert: a notice");
    assert!(msgs[1]["content"]["body"].as_str().unwrap().contains("High memory usage"));
    assert_eq!(msgs[2]["content"]["body"], "Sauvegarde terminée");
    // The @room alert highlighted the agent.
    let (_, n) = s.get("/_matrix/client/v3/notifications", Some(&agent.token)).await;
    assert!(
        n["notifications"].as_array().unwrap().iter().any(|x| x["event"]["content"]["m.mentions"]["room"] == true),
        "{n}"
    );

    // Per-hook rate limit: 6 requests of burst were taken (5 accepted, 1 failed at parse);
    // the next is refused.
    let mut limited = false;
    for _ in 0..3 {
        let (st, b) = post_hook(&s, &id, Some(&secret), "{\"text\": \"x\"}").await;
        if st == 429 {
            assert_eq!(b["errcode"], "M_LIMIT_EXCEEDED");
            limited = true;
            break;
        }
    }
    assert!(limited, "per-hook rate limit");

    // Revoke: 403 from then on; a second revoke is 404.
    let (st, _) = s.delete(&format!("/_parvis/admin/v1/webhooks/{id}"), Some(&admin.token), json!({})).await;
    assert_eq!(st, 200);
    assert_eq!(post_hook(&s, &id, Some(&secret), "{\"text\": \"x\"}").await.0, 403);
    assert_err(
        &s.delete(&format!("/_parvis/admin/v1/webhooks/{id}"), Some(&admin.token), json!({})).await,
        404,
        "M_NOT_FOUND",
    );

    // A private room the admin is not in: the bot cannot join, nothing is created.
    let other = create(&s, &agent, json!({})).await;
    let r = s.post("/_parvis/admin/v1/webhooks", Some(&admin.token), json!({"room_id": other, "name": "x"})).await;
    assert_err(&r, 403, "M_FORBIDDEN");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_notices_and_bot_rate_limits() {
    let s = TestServer::start_with(|c| {
        c.server_notices.system_mxid_localpart = Some("notices".into());
        c.rate_limits.enabled = true;
        c.rate_limits.messages_per_user = rate(0.01, 2);
        c.rate_limits.messages_per_ip = rate(0.01, 1000);
        c.bots.exempt_from_rate_limits = true;
    })
    .await;
    let admin = s.register("admin", true).await;
    let agent = s.register("agent", false).await;
    let notice = |text: &str| json!({"user_id": agent.user_id, "content": {"msgtype": "m.text", "body": text}});
    assert_err(
        &s.post("/_synapse/admin/v1/send_server_notice", Some(&agent.token), notice("x")).await,
        403,
        "M_FORBIDDEN",
    );
    let (st, b) =
        s.post("/_synapse/admin/v1/send_server_notice", Some(&admin.token), notice("Maintenance ce soir")).await;
    assert_eq!(st, 200, "{b}");
    let (st, b2) = s.put("/_synapse/admin/v1/send_server_notice/t1", Some(&admin.token), notice("Deuxième")).await;
    assert_eq!(st, 200, "{b2}");
    let (_, b3) = s.put("/_synapse/admin/v1/send_server_notice/t1", Some(&admin.token), notice("Deuxième")).await;
    assert_eq!(b2["event_id"], b3["event_id"], "a retried transaction sends nothing new");
    assert_err(
        &s.post(
            "/_synapse/admin/v1/send_server_notice",
            Some(&admin.token),
            json!({"user_id": "@ghost:localhost", "content": {}}),
        )
        .await,
        404,
        "M_NOT_FOUND",
    );

    // The agent is invited to one room, tagged m.server_notice, and cannot post in it.
    let (_, sync) = s.get("/_matrix/client/v3/sync", Some(&agent.token)).await;
    let invites = sync["rooms"]["invite"].as_object().unwrap();
    assert_eq!(invites.len(), 1, "{sync}");
    let room = invites.keys().next().unwrap().clone();
    let (_, tags) = s
        .get(&format!("/_matrix/client/v3/user/{}/rooms/{}/tags", enc(&agent.user_id), enc(&room)), Some(&agent.token))
        .await;
    assert!(tags["tags"]["m.server_notice"].is_object(), "{tags}");
    s.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&agent.token), json!({})).await;
    let (_, m) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=20", enc(&room)), Some(&agent.token)).await;
    let bodies: Vec<&str> =
        m["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert!(bodies.contains(&"Maintenance ce soir") && bodies.contains(&"Deuxième"), "{bodies:?}");
    let r = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/a1", enc(&room)),
            Some(&agent.token),
            json!({"msgtype": "m.text", "body": "hi"}),
        )
        .await;
    assert_err(&r, 403, "M_FORBIDDEN");
    // The system user is a bot.
    let (_, u) = s.get("/_synapse/admin/v2/users/@notices:localhost", Some(&admin.token)).await;
    assert_eq!(u["user_type"], "bot", "{u}");

    // Rate limits: a human is limited, a bot (user_type bot, admin API) is not.
    let own = create(&s, &admin, json!({"preset": "public_chat"})).await;
    let (st, b) = s
        .put(
            "/_synapse/admin/v2/users/@robot:localhost",
            Some(&admin.token),
            json!({"password": PASSWORD, "user_type": "bot"}),
        )
        .await;
    assert!(st == 200 || st == 201, "{b}");
    let (_, login) = s.login("robot", PASSWORD, json!({})).await;
    let robot = user_from(&login);
    s.post(&format!("/_matrix/client/v3/join/{}", enc(&own)), Some(&robot.token), json!({})).await;
    s.post(&format!("/_matrix/client/v3/join/{}", enc(&own)), Some(&agent.token), json!({})).await;
    let send = |u: &User, i: usize| {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/r{i}", enc(&own));
        let token = u.token.clone();
        let s = &s;
        async move { s.put(&path, Some(&token), json!({"msgtype": "m.text", "body": "x"})).await.0.as_u16() }
    };
    let human: Vec<u16> = futures_util::future::join_all((0..5).map(|i| send(&agent, i))).await;
    assert!(human.contains(&429), "{human:?}");
    for i in 0..10 {
        assert_eq!(send(&robot, 100 + i).await, 200, "bots are exempt");
    }
    s.stop().await;
}

/// `parvis webhook create|list|revoke` against a running server's admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_cli() {
    let s = TestServer::start().await;
    let admin = s.register("admin", true).await;
    let room = create(&s, &admin, json!({})).await;
    let run = |args: Vec<String>| {
        let mut c = crate::cli::parvis();
        c.arg("webhook").args(args).args(["--server-url", &s.base]).env("PARVIS_ADMIN_TOKEN", &admin.token);
        c.output().unwrap()
    };
    let out = run(vec![
        "create".into(),
        "--room".into(),
        room.clone(),
        "--name".into(),
        "CLI".into(),
        "--mention-severity".into(),
        "critical".into(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hook: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (id, secret) = (hook["hook_id"].as_str().unwrap().to_owned(), hook["secret"].as_str().unwrap().to_owned());
    assert_eq!(hook["mention_severities"], json!(["critical"]));
    assert_eq!(post_hook(&s, &id, Some(&secret), "{\"text\": \"via CLI\"}").await.0, 200);
    let out = run(vec!["list".into()]);
    assert!(out.status.success());
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["webhooks"][0]["hook_id"], id.as_str());
    assert!(list["webhooks"][0]["last_used_ts"].is_i64(), "{list}");
    let out = run(vec!["revoke".into(), id.clone()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(post_hook(&s, &id, Some(&secret), "{\"text\": \"x\"}").await.0, 403);
    let out = run(vec!["revoke".into(), id.clone()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404 M_NOT_FOUND"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A non-admin token is refused with the server's error.
    let agent = s.register("agent", false).await;
    let out = crate::cli::parvis()
        .args(["webhook", "list", "--server-url", &s.base, "--access-token", &agent.token])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("403 M_FORBIDDEN"));
    s.stop().await;
}
