use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn devices_list_get_rename_delete() {
    let s = TestServer::start().await;
    let me = s.register("claire", false).await;
    let (_, second) =
        s.login("claire", PASSWORD, json!({ "device_id": "PHONE", "initial_device_display_name": "Element X" })).await;
    let second = user_from(&second);
    let (_, third) = s.login("claire", PASSWORD, json!({ "device_id": "LAPTOP" })).await;
    let third = user_from(&third);

    let (st, list) = s.get("/_matrix/client/v3/devices", Some(&me.token)).await;
    assert_eq!(st, 200);
    let ids: Vec<&str> = list["devices"].as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.contains(&"PHONE") && ids.contains(&"LAPTOP") && ids.contains(&me.device_id.as_str()));
    let phone = list["devices"].as_array().unwrap().iter().find(|d| d["device_id"] == "PHONE").unwrap();
    assert_eq!(phone["display_name"], "Element X");
    assert_eq!(phone["last_seen_ip"], "127.0.0.1");
    assert!(phone["last_seen_ts"].as_i64().unwrap() > 0);

    // Rename; unknown device is 404.
    assert_eq!(
        s.put("/_matrix/client/v3/devices/PHONE", Some(&me.token), json!({ "display_name": "Téléphone pro" })).await.0,
        200
    );
    let (_, d) = s.get("/_matrix/client/v3/devices/PHONE", Some(&me.token)).await;
    assert_eq!(d["display_name"], "Téléphone pro");
    assert_err(
        &s.put("/_matrix/client/v3/devices/NOPE", Some(&me.token), json!({ "display_name": "x" })).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(&s.get("/_matrix/client/v3/devices/NOPE", Some(&me.token)).await, 404, "M_NOT_FOUND");
    // Another user's devices are invisible.
    let other = s.register("other", false).await;
    assert_err(&s.get("/_matrix/client/v3/devices/PHONE", Some(&other.token)).await, 404, "M_NOT_FOUND");

    // Delete one device: UIA first, then the device and its token are gone.
    let (st, ch) = s.delete("/_matrix/client/v3/devices/PHONE", Some(&me.token), json!({})).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(ch["flows"], json!([{ "stages": ["m.login.password"] }]));
    let auth = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "claire" }, "password": PASSWORD, "session": ch["session"] });
    assert_eq!(s.delete("/_matrix/client/v3/devices/PHONE", Some(&me.token), json!({ "auth": auth })).await.0, 200);
    assert_err(&s.get("/_matrix/client/v3/account/whoami", Some(&second.token)).await, 401, "M_UNKNOWN_TOKEN");
    assert_err(&s.get("/_matrix/client/v3/devices/PHONE", Some(&me.token)).await, 404, "M_NOT_FOUND");

    // delete_devices with UIA.
    let (st, ch) = s.post("/_matrix/client/v3/delete_devices", Some(&me.token), json!({ "devices": ["LAPTOP"] })).await;
    assert_eq!(st, 401);
    let auth = json!({ "type": "m.login.password", "user": "claire", "password": PASSWORD, "session": ch["session"] });
    assert_eq!(
        s.post("/_matrix/client/v3/delete_devices", Some(&me.token), json!({ "devices": ["LAPTOP"], "auth": auth }))
            .await
            .0,
        200
    );
    assert_err(&s.get("/_matrix/client/v3/account/whoami", Some(&third.token)).await, 401, "M_UNKNOWN_TOKEN");
    let (_, list) = s.get("/_matrix/client/v3/devices", Some(&me.token)).await;
    assert_eq!(list["devices"].as_array().unwrap().len(), 1);
    assert_err(
        &s.post("/_matrix/client/v3/delete_devices", Some(&me.token), json!({ "devices": "LAPTOP" })).await,
        400,
        "M_BAD_JSON",
    );
    s.stop().await;
}

#[tokio::test]
async fn profiles() {
    let s = TestServer::start().await;
    let me = s.register("helene", false).await;
    let other = s.register("other", false).await;
    let mut changes = s.state().profile_changes.subscribe();

    let (st, p) = s.get("/_matrix/client/v3/profile/@helene:localhost", None).await;
    assert_eq!((st, p), (StatusCode::OK, json!({ "displayname": "helene" })));

    assert_eq!(
        s.put(
            "/_matrix/client/v3/profile/@helene:localhost/displayname",
            Some(&me.token),
            json!({ "displayname": "Hélène Martin" })
        )
        .await
        .0,
        200
    );
    assert_eq!(
        s.put(
            "/_matrix/client/v3/profile/@helene:localhost/avatar_url",
            Some(&me.token),
            json!({ "avatar_url": "mxc://localhost/abc" })
        )
        .await
        .0,
        200
    );
    let (_, p) = s.get("/_matrix/client/v3/profile/@helene:localhost", None).await;
    assert_eq!(p, json!({ "displayname": "Hélène Martin", "avatar_url": "mxc://localhost/abc" }));
    let (_, d) = s.get("/_matrix/client/v3/profile/@helene:localhost/displayname", None).await;
    assert_eq!(d, json!({ "displayname": "Hélène Martin" }));
    // The hook saw both changes, with the full profile.
    let first = changes.recv().await.unwrap();
    assert_eq!(first.user_id, "@helene:localhost");
    let second = changes.recv().await.unwrap();
    assert_eq!(second.profile["avatar_url"], "mxc://localhost/abc");

    // Custom fields (extended profiles).
    assert_eq!(
        s.put(
            "/_matrix/client/v3/profile/@helene:localhost/fr.ville.service",
            Some(&me.token),
            json!({ "fr.ville.service": "État civil" })
        )
        .await
        .0,
        200
    );
    let (_, f) = s.get("/_matrix/client/v3/profile/@helene:localhost/fr.ville.service", None).await;
    assert_eq!(f["fr.ville.service"], "État civil");
    assert_eq!(
        s.delete("/_matrix/client/v3/profile/@helene:localhost/fr.ville.service", Some(&me.token), json!({})).await.0,
        200
    );
    assert_err(&s.get("/_matrix/client/v3/profile/@helene:localhost/fr.ville.service", None).await, 404, "M_NOT_FOUND");

    // Failure cases.
    assert_err(
        &s.put(
            "/_matrix/client/v3/profile/@helene:localhost/displayname",
            Some(&other.token),
            json!({ "displayname": "x" }),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.put("/_matrix/client/v3/profile/@helene:localhost/displayname", None, json!({ "displayname": "x" })).await,
        401,
        "M_MISSING_TOKEN",
    );
    assert_err(
        &s.put(
            "/_matrix/client/v3/profile/@helene:localhost/displayname",
            Some(&me.token),
            json!({ "displayname": 42 }),
        )
        .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.put("/_matrix/client/v3/profile/@helene:localhost/displayname", Some(&me.token), json!({ "other": "x" }))
            .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.put(
            "/_matrix/client/v3/profile/@helene:localhost/avatar_url",
            Some(&me.token),
            json!({ "avatar_url": "https://evil.example/a.png" }),
        )
        .await,
        400,
        "M_BAD_JSON",
    );
    let huge = "x".repeat(70_000);
    assert_err(
        &s.put(
            "/_matrix/client/v3/profile/@helene:localhost/fr.ville.big",
            Some(&me.token),
            json!({ "fr.ville.big": huge }),
        )
        .await,
        400,
        "M_PROFILE_TOO_LARGE",
    );
    assert_err(&s.get("/_matrix/client/v3/profile/@nobody:localhost", None).await, 404, "M_NOT_FOUND");
    assert_err(&s.get("/_matrix/client/v3/profile/@someone:remote.example", None).await, 404, "M_NOT_FOUND");
    assert_err(&s.get("/_matrix/client/v3/profile/not-a-user-id", None).await, 400, "M_INVALID_PARAM");
    s.stop().await;
}
