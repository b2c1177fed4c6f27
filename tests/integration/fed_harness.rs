//! The federation test harness (issue 13): a test CA, Parvis servers with a TLS federation
//! listener, and real Synapse peers, all on loopback with server names that are IP literals with
//! explicit ports (`127.0.0.1:<port>`), so that nothing needs DNS.
//!
//! - [`Ca`] issues certificates for 127.0.0.1; [`start`] runs a Parvis named `127.0.0.1:<port>`
//!   whose federation listener speaks TLS with a certificate of that CA; [`https_client`] and
//!   [`send`] talk to any of them.
//! - [`Synapse::start`] runs `python -m synapse.app.homeserver` on its own PostgreSQL database
//!   (UTF8, C collation) with a TLS listener (client and federation) from the test CA, loopback
//!   destinations allowed, rate limits lifted; it is killed, and its database dropped, on drop.
//!   [`synapse_python`] finds Synapse: a test that needs it skips with a message when it is
//!   absent, except in CI (`CI` or `PARVIS_TEST_SYNAPSE_PYTHON` set), where it fails.
//! - [`ClientApi`] is the client-server API of either server (`get`/`post`/`put` with an optional
//!   bearer token, answering `(status, json)`), with [`sync_until`] and [`wait_for_room_event`]
//!   polling `/sync` until a predicate holds.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use ruma::{OwnedServerName, ServerName};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::common::{TestServer, enc, pg_base_url};

/// A test CA that issues certificates for 127.0.0.1.
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    /// The CA certificate (PEM), to trust.
    pub pem: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("Parvis test CA {name}"));
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem, issuer.pem()).unwrap();
        Self { issuer, pem }
    }

    /// Writes a certificate for 127.0.0.1 and its PKCS#8 key; returns their paths.
    pub fn issue(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.issuer).unwrap();
        let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// The CA's private key (PEM, PKCS#8), for tools that sign certificates themselves
    /// (Complement's image gets its CA as `ca.crt` + `ca.key`).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A Parvis federating over TLS, named `127.0.0.1:<port of its federation listener>`.
pub struct Fed {
    pub server: TestServer,
    pub name: OwnedServerName,
}

/// A server named `127.0.0.1:<port>` whose federation listener is on that port, over TLS with a
/// certificate of `cert_ca`, trusting `trust` for outgoing requests.
pub async fn start(
    dir: &Path,
    label: &str,
    cert_ca: &Ca,
    trust: &Ca,
    adjust: impl FnOnce(&mut parvis::config::Config),
) -> Fed {
    let port = free_port();
    let (cert, key) = cert_ca.issue(dir, label);
    let name = format!("127.0.0.1:{port}");
    let server = TestServer::start_with(|c| {
        c.server_name = name.clone();
        c.listen.federation = Some(format!("127.0.0.1:{port}").parse().unwrap());
        c.federation.tls_certificate = Some(cert);
        c.federation.tls_private_key = Some(key);
        c.federation.ca_file = Some(trust.pem.clone());
        adjust(c);
    })
    .await;
    assert_eq!(server.federation.as_deref(), Some(format!("https://{name}").as_str()));
    Fed { server, name: ServerName::parse(&name).unwrap() }
}

/// An HTTPS client trusting only these CAs.
pub fn https_client(cas: &[&Ca]) -> reqwest::Client {
    let certs = cas.iter().map(|ca| reqwest::Certificate::from_pem(&std::fs::read(&ca.pem).unwrap()).unwrap());
    reqwest::Client::builder().tls_certs_only(certs).timeout(Duration::from_secs(60)).build().unwrap()
}

/// A request to `https://<to><uri>` with an optional `Authorization` header (e.g. `X-Matrix`);
/// returns the status and the JSON body (Null when it is not JSON).
pub async fn send(
    http: &reqwest::Client,
    to: &ServerName,
    method: Method,
    uri: &str,
    authorization: Option<&str>,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut rb = http.request(method, format!("https://{to}{uri}"));
    if let Some(a) = authorization {
        rb = rb.header("authorization", a);
    }
    if let Some(b) = body {
        rb = rb.json(b);
    }
    let resp = rb.send().await.expect("request sent");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Whether the Synapse tests must run: in CI, or when the Synapse to use is named explicitly.
fn synapse_required() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("PARVIS_TEST_SYNAPSE_PYTHON").is_some()
}

/// The Python of a virtualenv with Synapse (and psycopg2): `PARVIS_TEST_SYNAPSE_PYTHON`, else
/// `${XDG_CACHE_HOME:-~/.cache}/parvis-bench/synapse-venv/bin/python`. `None` (the caller skips,
/// with this message printed) when it is missing, outside CI; in CI a missing Synapse panics.
pub fn synapse_python() -> Option<PathBuf> {
    let path = match std::env::var("PARVIS_TEST_SYNAPSE_PYTHON") {
        Ok(p) if !p.is_empty() => PathBuf::from(p),
        _ => std::env::var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache"))
            .join("parvis-bench/synapse-venv/bin/python"),
    };
    let ok = std::process::Command::new(&path)
        .args(["-c", "import synapse, psycopg2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(path);
    }
    assert!(
        !synapse_required(),
        "no Synapse at {} (`import synapse, psycopg2` fails), and CI or PARVIS_TEST_SYNAPSE_PYTHON requires it: \
         .ci/run installs it",
        path.display()
    );
    eprintln!(
        "SKIPPED: no Synapse at {}. Install it with `python3 -m venv ~/.cache/parvis-bench/synapse-venv && \
         ~/.cache/parvis-bench/synapse-venv/bin/pip install 'matrix-synapse[postgres]==1.163.2'` (or set \
         PARVIS_TEST_SYNAPSE_PYTHON)",
        path.display()
    );
    None
}

/// The shared secret of [`Synapse`]'s `/_synapse/admin/v1/register`.
pub const SYNAPSE_SHARED_SECRET: &str = "synapse-test-shared-secret";

/// Every Synapse rate limit lifted (the stock ones throttle tests), `rc_federation` included.
const SYNAPSE_NO_RATE_LIMITS: &str = r#"
rc_message: &unlimited {per_second: 1000000, burst_count: 1000000}
rc_registration: *unlimited
rc_registration_token_validity: *unlimited
rc_login: {address: *unlimited, account: *unlimited, failed_attempts: *unlimited}
rc_admin_redaction: *unlimited
rc_joins: {local: *unlimited, remote: *unlimited}
rc_joins_per_room: *unlimited
rc_3pid_validation: *unlimited
rc_invites: {per_room: *unlimited, per_user: *unlimited, per_issuer: *unlimited}
rc_third_party_invite: *unlimited
rc_media_create: *unlimited
rc_presence: {per_user: *unlimited}
rc_delayed_event_mgmt: *unlimited
rc_room_creation: *unlimited
rc_reports: *unlimited
rc_user_directory: *unlimited
rc_profile: *unlimited
rc_key_requests: *unlimited
rc_federation: {window_size: 1000, sleep_limit: 1000000, sleep_delay: 1, reject_limit: 1000000, concurrent: 1000}
"#;

/// A running Synapse on `127.0.0.1:<port>`: one TLS listener for the client and federation APIs,
/// a certificate of the test CA, its own PostgreSQL database. Killed, and its database dropped,
/// on drop.
pub struct Synapse {
    /// `127.0.0.1:<port>`, also the address of its listener.
    pub name: OwnedServerName,
    /// `https://127.0.0.1:<port>`.
    pub base: String,
    /// An HTTPS client trusting the CA of Synapse's certificate.
    pub http: reqwest::Client,
    /// Its configuration, keys, media and log (`synapse.log`).
    pub dir: PathBuf,
    /// Its PostgreSQL database.
    pub db_name: String,
    process: std::process::Child,
}

impl Synapse {
    /// Starts a Synapse whose certificate comes from `ca`, which trusts `trust_ca_pem` (a PEM
    /// bundle) for its outgoing federation requests, with its files in a new directory under
    /// `dir`; waits until it answers.
    pub async fn start(dir: &Path, ca: &Ca, trust_ca_pem: &Path) -> Self {
        Self::start_with(dir, ca, trust_ca_pem, "").await
    }

    /// [`Synapse::start`] with more configuration: `extra_yaml` is appended to the generated
    /// `homeserver.yaml` (a key given there replaces the generated one: the last one wins).
    pub async fn start_with(dir: &Path, ca: &Ca, trust_ca_pem: &Path, extra_yaml: &str) -> Self {
        let python = synapse_python().expect("Synapse is installed (check synapse_python() first)");
        let port = free_port();
        let name = ServerName::parse(format!("127.0.0.1:{port}")).unwrap();
        let dir = dir.join(format!("synapse-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = ca.issue(&dir, "synapse-tls");
        let db_name = create_synapse_database().await;
        let db = url::Url::parse(&pg_base_url()).expect("PARVIS_TEST_DATABASE_URL is a URL");
        let d = dir.display();
        let config = format!(
            r#"server_name: "{name}"
pid_file: "{d}/synapse.pid"
report_stats: false
listeners:
  - port: {port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: true
    x_forwarded: false
    resources:
      - names: [client, federation]
        compress: false
tls_certificate_path: "{cert}"
tls_private_key_path: "{key}"
database:
  name: psycopg2
  args:
    user: "{db_user}"
    password: "{db_password}"
    host: "{db_host}"
    port: {db_port}
    database: "{db_name}"
    cp_min: 1
    cp_max: 5
media_store_path: "{d}/media"
signing_key_path: "{d}/synapse.signing.key"
enable_registration: false
registration_shared_secret: "{SYNAPSE_SHARED_SECRET}"
trusted_key_servers: []
suppress_key_server_warning: true
federation_verify_certificates: true
federation_custom_ca_list: ["{trust}"]
# Synapse blocks IP-literal server names in its blocklist whatever the allowlist says: empty it,
# and allow loopback destinations.
ip_range_blacklist: []
ip_range_whitelist: ["127.0.0.0/8"]
allow_public_rooms_over_federation: true
presence:
  enabled: true
{SYNAPSE_NO_RATE_LIMITS}
{extra_yaml}
"#,
            cert = cert.display(),
            key = key.display(),
            trust = trust_ca_pem.display(),
            db_user = if db.username().is_empty() { "postgres" } else { db.username() },
            db_password = db.password().unwrap_or(""),
            db_host = db.host_str().unwrap_or("127.0.0.1"),
            db_port = db.port().unwrap_or(5432),
        );
        let config_path = dir.join("homeserver.yaml");
        std::fs::write(&config_path, config).unwrap();
        let keys = tokio::process::Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(&config_path)
            .arg("--generate-keys")
            .output()
            .await
            .unwrap();
        assert!(keys.status.success(), "synapse --generate-keys failed: {}", String::from_utf8_lossy(&keys.stderr));
        let log = std::fs::File::create(dir.join("synapse.log")).unwrap();
        let process = std::process::Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(&config_path)
            .current_dir(&dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut synapse =
            Self { base: format!("https://{name}"), name, http: https_client(&[ca]), dir, db_name, process };
        // Up once the client API answers (a fresh database is migrated first: some seconds).
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = synapse.http.get(format!("{}/_matrix/client/versions", synapse.base)).send().await;
            if r.is_ok_and(|r| r.status() == StatusCode::OK) {
                break;
            }
            assert!(synapse.process.try_wait().unwrap().is_none(), "Synapse exited:\n{}", synapse.log());
            assert!(Instant::now() < deadline, "Synapse did not start in 120 s:\n{}", synapse.log());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        synapse
    }

    /// Synapse's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("synapse.log")).unwrap_or_default()
    }

    /// Its last `lines` log lines (for assertion messages that should stay readable).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Creates a user through the shared-secret admin API (HMAC-SHA1 over nonce, user, password
    /// and `notadmin`); returns its user ID and access token.
    pub async fn register(&self, user: &str, password: &str) -> (String, String) {
        let (st, n) = self.get("/_synapse/admin/v1/register", None).await;
        assert_eq!(st, StatusCode::OK, "{n}");
        let nonce = n["nonce"].as_str().expect("nonce");
        let mac = parvis::api::admin::register::compute_mac(SYNAPSE_SHARED_SECRET, nonce, user, password, false, None);
        let body = json!({ "nonce": nonce, "username": user, "password": password, "admin": false, "mac": mac });
        let (st, r) = self.post("/_synapse/admin/v1/register", None, body).await;
        assert_eq!(st, StatusCode::OK, "{r}\n{}", self.log_tail(30));
        (r["user_id"].as_str().unwrap().to_owned(), r["access_token"].as_str().unwrap().to_owned())
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        // Drop is synchronous and may run inside the test's runtime: a thread of its own.
        let name = std::mem::take(&mut self.db_name);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(crate::common::drop_database(&name));
        })
        .join();
    }
}

/// A database for Synapse: UTF8 with C collation from template0 (it refuses anything else), named
/// like the other test databases so that a crashed run's leftovers are swept.
async fn create_synapse_database() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let name = format!("parvis_t_{secs}_{}_synapse_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut admin = PgConnection::connect(&format!("{}/postgres", pg_base_url())).await.expect("PostgreSQL");
    let sql = format!("CREATE DATABASE \"{name}\" ENCODING 'UTF8' LC_COLLATE='C' LC_CTYPE='C' TEMPLATE template0");
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await.expect("Synapse's database");
    admin.close().await.ok();
    name
}

/// The client-server API of a server under test (Parvis or Synapse): requests with an optional
/// bearer token, answering the status and the JSON body (Null when it is not JSON).
pub trait ClientApi {
    fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> impl Future<Output = (StatusCode, Value)>;

    fn get(&self, path: &str, token: Option<&str>) -> impl Future<Output = (StatusCode, Value)> {
        self.request(Method::GET, path, token, None)
    }
    fn post(&self, path: &str, token: Option<&str>, body: Value) -> impl Future<Output = (StatusCode, Value)> {
        self.request(Method::POST, path, token, Some(body))
    }
    fn put(&self, path: &str, token: Option<&str>, body: Value) -> impl Future<Output = (StatusCode, Value)> {
        self.request(Method::PUT, path, token, Some(body))
    }
}

impl ClientApi for Synapse {
    async fn request(
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
        let resp = rb.send().await.expect("request sent to Synapse");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

impl ClientApi for TestServer {
    async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        TestServer::request(self, method, path, token, body).await
    }
}

/// A sync filter that lazy-loads members: with it, Synapse shows a room joined over federation
/// ("faster joins") before its state is complete.
pub const LAZY_MEMBERS_FILTER: &str = r#"{"room":{"state":{"lazy_load_members":true}}}"#;

/// Polls `/sync` (an initial sync, then incremental ones) until `pred` holds for a response, and
/// returns that response; panics after `timeout`.
pub async fn sync_until(
    server: &impl ClientApi,
    token: &str,
    filter: Option<&str>,
    timeout: Duration,
    mut pred: impl FnMut(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    let mut since: Option<String> = None;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let mut path = "/_matrix/client/v3/sync?timeout=1000".to_owned();
        if let Some(s) = &since {
            path.push_str(&format!("&since={}", enc(s)));
        }
        if let Some(f) = filter {
            path.push_str(&format!("&filter={}", enc(f)));
        }
        let (st, body) = server.get(&path, Some(token)).await;
        if st == StatusCode::OK {
            if pred(&body) {
                return body;
            }
            since = body["next_batch"].as_str().map(str::to_owned).or(since);
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        last = body;
    }
    panic!("sync predicate not met within {timeout:?}; last response: {last}");
}

/// Polls `/sync` until an event of room `room_id` satisfies `pred` (in the timeline, state,
/// ephemeral, account data, invite or knock state of the room, whatever its membership) and
/// returns that event; panics after `timeout`.
pub async fn wait_for_room_event(
    server: &impl ClientApi,
    token: &str,
    room_id: &str,
    timeout: Duration,
    mut pred: impl FnMut(&Value) -> bool,
) -> Value {
    let mut found = Value::Null;
    sync_until(server, token, Some(LAZY_MEMBERS_FILTER), timeout, |sync| {
        match room_events(sync, room_id).find(|e| pred(e)) {
            Some(e) => {
                found = e.clone();
                true
            }
            None => false,
        }
    })
    .await;
    found
}

/// Every event of `room_id` in a sync response.
pub fn room_events<'a>(sync: &'a Value, room_id: &'a str) -> impl Iterator<Item = &'a Value> {
    const SECTIONS: [(&str, &str); 7] = [
        ("join", "timeline"),
        ("join", "state"),
        ("join", "ephemeral"),
        ("join", "account_data"),
        ("leave", "timeline"),
        ("invite", "invite_state"),
        ("knock", "knock_state"),
    ];
    SECTIONS.into_iter().flat_map(move |(membership, section)| {
        sync["rooms"][membership][room_id][section]["events"].as_array().into_iter().flatten()
    })
}

/// The harness itself against a real Synapse: its database is UTF8 with C collation, users are
/// registered with the shared secret, the client API helpers and the sync polling work (a room,
/// an invitation, a join, a message, a typing notification), and dropping it stops the process
/// and drops the database.
#[tokio::test]
async fn synapse_peer_lifecycle_and_client_helpers() {
    if synapse_python().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let synapse = Synapse::start(dir.path(), &ca, &ca.pem).await;
    let (name, db_name, port) = (synapse.name.clone(), synapse.db_name.clone(), synapse.name.port().unwrap());

    let mut admin = PgConnection::connect(&format!("{}/postgres", pg_base_url())).await.unwrap();
    let (encoding, collate): (String, String) = sqlx::query_as(
        "SELECT pg_encoding_to_char(encoding)::text, datcollate::text FROM pg_database WHERE datname = $1",
    )
    .bind(&db_name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!((encoding.as_str(), collate.as_str()), ("UTF8", "C"));

    // Its federation side answers over TLS from the test CA, under its server name.
    let (st, v) = send(&synapse.http, &name, Method::GET, "/_matrix/federation/v1/version", None, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["server"]["name"], "Synapse");
    // A client that does not trust the test CA is refused.
    let untrusting = reqwest::Client::builder().tls_certs_only([]).build().unwrap();
    assert!(untrusting.get(format!("{}/_matrix/client/versions", synapse.base)).send().await.is_err());

    let (alice, alice_token) = synapse.register("alice", "alice password").await;
    assert_eq!(alice, format!("@alice:{name}"));
    let (bob, bob_token) = synapse.register("bob", "bob password").await;
    // A wrong MAC is refused: the helper's MAC is what makes registration work.
    let (_, n) = synapse.get("/_synapse/admin/v1/register", None).await;
    let bad = json!({"nonce": n["nonce"], "username": "mallory", "password": "x", "admin": false, "mac": "00"});
    assert_eq!(synapse.post("/_synapse/admin/v1/register", None, bad).await.0, StatusCode::FORBIDDEN);
    let (st, who) = synapse.get("/_matrix/client/v3/account/whoami", Some(&bob_token)).await;
    assert_eq!((st, who["user_id"].as_str()), (StatusCode::OK, Some(bob.as_str())));
    assert_eq!(synapse.get("/_matrix/client/v3/account/whoami", None).await.0, StatusCode::UNAUTHORIZED);

    let (st, room) =
        synapse.post("/_matrix/client/v3/createRoom", Some(&alice_token), json!({"name": "Salle des fêtes"})).await;
    assert_eq!(st, StatusCode::OK, "{room}");
    let room_id = room["room_id"].as_str().unwrap().to_owned();
    let r = synapse
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room_id)),
            Some(&alice_token),
            json!({"user_id": bob}),
        )
        .await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    let invite = wait_for_room_event(&synapse, &bob_token, &room_id, Duration::from_secs(30), |e| {
        e["type"] == "m.room.member" && e["state_key"] == bob.as_str() && e["content"]["membership"] == "invite"
    })
    .await;
    assert_eq!(invite["sender"], alice.as_str());
    let r = synapse.post(&format!("/_matrix/client/v3/join/{}", enc(&room_id)), Some(&bob_token), json!({})).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    let r = synapse
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t1", enc(&room_id)),
            Some(&alice_token),
            json!({"msgtype": "m.text", "body": "bonjour"}),
        )
        .await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    let msg =
        wait_for_room_event(&synapse, &bob_token, &room_id, Duration::from_secs(30), |e| e["type"] == "m.room.message")
            .await;
    assert_eq!((msg["content"]["body"].as_str(), msg["sender"].as_str()), (Some("bonjour"), Some(alice.as_str())));
    let r = synapse
        .put(
            &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room_id), enc(&alice)),
            Some(&alice_token),
            json!({"typing": true, "timeout": 30000}),
        )
        .await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    let typing = wait_for_room_event(&synapse, &bob_token, &room_id, Duration::from_secs(30), |e| {
        e["type"] == "m.typing" && e["content"]["user_ids"].as_array().is_some_and(|u| !u.is_empty())
    })
    .await;
    assert_eq!(typing["content"]["user_ids"], json!([alice]));

    // Drop: the process ends (its port closes) and its database is gone.
    drop(synapse);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "Synapse still listens");
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&db_name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(!exists, "Synapse's database {db_name} was not dropped");
}
