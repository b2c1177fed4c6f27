//! The `parvis` command: the homeserver and its operator tools.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use parvis::config::{Config, LogFormat};
use parvis::{server, storage, users};

#[derive(Parser)]
#[command(name = "parvis", version, about = "Parvis, a Matrix homeserver on PostgreSQL")]
struct Cli {
    /// Configuration file. Every key can be overridden by PARVIS__SECTION__KEY variables.
    #[arg(long, short, global = true, env = "PARVIS_CONFIG", default_value = "config/parvis.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the homeserver (the default).
    Serve,
    /// Create the database if missing and apply migrations, then exit.
    Migrate,
    /// Create a local account (asks for what is not given).
    CreateUser {
        #[arg(long, short)]
        username: Option<String>,
        /// The password; prefer the prompt, which keeps it out of the shell history.
        #[arg(long, short)]
        password: Option<String>,
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        display_name: Option<String>,
        /// `bot` or `support`.
        #[arg(long)]
        user_type: Option<String>,
    },
    /// Create a registration token for `m.login.registration_token` registration.
    CreateRegistrationToken {
        #[arg(long)]
        token: Option<String>,
        /// How many registrations it allows (unlimited if absent).
        #[arg(long)]
        uses: Option<i32>,
        /// Days until it expires (never if absent).
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// Load and validate the configuration, print it (secrets masked), and exit.
    CheckConfig,
    /// Export one local user's records to a zip archive: profile, the messages of every room
    /// they are or were in (JSON and readable HTML, as history visibility lets them see them),
    /// the media they uploaded. Shows progress on standard error.
    ExportUser {
        /// The user, e.g. `@agent:ville.fr`.
        user_id: String,
        /// The zip file to write.
        #[arg(long, short)]
        output: PathBuf,
        /// Replace the output file if it exists.
        #[arg(long)]
        force: bool,
        /// Most bytes of media in the archive (default: `records.max_media_bytes`); the uploads
        /// past it are listed as skipped.
        #[arg(long)]
        max_media_bytes: Option<u64>,
    },
    /// Meeting rooms: rooms with the Jitsi widget Element shows (`jitsi.domain` must be set).
    Meeting {
        #[command(subcommand)]
        command: MeetingCommand,
    },
    /// Alert webhooks (Alertmanager, Grafana, plain text) posting into a room as a bot, managed
    /// through the running server's admin API.
    Webhook {
        #[command(subcommand)]
        command: WebhookCommand,
        /// The server's client API (default: `http://` + `listen.client`).
        #[arg(long, global = true)]
        server_url: Option<String>,
        /// A server admin's access token.
        #[arg(long, env = "PARVIS_ADMIN_TOKEN", hide_env_values = true, global = true)]
        access_token: Option<String>,
    },
    /// Generate a signing key in Synapse's file format.
    GenerateSigningKey {
        /// Write to this file instead of standard output (refuses to overwrite).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum MeetingCommand {
    /// Create a meeting room through the running server's admin API (so that its clients see the
    /// room at once), and print the room, widget and conference IDs and the Jitsi link for guests
    /// as JSON.
    Create {
        /// The room's name.
        #[arg(long)]
        name: String,
        /// The local user who creates and administers the room (default: the admin whose token
        /// is used).
        #[arg(long)]
        creator: Option<String>,
        #[arg(long)]
        topic: Option<String>,
        /// A local user to invite (repeatable).
        #[arg(long)]
        invite: Vec<String>,
        /// An audio-only conference.
        #[arg(long)]
        audio_only: bool,
        /// A local alias for the room (its localpart).
        #[arg(long)]
        alias: Option<String>,
        /// The server's client API (default: `http://` + `listen.client`).
        #[arg(long)]
        server_url: Option<String>,
        /// A server admin's access token.
        #[arg(long, env = "PARVIS_ADMIN_TOKEN", hide_env_values = true)]
        access_token: String,
    },
}

#[derive(Subcommand)]
enum WebhookCommand {
    /// Create a hook; prints its ID, URL path and secret (shown once) as JSON.
    Create {
        /// The room the alerts go to (the bot joins it; invite it first into a private room,
        /// or be a member who may invite).
        #[arg(long)]
        room: String,
        /// A name for the hook (e.g. "Prometheus production").
        #[arg(long)]
        name: String,
        /// The bot's localpart or user ID (default `alerts`; created as a bot account).
        #[arg(long)]
        bot: Option<String>,
        /// A severity (`labels.severity`) whose firing alerts mention the room (repeatable).
        #[arg(long = "mention-severity")]
        mention_severities: Vec<String>,
    },
    /// List the hooks (revoked ones included).
    List,
    /// Revoke a hook: its URL answers 403 from then on.
    Revoke { hook_id: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parvis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::GenerateSigningKey { output }) = &cli.command {
        return generate_signing_key(output.as_deref());
    }
    let config = Config::load(&cli.config, std::env::vars())?;
    init_logging(&config);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
        Command::Migrate => {
            server::prepare(config).await?;
            println!("database is up to date");
            Ok(())
        }
        Command::CheckConfig => {
            let mut shown = config.clone();
            if shown.registration.shared_secret.is_some() {
                shown.registration.shared_secret = Some("***".into());
            }
            if shown.turn.shared_secret.is_some() {
                shown.turn.shared_secret = Some("***".into());
            }
            if shown.media.s3.secret_access_key.is_some() {
                shown.media.s3.secret_access_key = Some("***".into());
            }
            shown.database.url = storage::redact_url(&shown.database.url);
            println!("# configuration from {} is valid\n{}", cli.config.display(), toml::to_string_pretty(&shown)?);
            Ok(())
        }
        Command::CreateUser { username, password, admin, display_name, user_type } => {
            let state = server::prepare(config).await?;
            let username = match username {
                Some(u) => u,
                None => prompt("Username: ")?,
            };
            let password = match password {
                Some(p) => p,
                None => {
                    let p = rpassword::prompt_password("Password: ")?;
                    if rpassword::prompt_password("Confirm password: ")? != p {
                        bail!("passwords do not match");
                    }
                    p
                }
            };
            if let Some(t) = &user_type
                && !["bot", "support"].contains(&t.as_str())
            {
                bail!("--user-type must be `bot` or `support`");
            }
            let user_id = users::create_account(
                &state,
                users::NewAccount {
                    localpart: &username,
                    password: Some(&password),
                    is_admin: admin,
                    user_type: user_type.as_deref(),
                    displayname: display_name.as_deref(),
                    registration_token: None,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", e.errcode, e.message))?;
            println!("created {user_id}{}", if admin { " (admin)" } else { "" });
            Ok(())
        }
        Command::CreateRegistrationToken { token, uses, expires_in_days } => {
            let state = server::prepare(config).await?;
            let token = token.unwrap_or_else(|| hex::encode(rand::random::<[u8; 12]>()));
            let expiry = expires_in_days.map(|d| storage::now_ms() + i64::from(d) * 86_400_000);
            if !storage::registration::create_token(&state.db, &token, uses, expiry).await? {
                bail!("token {token} already exists");
            }
            println!("{token}");
            Ok(())
        }
        Command::ExportUser { user_id, output, force, max_media_bytes } => {
            export_user(config, &user_id, &output, force, max_media_bytes).await
        }
        Command::Meeting { command } => meeting(config, command).await,
        Command::Webhook { command, server_url, access_token } => {
            webhook(config, command, server_url, access_token).await
        }
        Command::GenerateSigningKey { .. } => unreachable!("handled above"),
    }
}

async fn webhook(
    config: Config,
    command: WebhookCommand,
    server_url: Option<String>,
    access_token: Option<String>,
) -> anyhow::Result<()> {
    server::install_crypto_provider();
    let token = access_token.context("an admin access token is needed: --access-token or PARVIS_ADMIN_TOKEN")?;
    let base = admin_base(&config, server_url);
    let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(60)).build()?;
    let url = format!("{base}/_parvis/admin/v1/webhooks");
    let req = match command {
        WebhookCommand::Create { room, name, bot, mention_severities } => http.post(&url).json(&serde_json::json!({
            "room_id": room, "name": name, "bot": bot, "mention_severities": mention_severities,
        })),
        WebhookCommand::List => http.get(&url),
        WebhookCommand::Revoke { hook_id } => http
            .delete(format!("{url}/{}", url::form_urlencoded::byte_serialize(hook_id.as_bytes()).collect::<String>())),
    };
    admin_call(req.bearer_auth(token.trim()), &base).await
}

/// Sends a CLI request to the running server's admin API and prints the JSON answer; a Matrix
/// error becomes the command's error.
async fn admin_call(req: reqwest::RequestBuilder, base: &str) -> anyhow::Result<()> {
    let resp = req.send().await.with_context(|| format!("cannot reach the server at {base}"))?;
    let status = resp.status();
    let answer: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        bail!(
            "{} {}: {}",
            status.as_u16(),
            answer["errcode"].as_str().unwrap_or("?"),
            answer["error"].as_str().unwrap_or("")
        );
    }
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

fn admin_base(config: &Config, server_url: Option<String>) -> String {
    match server_url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            let mut addr = config.listen.client;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        }
    }
}

async fn meeting(config: Config, command: MeetingCommand) -> anyhow::Result<()> {
    let MeetingCommand::Create { name, creator, topic, invite, audio_only, alias, server_url, access_token } = command;
    server::install_crypto_provider();
    let base = admin_base(&config, server_url);
    let body = serde_json::json!({
        "name": name, "creator": creator, "topic": topic, "invite": invite, "audio_only": audio_only,
        "room_alias_name": alias,
    });
    let req = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()?
        .post(format!("{base}/_parvis/admin/v1/meetings"))
        .bearer_auth(access_token.trim())
        .json(&body);
    admin_call(req, &base).await
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting Parvis");
    let state = server::prepare(config).await?;
    let mut running = server::start(state).await?;
    let stopper = running.stopper();
    tokio::spawn(async move {
        server::shutdown_signal().await;
        let _ = stopper.send(true);
    });
    running.wait().await?;
    running.state.db.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn export_user(
    config: Config,
    user_id: &str,
    output: &std::path::Path,
    force: bool,
    max_media_bytes: Option<u64>,
) -> anyhow::Result<()> {
    use parvis::records::{ExportError, ExportOptions, Progress};
    let exists = |p: &std::path::Path| p.try_exists().unwrap_or(false);
    if !force && exists(output) {
        bail!("{} exists already (use --force to replace it)", output.display());
    }
    let opts =
        ExportOptions { max_media_bytes: max_media_bytes.unwrap_or(config.records.max_media_bytes), overwrite: force };
    let state = server::prepare(config).await?;
    let bar = parking_lot::Mutex::new(ProgressBar::new());
    let report = |p: &Progress| bar.lock().draw(p, false);
    let result = tokio::select! {
        r = parvis::records::export_user(&state, user_id, output, &opts, &report) => Some(r),
        _ = server::shutdown_signal() => None,
    };
    state.db.close().await;
    let Some(result) = result else {
        // The export was dropped, which stops its writer; remove what it left.
        let partial = parvis::records::export::partial_path(output);
        let _ = std::fs::remove_file(parvis::records::archive::spill_path(&partial));
        let _ = std::fs::remove_file(&partial);
        bar.lock().end_line();
        bail!("export of {user_id} interrupted; nothing was written to {}", output.display());
    };
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            bar.lock().end_line();
            return Err(match e {
                ExportError::OutputExists(p) => {
                    anyhow::anyhow!("{} exists already (use --force to replace it)", p.display())
                }
                e => anyhow::anyhow!("export of {user_id} failed: {e}"),
            });
        }
    };
    let mut bar = bar.lock();
    bar.draw(&summary.progress, true);
    bar.end_line();
    let p = &summary.progress;
    println!(
        "exported {user_id} to {}: {} room(s), {} event(s), {} media file(s){}, {} bytes",
        output.display(),
        p.rooms_done,
        p.events,
        p.media_files,
        if p.media_skipped > 0 {
            format!(" ({} skipped, listed in manifest.json)", p.media_skipped)
        } else {
            String::new()
        },
        summary.size_bytes
    );
    Ok(())
}

/// A progress line on standard error: redrawn in place on a terminal (at most 10 times a
/// second), else one line per finished room.
struct ProgressBar {
    tty: bool,
    last: Option<std::time::Instant>,
    rooms_reported: u64,
    drawn: bool,
}

impl ProgressBar {
    fn new() -> Self {
        use std::io::IsTerminal;
        Self { tty: std::io::stderr().is_terminal(), last: None, rooms_reported: u64::MAX, drawn: false }
    }

    fn draw(&mut self, p: &parvis::records::Progress, force: bool) {
        let counts = format!(
            "rooms {}/{} | events {} | media {}{}",
            p.rooms_done,
            p.rooms_total,
            p.events,
            p.media_files,
            if p.media_skipped > 0 { format!(" ({} skipped)", p.media_skipped) } else { String::new() },
        );
        if !self.tty {
            if self.rooms_reported != p.rooms_done {
                self.rooms_reported = p.rooms_done;
                eprintln!("export: {counts}");
            }
            return;
        }
        let now = std::time::Instant::now();
        if !force && self.last.is_some_and(|t| now.duration_since(t).as_millis() < 100) {
            return;
        }
        self.last = Some(now);
        let width = 24u64;
        let filled = (p.rooms_done * width).checked_div(p.rooms_total).unwrap_or(width) as usize;
        // Room names are user-controlled: no control characters (escape sequences) reach the terminal.
        let room: String = p
            .room
            .as_deref()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control() && !matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'))
            .take(32)
            .collect();
        eprint!("\r\x1b[2K[{}{}] {counts} {room}", "#".repeat(filled), "-".repeat(width as usize - filled));
        let _ = std::io::stderr().flush();
        self.drawn = true;
    }

    fn end_line(&mut self) {
        if self.tty && self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

fn generate_signing_key(output: Option<&std::path::Path>) -> anyhow::Result<()> {
    let key = parvis::keys::ServerKey::generate();
    let text = key.to_synapse_format();
    match output {
        None => print!("{text}"),
        Some(path) => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            f.write_all(text.as_bytes())?;
            eprintln!("wrote {} ({})", path.display(), key.key_id);
        }
    }
    Ok(())
}

fn prompt(label: &str) -> anyhow::Result<String> {
    print!("{label}");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let line = line.trim().to_owned();
    if line.is_empty() {
        bail!("no value given");
    }
    Ok(line)
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| config.logging.filter.clone());
    let mut filter = EnvFilter::new(&directives);
    // ruma's authorisation checks log every accepted event at INFO: quiet them unless the
    // filter names them.
    if !directives.contains("ruma_state_res")
        && let Ok(d) = "ruma_state_res=warn".parse()
    {
        filter = filter.add_directive(d);
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.logging.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        LogFormat::Pretty => builder.init(),
    }
}
