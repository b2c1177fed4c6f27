-- OpenID tokens (issue 18): handed by a user to a third party (Jitsi's verification service, a
-- widget) which asks `/_matrix/federation/v1/openid/userinfo` who the user is. A table of their
-- own, apart from `access_tokens`, so that no lookup of an access token can ever find one (they
-- grant nothing else), and stored as SHA-256 hashes only, as every other token.
CREATE TABLE openid_tokens (
    token_hash  BYTEA   PRIMARY KEY,
    user_id     TEXT    NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    created_ts  BIGINT  NOT NULL,
    expires_ts  BIGINT  NOT NULL
);

-- Expired tokens are deleted by housekeeping.
CREATE INDEX openid_tokens_expiry ON openid_tokens (expires_ts);
