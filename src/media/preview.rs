//! URL previews (`preview_url`): fetch a page chosen by a user, read its Open Graph metadata
//! (falling back to `<title>` and `<meta name="description">`), fetch its `og:image` into the
//! media repository, and cache the result (`media_url_previews`).
//!
//! The server fetches URLs that users choose, so every fetch goes through the SSRF guard of
//! `http::ssrf`: hosts resolve only to allowed addresses (`media.url_preview_ip_blacklist` /
//! `_whitelist`) and the connection goes to the checked address; IP-literal URLs are checked
//! before sending; redirects (at most 5, http/https only) are checked the same way. Bodies are
//! limited to `media.url_preview_max_bytes` and the whole preview to `url_preview_timeout_secs`.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::config::MediaConfig;
use crate::error::{ApiResult, Error};
use crate::http::ssrf::{GuardedResolver, IpPolicy, Refused, is_refused};
use crate::state::AppState;
use crate::storage::{self, now_ms};

const MAX_REDIRECTS: usize = 5;
/// Only this much of an HTML page is parsed for metadata.
const MAX_HTML_PARSED: usize = 1024 * 1024;

pub struct Previewer {
    client: reqwest::Client,
    policy: Arc<IpPolicy>,
    max_bytes: u64,
    timeout: Duration,
    cache_ms: i64,
}

impl Previewer {
    pub fn new(config: &MediaConfig) -> anyhow::Result<Self> {
        let policy = Arc::new(
            IpPolicy::from_lists(&config.url_preview_ip_blacklist, &config.url_preview_ip_whitelist)
                .map_err(|e| anyhow::anyhow!("media.url_preview_ip_*: {e}"))?,
        );
        let timeout = Duration::from_secs(config.url_preview_timeout_secs.max(1));
        let redirect_policy = policy.clone();
        let client = reqwest::Client::builder()
            .dns_resolver(GuardedResolver(policy.clone()))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error("too many redirects");
                }
                let url = attempt.url();
                let allowed = matches!(url.scheme(), "http" | "https") && redirect_policy.allows_url(url) == Some(true);
                if allowed {
                    attempt.follow()
                } else {
                    let host = url.host_str().unwrap_or("").to_owned();
                    attempt.error(Refused(format!("redirect target {host}")))
                }
            }))
            .no_proxy()
            .connect_timeout(timeout)
            .timeout(timeout)
            .user_agent(
                config
                    .url_preview_user_agent
                    .clone()
                    .unwrap_or_else(|| concat!("Parvis/", env!("CARGO_PKG_VERSION"), " (URL preview)").to_owned()),
            )
            .build()?;
        Ok(Self {
            client,
            policy,
            max_bytes: config.url_preview_max_bytes,
            timeout,
            cache_ms: (config.url_preview_cache_secs as i64).saturating_mul(1000),
        })
    }
}

fn refused() -> Error {
    Error::forbidden("This URL's address is not allowed for previews")
}

fn fetch_failed(why: impl std::fmt::Display) -> Error {
    Error::new(StatusCode::BAD_GATEWAY, "M_UNKNOWN", format!("Could not fetch the URL: {why}"))
}

/// A fetched document.
struct Fetched {
    final_url: url::Url,
    content_type: String,
    body: Bytes,
}

impl Previewer {
    async fn fetch(&self, url: &url::Url) -> ApiResult<Fetched> {
        if self.policy.allows_url(url) != Some(true) {
            return Err(refused());
        }
        let mut resp = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| if is_refused(&e) { refused() } else { fetch_failed(e.without_url()) })?;
        if !resp.status().is_success() {
            return Err(fetch_failed(format!("the server answered {}", resp.status())));
        }
        if resp.content_length().is_some_and(|l| l > self.max_bytes) {
            return Err(fetch_failed("the document is too large"));
        }
        let final_url = resp.url().clone();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fetch_failed(e.without_url()))? {
            if (body.len() + chunk.len()) as u64 > self.max_bytes {
                return Err(fetch_failed("the document is too large"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Fetched { final_url, content_type, body: Bytes::from(body) })
    }
}

/// `GET /preview_url?url=...`: the Open Graph data of a page, from the cache when fresh.
pub async fn preview(state: &AppState, raw_url: &str) -> ApiResult<Value> {
    let Some(p) = &state.media.previews else {
        return Err(Error::forbidden("URL previews are disabled on this server"));
    };
    let url = url::Url::parse(raw_url).map_err(|_| Error::invalid_param("url is not a valid URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(Error::invalid_param("Only http and https URLs can be previewed"));
    }
    // Checked before the cache too: a URL refused now is refused even if it was once fetched.
    if p.policy.allows_url(&url) != Some(true) {
        return Err(refused());
    }
    let now = now_ms();
    if let Some(og) = storage::media::get_preview(&state.db, url.as_str(), now).await? {
        return Ok(og);
    }
    let og = tokio::time::timeout(p.timeout, build(state, p, &url))
        .await
        .map_err(|_| Error::new(StatusCode::GATEWAY_TIMEOUT, "M_UNKNOWN", "Fetching the URL took too long"))??;
    storage::media::put_preview(&state.db, url.as_str(), &og, now, now + p.cache_ms).await?;
    Ok(og)
}

async fn build(state: &AppState, p: &Previewer, url: &url::Url) -> ApiResult<Value> {
    let doc = p.fetch(url).await?;
    let essence = doc.content_type.split(';').next().unwrap_or("").trim().to_owned();
    let mut og = Map::new();
    if essence.starts_with("image/") {
        add_image(state, &mut og, &essence, &doc.final_url, doc.body).await?;
    } else if essence == "text/html" || essence == "application/xhtml+xml" {
        let text = String::from_utf8_lossy(&doc.body[..doc.body.len().min(MAX_HTML_PARSED)]).into_owned();
        og = parse_html(&text);
        if let Some(image_url) = og.get("og:image").and_then(Value::as_str).map(str::to_owned) {
            og.remove("og:image");
            if let Ok(image_url) = doc.final_url.join(&image_url)
                && matches!(image_url.scheme(), "http" | "https")
            {
                match p.fetch(&image_url).await {
                    Ok(img) => {
                        let t = img.content_type.split(';').next().unwrap_or("").trim().to_owned();
                        if t.starts_with("image/") {
                            add_image(state, &mut og, &t, &img.final_url, img.body).await?;
                        }
                    }
                    Err(e) => tracing::debug!(url = %image_url, error = %e, "preview image not fetched"),
                }
            }
        }
        og.entry("og:url").or_insert_with(|| json!(doc.final_url.as_str()));
    }
    Ok(Value::Object(og))
}

/// Stores a preview image in the media repository (as cached media) and describes it.
async fn add_image(
    state: &AppState,
    og: &mut Map<String, Value>,
    content_type: &str,
    url: &url::Url,
    data: Bytes,
) -> ApiResult<()> {
    let dims = image::ImageReader::new(std::io::Cursor::new(&data[..]))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok());
    let name = url.path_segments().and_then(|mut s| s.next_back()).and_then(super::sanitize_file_name);
    let size = data.len();
    let media_id = super::random_id(24);
    let server = state.config.server_name.clone();
    let content_type = super::sanitize_content_type(Some(content_type));
    super::remote::cache(state, &server, &media_id, &content_type, name.as_deref(), data).await?;
    og.insert("og:image".into(), json!(format!("mxc://{server}/{media_id}")));
    og.insert("og:image:type".into(), json!(content_type));
    og.insert("matrix:image:size".into(), json!(size));
    if let Some((w, h)) = dims {
        og.insert("og:image:width".into(), json!(w));
        og.insert("og:image:height".into(), json!(h));
    }
    Ok(())
}

/// Extracts `og:*` properties (plus `<title>` and the description as fallbacks) from HTML.
pub fn parse_html(html: &str) -> Map<String, Value> {
    let lower = html.to_ascii_lowercase();
    let mut og = Map::new();
    let mut description = None;
    let mut pos = 0;
    while let Some(i) = lower[pos..].find("<meta") {
        let start = pos + i + 5;
        let end = lower[start..].find('>').map_or(html.len(), |e| start + e);
        let attrs = parse_attributes(&html[start..end]);
        let get = |name: &str| attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let key = get("property").or_else(|| get("name")).map(str::to_ascii_lowercase);
        if let (Some(key), Some(content)) = (key, get("content")) {
            let content = truncate(&decode_entities(content), 1000);
            if key.starts_with("og:") {
                og.entry(key).or_insert(json!(content));
            } else if key == "description" || key == "twitter:description" {
                description.get_or_insert(content);
            }
        }
        pos = end.min(html.len());
        if pos >= html.len() {
            break;
        }
    }
    if !og.contains_key("og:title")
        && let Some(i) = lower.find("<title")
        && let Some(open_end) = lower[i..].find('>')
    {
        let from = i + open_end + 1;
        let to = lower[from..].find("</title").map_or(html.len(), |e| from + e);
        let title = truncate(decode_entities(&html[from..to]).trim(), 300);
        if !title.is_empty() {
            og.insert("og:title".into(), json!(title));
        }
    }
    if !og.contains_key("og:description")
        && let Some(d) = description
    {
        og.insert("og:description".into(), json!(d));
    }
    og
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

/// `name="value"`, `name='value'`, `name=value` and bare `name` attributes, names lower-cased.
fn parse_attributes(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        if c.is_whitespace() || c == '/' {
            chars.next();
            continue;
        }
        let mut end = i;
        while let Some(&(j, c)) = chars.peek() {
            if c.is_whitespace() || c == '=' || c == '/' {
                break;
            }
            end = j + c.len_utf8();
            chars.next();
        }
        let name = s[i..end].to_ascii_lowercase();
        if name.is_empty() {
            chars.next();
            continue;
        }
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek().is_some_and(|(_, c)| *c == '=') {
            chars.next();
            while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
                chars.next();
            }
            match chars.peek().map(|&(_, c)| c) {
                Some(q @ ('"' | '\'')) => {
                    chars.next();
                    for (_, c) in chars.by_ref() {
                        if c == q {
                            break;
                        }
                        value.push(c);
                    }
                }
                _ => {
                    while let Some(&(_, c)) = chars.peek() {
                        if c.is_whitespace() {
                            break;
                        }
                        value.push(c);
                        chars.next();
                    }
                }
            }
        }
        out.push((name, value));
    }
    out
}

/// Decodes the character references pages use in titles and descriptions.
fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(semi) = rest[..rest.len().min(12)].find(';') else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..semi];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            e if e.starts_with("#x") || e.starts_with("#X") => {
                u32::from_str_radix(&e[2..], 16).ok().and_then(char::from_u32)
            }
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_graph_and_fallbacks() {
        let html = r#"<html><head><title>Ignored &amp; title</title>
            <META property="og:title" content="Mairie &eacute; &#233; &amp; services">
            <meta content='Horaires' property='og:description'/>
            <meta name=description content="fallback">
            <meta property="og:image" content="/logo.png">
            </head></html>"#;
        let og = parse_html(html);
        assert_eq!(og["og:title"], "Mairie &eacute; é & services");
        assert_eq!(og["og:description"], "Horaires");
        assert_eq!(og["og:image"], "/logo.png");

        let og =
            parse_html("<title>\n Conseil municipal </title><meta name=\"description\" content=\"Ordre du jour\">");
        assert_eq!(og["og:title"], "Conseil municipal");
        assert_eq!(og["og:description"], "Ordre du jour");
        assert!(parse_html("<meta").is_empty());
    }
}
