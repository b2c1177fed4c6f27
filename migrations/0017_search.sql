-- Full-text search of room events (`POST /search`, issue 19).
--
-- One text search configuration per supported language, `parvis_<language>`: PostgreSQL's own
-- configuration with `unaccent` before the stemmer, so « réunion », « Réunion » and « reunion »
-- are one lexeme. `search.language` picks one (see `search::LANGUAGES`). `unaccent` is a trusted
-- extension (PostgreSQL 13+): a database owner may create it.
CREATE EXTENSION IF NOT EXISTS unaccent;

DO $$
DECLARE
    lang text;
BEGIN
    FOREACH lang IN ARRAY ARRAY['simple', 'english', 'french', 'german', 'spanish', 'italian', 'dutch', 'portuguese']
    LOOP
        EXECUTE format('CREATE TEXT SEARCH CONFIGURATION parvis_%s (COPY = pg_catalog.%s)', lang, lang);
        EXECUTE format(
            'ALTER TEXT SEARCH CONFIGURATION parvis_%s ALTER MAPPING FOR hword, hword_part, word WITH unaccent, %s',
            lang, CASE WHEN lang = 'simple' THEN 'simple' ELSE lang || '_stem' END);
    END LOOP;
END
$$;

-- OR and AND of several queries (one per word of a search term).
CREATE AGGREGATE parvis_tsquery_or (tsquery) (SFUNC = tsquery_or, STYPE = tsquery);
CREATE AGGREGATE parvis_tsquery_and (tsquery) (SFUNC = tsquery_and, STYPE = tsquery);

-- The searchable text of an event: `content.body` of messages, `content.name` and
-- `content.topic` of the room's name and topic. Written with the event (same statement);
-- removed when the event is redacted. `sender` and `event_type` are copied so filters need no
-- join.
CREATE TABLE event_search (
    event_nid       BIGINT PRIMARY KEY REFERENCES events (event_nid) ON DELETE CASCADE,
    room_nid        BIGINT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    key             TEXT NOT NULL,
    sender          TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    vector          TSVECTOR NOT NULL
);
CREATE INDEX event_search_vector ON event_search USING GIN (vector);
CREATE INDEX event_search_room_stream ON event_search (room_nid, stream_ordering);

-- Events written before this migration, indexed in French (the default); a server configured
-- for another language re-indexes at start-up (`search_language` in `server_meta`).
INSERT INTO event_search (event_nid, room_nid, stream_ordering, key, sender, event_type, vector)
SELECT e.event_nid, e.room_nid, e.stream_ordering, k.key, e.sender, e.event_type,
       to_tsvector('parvis_french', k.text)
FROM events e
CROSS JOIN LATERAL (
    SELECT CASE e.event_type WHEN 'm.room.message' THEN 'content.body'
                             WHEN 'm.room.name' THEN 'content.name'
                             ELSE 'content.topic' END AS key,
           (e.json::jsonb -> 'content') ->> CASE e.event_type WHEN 'm.room.message' THEN 'body'
                                                               WHEN 'm.room.name' THEN 'name'
                                                               ELSE 'topic' END AS text
) k
WHERE e.event_type IN ('m.room.message', 'm.room.name', 'm.room.topic')
  AND e.redacted_by IS NULL AND k.text IS NOT NULL AND k.text <> '';
INSERT INTO server_meta (key, value) VALUES ('search_language', 'french') ON CONFLICT DO NOTHING;
