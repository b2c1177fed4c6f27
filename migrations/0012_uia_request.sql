-- Issue 11, accounts part.

-- A UIA session is bound to the request that started it: SHA-256 of the method, the path and
-- the canonical JSON body without `auth`. A later step with another request is refused.
-- Sessions from before this migration have none and can no longer be completed (they expire
-- within minutes anyway).
ALTER TABLE uia_sessions ADD COLUMN request_hash BYTEA;

-- A sender's annotations of an event, for refusing a second identical reaction
-- (`M_DUPLICATE_ANNOTATION`) with one index lookup.
CREATE INDEX events_annotations ON events (relates_to, sender) WHERE rel_type = 'm.annotation';
