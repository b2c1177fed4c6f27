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
//! parvis-bench --url ... join-storm --joiners 200
//! parvis-bench --url ... create-rooms --concurrency 8 --requests 500
//! parvis-bench --url ... mixed --steps 50,100,200,400 --step-seconds 30
//! parvis-bench --url ... smoke     # a few seconds of everything, for CI
//! ```
//!
//! Long phases draw a progress bar on stderr when it is a terminal (`--progress` forces it).
//!
//! With `--server-pid`, reports include the server's CPU time and resident memory (current and
//! peak) and the CPU time of PostgreSQL processes; with `--pg-url`, the number of PostgreSQL
//! transactions (statements outside a transaction count as one each) per request. PostgreSQL
//! publishes a backend's counts when it goes idle, at most once a second, so the figure is off
//! by up to about a second of activity at each end: use runs of 10 s or more.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "parvis-bench", about = "Load generator for Matrix homeservers")]
struct Cli {
    /// Base URL of the homeserver (loopback in tests). Several instances of one server:
    /// comma-separated URLs; requests are spread over them in turn, as a load balancer without
    /// stickiness would.
    #[arg(long, default_value = "http://127.0.0.1:8008")]
    url: String,
    /// Shared secret for /_synapse/admin/v1/register.
    #[arg(long, env = "BENCH_SHARED_SECRET")]
    shared_secret: Option<String>,
    /// Print results as JSON.
    #[arg(long)]
    json: bool,
    /// PID of the server process, to report its CPU time and memory (comma-separated for several
    /// instances: summed).
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// PostgreSQL URL of the server's database, to count transactions per request.
    #[arg(long)]
    pg_url: Option<String>,
    /// Draw progress bars on stderr even when it is not a terminal.
    #[arg(long)]
    progress: bool,
    /// Never draw progress bars.
    #[arg(long, conflicts_with = "progress")]
    no_progress: bool,
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
    /// `--joiners` users join one public room all at once: joins per second and join latency.
    JoinStorm {
        #[arg(long, default_value_t = 100)]
        joiners: usize,
    },
    /// Rooms created per second (private, with a name and a topic) by `--users` creators.
    CreateRooms(Load),
    /// A simulated office day ramped in steps of agents: each agent long-polls `/sync` in its
    /// team's room, and now and then types and sends a burst of messages; receivers send read
    /// receipts. A step is held when the p99 of sends, of receipts, of typing notifications and
    /// of deliveries (send to sync) all stay under `--objective-ms` with no error; reports the
    /// largest step held.
    Mixed(MixedArgs),
    /// Server-side search: `--senders` users send `--messages` generated French messages into
    /// `--rooms` rooms (message `i` is the same text on every server: a seeded generator over a
    /// French vocabulary with a Zipf-like word frequency), reporting send throughput; then one of
    /// them runs `--queries` searches per kind (a common word, a rare word, two words, a common
    /// word written without its accent), reporting latency and results.
    Search(SearchArgs),
    /// A few seconds of every scenario, with small numbers; exits non-zero on any error.
    Smoke,
    /// Simplified sliding sync (MSC4186) for a user in `--rooms` rooms (one message each):
    /// the first response of Element X's room list (every room, `timeline_limit` 1) on a new
    /// connection, then `--repeat` incremental requests with nothing new, then `--repeat`
    /// incremental requests each after one new message.
    SlidingSync {
        #[arg(long, default_value_t = 500)]
        rooms: usize,
        #[arg(long, default_value_t = 200)]
        repeat: usize,
    },
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

#[derive(clap::Args, Clone, Copy)]
struct SearchArgs {
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    #[arg(long, default_value_t = 20)]
    senders: usize,
    /// Searches measured per kind of query.
    #[arg(long, default_value_t = 100)]
    queries: u64,
    #[arg(long, default_value_t = 4)]
    query_concurrency: usize,
    /// Only the send phase (a server without search).
    #[arg(long)]
    no_queries: bool,
    /// Time limit of the send phase, in seconds.
    #[arg(long, default_value_t = 3600)]
    duration: u64,
    /// Parvis only (needs `--pg-url`): after the send phase, copy the sent messages in SQL
    /// (events and their index rows, new IDs and stream positions) until this many messages
    /// exist, to measure search over a large history without sending it all through the API.
    #[arg(long)]
    replicate_to: Option<u64>,
}

#[derive(clap::Args, Clone)]
struct MixedArgs {
    /// Agents at each step of the ramp (comma-separated, increasing); agents are only added.
    #[arg(long, value_delimiter = ',', default_values_t = [50, 100, 200, 400, 800, 1600])]
    steps: Vec<usize>,
    /// Measured seconds per step (after its agents are set up).
    #[arg(long, default_value_t = 30)]
    step_seconds: u64,
    /// Agents per room (a team); each agent is in its team's room.
    #[arg(long, default_value_t = 8)]
    room_size: usize,
    /// Mean seconds between an agent's bursts (exponentially distributed); a burst is typing
    /// then 1-3 messages.
    #[arg(long, default_value_t = 60.0)]
    think_s: f64,
    /// Probability that an agent sends a read receipt when its sync brings others' messages.
    #[arg(long, default_value_t = 0.5)]
    receipt_probability: f64,
    /// Long-poll timeout of the agents' `/sync`, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    poll_ms: u64,
    /// The latency objective: p99 in milliseconds of sends, of other requests and of deliveries.
    #[arg(long, default_value_t = 200.0)]
    objective_ms: f64,
    /// Keep ramping after a step misses the objective (by default the ramp stops there).
    #[arg(long)]
    all_steps: bool,
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
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Scenario-specific figures (delivery latency, response sizes, server resources...).
    #[serde(flatten)]
    extra: serde_json::Map<String, Value>,
    /// Errors are a measured outcome (a ramp step past capacity), not a failure of the tool.
    #[serde(skip)]
    may_fail: bool,
}

impl Report {
    fn new(scenario: impl Into<String>, requests: u64, errors: u64, seconds: f64, throughput: f64, p: Pct) -> Self {
        Report {
            scenario: scenario.into(),
            requests,
            errors,
            seconds,
            throughput_per_s: throughput,
            p50_ms: p.p50,
            p90_ms: p.p90,
            p95_ms: p.p95,
            p99_ms: p.p99,
            max_ms: p.max,
            extra: Default::default(),
            may_fail: false,
        }
    }

    fn set(&mut self, key: &str, value: impl serde::Serialize) {
        self.extra.insert(key.into(), json!(value));
    }

    /// Adds `{prefix}_p50_ms` ... `{prefix}_max_ms`.
    fn set_pct(&mut self, prefix: &str, p: Pct) {
        for (k, v) in [("p50", p.p50), ("p90", p.p90), ("p95", p.p95), ("p99", p.p99), ("max", p.max)] {
            self.set(&format!("{prefix}_{k}_ms"), v);
        }
    }
}

struct Target {
    http: reqwest::Client,
    urls: Vec<String>,
    next_url: AtomicUsize,
    secret: Option<String>,
    /// Distinguishes this run's users from earlier runs' on the same server.
    run_id: String,
    server_pids: Vec<u32>,
    pool: Option<sqlx::PgPool>,
}

impl Target {
    /// The next instance's base URL (round-robin).
    fn url(&self) -> &str {
        &self.urls[self.next_url.fetch_add(1, Ordering::Relaxed) % self.urls.len()]
    }
}

/// Resource counters sampled around the measured phase of a scenario (not its set-up).
struct Probe {
    proc: Option<(f64, u64, u64)>,
    pg_cpu: Option<f64>,
    tx: Option<i64>,
    client_cpu: Option<f64>,
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
        Self {
            proc: procs_stats(&t.server_pids),
            pg_cpu: (!t.server_pids.is_empty()).then(postgres_cpu),
            tx,
            client_cpu: proc_stats(std::process::id()).map(|p| p.0),
        }
    }

    async fn finish(self, t: &Target, report: &mut Report) {
        if let Some((cpu0, _, _)) = self.proc
            && let Some((cpu1, rss, hwm)) = procs_stats(&t.server_pids)
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
            let cpu = postgres_cpu() - cpu0;
            report.extra.insert("postgres_cpu_s".into(), json!(round(cpu)));
            report.extra.insert(
                "postgres_cpu_ms_per_request".into(),
                json!(round(1000.0 * cpu / report.requests.max(1) as f64)),
            );
        }
        // The load generator shares the machine: its own CPU time shows how much it took.
        if let (Some(cpu0), Some((cpu1, _, _))) = (self.client_cpu, proc_stats(std::process::id())) {
            report.extra.insert("client_cpu_s".into(), json!(round(cpu1 - cpu0)));
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
            self.http.get(format!("{}/_synapse/admin/v1/register", self.url())).send().await?.json().await?;
        let nonce = nonce["nonce"].as_str().context("no nonce (is shared-secret registration enabled?)")?;
        let mac = parvis::api::admin::register::compute_mac(secret, nonce, localpart, PASSWORD, false, None);
        let resp = self
            .http
            .post(format!("{}/_synapse/admin/v1/register", self.url()))
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

    /// Registers `n` users (a few at a time: password hashing is the server's bottleneck here),
    /// returning (localpart, access token) pairs in order.
    async fn users(self: &Arc<Self>, scenario: &str, n: usize) -> anyhow::Result<Vec<(String, String)>> {
        let progress = Progress::new(&format!("users {scenario}"), n as u64, None);
        let names: Vec<String> = (0..n).map(|i| format!("bench.{}.{scenario}.{i}", self.run_id)).collect();
        let (t, done) = (self.clone(), progress.counter());
        bounded(names, REGISTRATION_CONCURRENCY, move |name| {
            let (t, done) = (t.clone(), done.clone());
            async move {
                let token = t.register(&name).await?;
                done.fetch_add(1, Ordering::Relaxed);
                Ok((name, token))
            }
        })
        .await
    }

    /// A fresh login (a new device) for an existing user.
    async fn login_device(&self, name: &str) -> anyhow::Result<String> {
        let resp = self
            .http
            .post(format!("{}/_matrix/client/v3/login", self.url()))
            .json(&json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": name }, "password": PASSWORD }))
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("login {name}: {status} {v}");
        }
        Ok(v["access_token"].as_str().context("access_token")?.to_owned())
    }

    async fn get(&self, path: &str, token: &str) -> anyhow::Result<Value> {
        let resp = self.http.get(format!("{}{path}", self.url())).bearer_auth(token).send().await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{path}: {status} {v}");
        }
        Ok(v)
    }
}

/// Concurrent registrations: enough to keep two cores busy hashing passwords.
const REGISTRATION_CONCURRENCY: usize = 8;

/// Runs `f` over `items` with at most `limit` at a time; results in the order of `items`.
async fn bounded<T, R, F, Fut>(items: Vec<T>, limit: usize, f: F) -> anyhow::Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<R>> + Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(limit.max(1)));
    let f = Arc::new(f);
    let mut tasks = Vec::with_capacity(items.len());
    for item in items {
        let (sem, f) = (sem.clone(), f.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            f(item).await
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// Whether progress bars are drawn (set once from the command line).
static PROGRESS: AtomicBool = AtomicBool::new(false);

/// A one-line progress bar on stderr for phases that last more than a second: completed items out
/// of a bound, or elapsed time out of a time bound, whichever is further.
struct Progress {
    done: Arc<AtomicU64>,
    drawn: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn new(label: &str, total: u64, limit: Option<Duration>) -> Self {
        let done = Arc::new(AtomicU64::new(0));
        let drawn = Arc::new(AtomicBool::new(false));
        let task = PROGRESS.load(Ordering::Relaxed).then(|| {
            let (done, drawn, label) = (done.clone(), drawn.clone(), label.to_owned());
            tokio::spawn(async move {
                let start = Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let elapsed = start.elapsed();
                    if elapsed < Duration::from_secs(1) {
                        continue;
                    }
                    let n = done.load(Ordering::Relaxed);
                    let mut frac = if total > 0 { n as f64 / total as f64 } else { 0.0 };
                    if let Some(l) = limit {
                        frac = frac.max(elapsed.as_secs_f64() / l.as_secs_f64().max(0.001));
                    }
                    let filled = (frac.clamp(0.0, 1.0) * 30.0) as usize;
                    let count = if total > 0 { format!("{n}/{total}") } else { format!("{n}") };
                    eprint!(
                        "\r\x1b[2K{label:<22} [{}{}] {:>3.0}% {count} {:.0}s",
                        "#".repeat(filled),
                        "-".repeat(30 - filled),
                        frac.clamp(0.0, 1.0) * 100.0,
                        elapsed.as_secs_f64()
                    );
                    drawn.store(true, Ordering::Relaxed);
                }
            })
        });
        Self { done, drawn, task }
    }

    fn counter(&self) -> Arc<AtomicU64> {
        self.done.clone()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            if self.drawn.load(Ordering::Relaxed) {
                eprint!("\r\x1b[2K");
            }
        }
    }
}

/// Runs `op` from `concurrency` workers until `requests` or `duration` is reached.
async fn drive<F, Fut>(target: &Target, name: &str, load: Load, op: F) -> Report
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let progress = Progress::new(name, load.requests, Some(Duration::from_secs(load.duration)));
    let probe = Probe::start(target).await;
    let op = Arc::new(op);
    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(load.duration);
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..load.concurrency.max(1) {
        let (op, issued, errors, done) = (op.clone(), issued.clone(), errors.clone(), progress.counter());
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
                done.fetch_add(1, Ordering::Relaxed);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap_or_default());
    }
    let seconds = start.elapsed().as_secs_f64();
    drop(progress);
    let n = all.len() as u64;
    let mut report =
        Report::new(name, n, errors.load(Ordering::Relaxed), seconds, n as f64 / seconds, percentiles(all));
    probe.finish(target, &mut report).await;
    report
}

/// Latency percentiles, in milliseconds.
#[derive(Clone, Copy, Default, Debug)]
struct Pct {
    p50: f64,
    p90: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

/// Percentiles (nearest rank) of a list of latencies in microseconds.
fn percentiles(mut v: Vec<u64>) -> Pct {
    v.sort_unstable();
    let pct = |p: f64| {
        if v.is_empty() { 0.0 } else { v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1] as f64 / 1000.0 }
    };
    Pct {
        p50: pct(0.5),
        p90: pct(0.9),
        p95: pct(0.95),
        p99: pct(0.99),
        max: v.last().map(|m| *m as f64 / 1000.0).unwrap_or(0.0),
    }
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
                .post(format!("{}/_matrix/client/v3/login", t.url()))
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
            let r = t.http.get(format!("{}/_matrix/client/v3/account/whoami", t.url())).bearer_auth(token).send().await;
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
            self.http.request(method, format!("{}{path}", self.url())).bearer_auth(token).json(&body).send().await?;
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
        let mut url = format!("{}/_matrix/client/v3/sync?timeout={timeout_ms}", self.url());
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
    let mut report = Report::new(
        format!("fanout/{receivers}"),
        messages as u64,
        errors + expected.saturating_sub(delivered),
        seconds,
        delivered as f64 / seconds,
        percentiles(send_lat),
    );
    report.set("receivers", receivers);
    report.set("deliveries", delivered);
    report.set("deliveries_expected", expected);
    report.set_pct("delivery", percentiles(delivery));
    probe.finish(&target, &mut report).await;
    Ok(report)
}

/// Initial sync of a user in `rooms` rooms with `events` messages each.
async fn initial_sync(target: Arc<Target>, rooms: usize, events: usize, repeat: usize) -> anyhow::Result<Vec<Report>> {
    let users = target.users("initsync", 2).await?;
    let me_name = &users[0].0;
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
        let mut seconds = 0.0;
        // A new device for each sync: a server may cache an initial sync per (user, device,
        // filter) for minutes (Synapse does), and a repeat would measure that cache. The logins
        // happen before the measured phase.
        let mut devices = Vec::new();
        for _ in 0..repeat.max(1) {
            devices.push(target.login_device(me_name).await?);
        }
        let progress = Progress::new(name, repeat as u64, None);
        let probe = Probe::start(&target).await;
        for (i, token) in devices.iter().enumerate() {
            let t0 = Instant::now();
            let mut url = format!("{}/_matrix/client/v3/sync", target.url());
            if let Some(f) = filter {
                url.push_str(&format!("?filter={}", enc(f)));
            }
            match target.http.get(url).bearer_auth(token).send().await {
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
            let elapsed = t0.elapsed();
            seconds += elapsed.as_secs_f64();
            let us = elapsed.as_micros() as u64;
            if i == 0 {
                first_ms = us as f64 / 1000.0;
            }
            lat.push(us);
            progress.counter().fetch_add(1, Ordering::Relaxed);
        }
        drop(progress);
        let n = lat.len() as u64;
        let mut report = Report::new(name, n, errors, seconds, n as f64 / seconds, percentiles(lat));
        report.set("rooms", rooms);
        report.set("events_per_room", events);
        report.set("first_ms", first_ms);
        report.set("response_bytes", bytes);
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
        let mut report = Report::new(
            format!("{name}/{devices}"),
            rounds as u64,
            errors,
            seconds,
            rounds as f64 / seconds,
            percentiles(lat),
        );
        report.set("devices", devices);
        report.set("per_device_per_s", round(rounds as f64 * devices as f64 / seconds));
        probe.finish(&target, &mut report).await;
        reports.push(report);
    }
    Ok(reports)
}

/// `joiners` users join one public room at the same moment.
async fn join_storm(target: Arc<Target>, joiners: usize) -> anyhow::Result<Report> {
    let users = target.users("join", joiners + 1).await?;
    let owner = users[0].1.clone();
    let room = target.create_room(&owner).await?;
    let progress = Progress::new("join-storm", joiners as u64, None);
    let probe = Probe::start(&target).await;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(joiners);
    for (_, token) in &users[1..] {
        let (t, token, room, done) = (target.clone(), token.clone(), room.clone(), progress.counter());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let ok = t.join(&token, &room).await.is_ok();
            done.fetch_add(1, Ordering::Relaxed);
            (t0.elapsed().as_micros() as u64, ok)
        }));
    }
    let mut lat = Vec::with_capacity(joiners);
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok((us, ok)) => {
                lat.push(us);
                errors += u64::from(!ok);
            }
            Err(_) => errors += 1,
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    drop(progress);
    let n = lat.len() as u64;
    let mut report =
        Report::new(format!("join-storm/{joiners}"), n, errors, seconds, n as f64 / seconds, percentiles(lat));
    probe.finish(&target, &mut report).await;
    // Every join must have taken effect.
    let members = target.get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)), &owner).await?;
    let count = members["joined"].as_object().map_or(0, |m| m.len());
    report.set("members_after", count);
    report.errors += (joiners + 1).saturating_sub(count) as u64;
    Ok(report)
}

/// Rooms created per second: private rooms with a name and a topic, as a client creates them.
async fn create_rooms(target: Arc<Target>, load: Load) -> anyhow::Result<Report> {
    let users = target.users("create", load.users.max(1)).await?;
    let tokens: Arc<Vec<String>> = Arc::new(users.into_iter().map(|(_, t)| t).collect());
    Ok(drive(&target.clone(), "create-rooms", load, move |i| {
        let (t, tokens) = (target.clone(), tokens.clone());
        async move {
            let token = &tokens[i as usize % tokens.len()];
            let body = json!({ "preset": "private_chat", "name": format!("bench room {i}"), "topic": "parvis-bench" });
            t.call(reqwest::Method::POST, "/_matrix/client/v3/createRoom", token, body).await.is_ok()
        }
    })
    .await)
}

/// What a sample of the mixed scenario measured.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// A message sent (request latency).
    Send,
    /// A read receipt (request latency).
    Receipt,
    /// A typing notification, on or off (request latency).
    Typing,
    /// A message seen by a room-mate's sync (from before its send to the sync response).
    Delivery,
    /// A `/sync` response (latency not used: long-polls wait by design).
    Sync,
}

struct Sample {
    kind: Kind,
    /// Microseconds since the run's epoch when the measured interval began.
    start_us: u64,
    latency_us: u64,
    ok: bool,
}

struct Office {
    target: Arc<Target>,
    args: MixedArgs,
    epoch: Instant,
    stop: AtomicBool,
    samples: parking_lot::Mutex<Vec<Sample>>,
}

impl Office {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn record(&self, kind: Kind, start_us: u64, ok: bool) {
        let latency_us = self.now_us().saturating_sub(start_us);
        self.samples.lock().push(Sample { kind, start_us, latency_us, ok });
    }

    /// Removes and returns the samples that began before `until_us`.
    fn take_until(&self, until_us: u64) -> Vec<Sample> {
        let mut all = self.samples.lock();
        let (taken, kept): (Vec<Sample>, Vec<Sample>) = all.drain(..).partition(|s| s.start_us < until_us);
        *all = kept;
        taken
    }
}

/// Exponentially distributed pause with the given mean.
fn think(rng: &mut rand::rngs::StdRng, mean_s: f64) -> Duration {
    use rand::Rng;
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    Duration::from_secs_f64((-u.ln() * mean_s).min(mean_s * 10.0))
}

/// One agent's client: a long-poll loop (with read receipts), and a talker that now and then
/// types and sends a burst of messages in the team's room.
fn spawn_agent(
    office: Arc<Office>,
    token: String,
    user_id: String,
    room: String,
    filter: String,
    mut since: String,
) -> [tokio::task::JoinHandle<()>; 2] {
    use rand::{Rng, SeedableRng};
    let poller = {
        let (o, token, user_id) = (office.clone(), token.clone(), user_id.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::from_entropy();
            let receipt_busy = Arc::new(AtomicBool::new(false));
            for _ in 0..1_000_000 {
                if o.stop.load(Ordering::Relaxed) {
                    break;
                }
                match o.target.sync(&token, Some(&since), Some(&filter), o.args.poll_ms).await {
                    Ok(v) => {
                        // Counted when it answers (long-polls begin before the window).
                        o.record(Kind::Sync, o.now_us(), true);
                        let now = o.now_us();
                        let mut last = None;
                        let mut samples = Vec::new();
                        for (room_id, r) in v["rooms"]["join"].as_object().into_iter().flatten() {
                            for ev in r["timeline"]["events"].as_array().into_iter().flatten() {
                                if ev["sender"].as_str() == Some(&user_id) {
                                    continue;
                                }
                                if let Some(sent) = ev["content"]["sent_us"].as_u64() {
                                    samples.push(Sample {
                                        kind: Kind::Delivery,
                                        start_us: sent,
                                        latency_us: now.saturating_sub(sent),
                                        ok: true,
                                    });
                                    last = ev["event_id"].as_str().map(|e| (room_id.clone(), e.to_owned()));
                                }
                            }
                        }
                        o.samples.lock().extend(samples);
                        if let Some((room_id, event_id)) = last
                            && rng.gen_bool(o.args.receipt_probability.clamp(0.0, 1.0))
                            && !receipt_busy.swap(true, Ordering::Relaxed)
                        {
                            // Like a client, the receipt goes out while the next long-poll waits.
                            let (o, token, busy) = (o.clone(), token.clone(), receipt_busy.clone());
                            tokio::spawn(async move {
                                let path = format!(
                                    "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
                                    enc(&room_id),
                                    enc(&event_id)
                                );
                                let t0 = o.now_us();
                                let ok = o.target.call(reqwest::Method::POST, &path, &token, json!({})).await.is_ok();
                                o.record(Kind::Receipt, t0, ok);
                                busy.store(false, Ordering::Relaxed);
                            });
                        }
                        if let Some(n) = v["next_batch"].as_str() {
                            since = n.to_owned();
                        }
                    }
                    Err(_) => {
                        o.record(Kind::Sync, o.now_us(), false);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        })
    };
    let talker = tokio::spawn(async move {
        let o = office;
        let mut rng = rand::rngs::StdRng::from_entropy();
        let typing_path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&user_id));
        let mut n = 0u64;
        for _ in 0..100_000 {
            tokio::time::sleep(think(&mut rng, o.args.think_s)).await;
            if o.stop.load(Ordering::Relaxed) {
                break;
            }
            let t0 = o.now_us();
            let ok = o
                .target
                .call(reqwest::Method::PUT, &typing_path, &token, json!({ "typing": true, "timeout": 10_000 }))
                .await
                .is_ok();
            o.record(Kind::Typing, t0, ok);
            for _ in 0..rng.gen_range(1..=3) {
                // Typing time: 0.5-2 s, shorter when the agents are very talkative (smoke runs).
                let max_ms = (o.args.think_s * 500.0).clamp(1.0, 2000.0) as u64;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(max_ms / 4..=max_ms))).await;
                n += 1;
                let txn = format!("m{}-{n}", o.target.run_id);
                let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(&room));
                let t0 = o.now_us();
                let body = json!({ "msgtype": "m.text", "body": format!("message {n}"), "sent_us": t0 });
                let ok = o.target.call(reqwest::Method::PUT, &path, &token, body).await.is_ok();
                o.record(Kind::Send, t0, ok);
            }
            let t0 = o.now_us();
            let ok =
                o.target.call(reqwest::Method::PUT, &typing_path, &token, json!({ "typing": false })).await.is_ok();
            o.record(Kind::Typing, t0, ok);
        }
    });
    [poller, talker]
}

/// The office-day ramp; returns a report per step and a summary (`mixed`) last.
async fn mixed(target: Arc<Target>, args: MixedArgs, strict: bool) -> anyhow::Result<Vec<Report>> {
    let room_size = args.room_size.max(1);
    let steps = args.steps.clone();
    let office = Arc::new(Office {
        target: target.clone(),
        args: args.clone(),
        epoch: Instant::now(),
        stop: AtomicBool::new(false),
        samples: parking_lot::Mutex::new(Vec::new()),
    });
    // Like Element: one uploaded filter, members lazy-loaded.
    let filter = json!({ "room": { "state": { "lazy_load_members": true }, "timeline": { "limit": 20 } } });
    let mut rooms: Vec<String> = Vec::new();
    let mut agents = 0usize;
    let mut handles = Vec::new();
    let mut reports = Vec::new();
    let mut summary_steps = Vec::new();
    let mut held: Option<usize> = None;
    let mut held_report: Option<Pct> = None;
    let mut total_requests = 0;
    for (step, &want) in steps.iter().enumerate() {
        if want <= agents {
            continue;
        }
        // Set up the new agents while the others go on (outside the measured window).
        let users = target.users(&format!("mixed{step}"), want - agents).await?;
        let first = agents;
        let mut joins = Vec::new();
        let mut creators = Vec::new();
        for (k, (name, token)) in users.into_iter().enumerate() {
            let i = first + k;
            if i.is_multiple_of(room_size) {
                creators.push((i / room_size, name, token));
            } else {
                joins.push((i / room_size, name, token));
            }
        }
        let t = target.clone();
        let created = bounded(creators.clone(), REGISTRATION_CONCURRENCY, move |(team, _, token)| {
            let t = t.clone();
            async move { Ok((team, t.create_room(&token).await?)) }
        })
        .await?;
        for (team, room) in created {
            debug_assert_eq!(team, rooms.len());
            rooms.push(room);
        }
        let rooms_now = Arc::new(rooms.clone());
        let t = target.clone();
        let r = rooms_now.clone();
        bounded(joins.clone(), REGISTRATION_CONCURRENCY, move |(team, _, token)| {
            let (t, r) = (t.clone(), r.clone());
            async move { t.join(&token, &r[team]).await }
        })
        .await?;
        let (t, filter) = (target.clone(), filter.clone());
        let ready =
            bounded(creators.into_iter().chain(joins).collect(), REGISTRATION_CONCURRENCY, move |(team, _, token)| {
                let (t, filter, r) = (t.clone(), filter.clone(), rooms_now.clone());
                async move {
                    let me = t.get("/_matrix/client/v3/account/whoami", &token).await?;
                    let user_id = me["user_id"].as_str().context("user_id")?.to_owned();
                    let path = format!("/_matrix/client/v3/user/{}/filter", enc(&user_id));
                    let f = t.call(reqwest::Method::POST, &path, &token, filter).await?;
                    let filter_id = f["filter_id"].as_str().context("filter_id")?.to_owned();
                    let v = t.sync(&token, None, Some(&filter_id), 0).await?;
                    let since = v["next_batch"].as_str().context("next_batch")?.to_owned();
                    Ok((token, user_id, r[team].clone(), filter_id, since))
                }
            })
            .await?;
        for (token, user_id, room, filter_id, since) in ready {
            handles.extend(spawn_agent(office.clone(), token, user_id, room, filter_id, since));
        }
        agents = want;
        // Let the new agents reach their long-polls, then measure.
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(office.take_until(office.now_us()));
        let name = format!("mixed/{agents}");
        let progress = Progress::new(&name, 0, Some(Duration::from_secs(args.step_seconds)));
        let probe = Probe::start(&target).await;
        let window_start = office.now_us();
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.step_seconds)).await;
        let seconds = start.elapsed().as_secs_f64();
        let window_end = office.now_us();
        // Requests begun in the window may still be running: give them a moment (they are
        // counted with their full latency), then take every sample begun in the window.
        tokio::time::sleep(Duration::from_millis((2.0 * args.objective_ms).max(1000.0) as u64)).await;
        drop(progress);
        let samples = office.take_until(window_end);
        let samples: Vec<&Sample> = samples.iter().filter(|s| s.start_us >= window_start).collect();
        let lat = |k: Kind| samples.iter().filter(|s| s.kind == k && s.ok).map(|s| s.latency_us).collect::<Vec<_>>();
        let errs = |k: Kind| samples.iter().filter(|s| s.kind == k && !s.ok).count() as u64;
        let (sends, receipts, typing) = (lat(Kind::Send), lat(Kind::Receipt), lat(Kind::Typing));
        let deliveries = lat(Kind::Delivery);
        let syncs = samples.iter().filter(|s| s.kind == Kind::Sync).count();
        let (n_sends, n_receipts, n_typing, n_deliveries) =
            (sends.len(), receipts.len(), typing.len(), deliveries.len());
        let errors = errs(Kind::Send) + errs(Kind::Receipt) + errs(Kind::Typing) + errs(Kind::Sync);
        let (ps, pr, pt, pd) =
            (percentiles(sends), percentiles(receipts), percentiles(typing), percentiles(deliveries));
        let ok = errors == 0 && [ps.p99, pr.p99, pt.p99, pd.p99].iter().all(|p| *p < args.objective_ms);
        let requests = (n_sends + n_receipts + n_typing) as u64;
        total_requests += requests;
        let mut report = Report::new(&name, requests, errors, seconds, requests as f64 / seconds, ps);
        report.may_fail = !strict;
        report.set("agents", agents);
        report.set("rooms", rooms.len());
        report.set("held", ok);
        report.set("sends", n_sends);
        report.set("sends_per_s", round(n_sends as f64 / seconds));
        report.set("send_errors", errs(Kind::Send));
        report.set("receipts", n_receipts);
        report.set("receipt_errors", errs(Kind::Receipt));
        report.set_pct("receipt", pr);
        report.set("typing_requests", n_typing);
        report.set("typing_errors", errs(Kind::Typing));
        report.set_pct("typing", pt);
        report.set("deliveries", n_deliveries);
        report.set_pct("delivery", pd);
        report.set("sync_responses_per_s", round(syncs as f64 / seconds));
        report.set("sync_errors", errs(Kind::Sync));
        probe.finish(&target, &mut report).await;
        summary_steps.push(json!({
            "agents": agents,
            "held": ok,
            "sends_per_s": round(n_sends as f64 / seconds),
            "send_p99_ms": ps.p99,
            "receipt_p99_ms": pr.p99,
            "typing_p99_ms": pt.p99,
            "delivery_p99_ms": pd.p99,
            "errors": errors,
            "server_cpu_s": report.extra.get("server_cpu_s"),
            "server_peak_rss_mb": report.extra.get("server_peak_rss_mb"),
        }));
        reports.push(report);
        if ok && held.is_none_or(|h| h < agents) {
            held = Some(agents);
            held_report = Some(ps);
        }
        if !ok && !args.all_steps {
            break;
        }
    }
    office.stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.abort();
    }
    let mut summary = Report::new(
        "mixed",
        total_requests,
        0,
        reports.iter().map(|r| r.seconds).sum(),
        0.0,
        held_report.unwrap_or_default(),
    );
    summary.throughput_per_s = total_requests as f64 / summary.seconds.max(0.001);
    summary.set("agents_held", held.unwrap_or(0));
    summary.set("objective_ms", args.objective_ms);
    summary.set("room_size", room_size);
    summary.set("think_s", args.think_s);
    summary.set("steps", summary_steps);
    reports.push(summary);
    Ok(reports)
}

/// CPU seconds, RSS and peak RSS (KiB) summed over `pids` (None if any cannot be read).
fn procs_stats(pids: &[u32]) -> Option<(f64, u64, u64)> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold((0.0, 0, 0), |(c, r, h), p| proc_stats(*p).map(|(c1, r1, h1)| (c + c1, r + r1, h + h1)))
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
            "{:<18} {:>7} req {:>4} err {:>7.2}s {:>9.1} /s  p50 {:>7.2} ms  p95 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
            report.scenario,
            report.requests,
            report.errors,
            report.seconds,
            report.throughput_per_s,
            report.p50_ms,
            report.p95_ms,
            report.p99_ms,
            report.max_ms
        );
        if !report.extra.is_empty() {
            let parts: Vec<String> = report.extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("{:<18} {}", "", parts.join("  "));
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    PROGRESS.store(cli.progress || (!cli.no_progress && std::io::stderr().is_terminal()), Ordering::Relaxed);
    let urls: Vec<String> = cli.url.split(',').map(|u| u.trim().trim_end_matches('/').to_owned()).collect();
    for url in &urls {
        let parsed = url::Url::parse(url).context("invalid --url")?;
        if !matches!(parsed.scheme(), "http" | "https") {
            bail!("--url must be http(s)");
        }
    }
    let pool = match &cli.pg_url {
        Some(u) => Some(sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(u).await.context("--pg-url")?),
        None => None,
    };
    let target = Arc::new(Target {
        http: reqwest::Client::builder().pool_max_idle_per_host(16_384).timeout(Duration::from_secs(60)).build()?,
        urls,
        next_url: AtomicUsize::new(0),
        secret: cli.shared_secret,
        run_id: format!("{:x}", rand::random::<u32>()),
        server_pids: cli.server_pid,
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
        Scenario::JoinStorm { joiners } => vec![join_storm(target, joiners).await?],
        Scenario::CreateRooms(l) => vec![create_rooms(target, l).await?],
        Scenario::Mixed(args) => mixed(target, args, false).await?,
        Scenario::Search(args) => search(target, args).await?,
        Scenario::SlidingSync { rooms, repeat } => sliding_sync(target, rooms, repeat).await?,
        Scenario::Smoke => {
            let small = Load { concurrency: 4, requests: 200, duration: 10, users: 2 };
            let mut v = vec![
                login(target.clone(), Load { requests: 8, ..small }).await?,
                whoami(target.clone(), small).await?,
                send(target.clone(), Load { requests: 40, ..small }, 2).await?,
                incremental_sync(target.clone(), small).await?,
                fanout(target.clone(), 3, 5, 20).await?,
            ];
            v.extend(initial_sync(target.clone(), 3, 5, 2).await?);
            v.push(join_storm(target.clone(), 5).await?);
            v.push(create_rooms(target.clone(), Load { requests: 10, ..small }).await?);
            let office = MixedArgs {
                steps: vec![4],
                step_seconds: 3,
                room_size: 2,
                think_s: 0.5,
                receipt_probability: 1.0,
                poll_ms: 2_000,
                objective_ms: 1_000.0,
                all_steps: false,
            };
            v.extend(mixed(target.clone(), office, true).await?);
            let small_search = SearchArgs {
                messages: 60,
                rooms: 2,
                senders: 2,
                queries: 4,
                query_concurrency: 2,
                no_queries: false,
                duration: 20,
                replicate_to: None,
            };
            v.extend(search(target, small_search).await?);
            v
        }
    };
    let mut failed = false;
    for r in &reports {
        print(r, cli.json);
        failed |= (r.errors > 0 && !r.may_fail) || r.requests == 0;
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
            .post(format!("{}/_matrix/media/v3/upload", t.url()))
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
            let url = format!("{}/_matrix/client/v1/media/download/{}", t.url(), ids[i as usize % ids.len()]);
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
                    t.url(),
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

/// The vocabulary of generated messages, most frequent first (a municipal office's words).
const VOCABULARY: &[&str] = &[
    "le",
    "la",
    "les",
    "de",
    "des",
    "du",
    "et",
    "à",
    "pour",
    "avec",
    "dans",
    "sur",
    "une",
    "un",
    "est",
    "réunion",
    "mairie",
    "conseil",
    "service",
    "dossier",
    "demain",
    "lundi",
    "agents",
    "budget",
    "équipe",
    "école",
    "travaux",
    "voirie",
    "marché",
    "rapport",
    "délibération",
    "élus",
    "salle",
    "horaires",
    "accueil",
    "citoyens",
    "urbanisme",
    "permis",
    "déchets",
    "collecte",
    "transport",
    "bibliothèque",
    "piscine",
    "crèche",
    "cantine",
    "subvention",
    "association",
    "festival",
    "sécurité",
    "police",
    "pompiers",
    "éclairage",
    "parking",
    "stationnement",
    "vélo",
    "tramway",
    "bus",
    "chantier",
    "réseau",
    "eau",
    "assainissement",
    "énergie",
    "chauffage",
    "bâtiment",
    "gymnase",
    "stade",
    "cimetière",
    "état",
    "civil",
    "mariage",
    "naissance",
    "élection",
    "bureau",
    "vote",
    "recensement",
    "formulaire",
    "courrier",
    "signature",
    "arrêté",
    "préfecture",
    "métropole",
    "commune",
    "quartier",
    "habitants",
    "réclamation",
    "incident",
    "panne",
    "alerte",
    "astreinte",
    "intervention",
    "planning",
    "congés",
    "formation",
    "recrutement",
    "entretien",
    "facture",
    "paiement",
    "commande",
    "fournisseur",
    "contrat",
    "appel",
    "offres",
    "archives",
    "numérique",
    "logiciel",
    "serveur",
    "messagerie",
    "visioconférence",
    "imprimante",
    "téléphone",
    "badge",
    "clés",
    "véhicule",
    "garage",
    "espaces",
    "verts",
    "arbres",
    "fleurissement",
    "propreté",
    "tags",
    "graffitis",
    "inondation",
    "canicule",
    "neige",
    "salage",
    "déneigement",
    "tempête",
    "vigilance",
    "évacuation",
    "hébergement",
    "solidarité",
    "seniors",
    "jeunesse",
    "sport",
    "culture",
    "patrimoine",
    "musée",
    "théâtre",
    "concert",
    "exposition",
    "inauguration",
    "cérémonie",
    "commémoration",
    "jumelage",
    "tourisme",
    "camping",
    "plage",
    "port",
    "écluse",
    "pont",
    "tunnel",
    "rocade",
    "giratoire",
    "signalisation",
    "feux",
    "radar",
    "vidéoprotection",
    "médiathèque",
    "ludothèque",
    "conservatoire",
    "périscolaire",
    "restauration",
    "allergènes",
    "menus",
    "inscriptions",
    "tarifs",
    "quotient",
    "familial",
    "aides",
    "logement",
    "social",
    "insertion",
    "emploi",
    "commerce",
    "artisanat",
    "agriculture",
    "forêt",
    "chasse",
    "pêche",
    "randonnée",
];

/// Message `i`: the same text on every server and every run.
fn french_message(i: u64) -> String {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5e4c_0000 ^ i);
    let n = rng.gen_range(4..=14);
    let words: Vec<&str> = (0..n)
        .map(|_| {
            // Zipf-like: small indices (common words) far more often than the tail.
            let u: f64 = rng.r#gen();
            VOCABULARY[((u * u * u) * VOCABULARY.len() as f64) as usize % VOCABULARY.len()]
        })
        .collect();
    let mut s = words.join(" ");
    if let Some(first) = s.get(..1) {
        s = first.to_uppercase() + &s[1..];
    }
    s
}

/// The `search` scenario (see `Scenario::Search`).
async fn search(target: Arc<Target>, args: SearchArgs) -> anyhow::Result<Vec<Report>> {
    let users = target.users("search", args.senders.max(1)).await?;
    let mut rooms = Vec::new();
    for _ in 0..args.rooms.max(1) {
        rooms.push(target.create_room(&users[0].1).await?);
    }
    for (_, token) in users.iter().skip(1) {
        for r in &rooms {
            target.join(token, r).await?;
        }
    }
    let (users, rooms) = (Arc::new(users), Arc::new(rooms));
    let load = Load { concurrency: users.len(), requests: args.messages, duration: args.duration, users: users.len() };
    let (t, u, r) = (target.clone(), users.clone(), rooms.clone());
    let mut send_report = drive(&target.clone(), "search/send", load, move |i| {
        let (t, u, r) = (t.clone(), u.clone(), r.clone());
        async move {
            let token = &u[i as usize % u.len()].1;
            let room = &r[i as usize % r.len()];
            t.send_text(token, room, &format!("s{}-{i}", t.run_id), &french_message(i)).await.is_ok()
        }
    })
    .await;
    send_report.set("messages", args.messages);
    if let Some(total) = args.replicate_to {
        let pool = target.pool.as_ref().context("--replicate-to needs --pg-url")?;
        let t = Instant::now();
        let n = replicate_messages(pool, total).await?;
        send_report.set("replicated_to", n);
        send_report.set("replication_s", round(t.elapsed().as_secs_f64()));
    }
    let mut reports = vec![send_report];
    if args.no_queries {
        return Ok(reports);
    }
    let searcher = users[0].1.clone();
    for (kind, term) in
        [("common", "réunion"), ("rare", "ludothèque"), ("two-words", "budget conseil"), ("no-accent", "reunion")]
    {
        let found = Arc::new(AtomicU64::new(0));
        let counted = Arc::new(AtomicU64::new(0));
        let (t, s, f, c) = (target.clone(), searcher.clone(), found.clone(), counted.clone());
        let load = Load { concurrency: args.query_concurrency.max(1), requests: args.queries, duration: 600, users: 1 };
        let mut report = drive(&target.clone(), &format!("search/{kind}"), load, move |_| {
            let (t, s, f, c) = (t.clone(), s.clone(), f.clone(), c.clone());
            async move {
                let body = json!({ "search_categories": { "room_events": {
                    "search_term": term, "order_by": "rank", "filter": { "limit": 10 } } } });
                match t.call(reqwest::Method::POST, "/_matrix/client/v3/search", &s, body).await {
                    Ok(v) => {
                        let events = &v["search_categories"]["room_events"];
                        f.fetch_add(events["results"].as_array().map_or(0, |r| r.len()) as u64, Ordering::Relaxed);
                        c.fetch_add(events["count"].as_u64().unwrap_or(0), Ordering::Relaxed);
                        true
                    }
                    Err(_) => false,
                }
            }
        })
        .await;
        let n = report.requests.max(1);
        report.set("term", term);
        report.set("results_per_query", found.load(Ordering::Relaxed) / n);
        report.set("count_per_query", counted.load(Ordering::Relaxed) / n);
        reports.push(report);
    }
    Ok(reports)
}

/// Copies the messages sent through the API (events and full-text index rows) in rounds until
/// `total` messages exist (Parvis's schema). Returns the number of messages.
async fn replicate_messages(pool: &sqlx::PgPool, total: u64) -> anyhow::Result<i64> {
    let originals: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'm.room.message' AND event_id NOT LIKE '$copy%'",
    )
    .fetch_one(pool)
    .await?;
    if originals == 0 {
        bail!("no message to replicate");
    }
    let mut count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'm.room.message'").fetch_one(pool).await?;
    let mut round = 0i64;
    while (count as u64) < total {
        round += 1;
        let take = (total as i64 - count).min(originals);
        let config: Option<String> = sqlx::query_scalar("SELECT value FROM server_meta WHERE key = 'search_language'")
            .fetch_optional(pool)
            .await?;
        let config = format!("parvis_{}", config.as_deref().unwrap_or("french"));
        sqlx::query(
            "WITH ins AS (
                 INSERT INTO events (event_id, room_nid, stream_ordering, depth, event_type, state_key, sender,
                                     origin_server_ts, json, state_before, state_after)
                 SELECT '$copy' || $1 || '_' || e.event_nid, e.room_nid, nextval('event_stream_seq'), e.depth,
                        e.event_type, NULL, e.sender, e.origin_server_ts, e.json, e.state_before, e.state_after
                 FROM events e WHERE e.event_type = 'm.room.message' AND e.event_id NOT LIKE '$copy%'
                 ORDER BY e.event_nid LIMIT $2
                 RETURNING event_nid, room_nid, stream_ordering, sender, event_type, json)
             INSERT INTO event_search (event_nid, room_nid, stream_ordering, key, sender, event_type, vector)
             SELECT event_nid, room_nid, stream_ordering, 'content.body', sender, event_type,
                    to_tsvector($3::regconfig, coalesce((json::jsonb -> 'content') ->> 'body', ''))
             FROM ins",
        )
        .bind(round)
        .bind(take)
        .bind(&config)
        .execute(pool)
        .await?;
        count += take;
        eprintln!("replicated {count} / {total} messages");
    }
    sqlx::query("ANALYZE events").execute(pool).await?;
    sqlx::query("ANALYZE event_search").execute(pool).await?;
    Ok(count)
}

/// The `sliding-sync` scenario (see `Scenario::SlidingSync`).
async fn sliding_sync(target: Arc<Target>, rooms: usize, repeat: usize) -> anyhow::Result<Vec<Report>> {
    const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
    let users = target.users("sliding", 1).await?;
    let me = users[0].1.clone();
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut fills = Vec::new();
    let ids = Arc::new(parking_lot::Mutex::new(Vec::new()));
    for r in 0..rooms {
        let (t, me, sem, ids) = (target.clone(), me.clone(), sem.clone(), ids.clone());
        fills.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let room = t.create_room(&me).await?;
            t.send_text(&me, &room, &format!("s{}-{r}", t.run_id), &format!("message of room {r}")).await?;
            ids.lock().push(room);
            anyhow::Ok(())
        }));
    }
    for f in fills {
        f.await??;
    }
    let room_ids = ids.lock().clone();
    // What Element X's room list asks for.
    let body = |end: usize| {
        json!({
            "conn_id": format!("room-list-{}", target.run_id),
            "lists": { "all_rooms": {
                "ranges": [[0, end]], "timeline_limit": 1,
                "required_state": [
                    ["m.room.encryption", ""], ["m.room.member", "$LAZY"], ["m.room.member", "$ME"],
                    ["m.room.name", ""], ["m.room.avatar", ""], ["m.room.create", ""], ["m.room.power_levels", ""],
                    ["m.room.join_rules", ""], ["m.room.canonical_alias", ""], ["m.room.topic", ""]
                ],
                "filters": { "not_room_types": ["m.space"] }, "include_heroes": true
            }},
            "extensions": { "account_data": { "enabled": true }, "receipts": { "enabled": true },
                            "typing": { "enabled": true } }
        })
    };
    let post = |pos: Option<String>, body: Value| {
        let t = target.clone();
        let me = me.clone();
        async move {
            let mut url = format!("{}{PATH}?timeout=0", t.url());
            if let Some(p) = pos {
                url.push_str(&format!("&pos={}", enc(&p)));
            }
            let r = t.http.post(url).bearer_auth(&me).json(&body).send().await?;
            let status = r.status();
            let bytes = r.bytes().await?;
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if !status.is_success() {
                bail!("sliding sync: {status} {v}");
            }
            anyhow::Ok((v, bytes.len()))
        }
    };
    let mut reports = Vec::new();

    // First response on a new connection (the server's room cache is warm after the set-up, as
    // for a user who was active; a cold cache adds one query per room).
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut bytes = 0;
    let mut pos = None;
    let probe = Probe::start(&target).await;
    let start = Instant::now();
    let first_runs = 10;
    for i in 0..first_runs {
        let mut b = body(rooms.saturating_sub(1));
        b["conn_id"] = json!(format!("first-{}-{i}", target.run_id));
        let t0 = Instant::now();
        match post(None, b).await {
            Ok((v, n)) if v["rooms"].as_object().is_some_and(|o| o.len() == rooms) => {
                bytes = n;
                pos = v["pos"].as_str().map(str::to_owned);
            }
            _ => errors += 1,
        }
        lat.push(t0.elapsed().as_micros() as u64);
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut report =
        Report::new("sliding-sync/first", first_runs, errors, seconds, first_runs as f64 / seconds, percentiles(lat));
    report.set("rooms", rooms);
    report.set("response_bytes", bytes);
    probe.finish(&target, &mut report).await;
    reports.push(report);
    let conn = format!("first-{}-{}", target.run_id, first_runs - 1);
    let mut b = body(rooms.saturating_sub(1));
    b["conn_id"] = json!(conn);
    let mut pos = pos.context("a position")?;

    // Nothing new.
    let mut lat = Vec::new();
    let mut errors = 0;
    let probe = Probe::start(&target).await;
    let start = Instant::now();
    for _ in 0..repeat {
        let t0 = Instant::now();
        match post(Some(pos.clone()), b.clone()).await {
            Ok((v, _)) if v["rooms"].as_object().is_some_and(|o| o.is_empty()) => {}
            _ => errors += 1,
        }
        lat.push(t0.elapsed().as_micros() as u64);
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut report = Report::new(
        "sliding-sync/nothing-new",
        repeat as u64,
        errors,
        seconds,
        repeat as f64 / seconds,
        percentiles(lat),
    );
    report.set("rooms", rooms);
    probe.finish(&target, &mut report).await;
    reports.push(report);

    // One new message before each request (only the request is timed).
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut seconds = 0.0;
    let probe = Probe::start(&target).await;
    for i in 0..repeat {
        let room = &room_ids[i % room_ids.len()];
        target.send_text(&me, room, &format!("n{}-{i}", target.run_id), "du nouveau").await?;
        let t0 = Instant::now();
        match post(Some(pos.clone()), b.clone()).await {
            Ok((v, _)) if v["rooms"].get(room).is_some() => {
                pos = v["pos"].as_str().context("pos")?.to_owned();
            }
            _ => errors += 1,
        }
        let e = t0.elapsed();
        seconds += e.as_secs_f64();
        lat.push(e.as_micros() as u64);
    }
    let mut report = Report::new(
        "sliding-sync/one-message",
        repeat as u64,
        errors,
        seconds,
        repeat as f64 / seconds,
        percentiles(lat),
    );
    report.set("rooms", rooms);
    probe.finish(&target, &mut report).await;
    reports.push(report);
    Ok(reports)
}
