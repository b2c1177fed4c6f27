//! Real bot frameworks against the server: `tests/python/bots.py` runs an application service
//! on mautrix-python and a plain bot on matrix-nio (PyPI, installed by `.ci/run` into a venv
//! outside the clone: `${XDG_CACHE_HOME:-$HOME/.cache}/parvis-ci/venv`, or
//! `PARVIS_TEST_PYTHON`). Without them the test is skipped with a message, except in CI
//! (`CI` set), where it fails.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::process::Command;

use crate::common::*;

const AS_TOKEN: &str = "as_token_for_the_mautrix_test";
const HS_TOKEN: &str = "hs_token_for_the_mautrix_test";

fn python() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var("PARVIS_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => vec![p.into()],
        _ => {
            let cache = std::env::var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache")
            });
            vec![cache.join("parvis-ci/venv/bin/python")]
        }
    };
    let found = candidates.into_iter().find(|p| {
        std::process::Command::new(p)
            .args(["-c", "import mautrix.appservice, nio"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the bot framework test: .ci/run installs mautrix and matrix-nio into \
             ${{XDG_CACHE_HOME:-$HOME/.cache}}/parvis-ci/venv"
        );
        eprintln!(
            "SKIPPED: no Python with mautrix and matrix-nio. Install them with \
             `python3 -m venv ~/.cache/parvis-ci/venv && ~/.cache/parvis-ci/venv/bin/pip install mautrix matrix-nio` \
             (or set PARVIS_TEST_PYTHON)"
        );
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mautrix_appservice_and_nio_bot() {
    let Some(py) = python() else { return };
    // The appservice's port: chosen here, written into its registration.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let reg = format!(
        "id: mautrixtest\nurl: http://127.0.0.1:{port}\nas_token: {AS_TOKEN}\nhs_token: {HS_TOKEN}\n\
         sender_localpart: mautrixbot\nnamespaces:\n  users:\n    - exclusive: true\n      regex: '@mautrix_.*:localhost'\n\
         rate_limited: false\n"
    );
    let file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(file.path(), reg).unwrap();
    let path = file.path().to_owned();
    let s = TestServer::start_with(move |c| {
        c.appservices.registration_files = vec![path];
        c.appservices.retry_initial_ms = 100;
        c.appservices.retry_max_secs = 1;
    })
    .await;
    let human = s.register("agent", false).await;
    s.register("niobot", false).await;
    let room = create(&s, &human, json!({"preset": "public_chat", "name": "Bots"})).await;

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/bots.py");
    let started = Instant::now();
    let child = Command::new(&py)
        .arg(&script)
        .args([&s.base, &port.to_string(), AS_TOKEN, HS_TOKEN, &room, "niobot"])
        .env("PARVIS_PASSWORD", PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run python");
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .expect("the bot script finished within 3 minutes")
        .unwrap();
    let report = format!(
        "{} {}, {:.1} s\n--- stdout ---\n{}--- stderr ---\n{}",
        py.display(),
        script.display(),
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("PASSED"), "{report}");

    // The server's view: the nio bot's message and the masqueraded echo, by the right senders.
    let (_, m) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room)), Some(&human.token)).await;
    let msgs: Vec<(String, String)> = m["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| (e["sender"].as_str().unwrap().to_owned(), e["content"]["body"].as_str().unwrap_or("").to_owned()))
        .collect();
    assert!(msgs.contains(&("@niobot:localhost".into(), "ping from nio".into())), "{msgs:?}");
    assert!(msgs.contains(&("@mautrix_echo:localhost".into(), "echo: ping from nio".into())), "{msgs:?}");
    s.stop().await;
}
