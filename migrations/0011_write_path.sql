-- Client transaction IDs are scoped to the device AND the request's path (the spec): the same
-- txn ID used for a send into another room, another event type or a redaction is another
-- transaction. Rows from before this migration keep an empty scope (they only ever dedupe
-- retries of requests made before the upgrade, which no longer match anything).
ALTER TABLE event_txns ADD COLUMN scope TEXT NOT NULL DEFAULT '';
ALTER TABLE event_txns DROP CONSTRAINT event_txns_pkey;
ALTER TABLE event_txns ADD PRIMARY KEY (user_id, device_id, scope, txn_id);
ALTER TABLE event_txns ALTER COLUMN scope DROP DEFAULT;
