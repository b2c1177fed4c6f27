//! The media repository: uploads (plain and asynchronous), serving, thumbnails, URL previews,
//! the antivirus hook and admin operations. Handlers are in `api/client/media.rs` and
//! `api/admin/media.rs`; SQL in `storage/media.rs`; content in a [`store::MediaStore`].
//!
//! Durability: an upload is streamed to a temporary file (hashing it on the way), the file is
//! published in the store under a fresh random key, and only then is the metadata row written
//! (or the reservation filled). A failure at any step leaves no row pointing at missing content;
//! content left without a row (a crash between the two) is never served.

pub mod federation;
pub mod preview;
pub mod remote;
pub mod scan;
pub mod store;
pub mod thumbnail;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use futures_util::StreamExt;
use rand::Rng;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::config::MediaConfig;
use crate::error::{ApiResult, Error};
use crate::http::ratelimit::Limiter;
use crate::state::AppState;
use crate::storage::media::{Content, MediaRow, PublishError};
use crate::storage::{self, now_ms};

/// Longest a download waits for the content of a reservation (`timeout_ms`).
pub const MAX_WAIT_MS: u64 = 120_000;
pub const DEFAULT_WAIT_MS: u64 = 20_000;

/// The media service, one per process (`AppState::media`).
pub struct Media {
    pub store: Arc<dyn store::MediaStore>,
    tmp_dir: PathBuf,
    pub upload_limiter: Limiter,
    /// Bumped whenever a reservation is filled, to wake downloads waiting for it.
    uploaded: tokio::sync::watch::Sender<u64>,
    pub thumbnails: thumbnail::Thumbnailer,
    pub previews: Option<preview::Previewer>,
    pub scanner: Option<scan::Scanner>,
    /// Remote media being fetched, shared by concurrent requests for it (`remote::fetch`).
    pub(crate) remote_fetches: remote::InFlight,
}

impl Media {
    pub fn new(config: &MediaConfig) -> anyhow::Result<Self> {
        Ok(Self {
            store: store::open(config)?,
            tmp_dir: config.path.join("tmp"),
            upload_limiter: Limiter::new(config.uploads_per_user),
            uploaded: tokio::sync::watch::channel(0).0,
            thumbnails: thumbnail::Thumbnailer::new(config),
            previews: if config.url_preview_enabled { Some(preview::Previewer::new(config)?) } else { None },
            scanner: scan::Scanner::new(config)?,
            remote_fetches: Default::default(),
        })
    }
}

/// A random string of `len` characters from `[A-Za-z0-9]`.
pub fn random_id(len: usize) -> String {
    rand::thread_rng().sample_iter(&rand::distributions::Alphanumeric).take(len).map(char::from).collect()
}

/// Media IDs are opaque to clients but only ever made of URL-safe characters (`[A-Za-z0-9_-]`).
pub fn valid_media_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 255 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_server_name(name: &str) -> bool {
    ruma::ServerName::parse(name).is_ok()
}

/// The content type to record: the client's when it is a plausible `type/subtype[; params]`,
/// else `application/octet-stream`.
pub fn sanitize_content_type(raw: Option<&str>) -> String {
    let fallback = || "application/octet-stream".to_owned();
    let Some(raw) = raw.map(str::trim) else { return fallback() };
    let essence = raw.split(';').next().unwrap_or("").trim();
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b));
    match essence.split_once('/') {
        Some((t, s)) if token(t) && token(s) && raw.len() <= 255 && raw.bytes().all(|b| (0x20..0x7f).contains(&b)) => {
            raw.to_ascii_lowercase()
        }
        _ => fallback(),
    }
}

/// A file name safe to record and to put in `Content-Disposition`: no path, no control
/// characters, no quotes or backslashes, at most 255 bytes. `None` if nothing is left.
pub fn sanitize_file_name(raw: &str) -> Option<String> {
    let base = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let mut out = String::new();
    for c in base.chars().filter(|c| !c.is_control() && *c != '"' && !matches!(c, '\u{202a}'..='\u{202e}')) {
        if out.len() + c.len_utf8() > 255 {
            break;
        }
        out.push(c);
    }
    let out = out.trim().to_owned();
    if out.is_empty() || out == "." || out == ".." { None } else { Some(out) }
}

/// A temporary file removed when dropped (unless it was moved away meanwhile).
pub struct TempFile(PathBuf);

impl TempFile {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An upload body received into a temporary file.
pub struct Received {
    pub file: TempFile,
    pub size: u64,
    pub sha256: [u8; 32],
}

/// Streams a request body to a temporary file, hashing it, refusing more than the configured
/// maximum with 413 `M_TOO_LARGE` (before reading when `Content-Length` says so).
pub async fn receive(state: &AppState, body: Body, content_length: Option<u64>) -> ApiResult<Received> {
    let max = state.config.media.max_upload_bytes;
    let too_large = || Error::too_large(format!("Uploads are limited to {max} bytes"));
    if content_length.is_some_and(|l| l > max) {
        return Err(too_large());
    }
    let media = &state.media;
    tokio::fs::create_dir_all(&media.tmp_dir).await.map_err(|e| anyhow::anyhow!("media temp dir: {e}"))?;
    let tmp = TempFile(media.tmp_dir.join(format!("upload-{}", random_id(24))));
    let mut file = tokio::fs::File::create(tmp.path()).await.map_err(|e| anyhow::anyhow!("temp file: {e}"))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| Error::unknown("Upload interrupted"))?;
        size += chunk.len() as u64;
        if size > max {
            return Err(too_large());
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(|e| anyhow::anyhow!("writing upload: {e}"))?;
    }
    file.flush().await.map_err(|e| anyhow::anyhow!("writing upload: {e}"))?;
    drop(file);
    Ok(Received { file: tmp, size, sha256: hasher.finalize().into() })
}

/// A fresh storage key for content: `content/ab/cd/<random>`.
pub(crate) fn content_key() -> String {
    let r = random_id(32);
    format!("content/{}/{}/{r}", &r[..2], &r[2..4])
}

/// Puts received content in the store; returns its key.
async fn publish(state: &AppState, received: &Received) -> ApiResult<String> {
    let key = content_key();
    state.media.store.put_file(&key, received.file.path()).await.map_err(|e| {
        tracing::error!(error = format!("{e:#}"), "media store write failed");
        Error::new(axum::http::StatusCode::BAD_GATEWAY, "M_UNKNOWN", "Could not store the upload")
    })?;
    Ok(key)
}

fn quota_error(state: &AppState) -> Error {
    let mut e = Error::new(
        axum::http::StatusCode::FORBIDDEN,
        "M_USER_LIMIT_EXCEEDED",
        format!("Your media quota of {} bytes would be exceeded", state.config.media.user_quota_bytes),
    )
    .with("can_upgrade", json!(false));
    if let Some(uri) = &state.config.media.quota_info_uri {
        e = e.with("info_uri", json!(uri));
    }
    e
}

/// Checks the per-user upload rate limit.
pub fn check_rate(state: &AppState, user_id: &str, is_admin: bool) -> ApiResult<()> {
    state.rate_limits.check_user(&state.media.upload_limiter, user_id, is_admin)
}

/// A plain upload (`POST /upload`): returns the new media ID.
pub async fn upload(
    state: &AppState,
    uploader: &str,
    content_type: &str,
    file_name: Option<&str>,
    received: Received,
) -> ApiResult<String> {
    let key = publish(state, &received).await?;
    let media_id = random_id(24);
    let content = Content {
        content_type,
        upload_name: file_name,
        size: received.size as i64,
        sha256: &received.sha256,
        storage_key: &key,
    };
    let cfg = &state.config.media;
    let result = storage::media::insert_uploaded(
        &state.db,
        &state.config.server_name,
        &media_id,
        uploader,
        &content,
        cfg.legacy_serve_new_media,
        cfg.user_quota_bytes as i64,
        now_ms(),
    )
    .await;
    match result {
        Ok(Ok(())) => {
            after_upload(state, &media_id, content_type, &key);
            Ok(media_id)
        }
        other => {
            discard(state, &key).await;
            match other {
                Ok(Err(PublishError::OverQuota)) => Err(quota_error(state)),
                Ok(Err(e)) => Err(anyhow::anyhow!("media ID clash: {e:?}").into()),
                Ok(Ok(())) => Err(Error::internal()),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Reserves a media ID for an asynchronous upload (`POST /v1/create`): `(media_id, expires_ts)`.
pub async fn create(state: &AppState, uploader: &str) -> ApiResult<(String, i64)> {
    let cfg = &state.config.media;
    let now = now_ms();
    let expires = now + (cfg.unused_expiry_secs as i64).saturating_mul(1000);
    let media_id = random_id(24);
    let ok = storage::media::reserve(
        &state.db,
        &state.config.server_name,
        &media_id,
        uploader,
        cfg.legacy_serve_new_media,
        now,
        expires,
        i64::from(cfg.max_pending_uploads_per_user),
    )
    .await?;
    if !ok {
        return Err(Error::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "M_LIMIT_EXCEEDED",
            "Too many media IDs reserved and not yet uploaded",
        ));
    }
    Ok((media_id, expires))
}

/// Before receiving the body of `PUT /upload/{serverName}/{mediaId}`: fails early when the upload
/// could not be accepted anyway.
pub async fn check_reservation(state: &AppState, server_name: &str, media_id: &str, uploader: &str) -> ApiResult<()> {
    if server_name != state.config.server_name || !valid_media_id(media_id) {
        return Err(Error::not_found("Unknown media ID"));
    }
    match storage::media::get(&state.db, server_name, media_id).await? {
        None => Err(Error::not_found("Unknown media ID")),
        Some(r) if r.uploader.as_deref() != Some(uploader) => {
            Err(Error::forbidden("This media ID was reserved by another user"))
        }
        Some(r) if r.storage_key.is_some() => {
            Err(Error::new(axum::http::StatusCode::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA", "Media already uploaded"))
        }
        Some(r) if r.pending_expires_ts.is_some_and(|t| t <= now_ms()) => {
            Err(Error::not_found("This media ID expired unused"))
        }
        Some(_) => Ok(()),
    }
}

/// Fills a reservation (`PUT /upload/{serverName}/{mediaId}`).
pub async fn upload_reserved(
    state: &AppState,
    media_id: &str,
    uploader: &str,
    content_type: &str,
    file_name: Option<&str>,
    received: Received,
) -> ApiResult<()> {
    let key = publish(state, &received).await?;
    let content = Content {
        content_type,
        upload_name: file_name,
        size: received.size as i64,
        sha256: &received.sha256,
        storage_key: &key,
    };
    let result = storage::media::fill_reservation(
        &state.db,
        &state.config.server_name,
        media_id,
        uploader,
        &content,
        state.config.media.user_quota_bytes as i64,
        now_ms(),
    )
    .await;
    match result {
        Ok(Ok(())) => {
            state.media.uploaded.send_modify(|n| *n += 1);
            after_upload(state, media_id, content_type, &key);
            Ok(())
        }
        other => {
            discard(state, &key).await;
            Err(match other {
                Ok(Err(PublishError::OverQuota)) => quota_error(state),
                Ok(Err(PublishError::Exists)) => {
                    Error::new(axum::http::StatusCode::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA", "Media already uploaded")
                }
                Ok(Err(PublishError::NotOwner)) => Error::forbidden("This media ID was reserved by another user"),
                Ok(Err(PublishError::NotFound)) => Error::not_found("Unknown or expired media ID"),
                Ok(Ok(())) => Error::internal(),
                Err(e) => e.into(),
            })
        }
    }
}

/// Deletes content that will not be referenced (logged, never fails the caller).
pub(crate) async fn discard(state: &AppState, key: &str) {
    if let Err(e) = state.media.store.delete(key).await {
        tracing::warn!(key, error = format!("{e:#}"), "could not delete unreferenced media content");
    }
}

fn after_upload(state: &AppState, media_id: &str, content_type: &str, key: &str) {
    if state.config.media.thumbnails_at_upload && thumbnail::is_thumbnailable(content_type) {
        let (state, media_id, key) = (state.clone(), media_id.to_owned(), key.to_owned());
        tokio::spawn(async move {
            let server = state.config.server_name.clone();
            if let Err(e) = thumbnail::pregenerate(&state, &server, &media_id, &key).await {
                tracing::debug!(media_id, error = format!("{e:#}"), "thumbnails not pre-generated");
            }
        });
    }
}

/// How a download is asked for.
pub struct Fetch {
    /// Through the deprecated unauthenticated endpoints.
    pub legacy: bool,
    pub timeout_ms: Option<u64>,
    pub allow_remote: bool,
}

/// The media row to serve, after every check: existence (waiting for the content of a
/// reservation), quarantine, the legacy freeze, the antivirus verdict.
pub async fn find(state: &AppState, server_name: &str, media_id: &str, how: &Fetch) -> ApiResult<MediaRow> {
    let not_found = || Error::not_found("Media not found");
    if !valid_server_name(server_name) || !valid_media_id(media_id) {
        return Err(not_found());
    }
    if how.legacy && !state.config.media.legacy_endpoints {
        return Err(not_found());
    }
    let row = match storage::media::get(&state.db, server_name, media_id).await? {
        Some(r) => r,
        None if server_name != state.config.server_name => {
            // Remote media fetched now is new media: the legacy endpoints would not serve it.
            if !how.allow_remote || (how.legacy && !state.config.media.legacy_serve_new_media) {
                return Err(not_found());
            }
            remote::fetch(state, server_name, media_id, how.timeout_ms).await?.ok_or_else(not_found)?
        }
        None => return Err(not_found()),
    };
    let row = if row.storage_key.is_none() { wait_for_content(state, row, how.timeout_ms).await? } else { row };
    if row.quarantined_by.is_some() {
        return Err(not_found());
    }
    if how.legacy && !row.allow_unauthenticated {
        return Err(not_found());
    }
    scan::check(state, &row).await?;
    if now_ms() - row.last_access_ts > 10 * 60 * 1000 {
        let (db, s, m) = (state.db.clone(), row.server_name.clone(), row.media_id.clone());
        tokio::spawn(async move {
            let _ = storage::media::touch(&db, &s, &m, now_ms()).await;
        });
    }
    Ok(row)
}

/// Waits until a reservation is filled, within `timeout_ms` (capped): 504 `M_NOT_YET_UPLOADED`.
async fn wait_for_content(state: &AppState, row: MediaRow, timeout_ms: Option<u64>) -> ApiResult<MediaRow> {
    let wait = Duration::from_millis(timeout_ms.unwrap_or(DEFAULT_WAIT_MS).min(MAX_WAIT_MS));
    let deadline = tokio::time::Instant::now() + wait;
    let mut uploads = state.media.uploaded.subscribe();
    loop {
        if row.pending_expires_ts.is_some_and(|t| t <= now_ms()) {
            return Err(Error::not_found("Media not found"));
        }
        // Woken by uploads through this instance; polled for the others.
        let _ = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + Duration::from_secs(1)),
            uploads.changed(),
        )
        .await;
        if let Some(r) = storage::media::get(&state.db, &row.server_name, &row.media_id).await? {
            if r.storage_key.is_some() {
                return Ok(r);
            }
        } else {
            return Err(Error::not_found("Media not found"));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::new(
                axum::http::StatusCode::GATEWAY_TIMEOUT,
                "M_NOT_YET_UPLOADED",
                "The content of this media has not been uploaded yet",
            ));
        }
    }
}

/// Deletes a media item, its thumbnails and their content; false if it did not exist.
pub async fn delete(state: &AppState, server_name: &str, media_id: &str) -> ApiResult<bool> {
    let Some(keys) = storage::media::delete(&state.db, server_name, media_id).await? else { return Ok(false) };
    state.media.thumbnails.forget(server_name, media_id).await;
    for key in keys {
        discard(state, &key).await;
    }
    Ok(true)
}

/// Deletes cached remote media (and preview images) not accessed since `before_ts`.
pub async fn purge_cache(state: &AppState, before_ts: i64) -> ApiResult<u64> {
    let mut deleted = 0;
    loop {
        let batch = storage::media::remote_not_accessed_since(&state.db, before_ts, 500).await?;
        if batch.is_empty() {
            return Ok(deleted);
        }
        for (server, id) in batch {
            if delete(state, &server, &id).await? {
                deleted += 1;
            }
        }
    }
}

/// Temporary files older than this are left over by a crash (uploads take less).
const STALE_TEMP: Duration = Duration::from_secs(24 * 3600);

/// Deletes stale temporary files (of uploads interrupted by a crash); returns how many.
async fn sweep_temp_dir(dir: &Path) -> std::io::Result<usize> {
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    while let Some(entry) = entries.next_entry().await? {
        let meta = entry.metadata().await?;
        let age = meta.modified().ok().and_then(|m| m.elapsed().ok()).unwrap_or_default();
        if meta.is_file() && age > STALE_TEMP && tokio::fs::remove_file(entry.path()).await.is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Periodic clean-up: expired reservations, URL previews, stale temporary files.
pub async fn housekeeping(state: AppState, mut stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        if ticks.is_multiple_of(60) {
            match sweep_temp_dir(&state.media.tmp_dir).await {
                Ok(n) if n > 0 => tracing::info!(removed = n, "stale media temporary files removed"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "media temporary directory clean-up failed"),
            }
        }
        ticks += 1;
        match storage::media::delete_expired_reservations(&state.db, now_ms()).await {
            Ok(n) if n > 0 => tracing::debug!(released = n, "unused media IDs released"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "media reservation clean-up failed"),
        }
        if let Err(e) = storage::media::delete_expired_previews(&state.db, now_ms()).await {
            tracing::warn!(error = %e, "URL preview clean-up failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_temporary_files_are_swept() {
        let dir = std::env::temp_dir().join(format!("parvis-sweep-{}", random_id(8)));
        std::fs::create_dir_all(&dir).unwrap();
        let old = dir.join("upload-old");
        let f = std::fs::File::create(&old).unwrap();
        f.set_modified(std::time::SystemTime::now() - STALE_TEMP - Duration::from_secs(60)).unwrap();
        std::fs::write(dir.join("upload-new"), b"in progress").unwrap();
        assert_eq!(sweep_temp_dir(&dir).await.unwrap(), 1);
        assert!(!old.exists() && dir.join("upload-new").exists());
        assert_eq!(sweep_temp_dir(&dir.join("missing")).await.unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn content_types_and_file_names() {
        assert_eq!(sanitize_content_type(Some("image/PNG")), "image/png");
        assert_eq!(sanitize_content_type(Some("text/plain; charset=utf-8")), "text/plain; charset=utf-8");
        for bad in ["", "png", "text/ html", "a/b\u{7f}", "</script>/x"] {
            assert_eq!(sanitize_content_type(Some(bad)), "application/octet-stream", "{bad:?}");
        }
        assert_eq!(sanitize_content_type(None), "application/octet-stream");
        assert_eq!(sanitize_file_name("../../etc/passwd").as_deref(), Some("passwd"));
        assert_eq!(sanitize_file_name("C:\\x\\rapport \"final\".pdf").as_deref(), Some("rapport final.pdf"));
        assert_eq!(sanitize_file_name("a\u{202e}gpj.exe").as_deref(), Some("agpj.exe"));
        assert_eq!(sanitize_file_name("\n"), None);
        assert_eq!(sanitize_file_name(".."), None);
        assert!(sanitize_file_name(&"é".repeat(300)).unwrap().len() <= 255);
        assert!(
            valid_media_id("abc_DEF-123") && !valid_media_id("a/b") && !valid_media_id("") && !valid_media_id("..")
        );
    }
}
