-- Dehydrated devices (MSC3814): a device that lives on the server, with keys like any device,
-- whose private parts (encrypted by the client) are `dehydrated_data`. It is a row of `devices`
-- so that its keys, one-time keys and fallback keys (foreign keys to `devices`), `keys/query`,
-- `keys/claim` and `sendToDevice` treat it as any device, and deleting it (this API,
-- `DELETE /devices/{id}`, `delete_devices`, `logout/all`) removes its keys by cascade.
-- A non-NULL `dehydrated_data` marks the dehydrated device: login never reuses such a row and it
-- has no tokens.
ALTER TABLE devices ADD COLUMN dehydrated_data JSONB;

-- At most one dehydrated device per user.
CREATE UNIQUE INDEX devices_one_dehydrated ON devices (user_id) WHERE dehydrated_data IS NOT NULL;
