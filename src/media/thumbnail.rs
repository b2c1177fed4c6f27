//! Thumbnails: chosen among the configured sizes, generated on demand (or right after an upload)
//! on the blocking pool, stored beside the content (`media_thumbnails`) and kept in a bounded
//! in-memory cache. Concurrent requests for the same thumbnail generate it once.
//!
//! Input: JPEG, PNG, GIF (first frame) and WebP, EXIF orientation applied. Output: JPEG for JPEG
//! sources, PNG otherwise (transparency kept). The pixel count is read from the header and an
//! image larger than `media.max_image_pixels` is never decoded.

use std::io::Cursor;
use std::sync::Arc;

use axum::http::StatusCode;
use bytes::Bytes;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::config::{MediaConfig, ThumbnailMethod, ThumbnailSize};
use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage::media::{MediaRow, ThumbnailRow};
use crate::storage::{self, now_ms};

/// A generated thumbnail.
pub struct Thumb {
    pub content_type: String,
    pub data: Bytes,
}

pub struct Thumbnailer {
    sizes: Vec<ThumbnailSize>,
    max_pixels: u64,
    cache: moka::future::Cache<String, Arc<Thumb>>,
    /// Generations under way at once (they are CPU-bound).
    slots: tokio::sync::Semaphore,
}

pub fn is_thumbnailable(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    matches!(essence, "image/jpeg" | "image/jpg" | "image/png" | "image/gif" | "image/webp")
}

pub fn method_name(m: ThumbnailMethod) -> &'static str {
    match m {
        ThumbnailMethod::Crop => "crop",
        ThumbnailMethod::Scale => "scale",
    }
}

fn cache_key(server_name: &str, media_id: &str, size: &ThumbnailSize) -> String {
    format!("{server_name}/{media_id}/{}x{}-{}", size.width, size.height, method_name(size.method))
}

impl Thumbnailer {
    pub fn new(config: &MediaConfig) -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Self {
            sizes: config.thumbnail_sizes.clone(),
            max_pixels: config.max_image_pixels,
            cache: moka::future::Cache::builder()
                .weigher(|k: &String, v: &Arc<Thumb>| (k.len() + v.data.len()).try_into().unwrap_or(u32::MAX))
                .max_capacity(config.thumbnail_cache_mb.saturating_mul(1024 * 1024))
                .build(),
            slots: tokio::sync::Semaphore::new(cores),
        }
    }

    /// The configured size that serves a request: the smallest of the requested method at least
    /// as large as asked, else the largest of that method (any method if none is configured).
    pub fn choose(&self, width: u32, height: u32, method: ThumbnailMethod) -> Option<ThumbnailSize> {
        let same: Vec<ThumbnailSize> = self.sizes.iter().filter(|s| s.method == method).copied().collect();
        let pool = if same.is_empty() { self.sizes.clone() } else { same };
        let area = |s: &ThumbnailSize| u64::from(s.width) * u64::from(s.height);
        let fits = pool.iter().filter(|s| s.width >= width && s.height >= height).min_by_key(|s| area(s));
        fits.or_else(|| pool.iter().max_by_key(|s| area(s))).copied()
    }

    /// Drops the cached thumbnails of a deleted or quarantined media item.
    pub async fn forget(&self, server_name: &str, media_id: &str) {
        for size in &self.sizes {
            self.cache.invalidate(&cache_key(server_name, media_id, size)).await;
        }
    }
}

/// Why an image could not be thumbnailed.
#[derive(Debug)]
pub enum RenderError {
    /// More pixels than allowed.
    TooLarge(u64),
    /// Not an image of a supported format, or corrupt.
    Unsupported(String),
}

impl From<RenderError> for Error {
    fn from(e: RenderError) -> Self {
        match e {
            RenderError::TooLarge(px) => Error::too_large(format!("The image is too large to thumbnail ({px} pixels)")),
            RenderError::Unsupported(why) => {
                Error::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", format!("Cannot generate a thumbnail: {why}"))
            }
        }
    }
}

/// Decodes an image, refusing to decode one with more than `max_pixels` pixels.
pub fn decode(data: &[u8], max_pixels: u64) -> Result<(DynamicImage, ImageFormat), RenderError> {
    let bad = |e: image::ImageError| RenderError::Unsupported(e.to_string());
    let mut reader = ImageReader::new(Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| RenderError::Unsupported(e.to_string()))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Gif | ImageFormat::WebP)) => f,
        _ => return Err(RenderError::Unsupported("not a JPEG, PNG, GIF or WebP image".into())),
    };
    let mut limits = Limits::default();
    // Decoders allocate the output image plus working buffers; 8 bytes a pixel covers RGBA
    // (16-bit PNGs are refused rather than risking more).
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(bad)?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max_pixels {
        return Err(RenderError::TooLarge(pixels));
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(bad)?;
    img.apply_orientation(orientation);
    Ok((img, format))
}

/// Renders one thumbnail size of a decoded image.
pub fn render(img: &DynamicImage, source_format: ImageFormat, size: &ThumbnailSize) -> Result<Thumb, RenderError> {
    let (w, h) = (img.width().max(1), img.height().max(1));
    let (tw, th) = (size.width, size.height);
    let out = match size.method {
        ThumbnailMethod::Scale => {
            if w <= tw && h <= th {
                img.clone()
            } else {
                img.thumbnail(tw, th)
            }
        }
        ThumbnailMethod::Crop => {
            // The central region of the box's aspect ratio, scaled down (never up) to the box.
            let scale = f64::max(f64::from(tw) / f64::from(w), f64::from(th) / f64::from(h)).min(1.0);
            let cw = ((f64::from(tw) / scale).round() as u32).clamp(1, w);
            let ch = ((f64::from(th) / scale).round() as u32).clamp(1, h);
            let region = img.crop_imm((w - cw) / 2, (h - ch) / 2, cw, ch);
            if scale < 1.0 { region.thumbnail_exact(tw.min(cw), th.min(ch)) } else { region }
        }
    };
    let mut buf = Cursor::new(Vec::new());
    let content_type = if source_format == ImageFormat::Jpeg {
        let rgb = DynamicImage::ImageRgb8(out.to_rgb8());
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 80);
        rgb.write_with_encoder(enc).map_err(|e| RenderError::Unsupported(e.to_string()))?;
        "image/jpeg"
    } else {
        out.write_to(&mut buf, ImageFormat::Png).map_err(|e| RenderError::Unsupported(e.to_string()))?;
        "image/png"
    };
    Ok(Thumb { content_type: content_type.into(), data: Bytes::from(buf.into_inner()) })
}

fn thumb_key(content_key: &str, size: &ThumbnailSize) -> String {
    let tail = content_key.strip_prefix("content/").unwrap_or(content_key);
    format!("thumbnails/{tail}/{}x{}-{}-{}", size.width, size.height, method_name(size.method), super::random_id(8))
}

async fn read_original(state: &AppState, key: &str) -> ApiResult<Vec<u8>> {
    let stream = state.media.store.get(key, None).await?.ok_or_else(|| Error::not_found("Media content missing"))?;
    Ok(super::store::collect(stream, state.config.media.max_upload_bytes.max(64 << 20)).await?)
}

/// Stores a generated thumbnail and records it; a thumbnail recorded meanwhile wins.
async fn save(
    state: &AppState,
    row_server: &str,
    media_id: &str,
    content_key: &str,
    size: &ThumbnailSize,
    t: &Thumb,
) -> ApiResult<()> {
    let key = thumb_key(content_key, size);
    state.media.store.put_bytes(&key, t.data.clone()).await?;
    let rec = ThumbnailRow { content_type: t.content_type.clone(), size: t.data.len() as i64, storage_key: key };
    let m = method_name(size.method);
    let inserted =
        storage::media::insert_thumbnail(&state.db, row_server, media_id, size.width, size.height, m, &rec, now_ms())
            .await?;
    if !inserted {
        let _ = state.media.store.delete(&rec.storage_key).await;
    }
    Ok(())
}

/// The thumbnail of `row` serving a request for `width`×`height` with `method`.
pub async fn get(
    state: &AppState,
    row: &MediaRow,
    width: u32,
    height: u32,
    method: ThumbnailMethod,
) -> ApiResult<Arc<Thumb>> {
    let t = &state.media.thumbnails;
    let size = t.choose(width, height, method).ok_or_else(|| Error::unknown("No thumbnail sizes are configured"))?;
    if !row.content_type.as_deref().is_some_and(is_thumbnailable) {
        return Err(RenderError::Unsupported("not a JPEG, PNG, GIF or WebP image".into()).into());
    }
    let key = cache_key(&row.server_name, &row.media_id, &size);
    t.cache.try_get_with(key, load_or_generate(state, row, size)).await.map_err(|e: Arc<Error>| Error {
        status: e.status,
        errcode: e.errcode,
        message: e.message.clone(),
        extra: e.extra.clone(),
    })
}

async fn load_or_generate(state: &AppState, row: &MediaRow, size: ThumbnailSize) -> ApiResult<Arc<Thumb>> {
    let m = method_name(size.method);
    if let Some(rec) =
        storage::media::get_thumbnail(&state.db, &row.server_name, &row.media_id, size.width, size.height, m).await?
        && let Some(stream) = state.media.store.get(&rec.storage_key, None).await?
    {
        let data = super::store::collect(stream, 64 << 20).await?;
        return Ok(Arc::new(Thumb { content_type: rec.content_type, data: Bytes::from(data) }));
    }
    let content_key = row.storage_key.as_deref().ok_or_else(Error::internal)?;
    let original = read_original(state, content_key).await?;
    let max_pixels = state.media.thumbnails.max_pixels;
    let _slot = state.media.thumbnails.slots.acquire().await.map_err(|_| Error::internal())?;
    let thumb = tokio::task::spawn_blocking(move || {
        let (img, format) = decode(&original, max_pixels)?;
        render(&img, format, &size)
    })
    .await
    .map_err(|e| anyhow::anyhow!("thumbnail task: {e}"))??;
    drop(_slot);
    save(state, &row.server_name, &row.media_id, content_key, &size, &thumb).await?;
    Ok(Arc::new(thumb))
}

/// Generates every configured size of a freshly uploaded image (decoding it once).
pub async fn pregenerate(state: &AppState, server_name: &str, media_id: &str, content_key: &str) -> ApiResult<()> {
    let original = read_original(state, content_key).await?;
    let t = &state.media.thumbnails;
    let (sizes, max_pixels) = (t.sizes.clone(), t.max_pixels);
    let _slot = t.slots.acquire().await.map_err(|_| Error::internal())?;
    let thumbs = tokio::task::spawn_blocking(move || -> Result<Vec<(ThumbnailSize, Thumb)>, RenderError> {
        let (img, format) = decode(&original, max_pixels)?;
        sizes.iter().map(|s| render(&img, format, s).map(|t| (*s, t))).collect()
    })
    .await
    .map_err(|e| anyhow::anyhow!("thumbnail task: {e}"))??;
    drop(_slot);
    for (size, thumb) in thumbs {
        save(state, server_name, media_id, content_key, &size, &thumb).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img =
            DynamicImage::ImageRgba8(image::RgbaImage::from_fn(w, h, |x, y| image::Rgba([x as u8, y as u8, 0, 255])));
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, ImageFormat::Png).unwrap();
        buf.into_inner()
    }

    fn dims(t: &Thumb) -> (u32, u32) {
        let img = image::load_from_memory(&t.data).unwrap();
        (img.width(), img.height())
    }

    #[test]
    fn crop_and_scale_dimensions() {
        let (img, f) = decode(&png(1000, 500), 1_000_000).unwrap();
        let crop = |w, h| ThumbnailSize { width: w, height: h, method: ThumbnailMethod::Crop };
        let scale = |w, h| ThumbnailSize { width: w, height: h, method: ThumbnailMethod::Scale };
        assert_eq!(dims(&render(&img, f, &crop(96, 96)).unwrap()), (96, 96));
        assert_eq!(dims(&render(&img, f, &scale(320, 240)).unwrap()), (320, 160));
        // Never enlarged.
        assert_eq!(dims(&render(&img, f, &scale(2000, 2000)).unwrap()), (1000, 500));
        assert_eq!(dims(&render(&img, f, &crop(800, 800)).unwrap()), (800, 500));
    }

    #[test]
    fn decompression_bombs_are_not_decoded() {
        assert!(matches!(decode(&png(2000, 2000), 1_000_000), Err(RenderError::TooLarge(4_000_000))));
        assert!(matches!(decode(b"not an image", 1_000_000), Err(RenderError::Unsupported(_))));
    }

    #[test]
    fn size_choice() {
        let t = Thumbnailer::new(&MediaConfig::default());
        let pick = |w, h, m| t.choose(w, h, m).map(|s| (s.width, s.height));
        assert_eq!(pick(50, 50, ThumbnailMethod::Crop), Some((96, 96)));
        assert_eq!(pick(32, 32, ThumbnailMethod::Crop), Some((32, 32)));
        assert_eq!(pick(1000, 1000, ThumbnailMethod::Crop), Some((96, 96)));
        assert_eq!(pick(320, 240, ThumbnailMethod::Scale), Some((320, 240)));
        assert_eq!(pick(400, 100, ThumbnailMethod::Scale), Some((640, 480)));
    }
}
