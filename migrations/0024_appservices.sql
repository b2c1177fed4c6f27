-- Application services (issue 17): the durable delivery state of each registered appservice.
-- `stream_position`: every event up to it was either skipped (no interest) or put into a
-- transaction row below; `next_txn_id`: the ID the next transaction gets (IDs never repeat for an
-- appservice, so it can deduplicate by them).
CREATE TABLE appservice_state (
    as_id            TEXT    PRIMARY KEY,
    stream_position  BIGINT  NOT NULL,
    next_txn_id      BIGINT  NOT NULL DEFAULT 1
);

-- Transactions built but not yet acknowledged by the appservice. A row is written in the same
-- database transaction that moves `stream_position` past its events, and deleted only after the
-- appservice answered 2xx: a restart resends it with the same ID (at least once, never lost).
CREATE TABLE appservice_txns (
    as_id       TEXT    NOT NULL,
    txn_id      BIGINT  NOT NULL,
    body        JSONB   NOT NULL,
    -- How many events of each kind it carries (metrics, logs).
    event_count INT     NOT NULL,
    created_ts  BIGINT  NOT NULL,
    PRIMARY KEY (as_id, txn_id)
);
