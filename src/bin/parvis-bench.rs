//! `parvis-bench`: a load generator that speaks only the standard client-server API, so it can
//! drive any homeserver (Parvis, Synapse, ...). Users are created with Synapse-compatible
//! shared-secret registration, which both servers support.
//!
//! Every loop is bounded by a request count and a duration, and only the given URL is targeted.
//!
//! ```text
//! parvis-bench --url http://127.0.0.1:8008 --shared-secret S whoami --concurrency 32 --requests 20000
//! parvis-bench --url http://127.0.0.1:8008 --shared-secret S login --concurrency 8 --requests 400
//! parvis-bench --url ... smoke     # a few seconds of everything, for CI
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "parvis-bench", about = "Load generator for Matrix homeservers")]
struct Cli {
    /// Base URL of the homeserver (loopback in tests).
    #[arg(long, default_value = "http://127.0.0.1:8008")]
    url: String,
    /// Shared secret for /_synapse/admin/v1/register.
    #[arg(long, env = "BENCH_SHARED_SECRET")]
    shared_secret: Option<String>,
    /// Print results as JSON.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(clap::Args, Clone, Copy)]
struct Load {
    /// Concurrent workers.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Total requests (upper bound).
    #[arg(long, default_value_t = 10_000)]
    requests: u64,
    /// Time limit in seconds (upper bound).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Distinct users.
    #[arg(long, default_value_t = 16)]
    users: usize,
}

#[derive(Subcommand)]
enum Scenario {
    /// Password logins per second (dominated by argon2id by design).
    Login(Load),
    /// Authenticated `GET /account/whoami` per second: the cost of auth + routing.
    Whoami(Load),
    /// Messages sent per second by `--users` concurrent senders into `--rooms` rooms.
    Send {
        #[command(flatten)]
        load: Load,
        /// Rooms to spread the senders over (each sender writes to the rooms `i mod users`).
        #[arg(long, default_value_t = 1)]
        rooms: usize,
    },
    /// A few seconds of every scenario, with small numbers; exits non-zero on any error.
    Smoke,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    scenario: String,
    requests: u64,
    errors: u64,
    seconds: f64,
    throughput_per_s: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

struct Target {
    http: reqwest::Client,
    url: String,
    secret: Option<String>,
    /// Distinguishes this run's users from earlier runs' on the same server.
    run_id: String,
}

const PASSWORD: &str = "bench-password-0123";

impl Target {
    async fn register(&self, localpart: &str) -> anyhow::Result<String> {
        let secret = self.secret.as_deref().context("--shared-secret is required to create users")?;
        let nonce: Value =
            self.http.get(format!("{}/_synapse/admin/v1/register", self.url)).send().await?.json().await?;
        let nonce = nonce["nonce"].as_str().context("no nonce (is shared-secret registration enabled?)")?;
        let mac = parvis::api::admin::register::compute_mac(secret, nonce, localpart, PASSWORD, false, None);
        let resp = self
            .http
            .post(format!("{}/_synapse/admin/v1/register", self.url))
            .json(&json!({ "nonce": nonce, "username": localpart, "password": PASSWORD, "admin": false, "mac": mac }))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if !status.is_success() {
            bail!("registering {localpart}: {status} {body}");
        }
        body["access_token"].as_str().map(str::to_owned).context("no access_token")
    }

    async fn users(&self, scenario: &str, n: usize) -> anyhow::Result<Vec<(String, String)>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("bench.{}.{scenario}.{i}", self.run_id);
            let token = self.register(&name).await?;
            out.push((name, token));
        }
        Ok(out)
    }
}

/// Runs `op` from `concurrency` workers until `requests` or `duration` is reached.
async fn drive<F, Fut>(name: &str, load: Load, op: F) -> Report
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(load.duration);
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..load.concurrency.max(1) {
        let (op, issued, errors) = (op.clone(), issued.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = issued.fetch_add(1, Ordering::Relaxed);
                if i >= load.requests || Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                if !op(i).await {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                lat.push(t.elapsed().as_micros() as u64);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap_or_default());
    }
    let seconds = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            all[((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1] as f64 / 1000.0
        }
    };
    Report {
        scenario: name.to_owned(),
        requests: all.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        seconds,
        throughput_per_s: all.len() as f64 / seconds,
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        max_ms: all.last().map(|m| *m as f64 / 1000.0).unwrap_or(0.0),
    }
}

async fn login(target: Arc<Target>, load: Load) -> anyhow::Result<Report> {
    let users = target.users("login", load.users.max(1)).await?;
    let names: Arc<Vec<String>> = Arc::new(users.into_iter().map(|(n, _)| n).collect());
    Ok(drive("login", load, move |i| {
        let (t, names) = (target.clone(), names.clone());
        async move {
            let name = &names[i as usize % names.len()];
            let r = t
                .http
                .post(format!("{}/_matrix/client/v3/login", t.url))
                .json(&json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": name }, "password": PASSWORD }))
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                _ => false,
            }
        }
    })
    .await)
}

async fn whoami(target: Arc<Target>, load: Load) -> anyhow::Result<Report> {
    let users = target.users("whoami", load.users.max(1)).await?;
    let tokens: Arc<Vec<String>> = Arc::new(users.into_iter().map(|(_, t)| t).collect());
    Ok(drive("whoami", load, move |i| {
        let (t, tokens) = (target.clone(), tokens.clone());
        async move {
            let token = &tokens[i as usize % tokens.len()];
            let r = t.http.get(format!("{}/_matrix/client/v3/account/whoami", t.url)).bearer_auth(token).send().await;
            match r {
                Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                _ => false,
            }
        }
    })
    .await)
}

impl Target {
    async fn call(&self, method: reqwest::Method, path: &str, token: &str, body: Value) -> anyhow::Result<Value> {
        let resp =
            self.http.request(method, format!("{}{path}", self.url)).bearer_auth(token).json(&body).send().await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{path}: {status} {v}");
        }
        Ok(v)
    }
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn send(target: Arc<Target>, load: Load, rooms: usize) -> anyhow::Result<Report> {
    let users = target.users("send", load.users.max(1)).await?;
    let rooms = rooms.max(1);
    let mut room_ids = Vec::with_capacity(rooms);
    for _ in 0..rooms {
        let v = target
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                &users[0].1,
                json!({ "preset": "public_chat" }),
            )
            .await?;
        room_ids.push(v["room_id"].as_str().context("room_id")?.to_owned());
    }
    // Sender i writes to the rooms r with r mod users == i mod users (all senders share room 0
    // when there is one room).
    let mut plan: Vec<(String, Vec<String>)> = Vec::new();
    for (i, (_, token)) in users.iter().enumerate() {
        let mine: Vec<String> = room_ids
            .iter()
            .enumerate()
            .filter(|(r, _)| rooms < users.len() || r % users.len() == i)
            .map(|(_, id)| id.clone())
            .collect();
        let mine = if rooms < users.len() { vec![room_ids[i % rooms].clone()] } else { mine };
        for r in &mine {
            if i != 0 {
                target
                    .call(reqwest::Method::POST, &format!("/_matrix/client/v3/rooms/{}/join", enc(r)), token, json!({}))
                    .await?;
            }
        }
        plan.push((token.clone(), mine));
    }
    let plan = Arc::new(plan);
    let name = format!("send/{rooms}r");
    Ok(drive(&name, Load { concurrency: plan.len(), ..load }, move |i| {
        let (t, plan) = (target.clone(), plan.clone());
        async move {
            let (token, rooms) = &plan[i as usize % plan.len()];
            let room = &rooms[(i as usize / plan.len()) % rooms.len()];
            let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/b{}-{i}", enc(room), t.run_id);
            t.call(reqwest::Method::PUT, &path, token, json!({ "msgtype": "m.text", "body": format!("message {i}") }))
                .await
                .is_ok()
        }
    })
    .await)
}

fn print(report: &Report, as_json: bool) {
    if as_json {
        println!("{}", serde_json::to_string(report).expect("serializable"));
    } else {
        println!(
            "{:<8} {:>7} req {:>4} err {:>7.2}s {:>9.1} req/s  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
            report.scenario,
            report.requests,
            report.errors,
            report.seconds,
            report.throughput_per_s,
            report.p50_ms,
            report.p90_ms,
            report.p99_ms,
            report.max_ms
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let url = cli.url.trim_end_matches('/').to_owned();
    let parsed = url::Url::parse(&url).context("invalid --url")?;
    if !matches!(parsed.scheme(), "http" | "https") {
        bail!("--url must be http(s)");
    }
    let target = Arc::new(Target {
        http: reqwest::Client::builder().pool_max_idle_per_host(1024).timeout(Duration::from_secs(60)).build()?,
        url,
        secret: cli.shared_secret,
        run_id: format!("{:x}", rand::random::<u32>()),
    });
    let reports = match cli.scenario {
        Scenario::Login(l) => vec![login(target, l).await?],
        Scenario::Whoami(l) => vec![whoami(target, l).await?],
        Scenario::Send { load, rooms } => vec![send(target, load, rooms).await?],
        Scenario::Smoke => {
            let small = Load { concurrency: 4, requests: 200, duration: 10, users: 2 };
            vec![
                login(target.clone(), Load { requests: 8, ..small }).await?,
                whoami(target.clone(), small).await?,
                send(target, Load { requests: 40, ..small }, 2).await?,
            ]
        }
    };
    let mut failed = false;
    for r in &reports {
        print(r, cli.json);
        failed |= r.errors > 0 || r.requests == 0;
    }
    if failed {
        bail!("some requests failed");
    }
    Ok(())
}
