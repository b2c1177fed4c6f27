//! The `/sync` token: one position per stream, so an incremental sync can ask each stream
//! "what changed since". Opaque to clients: `s<events>_<account_data>_<receipts>_<presence>_
//! <typing>_<to_device>_<device_lists>`.

use crate::error::{ApiResult, Error};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncToken {
    pub events: i64,
    pub account_data: i64,
    pub receipts: i64,
    pub presence: i64,
    /// In-memory per process: a restart resets it (see [`SyncToken::clamp_to`]).
    pub typing: i64,
    /// Reserved for the encryption chapter (to-device messages, device list changes).
    pub to_device: i64,
    pub device_lists: i64,
}

const FIELDS: usize = 7;

impl SyncToken {
    fn fields(&self) -> [i64; FIELDS] {
        [self.events, self.account_data, self.receipts, self.presence, self.typing, self.to_device, self.device_lists]
    }

    fn from_fields(f: [i64; FIELDS]) -> Self {
        Self {
            events: f[0],
            account_data: f[1],
            receipts: f[2],
            presence: f[3],
            typing: f[4],
            to_device: f[5],
            device_lists: f[6],
        }
    }

    pub fn parse(s: &str) -> ApiResult<Self> {
        let bad = || Error::invalid_param(format!("Invalid sync token {s:?}"));
        let body = s.strip_prefix('s').ok_or_else(bad)?;
        let mut f = [0i64; FIELDS];
        let mut n = 0;
        for part in body.split('_') {
            if n == FIELDS {
                return Err(bad());
            }
            f[n] = part.parse::<i64>().ok().filter(|v| *v >= 0).ok_or_else(bad)?;
            n += 1;
        }
        // A shorter token (from an older version) leaves later streams at 0.
        if n == 0 {
            return Err(bad());
        }
        Ok(Self::from_fields(f))
    }

    /// The component-wise maximum: the next token never moves backwards.
    pub fn max(self, other: Self) -> Self {
        let (a, b) = (self.fields(), other.fields());
        Self::from_fields(std::array::from_fn(|i| a[i].max(b[i])))
    }

    /// A `since` from before a restart may carry positions of in-memory streams (typing) that
    /// this process has not reached: such a stream is treated as "send everything current".
    pub fn clamp_to(self, current: Self) -> Self {
        let mut t = self;
        if t.typing > current.typing {
            t.typing = 0;
        }
        t
    }
}

impl std::fmt::Display for SyncToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let x = self.fields();
        write!(f, "s{}_{}_{}_{}_{}_{}_{}", x[0], x[1], x[2], x[3], x[4], x[5], x[6])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let t = SyncToken {
            events: 5,
            account_data: 1,
            receipts: 2,
            presence: 3,
            typing: 4,
            to_device: 0,
            device_lists: 9,
        };
        assert_eq!(SyncToken::parse(&t.to_string()).unwrap(), t);
        assert_eq!(SyncToken::parse("s7").unwrap().events, 7);
        for bad in ["", "s", "x1_2", "s1_a", "s-1", "s1_2_3_4_5_6_7_8", "t1_2", "s1__2"] {
            assert_eq!(SyncToken::parse(bad).unwrap_err().errcode, "M_INVALID_PARAM", "{bad}");
        }
    }

    #[test]
    fn never_moves_backwards() {
        let a = SyncToken { events: 5, typing: 9, ..Default::default() };
        let b = SyncToken { events: 7, typing: 2, ..Default::default() };
        let m = a.max(b);
        assert_eq!((m.events, m.typing), (7, 9));
        assert_eq!(a.clamp_to(b).typing, 0);
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::SyncToken;

    proptest! {
        /// Any string: a token or 400 `M_INVALID_PARAM`, never a panic.
        #[test]
        fn parse_never_panics(s in any::<String>()) {
            if let Err(e) = SyncToken::parse(&s) {
                prop_assert_eq!(e.errcode, "M_INVALID_PARAM");
            }
        }

        /// Near-misses of the format.
        #[test]
        fn parse_near_misses(s in "s?[0-9_-]{0,40}") {
            if let Ok(t) = SyncToken::parse(&s) {
                prop_assert_eq!(SyncToken::parse(&t.to_string()).unwrap(), t);
            }
        }

        /// Every token this server hands out parses back to itself.
        #[test]
        fn round_trip(f in prop::array::uniform7(0i64..=i64::MAX)) {
            let t = SyncToken::from_fields(f);
            prop_assert_eq!(SyncToken::parse(&t.to_string()).unwrap(), t);
            prop_assert_eq!(t.max(SyncToken::default()), t);
        }
    }
}
