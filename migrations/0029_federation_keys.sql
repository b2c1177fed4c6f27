-- Federation (issue 13): the signing keys of other servers, as fetched and verified.

-- One row per (server, key): what verifies that server's request and event signatures.
-- `expired_ts` is set for keys a server listed under `old_verify_keys` (valid for signatures
-- made before it, never for requests).
CREATE TABLE federation_server_keys (
    server_name    TEXT NOT NULL,
    key_id         TEXT NOT NULL,          -- "ed25519:abc"
    public_key     TEXT NOT NULL,          -- unpadded base64, 32 bytes
    valid_until_ts BIGINT NOT NULL,
    expired_ts     BIGINT,
    fetched_ts     BIGINT NOT NULL,
    PRIMARY KEY (server_name, key_id)
);

-- The latest verified, self-signed key response of each server, verbatim (canonical JSON), which
-- the notary (`/_matrix/key/v2/query`) serves with its own signature added.
CREATE TABLE federation_key_responses (
    server_name    TEXT PRIMARY KEY,
    response       TEXT NOT NULL,
    valid_until_ts BIGINT NOT NULL,
    fetched_ts     BIGINT NOT NULL
);
