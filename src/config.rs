//! Typed configuration.
//!
//! The configuration is a TOML file (`config/parvis.toml` by default) whose every key can be
//! overridden by an environment variable `PARVIS__SECTION__KEY` (double underscore between
//! levels, case-insensitive). Unknown keys, in the file or in the environment, stop start-up with
//! a message naming the key and where it came from: a typo must never be silently ignored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "PARVIS__";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The server name: the part after the colon in user IDs. Cannot change once users exist.
    pub server_name: String,
    /// The public URL clients use to reach this server, e.g. `https://matrix.ville.fr/`.
    /// Used for `/.well-known/matrix/client` when `well_known.client` is not set.
    pub public_baseurl: Option<String>,
    pub listen: ListenConfig,
    pub database: DatabaseConfig,
    pub signing_key: SigningKeyConfig,
    pub logging: LoggingConfig,
    pub registration: RegistrationConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub rate_limits: RateLimitsConfig,
    pub well_known: WellKnownConfig,
    pub turn: TurnConfig,
    pub rooms: RoomsConfig,
    pub user_directory: UserDirectoryConfig,
    pub presence: PresenceConfig,
    pub sync: SyncConfig,
    pub push: PushConfig,
    pub media: MediaConfig,
    pub search: SearchConfig,
    /// Message retention policies (MSC1763 `m.room.retention`): off by default.
    pub retention: RetentionConfig,
    pub records: RecordsConfig,
    /// Single sign-on through OpenID Connect providers (`m.login.sso`).
    pub sso: crate::sso::config::SsoConfig,
    /// The built-in OAuth 2.0 authorization server (Matrix's OAuth 2.0 API, for Element X).
    pub oauth: crate::oauth::config::OAuthConfig,
    /// Fault injection for the test suite only. Never set it in production: it makes writes fail.
    pub testing: TestingConfig,
    /// OpenID tokens (`/user/{userId}/openid/request_token`, verified by Jitsi and widgets).
    pub openid: OpenIdConfig,
    /// Jitsi meetings: the domain Element uses and the widgets of meeting rooms.
    pub jitsi: JitsiConfig,
    /// MatrixRTC (Element Call): the LiveKit foci advertised to clients (MSC4143).
    pub matrix_rtc: MatrixRtcConfig,
    /// Delayed events (MSC4140).
    pub delayed_events: DelayedEventsConfig,
    /// Several instances on one database: heartbeats, the stream poller, leases.
    pub cluster: ClusterConfig,
    /// Application services (bridges, bots): registration files and transaction delivery.
    pub appservices: AppServicesConfig,
    /// Alert webhooks (`POST /_parvis/webhook/{hookId}`).
    pub webhooks: WebhooksConfig,
    /// Server notices (`/_synapse/admin/v1/send_server_notice`).
    pub server_notices: ServerNoticesConfig,
    /// Bot accounts (`user_type: bot`).
    pub bots: BotsConfig,
    /// Federation with other Matrix servers (the server-server API, `listen.federation`).
    pub federation: FederationConfig,
}

/// Federation (issue 13). Only the foundation exists so far: server keys, the notary, `X-Matrix`
/// request authentication, server discovery and the outgoing client (see README, "Federation").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Federate at all. Unset: on when `listen.federation` is set. Off: the federation listener
    /// serves only `openid/userinfo`, and no other server is ever contacted.
    pub enabled: Option<bool>,
    /// PEM certificate chain of the federation listener. With `tls_private_key`, the listener
    /// speaks TLS; without both, plain HTTP (for deployments behind a TLS-terminating proxy).
    pub tls_certificate: Option<PathBuf>,
    /// PEM PKCS#8 private key of `tls_certificate`.
    pub tls_private_key: Option<PathBuf>,
    /// Extra CA certificates (PEM bundle) trusted for outgoing requests, besides the system roots
    /// (a town's private PKI).
    pub ca_file: Option<PathBuf>,
    /// Verify the certificates of the servers we contact. Turn off only for tests.
    pub verify_certificates: bool,
    /// Empty: open federation. Otherwise only these server names may send us requests or be
    /// contacted (a closed federation). Our own name is always allowed.
    pub allowed_servers: Vec<String>,
    /// Notary servers asked for a server's keys when it cannot be reached directly.
    pub trusted_key_servers: Vec<String>,
    /// How long our published server keys are valid (`valid_until_ts`), in seconds.
    pub key_validity_secs: u64,
    /// Timeout of one outgoing federation request, connection included, in seconds.
    pub request_timeout_secs: u64,
    /// Largest response body accepted from another server, in bytes.
    pub max_response_bytes: usize,
    /// Show device display names to other servers (`user/devices`, `user/keys/query`). Off by
    /// default, as in Synapse (`allow_device_name_lookup_over_federation`): names like "Alice's
    /// work laptop" leak more than key material needs.
    pub allow_device_name_lookup: bool,
    /// Addresses never contacted when another server answers a media download with a `Location`
    /// redirect (CIDR ranges; every resolved address is checked, redirects included).
    pub media_redirect_ip_blacklist: Vec<String>,
    /// Exceptions to `media_redirect_ip_blacklist`.
    pub media_redirect_ip_whitelist: Vec<String>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            tls_certificate: None,
            tls_private_key: None,
            ca_file: None,
            verify_certificates: true,
            allowed_servers: Vec::new(),
            trusted_key_servers: Vec::new(),
            key_validity_secs: 86_400,
            request_timeout_secs: 30,
            max_response_bytes: 16 * 1024 * 1024,
            allow_device_name_lookup: false,
            media_redirect_ip_blacklist: DEFAULT_IP_BLACKLIST.iter().map(|s| (*s).to_owned()).collect(),
            media_redirect_ip_whitelist: Vec::new(),
        }
    }
}

impl Config {
    /// Whether this server federates: `federation.enabled`, by default on when the federation
    /// listener is configured.
    pub fn federation_enabled(&self) -> bool {
        self.listen.federation.is_some() && self.federation.enabled.unwrap_or(true)
    }

    fn validate_federation(&self) -> Result<(), (&'static str, String)> {
        let f = &self.federation;
        if f.enabled == Some(true) && self.listen.federation.is_none() {
            return Err(("federation.enabled", "needs `listen.federation` (the federation listener)".into()));
        }
        match (&f.tls_certificate, &f.tls_private_key) {
            (Some(_), None) => return Err(("federation.tls_private_key", "must be set with tls_certificate".into())),
            (None, Some(_)) => return Err(("federation.tls_certificate", "must be set with tls_private_key".into())),
            _ => {}
        }
        for (key, path) in [
            ("federation.tls_certificate", &f.tls_certificate),
            ("federation.tls_private_key", &f.tls_private_key),
            ("federation.ca_file", &f.ca_file),
        ] {
            if let Some(p) = path
                && let Err(e) = std::fs::metadata(p)
            {
                return Err((key, format!("cannot read {}: {e}", p.display())));
            }
        }
        for (key, list) in [
            ("federation.allowed_servers", &f.allowed_servers),
            ("federation.trusted_key_servers", &f.trusted_key_servers),
        ] {
            for name in list {
                if ruma::ServerName::parse(name).is_err() {
                    return Err((key, format!("`{name}` is not a valid server name")));
                }
            }
        }
        for (key, list) in [
            ("federation.media_redirect_ip_blacklist", &f.media_redirect_ip_blacklist),
            ("federation.media_redirect_ip_whitelist", &f.media_redirect_ip_whitelist),
        ] {
            for cidr in list {
                crate::http::ssrf::IpRange::parse(cidr).map_err(|e| (key, e))?;
            }
        }
        if !(60..=7 * 86_400).contains(&f.key_validity_secs) {
            return Err(("federation.key_validity_secs", "must be between 60 and 604800 (7 days)".into()));
        }
        if !(1..=600).contains(&f.request_timeout_secs) {
            return Err(("federation.request_timeout_secs", "must be between 1 and 600".into()));
        }
        if !(64 * 1024..=1024 * 1024 * 1024).contains(&f.max_response_bytes) {
            return Err(("federation.max_response_bytes", "must be between 65536 and 1073741824".into()));
        }
        Ok(())
    }
}

/// Fault injection, for tests of the write path's failure handling. Both are off (`None`) unless
/// a test sets them; `check-config` warns when they are set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestingConfig {
    /// An event whose content contains this text fails inside its write transaction, after its
    /// row was written (a database error that aborts the transaction, as a real one would).
    pub fail_append_containing: Option<String>,
    /// A batch holding an event whose content contains this text fails in push evaluation, a
    /// failure that no single event of the batch can be blamed for.
    pub fail_push_containing: Option<String>,
    /// A batch holding an event whose content contains this text waits 1.5 s before its
    /// `COMMIT`, its stream positions taken: a slow writer, for the cross-instance watermark test.
    pub stall_commit_containing: Option<String>,
}

/// Message retention (MSC1763): expired messages are hidden from clients and purged by a periodic
/// job (`rooms::retention`). Durations are in seconds, as every other duration of this file;
/// `m.room.retention` events give theirs in milliseconds (as Synapse reads them).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Apply retention policies at all. Off: nothing is hidden or purged, whatever rooms say.
    pub enabled: bool,
    /// The policy of rooms without a valid `m.room.retention` state event.
    pub default_policy: RetentionPolicyConfig,
    /// The shortest lifetime a room may ask for: shorter `max_lifetime`s are raised to it.
    pub allowed_lifetime_min_secs: Option<u64>,
    /// The longest lifetime a room may ask for: longer ones (and "forever") are lowered to it.
    pub allowed_lifetime_max_secs: Option<u64>,
    /// How often the purge job runs (one job handles every room; see README, "Retention").
    pub purge_interval_secs: u64,
    /// Events deleted per transaction.
    pub batch_size: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            default_policy: RetentionPolicyConfig::default(),
            allowed_lifetime_min_secs: None,
            allowed_lifetime_max_secs: None,
            purge_interval_secs: 3600,
            batch_size: 1000,
        }
    }
}

/// A server-side retention policy. Unset `max_lifetime_secs` means "forever".
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionPolicyConfig {
    /// Messages are kept at least this long (MSC1763: `max_lifetime` is raised to it).
    pub min_lifetime_secs: Option<u64>,
    /// Messages older than this are hidden from clients and purged.
    pub max_lifetime_secs: Option<u64>,
}

impl RetentionConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.purge_interval_secs == 0 {
            return Err(("retention.purge_interval_secs", "must be at least 1".into()));
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return Err(("retention.batch_size", "must be between 1 and 10000".into()));
        }
        if let (Some(min), Some(max)) = (self.allowed_lifetime_min_secs, self.allowed_lifetime_max_secs)
            && min > max
        {
            return Err(("retention.allowed_lifetime_min_secs", "must not exceed allowed_lifetime_max_secs".into()));
        }
        let p = &self.default_policy;
        if let (Some(min), Some(max)) = (p.min_lifetime_secs, p.max_lifetime_secs)
            && min > max
        {
            return Err(("retention.default_policy.min_lifetime_secs", "must not exceed max_lifetime_secs".into()));
        }
        // Lifetimes are compared with millisecond timestamps: keep them far from overflowing.
        for (key, v) in [
            ("retention.allowed_lifetime_min_secs", self.allowed_lifetime_min_secs),
            ("retention.allowed_lifetime_max_secs", self.allowed_lifetime_max_secs),
            ("retention.default_policy.min_lifetime_secs", p.min_lifetime_secs),
            ("retention.default_policy.max_lifetime_secs", p.max_lifetime_secs),
        ] {
            if v.is_some_and(|v| v > MAX_LIFETIME_SECS) {
                return Err((key, format!("must be at most {MAX_LIFETIME_SECS} (1000 years)")));
            }
        }
        Ok(())
    }
}

/// The longest lifetime the configuration accepts (1000 years).
pub const MAX_LIFETIME_SECS: u64 = 1000 * 366 * 86_400;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Memory budget of the sync cache of rooms (recent timelines and current state), in MiB.
    pub room_cache_mb: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self { room_cache_mb: 256 }
    }
}

/// Push notifications: rule evaluation and delivery to push gateways (HTTP pushers).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Gateway URLs are chosen by clients: addresses in these CIDR ranges are never contacted
    /// (the host is resolved first; every resolved address must be allowed).
    pub gateway_ip_blacklist: Vec<String>,
    /// Exceptions to the blacklist (e.g. a push gateway on the local network).
    pub gateway_ip_whitelist: Vec<String>,
    /// Timeout of one request to a gateway, connection included.
    pub gateway_timeout_secs: u64,
    /// Most attempts per notification (network errors, 5xx and 429 are retried).
    pub gateway_max_attempts: u32,
    /// Delay before the first retry; it doubles after each failed attempt.
    pub gateway_retry_initial_ms: u64,
    /// Longest delay between two attempts.
    pub gateway_retry_max_ms: u64,
    /// Give up on a notification this long after its first attempt.
    pub gateway_retry_total_secs: u64,
    /// Deliveries under way at once, all gateways together; further ones wait.
    pub gateway_max_concurrency: usize,
    /// Users whose push rules are kept in memory for evaluation.
    pub ruleset_cache_capacity: u64,
    /// How long a cached ruleset is used. Changes made through this instance apply at once;
    /// changes made through another instance sharing the database apply within this delay.
    pub ruleset_cache_ttl_secs: u64,
}

/// Addresses no client-chosen URL may reach: loopback, private (RFC 1918), carrier-grade NAT,
/// link-local, unspecified, multicast, broadcast and reserved ranges, IPv6 unique-local and
/// link-local. IPv4-mapped IPv6 addresses are checked as IPv4.
pub const DEFAULT_IP_BLACKLIST: &[&str] = &[
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "0.0.0.0/8",
    "192.0.0.0/24",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::1/128",
    "::/128",
    "fe80::/10",
    "fc00::/7",
    "ff00::/8",
];

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            gateway_ip_blacklist: DEFAULT_IP_BLACKLIST.iter().map(|s| (*s).to_owned()).collect(),
            gateway_ip_whitelist: Vec::new(),
            gateway_timeout_secs: 10,
            gateway_max_attempts: 8,
            gateway_retry_initial_ms: 1000,
            gateway_retry_max_ms: 60_000,
            gateway_retry_total_secs: 600,
            gateway_max_concurrency: 64,
            ruleset_cache_capacity: 100_000,
            ruleset_cache_ttl_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchConfig {
    /// The language of full-text search (`POST /search`): stemming and stop words, accents
    /// ignored. One of `crate::search::LANGUAGES`; `simple` for no stemming. Changing it
    /// re-indexes every message at the next start.
    pub language: String,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self { language: "french".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Track and share presence. Large deployments often turn it off to save load.
    pub enabled: bool,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct UserDirectoryConfig {
    /// Search every local user (a staff directory), not only users who share a room with the
    /// searcher or sit in published rooms.
    pub search_all_local_users: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// Version of new rooms when the client does not ask for one.
    pub default_version: String,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self { default_version: "12".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Address of the client-server API listener.
    pub client: SocketAddr,
    /// Address of the Prometheus metrics listener; unset disables it.
    pub metrics: Option<SocketAddr>,
    /// Reverse proxies whose `X-Forwarded-For` header is trusted for the client's address.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Address of the federation listener; unset disables it (and federation with it). It also
    /// serves `GET /_matrix/federation/v1/openid/userinfo` (Jitsi's verification service asks it).
    pub federation: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    pub max_connections: u32,
    pub min_connections: u32,
    /// Seconds to wait for a free connection before failing a request.
    pub acquire_timeout_secs: u64,
    /// Create the database on start-up if it does not exist.
    pub create_if_missing: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SigningKeyConfig {
    /// A Synapse-format key file (`ed25519 <version> <base64 seed>`). When unset, the key is
    /// generated on first start and kept in the database.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive, e.g. `info,parvis=debug`. `RUST_LOG` wins when set.
    pub filter: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    /// Open `/register` to the public. Closed by default: accounts follow the HR system.
    pub enabled: bool,
    /// When registration is enabled, require a registration token (`m.login.registration_token`).
    pub require_token: bool,
    /// Secret for Synapse-compatible shared-secret registration (`/_synapse/admin/v1/register`).
    /// Unset disables that endpoint.
    pub shared_secret: Option<String>,
    /// Localparts nobody may register.
    pub reserved_localparts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Lifetime of access tokens issued to clients that asked for a refresh token.
    pub access_token_lifetime_secs: u64,
    pub password_min_length: usize,
    /// argon2id cost parameters (RFC 9106 / OWASP defaults).
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
    /// How long a validated access token is served from the in-process cache.
    pub token_cache_ttl_secs: u64,
    /// How long a user-interactive authentication session lives.
    pub uia_session_lifetime_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest JSON request body accepted (media uploads have their own limit).
    pub max_request_body_bytes: usize,
    /// To-device messages kept per device until it syncs; older ones are dropped beyond this.
    pub max_pending_to_device: u64,
}

/// A token bucket: `burst` requests at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    pub enabled: bool,
    /// Login attempts, per client IP.
    pub login_per_ip: RateLimit,
    /// Login attempts, per targeted account.
    pub login_per_account: RateLimit,
    /// Registration requests (and registration-token checks), per client IP.
    pub registration_per_ip: RateLimit,
    /// Messages sent, per user (applied by the room engine).
    pub messages_per_user: RateLimit,
    /// Messages sent, per client IP.
    pub messages_per_ip: RateLimit,
    /// Server administrators are exempt from all limits.
    pub exempt_admins: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WellKnownConfig {
    /// `m.homeserver.base_url` in `/.well-known/matrix/client` (defaults to `public_baseurl`).
    pub client: Option<String>,
    /// `m.server` in `/.well-known/matrix/server`, e.g. `matrix.ville.fr:443`. Unset: 404.
    pub server: Option<String>,
    /// Extra keys merged into `/.well-known/matrix/client` (e.g. `org.matrix.msc4143.rtc_foci`).
    pub client_extra: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// TURN URIs handed to clients, e.g. `turns:turn.ville.fr:443?transport=tcp`.
    pub uris: Vec<String>,
    /// coturn's `static-auth-secret` (`use-auth-secret` mode).
    pub shared_secret: Option<String>,
    /// Lifetime of the credentials handed out.
    pub user_lifetime_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost".into(),
            public_baseurl: None,
            listen: ListenConfig::default(),
            database: DatabaseConfig::default(),
            signing_key: SigningKeyConfig::default(),
            logging: LoggingConfig::default(),
            registration: RegistrationConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            rate_limits: RateLimitsConfig::default(),
            well_known: WellKnownConfig::default(),
            turn: TurnConfig::default(),
            rooms: RoomsConfig::default(),
            user_directory: UserDirectoryConfig::default(),
            presence: PresenceConfig::default(),
            sync: SyncConfig::default(),
            push: PushConfig::default(),
            media: MediaConfig::default(),
            search: SearchConfig::default(),
            retention: RetentionConfig::default(),
            records: RecordsConfig::default(),
            sso: Default::default(),
            oauth: Default::default(),
            testing: TestingConfig::default(),
            openid: OpenIdConfig::default(),
            jitsi: JitsiConfig::default(),
            matrix_rtc: MatrixRtcConfig::default(),
            delayed_events: DelayedEventsConfig::default(),
            cluster: ClusterConfig::default(),
            appservices: AppServicesConfig::default(),
            webhooks: WebhooksConfig::default(),
            server_notices: ServerNoticesConfig::default(),
            bots: BotsConfig::default(),
            federation: FederationConfig::default(),
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            client: "127.0.0.1:8008".parse().expect("static address"),
            metrics: None,
            trusted_proxies: Vec::new(),
            federation: None,
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/parvis".into(),
            max_connections: 32,
            min_connections: 2,
            acquire_timeout_secs: 10,
            create_if_missing: true,
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { format: LogFormat::Pretty, filter: "info".into() }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            access_token_lifetime_secs: 300,
            password_min_length: 8,
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            token_cache_ttl_secs: 30,
            uia_session_lifetime_secs: 15 * 60,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self { max_request_body_bytes: 1024 * 1024, max_pending_to_device: 10_000 }
    }
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        // Synapse's defaults, which Element is tuned for.
        Self {
            enabled: true,
            login_per_ip: RateLimit { per_second: 0.17, burst: 3 },
            login_per_account: RateLimit { per_second: 0.17, burst: 3 },
            registration_per_ip: RateLimit { per_second: 0.17, burst: 3 },
            messages_per_user: RateLimit { per_second: 0.2, burst: 10 },
            messages_per_ip: RateLimit { per_second: 10.0, burst: 100 },
            exempt_admins: true,
        }
    }
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self { uris: Vec::new(), shared_secret: None, user_lifetime_secs: 86_400 }
    }
}

/// Where media content is kept.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MediaBackend {
    /// Files under `media.path`.
    Filesystem,
    /// An S3-compatible object store (`[media.s3]`).
    S3,
}

/// How a thumbnail size is produced: `crop` fills the box exactly, `scale` fits inside it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ThumbnailMethod {
    Crop,
    Scale,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ThumbnailSize {
    pub width: u32,
    pub height: u32,
    pub method: ThumbnailMethod,
}

/// The media repository (issue 6): uploads, downloads, thumbnails, URL previews.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    pub backend: MediaBackend,
    /// Content directory of the filesystem backend; temporary files of uploads in progress go to
    /// its `tmp/` subdirectory whatever the backend.
    pub path: PathBuf,
    pub s3: S3Config,
    /// Largest upload accepted (`m.upload.size`); larger ones get 413 `M_TOO_LARGE`.
    pub max_upload_bytes: u64,
    /// Total bytes a user may have uploaded; 0 means no quota. Past it: 403 `M_USER_LIMIT_EXCEEDED`.
    pub user_quota_bytes: u64,
    /// `info_uri` of `M_USER_LIMIT_EXCEEDED` errors: a page explaining the quota.
    pub quota_info_uri: Option<String>,
    /// Uploads (and `create` reservations) per user.
    pub uploads_per_user: RateLimit,
    /// Reserved (`/v1/create`) but not yet uploaded media IDs a user may hold at once.
    pub max_pending_uploads_per_user: u32,
    /// A reserved media ID whose content has not arrived after this long is released.
    pub unused_expiry_secs: u64,
    /// Serve the deprecated unauthenticated `/_matrix/media/v3/download` and `/thumbnail`.
    pub legacy_endpoints: bool,
    /// Whether media stored from now on may be served by those legacy endpoints. The spec
    /// recommends `false` ("freezing"): only media stored while this was `true` stay reachable
    /// without authentication.
    pub legacy_serve_new_media: bool,
    /// The thumbnail sizes generated; a request gets the smallest at least as large as asked.
    pub thumbnail_sizes: Vec<ThumbnailSize>,
    /// Generate every thumbnail size of an uploaded image right after the upload.
    pub thumbnails_at_upload: bool,
    /// Images with more pixels than this are never decoded (decompression bombs).
    pub max_image_pixels: u64,
    /// Memory budget of recently served thumbnails, in MiB.
    pub thumbnail_cache_mb: u64,
    /// Serve `preview_url`. Off by default: it makes the server fetch URLs chosen by users.
    pub url_preview_enabled: bool,
    /// Addresses URL previews never fetch from (CIDR ranges); every resolved address of a host
    /// must be allowed, redirects included.
    pub url_preview_ip_blacklist: Vec<String>,
    /// Exceptions to the blacklist.
    pub url_preview_ip_whitelist: Vec<String>,
    /// Largest document or image downloaded for a preview.
    pub url_preview_max_bytes: u64,
    /// Time limit of a preview fetch, redirects and image included.
    pub url_preview_timeout_secs: u64,
    /// How long a preview is reused before the URL is fetched again.
    pub url_preview_cache_secs: u64,
    /// `User-Agent` of preview fetches (default: `Parvis/<version> (URL preview)`).
    pub url_preview_user_agent: Option<String>,
    /// Antivirus hook, a command: the program and its arguments; the file's path is appended.
    /// Exit status 0 means clean, 1 infected, anything else an error (as `clamdscan`). Empty: off.
    pub scanner_command: Vec<String>,
    /// Antivirus hook, an HTTP scanner: the content is POSTed there and the answer must be JSON
    /// `{"clean": true|false}`. Unset: off.
    pub scanner_url: Option<String>,
    /// Time limit of one scan.
    pub scanner_timeout_secs: u64,
}

/// An S3-compatible object store (AWS, OpenIO, MinIO, Ceph RGW...).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    pub bucket: String,
    /// e.g. `https://s3.openio.ville.fr`; unset means AWS.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Path-style URLs (`endpoint/bucket/key`), which most S3-compatible servers need.
    pub path_style: bool,
    /// Prefix of every object key, so that several servers can share a bucket.
    pub prefix: String,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
            path_style: true,
            prefix: String::new(),
        }
    }
}

/// The sizes the spec recommends servers pre-compute.
pub const DEFAULT_THUMBNAIL_SIZES: &[(u32, u32, ThumbnailMethod)] = &[
    (32, 32, ThumbnailMethod::Crop),
    (96, 96, ThumbnailMethod::Crop),
    (320, 240, ThumbnailMethod::Scale),
    (640, 480, ThumbnailMethod::Scale),
    (800, 600, ThumbnailMethod::Scale),
];

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            backend: MediaBackend::Filesystem,
            path: PathBuf::from("data/media"),
            s3: S3Config::default(),
            max_upload_bytes: 50 * 1024 * 1024,
            user_quota_bytes: 0,
            quota_info_uri: None,
            uploads_per_user: RateLimit { per_second: 1.0, burst: 30 },
            max_pending_uploads_per_user: 10,
            unused_expiry_secs: 86_400,
            legacy_endpoints: true,
            legacy_serve_new_media: false,
            thumbnail_sizes: DEFAULT_THUMBNAIL_SIZES
                .iter()
                .map(|&(width, height, method)| ThumbnailSize { width, height, method })
                .collect(),
            thumbnails_at_upload: true,
            max_image_pixels: 32_000_000,
            thumbnail_cache_mb: 64,
            url_preview_enabled: false,
            url_preview_ip_blacklist: DEFAULT_IP_BLACKLIST.iter().map(|s| (*s).to_owned()).collect(),
            url_preview_ip_whitelist: Vec::new(),
            url_preview_max_bytes: 10 * 1024 * 1024,
            url_preview_timeout_secs: 10,
            url_preview_cache_secs: 3600,
            url_preview_user_agent: None,
            scanner_command: Vec::new(),
            scanner_url: None,
            scanner_timeout_secs: 60,
        }
    }
}

impl MediaConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.backend == MediaBackend::S3 && self.s3.bucket.is_empty() {
            return Err(("media.s3.bucket", "required when media.backend = \"s3\"".into()));
        }
        if let Some(url) = &self.s3.endpoint {
            url::Url::parse(url).map_err(|e| ("media.s3.endpoint", e.to_string()))?;
        }
        if let Some(url) = &self.scanner_url {
            url::Url::parse(url).map_err(|e| ("media.scanner_url", e.to_string()))?;
        }
        let l = self.uploads_per_user;
        if !(l.per_second > 0.0 && l.per_second.is_finite()) || l.burst == 0 {
            return Err(("media.uploads_per_user", "per_second must be > 0 and burst >= 1".into()));
        }
        if self.max_upload_bytes == 0 {
            return Err(("media.max_upload_bytes", "must be at least 1".into()));
        }
        if self.thumbnail_sizes.iter().any(|s| s.width == 0 || s.height == 0 || s.width > 4096 || s.height > 4096) {
            return Err(("media.thumbnail_sizes", "width and height must be between 1 and 4096".into()));
        }
        for (key, list) in [
            ("media.url_preview_ip_blacklist", &self.url_preview_ip_blacklist),
            ("media.url_preview_ip_whitelist", &self.url_preview_ip_whitelist),
        ] {
            for cidr in list {
                crate::http::ssrf::IpRange::parse(cidr).map_err(|e| (key, e))?;
            }
        }
        for (key, value) in [
            ("media.url_preview_timeout_secs", self.url_preview_timeout_secs),
            ("media.scanner_timeout_secs", self.scanner_timeout_secs),
            ("media.max_image_pixels", self.max_image_pixels),
        ] {
            if value == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        Ok(())
    }
}

/// Records (issue 19): per-user exports (`parvis export-user`, the admin API's export jobs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordsConfig {
    /// Where archives made through the admin API are written. Unset: `<media.path>/exports`.
    /// Several instances behind one address need it on shared storage (as the media directory).
    pub export_dir: Option<PathBuf>,
    /// Days an archive made through the admin API is kept before it is deleted.
    pub export_expiry_days: u64,
    /// Most media bytes put in one archive; uploads past it are listed as skipped.
    pub max_media_bytes: u64,
    /// Exports run at once by one instance; further jobs wait (status `pending`).
    pub max_concurrent_exports: usize,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        Self {
            export_dir: None,
            export_expiry_days: 7,
            max_media_bytes: 2 * 1024 * 1024 * 1024,
            max_concurrent_exports: 2,
        }
    }
}

impl RecordsConfig {
    /// The export directory, `<media.path>/exports` unless configured.
    pub fn export_dir(&self, media: &MediaConfig) -> PathBuf {
        self.export_dir.clone().unwrap_or_else(|| media.path.join("exports"))
    }
}

/// Why a configuration could not be loaded. The message always names the key and its source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("invalid configuration key `{key}` ({source_desc}): {message}")]
    Key { key: String, source_desc: String, message: String },
}

impl Config {
    /// Loads the file at `path` (which may be absent only when `allow_missing`), then applies the
    /// `PARVIS__*` variables from `env`, then validates.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml_and_env(&text, &path.display().to_string(), env)
    }

    /// Parses TOML text (named `origin` in messages), applies environment overrides, validates.
    pub fn from_toml_and_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: origin.into(),
            message: e.message().to_owned(),
        })?;
        // Keys that came from the environment, so that an error can say where a key came from.
        let mut from_env: BTreeMap<String, String> = BTreeMap::new();
        let defaults = toml::Table::try_from(Config::type_hints()).expect("defaults serialize");
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else { continue };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(ConfigError::Key {
                    key: path.join("."),
                    source_desc: format!("environment variable {name}"),
                    message: "empty path segment".into(),
                });
            }
            let parsed = parse_env_value(&defaults, &path, &value);
            set_path(&mut table, &path, parsed).map_err(|message| ConfigError::Key {
                key: path.join("."),
                source_desc: format!("environment variable {name}"),
                message,
            })?;
            from_env.insert(path.join("."), name);
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = describe_path(e.path(), e.inner());
            let source_desc = match from_env.get(&key) {
                Some(var) => format!("environment variable {var}"),
                None => format!("in {origin}"),
            };
            ConfigError::Key { key, source_desc, message: e.inner().to_string() }
        })?;
        config.validate().map_err(|(key, message)| ConfigError::Key {
            source_desc: match from_env.get(key) {
                Some(var) => format!("environment variable {var}"),
                None => format!("in {origin}"),
            },
            key: key.into(),
            message,
        })?;
        Ok(config)
    }

    /// Semantic checks that types alone cannot express. Returns the offending key.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if ruma::ServerName::parse(&self.server_name).is_err() {
            return Err(("server_name", format!("`{}` is not a valid server name", self.server_name)));
        }
        if !self.database.url.starts_with("postgres://") && !self.database.url.starts_with("postgresql://") {
            return Err(("database.url", "must be a postgres:// URL".into()));
        }
        if self.database.max_connections == 0 {
            return Err(("database.max_connections", "must be at least 1".into()));
        }
        if let Some(url) = &self.public_baseurl {
            url::Url::parse(url).map_err(|e| ("public_baseurl", e.to_string()))?;
        }
        if let Some(url) = &self.well_known.client {
            url::Url::parse(url).map_err(|e| ("well_known.client", e.to_string()))?;
        }
        if self.registration.shared_secret.as_deref() == Some("") {
            return Err(("registration.shared_secret", "must not be empty (leave it unset to disable)".into()));
        }
        for (key, limit) in [
            ("rate_limits.login_per_ip", self.rate_limits.login_per_ip),
            ("rate_limits.login_per_account", self.rate_limits.login_per_account),
            ("rate_limits.registration_per_ip", self.rate_limits.registration_per_ip),
            ("rate_limits.messages_per_user", self.rate_limits.messages_per_user),
            ("rate_limits.messages_per_ip", self.rate_limits.messages_per_ip),
        ] {
            if !(limit.per_second > 0.0 && limit.per_second.is_finite()) || limit.burst == 0 {
                return Err((key, "per_second must be > 0 and burst >= 1".into()));
            }
        }
        if self.auth.argon2_memory_kib < 8 * self.auth.argon2_parallelism.max(1)
            || self.auth.argon2_iterations == 0
            || self.auth.argon2_parallelism == 0
        {
            return Err(("auth.argon2_memory_kib", "invalid argon2 parameters".into()));
        }
        if !crate::rooms::SUPPORTED_VERSIONS.contains(&self.rooms.default_version.as_str()) {
            return Err((
                "rooms.default_version",
                format!("supported versions: {:?}", crate::rooms::SUPPORTED_VERSIONS),
            ));
        }
        if !crate::search::LANGUAGES.contains(&self.search.language.as_str()) {
            return Err(("search.language", format!("supported languages: {:?}", crate::search::LANGUAGES)));
        }
        if self.limits.max_request_body_bytes < 1024 {
            return Err(("limits.max_request_body_bytes", "must be at least 1024".into()));
        }
        for (key, list) in [
            ("push.gateway_ip_blacklist", &self.push.gateway_ip_blacklist),
            ("push.gateway_ip_whitelist", &self.push.gateway_ip_whitelist),
        ] {
            for cidr in list {
                crate::push::gateway::IpRange::parse(cidr).map_err(|e| (key, e))?;
            }
        }
        for (key, value) in [
            ("push.gateway_timeout_secs", self.push.gateway_timeout_secs),
            ("push.gateway_max_attempts", u64::from(self.push.gateway_max_attempts)),
            ("push.gateway_max_concurrency", self.push.gateway_max_concurrency as u64),
        ] {
            if value == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        self.media.validate()?;
        self.retention.validate()?;
        if self.records.export_expiry_days == 0 {
            return Err(("records.export_expiry_days", "must be at least 1".into()));
        }
        if self.records.max_concurrent_exports == 0 {
            return Err(("records.max_concurrent_exports", "must be at least 1".into()));
        }
        self.sso.validate(self.public_baseurl.as_deref())?;
        self.oauth.validate()?;
        self.validate_rtc()?;
        self.validate_bots()?;
        self.validate_federation()?;
        Ok(())
    }

    /// Checks of `[appservices]`, `[webhooks]` and `[server_notices]` (registration files are
    /// read and checked at start-up by `appservice::AppServices::load`).
    fn validate_bots(&self) -> Result<(), (&'static str, String)> {
        let a = &self.appservices;
        if !(1..=1000).contains(&a.max_events_per_transaction) {
            return Err(("appservices.max_events_per_transaction", "must be between 1 and 1000".into()));
        }
        if a.retry_initial_ms == 0 {
            return Err(("appservices.retry_initial_ms", "must be at least 1".into()));
        }
        if a.retry_max_secs == 0 {
            return Err(("appservices.retry_max_secs", "must be at least 1".into()));
        }
        if a.request_timeout_secs == 0 {
            return Err(("appservices.request_timeout_secs", "must be at least 1".into()));
        }
        let w = &self.webhooks;
        if !(w.per_hook.per_second > 0.0 && w.per_hook.per_second.is_finite()) || w.per_hook.burst == 0 {
            return Err(("webhooks.per_hook", "per_second must be > 0 and burst >= 1".into()));
        }
        if !(1024..=16 * 1024 * 1024).contains(&w.max_body_bytes) {
            return Err(("webhooks.max_body_bytes", "must be between 1024 and 16777216".into()));
        }
        if !(1..=1000).contains(&w.max_alerts_per_message) {
            return Err(("webhooks.max_alerts_per_message", "must be between 1 and 1000".into()));
        }
        if let Some(l) = &self.server_notices.system_mxid_localpart
            && (l.is_empty()
                || !l.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/')))
        {
            return Err(("server_notices.system_mxid_localpart", "must be a valid lower-case localpart".into()));
        }
        Ok(())
    }

    /// Checks of the `[openid]`, `[jitsi]`, `[matrix_rtc]` and `[delayed_events]` sections.
    fn validate_rtc(&self) -> Result<(), (&'static str, String)> {
        if !(1..=86_400).contains(&self.openid.token_lifetime_secs) {
            return Err(("openid.token_lifetime_secs", "must be between 1 and 86400".into()));
        }
        if let Some(d) = &self.jitsi.domain
            && (d.is_empty() || d.contains('/') || d.contains(char::is_whitespace) || d.contains('@'))
        {
            return Err((
                "jitsi.domain",
                "must be a host name (optionally with a port), without scheme or path".into(),
            ));
        }
        match url::Url::parse(&self.jitsi.element_url) {
            Ok(u) if matches!(u.scheme(), "https" | "http") => {}
            _ => return Err(("jitsi.element_url", "must be an http(s) URL".into())),
        }
        for u in &self.matrix_rtc.livekit_service_urls {
            match url::Url::parse(u) {
                Ok(p) if matches!(p.scheme(), "https" | "http") => {}
                _ => return Err(("matrix_rtc.livekit_service_urls", format!("`{u}` is not an http(s) URL"))),
            }
        }
        let k = &self.cluster;
        for (key, v, min, max) in [
            ("cluster.heartbeat_ms", k.heartbeat_ms, 100, 5_000),
            ("cluster.poll_interval_ms", k.poll_interval_ms, 10, 10_000),
            ("cluster.lease_retry_ms", k.lease_retry_ms, 50, 60_000),
            ("cluster.lease_check_ms", k.lease_check_ms, 50, 60_000),
        ] {
            if !(min..=max).contains(&v) {
                return Err((key, format!("must be between {min} and {max}")));
            }
        }
        let d = &self.delayed_events;
        if d.max_delay_ms == 0 || d.max_delay_ms > 365 * 86_400_000 {
            return Err(("delayed_events.max_delay_ms", "must be between 1 and one year".into()));
        }
        if d.max_scheduled_per_user == 0 {
            return Err(("delayed_events.max_scheduled_per_user", "must be at least 1".into()));
        }
        for (key, l) in [
            ("openid.requests_per_user", self.openid.requests_per_user),
            ("delayed_events.schedule_per_user", d.schedule_per_user),
            ("delayed_events.manage_per_ip", d.manage_per_ip),
        ] {
            if !(l.per_second > 0.0 && l.per_second.is_finite()) || l.burst == 0 {
                return Err((key, "per_second must be > 0 and burst >= 1".into()));
            }
        }
        Ok(())
    }

    /// The defaults with every optional key filled in, so that the type of every key is known when
    /// parsing environment overrides.
    fn type_hints() -> Self {
        let mut c = Config { public_baseurl: Some(String::new()), ..Default::default() };
        c.listen.metrics = Some(c.listen.client);
        c.signing_key.path = Some(PathBuf::new());
        c.registration.shared_secret = Some(String::new());
        c.well_known.client = Some(String::new());
        c.well_known.server = Some(String::new());
        c.turn.shared_secret = Some(String::new());
        c.media.quota_info_uri = Some(String::new());
        c.media.url_preview_user_agent = Some(String::new());
        c.media.scanner_url = Some(String::new());
        c.media.s3.endpoint = Some(String::new());
        c.media.s3.access_key_id = Some(String::new());
        c.media.s3.secret_access_key = Some(String::new());
        c.retention.allowed_lifetime_min_secs = Some(0);
        c.retention.allowed_lifetime_max_secs = Some(0);
        c.retention.default_policy.min_lifetime_secs = Some(0);
        c.retention.default_policy.max_lifetime_secs = Some(0);
        c.records.export_dir = Some(PathBuf::new());
        c.listen.federation = Some(c.listen.client);
        c.jitsi.domain = Some(String::new());
        c.server_notices.system_mxid_localpart = Some(String::new());
        c.federation.enabled = Some(true);
        c.federation.tls_certificate = Some(PathBuf::new());
        c.federation.tls_private_key = Some(PathBuf::new());
        c.federation.ca_file = Some(PathBuf::new());
        c
    }

    /// The base URL advertised to clients, if one is known.
    pub fn client_base_url(&self) -> Option<&str> {
        self.well_known.client.as_deref().or(self.public_baseurl.as_deref())
    }
}

/// Parses an environment value with the type of the default at the same path: a string key takes
/// the value verbatim (so a numeric secret stays a string); other keys are parsed as TOML values.
fn parse_env_value(defaults: &toml::Table, path: &[String], raw: &str) -> toml::Value {
    let mut cursor = defaults;
    for (i, seg) in path.iter().enumerate() {
        match cursor.get(seg) {
            Some(toml::Value::Table(t)) if i + 1 < path.len() => cursor = t,
            Some(toml::Value::String(_)) if i + 1 == path.len() => {
                return toml::Value::String(raw.to_owned());
            }
            _ => break,
        }
    }
    // Try TOML (numbers, booleans, arrays, inline tables), else keep it as a string.
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut cursor = table;
    for seg in parents {
        let entry = cursor.entry(seg.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cursor = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(format!("`{seg}` is not a section")),
        };
    }
    cursor.insert(last.clone(), value);
    Ok(())
}

/// Turns serde's path (plus the field name of an "unknown field" error) into a dotted key.
fn describe_path(path: &serde_path_to_error::Path, inner: &toml::de::Error) -> String {
    let mut key = path.to_string();
    if key == "." {
        key.clear();
    }
    let msg = inner.to_string();
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some(end) = rest.find('`')
    {
        let field = &rest[..end];
        if !key.ends_with(field) {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(field);
        }
    }
    if key.is_empty() { "(top level)".into() } else { key }
}

/// OpenID tokens: short-lived, single-purpose tokens a user hands to a third party (Jitsi's
/// verification service, widgets) so that it can learn who they are and nothing else.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenIdConfig {
    /// Lifetime of an OpenID token (`expires_in`).
    pub token_lifetime_secs: u64,
    /// Tokens a user may request (a token bucket).
    pub requests_per_user: RateLimit,
}

impl Default for OpenIdConfig {
    fn default() -> Self {
        Self { token_lifetime_secs: 3600, requests_per_user: RateLimit { per_second: 1.0, burst: 20 } }
    }
}

/// Jitsi (issue 18). Unset `domain`: no `im.vector.riot.jitsi` in `.well-known`, and meeting rooms
/// cannot be created.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JitsiConfig {
    /// The Jitsi server, e.g. `visio.ville.fr` (Element's `preferredDomain`).
    pub domain: Option<String>,
    /// The Jitsi server verifies Matrix users (prosody-mod-auth-matrix-user-verification): meeting
    /// widgets say `auth: openidtoken-jwt` and their conference ID is derived from the room ID.
    pub openid_auth: bool,
    /// The Element Web whose `jitsi.html` wrapper renders the widget (Element Web replaces it by
    /// its own wrapper when it renders a Jitsi widget; other clients open this URL).
    pub element_url: String,
    /// The widget's name, shown in Element's room info.
    pub widget_name: String,
}

impl Default for JitsiConfig {
    fn default() -> Self {
        Self {
            domain: None,
            openid_auth: false,
            element_url: "https://app.element.io/".into(),
            widget_name: "Jitsi".into(),
        }
    }
}

/// MatrixRTC foci (MSC4143): the LiveKit JWT services Element Call connects through.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatrixRtcConfig {
    /// `livekit_service_url`s, e.g. `https://livekit-jwt.ville.fr`. Empty: no foci advertised, and
    /// the MSC4143 transports endpoint answers 404 `M_UNRECOGNIZED`.
    pub livekit_service_urls: Vec<String>,
}

/// Several instances on one database (`cluster`). Every instance finds the others by itself;
/// these only tune how fast.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// How often an instance refreshes its heartbeat row and looks for the others (an instance
    /// silent for 10 s is considered gone). At most 5 000.
    pub heartbeat_ms: u64,
    /// With other instances alive, how often the streams are read even when no notification
    /// came (a fallback: commits notify the others at once).
    pub poll_interval_ms: u64,
    /// How often an instance tries to take a singleton duty's lease that another one holds.
    pub lease_retry_ms: u64,
    /// How often the holder of a lease checks its lease connection.
    pub lease_check_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self { heartbeat_ms: 2_000, poll_interval_ms: 250, lease_retry_ms: 1_000, lease_check_ms: 2_000 }
    }
}

/// Delayed events (MSC4140), which Element Call uses to leave calls when a client disappears.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DelayedEventsConfig {
    /// Longest delay accepted, in milliseconds; longer ones get 400 `M_MAX_DELAY_EXCEEDED`.
    pub max_delay_ms: u64,
    /// Delayed events a user may have scheduled at once; past it 429 `M_LIMIT_EXCEEDED`.
    pub max_scheduled_per_user: u32,
    /// Scheduling requests per user (a token bucket).
    pub schedule_per_user: RateLimit,
    /// Management requests (cancel, restart, send) per client IP (a token bucket).
    pub manage_per_ip: RateLimit,
    /// Finalised delayed events (sent, cancelled, failed) are listed this long, then deleted.
    pub finalised_retention_secs: u64,
}

impl Default for DelayedEventsConfig {
    fn default() -> Self {
        Self {
            max_delay_ms: 24 * 3600 * 1000,
            max_scheduled_per_user: 100,
            schedule_per_user: RateLimit { per_second: 1.0, burst: 30 },
            manage_per_ip: RateLimit { per_second: 10.0, burst: 100 },
            finalised_retention_secs: 7 * 86_400,
        }
    }
}

/// Application services: the registration files (Synapse's YAML format) and how transactions
/// are delivered (`appservice::sender`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppServicesConfig {
    /// Paths of the registration files, read and validated at start-up.
    pub registration_files: Vec<PathBuf>,
    /// Most events (timeline, and separately ephemeral and to-device) in one transaction.
    pub max_events_per_transaction: u32,
    /// First retry delay after a failed transaction, in milliseconds; doubles up to the maximum.
    pub retry_initial_ms: u64,
    /// Longest delay between two attempts, in seconds.
    pub retry_max_secs: u64,
    /// Timeout of one request to an appservice (transactions, queries, pings), in seconds; over
    /// the WebSocket transport, the wait for a transaction's acknowledgement.
    pub request_timeout_secs: u64,
}

impl Default for AppServicesConfig {
    fn default() -> Self {
        Self {
            registration_files: Vec::new(),
            max_events_per_transaction: 100,
            retry_initial_ms: 1000,
            retry_max_secs: 300,
            request_timeout_secs: 30,
        }
    }
}

/// Alert webhooks: each hook posts into one room as one bot user (`webhooks/`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Accept webhook requests at all.
    pub enabled: bool,
    /// Requests per hook (a token bucket); past it 429 `M_LIMIT_EXCEEDED`.
    pub per_hook: RateLimit,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Most alerts listed in one message (the rest are counted).
    pub max_alerts_per_message: usize,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            per_hook: RateLimit { per_second: 1.0, burst: 30 },
            max_body_bytes: 256 * 1024,
            max_alerts_per_message: 50,
        }
    }
}

/// Server notices: messages from the server to a user, in a room of their own.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerNoticesConfig {
    /// Localpart of the system user that sends notices; unset disables server notices.
    pub system_mxid_localpart: Option<String>,
    /// Display name of the system user.
    pub system_mxid_display_name: String,
    /// Name of the server-notices room.
    pub room_name: String,
}

impl Default for ServerNoticesConfig {
    fn default() -> Self {
        Self {
            system_mxid_localpart: None,
            system_mxid_display_name: "Server Notices".into(),
            room_name: "Server Notices".into(),
        }
    }
}

/// Bot accounts (`user_type = "bot"`: created by the admin API, webhooks, server notices).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BotsConfig {
    /// Bots are not subject to the message rate limits (`rate_limits.messages_per_*`).
    pub exempt_from_rate_limits: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn shipped_configs_parse() {
        let root = env!("CARGO_MANIFEST_DIR");
        for f in ["config/parvis.toml", "config/parvis.example.toml"] {
            let c = Config::load(&Path::new(root).join(f), vec![]).unwrap();
            assert_eq!(c.server_name, "localhost", "{f}");
            assert_eq!(c.listen.client.to_string(), "127.0.0.1:8008", "{f}");
            assert_eq!(c.database.url, "postgres://postgres@127.0.0.1:5432/parvis", "{f}");
        }
    }

    #[test]
    fn example_documents_every_key() {
        // Every key of the defaults must appear in the example file.
        let root = env!("CARGO_MANIFEST_DIR");
        let text = std::fs::read_to_string(Path::new(root).join("config/parvis.example.toml")).unwrap();
        let defaults = toml::Table::try_from(Config::type_hints()).unwrap();
        fn walk(prefix: &str, t: &toml::Table, text: &str) {
            for (k, v) in t {
                match v {
                    toml::Value::Table(sub) if text.contains(&format!("[{prefix}{k}]")) => {
                        walk(&format!("{prefix}{k}."), sub, text);
                    }
                    _ => assert!(text.contains(&format!("{k} =")), "key {prefix}{k} undocumented"),
                }
            }
        }
        walk("", &defaults, &text);
    }

    #[test]
    fn env_overrides_the_four_deployment_keys() {
        let c = Config::from_toml_and_env(
            "",
            "test.toml",
            env(&[
                ("PARVIS__SERVER_NAME", "ville.example"),
                ("PARVIS__DATABASE__URL", "postgres://u@db:5432/x"),
                ("PARVIS__LISTEN__CLIENT", "0.0.0.0:9000"),
                ("PARVIS__REGISTRATION__SHARED_SECRET", "12345"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server_name, "ville.example");
        assert_eq!(c.database.url, "postgres://u@db:5432/x");
        assert_eq!(c.listen.client.to_string(), "0.0.0.0:9000");
        // A numeric-looking secret stays a string.
        assert_eq!(c.registration.shared_secret.as_deref(), Some("12345"));
    }

    #[test]
    fn env_overrides_typed_values() {
        let c = Config::from_toml_and_env(
            "[registration]\nenabled = false\n",
            "t.toml",
            env(&[
                ("PARVIS__REGISTRATION__ENABLED", "true"),
                ("PARVIS__DATABASE__MAX_CONNECTIONS", "7"),
                ("PARVIS__RATE_LIMITS__LOGIN_PER_IP", "{ per_second = 1.5, burst = 4 }"),
            ]),
        )
        .unwrap();
        assert!(c.registration.enabled);
        assert_eq!(c.database.max_connections, 7);
        assert_eq!(c.rate_limits.login_per_ip, RateLimit { per_second: 1.5, burst: 4 });
    }

    #[test]
    fn unknown_keys_are_named() {
        let e =
            Config::from_toml_and_env("[registration]\nenabeld = true\n", "my.toml", vec![]).unwrap_err().to_string();
        assert!(e.contains("registration.enabeld") && e.contains("my.toml"), "{e}");

        let e =
            Config::from_toml_and_env("", "my.toml", env(&[("PARVIS__DATABASE__URLL", "x")])).unwrap_err().to_string();
        assert!(e.contains("database.urll") && e.contains("PARVIS__DATABASE__URLL"), "{e}");

        let e = Config::from_toml_and_env("", "my.toml", env(&[("PARVIS__LISTEN__CLIENT", "nope")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen.client") && e.contains("PARVIS__LISTEN__CLIENT"), "{e}");

        let e = Config::from_toml_and_env("server_name = \"bad name!\"\n", "my.toml", vec![]).unwrap_err().to_string();
        assert!(e.contains("server_name") && e.contains("my.toml"), "{e}");
    }

    #[test]
    fn federation_keys_are_checked_and_overridable() {
        // Off unless the listener is set; on by default with it.
        let c = Config::from_toml_and_env("", "f.toml", vec![]).unwrap();
        assert!(!c.federation_enabled());
        let c = Config::from_toml_and_env(
            "server_name = \"[::1]:8448\"\n[listen]\nfederation = \"127.0.0.1:8448\"\n",
            "f.toml",
            env(&[
                ("PARVIS__FEDERATION__VERIFY_CERTIFICATES", "false"),
                ("PARVIS__FEDERATION__ALLOWED_SERVERS", r#"["ville-a.fr", "1.2.3.4:8448", "[::1]"]"#),
            ]),
        )
        .unwrap();
        assert!(c.federation_enabled());
        assert!(!c.federation.verify_certificates);
        assert_eq!(c.federation.allowed_servers, ["ville-a.fr", "1.2.3.4:8448", "[::1]"]);
        let c = Config::from_toml_and_env(
            "[listen]\nfederation = \"127.0.0.1:8448\"\n[federation]\nenabled = false\n",
            "f.toml",
            vec![],
        )
        .unwrap();
        assert!(!c.federation_enabled());

        for (toml, env_vars, key) in [
            ("[federation]\nenabled = true\n", vec![], "federation.enabled"),
            ("[federation]\ntls_certificate = \"/etc/hostname\"\n", vec![], "federation.tls_private_key"),
            ("[federation]\ntls_private_key = \"/etc/hostname\"\n", vec![], "federation.tls_certificate"),
            ("[federation]\nca_file = \"/nonexistent/ca.pem\"\n", vec![], "federation.ca_file"),
            ("[federation]\nallowed_servers = [\"bad name!\"]\n", vec![], "federation.allowed_servers"),
            (
                "",
                vec![("PARVIS__FEDERATION__TRUSTED_KEY_SERVERS", r#"["a.fr:99999"]"#)],
                "federation.trusted_key_servers",
            ),
            ("[federation]\nkey_validity_secs = 1\n", vec![], "federation.key_validity_secs"),
            ("[federation]\nrequest_timeout_secs = 0\n", vec![], "federation.request_timeout_secs"),
            ("[federation]\nverify_certificate = false\n", vec![], "federation.verify_certificate"),
        ] {
            let e = Config::from_toml_and_env(toml, "f.toml", env(&env_vars)).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }
}
