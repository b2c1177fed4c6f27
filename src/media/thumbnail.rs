//! Thumbnails: chosen among the configured sizes, generated on demand (or right after an upload)
//! on the blocking pool, stored beside the content (`media_thumbnails`) and kept in a bounded
//! in-memory cache. Concurrent requests for the same thumbnail generate it once.
//!
//! Input: JPEG, PNG, GIF and WebP, EXIF orientation applied. Output: JPEG for JPEG sources, PNG
//! otherwise (transparency kept); animated GIF for animated GIFs when `animated=true` is asked. The pixel count is read from the header and an
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

/// Scales (or crops and scales) an image to a thumbnail size, never enlarging it.
fn resize(img: &DynamicImage, size: &ThumbnailSize) -> DynamicImage {
    let (w, h) = (img.width().max(1), img.height().max(1));
    let (tw, th) = (size.width, size.height);
    match size.method {
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
    }
}

/// Renders one thumbnail size of a decoded image.
pub fn render(img: &DynamicImage, source_format: ImageFormat, size: &ThumbnailSize) -> Result<Thumb, RenderError> {
    let out = resize(img, size);
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

/// Most frames an animated thumbnail keeps.
const MAX_FRAMES: usize = 100;

/// An animated GIF thumbnail of an animated GIF: every frame scaled like a still thumbnail.
/// `None` when the image is not animated or its frames would decode more than `max_pixels`
/// pixels in total (frames are decoded one at a time and decoding stops there): the caller
/// serves a still thumbnail instead, as the spec allows.
pub fn render_animated(data: &[u8], size: &ThumbnailSize, max_pixels: u64) -> Result<Option<Thumb>, RenderError> {
    use image::AnimationDecoder;
    let bad = |e: image::ImageError| RenderError::Unsupported(e.to_string());
    let decoder = image::codecs::gif::GifDecoder::new(Cursor::new(data)).map_err(bad)?;
    let (w, h) = decoder.dimensions();
    let per_frame = u64::from(w) * u64::from(h);
    if per_frame > max_pixels {
        return Err(RenderError::TooLarge(per_frame));
    }
    let mut frames = Vec::new();
    let mut decoded = 0u64;
    for frame in decoder.into_frames() {
        decoded += per_frame;
        if frames.len() >= MAX_FRAMES || decoded > max_pixels {
            return Ok(None);
        }
        let frame = frame.map_err(bad)?;
        let delay = frame.delay();
        let out = resize(&DynamicImage::ImageRgba8(frame.into_buffer()), size);
        frames.push(image::Frame::from_parts(out.to_rgba8(), 0, 0, delay));
    }
    if frames.len() < 2 {
        return Ok(None);
    }
    let mut buf = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new_with_speed(&mut buf, 10);
        enc.set_repeat(image::codecs::gif::Repeat::Infinite).map_err(bad)?;
        enc.encode_frames(frames).map_err(bad)?;
    }
    Ok(Some(Thumb { content_type: "image/gif".into(), data: Bytes::from(buf) }))
}

/// The `method` column of a thumbnail: `crop`, `scale`, or either with `-animated`.
fn variant_name(size: &ThumbnailSize, animated: bool) -> String {
    format!("{}{}", method_name(size.method), if animated { "-animated" } else { "" })
}

fn thumb_key(content_key: &str, size: &ThumbnailSize, animated: bool) -> String {
    let tail = content_key.strip_prefix("content/").unwrap_or(content_key);
    let v = variant_name(size, animated);
    format!("thumbnails/{tail}/{}x{}-{v}-{}", size.width, size.height, super::random_id(8))
}

async fn read_original(state: &AppState, key: &str) -> ApiResult<Vec<u8>> {
    let stream = state.media.store.get(key, None).await?.ok_or_else(|| Error::not_found("Media content missing"))?;
    Ok(super::store::collect(stream, state.config.media.max_upload_bytes.max(64 << 20)).await?)
}

/// Stores a generated thumbnail and records it; a thumbnail recorded meanwhile wins.
async fn save(state: &AppState, row: (&str, &str), content_key: &str, v: Variant, t: &Thumb) -> ApiResult<()> {
    let (server_name, media_id) = row;
    let key = thumb_key(content_key, &v.size, v.animated);
    state.media.store.put_bytes(&key, t.data.clone()).await?;
    let rec = ThumbnailRow { content_type: t.content_type.clone(), size: t.data.len() as i64, storage_key: key };
    let (w, h, m) = (v.size.width, v.size.height, variant_name(&v.size, v.animated));
    let inserted = storage::media::insert_thumbnail(&state.db, server_name, media_id, w, h, &m, &rec, now_ms()).await?;
    if !inserted {
        let _ = state.media.store.delete(&rec.storage_key).await;
    }
    Ok(())
}

/// A thumbnail variant: a configured size, animated or not.
#[derive(Clone, Copy)]
struct Variant {
    size: ThumbnailSize,
    animated: bool,
}

/// The thumbnail of `row` serving a request for `width`×`height` with `method`. `animated`
/// asks for an animated thumbnail, made for animated GIFs (a still one otherwise).
pub async fn get(
    state: &AppState,
    row: &MediaRow,
    (width, height, method): (u32, u32, ThumbnailMethod),
    animated: bool,
) -> ApiResult<Arc<Thumb>> {
    let t = &state.media.thumbnails;
    let size = t.choose(width, height, method).ok_or_else(|| Error::unknown("No thumbnail sizes are configured"))?;
    let content_type = row.content_type.as_deref().unwrap_or("");
    if !is_thumbnailable(content_type) {
        return Err(RenderError::Unsupported("not a JPEG, PNG, GIF or WebP image".into()).into());
    }
    let animated = animated && content_type.split(';').next().is_some_and(|e| e.trim() == "image/gif");
    let mut key = cache_key(&row.server_name, &row.media_id, &size);
    if animated {
        key.push_str("-animated");
    }
    t.cache.try_get_with(key, load_or_generate(state, row, Variant { size, animated })).await.map_err(
        |e: Arc<Error>| Error {
            status: e.status,
            errcode: e.errcode,
            message: e.message.clone(),
            extra: e.extra.clone(),
        },
    )
}

async fn load_or_generate(state: &AppState, row: &MediaRow, v: Variant) -> ApiResult<Arc<Thumb>> {
    let (w, h, m) = (v.size.width, v.size.height, variant_name(&v.size, v.animated));
    if let Some(rec) = storage::media::get_thumbnail(&state.db, &row.server_name, &row.media_id, w, h, &m).await?
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
        if v.animated
            && let Some(t) = render_animated(&original, &v.size, max_pixels)?
        {
            return Ok(t);
        }
        let (img, format) = decode(&original, max_pixels)?;
        render(&img, format, &v.size)
    })
    .await
    .map_err(|e| anyhow::anyhow!("thumbnail task: {e}"))??;
    drop(_slot);
    save(state, (&row.server_name, &row.media_id), content_key, v, &thumb).await?;
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
        save(state, (server_name, media_id), content_key, Variant { size, animated: false }, &thumb).await?;
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

    pub fn animated_gif(w: u32, h: u32, frames: u32) -> Vec<u8> {
        let mut buf = Vec::new();
        {
            let mut enc = image::codecs::gif::GifEncoder::new(&mut buf);
            enc.set_repeat(image::codecs::gif::Repeat::Infinite).unwrap();
            for i in 0..frames {
                let img = image::RgbaImage::from_fn(w, h, |x, _| image::Rgba([(x * 2 + i * 60) as u8, 0, 0, 255]));
                let delay = image::Delay::from_numer_denom_ms(100, 1);
                enc.encode_frame(image::Frame::from_parts(img, 0, 0, delay)).unwrap();
            }
        }
        buf
    }

    #[test]
    fn animated_thumbnails() {
        use image::AnimationDecoder;
        let size = ThumbnailSize { width: 96, height: 96, method: ThumbnailMethod::Crop };
        let t = render_animated(&animated_gif(200, 100, 3), &size, 1_000_000).unwrap().expect("animated");
        assert_eq!(t.content_type, "image/gif");
        let frames = image::codecs::gif::GifDecoder::new(Cursor::new(&t.data[..])).unwrap().into_frames();
        let frames: Vec<_> = frames.collect::<Result<_, _>>().unwrap();
        assert_eq!(frames.len(), 3);
        assert!(frames.iter().all(|f| f.buffer().dimensions() == (96, 96)));
        // A single frame, or more frames than the pixel budget: a still thumbnail instead.
        assert!(render_animated(&animated_gif(200, 100, 1), &size, 1_000_000).unwrap().is_none());
        assert!(render_animated(&animated_gif(200, 100, 3), &size, 50_000).unwrap().is_none());
        assert!(matches!(render_animated(&animated_gif(200, 100, 3), &size, 10_000), Err(RenderError::TooLarge(_))));
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
