//! Remote media (`mxc://other.server/...`): fetched over federation
//! (`federation::media::download`), checked against the limits, then cached locally, where
//! later requests find it (even when its server is gone) and `purge_media_cache` can evict it.
//! Concurrent requests for the same media share one fetch; at most 8 fetches run at once (each
//! holds its content in memory until it is stored).
//!
//! Thumbnails of remote media are made here from the cached original (as for local media), so
//! a thumbnail request fetches the whole content once.

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::StatusCode;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use sha2::{Digest, Sha256};

use super::{DEFAULT_WAIT_MS, MAX_WAIT_MS, content_key, discard, sanitize_content_type, sanitize_file_name};
use crate::error::{ApiResult, Error};
use crate::federation::client::FedError;
use crate::state::AppState;
use crate::storage::media::{Content, MediaRow};
use crate::storage::{self, now_ms};

type SharedFetch = Shared<BoxFuture<'static, Result<Option<MediaRow>, Arc<Error>>>>;

/// Remote media fetched at once (each is held in memory, up to `media.max_upload_bytes`, until
/// it is stored); further fetches wait for a turn.
const MAX_CONCURRENT_FETCHES: usize = 8;

/// Fetches under way, by `(server_name, media_id)`, and the turns to fetch.
pub struct InFlight {
    fetches: std::sync::Mutex<HashMap<(String, String), SharedFetch>>,
    turns: tokio::sync::Semaphore,
}

impl Default for InFlight {
    fn default() -> Self {
        Self { fetches: Default::default(), turns: tokio::sync::Semaphore::new(MAX_CONCURRENT_FETCHES) }
    }
}

fn copy(e: &Error) -> Error {
    Error { status: e.status, errcode: e.errcode, message: e.message.clone(), extra: e.extra.clone() }
}

/// Fetches `mxc://{server_name}/{media_id}` from its server and caches it; `None` when that
/// server says it does not exist (or federation is off). `timeout_ms` is passed on: how long
/// the remote may wait for content not uploaded yet (default 20 s, at most 120 s).
pub async fn fetch(
    state: &AppState,
    server_name: &str,
    media_id: &str,
    timeout_ms: Option<u64>,
) -> ApiResult<Option<MediaRow>> {
    if !state.federation.enabled || ruma::ServerName::parse(server_name).is_err() {
        return Ok(None);
    }
    let wait_ms = timeout_ms.unwrap_or(DEFAULT_WAIT_MS).min(MAX_WAIT_MS);
    let key = (server_name.to_owned(), media_id.to_owned());
    let shared = {
        let mut map = state.media.remote_fetches.fetches.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.clone())
            .or_insert_with(|| {
                // A task of its own: the fetch completes (and is cached) even if the requests
                // waiting for it go away.
                let st = state.clone();
                let task = tokio::spawn(async move {
                    let r = match st.media.remote_fetches.turns.acquire().await {
                        Ok(_turn) => download_and_cache(&st, &key.0, &key.1, wait_ms).await.map_err(Arc::new),
                        Err(_) => Err(Arc::new(Error::internal())),
                    };
                    st.media.remote_fetches.fetches.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                    r
                });
                async move { task.await.unwrap_or_else(|_| Err(Arc::new(Error::internal()))) }.boxed().shared()
            })
            .clone()
    };
    shared.await.map_err(|e| copy(&e))
}

async fn download_and_cache(
    state: &AppState,
    server_name: &str,
    media_id: &str,
    wait_ms: u64,
) -> ApiResult<Option<MediaRow>> {
    // Cached meanwhile (by a fetch that just finished, or another instance)?
    if let Some(r) = storage::media::get(&state.db, server_name, media_id).await?
        && r.storage_key.is_some()
    {
        return Ok(Some(r));
    }
    let server = ruma::ServerName::parse(server_name).map_err(|_| Error::not_found("Media not found"))?;
    let max = state.config.media.max_upload_bytes;
    let fetched = crate::federation::media::download(
        &state.federation,
        &server,
        media_id,
        wait_ms,
        usize::try_from(max).unwrap_or(usize::MAX),
    )
    .await;
    let f = match fetched {
        Ok(f) => f,
        Err(e) => return failure(server_name, media_id, e),
    };
    let content_type = sanitize_content_type(f.content_type.as_deref());
    let name = f.file_name.as_deref().and_then(sanitize_file_name);
    tracing::debug!(server_name, media_id, size = f.data.len(), content_type, "remote media fetched");
    cache(state, server_name, media_id, &content_type, name.as_deref(), f.data).await.map(Some)
}

/// What the client is told when a fetch fails (the spec's codes: 404 for media the remote does
/// not have, 504 `M_NOT_YET_UPLOADED` passed on, 502 `M_TOO_LARGE` past the size limit, 502
/// for anything else the remote got wrong).
fn failure(server_name: &str, media_id: &str, e: FedError) -> ApiResult<Option<MediaRow>> {
    tracing::info!(server_name, media_id, error = %e, "remote media not fetched");
    let bad_gateway = |msg: String| Error::new(StatusCode::BAD_GATEWAY, "M_UNKNOWN", msg);
    Err(match e {
        FedError::Disabled => return Ok(None),
        FedError::Status { status: 404, .. } => return Ok(None),
        FedError::Status { status: 504, body } if body["errcode"] == "M_NOT_YET_UPLOADED" => Error::new(
            StatusCode::GATEWAY_TIMEOUT,
            "M_NOT_YET_UPLOADED",
            "The content of this media has not been uploaded yet",
        ),
        FedError::Status { status: 502, body } if body["errcode"] == "M_TOO_LARGE" => {
            Error::new(StatusCode::BAD_GATEWAY, "M_TOO_LARGE", format!("{server_name} cannot serve content this large"))
        }
        FedError::TooLarge(max) => {
            Error::new(StatusCode::BAD_GATEWAY, "M_TOO_LARGE", format!("Remote media is limited to {max} bytes"))
        }
        FedError::NotAllowed(s) => Error::forbidden(format!("Federation with {s} is not allowed")),
        FedError::Status { status, .. } => bad_gateway(format!("{server_name} answered {status}")),
        FedError::Refused(_) => bad_gateway(format!("{server_name} redirected to a forbidden address")),
        FedError::Transport(_) => bad_gateway(format!("Could not reach {server_name}")),
        FedError::Invalid(msg) => bad_gateway(format!("Invalid answer from {server_name}: {msg}")),
    })
}

/// Stores content fetched from elsewhere (remote media, URL preview images) in the local
/// cache, where `purge_media_cache` can evict it.
pub async fn cache(
    state: &AppState,
    server_name: &str,
    media_id: &str,
    content_type: &str,
    upload_name: Option<&str>,
    data: bytes::Bytes,
) -> ApiResult<MediaRow> {
    let key = content_key();
    let sha256: [u8; 32] = Sha256::digest(&data).into();
    let size = data.len() as i64;
    state.media.store.put_bytes(&key, data).await?;
    let content = Content { content_type, upload_name, size, sha256: &sha256, storage_key: &key };
    let allow = state.config.media.legacy_serve_new_media;
    match storage::media::insert_remote(&state.db, server_name, media_id, &content, allow, now_ms()).await {
        Ok(old) => {
            if let Some(old) = old {
                discard(state, &old).await;
            }
        }
        Err(e) => {
            discard(state, &key).await;
            return Err(e.into());
        }
    }
    storage::media::get(&state.db, server_name, media_id).await?.ok_or_else(Error::internal)
}
