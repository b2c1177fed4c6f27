-- One user's membership history in a room (history visibility of users who are not joined:
-- departed members, invitees) is read with one index range scan, not a scan of the room's events.
CREATE INDEX events_room_member ON events (room_nid, state_key, stream_ordering) WHERE event_type = 'm.room.member';
