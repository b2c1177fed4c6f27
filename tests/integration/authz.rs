//! The authorization matrix: every endpoint that needs a token, called with no token, a token
//! that does not exist, by another user (someone else's account, devices, filters, tags), by a
//! user who is not in the room, and by a member without power. Each answer is the spec's status
//! and errcode where the spec names one, and otherwise a refusal: never a success, never a 5xx.
//! Afterwards nothing the refused calls would have changed has changed.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::*;

/// What a caller must get.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Exactly this status and errcode.
    Is(u16, &'static str),
    /// A 4xx with an errcode (the spec names no status for this refusal).
    Denied,
    /// A 2xx.
    Allowed,
    /// Anything but a 5xx (the call concerns the caller's own resources; covered elsewhere).
    Any,
}

use Expect::*;

const FORBIDDEN: Expect = Is(403, "M_FORBIDDEN");
const NOT_FOUND: Expect = Is(404, "M_NOT_FOUND");

/// One endpoint call. In `path`, `{me}` is the caller's own user ID.
struct Case {
    method: Method,
    path: String,
    body: Option<Value>,
    /// What a caller without a token gets (a token that does not exist is always 401
    /// `M_UNKNOWN_TOKEN`).
    anon: Expect,
    outsider: Expect,
    member: Expect,
}

fn case(method: Method, path: impl Into<String>, body: Option<Value>, outsider: Expect, member: Expect) -> Case {
    Case { method, path: path.into(), body, anon: Is(401, "M_MISSING_TOKEN"), outsider, member }
}

/// An endpoint that serves some callers without a token.
fn open(mut c: Case, anon: Expect) -> Case {
    c.anon = anon;
    c
}

/// Records a failure (all are reported together at the end).
fn check(failures: &mut Vec<String>, who: &str, c: &Case, path: &str, resp: &(StatusCode, Value), expect: Expect) {
    let (st, body) = resp;
    let ok = !st.is_server_error()
        && match expect {
            Is(code, errcode) => st.as_u16() == code && body["errcode"] == errcode,
            Denied => st.is_client_error() && (body["errcode"].is_string() || body["flows"].is_array()),
            Allowed => st.is_success(),
            Any => true,
        };
    if !ok {
        failures.push(format!("{who}: {} {path} -> {st} {body}; expected {expect:?}", c.method));
    }
}

#[tokio::test]
async fn authorization_matrix() {
    let s = TestServer::start().await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let carol = s.register("carol", false).await;
    let dave = s.register("dave", false).await;
    let room = create(
        &s,
        &alice,
        json!({ "preset": "private_chat", "name": "Conseil", "room_alias_name": "conseil", "invite": [bob.user_id] }),
    )
    .await;
    let (st, v) = s.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&bob.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (_, sent) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/e1", enc(&room)),
            Some(&alice.token),
            json!({ "msgtype": "m.text", "body": "ordre du jour" }),
        )
        .await;
    let event = sent["event_id"].as_str().unwrap().to_owned();
    let (st, v) = s
        .put(
            &format!("/_matrix/client/v3/user/{}/rooms/{}/tags/u.work", enc(&alice.user_id), enc(&room)),
            Some(&alice.token),
            json!({}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");

    let (r, e, a) = (enc(&room), enc(&event), enc(&alice.user_id));
    let alias = enc("#conseil:localhost");
    let dev = enc(&alice.device_id);
    let v3 = "/_matrix/client/v3";
    let v1 = "/_matrix/client/v1";
    let msg = json!({ "msgtype": "m.text", "body": "intrus" });
    let cases = vec![
        // The room, by someone outside it and by a member without power.
        case(Method::GET, format!("{v3}/rooms/{r}/state"), None, FORBIDDEN, Allowed),
        case(Method::GET, format!("{v3}/rooms/{r}/state/m.room.name/"), None, FORBIDDEN, Allowed),
        case(
            Method::PUT,
            format!("{v3}/rooms/{r}/state/m.room.name/"),
            Some(json!({ "name": "x" })),
            FORBIDDEN,
            FORBIDDEN,
        ),
        case(
            Method::PUT,
            format!("{v3}/rooms/{r}/state/m.room.power_levels/"),
            Some(json!({ "users": { "@bob:localhost": 100 } })),
            FORBIDDEN,
            FORBIDDEN,
        ),
        case(Method::PUT, format!("{v3}/rooms/{r}/send/m.room.message/authz1"), Some(msg.clone()), FORBIDDEN, Allowed),
        case(Method::PUT, format!("{v3}/rooms/{r}/redact/{e}/authz2"), Some(json!({})), FORBIDDEN, FORBIDDEN),
        case(Method::GET, format!("{v3}/rooms/{r}/event/{e}"), None, NOT_FOUND, Allowed),
        case(Method::GET, format!("{v3}/rooms/{r}/messages?dir=b"), None, FORBIDDEN, Allowed),
        case(Method::GET, format!("{v3}/rooms/{r}/members"), None, FORBIDDEN, Allowed),
        case(Method::GET, format!("{v3}/rooms/{r}/joined_members"), None, FORBIDDEN, Allowed),
        case(Method::GET, format!("{v3}/rooms/{r}/aliases"), None, FORBIDDEN, Allowed),
        case(Method::GET, format!("{v3}/rooms/{r}/context/{e}"), None, NOT_FOUND, Allowed),
        case(Method::GET, format!("{v1}/rooms/{r}/relations/{e}"), None, NOT_FOUND, Allowed),
        case(Method::GET, format!("{v1}/rooms/{r}/relations/{e}/m.annotation"), None, NOT_FOUND, Allowed),
        case(Method::GET, format!("{v1}/rooms/{r}/threads"), None, FORBIDDEN, Allowed),
        case(Method::GET, format!("{v1}/rooms/{r}/timestamp_to_event?ts=0&dir=f"), None, Denied, Allowed),
        case(Method::POST, format!("{v3}/rooms/{r}/invite"), Some(json!({ "user_id": dave.user_id })), FORBIDDEN, Any),
        case(
            Method::POST,
            format!("{v3}/rooms/{r}/kick"),
            Some(json!({ "user_id": alice.user_id })),
            FORBIDDEN,
            FORBIDDEN,
        ),
        case(
            Method::POST,
            format!("{v3}/rooms/{r}/ban"),
            Some(json!({ "user_id": alice.user_id })),
            FORBIDDEN,
            FORBIDDEN,
        ),
        case(
            Method::POST,
            format!("{v3}/rooms/{r}/unban"),
            Some(json!({ "user_id": dave.user_id })),
            FORBIDDEN,
            FORBIDDEN,
        ),
        case(
            Method::POST,
            format!("{v3}/rooms/{r}/upgrade"),
            Some(json!({ "new_version": "11" })),
            FORBIDDEN,
            FORBIDDEN,
        ),
        case(Method::POST, format!("{v3}/rooms/{r}/join"), Some(json!({})), FORBIDDEN, Allowed),
        case(Method::POST, format!("{v3}/knock/{r}"), Some(json!({})), FORBIDDEN, Denied),
        case(
            Method::PUT,
            format!("{v3}/directory/list/room/{r}"),
            Some(json!({ "visibility": "public" })),
            Denied,
            Denied,
        ),
        case(Method::DELETE, format!("{v3}/directory/room/{alias}"), None, Denied, Denied),
        case(
            Method::PUT,
            format!("{v3}/directory/room/{}", enc("#autre:localhost")),
            Some(json!({ "room_id": room })),
            FORBIDDEN,
            Any,
        ),
        case(Method::POST, format!("{v3}/rooms/{r}/receipt/m.read/{e}"), Some(json!({})), Denied, Allowed),
        case(
            Method::POST,
            format!("{v3}/rooms/{r}/read_markers"),
            Some(json!({ "m.fully_read": event })),
            Denied,
            Allowed,
        ),
        case(
            Method::PUT,
            format!("{v3}/rooms/{r}/typing/{{me}}"),
            Some(json!({ "typing": true, "timeout": 1000 })),
            Denied,
            Allowed,
        ),
        case(Method::POST, format!("{v3}/rooms/{r}/report/{e}"), Some(json!({ "reason": "spam" })), NOT_FOUND, Allowed),
        open(case(Method::GET, format!("{v1}/room_summary/{r}"), None, Denied, Allowed), Denied),
        // Someone else's account.
        case(Method::GET, format!("{v3}/user/{a}/account_data/m.push_rules"), None, FORBIDDEN, FORBIDDEN),
        case(Method::PUT, format!("{v3}/user/{a}/account_data/org.example"), Some(json!({})), FORBIDDEN, FORBIDDEN),
        case(Method::GET, format!("{v3}/user/{a}/rooms/{r}/account_data/org.example"), None, FORBIDDEN, FORBIDDEN),
        case(
            Method::PUT,
            format!("{v3}/user/{a}/rooms/{r}/account_data/org.example"),
            Some(json!({})),
            FORBIDDEN,
            FORBIDDEN,
        ),
        case(Method::GET, format!("{v3}/user/{a}/rooms/{r}/tags"), None, FORBIDDEN, FORBIDDEN),
        case(Method::PUT, format!("{v3}/user/{a}/rooms/{r}/tags/u.x"), Some(json!({})), FORBIDDEN, FORBIDDEN),
        case(Method::DELETE, format!("{v3}/user/{a}/rooms/{r}/tags/u.work"), None, FORBIDDEN, FORBIDDEN),
        case(Method::POST, format!("{v3}/user/{a}/filter"), Some(json!({})), Denied, Denied),
        case(Method::GET, format!("{v3}/user/{a}/filter/0"), None, Denied, Denied),
        case(
            Method::PUT,
            format!("{v3}/profile/{a}/displayname"),
            Some(json!({ "displayname": "x" })),
            FORBIDDEN,
            FORBIDDEN,
        ),
        case(Method::DELETE, format!("{v3}/profile/{a}/displayname"), None, FORBIDDEN, FORBIDDEN),
        case(Method::PUT, format!("{v3}/presence/{a}/status"), Some(json!({ "presence": "offline" })), Denied, Denied),
        case(Method::GET, format!("{v3}/devices/{dev}"), None, NOT_FOUND, NOT_FOUND),
        case(Method::PUT, format!("{v3}/devices/{dev}"), Some(json!({ "display_name": "x" })), NOT_FOUND, NOT_FOUND),
        case(Method::DELETE, format!("{v3}/devices/{dev}"), Some(json!({})), Denied, Denied),
        case(
            Method::POST,
            format!("{v3}/delete_devices"),
            Some(json!({ "devices": [alice.device_id] })),
            Denied,
            Denied,
        ),
        // Server administration.
        case(Method::GET, "/_synapse/admin/v1/registration_tokens", None, FORBIDDEN, FORBIDDEN),
        case(Method::POST, "/_synapse/admin/v1/registration_tokens/new", Some(json!({})), FORBIDDEN, FORBIDDEN),
        case(Method::GET, "/_synapse/admin/v1/event_reports", None, FORBIDDEN, FORBIDDEN),
        case(Method::GET, format!("/_synapse/admin/v1/users/{a}/media"), None, FORBIDDEN, FORBIDDEN),
        case(Method::DELETE, format!("/_synapse/admin/v1/users/{a}/media"), None, FORBIDDEN, FORBIDDEN),
        case(Method::POST, "/_synapse/admin/v1/purge_media_cache?before_ts=0", Some(json!({})), FORBIDDEN, FORBIDDEN),
        case(Method::POST, format!("/_synapse/admin/v1/users/{a}/export"), Some(json!({})), FORBIDDEN, FORBIDDEN),
        case(Method::GET, format!("/_synapse/admin/v1/users/{a}/export/x"), None, FORBIDDEN, FORBIDDEN),
        case(Method::GET, format!("/_synapse/admin/v1/users/{a}/export/x/download"), None, FORBIDDEN, FORBIDDEN),
        // The caller's own resources: only the token matters.
        case(Method::GET, format!("{v3}/account/whoami"), None, Allowed, Allowed),
        case(Method::GET, format!("{v3}/sync?timeout=0"), None, Allowed, Allowed),
        case(Method::GET, format!("{v3}/joined_rooms"), None, Allowed, Allowed),
        case(Method::GET, format!("{v3}/devices"), None, Allowed, Allowed),
        case(Method::GET, format!("{v3}/pushrules/"), None, Allowed, Allowed),
        case(Method::GET, format!("{v3}/pushers"), None, Allowed, Allowed),
        case(Method::GET, format!("{v3}/notifications"), None, Allowed, Allowed),
        case(Method::GET, format!("{v3}/capabilities"), None, Allowed, Allowed),
        case(Method::GET, format!("{v3}/voip/turnServer"), None, Any, Any),
        case(Method::GET, format!("{v3}/room_keys/version"), None, Any, Any),
        case(
            Method::POST,
            format!("{v3}/keys/query"),
            Some(json!({ "device_keys": { alice.user_id.clone(): [] } })),
            Allowed,
            Allowed,
        ),
        case(Method::POST, format!("{v3}/publicRooms"), Some(json!({})), Allowed, Allowed),
        case(
            Method::POST,
            format!("{v3}/user_directory/search"),
            Some(json!({ "search_term": "a" })),
            Allowed,
            Allowed,
        ),
        case(Method::GET, format!("{v1}/media/config"), None, Allowed, Allowed),
        case(
            Method::PUT,
            format!("{v3}/sendToDevice/m.test/authz3"),
            Some(json!({ "messages": {} })),
            Allowed,
            Allowed,
        ),
    ];

    let mut failures = Vec::new();
    for c in &cases {
        let path = c.path.replace("{me}", &enc(&carol.user_id));
        let resp = s.request(c.method.clone(), &path, None, c.body.clone()).await;
        check(&mut failures, "no token", c, &path, &resp, c.anon);
        let resp = s.request(c.method.clone(), &path, Some("syt_not_a_token"), c.body.clone()).await;
        check(&mut failures, "unknown token", c, &path, &resp, Is(401, "M_UNKNOWN_TOKEN"));
        for (who, user, expect) in [("outsider", &carol, c.outsider), ("member", &bob, c.member)] {
            let path = c.path.replace("{me}", &enc(&user.user_id));
            let resp = s.request(c.method.clone(), &path, Some(&user.token), c.body.clone()).await;
            check(&mut failures, who, c, &path, &resp, expect);
        }
    }

    assert!(failures.is_empty(), "{} unexpected answers:\n{}", failures.len(), failures.join("\n"));

    // Nothing the refusals would have changed has changed.
    let (_, name) = s.get(&format!("{v3}/rooms/{r}/state/m.room.name/"), Some(&alice.token)).await;
    assert_eq!(name["name"], "Conseil");
    let (_, levels) = s.get(&format!("{v3}/rooms/{r}/state/m.room.power_levels/"), Some(&alice.token)).await;
    assert!(levels["users"].get(&bob.user_id).is_none(), "{levels}");
    let (_, ev) = s.get(&format!("{v3}/rooms/{r}/event/{e}"), Some(&alice.token)).await;
    assert_eq!(ev["content"]["body"], "ordre du jour", "not redacted");
    let (_, members) = s.get(&format!("{v3}/rooms/{r}/joined_members"), Some(&alice.token)).await;
    assert!(members["joined"].get(&alice.user_id).is_some(), "{members}");
    assert!(members["joined"].get(&carol.user_id).is_none(), "{members}");
    let (st, resolved) = s.get(&format!("{v3}/directory/room/{alias}"), None).await;
    assert_eq!((st, resolved["room_id"].as_str()), (StatusCode::OK, Some(room.as_str())));
    let (_, vis) = s.get(&format!("{v3}/directory/list/room/{r}"), None).await;
    assert_eq!(vis["visibility"], "private");
    let (_, tags) = s.get(&format!("{v3}/user/{a}/rooms/{r}/tags"), Some(&alice.token)).await;
    assert!(tags["tags"].get("u.work").is_some(), "{tags}");
    let (_, profile) = s.get(&format!("{v3}/profile/{a}"), None).await;
    assert_ne!(profile["displayname"], "x");
    let (st, _) = s.get(&format!("{v3}/account/whoami"), Some(&alice.token)).await;
    assert_eq!(st, StatusCode::OK, "alice's device survived");
    s.stop().await;
}
