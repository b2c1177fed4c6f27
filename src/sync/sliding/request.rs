//! The request body of simplified sliding sync (MSC4186) as clients send it, with the bounds
//! every field is held to. Field names follow what matrix-rust-sdk (Element X) sends; where the
//! MSC renamed a field both spellings are accepted (`ranges` / `range`).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{ApiResult, Error};

/// At most this many lists per request (as Synapse).
pub const MAX_LISTS: usize = 100;
/// List names are at most this long (bytes).
pub const MAX_LIST_NAME: usize = 64;
/// At most this many ranges per list.
pub const MAX_RANGES: usize = 16;
/// At most this many `required_state` entries per list or subscription.
pub const MAX_REQUIRED_STATE: usize = 256;
/// Event types and state keys in `required_state`, filter entries, room IDs: at most this long.
pub const MAX_STRING: usize = 255;
/// At most this many room subscriptions per request.
pub const MAX_SUBSCRIPTIONS: usize = 512;
/// Largest `timeline_limit` (as Synapse).
pub const MAX_TIMELINE_LIMIT: u64 = 1000;
/// At most this many entries in a filter's lists (`spaces`, `room_types`, ...) and in an
/// extension's `lists` / `rooms`.
pub const MAX_FILTER_ENTRIES: usize = 100;
/// Longest `conn_id` and `txn_id`.
pub const MAX_ID: usize = 255;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Body {
    pub conn_id: Option<String>,
    pub txn_id: Option<String>,
    pub lists: Option<BTreeMap<String, ListReq>>,
    pub room_subscriptions: Option<BTreeMap<String, RoomParamsReq>>,
    pub extensions: Option<ExtensionsReq>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ListReq {
    pub ranges: Option<Vec<(u64, u64)>>,
    /// The MSC's newest revision: one range.
    pub range: Option<(u64, u64)>,
    #[serde(flatten)]
    pub params: RoomParamsReq,
    pub filters: Option<Filters>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RoomParamsReq {
    pub required_state: Option<Vec<(String, String)>>,
    pub timeline_limit: Option<u64>,
    pub include_heroes: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Filters {
    pub is_dm: Option<bool>,
    pub is_invite: Option<bool>,
    pub is_encrypted: Option<bool>,
    /// `null` entries stand for rooms without a type.
    pub room_types: Option<Vec<Option<String>>>,
    pub not_room_types: Option<Vec<Option<String>>>,
    pub spaces: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ExtensionsReq {
    pub to_device: Option<ToDeviceReq>,
    pub e2ee: Option<Toggle>,
    pub account_data: Option<ScopedReq>,
    pub receipts: Option<ScopedReq>,
    pub typing: Option<ScopedReq>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ToDeviceReq {
    pub enabled: Option<bool>,
    pub limit: Option<u64>,
    pub since: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Toggle {
    pub enabled: Option<bool>,
}

/// An extension applied to rooms of the response: those of the named lists and subscriptions
/// (`*`: all of them, the default).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ScopedReq {
    pub enabled: Option<bool>,
    pub lists: Option<Vec<String>>,
    pub rooms: Option<Vec<String>>,
}

/// Room parameters after validation.
#[derive(Debug, Clone, Default)]
pub struct RoomParams {
    pub required_state: Vec<(String, String)>,
    pub timeline_limit: usize,
}

/// A list after validation.
#[derive(Debug)]
pub struct List {
    pub ranges: Vec<(usize, usize)>,
    pub params: RoomParams,
    pub filters: Filters,
}

/// A scoped extension after validation: which lists and subscriptions it covers.
#[derive(Debug, Clone)]
pub struct Scope {
    pub lists: Option<Vec<String>>,
    pub rooms: Option<Vec<String>>,
}

impl Scope {
    fn from(r: &ScopedReq) -> ApiResult<Option<Self>> {
        if r.enabled != Some(true) {
            return Ok(None);
        }
        for v in [&r.lists, &r.rooms].into_iter().flatten() {
            if v.len() > MAX_FILTER_ENTRIES || v.iter().any(|s| s.len() > MAX_STRING) {
                return Err(Error::invalid_param("too many or too long entries in an extension's lists or rooms"));
            }
        }
        Ok(Some(Self {
            lists: Some(r.lists.clone().unwrap_or_else(|| vec!["*".into()])),
            rooms: Some(r.rooms.clone().unwrap_or_else(|| vec!["*".into()])),
        }))
    }

    pub fn covers_list(&self, name: &str) -> bool {
        self.lists.as_ref().is_some_and(|l| l.iter().any(|x| x == "*" || x == name))
    }

    pub fn covers_subscription(&self, room_id: &str) -> bool {
        self.rooms.as_ref().is_some_and(|l| l.iter().any(|x| x == "*" || x == room_id))
    }
}

/// The request after validation.
#[derive(Debug, Default)]
pub struct Request {
    pub conn_id: String,
    pub txn_id: Option<String>,
    pub lists: BTreeMap<String, List>,
    pub subscriptions: BTreeMap<String, RoomParams>,
    /// `Some(since)` when enabled.
    pub to_device: Option<(Option<i64>, i64)>,
    pub e2ee: bool,
    pub account_data: Option<Scope>,
    pub receipts: Option<Scope>,
    pub typing: Option<Scope>,
}

fn params(p: &RoomParamsReq) -> ApiResult<RoomParams> {
    let rs = p.required_state.clone().unwrap_or_default();
    if rs.len() > MAX_REQUIRED_STATE {
        return Err(Error::invalid_param(format!("at most {MAX_REQUIRED_STATE} required_state entries")));
    }
    if rs.iter().any(|(t, k)| t.len() > MAX_STRING || k.len() > MAX_STRING) {
        return Err(Error::invalid_param("required_state entries are at most 255 bytes"));
    }
    let limit = p.timeline_limit.unwrap_or(0);
    if limit > MAX_TIMELINE_LIMIT {
        return Err(Error::invalid_param(format!("timeline_limit is at most {MAX_TIMELINE_LIMIT}")));
    }
    let mut required_state = rs;
    required_state.sort();
    required_state.dedup();
    Ok(RoomParams { required_state, timeline_limit: limit as usize })
}

fn short_list(v: &Option<Vec<String>>, what: &str) -> ApiResult<()> {
    if let Some(v) = v
        && (v.len() > MAX_FILTER_ENTRIES || v.iter().any(|s| s.len() > MAX_STRING))
    {
        return Err(Error::invalid_param(format!("too many or too long entries in {what}")));
    }
    Ok(())
}

impl Request {
    pub fn validate(body: Body) -> ApiResult<Self> {
        let conn_id = body.conn_id.unwrap_or_default();
        if conn_id.len() > MAX_ID || body.txn_id.as_ref().is_some_and(|t| t.len() > MAX_ID) {
            return Err(Error::invalid_param("conn_id and txn_id are at most 255 bytes"));
        }
        let lists_in = body.lists.unwrap_or_default();
        if lists_in.len() > MAX_LISTS {
            return Err(Error::invalid_param(format!("at most {MAX_LISTS} lists")));
        }
        let mut lists = BTreeMap::new();
        for (name, l) in lists_in {
            if name.len() > MAX_LIST_NAME {
                return Err(Error::invalid_param(format!("list names are at most {MAX_LIST_NAME} bytes")));
            }
            let mut ranges: Vec<(u64, u64)> = l.ranges.unwrap_or_default();
            ranges.extend(l.range);
            if ranges.len() > MAX_RANGES {
                return Err(Error::invalid_param(format!("at most {MAX_RANGES} ranges per list")));
            }
            if ranges.iter().any(|(a, b)| a > b) {
                return Err(Error::invalid_param("a range's start must not be after its end"));
            }
            let filters = l.filters.unwrap_or_default();
            short_list(&filters.spaces, "filters.spaces")?;
            for t in [&filters.room_types, &filters.not_room_types].into_iter().flatten() {
                if t.len() > MAX_FILTER_ENTRIES || t.iter().flatten().any(|s| s.len() > MAX_STRING) {
                    return Err(Error::invalid_param("too many or too long room types in filters"));
                }
            }
            let clamp = |v: u64| v.min(u32::MAX as u64) as usize;
            lists.insert(
                name,
                List {
                    ranges: ranges.into_iter().map(|(a, b)| (clamp(a), clamp(b))).collect(),
                    params: params(&l.params)?,
                    filters,
                },
            );
        }
        let subs_in = body.room_subscriptions.unwrap_or_default();
        if subs_in.len() > MAX_SUBSCRIPTIONS {
            return Err(Error::invalid_param(format!("at most {MAX_SUBSCRIPTIONS} room subscriptions")));
        }
        let mut subscriptions = BTreeMap::new();
        for (room_id, p) in subs_in {
            if ruma::RoomId::parse(&room_id).is_err() {
                return Err(Error::invalid_param(format!("{room_id:?} is not a room ID")));
            }
            subscriptions.insert(room_id, params(&p)?);
        }
        let ext = body.extensions.unwrap_or_default();
        let to_device =
            match ext.to_device {
                Some(t) if t.enabled == Some(true) => {
                    let since =
                        match t.since.as_deref() {
                            None => None,
                            Some(s) => Some(s.parse::<i64>().ok().filter(|v| *v >= 0).ok_or_else(|| {
                                Error::invalid_param("extensions.to_device.since is not a valid token")
                            })?),
                        };
                    let limit = t.limit.unwrap_or(100).clamp(1, crate::e2ee::TO_DEVICE_PER_SYNC as u64) as i64;
                    Some((since, limit))
                }
                _ => None,
            };
        let scope = |s: &Option<ScopedReq>| s.as_ref().map(Scope::from).transpose().map(Option::flatten);
        Ok(Self {
            conn_id,
            txn_id: body.txn_id,
            lists,
            subscriptions,
            to_device,
            e2ee: ext.e2ee.is_some_and(|e| e.enabled == Some(true)),
            account_data: scope(&ext.account_data)?,
            receipts: scope(&ext.receipts)?,
            typing: scope(&ext.typing)?,
        })
    }
}
