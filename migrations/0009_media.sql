-- The media repository: metadata of local uploads and cached remote media, their thumbnails, and
-- cached URL previews. Content lives in the configured store (filesystem or S3) under
-- `storage_key`; a row whose `storage_key` is NULL is a reservation (asynchronous upload) whose
-- content has not arrived, never served.

CREATE TABLE media (
    server_name           TEXT    NOT NULL,
    media_id              TEXT    NOT NULL,
    -- The local uploader; NULL for remote media cached here.
    uploader              TEXT,
    content_type          TEXT,
    upload_name           TEXT,
    size                  BIGINT,
    sha256                BYTEA,
    storage_key           TEXT,
    created_ts            BIGINT  NOT NULL,
    -- Reservations only: when the unused media ID is released.
    pending_expires_ts    BIGINT,
    last_access_ts        BIGINT  NOT NULL,
    quarantined_by        TEXT,
    quarantined_ts        BIGINT,
    -- May the deprecated unauthenticated endpoints serve it (stored before the freeze).
    allow_unauthenticated BOOLEAN NOT NULL DEFAULT false,
    -- Antivirus verdict: NULL (not scanned), 'clean' or 'infected'.
    scan_verdict          TEXT,
    PRIMARY KEY (server_name, media_id),
    CHECK ((storage_key IS NULL) = (pending_expires_ts IS NOT NULL))
);

CREATE INDEX media_by_uploader ON media (uploader, created_ts) WHERE uploader IS NOT NULL;
CREATE INDEX media_pending ON media (pending_expires_ts) WHERE pending_expires_ts IS NOT NULL;
CREATE INDEX media_remote_access ON media (last_access_ts) WHERE uploader IS NULL;

CREATE TABLE media_thumbnails (
    server_name  TEXT    NOT NULL,
    media_id     TEXT    NOT NULL,
    width        INTEGER NOT NULL,
    height       INTEGER NOT NULL,
    method       TEXT    NOT NULL,
    content_type TEXT    NOT NULL,
    size         BIGINT  NOT NULL,
    storage_key  TEXT    NOT NULL,
    created_ts   BIGINT  NOT NULL,
    PRIMARY KEY (server_name, media_id, width, height, method),
    FOREIGN KEY (server_name, media_id) REFERENCES media (server_name, media_id) ON DELETE CASCADE
);

CREATE TABLE media_url_previews (
    url        TEXT   PRIMARY KEY,
    og         JSONB  NOT NULL,
    fetched_ts BIGINT NOT NULL,
    expires_ts BIGINT NOT NULL
);

CREATE INDEX media_url_previews_expiry ON media_url_previews (expires_ts);
