//! Replay-then-live: the one place that turns a cursor into "every matching event after
//! it, exactly once, in log order, then live". SSE and WebSocket are thin framings of it.
//!
//! # Why it is gap-free
//!
//! The writer marks a group committed in the store *before* it broadcasts it. A
//! subscription subscribes to the broadcast channel *before* it reads the store. So any
//! group is either visible to the store reads (committed before we subscribed), or
//! arrives on our receiver (broadcast after we subscribed), or both. "Both" is handled
//! by one cursor: `last_id`, the id of the newest event scanned (delivered or filtered
//! out). Ids increase strictly in log order, so anything at or below `last_id` has been
//! seen and is skipped: no duplicate at the switch, whichever way the race went.
//!
//! # Slow consumers
//!
//! tokio's broadcast channel keeps a bounded ring; a receiver that falls behind gets
//! `Lagged` and silently loses the overwritten messages. Here `Lagged` never loses
//! anything: the subscription takes a fresh receiver at the tail (before reading again)
//! and goes back to replaying from `last_id` out of the store, then rejoins live. Store
//! reads are batched, so memory per subscription stays bounded whatever the client does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::broadcast::{self, error::RecvError};
use ulid::Ulid;

use crate::event::Event;
use crate::store::{Store, StoreError};
use crate::writer::Writer;

/// Most events one store read returns.
const REPLAY_BATCH_EVENTS: usize = 2_000;
/// A store read stops early once its matching lines reach this many bytes.
const REPLAY_BATCH_BYTES: usize = 1 << 20;

/// Which events a subscriber wants.
pub trait Selector: Send + Sync + 'static {
    fn matches(&self, event: &Event) -> bool;
    /// True when some events may be filtered out (the stream then reports how far it
    /// has scanned, so a reconnect does not rescan them).
    fn is_filtered(&self) -> bool;
}

/// What the subscription has for its reader.
#[derive(Debug)]
pub enum Item {
    /// Matching events, in log order (never empty).
    Events(Vec<Event>),
    /// Events up to and including this id were scanned and none matched.
    Skipped(Ulid),
    /// Nothing happened for the idle interval.
    Idle,
}

/// Counters shared by every subscription of a server.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Times a subscriber fell behind the live buffer and read the log instead.
    pub catchups: AtomicU64,
    pub delivered: AtomicU64,
}

pub struct Subscription {
    store: Arc<Store>,
    live: broadcast::Receiver<Arc<[Event]>>,
    selector: Arc<dyn Selector>,
    stats: Arc<StreamStats>,
    /// Newest id scanned (the resume cursor).
    last_id: Ulid,
    replaying: bool,
}

impl Subscription {
    /// Subscribes to live events, then positions after `after` (replaying the log first).
    pub fn new(
        store: Arc<Store>,
        writer: &Writer,
        after: Ulid,
        selector: Arc<dyn Selector>,
        stats: Arc<StreamStats>,
    ) -> Subscription {
        Subscription {
            live: writer.subscribe(),
            store,
            selector,
            stats,
            last_id: after,
            replaying: true,
        }
    }

    /// The id delivery continues after.
    pub fn cursor(&self) -> Ulid {
        self.last_id
    }

    /// Next item; waits at most `idle` for live events (then returns [`Item::Idle`]).
    /// `None` when the server is shutting down. Cancel-safe only while live.
    pub async fn next(&mut self, idle: Duration) -> Option<Result<Item, StoreError>> {
        loop {
            if self.replaying {
                match self.replay_batch().await {
                    Ok(Some(item)) => return Some(Ok(item)),
                    Ok(None) => self.replaying = false,
                    Err(e) => return Some(Err(e)),
                }
                continue;
            }
            match tokio::time::timeout(idle, self.live.recv()).await {
                Err(_) => return Some(Ok(Item::Idle)),
                Ok(Ok(batch)) => {
                    if let Some(item) = self.take_live(&batch) {
                        return Some(Ok(item));
                    }
                }
                Ok(Err(RecvError::Lagged(_))) => {
                    // Fresh receiver first, then read the log from the cursor.
                    self.live = self.live.resubscribe();
                    self.replaying = true;
                    self.stats.catchups.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(RecvError::Closed)) => return None,
            }
        }
    }

    fn take_live(&mut self, batch: &[Event]) -> Option<Item> {
        let last = batch.last()?;
        if last.id <= self.last_id {
            return None;
        }
        let matching: Vec<Event> = batch
            .iter()
            .filter(|e| e.id > self.last_id && self.selector.matches(e))
            .cloned()
            .collect();
        self.last_id = last.id;
        Some(self.item(matching))
    }

    fn item(&self, matching: Vec<Event>) -> Item {
        if matching.is_empty() {
            Item::Skipped(self.last_id)
        } else {
            self.stats
                .delivered
                .fetch_add(matching.len() as u64, Ordering::Relaxed);
            Item::Events(matching)
        }
    }

    /// One bounded read from the store; `None` once the committed head is reached.
    async fn replay_batch(&mut self) -> Result<Option<Item>, StoreError> {
        let store = self.store.clone();
        let selector = self.selector.clone();
        let after = self.last_id;
        let read = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let mut matching = Vec::new();
            let mut bytes = 0;
            let mut last_scanned = None;
            for (scanned, event) in store.scan_after(after)?.enumerate() {
                let event = event?;
                last_scanned = Some(event.id);
                if selector.matches(&event) {
                    bytes += event.line.len();
                    matching.push(event);
                }
                if matching.len() >= REPLAY_BATCH_EVENTS
                    || bytes >= REPLAY_BATCH_BYTES
                    || scanned + 1 >= REPLAY_BATCH_EVENTS * 8
                {
                    break;
                }
            }
            Ok((matching, last_scanned))
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("replay task failed: {e}")))??;
        let (matching, last_scanned) = read;
        match last_scanned {
            None => Ok(None),
            Some(id) => {
                self.last_id = id;
                Ok(Some(self.item(matching)))
            }
        }
    }
}
