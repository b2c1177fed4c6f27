//! Token-bucket rate limiting, per key (a client IP, a user ID, an account name).
//!
//! Buckets live in a bounded in-process cache; idle buckets expire. Limits are per instance: with
//! several Parvis instances behind a load balancer, each enforces its own share.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::{RateLimit, RateLimitsConfig};
use crate::error::{ApiResult, Error};

struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct Limiter {
    limit: RateLimit,
    buckets: moka::sync::Cache<String, Arc<Mutex<Bucket>>>,
}

impl Limiter {
    pub fn new(limit: RateLimit) -> Self {
        // A bucket idle for long enough to have refilled completely is equivalent to no bucket.
        let refill = Duration::from_secs_f64((limit.burst as f64 / limit.per_second).clamp(1.0, 86_400.0));
        Self { limit, buckets: moka::sync::Cache::builder().max_capacity(200_000).time_to_idle(refill).build() }
    }

    /// Takes one token for `key`, or says how many milliseconds until one is available.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        let bucket = self.buckets.get_with_by_ref(key, || {
            Arc::new(Mutex::new(Bucket { tokens: self.limit.burst as f64, updated: Instant::now() }))
        });
        let mut b = bucket.lock();
        let now = Instant::now();
        let elapsed = now.duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.limit.per_second).min(self.limit.burst as f64);
        b.updated = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - b.tokens) / self.limit.per_second;
            Err((wait * 1000.0).ceil() as u64)
        }
    }
}

/// The configured limiters. `check` turns a refusal into `429 M_LIMIT_EXCEEDED`.
pub struct RateLimiters {
    enabled: bool,
    exempt_admins: bool,
    pub login_per_ip: Limiter,
    pub login_per_account: Limiter,
    pub registration_per_ip: Limiter,
    pub messages_per_user: Limiter,
    pub messages_per_ip: Limiter,
}

impl RateLimiters {
    pub fn new(cfg: &RateLimitsConfig) -> Self {
        Self {
            enabled: cfg.enabled,
            exempt_admins: cfg.exempt_admins,
            login_per_ip: Limiter::new(cfg.login_per_ip),
            login_per_account: Limiter::new(cfg.login_per_account),
            registration_per_ip: Limiter::new(cfg.registration_per_ip),
            messages_per_user: Limiter::new(cfg.messages_per_user),
            messages_per_ip: Limiter::new(cfg.messages_per_ip),
        }
    }

    pub fn check(&self, limiter: &Limiter, key: &str) -> ApiResult<()> {
        if !self.enabled {
            return Ok(());
        }
        limiter.check(key).map_err(Error::limit_exceeded)
    }

    /// As `check`, but server administrators pass when so configured.
    pub fn check_user(&self, limiter: &Limiter, key: &str, is_admin: bool) -> ApiResult<()> {
        if is_admin && self.exempt_admins {
            return Ok(());
        }
        self.check(limiter, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let l = Limiter::new(RateLimit { per_second: 10.0, burst: 2 });
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        let wait = l.check("a").unwrap_err();
        assert!(wait > 0 && wait <= 100, "{wait}");
        assert!(l.check("b").is_ok(), "keys are independent");
        std::thread::sleep(Duration::from_millis(120));
        assert!(l.check("a").is_ok());
    }
}
