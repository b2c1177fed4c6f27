-- Per-user export jobs (issue 19, records): started through the admin API, run in the background
-- by the instance that accepted them, readable from any instance. The archive itself is a file
-- under `records.export_dir`; rows are kept after their file expires, as the record of who was
-- exported, when and at whose request.
CREATE TABLE user_exports (
    export_id     TEXT    PRIMARY KEY,
    user_id       TEXT    NOT NULL,
    requested_by  TEXT    NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed', 'expired')),
    error         TEXT,
    created_ts    BIGINT  NOT NULL,
    started_ts    BIGINT,
    finished_ts   BIGINT,
    -- Refreshed by the instance running (or waiting to run) the job; a pending or running job
    -- whose heartbeat stops was interrupted (its process died) and is marked failed.
    heartbeat_ts  BIGINT  NOT NULL,
    -- When the archive of a finished export is deleted.
    expires_ts    BIGINT,
    -- The archive's file name under records.export_dir, once done.
    file_name     TEXT,
    size_bytes    BIGINT,
    rooms_total   BIGINT  NOT NULL DEFAULT 0,
    rooms_done    BIGINT  NOT NULL DEFAULT 0,
    events        BIGINT  NOT NULL DEFAULT 0,
    media_files   BIGINT  NOT NULL DEFAULT 0,
    media_skipped BIGINT  NOT NULL DEFAULT 0
);

-- One export per user at a time, whichever instance is asked: a second insert conflicts.
CREATE UNIQUE INDEX user_exports_one_active ON user_exports (user_id) WHERE status IN ('pending', 'running');
CREATE INDEX user_exports_user ON user_exports (user_id, created_ts);
CREATE INDEX user_exports_expiry ON user_exports (expires_ts) WHERE status = 'done';
