-- Foundation: server identity, accounts, devices, tokens, profiles, user-interactive auth.
-- Timestamps are milliseconds since the UNIX epoch (BIGINT), as everywhere in Matrix.

-- Facts about this deployment that must never silently change (e.g. server_name).
CREATE TABLE server_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- The server's ed25519 signing keys. The active key has expired_ts NULL; old keys are kept
-- so that events they signed can still be verified by remote servers.
CREATE TABLE server_signing_keys (
    key_id      TEXT PRIMARY KEY,          -- "ed25519:a_XXXX"
    secret_seed BYTEA NOT NULL,            -- the 32-byte ed25519 seed
    created_ts  BIGINT NOT NULL,
    expired_ts  BIGINT
);

CREATE TABLE users (
    user_id       TEXT PRIMARY KEY,        -- full MXID, "@alice:example.org"
    localpart     TEXT NOT NULL UNIQUE,
    password_hash TEXT,                    -- argon2id PHC string; NULL = no password login
    is_admin      BOOLEAN NOT NULL DEFAULT FALSE,
    user_type     TEXT,                    -- e.g. "bot", "support"; NULL = regular user
    deactivated   BOOLEAN NOT NULL DEFAULT FALSE,
    created_ts    BIGINT NOT NULL
);

-- Profile fields (displayname, avatar_url and custom MSC4133 fields) as one JSON object.
CREATE TABLE profiles (
    user_id TEXT PRIMARY KEY REFERENCES users (user_id) ON DELETE CASCADE,
    fields  JSONB NOT NULL DEFAULT '{}'::jsonb
);

CREATE TABLE devices (
    user_id              TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    device_id            TEXT NOT NULL,
    display_name         TEXT,
    created_ts           BIGINT NOT NULL,
    last_seen_ts         BIGINT,
    last_seen_ip         TEXT,
    last_seen_user_agent TEXT,
    PRIMARY KEY (user_id, device_id)
);

-- Refresh tokens rotate: using one deletes it (and, by cascade, the access token it issued).
CREATE TABLE refresh_tokens (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_hash BYTEA NOT NULL UNIQUE,      -- SHA-256 of the token
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
CREATE INDEX refresh_tokens_device ON refresh_tokens (user_id, device_id);

-- Access tokens are stored as SHA-256 hashes: a database leak yields no usable token, and the
-- lookup by hash is not a timing oracle on the secret.
CREATE TABLE access_tokens (
    token_hash       BYTEA PRIMARY KEY,
    user_id          TEXT NOT NULL,
    device_id        TEXT NOT NULL,
    expires_ts       BIGINT,               -- NULL = does not expire
    refresh_token_id BIGINT REFERENCES refresh_tokens (id) ON DELETE CASCADE,
    created_ts       BIGINT NOT NULL,
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
CREATE INDEX access_tokens_device ON access_tokens (user_id, device_id);

-- User-interactive authentication sessions. Stored in the database (not in memory) so that the
-- steps of one session may hit different Parvis instances.
CREATE TABLE uia_sessions (
    session_id         TEXT PRIMARY KEY,
    purpose            TEXT NOT NULL,      -- which operation this session authorises
    user_id            TEXT,               -- the authenticated user, for non-registration purposes
    completed          JSONB NOT NULL DEFAULT '[]'::jsonb,
    registration_token TEXT,
    created_ts         BIGINT NOT NULL
);
CREATE INDEX uia_sessions_created ON uia_sessions (created_ts);

CREATE TABLE registration_tokens (
    token        TEXT PRIMARY KEY,
    uses_allowed INTEGER,                  -- NULL = unlimited
    completed    INTEGER NOT NULL DEFAULT 0,
    expiry_ts    BIGINT,                   -- NULL = never expires
    created_ts   BIGINT NOT NULL
);

-- Nonces for Synapse-compatible shared-secret registration (single use, short-lived).
CREATE TABLE registration_nonces (
    nonce      TEXT PRIMARY KEY,
    created_ts BIGINT NOT NULL
);
