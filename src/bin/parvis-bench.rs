//! `parvis-bench`: a load generator that speaks only the standard client-server API, so it can
//! drive any homeserver (Parvis, Synapse, ...). Users are created with Synapse-compatible
//! shared-secret registration, which both servers support.
//!
//! Every loop is bounded by a request count and a duration, and only the given URL is targeted.
//!
//! ```text
//! parvis-bench --url http://127.0.0.1:8008 --shared-secret S whoami --concurrency 32 --requests 20000
//! parvis-bench --url http://127.0.0.1:8008 --shared-secret S login --concurrency 8 --requests 400
//! parvis-bench --url ... incremental-sync --concurrency 32 --requests 20000
//! parvis-bench --url ... fanout --receivers 100 --messages 50
//! parvis-bench --url ... initial-sync --rooms 200 --events 50
//! parvis-bench --url ... smoke     # a few seconds of everything, for CI
//! ```
//!
//! With `--server-pid`, reports include the server's CPU time and resident memory (current and
//! peak) and the CPU time of PostgreSQL processes; with `--pg-url`, the number of PostgreSQL
//! transactions (statements outside a transaction count as one each) per request.

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
    /// PID of the server process, to report its CPU time and memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// PostgreSQL URL of the server's database, to count transactions per request.
    #[arg(long)]
    pg_url: Option<String>,
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
    /// Empty incremental syncs (`timeout=0`, nothing new) per second: the idle cost of clients.
    IncrementalSync(Load),
    /// One sender, `--receivers` long-polling `/sync` in one room: delivery latency from send
    /// to sync response.
    Fanout {
        #[arg(long, default_value_t = 100)]
        receivers: usize,
        #[arg(long, default_value_t = 50)]
        messages: usize,
        /// Pause between messages, in milliseconds.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
    /// A user in `--rooms` rooms with `--events` messages each: initial sync latency, with the
    /// default filter and with lazy-loaded members.
    InitialSync {
        #[arg(long, default_value_t = 200)]
        rooms: usize,
        #[arg(long, default_value_t = 50)]
        events: usize,
        /// Initial syncs measured per filter.
        #[arg(long, default_value_t = 10)]
        repeat: usize,
    },
    /// Encryption traffic for a room of `--devices` devices: `keys/claim` of one one-time key per
    /// device in one request, and a `sendToDevice` to every device in one request (what a client
    /// does before its first message in an encrypted room), `--rounds` times each.
    E2ee {
        #[arg(long, default_value_t = 100)]
        devices: usize,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// A few seconds of every scenario, with small numbers; exits non-zero on any error.
    Smoke,
    /// Media repository: upload and download throughput (MB/s) of `--size-kb` files, then
    /// thumbnails generated per second from `--images` distinct 1920x1080 JPEG photos (run the
    /// server with `media.thumbnails_at_upload = false`, else they are pre-generated) and served
    /// per second from the cache.
    Media {
        #[command(flatten)]
        load: Load,
        #[arg(long, default_value_t = 1024)]
        size_kb: usize,
        #[arg(long, default_value_t = 40)]
        images: usize,
    },
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
    /// Scenario-specific figures (delivery latency, response sizes, server resources...).
    #[serde(flatten)]
    extra: serde_json::Map<String, Value>,
}

struct Target {
    http: reqwest::Client,
    url: String,
    secret: Option<String>,
    /// Distinguishes this run's users from earlier runs' on the same server.
    run_id: String,
    server_pid: Option<u32>,
    pool: Option<sqlx::PgPool>,
}

/// Resource counters sampled around the measured phase of a scenario (not its set-up).
struct Probe {
    proc: Option<(f64, u64, u64)>,
    pg_cpu: Option<f64>,
    tx: Option<i64>,
}

impl Probe {
    async fn start(t: &Target) -> Self {
        let tx = match &t.pool {
            Some(p) => {
                // Let the set-up's statistics reach pg_stat_database first (see `finish`).
                tokio::time::sleep(Duration::from_secs(11)).await;
                pg_transactions(p).await
            }
            None => None,
        };
        Self { proc: t.server_pid.and_then(proc_stats), pg_cpu: t.server_pid.map(|_| postgres_cpu()), tx }
    }

    async fn finish(self, t: &Target, report: &mut Report) {
        if let (Some(pid), Some((cpu0, _, _))) = (t.server_pid, self.proc)
            && let Some((cpu1, rss, hwm)) = proc_stats(pid)
        {
            report.extra.insert("server_cpu_s".into(), json!(round(cpu1 - cpu0)));
            report.extra.insert(
                "server_cpu_ms_per_request".into(),
                json!(round(1000.0 * (cpu1 - cpu0) / report.requests.max(1) as f64)),
            );
            report.extra.insert("server_rss_mb".into(), json!(round(rss as f64 / 1024.0)));
            report.extra.insert("server_peak_rss_mb".into(), json!(round(hwm as f64 / 1024.0)));
        }
        if let Some(cpu0) = self.pg_cpu {
            report.extra.insert("postgres_cpu_s".into(), json!(round(postgres_cpu() - cpu0)));
        }
        if let (Some(p), Some(tx0)) = (&t.pool, self.tx)
            && let Some(tx1) = {
                // PostgreSQL backends publish their statistics at most once a second, and an idle
                // backend only after 10 s: wait for them before reading.
                tokio::time::sleep(Duration::from_secs(11)).await;
                pg_transactions(p).await
            }
        {
            // Minus this tool's own statistics query.
            let tx = (tx1 - tx0 - 1).max(0);
            report.extra.insert("pg_transactions".into(), json!(tx));
            report
                .extra
                .insert("pg_transactions_per_request".into(), json!(round(tx as f64 / report.requests.max(1) as f64)));
        }
    }
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
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
async fn drive<F, Fut>(target: &Target, name: &str, load: Load, op: F) -> Report
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let probe = Probe::start(target).await;
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
    let mut report = Report {
        scenario: name.to_owned(),
        requests: all.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        seconds,
        throughput_per_s: all.len() as f64 / seconds,
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        max_ms: all.last().map(|m| *m as f64 / 1000.0).unwrap_or(0.0),
        extra: Default::default(),
    };
    probe.finish(target, &mut report).await;
    report
}

/// Percentiles of a list of latencies in microseconds: (p50, p90, p99, max) in milliseconds.
fn percentiles(mut v: Vec<u64>) -> (f64, f64, f64, f64) {
    v.sort_unstable();
    let pct = |p: f64| {
        if v.is_empty() { 0.0 } else { v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1] as f64 / 1000.0 }
    };
    (pct(0.5), pct(0.9), pct(0.99), v.last().map(|m| *m as f64 / 1000.0).unwrap_or(0.0))
}

async fn login(target: Arc<Target>, load: Load) -> anyhow::Result<Report> {
    let users = target.users("login", load.users.max(1)).await?;
    let names: Arc<Vec<String>> = Arc::new(users.into_iter().map(|(n, _)| n).collect());
    Ok(drive(&target.clone(), "login", load, move |i| {
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
    Ok(drive(&target.clone(), "whoami", load, move |i| {
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
    Ok(drive(&target.clone(), &name, Load { concurrency: plan.len(), ..load }, move |i| {
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

impl Target {
    async fn sync(
        &self,
        token: &str,
        since: Option<&str>,
        filter: Option<&str>,
        timeout_ms: u64,
    ) -> anyhow::Result<Value> {
        let mut url = format!("{}/_matrix/client/v3/sync?timeout={timeout_ms}", self.url);
        if let Some(s) = since {
            url.push_str(&format!("&since={}", enc(s)));
        }
        if let Some(f) = filter {
            url.push_str(&format!("&filter={}", enc(f)));
        }
        let resp = self.http.get(url).bearer_auth(token).send().await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("sync: {status} {v}");
        }
        Ok(v)
    }

    async fn create_room(&self, token: &str) -> anyhow::Result<String> {
        let v = self
            .call(reqwest::Method::POST, "/_matrix/client/v3/createRoom", token, json!({ "preset": "public_chat" }))
            .await?;
        Ok(v["room_id"].as_str().context("room_id")?.to_owned())
    }

    async fn join(&self, token: &str, room: &str) -> anyhow::Result<()> {
        self.call(reqwest::Method::POST, &format!("/_matrix/client/v3/rooms/{}/join", enc(room)), token, json!({}))
            .await
            .map(|_| ())
    }

    async fn send_text(&self, token: &str, room: &str, txn: &str, body: &str) -> anyhow::Result<()> {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room));
        self.call(reqwest::Method::PUT, &path, token, json!({ "msgtype": "m.text", "body": body })).await.map(|_| ())
    }
}

async fn incremental_sync(target: Arc<Target>, load: Load) -> anyhow::Result<Report> {
    let users = target.users("isync", load.users.max(1)).await?;
    // Each user shares a room with the next, so their syncs have rooms to look at.
    let room = target.create_room(&users[0].1).await?;
    let mut tokens = Vec::new();
    for (i, (_, token)) in users.iter().enumerate() {
        if i != 0 {
            target.join(token, &room).await?;
        }
    }
    for (_, token) in &users {
        let v = target.sync(token, None, None, 0).await?;
        let since = v["next_batch"].as_str().context("next_batch")?.to_owned();
        tokens.push((token.clone(), parking_lot::Mutex::new(since)));
    }
    // The other users' first syncs changed their presence: catch up once, as a client would.
    for (token, since) in &tokens {
        let from = since.lock().clone();
        let v = target.sync(token, Some(&from), None, 0).await?;
        *since.lock() = v["next_batch"].as_str().context("next_batch")?.to_owned();
    }
    let tokens = Arc::new(tokens);
    // Like a client, each sync continues from the token the previous one returned.
    Ok(drive(&target.clone(), "incremental-sync", load, move |i| {
        let (t, tokens) = (target.clone(), tokens.clone());
        async move {
            let (token, since) = &tokens[i as usize % tokens.len()];
            let from = since.lock().clone();
            match t.sync(token, Some(&from), None, 0).await {
                Ok(v) => {
                    if let Some(n) = v["next_batch"].as_str() {
                        *since.lock() = n.to_owned();
                    }
                    true
                }
                Err(_) => false,
            }
        }
    })
    .await)
}

/// Fan-out: every receiver long-polls; the sender stamps each message with its send time.
async fn fanout(target: Arc<Target>, receivers: usize, messages: usize, interval_ms: u64) -> anyhow::Result<Report> {
    let users = target.users("fanout", receivers + 1).await?;
    let sender = users[0].1.clone();
    let room = target.create_room(&sender).await?;
    for (_, token) in &users[1..] {
        target.join(token, &room).await?;
    }
    let epoch = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (_, token) in users[1..].iter() {
        let token = token.clone();
        let (t, done) = (target.clone(), done.clone());
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut since = match t.sync(&token, None, Some(r#"{"room":{"timeline":{"limit":1}}}"#), 0).await {
                Ok(v) => v["next_batch"].as_str().unwrap_or_default().to_owned(),
                Err(_) => return (lat, 1),
            };
            let deadline = Instant::now() + Duration::from_secs(600);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                match t.sync(&token, Some(&since), None, 5_000).await {
                    Ok(v) => {
                        let now = epoch.elapsed().as_micros() as u64;
                        for ev in v["rooms"]["join"][&room]["timeline"]["events"].as_array().into_iter().flatten() {
                            if let Some(sent) = ev["content"]["sent_us"].as_u64() {
                                lat.push(now.saturating_sub(sent));
                            }
                        }
                        since = v["next_batch"].as_str().unwrap_or(&since).to_owned();
                    }
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    // Let every receiver reach its long-poll.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut send_lat = Vec::new();
    let mut errors = 0;
    let probe = Probe::start(&target).await;
    let start = Instant::now();
    for i in 0..messages {
        let t0 = Instant::now();
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/f{}-{i}", enc(&room), target.run_id);
        let body = json!({ "msgtype": "m.text", "body": format!("fanout {i}"), "sent_us": epoch.elapsed().as_micros() as u64 });
        if target.call(reqwest::Method::PUT, &path, &sender, body).await.is_err() {
            errors += 1;
        }
        send_lat.push(t0.elapsed().as_micros() as u64);
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    }
    // Give the last deliveries time to arrive, then stop the receivers at their next answer.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    done.store(true, Ordering::Relaxed);
    let seconds = start.elapsed().as_secs_f64();
    let mut delivery = Vec::new();
    for t in tasks {
        let (lat, e) = t.await.unwrap_or_default();
        delivery.extend(lat);
        errors += e;
    }
    let expected = (messages * receivers) as u64;
    let delivered = delivery.len() as u64;
    let (p50, p90, p99, max) = percentiles(send_lat);
    let (d50, d90, d99, dmax) = percentiles(delivery);
    let mut extra = serde_json::Map::new();
    extra.insert("receivers".into(), json!(receivers));
    extra.insert("deliveries".into(), json!(delivered));
    extra.insert("deliveries_expected".into(), json!(expected));
    extra.insert("delivery_p50_ms".into(), json!(d50));
    extra.insert("delivery_p90_ms".into(), json!(d90));
    extra.insert("delivery_p99_ms".into(), json!(d99));
    extra.insert("delivery_max_ms".into(), json!(dmax));
    let mut report = Report {
        scenario: format!("fanout/{receivers}"),
        requests: messages as u64,
        errors: errors + expected.saturating_sub(delivered),
        seconds,
        throughput_per_s: delivered as f64 / seconds,
        p50_ms: p50,
        p90_ms: p90,
        p99_ms: p99,
        max_ms: max,
        extra,
    };
    probe.finish(&target, &mut report).await;
    Ok(report)
}

/// Initial sync of a user in `rooms` rooms with `events` messages each.
async fn initial_sync(target: Arc<Target>, rooms: usize, events: usize, repeat: usize) -> anyhow::Result<Vec<Report>> {
    let users = target.users("initsync", 2).await?;
    let (me, other) = (users[0].1.clone(), users[1].1.clone());
    // Rooms are filled concurrently (bounded), each by the two members in turn.
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut fills = Vec::new();
    for r in 0..rooms {
        let (t, me, other, sem) = (target.clone(), me.clone(), other.clone(), sem.clone());
        fills.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let room = t.create_room(&me).await?;
            t.join(&other, &room).await?;
            for e in 0..events {
                let token = if e % 2 == 0 { &me } else { &other };
                t.send_text(token, &room, &format!("i{}-{r}-{e}", t.run_id), &format!("message {e} of room {r}"))
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for f in fills {
        f.await??;
    }
    let mut reports = Vec::new();
    for (name, filter) in
        [("initial-sync", None), ("initial-sync/lazy", Some(r#"{"room":{"state":{"lazy_load_members":true}}}"#))]
    {
        let mut lat = Vec::new();
        let mut bytes = 0usize;
        let mut errors = 0;
        let mut first_ms = 0.0;
        let probe = Probe::start(&target).await;
        let start = Instant::now();
        for i in 0..repeat.max(1) {
            let t0 = Instant::now();
            let mut url = format!("{}/_matrix/client/v3/sync", target.url);
            if let Some(f) = filter {
                url.push_str(&format!("?filter={}", enc(f)));
            }
            match target.http.get(url).bearer_auth(&me).send().await {
                Ok(r) if r.status().is_success() => {
                    let body = r.bytes().await.unwrap_or_default();
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let got = v["rooms"]["join"].as_object().map_or(0, |o| o.len());
                    if got < rooms {
                        errors += 1;
                    }
                    bytes = body.len();
                }
                _ => errors += 1,
            }
            let us = t0.elapsed().as_micros() as u64;
            if i == 0 {
                first_ms = us as f64 / 1000.0;
            }
            lat.push(us);
        }
        let seconds = start.elapsed().as_secs_f64();
        let n = lat.len() as u64;
        let (p50, p90, p99, max) = percentiles(lat);
        let mut extra = serde_json::Map::new();
        extra.insert("rooms".into(), json!(rooms));
        extra.insert("events_per_room".into(), json!(events));
        extra.insert("first_ms".into(), json!(first_ms));
        extra.insert("response_bytes".into(), json!(bytes));
        let mut report = Report {
            scenario: name.into(),
            requests: n,
            errors,
            seconds,
            throughput_per_s: n as f64 / seconds,
            p50_ms: p50,
            p90_ms: p90,
            p99_ms: p99,
            max_ms: max,
            extra,
        };
        probe.finish(&target, &mut report).await;
        reports.push(report);
    }
    Ok(reports)
}

/// Signs `obj` (canonical JSON without `signatures`/`unsigned`) as a device would.
fn sign_json(obj: &mut Value, user: &str, key_id: &str, key: &ed25519_dalek::SigningKey) {
    use base64::Engine;
    use ed25519_dalek::Signer;
    let mut bare = obj.as_object().cloned().unwrap_or_default();
    bare.remove("signatures");
    bare.remove("unsigned");
    let canonical = ruma::CanonicalJsonValue::try_from(Value::Object(bare)).expect("canonical");
    let sig = key.sign(serde_json::to_string(&canonical).expect("json").as_bytes());
    obj["signatures"][user][key_id] = json!(base64::engine::general_purpose::STANDARD_NO_PAD.encode(sig.to_bytes()));
}

async fn e2ee(target: Arc<Target>, devices: usize, rounds: usize) -> anyhow::Result<Vec<Report>> {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD_NO_PAD.encode(b);
    let users = target.users("e2ee", devices + 1).await?;
    let claimer = users[0].1.clone();
    // Every device uploads its keys and one one-time key per round.
    let mut recipients: Vec<(String, String)> = Vec::new();
    for (i, (name, token)) in users[1..].iter().enumerate() {
        let who: Value =
            target.call(reqwest::Method::GET, "/_matrix/client/v3/account/whoami", token, Value::Null).await?;
        let user_id = who["user_id"].as_str().context("user_id")?.to_owned();
        let device_id = who["device_id"].as_str().context("device_id")?.to_owned();
        let key = ed25519_dalek::SigningKey::from_bytes(&[(i % 250) as u8 + 1; 32]);
        let key_id = format!("ed25519:{device_id}");
        let mut dk = json!({
            "user_id": user_id, "device_id": device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": { format!("curve25519:{device_id}"): b64(&[3; 32]), key_id.clone(): b64(key.verifying_key().as_bytes()) },
        });
        sign_json(&mut dk, &user_id, &key_id, &key);
        let mut otks = serde_json::Map::new();
        for r in 0..rounds {
            let mut k = json!({ "key": b64(&[(r % 250) as u8; 32]) });
            sign_json(&mut k, &user_id, &key_id, &key);
            otks.insert(format!("signed_curve25519:{name}{r:05}"), k);
        }
        target
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/keys/upload",
                token,
                json!({ "device_keys": dk, "one_time_keys": otks }),
            )
            .await?;
        recipients.push((user_id, device_id));
    }
    let mut claim_req = serde_json::Map::new();
    let mut messages = serde_json::Map::new();
    for (u, d) in &recipients {
        claim_req.insert(u.clone(), json!({ d.clone(): "signed_curve25519" }));
        messages.insert(u.clone(), json!({ d.clone(): { "algorithm": "m.olm.v1.curve25519-aes-sha2", "ciphertext": { "x": { "type": 0, "body": "A".repeat(400) } } } }));
    }
    let claim_body = json!({ "one_time_keys": claim_req });
    let send_body = json!({ "messages": messages });
    let mut reports = Vec::new();
    for name in ["keys-claim", "send-to-device"] {
        let probe = Probe::start(&target).await;
        let start = Instant::now();
        let mut lat = Vec::new();
        let mut errors = 0;
        for r in 0..rounds {
            let t0 = Instant::now();
            let ok = if name == "keys-claim" {
                match target
                    .call(reqwest::Method::POST, "/_matrix/client/v3/keys/claim", &claimer, claim_body.clone())
                    .await
                {
                    Ok(v) => v["one_time_keys"].as_object().is_some_and(|o| o.len() == devices),
                    Err(_) => false,
                }
            } else {
                let path = format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/b{}-{r}", target.run_id);
                target.call(reqwest::Method::PUT, &path, &claimer, send_body.clone()).await.is_ok()
            };
            if !ok {
                errors += 1;
            }
            lat.push(t0.elapsed().as_micros() as u64);
        }
        let seconds = start.elapsed().as_secs_f64();
        let (p50, p90, p99, max) = percentiles(lat);
        let mut extra = serde_json::Map::new();
        extra.insert("devices".into(), json!(devices));
        extra.insert("per_device_per_s".into(), json!(round(rounds as f64 * devices as f64 / seconds)));
        let mut report = Report {
            scenario: format!("{name}/{devices}"),
            requests: rounds as u64,
            errors,
            seconds,
            throughput_per_s: rounds as f64 / seconds,
            p50_ms: p50,
            p90_ms: p90,
            p99_ms: p99,
            max_ms: max,
            extra,
        };
        probe.finish(&target, &mut report).await;
        reports.push(report);
    }
    Ok(reports)
}

/// CPU time (seconds) and memory of a process, from /proc.
fn proc_stats(pid: u32) -> Option<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let hz = 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((ticks / hz, kb("VmRSS:")?, kb("VmHWM:")?))
}

/// Total CPU seconds of every `postgres` process (server backends included).
fn postgres_cpu() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    let mut total = 0.0;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        let is_pg = std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres");
        if is_pg && let Some((cpu, _, _)) = proc_stats(pid) {
            total += cpu;
        }
    }
    total
}

/// PostgreSQL transactions committed or rolled back in the server's database so far.
async fn pg_transactions(pool: &sqlx::PgPool) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .ok()
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
        if !report.extra.is_empty() {
            let parts: Vec<String> = report.extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("         {}", parts.join("  "));
        }
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
    let pool = match &cli.pg_url {
        Some(u) => Some(sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(u).await.context("--pg-url")?),
        None => None,
    };
    let target = Arc::new(Target {
        http: reqwest::Client::builder().pool_max_idle_per_host(1024).timeout(Duration::from_secs(60)).build()?,
        url,
        secret: cli.shared_secret,
        run_id: format!("{:x}", rand::random::<u32>()),
        server_pid: cli.server_pid,
        pool,
    });
    let reports = match cli.scenario {
        Scenario::Login(l) => vec![login(target, l).await?],
        Scenario::Whoami(l) => vec![whoami(target, l).await?],
        Scenario::Send { load, rooms } => vec![send(target, load, rooms).await?],
        Scenario::IncrementalSync(l) => vec![incremental_sync(target, l).await?],
        Scenario::Fanout { receivers, messages, interval_ms } => {
            vec![fanout(target, receivers, messages, interval_ms).await?]
        }
        Scenario::InitialSync { rooms, events, repeat } => initial_sync(target, rooms, events, repeat).await?,
        Scenario::E2ee { devices, rounds } => e2ee(target, devices, rounds).await?,
        Scenario::Media { load, size_kb, images } => media(target, load, size_kb, images).await?,
        Scenario::Smoke => {
            let small = Load { concurrency: 4, requests: 200, duration: 10, users: 2 };
            let mut v = vec![
                login(target.clone(), Load { requests: 8, ..small }).await?,
                whoami(target.clone(), small).await?,
                send(target.clone(), Load { requests: 40, ..small }, 2).await?,
                incremental_sync(target.clone(), small).await?,
                fanout(target.clone(), 3, 5, 20).await?,
            ];
            v.extend(initial_sync(target, 3, 5, 2).await?);
            v
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

/// The `media` scenario: uploads, downloads and thumbnails (see `Scenario::Media`).
async fn media(target: Arc<Target>, load: Load, size_kb: usize, images: usize) -> anyhow::Result<Vec<Report>> {
    use parking_lot::Mutex;
    let users = target.users("media", load.users.max(1)).await?;
    let tokens: Arc<Vec<String>> = Arc::new(users.into_iter().map(|(_, t)| t).collect());
    let size = size_kb * 1024;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let payload = bytes::Bytes::from(
        (0..size)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect::<Vec<u8>>(),
    );
    async fn upload(t: &Target, token: &str, content_type: &str, data: bytes::Bytes) -> Option<String> {
        let r = t
            .http
            .post(format!("{}/_matrix/media/v3/upload", t.url))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(data)
            .send()
            .await
            .ok()?;
        let v: Value = r.error_for_status().ok()?.json().await.ok()?;
        v["content_uri"].as_str()?.strip_prefix("mxc://").map(str::to_owned)
    }
    let mb_per_s = |r: &mut Report, bytes_each: usize| {
        let mb = (r.requests - r.errors) as f64 * bytes_each as f64 / 1e6;
        r.extra.insert("mb_per_s".into(), json!(round(mb / r.seconds)));
    };

    let uploaded = Arc::new(Mutex::new(Vec::new()));
    let (t, tk, up, data) = (target.clone(), tokens.clone(), uploaded.clone(), payload.clone());
    let mut up_report = drive(&target, "upload", load, move |i| {
        let (t, tk, up, data) = (t.clone(), tk.clone(), up.clone(), data.clone());
        async move {
            match upload(&t, &tk[i as usize % tk.len()], "application/octet-stream", data).await {
                Some(mxc) => {
                    up.lock().push(mxc);
                    true
                }
                None => false,
            }
        }
    })
    .await;
    mb_per_s(&mut up_report, size);
    let ids: Arc<Vec<String>> = Arc::new(uploaded.lock().clone());
    if ids.is_empty() {
        bail!("no upload succeeded");
    }

    let (t, tk, ids2) = (target.clone(), tokens.clone(), ids.clone());
    let mut down_report = drive(&target, "download", load, move |i| {
        let (t, tk, ids) = (t.clone(), tk.clone(), ids2.clone());
        async move {
            let url = format!("{}/_matrix/client/v1/media/download/{}", t.url, ids[i as usize % ids.len()]);
            match t.http.get(url).bearer_auth(&tk[i as usize % tk.len()]).send().await {
                Ok(r) if r.status().is_success() => r.bytes().await.is_ok_and(|b| b.len() == size),
                _ => false,
            }
        }
    })
    .await;
    mb_per_s(&mut down_report, size);

    // Distinct photos, so that every first thumbnail request decodes and scales a full image.
    let mut photos = Vec::new();
    for n in 0..images.max(1) {
        let img = image::RgbImage::from_fn(1920, 1080, |x, y| {
            let v = (x ^ y).wrapping_mul(n as u32 + 3);
            image::Rgb([(x / 8 + n as u32) as u8, (y / 5) as u8, (v >> 3) as u8])
        });
        let mut buf = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img).write_to(&mut buf, image::ImageFormat::Jpeg)?;
        let token = &tokens[n % tokens.len()];
        photos.push(upload(&target, token, "image/jpeg", buf.into_inner().into()).await.context("photo upload")?);
    }
    let photos = Arc::new(photos);
    let thumbs = Load { requests: photos.len() as u64, ..load };
    let mut reports = vec![up_report, down_report];
    for name in ["thumbnail", "thumbnail-cached"] {
        let (t, tk, ph) = (target.clone(), tokens.clone(), photos.clone());
        let mut r = drive(&target, name, thumbs, move |i| {
            let (t, tk, ph) = (t.clone(), tk.clone(), ph.clone());
            async move {
                let url = format!(
                    "{}/_matrix/client/v1/media/thumbnail/{}?width=320&height=240&method=scale",
                    t.url,
                    ph[i as usize % ph.len()]
                );
                match t.http.get(url).bearer_auth(&tk[i as usize % tk.len()]).send().await {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                }
            }
        })
        .await;
        r.extra.insert("thumbnails_per_s".into(), json!(round(r.throughput_per_s)));
        reports.push(r);
    }
    Ok(reports)
}
