//! A PDU as the room engine handles it: parsed enough for the authorization rules, with the
//! exact canonical JSON kept alongside.

use ruma::events::TimelineEventType;
use ruma::{EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Debug, Clone)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    /// `None` only for a v12 `m.room.create`, whose room ID is derived from its own hash.
    pub room_id: Option<OwnedRoomId>,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub kind: TimelineEventType,
    pub content: Box<RawValue>,
    pub state_key: Option<String>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub redacts: Option<OwnedEventId>,
    pub depth: i64,
    pub rejected: bool,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(rename = "type")]
    kind: TimelineEventType,
    room_id: Option<OwnedRoomId>,
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    content: Box<RawValue>,
    state_key: Option<String>,
    #[serde(default)]
    prev_events: Vec<OwnedEventId>,
    #[serde(default)]
    auth_events: Vec<OwnedEventId>,
    redacts: Option<OwnedEventId>,
    #[serde(default)]
    depth: i64,
}

impl Pdu {
    /// Parses a stored or freshly built PDU (canonical JSON text).
    pub fn parse(event_id: &str, json: &str) -> Result<Self, String> {
        let w: Wire = serde_json::from_str(json).map_err(|e| format!("invalid PDU {event_id}: {e}"))?;
        Ok(Self {
            event_id: EventId::parse(event_id).map_err(|e| e.to_string())?,
            room_id: w.room_id,
            sender: w.sender,
            origin_server_ts: w.origin_server_ts,
            kind: w.kind,
            content: w.content,
            state_key: w.state_key,
            prev_events: w.prev_events,
            auth_events: w.auth_events,
            redacts: w.redacts,
            depth: w.depth,
            rejected: false,
        })
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.room_id.as_deref()
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        self.rejected
    }
}
