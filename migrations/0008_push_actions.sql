-- Push actions: for every event that notifies a local user (its push rules gave `notify`), one row
-- per (user, event). They feed the unread notification counts of /sync, GET /notifications and
-- the push gateway's badge count. Events that notify nobody leave no row.
--
-- No foreign keys: a message in a room of N members writes N-1 rows in the send transaction, and
-- neither rooms nor events are ever deleted.
CREATE TABLE event_push_actions (
    user_id         TEXT NOT NULL,
    room_nid        BIGINT NOT NULL,
    event_nid       BIGINT NOT NULL,
    -- The event's position in the event stream (events.stream_ordering); receipts compare to it.
    stream_ordering BIGINT NOT NULL,
    -- 'main' for the main timeline, else the thread root's event ID (m.relates_to, rel_type m.thread).
    thread_id       TEXT NOT NULL,
    notify          BOOLEAN NOT NULL,
    highlight       BOOLEAN NOT NULL,
    -- The actions of the rule that matched, as the spec's JSON (GET /notifications returns them).
    actions         JSONB NOT NULL,
    -- When the notification was generated (ms since the epoch).
    ts              BIGINT NOT NULL,
    -- Unread counts: the rows of one user in one room above a stream position.
    PRIMARY KEY (user_id, room_nid, stream_ordering)
);
-- GET /notifications: one user's notifications, newest first, across rooms.
CREATE INDEX event_push_actions_user_stream ON event_push_actions (user_id, stream_ordering);
