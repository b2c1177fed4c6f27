//! Account deactivation: the account leaves every room it is joined to, rejects its pending
//! invites and withdraws its knocks (through the normal event pipeline), loses its devices,
//! tokens and pushers, leaves the user directory, and, with `erase`, its profile.

use serde_json::json;

use crate::error::ApiResult;
use crate::rooms::{self, NewEvent, Room};
use crate::state::AppState;
use crate::storage;

/// Deactivates `user_id`. The rooms are left first, while the account is still intact: if a
/// leave fails, the error is returned and nothing else has changed, so the user can try again.
/// Memberships that appear meanwhile (an invite racing the deactivation) are parted afterwards.
pub async fn deactivate(state: &AppState, user_id: &str, erase: bool) -> ApiResult<()> {
    part_all(state, user_id).await?;
    let mut tx = state.db.begin().await?;
    storage::users::deactivate(&mut *tx, user_id).await?;
    let revoked = storage::devices::delete(&mut *tx, user_id, storage::devices::Selection::AllExcept(None)).await?;
    if erase {
        storage::profiles::clear(&mut *tx, user_id).await?;
    }
    storage::directory::remove_user(&mut *tx, user_id).await?;
    tx.commit().await?;
    state.auth.evict(&revoked).await;
    // The devices are gone: whoever encrypts for this user must re-fetch the (empty) list.
    crate::e2ee::devices_changed(state, user_id).await?;
    if let Err(e) = part_all(state, user_id).await {
        tracing::warn!(user_id, error = %e, "parting rooms after deactivation failed");
    }
    tracing::info!(user_id, erase, "account deactivated");
    Ok(())
}

/// Sends a `leave` for every room where the user is joined, invited or knocking (a leave
/// rejects an invite and withdraws a knock). Stops at the first failure.
async fn part_all(state: &AppState, user_id: &str) -> ApiResult<()> {
    let memberships = storage::rooms::user_memberships(&state.db, user_id).await?;
    for m in memberships.into_iter().filter(|m| matches!(m.membership.as_str(), "join" | "invite" | "knock")) {
        let room = Room::load(state, &m.room_id).await?;
        let leave = NewEvent::state("m.room.member", user_id, json!({ "membership": "leave" }));
        rooms::send(state, &room, user_id, leave, None).await?;
    }
    Ok(())
}
