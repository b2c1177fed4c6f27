-- End-to-end encryption: the server stores and routes keys, never plaintext.

-- Device identity keys, as uploaded and signed by the device (self-signatures and signatures by
-- the owner's self-signing key merged in).
CREATE TABLE device_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    keys      JSONB NOT NULL,
    PRIMARY KEY (user_id, device_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);

-- One-time keys: each is handed out once (claimed = deleted).
CREATE TABLE one_time_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id    TEXT NOT NULL,
    key_json  JSONB NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm, key_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);

-- Fallback keys: one per algorithm and device, handed out when one-time keys run out (and kept).
CREATE TABLE fallback_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id    TEXT NOT NULL,
    key_json  JSONB NOT NULL,
    used      BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, device_id, algorithm),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);

-- Cross-signing keys: 'master', 'self_signing', 'user_signing' (signatures by the owner merged in).
CREATE TABLE cross_signing_keys (
    user_id  TEXT NOT NULL,
    key_type TEXT NOT NULL,
    key_json JSONB NOT NULL,
    PRIMARY KEY (user_id, key_type)
);

-- Signatures a user made on another user's master key with their user-signing key: only the
-- signer sees them.
CREATE TABLE cross_user_signatures (
    signer_user_id TEXT NOT NULL,
    signer_key_id  TEXT NOT NULL,
    target_user_id TEXT NOT NULL,
    target_key_id  TEXT NOT NULL,
    signature      TEXT NOT NULL,
    PRIMARY KEY (signer_user_id, target_user_id, target_key_id, signer_key_id)
);

-- The device-list stream: a row per change of a user's devices or keys.
CREATE SEQUENCE device_list_stream_seq;
CREATE TABLE device_list_changes (
    stream_ordering BIGINT PRIMARY KEY,
    user_id         TEXT NOT NULL
);
CREATE INDEX device_list_changes_user ON device_list_changes (user_id, stream_ordering);

-- To-device messages waiting for their device; deleted once the device acknowledges them (its
-- next sync token is past them).
CREATE SEQUENCE to_device_stream_seq;
CREATE TABLE to_device_messages (
    stream_ordering  BIGINT PRIMARY KEY,
    recipient_user   TEXT NOT NULL,
    recipient_device TEXT NOT NULL,
    sender           TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    content          JSONB NOT NULL,
    created_ts       BIGINT NOT NULL
);
CREATE INDEX to_device_recipient ON to_device_messages (recipient_user, recipient_device, stream_ordering);

CREATE TABLE to_device_txns (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    txn_id     TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
);

-- Server-side key backup.
CREATE TABLE room_key_backups (
    user_id   TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    version   BIGINT NOT NULL,
    algorithm TEXT NOT NULL,
    auth_data JSONB NOT NULL,
    -- Bumped on every change of the keys: clients compare etags.
    etag      BIGINT NOT NULL DEFAULT 0,
    deleted   BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, version)
);

CREATE TABLE room_keys (
    user_id             TEXT NOT NULL,
    version             BIGINT NOT NULL,
    room_id             TEXT NOT NULL,
    session_id          TEXT NOT NULL,
    first_message_index BIGINT NOT NULL,
    forwarded_count     BIGINT NOT NULL,
    is_verified         BOOLEAN NOT NULL,
    session_data        JSONB NOT NULL,
    PRIMARY KEY (user_id, version, room_id, session_id),
    FOREIGN KEY (user_id, version) REFERENCES room_key_backups (user_id, version) ON DELETE CASCADE
);
