//! `[sso]` configuration: the OpenID Connect providers agents log in with.
//!
//! Key names follow Synapse's `oidc_providers` where Synapse has one, so that a town migrating
//! from Synapse recognises them (`idp_id` is `id` here, as the issue and Element's idp list say).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SsoConfig {
    /// The identity providers, in the order their buttons are shown.
    pub providers: Vec<SsoProviderConfig>,
    /// `redirectUrl` prefixes that go straight back to the client after login; any other URL
    /// gets a confirmation page first (so that a phishing link cannot silently harvest a login).
    pub client_whitelist: Vec<String>,
    /// Lifetime of the `loginToken` handed to the client (single use).
    pub login_token_lifetime_secs: u64,
    /// How long a user may take at the provider between the redirect and the callback.
    pub auth_session_lifetime_secs: u64,
}

impl Default for SsoConfig {
    fn default() -> Self {
        Self {
            providers: Vec::new(),
            client_whitelist: Vec::new(),
            login_token_lifetime_secs: 120,
            auth_session_lifetime_secs: 600,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    #[default]
    ClientSecretBasic,
    ClientSecretPost,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserProfileMethod {
    /// The id_token's claims, completed by the userinfo endpoint when a claim the mapping uses is
    /// missing from it.
    #[default]
    Auto,
    /// Always ask the userinfo endpoint (its claims win over the id_token's).
    UserinfoEndpoint,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchBy {
    /// The provider's `sub` (stable per provider): the default.
    #[default]
    Subject,
    /// The e-mail address (ProConnect: `sub` differs per service, the address does not). A user
    /// not yet linked to this provider is found by the e-mail recorded on their account.
    Email,
}

/// A claim that must hold a value (Synapse's `attribute_requirements`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributeRequirement {
    pub attribute: String,
    /// The claim must be this string (or, for a list claim, contain it).
    pub value: Option<String>,
    /// The claim must be one of these (or, for a list claim, contain one of them).
    pub one_of: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SsoProviderConfig {
    /// Identity provider ID: in `GET /login` and in `/login/sso/redirect/{id}`.
    pub id: String,
    /// The label of the login button.
    pub name: String,
    /// `identity_providers[].brand` (e.g. `org.matrix.gitlab`), optional.
    pub brand: Option<String>,
    /// `identity_providers[].icon`: an `mxc://` URI, optional.
    pub icon: Option<String>,
    /// The issuer, exactly as the provider writes it in its tokens (mind the trailing slash).
    /// Discovery is `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    /// A file holding the client secret (trailing white space is ignored).
    pub client_secret_file: Option<PathBuf>,
    pub client_auth_method: ClientAuthMethod,
    pub scopes: Vec<String>,
    /// PKCE with S256 (RFC 7636).
    pub pkce: bool,
    pub user_profile_method: UserProfileMethod,
    /// `acr_values` sent to the provider; the id_token's `acr` must then be one of them.
    pub acr_values: Option<String>,
    /// `prompt` sent to the provider (e.g. `login`).
    pub prompt: Option<String>,
    /// Further authorization request parameters.
    pub additional_authorization_parameters: BTreeMap<String, String>,
    /// Jinja templates over the claims (`user`): filters `lower`, `localpart_from_email`, ...
    pub localpart_template: String,
    pub display_name_template: Option<String>,
    /// The account's e-mail address; without it, the `email` claim.
    pub email_template: Option<String>,
    pub attribute_requirements: Vec<AttributeRequirement>,
    /// A new provider identity whose mapped localpart is an existing account logs into it
    /// (instead of getting a new account with a numeric suffix).
    pub allow_existing_users: bool,
    pub match_by: MatchBy,
    /// When set, only e-mail addresses of these domains may log in.
    pub allowed_email_domains: Vec<String>,
    /// Create accounts for provider identities not linked to any (just-in-time provisioning).
    /// Off: only pre-provisioned accounts (admin API `external_ids`) may log in.
    pub enable_registration: bool,
    /// Accept OIDC back-channel logout tokens at `/_synapse/client/oidc/backchannel_logout`.
    pub backchannel_logout_enabled: bool,
    /// Where the provider sends the browser after RP-initiated logout (default: `public_baseurl`).
    pub post_logout_redirect_uri: Option<String>,
    /// Where agents change their password at the provider: linked from the account page.
    pub password_change_url: Option<String>,
}

impl Default for SsoProviderConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            name: String::new(),
            brand: None,
            icon: None,
            issuer: String::new(),
            client_id: String::new(),
            client_secret: None,
            client_secret_file: None,
            client_auth_method: ClientAuthMethod::default(),
            scopes: vec!["openid".into(), "profile".into(), "email".into()],
            pkce: true,
            user_profile_method: UserProfileMethod::default(),
            acr_values: None,
            prompt: None,
            additional_authorization_parameters: BTreeMap::new(),
            localpart_template: "{{ user.preferred_username }}".into(),
            display_name_template: None,
            email_template: None,
            attribute_requirements: Vec::new(),
            allow_existing_users: false,
            match_by: MatchBy::default(),
            allowed_email_domains: Vec::new(),
            enable_registration: true,
            backchannel_logout_enabled: false,
            post_logout_redirect_uri: None,
            password_change_url: None,
        }
    }
}

impl SsoProviderConfig {
    /// The client secret, from the file when one is named.
    pub fn secret(&self) -> std::io::Result<Option<String>> {
        match &self.client_secret_file {
            Some(path) => Ok(Some(std::fs::read_to_string(path)?.trim_end().to_owned())),
            None => Ok(self.client_secret.clone()),
        }
    }
}

/// Characters Synapse allows in an `idp_id`.
fn valid_idp_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
}

impl SsoConfig {
    pub(crate) fn validate(&self, public_baseurl: Option<&str>) -> Result<(), (&'static str, String)> {
        const KEY: &str = "sso.providers";
        if !self.providers.is_empty() && public_baseurl.is_none() {
            return Err((
                "public_baseurl",
                "must be set when SSO providers are configured (it makes the callback URL)".into(),
            ));
        }
        if !(10..=3600).contains(&self.login_token_lifetime_secs) {
            return Err(("sso.login_token_lifetime_secs", "must be between 10 and 3600".into()));
        }
        if !(30..=86_400).contains(&self.auth_session_lifetime_secs) {
            return Err(("sso.auth_session_lifetime_secs", "must be between 30 and 86400".into()));
        }
        for prefix in &self.client_whitelist {
            if url::Url::parse(prefix).is_err() {
                return Err(("sso.client_whitelist", format!("`{prefix}` is not an absolute URL")));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.providers {
            let err = |m: String| (KEY, format!("provider `{}`: {m}", p.id));
            if !valid_idp_id(&p.id) {
                return Err(err("id must be 1 to 64 characters among A-Z a-z 0-9 . _ ~ -".into()));
            }
            if !seen.insert(p.id.as_str()) {
                return Err(err("id is used twice".into()));
            }
            if p.name.is_empty() {
                return Err(err("name must not be empty".into()));
            }
            let issuer = url::Url::parse(&p.issuer).map_err(|e| err(format!("issuer: {e}")))?;
            if !matches!(issuer.scheme(), "https" | "http") {
                return Err(err("issuer must be an http(s) URL".into()));
            }
            if p.client_id.is_empty() {
                return Err(err("client_id must not be empty".into()));
            }
            match (&p.client_secret, &p.client_secret_file) {
                (Some(_), Some(_)) => return Err(err("set client_secret or client_secret_file, not both".into())),
                (None, None) => return Err(err("client_secret (or client_secret_file) is required".into())),
                (Some(s), None) if s.is_empty() => return Err(err("client_secret must not be empty".into())),
                _ => {}
            }
            if let Some(path) = &p.client_secret_file {
                match std::fs::read_to_string(path) {
                    Ok(s) if !s.trim().is_empty() => {}
                    Ok(_) => return Err(err(format!("client_secret_file {} is empty", path.display()))),
                    Err(e) => return Err(err(format!("client_secret_file {}: {e}", path.display()))),
                }
            }
            if !p.scopes.iter().any(|s| s == "openid") {
                return Err(err("scopes must include `openid`".into()));
            }
            if let Some(icon) = &p.icon
                && !icon.starts_with("mxc://")
            {
                return Err(err("icon must be an mxc:// URI".into()));
            }
            for t in std::iter::once(&p.localpart_template)
                .chain(p.display_name_template.as_ref())
                .chain(p.email_template.as_ref())
            {
                super::mapping::check_template(t).map_err(|e| err(format!("template `{t}`: {e}")))?;
            }
            for r in &p.attribute_requirements {
                if r.value.is_some() == r.one_of.is_some() {
                    return Err(err(format!(
                        "attribute_requirements for `{}`: set exactly one of value and one_of",
                        r.attribute
                    )));
                }
            }
            for d in &p.allowed_email_domains {
                if d.is_empty() || d.contains('@') {
                    return Err(err(format!("allowed_email_domains: `{d}` is not a domain")));
                }
            }
            if let Some(u) = &p.post_logout_redirect_uri {
                url::Url::parse(u).map_err(|e| err(format!("post_logout_redirect_uri: {e}")))?;
            }
            if let Some(u) = &p.password_change_url {
                url::Url::parse(u).map_err(|e| err(format!("password_change_url: {e}")))?;
            }
            for k in p.additional_authorization_parameters.keys() {
                if matches!(
                    k.as_str(),
                    "state"
                        | "nonce"
                        | "code_challenge"
                        | "code_challenge_method"
                        | "redirect_uri"
                        | "client_id"
                        | "response_type"
                        | "scope"
                ) {
                    return Err(err(format!("additional_authorization_parameters may not set `{k}`")));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn load(extra: &str) -> Result<Config, String> {
        let text =
            format!("server_name = \"ville.example\"\npublic_baseurl = \"https://matrix.ville.example/\"\n{extra}");
        Config::from_toml_and_env(&text, "test", Vec::new()).map_err(|e| e.to_string())
    }

    const PROVIDER: &str = "[[sso.providers]]\nid = \"llng\"\nname = \"Agents\"\nissuer = \"https://auth.example/\"\nclient_id = \"matrix\"\nclient_secret = \"s\"\n";

    #[test]
    fn providers_are_checked_at_start_up() {
        let c = load(PROVIDER).unwrap();
        assert_eq!(c.sso.providers[0].scopes, ["openid", "profile", "email"]);
        assert!(c.sso.providers[0].pkce);
        let twice = format!("{PROVIDER}{PROVIDER}");
        assert!(load(&twice).unwrap_err().contains("used twice"));
        assert!(load(&PROVIDER.replace("client_secret = \"s\"\n", "")).unwrap_err().contains("client_secret"));
        assert!(load(&format!("{PROVIDER}localpart_template = \"{{{{ user.\"\n")).unwrap_err().contains("template"));
        assert!(load(&format!("{PROVIDER}scopes = [\"profile\"]\n")).unwrap_err().contains("openid"));
        assert!(load(&PROVIDER.replace("id = \"llng\"", "id = \"a b\"")).unwrap_err().contains("id must be"));
        assert!(load(&format!("{PROVIDER}unknown_key = 1\n")).unwrap_err().contains("unknown_key"));
        let no_base = Config::from_toml_and_env(&format!("server_name = \"v.example\"\n{PROVIDER}"), "t", Vec::new());
        assert!(no_base.unwrap_err().to_string().contains("public_baseurl"));
    }
}
