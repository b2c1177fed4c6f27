//! `GET /_matrix/federation/v1/media/download/{mediaId}` and `.../thumbnail/{mediaId}`
//! (`X-Matrix`-authenticated): our media for other servers (see `media::federation`).

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use serde::Deserialize;

use crate::config::ThumbnailMethod;
use crate::error::{ApiResult, Error};
use crate::federation::auth::Origin;
use crate::http::extract::{Path, Query};
use crate::media;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/_matrix/federation/v1/media/download/{media_id}", get(download))
        .route("/_matrix/federation/v1/media/thumbnail/{media_id}", get(thumbnail))
}

#[derive(Deserialize)]
struct DownloadQuery {
    timeout_ms: Option<u64>,
}

async fn download(
    State(state): State<AppState>,
    Path(media_id): Path<String>,
    Query(q): Query<DownloadQuery>,
    Origin(origin): Origin,
) -> ApiResult<Response> {
    tracing::debug!(%origin, media_id, "federation media download");
    media::federation::download(&state, &media_id, q.timeout_ms).await
}

#[derive(Deserialize)]
struct ThumbnailQuery {
    width: u32,
    height: u32,
    method: Option<String>,
    animated: Option<bool>,
    timeout_ms: Option<u64>,
}

async fn thumbnail(
    State(state): State<AppState>,
    Path(media_id): Path<String>,
    Query(q): Query<ThumbnailQuery>,
    Origin(origin): Origin,
) -> ApiResult<Response> {
    let method = match q.method.as_deref() {
        None | Some("scale") => ThumbnailMethod::Scale,
        Some("crop") => ThumbnailMethod::Crop,
        Some(_) => return Err(Error::invalid_param("method must be crop or scale")),
    };
    if q.width == 0 || q.height == 0 {
        return Err(Error::invalid_param("width and height must be positive"));
    }
    tracing::debug!(%origin, media_id, "federation media thumbnail");
    let size = (q.width, q.height, method);
    media::federation::thumbnail(&state, &media_id, size, q.animated.unwrap_or(false), q.timeout_ms).await
}
