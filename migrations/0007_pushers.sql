-- Pushers registered by clients (Element X registers its push gateway here). They belong to the
-- device that registered them and go away with it.
CREATE TABLE pushers (
    user_id             TEXT NOT NULL,
    device_id           TEXT NOT NULL,
    app_id              TEXT NOT NULL,
    pushkey             TEXT NOT NULL,
    kind                TEXT NOT NULL,
    app_display_name    TEXT NOT NULL,
    device_display_name TEXT NOT NULL,
    profile_tag         TEXT,
    lang                TEXT NOT NULL,
    data                JSONB NOT NULL,
    created_ts          BIGINT NOT NULL,
    PRIMARY KEY (app_id, pushkey, user_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
CREATE INDEX pushers_user ON pushers (user_id);
