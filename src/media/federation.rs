//! Our media served to other servers (`/_matrix/federation/v1/media/download|thumbnail`): the
//! same checks as for local clients (`find`: existence, waiting for a pending upload,
//! quarantine, antivirus), only media of this server, and the spec's `multipart/mixed` answer:
//! a JSON metadata part (`{}`), then the content with its `Content-Type` and
//! `Content-Disposition`.

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use futures_util::StreamExt;

use super::{Fetch, thumbnail};
use crate::config::ThumbnailMethod;
use crate::error::{ApiResult, Error};
use crate::federation::media::multipart_frame;
use crate::state::AppState;

fn multipart(content_type: String, length: u64, body: Body) -> Response {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    resp
}

fn how(timeout_ms: Option<u64>) -> Fetch {
    Fetch { legacy: false, timeout_ms, allow_remote: false }
}

/// `GET /_matrix/federation/v1/media/download/{mediaId}`: the content, streamed from the store.
pub async fn download(state: &AppState, media_id: &str, timeout_ms: Option<u64>) -> ApiResult<Response> {
    let row = super::find(state, &state.config.server_name, media_id, &how(timeout_ms)).await?;
    let key = row.storage_key.as_deref().ok_or_else(Error::internal)?;
    let Some(stream) = state.media.store.get(key, None).await? else {
        tracing::error!(media_id, key, "media content missing from the store");
        return Err(Error::not_found("Media content not found"));
    };
    let content_type = row.content_type.clone().unwrap_or_else(|| "application/octet-stream".into());
    let disposition = crate::api::client::media::disposition(&content_type, row.upload_name.as_deref());
    let (ct, head, tail) = multipart_frame(&[("Content-Type", &content_type), ("Content-Disposition", &disposition)]);
    let length = head.len() as u64 + row.size.unwrap_or(0).max(0) as u64 + tail.len() as u64;
    let body = futures_util::stream::iter([Ok(head)]).chain(stream).chain(futures_util::stream::iter([Ok(tail)]));
    Ok(multipart(ct, length, Body::from_stream(body)))
}

/// `GET /_matrix/federation/v1/media/thumbnail/{mediaId}`: a thumbnail chosen and made as for
/// local clients.
pub async fn thumbnail(
    state: &AppState,
    media_id: &str,
    size: (u32, u32, ThumbnailMethod),
    animated: bool,
    timeout_ms: Option<u64>,
) -> ApiResult<Response> {
    let row = super::find(state, &state.config.server_name, media_id, &how(timeout_ms)).await?;
    let thumb = thumbnail::get(state, &row, size, animated).await?;
    let ext = match thumb.content_type.as_str() {
        "image/jpeg" => "jpg",
        "image/gif" => "gif",
        _ => "png",
    };
    let disposition = crate::api::client::media::disposition(&thumb.content_type, Some(&format!("thumbnail.{ext}")));
    let (ct, head, tail) =
        multipart_frame(&[("Content-Type", &thumb.content_type), ("Content-Disposition", &disposition)]);
    let length = (head.len() + thumb.data.len() + tail.len()) as u64;
    let body = [head.as_ref(), thumb.data.as_ref(), tail.as_ref()].concat();
    Ok(multipart(ct, length, Body::from(body)))
}
