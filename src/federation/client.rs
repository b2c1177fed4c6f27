//! The outgoing federation client: reqwest over rustls (system roots plus `federation.ca_file`,
//! `federation.verify_certificates`), HTTPS only, no redirects, bounded responses and time,
//! every destination checked against `federation.allowed_servers` and resolved through
//! `discovery`, every request `X-Matrix`-signed unless asked otherwise (key queries).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use bytes::Bytes;
use ruma::ServerName;
use serde_json::Value;

use super::Federation;
use super::discovery::Discovery;
use crate::config::FederationConfig;
use crate::http::ssrf::{GuardedResolver, IpPolicy, Refused};

/// Redirects followed when fetching a media `Location`.
const MAX_MEDIA_REDIRECTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum FedError {
    #[error("federation is disabled")]
    Disabled,
    #[error("{0} is not in federation.allowed_servers")]
    NotAllowed(String),
    #[error("request failed: {0}")]
    Transport(String),
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    #[error("remote server answered {status}: {body}")]
    Status { status: u16, body: Value },
    #[error("invalid response: {0}")]
    Invalid(String),
    #[error("refused by the SSRF guard: {0}")]
    Refused(String),
}

pub struct FederationClient {
    http: reqwest::Client,
    /// For `/.well-known/matrix/server`: follows a few redirects, as the spec allows.
    well_known: reqwest::Client,
    pub discovery: Discovery,
    max_response_bytes: usize,
    /// For `Location` targets of media downloads: plain HTTPS, SSRF-guarded.
    redirect_http: reqwest::Client,
    redirect_policy: Arc<IpPolicy>,
    /// `federation.request_timeout_secs`.
    pub request_timeout: Duration,
}

impl FederationClient {
    pub fn new(cfg: &FederationConfig) -> anyhow::Result<Self> {
        let discovery = Discovery::default();
        let certs = match &cfg.ca_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("federation.ca_file: cannot read {}", path.display()))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .with_context(|| format!("federation.ca_file: invalid PEM bundle {}", path.display()))?;
                if certs.is_empty() {
                    anyhow::bail!("federation.ca_file: no certificate in {}", path.display());
                }
                certs
            }
            None => Vec::new(),
        };
        let build = |redirect: reqwest::redirect::Policy, resolver: Option<super::discovery::OverrideResolver>| {
            let mut b = reqwest::Client::builder()
                .user_agent(concat!("Parvis/", env!("CARGO_PKG_VERSION")))
                .https_only(true)
                .redirect(redirect)
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(cfg.request_timeout_secs))
                .tls_certs_merge(certs.clone())
                .tls_danger_accept_invalid_certs(!cfg.verify_certificates);
            if let Some(r) = resolver {
                b = b.dns_resolver(r);
            }
            b.build().context("building the federation HTTP client")
        };
        let redirect_policy = Arc::new(
            IpPolicy::from_lists(&cfg.media_redirect_ip_blacklist, &cfg.media_redirect_ip_whitelist)
                .map_err(|e| anyhow::anyhow!("federation.media_redirect_ip_*: {e}"))?,
        );
        let follow = redirect_policy.clone();
        let redirect_http = reqwest::Client::builder()
            .user_agent(concat!("Parvis/", env!("CARGO_PKG_VERSION")))
            .https_only(true)
            .no_proxy()
            .dns_resolver(GuardedResolver(redirect_policy.clone()))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_MEDIA_REDIRECTS {
                    return attempt.error("too many redirects");
                }
                let url = attempt.url();
                if url.scheme() == "https" && follow.allows_url(url) == Some(true) {
                    attempt.follow()
                } else {
                    let host = url.host_str().unwrap_or("").to_owned();
                    attempt.error(Refused(format!("redirect target {host}")))
                }
            }))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(cfg.request_timeout_secs))
            .tls_certs_merge(certs.clone())
            .tls_danger_accept_invalid_certs(!cfg.verify_certificates)
            .build()
            .context("building the media redirect HTTP client")?;
        Ok(Self {
            http: build(reqwest::redirect::Policy::none(), Some(discovery.resolver()))?,
            well_known: build(reqwest::redirect::Policy::limited(5), None)?,
            discovery,
            max_response_bytes: cfg.max_response_bytes,
            redirect_http,
            redirect_policy,
            request_timeout: Duration::from_secs(cfg.request_timeout_secs),
        })
    }
}

/// Reads a response body, failing past `max` bytes.
pub async fn read_capped(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, FedError> {
    if resp.content_length().is_some_and(|l| l > max as u64) {
        return Err(FedError::TooLarge(max));
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| FedError::Transport(e.to_string()))? {
        if buf.len() + chunk.len() > max {
            return Err(FedError::TooLarge(max));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// A successful answer read whole (bounded): its headers and body.
#[derive(Debug)]
pub struct RawResponse {
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Federation {
    /// Sends a request to `destination`; a non-2xx answer is [`FedError::Status`].
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        method: Method,
        destination: &ServerName,
        path_and_query: &str,
        body: Option<&Value>,
        signed: bool,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, FedError> {
        if !self.enabled {
            return Err(FedError::Disabled);
        }
        if !self.is_allowed(destination) {
            return Err(FedError::NotAllowed(destination.to_string()));
        }
        let c = &self.client;
        let dest = c.discovery.resolve(&c.well_known, destination).await;
        let url = format!("https://{}{path_and_query}", dest.authority);
        let mut req = c.http.request(method.clone(), &url);
        if let Some(host) = &dest.host_header {
            req = req.header(header::HOST, host);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        if signed {
            let auth = super::auth::sign_request(&self.signer, &method, path_and_query, destination, body)
                .map_err(FedError::Invalid)?;
            let auth = HeaderValue::from_str(&auth).map_err(|e| FedError::Invalid(e.to_string()))?;
            req = req.header(header::AUTHORIZATION, auth);
        }
        let resp = req.send().await.map_err(|e| FedError::Transport(describe(&e)))?;
        check_status(resp).await
    }

    /// Sends a request to `destination` and returns its JSON answer. `path_and_query` is sent
    /// verbatim (already percent-encoded); `signed` adds the `X-Matrix` authorization;
    /// `max_bytes` caps the response (at most `federation.max_response_bytes`).
    pub async fn request(
        &self,
        method: Method,
        destination: &ServerName,
        path_and_query: &str,
        body: Option<&Value>,
        signed: bool,
        max_bytes: usize,
    ) -> Result<Value, FedError> {
        let resp = self.send(method, destination, path_and_query, body, signed, None).await?;
        let bytes = read_capped(resp, max_bytes.min(self.client.max_response_bytes)).await?;
        serde_json::from_slice(&bytes).map_err(|e| FedError::Invalid(format!("not JSON: {e}")))
    }

    /// Like [`Self::request`], for a body that is not JSON (media): the headers and raw bytes of
    /// the answer, at most `max_bytes` (not capped by `federation.max_response_bytes`, which is
    /// for JSON; the caller bounds media by `media.max_upload_bytes`). `timeout` replaces
    /// `federation.request_timeout_secs` for this request.
    pub async fn request_bytes(
        &self,
        destination: &ServerName,
        path_and_query: &str,
        signed: bool,
        max_bytes: usize,
        timeout: Option<Duration>,
    ) -> Result<RawResponse, FedError> {
        let resp = self.send(Method::GET, destination, path_and_query, None, signed, timeout).await?;
        let headers = resp.headers().clone();
        let body = read_capped(resp, max_bytes).await?;
        Ok(RawResponse { headers, body: body.into() })
    }

    /// Fetches a plain HTTPS URL another server redirected us to (a `Location` part of a media
    /// download): unsigned, through the SSRF guard of `federation.media_redirect_ip_*` (IP
    /// literals checked here, host names by the resolver, every further redirect the same way).
    pub async fn fetch_redirect(
        &self,
        location: &str,
        max_bytes: usize,
        timeout: Option<Duration>,
    ) -> Result<RawResponse, FedError> {
        if !self.enabled {
            return Err(FedError::Disabled);
        }
        let c = &self.client;
        let url = url::Url::parse(location).map_err(|e| FedError::Invalid(format!("bad Location: {e}")))?;
        if url.scheme() != "https" {
            return Err(FedError::Invalid("Location is not an https URL".into()));
        }
        if c.redirect_policy.allows_url(&url) != Some(true) {
            return Err(FedError::Refused(url.host_str().unwrap_or("").to_owned()));
        }
        let mut req = c.redirect_http.get(url);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req.send().await.map_err(|e| {
            if crate::http::ssrf::is_refused(&e) {
                FedError::Refused(describe(&e))
            } else {
                FedError::Transport(describe(&e))
            }
        })?;
        let resp = check_status(resp).await?;
        let headers = resp.headers().clone();
        let body = read_capped(resp, max_bytes).await?;
        Ok(RawResponse { headers, body: body.into() })
    }
}

/// A non-2xx answer as [`FedError::Status`] (its JSON body, if any, read up to 64 KiB).
async fn check_status(resp: reqwest::Response) -> Result<reqwest::Response, FedError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = read_capped(resp, 64 * 1024).await.unwrap_or_default();
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Err(FedError::Status { status: status.as_u16(), body })
}

/// A reqwest error with its causes (the TLS reason is in the chain).
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
