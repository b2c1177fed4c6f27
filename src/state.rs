//! Shared application state, handed to every handler.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::broadcast;

use crate::auth::AuthService;
use crate::config::Config;
use crate::http::metrics::Metrics;
use crate::http::ratelimit::RateLimiters;
use crate::keys::ServerKey;
use crate::rooms::RoomLocks;
use crate::rooms::typing::Typing;
use crate::users::password::Passwords;
use crate::users::profile::ProfileChange;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub db: PgPool,
    pub server_key: ServerKey,
    pub auth: AuthService,
    pub passwords: Passwords,
    pub rate_limits: RateLimiters,
    pub metrics: Metrics,
    /// Profile changes, for the room engine and user directory to follow.
    pub profile_changes: broadcast::Sender<ProfileChange>,
    /// The server key in the form ruma signs events with.
    pub event_signer: ruma::signatures::Ed25519KeyPair,
    /// In-process per-room write locks (the database lock is the authority).
    pub room_locks: RoomLocks,
    /// Immutable facts about rooms (ID, number, version), by room ID.
    pub room_cache: moka::sync::Cache<String, crate::rooms::Room>,
    /// The highest event stream position committed by this process; sync waits on it.
    pub event_stream: tokio::sync::watch::Sender<i64>,
    /// Same, for the account data stream (storage::account_data) and the receipt stream.
    pub account_data_stream: tokio::sync::watch::Sender<i64>,
    pub receipt_stream: tokio::sync::watch::Sender<i64>,
    pub presence_stream: tokio::sync::watch::Sender<i64>,
    /// The to-device and device-list streams (encryption).
    pub to_device_stream: tokio::sync::watch::Sender<i64>,
    pub device_list_stream: tokio::sync::watch::Sender<i64>,
    /// Who is typing where (in memory only).
    pub typing: Typing,
    /// Stored sync filters, parsed, by (user, filter ID): they never change.
    pub filter_cache: moka::sync::Cache<(String, i64), crate::sync::filter::Filter>,
    /// Receipt writes waiting for group commit.
    pub receipt_queue: crate::rooms::receipts::ReceiptQueue,
    /// The sync engine's caches, stream heads and notifier.
    pub sync: crate::sync::cache::SyncCaches,
    /// Simplified sliding sync: connection positions, bump stamps, `m.direct` rooms.
    pub sliding: crate::sync::sliding::SlidingCaches,
    /// Push settings (rulesets, ignore lists) of users, for rule evaluation.
    pub push_rules: crate::push::eval::RulesCache,
    /// Room state as push evaluation last saw it, per room.
    pub push_views: crate::push::eval::ViewCache,
    /// Delivery to push gateways.
    pub push_gateway: crate::push::gateway::Gateway,
    /// The media repository: store, thumbnails, URL previews, antivirus hook.
    pub media: crate::media::Media,
    /// Per-user export jobs run by this instance (records).
    pub records: crate::records::jobs::Exports,
    /// Single sign-on providers (`m.login.sso`).
    pub sso: crate::sso::Sso,
    /// Calls and meetings: rate limiters, the delayed-event sender's wake-up.
    pub rtc: crate::rtc::Rtc,
    /// Registered application services (read from their registration files at start-up).
    pub appservices: Arc<crate::appservice::AppServices>,
    /// Ephemeral data waiting for the appservice delivery tasks, and their wake-ups.
    pub appservice_outbox: crate::appservice::sender::Outbox,
    /// The live WebSocket connections of appservices using that transport (one each).
    pub appservice_sockets: crate::appservice::websocket::Sockets,
    /// The HTTP client for requests to appservices.
    pub appservice_http: reqwest::Client,
    /// Alert webhooks: per-hook rate limits.
    pub webhooks: crate::webhooks::Webhooks,
    /// The other instances on this database, and what this one tells them.
    pub cluster: Arc<crate::cluster::Cluster>,
    /// Federation: our signing identity, the outgoing client, discovery and the key cache.
    pub federation: crate::federation::Federation,
}

/// Raises a stream watermark to `pos` (never lowers it) and wakes its watchers (sync).
pub fn advance(stream: &tokio::sync::watch::Sender<i64>, pos: i64) {
    stream.send_if_modified(|cur| {
        if pos > *cur {
            *cur = pos;
            true
        } else {
            false
        }
    });
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(config: Config, db: PgPool, server_key: ServerKey) -> anyhow::Result<Self> {
        let cluster = Arc::new(crate::cluster::Cluster::new());
        let auth = AuthService::new(
            Duration::from_secs(config.auth.token_cache_ttl_secs),
            Duration::from_secs(config.auth.access_token_lifetime_secs),
            cluster.clone(),
        );
        let passwords = Passwords::new(&config.auth)?;
        let rate_limits = RateLimiters::new(&config.rate_limits);
        let (profile_changes, _) = broadcast::channel(1024);
        let version = server_key.key_id.trim_start_matches("ed25519:").to_owned();
        let push_rules = crate::push::eval::RulesCache::new(&config.push);
        let push_gateway = crate::push::gateway::Gateway::new(&config.push)?;
        let media = crate::media::Media::new(&config.media)?;
        let sso = crate::sso::Sso::new(&config.sso, config.public_baseurl.as_deref())?;
        let appservices =
            crate::appservice::AppServices::load(&config.appservices.registration_files, &config.server_name)
                .map_err(|e| anyhow::anyhow!("appservices.registration_files: {e}"))?;
        let appservice_http =
            crate::appservice::sender::http_client(Duration::from_secs(config.appservices.request_timeout_secs))?;
        let webhooks = crate::webhooks::Webhooks::new(&config.webhooks);
        let federation = crate::federation::Federation::new(&config, &server_key)?;
        let event_signer = ruma::signatures::Ed25519KeyPair::from_der(&server_key.pkcs8_der()?, version)
            .map_err(|e| anyhow::anyhow!("signing key unusable: {e}"))?;
        Ok(Self(Arc::new(Inner {
            auth,
            passwords,
            rate_limits,
            metrics: Metrics::new(),
            profile_changes,
            event_signer,
            room_locks: RoomLocks::default(),
            room_cache: moka::sync::Cache::new(100_000),
            event_stream: tokio::sync::watch::channel(0).0,
            account_data_stream: tokio::sync::watch::channel(0).0,
            receipt_stream: tokio::sync::watch::channel(0).0,
            presence_stream: tokio::sync::watch::channel(0).0,
            to_device_stream: tokio::sync::watch::channel(0).0,
            device_list_stream: tokio::sync::watch::channel(0).0,
            typing: Typing::default(),
            receipt_queue: Default::default(),
            filter_cache: moka::sync::Cache::new(100_000),
            sync: crate::sync::cache::SyncCaches::new(config.sync.room_cache_mb.saturating_mul(1024 * 1024)),
            sliding: Default::default(),
            push_rules,
            push_views: Default::default(),
            push_gateway,
            media,
            records: crate::records::jobs::Exports::new(&config.records),
            sso,
            rtc: crate::rtc::Rtc::new(&config),
            appservices: Arc::new(appservices),
            appservice_outbox: Default::default(),
            appservice_sockets: Default::default(),
            appservice_http,
            webhooks,
            cluster,
            federation,
            server_key,
            db,
            config,
        })))
    }
}
