-- Client transaction IDs are scoped to the device AND the request's path (the spec): the same
-- txn ID used for a send into another room, another event type or a redaction is another
-- transaction. Rows from before this migration keep an empty scope (they only ever dedupe
-- retries of requests made before the upgrade, which no longer match anything).
ALTER TABLE event_txns ADD COLUMN scope TEXT NOT NULL DEFAULT '';
ALTER TABLE event_txns DROP CONSTRAINT event_txns_pkey;
ALTER TABLE event_txns ADD PRIMARY KEY (user_id, device_id, scope, txn_id);
ALTER TABLE event_txns ALTER COLUMN scope DROP DEFAULT;

-- Push delivery resumes after a restart: each pusher records the event-stream position up to
-- which its notifications were delivered (or given up). Existing pushers start at the newest
-- notification (nothing old is re-sent on upgrade).
ALTER TABLE pushers ADD COLUMN last_stream_ordering BIGINT NOT NULL DEFAULT 0;
UPDATE pushers SET last_stream_ordering = (SELECT COALESCE(MAX(stream_ordering), 0) FROM event_push_actions);
