//! Receipt writes with group commit. Every receipt write takes the receipt stream's advisory lock
//! (so that the highest committed position is a safe sync watermark) and commits: one at a time,
//! each waiting for its own WAL flush under the lock, receipts from every room were serialised
//! behind each other. Here concurrent receipts queue in memory, and whoever holds the writer
//! records everything queued in one transaction: one lock, one commit, one flush.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage::receipts::{self, NewReceipt};

/// Most receipts recorded in one transaction.
const MAX_BATCH: usize = 256;

/// A receipt to record (owned, to wait in the queue).
#[derive(Debug, Clone)]
pub struct Receipt {
    pub room_nid: i64,
    pub user_id: String,
    pub receipt_type: String,
    /// `None` for an unthreaded receipt.
    pub thread_id: Option<String>,
    pub event_id: String,
    /// The receipted event's event-stream position.
    pub event_stream: i64,
}

impl Receipt {
    fn as_new(&self) -> NewReceipt<'_> {
        NewReceipt {
            room_nid: self.room_nid,
            user_id: &self.user_id,
            receipt_type: &self.receipt_type,
            thread_id: self.thread_id.as_deref(),
            event_id: &self.event_id,
            event_stream: self.event_stream,
        }
    }
}

type Reply = oneshot::Sender<ApiResult<Option<i64>>>;

/// The process's receipt write queue (the database lock remains the authority between processes).
#[derive(Default)]
pub struct ReceiptQueue {
    pending: parking_lot::Mutex<Vec<(Receipt, Reply)>>,
    writer: Arc<tokio::sync::Mutex<()>>,
}

/// Records a receipt and, once committed, wakes the room's syncs. Returns its stream position,
/// or `None` when it was ignored (the user's receipt of that type and thread is already for the
/// same or a later event).
pub async fn record(state: &AppState, receipt: Receipt) -> ApiResult<Option<i64>> {
    let queue = &state.receipt_queue;
    let (reply, answer) = oneshot::channel();
    queue.pending.lock().push((receipt, reply));
    // Whoever gets the writer drains the queue; ours may already be in the previous batch.
    let guard = queue.writer.clone().lock_owned().await;
    let batch: Vec<(Receipt, Reply)> = {
        let mut p = queue.pending.lock();
        let n = p.len().min(MAX_BATCH);
        p.drain(..n).collect()
    };
    if batch.is_empty() {
        drop(guard);
    } else {
        // A task of its own: a client hanging up must not abort the others' receipts.
        let state = state.clone();
        let _ = tokio::spawn(async move {
            write_batch(&state, batch).await;
            drop(guard);
        })
        .await;
    }
    answer.await.map_err(|_| Error::internal())?
}

async fn write_batch(state: &AppState, batch: Vec<(Receipt, Reply)>) {
    let result = {
        let rows: Vec<NewReceipt<'_>> = batch.iter().map(|(r, _)| r.as_new()).collect();
        receipts::upsert_batch(&state.db, &rows).await
    };
    match result {
        Ok(positions) => {
            for ((r, reply), pos) in batch.into_iter().zip(positions) {
                if let Some(p) = pos {
                    crate::sync::receipt_changed(state, r.room_nid, p);
                }
                let _ = reply.send(Ok(pos));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, size = batch.len(), "receipt batch failed");
            for (_, reply) in batch {
                let _ = reply.send(Err(Error::internal()));
            }
        }
    }
}
