-- Server notices (issue 17): the room in which each user receives them from the system user
-- (`server_notices.system_mxid_localpart`), tagged `m.server_notice` for them. A user who left
-- theirs gets a new one with the next notice.
CREATE TABLE server_notice_rooms (
    user_id     TEXT    PRIMARY KEY REFERENCES users (user_id) ON DELETE CASCADE,
    room_id     TEXT    NOT NULL,
    created_ts  BIGINT  NOT NULL
);
