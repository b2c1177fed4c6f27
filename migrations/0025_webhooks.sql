-- Alert webhooks (issue 17): `POST /_parvis/webhook/{hook_id}` with the hook's secret posts a
-- formatted alert into `room_id` as `bot_user_id`. Only the SHA-256 of the secret is stored.
CREATE TABLE webhooks (
    hook_id             TEXT     PRIMARY KEY,
    token_hash          BYTEA    NOT NULL,
    name                TEXT     NOT NULL,
    room_id             TEXT     NOT NULL,
    bot_user_id         TEXT     NOT NULL REFERENCES users (user_id),
    -- Firing alerts whose `severity` label is one of these mention the room (@room).
    mention_severities  TEXT[]   NOT NULL DEFAULT '{}',
    created_by          TEXT,
    created_ts          BIGINT   NOT NULL,
    revoked_ts          BIGINT,
    last_used_ts        BIGINT
);
