-- Federation (issue 13): rooms shared with other servers.

-- Outliers: events this server holds without their place in the room's timeline (the state and
-- auth chain a resident server returned on a join, the state at a remote event whose
-- predecessors are unknown). They have no stream position, so no timeline, sync or pagination
-- query (all of which select a range of positions) ever returns them; state groups, current
-- state and auth checks use them like any other event.
ALTER TABLE events ALTER COLUMN stream_ordering DROP NOT NULL;

-- Where a room's events go: one row per (destination server, event or EDU) to send, written in
-- the transaction that appended the event, deleted once the destination acknowledged the
-- transaction that carried it. A destination that is down keeps its rows (catch-up on return).
CREATE TABLE federation_outbox (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination TEXT NOT NULL,
    event_nid   BIGINT REFERENCES events (event_nid) ON DELETE CASCADE,
    -- An EDU (typing, receipt, device list update, to-device), as JSON, when event_nid is NULL.
    edu         JSONB,
    created_ts  BIGINT NOT NULL,
    CHECK ((event_nid IS NULL) <> (edu IS NULL))
);
CREATE INDEX federation_outbox_destination ON federation_outbox (destination, seq);

-- Back-off per destination, so that a restart does not hammer a server that is down.
CREATE TABLE federation_destinations (
    destination    TEXT PRIMARY KEY,
    failures       INTEGER NOT NULL DEFAULT 0,
    retry_after_ts BIGINT NOT NULL DEFAULT 0,
    last_success_ts BIGINT
);

-- Inbound transactions already processed: a retried `/send/{txnId}` gets the same answer.
CREATE TABLE federation_inbound_txns (
    origin     TEXT NOT NULL,
    txn_id     TEXT NOT NULL,
    response   JSONB NOT NULL,
    created_ts BIGINT NOT NULL,
    PRIMARY KEY (origin, txn_id)
);
CREATE INDEX federation_inbound_txns_created ON federation_inbound_txns (created_ts);

-- Invites received from other servers for rooms this server is not in: the stripped state the
-- inviting server sent, shown in the invitee's sync.
ALTER TABLE room_memberships ADD COLUMN invite_room_state JSONB;

-- Events fetched from other servers' history (`/backfill`, when a client pages back past the
-- room's local beginning) take positions counting down from -1: before every event of the
-- stream, so that they are history to `/messages` and never new to `/sync`.
CREATE SEQUENCE event_backfill_seq;
