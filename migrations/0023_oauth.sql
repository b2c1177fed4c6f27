-- Parvis as an OAuth 2.0 authorization server (Matrix 1.15+ "OAuth 2.0 API", issue 16).
-- Every step of a flow is a row here, so that any instance can continue it.

-- Clients registered dynamically (RFC 7591 as profiled by the spec). Public clients only.
CREATE TABLE oauth_clients (
    client_id        TEXT PRIMARY KEY,
    application_type TEXT NOT NULL,          -- 'web' or 'native'
    redirect_uris    TEXT[] NOT NULL,
    metadata         JSONB NOT NULL,         -- what was registered (names, URIs, localised)
    metadata_hash    BYTEA NOT NULL,         -- identical registrations share a client_id
    created_ts       BIGINT NOT NULL
);
CREATE INDEX oauth_clients_hash ON oauth_clients (metadata_hash);

-- An authorization request between /authorize and the redirect back to the client: who the
-- user turned out to be (after the upstream login or the password form), then the consent.
CREATE TABLE oauth_grants (
    grant_id       TEXT PRIMARY KEY,         -- random, in the browser's URLs
    browser_hash   BYTEA NOT NULL,           -- SHA-256 of the cookie binding it to the browser
    client_id      TEXT NOT NULL REFERENCES oauth_clients (client_id) ON DELETE CASCADE,
    redirect_uri   TEXT NOT NULL,            -- as sent (loopback ports vary)
    response_mode  TEXT NOT NULL,            -- 'query' or 'fragment'
    scope          TEXT NOT NULL,
    device_id      TEXT NOT NULL,
    state          TEXT,
    code_challenge TEXT NOT NULL,
    prompt         TEXT,
    user_id        TEXT REFERENCES users (user_id) ON DELETE CASCADE,
    upstream       JSONB,                    -- the SSO login behind it (provider session)
    csrf           TEXT NOT NULL,            -- in the consent form
    created_ts     BIGINT NOT NULL,
    expires_ts     BIGINT NOT NULL
);
CREATE INDEX oauth_grants_expiry ON oauth_grants (expires_ts);

-- Authorization codes: single use. A used code is kept (used_ts) until it expires, so that a
-- second use can revoke what the first one issued (RFC 6749 4.1.2).
CREATE TABLE oauth_codes (
    code_hash      BYTEA PRIMARY KEY,
    client_id      TEXT NOT NULL,
    redirect_uri   TEXT NOT NULL,
    scope          TEXT NOT NULL,
    device_id      TEXT NOT NULL,
    user_id        TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    code_challenge TEXT NOT NULL,
    upstream       JSONB,
    expires_ts     BIGINT NOT NULL,
    used_ts        BIGINT,
    issued_device  TEXT                      -- what the first use created, revoked on reuse
);
CREATE INDEX oauth_codes_expiry ON oauth_codes (expires_ts);

-- The OAuth client behind a device (refresh and revocation check it).
CREATE TABLE oauth_sessions (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    client_id  TEXT NOT NULL,
    scope      TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);

-- OAuth refresh tokens rotate with a grace: a used token stays (used_ts) with its successor
-- (parent_id), so that a client whose response was lost can retry once; using it again after
-- the successor was used means the token leaked, and ends the session.
ALTER TABLE refresh_tokens ADD COLUMN parent_id BIGINT REFERENCES refresh_tokens (id) ON DELETE CASCADE;
ALTER TABLE refresh_tokens ADD COLUMN used_ts BIGINT;
ALTER TABLE refresh_tokens ADD COLUMN expires_ts BIGINT;
CREATE INDEX refresh_tokens_parent ON refresh_tokens (parent_id) WHERE parent_id IS NOT NULL;

-- Browser sessions of the account management pages (cookie, stored hashed).
CREATE TABLE account_web_sessions (
    token_hash BYTEA PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    csrf       TEXT NOT NULL,
    expires_ts BIGINT NOT NULL
);
CREATE INDEX account_web_sessions_expiry ON account_web_sessions (expires_ts);

-- Cross-signing resets approved on the account page (`m.oauth` UIA stage): allowed until then.
CREATE TABLE cross_signing_reset_approvals (
    user_id     TEXT PRIMARY KEY REFERENCES users (user_id) ON DELETE CASCADE,
    allowed_until BIGINT NOT NULL
);
