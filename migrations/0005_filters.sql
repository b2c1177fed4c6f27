-- Client filters (POST /user/{userId}/filter), referenced later by /sync and /messages.
CREATE TABLE user_filters (
    filter_nid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    filter     JSONB NOT NULL
);
CREATE INDEX user_filters_user ON user_filters (user_id);
