//! Federation foundation (issue 13) between real servers over TLS: a test CA generated here,
//! server names that are IP literals with explicit ports (no DNS), keys fetched directly and
//! through a notary, `X-Matrix` authentication in both directions, `allowed_servers`, and a
//! certificate from an untrusted CA refused.

use parvis::federation::client::FedError;
use parvis::federation::{auth, keys};
use reqwest::{Method, StatusCode};
use ruma::ServerName;
use serde_json::{Value, json};

use crate::common::{TestServer, enc};
use crate::fed_harness::{Ca, ClientApi, Synapse, https_client, send, start, synapse_python};

#[track_caller]
fn assert_matrix_err(resp: &(StatusCode, Value), status: u16, errcode: &str) {
    assert_eq!(resp.0.as_u16(), status, "{}", resp.1);
    assert_eq!(resp.1["errcode"], errcode, "{}", resp.1);
}

#[tokio::test]
async fn federation_foundation_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = Ca::new(dir.path(), "trusted");
    let rogue = Ca::new(dir.path(), "rogue");
    let http = https_client(&[&trusted, &rogue]);

    let a = start(dir.path(), "a", &trusted, &trusted, |_| {}).await;
    let a_name = a.name.to_string();
    let b = start(dir.path(), "b", &trusted, &trusted, |c| c.federation.trusted_key_servers = vec![a_name]).await;
    let d = start(dir.path(), "d", &trusted, &trusted, |_| {}).await;
    // E has a certificate of a CA nobody trusts, and federates with nobody real.
    let e =
        start(dir.path(), "e", &rogue, &trusted, |c| c.federation.allowed_servers = vec!["127.0.0.1:1".into()]).await;
    let (sa, sb, sd, se) = (a.server.state(), b.server.state(), d.server.state(), e.server.state());

    // --- version (unauthenticated) and unknown endpoints
    let v = send(&http, &a.name, Method::GET, "/_matrix/federation/v1/version", None, None).await;
    assert_eq!(v.0, StatusCode::OK);
    assert_eq!(v.1["server"]["name"], "Parvis");
    assert!(v.1["server"]["version"].is_string());
    let r = send(&http, &a.name, Method::PUT, "/_matrix/federation/v1/nonexistent/1", None, Some(&json!({}))).await;
    assert_matrix_err(&r, 404, "M_UNRECOGNIZED");
    let r = send(&http, &a.name, Method::POST, "/_matrix/federation/v1/version", None, Some(&json!({}))).await;
    assert_matrix_err(&r, 405, "M_UNRECOGNIZED");

    // --- our keys: signed, valid for a day, verifiable
    let (st, doc) = send(&http, &b.name, Method::GET, "/_matrix/key/v2/server", None, None).await;
    assert_eq!(st, StatusCode::OK, "{doc}");
    let verified = keys::verify_key_response(&b.name, &doc).expect("B's key document verifies");
    let b_key_id = sb.federation.signer.key_id.clone();
    assert!(verified.keys.iter().any(|k| k.key_id == b_key_id && k.expired_ts.is_none()));
    let now = parvis::storage::now_ms();
    let until = doc["valid_until_ts"].as_i64().unwrap();
    assert!(until > now + 86_000_000 && until <= now + 86_400_000 + 60_000, "{doc}");
    assert!(doc["old_verify_keys"].is_object());

    // --- A fetches B's keys directly
    let fetched = keys::fetch_direct(sa, &b.name).await.expect("direct fetch");
    assert!(fetched.keys.iter().any(|k| k.key_id == b_key_id));

    // --- A as a notary for B's keys (POST and GET): B's signature and A's
    let a_key = parvis::federation::decode_public_key(&sa.federation.signer.public_key_base64()).unwrap();
    let a_key_id = sa.federation.signer.key_id.clone();
    let body = json!({ "server_keys": { b.name.as_str(): { b_key_id.clone(): {} } } });
    let (st, q) = send(&http, &a.name, Method::POST, "/_matrix/key/v2/query", None, Some(&body)).await;
    assert_eq!(st, StatusCode::OK, "{q}");
    let entry = &q["server_keys"][0];
    keys::verify_key_response(&b.name, entry).expect("B's self-signature kept");
    assert!(parvis::federation::verify_json(entry, a.name.as_str(), &a_key_id, &a_key), "{entry}");
    let (st, q) =
        send(&http, &a.name, Method::GET, &format!("/_matrix/key/v2/query/{}", enc(b.name.as_str())), None, None).await;
    assert_eq!(st, StatusCode::OK, "{q}");
    assert_eq!(q["server_keys"][0]["server_name"], b.name.as_str());
    // The notary answers for itself too; a bad server name is a 400.
    let (_, q) =
        send(&http, &a.name, Method::GET, &format!("/_matrix/key/v2/query/{}", enc(a.name.as_str())), None, None).await;
    assert_eq!(q["server_keys"][0]["server_name"], a.name.as_str());
    let r = send(
        &http,
        &a.name,
        Method::POST,
        "/_matrix/key/v2/query",
        None,
        Some(&json!({"server_keys": {"bad name!": {}}})),
    )
    .await;
    assert_matrix_err(&r, 400, "M_INVALID_PARAM");

    // --- B fetches its own keys through the notary A (A's key fetched directly by B)
    keys::fetch_via_notary(sb, &a.name, &b.name, None).await.expect("through the notary");

    // --- keys through a notary when the server itself is gone: A knows D's keys, D stops,
    // B (trusting A as notary) still gets them.
    let d_key_id = sd.federation.signer.key_id.clone();
    keys::fetch_direct(sa, &d.name).await.expect("A fetches D's keys");
    let d_name = d.name.clone();
    d.server.stop().await;
    let k = keys::request_key(sb, &d_name, &d_key_id).await.expect("D's key through the notary");
    assert_eq!(k.as_bytes().len(), 32);

    // --- an X-Matrix-signed profile query from A to B
    let alice = b.server.register("alice", false).await;
    let (st, _) = b
        .server
        .put(
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)),
            Some(&alice.token),
            json!({"displayname": "Alice de B"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let profile_uri = format!("/_matrix/federation/v1/query/profile?user_id={}", enc(&alice.user_id));
    let p = sa.federation.request(Method::GET, &b.name, &profile_uri, None, true, 65_536).await.expect("profile");
    assert_eq!(p["displayname"], "Alice de B");
    let p = sa
        .federation
        .request(Method::GET, &b.name, &format!("{profile_uri}&field=displayname"), None, true, 65_536)
        .await
        .unwrap();
    assert_eq!(p, json!({"displayname": "Alice de B"}));
    let unknown = format!("/_matrix/federation/v1/query/profile?user_id={}", enc(&format!("@nobody:{}", b.name)));
    match sa.federation.request(Method::GET, &b.name, &unknown, None, true, 65_536).await {
        Err(FedError::Status { status: 404, body }) => assert_eq!(body["errcode"], "M_NOT_FOUND"),
        other => panic!("unknown user: {other:?}"),
    }
    let remote = format!("/_matrix/federation/v1/query/profile?user_id={}", enc("@x:[::1]:8448"));
    match sa.federation.request(Method::GET, &b.name, &remote, None, true, 65_536).await {
        Err(FedError::Status { status: 400, body }) => assert_eq!(body["errcode"], "M_INVALID_PARAM"),
        other => panic!("remote user: {other:?}"),
    }

    // --- refused requests: unsigned, wrong key, wrong destination, tampered, hostile headers
    let r = send(&http, &b.name, Method::GET, &profile_uri, None, None).await;
    assert_matrix_err(&r, 401, "M_UNAUTHORIZED");
    let signer_a = &sa.federation.signer;
    let good = auth::sign_request(signer_a, &Method::GET, &profile_uri, &b.name, None).unwrap();
    let r = send(&http, &b.name, Method::GET, &profile_uri, Some(&good), None).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    // A key that is not A's, under A's key ID.
    let impostor = parvis::federation::Signer::new(
        a.name.clone(),
        signer_a.key_id.clone(),
        parvis::keys::ServerKey::generate().signing_key,
    );
    let forged = auth::sign_request(&impostor, &Method::GET, &profile_uri, &b.name, None).unwrap();
    assert_matrix_err(
        &send(&http, &b.name, Method::GET, &profile_uri, Some(&forged), None).await,
        401,
        "M_UNAUTHORIZED",
    );
    // An unknown key ID of A.
    let unknown_key = parvis::federation::Signer::new(
        a.name.clone(),
        "ed25519:nope".into(),
        parvis::keys::ServerKey::generate().signing_key,
    );
    let h = auth::sign_request(&unknown_key, &Method::GET, &profile_uri, &b.name, None).unwrap();
    assert_matrix_err(&send(&http, &b.name, Method::GET, &profile_uri, Some(&h), None).await, 401, "M_UNAUTHORIZED");
    // Signed for another destination (D), sent to B.
    let h = auth::sign_request(signer_a, &Method::GET, &profile_uri, &d_name, None).unwrap();
    assert_matrix_err(&send(&http, &b.name, Method::GET, &profile_uri, Some(&h), None).await, 401, "M_UNAUTHORIZED");
    // A destination parameter naming B, but a signature made for D.
    let h = h.replace(&format!("destination=\"{d_name}\""), &format!("destination=\"{}\"", b.name));
    assert_matrix_err(&send(&http, &b.name, Method::GET, &profile_uri, Some(&h), None).await, 401, "M_UNAUTHORIZED");
    // Signed for another URI.
    let other_uri = format!("/_matrix/federation/v1/query/profile?user_id={}", enc(&format!("@bob:{}", b.name)));
    let h = auth::sign_request(signer_a, &Method::GET, &other_uri, &b.name, None).unwrap();
    assert_matrix_err(&send(&http, &b.name, Method::GET, &profile_uri, Some(&h), None).await, 401, "M_UNAUTHORIZED");
    // Signed with a body, sent with another body, and without it.
    let h = auth::sign_request(signer_a, &Method::GET, &profile_uri, &b.name, Some(&json!({"a": 1}))).unwrap();
    let r = send(&http, &b.name, Method::GET, &profile_uri, Some(&h), Some(&json!({"a": 2}))).await;
    assert_matrix_err(&r, 401, "M_UNAUTHORIZED");
    assert_matrix_err(&send(&http, &b.name, Method::GET, &profile_uri, Some(&h), None).await, 401, "M_UNAUTHORIZED");
    let r = send(&http, &b.name, Method::GET, &profile_uri, Some(&h), Some(&json!({"a": 1}))).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    // A signed body with U+0000: the server's NUL policy applies to other servers too.
    let nul = json!({"a": "x\u{0}y"});
    let h = auth::sign_request(signer_a, &Method::GET, &profile_uri, &b.name, Some(&nul)).unwrap();
    assert_matrix_err(&send(&http, &b.name, Method::GET, &profile_uri, Some(&h), Some(&nul)).await, 400, "M_BAD_JSON");
    // Hostile headers: never a 500.
    for bad in [
        "X-Matrix".to_owned(),
        "X-Matrix origin=".to_owned(),
        format!("X-Matrix origin=\"{}\",origin=\"{}\",key=\"x\",sig=\"y\"", a.name, a.name),
        format!("X-Matrix {}", "a=b,".repeat(2000)),
        "Bearer something".to_owned(),
        good.replace("sig=\"", "sig=\"AAAA"),
    ] {
        let r = send(&http, &b.name, Method::GET, &profile_uri, Some(&bad), None).await;
        assert!(r.0 == StatusCode::UNAUTHORIZED, "{bad}: {} {}", r.0, r.1);
    }

    // --- allowed_servers: E refuses A (403), and never contacts A
    let to_e = format!("/_matrix/federation/v1/query/profile?user_id={}", enc(&format!("@x:{}", e.name)));
    let h = auth::sign_request(signer_a, &Method::GET, &to_e, &e.name, None).unwrap();
    assert_matrix_err(&send(&http, &e.name, Method::GET, &to_e, Some(&h), None).await, 403, "M_FORBIDDEN");
    match se.federation.request(Method::GET, &a.name, "/_matrix/federation/v1/version", None, true, 65_536).await {
        Err(FedError::NotAllowed(s)) => assert_eq!(s, a.name.as_str()),
        other => panic!("E contacted A: {other:?}"),
    }

    // --- E's certificate is not from a trusted CA: A refuses to talk to it
    match sa.federation.request(Method::GET, &e.name, "/_matrix/key/v2/server", None, false, 65_536).await {
        Err(FedError::Transport(msg)) => assert!(msg.to_lowercase().contains("certificate"), "{msg}"),
        other => panic!("untrusted certificate accepted: {other:?}"),
    }
    assert!(keys::fetch_direct(sa, &e.name).await.is_err());

    a.server.stop().await;
    b.server.stop().await;
    e.server.stop().await;
}

#[tokio::test]
async fn federation_disabled_serves_only_openid_userinfo() {
    let s = TestServer::start_with(|c| {
        c.listen.federation = Some("127.0.0.1:0".parse().unwrap());
        c.federation.enabled = Some(false);
    })
    .await;
    let base = s.federation.clone().unwrap();
    assert!(base.starts_with("http://"));
    for path in ["/_matrix/federation/v1/version", "/_matrix/key/v2/server"] {
        let r = s.http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["errcode"], "M_UNRECOGNIZED");
    }
    let r = s.http.get(format!("{base}/_matrix/federation/v1/openid/userinfo?access_token=x")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(!s.state().federation.enabled);
    s.stop().await;
}

#[tokio::test]
async fn plain_http_federation_listener_serves_keys() {
    // Without a certificate the listener speaks plain HTTP (behind a reverse proxy).
    let s = TestServer::start_with(|c| c.listen.federation = Some("127.0.0.1:0".parse().unwrap())).await;
    let base = s.federation.clone().unwrap();
    let doc: Value = s.http.get(format!("{base}/_matrix/key/v2/server")).send().await.unwrap().json().await.unwrap();
    let name = ServerName::parse("localhost").unwrap();
    keys::verify_key_response(&name, &doc).expect("verifies");
    // Federation requests to an unsigned caller: 401.
    let r = s.http.get(format!("{base}/_matrix/federation/v1/query/profile?user_id=%40a%3Alocalhost")).send().await;
    assert_eq!(r.unwrap().status(), StatusCode::UNAUTHORIZED);
    s.stop().await;
}

/// Interop with a real Synapse, both ways, over TLS with the test CA: Synapse, as a notary,
/// fetches and serves Parvis's keys; Parvis fetches Synapse's keys; Parvis's signed request is
/// accepted by Synapse (an unsigned one is not); Synapse's signed profile query is accepted by
/// Parvis. Skipped (with a message) when no Synapse is installed, outside CI (see
/// `fed_harness::synapse_python`).
#[tokio::test]
async fn synapse_interop_keys_and_signatures() {
    if synapse_python().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let http = https_client(&[&ca]);
    let a = start(dir.path(), "parvis", &ca, &ca, |_| {}).await;
    let sa = a.server.state();

    // Synapse on 127.0.0.1:<port>, TLS with a certificate of the same CA.
    let s = Synapse::start(dir.path(), &ca, &ca.pem).await;
    let synapse_name = s.name.clone();
    let synapse_log = || s.log();

    // Synapse as a notary for Parvis: it fetched our keys over TLS, accepted them, and serves
    // them with our signature and its own.
    // (Synapse fetches only keys it is asked for by ID; without IDs it answers from its cache.)
    let criteria = json!({ "minimum_valid_until_ts": parvis::storage::now_ms() });
    let body = json!({ "server_keys": { a.name.as_str(): { sa.federation.signer.key_id.clone(): criteria } } });
    let (st, q) = send(&http, &s.name, Method::POST, "/_matrix/key/v2/query", None, Some(&body)).await;
    assert_eq!(st, StatusCode::OK, "{q}\n{}", synapse_log());
    let entry = q["server_keys"].as_array().and_then(|l| l.first()).unwrap_or_else(|| panic!("{q}\n{}", synapse_log()));
    keys::verify_key_response(&a.name, entry).expect("our self-signature, through Synapse");
    assert!(entry["signatures"][synapse_name.as_str()].is_object(), "{entry}");

    // Parvis fetches Synapse's keys directly.
    keys::fetch_direct(sa, &synapse_name).await.expect("Synapse's keys verify");

    // Parvis's signed request passes Synapse's X-Matrix check (404: no such user); unsigned: 401.
    let uri = format!("/_matrix/federation/v1/query/profile?user_id={}", enc(&format!("@nobody:{synapse_name}")));
    match sa.federation.request(Method::GET, &synapse_name, &uri, None, true, 65_536).await {
        Err(FedError::Status { status: 404, body }) => assert_eq!(body["errcode"], "M_NOT_FOUND"),
        other => panic!("signed request to Synapse: {other:?}\n{}", synapse_log()),
    }
    match sa.federation.request(Method::GET, &synapse_name, &uri, None, false, 65_536).await {
        Err(FedError::Status { status: 401, .. }) => {}
        other => panic!("unsigned request to Synapse: {other:?}"),
    }

    // Synapse's signed profile query to Parvis (a client asks Synapse for a Parvis profile).
    let alice = a.server.register("alice", false).await;
    let (st, _) = a
        .server
        .put(
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)),
            Some(&alice.token),
            json!({"displayname": "Alice de Parvis"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, p) = s.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)), None).await;
    assert_eq!(st, StatusCode::OK, "{p}\n{}", synapse_log());
    assert_eq!(p["displayname"], "Alice de Parvis");

    drop(s);
    a.server.stop().await;
}

/// A server whose name is an IPv6 or IPv4 literal with a port: user IDs, aliases, profiles and
/// the login forms all work with it.
#[tokio::test]
async fn ip_literal_server_names_in_ids() {
    for name in ["[::1]:8448", "10.1.2.3:8448"] {
        let s = TestServer::start_with(|c| c.server_name = name.into()).await;
        let alice = s.register("alice", false).await;
        assert_eq!(alice.user_id, format!("@alice:{name}"));
        let (st, _) = s
            .put(
                &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)),
                Some(&alice.token),
                json!({"displayname": "Alice"}),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let (st, p) = s.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)), None).await;
        assert_eq!((st, p["displayname"].as_str()), (StatusCode::OK, Some("Alice")));
        let room = crate::common::create(&s, &alice, json!({ "room_alias_name": "salon" })).await;
        let alias = format!("#salon:{name}");
        let (st, a) = s.get(&format!("/_matrix/client/v3/directory/room/{}", enc(&alias)), None).await;
        assert_eq!(st, StatusCode::OK, "{a}");
        assert_eq!(a["room_id"], room.as_str());
        // A full user ID with the literal logs in; the same localpart on another port does not.
        let (st, _) = s.login(&format!("@alice:{name}"), crate::common::PASSWORD, json!({})).await;
        assert_eq!(st, StatusCode::OK);
        let other = name.replace("8448", "8449");
        let (st, _) = s.login(&format!("@alice:{other}"), crate::common::PASSWORD, json!({})).await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        s.stop().await;
    }
}
