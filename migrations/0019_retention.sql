-- Message retention (MSC1763, `rooms::retention`).
--
-- The purge job looks, per room, for non-state events older than a cut-off: one index range
-- scan, whatever the room's history (state events are never purged, so they are left out of
-- the index, which also keeps it smaller).
CREATE INDEX events_room_ts_nonstate ON events (room_nid, origin_server_ts) WHERE state_key IS NULL;

-- The `mxc://server/media_id` URIs a JSON text mentions, anywhere (as `server/media_id`). Used
-- to tell whether any remaining event still references a piece of media before the purge
-- deletes it: mentions anywhere count (a body quoting a URI keeps the media too), which errs
-- on the side of keeping.
CREATE FUNCTION parvis_mxc_refs(doc TEXT) RETURNS TEXT[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT COALESCE(array_agg(DISTINCT m[1]), '{}')
    FROM pg_catalog.regexp_matches(doc, 'mxc://([A-Za-z0-9.:\[\]-]+/[A-Za-z0-9_-]+)', 'g') AS m
$$;

-- Only events mentioning media are indexed (the predicate is checked before the expression is
-- computed, so other events cost a LIKE at insert time).
CREATE INDEX events_mxc_refs ON events USING GIN (parvis_mxc_refs(json)) WHERE json LIKE '%mxc://%';
