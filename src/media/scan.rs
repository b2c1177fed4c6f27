//! The antivirus hook: content is scanned before it is first served and the verdict recorded
//! (`media.scan_verdict`); infected content is never served. Off unless `media.scanner_command`
//! or `media.scanner_url` is set.
//!
//! - Command: the program gets the file's path as its last argument; exit status 0 means clean,
//!   1 infected, anything else (or a time-out) is an error (the `clamscan`/`clamdscan` convention).
//!   With the S3 backend the content is first copied to a temporary file.
//! - HTTP: the content is POSTed (with its `Content-Type`) and the answer must be a 2xx with JSON
//!   `{"clean": true}` or `{"clean": false}`.
//!
//! A failed scan blocks the download (502) and is retried on the next one.

use std::time::Duration;

use axum::http::StatusCode;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::config::MediaConfig;
use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage;
use crate::storage::media::MediaRow;

pub enum Scanner {
    Command(Vec<String>, Duration),
    Http(reqwest::Client, String),
}

impl Scanner {
    pub fn new(config: &MediaConfig) -> anyhow::Result<Option<Self>> {
        let timeout = Duration::from_secs(config.scanner_timeout_secs.max(1));
        if !config.scanner_command.is_empty() {
            return Ok(Some(Self::Command(config.scanner_command.clone(), timeout)));
        }
        if let Some(url) = &config.scanner_url {
            // The scanner is the operator's own service: no SSRF guard, but no redirects either.
            let client = reqwest::Client::builder()
                .timeout(timeout)
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .build()?;
            return Ok(Some(Self::Http(client, url.clone())));
        }
        Ok(None)
    }
}

const CLEAN: &str = "clean";
const INFECTED: &str = "infected";

/// Passes content that may be served; scans it first if it has no verdict yet.
pub async fn check(state: &AppState, row: &MediaRow) -> ApiResult<()> {
    let Some(scanner) = &state.media.scanner else { return Ok(()) };
    let verdict = match row.scan_verdict.as_deref() {
        Some(v) => v.to_owned(),
        None => {
            let clean = scan(state, scanner, row).await.map_err(|e| {
                tracing::warn!(media_id = %row.media_id, error = format!("{e:#}"), "antivirus scan failed");
                Error::new(StatusCode::BAD_GATEWAY, "M_UNKNOWN", "The content could not be scanned for viruses")
            })?;
            let v = if clean { CLEAN } else { INFECTED };
            if !clean {
                tracing::warn!(server_name = %row.server_name, media_id = %row.media_id, "antivirus: infected media blocked");
            }
            storage::media::set_scan_verdict(&state.db, &row.server_name, &row.media_id, v).await?;
            v.to_owned()
        }
    };
    if verdict == CLEAN { Ok(()) } else { Err(Error::not_found("This media was blocked by the antivirus scanner")) }
}

async fn scan(state: &AppState, scanner: &Scanner, row: &MediaRow) -> anyhow::Result<bool> {
    let key = row.storage_key.as_deref().ok_or_else(|| anyhow::anyhow!("no content"))?;
    match scanner {
        Scanner::Command(argv, timeout) => {
            // A local file: the store's own, or a temporary copy.
            let mut _copy = None;
            let path = match state.media.store.local_path(key) {
                Some(p) => p,
                None => {
                    let tmp = super::TempFile(
                        state.config.media.path.join("tmp").join(format!("scan-{}", super::random_id(24))),
                    );
                    tokio::fs::create_dir_all(tmp.path().parent().unwrap_or(tmp.path())).await?;
                    let mut f = tokio::fs::File::create(tmp.path()).await?;
                    let mut stream =
                        state.media.store.get(key, None).await?.ok_or_else(|| anyhow::anyhow!("content missing"))?;
                    while let Some(chunk) = stream.next().await {
                        f.write_all(&chunk?).await?;
                    }
                    f.flush().await?;
                    let p = tmp.path().to_owned();
                    _copy = Some(tmp);
                    p
                }
            };
            let mut cmd = tokio::process::Command::new(&argv[0]);
            cmd.args(&argv[1..]).arg(&path).stdin(std::process::Stdio::null()).kill_on_drop(true);
            let out = tokio::time::timeout(*timeout, cmd.output())
                .await
                .map_err(|_| anyhow::anyhow!("scanner timed out"))??;
            match out.status.code() {
                Some(0) => Ok(true),
                Some(1) => Ok(false),
                other => anyhow::bail!(
                    "scanner exited with {other:?}: {}",
                    String::from_utf8_lossy(&out.stderr).chars().take(500).collect::<String>()
                ),
            }
        }
        Scanner::Http(client, url) => {
            let stream = state.media.store.get(key, None).await?.ok_or_else(|| anyhow::anyhow!("content missing"))?;
            let resp = client
                .post(url)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    row.content_type.as_deref().unwrap_or("application/octet-stream"),
                )
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await?
                .error_for_status()?;
            let v: serde_json::Value = resp.json().await?;
            v.get("clean")
                .and_then(serde_json::Value::as_bool)
                .ok_or_else(|| anyhow::anyhow!("scanner answer without `clean`"))
        }
    }
}
