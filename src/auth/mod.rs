//! Authentication: access and refresh tokens, the token cache, and user-interactive auth.
//!
//! Tokens are 256-bit random strings. The database stores only their SHA-256 hash and lookups go
//! by hash, so the secret is never compared byte by byte (no timing oracle) and a database leak
//! yields no usable token. Validated tokens are cached in-process for `auth.token_cache_ttl_secs`;
//! revocation evicts them from this process's cache at once.

pub mod uia;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;

use crate::error::{ApiResult, Error};
use crate::storage::{self, now_ms};

/// A validated access token: who is calling, from which device.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: Arc<str>,
    pub device_id: Arc<str>,
    pub is_admin: bool,
    pub token_hash: [u8; 32],
    pub expires_ts: Option<i64>,
    /// The application service whose `as_token` this is (the user is its sender or a user of
    /// its namespace it masquerades as).
    pub appservice: Option<Arc<str>>,
    /// Not subject to the message rate limits: an appservice with `rate_limited: false` (or its
    /// sender), or a bot (`user_type = "bot"`) when `bots.exempt_from_rate_limits`.
    pub rate_exempt: bool,
    /// `user_type = "bot"`.
    pub is_bot: bool,
}

pub type TokenHash = [u8; 32];

pub fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token with a recognisable prefix (helps secret scanners spot leaked tokens).
pub fn new_token(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{prefix}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// A device ID in the style clients are used to (ten upper-case letters).
pub fn new_device_id() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..10).map(|_| (b'A' + rng.gen_range(0..26)) as char).collect()
}

pub struct AuthService {
    cache: moka::future::Cache<TokenHash, Arc<Session>>,
    /// Devices whose `last_seen` was written recently, so it is written at most every 5 minutes.
    seen: moka::sync::Cache<(Arc<str>, Arc<str>), ()>,
    access_token_lifetime_ms: i64,
    cluster: Arc<crate::cluster::Cluster>,
}

/// Tokens handed to a client at login, registration or refresh.
#[derive(Debug)]
pub struct IssuedTokens {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_in_ms: Option<i64>,
}

impl AuthService {
    pub fn new(cache_ttl: Duration, access_token_lifetime: Duration, cluster: Arc<crate::cluster::Cluster>) -> Self {
        Self {
            cluster,
            cache: moka::future::Cache::builder().max_capacity(100_000).time_to_live(cache_ttl).build(),
            seen: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(Duration::from_secs(300)).build(),
            access_token_lifetime_ms: access_token_lifetime.as_millis() as i64,
        }
    }

    /// Resolves an access token. Expired tokens give `M_UNKNOWN_TOKEN` with `soft_logout: true`.
    pub async fn authenticate(&self, db: &sqlx::PgPool, token: &str) -> ApiResult<Arc<Session>> {
        let hash = hash_token(token);
        let session = match self.cache.get(&hash).await {
            Some(s) => s,
            None => {
                let owner = storage::tokens::lookup_access(db, &hash).await?;
                let Some(owner) = owner.filter(|o| !o.deactivated) else {
                    return Err(Error::unknown_token(false));
                };
                let s = Arc::new(Session {
                    user_id: owner.user_id.into(),
                    device_id: owner.device_id.into(),
                    is_admin: owner.is_admin,
                    token_hash: hash,
                    expires_ts: owner.expires_ts,
                    appservice: None,
                    rate_exempt: false,
                    is_bot: owner.user_type.as_deref() == Some("bot"),
                });
                self.cache.insert(hash, s.clone()).await;
                s
            }
        };
        if let Some(exp) = session.expires_ts
            && exp <= now_ms()
        {
            return Err(Error::unknown_token(true));
        }
        Ok(session)
    }

    /// Forgets revoked tokens, in this process and in every other live instance (which have
    /// confirmed it when this returns, or did not answer in time: see `cluster`).
    pub async fn evict(&self, hashes: &[Vec<u8>]) {
        self.evict_local(hashes).await;
        self.cluster.tokens_revoked(hashes).await;
    }

    pub async fn evict_one(&self, hash: &TokenHash) {
        self.evict(&[hash.to_vec()]).await;
    }

    /// Forgets revoked tokens in this process only.
    pub async fn evict_local(&self, hashes: &[Vec<u8>]) {
        for h in hashes {
            if let Ok(h) = <TokenHash>::try_from(h.as_slice()) {
                self.cache.invalidate(&h).await;
            }
        }
    }

    /// True the first time a device is seen in a 5-minute window (then `last_seen` is written).
    pub fn should_touch(&self, session: &Session) -> bool {
        let key = (session.user_id.clone(), session.device_id.clone());
        if self.seen.contains_key(&key) {
            return false;
        }
        self.seen.insert(key, ());
        true
    }

    /// Issues an access token (and, if asked, a refresh token) for an existing device.
    pub async fn issue(
        &self,
        conn: &mut PgConnection,
        user_id: &str,
        device_id: &str,
        with_refresh: bool,
    ) -> sqlx::Result<IssuedTokens> {
        let access_token = new_token("pva_");
        let (refresh_token, refresh_id, expires) = if with_refresh {
            let rt = new_token("pvr_");
            let id = storage::tokens::insert_refresh(&mut *conn, &hash_token(&rt), user_id, device_id).await?;
            (Some(rt), Some(id), Some(now_ms() + self.access_token_lifetime_ms))
        } else {
            (None, None, None)
        };
        storage::tokens::insert_access(&mut *conn, &hash_token(&access_token), user_id, device_id, expires, refresh_id)
            .await?;
        Ok(IssuedTokens { access_token, refresh_token, expires_in_ms: expires.map(|_| self.access_token_lifetime_ms) })
    }
}

/// Creates (or reuses) a device and issues its tokens, in one transaction.
pub async fn start_device_session(
    state: &crate::state::AppState,
    user_id: &str,
    device_id: Option<&str>,
    display_name: Option<&str>,
    ip: Option<&str>,
    with_refresh: bool,
) -> ApiResult<(String, IssuedTokens)> {
    let device_id = match device_id {
        Some(d) if d.is_empty() || d.len() > 255 => {
            return Err(Error::invalid_param("device_id must be 1 to 255 bytes"));
        }
        Some(d) => d.to_owned(),
        None => new_device_id(),
    };
    if display_name.is_some_and(|n| n.len() > 1024) {
        return Err(Error::invalid_param("initial_device_display_name is too long"));
    }
    let mut tx = state.db.begin().await?;
    if !storage::devices::upsert(&mut *tx, user_id, &device_id, display_name, ip).await? {
        // MSC3814: the dehydrated device lives on the server; no session may take it over.
        return Err(Error::invalid_param("device_id is the user's dehydrated device and cannot be logged into"));
    }
    let tokens = state.auth.issue(&mut tx, user_id, &device_id, with_refresh).await?;
    // A new device is news for whoever encrypts for this user.
    let pos = crate::e2ee::record_device_list_change(&mut tx, user_id).await?;
    tx.commit().await?;
    crate::e2ee::device_list_committed(state, user_id, pos);
    Ok((device_id, tokens))
}

/// Deletes devices (revoking their tokens) and evicts them from the cache.
pub async fn delete_devices(state: &crate::state::AppState, user_id: &str, device_ids: &[String]) -> ApiResult<()> {
    let revoked = storage::devices::delete(&state.db, user_id, storage::devices::Selection::These(device_ids)).await?;
    state.auth.evict(&revoked).await;
    crate::e2ee::devices_changed(state, user_id).await
}

/// Deletes every device of a user but `keep`, revoking their tokens.
pub async fn delete_other_devices(state: &crate::state::AppState, user_id: &str, keep: Option<&str>) -> ApiResult<()> {
    let revoked = storage::devices::delete(&state.db, user_id, storage::devices::Selection::AllExcept(keep)).await?;
    state.auth.evict(&revoked).await;
    crate::e2ee::devices_changed(state, user_id).await
}
