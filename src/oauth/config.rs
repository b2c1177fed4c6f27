//! `[oauth]`: the built-in OAuth 2.0 authorization server.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthConfig {
    /// Serve the OAuth 2.0 API (needs `public_baseurl`, the issuer). Clients that know it
    /// (Element X, recent Element Web) then log in through it; the legacy login stays.
    pub enabled: bool,
    /// Offer a password form on the login page, for accounts that have a password.
    pub password_login: bool,
    /// Lifetime of an authorization code (single use).
    pub code_lifetime_secs: u64,
    /// How long a user may take between the authorization request and the consent.
    pub grant_lifetime_secs: u64,
    /// A refresh token unused this long expires (each refresh starts a new period).
    pub refresh_token_lifetime_secs: u64,
    /// Lifetime of a login to the account management pages.
    pub account_session_lifetime_secs: u64,
    /// How long a cross-signing reset approved on the account page stays allowed.
    pub cross_signing_reset_secs: u64,
}

impl Default for OAuthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            password_login: true,
            code_lifetime_secs: 120,
            grant_lifetime_secs: 1800,
            refresh_token_lifetime_secs: 90 * 86_400,
            account_session_lifetime_secs: 3600,
            cross_signing_reset_secs: 600,
        }
    }
}

impl OAuthConfig {
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        for (key, v, min, max) in [
            ("oauth.code_lifetime_secs", self.code_lifetime_secs, 10, 600),
            ("oauth.grant_lifetime_secs", self.grant_lifetime_secs, 60, 86_400),
            ("oauth.refresh_token_lifetime_secs", self.refresh_token_lifetime_secs, 60, 10 * 365 * 86_400),
            ("oauth.account_session_lifetime_secs", self.account_session_lifetime_secs, 60, 86_400),
            ("oauth.cross_signing_reset_secs", self.cross_signing_reset_secs, 30, 3600),
        ] {
            if !(min..=max).contains(&v) {
                return Err((key, format!("must be between {min} and {max}")));
            }
        }
        Ok(())
    }
}
