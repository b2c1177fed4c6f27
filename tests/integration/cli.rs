//! The `parvis` binary as an operator runs it.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

pub(crate) fn parvis() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_parvis"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    // Nothing from the developer's environment may leak in.
    for (k, _) in std::env::vars() {
        if k.starts_with("PARVIS") {
            c.env_remove(k);
        }
    }
    c.env("PARVIS__AUTH__ARGON2_MEMORY_KIB", "64").env("PARVIS__AUTH__ARGON2_ITERATIONS", "1");
    c
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn version_flag() {
    let out = parvis().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("parvis {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_config_and_env_overrides() {
    let out = parvis()
        .args(["check-config", "--config", "config/parvis.toml"])
        .env("PARVIS__SERVER_NAME", "mairie.example")
        .env("PARVIS__DATABASE__URL", "postgres://parvis:hunter2@db.example:5432/parvis")
        .env("PARVIS__LISTEN__CLIENT", "0.0.0.0:9999")
        .env("PARVIS__REGISTRATION__SHARED_SECRET", "s3cr3t")
        .env("PARVIS__MEDIA__S3__SECRET_ACCESS_KEY", "0bj3ct-k3y")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    let shown: toml::Table = stdout.split_once('\n').unwrap().1.parse().unwrap();
    assert_eq!(shown["server_name"].as_str(), Some("mairie.example"));
    assert_eq!(shown["listen"]["client"].as_str(), Some("0.0.0.0:9999"));
    assert!(
        !stdout.contains("hunter2") && !stdout.contains("s3cr3t") && !stdout.contains("0bj3ct-k3y"),
        "secrets must be masked: {stdout}"
    );

    // A mistyped key in the environment names the variable.
    let out = parvis().args(["check-config"]).env("PARVIS__DATABASE__URI", "x").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("database.uri") && err.contains("PARVIS__DATABASE__URI"), "{err}");

    // A mistyped key in a file names the key and the file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "server_name = \"x.example\"\n[registration]\nenable = true\n").unwrap();
    let out = parvis().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("registration.enable") && err.contains("bad.toml"), "{err}");
    // A missing file is named too.
    let out = parvis().args(["check-config", "--config", "/nonexistent/parvis.toml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/parvis.toml"));
}

#[test]
fn generate_signing_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signing.key");
    let out = parvis().arg("generate-signing-key").arg("--output").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&path).unwrap();
    let key = parvis::keys::ServerKey::from_synapse_format(&text).unwrap();
    assert!(key.key_id.starts_with("ed25519:a_"));
    // Never overwrites a key.
    let out = parvis().arg("generate-signing-key").arg("--output").arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
}

pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) async fn wait_ready(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let http = reqwest::Client::new();
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{base}/_matrix/client/versions")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("server at {base} did not become ready");
}

fn sigterm_and_wait(p: &mut Proc) -> std::process::ExitStatus {
    let st = Command::new("kill").args(["-TERM", &p.0.id().to_string()]).status().unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn serve_creates_database_and_key_then_reuses_them() {
    // A database name that does not exist yet: the server must create it.
    let db_name = format!(
        "parvis_t_{}_{}_cli",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        std::process::id()
    );
    let db_url = format!("{}/{db_name}", pg_base_url());
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let start = || {
        Proc(
            parvis()
                .arg("serve")
                .env("PARVIS__DATABASE__URL", &db_url)
                .env("PARVIS__LISTEN__CLIENT", format!("127.0.0.1:{port}"))
                .env("PARVIS__LISTEN__METRICS", "127.0.0.1:0")
                .env("PARVIS__REGISTRATION__SHARED_SECRET", SHARED_SECRET)
                .env("PARVIS__LOGGING__FORMAT", "json")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    };
    let key_ids = || async {
        let pool = sqlx::PgPool::connect(&db_url).await.unwrap();
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT key_id FROM server_signing_keys").fetch_all(&pool).await.unwrap();
        pool.close().await;
        ids
    };

    let mut p = start();
    wait_ready(&base).await;
    let first = key_ids().await;
    assert_eq!(first.len(), 1);

    // Operator tools against the same database: create an admin, then log in over HTTP.
    let out = parvis()
        .args(["create-user", "--username", "maire", "--password", PASSWORD, "--admin"])
        .env("PARVIS__DATABASE__URL", &db_url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("@maire:localhost"));
    let out = parvis()
        .args(["create-user", "--username", "maire", "--password", PASSWORD])
        .env("PARVIS__DATABASE__URL", &db_url)
        .output()
        .unwrap();
    assert!(!out.status.success(), "duplicate user must fail");
    assert!(String::from_utf8_lossy(&out.stderr).contains("M_USER_IN_USE"));
    let http = reqwest::Client::new();
    let login: serde_json::Value = http
        .post(format!("{base}/_matrix/client/v3/login"))
        .json(&json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "maire" }, "password": PASSWORD }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(login["user_id"], "@maire:localhost", "{login}");

    // Graceful stop on SIGTERM, with a JSON log line for the request span.
    let status = sigterm_and_wait(&mut p);
    assert!(status.success(), "{status:?}");
    let mut logs = String::new();
    use std::io::Read;
    p.0.stderr.take().unwrap().read_to_string(&mut logs).unwrap();
    assert!(logs.lines().any(|l| l.starts_with('{') && l.contains("shutting down")), "{logs}");

    // Second start: same database, same key.
    let mut p = start();
    wait_ready(&base).await;
    assert_eq!(key_ids().await, first);
    assert!(sigterm_and_wait(&mut p).success());

    // `migrate` alone, on yet another new database.
    let db2 = format!("{db_name}_m");
    let out =
        parvis().arg("migrate").env("PARVIS__DATABASE__URL", format!("{}/{db2}", pg_base_url())).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop_database(&db2).await;
    drop_database(&db_name).await;
}

#[tokio::test]
async fn server_name_cannot_change() {
    let (db_url, db_name) = fresh_database().await;
    let ok = parvis().arg("migrate").env("PARVIS__DATABASE__URL", &db_url).output().unwrap();
    assert!(ok.status.success());
    let out = parvis()
        .arg("migrate")
        .env("PARVIS__DATABASE__URL", &db_url)
        .env("PARVIS__SERVER_NAME", "other.example")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server name cannot change"));
    drop_database(&db_name).await;
}

#[tokio::test]
async fn load_tool_smoke_run() {
    let s = TestServer::start().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_parvis-bench"))
        .args(["--url", &s.base, "--shared-secret", SHARED_SECRET, "--json", "smoke"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let reports: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let names: Vec<&str> = reports.iter().map(|r| r["scenario"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "login",
            "whoami",
            "send/2r",
            "incremental-sync",
            "fanout/3",
            "initial-sync",
            "initial-sync/lazy",
            "join-storm/5",
            "create-rooms",
            "mixed/4",
            "mixed",
            "search/send",
            "search/common",
            "search/rare",
            "search/two-words",
            "search/no-accent"
        ]
    );
    // The search scenario finds what it sent (60 generated messages hold « réunion » often).
    assert_eq!(reports[11]["messages"], 60, "{}", reports[11]);
    assert!(reports[12]["results_per_query"].as_u64().unwrap() > 0, "{}", reports[12]);
    assert_eq!(reports[12]["results_per_query"], reports[15]["results_per_query"], "accents do not matter");
    for r in &reports {
        assert_eq!(r["errors"], 0, "{r}");
        assert!(r["requests"].as_u64().unwrap() > 0, "{r}");
    }
    assert_eq!(reports[4]["deliveries"], 15, "3 receivers x 5 messages: {}", reports[4]);
    assert_eq!(reports[5]["rooms"], 3);
    assert_eq!(reports[2]["scenario"], "send/2r");
    assert_eq!(reports[2]["requests"], 40);
    assert_eq!(reports[2]["errors"], 0);
    assert_eq!(reports[1]["scenario"], "whoami");
    assert_eq!(reports[1]["requests"], 200);
    assert_eq!(reports[1]["errors"], 0);
    assert_eq!(reports[3]["requests"], 200);
    assert!(reports[2]["p95_ms"].as_f64().unwrap() > 0.0, "{}", reports[2]);
    // Every joiner ends up in the room, with its creator.
    assert_eq!(reports[7]["members_after"], 6, "{}", reports[7]);
    assert_eq!(reports[8]["requests"], 10);
    // The office-day step: 4 agents in 2 rooms, messages delivered, a summary with the ramp.
    assert_eq!(reports[9]["agents"], 4, "{}", reports[9]);
    assert!(reports[9]["sends"].as_u64().unwrap() > 0, "{}", reports[9]);
    assert!(reports[9]["deliveries"].as_u64().unwrap() > 0, "{}", reports[9]);
    assert_eq!(reports[10]["steps"].as_array().unwrap().len(), 1, "{}", reports[10]);
    s.stop().await;
}
