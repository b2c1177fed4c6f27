//! `complement-tests/`: the image recipe that runs Complement against Parvis. There is no Docker
//! daemon here, so what can be checked without one is: the scripts parse, the Dockerfile follows
//! Complement's contract, and the entrypoint, run in `--generate-only` mode with a CA made like
//! Complement's, writes a certificate and a configuration on which the real `parvis` binary
//! starts and serves what Complement needs (client API, shared-secret registration with
//! `complement`, TLS federation with a certificate for `SERVER_NAME` from the CA, and the CA
//! trusted for outgoing requests).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use parvis::federation::keys;
use reqwest::StatusCode;
use ruma::ServerName;
use serde_json::{Value, json};

use crate::cli::parvis;
use crate::common::{drop_database, fresh_database};
use crate::fed_harness::{Ca, free_port, start};

fn complement_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("complement-tests")
}

/// Runs the entrypoint in `--generate-only` mode (or with `args`); returns its output.
fn entrypoint(server_name: Option<&str>, out: &Path, ca_dir: &Path, args: &[&str]) -> std::process::Output {
    let mut c = Command::new("bash");
    c.arg(complement_dir().join("entrypoint.sh"))
        .args(args)
        .env_remove("SERVER_NAME")
        .env("PARVIS_COMPLEMENT_DIR", out)
        .env("PARVIS_COMPLEMENT_CA_DIR", ca_dir);
    if let Some(n) = server_name {
        c.env("SERVER_NAME", n);
    }
    c.output().unwrap()
}

/// Kills the server on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn complement_image_entrypoint_and_configuration() {
    // --- the scripts parse; the Dockerfile follows Complement's contract
    let st = Command::new("bash").arg("-n").arg(complement_dir().join("entrypoint.sh")).status().unwrap();
    assert!(st.success(), "bash -n entrypoint.sh");
    let dockerfile = std::fs::read_to_string(complement_dir().join("Dockerfile")).unwrap();
    for needed in [
        "EXPOSE 8008 8448",
        "cargo build --release --locked --bin parvis",
        "COPY complement-tests/entrypoint.sh /usr/local/bin/complement-entrypoint.sh",
        "ENTRYPOINT [\"/usr/local/bin/complement-entrypoint.sh\"]",
        "postgresql",
        "openssl",
    ] {
        assert!(dockerfile.contains(needed), "the Dockerfile lacks `{needed}`");
    }

    // --- Complement's CA: a certificate and its key, as mounted in /complement/ca
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "complement");
    let ca_dir = dir.path().join("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    std::fs::copy(&ca.pem, ca_dir.join("ca.crt")).unwrap();
    std::fs::write(ca_dir.join("ca.key"), ca.key_pem()).unwrap();
    let out = dir.path().join("parvis");

    // --- refusals: no SERVER_NAME, no CA, an unknown argument
    let r = entrypoint(None, &out, &ca_dir, &["--generate-only"]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("SERVER_NAME"), "{r:?}");
    let r = entrypoint(Some("hs1"), &out, &dir.path().join("nothing"), &["--generate-only"]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("ca.crt"), "{r:?}");
    assert!(!entrypoint(Some("hs1"), &out, &ca_dir, &["--bogus"]).status.success());

    // --- generation, twice (Complement runs the entrypoint at every container start)
    for _ in 0..2 {
        let r = entrypoint(Some("hs1"), &out, &ca_dir, &["--generate-only"]);
        assert!(r.status.success(), "{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
    }
    let config_path = out.join("parvis.toml");
    let config = parvis::config::Config::load(&config_path, Vec::new()).expect("the generated configuration loads");
    assert_eq!(config.server_name, "hs1");
    assert_eq!(config.listen.client.to_string(), "0.0.0.0:8008");
    assert_eq!(config.listen.federation.map(|a| a.to_string()).as_deref(), Some("0.0.0.0:8448"));
    assert!(config.federation_enabled());
    assert_eq!(config.registration.shared_secret.as_deref(), Some("complement"));
    assert_eq!(config.federation.ca_file.as_deref(), Some(ca_dir.join("ca.crt").as_path()));
    assert!(config.federation.verify_certificates);
    assert!(config.registration.enabled && config.registration.reserved_localparts.is_empty());
    assert!(!config.rate_limits.enabled);
    let check = parvis().args(["check-config", "--config"]).arg(&config_path).output().unwrap();
    assert!(check.status.success(), "parvis check-config: {}", String::from_utf8_lossy(&check.stderr));

    // --- the real binary on that configuration: a test database and loopback ports instead of
    // the image's own PostgreSQL and 0.0.0.0:8008/8448 (through PARVIS__ overrides)
    let (db_url, db_name) = fresh_database().await;
    let (client_port, fed_port) = (free_port(), free_port());
    let log = dir.path().join("parvis.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut child = Running(
        parvis()
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("PARVIS__DATABASE__URL", &db_url)
            .env("PARVIS__LISTEN__CLIENT", format!("127.0.0.1:{client_port}"))
            .env("PARVIS__LISTEN__FEDERATION", format!("127.0.0.1:{fed_port}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap(),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let base = format!("http://127.0.0.1:{client_port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http.get(format!("{base}/_matrix/client/versions")).send().await;
        if r.is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        assert!(child.0.try_wait().unwrap().is_none(), "parvis exited:\n{}", read_log());
        assert!(Instant::now() < deadline, "parvis did not answer /versions:\n{}", read_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Shared-secret registration with `complement` (a wrong secret is refused).
    let register = |secret: &'static str, user: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let n: Value =
                http.get(format!("{base}/_synapse/admin/v1/register")).send().await.unwrap().json().await.unwrap();
            let nonce = n["nonce"].as_str().unwrap().to_owned();
            let mac = parvis::api::admin::register::compute_mac(secret, &nonce, user, "pw", true, None);
            let body = json!({"nonce": nonce, "username": user, "password": "pw", "admin": true, "mac": mac});
            let r = http.post(format!("{base}/_synapse/admin/v1/register")).json(&body).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (st, body) = register("complement", "alice").await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "@alice:hs1");
    // Open registration (Complement's ordinary users), with a short password.
    let r = http
        .post(format!("{base}/_matrix/client/v3/register"))
        .json(&json!({"username": "bob", "password": "pw", "auth": {"type": "m.login.dummy"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.text().await);
    assert_eq!(register("not-complement", "carol").await.0, StatusCode::FORBIDDEN);

    // The federation listener speaks TLS with a certificate for `hs1` from Complement's CA.
    let fed_addr = std::net::SocketAddr::from(([127, 0, 0, 1], fed_port));
    let trusting = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(&ca.pem).unwrap()).unwrap()])
        .resolve("hs1", fed_addr)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let hs1 = format!("https://hs1:{fed_port}");
    let r = trusting.get(format!("{hs1}/_matrix/key/v2/server")).send().await.expect("TLS with the CA's certificate");
    assert_eq!(r.status(), StatusCode::OK);
    let doc: Value = r.json().await.unwrap();
    keys::verify_key_response(&ServerName::parse("hs1").unwrap(), &doc).expect("hs1's key document verifies");
    // Another name is not in the certificate.
    let other = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(&ca.pem).unwrap()).unwrap()])
        .resolve("hs2", fed_addr)
        .build()
        .unwrap();
    assert!(other.get(format!("https://hs2:{fed_port}/_matrix/key/v2/server")).send().await.is_err());

    // Complement's CA is trusted for outgoing requests: as a notary, the server fetches the keys
    // of a server whose certificate comes from that CA.
    let peer = start(dir.path(), "peer", &ca, &ca, |_| {}).await;
    let body = json!({ "server_keys": { peer.name.as_str(): {} } });
    let r = trusting.post(format!("{hs1}/_matrix/key/v2/query")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let q: Value = r.json().await.unwrap();
    let entry = q["server_keys"].as_array().and_then(|l| l.first()).unwrap_or_else(|| panic!("{q}\n{}", read_log()));
    keys::verify_key_response(&peer.name, entry).expect("the peer's keys, fetched over TLS trusting the CA");

    peer.server.stop().await;
    drop(child);
    drop_database(&db_name).await;
}
