//! Content repository endpoints: authenticated media (`/_matrix/client/v1/media/*`, spec v1.11),
//! uploads (`/_matrix/media/v3/upload`, asynchronous `/_matrix/media/v1/create`), and the
//! deprecated unauthenticated `/_matrix/media/v3/download|thumbnail` (subject to the freeze).
//!
//! Every response carrying content has the spec's safety headers: `Content-Security-Policy`
//! sandboxing, `X-Content-Type-Options: nosniff`, `Content-Disposition` inline only for the
//! spec's safe types, `Cross-Origin-Resource-Policy: cross-origin`, plus `Cache-Control` (media
//! never change) and byte-range support.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::ThumbnailMethod;
use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Path, Query};
use crate::media::{self, Fetch, thumbnail};
use crate::state::AppState;
use crate::storage::media::MediaRow;

/// The spec's list of content types that may be served `inline` ("Serving inline content").
const INLINE_SAFE: &[&str] = &[
    "text/css",
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/x-pn-wav",
    "audio/flac",
    "audio/x-flac",
];

const CSP: &str = "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; \
                   style-src 'unsafe-inline'; media-src 'self'; object-src 'self';";

fn essence(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// `Content-Disposition` for a content type and optional file name (RFC 6266; non-ASCII names
/// as RFC 8187 `filename*`).
pub fn disposition(content_type: &str, name: Option<&str>) -> String {
    let kind = if INLINE_SAFE.contains(&essence(content_type).as_str()) { "inline" } else { "attachment" };
    let Some(name) = name else { return kind.to_owned() };
    if name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
        format!("{kind}; filename=\"{name}\"")
    } else {
        let mut enc = String::new();
        for b in name.bytes() {
            if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
                enc.push(b as char);
            } else {
                enc.push_str(&format!("%{b:02X}"));
            }
        }
        format!("{kind}; filename*=utf-8''{enc}")
    }
}

fn safety_headers(h: &mut HeaderMap) {
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("cross-origin"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=31536000, immutable"));
}

fn content_type_header(v: &str) -> HeaderValue {
    HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("application/octet-stream"))
}

/// A byte position of a `Range` header: digits only; a value past `u64` saturates (RFC 9110
/// puts no bound on it, and any position past the content means "to the end").
fn range_pos(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse::<u64>().unwrap_or(u64::MAX))
}

/// A single byte range of `Range: bytes=...` over `size` bytes: `Ok(None)` to serve the whole
/// content (no header, several ranges or a syntax this does not handle), `Err` if unsatisfiable.
/// A last position at or past the end (however large) is the end of the content (RFC 9110
/// §14.1.2), and so is a suffix longer than the content.
fn parse_range(header: Option<&HeaderValue>, size: u64) -> Result<Option<std::ops::Range<u64>>, ()> {
    let Some(spec) = header.and_then(|v| v.to_str().ok()).and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else { return Ok(None) };
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let Some(n) = range_pos(b) else { return Ok(None) };
        if n == 0 {
            return Err(());
        }
        size.saturating_sub(n)..size
    } else {
        let Some(start) = range_pos(a) else { return Ok(None) };
        let end = if b.is_empty() {
            size
        } else {
            match range_pos(b) {
                Some(e) if e >= start => e.saturating_add(1).min(size),
                _ => return Ok(None),
            }
        };
        start..end
    };
    if range.start >= size || range.is_empty() { Err(()) } else { Ok(Some(range)) }
}

/// The response carrying a media item's content (or the requested range of it).
async fn serve(state: &AppState, row: &MediaRow, name: Option<&str>, headers: &HeaderMap) -> ApiResult<Response> {
    let size = row.size.unwrap_or(0).max(0) as u64;
    let content_type = row.content_type.clone().unwrap_or_else(|| "application/octet-stream".into());
    let key = row.storage_key.as_deref().ok_or_else(Error::internal)?;
    let range = match parse_range(headers.get(header::RANGE), size) {
        Ok(r) => r,
        Err(()) => {
            let mut resp =
                Error::new(StatusCode::RANGE_NOT_SATISFIABLE, "M_UNKNOWN", "Range not satisfiable").into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    let Some(stream) = state.media.store.get(key, range.clone()).await? else {
        tracing::error!(server_name = %row.server_name, media_id = %row.media_id, key, "media content missing from the store");
        return Err(Error::not_found("Media content not found"));
    };
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type_header(&content_type));
    let name = name.and_then(media::sanitize_file_name).or_else(|| row.upload_name.clone());
    if let Ok(v) = HeaderValue::from_str(&disposition(&content_type, name.as_deref())) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    safety_headers(h);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    match range {
        Some(r) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", r.start, r.end - 1)) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        None => {
            resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
    }
    Ok(resp)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

fn upload_meta(headers: &HeaderMap, filename: Option<&str>) -> (String, Option<String>) {
    let content_type = media::sanitize_content_type(headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()));
    (content_type, filename.and_then(media::sanitize_file_name))
}

#[derive(Deserialize)]
pub struct UploadQuery {
    filename: Option<String>,
}

/// `POST /_matrix/media/v3/upload`
pub async fn upload(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<axum::Json<Value>> {
    media::check_rate(&state, &auth.user_id, auth.is_admin)?;
    let received = media::receive(&state, body, content_length(&headers)).await?;
    let (content_type, name) = upload_meta(&headers, q.filename.as_deref());
    let media_id = media::upload(&state, &auth.user_id, &content_type, name.as_deref(), received).await?;
    Ok(axum::Json(json!({ "content_uri": format!("mxc://{}/{media_id}", state.config.server_name) })))
}

/// `POST /_matrix/media/v1/create`
pub async fn create(State(state): State<AppState>, auth: Auth) -> ApiResult<axum::Json<Value>> {
    media::check_rate(&state, &auth.user_id, auth.is_admin)?;
    let (media_id, expires) = media::create(&state, &auth.user_id).await?;
    Ok(axum::Json(json!({
        "content_uri": format!("mxc://{}/{media_id}", state.config.server_name),
        "unused_expires_at": expires,
    })))
}

/// `PUT /_matrix/media/v3/upload/{serverName}/{mediaId}`
pub async fn upload_reserved(
    State(state): State<AppState>,
    auth: Auth,
    Path((server_name, media_id)): Path<(String, String)>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<axum::Json<Value>> {
    media::check_reservation(&state, &server_name, &media_id, &auth.user_id).await?;
    media::check_rate(&state, &auth.user_id, auth.is_admin)?;
    let received = media::receive(&state, body, content_length(&headers)).await?;
    let (content_type, name) = upload_meta(&headers, q.filename.as_deref());
    media::upload_reserved(&state, &media_id, &auth.user_id, &content_type, name.as_deref(), received).await?;
    Ok(axum::Json(json!({})))
}

/// `GET /_matrix/client/v1/media/config` (and the deprecated `/_matrix/media/v3/config`).
pub async fn config(State(state): State<AppState>, _auth: Auth) -> axum::Json<Value> {
    axum::Json(json!({ "m.upload.size": state.config.media.max_upload_bytes }))
}

#[derive(Deserialize)]
pub struct DownloadQuery {
    timeout_ms: Option<u64>,
    allow_remote: Option<bool>,
}

async fn download_inner(
    state: AppState,
    legacy: bool,
    server_name: String,
    media_id: String,
    name: Option<String>,
    q: DownloadQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let how = Fetch { legacy, timeout_ms: q.timeout_ms, allow_remote: q.allow_remote.unwrap_or(true) };
    let row = media::find(&state, &server_name, &media_id, &how).await?;
    serve(&state, &row, name.as_deref(), &headers).await
}

/// `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}`
pub async fn download(
    State(state): State<AppState>,
    _auth: Auth,
    Path((server_name, media_id)): Path<(String, String)>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    download_inner(state, false, server_name, media_id, None, q, headers).await
}

/// `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}/{fileName}`
pub async fn download_named(
    State(state): State<AppState>,
    _auth: Auth,
    Path((server_name, media_id, name)): Path<(String, String, String)>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    download_inner(state, false, server_name, media_id, Some(name), q, headers).await
}

/// Deprecated `GET /_matrix/media/v3/download/{serverName}/{mediaId}`: no authentication, only
/// media stored before the freeze (`media.legacy_serve_new_media`).
pub async fn legacy_download(
    State(state): State<AppState>,
    Path((server_name, media_id)): Path<(String, String)>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    download_inner(state, true, server_name, media_id, None, q, headers).await
}

pub async fn legacy_download_named(
    State(state): State<AppState>,
    Path((server_name, media_id, name)): Path<(String, String, String)>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    download_inner(state, true, server_name, media_id, Some(name), q, headers).await
}

#[derive(Deserialize)]
pub struct ThumbnailQuery {
    width: u32,
    height: u32,
    method: Option<String>,
    /// Animated thumbnails are made for animated GIFs; other images get a still one.
    animated: Option<bool>,
    timeout_ms: Option<u64>,
    allow_remote: Option<bool>,
}

async fn thumbnail_inner(
    state: AppState,
    legacy: bool,
    server_name: String,
    media_id: String,
    q: ThumbnailQuery,
) -> ApiResult<Response> {
    let method = match q.method.as_deref() {
        None | Some("scale") => ThumbnailMethod::Scale,
        Some("crop") => ThumbnailMethod::Crop,
        Some(_) => return Err(Error::invalid_param("method must be crop or scale")),
    };
    if q.width == 0 || q.height == 0 {
        return Err(Error::invalid_param("width and height must be positive"));
    }
    let how = Fetch { legacy, timeout_ms: q.timeout_ms, allow_remote: q.allow_remote.unwrap_or(true) };
    let row = media::find(&state, &server_name, &media_id, &how).await?;
    let thumb = thumbnail::get(&state, &row, (q.width, q.height, method), q.animated.unwrap_or(false)).await?;
    let mut resp = Response::new(Body::from(thumb.data.clone()));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type_header(&thumb.content_type));
    let ext = match thumb.content_type.as_str() {
        "image/jpeg" => "jpg",
        "image/gif" => "gif",
        _ => "png",
    };
    if let Ok(v) = HeaderValue::from_str(&disposition(&thumb.content_type, Some(&format!("thumbnail.{ext}")))) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(thumb.data.len()));
    safety_headers(h);
    Ok(resp)
}

/// `GET /_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}`
pub async fn thumbnail(
    State(state): State<AppState>,
    _auth: Auth,
    Path((server_name, media_id)): Path<(String, String)>,
    Query(q): Query<ThumbnailQuery>,
) -> ApiResult<Response> {
    thumbnail_inner(state, false, server_name, media_id, q).await
}

/// Deprecated `GET /_matrix/media/v3/thumbnail/{serverName}/{mediaId}` (see `legacy_download`).
pub async fn legacy_thumbnail(
    State(state): State<AppState>,
    Path((server_name, media_id)): Path<(String, String)>,
    Query(q): Query<ThumbnailQuery>,
) -> ApiResult<Response> {
    thumbnail_inner(state, true, server_name, media_id, q).await
}

#[derive(Deserialize)]
pub struct PreviewQuery {
    url: String,
    #[allow(dead_code)]
    ts: Option<i64>,
}

/// `GET /_matrix/client/v1/media/preview_url` (and the deprecated v3 path).
pub async fn preview_url(
    State(state): State<AppState>,
    _auth: Auth,
    Query(q): Query<PreviewQuery>,
) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(media::preview::preview(&state, &q.url).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispositions() {
        assert_eq!(disposition("image/png", Some("a.png")), "inline; filename=\"a.png\"");
        assert_eq!(disposition("text/html", Some("a.html")), "attachment; filename=\"a.html\"");
        assert_eq!(disposition("image/svg+xml", None), "attachment");
        assert_eq!(disposition("text/plain; charset=utf-8", None), "inline");
        assert_eq!(disposition("application/pdf", Some("été.pdf")), "attachment; filename*=utf-8''%C3%A9t%C3%A9.pdf");
    }

    #[test]
    fn ranges() {
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(parse_range(Some(&h("bytes=0-9")), 100), Ok(Some(0..10)));
        assert_eq!(parse_range(Some(&h("bytes=90-")), 100), Ok(Some(90..100)));
        assert_eq!(parse_range(Some(&h("bytes=-10")), 100), Ok(Some(90..100)));
        assert_eq!(parse_range(Some(&h("bytes=50-500")), 100), Ok(Some(50..100)));
        assert_eq!(parse_range(Some(&h("bytes=100-")), 100), Err(()));
        assert_eq!(parse_range(Some(&h("bytes=0-1,5-6")), 100), Ok(None));
        assert_eq!(parse_range(Some(&h("items=0-1")), 100), Ok(None));
        assert_eq!(parse_range(None, 100), Ok(None));
        // Positions past u64 or at u64::MAX mean "to the end"; they never wrap.
        assert_eq!(parse_range(Some(&h("bytes=0-18446744073709551615")), 100), Ok(Some(0..100)));
        assert_eq!(parse_range(Some(&h("bytes=5-99999999999999999999999")), 100), Ok(Some(5..100)));
        assert_eq!(parse_range(Some(&h("bytes=-99999999999999999999999")), 100), Ok(Some(0..100)));
        assert_eq!(parse_range(Some(&h("bytes=99999999999999999999999-")), 100), Err(()));
        assert_eq!(parse_range(Some(&h("bytes=+1-5")), 100), Ok(None));
    }
}
