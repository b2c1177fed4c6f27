//! The HTTP client the OpenID Connect library speaks through: our reqwest (rustls, aws-lc-rs),
//! no redirects (the OIDC library requires it: a redirect would carry credentials elsewhere),
//! a timeout, and a bound on every response body.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;
use openidconnect::{AsyncHttpClient, HttpRequest, HttpResponse};

/// Largest body read from a provider (discovery documents, key sets, tokens, userinfo).
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct Http(reqwest::Client);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Request(#[from] reqwest::Error),
    #[error("the response is larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("{0}")]
    Build(#[from] http::Error),
}

impl Http {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self(
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(15))
                .connect_timeout(Duration::from_secs(5))
                .user_agent(concat!("Parvis/", env!("CARGO_PKG_VERSION")))
                .build()?,
        ))
    }

    /// Sends a request and reads at most [`MAX_BODY`] bytes of the answer.
    pub async fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, body) = request.into_parts();
        let resp = self.0.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body).send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
            return Err(HttpError::TooLarge);
        }
        let mut bytes = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(HttpError::TooLarge);
            }
            bytes.extend_from_slice(&chunk);
        }
        let mut out = http::Response::builder().status(status).body(bytes)?;
        *out.headers_mut() = headers;
        Ok(out)
    }
}

impl<'c> AsyncHttpClient<'c> for Http {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}
