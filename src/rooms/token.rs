//! Tokens naming a position in a room's timeline, in every form this server hands out, so that
//! every endpoint taking one accepts all of them:
//!
//! - `t<depth>_<stream>` (topological): a position *between* events, just before the event at
//!   `(depth, stream)` in topological order. `/messages` `start`/`end`, `/context` `start`/`end`
//!   and `/sync`'s per-room `prev_batch` are of this form.
//! - `s<events>_…` (a `/sync` `next_batch`, also the `prev_batch` of a room with no timeline
//!   events): a point in the event stream, everything at or before `events` being "before" it.
//!   In a room's timeline it names the position just after the room's last event at or before it.
//!
//! `/relations` and `/threads` also hand out `r<stream>` tokens of their own (see
//! `api::client::relations`); they order by stream and use [`RoomToken::stream_boundary`] to
//! read these two forms.

use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage;
use crate::sync::token::SyncToken;

/// A position in a room's timeline, as a client gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomToken {
    /// Just before the event at `(depth, stream)` in topological order.
    Topological { depth: i64, stream: i64 },
    /// After every event whose stream ordering is at most this.
    Stream(i64),
}

impl RoomToken {
    pub fn parse(t: &str) -> ApiResult<Self> {
        if t.starts_with('s') {
            let events = SyncToken::parse(t).map_err(|_| bad())?.events;
            return Ok(Self::Stream(events));
        }
        let (d, s) = t.strip_prefix('t').and_then(|r| r.split_once('_')).ok_or_else(bad)?;
        Ok(Self::Topological { depth: d.parse().map_err(|_| bad())?, stream: s.parse().map_err(|_| bad())? })
    }

    /// The topological position `(depth, stream)` this token names in the room: a stream token
    /// becomes the position just after the room's last event at or before it (one indexed
    /// query), or the start of the room if it has none.
    pub async fn position(self, state: &AppState, room_nid: i64) -> ApiResult<(i64, i64)> {
        match self {
            Self::Topological { depth, stream } => Ok((depth, stream)),
            Self::Stream(pos) => {
                let last =
                    storage::events::page(&state.db, room_nid, true, (i64::MAX, i64::MAX), (i64::MIN, pos), 1).await?;
                Ok(match last.first() {
                    Some(e) => (e.depth, e.stream_ordering.saturating_add(1)),
                    None => (i64::MIN, i64::MIN),
                })
            }
        }
    }

    /// For endpoints that order by stream: the first stream ordering *after* the position
    /// (events before it have a smaller ordering).
    pub fn stream_boundary(self) -> i64 {
        match self {
            Self::Topological { stream, .. } => stream,
            Self::Stream(pos) => pos.saturating_add(1),
        }
    }
}

fn bad() -> Error {
    Error::invalid_param("Invalid pagination token")
}

/// The token for the position just before the event at `(depth, stream)`.
pub fn topological(depth: i64, stream: i64) -> String {
    format!("t{depth}_{stream}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses() {
        assert_eq!(RoomToken::parse("t5_17").unwrap(), RoomToken::Topological { depth: 5, stream: 17 });
        assert_eq!(RoomToken::parse("t-3_-9").unwrap(), RoomToken::Topological { depth: -3, stream: -9 });
        assert_eq!(RoomToken::parse("s42_1_2_3_4_5_6").unwrap(), RoomToken::Stream(42));
        // A shorter sync token (an older version's) still names its event position.
        assert_eq!(RoomToken::parse("s42").unwrap(), RoomToken::Stream(42));
        for bad in ["", "t", "t5", "t5_", "t_5", "tx_1", "s", "s-1", "sx", "r5", "5", "t1_2_3", "T1_2"] {
            assert_eq!(RoomToken::parse(bad).unwrap_err().errcode, "M_INVALID_PARAM", "{bad}");
        }
    }

    #[test]
    fn stream_boundaries() {
        assert_eq!(RoomToken::Topological { depth: 3, stream: 10 }.stream_boundary(), 10);
        assert_eq!(RoomToken::Stream(10).stream_boundary(), 11);
        assert_eq!(RoomToken::Stream(i64::MAX).stream_boundary(), i64::MAX);
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::{RoomToken, topological};
    use crate::sync::token::SyncToken;

    proptest! {
        /// Any string: a token or 400 `M_INVALID_PARAM`, never a panic.
        #[test]
        fn parse_never_panics(s in any::<String>()) {
            if let Err(e) = RoomToken::parse(&s) {
                prop_assert_eq!(e.errcode, "M_INVALID_PARAM");
            }
        }

        /// Near-misses of both formats (signs, missing parts, overflow) never panic either.
        #[test]
        fn near_misses(s in "[ts]?[0-9_+-]{0,45}") {
            if let Ok(RoomToken::Topological { depth, stream }) = RoomToken::parse(&s) {
                prop_assert_eq!(
                    RoomToken::parse(&topological(depth, stream)).unwrap(),
                    RoomToken::Topological { depth, stream }
                );
            }
        }

        /// Every token this server hands out parses back to its position.
        #[test]
        fn round_trip(depth in any::<i64>(), stream in any::<i64>(), events in 0i64..=i64::MAX) {
            prop_assert_eq!(
                RoomToken::parse(&topological(depth, stream)).unwrap(),
                RoomToken::Topological { depth, stream }
            );
            let sync = SyncToken { events, ..Default::default() }.to_string();
            prop_assert_eq!(RoomToken::parse(&sync).unwrap(), RoomToken::Stream(events));
        }
    }
}
