//! Singleton duties: a duty (housekeeping, push retries, delayed events, an appservice's
//! transactions, ...) runs on exactly one instance at a time, the one holding its lease.
//!
//! A lease is a session-level advisory lock (`pg_try_advisory_lock(class, key)`) held on a
//! connection of its own, outside the pool. PostgreSQL releases it when that connection ends,
//! so an instance that dies (even by SIGKILL: the kernel closes its sockets) hands the duty over
//! without anyone having to notice: the other instances try to take the lease every
//! `cluster.lease_retry_ms`. The holder checks its connection every `cluster.lease_check_ms`;
//! if it is broken (the lock may then be someone else's), the duty is told to stop, and the
//! instance competes again.
//!
//! Duties are written so that a handover loses nothing: what they deliver is durable and
//! recorded as delivered after delivery (a duty cut short repeats its last unit of work, with
//! the same transaction ID where the protocol has one), and a duty told to stop returns.

use std::future::Future;
use std::time::Duration;

use sha2::Digest;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;

use crate::state::AppState;

/// The advisory lock class of leases (the first of the two 32-bit keys).
const LEASE_CLASS: i32 = 0x5061_7278;
/// How often a closed gate is looked at again.
const GATE_POLL: Duration = Duration::from_millis(20);

/// The second key of a lease: the first 4 bytes of the SHA-256 of its name.
pub fn key(name: &str) -> i32 {
    let h = sha2::Sha256::digest(name.as_bytes());
    i32::from_be_bytes([h[0], h[1], h[2], h[3]])
}

/// Runs `duty` whenever this instance holds the lease `name`, until `stop`. `gate`, when given,
/// says whether this instance may compete at all right now (an appservice on a WebSocket is
/// served by the instance its socket is connected to); a holder whose gate closes lets go.
/// `duty` gets a stop signal that fires on shutdown or when the lease is lost, and must return
/// then.
pub async fn run<F, Fut>(
    state: AppState,
    name: String,
    mut stop: watch::Receiver<bool>,
    gate: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    duty: F,
) -> anyhow::Result<()>
where
    F: Fn(watch::Receiver<bool>) -> Fut + Send,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let retry = Duration::from_millis(state.config.cluster.lease_retry_ms.max(50));
    let check = Duration::from_millis(state.config.cluster.lease_check_ms.max(50));
    let open = || gate.as_ref().is_none_or(|g| g());
    // One connection per lease, kept between tries (no connection churn while another instance
    // holds it); it becomes the holder's connection when the lock is granted.
    let mut conn: Option<PgConnection> = None;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let gate_open = open();
        if !gate_open && conn.is_none() {
            // Connected ahead, so that taking the lease when the gate opens is one statement.
            conn = connect(&state, &name).await;
        }
        let got = gate_open && try_acquire(&state, &name, &mut conn).await;
        if !got {
            // A closed gate is an in-memory check: look again soon, so that the duty starts as
            // soon as it opens (an appservice's socket connects).
            let wait = if gate_open { retry } else { GATE_POLL };
            tokio::select! {
                _ = tokio::time::sleep(wait) => continue,
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        tracing::info!(lease = %name, instance = %state.cluster.instance_id, "lease taken");
        state.metrics.lease_held(&name, true);
        let (duty_stop, duty_rx) = watch::channel(false);
        let fut = duty(duty_rx);
        tokio::pin!(fut);
        let mut tick = tokio::time::interval(check);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutting_down = false;
        let mut lost = false;
        let result = loop {
            tokio::select! {
                r = &mut fut => break r,
                _ = tick.tick() => {
                    let alive = sqlx::query("SELECT 1").execute(&mut *c).await.is_ok();
                    if !alive || !open() {
                        if !alive {
                            lost = true;
                            tracing::warn!(lease = %name, "lease connection lost: stopping the duty");
                        }
                        let _ = duty_stop.send(true);
                        break (&mut fut).await;
                    }
                }
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    shutting_down = true;
                    let _ = duty_stop.send(true);
                    break (&mut fut).await;
                }
            }
        };
        state.metrics.lease_held(&name, false);
        let unlocked = !lost
            && sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(LEASE_CLASS)
                .bind(key(&name))
                .execute(&mut *c)
                .await
                .is_ok();
        if !unlocked {
            // Closing the connection releases the lock for sure.
            if let Some(c) = conn.take() {
                let _ = c.close().await;
            }
        }
        tracing::info!(lease = %name, "lease released");
        if let Err(e) = &result {
            tracing::warn!(lease = %name, error = %e, "duty failed; competing for its lease again");
        }
        if shutting_down {
            if let Some(c) = conn.take() {
                let _ = c.close().await;
            }
            return result;
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// Tries the lease on `conn` (opened if needed). A broken connection is dropped.
async fn try_acquire(state: &AppState, name: &str, conn: &mut Option<PgConnection>) -> bool {
    if conn.is_none() {
        *conn = connect(state, name).await;
    }
    let Some(c) = conn.as_mut() else { return false };
    let got: Result<bool, _> = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(LEASE_CLASS)
        .bind(key(name))
        .fetch_one(&mut *c)
        .await;
    match got {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(lease = %name, error = %e, "cannot try a lease");
            *conn = None;
            false
        }
    }
}

async fn connect(state: &AppState, name: &str) -> Option<PgConnection> {
    match PgConnection::connect_with(&state.db.connect_options()).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(lease = %name, error = %e, "cannot open a lease connection");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_stable_and_distinct() {
        assert_eq!(super::key("housekeeping"), super::key("housekeeping"));
        assert_ne!(super::key("housekeeping"), super::key("push-resume"));
    }
}
