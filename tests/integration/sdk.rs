//! The server driven by `matrix-sdk`, the library Element X is built on.

use matrix_sdk::Client;
use matrix_sdk::ruma::api::client::uiaa;
use matrix_sdk::ruma::{OwnedDeviceId, mxc_uri};

use crate::common::*;

async fn client(s: &TestServer) -> Client {
    Client::builder().homeserver_url(&s.base).build().await.expect("client builds")
}

#[tokio::test]
async fn element_x_style_session() {
    let s = TestServer::start().await;
    s.register("agent.sdk", false).await;

    let c = client(&s).await;
    // Wrong password is a proper client-API error the SDK understands.
    let err = c.matrix_auth().login_username("agent.sdk", "wrong").send().await.unwrap_err();
    let api = err.as_client_api_error().expect("a Matrix error");
    assert_eq!(api.status_code.as_u16(), 403);

    let login = c
        .matrix_auth()
        .login_username("agent.sdk", PASSWORD)
        .initial_device_display_name("Element X (test)")
        .send()
        .await
        .expect("login");
    assert_eq!(login.user_id.as_str(), "@agent.sdk:localhost");

    let who = c.whoami().await.expect("whoami");
    assert_eq!(who.user_id, login.user_id);
    assert_eq!(who.device_id.as_deref(), Some(&*login.device_id));

    // Devices: list, rename, see the rename.
    let devices = c.devices().await.expect("devices").devices;
    assert!(
        devices.iter().any(|d| d.device_id == login.device_id && d.display_name.as_deref() == Some("Element X (test)"))
    );
    c.rename_device(&login.device_id, "Téléphone de service").await.expect("rename");
    let devices = c.devices().await.unwrap().devices;
    assert!(devices.iter().any(|d| d.display_name.as_deref() == Some("Téléphone de service")));

    // Profile.
    let account = c.account();
    account.set_display_name(Some("Agent SDK")).await.expect("set displayname");
    assert_eq!(account.get_display_name().await.unwrap().as_deref(), Some("Agent SDK"));
    account.set_avatar_url(Some(mxc_uri!("mxc://localhost/avatar123"))).await.expect("set avatar");
    assert_eq!(account.get_avatar_url().await.unwrap().unwrap().as_str(), "mxc://localhost/avatar123");
    let profile = account.fetch_user_profile().await.expect("profile");
    assert_eq!(profile.get("displayname").and_then(|v| v.as_str().map(str::to_owned)).as_deref(), Some("Agent SDK"));

    // A second client logs in; the first deletes it through UIA, as Element's session manager does.
    let c2 = client(&s).await;
    let login2 = c2.matrix_auth().login_username("@agent.sdk:localhost", PASSWORD).send().await.expect("second login");
    let victim: Vec<OwnedDeviceId> = vec![login2.device_id.clone()];
    let err = c.delete_devices(&victim, None).await.unwrap_err();
    let info = err.as_uiaa_response().expect("UIA challenge");
    assert!(info.flows.iter().any(|f| f.stages.iter().any(|s| s.as_str() == "m.login.password")));
    let mut password = uiaa::Password::new(
        uiaa::UserIdentifier::Matrix(uiaa::MatrixUserIdentifier::new("agent.sdk".to_owned())),
        PASSWORD.to_owned(),
    );
    password.session = info.session.clone();
    c.delete_devices(&victim, Some(uiaa::AuthData::Password(password))).await.expect("delete with UIA");
    assert!(c2.whoami().await.is_err(), "deleted device's token is revoked");
    assert!(!c.devices().await.unwrap().devices.iter().any(|d| d.device_id == login2.device_id));

    // Logout.
    c.matrix_auth().logout().await.expect("logout");
    let c3 = client(&s).await;
    c3.matrix_auth().login_username("agent.sdk", PASSWORD).send().await.expect("login again");
    let left = c3.devices().await.unwrap().devices;
    assert!(!left.iter().any(|d| d.device_id == login.device_id), "logout deletes the device");
    assert_eq!(left.len(), 2, "the registration's device and this one");
    s.stop().await;
}

/// Two Element X-like clients in one room: create, invite, join, talk, edit, react, reply in a
/// thread, redact, paginate back, leave.
#[tokio::test]
async fn two_users_converse_in_a_room() {
    use matrix_sdk::room::MessagesOptions;
    use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoom;
    use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
    use serde_json::json;

    let s = TestServer::start().await;
    s.register("agent.a", false).await;
    s.register("agent.b", false).await;
    let a = client(&s).await;
    a.matrix_auth().login_username("agent.a", PASSWORD).send().await.expect("login a");
    let b = client(&s).await;
    let b_login = b.matrix_auth().login_username("agent.b", PASSWORD).send().await.expect("login b");

    let mut req = CreateRoom::new();
    req.name = Some("Cellule de crise".into());
    let room_a = a.create_room(req).await.expect("create room");
    room_a.invite_user_by_id(&b_login.user_id).await.expect("invite");
    let room_b = b.join_room_by_id(room_a.room_id()).await.expect("join");

    let hello = room_a.send(RoomMessageEventContent::text_plain("Bonjour")).await.expect("send").response.event_id;
    let reply =
        room_b.send(RoomMessageEventContent::text_plain("Bonjour, je suis là")).await.expect("send").response.event_id;
    let edit = room_a
        .send_raw(
            "m.room.message",
            json!({
                "msgtype": "m.text", "body": "* Bonjour à tous",
                "m.new_content": { "msgtype": "m.text", "body": "Bonjour à tous" },
                "m.relates_to": { "rel_type": "m.replace", "event_id": hello }
            }),
        )
        .await
        .expect("edit")
        .response
        .event_id;
    room_b
        .send_raw(
            "m.reaction",
            json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": hello, "key": "👍" } }),
        )
        .await
        .expect("react");
    let thread = room_b
        .send_raw("m.room.message", json!({
            "msgtype": "m.text", "body": "Dans un fil",
            "m.relates_to": { "rel_type": "m.thread", "event_id": hello, "is_falling_back": true, "m.in_reply_to": { "event_id": hello } }
        }))
        .await
        .expect("thread reply")
        .response
        .event_id;
    room_b.redact(&reply, Some("oups"), None).await.expect("redact own message");

    // Paginate back from the end as a client does on opening the room.
    let mut seen = Vec::new();
    let mut from: Option<String> = None;
    loop {
        let opts = MessagesOptions::backward().from(from.as_deref());
        let page = room_a.messages(opts).await.expect("messages");
        for ev in &page.chunk {
            seen.push(ev.raw().deserialize_as::<serde_json::Value>().unwrap());
        }
        match page.end {
            Some(end) if !page.chunk.is_empty() => from = Some(end),
            _ => break,
        }
    }
    let find = |id: &matrix_sdk::ruma::EventId| seen.iter().find(|e| e["event_id"] == id.as_str()).cloned().unwrap();
    let root = find(&hello);
    assert_eq!(root["unsigned"]["m.relations"]["m.replace"]["event_id"], edit.as_str());
    assert_eq!(root["unsigned"]["m.relations"]["m.thread"]["latest_event"]["event_id"], thread.as_str());
    assert_eq!(find(&reply)["content"], json!({}), "redacted");
    assert_eq!(seen.last().unwrap()["type"], "m.room.create");
    assert!(seen.iter().any(|e| e["type"] == "m.reaction"));
    let ids: std::collections::HashSet<&str> = seen.iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), seen.len(), "every event once");

    room_b.leave().await.expect("leave");
    let (_, joined) = s
        .get(&format!("/_matrix/client/v3/rooms/{}/joined_members", room_a.room_id()), Some(&a.access_token().unwrap()))
        .await;
    assert_eq!(joined["joined"].as_object().unwrap().len(), 1, "{joined}");
    s.stop().await;
}

/// A matrix-sdk client syncs: its room list (names, heroes, member counts) is right, and it sees
/// another client's messages in real time through a long-polling sync loop.
#[tokio::test]
async fn sdk_room_list_and_live_messages() {
    use matrix_sdk::config::SyncSettings;
    use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoom;
    use matrix_sdk::ruma::events::room::message::{OriginalSyncRoomMessageEvent, RoomMessageEventContent};
    use std::time::Duration;

    let s = TestServer::start().await;
    s.register("agent.c", false).await;
    s.register("agent.d", false).await;
    let c = client(&s).await;
    c.matrix_auth().login_username("agent.c", PASSWORD).send().await.expect("login c");
    c.account().set_display_name(Some("Camille")).await.unwrap();
    let d = client(&s).await;
    let d_login = d.matrix_auth().login_username("agent.d", PASSWORD).send().await.expect("login d");

    let mut req = CreateRoom::new();
    req.name = Some("Astreinte".into());
    let named = c.create_room(req).await.expect("named room");
    named.invite_user_by_id(&d_login.user_id).await.unwrap();
    let unnamed = c.create_room(CreateRoom::new()).await.expect("unnamed room");
    unnamed.invite_user_by_id(&d_login.user_id).await.unwrap();

    // D's first sync: two invites; D joins both; the room list is then right.
    d.sync_once(SyncSettings::default()).await.expect("initial sync");
    assert_eq!(d.invited_rooms().len(), 2);
    d.join_room_by_id(named.room_id()).await.unwrap();
    d.join_room_by_id(unnamed.room_id()).await.unwrap();
    d.sync_once(SyncSettings::default()).await.expect("sync after joins");
    let named_d = d.get_room(named.room_id()).expect("named room known");
    assert_eq!(named_d.display_name().await.unwrap().to_string(), "Astreinte");
    assert_eq!(named_d.joined_members_count(), 2);
    let unnamed_d = d.get_room(unnamed.room_id()).expect("unnamed room known");
    // No name: the SDK names the room after its heroes, here the other member.
    assert_eq!(unnamed_d.display_name().await.unwrap().to_string(), "Camille");
    assert!(unnamed_d.heroes().iter().any(|h| h.user_id.as_str() == "@agent.c:localhost"));

    // Live: D's sync loop receives C's messages as they are sent.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String, std::time::Instant)>();
    d.add_event_handler(move |ev: OriginalSyncRoomMessageEvent| {
        let tx = tx.clone();
        async move {
            let _ = tx.send((ev.content.body().to_owned(), ev.event_id.to_string(), std::time::Instant::now()));
        }
    });
    let d_loop = d.clone();
    let sync_task = tokio::spawn(async move {
        let _ = d_loop.sync(SyncSettings::default().timeout(Duration::from_secs(30))).await;
    });
    // Let the loop reach its long-poll.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latest = String::new();
    for i in 0..3 {
        let sent_at = std::time::Instant::now();
        named.send(RoomMessageEventContent::text_plain(format!("alerte {i}"))).await.expect("send");
        let (body, at) = loop {
            let (body, id, at) =
                tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("delivered").unwrap();
            if body.starts_with("alerte") {
                latest = id;
                break (body, at);
            }
        };
        assert_eq!(body, format!("alerte {i}"));
        assert!(at.duration_since(sent_at) < Duration::from_secs(5), "real time, not at the long-poll timeout");
    }
    sync_task.abort();

    // The room list's unread count: three unread messages, then none after a read receipt.
    d.sync_once(SyncSettings::default()).await.unwrap();
    let counts = named_d.unread_notification_counts();
    assert_eq!(counts.notification_count, 3, "{counts:?}");
    let latest = matrix_sdk::ruma::OwnedEventId::try_from(latest).unwrap();
    named_d
        .send_single_receipt(
            matrix_sdk::ruma::api::client::receipt::create_receipt::v3::ReceiptType::Read,
            matrix_sdk::ruma::events::receipt::ReceiptThread::Unthreaded,
            latest,
        )
        .await
        .unwrap();
    d.sync_once(SyncSettings::default()).await.unwrap();
    assert_eq!(named_d.unread_notification_counts().notification_count, 0);
    s.stop().await;
}

/// End-to-end encryption with matrix-sdk (in-memory crypto stores): two users exchange messages
/// in an encrypted room and decrypt each other's; a second device of the first user logs in,
/// recovers the cross-signing identity from secret storage (so it is verified), and decrypts the
/// room's history from the server-side key backup. Every server path is on the way: keys
/// upload/query/claim, to-device room keys, cross-signing and signature uploads, device lists in
/// sync, account data (secret storage) and room_keys.
#[tokio::test]
async fn sdk_encrypted_conversation_cross_signing_and_backup() {
    use matrix_sdk::config::SyncSettings;
    use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoom;
    use matrix_sdk::ruma::events::room::message::{OriginalSyncRoomMessageEvent, RoomMessageEventContent};
    use serde_json::Value;
    use std::time::Duration;

    let s = TestServer::start().await;
    s.register("agent.e", false).await;
    s.register("agent.f", false).await;
    let e1 = client(&s).await;
    e1.matrix_auth().login_username("agent.e", PASSWORD).send().await.expect("login e1");
    let f = client(&s).await;
    let f_login = f.matrix_auth().login_username("agent.f", PASSWORD).send().await.expect("login f");
    // First syncs: device keys and one-time keys are uploaded.
    e1.sync_once(SyncSettings::default()).await.unwrap();
    f.sync_once(SyncSettings::default()).await.unwrap();
    e1.encryption().wait_for_e2ee_initialization_tasks().await;
    f.encryption().wait_for_e2ee_initialization_tasks().await;

    // E sets up recovery: cross-signing, secret storage and key backup.
    e1.encryption().bootstrap_cross_signing(None).await.expect("cross-signing bootstrap");
    let recovery_key = e1.encryption().recovery().enable().await.expect("recovery enabled");
    assert!(e1.encryption().cross_signing_status().await.is_some_and(|c| c.is_complete()));

    // An encrypted room.
    let mut req = CreateRoom::new();
    req.invite = vec![f_login.user_id.clone()];
    req.initial_state = vec![
        matrix_sdk::ruma::serde::Raw::new(&serde_json::json!({
            "type": "m.room.encryption", "state_key": "", "content": { "algorithm": "m.megolm.v1.aes-sha2" }
        }))
        .unwrap()
        .cast_unchecked(),
    ];
    let room_e = e1.create_room(req).await.expect("create encrypted room");
    f.sync_once(SyncSettings::default()).await.unwrap();
    let room_f = f.join_room_by_id(room_e.room_id()).await.expect("join");
    e1.sync_once(SyncSettings::default()).await.unwrap();
    f.sync_once(SyncSettings::default()).await.unwrap();
    assert!(room_e.latest_encryption_state().await.unwrap().is_encrypted());

    // Decrypted messages arrive through each client's event handler.
    let collect = |c: &matrix_sdk::Client| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        c.add_event_handler(move |ev: OriginalSyncRoomMessageEvent| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(ev.content.body().to_owned());
            }
        });
        rx
    };
    let mut f_rx = collect(&f);
    let mut e_rx = collect(&e1);

    let secret =
        room_e.send(RoomMessageEventContent::text_plain("code d'accès: 4721")).await.expect("send").response.event_id;
    // The server only ever saw ciphertext.
    let (_, raw) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room_e.room_id().as_str()), enc(secret.as_str())),
            Some(&e1.access_token().unwrap()),
        )
        .await;
    assert_eq!(raw["type"], "m.room.encrypted", "{raw}");
    assert!(!raw.to_string().contains("4721"));

    let mut got = None;
    for _ in 0..10 {
        f.sync_once(SyncSettings::default().timeout(Duration::from_millis(500))).await.unwrap();
        if let Ok(body) = f_rx.try_recv() {
            got = Some(body);
            break;
        }
    }
    assert_eq!(got.as_deref(), Some("code d'accès: 4721"), "F decrypts E's message");

    room_f.send(RoomMessageEventContent::text_plain("reçu")).await.expect("reply");
    let mut got = None;
    for _ in 0..10 {
        e1.sync_once(SyncSettings::default().timeout(Duration::from_millis(500))).await.unwrap();
        while let Ok(body) = e_rx.try_recv() {
            if body == "reçu" {
                got = Some(body);
            }
        }
        if got.is_some() {
            break;
        }
    }
    assert_eq!(got.as_deref(), Some("reçu"), "E decrypts F's reply");

    // E's room keys reach the backup.
    e1.encryption().backups().wait_for_steady_state().await.expect("backup upload");
    let (st, v) = s.get("/_matrix/client/v3/room_keys/version", Some(&e1.access_token().unwrap())).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["count"].as_i64().unwrap() >= 1, "{v}");

    // A second device of E: recovers the identity and the backup key from secret storage.
    let e2 = client(&s).await;
    let e2_login = e2.matrix_auth().login_username("agent.e", PASSWORD).send().await.expect("login e2");
    e2.sync_once(SyncSettings::default()).await.unwrap();
    e2.encryption().wait_for_e2ee_initialization_tasks().await;
    e2.encryption().recovery().recover(&recovery_key).await.expect("recover from secret storage");
    let own = e2.encryption().get_own_device().await.unwrap().expect("own device");
    assert!(own.is_cross_signed_by_owner(), "the new device signed itself with the recovered self-signing key");
    // The first device sees the second as verified once it syncs the device-list change.
    let mut verified = false;
    for _ in 0..10 {
        e1.sync_once(SyncSettings::default().timeout(Duration::from_millis(300))).await.unwrap();
        if let Some(d) = e1.encryption().get_device(&e2_login.user_id, &e2_login.device_id).await.unwrap()
            && d.is_verified()
        {
            verified = true;
            break;
        }
    }
    assert!(verified, "E1 sees E2 verified through cross-signing");

    // History: E2 never received the room key by to-device; it comes from the backup.
    let room_e2 = e2.get_room(room_e.room_id()).expect("room known to the second device");
    let before = room_e2.event(&secret, None).await.expect("fetch event");
    assert_eq!(before.raw().get_field::<String>("type").unwrap().as_deref(), Some("m.room.encrypted"));
    e2.encryption().backups().download_room_keys_for_room(room_e.room_id()).await.expect("download keys from backup");
    let after = room_e2.event(&secret, None).await.expect("fetch event again");
    let ev: Value = after.raw().deserialize_as().unwrap();
    assert_eq!(ev["type"], "m.room.message", "decrypted from the backup: {ev}");
    assert_eq!(ev["content"]["body"], "code d'accès: 4721");
    s.stop().await;
}
