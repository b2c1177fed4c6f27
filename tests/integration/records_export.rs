//! Per-user exports (records, issue 19): the admin API's jobs and the `parvis export-user`
//! command, checked by reading the archives back with the zip crate. Two users share rooms with
//! `shared` and `joined` history visibility, one room the exported user left, an encrypted room,
//! an HTML-injection attempt and an uploaded image.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::time::{Duration, Instant};

use image::ImageFormat;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::cli::parvis;
use crate::common::*;
use crate::media::{picture, upload};
use crate::sync::send_text;

const EVIL: &str = "<script>alert('xss')</script> & co";

fn room_path(room: &str, rest: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/{rest}", enc(room))
}

async fn act(s: &TestServer, u: &User, room: &str, action: &str) {
    let (st, v) = s.post(&room_path(room, action), Some(&u.token), json!({})).await;
    assert_eq!(st, 200, "{action}: {v}");
}

async fn send(s: &TestServer, u: &User, room: &str, kind: &str, content: Value) -> String {
    let txn = format!("t{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    let (st, v) = s.put(&room_path(room, &format!("send/{kind}/{txn}")), Some(&u.token), content).await;
    assert_eq!(st, 200, "{v}");
    v["event_id"].as_str().unwrap().to_owned()
}

async fn account_data(s: &TestServer, u: &User, kind: &str, content: Value) {
    let path = format!("/_matrix/client/v3/user/{}/account_data/{kind}", enc(&u.user_id));
    let (st, v) = s.put(&path, Some(&u.token), content).await;
    assert_eq!(st, 200, "{v}");
}

/// What the scenario made: the rooms of Alice, the exported user.
struct Scenario {
    alice: User,
    bob: User,
    admin: User,
    council: String,
    roads: String,
    old_project: String,
    secret_room: String,
    png: Vec<u8>,
    media_id: String,
}

async fn scenario(s: &TestServer) -> Scenario {
    let admin = s.register("archiviste", true).await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let (st, v) = s
        .put(
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)),
            Some(&alice.token),
            json!({ "displayname": "Alice Martin" }),
        )
        .await;
    assert_eq!(st, 200, "{v}");

    // A `shared` room: everything Alice may see, an injection attempt by Bob, Alice's image.
    let council = create(s, &alice, json!({ "preset": "public_chat", "name": "Conseil municipal" })).await;
    act(s, &bob, &council, "join").await;
    send_text(s, &alice, &council, "Bonjour le conseil").await;
    send_text(s, &bob, &council, EVIL).await;
    let png = picture(8, 8, ImageFormat::Png);
    let (st, v) = upload(s, Some(&alice.token), "image/png", Some("plan du marché.png"), png.clone()).await;
    assert_eq!(st, 200, "{v}");
    let mxc = v["content_uri"].as_str().unwrap().to_owned();
    let media_id = mxc.rsplit('/').next().unwrap().to_owned();
    send(
        s,
        &alice,
        &council,
        "m.room.message",
        json!({ "msgtype": "m.image", "body": "plan du marché.png", "url": mxc }),
    )
    .await;

    // A `joined` room Alice joins late: what was said before is not hers.
    let roads = create(
        s,
        &bob,
        json!({
            "preset": "public_chat", "name": "Équipe voirie",
            "initial_state": [{ "type": "m.room.history_visibility", "state_key": "",
                                "content": { "history_visibility": "joined" } }],
        }),
    )
    .await;
    send_text(s, &bob, &roads, "avant l'arrivée d'Alice").await;
    act(s, &alice, &roads, "join").await;
    send_text(s, &bob, &roads, "après l'arrivée d'Alice").await;

    // A room Alice left: nothing after her departure.
    let old_project = create(s, &alice, json!({ "preset": "public_chat", "name": "Ancien projet" })).await;
    act(s, &bob, &old_project, "join").await;
    send_text(s, &bob, &old_project, "avant le départ").await;
    act(s, &alice, &old_project, "leave").await;
    send_text(s, &bob, &old_project, "après le départ").await;

    // An encrypted room: the server stores ciphertext only.
    let secret_room = create(
        s,
        &alice,
        json!({
            "preset": "private_chat", "name": "Chiffré",
            "initial_state": [{ "type": "m.room.encryption", "state_key": "",
                                "content": { "algorithm": "m.megolm.v1.aes-sha2" } }],
        }),
    )
    .await;
    send(
        s,
        &alice,
        &secret_room,
        "m.room.encrypted",
        json!({ "algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgAEpABCIPHERTEXT", "device_id": alice.device_id,
                "sender_key": "SENDERKEY", "session_id": "SESSION" }),
    )
    .await;

    // Account data: settings are exported, secrets are not.
    account_data(s, &alice, "org.example.settings", json!({ "theme": "sombre" })).await;
    account_data(s, &alice, "m.secret_storage.default_key", json!({ "key": "KEYID-SECRET" })).await;
    account_data(
        s,
        &alice,
        "m.cross_signing.master",
        json!({ "encrypted": { "KEYID": { "iv": "IV", "ciphertext": "CROSS-SIGNING-CIPHERTEXT", "mac": "MAC" } } }),
    )
    .await;
    account_data(
        s,
        &alice,
        "com.example.hidden",
        json!({ "encrypted": { "KEYID": { "iv": "IV", "ciphertext": "OTHER-SECRET-CIPHERTEXT", "mac": "MAC" } } }),
    )
    .await;
    Scenario { alice, bob, admin, council, roads, old_project, secret_room, png, media_id }
}

fn unzip(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut z = zip::ZipArchive::new(Cursor::new(bytes)).expect("a valid zip archive");
    let mut out = BTreeMap::new();
    for i in 0..z.len() {
        let mut f = z.by_index(i).unwrap();
        let name = f.name().unwrap().into_owned();
        assert!(f.enclosed_name().is_some(), "unsafe path in the archive: {name}");
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        out.insert(name, data);
    }
    out
}

fn text(files: &BTreeMap<String, Vec<u8>>, name: &str) -> String {
    String::from_utf8(files.get(name).unwrap_or_else(|| panic!("{name} missing: {:?}", files.keys())).clone()).unwrap()
}

fn json_of(files: &BTreeMap<String, Vec<u8>>, name: &str) -> Value {
    serde_json::from_str(&text(files, name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The bodies of a room's exported events (`messages.json`).
fn bodies(room: &Value) -> Vec<String> {
    room["events"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
}

/// Everything Alice's archive must (and must not) hold.
fn check_archive(files: &BTreeMap<String, Vec<u8>>, sc: &Scenario, media_exported: bool) {
    let manifest = json_of(files, "manifest.json");
    assert_eq!(manifest["user_id"], sc.alice.user_id);
    assert_eq!(manifest["format"], "parvis-user-export");
    // Every file but the manifest is listed with its size and SHA-256, and they match.
    let listed = manifest["files"].as_array().unwrap();
    assert_eq!(listed.len(), files.len() - 1, "{listed:?} vs {:?}", files.keys());
    for f in listed {
        let data = &files[f["path"].as_str().unwrap()];
        assert_eq!(f["size"], data.len(), "{f}");
        assert_eq!(f["sha256"], hex::encode(Sha256::digest(data)), "{f}");
    }
    let rooms = manifest["rooms"].as_array().unwrap();
    let dir_of = |room_id: &str| {
        rooms.iter().find(|r| r["room_id"] == room_id).unwrap_or_else(|| panic!("{room_id} not exported"))["directory"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(rooms.len(), 4, "{rooms:?}");

    // Nothing secret anywhere in the archive.
    for (name, data) in files {
        let t = String::from_utf8_lossy(data);
        for secret in [
            sc.alice.token.as_str(),
            sc.bob.token.as_str(),
            sc.admin.token.as_str(),
            "$argon2",
            "KEYID-SECRET",
            "CROSS-SIGNING-CIPHERTEXT",
            "OTHER-SECRET-CIPHERTEXT",
        ] {
            assert!(!t.contains(secret), "{name} contains {secret}");
        }
    }
    let profile = json_of(files, "profile.json");
    assert_eq!(profile["user_id"], sc.alice.user_id);
    assert_eq!(profile["profile"]["displayname"], "Alice Martin");
    assert!(profile["devices"].as_array().unwrap().iter().any(|d| d["device_id"] == sc.alice.device_id), "{profile}");
    assert_eq!(profile["account_data"]["global"]["org.example.settings"]["theme"], "sombre", "{profile}");
    let withheld: Vec<&str> =
        profile["account_data_withheld"].as_array().unwrap().iter().map(|w| w["type"].as_str().unwrap()).collect();
    for t in ["m.secret_storage.default_key", "m.cross_signing.master", "com.example.hidden"] {
        assert!(withheld.contains(&t), "{t} not listed as withheld: {withheld:?}");
        assert!(profile["account_data"]["global"].get(t).is_none(), "{t} exported");
    }

    // The `shared` room: both users' messages; the injection escaped in HTML, verbatim in JSON.
    let dir = dir_of(&sc.council);
    assert!(dir.starts_with("rooms/Conseil-municipal-"), "{dir}");
    let council = json_of(files, &format!("{dir}/messages.json"));
    let b = bodies(&council);
    assert!(b.contains(&"Bonjour le conseil".to_owned()) && b.contains(&EVIL.to_owned()), "{b:?}");
    assert_eq!(council["event_count"], council["events"].as_array().unwrap().len());
    assert!(council["events"][0].get("room_id").is_some() && council["events"][0]["unsigned"].get("age").is_none());
    let html = text(files, &format!("{dir}/messages.html"));
    assert!(html.contains("&lt;script&gt;alert(&#39;xss&#39;)&lt;/script&gt; &amp; co"), "{html}");
    assert!(!html.contains("<script"), "{html}");
    assert!(html.contains("Conseil municipal") && html.contains("Alice Martin") && html.contains("Bonjour le conseil"));
    assert!(html.contains("(UTC+1)") || html.contains("(UTC+2)"), "times are labelled: {html}");

    // The uploaded image, byte for byte, linked from the page.
    let media_path = format!("media/{}-plan-du-marche.png", sc.media_id);
    if media_exported {
        assert_eq!(files.get(&media_path), Some(&sc.png), "{:?}", files.keys());
        assert!(html.contains(&format!("href=\"../../{media_path}\"")), "{html}");
        assert_eq!(manifest["media"][0]["path"], media_path);
        assert_eq!(manifest["media"][0]["sha256"], hex::encode(Sha256::digest(&sc.png)));
    } else {
        assert!(!files.contains_key(&media_path));
        let skipped = &manifest["media_skipped"][0];
        assert!(skipped["reason"].as_str().unwrap().contains("limit"), "{manifest}");
        assert!(skipped["mxc"].as_str().unwrap().ends_with(&sc.media_id));
        assert!(text(files, "index.html").contains("non inclus"));
    }

    // `joined`: nothing from before Alice's join.
    let dir = dir_of(&sc.roads);
    let roads = json_of(files, &format!("{dir}/messages.json"));
    assert_eq!(bodies(&roads), ["après l'arrivée d'Alice"]);
    let html = text(files, &format!("{dir}/messages.html"));
    assert!(!html.contains("avant l&#39;arrivée") && html.contains("après l&#39;arrivée"), "{html}");

    // The room Alice left: up to her departure, nothing after.
    let dir = dir_of(&sc.old_project);
    let old = json_of(files, &format!("{dir}/messages.json"));
    assert_eq!(bodies(&old), ["avant le départ"]);
    assert_eq!(old["room"]["membership"], "leave");
    let last = old["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["type"].as_str(), last["state_key"].as_str()), (Some("m.room.member"), Some(&*sc.alice.user_id)));
    let html = text(files, &format!("{dir}/messages.html"));
    assert!(html.contains("a quitté le salon") && !html.contains("après le départ"), "{html}");

    // The encrypted room: ciphertext as stored, and said so.
    let dir = dir_of(&sc.secret_room);
    let secret = json_of(files, &format!("{dir}/messages.json"));
    let enc_ev = secret["events"].as_array().unwrap().iter().find(|e| e["type"] == "m.room.encrypted").unwrap();
    assert_eq!(enc_ev["content"]["ciphertext"], "AwgAEpABCIPHERTEXT");
    assert_eq!(secret["room"]["encrypted"], true);
    let html = text(files, &format!("{dir}/messages.html"));
    assert!(html.contains("Salon chiffré de bout en bout") && html.contains("message chiffré"), "{html}");

    let index = text(files, "index.html");
    for r in rooms {
        assert!(index.contains(&format!("{}/messages.html", r["directory"].as_str().unwrap())), "{index}");
    }
}

async fn wait_done(s: &TestServer, admin: &User, user_id: &str, export_id: &str) -> Value {
    let path = format!("/_synapse/admin/v1/users/{}/export/{export_id}", enc(user_id));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (st, v) = s.get(&path, Some(&admin.token)).await;
        assert_eq!(st, 200, "{v}");
        match v["status"].as_str().unwrap() {
            "pending" | "running" => {}
            "done" => return v,
            _ => panic!("export failed: {v}"),
        }
        assert!(Instant::now() < deadline, "export not done: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn admin_api_export() {
    let s = TestServer::start().await;
    let sc = scenario(&s).await;
    let export_path = |u: &str| format!("/_synapse/admin/v1/users/{}/export", enc(u));

    // Admins only; local, existing users only.
    assert_err(&s.post(&export_path(&sc.bob.user_id), Some(&sc.alice.token), json!({})).await, 403, "M_FORBIDDEN");
    assert_err(&s.post(&export_path(&sc.bob.user_id), None, json!({})).await, 401, "M_MISSING_TOKEN");
    assert_err(&s.post(&export_path("@nobody:localhost"), Some(&sc.admin.token), json!({})).await, 404, "M_NOT_FOUND");
    assert_err(
        &s.post(&export_path("@alice:elsewhere.example"), Some(&sc.admin.token), json!({})).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(&s.post(&export_path("not-a-user"), Some(&sc.admin.token), json!({})).await, 400, "M_INVALID_PARAM");

    let (st, v) = s.post(&export_path(&sc.alice.user_id), Some(&sc.admin.token), json!({})).await;
    assert_eq!(st, 200, "{v}");
    let id = v["export_id"].as_str().unwrap().to_owned();
    let status_path = format!("{}/{id}", export_path(&sc.alice.user_id));
    assert_err(&s.get(&status_path, Some(&sc.alice.token)).await, 403, "M_FORBIDDEN");
    assert_err(&s.get(&format!("{status_path}/download"), Some(&sc.alice.token)).await, 403, "M_FORBIDDEN");
    // An export is looked up under its own user only.
    assert_err(
        &s.get(&format!("{}/{id}", export_path(&sc.bob.user_id)), Some(&sc.admin.token)).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.get(&format!("{}/nope", export_path(&sc.alice.user_id)), Some(&sc.admin.token)).await,
        404,
        "M_NOT_FOUND",
    );

    let done = wait_done(&s, &sc.admin, &sc.alice.user_id, &id).await;
    assert_eq!(done["requested_by"], sc.admin.user_id);
    assert_eq!(done["progress"]["rooms_total"], 4, "{done}");
    assert_eq!(done["progress"]["rooms_done"], 4, "{done}");
    assert_eq!(done["progress"]["media_files"], 1, "{done}");
    assert!(done["progress"]["events"].as_i64().unwrap() >= 10, "{done}");
    let week = 7 * 86_400_000;
    assert!((done["expires_ts"].as_i64().unwrap() - done["finished_ts"].as_i64().unwrap() - week).abs() < 1000);

    let resp =
        s.http.get(format!("{}{status_path}/download", s.base)).bearer_auth(&sc.admin.token).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/zip");
    let disposition = resp.headers()["content-disposition"].to_str().unwrap().to_owned();
    assert!(disposition.starts_with("attachment; filename=\"parvis-export-alice-"), "{disposition}");
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(Some(bytes.len() as i64), done["size_bytes"].as_i64());
    check_archive(&unzip(&bytes), &sc, true);
    // The archive is readable by the server's user only.
    let dir = s.state().config.records.export_dir(&s.state().config.media);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(format!("{id}.zip"))).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }

    // One export per user at a time, whichever instance started it; an interrupted job (no
    // heartbeat for minutes: its process died) no longer blocks.
    let db = &s.state().db;
    let now = parvis::storage::now_ms();
    assert!(
        parvis::storage::records::insert_export(db, "blocker", &sc.bob.user_id, &sc.admin.user_id, now).await.unwrap()
    );
    let busy = s.post(&export_path(&sc.bob.user_id), Some(&sc.admin.token), json!({})).await;
    assert_err(&busy, 409, "M_LIMIT_EXCEEDED");
    assert_eq!(busy.1["export_id"], "blocker");
    sqlx::query("UPDATE user_exports SET heartbeat_ts = $1 WHERE export_id = 'blocker'")
        .bind(now - 600_000)
        .execute(db)
        .await
        .unwrap();
    let (st, v) = s.post(&export_path(&sc.bob.user_id), Some(&sc.admin.token), json!({})).await;
    assert_eq!(st, 200, "{v}");
    let (_, blocker) = s.get(&format!("{}/blocker", export_path(&sc.bob.user_id)), Some(&sc.admin.token)).await;
    assert_eq!(blocker["status"], "failed", "{blocker}");
    assert!(blocker["error"].as_str().unwrap().contains("interrupted"), "{blocker}");
    let bob_done = wait_done(&s, &sc.admin, &sc.bob.user_id, v["export_id"].as_str().unwrap()).await;
    assert_eq!(bob_done["progress"]["media_files"], 0);
    // A finished export does not block the next one.
    let (st, v) = s.post(&export_path(&sc.alice.user_id), Some(&sc.admin.token), json!({})).await;
    assert_eq!(st, 200, "{v}");
    wait_done(&s, &sc.admin, &sc.alice.user_id, v["export_id"].as_str().unwrap()).await;

    // Expiry: the archive is deleted, the job stays as a record.
    sqlx::query("UPDATE user_exports SET expires_ts = $1 WHERE export_id = $2")
        .bind(now - 1)
        .bind(&id)
        .execute(db)
        .await
        .unwrap();
    parvis::records::jobs::sweep(s.state()).await;
    assert!(!dir.join(format!("{id}.zip")).exists());
    let (_, v) = s.get(&status_path, Some(&sc.admin.token)).await;
    assert_eq!(v["status"], "expired", "{v}");
    assert_err(&s.get(&format!("{status_path}/download"), Some(&sc.admin.token)).await, 404, "M_NOT_FOUND");
    // No partial file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    s.stop().await;
}

#[tokio::test]
async fn cli_export_user() {
    let s = TestServer::start().await;
    let sc = scenario(&s).await;
    let cfg = &s.state().config;
    let cli = || {
        let mut c = parvis();
        c.args(["export-user"])
            .env("PARVIS__DATABASE__URL", &cfg.database.url)
            .env("PARVIS__MEDIA__PATH", &cfg.media.path)
            .env("PARVIS__LOGGING__FILTER", "warn");
        c
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alice.zip");

    let run = cli().arg(&sc.alice.user_id).arg("--output").arg(&out).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("exported @alice:localhost") && stdout.contains("4 room(s)"), "{stdout}");
    assert!(stderr.contains("rooms 4/4"), "progress on stderr: {stderr}");
    let first = std::fs::read(&out).unwrap();
    check_archive(&unzip(&first), &sc, true);

    // An existing file is kept unless --force.
    let again = cli().arg(&sc.alice.user_id).arg("-o").arg(&out).output().unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("exists already") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), first);

    // --force replaces it; a media budget too small for the image leaves it out, and says so.
    let forced =
        cli().arg(&sc.alice.user_id).arg("-o").arg(&out).args(["--force", "--max-media-bytes", "10"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&forced.stdout);
    assert!(forced.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&forced.stderr));
    assert!(stdout.contains("1 skipped"), "{stdout}");
    check_archive(&unzip(&std::fs::read(&out).unwrap()), &sc, false);

    // Unknown, remote and invalid users; a directory that does not exist.
    for (user, msg) in [
        ("@ghost:localhost", "there is no user @ghost:localhost"),
        ("@alice:elsewhere.example", "is not a user of this server"),
        ("alice", "not a valid user ID"),
    ] {
        let r = cli().arg(user).arg("-o").arg(dir.path().join("x.zip")).output().unwrap();
        assert!(!r.status.success(), "{user}");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(msg), "{user}: {err}");
    }
    let r = cli().arg(&sc.alice.user_id).arg("-o").arg(dir.path().join("missing/x.zip")).output().unwrap();
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("cannot write") && err.contains("missing/x.zip"), "{err}");
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["alice.zip"], "nothing else is left behind");
    s.stop().await;
}

/// A room longer than a page of events (500) and than a buffered chunk of output, left by the
/// exported user: every event up to the departure, in order, nothing after.
#[tokio::test]
async fn long_room_is_read_in_pages() {
    let s = TestServer::start().await;
    let admin = s.register("archiviste", true).await;
    let alice = s.register("alice", false).await;
    let bob = s.register("bob", false).await;
    let room = create(&s, &alice, json!({ "preset": "public_chat", "name": "Long" })).await;
    act(&s, &bob, &room, "join").await;
    let n = 620;
    let bodies_sent: Vec<String> = (0..n).map(|i| format!("message {i:04} {}", "x".repeat(200))).collect();
    for chunk in bodies_sent.chunks(20) {
        let sends = chunk.iter().map(|b| send_text(&s, &bob, &room, b));
        futures_util::future::join_all(sends).await;
    }
    act(&s, &alice, &room, "leave").await;
    send_text(&s, &bob, &room, "after").await;

    let (st, v) = s
        .post(&format!("/_synapse/admin/v1/users/{}/export", enc(&alice.user_id)), Some(&admin.token), json!({}))
        .await;
    assert_eq!(st, 200, "{v}");
    let id = v["export_id"].as_str().unwrap();
    let done = wait_done(&s, &admin, &alice.user_id, id).await;
    let resp = s
        .http
        .get(format!("{}/_synapse/admin/v1/users/{}/export/{id}/download", s.base, enc(&alice.user_id)))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    let files = unzip(&resp.bytes().await.unwrap());
    let manifest = json_of(&files, "manifest.json");
    let dir = manifest["rooms"][0]["directory"].as_str().unwrap().to_owned();
    let exported = json_of(&files, &format!("{dir}/messages.json"));
    let events = exported["events"].as_array().unwrap();
    assert_eq!(done["progress"]["events"], events.len(), "{done}");
    assert!(events.len() > n, "{}", events.len());
    // The room's order (as `/messages` gives it to Bob, who saw everything), up to Alice's
    // departure included.
    let (st, timeline) = s.get(&room_path(&room, "messages?dir=f&limit=1000"), Some(&bob.token)).await;
    assert_eq!(st, 200);
    let ids = |v: &[Value]| v.iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    let all = ids(timeline["chunk"].as_array().unwrap());
    assert_eq!(ids(events), all[..all.len() - 1]);
    let mut got = bodies(&exported);
    assert_eq!(got.len(), n);
    got.sort();
    assert_eq!(got, bodies_sent);
    let last = events.last().unwrap();
    assert_eq!((last["type"].as_str(), last["sender"].as_str()), (Some("m.room.member"), Some(&*alice.user_id)));
    let html = text(&files, &format!("{dir}/messages.html"));
    assert_eq!(html.matches("<li ").count(), events.len());
    assert!(html.contains("message 0000") && html.contains("message 0619") && !html.contains(">after<"));
    assert!(html.trim_end().ends_with("</html>"));
    s.stop().await;
}

/// A job that cannot write its archive fails, and says why.
#[tokio::test]
async fn failed_export_reports_its_error() {
    let not_a_dir = tempfile::NamedTempFile::new().unwrap();
    let export_dir = not_a_dir.path().join("exports");
    let s = TestServer::start_with(|c| c.records.export_dir = Some(export_dir)).await;
    let admin = s.register("archiviste", true).await;
    let alice = s.register("alice", false).await;
    let path = format!("/_synapse/admin/v1/users/{}/export", enc(&alice.user_id));
    let (st, v) = s.post(&path, Some(&admin.token), json!({})).await;
    assert_eq!(st, 200, "{v}");
    let status_path = format!("{path}/{}", v["export_id"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let v = loop {
        let (_, v) = s.get(&status_path, Some(&admin.token)).await;
        if v["status"] == "failed" {
            break v;
        }
        assert!(Instant::now() < deadline && v["status"] != "done", "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(v["error"].as_str().unwrap().contains("cannot create the export directory"), "{v}");
    assert_err(&s.get(&format!("{status_path}/download"), Some(&admin.token)).await, 404, "M_NOT_FOUND");
    // A failed job does not block the next one.
    let (st, v) = s.post(&path, Some(&admin.token), json!({})).await;
    assert_eq!(st, 200, "{v}");
    s.stop().await;
}
