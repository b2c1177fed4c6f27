-- Simplified sliding sync (MSC4186, issue 15): connection state, so that a request carrying a
-- `pos` can be answered by any instance. A connection is (user, device, conn_id); each position
-- it was handed is a row with what the client had received at that point (the per-stream token,
-- per room what was sent and with which parameters, per list a digest of its window). Positions
-- are immutable: a request with `pos` N builds from row N and, if anything is new, inserts row
-- N' and deletes the rows before N (the client has acknowledged N by using it); N itself stays,
-- so a retried request (its response lost) is answered again.
CREATE TABLE sliding_sync_connections (
    conn_nid     BIGSERIAL PRIMARY KEY,
    user_id      TEXT   NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    device_id    TEXT   NOT NULL,
    conn_id      TEXT   NOT NULL,
    created_ts   BIGINT NOT NULL,
    last_used_ts BIGINT NOT NULL,
    UNIQUE (user_id, device_id, conn_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);

CREATE TABLE sliding_sync_positions (
    pos_id     BIGSERIAL PRIMARY KEY,
    conn_nid   BIGINT NOT NULL REFERENCES sliding_sync_connections (conn_nid) ON DELETE CASCADE,
    created_ts BIGINT NOT NULL,
    state      JSONB  NOT NULL
);

CREATE INDEX sliding_sync_positions_conn ON sliding_sync_positions (conn_nid, pos_id);
-- Housekeeping deletes connections unused for a week.
CREATE INDEX sliding_sync_connections_used ON sliding_sync_connections (last_used_ts);
