//! Media over federation (server-server API, "Content Repository"): the `multipart/mixed`
//! answers of `/_matrix/federation/v1/media/download|thumbnail/{mediaId}` (a JSON metadata
//! part, then the content or a `Location` header), built for our answers and parsed for other
//! servers', and [`download`], which fetches `mxc://{server}/{mediaId}` from its server
//! (following a `Location` through the SSRF guard, falling back to the legacy
//! `/_matrix/media/v3/download` for servers that predate federation media).

use std::time::Duration;

use axum::http::header;
use bytes::Bytes;
use ruma::ServerName;
use serde_json::Value;

use super::Federation;
use super::client::{FedError, RawResponse};

/// Room for the multipart framing and metadata around the content.
const FRAMING_ALLOWANCE: usize = 64 * 1024;

/// The `multipart/mixed` framing of an answer: `(content type, head, tail)`; the content goes
/// between head and tail. `part_headers` are the headers of the second part (`Content-Type`,
/// `Content-Disposition`, or `Location`).
pub fn multipart_frame(part_headers: &[(&str, &str)]) -> (String, Bytes, Bytes) {
    let boundary = crate::media::random_id(32);
    let mut head = format!("--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{boundary}\r\n");
    for (name, value) in part_headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let tail = format!("\r\n--{boundary}--\r\n");
    (format!("multipart/mixed; boundary={boundary}"), head.into(), tail.into())
}

/// The content part of a federation media answer.
#[derive(Debug, PartialEq, Eq)]
pub struct MediaPart {
    pub content_type: Option<String>,
    pub content_disposition: Option<String>,
    /// Where to fetch the content instead (then `body` is empty).
    pub location: Option<String>,
    pub body: Bytes,
}

/// The `boundary` parameter of a `multipart/mixed` content type.
fn boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    if !params.next()?.trim().eq_ignore_ascii_case("multipart/mixed") {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        // RFC 2046: 1 to 70 characters.
        (!v.is_empty() && v.len() <= 70).then(|| v.to_owned())
    })
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() {
        return None;
    }
    hay[from..].windows(needle.len()).position(|w| w == needle).map(|p| p + from)
}

/// A part's headers, names in lower case.
type PartHeaders = Vec<(String, String)>;

/// One part (starting right after its delimiter line): its headers, its body and where the
/// next delimiter line ends.
fn part(body: &Bytes, start: usize, delimiter: &[u8]) -> Result<(PartHeaders, Bytes, usize), String> {
    let headers_end = if body[start..].starts_with(b"\r\n") {
        start // no headers at all
    } else {
        find(body, b"\r\n\r\n", start).ok_or("unterminated part headers")? + 2
    };
    let mut headers = Vec::new();
    let text = std::str::from_utf8(&body[start..headers_end]).map_err(|_| "part headers are not UTF-8")?;
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once(':').ok_or("malformed part header")?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let content_start = headers_end + 2;
    let mut close = Vec::with_capacity(delimiter.len() + 2);
    close.extend_from_slice(b"\r\n");
    close.extend_from_slice(delimiter);
    let end = find(body, &close, content_start).ok_or("unterminated part")?;
    Ok((headers, body.slice(content_start..end), end + close.len()))
}

/// Parses a federation media answer: the metadata (JSON object) and the content part.
pub fn parse_multipart(content_type: &str, body: &Bytes) -> Result<(Value, MediaPart), String> {
    let boundary = boundary(content_type).ok_or("not multipart/mixed with a boundary")?;
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    // The first delimiter: at the start, or after a preamble ending with CRLF.
    let first = if body.starts_with(delimiter) {
        0
    } else {
        let mut d = b"\r\n".to_vec();
        d.extend_from_slice(delimiter);
        find(body, &d, 0).ok_or("no multipart delimiter")? + 2
    };
    let after_line = |pos: usize| -> Result<usize, String> {
        let eol = find(body, b"\r\n", pos).ok_or("unterminated delimiter line")?;
        // Transport padding (spaces, tabs) may follow a delimiter.
        if body[pos..eol].iter().any(|b| *b != b' ' && *b != b'\t') {
            return Err("garbage after a delimiter".into());
        }
        Ok(eol + 2)
    };
    let start = after_line(first + delimiter.len())?;
    let (meta_headers, meta, next) = part(body, start, delimiter)?;
    if meta_headers.iter().any(|(k, v)| k == "content-type" && !v.to_ascii_lowercase().starts_with("application/json"))
    {
        return Err("the first part is not JSON".into());
    }
    let meta: Value = serde_json::from_slice(&meta).map_err(|e| format!("metadata part: {e}"))?;
    if !meta.is_object() {
        return Err("metadata part is not a JSON object".into());
    }
    if body[next..].starts_with(b"--") {
        return Err("no content part".into());
    }
    let start = after_line(next)?;
    let (headers, content, _) = part(body, start, delimiter)?;
    let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    Ok((
        meta,
        MediaPart {
            content_type: get("content-type"),
            content_disposition: get("content-disposition"),
            location: get("location"),
            body: content,
        },
    ))
}

/// The file name of a `Content-Disposition` (`filename*=utf-8''…` preferred to `filename="…"`).
pub fn disposition_file_name(value: &str) -> Option<String> {
    let mut plain = None;
    for param in value.split(';').skip(1) {
        let Some((k, v)) = param.split_once('=') else { continue };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "filename*" {
            let (charset, rest) = v.split_once('\'')?;
            let (_, encoded) = rest.split_once('\'')?;
            if !charset.eq_ignore_ascii_case("utf-8") {
                continue;
            }
            let bytes = percent_decode(encoded)?;
            return String::from_utf8(bytes).ok();
        }
        if k == "filename" {
            plain = Some(v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v).to_owned());
        }
    }
    plain
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Media fetched from another server.
#[derive(Debug)]
pub struct Fetched {
    pub content_type: Option<String>,
    pub file_name: Option<String>,
    pub data: Bytes,
}

/// Whether an error answer is "this endpoint does not exist" (a server predating federation
/// media): 404 or 405 `M_UNRECOGNIZED`, or a 404 without a Matrix error body.
fn unrecognized(e: &FedError) -> bool {
    match e {
        FedError::Status { status: 404 | 405, body } => body.get("errcode").is_none_or(|c| c == "M_UNRECOGNIZED"),
        _ => false,
    }
}

/// Downloads `mxc://{server}/{media_id}` from `server`: at most `max_bytes` of content, the
/// remote waiting up to `timeout_ms` for content not uploaded yet. Errors as [`FedError`]:
/// a remote 404 is `Status { status: 404, .. }`.
pub async fn download(
    fed: &Federation,
    server: &ServerName,
    media_id: &str,
    timeout_ms: u64,
    max_bytes: usize,
) -> Result<Fetched, FedError> {
    let timeout = Some(Duration::from_millis(timeout_ms) + fed.client.request_timeout);
    let path = format!("/_matrix/federation/v1/media/download/{media_id}?timeout_ms={timeout_ms}");
    let limit = max_bytes.saturating_add(FRAMING_ALLOWANCE);
    let raw = match fed.request_bytes(server, &path, true, limit, timeout).await {
        Ok(raw) => raw,
        Err(e) if unrecognized(&e) => {
            // A server without federation media: the deprecated client endpoint, raw bytes.
            let server_enc = url::form_urlencoded::byte_serialize(server.as_str().as_bytes()).collect::<String>();
            let path = format!(
                "/_matrix/media/v3/download/{server_enc}/{media_id}?allow_remote=false&timeout_ms={timeout_ms}"
            );
            let raw = fed.request_bytes(server, &path, false, max_bytes, timeout).await?;
            return Ok(plain(raw));
        }
        Err(e) => return Err(e),
    };
    let ct = raw.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let (_, part) = parse_multipart(ct, &raw.body).map_err(FedError::Invalid)?;
    let name = part.content_disposition.as_deref().and_then(disposition_file_name);
    if let Some(location) = &part.location {
        let raw = fed.fetch_redirect(location, max_bytes, timeout).await?;
        let mut f = plain(raw);
        f.file_name = f.file_name.or(name);
        return Ok(f);
    }
    if part.body.len() > max_bytes {
        return Err(FedError::TooLarge(max_bytes));
    }
    Ok(Fetched { content_type: part.content_type, file_name: name, data: part.body })
}

/// A plain (non-multipart) answer carrying the content.
fn plain(raw: RawResponse) -> Fetched {
    let h = |n: header::HeaderName| raw.headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    Fetched {
        content_type: h(header::CONTENT_TYPE),
        file_name: h(header::CONTENT_DISPOSITION).as_deref().and_then(disposition_file_name),
        data: raw.body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn framed(headers: &[(&str, &str)], content: &[u8]) -> (String, Bytes) {
        let (ct, head, tail) = multipart_frame(headers);
        (ct, [head.as_ref(), content, tail.as_ref()].concat().into())
    }

    #[test]
    fn our_frames_parse_back() {
        let data = b"\r\n--not-the-boundary\r\nbinary\x00\xff".to_vec();
        let (ct, body) = framed(&[("Content-Type", "image/png"), ("Content-Disposition", "inline")], &data);
        let (meta, part) = parse_multipart(&ct, &body).unwrap();
        assert_eq!(meta, json!({}));
        assert_eq!(part.content_type.as_deref(), Some("image/png"));
        assert_eq!(part.content_disposition.as_deref(), Some("inline"));
        assert_eq!(part.body.as_ref(), data.as_slice());
        assert_eq!(part.location, None);
        let (ct, body) = framed(&[("Location", "https://cdn.example.org/a")], b"");
        let (_, part) = parse_multipart(&ct, &body).unwrap();
        assert_eq!(part.location.as_deref(), Some("https://cdn.example.org/a"));
        assert!(part.body.is_empty());
    }

    #[test]
    fn the_spec_example_parses() {
        let body = Bytes::from_static(
            b"--gc0p4Jq0M2Yt08jU534c0p\r\nContent-Type: application/json\r\n\r\n{}\r\n--gc0p4Jq0M2Yt08jU534c0p\r\nContent-Type: text/plain\r\n\r\nThis media is plain text. Maybe somebody used it as a paste bin.\r\n--gc0p4Jq0M2Yt08jU534c0p--",
        );
        let (_, part) = parse_multipart("multipart/mixed; boundary=\"gc0p4Jq0M2Yt08jU534c0p\"", &body).unwrap();
        assert_eq!(part.content_type.as_deref(), Some("text/plain"));
        assert_eq!(part.body.as_ref(), b"This media is plain text. Maybe somebody used it as a paste bin.");
    }

    #[test]
    fn malformed_answers_are_errors() {
        let ct = "multipart/mixed; boundary=b";
        for bad in [
            &b""[..],
            b"--b\r\n\r\n{}",
            b"--b\r\nContent-Type: application/json\r\n\r\n[]\r\n--b\r\n\r\nx\r\n--b--",
            b"--b\r\nContent-Type: text/plain\r\n\r\n{}\r\n--b\r\n\r\nx\r\n--b--",
            b"--b\r\n\r\n{}\r\n--b--\r\n",
            b"--b\r\n\r\n{}\r\n--b\r\nNoColon\r\n\r\nx\r\n--b--",
            b"--bx\r\n\r\n{}\r\n--b\r\n\r\nx\r\n--b--",
        ] {
            assert!(parse_multipart(ct, &Bytes::copy_from_slice(bad)).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let ok = Bytes::from_static(b"--b\r\n\r\n{}\r\n--b\r\n\r\nx\r\n--b--");
        assert!(parse_multipart(ct, &ok).is_ok());
        assert!(parse_multipart("application/json", &ok).is_err());
        assert!(parse_multipart(&format!("multipart/mixed; boundary={}", "a".repeat(71)), &ok).is_err());
    }

    #[test]
    fn file_names_of_dispositions() {
        assert_eq!(disposition_file_name("inline; filename=\"a b.png\"").as_deref(), Some("a b.png"));
        assert_eq!(
            disposition_file_name("attachment; filename=\"x\"; filename*=utf-8''r%C3%A9sum%C3%A9.pdf").as_deref(),
            Some("résumé.pdf")
        );
        assert_eq!(disposition_file_name("attachment"), None);
        assert_eq!(disposition_file_name("attachment; filename*=utf-8''%ZZ"), None);
    }
}
