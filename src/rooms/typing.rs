//! Typing notifications: ephemeral, so kept in memory only (a restart forgets them, which is
//! what clients expect of a state that expires within seconds anyway). With several instances
//! sharing a database, every change is also sent to the other instances (`cluster`, over
//! `LISTEN/NOTIFY`), which apply it to their own copy ([`Typing::apply_remote`]).
//!
//! Every change (start, stop, expiry) takes the next value of an in-memory stream counter and
//! records it on the room, so sync can ask "did this room's typing set change since X" and
//! long-polls can wait on [`Typing::subscribe`]. The counter follows the wall clock in
//! milliseconds (and always increases), so that a sync token handed out by one instance means
//! about the same moment to another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Longest a single request may mark a user as typing; clients refresh well before.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(120);
/// Used when a client says it is typing without a timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct RoomTyping {
    /// Typing user → when their typing expires.
    users: HashMap<String, Instant>,
    /// Stream position of the last change of this room's typing set.
    position: u64,
}

struct Shared {
    rooms: Mutex<HashMap<i64, RoomTyping>>,
    /// The stream position: bumped (and watchers woken) on every change.
    stream: watch::Sender<u64>,
    /// Rooms whose typing set changed, for the sync notifier.
    changes: Mutex<Option<tokio::sync::mpsc::UnboundedSender<i64>>>,
}

pub struct Typing(Arc<Shared>);

impl Default for Typing {
    fn default() -> Self {
        Self(Arc::new(Shared { rooms: Mutex::default(), stream: watch::channel(0).0, changes: Mutex::default() }))
    }
}

impl Shared {
    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<i64, RoomTyping>> {
        // The map stays consistent even if a holder panicked: every update is a single insert
        // or remove.
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the next stream position, records it on the room and wakes watchers.
    fn bump(&self, room_nid: i64, room: &mut RoomTyping) -> u64 {
        let mut pos = 0;
        self.stream.send_modify(|p| {
            *p = (*p + 1).max(crate::cluster::typing_clock());
            pos = *p;
        });
        room.position = pos;
        if let Some(tx) = self.changes.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send(room_nid);
        }
        pos
    }

    /// Drops expired entries of a room; bumps the stream if any was dropped.
    fn expire(&self, room_nid: i64) {
        let mut rooms = self.rooms();
        if let Some(room) = rooms.get_mut(&room_nid) {
            let now = Instant::now();
            let before = room.users.len();
            room.users.retain(|_, until| *until > now);
            if room.users.len() != before {
                self.bump(room_nid, room);
            }
        }
    }
}

fn effective_timeout(requested: Duration) -> Duration {
    requested.min(MAX_TIMEOUT)
}

impl Typing {
    /// Marks `user_id` as typing in a room for `timeout` (capped at [`MAX_TIMEOUT`]).
    /// Returns the new stream position.
    pub fn start(&self, room_nid: i64, user_id: &str, timeout: Duration) -> u64 {
        let until = Instant::now() + effective_timeout(timeout);
        let pos = {
            let mut rooms = self.0.rooms();
            let room = rooms.entry(room_nid).or_default();
            room.users.insert(user_id.to_owned(), until);
            self.0.bump(room_nid, room)
        };
        // Expiry must wake sync long-polls even if nobody reads the typing set meanwhile.
        let weak: Weak<Shared> = Arc::downgrade(&self.0);
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            if let Some(shared) = weak.upgrade() {
                shared.expire(room_nid);
            }
        });
        pos
    }

    /// Applies another instance's change: `user_id` typing for `remaining` more, or stopped.
    pub fn apply_remote(&self, room_nid: i64, user_id: &str, remaining: Option<Duration>) {
        match remaining {
            Some(d) if !d.is_zero() => {
                self.start(room_nid, user_id, d);
            }
            _ => {
                self.stop(room_nid, user_id);
            }
        }
    }

    /// Marks `user_id` as no longer typing. Returns the new stream position, or `None` if they
    /// were not typing (nothing changed).
    pub fn stop(&self, room_nid: i64, user_id: &str) -> Option<u64> {
        let mut rooms = self.0.rooms();
        let room = rooms.get_mut(&room_nid)?;
        room.users.remove(user_id)?;
        Some(self.0.bump(room_nid, room))
    }

    /// The users currently typing in a room, sorted; expired entries are dropped first.
    pub fn typing_users(&self, room_nid: i64) -> Vec<String> {
        self.0.expire(room_nid);
        let rooms = self.0.rooms();
        let mut users: Vec<String> =
            rooms.get(&room_nid).map(|r| r.users.keys().cloned().collect()).unwrap_or_default();
        users.sort();
        users
    }

    /// Stream position of the last change of a room's typing set (0: never changed).
    pub fn room_position(&self, room_nid: i64) -> u64 {
        self.0.rooms().get(&room_nid).map(|r| r.position).unwrap_or(0)
    }

    /// The current typing stream position.
    pub fn current_position(&self) -> u64 {
        *self.0.stream.borrow()
    }

    /// The rooms whose typing set changes from now on (one receiver: the sync notifier).
    pub fn room_changes(&self) -> tokio::sync::mpsc::UnboundedReceiver<i64> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.0.changes.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    /// A receiver that sync long-polls can await (`changed()`) for any typing change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.stream.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_capped() {
        assert_eq!(effective_timeout(Duration::from_secs(3600)), MAX_TIMEOUT);
        assert_eq!(effective_timeout(Duration::from_millis(u64::MAX)), MAX_TIMEOUT);
        assert_eq!(effective_timeout(Duration::from_secs(5)), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn entries_expire_per_user_and_room() {
        let typing = Typing::default();
        typing.start(1, "@a:x", Duration::from_secs(60));
        typing.start(1, "@b:x", Duration::from_millis(50));
        typing.start(2, "@c:x", Duration::from_millis(50));
        assert_eq!(typing.typing_users(1), ["@a:x", "@b:x"]);
        let before = typing.current_position();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(typing.typing_users(1), ["@a:x"]);
        assert!(typing.typing_users(2).is_empty());
        // Each expired room is one change, at a position above every earlier one.
        assert!(typing.current_position() >= before + 2);
        assert!(typing.room_position(1) > before && typing.room_position(2) > before);
        assert_ne!(typing.room_position(1), typing.room_position(2));
    }
}
