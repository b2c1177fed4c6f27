//! Test harness: real Parvis servers on ephemeral ports, each with its own PostgreSQL database
//! cloned from a migrated template (cloning takes milliseconds; migrating every time would not).
//!
//! `PARVIS_TEST_DATABASE_URL` points at the PostgreSQL server (default: local trust auth).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parvis::config::{Config, RateLimit};
use parvis::server::{self, RunningServer};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection};

pub const SHARED_SECRET: &str = "test-shared-secret";
pub const PASSWORD: &str = "correct horse battery";

pub fn pg_base_url() -> String {
    std::env::var("PARVIS_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

fn admin_url() -> String {
    format!("{}/postgres", pg_base_url())
}

/// Name of the template database for the current migrations (hash of their contents), created
/// once, under an advisory lock so that concurrent test processes agree.
async fn template_db() -> String {
    let mut h = Sha256::new();
    for m in parvis::storage::MIGRATOR.iter() {
        h.update(m.version.to_le_bytes());
        h.update(&*m.checksum);
    }
    let name = format!("parvis_tpl_{}", &hex::encode(h.finalize())[..16]);
    let mut admin = PgConnection::connect(&admin_url()).await.expect("PostgreSQL is reachable");
    sqlx::query("SELECT pg_advisory_lock(7061727669730002)").execute(&mut admin).await.unwrap();
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    if !exists {
        sweep_stale(&mut admin).await;
        let building = format!("{name}_build");
        exec(&mut admin, &format!("DROP DATABASE IF EXISTS \"{building}\" WITH (FORCE)")).await;
        exec(&mut admin, &format!("CREATE DATABASE \"{building}\" TEMPLATE template0 ENCODING 'UTF8'")).await;
        let pool = sqlx::PgPool::connect(&format!("{}/{building}", pg_base_url())).await.unwrap();
        parvis::storage::migrate(&pool).await.unwrap();
        pool.close().await;
        exec(&mut admin, &format!("ALTER DATABASE \"{building}\" RENAME TO \"{name}\"")).await;
    }
    sqlx::query("SELECT pg_advisory_unlock(7061727669730002)").execute(&mut admin).await.unwrap();
    admin.close().await.ok();
    name
}

async fn exec(conn: &mut PgConnection, sql: &str) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).execute(conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Drops databases left behind by crashed test runs (older than an hour). Templates are kept:
/// another checkout with other migrations (another branch) may be using its own right now.
async fn sweep_stale(admin: &mut PgConnection) {
    let names: Vec<String> = sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'parvis\\_t\\_%'")
        .fetch_all(&mut *admin)
        .await
        .unwrap_or_default();
    let now = now_secs();
    for n in names {
        let created = n.strip_prefix("parvis_t_").and_then(|r| r.split('_').next()).and_then(|t| t.parse::<u64>().ok());
        if created.is_some_and(|ts| ts + 3600 < now) {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{n}\" WITH (FORCE)")))
                .execute(&mut *admin)
                .await;
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A fresh database cloned from the template. Returns its URL.
pub async fn fresh_database() -> (String, String) {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let template = template_db().await;
    let name = format!("parvis_t_{}_{}_{}", now_secs(), std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    // CREATE DATABASE ... TEMPLATE fails while another session is connected to the template
    // (55006); that is only ever momentary here, so retry.
    for attempt in 0.. {
        match sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\" TEMPLATE \"{template}\"")))
            .execute(&mut admin)
            .await
        {
            Ok(_) => break,
            Err(e) if attempt < 50 => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot create test database: {e}"),
        }
    }
    admin.close().await.ok();
    (format!("{}/{name}", pg_base_url()), name)
}

pub async fn drop_database(name: &str) {
    if let Ok(mut admin) = PgConnection::connect(&admin_url()).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")))
            .execute(&mut admin)
            .await;
    }
}

/// The configuration tests start from: ephemeral ports, cheap argon2, no rate limits.
pub fn test_config(db_url: &str) -> Config {
    let mut c = Config { server_name: "localhost".into(), ..Default::default() };
    c.listen.client = "127.0.0.1:0".parse().unwrap();
    c.listen.metrics = Some("127.0.0.1:0".parse().unwrap());
    c.database.url = db_url.into();
    c.database.max_connections = 8;
    c.database.min_connections = 0;
    c.database.create_if_missing = false;
    c.registration.shared_secret = Some(SHARED_SECRET.into());
    c.auth.argon2_memory_kib = 64;
    c.auth.argon2_iterations = 1;
    c.rate_limits.enabled = false;
    // Media content of each server in a directory of its own, removed by `stop()`.
    let db_name = db_url.rsplit('/').next().unwrap_or("parvis");
    c.media.path = std::env::temp_dir().join("parvis-test-media").join(db_name);
    c
}

/// `https` when the federation listener has a certificate, else `http`.
fn federation_scheme(config: &Config) -> &'static str {
    if config.federation.tls_certificate.is_some() { "https" } else { "http" }
}

pub fn rate(per_second: f64, burst: u32) -> RateLimit {
    RateLimit { per_second, burst }
}

pub struct TestServer {
    pub base: String,
    pub metrics: String,
    /// The federation listener, when the test configured `listen.federation`.
    pub federation: Option<String>,
    db_name: String,
    config: Config,
    running: Option<RunningServer>,
    pub http: reqwest::Client,
    media_dir: std::path::PathBuf,
}

/// A logged-in user.
#[derive(Clone, Debug)]
pub struct User {
    pub user_id: String,
    pub token: String,
    pub device_id: String,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let (db_url, db_name) = fresh_database().await;
        let mut config = test_config(&db_url);
        adjust(&mut config);
        let media_dir = config.media.path.clone();
        let state = server::prepare(config.clone()).await.expect("server prepares");
        let running = server::start(state).await.expect("server starts");
        Self {
            base: format!("http://{}", running.client_addr),
            metrics: format!("http://{}", running.metrics_addr.expect("metrics listener")),
            federation: running.federation_addr.map(|a| format!("{}://{a}", federation_scheme(&config))),
            config,

            db_name,
            running: Some(running),
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
            media_dir,
        }
    }

    /// Another instance on this server's database (same configuration, its own listeners),
    /// adjusted by `adjust`. Stop it before this one (which drops the database).
    pub async fn peer(&self, adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = self.config.clone();
        config.listen.client = "127.0.0.1:0".parse().unwrap();
        config.listen.metrics = Some("127.0.0.1:0".parse().unwrap());
        config.listen.federation = None;
        adjust(&mut config);
        let state = server::prepare(config.clone()).await.expect("peer prepares");
        let running = server::start(state).await.expect("peer starts");
        Self {
            base: format!("http://{}", running.client_addr),
            metrics: format!("http://{}", running.metrics_addr.expect("metrics listener")),
            federation: None,
            config,
            db_name: String::new(),
            running: Some(running),
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
            media_dir: self.media_dir.clone(),
        }
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("clean shutdown");
        }
        if self.db_name.is_empty() {
            // A peer: the first instance owns the database and the media directory.
            return;
        }
        drop_database(&self.db_name).await;
        if self.media_dir.starts_with(std::env::temp_dir()) {
            let _ = std::fs::remove_dir_all(&self.media_dir);
        }
    }

    /// Stops the server (gracefully), runs `during` while it is down, and starts it again on the
    /// same database and configuration.
    pub async fn restart_after<F: Future<Output = ()>>(&mut self, during: impl FnOnce() -> F) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("clean shutdown");
        }
        during().await;
        let state = server::prepare(self.config.clone()).await.expect("server prepares");
        let running = server::start(state).await.expect("server starts");
        self.base = format!("http://{}", running.client_addr);
        self.metrics = format!("http://{}", running.metrics_addr.expect("metrics listener"));
        self.federation = running.federation_addr.map(|a| format!("{}://{a}", federation_scheme(&self.config)));
        self.running = Some(running);
    }

    /// Stops the server (gracefully) and starts a new one on the same database and configuration,
    /// after `pause` (time passes while no server runs). Addresses change.
    pub async fn restart(&mut self, pause: Duration) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("clean shutdown");
        }
        tokio::time::sleep(pause).await;
        let state = server::prepare(self.config.clone()).await.expect("server prepares");
        let running = server::start(state).await.expect("server starts");
        self.base = format!("http://{}", running.client_addr);
        self.metrics = format!("http://{}", running.metrics_addr.expect("metrics listener"));
        self.federation = running.federation_addr.map(|a| format!("{}://{a}", federation_scheme(&self.config)));
        self.running = Some(running);
    }

    pub fn state(&self) -> &parvis::state::AppState {
        &self.running.as_ref().unwrap().state
    }

    /// Sends a request; returns the status and the JSON body (Null if the body is not JSON).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.expect("request sent");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.request(Method::GET, path, token, None).await
    }
    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.request(Method::POST, path, token, Some(body)).await
    }
    pub async fn put(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.request(Method::PUT, path, token, Some(body)).await
    }
    pub async fn delete(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.request(Method::DELETE, path, token, Some(body)).await
    }

    /// Creates a user with Synapse-style shared-secret registration and returns its session.
    pub async fn register(&self, localpart: &str, admin: bool) -> User {
        let (_, n) = self.get("/_synapse/admin/v1/register", None).await;
        let nonce = n["nonce"].as_str().expect("nonce").to_owned();
        let mac = parvis::api::admin::register::compute_mac(SHARED_SECRET, &nonce, localpart, PASSWORD, admin, None);
        let (status, body) = self
            .post(
                "/_synapse/admin/v1/register",
                None,
                json!({ "nonce": nonce, "username": localpart, "password": PASSWORD, "admin": admin, "mac": mac }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        user_from(&body)
    }

    /// Password login.
    pub async fn login(&self, localpart: &str, password: &str, extra: Value) -> (StatusCode, Value) {
        let mut body = json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": localpart },
            "password": password,
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        self.post("/_matrix/client/v3/login", None, body).await
    }
}

pub fn user_from(body: &Value) -> User {
    User {
        user_id: body["user_id"].as_str().expect("user_id").into(),
        token: body["access_token"].as_str().expect("access_token").into(),
        device_id: body["device_id"].as_str().expect("device_id").into(),
    }
}

/// Asserts a Matrix error response.
#[track_caller]
pub fn assert_err(resp: &(StatusCode, Value), status: u16, errcode: &str) {
    assert_eq!(resp.0.as_u16(), status, "unexpected status, body: {}", resp.1);
    assert_eq!(resp.1["errcode"], errcode, "unexpected errcode, body: {}", resp.1);
    assert!(resp.1["error"].is_string(), "error message missing: {}", resp.1);
}

/// Percent-encodes a path segment (room IDs, aliases and event IDs contain `!`, `#`, `$`, `:`).
pub fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Creates a room; returns its ID.
pub async fn create(s: &TestServer, u: &User, body: Value) -> String {
    let (st, v) = s.post("/_matrix/client/v3/createRoom", Some(&u.token), body).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["room_id"].as_str().unwrap().to_owned()
}
