-- One-time keys are handed out in the order they were uploaded (spec v1.13, MSC4225): keys of
-- one upload share no order among themselves, later uploads come after earlier ones.
CREATE SEQUENCE one_time_keys_upload_seq;
ALTER TABLE one_time_keys ADD COLUMN upload_seq BIGINT NOT NULL DEFAULT nextval('one_time_keys_upload_seq');
CREATE INDEX one_time_keys_claim_order ON one_time_keys (user_id, device_id, algorithm, upload_seq);
