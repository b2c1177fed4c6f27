-- Single sign-on through OpenID Connect providers (issue 14).
--
-- Every row a login flow needs lives here, so that each step of a flow (redirect, callback,
-- loginToken, UIA fallback) may reach a different Parvis instance.

-- Who a user is at each identity provider (Synapse's `user_external_ids`).
CREATE TABLE user_external_ids (
    auth_provider TEXT NOT NULL,
    external_id   TEXT NOT NULL,
    user_id       TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    created_ts    BIGINT NOT NULL,
    PRIMARY KEY (auth_provider, external_id)
);
CREATE INDEX user_external_ids_user ON user_external_ids (user_id);

-- Third-party identifiers asserted by an identity provider (the SSO e-mail), kept in sync at
-- each login. One account per address.
CREATE TABLE user_threepids (
    medium       TEXT NOT NULL,
    address      TEXT NOT NULL,
    user_id      TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    validated_ts BIGINT NOT NULL,
    added_ts     BIGINT NOT NULL,
    PRIMARY KEY (medium, address)
);
CREATE INDEX user_threepids_user ON user_threepids (user_id);

-- An authorization request under way: created by /login/sso/redirect, consumed (once) by the
-- callback. `state_hash` is SHA-256 of the `state` parameter; `browser_hash` is SHA-256 of the
-- cookie set on the browser that started the flow, so that a callback URL replayed in another
-- browser (login CSRF) is refused.
CREATE TABLE sso_auth_sessions (
    state_hash     BYTEA PRIMARY KEY,
    browser_hash   BYTEA NOT NULL,
    provider       TEXT NOT NULL,
    nonce          TEXT NOT NULL,
    pkce_verifier  TEXT,
    client_redirect_url TEXT,          -- NULL for a UIA flow
    uia_session_id TEXT,               -- set for the UIA fallback flow
    created_ts     BIGINT NOT NULL,
    expires_ts     BIGINT NOT NULL
);
CREATE INDEX sso_auth_sessions_expiry ON sso_auth_sessions (expires_ts);

-- Single-use `m.login.token`s handed to clients after an SSO login (stored hashed).
CREATE TABLE sso_login_tokens (
    token_hash BYTEA PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    provider   TEXT NOT NULL,
    subject    TEXT NOT NULL,
    sid        TEXT,
    id_token   TEXT,
    expires_ts BIGINT NOT NULL
);
CREATE INDEX sso_login_tokens_expiry ON sso_login_tokens (expires_ts);

-- The provider session behind each SSO-logged-in device: the id_token for RP-initiated logout,
-- the subject and `sid` for back-channel logout. Gone with the device.
CREATE TABLE sso_device_sessions (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    provider   TEXT NOT NULL,
    subject    TEXT NOT NULL,
    sid        TEXT,
    id_token   TEXT,
    created_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
CREATE INDEX sso_device_sessions_subject ON sso_device_sessions (provider, subject);
CREATE INDEX sso_device_sessions_sid ON sso_device_sessions (provider, sid) WHERE sid IS NOT NULL;

-- Back-channel logout tokens already acted on (`jti`), kept until they would have expired anyway.
CREATE TABLE sso_logout_jtis (
    provider   TEXT NOT NULL,
    jti        TEXT NOT NULL,
    expires_ts BIGINT NOT NULL,
    PRIMARY KEY (provider, jti)
);
