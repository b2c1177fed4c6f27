-- User directory and abuse reports.

-- One row per searchable local user. `search_text` is the user ID and display name, lower-cased
-- with accents removed ("Hélène" is found by "helene"), maintained by the server.
CREATE TABLE user_directory (
    user_id      TEXT PRIMARY KEY REFERENCES users (user_id) ON DELETE CASCADE,
    display_name TEXT,
    avatar_url   TEXT,
    search_text  TEXT NOT NULL
);

CREATE TABLE reports (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    room_id     TEXT NOT NULL,
    event_id    TEXT,                    -- NULL for a report about the whole room
    reporter    TEXT NOT NULL,
    reason      TEXT,
    score       INTEGER,
    received_ts BIGINT NOT NULL
);

-- Existing accounts enter the directory.
INSERT INTO user_directory (user_id, display_name, avatar_url, search_text)
SELECT u.user_id, p.fields ->> 'displayname', p.fields ->> 'avatar_url',
       lower(u.user_id || ' ' || coalesce(p.fields ->> 'displayname', ''))
FROM users u JOIN profiles p ON p.user_id = u.user_id
WHERE NOT u.deactivated;
