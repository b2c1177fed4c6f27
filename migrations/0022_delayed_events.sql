-- Delayed events (MSC4140, issue 18): an event a user schedules now, which the server sends into
-- the room later unless it is cancelled or restarted first (Element Call's "leave the call if my
-- client disappears"). Rows stay after they are finalised (sent, cancelled, failed) for
-- `delayed_events.finalised_retention_secs`, so that clients can list what became of them.
CREATE TABLE delayed_events (
    -- Random, unguessable: knowing it is what lets a service manage the event (MSC4140).
    delay_id       TEXT     PRIMARY KEY,
    user_id        TEXT     NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    device_id      TEXT,
    room_id        TEXT     NOT NULL,
    event_type     TEXT     NOT NULL,
    -- NULL for a message event.
    state_key      TEXT,
    content        JSONB    NOT NULL,
    delay_ms       BIGINT   NOT NULL,
    -- When it was scheduled or last restarted; it is due at running_since + delay_ms.
    running_since  BIGINT   NOT NULL,
    send_ts        BIGINT   NOT NULL,
    status         TEXT     NOT NULL CHECK (status IN ('scheduled', 'finalised')),
    -- For finalised rows: 'send', 'cancel' or 'error'; and why: 'action' (a request), 'delay'
    -- (its time came) or 'overwritten' (another user changed the same state).
    outcome        TEXT     CHECK (outcome IN ('send', 'cancel', 'error')),
    reason         TEXT,
    error          JSONB,
    event_id       TEXT,
    finalised_ts   BIGINT,
    -- The scheduling request's transaction, so that a retried PUT schedules nothing new.
    txn_scope      TEXT,
    txn_id         TEXT
);

-- The due events, earliest first (the sender task).
CREATE INDEX delayed_events_due ON delayed_events (send_ts) WHERE status = 'scheduled';
-- A user's events (listing, the per-user limit).
CREATE INDEX delayed_events_user ON delayed_events (user_id, send_ts);
-- Scheduled state events for one state entry (cancelled when someone else overwrites it).
CREATE INDEX delayed_events_state ON delayed_events (room_id, event_type, state_key)
    WHERE status = 'scheduled' AND state_key IS NOT NULL;
-- Retries of a scheduling request.
CREATE UNIQUE INDEX delayed_events_txn ON delayed_events (user_id, device_id, txn_scope, txn_id)
    WHERE txn_id IS NOT NULL;
-- Finalised rows past their retention are deleted by housekeeping.
CREATE INDEX delayed_events_finalised ON delayed_events (finalised_ts) WHERE status = 'finalised';
