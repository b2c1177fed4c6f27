//! Calls and meetings (issue 18): what Jitsi and Element Call need from the homeserver.
//!
//! - `openid`: OpenID tokens (`/user/{userId}/openid/request_token`) and their verification
//!   (`/_matrix/federation/v1/openid/userinfo`), which Jitsi's matrix-user-verification service uses
//!   to learn who joins a meeting.
//! - `jitsi`: meeting rooms, rooms created with the Jitsi widget Element shows.
//! - `delayed`: delayed events (MSC4140), Element Call's "leave the call if my client dies".

pub mod delayed;
pub mod jitsi;
pub mod openid;

use crate::config::Config;
use crate::http::ratelimit::Limiter;

/// Per-process state of this chapter: rate limiters and the delayed-event sender's wake-up.
pub struct Rtc {
    pub openid_per_user: Limiter,
    pub schedule_per_user: Limiter,
    pub manage_per_ip: Limiter,
    /// Woken when a delayed event is scheduled or restarted, so the sender re-reads the next due time.
    pub wake: tokio::sync::Notify,
}

impl Rtc {
    pub fn new(config: &Config) -> Self {
        Self {
            openid_per_user: Limiter::new(config.openid.requests_per_user),
            schedule_per_user: Limiter::new(config.delayed_events.schedule_per_user),
            manage_per_ip: Limiter::new(config.delayed_events.manage_per_ip),
            wake: tokio::sync::Notify::new(),
        }
    }
}
