-- Several instances on one database (issue 20). See ARCHITECTURE.md, "Several instances".

-- The instances alive: each one inserts its row at start-up, refreshes `heartbeat_ts` every few
-- seconds and deletes it on a clean shutdown. An instance whose heartbeat is older than a few
-- periods is dead (its connections, hence its transactions and leases, are gone with it).
CREATE TABLE cluster_instances (
    instance_id  TEXT   PRIMARY KEY,
    started_ts   BIGINT NOT NULL,
    heartbeat_ts BIGINT NOT NULL
);

-- The event stream's frontier, for the cross-instance sync watermark. Every transaction that
-- takes event stream positions first takes the shared advisory lock 0x50617277_00000000
-- (`rooms::lock_room`) and keeps it until it ends. Read in this order, in one call:
--   1. `stream`: the highest position handed out by the sequence so far;
--   2. `writers`: the virtual transaction IDs of the transactions holding that lock now.
-- Every position up to `stream` was taken by a transaction that held the lock before (2) was
-- read: it is either finished (committed or rolled back) or one of `writers`. So once none of
-- `writers` holds the lock any more, every position up to `stream` has committed or never will.
-- The sequence is `CACHE 1` (the default): a cached block would let a backend hand out a position
-- below `stream` after (1).
--
-- The serialised streams (each writer holds an exclusive advisory lock while it takes and commits
-- its position) are safe at their highest committed position, returned as is.
CREATE FUNCTION parvis_stream_frontier(
    OUT events bigint,
    OUT writers text[],
    OUT account_data bigint,
    OUT receipts bigint,
    OUT presence bigint,
    OUT device_lists bigint,
    OUT to_device bigint
) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO events FROM event_stream_seq;
    SELECT COALESCE(array_agg(l.virtualtransaction), '{}') INTO writers
    FROM pg_locks l
    WHERE l.locktype = 'advisory'
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = 1348563575 AND l.objid = 0 AND l.objsubid = 1
      AND l.granted;
    SELECT COALESCE(MAX(stream_ordering), 0) INTO account_data FROM account_data;
    SELECT COALESCE(MAX(stream_ordering), 0) INTO receipts FROM receipts;
    SELECT COALESCE(MAX(stream_ordering), 0) INTO presence FROM presence;
    SELECT COALESCE(MAX(stream_ordering), 0) INTO device_lists FROM device_list_changes;
    SELECT COALESCE(MAX(stream_ordering), 0) INTO to_device FROM to_device_messages;
END
$$;
