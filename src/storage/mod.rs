//! Storage: the only place that speaks SQL. Each submodule owns a group of tables and exposes
//! typed async functions; services and handlers never write SQL themselves.
//!
//! Queries use sqlx's runtime-checked API (`sqlx::query`/`query_as`) so the build needs no live
//! database; every query is exercised by the integration tests.

pub mod account_data;
pub mod appservice;
pub mod backup;
pub mod cluster;
pub mod dehydrated;
pub mod delayed_events;
pub mod devices;
pub mod directory;
pub mod e2ee;
pub mod events;
pub mod federation;
pub mod filters;
pub mod media;
pub mod meta;
pub mod oauth;
pub mod openid;
pub mod presence;
pub mod profiles;
pub mod push;
pub mod pushers;
pub mod receipts;
pub mod records;
pub mod registration;
pub mod remote;
pub mod retention;
pub mod rooms;
pub mod search;
pub mod server_notices;
pub mod sliding_sync;
pub mod sso;
pub mod state;
pub mod tokens;
pub mod uia;
pub mod users;
pub mod webhooks;

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::config::DatabaseConfig;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Milliseconds since the UNIX epoch, the unit of every timestamp column.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Creates the database named in `url` if it does not exist, by connecting to the server's
/// `postgres` maintenance database. Safe to race with another process doing the same.
pub async fn create_database_if_missing(url: &str) -> anyhow::Result<()> {
    let opts = PgConnectOptions::from_str(url).context("invalid database URL")?;
    let name = opts.get_database().unwrap_or("postgres").to_owned();
    // Connecting to the target first is the common case (the database exists) and needs no
    // privileges on the maintenance database.
    if opts.clone().log_statements(log::LevelFilter::Off).connect().await.is_ok() {
        return Ok(());
    }
    let mut admin = opts
        .clone()
        .database("postgres")
        .connect()
        .await
        .with_context(|| format!("cannot connect to PostgreSQL to create database {name}"))?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await?;
    if !exists {
        let ident = name.replace('"', "\"\"");
        match sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{ident}\" ENCODING 'UTF8' TEMPLATE template0"
        )))
        .execute(&mut admin)
        .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // 42P04 duplicate_database: another instance created it meanwhile.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create database {name}")),
        }
    }
    admin.close().await.ok();
    Ok(())
}

/// Opens the connection pool.
pub async fn connect(cfg: &DatabaseConfig) -> anyhow::Result<PgPool> {
    let mut opts = PgConnectOptions::from_str(&cfg.url).context("invalid database URL")?;
    if loopback_without_sslmode(&cfg.url) {
        // TLS to a database on the same host protects nothing and costs CPU on both sides of
        // every statement (20-30 % of PostgreSQL's CPU per message sent, docs/benchmarks.md);
        // an explicit `sslmode` in the URL is always obeyed.
        opts = opts.ssl_mode(sqlx::postgres::PgSslMode::Disable);
    }
    let opts = opts
        .application_name("parvis")
        .log_slow_statements(log::LevelFilter::Warn, Duration::from_millis(500))
        .log_statements(log::LevelFilter::Trace);
    let port = opts.get_port();
    let tcp = opts.get_socket().is_none();
    PgPoolOptions::new()
        .after_connect(move |_conn, _meta| {
            Box::pin(async move {
                if tcp {
                    nodelay_on_sockets_to(port);
                }
                Ok(())
            })
        })
        .max_connections(cfg.max_connections)
        .min_connections(cfg.min_connections.min(cfg.max_connections))
        .acquire_timeout(Duration::from_secs(cfg.acquire_timeout_secs))
        .connect_with(opts)
        .await
        .with_context(|| format!("cannot connect to database {}", redact_url(&cfg.url)))
}

/// Whether `url` names a database on this host (a loopback address, `localhost`, or a Unix
/// socket) and leaves `sslmode` to the default.
fn loopback_without_sslmode(url: &str) -> bool {
    let Ok(u) = url::Url::parse(url) else { return false };
    if u.query_pairs().any(|(k, _)| k == "sslmode" || k == "ssl-mode") {
        return false;
    }
    if u.query_pairs().any(|(k, _)| k == "host") {
        // `?host=/run/postgresql`: a Unix socket.
        return u.query_pairs().any(|(k, v)| k == "host" && v.starts_with('/'));
    }
    match u.host() {
        // `postgres:` is not a special scheme: an IPv4 address is an opaque host name here.
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost") || d.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => true,
    }
}

/// Turns Nagle's algorithm off on this process's TCP connections to `port` (the database).
///
/// sqlx (0.9) leaves it on, and then a statement whose messages span more than one segment (any
/// bind of a few tens of kilobytes: a 100-device to-device batch, a large event) waits for the
/// server's delayed ACK: measured 45-50 ms instead of 7-10 ms. sqlx gives no access to its
/// socket, so the connection hook finds the process's sockets connected to the database port
/// and sets `TCP_NODELAY` on them (idempotent; a few microseconds per socket, once per new
/// connection). Unix-socket connections are not affected.
fn nodelay_on_sockets_to(port: u16) {
    #[cfg(target_os = "linux")]
    {
        let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return };
        for entry in dir.flatten() {
            let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse::<libc::c_int>().ok()) else { continue };
            if !std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")) {
                continue;
            }
            // SAFETY: getpeername/setsockopt on a descriptor of this process with correctly sized
            // buffers; a descriptor that is not a TCP socket makes them fail, which is ignored.
            unsafe {
                let mut addr: libc::sockaddr_storage = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                if libc::getpeername(fd, (&mut addr as *mut libc::sockaddr_storage).cast(), &mut len) != 0 {
                    continue;
                }
                let peer_port = match addr.ss_family as libc::c_int {
                    libc::AF_INET => {
                        u16::from_be((*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()).sin_port)
                    }
                    libc::AF_INET6 => {
                        u16::from_be((*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()).sin6_port)
                    }
                    _ => continue,
                };
                if peer_port != port {
                    continue;
                }
                let one: libc::c_int = 1;
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = port;
}

/// Applies pending migrations. sqlx takes an advisory lock, so concurrent instances are safe.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying database migrations")?;
    Ok(())
}

/// The URL without its password, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tls_is_left_out_only_for_this_host_without_an_explicit_sslmode() {
        use super::loopback_without_sslmode as l;
        assert!(l("postgres://postgres@127.0.0.1:5432/parvis"));
        assert!(l("postgres://u:p@localhost/parvis"));
        assert!(l("postgres://u@[::1]:5432/parvis"));
        assert!(l("postgres:///parvis?host=/run/postgresql"));
        assert!(!l("postgres://u@127.0.0.1/parvis?sslmode=require"));
        assert!(!l("postgres://u@db.ville.fr/parvis"));
        assert!(!l("postgres://u@10.0.0.5/parvis"));
    }
}
