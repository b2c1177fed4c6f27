//! Export jobs of the admin API. A job is a row of `user_exports` (so any instance can report
//! it) run by the instance that accepted it, in a task of its own:
//!
//! `pending` (waiting for one of `records.max_concurrent_exports` slots) → `running` (progress
//! and a heartbeat written every 2 s) → `done` (the archive is `<export_dir>/<id>.zip` until
//! `expires_ts`, then `expired`) or `failed` (with the error).
//!
//! One pending or running job per user (a partial unique index decides, across instances).
//! A job whose instance died stops heart-beating: after two minutes any instance's sweep (at
//! start-up, then every minute) marks it failed and deletes its partial file, which frees the
//! user for a new export. On shutdown, running jobs stop and are marked failed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{Semaphore, watch};

use super::export::{ExportOptions, Progress, export_user, partial_path};
use crate::config::RecordsConfig;
use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage::records::ExportCounts;
use crate::storage::{self, now_ms};

/// A pending or running job without a heartbeat for this long was interrupted.
const STALE_AFTER_MS: i64 = 120_000;
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
const PENDING_HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
const INTERRUPTED: &str = "interrupted: the server running the export stopped";
const SHUT_DOWN: &str = "interrupted: the server shut down during the export";

/// This instance's export jobs (`AppState::records`).
pub struct Exports {
    slots: Arc<Semaphore>,
    /// Set on shutdown: running jobs stop.
    shutdown: watch::Sender<bool>,
    /// Jobs of this instance not yet recorded as finished.
    active: watch::Sender<usize>,
}

impl Exports {
    pub fn new(config: &RecordsConfig) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(config.max_concurrent_exports.max(1))),
            shutdown: watch::channel(false).0,
            active: watch::channel(0).0,
        }
    }
}

/// Where the admin API's archives are written.
pub fn export_dir(state: &AppState) -> PathBuf {
    state.config.records.export_dir(&state.config.media)
}

/// The archive of a job.
pub fn file_name(export_id: &str) -> String {
    format!("{export_id}.zip")
}

fn counts(p: &Progress) -> ExportCounts {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    ExportCounts {
        rooms_total: n(p.rooms_total),
        rooms_done: n(p.rooms_done),
        events: n(p.events),
        media_files: n(p.media_files),
        media_skipped: n(p.media_skipped),
    }
}

/// Creates the export directory, readable by the server's user only.
fn create_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

async fn remove_partial(dir: &Path, export_id: &str) {
    let partial = partial_path(&dir.join(file_name(export_id)));
    let _ = tokio::fs::remove_file(super::archive::spill_path(&partial)).await;
    let _ = tokio::fs::remove_file(partial).await;
}

/// Marks the user's interrupted jobs failed (and removes their partial files).
async fn fail_stale(state: &AppState, user_id: Option<&str>) -> sqlx::Result<()> {
    let now = now_ms();
    let ids = storage::records::fail_stale(&state.db, now - STALE_AFTER_MS, user_id, now, INTERRUPTED).await?;
    let dir = export_dir(state);
    for id in ids {
        tracing::warn!(export_id = %id, "user export interrupted (no heartbeat): marked failed");
        remove_partial(&dir, &id).await;
    }
    Ok(())
}

/// Records a new export of `user_id` (a local user, checked by the caller) and starts it in the
/// background. 409 `M_LIMIT_EXCEEDED` (with the `export_id` under way) if the user already has
/// one pending or running.
pub async fn start(state: &AppState, user_id: &str, requested_by: &str) -> ApiResult<String> {
    fail_stale(state, Some(user_id)).await?;
    let export_id = crate::media::random_id(24);
    if !storage::records::insert_export(&state.db, &export_id, user_id, requested_by, now_ms()).await? {
        let current = storage::records::active_export(&state.db, user_id).await?;
        return Err(Error::new(
            http::StatusCode::CONFLICT,
            "M_LIMIT_EXCEEDED",
            "An export of this user is already pending or running",
        )
        .with("export_id", json!(current)));
    }
    let active = Active::new(&state.records.active);
    let (state, id, user) = (state.clone(), export_id.clone(), user_id.to_owned());
    tokio::spawn(async move {
        let _active = active;
        run(&state, &id, &user).await;
    });
    Ok(export_id)
}

/// Counts a job of this instance as active until dropped (even by a panic).
struct Active(watch::Sender<usize>);

impl Active {
    fn new(counter: &watch::Sender<usize>) -> Self {
        counter.send_modify(|n| *n += 1);
        Self(counter.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

enum Stop {
    Shutdown,
    /// The row is no longer pending or running (another instance's sweep declared it dead).
    Disowned,
}

async fn run(state: &AppState, export_id: &str, user_id: &str) {
    let db = &state.db;
    let mut shutdown = state.records.shutdown.subscribe();
    // Wait for a slot, showing we are alive.
    let slot = loop {
        let waited = tokio::select! {
            p = state.records.slots.clone().acquire_owned() => Ok(Some(p)),
            _ = tokio::time::sleep(PENDING_HEARTBEAT_EVERY) => Ok(None),
            _ = shutdown.wait_for(|s| *s) => Err(()),
        };
        match waited {
            Ok(Some(p)) => break p,
            Ok(None) => {}
            Err(()) => {
                let _ = storage::records::mark_failed(db, export_id, SHUT_DOWN, now_ms()).await;
                return;
            }
        }
        match storage::records::heartbeat_pending(db, export_id, now_ms()).await {
            Ok(false) => return,
            Ok(true) => {}
            Err(e) => tracing::warn!(error = %e, export_id, "export heartbeat failed"),
        }
    };
    let Ok(_slot) = slot else { return };
    match storage::records::mark_running(db, export_id, now_ms()).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::error!(error = %e, export_id, "cannot start the export");
            return;
        }
    }
    let dir = export_dir(state);
    if let Err(e) = create_dir(&dir) {
        let msg = format!("cannot create the export directory {}: {e}", dir.display());
        tracing::error!(export_id, "{msg}");
        let _ = storage::records::mark_failed(db, export_id, &msg, now_ms()).await;
        return;
    }
    let name = file_name(export_id);
    let output = dir.join(&name);
    let (tx, rx) = watch::channel(Progress::default());
    let report = move |p: &Progress| {
        tx.send_replace(p.clone());
    };
    let opts = ExportOptions { max_media_bytes: state.config.records.max_media_bytes, overwrite: true };
    tracing::info!(export_id, user_id, "user export started");
    let mut export = Box::pin(export_user(state, user_id, &output, &opts, &report));
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let outcome = loop {
        tokio::select! {
            r = &mut export => break Ok(r),
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => break Err(Stop::Shutdown),
        }
        let c = counts(&rx.borrow());
        match storage::records::set_progress(db, export_id, &c, now_ms()).await {
            Ok(true) => {}
            Ok(false) => break Err(Stop::Disowned),
            Err(e) => tracing::warn!(error = %e, export_id, "export progress not recorded"),
        }
    };
    // Dropping an unfinished export stops its archive writer.
    drop(export);
    let now = now_ms();
    match outcome {
        Ok(Ok(summary)) => {
            let expires = now.saturating_add(
                i64::try_from(state.config.records.export_expiry_days)
                    .unwrap_or(i64::MAX / 2)
                    .saturating_mul(86_400_000),
            );
            let size = i64::try_from(summary.size_bytes).unwrap_or(i64::MAX);
            let c = counts(&summary.progress);
            match storage::records::mark_done(db, export_id, &c, &name, size, now, expires).await {
                Ok(true) => tracing::info!(export_id, user_id, size, events = c.events, "user export done"),
                Ok(false) => {
                    let _ = tokio::fs::remove_file(&output).await;
                }
                Err(e) => {
                    // The row stays running without a heartbeat: the sweep marks it failed.
                    tracing::error!(error = %e, export_id, "export finished but not recorded");
                    let _ = tokio::fs::remove_file(&output).await;
                }
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, export_id, user_id, "user export failed");
            let _ = storage::records::mark_failed(db, export_id, &e.to_string(), now).await;
        }
        Err(stop) => {
            // The export future was dropped: its writer stops; remove what it left.
            remove_partial(&dir, export_id).await;
            if matches!(stop, Stop::Shutdown) {
                let _ = storage::records::mark_failed(db, export_id, SHUT_DOWN, now).await;
            }
        }
    }
}

/// Deletes expired archives, marks interrupted jobs failed.
pub async fn sweep(state: &AppState) {
    if let Err(e) = fail_stale(state, None).await {
        tracing::warn!(error = %e, "export job sweep failed");
    }
    let dir = export_dir(state);
    loop {
        let expired = match storage::records::expired_exports(&state.db, now_ms(), 100).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "expired export clean-up failed");
                return;
            }
        };
        let n = expired.len();
        for (id, name) in expired {
            if !name.is_empty() && !name.contains('/') {
                match tokio::fs::remove_file(dir.join(&name)).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(error = %e, export_id = %id, "cannot delete an expired export");
                        return;
                    }
                }
            }
            if let Err(e) = storage::records::mark_expired(&state.db, &id).await {
                tracing::warn!(error = %e, "expired export clean-up failed");
                return;
            }
            tracing::info!(export_id = %id, "expired user export deleted");
        }
        if n < 100 {
            return;
        }
    }
}

/// At start-up and every minute: [`sweep`]. On shutdown, stops this instance's running jobs
/// and waits (10 s at most) until they are recorded as failed.
pub async fn housekeeping(state: AppState, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        sweep(&state).await;
    }
    state.records.shutdown.send_replace(true);
    let mut active = state.records.active.subscribe();
    let _ = tokio::time::timeout(Duration::from_secs(10), active.wait_for(|n| *n == 0)).await;
    Ok(())
}
