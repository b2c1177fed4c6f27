use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn versions_and_well_known() {
    let s = TestServer::start_with(|c| {
        c.public_baseurl = Some("https://matrix.ville.example/".into());
        c.well_known.server = Some("matrix.ville.example:443".into());
        c.well_known.client_extra.insert(
            "io.element.jitsi".into(),
            toml::Value::Table("preferredDomain = \"visio.ville.example\"".parse().unwrap()),
        );
    })
    .await;
    let (st, v) = s.get("/_matrix/client/versions", None).await;
    assert_eq!(st, StatusCode::OK);
    let versions: Vec<&str> = v["versions"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    assert!(versions.contains(&"v1.1") && versions.contains(&"v1.10"), "{v}");
    assert!(versions.contains(&"v1.11"), "authenticated media (v1.11) is implemented");

    let (st, v) = s.get("/.well-known/matrix/client", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["m.homeserver"]["base_url"], "https://matrix.ville.example/");
    assert_eq!(v["io.element.jitsi"]["preferredDomain"], "visio.ville.example");
    let (st, v) = s.get("/.well-known/matrix/server", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["m.server"], "matrix.ville.example:443");
    s.stop().await;

    // Without configuration, both answer 404 M_NOT_FOUND.
    let s = TestServer::start().await;
    assert_err(&s.get("/.well-known/matrix/client", None).await, 404, "M_NOT_FOUND");
    assert_err(&s.get("/.well-known/matrix/server", None).await, 404, "M_NOT_FOUND");
    s.stop().await;
}

#[tokio::test]
async fn startup_endpoints_element_calls() {
    let s = TestServer::start_with(|c| {
        c.turn.uris = vec!["turn:turn.ville.example:3478?transport=udp".into()];
        c.turn.shared_secret = Some("coturn-secret".into());
        c.turn.user_lifetime_secs = 3600;
    })
    .await;
    let alice = s.register("alice", false).await;

    assert_err(&s.get("/_matrix/client/v3/capabilities", None).await, 401, "M_MISSING_TOKEN");
    let (st, v) = s.get("/_matrix/client/v3/capabilities", Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["capabilities"]["m.change_password"]["enabled"], true);
    assert_eq!(v["capabilities"]["m.3pid_changes"]["enabled"], false);

    let (st, v) = s.get("/_matrix/client/v3/voip/turnServer", Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["ttl"], 3600);
    assert_eq!(v["uris"], json!(["turn:turn.ville.example:3478?transport=udp"]));
    let username = v["username"].as_str().unwrap();
    let (expiry, who) = username.split_once(':').unwrap();
    assert_eq!(who, alice.user_id);
    let expiry: u64 = expiry.parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(expiry > now + 3500 && expiry <= now + 3601, "{expiry} vs {now}");
    // The password is what coturn computes from its static-auth-secret.
    let (_, expected) = parvis::api::client::discovery::turn_credentials("coturn-secret", &alice.user_id, 0, expiry);
    assert_eq!(v["password"], expected);

    let (st, v) = s.get("/_matrix/client/v3/thirdparty/protocols", Some(&alice.token)).await;
    assert_eq!((st, v), (StatusCode::OK, json!({})));
    s.stop().await;

    // No TURN configured: {}.
    let s = TestServer::start().await;
    let bob = s.register("bob", false).await;
    let (st, v) = s.get("/_matrix/client/v3/voip/turnServer", Some(&bob.token)).await;
    assert_eq!((st, v), (StatusCode::OK, json!({})));
    s.stop().await;
}

#[tokio::test]
async fn cors_preflight_and_headers() {
    let s = TestServer::start().await;
    let resp = s
        .http
        .request(Method::OPTIONS, format!("{}/_matrix/client/v3/login", s.base))
        .header("Origin", "https://element.ville.example")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "authorization, content-type")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    let methods = h["access-control-allow-methods"].to_str().unwrap().to_ascii_uppercase();
    for m in ["GET", "POST", "PUT", "DELETE", "OPTIONS"] {
        assert!(methods.contains(m), "{methods}");
    }
    let headers = h["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    for x in ["x-requested-with", "content-type", "authorization"] {
        assert!(headers.contains(x), "{headers}");
    }
    // Actual responses, errors included, carry the header too.
    let resp = s
        .http
        .get(format!("{}/_matrix/client/v3/account/whoami", s.base))
        .header("Origin", "https://element.ville.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    s.stop().await;
}

#[tokio::test]
async fn metrics_count_requests_by_endpoint() {
    let s = TestServer::start().await;
    s.get("/_matrix/client/versions", None).await;
    s.get("/_matrix/client/versions", None).await;
    s.get("/_matrix/client/v3/nope", None).await;
    let text = s.http.get(format!("{}/metrics", s.metrics)).send().await.unwrap().text().await.unwrap();
    assert!(
        text.contains(r#"parvis_http_requests_total{method="GET",endpoint="/_matrix/client/versions",status="200"} 2"#),
        "{text}"
    );
    assert!(text.contains(r#"endpoint="unmatched",status="404""#), "{text}");
    assert!(text.contains("parvis_http_request_duration_seconds_bucket"), "{text}");
    assert!(text.contains("parvis_db_pool_connections"), "{text}");
    s.stop().await;
}

#[tokio::test]
async fn several_servers_at_once_are_isolated() {
    let (a, b, c) = tokio::join!(TestServer::start(), TestServer::start(), TestServer::start());
    let (ua, ub) = tokio::join!(a.register("same.name", false), b.register("same.name", false));
    // Same user ID on two servers, two distinct databases: each token works only at home.
    assert_eq!(ua.user_id, ub.user_id);
    assert_eq!(a.get("/_matrix/client/v3/account/whoami", Some(&ua.token)).await.0, 200);
    assert_err(&b.get("/_matrix/client/v3/account/whoami", Some(&ua.token)).await, 401, "M_UNKNOWN_TOKEN");
    assert_err(&c.get("/_matrix/client/v3/profile/@same.name:localhost", None).await, 404, "M_NOT_FOUND");
    tokio::join!(a.stop(), b.stop(), c.stop());
}
