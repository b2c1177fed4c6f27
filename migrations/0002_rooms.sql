-- Rooms and events: the DAG of signed PDUs, state as delta-compressed groups, current state,
-- memberships, forward extremities, client transaction IDs, aliases.

-- The global position of every accepted event in the sync stream.
CREATE SEQUENCE event_stream_seq;

CREATE TABLE rooms (
    room_nid            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    room_id             TEXT NOT NULL UNIQUE,
    room_version        TEXT NOT NULL,
    creator             TEXT NOT NULL,
    -- Published in the public room directory.
    is_public           BOOLEAN NOT NULL DEFAULT FALSE,
    -- State group of the current state (materialised in current_state).
    current_state_group BIGINT,
    created_ts          BIGINT NOT NULL
);

-- Interned (event type, state key) pairs.
CREATE TABLE state_keys (
    key_nid    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_type TEXT NOT NULL,
    state_key  TEXT NOT NULL,
    UNIQUE (event_type, state_key)
);

-- Every event, as the exact canonical JSON that was signed (local) or received (remote).
CREATE TABLE events (
    event_nid        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         TEXT NOT NULL UNIQUE,
    room_nid         BIGINT NOT NULL REFERENCES rooms (room_nid),
    stream_ordering  BIGINT NOT NULL UNIQUE,
    depth            BIGINT NOT NULL,
    event_type       TEXT NOT NULL,
    state_key        TEXT,
    sender           TEXT NOT NULL,
    origin_server_ts BIGINT NOT NULL,
    json             TEXT NOT NULL,
    -- State before and after this event (equal for non-state events).
    state_before     BIGINT,
    state_after      BIGINT,
    -- For m.room.redaction: the redacted event ID; set on the target when redacted.
    redacts          TEXT,
    redacted_by      TEXT,
    -- Relations (m.relates_to), for aggregations.
    rel_type         TEXT,
    relates_to       TEXT,
    -- Local client transaction, for `unsigned.transaction_id`.
    txn_device       TEXT,
    txn_id           TEXT
);
CREATE INDEX events_room_stream ON events (room_nid, stream_ordering);
CREATE INDEX events_room_topo ON events (room_nid, depth, stream_ordering);
CREATE INDEX events_relates ON events (relates_to) WHERE relates_to IS NOT NULL;

CREATE TABLE event_edges (
    event_nid     BIGINT NOT NULL REFERENCES events (event_nid),
    prev_event_id TEXT NOT NULL,
    PRIMARY KEY (event_nid, prev_event_id)
);

CREATE TABLE event_auth (
    event_nid      BIGINT NOT NULL REFERENCES events (event_nid),
    auth_event_nid BIGINT NOT NULL REFERENCES events (event_nid),
    PRIMARY KEY (event_nid, auth_event_nid)
);

-- State groups: a group is its parent's state plus the entries listed here (a delta). A group
-- with no parent lists its whole state. Chains are cut to bound read cost.
CREATE TABLE state_groups (
    group_nid   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    room_nid    BIGINT NOT NULL REFERENCES rooms (room_nid),
    prev_group  BIGINT REFERENCES state_groups (group_nid),
    chain_depth INTEGER NOT NULL
);

CREATE TABLE state_group_entries (
    group_nid BIGINT NOT NULL REFERENCES state_groups (group_nid),
    key_nid   BIGINT NOT NULL REFERENCES state_keys (key_nid),
    event_nid BIGINT NOT NULL REFERENCES events (event_nid),
    PRIMARY KEY (group_nid, key_nid)
);

-- The resolved current state of each room: O(1) to read any entry.
CREATE TABLE current_state (
    room_nid  BIGINT NOT NULL REFERENCES rooms (room_nid),
    key_nid   BIGINT NOT NULL REFERENCES state_keys (key_nid),
    event_nid BIGINT NOT NULL REFERENCES events (event_nid),
    PRIMARY KEY (room_nid, key_nid)
);

-- Current membership per (room, user), denormalised from current_state for fast lookups.
CREATE TABLE room_memberships (
    room_nid        BIGINT NOT NULL REFERENCES rooms (room_nid),
    user_id         TEXT NOT NULL,
    membership      TEXT NOT NULL,
    event_nid       BIGINT NOT NULL REFERENCES events (event_nid),
    stream_ordering BIGINT NOT NULL,
    forgotten       BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (room_nid, user_id)
);
CREATE INDEX room_memberships_user ON room_memberships (user_id, membership);

-- The forward extremities (heads) of each room's DAG, as one row per room: every send replaces
-- them, and an UPDATE of a non-indexed column is a HOT update that leaves no dead index entries
-- (a row per extremity, deleted and re-inserted on every send, made the head lookup scan ever
-- more dead index entries between vacuums).
CREATE TABLE room_extremities (
    room_nid   BIGINT PRIMARY KEY REFERENCES rooms (room_nid),
    event_nids BIGINT[] NOT NULL
);

-- Client transaction IDs: a retried PUT /send returns the same event.
CREATE TABLE event_txns (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    txn_id     TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
);

CREATE TABLE room_aliases (
    alias      TEXT PRIMARY KEY,
    room_nid   BIGINT NOT NULL REFERENCES rooms (room_nid),
    creator    TEXT NOT NULL,
    created_ts BIGINT NOT NULL
);
CREATE INDEX room_aliases_room ON room_aliases (room_nid);
