//! The outgoing federation client: reqwest over rustls (system roots plus `federation.ca_file`,
//! `federation.verify_certificates`), HTTPS only, no redirects, bounded responses and time,
//! every destination checked against `federation.allowed_servers` and resolved through
//! `discovery`, every request `X-Matrix`-signed unless asked otherwise (key queries).

use std::time::Duration;

use anyhow::Context;
use axum::http::{HeaderValue, Method, header};
use ruma::ServerName;
use serde_json::Value;

use super::Federation;
use super::discovery::Discovery;
use crate::config::FederationConfig;

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
}

pub struct FederationClient {
    http: reqwest::Client,
    /// For `/.well-known/matrix/server`: follows a few redirects, as the spec allows.
    well_known: reqwest::Client,
    pub discovery: Discovery,
    max_response_bytes: usize,
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
        Ok(Self {
            http: build(reqwest::redirect::Policy::none(), Some(discovery.resolver()))?,
            well_known: build(reqwest::redirect::Policy::limited(5), None)?,
            discovery,
            max_response_bytes: cfg.max_response_bytes,
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

impl Federation {
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
        if signed {
            let auth = super::auth::sign_request(&self.signer, &method, path_and_query, destination, body)
                .map_err(FedError::Invalid)?;
            let auth = HeaderValue::from_str(&auth).map_err(|e| FedError::Invalid(e.to_string()))?;
            req = req.header(header::AUTHORIZATION, auth);
        }
        let resp = req.send().await.map_err(|e| FedError::Transport(describe(&e)))?;
        let status = resp.status();
        let max = max_bytes.min(c.max_response_bytes);
        if !status.is_success() {
            let body = read_capped(resp, 64 * 1024).await.unwrap_or_default();
            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
            return Err(FedError::Status { status: status.as_u16(), body });
        }
        let bytes = read_capped(resp, max).await?;
        serde_json::from_slice(&bytes).map_err(|e| FedError::Invalid(format!("not JSON: {e}")))
    }
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
