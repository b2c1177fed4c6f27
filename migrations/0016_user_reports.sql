-- Reports about a user (spec v1.14, `POST /users/{userId}/report`).
CREATE TABLE user_reports (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target_user TEXT NOT NULL,
    reporter    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    received_ts BIGINT NOT NULL
);
CREATE INDEX user_reports_target ON user_reports (target_user, id);
