-- Per-user data that /sync delivers outside the timeline: account data (global and per room,
-- including room tags `m.tag` and the fully-read marker `m.fully_read`) and read receipts.
-- Each kind has its own stream: every write takes the next value of its sequence, so sync can
-- ask "what changed since position X". Writers of one stream are serialised (advisory lock, see
-- storage), so the highest committed position is a safe watermark: nothing below it can commit
-- later.

CREATE SEQUENCE account_data_stream_seq;

CREATE TABLE account_data (
    user_id         TEXT NOT NULL,
    -- '' for global account data.
    room_id         TEXT NOT NULL DEFAULT '',
    data_type       TEXT NOT NULL,
    content         JSONB NOT NULL,
    stream_ordering BIGINT NOT NULL,
    PRIMARY KEY (user_id, room_id, data_type)
);
CREATE INDEX account_data_user_stream ON account_data (user_id, stream_ordering);
CREATE INDEX account_data_stream ON account_data (stream_ordering);

CREATE SEQUENCE receipt_stream_seq;

CREATE TABLE receipts (
    room_nid        BIGINT NOT NULL REFERENCES rooms (room_nid),
    user_id         TEXT NOT NULL,
    receipt_type    TEXT NOT NULL,
    -- '' for an unthreaded receipt, else 'main' or a thread root event ID.
    thread_id       TEXT NOT NULL DEFAULT '',
    event_id        TEXT NOT NULL,
    -- The receipted event's position in the event stream: receipts never move backwards.
    event_stream    BIGINT NOT NULL,
    ts              BIGINT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    PRIMARY KEY (room_nid, user_id, receipt_type, thread_id)
);
CREATE INDEX receipts_room_stream ON receipts (room_nid, stream_ordering);
CREATE INDEX receipts_stream ON receipts (stream_ordering);
