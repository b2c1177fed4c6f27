//! Throughput measurements of issue 17, run by hand (ignored by default):
//!
//! ```sh
//! cargo test --test integration bench_bots -- --ignored --nocapture --test-threads 1
//! ```
//!
//! `appservice_delivery_rate`: 20 senders post 2 000 messages into a room where an appservice's
//! user is joined; measured from the first send to the last event acknowledged by the (mock)
//! appservice. `webhook_rate`: 8 concurrent clients post Alertmanager payloads to one hook.
//! Results are in docs/benchmarks.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::appservice::{AS_TOKEN, registration, server_with_appservice, start_mock};
use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn appservice_delivery_rate() {
    let (mock, url) = start_mock().await;
    let file = registration(&url, "");
    let s = server_with_appservice(&file, &mock).await;
    let room = {
        let owner = s.register("owner", false).await;
        create(&s, &owner, json!({"preset": "public_chat"})).await
    };
    s.post(
        "/_matrix/client/v3/register",
        Some(AS_TOKEN),
        json!({"type": "m.login.application_service", "username": "bridge_bob", "inhibit_login": true}),
    )
    .await;
    s.post(&format!("/_matrix/client/v3/join/{}?user_id=@bridge_bob:localhost", enc(&room)), Some(AS_TOKEN), json!({}))
        .await;
    let mut users = Vec::new();
    for i in 0..20 {
        let u = s.register(&format!("sender{i}"), false).await;
        s.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&u.token), json!({})).await;
        users.push(u);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = mock.events().len();
    // Phase 2 measures the sender alone: the appservice refuses while the messages are sent, so
    // they wait in the database; then it accepts and the backlog is drained.
    mock.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    const PER_USER: usize = 100;
    let started = Instant::now();
    let base = Arc::new(s.base.clone());
    let tasks: Vec<_> = users
        .into_iter()
        .map(|u| {
            let (http, base, room) = (s.http.clone(), base.clone(), room.clone());
            tokio::spawn(async move {
                for i in 0..PER_USER {
                    let r = http
                        .put(format!("{base}/_matrix/client/v3/rooms/{}/send/m.room.message/b{i}", enc(&room)))
                        .bearer_auth(&u.token)
                        .json(&json!({"msgtype": "m.text", "body": format!("bench {i}")}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let sent_in = started.elapsed();
    let total = 20 * PER_USER;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let drain = Instant::now();
    mock.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    while mock.events().len() < before + total {
        assert!(started.elapsed() < Duration::from_secs(300), "delivery stalled at {}", mock.events().len() - before);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained_in = drain.elapsed();
    let txns = mock.txns.lock().len();
    println!(
        "appservice: {total} events sent in {:.2} s ({:.0}/s); backlog of {total} delivered in {:.2} s \
         (including up to 1 s of retry backoff): {:.0} events/s, {txns} transaction requests",
        sent_in.as_secs_f64(),
        total as f64 / sent_in.as_secs_f64(),
        drained_in.as_secs_f64(),
        total as f64 / drained_in.as_secs_f64()
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn webhook_rate() {
    let s = TestServer::start_with(|c| c.webhooks.per_hook = rate(1_000_000.0, 1_000_000)).await;
    let admin = s.register("admin", true).await;
    let room = create(&s, &admin, json!({})).await;
    let (_, hook) =
        s.post("/_parvis/admin/v1/webhooks", Some(&admin.token), json!({"room_id": room, "name": "bench"})).await;
    let url = Arc::new(format!("{}/_parvis/webhook/{}", s.base, hook["hook_id"].as_str().unwrap()));
    let secret = Arc::new(hook["secret"].as_str().unwrap().to_owned());
    let payload = Arc::new(include_str!("../data/webhooks/alertmanager.json").to_owned());
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 250;
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (http, url, secret, payload) = (s.http.clone(), url.clone(), secret.clone(), payload.clone());
            tokio::spawn(async move {
                for _ in 0..PER_CLIENT {
                    let r = http
                        .post(url.as_str())
                        .bearer_auth(secret.as_str())
                        .header("content-type", "application/json")
                        .body(payload.as_str().to_owned())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed();
    let n = CLIENTS * PER_CLIENT;
    println!(
        "webhook: {n} Alertmanager posts in {:.2} s: {:.0} requests/s",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    s.stop().await;
}
