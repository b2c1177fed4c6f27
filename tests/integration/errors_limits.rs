use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn unknown_endpoints_methods_and_bad_bodies() {
    let s = TestServer::start_with(|c| c.limits.max_request_body_bytes = 4096).await;
    assert_err(&s.get("/_matrix/client/v3/does/not/exist", None).await, 404, "M_UNRECOGNIZED");
    assert_err(&s.get("/random", None).await, 404, "M_UNRECOGNIZED");
    assert_err(
        &s.request(reqwest::Method::DELETE, "/_matrix/client/v3/login", None, None).await,
        405,
        "M_UNRECOGNIZED",
    );
    assert_err(&s.get("/_matrix/client/v3/logout", None).await, 405, "M_UNRECOGNIZED");

    let raw = |body: &'static str| {
        s.http
            .post(format!("{}/_matrix/client/v3/login", s.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for bad in ["{not json", "\u{0}", "{\"type\": }"] {
        let resp = raw(bad).await.unwrap();
        assert_eq!(resp.status(), 400);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["errcode"], "M_NOT_JSON", "{bad}: {v}");
    }
    for bad in ["[]", "42", "{\"type\": 5}", "{\"type\": \"m.login.password\", \"identifier\": \"str\"}"] {
        let resp = raw(bad).await.unwrap();
        assert_eq!(resp.status(), 400);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["errcode"], "M_BAD_JSON", "{bad}: {v}");
    }
    // Oversized: by Content-Length, and by streaming without one.
    let big = format!("{{\"type\":\"{}\"}}", "x".repeat(10_000));
    let resp = s.http.post(format!("{}/_matrix/client/v3/login", s.base)).body(big.clone()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp.json::<serde_json::Value>().await.unwrap()["errcode"], "M_TOO_LARGE");
    let stream = futures_stream(big.into_bytes());
    let resp = s
        .http
        .post(format!("{}/_matrix/client/v3/login", s.base))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp.json::<serde_json::Value>().await.unwrap()["errcode"], "M_TOO_LARGE");
    // The server is still fine.
    assert_eq!(s.get("/_matrix/client/versions", None).await.0, 200);
    s.stop().await;
}

fn futures_stream(data: Vec<u8>) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = data.chunks(1000).map(|c| Ok(c.to_vec())).collect();
    tokio_stream::iter(chunks)
}

#[tokio::test]
async fn login_rate_limits_per_ip_and_account() {
    let s = TestServer::start_with(|c| {
        c.rate_limits.enabled = true;
        c.rate_limits.login_per_ip = rate(0.5, 4);
        c.rate_limits.login_per_account = rate(0.5, 2);
    })
    .await;
    s.register("target", false).await;
    // Per account: the third attempt on one account within the burst is refused...
    assert_err(&s.login("target", "bad", json!({})).await, 403, "M_FORBIDDEN");
    assert_err(&s.login("target", "bad", json!({})).await, 403, "M_FORBIDDEN");
    let limited = s.login("target", PASSWORD, json!({})).await;
    assert_err(&limited, 429, "M_LIMIT_EXCEEDED");
    let retry = limited.1["retry_after_ms"].as_u64().unwrap();
    assert!(retry > 0 && retry <= 2000, "{retry}");
    // ...with a Retry-After header.
    let resp = s
        .http
        .post(format!("{}/_matrix/client/v3/login", s.base))
        .json(&json!({ "type": "m.login.password", "user": "target", "password": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    // Per IP: other accounts from the same address run out too (4 per burst in all).
    let r = s.login("someone-else", "x", json!({})).await;
    assert_err(&r, 429, "M_LIMIT_EXCEEDED");
    // Waiting as told lets the next attempt through.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_eq!(s.login("target", PASSWORD, json!({})).await.0, 200);
    s.stop().await;
}

#[tokio::test]
async fn registration_rate_limit() {
    let s = TestServer::start_with(|c| {
        c.registration.enabled = true;
        c.rate_limits.enabled = true;
        c.rate_limits.registration_per_ip = rate(0.1, 2);
    })
    .await;
    for _ in 0..2 {
        assert_eq!(s.get("/_matrix/client/v3/register/available?username=abc", None).await.0, 200);
    }
    assert_err(&s.get("/_matrix/client/v3/register/available?username=abc", None).await, 429, "M_LIMIT_EXCEEDED");
    assert_err(
        &s.post("/_matrix/client/v3/register", None, json!({ "username": "abc" })).await,
        429,
        "M_LIMIT_EXCEEDED",
    );
    s.stop().await;
}

#[tokio::test]
async fn trusted_proxy_forwarded_for() {
    let s = TestServer::start_with(|c| {
        c.listen.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
        c.rate_limits.enabled = true;
        c.rate_limits.login_per_ip = rate(0.01, 1);
    })
    .await;
    let login = |ip: &'static str| {
        s.http
            .post(format!("{}/_matrix/client/v3/login", s.base))
            .header("x-forwarded-for", ip)
            .json(&json!({ "type": "m.login.password", "user": "x", "password": "y" }))
            .send()
    };
    // Each forwarded client has its own bucket.
    assert_eq!(login("203.0.113.1").await.unwrap().status(), 403);
    assert_eq!(login("203.0.113.2").await.unwrap().status(), 403);
    assert_eq!(login("203.0.113.1").await.unwrap().status(), 429);
    s.stop().await;
}
