//! The server driven by matrix-js-sdk, the engine of Element Web, with its Rust crypto
//! (`@matrix-org/matrix-sdk-crypto-wasm`): `tests/js/e2ee.mjs` runs under Node.js against a real
//! Parvis. The JavaScript dependencies are pinned in `tests/js/package-lock.json` and installed
//! with `npm ci --prefix tests/js` (`.ci/run` does it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use crate::common::*;

/// Longer than the script's own overall timeout (240 s), which reports where it was stuck.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("js")
}

/// The Node.js the lockfile pins (`node-linux-*` packages: matrix-js-sdk needs Node 22), else the
/// one on the `PATH`.
fn node_binary(js: &Path) -> PathBuf {
    let pinned = js.join("node_modules").join(".bin").join("node");
    if pinned.exists() { pinned } else { PathBuf::from("node") }
}

/// Collects a child's output stream line by line.
fn collect(stream: impl AsyncRead + Unpin + Send + 'static, into: Arc<Mutex<String>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut s = into.lock();
            s.push_str(&line);
            s.push('\n');
        }
    })
}

/// Two Element Web users (matrix-js-sdk with Rust crypto, lazy-loaded members) in an encrypted
/// private room and an encrypted DM, cross-signing, secret storage, key backup, and a second
/// device of the first user that restores the history from the backup. The script asserts every
/// step, including that the SDK's `GET /rooms/{id}/members?not_membership=leave&at=<token>`
/// requests were answered 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn element_web_e2ee_with_js_sdk() {
    let js = js_dir();
    assert!(
        js.join("node_modules").join("matrix-js-sdk").is_dir()
            && js.join("node_modules").join("@matrix-org").join("matrix-sdk-crypto-wasm").is_dir(),
        "{}/node_modules is missing or incomplete: install the JavaScript test dependencies with \
         `npm ci --prefix tests/js` (needs Node.js >= 20 and npm; .ci/run does it)",
        js.display()
    );

    let s = TestServer::start().await;
    let a = s.register("agent.js.a", false).await;
    s.register("agent.js.b", false).await;

    let node = node_binary(&js);
    let started = Instant::now();
    let mut child = Command::new(&node)
        .arg("e2ee.mjs")
        .arg(&s.base)
        .arg("agent.js.a")
        .arg("agent.js.b")
        .env("PARVIS_PASSWORD", PASSWORD)
        .current_dir(&js)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {} (Node.js >= 22 is needed): {e}", node.display()));
    let stdout = Arc::new(Mutex::new(String::new()));
    let stderr = Arc::new(Mutex::new(String::new()));
    let out_task = collect(child.stdout.take().unwrap(), stdout.clone());
    let err_task = collect(child.stderr.take().unwrap(), stderr.clone());

    let status = match tokio::time::timeout(SCRIPT_TIMEOUT, child.wait()).await {
        Ok(status) => Some(status.expect("wait for node")),
        Err(_) => {
            let _ = child.kill().await;
            None
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = out_task.await;
        let _ = err_task.await;
    })
    .await;
    let (stdout, stderr) = (stdout.lock().clone(), stderr.lock().clone());
    let report = format!(
        "node {} e2ee.mjs, {:.1} s\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
        node.display(),
        started.elapsed().as_secs_f64()
    );
    match status {
        None => panic!("the js-sdk script did not finish within {SCRIPT_TIMEOUT:?} and was killed\n{report}"),
        Some(st) if !st.success() => panic!("the js-sdk script failed ({st})\n{report}"),
        Some(_) => println!("{report}"),
    }
    assert!(stdout.contains("PASSED"), "the script reported success\n{report}");

    // The server's own view afterwards: A has two devices and the backup holds the four room keys
    // of the two rooms (A's and B's megolm sessions in each).
    let (st, devices) = s.get("/_matrix/client/v3/devices", Some(&a.token)).await;
    assert_eq!(st, 200, "{devices}");
    assert_eq!(devices["devices"].as_array().unwrap().len(), 3, "registration + two js-sdk logins: {devices}");
    let (st, backup) = s.get("/_matrix/client/v3/room_keys/version", Some(&a.token)).await;
    assert_eq!(st, 200, "{backup}");
    assert!(backup["count"].as_i64().unwrap() >= 4, "{backup}");
    s.stop().await;
}
