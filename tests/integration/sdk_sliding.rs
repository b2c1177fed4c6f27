//! Simplified sliding sync driven by `matrix-sdk` 0.18 (the engine of Element X), which discovers
//! it from `/versions`: a room list of many rooms loaded in growing windows, a new message moving
//! its room to the top, and an encrypted conversation whose keys travel through the `to_device`
//! and `e2ee` extensions.

use std::time::Duration;

use futures_util::StreamExt;
use matrix_sdk::ruma::events::StateEventType;
use matrix_sdk::sliding_sync::{SlidingSyncList, SlidingSyncMode, Version, VersionBuilder};
use matrix_sdk::{Client, SlidingSync};
use serde_json::json;

use crate::common::*;
use crate::sync::send_text;

async fn client(s: &TestServer, user: &str) -> Client {
    let c = Client::builder()
        .homeserver_url(&s.base)
        .sliding_sync_version_builder(VersionBuilder::DiscoverNative)
        .build()
        .await
        .expect("client builds");
    assert!(matches!(c.sliding_sync_version(), Version::Native), "discovered from /versions");
    c.matrix_auth().login_username(user, PASSWORD).send().await.expect("login");
    c
}

fn room_list(c: &Client, batch: u32) -> matrix_sdk::sliding_sync::SlidingSyncBuilder {
    c.sliding_sync("room-list")
        .unwrap()
        .poll_timeout(Duration::from_millis(500))
        .with_account_data_extension(Default::default())
        .add_list(
            SlidingSyncList::builder("all_rooms")
                .sync_mode(SlidingSyncMode::new_growing(batch))
                .timeline_limit(1)
                .required_state(vec![
                    (StateEventType::RoomName, String::new()),
                    (StateEventType::RoomEncryption, String::new()),
                    (StateEventType::RoomMember, "$LAZY".to_owned()),
                    (StateEventType::RoomMember, "$ME".to_owned()),
                ]),
        )
}

/// Runs one request/response round of a sliding sync.
async fn round(ss: &SlidingSync) -> matrix_sdk::sliding_sync::UpdateSummary {
    let stream = ss.sync();
    futures_util::pin_mut!(stream);
    tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("a response in time")
        .expect("the stream yields")
        .expect("sliding sync round")
}

#[tokio::test]
async fn sdk_room_list_of_many_rooms_and_recency() {
    let s = TestServer::start().await;
    let g = s.register("agent.g", false).await;
    let mut created = Vec::new();
    for i in 0..30 {
        let r = create(&s, &g, json!({ "name": format!("salle {i:02}") })).await;
        created.push(r);
    }
    let c = client(&s, "agent.g").await;
    let ss = room_list(&c, 10).build().await.expect("sliding sync builds");
    // Growing windows: 10, 20, 30 rooms.
    for _ in 0..6 {
        round(&ss).await;
        if c.rooms().len() == 30 {
            break;
        }
    }
    assert_eq!(c.rooms().len(), 30, "every room loaded");
    let list = ss.on_list("all_rooms", |l| std::future::ready(l.maximum_number_of_rooms())).await;
    assert_eq!(list.flatten(), Some(30));
    let stamp = |id: &str| -> u64 {
        let room = c.get_room(&matrix_sdk::ruma::RoomId::parse(id).unwrap()).expect("room known");
        room.recency_stamp().map(u64::from).expect("a recency stamp")
    };
    let newest = created.iter().max_by_key(|r| stamp(r)).unwrap();
    assert_eq!(newest, &created[29], "the last created room is the most recent");
    let r0 = c.get_room(&matrix_sdk::ruma::RoomId::parse(&created[0]).unwrap()).unwrap();
    assert_eq!(r0.name().as_deref(), Some("salle 00"));

    // A message in the oldest room moves it to the top.
    send_text(&s, &g, &created[0], "remonte").await;
    let mut seen = false;
    for _ in 0..5 {
        let summary = round(&ss).await;
        if summary.rooms.iter().any(|r| r.as_str() == created[0]) {
            seen = true;
            break;
        }
    }
    assert!(seen, "the room's update arrived");
    let newest = created.iter().max_by_key(|r| stamp(r)).unwrap();
    assert_eq!(newest, &created[0], "now the most recent");
    assert!(stamp(&created[0]) > stamp(&created[29]), "recency moved past every other room");
    s.stop().await;
}

#[tokio::test]
async fn sdk_encrypted_conversation_over_sliding_sync() {
    use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoom;
    use matrix_sdk::ruma::events::room::message::{OriginalSyncRoomMessageEvent, RoomMessageEventContent};

    let s = TestServer::start().await;
    s.register("agent.e", false).await;
    s.register("agent.f", false).await;
    let e = client(&s, "agent.e").await;
    let f = client(&s, "agent.f").await;
    // Element X's shape: the room list, and the encryption connection (to-device and e2ee).
    let build = |c: &Client| {
        let c = c.clone();
        async move {
            room_list(&c, 20)
                .with_to_device_extension(assign_enabled())
                .with_e2ee_extension(assign_e2ee())
                .with_receipt_extension(Default::default())
                .build()
                .await
                .expect("sliding sync builds")
        }
    };
    let ss_e = build(&e).await;
    let ss_f = build(&f).await;
    // Run both sync loops in the background, as an app does.
    let spawn = |ss: SlidingSync| {
        tokio::spawn(async move {
            loop {
                let stream = ss.sync();
                futures_util::pin_mut!(stream);
                while let Some(r) = stream.next().await {
                    if let Err(err) = r {
                        tracing::warn!(%err, "sliding sync loop error");
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let loop_e = spawn(ss_e.clone());
    let loop_f = spawn(ss_f.clone());
    e.encryption().wait_for_e2ee_initialization_tasks().await;
    f.encryption().wait_for_e2ee_initialization_tasks().await;

    let collect = |c: &Client| {
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
    let mut e_rx = collect(&e);

    let mut req = CreateRoom::new();
    req.invite = vec![f.user_id().unwrap().to_owned()];
    req.initial_state = vec![
        matrix_sdk::ruma::serde::Raw::new(&json!({
            "type": "m.room.encryption", "state_key": "", "content": { "algorithm": "m.megolm.v1.aes-sha2" }
        }))
        .unwrap()
        .cast_unchecked(),
    ];
    let room_e = e.create_room(req).await.expect("create encrypted room");
    // F sees the invite through sliding sync, then joins.
    let room_id = room_e.room_id().to_owned();
    let mut invited = false;
    for _ in 0..100 {
        if f.get_room(&room_id).is_some_and(|r| r.state() == matrix_sdk::RoomState::Invited) {
            invited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(invited, "the invite arrived over sliding sync");
    let room_f = f.join_room_by_id(&room_id).await.expect("join");
    for _ in 0..100 {
        if room_e.joined_members_count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(room_e.joined_members_count(), 2, "E saw F join");
    assert!(room_e.latest_encryption_state().await.unwrap().is_encrypted());

    room_e.send(RoomMessageEventContent::text_plain("code d'accès: 4721")).await.expect("send");
    let got = tokio::time::timeout(Duration::from_secs(20), f_rx.recv()).await.ok().flatten();
    assert_eq!(got.as_deref(), Some("code d'accès: 4721"), "F decrypts E's message");

    room_f.send(RoomMessageEventContent::text_plain("reçu")).await.expect("reply");
    let mut got = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.is_none() {
        match tokio::time::timeout_at(deadline, e_rx.recv()).await {
            Ok(Some(b)) if b == "reçu" => got = Some(b),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    assert_eq!(got.as_deref(), Some("reçu"), "E decrypts F's reply");
    loop_e.abort();
    loop_f.abort();
    s.stop().await;
}

fn assign_enabled() -> matrix_sdk::ruma::api::client::sync::sync_events::v5::request::ToDevice {
    let mut t = matrix_sdk::ruma::api::client::sync::sync_events::v5::request::ToDevice::default();
    t.enabled = Some(true);
    t
}

fn assign_e2ee() -> matrix_sdk::ruma::api::client::sync::sync_events::v5::request::E2EE {
    let mut t = matrix_sdk::ruma::api::client::sync::sync_events::v5::request::E2EE::default();
    t.enabled = Some(true);
    t
}
