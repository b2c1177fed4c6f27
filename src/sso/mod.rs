//! Single sign-on: Parvis as an OpenID Connect relying party (the spec's `m.login.sso`).
//!
//! The flow, each step of which may reach a different instance (everything is in PostgreSQL):
//! 1. `GET /login/sso/redirect/{idp}?redirectUrl=` ([`Sso::start`]): a random `state`, `nonce`
//!    and PKCE verifier are stored (`sso_auth_sessions`, hashed state), a cookie binds the flow to
//!    the browser, and the browser goes to the provider's authorization endpoint.
//! 2. The provider sends the browser to `/_synapse/client/oidc/callback` (Synapse's path, so an
//!    existing registration at the provider keeps working): [`Sso::finish`] consumes the stored
//!    request (once), checks the cookie, exchanges the code, verifies the id_token (JWKS
//!    signature, `iss`, `aud`, nonce, expiry, `acr`) and reads userinfo when needed, JSON or
//!    signed JWT.
//! 3. [`Sso::resolve_user`] maps the claims to an account (templates, requirements, e-mail
//!    domains; just-in-time creation or linking by subject or e-mail) and keeps the profile in
//!    sync; a single-use `loginToken` goes back to the client, which finishes with
//!    `POST /login` `m.login.token`.
//!
//! Provider metadata and keys are discovered lazily, cached for an hour, and fetched again at once
//! (at most every 30 s) when a token is signed with a key the cache does not know (rotation).

pub mod config;
pub mod http;
pub mod mapping;
pub mod pages;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use base64::Engine;
use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreGenderClaim, CoreIdToken, CoreJsonWebKey,
    CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm,
};
use openidconnect::{
    AccessToken, AuthType, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EmptyAdditionalClaims,
    EndpointMaybeSet, EndpointNotSet, EndpointSet, IssuerUrl, JsonWebKey, Nonce, OAuth2TokenResponse,
    PkceCodeChallenge, PkceCodeVerifier, ProviderMetadataWithLogout, RedirectUrl, Scope, SubjectIdentifier,
    TokenResponse, UserInfoJsonWebToken, UserInfoVerifier,
};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use self::config::{ClientAuthMethod, MatchBy, SsoConfig, SsoProviderConfig, UserProfileMethod};
use self::http::Http;
use self::mapping::Mapper;
use crate::state::AppState;
use crate::storage::{self, now_ms};

/// The callback path registered at the providers (Synapse's).
pub const CALLBACK_PATH: &str = "/_synapse/client/oidc/callback";
/// Where providers post back-channel logout tokens (Synapse's path).
pub const BACKCHANNEL_LOGOUT_PATH: &str = "/_synapse/client/oidc/backchannel_logout";
/// Prefix of the cookie that binds an authorization request to the browser that started it (one
/// cookie per request, named after its state, so that flows in several tabs do not clash).
pub const COOKIE_PREFIX: &str = "parvis_sso_";
/// Where the provider sends the browser after RP-initiated logout, unless configured otherwise.
pub const LOGGED_OUT_PATH: &str = "/_parvis/client/sso/logged_out";
/// The UIA stage completed through the SSO fallback page.
pub const UIA_STAGE: &str = "m.login.sso";

const METADATA_TTL: Duration = Duration::from_secs(3600);
const MIN_REFRESH: Duration = Duration::from_secs(30);
/// Clock skew tolerated on `iat` of logout tokens.
const LOGOUT_TOKEN_MAX_AGE_MS: i64 = 10 * 60 * 1000;
const BACKCHANNEL_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

type Metadata = ProviderMetadataWithLogout;
type OidcClient =
    CoreClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointMaybeSet, EndpointMaybeSet>;

/// A failure of the flow, told to the user in French and English. `status` is the HTTP status
/// of the error page.
#[derive(Debug)]
pub struct SsoError {
    pub status: StatusCode,
    pub fr: String,
    pub en: String,
}

impl SsoError {
    fn new(status: StatusCode, fr: impl Into<String>, en: impl Into<String>) -> Self {
        Self { status, fr: fr.into(), en: en.into() }
    }
    fn bad_request(fr: impl Into<String>, en: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, fr, en)
    }
    fn forbidden(fr: impl Into<String>, en: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, fr, en)
    }
    /// The provider misbehaved or is unreachable; the detail goes to the log, not the page.
    fn provider(id: &str, detail: impl std::fmt::Display) -> Self {
        tracing::warn!(provider = id, error = %detail, "SSO provider error");
        Self::new(
            StatusCode::BAD_GATEWAY,
            "Le fournisseur d'identité n'a pas pu être joint ou a répondu de façon inattendue. Réessayez plus tard.",
            "The identity provider could not be reached or answered unexpectedly. Please try again later.",
        )
    }
    /// A token from the provider did not verify.
    fn invalid_token(id: &str, detail: impl std::fmt::Display) -> Self {
        tracing::warn!(provider = id, error = %detail, "SSO token refused");
        Self::forbidden(
            "La réponse du fournisseur d'identité n'a pas pu être vérifiée.",
            "The identity provider's answer could not be verified.",
        )
    }
    pub fn render(&self) -> axum::response::Response {
        pages::error(self.status, &self.fr, &self.en)
    }
}

impl From<sqlx::Error> for SsoError {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "database error in SSO flow");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "Erreur interne du serveur.", "Internal server error.")
    }
}

impl From<crate::error::Error> for SsoError {
    fn from(e: crate::error::Error) -> Self {
        let status = e.status;
        Self::new(status, e.message.clone(), e.message)
    }
}

pub struct Provider {
    pub cfg: SsoProviderConfig,
    secret: String,
    mapper: Mapper,
    metadata: tokio::sync::RwLock<Option<(Arc<Metadata>, Instant)>>,
    refreshing: tokio::sync::Mutex<()>,
}

/// The configured providers and what they need at run time.
pub struct Sso {
    providers: Vec<Provider>,
    http: Http,
    callback: Option<RedirectUrl>,
    config: SsoConfig,
    default_post_logout: Option<String>,
    /// `<public_baseurl>/_parvis/`: Parvis's own pages.
    internal_prefix: Option<String>,
}

/// Who the provider says logged in.
#[derive(Debug)]
pub struct Identity {
    pub provider: String,
    pub subject: String,
    pub sid: Option<String>,
    pub claims: Value,
    pub id_token: String,
    pub client_redirect_url: Option<String>,
    pub uia_session_id: Option<String>,
}

/// A random URL-safe token of 256 bits (43 characters).
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The name of the browser-binding cookie of the request with this `state`.
pub fn cookie_name(state: &str) -> String {
    format!("{COOKIE_PREFIX}{}", &hex::encode(crate::auth::hash_token(state))[..16])
}

/// An authorization request just started.
pub struct StartedFlow {
    /// The provider's authorization URL, for the browser.
    pub url: String,
    pub cookie_name: String,
    pub cookie_value: String,
    pub cookie_max_age_secs: u64,
}

/// The claims of a JWT whose signature was checked elsewhere.
fn jwt_payload(jwt: &str) -> Option<Map<String, Value>> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(o) => Some(o),
        _ => None,
    }
}

impl Sso {
    pub fn new(config: &SsoConfig, public_baseurl: Option<&str>) -> anyhow::Result<Self> {
        let mut providers = Vec::new();
        for p in &config.providers {
            let secret = p
                .secret()
                .map_err(|e| anyhow::anyhow!("sso provider {}: cannot read the client secret: {e}", p.id))?
                .ok_or_else(|| anyhow::anyhow!("sso provider {}: no client secret", p.id))?;
            let mapper = Mapper::new(p).map_err(|e| anyhow::anyhow!("sso provider {}: {e}", p.id))?;
            providers.push(Provider {
                cfg: p.clone(),
                secret,
                mapper,
                metadata: Default::default(),
                refreshing: Default::default(),
            });
        }
        let base = public_baseurl.map(|b| b.trim_end_matches('/').to_owned());
        let callback = base.as_ref().map(|b| RedirectUrl::new(format!("{b}{CALLBACK_PATH}"))).transpose()?;
        Ok(Self {
            providers,
            http: Http::new()?,
            callback,
            config: config.clone(),
            default_post_logout: base.as_ref().map(|b| format!("{b}{LOGGED_OUT_PATH}")),
            internal_prefix: base.map(|b| format!("{b}/_parvis/")),
        })
    }

    pub fn enabled(&self) -> bool {
        !self.providers.is_empty()
    }

    pub fn providers(&self) -> impl Iterator<Item = &SsoProviderConfig> {
        self.providers.iter().map(|p| &p.cfg)
    }

    pub fn provider(&self, id: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.cfg.id == id)
    }

    /// Whether a client URL may receive a login token without a confirmation page: the
    /// configured prefixes, and Parvis's own pages (the OAuth login and the account pages,
    /// which start SSO logins themselves).
    pub fn whitelisted(&self, redirect: &str) -> bool {
        if let Some(base) = &self.internal_prefix
            && redirect.starts_with(base.as_str())
        {
            return true;
        }
        self.config.client_whitelist.iter().any(|prefix| redirect.starts_with(prefix.as_str()))
    }

    /// Fetches the discovery document and keys at start-up, so that a misconfigured provider is
    /// in the log before the first agent tries it (failure is not fatal: the provider may be
    /// down for a while).
    pub async fn warm_up(&self) {
        for p in &self.providers {
            match self.metadata(p, false).await {
                Ok(_) => tracing::info!(provider = %p.cfg.id, issuer = %p.cfg.issuer, "SSO provider discovered"),
                Err(e) => tracing::warn!(provider = %p.cfg.id, error = %e.en, "SSO provider discovery failed"),
            }
        }
    }

    async fn metadata(&self, p: &Provider, force: bool) -> Result<Arc<Metadata>, SsoError> {
        let fresh = |at: Instant| if force { at.elapsed() < MIN_REFRESH } else { at.elapsed() < METADATA_TTL };
        if let Some((m, at)) = p.metadata.read().await.as_ref()
            && fresh(*at)
        {
            return Ok(m.clone());
        }
        let _one_at_a_time = p.refreshing.lock().await;
        if let Some((m, at)) = p.metadata.read().await.as_ref()
            && fresh(*at)
        {
            return Ok(m.clone());
        }
        let issuer = IssuerUrl::new(p.cfg.issuer.clone()).map_err(|e| SsoError::provider(&p.cfg.id, e))?;
        let m =
            Arc::new(Metadata::discover_async(issuer, &self.http).await.map_err(|e| SsoError::provider(&p.cfg.id, e))?);
        *p.metadata.write().await = Some((m.clone(), Instant::now()));
        Ok(m)
    }

    fn client(&self, p: &Provider, m: &Metadata) -> Result<OidcClient, SsoError> {
        let redirect =
            self.callback.clone().ok_or_else(|| SsoError::provider(&p.cfg.id, "public_baseurl is not set"))?;
        Ok(CoreClient::from_provider_metadata(
            m.clone(),
            ClientId::new(p.cfg.client_id.clone()),
            Some(ClientSecret::new(p.secret.clone())),
        )
        .set_redirect_uri(redirect)
        .set_auth_type(match p.cfg.client_auth_method {
            ClientAuthMethod::ClientSecretBasic => AuthType::BasicAuth,
            ClientAuthMethod::ClientSecretPost => AuthType::RequestBody,
        }))
    }

    /// Starts an authorization request: what to send the browser to, and the cookie that binds
    /// the request to that browser.
    pub async fn start(
        &self,
        db: &sqlx::PgPool,
        provider_id: &str,
        client_redirect_url: Option<&str>,
        uia_session_id: Option<&str>,
    ) -> Result<StartedFlow, SsoError> {
        let p = self.provider(provider_id).ok_or_else(|| {
            SsoError::new(StatusCode::NOT_FOUND, "Fournisseur d'identité inconnu.", "Unknown identity provider.")
        })?;
        let m = self.metadata(p, false).await?;
        let client = self.client(p, &m)?;
        let state = random_token();
        let nonce = random_token();
        let (state_for_req, nonce_for_req) = (state.clone(), nonce.clone());
        let mut req = client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            move || CsrfToken::new(state_for_req),
            move || Nonce::new(nonce_for_req),
        );
        for s in p.cfg.scopes.iter().filter(|s| s.as_str() != "openid") {
            req = req.add_scope(Scope::new(s.clone()));
        }
        let verifier = if p.cfg.pkce {
            let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
            req = req.set_pkce_challenge(challenge);
            Some(verifier.secret().clone())
        } else {
            None
        };
        if let Some(acr) = &p.cfg.acr_values {
            req = req.add_extra_param("acr_values", acr.clone());
        }
        if let Some(prompt) = &p.cfg.prompt {
            req = req.add_extra_param("prompt", prompt.clone());
        }
        for (k, v) in &p.cfg.additional_authorization_parameters {
            req = req.add_extra_param(k.clone(), v.clone());
        }
        let (url, _, _) = req.url();
        let browser = random_token();
        storage::sso::insert_auth_session(
            db,
            &storage::sso::NewAuthSession {
                state_hash: &crate::auth::hash_token(&state),
                browser_hash: &crate::auth::hash_token(&browser),
                provider: &p.cfg.id,
                nonce: &nonce,
                pkce_verifier: verifier.as_deref(),
                client_redirect_url,
                uia_session_id,
                expires_ts: now_ms() + self.config.auth_session_lifetime_secs as i64 * 1000,
            },
        )
        .await?;
        Ok(StartedFlow {
            url: url.to_string(),
            cookie_name: cookie_name(&state),
            cookie_value: browser,
            cookie_max_age_secs: self.config.auth_session_lifetime_secs,
        })
    }

    /// Handles the provider's answer: consumes the authorization request and verifies everything
    /// the provider says.
    pub async fn finish(
        &self,
        db: &sqlx::PgPool,
        state: &str,
        code: &str,
        browser_cookie: Option<&str>,
    ) -> Result<Identity, SsoError> {
        let Some(session) = storage::sso::take_auth_session(db, &crate::auth::hash_token(state)).await? else {
            return Err(SsoError::bad_request(
                "Cette demande de connexion est inconnue ou a déjà servi. Recommencez depuis votre application.",
                "This login request is unknown or was already used. Please start again from your application.",
            ));
        };
        if session.expires_ts < now_ms() {
            return Err(SsoError::bad_request(
                "Cette demande de connexion a expiré. Recommencez depuis votre application.",
                "This login request has expired. Please start again from your application.",
            ));
        }
        let same_browser = browser_cookie
            .is_some_and(|c| bool::from(crate::auth::hash_token(c).ct_eq(session.browser_hash.as_slice())));
        if !same_browser {
            return Err(SsoError::forbidden(
                "Cette connexion a été commencée dans un autre navigateur. Recommencez depuis votre application.",
                "This login was started in another browser. Please start again from your application.",
            ));
        }
        let p = self.provider(&session.provider).ok_or_else(|| {
            SsoError::bad_request(
                "Ce fournisseur d'identité n'est plus configuré.",
                "This identity provider is no longer configured.",
            )
        })?;
        let id = p.cfg.id.as_str();
        if code.is_empty() || code.len() > 4096 {
            return Err(SsoError::bad_request("Code d'autorisation absent.", "The authorization code is missing."));
        }
        let m = self.metadata(p, false).await?;
        let client = self.client(p, &m)?;
        let mut req =
            client.exchange_code(AuthorizationCode::new(code.to_owned())).map_err(|e| SsoError::provider(id, e))?;
        if let Some(v) = session.pkce_verifier {
            req = req.set_pkce_verifier(PkceCodeVerifier::new(v));
        }
        let token = req
            .request_async(&self.http)
            .await
            .map_err(|e| SsoError::invalid_token(id, format!("token endpoint: {e}")))?;
        let id_token =
            token.id_token().ok_or_else(|| SsoError::invalid_token(id, "no id_token in the token response"))?;
        let nonce = Nonce::new(session.nonce);
        let subject = match Self::verify_id_token(&client, id_token, &nonce) {
            Ok(sub) => sub,
            Err(first) => {
                // Perhaps the provider rotated its keys: fetch them again once.
                let m = self.metadata(p, true).await?;
                let client = self.client(p, &m)?;
                Self::verify_id_token(&client, id_token, &nonce).map_err(|_| SsoError::invalid_token(id, first))?
            }
        };
        let raw_id_token = id_token.to_string();
        let mut claims =
            jwt_payload(&raw_id_token).ok_or_else(|| SsoError::invalid_token(id, "undecodable id_token"))?;
        if let Some(wanted) = &p.cfg.acr_values {
            let acr = claims.get("acr").and_then(Value::as_str).unwrap_or("");
            if !wanted.split_whitespace().any(|w| w == acr) {
                tracing::warn!(provider = id, acr, wanted = %wanted, "SSO login refused: authentication level");
                return Err(SsoError::forbidden(
                    "Le niveau d'authentification obtenu est insuffisant pour ce service.",
                    "The authentication level obtained is not sufficient for this service.",
                ));
            }
        }
        let needs_userinfo = match p.cfg.user_profile_method {
            UserProfileMethod::UserinfoEndpoint => true,
            UserProfileMethod::Auto => {
                let mut wanted = p.mapper.referenced_claims();
                wanted.extend(p.cfg.attribute_requirements.iter().map(|r| r.attribute.clone()));
                // The e-mail claim matters only when something uses it.
                if p.cfg.allowed_email_domains.is_empty() && p.cfg.match_by != MatchBy::Email {
                    wanted.remove("email");
                }
                wanted.iter().any(|c| !claims.contains_key(c))
            }
        };
        if needs_userinfo && m.userinfo_endpoint().is_some() {
            let info = self.userinfo(p, &m, token.access_token(), &subject).await?;
            let prefer_userinfo = p.cfg.user_profile_method == UserProfileMethod::UserinfoEndpoint;
            for (k, v) in info {
                if matches!(k.as_str(), "iss" | "aud" | "sub" | "exp" | "iat" | "nonce") {
                    continue;
                }
                if prefer_userinfo || !claims.contains_key(&k) {
                    claims.insert(k, v);
                }
            }
        }
        let sid = claims.get("sid").and_then(Value::as_str).map(str::to_owned);
        Ok(Identity {
            provider: p.cfg.id.clone(),
            subject,
            sid,
            claims: Value::Object(claims),
            id_token: raw_id_token,
            client_redirect_url: session.client_redirect_url,
            uia_session_id: session.uia_session_id,
        })
    }

    fn verify_id_token(client: &OidcClient, id_token: &CoreIdToken, nonce: &Nonce) -> Result<String, String> {
        let verifier = client.id_token_verifier();
        let claims = id_token.claims(&verifier, nonce).map_err(|e| e.to_string())?;
        Ok(claims.subject().to_string())
    }

    /// The userinfo claims, answered as JSON or as a signed JWT (`application/jwt`: ProConnect;
    /// LemonLDAP::NG's signed userinfo carries no `iss`/`aud`, so they are checked when present).
    async fn userinfo(
        &self,
        p: &Provider,
        m: &Metadata,
        access_token: &AccessToken,
        subject: &str,
    ) -> Result<Map<String, Value>, SsoError> {
        let id = p.cfg.id.as_str();
        let url = m.userinfo_endpoint().ok_or_else(|| SsoError::provider(id, "no userinfo endpoint"))?;
        let req = ::http::Request::builder()
            .method(::http::Method::GET)
            .uri(url.as_str())
            .header(::http::header::AUTHORIZATION, format!("Bearer {}", access_token.secret()))
            .header(::http::header::ACCEPT, "application/json, application/jwt")
            .body(Vec::new())
            .map_err(|e| SsoError::provider(id, e))?;
        let resp = self.http.send(req).await.map_err(|e| SsoError::provider(id, format!("userinfo: {e}")))?;
        if !resp.status().is_success() {
            return Err(SsoError::provider(id, format!("userinfo answered {}", resp.status())));
        }
        let content_type = resp
            .headers()
            .get(::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let claims = if content_type == "application/jwt" {
            let jwt = std::str::from_utf8(resp.body()).map_err(|e| SsoError::invalid_token(id, e))?.trim().to_owned();
            let verify = |m: &Metadata| -> Result<(), String> {
                let token: UserInfoJsonWebToken<
                    EmptyAdditionalClaims,
                    CoreGenderClaim,
                    CoreJweContentEncryptionAlgorithm,
                    CoreJwsSigningAlgorithm,
                > = serde_json::from_value(Value::String(jwt.clone())).map_err(|e| e.to_string())?;
                let verifier = UserInfoVerifier::new(
                    ClientId::new(p.cfg.client_id.clone()),
                    m.issuer().clone(),
                    m.jwks().clone(),
                    Some(SubjectIdentifier::new(subject.to_owned())),
                )
                .require_issuer_match(false)
                .require_audience_match(false);
                token.claims(&verifier).map(|_| ()).map_err(|e| e.to_string())
            };
            if let Err(first) = verify(m) {
                let m = self.metadata(p, true).await?;
                verify(&m).map_err(|_| SsoError::invalid_token(id, format!("signed userinfo: {first}")))?;
            }
            let claims = jwt_payload(&jwt).ok_or_else(|| SsoError::invalid_token(id, "undecodable userinfo"))?;
            // Absent `iss`/`aud` are tolerated; present ones must be right.
            if let Some(iss) = claims.get("iss")
                && iss.as_str() != Some(p.cfg.issuer.as_str())
            {
                return Err(SsoError::invalid_token(id, "signed userinfo from another issuer"));
            }
            if let Some(aud) = claims.get("aud") {
                let ok = match aud {
                    Value::String(a) => *a == p.cfg.client_id,
                    Value::Array(list) => list.iter().any(|a| a.as_str() == Some(p.cfg.client_id.as_str())),
                    _ => false,
                };
                if !ok {
                    return Err(SsoError::invalid_token(id, "signed userinfo for another audience"));
                }
            }
            claims
        } else {
            match serde_json::from_slice(resp.body()) {
                Ok(Value::Object(o)) => o,
                _ => return Err(SsoError::provider(id, "userinfo is not a JSON object")),
            }
        };
        // OIDC Core 5.3.2: the userinfo `sub` must be the id_token's.
        if claims.get("sub").and_then(Value::as_str) != Some(subject) {
            return Err(SsoError::invalid_token(id, "userinfo is about another subject"));
        }
        Ok(claims)
    }

    /// Finds or creates the account of a verified identity, and keeps its profile in sync.
    pub async fn resolve_user(&self, state: &AppState, ident: &Identity) -> Result<String, SsoError> {
        let p =
            self.provider(&ident.provider).ok_or_else(|| SsoError::provider(&ident.provider, "provider vanished"))?;
        if !mapping::requirements_met(&p.cfg.attribute_requirements, &ident.claims) {
            tracing::info!(provider = %p.cfg.id, subject = %ident.subject, "SSO login refused: attribute requirements");
            return Err(SsoError::forbidden(
                "Votre compte n'est pas autorisé à utiliser cette messagerie.",
                "Your account is not allowed to use this messaging service.",
            ));
        }
        let mapped = p.mapper.map(&ident.claims).map_err(|e| {
            tracing::warn!(provider = %p.cfg.id, subject = %ident.subject, error = %e, "SSO user mapping failed");
            SsoError::forbidden(
                "Les informations transmises par le fournisseur d'identité ne permettent pas de créer votre compte.",
                "The information sent by the identity provider is not enough to set up your account.",
            )
        })?;
        if !mapping::email_domain_allowed(&p.cfg.allowed_email_domains, mapped.email.as_deref()) {
            tracing::info!(provider = %p.cfg.id, email = ?mapped.email, "SSO login refused: e-mail domain");
            return Err(SsoError::forbidden(
                format!(
                    "L'adresse {} n'appartient pas à un domaine autorisé sur ce service.",
                    mapped.email.as_deref().unwrap_or("(aucune)")
                ),
                format!(
                    "The address {} does not belong to a domain allowed on this service.",
                    mapped.email.as_deref().unwrap_or("(none)")
                ),
            ));
        }
        let linked = storage::sso::user_by_external_id(&state.db, &p.cfg.id, &ident.subject).await?;
        let user_id = match linked {
            Some(u) => u,
            None => self.link_or_create(state, p, ident, &mapped).await?,
        };
        let user = storage::users::get(&state.db, &user_id).await?;
        if user.as_ref().is_none_or(|u| u.deactivated) {
            return Err(SsoError::forbidden("Ce compte est désactivé.", "This account is deactivated."));
        }
        // Keep what the provider says in sync at each login.
        if let Some(name) = &mapped.display_name {
            let current = storage::profiles::get(&state.db, &user_id).await?;
            let now = current.as_ref().and_then(|f| f.get("displayname")).and_then(Value::as_str);
            if now != Some(name.as_str())
                && let Err(e) =
                    crate::users::profile::set_field(state, &user_id, "displayname", Some(Value::String(name.clone())))
                        .await
            {
                tracing::warn!(user_id, error = %e.message, "SSO display name not updated");
            }
        }
        if let Some(email) = &mapped.email {
            let mut conn = state.db.acquire().await?;
            if !storage::sso::set_email(&mut conn, &user_id, email).await? {
                tracing::warn!(user_id, email, "SSO e-mail belongs to another account; not recorded");
            }
        }
        Ok(user_id)
    }

    async fn link_or_create(
        &self,
        state: &AppState,
        p: &Provider,
        ident: &Identity,
        mapped: &mapping::MappedUser,
    ) -> Result<String, SsoError> {
        let server = &state.config.server_name;
        // ProConnect-style: a subject seen for the first time may be an account known by e-mail.
        if p.cfg.match_by == MatchBy::Email
            && let Some(email) = &mapped.email
            && let Some(existing) = storage::sso::user_by_email(&state.db, email).await?
        {
            return self.link(state, p, ident, &existing).await;
        }
        if !p.cfg.enable_registration {
            return Err(SsoError::forbidden(
                "Aucun compte de messagerie n'a été préparé pour vous. Contactez votre service informatique.",
                "No messaging account has been set up for you. Please contact your IT department.",
            ));
        }
        crate::users::validate_new_localpart(&mapped.localpart, server).map_err(|e| {
            tracing::warn!(localpart = %mapped.localpart, error = %e.message, "SSO localpart invalid");
            SsoError::forbidden(
                "L'identifiant transmis par le fournisseur d'identité n'est pas utilisable ici.",
                "The user name sent by the identity provider cannot be used here.",
            )
        })?;
        for attempt in 0..100u32 {
            let localpart =
                if attempt == 0 { mapped.localpart.clone() } else { format!("{}{attempt}", mapped.localpart) };
            let user_id = format!("@{localpart}:{server}");
            if let Some(existing) = storage::users::get(&state.db, &user_id).await? {
                if attempt == 0 && p.cfg.allow_existing_users && !existing.deactivated {
                    return self.link(state, p, ident, &user_id).await;
                }
                continue;
            }
            if crate::users::check_not_reserved(state, &localpart).is_err() {
                continue;
            }
            let created = crate::users::create_account(
                state,
                crate::users::NewAccount {
                    localpart: &localpart,
                    password: None,
                    is_admin: false,
                    user_type: None,
                    displayname: mapped.display_name.as_deref(),
                    registration_token: None,
                },
            )
            .await;
            match created {
                Ok(user_id) => {
                    tracing::info!(user_id, provider = %p.cfg.id, subject = %ident.subject, "SSO account created");
                    return self.link(state, p, ident, &user_id).await;
                }
                Err(e) if e.errcode == "M_USER_IN_USE" => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(SsoError::forbidden(
            "Impossible de trouver un identifiant libre pour votre compte.",
            "No free user name could be found for your account.",
        ))
    }

    async fn link(&self, state: &AppState, p: &Provider, ident: &Identity, user_id: &str) -> Result<String, SsoError> {
        if storage::sso::link_external_id(&state.db, &p.cfg.id, &ident.subject, user_id).await? {
            tracing::info!(user_id, provider = %p.cfg.id, subject = %ident.subject, "SSO identity linked");
            return Ok(user_id.to_owned());
        }
        // Another login of the same identity won the race: use what it linked.
        storage::sso::user_by_external_id(&state.db, &p.cfg.id, &ident.subject)
            .await?
            .ok_or_else(|| SsoError::provider(&p.cfg.id, "external ID link vanished"))
    }

    /// The account already linked to an identity (UIA: no creation, no linking).
    pub async fn linked_user(&self, db: &sqlx::PgPool, ident: &Identity) -> Result<Option<String>, SsoError> {
        Ok(storage::sso::user_by_external_id(db, &ident.provider, &ident.subject).await?)
    }

    /// Issues the single-use `loginToken` for a verified identity's account.
    pub async fn issue_login_token(
        &self,
        db: &sqlx::PgPool,
        user_id: &str,
        ident: &Identity,
    ) -> Result<String, SsoError> {
        let token = format!("pvl_{}", random_token());
        storage::sso::insert_login_token(
            db,
            &storage::sso::NewLoginToken {
                token_hash: &crate::auth::hash_token(&token),
                user_id,
                provider: &ident.provider,
                subject: &ident.subject,
                sid: ident.sid.as_deref(),
                id_token: Some(&ident.id_token),
                expires_ts: now_ms() + self.config.login_token_lifetime_secs as i64 * 1000,
            },
        )
        .await?;
        Ok(token)
    }

    /// Where to send the browser to end the provider session (RP-initiated logout), if the
    /// provider supports it.
    pub async fn end_session_url(&self, provider_id: &str, id_token: Option<&str>) -> Option<String> {
        let p = self.provider(provider_id)?;
        let m = self.metadata(p, false).await.ok()?;
        let endpoint = m.additional_metadata().end_session_endpoint.as_ref()?;
        let mut url = url::Url::parse(endpoint.as_str()).ok()?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(t) = id_token {
                q.append_pair("id_token_hint", t);
            }
            q.append_pair("client_id", &p.cfg.client_id);
            if let Some(after) = p.cfg.post_logout_redirect_uri.as_ref().or(self.default_post_logout.as_ref()) {
                q.append_pair("post_logout_redirect_uri", after);
            }
            q.append_pair("state", &random_token());
        }
        Some(url.to_string())
    }

    /// Verifies an OIDC back-channel logout token (OpenID Connect Back-Channel Logout 1.0, 2.6)
    /// and returns the devices of the provider session it ends.
    pub async fn backchannel_logout(
        &self,
        db: &sqlx::PgPool,
        logout_token: &str,
    ) -> Result<Vec<(String, String)>, String> {
        if logout_token.len() > 16 * 1024 {
            return Err("logout_token is too large".into());
        }
        let unverified = jwt_payload(logout_token).ok_or("logout_token is not a JWT")?;
        let iss = unverified.get("iss").and_then(Value::as_str).ok_or("logout_token has no iss")?;
        let audiences: Vec<&str> = match unverified.get("aud") {
            Some(Value::String(a)) => vec![a.as_str()],
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
            _ => return Err("logout_token has no aud".into()),
        };
        let p = self
            .providers
            .iter()
            .find(|p| {
                p.cfg.backchannel_logout_enabled && p.cfg.issuer == iss && audiences.contains(&p.cfg.client_id.as_str())
            })
            .ok_or("no provider with back-channel logout enabled matches iss and aud")?;
        let m = self.metadata(p, false).await.map_err(|e| e.en)?;
        if !verify_jws(logout_token, m.jwks().keys()) {
            let m = self.metadata(p, true).await.map_err(|e| e.en)?;
            if !verify_jws(logout_token, m.jwks().keys()) {
                return Err("logout_token signature does not verify".into());
            }
        }
        let claims = unverified;
        let now = now_ms();
        let iat = claims.get("iat").and_then(Value::as_i64).ok_or("logout_token has no iat")? * 1000;
        if iat > now + 60_000 || iat < now - LOGOUT_TOKEN_MAX_AGE_MS {
            return Err("logout_token iat is out of range".into());
        }
        if let Some(exp) = claims.get("exp").and_then(Value::as_i64)
            && exp * 1000 < now
        {
            return Err("logout_token has expired".into());
        }
        if !claims.get("events").and_then(|e| e.get(BACKCHANNEL_EVENT)).is_some_and(Value::is_object) {
            return Err("logout_token lacks the back-channel logout event".into());
        }
        if claims.contains_key("nonce") {
            return Err("logout_token must not carry a nonce".into());
        }
        let jti = claims.get("jti").and_then(Value::as_str).ok_or("logout_token has no jti")?;
        let sub = claims.get("sub").and_then(Value::as_str);
        let sid = claims.get("sid").and_then(Value::as_str);
        if sub.is_none() && sid.is_none() {
            return Err("logout_token names neither sub nor sid".into());
        }
        if jti.len() > 256 {
            return Err("jti is too long".into());
        }
        if !storage::sso::record_logout_jti(db, &p.cfg.id, jti, now + 2 * LOGOUT_TOKEN_MAX_AGE_MS)
            .await
            .map_err(|e| e.to_string())?
        {
            return Err("logout_token was already used".into());
        }
        storage::sso::devices_for_logout(db, &p.cfg.id, sub, sid).await.map_err(|e| e.to_string())
    }
}

/// Whether a compact JWS verifies with one of the keys (matched by `kid` when the header has
/// one). `none` and symmetric algorithms are refused.
fn verify_jws(jwt: &str, keys: &[CoreJsonWebKey]) -> bool {
    let mut parts = jwt.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let Ok(header) = engine.decode(h).map_err(|_| ()).and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|_| ()))
    else {
        return false;
    };
    let Some(alg) = header.get("alg").cloned() else { return false };
    let Ok(alg) = serde_json::from_value::<CoreJwsSigningAlgorithm>(alg) else { return false };
    if matches!(alg, CoreJwsSigningAlgorithm::None) || openidconnect::JwsSigningAlgorithm::uses_shared_secret(&alg) {
        return false;
    }
    let Ok(signature) = engine.decode(s) else { return false };
    let kid = header.get("kid").and_then(Value::as_str);
    let message = format!("{h}.{p}");
    keys.iter()
        .filter(|k| kid.is_none_or(|kid| k.key_id().is_some_and(|id| id.as_str() == kid)))
        .any(|k| k.verify_signature(&alg, message.as_bytes(), &signature).is_ok())
}

#[cfg(test)]
mod tests {
    //! What a real provider never sends, so the LemonLDAP::NG tests cannot show it: tokens for
    //! another audience or issuer, expired, signed with another key, unsigned.
    use openidconnect::core::{
        CoreIdTokenClaims, CoreJsonWebKeySet, CoreProviderMetadata, CoreResponseType, CoreRsaPrivateSigningKey,
        CoreSubjectIdentifierType,
    };
    use openidconnect::{
        Audience, AuthUrl, JsonWebKeyId, JsonWebKeySetUrl, LogoutProviderMetadata, PrivateSigningKey, ResponseTypes,
        StandardClaims, TokenUrl,
    };

    use super::*;

    const KEY: &str = include_str!("testdata/provider-key.pem");
    const OTHER_KEY: &str = include_str!("testdata/other-key.pem");
    const ISSUER: &str = "https://idp.ville.example/";

    fn key(pem: &str) -> CoreRsaPrivateSigningKey {
        CoreRsaPrivateSigningKey::from_pem(pem, Some(JsonWebKeyId::new("k1".into()))).unwrap()
    }

    fn client() -> OidcClient {
        let base = CoreProviderMetadata::new(
            IssuerUrl::new(ISSUER.into()).unwrap(),
            AuthUrl::new(format!("{ISSUER}authorize")).unwrap(),
            JsonWebKeySetUrl::new(format!("{ISSUER}jwks")).unwrap(),
            vec![ResponseTypes::new(vec![CoreResponseType::Code])],
            vec![CoreSubjectIdentifierType::Public],
            vec![CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256],
            Default::default(),
        );
        let meta = Metadata::new(
            base.issuer().clone(),
            base.authorization_endpoint().clone(),
            base.jwks_uri().clone(),
            base.response_types_supported().clone(),
            base.subject_types_supported().clone(),
            base.id_token_signing_alg_values_supported().clone(),
            LogoutProviderMetadata { end_session_endpoint: None, additional_metadata: Default::default() },
        )
        .set_jwks(CoreJsonWebKeySet::new(vec![key(KEY).as_verification_key()]))
        .set_token_endpoint(Some(TokenUrl::new(format!("{ISSUER}token")).unwrap()));
        CoreClient::from_provider_metadata(meta, ClientId::new("matrix".into()), Some(ClientSecret::new("s".into())))
            .set_redirect_uri(RedirectUrl::new("https://parvis.example/_synapse/client/oidc/callback".into()).unwrap())
    }

    fn id_token(signer: &str, iss: &str, aud: &str, nonce: &str, lifetime_secs: i64) -> CoreIdToken {
        let now = chrono::Utc::now();
        let claims = CoreIdTokenClaims::new(
            IssuerUrl::new(iss.into()).unwrap(),
            vec![Audience::new(aud.into())],
            now + chrono::Duration::seconds(lifetime_secs),
            now - chrono::Duration::seconds(5),
            StandardClaims::new(SubjectIdentifier::new("dwho".into())),
            EmptyAdditionalClaims {},
        )
        .set_nonce(Some(Nonce::new(nonce.into())));
        CoreIdToken::new(claims, &key(signer), CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256, None, None).unwrap()
    }

    #[test]
    fn id_token_checks() {
        let c = client();
        let n = Nonce::new("n1".into());
        assert_eq!(Sso::verify_id_token(&c, &id_token(KEY, ISSUER, "matrix", "n1", 300), &n).unwrap(), "dwho");
        for (what, t) in [
            ("another audience", id_token(KEY, ISSUER, "other-client", "n1", 300)),
            ("another issuer", id_token(KEY, "https://evil.example/", "matrix", "n1", 300)),
            ("another nonce", id_token(KEY, ISSUER, "matrix", "n2", 300)),
            ("expired", id_token(KEY, ISSUER, "matrix", "n1", -60)),
            ("another key", id_token(OTHER_KEY, ISSUER, "matrix", "n1", 300)),
        ] {
            assert!(Sso::verify_id_token(&c, &t, &n).is_err(), "{what} must be refused");
        }
        // Unsigned (`alg: none`) with otherwise perfect claims.
        let good = id_token(KEY, ISSUER, "matrix", "n1", 300).to_string();
        let payload = good.split('.').nth(1).unwrap();
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        if let Ok(unsigned) = serde_json::from_value::<CoreIdToken>(Value::String(format!("{header}.{payload}."))) {
            assert!(Sso::verify_id_token(&c, &unsigned, &n).is_err(), "alg none must be refused");
        }
    }

    #[test]
    fn logout_token_signatures() {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let sign = |pem: &str, alg: &str| {
            let h = b64.encode(format!(r#"{{"alg":"{alg}","kid":"k1"}}"#));
            let p = b64.encode(r#"{"iss":"x"}"#);
            let input = format!("{h}.{p}");
            let sig = key(pem).sign(&CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256, input.as_bytes()).unwrap();
            format!("{input}.{}", b64.encode(sig))
        };
        let keys = vec![key(KEY).as_verification_key()];
        assert!(verify_jws(&sign(KEY, "RS256"), &keys));
        assert!(!verify_jws(&sign(OTHER_KEY, "RS256"), &keys), "another key");
        assert!(!verify_jws(&sign(KEY, "HS256"), &keys), "symmetric algorithms are refused");
        assert!(!verify_jws(&sign(KEY, "none"), &keys), "alg none is refused");
        let good = sign(KEY, "RS256");
        assert!(!verify_jws(&format!("{good}.extra"), &keys));
        assert!(!verify_jws("a.b", &keys));
        assert!(jwt_payload("a.%%%.c").is_none());
    }
}
