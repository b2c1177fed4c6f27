//! Remote media and E2EE keys across servers (issue 13), between real Parvis servers over TLS
//! with a test CA (server names `127.0.0.1:<port>`): a user on B downloads media of A (cached
//! on B, still served once A is gone), thumbnails, the federation media endpoints themselves,
//! keys queried and one-time keys claimed across servers, failures for a stopped server, a fake
//! federation server for `Location` redirects (through the SSRF guard), single flight, size
//! limits and servers predating federation media; and the same checks against Synapse when it
//! is installed.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::response::IntoResponse;
use bytes::Bytes;
use image::ImageFormat;
use parvis::federation::auth;
use reqwest::{Method, StatusCode};
use ruma::OwnedServerName;
use serde_json::{Value, json};

use crate::common::{TestServer, User, enc};
use crate::e2ee::{b64, cross_key, device_keys, key, public, sign};
use crate::media::{picture, upload};

use crate::fed_harness::{Ca, Fed, free_port, synapse_python};

/// A Parvis of the shared harness whose certificate comes from `ca`, which it also trusts.
async fn start(dir: &Path, label: &str, ca: &Ca, adjust: impl FnOnce(&mut parvis::config::Config)) -> Fed {
    crate::fed_harness::start(dir, label, ca, ca, adjust).await
}

fn https_client(ca: &Ca) -> reqwest::Client {
    crate::fed_harness::https_client(&[ca])
}

// ---- helpers of this file ----

/// A client GET on `s`: status, content type and body.
async fn get(s: &TestServer, token: &str, path: &str) -> (StatusCode, String, Bytes) {
    let r = s.http.get(format!("{}{path}", s.base)).bearer_auth(token).send().await.expect("request sent");
    let st = r.status();
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (st, ct, r.bytes().await.unwrap())
}

fn json_of(b: &Bytes) -> Value {
    serde_json::from_slice(b).unwrap_or(Value::Null)
}

#[track_caller]
fn assert_matrix(resp: &(StatusCode, String, Bytes), status: u16, errcode: &str) {
    let v = json_of(&resp.2);
    assert_eq!(resp.0.as_u16(), status, "{v}");
    assert_eq!(v["errcode"], errcode, "{v}");
}

fn download_path(server: &str, media_id: &str) -> String {
    format!("/_matrix/client/v1/media/download/{}/{media_id}", enc(server))
}

/// A request to `to`'s federation listener, `X-Matrix`-signed by `from` when given.
async fn fed_send(
    http: &reqwest::Client,
    from: Option<&parvis::state::AppState>,
    to: &OwnedServerName,
    method: Method,
    uri: &str,
    body: Option<&Value>,
) -> reqwest::Response {
    let mut rb = http.request(method.clone(), format!("https://{to}{uri}"));
    if let Some(st) = from {
        let h = auth::sign_request(&st.federation.signer, &method, uri, to, body).unwrap();
        rb = rb.header("authorization", h);
    }
    if let Some(b) = body {
        rb = rb.json(b);
    }
    rb.send().await.expect("federation request sent")
}

fn one_time_key(u: &User, k: &ed25519_dalek::SigningKey, n: u8) -> Value {
    let mut o = json!({ "key": b64(&[n; 32]) });
    sign(&mut o, &u.user_id, &format!("ed25519:{}", u.device_id), k);
    o
}

/// Uploads device keys, two one-time keys and cross-signing keys for `u`; returns
/// `(device keys, master key, self-signing key)`.
async fn upload_all_keys(s: &TestServer, u: &User, seed: u8) -> (Value, Value, Value) {
    let (kd, km, kss) = (key(seed), key(seed + 1), key(seed + 2));
    let dk = device_keys(u, &kd);
    let otks = json!({
        "signed_curve25519:AAAAAQ": one_time_key(u, &kd, 1),
        "signed_curve25519:AAAAAg": one_time_key(u, &kd, 2),
    });
    let (st, v) = s
        .post("/_matrix/client/v3/keys/upload", Some(&u.token), json!({ "device_keys": dk, "one_time_keys": otks }))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["one_time_key_counts"]["signed_curve25519"], 2);
    let master = cross_key(u, "master", &km);
    let mut ss = cross_key(u, "self_signing", &kss);
    sign(&mut ss, &u.user_id, &format!("ed25519:{}", public(&km)), &km);
    let (st, v) = s
        .post(
            "/_matrix/client/v3/keys/device_signing/upload",
            Some(&u.token),
            json!({ "master_key": master, "self_signing_key": ss }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    (dk, master, ss)
}

async fn otk_count(s: &TestServer, u: &User) -> i64 {
    let (st, v) = s.post("/_matrix/client/v3/keys/upload", Some(&u.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["one_time_key_counts"]["signed_curve25519"].as_i64().unwrap_or(0)
}

/// The keys of `dk` without `unsigned`.
fn bare(dk: &Value) -> Value {
    let mut d = dk.clone();
    d.as_object_mut().unwrap().remove("unsigned");
    d
}

#[tokio::test]
async fn remote_media_and_keys_between_parvis_servers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let http = https_client(&ca);
    let a = start(dir.path(), "a", &ca, |_| {}).await;
    let b = start(dir.path(), "b", &ca, |_| {}).await;
    // C shows device names to other servers.
    let c = start(dir.path(), "c", &ca, |c| c.federation.allow_device_name_lookup = true).await;
    let sb = b.server.state().clone();
    let alice = a.server.register("alice", false).await;
    let bob = b.server.register("bob", false).await;

    // ---- media: alice uploads on A
    let png = picture(64, 48, ImageFormat::Png);
    let (st, v) = upload(&a.server, Some(&alice.token), "image/png", Some("plan.png"), png.clone()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let mxc = v["content_uri"].as_str().unwrap().to_owned();
    let media_id = mxc.rsplit('/').next().unwrap().to_owned();
    assert_eq!(mxc, format!("mxc://{}/{media_id}", a.name));
    let text = b"Compte rendu du conseil municipal".to_vec();
    let (_, v) = upload(&a.server, Some(&alice.token), "text/plain", None, text.clone()).await;
    let text_id = v["content_uri"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();

    // The federation endpoint itself: unsigned → 401; signed → multipart/mixed, {} then bytes.
    let uri = format!("/_matrix/federation/v1/media/download/{media_id}");
    let r = fed_send(&http, None, &a.name, Method::GET, &uri, None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.json::<Value>().await.unwrap()["errcode"], "M_UNAUTHORIZED");
    let r = fed_send(&http, Some(&sb), &a.name, Method::GET, &uri, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("multipart/mixed; boundary="), "{ct}");
    let body = r.bytes().await.unwrap();
    let (meta, part) = parvis::federation::media::parse_multipart(&ct, &body).unwrap();
    assert_eq!(meta, json!({}));
    assert_eq!(part.content_type.as_deref(), Some("image/png"));
    assert_eq!(part.body.as_ref(), png.as_slice());
    assert!(part.content_disposition.unwrap().contains("plan.png"));
    // Federation thumbnail: a PNG of the chosen size; unknown media 404; bad method 400.
    let turi = format!("/_matrix/federation/v1/media/thumbnail/{media_id}?width=32&height=32&method=scale");
    let r = fed_send(&http, Some(&sb), &a.name, Method::GET, &turi, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    let body = r.bytes().await.unwrap();
    let (_, part) = parvis::federation::media::parse_multipart(&ct, &body).unwrap();
    assert_eq!(part.content_type.as_deref(), Some("image/png"));
    let thumb = image::load_from_memory(&part.body).unwrap();
    assert!(thumb.width() <= 64 && thumb.width() >= 32, "{}x{}", thumb.width(), thumb.height());
    let r = fed_send(&http, Some(&sb), &a.name, Method::GET, "/_matrix/federation/v1/media/download/nope", None).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let bad = format!("/_matrix/federation/v1/media/thumbnail/{media_id}?width=32&height=32&method=zoom");
    let r = fed_send(&http, Some(&sb), &a.name, Method::GET, &bad, None).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // ---- bob on B downloads mxc://A/...: same bytes and type, then cached on B.
    let (st, ct, got) = get(&b.server, &bob.token, &download_path(a.name.as_str(), &media_id)).await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&got));
    assert_eq!(ct, "image/png");
    assert_eq!(got.as_ref(), png.as_slice());
    let cached = parvis::storage::media::get(&sb.db, a.name.as_str(), &media_id).await.unwrap().expect("cached on B");
    assert_eq!(cached.size, Some(png.len() as i64));
    assert_eq!(cached.upload_name.as_deref(), Some("plan.png"));
    assert_eq!(cached.uploader, None);
    // With a file name; the legacy endpoint is frozen for new media (404 like local media).
    let (st, _, got) =
        get(&b.server, &bob.token, &format!("{}/autre.png", download_path(a.name.as_str(), &media_id))).await;
    assert_eq!((st, got.len()), (StatusCode::OK, png.len()));
    // Thumbnail of remote media through B.
    let tpath = format!("/_matrix/client/v1/media/thumbnail/{}/{media_id}?width=32&height=32", enc(a.name.as_str()));
    let (st, ct, got) = get(&b.server, &bob.token, &tpath).await;
    assert_eq!((st, ct.as_str()), (StatusCode::OK, "image/png"), "{}", String::from_utf8_lossy(&got));
    assert!(image::load_from_memory(&got).is_ok());
    // Unknown remote media: 404; allow_remote=false for uncached remote media: 404 (then fetched).
    assert_matrix(&get(&b.server, &bob.token, &download_path(a.name.as_str(), "inconnu")).await, 404, "M_NOT_FOUND");
    let p = format!("{}?allow_remote=false", download_path(a.name.as_str(), &text_id));
    assert_matrix(&get(&b.server, &bob.token, &p).await, 404, "M_NOT_FOUND");
    assert!(parvis::storage::media::get(&sb.db, a.name.as_str(), &text_id).await.unwrap().is_none());
    let (st, ct, got) = get(&b.server, &bob.token, &download_path(a.name.as_str(), &text_id)).await;
    assert_eq!((st, ct.as_str(), got.as_ref()), (StatusCode::OK, "text/plain", text.as_slice()));
    // A remote server that does not answer: 502 (not a 500, not a hang).
    let gone = format!("127.0.0.1:{}", free_port());
    assert_matrix(&get(&b.server, &bob.token, &download_path(&gone, "abc")).await, 502, "M_UNKNOWN");
    // Bad IDs: 404.
    assert_matrix(&get(&b.server, &bob.token, &download_path("not a server!", "abc")).await, 404, "M_NOT_FOUND");

    // ---- keys: alice uploads device, one-time and cross-signing keys on A, and names her device
    let (dk, master, ss) = upload_all_keys(&a.server, &alice, 40).await;
    let (st, _) = a
        .server
        .put(
            &format!("/_matrix/client/v3/devices/{}", enc(&alice.device_id)),
            Some(&alice.token),
            json!({ "display_name": "Portable d'Alice" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    // bob on B queries alice's keys (and an unknown user of A, and bob's own).
    let carol_gone = format!("@carol:{}", c.name);
    let q = json!({ "device_keys": { &alice.user_id: [], format!("@nobody:{}", a.name): [], &bob.user_id: [] } });
    let (st, v) = b.server.post("/_matrix/client/v3/keys/query", Some(&bob.token), q).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["failures"], json!({}), "{v}");
    let got = &v["device_keys"][&alice.user_id][&alice.device_id];
    assert_eq!(bare(got), dk, "{v}");
    // Device names do not cross servers by default (federation.allow_device_name_lookup).
    assert!(got.get("unsigned").is_none_or(|u| u.get("device_display_name").is_none()), "{got}");
    assert_eq!(v["master_keys"][&alice.user_id], master);
    assert_eq!(v["self_signing_keys"][&alice.user_id], ss);
    assert!(v["user_signing_keys"].get(&alice.user_id).is_none());
    assert_eq!(v["device_keys"][format!("@nobody:{}", a.name)], json!({}));
    assert!(v["device_keys"][&bob.user_id].is_object());
    // Only the devices asked for.
    let q = json!({ "device_keys": { &alice.user_id: ["AUTRE"] } });
    let (_, v) = b.server.post("/_matrix/client/v3/keys/query", Some(&bob.token), q).await;
    assert_eq!(v["device_keys"][&alice.user_id], json!({}), "{v}");

    // GET user/devices over federation: stream_id, keys, cross-signing keys, no display name.
    let uri = format!("/_matrix/federation/v1/user/devices/{}", enc(&alice.user_id));
    let r = fed_send(&http, None, &a.name, Method::GET, &uri, None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = fed_send(&http, Some(&sb), &a.name, Method::GET, &uri, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let d: Value = r.json().await.unwrap();
    assert_eq!(d["user_id"], alice.user_id.as_str());
    assert!(d["stream_id"].as_i64().unwrap() > 0, "{d}");
    assert_eq!(d["devices"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(d["devices"][0]["device_id"], alice.device_id.as_str());
    assert_eq!(d["devices"][0]["keys"], dk);
    assert!(d["devices"][0].get("device_display_name").is_none(), "{d}");
    assert_eq!(d["master_key"], master);
    assert_eq!(d["self_signing_key"], ss);
    // Users of other servers, invalid IDs: 400, never a 500.
    for user in [bob.user_id.as_str(), "pas-un-id", "@x:"] {
        let r = fed_send(
            &http,
            Some(&sb),
            &a.name,
            Method::GET,
            &format!("/_matrix/federation/v1/user/devices/{}", enc(user)),
            None,
        )
        .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{user}");
        assert_eq!(r.json::<Value>().await.unwrap()["errcode"], "M_INVALID_PARAM");
    }
    // Hostile user/keys/query and claim bodies.
    let kq = "/_matrix/federation/v1/user/keys/query";
    let kc = "/_matrix/federation/v1/user/keys/claim";
    for (uri, body, code) in [
        (kq, json!({ "device_keys": { &bob.user_id: [] } }), "M_INVALID_PARAM"),
        (kq, json!({ "device_keys": { "pas-un-id": [] } }), "M_INVALID_PARAM"),
        (kq, json!({ "device_keys": { &alice.user_id: "tous" } }), "M_BAD_JSON"),
        (kq, json!({ "device_keys": [] }), "M_BAD_JSON"),
        (kq, json!([1, 2]), "M_BAD_JSON"),
        (kc, json!({ "one_time_keys": { &bob.user_id: { "D": "signed_curve25519" } } }), "M_INVALID_PARAM"),
        (kc, json!({ "one_time_keys": { &alice.user_id: { "D": 5 } } }), "M_BAD_JSON"),
        (kc, json!({ "one_time_keys": { &alice.user_id: [] } }), "M_BAD_JSON"),
    ] {
        let r = fed_send(&http, Some(&sb), &a.name, Method::POST, uri, Some(&body)).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{uri} {body}");
        assert_eq!(r.json::<Value>().await.unwrap()["errcode"], code, "{uri} {body}");
    }
    let many: serde_json::Map<String, Value> = (0..5001).map(|i| (format!("@u{i}:{}", a.name), json!([]))).collect();
    let r = fed_send(&http, Some(&sb), &a.name, Method::POST, kq, Some(&json!({ "device_keys": many }))).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = fed_send(&http, None, &a.name, Method::POST, kq, Some(&json!({ "device_keys": {} }))).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // The client's timeout must be a number.
    let (st, v) = b
        .server
        .post("/_matrix/client/v3/keys/query", Some(&bob.token), json!({ "device_keys": {}, "timeout": "vite" }))
        .await;
    assert_eq!((st.as_u16(), v["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{v}");

    // bob claims one of alice's one-time keys: it is consumed on A.
    assert_eq!(otk_count(&a.server, &alice).await, 2);
    let body = json!({ "one_time_keys": { &alice.user_id: { &alice.device_id: "signed_curve25519" } } });
    let (st, v) = b.server.post("/_matrix/client/v3/keys/claim", Some(&bob.token), body.clone()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["failures"], json!({}));
    let claimed = v["one_time_keys"][&alice.user_id][&alice.device_id].as_object().unwrap().clone();
    assert_eq!(claimed.len(), 1, "{v}");
    let (kid, k) = claimed.iter().next().unwrap();
    assert_eq!(kid, "signed_curve25519:AAAAAQ");
    assert_eq!(*k, one_time_key(&alice, &key(40), 1));
    assert_eq!(otk_count(&a.server, &alice).await, 1);
    let (_, v) = b.server.post("/_matrix/client/v3/keys/claim", Some(&bob.token), body).await;
    assert!(v["one_time_keys"][&alice.user_id][&alice.device_id].get("signed_curve25519:AAAAAg").is_some(), "{v}");
    assert_eq!(otk_count(&a.server, &alice).await, 0);

    // C allows device name lookups: its names reach B.
    let dan = c.server.register("dan", false).await;
    upload_all_keys(&c.server, &dan, 60).await;
    let (st, _) = c
        .server
        .put(
            &format!("/_matrix/client/v3/devices/{}", enc(&dan.device_id)),
            Some(&dan.token),
            json!({ "display_name": "Tablette de Dan" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let q = json!({ "device_keys": { &dan.user_id: [] } });
    let (_, v) = b.server.post("/_matrix/client/v3/keys/query", Some(&bob.token), q).await;
    assert_eq!(
        v["device_keys"][&dan.user_id][&dan.device_id]["unsigned"]["device_display_name"], "Tablette de Dan",
        "{v}"
    );

    // ---- a stopped server is reported in failures; the others still answer.
    let c_name = c.name.clone();
    c.server.stop().await;
    let q = json!({ "device_keys": { &alice.user_id: [], &carol_gone: [] }, "timeout": 5000 });
    let (st, v) = b.server.post("/_matrix/client/v3/keys/query", Some(&bob.token), q).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["failures"][c_name.as_str()]["status"].is_number(), "{v}");
    assert_eq!(v["failures"].as_object().unwrap().len(), 1, "{v}");
    assert_eq!(bare(&v["device_keys"][&alice.user_id][&alice.device_id]), dk);
    let body = json!({ "one_time_keys": { &carol_gone: { "D": "signed_curve25519" } } });
    let (st, v) = b.server.post("/_matrix/client/v3/keys/claim", Some(&bob.token), body).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["failures"][c_name.as_str()].is_object(), "{v}");
    // Fan-out bound: past 100 servers, the rest fail at once without being contacted.
    let users: serde_json::Map<String, Value> =
        (1..=101u16).map(|p| (format!("@u:127.0.0.1:{p}"), json!([]))).collect();
    let (st, v) = b
        .server
        .post("/_matrix/client/v3/keys/query", Some(&bob.token), json!({ "device_keys": users, "timeout": 3000 }))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let failures = v["failures"].as_object().unwrap();
    assert_eq!(failures.len(), 101, "{v}");
    assert_eq!(failures.values().filter(|f| f["status"] == 400).count(), 1, "{v}");

    // ---- measured (printed, not asserted): an 8 MiB file fetched over federation, then from
    // B's cache; remote keys/query round trips.
    let big: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let (_, v) = upload(&a.server, Some(&alice.token), "application/octet-stream", None, big.clone()).await;
    let big_id = v["content_uri"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
    let t = std::time::Instant::now();
    let (st, _, got) = get(&b.server, &bob.token, &download_path(a.name.as_str(), &big_id)).await;
    let remote = t.elapsed();
    assert_eq!((st, got.len()), (StatusCode::OK, big.len()));
    assert!(got.as_ref() == big.as_slice());
    let t = std::time::Instant::now();
    let (st, _, got) = get(&b.server, &bob.token, &download_path(a.name.as_str(), &big_id)).await;
    let cached = t.elapsed();
    assert_eq!((st, got.len()), (StatusCode::OK, big.len()));
    let t = std::time::Instant::now();
    for _ in 0..20 {
        let q = json!({ "device_keys": { &alice.user_id: [] } });
        let (st, v) = b.server.post("/_matrix/client/v3/keys/query", Some(&bob.token), q).await;
        assert_eq!((st, &v["failures"]), (StatusCode::OK, &json!({})));
    }
    let per_query = t.elapsed() / 20;
    eprintln!(
        "measured: 8 MiB remote media: first download (federation fetch + cache) {remote:?}, cached {cached:?}; \
         remote keys/query {per_query:?} per request (debug build, loopback TLS)"
    );

    // ---- A stops: B still serves the cached media and its thumbnail.
    let a_name = a.name.clone();
    a.server.stop().await;
    let (st, ct, got) = get(&b.server, &bob.token, &download_path(a_name.as_str(), &media_id)).await;
    assert_eq!((st, ct.as_str()), (StatusCode::OK, "image/png"));
    assert_eq!(got.as_ref(), png.as_slice());
    let tpath = format!("/_matrix/client/v1/media/thumbnail/{}/{media_id}?width=32&height=32", enc(a_name.as_str()));
    assert_eq!(get(&b.server, &bob.token, &tpath).await.0, StatusCode::OK);
    // A's alice is now a failure for keys.
    let (_, v) = b
        .server
        .post("/_matrix/client/v3/keys/query", Some(&bob.token), json!({ "device_keys": { &alice.user_id: [] } }))
        .await;
    assert!(v["failures"][a_name.as_str()].is_object(), "{v}");
    b.server.stop().await;
}

/// What the fake federation server serves, and how often it was asked.
#[derive(Clone)]
struct Fake {
    name: String,
    hits: Arc<AtomicUsize>,
    blob: Arc<Vec<u8>>,
}

fn multipart(part_headers: &[(&str, &str)], content: &[u8]) -> axum::response::Response {
    let (ct, head, tail) = parvis::federation::media::multipart_frame(part_headers);
    let body = [head.as_ref(), content, tail.as_ref()].concat();
    ([("content-type", ct)], body).into_response()
}

async fn fake_download(
    axum::extract::State(f): axum::extract::State<Fake>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> axum::response::Response {
    f.hits.fetch_add(1, Ordering::SeqCst);
    // Slow enough for concurrent requests to overlap.
    tokio::time::sleep(Duration::from_millis(300)).await;
    match id.as_str() {
        "direct" => multipart(&[("Content-Type", "application/pdf")], &f.blob),
        "badtype" => multipart(&[("Content-Type", "text/html<script>")], b"<script>alert(1)</script>"),
        "huge" => multipart(&[("Content-Type", "application/octet-stream")], &vec![7u8; 200_001]),
        "redirect" => multipart(&[("Location", &format!("https://{}/cdn/blob", f.name))], b""),
        "redirect-private" => multipart(&[("Location", "https://10.0.0.1/cdn/blob")], b""),
        "redirect-plain" => multipart(&[("Location", &format!("http://{}/cdn/blob", f.name))], b""),
        "broken" => ([("content-type", "multipart/mixed; boundary=x")], "--x\r\nnonsense").into_response(),
        "pending" => {
            (StatusCode::GATEWAY_TIMEOUT, axum::Json(json!({"errcode": "M_NOT_YET_UPLOADED", "error": "not yet"})))
                .into_response()
        }
        "old" => {
            (StatusCode::NOT_FOUND, axum::Json(json!({"errcode": "M_UNRECOGNIZED", "error": "?"}))).into_response()
        }
        _ => (StatusCode::NOT_FOUND, axum::Json(json!({"errcode": "M_NOT_FOUND", "error": "no"}))).into_response(),
    }
}

/// A federation server written for this test: it answers media downloads in every way the
/// spec allows (and some it does not), on TLS with a certificate of `ca`.
async fn fake_server(dir: &Path, ca: &Ca) -> Fake {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let name = format!("127.0.0.1:{}", tcp.local_addr().unwrap().port());
    let (cert, key) = ca.issue(dir, "fake");
    let tls = parvis::federation::tls::server_config(&cert, &key).unwrap();
    let listener = parvis::federation::tls::TlsListener::new(tcp, tls).unwrap();
    let fake = Fake { name, hits: Arc::default(), blob: Arc::new((0..150_000u32).map(|i| (i % 251) as u8).collect()) };
    let blob = fake.blob.clone();
    let app = axum::Router::new()
        .route("/_matrix/federation/v1/media/download/{id}", axum::routing::get(fake_download))
        .route(
            "/cdn/blob",
            axum::routing::get(move || {
                let blob = blob.clone();
                async move { ([("content-type", "image/webp")], blob.as_ref().clone()).into_response() }
            }),
        )
        .route(
            "/_matrix/media/v3/download/{server}/{id}",
            axum::routing::get(|axum::extract::Path((_, id)): axum::extract::Path<(String, String)>| async move {
                if id == "old" {
                    (
                        [("content-type", "text/plain"), ("content-disposition", "inline; filename=\"vieux.txt\"")],
                        "ancien",
                    )
                        .into_response()
                } else {
                    StatusCode::NOT_FOUND.into_response()
                }
            }),
        )
        .with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    fake
}

#[tokio::test]
async fn remote_media_redirects_limits_and_single_flight() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let fake = fake_server(dir.path(), &ca).await;
    // B may reach 127.0.0.1 through a Location (the fake CDN is on loopback), nothing else that
    // the default blacklist forbids; uploads (hence remote media) are limited to 200 kB.
    let b = start(dir.path(), "b", &ca, |c| {
        c.federation.media_redirect_ip_whitelist = vec!["127.0.0.1/32".into()];
        c.media.max_upload_bytes = 200_000;
    })
    .await;
    let bob = b.server.register("bob", false).await;
    let path = |id: &str| download_path(&fake.name, id);

    // Five concurrent requests, one fetch; later requests served from the cache.
    let direct = path("direct");
    let gets = (0..5).map(|_| get(&b.server, &bob.token, &direct));
    for (st, ct, got) in futures_util::future::join_all(gets).await {
        assert_eq!((st, ct.as_str()), (StatusCode::OK, "application/pdf"));
        assert_eq!(got.as_ref(), fake.blob.as_slice());
    }
    assert_eq!(fake.hits.load(Ordering::SeqCst), 1);
    assert_eq!(get(&b.server, &bob.token, &path("direct")).await.0, StatusCode::OK);
    assert_eq!(fake.hits.load(Ordering::SeqCst), 1);
    // The frozen legacy endpoints do not fetch remote media (it would be new media).
    let legacy = format!("{}/_matrix/media/v3/download/{}/autre", b.server.base, enc(&fake.name));
    assert_eq!(b.server.http.get(legacy).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(fake.hits.load(Ordering::SeqCst), 1);

    // A Location to a plain HTTPS URL, fetched through the guard.
    let (st, ct, got) = get(&b.server, &bob.token, &path("redirect")).await;
    assert_eq!((st, ct.as_str()), (StatusCode::OK, "image/webp"), "{}", String::from_utf8_lossy(&got));
    assert_eq!(got.as_ref(), fake.blob.as_slice());
    // Locations to a forbidden address or without TLS: refused (502), nothing cached.
    for id in ["redirect-private", "redirect-plain", "broken"] {
        assert_matrix(&get(&b.server, &bob.token, &path(id)).await, 502, "M_UNKNOWN");
        let row = parvis::storage::media::get(&b.server.state().db, &fake.name, id).await.unwrap();
        assert!(row.is_none(), "{id}");
    }
    // Past the size limit: 502 M_TOO_LARGE.
    assert_matrix(&get(&b.server, &bob.token, &path("huge")).await, 502, "M_TOO_LARGE");
    // A dangerous content type is not kept.
    let (st, ct, _) = get(&b.server, &bob.token, &path("badtype")).await;
    assert_eq!((st, ct.as_str()), (StatusCode::OK, "application/octet-stream"));
    // The remote's 504 M_NOT_YET_UPLOADED is passed on; its 404 is ours.
    assert_matrix(&get(&b.server, &bob.token, &path("pending")).await, 504, "M_NOT_YET_UPLOADED");
    assert_matrix(&get(&b.server, &bob.token, &path("absent")).await, 404, "M_NOT_FOUND");
    // A server without federation media: the legacy endpoint.
    let (st, ct, got) = get(&b.server, &bob.token, &path("old")).await;
    assert_eq!((st, ct.as_str(), got.as_ref()), (StatusCode::OK, "text/plain", &b"ancien"[..]));
    let row = parvis::storage::media::get(&b.server.state().db, &fake.name, "old").await.unwrap().unwrap();
    assert_eq!(row.upload_name.as_deref(), Some("vieux.txt"));
    b.server.stop().await;
}

/// A client request to Synapse: status and JSON body.
async fn syn(
    http: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut rb = http.request(method, format!("{base}{path}"));
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.expect("request to Synapse sent");
    let st = r.status();
    (st, r.json().await.unwrap_or(Value::Null))
}

/// Remote media and E2EE keys between Parvis and a real Synapse, both ways, over TLS with the
/// test CA. Skipped (with a message) when no Synapse is installed.
#[tokio::test]
async fn synapse_remote_media_and_keys() {
    let Some(python) = synapse_python() else {
        eprintln!(
            "skipped: no Synapse. Install it with `python3 -m venv ~/.cache/parvis-bench/synapse-venv && \
             ~/.cache/parvis-bench/synapse-venv/bin/pip install matrix-synapse` (or set PARVIS_TEST_SYNAPSE_PYTHON)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let http = https_client(&ca);
    let p = start(dir.path(), "parvis", &ca, |_| {}).await;

    let port = free_port();
    let synapse_name = format!("127.0.0.1:{port}");
    let base = format!("https://{synapse_name}");
    let (cert, key_path) = ca.issue(dir.path(), "synapse");
    let d = dir.path().display();
    let config = format!(
        r#"server_name: "{synapse_name}"
pid_file: "{d}/synapse.pid"
report_stats: false
listeners:
  - port: {port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: true
    resources:
      - names: [client, federation, media]
tls_certificate_path: "{cert}"
tls_private_key_path: "{key}"
database:
  name: sqlite3
  args:
    database: "{d}/synapse.db"
media_store_path: "{d}/media"
signing_key_path: "{d}/synapse.signing.key"
trusted_key_servers: []
suppress_key_server_warning: true
federation_custom_ca_list: ["{ca}"]
# Synapse blocks IP-literal server names in its blocklist whatever the allowlist says: empty it.
ip_range_blacklist: []
ip_range_whitelist: ["127.0.0.0/8"]
enable_registration: true
enable_registration_without_verification: true
rc_federation: {{window_size: 1000, sleep_limit: 1000, sleep_delay: 1, reject_limit: 1000, concurrent: 100}}
rc_registration: {{per_second: 100, burst_count: 100}}
rc_login: {{address: {{per_second: 100, burst_count: 100}}, account: {{per_second: 100, burst_count: 100}}}}
"#,
        cert = cert.display(),
        key = key_path.display(),
        ca = ca.pem.display(),
    );
    let config_path = dir.path().join("homeserver.yaml");
    std::fs::write(&config_path, config).unwrap();
    let status = tokio::process::Command::new(&python)
        .args(["-m", "synapse.app.homeserver", "-c"])
        .arg(&config_path)
        .arg("--generate-keys")
        .status()
        .await
        .unwrap();
    assert!(status.success(), "synapse --generate-keys failed");
    let log = std::fs::File::create(dir.path().join("synapse.log")).unwrap();
    let mut synapse = tokio::process::Command::new(&python)
        .args(["-m", "synapse.app.homeserver", "-c"])
        .arg(&config_path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let synapse_log = || std::fs::read_to_string(dir.path().join("synapse.log")).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while http.get(format!("{base}/_matrix/federation/v1/version")).send().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "Synapse did not start:\n{}", synapse_log());
        assert!(synapse.try_wait().unwrap().is_none(), "Synapse exited:\n{}", synapse_log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // sam on Synapse (dummy-auth registration).
    let reg = json!({ "username": "sam", "password": "mot de passe de sam", "auth": { "type": "m.login.dummy" } });
    let (st, v) = syn(&http, &base, Method::POST, "/_matrix/client/v3/register", None, Some(reg)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let sam = User {
        user_id: v["user_id"].as_str().unwrap().to_owned(),
        token: v["access_token"].as_str().unwrap().to_owned(),
        device_id: v["device_id"].as_str().unwrap().to_owned(),
    };
    let alice = p.server.register("alice", false).await;

    // ---- media, Synapse → Parvis: sam uploads, alice downloads through Parvis.
    let png = picture(80, 60, ImageFormat::Png);
    let r = http
        .post(format!("{base}/_matrix/media/v3/upload?filename=carte.png"))
        .bearer_auth(&sam.token)
        .header("content-type", "image/png")
        .body(png.clone())
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let sam_media = v["content_uri"].as_str().unwrap_or_else(|| panic!("{v}")).rsplit('/').next().unwrap().to_owned();
    let (st, ct, got) = get(&p.server, &alice.token, &download_path(&synapse_name, &sam_media)).await;
    assert_eq!(st, StatusCode::OK, "{}\n{}", String::from_utf8_lossy(&got), synapse_log());
    assert_eq!((ct.as_str(), got.as_ref()), ("image/png", png.as_slice()));
    let tpath = format!("/_matrix/client/v1/media/thumbnail/{}/{sam_media}?width=32&height=32", enc(&synapse_name));
    let (st, ct, _) = get(&p.server, &alice.token, &tpath).await;
    assert_eq!((st, ct.as_str()), (StatusCode::OK, "image/png"));
    assert_matrix(&get(&p.server, &alice.token, &download_path(&synapse_name, "inconnu")).await, 404, "M_NOT_FOUND");

    // ---- media, Parvis → Synapse: alice uploads, sam downloads (and a thumbnail) through Synapse.
    let text = b"Ordre du jour: budget participatif".to_vec();
    let (_, v) = upload(&p.server, Some(&alice.token), "text/plain", Some("odj.txt"), text.clone()).await;
    let alice_text = v["content_uri"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
    let (_, v) = upload(&p.server, Some(&alice.token), "image/png", None, png.clone()).await;
    let alice_png = v["content_uri"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
    let r = http
        .get(format!("{base}{}", download_path(p.name.as_str(), &alice_text)))
        .bearer_auth(&sam.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", synapse_log());
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    assert_eq!(r.bytes().await.unwrap().as_ref(), text.as_slice());
    let r = http
        .get(format!(
            "{base}/_matrix/client/v1/media/thumbnail/{}/{alice_png}?width=32&height=32&method=scale",
            enc(p.name.as_str())
        ))
        .bearer_auth(&sam.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", synapse_log());
    assert!(image::load_from_memory(&r.bytes().await.unwrap()).is_ok());

    // ---- keys, both ways.
    let (kd, km, kss) = (key(70), key(71), key(72));
    let sam_dk = device_keys(&sam, &kd);
    let otks = json!({ "signed_curve25519:AAAAAQ": one_time_key(&sam, &kd, 1) });
    let (st, v) = syn(
        &http,
        &base,
        Method::POST,
        "/_matrix/client/v3/keys/upload",
        Some(&sam.token),
        Some(json!({ "device_keys": sam_dk, "one_time_keys": otks })),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let sam_master = cross_key(&sam, "master", &km);
    let mut sam_ss = cross_key(&sam, "self_signing", &kss);
    sign(&mut sam_ss, &sam.user_id, &format!("ed25519:{}", public(&km)), &km);
    let (st, v) = syn(
        &http,
        &base,
        Method::POST,
        "/_matrix/client/v3/keys/device_signing/upload",
        Some(&sam.token),
        Some(json!({ "master_key": sam_master, "self_signing_key": sam_ss })),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (alice_dk, alice_master, _) = upload_all_keys(&p.server, &alice, 80).await;

    // alice (Parvis) queries and claims sam's keys (Synapse serves user/keys/*).
    let (st, v) = p
        .server
        .post("/_matrix/client/v3/keys/query", Some(&alice.token), json!({ "device_keys": { &sam.user_id: [] } }))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["failures"], json!({}), "{v}\n{}", synapse_log());
    assert_eq!(bare(&v["device_keys"][&sam.user_id][&sam.device_id]), sam_dk, "{v}");
    assert_eq!(v["master_keys"][&sam.user_id]["keys"], sam_master["keys"], "{v}");
    assert_eq!(v["self_signing_keys"][&sam.user_id]["keys"], sam_ss["keys"], "{v}");
    let body = json!({ "one_time_keys": { &sam.user_id: { &sam.device_id: "signed_curve25519" } } });
    let (st, v) = p.server.post("/_matrix/client/v3/keys/claim", Some(&alice.token), body).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        v["one_time_keys"][&sam.user_id][&sam.device_id]["signed_curve25519:AAAAAQ"],
        one_time_key(&sam, &kd, 1),
        "{v}"
    );
    let (_, v) =
        syn(&http, &base, Method::POST, "/_matrix/client/v3/keys/upload", Some(&sam.token), Some(json!({}))).await;
    assert_eq!(v["one_time_key_counts"]["signed_curve25519"].as_i64().unwrap_or(0), 0, "{v}");

    // sam (Synapse) queries and claims alice's keys (Parvis serves user/keys/*).
    let (st, v) = syn(
        &http,
        &base,
        Method::POST,
        "/_matrix/client/v3/keys/query",
        Some(&sam.token),
        Some(json!({ "device_keys": { &alice.user_id: [] } })),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["failures"], json!({}), "{v}\n{}", synapse_log());
    assert_eq!(bare(&v["device_keys"][&alice.user_id][&alice.device_id]), alice_dk, "{v}");
    assert_eq!(v["master_keys"][&alice.user_id]["keys"], alice_master["keys"], "{v}");
    assert!(v["self_signing_keys"][&alice.user_id].is_object(), "{v}");
    let body = json!({ "one_time_keys": { &alice.user_id: { &alice.device_id: "signed_curve25519" } } });
    let (st, v) = syn(&http, &base, Method::POST, "/_matrix/client/v3/keys/claim", Some(&sam.token), Some(body)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        v["one_time_keys"][&alice.user_id][&alice.device_id]["signed_curve25519:AAAAAQ"],
        one_time_key(&alice, &key(80), 1),
        "{v}\n{}",
        synapse_log()
    );
    assert_eq!(otk_count(&p.server, &alice).await, 1);

    synapse.kill().await.ok();
    p.server.stop().await;
}
