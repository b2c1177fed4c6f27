//! Rooms between Parvis and a real Synapse over TLS with the test CA (issue 13), both ways:
//! join by a remote alias (each server as the resident one), messages and state, typing and
//! receipts, invites (accepted and rejected), kick and ban (a banned user cannot rejoin).
//! Skipped with a message when Synapse is absent (outside CI; `.ci/run` installs it).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::enc;
use crate::fed_harness::{self, Ca, ClientApi, Synapse, wait_for_room_event};
use crate::federation_rooms::{bodies, eventually, membership, send_text, state_content};

const WAIT: Duration = Duration::from_secs(60);

fn has_body<'a>(body: &'a str) -> impl FnMut(&Value) -> bool + 'a {
    move |e: &Value| e["type"] == "m.room.message" && e["content"]["body"] == body
}

#[tokio::test]
async fn synapse_interop_rooms() {
    if fed_harness::synapse_python().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "interop");
    let p = fed_harness::start(dir.path(), "parvis", &ca, &ca, |_| {}).await;
    // Synapse lets only its admins publish rooms by default.
    let syn = Synapse::start_with(dir.path(), &ca, &ca.pem, "room_list_publication_rules: [{action: allow}]\n").await;
    let (pn, sn) = (p.name.to_string(), syn.name.to_string());
    let ps = &p.server;
    let alice = ps.register("alice", false).await;
    let bob = ps.register("bob", false).await;
    let (sam, sam_token) = syn.register("sam", "sam-password-1").await;
    let (sue, sue_token) = syn.register("sue", "sue-password-1").await;
    let fail = |what: &str| format!("{what}\n--- Synapse log ---\n{}", syn.log_tail(60));

    // --- A Parvis room, joined from Synapse by its alias (Parvis resident).
    let (st, v) = ps
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice.token),
            json!({ "preset": "public_chat", "room_alias_name": "mairie", "name": "Mairie" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    send_text(ps, &alice.token, &room, "bonjour depuis Parvis").await;
    let alias = format!("#mairie:{pn}");
    let (st, v) = syn.post(&format!("/_matrix/client/v3/join/{}", enc(&alias)), Some(&sam_token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{}", fail(&v.to_string()));
    assert_eq!(v["room_id"], room.as_str());
    eventually("sam's join on Parvis", || async {
        (membership(ps, &alice.token, &room, &sam).await.as_deref() == Some("join")).then_some(())
    })
    .await;
    let name = wait_for_room_event(&syn, &sam_token, &room, WAIT, |e| e["type"] == "m.room.name").await;
    assert_eq!(name["content"]["name"], "Mairie");

    // --- Messages both ways.
    send_text(&syn, &sam_token, &room, "bonjour depuis Synapse").await;
    eventually("Synapse's message on Parvis", || async {
        bodies(ps, &alice.token, &room).await.contains(&"bonjour depuis Synapse".to_owned()).then_some(())
    })
    .await;
    let last = send_text(ps, &alice.token, &room, "réponse de Parvis").await;
    wait_for_room_event(&syn, &sam_token, &room, WAIT, has_body("réponse de Parvis")).await;

    // --- State from Parvis reaches Synapse.
    let (st, _) = ps
        .put(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&room)),
            Some(&alice.token),
            json!({ "topic": "Conseil municipal" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    wait_for_room_event(&syn, &sam_token, &room, WAIT, |e| {
        e["type"] == "m.room.topic" && e["content"]["topic"] == "Conseil municipal"
    })
    .await;

    // --- Typing and receipts both ways.
    let (st, _) = syn
        .put(
            &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&sam)),
            Some(&sam_token),
            json!({ "typing": true, "timeout": 30000 }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    eventually("sam typing on Parvis", || async {
        let s = crate::federation_rooms::initial_sync(ps, &alice.token).await;
        let eph = s["rooms"]["join"][&room]["ephemeral"]["events"].as_array().cloned().unwrap_or_default();
        eph.iter()
            .any(|e| {
                e["type"] == "m.typing" && e["content"]["user_ids"].as_array().is_some_and(|u| u.contains(&json!(sam)))
            })
            .then_some(())
    })
    .await;
    let (st, _) = ps
        .post(
            &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&last)),
            Some(&alice.token),
            json!({}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    wait_for_room_event(&syn, &sam_token, &room, WAIT, |e| {
        e["type"] == "m.receipt" && e["content"][&last]["m.read"][&alice.user_id].is_object()
    })
    .await;

    // --- A Synapse room, joined from Parvis by its alias (Synapse resident).
    let (st, v) = syn
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&sue_token),
            json!({ "preset": "public_chat", "room_alias_name": "prefecture", "name": "Préfecture", "visibility": "public" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let syn_room = v["room_id"].as_str().unwrap().to_owned();
    send_text(&syn, &sue_token, &syn_room, "message d'avant").await;
    // Synapse's public room directory, read from Parvis.
    let (st, v) = ps.get(&format!("/_matrix/client/v3/publicRooms?server={}", enc(&sn)), Some(&bob.token)).await;
    assert_eq!(st, StatusCode::OK, "{}", fail(&v.to_string()));
    assert!(v["chunk"].as_array().unwrap().iter().any(|r| r["room_id"] == syn_room.as_str()), "{v}");
    let (st, v) = ps
        .post(&format!("/_matrix/client/v3/join/{}", enc(&format!("#prefecture:{sn}"))), Some(&bob.token), json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{}", fail(&v.to_string()));
    assert_eq!(v["room_id"], syn_room.as_str());
    assert_eq!(state_content(ps, &bob.token, &syn_room, "m.room.name", "").await.unwrap()["name"], "Préfecture");
    wait_for_room_event(&syn, &sue_token, &syn_room, WAIT, |e| {
        e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str() && e["content"]["membership"] == "join"
    })
    .await;
    // History from before bob's join, backfilled from Synapse.
    let history = bodies(ps, &bob.token, &syn_room).await;
    assert!(history.contains(&"message d'avant".to_owned()), "{}", fail(&format!("{history:?}")));
    send_text(ps, &bob.token, &syn_room, "bob de Parvis").await;
    wait_for_room_event(&syn, &sue_token, &syn_room, WAIT, has_body("bob de Parvis")).await;
    send_text(&syn, &sue_token, &syn_room, "sue de Synapse").await;
    eventually("sue's message on Parvis", || async {
        bodies(ps, &bob.token, &syn_room).await.contains(&"sue de Synapse".to_owned()).then_some(())
    })
    .await;

    // --- Invites: Synapse invites a Parvis user into a private room; Parvis invites a Synapse
    // user into a private room. Both accepted; one more rejected.
    let (st, v) = syn
        .post("/_matrix/client/v3/createRoom", Some(&sue_token), json!({ "preset": "private_chat", "name": "Cabinet" }))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let syn_private = v["room_id"].as_str().unwrap().to_owned();
    let (st, v) = syn
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&syn_private)),
            Some(&sue_token),
            json!({ "user_id": alice.user_id }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{}", fail(&v.to_string()));
    let sync = crate::federation_rooms::initial_sync(ps, &alice.token).await;
    let inv = &sync["rooms"]["invite"][&syn_private]["invite_state"]["events"];
    assert!(inv.as_array().is_some_and(|e| e.iter().any(|e| e["type"] == "m.room.member")), "{sync}");
    let (st, v) =
        ps.post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&syn_private)), Some(&alice.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{}", fail(&v.to_string()));
    wait_for_room_event(&syn, &sue_token, &syn_private, WAIT, |e| {
        e["type"] == "m.room.member" && e["state_key"] == alice.user_id.as_str() && e["content"]["membership"] == "join"
    })
    .await;

    let (st, v) = ps
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice.token),
            json!({ "preset": "private_chat", "name": "Bureau" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let p_private = v["room_id"].as_str().unwrap().to_owned();
    let (st, v) = ps
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&p_private)),
            Some(&alice.token),
            json!({ "user_id": sue }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{}", fail(&v.to_string()));
    wait_for_room_event(&syn, &sue_token, &p_private, WAIT, |e| {
        e["type"] == "m.room.member" && e["state_key"] == sue.as_str() && e["content"]["membership"] == "invite"
    })
    .await;
    let (st, v) =
        syn.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&p_private)), Some(&sue_token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{}", fail(&v.to_string()));
    eventually("sue's rejection on Parvis", || async {
        (membership(ps, &alice.token, &p_private, &sue).await.as_deref() == Some("leave")).then_some(())
    })
    .await;
    let (st, v) = ps
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&p_private)),
            Some(&alice.token),
            json!({ "user_id": sue }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{}", fail(&v.to_string()));
    let (st, v) =
        syn.post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&p_private)), Some(&sue_token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{}", fail(&v.to_string()));
    eventually("sue's join on Parvis", || async {
        (membership(ps, &alice.token, &p_private, &sue).await.as_deref() == Some("join")).then_some(())
    })
    .await;

    // --- Kick and ban from Parvis; a banned Synapse user cannot rejoin.
    let (st, _) = ps
        .post(
            &format!("/_matrix/client/v3/rooms/{}/ban", enc(&room)),
            Some(&alice.token),
            json!({ "user_id": sam, "reason": "test" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    wait_for_room_event(&syn, &sam_token, &room, WAIT, |e| {
        e["type"] == "m.room.member" && e["state_key"] == sam.as_str() && e["content"]["membership"] == "ban"
    })
    .await;
    let (st, v) = syn.post(&format!("/_matrix/client/v3/join/{}", enc(&alias)), Some(&sam_token), json!({})).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");

    p.server.stop().await;
}
