//! PDUs from other servers, checked before they touch anything
//! (<https://spec.matrix.org/latest/server-server-api/#checks-performed-on-receipt-of-a-pdu>,
//! steps 1 to 3): the room version's event format and size limits, the signatures of every
//! server that must have signed (the sender's, and for a restricted join the authorising
//! user's), and the content hash, a mismatch of which makes the event count as redacted. The
//! event ID is computed here (the reference hash): an ID sent along is never trusted.
//!
//! Authorization (steps 4 to 6) needs the room's state and is the room engine's
//! (`rooms::remote`).

use ruma::room_version_rules::RoomVersionRules;
use ruma::serde::Base64;
use ruma::signatures::{PublicKeyMap, PublicKeySet, Verified};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, EventId, OwnedEventId, ServerName};
use serde_json::Value;

use crate::rooms::pdu::Pdu;
use crate::state::AppState;

/// A remote PDU that passed the checks of this module.
#[derive(Debug, Clone)]
pub struct Checked {
    pub event_id: OwnedEventId,
    /// Canonical JSON as stored and served (redacted when its content hash did not match).
    pub json: String,
    pub pdu: Pdu,
}

/// Why a PDU was refused.
#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error("malformed PDU: {0}")]
    Format(String),
    #[error("PDU is for room {0}, not this one")]
    WrongRoom(String),
    #[error("signature check failed: {0}")]
    Signature(String),
}

/// Turns a JSON value into canonical JSON (floats and integers beyond ±2^53 are refused) and
/// drops the fields no server may set for another: `event_id` (computed here) and `unsigned`.
pub fn canonical(value: &Value) -> Result<CanonicalJsonObject, PduError> {
    match CanonicalJsonValue::try_from(value.clone()) {
        Ok(CanonicalJsonValue::Object(mut o)) => {
            o.remove("event_id");
            o.remove("unsigned");
            Ok(o)
        }
        Ok(_) => Err(PduError::Format("not a JSON object".into())),
        Err(e) => Err(PduError::Format(format!("not canonical JSON: {e}"))),
    }
}

/// The event ID of a PDU of a room with these rules (v3+ rooms: `$` + the reference hash).
pub fn event_id(obj: &CanonicalJsonObject, rules: &RoomVersionRules) -> Result<OwnedEventId, PduError> {
    let hash = ruma::signatures::reference_hash(obj, rules).map_err(|e| PduError::Format(e.to_string()))?;
    EventId::new_v2_or_v3(&hash).map_err(|e| PduError::Format(e.to_string()))
}

/// Checks a PDU received from another server for the room `room_id` (`None`: a v12
/// `m.room.create`, whose room ID is its own event ID). Fetches the signing keys it needs.
pub async fn check(
    state: &AppState,
    rules: &RoomVersionRules,
    room_id: Option<&str>,
    value: &Value,
) -> Result<Checked, PduError> {
    let mut obj = canonical(value)?;
    ruma::state_res::check_pdu_format(&obj, &rules.event_format).map_err(PduError::Format)?;
    let pdu_room = obj.get("room_id").and_then(|v| v.as_str()).map(str::to_owned);
    // v12: a create event has no room ID; the room's ID is derived from the event's own.
    let v12_create = pdu_room.is_none() && !rules.event_format.require_room_create_room_id;
    if let Some(expected) = room_id
        && !v12_create
        && pdu_room.as_deref() != Some(expected)
    {
        return Err(PduError::WrongRoom(pdu_room.unwrap_or_default()));
    }
    let keys = signing_keys(state, &obj, rules).await?;
    match ruma::signatures::verify_event(&keys, &obj, rules) {
        Ok(Verified::All) => {}
        Ok(Verified::Signatures) => {
            // Signed but the content does not match its hash: keep only the redacted form.
            obj = ruma::canonical_json::redact(obj, &rules.redaction, None)
                .map_err(|e| PduError::Format(e.to_string()))?;
        }
        Err(e) => return Err(PduError::Signature(e.to_string())),
    }
    let event_id = event_id(&obj, rules)?;
    if v12_create
        && let Some(expected) = room_id
        && expected.strip_prefix('!') != event_id.as_str().strip_prefix('$')
    {
        return Err(PduError::WrongRoom(format!("create event {event_id}")));
    }
    let json = serde_json::to_string(&obj).map_err(|e| PduError::Format(e.to_string()))?;
    let pdu = Pdu::parse(event_id.as_str(), &json).map_err(PduError::Format)?;
    if pdu.depth < 0 {
        return Err(PduError::Format("negative depth".into()));
    }
    Ok(Checked { event_id, json, pdu })
}

/// Most signing keys looked up for one PDU (each server signs with one key in practice).
const MAX_KEYS_PER_SERVER: usize = 4;

/// The public keys of every server whose signature the PDU needs, for the key IDs it names.
async fn signing_keys(
    state: &AppState,
    obj: &CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<PublicKeyMap, PduError> {
    let servers = ruma::signatures::required_server_signatures_to_verify_event(obj, &rules.signatures)
        .map_err(|e| PduError::Signature(e.to_string()))?;
    let ts = match obj.get("origin_server_ts") {
        Some(CanonicalJsonValue::Integer(i)) => i64::from(*i),
        _ => return Err(PduError::Format("origin_server_ts is not an integer".into())),
    };
    let Some(CanonicalJsonValue::Object(signatures)) = obj.get("signatures") else {
        return Err(PduError::Signature("no signatures".into()));
    };
    let mut map = PublicKeyMap::new();
    for server in servers {
        let Some(CanonicalJsonValue::Object(sigs)) = signatures.get(server.as_str()) else {
            return Err(PduError::Signature(format!("not signed by {server}")));
        };
        let mut set = PublicKeySet::new();
        for key_id in sigs.keys().filter(|k| k.starts_with("ed25519:")).take(MAX_KEYS_PER_SERVER) {
            if !crate::federation::auth::valid_key_id(key_id) {
                continue;
            }
            if let Some(key) = super::keys::event_key(state, &server, key_id, ts).await {
                set.insert(key_id.clone(), Base64::new(key.as_bytes().to_vec()));
            }
        }
        if set.is_empty() {
            return Err(PduError::Signature(format!("no usable key of {server}")));
        }
        map.insert(server.to_string(), set);
    }
    Ok(map)
}

/// The server an event comes from: its sender's.
pub fn sender_server(pdu: &Pdu) -> &ServerName {
    pdu.sender.server_name()
}
