//! Alert webhooks.

use crate::config::WebhooksConfig;
use crate::http::ratelimit::Limiter;

pub struct Webhooks {
    pub limiter: Limiter,
}

impl Webhooks {
    pub fn new(cfg: &WebhooksConfig) -> Self {
        Self { limiter: Limiter::new(cfg.per_hook) }
    }
}
