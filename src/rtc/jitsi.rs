//! Meeting rooms: a room created with the Jitsi widget Element Web shows at once, as if an agent
//! had pressed Element's "video call" button in it (`WidgetUtils.addJitsiWidget` in Element Web):
//!
//! - `im.vector.modular.widgets`, state key = the widget ID: `type: "jitsi"`, `url` = Element's
//!   `jitsi.html` wrapper with its template variables, `name`, and `data` = `{conferenceId,
//!   domain, isAudioOnly, isVideoChannel, roomName}` plus `auth: "openidtoken-jwt"` when the Jitsi
//!   server verifies Matrix users;
//! - `io.element.widgets.layout`: the widget pinned in the room's top container.
//!
//! The conference ID is Element's: with `openidtoken-jwt`, the room ID in RFC 4648 base32 without
//! padding (upper case, rfc4648's `base32.stringify(..., {pad: false})`), which Jitsi's
//! prosody-mod-auth-matrix-user-verification decodes to find the room whose members may join;
//! otherwise `Jitsi` and 24 random letters, as Element makes them.

use rand::Rng;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::rooms::create::{CreateRoomRequest, create_room};
use crate::rooms::{self, NewEvent, Room};
use crate::state::AppState;

pub const WIDGET_EVENT: &str = "im.vector.modular.widgets";
pub const LAYOUT_EVENT: &str = "io.element.widgets.layout";

/// What a meeting room is created from (`parvis meeting create`, the admin API).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeetingRequest {
    /// The local user who creates (and administers) the room; the caller by default.
    pub creator: Option<String>,
    pub name: String,
    pub topic: Option<String>,
    #[serde(default)]
    pub invite: Vec<String>,
    /// An audio-only conference (Element's "voice call").
    #[serde(default)]
    pub audio_only: bool,
    /// A local alias for the room (`#<name>:<server>`).
    pub room_alias_name: Option<String>,
    /// The room version (`rooms.default_version` by default). Jitsi's verification service reads
    /// moderators from `m.room.power_levels`, where rooms of version 12 do not list their
    /// creators: ask for `"11"` if the creator must be a Jitsi moderator.
    pub room_version: Option<String>,
}

pub struct Meeting {
    pub room_id: String,
    pub widget_id: String,
    pub conference_id: String,
    /// `https://<domain>/<conference ID>`: for guests outside Matrix.
    pub jitsi_url: String,
    pub widget_url: String,
}

impl Meeting {
    pub fn to_json(&self) -> Value {
        json!({
            "room_id": self.room_id,
            "widget_id": self.widget_id,
            "conference_id": self.conference_id,
            "jitsi_url": self.jitsi_url,
            "widget_url": self.widget_url,
        })
    }
}

/// RFC 4648 base32 (upper-case alphabet), without padding.
pub fn base32_nopad(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            out.push(ALPHABET[((buffer >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The conference ID Element gives a room's Jitsi call.
pub fn conference_id(room_id: &str, openid_auth: bool) -> String {
    if openid_auth {
        return base32_nopad(room_id.as_bytes());
    }
    let mut rng = rand::thread_rng();
    let mut id = String::from("Jitsi");
    id.push((b'A' + rng.gen_range(0..26)) as char);
    id.extend((0..23).map(|_| (b'a' + rng.gen_range(0..26)) as char));
    id
}

/// Element's Jitsi wrapper URL with its template variables (filled in by the client), and the
/// `confId` query parameter older clients read.
pub fn widget_url(element_url: &str, conference_id: &str, openid_auth: bool) -> String {
    let base = if element_url.ends_with('/') { element_url.to_owned() } else { format!("{element_url}/") };
    let mut url = format!(
        "{base}jitsi.html?confId={conference_id}#conferenceDomain=$domain&conferenceId=$conferenceId\
         &isAudioOnly=$isAudioOnly&startWithAudioMuted=$startWithAudioMuted\
         &startWithVideoMuted=$startWithVideoMuted&isVideoChannel=$isVideoChannel\
         &displayName=$matrix_display_name&avatarUrl=$matrix_avatar_url&userId=$matrix_user_id\
         &roomId=$matrix_room_id&theme=$theme&roomName=$roomName&supportsScreensharing=true\
         &language=$org.matrix.msc2873.client_language"
    );
    if openid_auth {
        url.push_str("&auth=openidtoken-jwt");
    }
    url
}

/// A widget ID as Element makes them (24 random letters and digits).
fn widget_id() -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..24).map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char).collect()
}

/// Creates a meeting room: the room (through `createRoom`'s pipeline), then the widget and its
/// layout, sent by the creator.
pub async fn create_meeting(state: &AppState, caller: &str, req: MeetingRequest) -> ApiResult<Meeting> {
    let cfg = &state.config.jitsi;
    let Some(domain) = cfg.domain.clone() else {
        return Err(Error::unrecognized("Jitsi is not configured on this server (jitsi.domain)"));
    };
    let name = req.name.trim().to_owned();
    if name.is_empty() || name.len() > 255 {
        return Err(Error::invalid_param("name must be 1 to 255 bytes"));
    }
    if req.topic.as_ref().is_some_and(|t| t.len() > 4096) {
        return Err(Error::invalid_param("topic must be at most 4096 bytes"));
    }
    if req.invite.len() > 100 {
        return Err(Error::invalid_param("at most 100 invitees"));
    }
    let creator = req.creator.clone().unwrap_or_else(|| caller.to_owned());
    let uid = <&ruma::UserId>::try_from(creator.as_str())
        .map_err(|_| Error::invalid_param(format!("Invalid user ID {creator}")))?;
    if uid.server_name().as_str() != state.config.server_name {
        return Err(Error::invalid_param("creator must be a local user"));
    }
    if !crate::storage::users::exists(&state.db, &creator).await? {
        return Err(Error::not_found(format!("Unknown user {creator}")));
    }
    let created = create_room(
        state,
        &creator,
        CreateRoomRequest {
            name: Some(name.clone()),
            topic: req.topic,
            invite: req.invite,
            room_alias_name: req.room_alias_name,
            preset: Some("private_chat".into()),
            room_version: req.room_version,
            ..Default::default()
        },
    )
    .await?;
    let room = Room::load(state, &created.room_id).await?;
    let conference_id = conference_id(&created.room_id, cfg.openid_auth);
    let widget_id = widget_id();
    let url = widget_url(&cfg.element_url, &conference_id, cfg.openid_auth);
    let mut data = json!({
        "conferenceId": conference_id,
        "domain": domain,
        "isAudioOnly": req.audio_only,
        "isVideoChannel": false,
        "roomName": name,
    });
    if cfg.openid_auth {
        data["auth"] = json!("openidtoken-jwt");
    }
    let widget = json!({ "type": "jitsi", "url": url, "name": cfg.widget_name, "data": data });
    rooms::send(state, &room, &creator, NewEvent::state(WIDGET_EVENT, &widget_id, widget), None).await?;
    let layout =
        json!({ "widgets": { widget_id.clone(): { "container": "top", "index": 0, "width": 100, "height": 50 } } });
    rooms::send(state, &room, &creator, NewEvent::state(LAYOUT_EVENT, "", layout), None).await?;
    Ok(Meeting {
        jitsi_url: format!("https://{domain}/{conference_id}"),
        room_id: created.room_id,
        widget_id,
        conference_id,
        widget_url: url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc4648() {
        // RFC 4648 test vectors, padding removed.
        for (input, expected) in [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ] {
            assert_eq!(base32_nopad(input.as_bytes()), expected, "{input}");
        }
        // A room ID as Element would encode it.
        assert_eq!(conference_id("!a:b", true), "EFQTUYQ");
    }

    #[test]
    fn random_conference_ids_look_like_elements() {
        let id = conference_id("!a:b", false);
        assert_eq!(id.len(), 29);
        assert!(id.starts_with("Jitsi") && id.as_bytes()[5].is_ascii_uppercase(), "{id}");
        assert!(id[6..].bytes().all(|b| b.is_ascii_lowercase()), "{id}");
    }

    #[test]
    fn widget_url_has_elements_template() {
        let u = widget_url("https://chat.ville.fr", "ABC", true);
        assert!(u.starts_with("https://chat.ville.fr/jitsi.html?confId=ABC#conferenceDomain=$domain&"), "{u}");
        assert!(u.ends_with("&auth=openidtoken-jwt"), "{u}");
        assert!(!widget_url("https://chat.ville.fr/", "ABC", false).contains("auth="));
    }
}
