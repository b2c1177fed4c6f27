-- Presence: the last state each local user set, with a stream position for sync.
CREATE SEQUENCE presence_stream_seq;

CREATE TABLE presence (
    user_id         TEXT PRIMARY KEY REFERENCES users (user_id) ON DELETE CASCADE,
    state           TEXT NOT NULL,         -- online | unavailable | offline
    status_msg      TEXT,
    last_active_ts  BIGINT NOT NULL,
    stream_ordering BIGINT NOT NULL
);
CREATE INDEX presence_stream ON presence (stream_ordering);
