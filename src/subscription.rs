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
//!
//! # Overtaken by retention
//!
//! A subscriber far enough behind can find the events after its cursor pruned (SPEC §8).
//! Every store read that starts from the cursor checks the horizon after its first step;
//! a read in progress that finds chunks gone ends there. Either way the subscription
//! yields [`Item::Pruned`] and continues at the horizon: the framings tell the client in
//! band, as a resume from that cursor would (a `connected` frame with `pruned_before`),
//! so nothing is ever skipped silently.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};

use bytes::Bytes;

use tokio::sync::broadcast::{self, error::RecvError};
use ulid::Ulid;

use crate::event::Event;
use crate::store::{Horizon, Scan, Store, StoreError};
use crate::writer::Writer;

/// Most events one store read returns. The first read of a replay returns few, so the
/// first event goes out at once; later reads double up to this.
const REPLAY_BATCH_EVENTS: usize = 2_000;
const FIRST_REPLAY_BATCH_EVENTS: usize = 64;
/// A store read stops early once its matching lines reach this many bytes.
const REPLAY_BATCH_BYTES: usize = 1 << 20;

/// Which events a subscriber wants.
pub trait Selector: Send + Sync + 'static {
    fn matches(&self, event: &Event) -> bool;
    /// True when some events may be filtered out (the stream then reports how far it
    /// has scanned, so a reconnect does not rescan them).
    fn is_filtered(&self) -> bool;
}

/// The selector of a subscription that wants every event: one for the whole server, so
/// an unfiltered subscription allocates none (a `Selection` is ~300 bytes, held for the
/// subscription's life).
pub fn everything() -> Arc<dyn Selector> {
    static EVERYTHING: LazyLock<Arc<dyn Selector>> = LazyLock::new(|| Arc::new(Everything));
    EVERYTHING.clone()
}

struct Everything;

impl Selector for Everything {
    fn matches(&self, _: &Event) -> bool {
        true
    }

    fn is_filtered(&self) -> bool {
        false
    }
}

/// One group commit as the writer publishes it, once durable.
#[derive(Debug)]
pub struct Committed {
    pub events: Vec<Event>,
    /// The batch's wire form, encoded once by the first subscriber that needs it and
    /// shared by all others (fan-out then costs each subscriber one write, not an
    /// encoding).
    encoded: OnceLock<Bytes>,
}

impl Committed {
    pub fn new(events: Vec<Event>) -> Committed {
        Committed {
            events,
            encoded: OnceLock::new(),
        }
    }

    /// The encoded batch; every caller must pass the same `encode`.
    pub fn encoded(&self, encode: impl FnOnce(&[Event]) -> Bytes) -> Bytes {
        self.encoded.get_or_init(|| encode(&self.events)).clone()
    }
}

/// What the subscription has for its reader.
#[derive(Debug)]
pub enum Item {
    /// Matching events, in log order (never empty).
    Events(Vec<Event>),
    /// A whole live batch, all of it new and all of it wanted: send it shared.
    Batch(Arc<Committed>),
    /// Events up to and including this id were scanned and none matched.
    Skipped(Ulid),
    /// The events after the cursor were pruned before they were read: delivery
    /// continues after `cursor` (the last pruned id), at the first retained event.
    Pruned {
        cursor: Ulid,
        /// The first retained event (what a resume's `pruned_before` names).
        first_id: Option<Ulid>,
        /// Events passed over, when the subscription had read far enough to know its
        /// position (not when it started at a cursor already before the horizon).
        skipped: Option<u64>,
    },
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
    live: broadcast::Receiver<Arc<Committed>>,
    selector: Arc<dyn Selector>,
    stats: Arc<StreamStats>,
    /// Newest id scanned (the resume cursor).
    last_id: Ulid,
    /// The seq of `last_id`, once an event was scanned (to count what a prune skipped).
    last_seq: Option<u64>,
    replaying: bool,
    /// The next store read, started while the previous batch is being sent. Kept here
    /// while awaited, so a cancelled `next` picks the same read up again.
    read_ahead: Option<tokio::task::JoinHandle<Result<Read, StoreError>>>,
    /// `read_ahead` was started for a position since abandoned: its result is dropped
    /// once it completes (a blocking read cannot be stopped, and waiting for it keeps
    /// one read per subscription however often it is repositioned).
    read_ahead_stale: bool,
    batch_events: usize,
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
            last_seq: None,
            replaying: true,
            read_ahead: None,
            read_ahead_stale: false,
            batch_events: FIRST_REPLAY_BATCH_EVENTS,
        }
    }

    /// The store this subscription reads.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The id delivery continues after.
    pub fn cursor(&self) -> Ulid {
        self.last_id
    }

    /// The seq of [`Subscription::cursor`] (of the event it names or the last one before
    /// it), once known.
    pub fn position(&self) -> Option<u64> {
        self.last_seq
    }

    /// Tells a new subscription the seq of its cursor, so that a prune ahead of it is
    /// counted ([`Item::Pruned`]'s `skipped`) before it has read anything.
    pub fn set_position(&mut self, seq: u64) {
        self.last_seq = Some(seq);
    }

    /// Replaces what the subscriber wants and where delivery continues: after `after`,
    /// replaying the log first, exactly as a new subscription would.
    pub fn reposition(&mut self, after: Ulid, selector: Arc<dyn Selector>) {
        self.selector = selector;
        self.restart_after(after);
    }

    /// A fresh receiver at the tail first, then replay from `after`: the same order as
    /// [`Subscription::new`], so nothing committed in between is missed.
    fn restart_after(&mut self, after: Ulid) {
        self.live = self.live.resubscribe();
        if after != self.last_id {
            self.last_seq = None;
        }
        self.last_id = after;
        self.replaying = true;
        self.read_ahead_stale = self.read_ahead.is_some();
        self.batch_events = FIRST_REPLAY_BATCH_EVENTS;
    }

    /// Next item, waiting for live events once the log is replayed; `None` when the
    /// server shuts down. Cancel-safe: state changes only after an await completes, and
    /// a store read in flight is kept and awaited again by the next call.
    pub async fn next(&mut self) -> Option<Result<Item, StoreError>> {
        loop {
            if self.replaying {
                match self.replay_batch().await {
                    Ok(Some(item)) => return Some(Ok(item)),
                    Ok(None) => self.replaying = false,
                    Err(e) => return Some(Err(e)),
                }
                continue;
            }
            match self.live.recv().await {
                Ok(batch) => {
                    if let Some(item) = self.take_live(batch) {
                        return Some(Ok(item));
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    self.restart_after(self.last_id);
                    self.stats.catchups.fetch_add(1, Ordering::Relaxed);
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }

    fn take_live(&mut self, batch: Arc<Committed>) -> Option<Item> {
        let (first, last) = (batch.events.first()?, batch.events.last()?);
        if last.id <= self.last_id {
            return None;
        }
        if first.id > self.last_id && !self.selector.is_filtered() {
            self.last_id = last.id;
            self.last_seq = Some(last.seq);
            self.stats
                .delivered
                .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
            return Some(Item::Batch(batch));
        }
        let matching: Vec<Event> = batch
            .events
            .iter()
            .filter(|e| e.id > self.last_id && self.selector.matches(e))
            .cloned()
            .collect();
        self.last_id = last.id;
        self.last_seq = Some(last.seq);
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
    /// While the caller sends this batch, the next one is already being read.
    async fn replay_batch(&mut self) -> Result<Option<Item>, StoreError> {
        let joined = loop {
            if self.read_ahead.is_none() {
                self.read_ahead = Some(self.spawn_read(None, self.last_id));
            }
            let Some(pending) = self.read_ahead.as_mut() else {
                continue;
            };
            let joined = pending.await;
            self.read_ahead = None;
            if !std::mem::take(&mut self.read_ahead_stale) {
                break joined;
            }
        };
        let read =
            joined.map_err(|e| StoreError::Corrupt(format!("replay task failed: {e}")))??;
        let (matching, last_scanned, scan) = match read {
            Read::Batch(matching, last_scanned, scan) => (matching, last_scanned, scan),
            Read::Overtaken(horizon, first_id) => {
                return Ok(Some(self.overtaken(horizon, first_id)));
            }
        };
        let Some((id, seq)) = last_scanned else {
            return Ok(None);
        };
        self.last_id = id;
        self.last_seq = Some(seq);
        self.read_ahead = Some(self.spawn_read(scan, id));
        Ok(Some(self.item(matching)))
    }

    /// Moves past what retention removed ahead of the cursor; the next read starts at
    /// the horizon.
    fn overtaken(&mut self, horizon: Horizon, first_id: Option<Ulid>) -> Item {
        let cursor = horizon.last_pruned_id.unwrap_or(self.last_id);
        let skipped = self
            .last_seq
            .map(|seq| horizon.pruned_through.saturating_sub(seq));
        tracing::warn!(
            from = %self.last_id,
            to = %cursor,
            ?skipped,
            "a subscriber was overtaken by retention: continuing at the horizon"
        );
        self.last_id = cursor;
        self.last_seq = Some(horizon.pruned_through);
        self.batch_events = FIRST_REPLAY_BATCH_EVENTS;
        Item::Pruned {
            cursor,
            first_id,
            skipped,
        }
    }

    fn spawn_read(
        &mut self,
        scan: Option<Box<Scan>>,
        after: Ulid,
    ) -> tokio::task::JoinHandle<Result<Read, StoreError>> {
        let store = self.store.clone();
        let selector = self.selector.clone();
        let limit = self.batch_events;
        self.batch_events = (limit * 2).min(REPLAY_BATCH_EVENTS);
        tokio::task::spawn_blocking(move || read_batch(&store, scan, after, &*selector, limit))
    }
}

/// What one store read found.
enum Read {
    /// Matching events, the last event scanned (id and seq), and the scan to continue.
    Batch(Vec<Event>, Option<(Ulid, u64)>, Option<Box<Scan>>),
    /// Events after the cursor were pruned: the horizon, and the first retained id.
    Overtaken(Horizon, Option<Ulid>),
}

/// Reads up to `limit` matching events after `after`, continuing `scan` if there is one.
/// A scan stops at the head it saw when opened; when it runs out, one fresh scan tells
/// whether more was committed since. Returns the scan to continue with, if any.
///
/// A fresh scan from `after` is checked against the horizon after its first step (a
/// scan of a pruned range starts at the first retained event: that must not pass for
/// the next event); a scan that finds chunks removed under it stops, and the fresh scan
/// that follows makes that check.
fn read_batch(
    store: &Store,
    scan: Option<Box<Scan>>,
    after: Ulid,
    selector: &dyn Selector,
    limit: usize,
) -> Result<Read, StoreError> {
    let mut matching = Vec::new();
    let mut bytes = 0;
    let mut last_scanned = None;
    let mut scanned = 0;
    let (mut scan, mut fresh) = match scan {
        Some(scan) => (*scan, false),
        None => (store.scan_after(after)?, true),
    };
    let mut unchecked = fresh;
    let mut rescans = 0;
    loop {
        let next = scan.next();
        if std::mem::take(&mut unchecked) {
            let horizon = store.horizon_after_reads();
            if horizon.cuts(after) {
                let first_id = store.first_retained()?.map(|(_, id)| id);
                return Ok(Read::Overtaken(horizon, first_id));
            }
        }
        match next {
            Some(Err(StoreError::Pruned(_))) if last_scanned.is_some() => {
                return Ok(Read::Batch(matching, last_scanned, None));
            }
            Some(Err(StoreError::Pruned(_))) if rescans < 2 => {
                rescans += 1;
                scan = store.scan_after(after)?;
                (fresh, unchecked) = (true, true);
            }
            Some(event) => {
                let event = event?;
                scanned += 1;
                last_scanned = Some((event.id, event.seq));
                if selector.matches(&event) {
                    bytes += event.line.len();
                    matching.push(event);
                }
                if matching.len() >= limit
                    || bytes >= REPLAY_BATCH_BYTES
                    || scanned >= REPLAY_BATCH_EVENTS * 8
                {
                    return Ok(Read::Batch(matching, last_scanned, Some(Box::new(scan))));
                }
            }
            None if fresh || last_scanned.is_some() => {
                return Ok(Read::Batch(matching, last_scanned, None));
            }
            None => {
                scan = store.scan_after(after)?;
                (fresh, unchecked) = (true, true);
            }
        }
    }
}
