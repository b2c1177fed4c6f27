//! The media repository, end to end. Every test function in `backend_tests!` runs twice: against
//! the filesystem backend (`media::fs::*`) and against a real S3-protocol server on loopback
//! (`media::s3::*`): the one named by `PARVIS_TEST_S3_ENDPOINT` (set by `.ci/run`, and then it
//! must be reachable: the tests fail otherwise), else a `moto_server` found on the `PATH`, started
//! for this test process. Without either, the S3 variants say so and pass without running.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use image::{DynamicImage, ImageFormat};
use parvis::config::{Config, MediaBackend};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::*;

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Fs,
    S3,
}

/// The S3 endpoint for the S3 variants, if any (see the module doc).
fn s3_endpoint() -> Option<String> {
    static ENDPOINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ENDPOINT
        .get_or_init(|| {
            if let Ok(e) = std::env::var("PARVIS_TEST_S3_ENDPOINT") {
                assert!(reachable(&e, Duration::from_secs(30)), "PARVIS_TEST_S3_ENDPOINT={e} is unreachable");
                return Some(e);
            }
            let bin = std::env::var_os("PATH")?
                .to_str()?
                .split(':')
                .map(|d| std::path::Path::new(d).join("moto_server"))
                .find(|p| p.is_file())?;
            let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
            let endpoint = format!("http://127.0.0.1:{port}");
            // The server dies with this process: PR_SET_PDEATHSIG fires when the spawning thread
            // exits, so spawn from a thread that lives as long as the process.
            std::thread::spawn(move || {
                use std::os::unix::process::CommandExt;
                let mut cmd = std::process::Command::new(bin);
                cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
                // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                        Ok(())
                    });
                }
                // Waiting keeps this thread (and so the server) alive for the whole test process.
                let _ = cmd.spawn().expect("moto_server starts").wait();
                loop {
                    std::thread::park();
                }
            });
            assert!(reachable(&endpoint, Duration::from_secs(60)), "moto_server did not start on {endpoint}");
            Some(endpoint)
        })
        .clone()
}

fn reachable(endpoint: &str, within: Duration) -> bool {
    let url = url::Url::parse(endpoint).expect("S3 endpoint URL");
    let addr = format!("{}:{}", url.host_str().unwrap_or("127.0.0.1"), url.port_or_known_default().unwrap_or(80));
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Ok(mut addrs) = std::net::ToSocketAddrs::to_socket_addrs(&addr)
            && let Some(a) = addrs.next()
            && std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok()
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// A server on the given backend (with `adjust` applied), or `None` when no S3 server exists here.
async fn start(backend: Backend, adjust: impl FnOnce(&mut Config)) -> Option<TestServer> {
    let s3 = match backend {
        Backend::Fs => None,
        Backend::S3 => {
            let Some(endpoint) = s3_endpoint() else {
                eprintln!("no S3 server (PARVIS_TEST_S3_ENDPOINT unset, moto_server not found): S3 variant not run");
                return None;
            };
            // A bucket per test (moto accepts unsigned requests).
            let bucket = format!("parvis-test-{}", parvis::media::random_id(12).to_ascii_lowercase());
            let r = reqwest::Client::new().put(format!("{endpoint}/{bucket}")).send().await.expect("create bucket");
            assert!(r.status().is_success(), "bucket creation: {}", r.status());
            Some((endpoint, bucket))
        }
    };
    Some(
        TestServer::start_with(move |c| {
            if let Some((endpoint, bucket)) = s3 {
                c.media.backend = MediaBackend::S3;
                c.media.s3.endpoint = Some(endpoint);
                c.media.s3.bucket = bucket;
                c.media.s3.access_key_id = Some("test".into());
                c.media.s3.secret_access_key = Some("test".into());
                c.media.s3.prefix = "parvis/".into();
            }
            adjust(c);
        })
        .await,
    )
}

macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod fs {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Fs).await } )*
        }
        mod s3 {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::S3).await } )*
        }
    };
}

backend_tests!(
    round_trip_exact_bytes_and_headers,
    authentication_and_legacy_endpoints,
    thumbnails_have_the_right_dimensions,
    asynchronous_upload,
    size_limit_quota_and_rate_limit,
    quarantine_delete_listing_and_purge,
    antivirus_hook,
);

pub async fn upload(
    s: &TestServer,
    token: Option<&str>,
    content_type: &str,
    name: Option<&str>,
    data: Vec<u8>,
) -> (StatusCode, Value) {
    let mut url = format!("{}/_matrix/media/v3/upload", s.base);
    if let Some(n) = name {
        url.push_str(&format!("?filename={}", enc(n)));
    }
    let mut rb = s.http.post(url).header("content-type", content_type).body(data);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let resp = rb.send().await.expect("upload sent");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Uploads and returns the `server/mediaId` part of the content URI.
async fn upload_ok(s: &TestServer, u: &User, content_type: &str, name: Option<&str>, data: Vec<u8>) -> String {
    let (st, v) = upload(s, Some(&u.token), content_type, name, data).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["content_uri"].as_str().unwrap().strip_prefix("mxc://").expect("an mxc URI").to_owned()
}

async fn get_raw(s: &TestServer, path: &str, token: Option<&str>, range: Option<&str>) -> reqwest::Response {
    let mut rb = s.http.get(format!("{}{path}", s.base));
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    if let Some(r) = range {
        rb = rb.header("range", r);
    }
    rb.send().await.expect("request sent")
}

async fn status_and_json(resp: reqwest::Response) -> (StatusCode, Value) {
    let st = resp.status();
    (st, resp.json().await.unwrap_or(Value::Null))
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    let img = if format == ImageFormat::Jpeg { DynamicImage::ImageRgb8(img.to_rgb8()) } else { img };
    img.write_to(&mut buf, format).unwrap();
    buf.into_inner()
}

pub fn picture(w: u32, h: u32, format: ImageFormat) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba([(x % 256) as u8, (y % 256) as u8, 128, 255]));
    encode(DynamicImage::ImageRgba8(img), format)
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn round_trip_exact_bytes_and_headers(backend: Backend) {
    let Some(s) = start(backend, |_| {}).await else { return };
    let u = s.register("agent.media", false).await;
    let admin = s.register("admin.media", true).await;

    let (st, cfg) = s.get("/_matrix/client/v1/media/config", Some(&u.token)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(cfg["m.upload.size"], 50 * 1024 * 1024);

    // A binary document of 300 KB (more than one read chunk), with a non-ASCII name.
    let data = pseudo_random(300_000, 7);
    let mxc = upload_ok(&s, &u, "application/pdf", Some("rapport été.pdf"), data.clone()).await;
    let (server, media_id) = mxc.split_once('/').unwrap();
    assert_eq!(server, "localhost");

    let r = get_raw(&s, &format!("/_matrix/client/v1/media/download/{mxc}"), Some(&u.token), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), "application/pdf");
    assert_eq!(header(&r, "content-disposition"), "attachment; filename*=utf-8''rapport%20%C3%A9t%C3%A9.pdf");
    assert!(header(&r, "content-security-policy").starts_with("sandbox;"), "{}", header(&r, "content-security-policy"));
    assert_eq!(header(&r, "x-content-type-options"), "nosniff");
    assert_eq!(header(&r, "cross-origin-resource-policy"), "cross-origin");
    assert!(header(&r, "cache-control").contains("max-age="));
    assert_eq!(header(&r, "accept-ranges"), "bytes");
    assert_eq!(header(&r, "content-length"), "300000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..], "exact bytes back");

    // The file name in the path wins (sanitised).
    let r =
        get_raw(&s, &format!("/_matrix/client/v1/media/download/{mxc}/autre%20nom.pdf"), Some(&u.token), None).await;
    assert_eq!(header(&r, "content-disposition"), "attachment; filename=\"autre nom.pdf\"");
    assert_eq!(r.bytes().await.unwrap().len(), data.len());

    // Ranges.
    let r =
        get_raw(&s, &format!("/_matrix/client/v1/media/download/{mxc}"), Some(&u.token), Some("bytes=1000-1999")).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&r, "content-range"), "bytes 1000-1999/300000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[1000..2000]);
    let r = get_raw(&s, &format!("/_matrix/client/v1/media/download/{mxc}"), Some(&u.token), Some("bytes=-10")).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[data.len() - 10..]);
    let r =
        get_raw(&s, &format!("/_matrix/client/v1/media/download/{mxc}"), Some(&u.token), Some("bytes=300000-")).await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&r, "content-range"), "bytes */300000");

    // Safe types inline, others (HTML, SVG) as attachments; the content type is kept as given.
    let png = picture(20, 10, ImageFormat::Png);
    let png_mxc = upload_ok(&s, &u, "image/png", Some("photo.png"), png.clone()).await;
    let r = get_raw(&s, &format!("/_matrix/client/v1/media/download/{png_mxc}"), Some(&u.token), None).await;
    assert_eq!(header(&r, "content-type"), "image/png");
    assert_eq!(header(&r, "content-disposition"), "inline; filename=\"photo.png\"");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &png[..]);
    for (ct, name) in [("text/html", "page.html"), ("image/svg+xml", "x.svg")] {
        let m = upload_ok(&s, &u, ct, Some(name), b"<script>alert(1)</script>".to_vec()).await;
        let r = get_raw(&s, &format!("/_matrix/client/v1/media/download/{m}"), Some(&u.token), None).await;
        assert_eq!(header(&r, "content-type"), ct);
        assert!(header(&r, "content-disposition").starts_with("attachment"), "{ct}");
        assert!(header(&r, "content-security-policy").contains("sandbox"));
    }
    // Path separators and quotes never reach the header; a missing content type is octet-stream.
    let m = upload_ok(&s, &u, "", Some("../../etc/\"passwd\""), b"x".to_vec()).await;
    let r = get_raw(&s, &format!("/_matrix/client/v1/media/download/{m}"), Some(&u.token), None).await;
    assert_eq!(header(&r, "content-type"), "application/octet-stream");
    assert_eq!(header(&r, "content-disposition"), "attachment; filename=\"passwd\"");
    // An empty file is fine.
    let m = upload_ok(&s, &u, "text/plain", None, Vec::new()).await;
    let r = get_raw(&s, &format!("/_matrix/client/v1/media/download/{m}"), Some(&u.token), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-disposition"), "inline");
    assert!(r.bytes().await.unwrap().is_empty());

    // Metadata: size and SHA-256 recorded.
    let (st, info) = s.get(&format!("/_synapse/admin/v1/media/{server}/{media_id}"), Some(&admin.token)).await;
    assert_eq!(st, StatusCode::OK, "{info}");
    assert_eq!(info["media_info"]["media_length"], 300_000);
    assert_eq!(info["media_info"]["sha256"], hex::encode(Sha256::digest(&data)));
    assert_eq!(info["media_info"]["user_id"], u.user_id.as_str());

    // Unknown media, bad IDs, and remote media (no federation yet) are 404.
    for path in ["localhost/nosuchmedia", "localhost/bad%20id", "other.example/abc", "bad..name/abc"] {
        let r = get_raw(&s, &format!("/_matrix/client/v1/media/download/{path}"), Some(&u.token), None).await;
        assert_err(&status_and_json(r).await, 404, "M_NOT_FOUND");
    }
    s.stop().await;
}

async fn authentication_and_legacy_endpoints(backend: Backend) {
    let Some(s) = start(backend, |_| {}).await else { return };
    let u = s.register("agent.auth", false).await;
    let png = picture(64, 64, ImageFormat::Png);
    let mxc = upload_ok(&s, &u, "image/png", None, png.clone()).await;

    // Authenticated media endpoints refuse anonymous requests.
    for path in [
        format!("/_matrix/client/v1/media/download/{mxc}"),
        format!("/_matrix/client/v1/media/download/{mxc}/x.png"),
        format!("/_matrix/client/v1/media/thumbnail/{mxc}?width=32&height=32"),
        "/_matrix/client/v1/media/config".to_owned(),
        "/_matrix/client/v1/media/preview_url?url=https%3A%2F%2Fexample.org".to_owned(),
    ] {
        assert_err(&s.get(&path, None).await, 401, "M_MISSING_TOKEN");
        assert_err(&s.get(&path, Some("nope")).await, 401, "M_UNKNOWN_TOKEN");
    }
    assert_err(&upload(&s, None, "text/plain", None, b"x".to_vec()).await, 401, "M_MISSING_TOKEN");
    assert_err(&s.post("/_matrix/media/v1/create", None, json!({})).await, 401, "M_MISSING_TOKEN");
    // The access_token query parameter works too.
    let r = get_raw(&s, &format!("/_matrix/client/v1/media/download/{mxc}?access_token={}", u.token), None, None).await;
    assert_eq!(r.status(), StatusCode::OK);

    // Frozen by default: media uploaded now is not served by the unauthenticated endpoints.
    assert_err(&s.get(&format!("/_matrix/media/v3/download/{mxc}"), None).await, 404, "M_NOT_FOUND");
    assert_err(
        &s.get(&format!("/_matrix/media/v3/thumbnail/{mxc}?width=32&height=32"), None).await,
        404,
        "M_NOT_FOUND",
    );
    s.stop().await;

    // Unfrozen: legacy endpoints serve new media without authentication.
    let Some(s) = start(backend, |c| c.media.legacy_serve_new_media = true).await else { return };
    let u = s.register("agent.legacy", false).await;
    let mxc = upload_ok(&s, &u, "image/png", Some("a.png"), png.clone()).await;
    for prefix in ["/_matrix/media/v3", "/_matrix/media/r0"] {
        let r = get_raw(&s, &format!("{prefix}/download/{mxc}"), None, None).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "x-content-type-options"), "nosniff");
        assert_eq!(r.bytes().await.unwrap().as_ref(), &png[..]);
    }
    let r = get_raw(&s, &format!("/_matrix/media/v3/thumbnail/{mxc}?width=32&height=32&method=crop"), None, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), "image/png");
    s.stop().await;

    // Legacy endpoints switched off entirely.
    let Some(s) = start(backend, |c| {
        c.media.legacy_serve_new_media = true;
        c.media.legacy_endpoints = false;
    })
    .await
    else {
        return;
    };
    let u = s.register("agent.legacyoff", false).await;
    let mxc = upload_ok(&s, &u, "image/png", None, png).await;
    assert_err(&s.get(&format!("/_matrix/media/v3/download/{mxc}"), None).await, 404, "M_NOT_FOUND");
    let r = get_raw(&s, &format!("/_matrix/client/v1/media/download/{mxc}"), Some(&u.token), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    s.stop().await;
}

async fn thumbnail_of(s: &TestServer, u: &User, mxc: &str, w: u32, h: u32, method: &str) -> (String, (u32, u32)) {
    let r = get_raw(
        s,
        &format!("/_matrix/client/v1/media/thumbnail/{mxc}?width={w}&height={h}&method={method}"),
        Some(&u.token),
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK, "{w}x{h} {method}");
    assert_eq!(header(&r, "x-content-type-options"), "nosniff");
    assert!(header(&r, "content-disposition").starts_with("inline"));
    let ct = header(&r, "content-type");
    let img = image::load_from_memory(&r.bytes().await.unwrap()).expect("a decodable thumbnail");
    (ct, (img.width(), img.height()))
}

async fn thumbnails_have_the_right_dimensions(backend: Backend) {
    let Some(s) = start(backend, |c| c.media.thumbnails_at_upload = false).await else { return };
    let u = s.register("agent.thumbs", false).await;
    let mxc = upload_ok(&s, &u, "image/png", Some("plan.png"), picture(1000, 500, ImageFormat::Png)).await;

    // The spec's sizes: the smallest configured size at least as large as asked.
    assert_eq!(thumbnail_of(&s, &u, &mxc, 96, 96, "crop").await, ("image/png".into(), (96, 96)));
    assert_eq!(thumbnail_of(&s, &u, &mxc, 32, 32, "crop").await.1, (32, 32));
    assert_eq!(thumbnail_of(&s, &u, &mxc, 50, 50, "crop").await.1, (96, 96));
    assert_eq!(thumbnail_of(&s, &u, &mxc, 320, 240, "scale").await.1, (320, 160));
    assert_eq!(thumbnail_of(&s, &u, &mxc, 640, 480, "scale").await.1, (640, 320));
    assert_eq!(thumbnail_of(&s, &u, &mxc, 800, 600, "scale").await.1, (800, 400));
    // Served again from the cache, identical.
    assert_eq!(thumbnail_of(&s, &u, &mxc, 96, 96, "crop").await.1, (96, 96));
    // Never enlarged.
    let small = upload_ok(&s, &u, "image/png", None, picture(100, 50, ImageFormat::Png)).await;
    assert_eq!(thumbnail_of(&s, &u, &small, 800, 600, "scale").await.1, (100, 50));

    // JPEG in, JPEG out; GIF and WebP in, PNG out; EXIF-less portrait keeps its orientation.
    let jpeg = upload_ok(&s, &u, "image/jpeg", None, picture(600, 800, ImageFormat::Jpeg)).await;
    assert_eq!(thumbnail_of(&s, &u, &jpeg, 320, 240, "scale").await, ("image/jpeg".into(), (180, 240)));
    let gif = upload_ok(&s, &u, "image/gif", None, picture(400, 400, ImageFormat::Gif)).await;
    assert_eq!(thumbnail_of(&s, &u, &gif, 96, 96, "crop").await, ("image/png".into(), (96, 96)));
    let webp = upload_ok(&s, &u, "image/webp", None, picture(640, 480, ImageFormat::WebP)).await;
    assert_eq!(thumbnail_of(&s, &u, &webp, 320, 240, "scale").await, ("image/png".into(), (320, 240)));

    // Animated GIFs get animated thumbnails when asked; everything else a still one.
    let mut anim = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new(&mut anim);
        for i in 0..4u32 {
            let img = image::RgbaImage::from_fn(300, 200, |x, _| image::Rgba([(x + i * 50) as u8, 0, 0, 255]));
            enc.encode_frame(image::Frame::from_parts(img, 0, 0, image::Delay::from_numer_denom_ms(80, 1))).unwrap();
        }
    }
    let anim = upload_ok(&s, &u, "image/gif", Some("anim.gif"), anim).await;
    let r = get_raw(
        &s,
        &format!("/_matrix/client/v1/media/thumbnail/{anim}?width=96&height=96&method=crop&animated=true"),
        Some(&u.token),
        None,
    )
    .await;
    assert_eq!(header(&r, "content-type"), "image/gif");
    assert_eq!(header(&r, "content-disposition"), "inline; filename=\"thumbnail.gif\"");
    let frames: Vec<image::Frame> = image::AnimationDecoder::into_frames(
        image::codecs::gif::GifDecoder::new(Cursor::new(r.bytes().await.unwrap().to_vec())).unwrap(),
    )
    .collect::<Result<_, _>>()
    .unwrap();
    assert_eq!(frames.len(), 4);
    assert!(frames.iter().all(|f| f.buffer().dimensions() == (96, 96)));
    assert_eq!(thumbnail_of(&s, &u, &anim, 96, 96, "crop").await, ("image/png".into(), (96, 96)));
    let r = get_raw(
        &s,
        &format!("/_matrix/client/v1/media/thumbnail/{gif}?width=96&height=96&method=crop&animated=true"),
        Some(&u.token),
        None,
    )
    .await;
    assert_eq!(header(&r, "content-type"), "image/png", "a single-frame GIF stays still");

    // Not an image, or lying about it: 400.
    let pdf = upload_ok(&s, &u, "application/pdf", None, b"%PDF-1.4".to_vec()).await;
    let th = |m: &str| format!("/_matrix/client/v1/media/thumbnail/{m}?width=96&height=96&method=crop");
    assert_err(&s.get(&th(&pdf), Some(&u.token)).await, 400, "M_UNKNOWN");
    let fake = upload_ok(&s, &u, "image/png", None, b"not a png at all".to_vec()).await;
    assert_err(&s.get(&th(&fake), Some(&u.token)).await, 400, "M_UNKNOWN");
    // Bad parameters.
    let q = |q: &str| format!("/_matrix/client/v1/media/thumbnail/{mxc}?{q}");
    assert_err(&s.get(&q("width=96&height=96&method=zoom"), Some(&u.token)).await, 400, "M_INVALID_PARAM");
    assert_err(&s.get(&q("width=96"), Some(&u.token)).await, 400, "M_MISSING_PARAM");
    assert_err(&s.get(&q("width=-1&height=5"), Some(&u.token)).await, 400, "M_INVALID_PARAM");
    s.stop().await;

    // Decompression bombs: an image with more pixels than allowed is never decoded.
    let Some(s) = start(backend, |c| c.media.max_image_pixels = 250_000).await else { return };
    let u = s.register("agent.bomb", false).await;
    let big = upload_ok(&s, &u, "image/png", None, picture(1000, 500, ImageFormat::Png)).await;
    let r = s
        .get(&format!("/_matrix/client/v1/media/thumbnail/{big}?width=96&height=96&method=crop"), Some(&u.token))
        .await;
    assert_err(&r, 413, "M_TOO_LARGE");
    s.stop().await;

    // Pre-generated at upload: the thumbnails exist before anyone asks.
    let Some(s) = start(backend, |_| {}).await else { return };
    let u = s.register("agent.pregen", false).await;
    let mxc = upload_ok(&s, &u, "image/png", None, picture(1000, 500, ImageFormat::Png)).await;
    let (_, id) = mxc.split_once('/').unwrap();
    let mut count = 0i64;
    for _ in 0..100 {
        count = sqlx::query_scalar("SELECT COUNT(*) FROM media_thumbnails WHERE media_id = $1")
            .bind(id)
            .fetch_one(&s.state().db)
            .await
            .unwrap();
        if count == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count, 5, "every configured size pre-generated");
    assert_eq!(thumbnail_of(&s, &u, &mxc, 320, 240, "scale").await.1, (320, 160));
    s.stop().await;
}

async fn asynchronous_upload(backend: Backend) {
    let Some(s) = start(backend, |c| c.media.max_pending_uploads_per_user = 3).await else { return };
    let u = s.register("agent.async", false).await;
    let other = s.register("agent.other", false).await;

    let (st, created) = s.post("/_matrix/media/v1/create", Some(&u.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{created}");
    let mxc = created["content_uri"].as_str().unwrap().strip_prefix("mxc://").unwrap().to_owned();
    let expires = created["unused_expires_at"].as_i64().unwrap();
    let now = parvis::storage::now_ms();
    assert!(expires > now + 86_000_000 && expires <= now + 86_400_000 + 5_000, "{expires}");

    // Not uploaded yet: a download waits up to timeout_ms, then 504 M_NOT_YET_UPLOADED.
    let t0 = std::time::Instant::now();
    let r = s.get(&format!("/_matrix/client/v1/media/download/{mxc}?timeout_ms=300"), Some(&u.token)).await;
    assert_err(&r, 504, "M_NOT_YET_UPLOADED");
    assert!(t0.elapsed() >= Duration::from_millis(250));
    let r = s
        .get(&format!("/_matrix/client/v1/media/thumbnail/{mxc}?width=32&height=32&timeout_ms=100"), Some(&u.token))
        .await;
    assert_err(&r, 504, "M_NOT_YET_UPLOADED");

    // A download waiting when the content arrives gets it.
    let waiting = {
        let (http, base, token, mxc) = (s.http.clone(), s.base.clone(), u.token.clone(), mxc.clone());
        tokio::spawn(async move {
            let r = http
                .get(format!("{base}/_matrix/client/v1/media/download/{mxc}?timeout_ms=20000"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            (r.status(), r.bytes().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    let put = |token: String, body: Vec<u8>| {
        let (http, url) = (s.http.clone(), format!("{}/_matrix/media/v3/upload/{mxc}?filename=note.txt", s.base));
        async move {
            let r =
                http.put(url).bearer_auth(token).header("content-type", "text/plain").body(body).send().await.unwrap();
            status_and_json(r).await
        }
    };
    // Only the reserving user may upload.
    assert_err(&put(other.token.clone(), b"intrus".to_vec()).await, 403, "M_FORBIDDEN");
    let (st, v) = put(u.token.clone(), b"contenu asynchrone".to_vec()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));
    let (st, body) = waiting.await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body.as_ref(), b"contenu asynchrone");
    // Once only.
    assert_err(&put(u.token.clone(), b"encore".to_vec()).await, 409, "M_CANNOT_OVERWRITE_MEDIA");
    let r = get_raw(&s, &format!("/_matrix/client/v1/media/download/{mxc}"), Some(&u.token), None).await;
    assert_eq!(header(&r, "content-disposition"), "inline; filename=\"note.txt\"");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"contenu asynchrone");
    // Unknown IDs, and IDs of other servers, cannot be uploaded to.
    for target in ["localhost/neverreserved", "elsewhere.example/abc"] {
        let r = s
            .http
            .put(format!("{}/_matrix/media/v3/upload/{target}", s.base))
            .bearer_auth(&u.token)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_err(&status_and_json(r).await, 404, "M_NOT_FOUND");
    }

    // At most max_pending_uploads_per_user reservations at once.
    for _ in 0..3 {
        assert_eq!(s.post("/_matrix/media/v1/create", Some(&u.token), json!({})).await.0, StatusCode::OK);
    }
    assert_err(&s.post("/_matrix/media/v1/create", Some(&u.token), json!({})).await, 429, "M_LIMIT_EXCEEDED");
    s.stop().await;

    // Unused reservations expire: uploading after the expiry fails, and housekeeping releases them.
    let Some(s) = start(backend, |c| c.media.unused_expiry_secs = 1).await else { return };
    let u = s.register("agent.expiry", false).await;
    let (_, created) = s.post("/_matrix/media/v1/create", Some(&u.token), json!({})).await;
    let mxc = created["content_uri"].as_str().unwrap().strip_prefix("mxc://").unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = s
        .http
        .put(format!("{}/_matrix/media/v3/upload/{mxc}", s.base))
        .bearer_auth(&u.token)
        .body("late")
        .send()
        .await
        .unwrap();
    assert_err(&status_and_json(r).await, 404, "M_NOT_FOUND");
    assert_err(&s.get(&format!("/_matrix/client/v1/media/download/{mxc}"), Some(&u.token)).await, 404, "M_NOT_FOUND");
    let released =
        parvis::storage::media::delete_expired_reservations(&s.state().db, parvis::storage::now_ms()).await.unwrap();
    assert_eq!(released, 1);
    s.stop().await;
}

async fn size_limit_quota_and_rate_limit(backend: Backend) {
    let Some(s) = start(backend, |c| {
        c.media.max_upload_bytes = 1000;
        c.media.user_quota_bytes = 1500;
        c.media.quota_info_uri = Some("https://intranet.example/quota".into());
    })
    .await
    else {
        return;
    };
    let u = s.register("agent.limits", false).await;
    let (st, cfg) = s.get("/_matrix/client/v1/media/config", Some(&u.token)).await;
    assert_eq!((st, cfg["m.upload.size"].as_u64()), (StatusCode::OK, Some(1000)));

    assert_err(&upload(&s, Some(&u.token), "text/plain", None, vec![b'a'; 1001]).await, 413, "M_TOO_LARGE");
    // Without Content-Length (chunked): refused while streaming.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..5).map(|_| Ok(vec![b'b'; 300])).collect();
    let r = s
        .http
        .post(format!("{}/_matrix/media/v3/upload", s.base))
        .bearer_auth(&u.token)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_err(&status_and_json(r).await, 413, "M_TOO_LARGE");
    // Exactly the limit is fine; the quota then refuses the next one.
    upload_ok(&s, &u, "text/plain", None, vec![b'c'; 1000]).await;
    let r = upload(&s, Some(&u.token), "text/plain", None, vec![b'd'; 600]).await;
    assert_err(&r, 403, "M_USER_LIMIT_EXCEEDED");
    assert_eq!(r.1["info_uri"], "https://intranet.example/quota");
    upload_ok(&s, &u, "text/plain", None, vec![b'e'; 500]).await;
    // The async path checks the quota too.
    let (_, created) = s.post("/_matrix/media/v1/create", Some(&u.token), json!({})).await;
    let mxc = created["content_uri"].as_str().unwrap().strip_prefix("mxc://").unwrap().to_owned();
    let r = s
        .http
        .put(format!("{}/_matrix/media/v3/upload/{mxc}", s.base))
        .bearer_auth(&u.token)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_err(&status_and_json(r).await, 403, "M_USER_LIMIT_EXCEEDED");
    // Nothing of the refused uploads was kept.
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM media WHERE storage_key IS NOT NULL")
        .fetch_one(&s.state().db)
        .await
        .unwrap();
    assert_eq!(total, 2);
    s.stop().await;

    // Per-user rate limit.
    let Some(s) = start(backend, |c| {
        c.rate_limits.enabled = true;
        c.media.uploads_per_user = rate(0.01, 2);
    })
    .await
    else {
        return;
    };
    let u = s.register("agent.rate", false).await;
    upload_ok(&s, &u, "text/plain", None, b"1".to_vec()).await;
    upload_ok(&s, &u, "text/plain", None, b"2".to_vec()).await;
    let r = upload(&s, Some(&u.token), "text/plain", None, b"3".to_vec()).await;
    assert_err(&r, 429, "M_LIMIT_EXCEEDED");
    assert!(r.1["retry_after_ms"].as_u64().unwrap() > 0);
    let v = s.register("agent.rate2", false).await;
    upload_ok(&s, &v, "text/plain", None, b"other user".to_vec()).await;
    s.stop().await;
}

async fn quarantine_delete_listing_and_purge(backend: Backend) {
    let Some(s) = start(backend, |_| {}).await else { return };
    let u = s.register("agent.q", false).await;
    let admin = s.register("admin.q", true).await;
    let png = picture(200, 100, ImageFormat::Png);
    let mxc = upload_ok(&s, &u, "image/png", Some("a.png"), png.clone()).await;
    let other = upload_ok(&s, &u, "text/plain", Some("b.txt"), b"texte".to_vec()).await;
    let dl = format!("/_matrix/client/v1/media/download/{mxc}");
    let th = format!("/_matrix/client/v1/media/thumbnail/{mxc}?width=32&height=32&method=crop");
    assert_eq!(get_raw(&s, &th, Some(&u.token), None).await.status(), StatusCode::OK);

    // Only admins.
    let q = format!("/_synapse/admin/v1/media/quarantine/{mxc}");
    assert_err(&s.post(&q, Some(&u.token), json!({})).await, 403, "M_FORBIDDEN");
    let (st, _) = s.post(&q, Some(&admin.token), json!({})).await;
    assert_eq!(st, StatusCode::OK);
    assert_err(&s.get(&dl, Some(&u.token)).await, 404, "M_NOT_FOUND");
    assert_err(&s.get(&th, Some(&u.token)).await, 404, "M_NOT_FOUND");
    assert_err(&s.get(&dl, Some(&admin.token)).await, 404, "M_NOT_FOUND");
    let (_, info) = s.get(&format!("/_synapse/admin/v1/media/{mxc}"), Some(&admin.token)).await;
    assert_eq!(info["media_info"]["quarantined_by"], admin.user_id.as_str());
    // Released.
    let (st, _) = s.post(&format!("/_synapse/admin/v1/media/unquarantine/{mxc}"), Some(&admin.token), json!({})).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(get_raw(&s, &dl, Some(&u.token), None).await.bytes().await.unwrap().as_ref(), &png[..]);
    assert_err(
        &s.post("/_synapse/admin/v1/media/quarantine/localhost/nosuch", Some(&admin.token), json!({})).await,
        404,
        "M_NOT_FOUND",
    );

    // Per-user listing (Synapse's format).
    let list = format!("/_synapse/admin/v1/users/{}/media", enc(&u.user_id));
    assert_err(&s.get(&list, Some(&u.token)).await, 403, "M_FORBIDDEN");
    let (st, l) = s.get(&format!("{list}?limit=1&order_by=media_length&dir=b"), Some(&admin.token)).await;
    assert_eq!(st, StatusCode::OK, "{l}");
    assert_eq!(l["total"], 2);
    assert_eq!(l["next_token"], 1);
    assert_eq!(l["media"][0]["media_id"], mxc.split_once('/').unwrap().1);
    assert_eq!(l["media"][0]["media_type"], "image/png");
    assert_eq!(l["media"][0]["upload_name"], "a.png");
    let (_, l) = s.get(&format!("{list}?from=1"), Some(&admin.token)).await;
    assert_eq!(l["media"].as_array().unwrap().len(), 1);
    assert!(l.get("next_token").is_none());

    // Delete: gone, content and thumbnails with it.
    let del = format!("/_synapse/admin/v1/media/{mxc}");
    assert_err(&s.delete(&del, Some(&u.token), json!({})).await, 403, "M_FORBIDDEN");
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT storage_key FROM media WHERE media_id = $1 UNION ALL SELECT storage_key FROM media_thumbnails WHERE media_id = $1",
    )
    .bind(mxc.split_once('/').unwrap().1)
    .fetch_all(&s.state().db)
    .await
    .unwrap();
    assert!(keys.len() >= 2, "content and at least one thumbnail");
    let (st, v) = s.delete(&del, Some(&admin.token), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "deleted_media": [mxc.split_once('/').unwrap().1], "total": 1 }));
    assert_err(&s.get(&dl, Some(&u.token)).await, 404, "M_NOT_FOUND");
    assert_err(&s.delete(&del, Some(&admin.token), json!({})).await, 404, "M_NOT_FOUND");
    for key in keys {
        assert!(s.state().media.store.get(&key, None).await.unwrap().is_none(), "{key} deleted from the store");
    }

    // Remote media cache: what federation will store, purged by age.
    let state = s.state().clone();
    parvis::media::remote::cache(&state, "commune.example", "remote1", "text/plain", None, "distant".into())
        .await
        .unwrap();
    let remote_dl = "/_matrix/client/v1/media/download/commune.example/remote1";
    assert_eq!(get_raw(&s, remote_dl, Some(&u.token), None).await.bytes().await.unwrap().as_ref(), b"distant");
    let (st, v) = s.post("/_synapse/admin/v1/purge_media_cache?before_ts=1", Some(&admin.token), json!({})).await;
    assert_eq!((st, v), (StatusCode::OK, json!({ "deleted": 0 })));
    let before = parvis::storage::now_ms() + 1;
    assert_err(
        &s.post("/_synapse/admin/v1/purge_media_cache", Some(&admin.token), json!({})).await,
        400,
        "M_MISSING_PARAM",
    );
    let (st, v) = s
        .post(&format!("/_synapse/admin/v1/purge_media_cache?before_ts={before}"), Some(&admin.token), json!({}))
        .await;
    assert_eq!((st, v), (StatusCode::OK, json!({ "deleted": 1 })));
    assert_err(&s.get(remote_dl, Some(&u.token)).await, 404, "M_NOT_FOUND");
    // Local media is never purged as cache.
    assert_eq!(
        get_raw(&s, &format!("/_matrix/client/v1/media/download/{other}"), Some(&u.token), None).await.status(),
        StatusCode::OK
    );

    // All of a user's media at once.
    assert_err(&s.delete(&list, Some(&u.token), json!({})).await, 403, "M_FORBIDDEN");
    let (st, v) = s.delete(&list, Some(&admin.token), json!({})).await;
    assert_eq!((st, v), (StatusCode::OK, json!({ "total": 1, "deleted_media": [other.split_once('/').unwrap().1] })));
    assert_err(&s.get(&format!("/_matrix/client/v1/media/download/{other}"), Some(&u.token)).await, 404, "M_NOT_FOUND");
    s.stop().await;
}

const EICAR: &[u8] = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

async fn antivirus_hook(backend: Backend) {
    // A command scanner with clamscan's exit codes.
    let dir = std::env::temp_dir().join(format!("parvis-scan-{}", parvis::media::random_id(8)));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("scan.sh");
    std::fs::write(&script, "#!/bin/sh\nif grep -q EICAR \"$1\"; then exit 1; fi\nexit 0\n").unwrap();
    let argv = vec!["sh".to_owned(), script.display().to_string()];
    let Some(s) = start(backend, |c| c.media.scanner_command = argv).await else { return };
    let u = s.register("agent.av", false).await;
    let clean = upload_ok(&s, &u, "text/plain", None, b"rapport sain".to_vec()).await;
    let bad = upload_ok(&s, &u, "text/plain", None, EICAR.to_vec()).await;
    let r = get_raw(&s, &format!("/_matrix/client/v1/media/download/{clean}"), Some(&u.token), None).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"rapport sain");
    assert_err(&s.get(&format!("/_matrix/client/v1/media/download/{bad}"), Some(&u.token)).await, 404, "M_NOT_FOUND");
    // The verdict is kept.
    let verdicts: Vec<Option<String>> = sqlx::query_scalar("SELECT scan_verdict FROM media ORDER BY scan_verdict")
        .fetch_all(&s.state().db)
        .await
        .unwrap();
    assert_eq!(verdicts, vec![Some("clean".into()), Some("infected".into())]);
    std::fs::remove_file(&script).unwrap();
    assert_err(&s.get(&format!("/_matrix/client/v1/media/download/{bad}"), Some(&u.token)).await, 404, "M_NOT_FOUND");
    s.stop().await;
    let _ = std::fs::remove_dir_all(&dir);

    // An HTTP scanner; while it fails, nothing is served.
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scans = Arc::new(AtomicUsize::new(0));
    let (up2, scans2) = (up.clone(), scans.clone());
    let app = axum::Router::new().route(
        "/scan",
        axum::routing::post(move |body: axum::body::Bytes| {
            let (up, scans) = (up2.clone(), scans2.clone());
            async move {
                scans.fetch_add(1, Ordering::SeqCst);
                if !up.load(Ordering::SeqCst) {
                    return (axum::http::StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({})));
                }
                let infected = body.windows(5).any(|w| w == b"EICAR");
                (axum::http::StatusCode::OK, axum::Json(json!({ "clean": !infected })))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/scan", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let Some(s) = start(backend, |c| c.media.scanner_url = Some(url)).await else { return };
    let u = s.register("agent.av2", false).await;
    let clean = upload_ok(&s, &u, "text/plain", None, b"propre".to_vec()).await;
    let bad = upload_ok(&s, &u, "text/plain", None, EICAR.to_vec()).await;
    let path = format!("/_matrix/client/v1/media/download/{clean}");
    assert_err(&s.get(&path, Some(&u.token)).await, 502, "M_UNKNOWN");
    up.store(true, Ordering::SeqCst);
    assert_eq!(get_raw(&s, &path, Some(&u.token), None).await.bytes().await.unwrap().as_ref(), b"propre");
    assert_eq!(get_raw(&s, &path, Some(&u.token), None).await.status(), StatusCode::OK);
    assert_err(&s.get(&format!("/_matrix/client/v1/media/download/{bad}"), Some(&u.token)).await, 404, "M_NOT_FOUND");
    assert_eq!(scans.load(Ordering::SeqCst), 3, "one failed scan, then one scan per media");
    s.stop().await;
}

/// A small web server for URL previews, counting the requests it gets.
async fn web_server() -> (String, Arc<AtomicUsize>) {
    use axum::response::IntoResponse;
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let logo = picture(120, 60, ImageFormat::Png);
    let app = axum::Router::new()
        .route(
            "/page",
            axum::routing::get(|| async {
                axum::response::Html(
                    "<html><head><title>Fallback</title>\
                     <meta property=\"og:title\" content=\"Mairie de Parvis &amp; services\">\
                     <meta property=\"og:description\" content=\"Horaires d'ouverture\">\
                     <meta property=\"og:image\" content=\"/logo.png\"></head><body>Bienvenue</body></html>",
                )
            }),
        )
        .route("/logo.png", axum::routing::get(move || async move { ([("content-type", "image/png")], logo.clone()) }))
        .route("/big", axum::routing::get(|| async { axum::response::Html("x".repeat(200_000)) }))
        .route(
            "/to-internal",
            axum::routing::get(|headers: axum::http::HeaderMap| async move {
                let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or_default();
                let port = host.rsplit(':').next().unwrap().to_owned();
                axum::response::Redirect::temporary(&format!("http://127.0.0.2:{port}/page")).into_response()
            }),
        )
        .route(
            "/to-metadata",
            axum::routing::get(|| async {
                axum::response::Redirect::temporary("http://169.254.169.254/latest/meta-data/")
            }),
        )
        .route("/to-page", axum::routing::get(|| async { axum::response::Redirect::temporary("/page") }))
        .layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                next.run(req).await
            }
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, hits)
}

fn preview_path(url: &str) -> String {
    format!("/_matrix/client/v1/media/preview_url?url={}", enc(url))
}

#[tokio::test]
async fn url_previews_refuse_ssrf_targets() {
    let (web, hits) = web_server().await;
    let port = web.rsplit(':').next().unwrap().to_owned();

    // Off by default.
    let s = TestServer::start().await;
    let u = s.register("agent.preview0", false).await;
    assert_err(&s.get(&preview_path(&format!("{web}/page")), Some(&u.token)).await, 403, "M_FORBIDDEN");
    s.stop().await;

    // On, with the default blacklist: loopback, private, link-local... are never contacted.
    let s = TestServer::start_with(|c| c.media.url_preview_enabled = true).await;
    let u = s.register("agent.preview1", false).await;
    for target in [
        format!("{web}/page"),
        format!("http://localhost:{port}/page"),
        format!("http://[::1]:{port}/page"),
        format!("http://[::ffff:127.0.0.1]:{port}/page"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/".to_owned(),
        "http://192.168.1.1/".to_owned(),
        "http://0.0.0.0/".to_owned(),
    ] {
        assert_err(&s.get(&preview_path(&target), Some(&u.token)).await, 403, "M_FORBIDDEN");
    }
    for bad in ["file:///etc/passwd", "gopher://127.0.0.1/", "not a url"] {
        assert_err(&s.get(&preview_path(bad), Some(&u.token)).await, 400, "M_INVALID_PARAM");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "no request reached the internal server");
    s.stop().await;

    // 127.0.0.1 whitelisted (a site on the local network): previews work, redirects are checked.
    let s = TestServer::start_with(|c| {
        c.media.url_preview_enabled = true;
        c.media.url_preview_ip_whitelist = vec!["127.0.0.1/32".into()];
        c.media.url_preview_max_bytes = 100_000;
    })
    .await;
    let u = s.register("agent.preview2", false).await;
    let (st, og) = s.get(&preview_path(&format!("{web}/page")), Some(&u.token)).await;
    assert_eq!(st, StatusCode::OK, "{og}");
    assert_eq!(og["og:title"], "Mairie de Parvis & services");
    assert_eq!(og["og:description"], "Horaires d'ouverture");
    assert_eq!(og["og:image:width"], 120);
    assert_eq!(og["og:image:height"], 60);
    assert_eq!(og["og:image:type"], "image/png");
    let image = og["og:image"].as_str().unwrap().strip_prefix("mxc://").unwrap().to_owned();
    let r = get_raw(&s, &format!("/_matrix/client/v1/media/download/{image}"), Some(&u.token), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(og["matrix:image:size"].as_u64(), Some(r.bytes().await.unwrap().len() as u64));
    // Cached: no new fetch.
    let before = hits.load(Ordering::SeqCst);
    let (_, again) = s.get(&preview_path(&format!("{web}/page")), Some(&u.token)).await;
    assert_eq!(again, og);
    assert_eq!(hits.load(Ordering::SeqCst), before);
    // Redirects: followed within the allowed addresses, refused to anything else.
    let (st, og2) = s.get(&preview_path(&format!("{web}/to-page")), Some(&u.token)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(og2["og:title"], "Mairie de Parvis & services");
    assert_err(&s.get(&preview_path(&format!("{web}/to-internal")), Some(&u.token)).await, 403, "M_FORBIDDEN");
    assert_err(&s.get(&preview_path(&format!("{web}/to-metadata")), Some(&u.token)).await, 403, "M_FORBIDDEN");
    // A host name resolving to both an allowed and a forbidden address uses only the allowed one.
    let (st, _) = s.get(&preview_path(&format!("http://localhost:{port}/page")), Some(&u.token)).await;
    assert_eq!(st, StatusCode::OK);
    // Size limit.
    assert_err(&s.get(&preview_path(&format!("{web}/big")), Some(&u.token)).await, 502, "M_UNKNOWN");
    // The deprecated path is the same endpoint.
    let (st, _) =
        s.get(&format!("/_matrix/media/v3/preview_url?url={}", enc(&format!("{web}/page"))), Some(&u.token)).await;
    assert_eq!(st, StatusCode::OK);
    s.stop().await;
}

/// Element X's path: client A uploads an image (asynchronously, as the SDK's send queue does) and
/// sends it as `m.image`; client B reads the event and downloads the file and a thumbnail through
/// the authenticated media endpoints (`/versions` advertises v1.11).
#[tokio::test]
async fn matrix_sdk_image_and_thumbnail() {
    use matrix_sdk::Client;
    use matrix_sdk::media::{MediaFormat, MediaRequestParameters, MediaThumbnailSettings};
    use matrix_sdk::room::MessagesOptions;
    use matrix_sdk::ruma::events::room::MediaSource;
    use matrix_sdk::ruma::events::room::message::{ImageMessageEventContent, MessageType, RoomMessageEventContent};
    use matrix_sdk::ruma::uint;

    let s = TestServer::start().await;
    s.register("agent.photo", false).await;
    s.register("agent.viewer", false).await;
    let a = Client::builder().homeserver_url(&s.base).build().await.unwrap();
    a.matrix_auth().login_username("agent.photo", PASSWORD).send().await.expect("login a");
    let b = Client::builder().homeserver_url(&s.base).build().await.unwrap();
    let b_login = b.matrix_auth().login_username("agent.viewer", PASSWORD).send().await.expect("login b");

    let photo = picture(1024, 768, ImageFormat::Jpeg);
    let reserved = a.media().create_content_uri().await.expect("create_content_uri");
    let mxc = reserved.uri.clone();
    a.media().upload_preallocated(reserved, &"image/jpeg".parse().unwrap(), photo.clone()).await.expect("upload");
    let small = picture(50, 50, ImageFormat::Png);
    let direct = a.media().upload(&"image/png".parse().unwrap(), small.clone(), None).await.expect("plain upload");

    let room_a =
        a.create_room(matrix_sdk::ruma::api::client::room::create_room::v3::Request::new()).await.expect("create room");
    room_a.invite_user_by_id(&b_login.user_id).await.unwrap();
    let content = ImageMessageEventContent::plain("photo.jpg".into(), mxc.clone());
    room_a.send(RoomMessageEventContent::new(MessageType::Image(content))).await.expect("send m.image");

    let room_b = b.join_room_by_id(room_a.room_id()).await.expect("join");
    let page = room_b.messages(MessagesOptions::backward()).await.expect("messages");
    let image_event = page
        .chunk
        .iter()
        .map(|e| e.raw().deserialize_as::<Value>().unwrap())
        .find(|e| e["content"]["msgtype"] == "m.image")
        .expect("B sees the image");
    let url: matrix_sdk::ruma::OwnedMxcUri = serde_json::from_value(image_event["content"]["url"].clone()).unwrap();
    assert_eq!(url, mxc);

    let file = MediaRequestParameters { source: MediaSource::Plain(url.clone()), format: MediaFormat::File };
    assert_eq!(b.media().get_media_content(&file, false).await.expect("download"), photo);
    let thumb = MediaRequestParameters {
        source: MediaSource::Plain(url),
        format: MediaFormat::Thumbnail(MediaThumbnailSettings::new(uint!(320), uint!(240))),
    };
    let t = b.media().get_media_content(&thumb, false).await.expect("thumbnail");
    let img = image::load_from_memory(&t).expect("a JPEG thumbnail");
    assert_eq!((img.width(), img.height()), (320, 240));
    let direct = MediaRequestParameters { source: MediaSource::Plain(direct.content_uri), format: MediaFormat::File };
    assert_eq!(b.media().get_media_content(&direct, false).await.unwrap(), small);

    // The SDK used the authenticated endpoints: the legacy ones would have refused (frozen).
    let metrics = s.http.get(format!("{}/metrics", s.metrics)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("/_matrix/client/v1/media/download/"), "authenticated download used");
    assert!(metrics.contains("/_matrix/client/v1/media/thumbnail/"), "authenticated thumbnail used");
    assert!(!metrics.contains("/_matrix/media/v3/download"), "legacy download not used");
    s.stop().await;
}
