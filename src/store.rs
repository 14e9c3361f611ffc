//! The log on disk: the only code that knows sled.
//!
//! # Layout
//!
//! One sled tree, `log`, holds everything a group commit writes, so that a single
//! atomic `apply_batch` covers it:
//!
//! | key | value |
//! |---|---|
//! | `e` ‖ first ULID (16 B, big-endian) | a *chunk*: consecutive events, bincode, LZ4-compressed |
//! | `s` ‖ first seq (8 B, big-endian) | the chunk's ULID (the seq index) |
//! | `i` ‖ token id ‖ `0x00` ‖ key | an idempotency record |
//! | `m` ‖ first leaf (8 B, big-endian) | Merkle tree hashes written by a run of leaves: leaf count (8 B), then (stored-hash index (8 B), hash (32 B)) pairs |
//! | `h` | the retention horizon ([`Horizon`]): last pruned seq, id and hash; absent until a prune |
//! | `n` | the tree size when signed checkpoints started being noted (8 B): blocks below it count as cut |
//! | `c` ‖ block (8 B) | a signed checkpoint's size falls inside this 64-leaf block (value empty) |
//! | `k` ‖ block (8 B) | leaf hashes of pruned leaves of this block, from its first leaf on (32 B each) |
//! | `ba` | compressed chunk bytes ever appended (8 B; written by each group commit) |
//! | `br` | compressed chunk bytes ever pruned (8 B; written by each prune) |
//!
//! Retention (`docs/retention.md`) removes whole chunks oldest first ([`Store::prune`]),
//! their seq index entries, and writes the horizon, in one batch. The `m` hashes are
//! never removed; the leaf hashes of a pruned block are kept (`k`) only where proofs need
//! the tree's lower levels: the block the horizon falls in, and blocks a signed
//! checkpoint's size cuts.
//! | `p` | cluster mode: the stream sequence of the newest group applied from NATS (8 B, big-endian) |
//!
//! The Merkle hashes ([`crate::merkle`]) are written in the same batch as the events they
//! cover, so the tree and the log never disagree after a crash. The hash at stored-hash
//! index `i` is written with a known leaf, so it is in the last `m` value keyed ≤ that leaf.
//!
//! Why chunks: a sled insert costs ~13 µs, so one key per event caps ingest near
//! 70k events/s; a few keys per group commit lift that cap. A chunk is bincode,
//! compressed with LZ4: event JSON repeats its member names, and sled writes every value
//! several times (insert, leaf consolidation, split), so bytes are what a flush pays for.
//!
//! Chunks hold up to `CHUNK_EVENTS` events or `CHUNK_BYTES` of JSON, and each
//! compressed value stays at or below `MAX_VALUE_BYTES` (a chunk that compresses
//! worse is halved), for a sled reason: a leaf holds up to 17 entries and is rewritten
//! whole when consolidated, and any logged page larger than a quarter segment
//! (`SEGMENT_BYTES`) goes to a separate *blob file*. 17 × 24 KiB stays under
//! 512 KiB, so only a single very large event makes a blob. Fewer, larger values also
//! mean fewer inserts and consolidations per event: going from 64 to 256 events per
//! chunk took W1 from ~190k to ~245k events/s.
//!
//! ULIDs increase with seq, so "the chunk holding id X" is the last chunk key ≤ X, and
//! "the chunk holding seq N" is the last seq-index key ≤ N: both O(log n) lookups.
//!
//! Durability: sled's `flush` on Linux ends with `sync_file_range`, which does not
//! flush the device's write cache, and sled never syncs blob files at all. So
//! [`Store::sync`] follows sled's flush with `fdatasync` on the log file and on any
//! blob file not yet synced (and on the blob directory).
//!
//! Readers never see past the *committed* head, the newest event known to be durable
//! (set by the writer after each sync), so a query cannot return an event a crash
//! could take back.

use std::cell::RefCell;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use ulid::Ulid;

use crate::chain::{self, ZERO_HASH};
use crate::event::Event;

/// Most events in one stored chunk.
const CHUNK_EVENTS: usize = 256;
/// A chunk is closed once its lines reach this many bytes (before compression).
const CHUNK_BYTES: usize = 128 * 1024;
/// Largest compressed chunk; larger ones are split in two.
const MAX_VALUE_BYTES: usize = 24 * 1024;
/// sled's segment size: fixed for the life of a data directory.
const SEGMENT_BYTES: usize = 2 << 20;
/// A decompressed chunk larger than this is corrupt (a chunk holds one request's
/// events at most, and a request is at most 16 MiB by default).
const MAX_CHUNK_BYTES: usize = 256 << 20;

const EVENT_PREFIX: u8 = b'e';
const SEQ_PREFIX: u8 = b's';
const IDEMPOTENCY_PREFIX: u8 = b'i';
const TREE_PREFIX: u8 = b'm';
const HORIZON_KEY: &[u8] = b"h";
const NOTED_FROM_KEY: &[u8] = b"n";
const CUT_PREFIX: u8 = b'c';
const KEPT_PREFIX: u8 = b'k';
/// Leaves per block of the tree's unstored lower levels (see [`crate::merkle`]).
const BLOCK_LEAVES: u64 = 1 << crate::merkle::STORED_FROM_LEVEL;
/// Most chunks one prune batch removes (about 64k events): bounds its memory.
const PRUNE_BATCH_CHUNKS: usize = 256;
const STREAM_POSITION_KEY: &[u8] = b"p";
/// Cluster mode: the JetStream stream whose log this directory copies.
const CLUSTER_STREAM_KEY: &[u8] = b"N";
/// Cluster mode: `g` ‖ a stream group's first seq → its stream sequence. Retention's
/// horizon is always the end of a group (docs/retention.md, "Cluster mode").
const GROUP_PREFIX: u8 = b'g';
/// The stored log's size is `ba − br`: two totals, each with a single writer (the writer
/// thread; a prune), so neither update races the other.
const APPENDED_BYTES_KEY: &[u8] = b"ba";
const PRUNED_BYTES_KEY: &[u8] = b"br";
/// Leaves per tree value: with the tree's lower levels not stored, about 16 KiB.
const TREE_LEAVES_PER_VALUE: u64 = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the data directory {0} is in use by another cairn process; stop it, or use --url to talk to the running server"
    )]
    Locked(PathBuf),
    #[error("{0} holds no cairn log (is the path right?)")]
    NoLog(PathBuf),
    #[error("corrupt record in the log: {0}")]
    Corrupt(String),
    #[error("pruned by retention: {0}")]
    Pruned(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The newest event of a log (or the empty log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub id: Option<Ulid>,
    pub hash: [u8; 32],
    pub timestamp: Option<String>,
}

impl Head {
    pub const EMPTY: Head = Head {
        seq: 0,
        id: None,
        hash: ZERO_HASH,
        timestamp: None,
    };

    /// The head after `event`, whose line holds its hash and timestamp.
    pub fn of(event: &Event) -> Result<Head> {
        let info = chain::inspect_line(event.line.as_bytes()).map_err(StoreError::Corrupt)?;
        Head::after(event, info.stated_hash)
    }

    /// The head after `event`, whose hash the caller has already read from its line.
    pub fn after(event: &Event, hash: [u8; 32]) -> Result<Head> {
        let timestamp = serde_json::from_str::<TimestampOnly>(&event.line)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?
            .timestamp;
        Ok(Head {
            seq: event.seq,
            id: Some(event.id),
            hash,
            timestamp: Some(timestamp),
        })
    }
}

/// Where the retained log starts: everything up to `pruned_through` was removed by
/// retention. The first retained event's `prev_hash` is `last_pruned_hash`, so the
/// chain is verified from the horizon on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Horizon {
    /// The last pruned seq (0: nothing was pruned).
    pub pruned_through: u64,
    /// The last pruned event's id.
    pub last_pruned_id: Option<Ulid>,
    /// The last pruned event's hash (zeros when nothing was pruned).
    pub last_pruned_hash: [u8; 32],
}

impl Horizon {
    /// The first retained seq (on a non-empty log).
    pub fn first_seq(&self) -> u64 {
        self.pruned_through + 1
    }

    /// Whether events after `cursor` (a `since`) were pruned: a read from it starts at
    /// the horizon and must say so.
    pub fn cuts(&self, cursor: Ulid) -> bool {
        self.last_pruned_id.is_some_and(|last| cursor < last)
    }
}

/// What one prune removed.
#[derive(Debug, Clone)]
pub struct Pruned {
    pub first_seq: u64,
    pub last_seq: u64,
    pub chunks: usize,
    pub horizon: Horizon,
}

/// What a prune hands the events it is about to remove (to write an archive): it must
/// have made them durable when it returns `Ok`.
pub type Archiver<'a> = &'a mut dyn FnMut(&[Event]) -> Result<()>;

/// Which events a prune may remove: those with `seq <= max_seq` and `id <= max_id`.
#[derive(Debug, Clone, Copy)]
pub struct PruneLimit {
    pub max_seq: u64,
    pub max_id: Ulid,
}

#[derive(Deserialize)]
struct TimestampOnly {
    timestamp: String,
}

/// What an `Idempotency-Key` produced the first time it was used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub body_hash: [u8; 32],
    pub first_seq: u64,
    pub last_seq: u64,
    pub created_unix_ms: u64,
}

/// Exclusive access to a data directory, held for the life of the process.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: File,
}

impl DataDir {
    /// Creates the directory if needed and locks it.
    pub fn lock(path: &Path) -> Result<DataDir> {
        let io = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(path).map_err(io)?;
        let lock_path = path.join("cairn.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StoreError::Io {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(path.to_path_buf()));
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(StoreError::Io {
                    path: lock_path,
                    source,
                });
            }
        }
        Ok(DataDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// Locks an existing data directory that holds a log (for offline commands, which
    /// must not create an empty log where a path was mistyped).
    pub fn lock_existing(path: &Path) -> Result<DataDir> {
        if !path.join("log").is_dir() {
            return Err(StoreError::NoLog(path.to_path_buf()));
        }
        DataDir::lock(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// On-disk form of one event inside a chunk (read back as [`StoredEventBytes`]).
#[derive(Serialize)]
struct StoredEvent<'a> {
    id: u128,
    seq: u64,
    event_type: &'a str,
    source: Option<&'a str>,
    line: &'a str,
}

pub(crate) fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// A chunk's events in their stored form, serialized as the sequence a
/// `Vec<StoredEvent>` would be (same bytes) without building that `Vec`.
struct ChunkEvents<'a>(&'a [Event]);

impl Serialize for ChunkEvents<'_> {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|e| StoredEvent {
            id: e.id.0,
            seq: e.seq,
            event_type: &e.event_type,
            source: e.source.as_deref(),
            line: &e.line,
        }))
    }
}

thread_local! {
    /// The last chunk's uncompressed encoding and compressed form, kept for their
    /// capacity: grown from empty for every chunk (~120 KB), they cost the writer a
    /// chain of reallocations and fresh pages per group.
    static CHUNK_SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Scratch buffers larger than this (a cluster group's message, a single large event)
/// are freed after use rather than kept by the thread.
const SCRATCH_KEPT_BYTES: usize = 4 * CHUNK_BYTES;

/// Events as one compressed chunk (the stored form, also the cluster's message form),
/// passed to `use_chunk`: bincode, then LZ4 with the plain length prepended.
fn with_encoded_chunk<T>(events: &[Event], use_chunk: impl FnOnce(&[u8]) -> T) -> T {
    CHUNK_SCRATCH.with_borrow_mut(|(plain, packed)| {
        plain.clear();
        // Encoding plain structs into a Vec cannot fail.
        let _ = bincode::serde::encode_into_std_write(ChunkEvents(events), plain, bincode_config());
        let needed = 4 + lz4_flex::block::get_maximum_output_size(plain.len());
        if packed.len() < needed {
            packed.resize(needed, 0);
        }
        packed[..4].copy_from_slice(&(plain.len() as u32).to_le_bytes());
        // The output holds the worst case, so this does not fail; if it did, the
        // allocating form (same bytes) is used rather than storing a broken chunk.
        let used = match lz4_flex::block::compress_into(plain, &mut packed[4..]) {
            Ok(len) => use_chunk(&packed[..4 + len]),
            Err(_) => use_chunk(&lz4_flex::compress_prepend_size(plain)),
        };
        for buffer in [plain, packed] {
            if buffer.capacity() > SCRATCH_KEPT_BYTES {
                *buffer = Vec::new();
            }
        }
        used
    })
}

/// Events as one compressed chunk: the stored form, also the cluster's message form.
pub(crate) fn encode_chunk(events: &[Event]) -> Vec<u8> {
    with_encoded_chunk(events, <[u8]>::to_vec)
}

pub(crate) fn decode_chunk(bytes: &[u8]) -> Result<Vec<Event>> {
    let claimed = bytes
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| StoreError::Corrupt("chunk too short".into()))?;
    if claimed > MAX_CHUNK_BYTES {
        return Err(StoreError::Corrupt(format!("chunk claims {claimed} bytes")));
    }
    let plain = bytes::Bytes::from(
        lz4_flex::decompress_size_prepended(bytes)
            .map_err(|e| StoreError::Corrupt(format!("chunk does not decompress: {e}")))?,
    );
    let (events, _) =
        bincode::serde::seed_decode_from_slice(ChunkReader(&plain), &plain, bincode_config())
            .map_err(|e| StoreError::Corrupt(format!("chunk does not decode: {e}")))?;
    Ok(events)
}

/// One stored event as read back: [`StoredEvent`] with the line as bytes (bincode
/// encodes `str` and bytes alike), so that it is checked for UTF-8 once, when it
/// becomes the event's `ByteString`, not also while decoding.
#[derive(Deserialize)]
struct StoredEventBytes<'a> {
    id: u128,
    seq: u64,
    #[serde(borrow)]
    event_type: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    source: Option<std::borrow::Cow<'a, str>>,
    line: &'a [u8],
}

/// Decodes a decompressed chunk straight into events, each line a view into the chunk
/// (no copy, no allocation each, no intermediate `Vec` of stored events).
struct ChunkReader<'p>(&'p bytes::Bytes);

impl<'de> serde::de::DeserializeSeed<'de> for ChunkReader<'_> {
    type Value = Vec<Event>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<Vec<Event>, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ChunkReader<'_> {
    type Value = Vec<Event>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a sequence of stored events")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Vec<Event>, A::Error> {
        // The stated count comes from the stored bytes: not trusted for the allocation.
        let mut events = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(CHUNK_EVENTS));
        while let Some(stored) = seq.next_element::<StoredEventBytes<'de>>()? {
            let line = ByteString::try_from(self.0.slice_ref(stored.line))
                .map_err(|_| serde::de::Error::custom("event line is not UTF-8"))?;
            events.push(Event {
                id: Ulid(stored.id),
                seq: stored.seq,
                event_type: stored.event_type.into_owned(),
                source: stored.source.map(|c| c.into_owned()),
                line,
            });
        }
        Ok(events)
    }
}

fn event_key(id: Ulid) -> [u8; 17] {
    let mut k = [EVENT_PREFIX; 17];
    k[1..].copy_from_slice(&id.0.to_be_bytes());
    k
}

fn seq_key(seq: u64) -> [u8; 9] {
    let mut k = [SEQ_PREFIX; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Replaces `path` with `bytes` (a new file gets `mode`): a reader sees the old file or
/// the new one, and after a crash the new one is there only if it was complete. For the
/// small files beside the log: `admin.token`, `checkpoint.key`, `checkpoint`.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

fn block_key(prefix: u8, block: u64) -> [u8; 9] {
    let mut k = [prefix; 9];
    k[1..].copy_from_slice(&block.to_be_bytes());
    k
}

fn seq_from_key(key: &[u8]) -> Result<u64> {
    key.get(1..9)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt("malformed seq index key".into()))
}

/// One chunk a prune removes: its seq range (from the seq index), its stored bytes, and
/// where its events are in the prune's decoded events, if it was decoded.
struct PrunedChunk {
    seq: u64,
    /// Its last seq: the next chunk's first seq − 1.
    end: u64,
    id: Ulid,
    /// The next chunk's first id.
    next_id: Ulid,
    bytes: sled::IVec,
    /// Its events, when they were decoded to find where the batch ends.
    early: Option<Vec<Event>>,
    decoded: Option<std::ops::Range<usize>>,
}

impl PrunedChunk {
    /// Decodes the chunk and checks it holds exactly the seqs and ids the seq index says.
    fn decode(&self) -> Result<Vec<Event>> {
        let chunk = decode_chunk(&self.bytes)?;
        let fits = match (chunk.first(), chunk.last()) {
            (Some(first), Some(last)) => {
                first.seq == self.seq
                    && first.id == self.id
                    && last.seq == self.end
                    && chunk.len() as u64 == self.end + 1 - self.seq
                    && last.id < self.next_id
            }
            _ => false,
        };
        if !fits {
            return Err(StoreError::Corrupt(format!(
                "chunk of seq {} does not hold exactly seqs {}..={} as the seq index says",
                self.seq, self.seq, self.end
            )));
        }
        Ok(chunk)
    }
}

/// Which pruned blocks keep their leaf hashes (`k`).
struct KeptBlocks {
    /// Cluster mode: every block.
    every: bool,
    /// Blocks below this tree size count as cut (`n`).
    noted_from: u64,
    /// Blocks a signed checkpoint's size cuts (`c`), within the pruned range.
    cut: std::collections::BTreeSet<u64>,
    /// The block the new horizon falls inside.
    horizon: u64,
}

impl KeptBlocks {
    fn contains(&self, block: u64) -> bool {
        self.every
            || block * BLOCK_LEAVES < self.noted_from
            || block == self.horizon
            || self.cut.contains(&block)
    }
}

/// The block holding event `seq`'s leaf.
fn leaf_block(seq: u64) -> u64 {
    (seq - 1) / BLOCK_LEAVES
}

/// A seq index entry: a chunk's first seq and first id.
fn seq_index_entry((key, value): (sled::IVec, sled::IVec)) -> Result<(u64, Ulid)> {
    let id = <[u8; 16]>::try_from(value.as_ref())
        .map_err(|_| StoreError::Corrupt("malformed seq index entry".into()))?;
    Ok((seq_from_key(&key)?, Ulid(u128::from_be_bytes(id))))
}

fn tree_key(index: u64) -> [u8; 9] {
    let mut k = [TREE_PREFIX; 9];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn idempotency_key(token_id: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + token_id.len() + key.len());
    k.push(IDEMPOTENCY_PREFIX);
    k.extend_from_slice(token_id.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn ulid_from_key(key: &[u8]) -> Result<Ulid> {
    let bytes: [u8; 16] = key
        .get(1..17)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt("malformed chunk key".into()))?;
    Ok(Ulid(u128::from_be_bytes(bytes)))
}

/// Compressed bytes per 1,024 bytes of lines in the last chunk written (0: none yet).
/// Chunks are cut to fit `MAX_VALUE_BYTES` by this ratio, so that a full chunk is
/// compressed once: cut by `CHUNK_BYTES` alone, the peers' 300-byte events made 252-event
/// chunks of ~26.6 KB, each compressed, thrown away and compressed again as two halves.
static COMPRESSED_PER_KIB: AtomicUsize = AtomicUsize::new(0);

/// Line bytes that should compress to at most 90% of `MAX_VALUE_BYTES` (the margin
/// absorbs the variation between chunks; a chunk that still overflows is halved).
fn chunk_budget() -> usize {
    match COMPRESSED_PER_KIB.load(Ordering::Relaxed) {
        0 => CHUNK_BYTES,
        per_kib => (MAX_VALUE_BYTES * 9 / 10 * 1024 / per_kib).min(CHUNK_BYTES),
    }
}

/// Everything one group commit writes, applied atomically.
#[derive(Default)]
pub struct CommitBatch {
    batch: sled::Batch,
    /// Chunks compressed and thrown away because they were too large.
    #[cfg(test)]
    splits: usize,
    /// Compressed chunk bytes added (for `--retain-bytes`).
    chunk_bytes: u64,
}

impl CommitBatch {
    /// Adds consecutive events (in log order), packed into chunks.
    pub fn add_events(&mut self, events: &[Event]) {
        let budget = chunk_budget();
        let mut start = 0;
        let mut bytes = 0;
        for (i, event) in events.iter().enumerate() {
            bytes += event.line.len();
            if i + 1 - start >= CHUNK_EVENTS || bytes >= budget {
                self.add_chunk(&events[start..=i]);
                start = i + 1;
                bytes = 0;
            }
        }
        if start < events.len() {
            self.add_chunk(&events[start..]);
        }
    }

    /// Adds consecutive events that `encoded` already holds as one chunk (`encode_chunk`
    /// of exactly these events, as a cluster stream message carries them): stored as it
    /// is when it is within one chunk's limits, packed as [`CommitBatch::add_events`]
    /// does otherwise.
    pub fn add_encoded_events(&mut self, events: &[Event], encoded: &[u8]) {
        let Some(first) = events.first() else {
            return;
        };
        let line_bytes: usize = events.iter().map(|e| e.line.len()).sum();
        // Larger chunks would cost the chunk cache (a fixed number of chunks) and each
        // read more: the same limits as packed chunks.
        if events.len() > CHUNK_EVENTS
            || encoded.len() > MAX_VALUE_BYTES
            || line_bytes > CHUNK_BYTES
        {
            self.add_events(events);
            return;
        }
        self.put_chunk(first, encoded);
    }

    /// Adds one chunk, halving it until each compressed value fits `MAX_VALUE_BYTES`
    /// (a single event larger than that is stored alone).
    fn add_chunk(&mut self, events: &[Event]) {
        let Some(first) = events.first() else {
            return;
        };
        let line_bytes: usize = events.iter().map(|e| e.line.len()).sum();
        let fits = with_encoded_chunk(events, |value| {
            COMPRESSED_PER_KIB.store(
                (value.len() * 1024 / line_bytes.max(1)).max(1),
                Ordering::Relaxed,
            );
            let fits = value.len() <= MAX_VALUE_BYTES || events.len() == 1;
            if fits {
                self.put_chunk(first, value);
            }
            fits
        });
        if !fits {
            #[cfg(test)]
            {
                self.splits += 1;
            }
            let (left, right) = events.split_at(events.len() / 2);
            self.add_chunk(left);
            self.add_chunk(right);
        }
    }

    /// Stores one encoded chunk under its first event's id, with the seq index entry,
    /// and counts its bytes.
    fn put_chunk(&mut self, first: &Event, value: &[u8]) {
        self.chunk_bytes += value.len() as u64;
        self.batch.insert(&event_key(first.id)[..], value);
        self.batch
            .insert(&seq_key(first.seq)[..], &first.id.0.to_be_bytes()[..]);
    }

    /// Adds the Merkle tree hashes written by leaves `first_leaf..first_leaf + leaves`:
    /// (stored-hash index, hash) pairs in index order, each with the leaf that wrote it.
    pub fn add_tree_hashes(
        &mut self,
        first_leaf: u64,
        leaves: u64,
        hashes: &[(u64, u64, [u8; 32])],
    ) {
        let mut rest = hashes;
        let mut start = first_leaf;
        let end = first_leaf + leaves;
        while start < end {
            let stop = (start + TREE_LEAVES_PER_VALUE).min(end);
            let n = rest.iter().take_while(|(_, leaf, _)| *leaf < stop).count();
            let mut value = Vec::with_capacity(8 + n * 40);
            value.extend_from_slice(&(stop - start).to_be_bytes());
            for (index, _, hash) in &rest[..n] {
                value.extend_from_slice(&index.to_be_bytes());
                value.extend_from_slice(hash);
            }
            self.batch.insert(&tree_key(start)[..], value);
            rest = &rest[n..];
            start = stop;
        }
    }

    pub fn add_idempotency(&mut self, token_id: &str, key: &str, record: &IdempotencyRecord) {
        let value = bincode::serde::encode_to_vec(record, bincode_config()).unwrap_or_default();
        self.batch.insert(idempotency_key(token_id, key), value);
    }

    pub fn remove_idempotency(&mut self, raw_key: Vec<u8>) {
        self.batch.remove(raw_key);
    }

    /// Cluster mode: the stream sequence this batch brings the local copy up to.
    pub fn set_stream_position(&mut self, stream_seq: u64) {
        self.batch
            .insert(STREAM_POSITION_KEY, &stream_seq.to_be_bytes()[..]);
    }

    /// Cluster mode: the stream group at `stream_seq` begins with event `first_seq`.
    pub fn add_group_start(&mut self, first_seq: u64, stream_seq: u64) {
        self.batch.insert(
            &block_key(GROUP_PREFIX, first_seq)[..],
            &stream_seq.to_be_bytes()[..],
        );
    }
}

pub struct Store {
    db: sled::Db,
    log: sled::Tree,
    tokens: sled::Tree,
    /// Webhook definitions and their durable cursors ([`crate::webhook`]).
    webhooks: sled::Tree,
    /// sled's log file, for the `fdatasync` sled's own flush leaves out.
    log_file: File,
    blob_dir: PathBuf,
    /// Blob files already synced (sled removes them itself when it no longer needs them).
    synced_blobs: std::sync::Mutex<std::collections::HashSet<std::ffi::OsString>>,
    committed: RwLock<Head>,
    chunk_cache: quick_cache::sync::Cache<u128, Arc<Vec<Event>>>,
    horizon: RwLock<Horizon>,
    /// Held (shared) by reads that combine kept leaf hashes with events, and
    /// (exclusively) while a prune's batch is applied, so they never see half of it.
    pruning: RwLock<()>,
    /// Compressed chunk bytes ever appended and ever pruned (`ba`, `br`).
    appended_bytes: std::sync::atomic::AtomicU64,
    pruned_bytes: std::sync::atomic::AtomicU64,
    /// One prune at a time (the background pruner and a manual prune may overlap).
    prune_lock: Mutex<()>,
    /// The tree size from which signed checkpoints are noted (`n`).
    noted_from: u64,
    /// Cluster mode: every pruned leaf hash is kept (any node's checkpoint may need it).
    keep_every_leaf: std::sync::atomic::AtomicBool,
    _dir: DataDir,
}

/// Opens sled with cairn's fixed settings. sled writes its settings file (`log/conf`) when
/// it creates a log and never fsyncs it, so a power cut can leave it torn; sled then
/// refuses the whole log ("Read corrupted data", or a settings mismatch) although every
/// event is intact. sled only warns about the file's checksum, so cairn checks it first:
/// a damaged file is set aside as `log/conf.damaged` and sled writes it anew, which is
/// safe because cairn always opens sled with the same settings. An intact file is left to
/// sled (a real mismatch of settings is sled's to refuse).
fn open_sled(db_path: &Path) -> Result<sled::Db> {
    let settings = db_path.join("conf");
    if let Some(damage) = settings_damage(&settings)? {
        let aside = db_path.join("conf.damaged");
        std::fs::rename(&settings, &aside).map_err(|source| StoreError::Io {
            path: settings.clone(),
            source,
        })?;
        tracing::warn!(
            damaged = %aside.display(),
            "sled's settings file was damaged ({damage}; a torn write, as after a power cut): \
             set it aside, and sled rewrites it with cairn's fixed settings"
        );
    }
    Ok(sled::Config::new()
        .path(db_path)
        .cache_capacity(SLED_CACHE_BYTES)
        .segment_size(SEGMENT_BYTES)
        .open()?)
}

/// What is wrong with sled's settings file, if anything: its last 4 bytes are the
/// CRC-32 (little-endian) of the rest. A missing file, or one of 8 bytes or fewer, sled
/// treats as absent and writes itself.
fn settings_damage(path: &Path) -> Result<Option<&'static str>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if bytes.len() <= 8 {
        return Ok(None);
    }
    let Some((text, crc)) = bytes.split_last_chunk::<4>() else {
        return Ok(None);
    };
    if crc32fast::hash(text) != u32::from_le_bytes(*crc) {
        return Ok(Some("its checksum does not match"));
    }
    Ok(None)
}

/// An 8-byte big-endian record, if present.
fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<Option<u64>> {
    tree.get(key)?
        .map(|v| {
            <[u8; 8]>::try_from(v.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| {
                    StoreError::Corrupt(format!(
                        "malformed {:?} record",
                        String::from_utf8_lossy(key)
                    ))
                })
        })
        .transpose()
}

/// fsyncs sled's settings file and the directories that name it, which sled never does,
/// so the file a power cut can tear is on disk before the first event is acknowledged.
fn sync_settings_file(data_dir: &Path, db_path: &Path) -> Result<()> {
    for path in [
        db_path.join("conf"),
        db_path.to_path_buf(),
        data_dir.to_path_buf(),
    ] {
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|source| StoreError::Io { path, source })?;
    }
    Ok(())
}

/// Sled's page cache; the rest of the process stays small beside it.
const SLED_CACHE_BYTES: u64 = 32 << 20;
/// Decoded chunks kept for point lookups (`/v1/events/{id}`, paging).
const CHUNK_CACHE_ENTRIES: usize = 256;

impl Store {
    /// Opens (or creates) the log in a locked data directory and loads its head.
    pub fn open(dir: DataDir) -> Result<Store> {
        let db_path = dir.path().join("log");
        let db = open_sled(&db_path)?;
        sync_settings_file(dir.path(), &db_path)?;
        let log = db.open_tree("log")?;
        let tokens = db.open_tree("tokens")?;
        let webhooks = db.open_tree("webhooks")?;
        let log_file_path = db_path.join("db");
        let log_file = File::open(&log_file_path).map_err(|source| StoreError::Io {
            path: log_file_path,
            source,
        })?;
        let store = Store {
            db,
            log,
            tokens,
            webhooks,
            log_file,
            blob_dir: db_path.join("blobs"),
            synced_blobs: Default::default(),
            committed: RwLock::new(Head::EMPTY),
            chunk_cache: quick_cache::sync::Cache::new(CHUNK_CACHE_ENTRIES),
            horizon: RwLock::new(Horizon::default()),
            pruning: RwLock::new(()),
            appended_bytes: Default::default(),
            pruned_bytes: Default::default(),
            prune_lock: Mutex::new(()),
            noted_from: 0,
            keep_every_leaf: Default::default(),
            _dir: dir,
        };
        let mut store = store;
        if let Some(bytes) = store.log.get(HORIZON_KEY)? {
            let (horizon, _) =
                bincode::serde::decode_from_slice::<Horizon, _>(&bytes, bincode_config())
                    .map_err(|e| StoreError::Corrupt(format!("horizon record: {e}")))?;
            store.horizon = RwLock::new(horizon);
        }
        let head = match store.last_chunk()? {
            Some(chunk) => match chunk.last() {
                Some(last) => Head::of(last)?,
                None => return Err(StoreError::Corrupt("empty chunk".into())),
            },
            None => Head::EMPTY,
        };
        store.noted_from = match store.log.get(NOTED_FROM_KEY)? {
            Some(v) => v
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("malformed noted-from record".into()))?,
            None => {
                // Checkpoints signed before this record existed were not noted: count
                // every block up to the head as cut (their leaf hashes are kept).
                store
                    .log
                    .insert(NOTED_FROM_KEY, &head.seq.to_be_bytes()[..])?;
                store.db.flush()?;
                head.seq
            }
        };
        let (appended, pruned) = match (
            read_u64(&store.log, APPENDED_BYTES_KEY)?,
            read_u64(&store.log, PRUNED_BYTES_KEY)?,
        ) {
            (Some(appended), pruned) => (appended, pruned.unwrap_or(0)),
            (None, _) => {
                // A log written before the totals existed: count its chunks once.
                let stored = store.count_chunk_bytes()?;
                if stored > 0 {
                    store
                        .log
                        .insert(APPENDED_BYTES_KEY, &stored.to_be_bytes()[..])?;
                    store
                        .log
                        .insert(PRUNED_BYTES_KEY, &0u64.to_be_bytes()[..])?;
                    store.db.flush()?;
                }
                (stored, 0)
            }
        };
        *store.keep_every_leaf.get_mut() = store.log.contains_key(CLUSTER_STREAM_KEY)?;
        *store.appended_bytes.get_mut() = appended;
        *store.pruned_bytes.get_mut() = pruned;
        store.set_committed(head);
        Ok(store)
    }

    /// The retention horizon (webhooks read it to count what they skipped).
    pub fn horizon(&self) -> Horizon {
        *self.horizon.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The horizon, once a prune whose removal a read may already have seen has also
    /// published its horizon (a prune holds the exclusive side while it does both): a
    /// reader that checks this after reading never misses the prune that hid its events.
    pub fn horizon_after_reads(&self) -> Horizon {
        let _shared = self.pruning.read().unwrap_or_else(|p| p.into_inner());
        self.horizon()
    }

    /// The first retained event's seq and id; `None` on an empty log.
    pub fn first_retained(&self) -> Result<Option<(u64, Ulid)>> {
        if self.head().seq == 0 {
            return Ok(None);
        }
        loop {
            let horizon = self.horizon();
            match self.get_by_seq(horizon.first_seq())? {
                Some(e) => return Ok(Some((e.seq, e.id))),
                // A prune removed it after the horizon was read (once the prune has
                // also published its horizon, which `horizon_after_reads` waits for).
                None if self.horizon_after_reads() != horizon => continue,
                None => return Ok(None),
            }
        }
    }

    /// Counts the compressed bytes of the stored chunks (one pass over the log).
    fn count_chunk_bytes(&self) -> Result<u64> {
        let mut total = 0u64;
        for kv in self
            .log
            .range(&event_key(Ulid(0))[..]..=&event_key(Ulid(u128::MAX))[..])
        {
            total += kv?.1.len() as u64;
        }
        Ok(total)
    }

    /// The stored log's size: compressed bytes of the retained chunks, what
    /// `cairn_log_bytes` reports and `--retain-bytes` bounds (SPEC §8).
    pub fn chunk_bytes(&self) -> u64 {
        let appended = self
            .appended_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        appended.saturating_sub(self.pruned_bytes.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Whether a signed checkpoint's size may fall inside `block` (its leaf hashes are
    /// then kept when it is pruned).
    fn block_is_cut(&self, block: u64) -> Result<bool> {
        // A cluster node answers proofs for checkpoints other nodes signed (one key),
        // whose sizes it never saw: it keeps every leaf hash (32 B per event).
        Ok(self.keep_every_leaf.load(Ordering::Relaxed)
            || block * BLOCK_LEAVES < self.noted_from
            || self.log.contains_key(block_key(CUT_PREFIX, block))?)
    }

    /// Records, durably, that a checkpoint of `size` leaves is about to be signed, so
    /// pruning keeps the lower tree levels its proofs need. Call before signing it.
    pub fn note_checkpoint(&self, size: u64) -> Result<()> {
        let block = size / BLOCK_LEAVES;
        if size.is_multiple_of(BLOCK_LEAVES) || self.block_is_cut(block)? {
            return Ok(());
        }
        self.log.insert(block_key(CUT_PREFIX, block), &[][..])?;
        self.sync()
    }

    /// Removes whole chunks, oldest first, whose events are all within `limit`, never
    /// the last event, and at most [`PRUNE_BATCH_CHUNKS`] chunks (call again for more).
    /// `archive`, when given, gets the events first and must have made them durable when
    /// it returns `Ok`; then one batch removes them and records the new horizon, durable
    /// with the next [`Store::sync`] (until then a crash brings the events back, never
    /// half of them). `None` when no whole chunk is within the limit.
    ///
    /// Only the chunks whose events are needed are decoded: the batch's last (the new
    /// horizon's id and hash), those touching a block whose leaf hashes are kept, and all
    /// of them when archiving. Any other chunk's seq range comes from the seq index (it
    /// ends where the next one begins), and its bytes from its stored value's length.
    pub fn prune(
        &self,
        limit: PruneLimit,
        mut archive: Option<Archiver<'_>>,
    ) -> Result<Option<Pruned>> {
        let _one_at_a_time = self.prune_lock.lock().unwrap_or_else(|p| p.into_inner());
        let horizon = self.horizon();
        let max_seq = limit.max_seq.min(self.head().seq.saturating_sub(1));
        if max_seq <= horizon.pruned_through {
            return Ok(None);
        }
        // Chunks in seq order: each one ends where the next begins, so a chunk is
        // only taken when a later one exists (the last event stays).
        let mut index = self
            .log
            .range(&seq_key(horizon.first_seq())[..]..=&seq_key(u64::MAX)[..]);
        let Some(first) = index.next() else {
            return Ok(None);
        };
        let (mut seq, mut id) = seq_index_entry(first?)?;
        if seq != horizon.first_seq() {
            return Err(StoreError::Corrupt(format!(
                "the first chunk after the horizon begins at seq {seq}, not {}",
                horizon.first_seq()
            )));
        }
        let mut chunks: Vec<PrunedChunk> = Vec::new();
        let mut removed_bytes = 0u64;
        while chunks.len() < PRUNE_BATCH_CHUNKS {
            let Some(next) = index.next() else { break };
            let (next_seq, next_id) = seq_index_entry(next?)?;
            let end = next_seq - 1;
            if end > max_seq {
                break;
            }
            // Read past the chunk cache: pruned chunks would only evict what readers use.
            let bytes = self
                .log
                .get(event_key(id))?
                .ok_or_else(|| StoreError::Corrupt(format!("chunk of seq {seq} is missing")))?;
            let mut chunk = PrunedChunk {
                seq,
                end,
                id,
                next_id,
                bytes,
                early: None,
                decoded: None,
            };
            // Ids increase strictly, so the chunk's last id is below the next chunk's
            // first: within the limit when that one is. Otherwise only its own last id
            // tells, and if it is within the limit the next chunk's is not, so this
            // chunk ends the batch (and is decoded for the horizon anyway).
            let ends_batch = next_id > limit.max_id;
            if ends_batch {
                let decoded = chunk.decode()?;
                if decoded.last().is_none_or(|last| last.id > limit.max_id) {
                    break;
                }
                chunk.early = Some(decoded);
            }
            removed_bytes += chunk.bytes.len() as u64;
            chunks.push(chunk);
            (seq, id) = (next_seq, next_id);
            if ends_batch {
                break;
            }
        }
        let Some(pruned_through) = chunks.last().map(|c| c.end) else {
            return Ok(None);
        };
        let kept = self.kept_blocks(horizon.pruned_through, pruned_through)?;
        // The decoded chunks' events, in log order (all of them when archiving).
        let mut events: Vec<Event> = Vec::new();
        let last_chunk = chunks.len() - 1;
        for (i, chunk) in chunks.iter_mut().enumerate() {
            let early = chunk.early.take();
            let needed = early.is_some()
                || archive.is_some()
                || i == last_chunk
                || (leaf_block(chunk.seq)..=leaf_block(chunk.end)).any(|b| kept.contains(b));
            if needed {
                let decoded = match early {
                    Some(decoded) => decoded,
                    None => chunk.decode()?,
                };
                let start = events.len();
                events.extend(decoded);
                chunk.decoded = Some(start..events.len());
            }
        }
        if let Some(archive) = archive.as_mut() {
            archive(&events)?;
        }
        let last = events
            .last()
            .ok_or_else(|| StoreError::Corrupt("the last pruned chunk was not read".into()))?;
        let new_horizon = Horizon {
            pruned_through,
            last_pruned_id: Some(last.id),
            last_pruned_hash: chain::stated_hash(last.line.as_bytes())
                .map_err(StoreError::Corrupt)?,
        };
        let mut batch = sled::Batch::default();
        for chunk in &chunks {
            batch.remove(&event_key(chunk.id)[..]);
            batch.remove(&seq_key(chunk.seq)[..]);
        }
        for kv in self.log.range(
            &block_key(GROUP_PREFIX, horizon.first_seq())[..]
                ..=&block_key(GROUP_PREFIX, new_horizon.pruned_through)[..],
        ) {
            batch.remove(kv?.0);
        }
        self.keep_leaf_hashes(&mut batch, &chunks, &events, &kept)?;
        let record = bincode::serde::encode_to_vec(new_horizon, bincode_config())
            .map_err(|e| StoreError::Corrupt(format!("horizon record: {e}")))?;
        batch.insert(HORIZON_KEY, record);
        let pruned_bytes =
            self.pruned_bytes.load(std::sync::atomic::Ordering::Relaxed) + removed_bytes;
        batch.insert(PRUNED_BYTES_KEY, &pruned_bytes.to_be_bytes()[..]);
        {
            let _exclusive = self.pruning.write().unwrap_or_else(|p| p.into_inner());
            self.log.apply_batch(batch)?;
            *self.horizon.write().unwrap_or_else(|p| p.into_inner()) = new_horizon;
        }
        for chunk in &chunks {
            self.chunk_cache.remove(&chunk.id.0);
        }
        self.pruned_bytes
            .store(pruned_bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(Pruned {
            first_seq: horizon.first_seq(),
            last_seq: new_horizon.pruned_through,
            chunks: chunks.len(),
            horizon: new_horizon,
        }))
    }

    /// The blocks whose leaf hashes a prune from `pruned_before` (the old horizon)
    /// through `pruned_through` keeps: those a signed checkpoint may cut, and the one the
    /// new horizon falls inside.
    fn kept_blocks(&self, pruned_before: u64, pruned_through: u64) -> Result<KeptBlocks> {
        let (first, last) = (leaf_block(pruned_before + 1), leaf_block(pruned_through));
        let mut cut = std::collections::BTreeSet::new();
        for kv in self
            .log
            .range(&block_key(CUT_PREFIX, first)[..]..=&block_key(CUT_PREFIX, last)[..])
        {
            cut.insert(seq_from_key(&kv?.0)?);
        }
        Ok(KeptBlocks {
            every: self.keep_every_leaf.load(Ordering::Relaxed),
            noted_from: self.noted_from,
            cut,
            // The block of the first retained leaf (leaf = seq − 1).
            horizon: pruned_through / BLOCK_LEAVES,
        })
    }

    /// Adds to `batch` the kept leaf hashes of the blocks the pruned `chunks` touch
    /// (`events`: those chunks' decoded events): kept where `kept` says, dropped
    /// otherwise.
    fn keep_leaf_hashes(
        &self,
        batch: &mut sled::Batch,
        chunks: &[PrunedChunk],
        events: &[Event],
        kept: &KeptBlocks,
    ) -> Result<()> {
        let (Some(first), Some(last)) = (chunks.first(), chunks.last()) else {
            return Ok(());
        };
        // Pruned leaves: first.seq − 1 .. last.end (exclusive).
        let mut leaf = first.seq - 1;
        let mut chunk = chunks.iter();
        let mut current = chunk.next();
        while leaf < last.end {
            let block = leaf / BLOCK_LEAVES;
            let block_end = ((block + 1) * BLOCK_LEAVES).min(last.end);
            if !kept.contains(block) {
                // Not kept: nothing to hash. Only a block the previous horizon fell
                // inside can hold kept hashes already (its first leaf was pruned before).
                if leaf != block * BLOCK_LEAVES {
                    batch.remove(&block_key(KEPT_PREFIX, block)[..]);
                }
                leaf = block_end;
                continue;
            }
            let mut value = self
                .log
                .get(block_key(KEPT_PREFIX, block))?
                .map(|v| v.to_vec())
                .unwrap_or_default();
            if (value.len() / 32) as u64 != leaf - block * BLOCK_LEAVES {
                return Err(StoreError::Corrupt(format!(
                    "kept leaf hashes of block {block} end at {}, expected {leaf}",
                    block * BLOCK_LEAVES + (value.len() / 32) as u64
                )));
            }
            while leaf < block_end {
                let seq = leaf + 1;
                while current.is_some_and(|c| c.end < seq) {
                    current = chunk.next();
                }
                let event = current
                    .and_then(|c| {
                        let at = c.decoded.as_ref()?.start + (seq - c.seq) as usize;
                        events.get(at)
                    })
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "the chunk holding seq {seq} was not read for its leaf hash"
                        ))
                    })?;
                value.extend_from_slice(
                    &chain::stated_hash(event.line.as_bytes()).map_err(StoreError::Corrupt)?,
                );
                leaf += 1;
            }
            batch.insert(&block_key(KEPT_PREFIX, block)[..], value);
        }
        Ok(())
    }

    /// Cluster mode, an empty copy that starts from the cluster's horizon: writes the
    /// leaf hashes of leaves `first_leaf..` as kept hashes (`k`), replacing any from
    /// `first_leaf` on (a seeding interrupted by a crash is done again). Not durable, and
    /// invisible until [`Store::seed_at_horizon`] writes the horizon. `first_leaf` must
    /// continue what is written: a block's value always starts at the block's first leaf.
    pub fn seed_leaf_hashes(&self, first_leaf: u64, hashes: &[[u8; 32]]) -> Result<()> {
        let mut batch = sled::Batch::default();
        let mut leaf = first_leaf;
        let mut rest = hashes;
        while let Some(first) = rest.first() {
            let block = leaf / BLOCK_LEAVES;
            let offset = ((leaf - block * BLOCK_LEAVES) * 32) as usize;
            let mut value = match offset {
                0 => Vec::new(),
                _ => self
                    .log
                    .get(block_key(KEPT_PREFIX, block))?
                    .map(|v| v.to_vec())
                    .unwrap_or_default(),
            };
            if value.len() < offset {
                return Err(StoreError::Corrupt(format!(
                    "seeded leaf hashes of block {block} end before leaf {leaf}"
                )));
            }
            value.truncate(offset);
            let n = ((block + 1) * BLOCK_LEAVES - leaf).min(rest.len() as u64) as usize;
            value.extend_from_slice(first);
            for hash in &rest[1..n] {
                value.extend_from_slice(hash);
            }
            batch.insert(&block_key(KEPT_PREFIX, block)[..], value);
            rest = &rest[n..];
            leaf += n as u64;
        }
        self.log.apply_batch(batch)?;
        Ok(())
    }

    /// Cluster mode: makes an empty copy start at `horizon`, with the stream message
    /// `stream_seq` that follows it (`events` as `encoded` carries them, and its
    /// idempotency records): horizon, events and stream position in one durable batch, so
    /// the copy is either still empty or a log pruned at `horizon`, as if it had pruned
    /// there itself. The leaf hashes below the horizon must be written first
    /// ([`Store::seed_leaf_hashes`]); the caller has checked the events' chain. The
    /// Merkle tree's stored hashes are built afterwards by [`crate::merkle::catch_up`].
    pub fn seed_at_horizon(
        &self,
        horizon: Horizon,
        events: &[Event],
        encoded: &[u8],
        stream_seq: u64,
        idempotency: &[(String, String, IdempotencyRecord)],
    ) -> Result<()> {
        if self.head().seq != 0 || self.horizon().pruned_through != 0 {
            return Err(StoreError::Corrupt(
                "only an empty log can start at the cluster's horizon".into(),
            ));
        }
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Err(StoreError::Corrupt("no events after the horizon".into()));
        };
        if first.seq != horizon.first_seq() {
            return Err(StoreError::Corrupt(format!(
                "the events after horizon {} begin at seq {}",
                horizon.pruned_through, first.seq
            )));
        }
        let last_kept = horizon.pruned_through.checked_sub(1).and_then(|leaf| {
            self.kept_leaf_hash(leaf)
                .transpose()
                .map(|h| h.map(|h| h == horizon.last_pruned_hash))
        });
        if !matches!(last_kept, Some(Ok(true))) {
            return Err(StoreError::Corrupt(format!(
                "the seeded leaf hashes do not end with event {}'s hash",
                horizon.pruned_through
            )));
        }
        let mut batch = CommitBatch::default();
        batch.add_encoded_events(events, encoded);
        batch.add_group_start(first.seq, stream_seq);
        batch.set_stream_position(stream_seq);
        for (token_id, key, record) in idempotency {
            batch.add_idempotency(token_id, key, record);
        }
        let record = bincode::serde::encode_to_vec(horizon, bincode_config())
            .map_err(|e| StoreError::Corrupt(format!("horizon record: {e}")))?;
        batch.batch.insert(HORIZON_KEY, record);
        let head = Head::of(last)?;
        self.apply(batch)?;
        self.sync()?;
        *self.horizon.write().unwrap_or_else(|p| p.into_inner()) = horizon;
        self.set_committed(head);
        Ok(())
    }

    /// A pruned leaf's hash, if it was kept.
    fn kept_leaf_hash(&self, leaf: u64) -> Result<Option<[u8; 32]>> {
        let block = leaf / BLOCK_LEAVES;
        let Some(value) = self.log.get(block_key(KEPT_PREFIX, block))? else {
            return Ok(None);
        };
        let at = ((leaf - block * BLOCK_LEAVES) * 32) as usize;
        Ok(value
            .get(at..at + 32)
            .and_then(|h| <[u8; 32]>::try_from(h).ok()))
    }

    /// The newest durable event.
    pub fn head(&self) -> Head {
        self.committed
            .read()
            .map(|h| h.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Called by the writer once events up to `head` are durable.
    pub fn set_committed(&self, head: Head) {
        match self.committed.write() {
            Ok(mut h) => *h = head,
            Err(poisoned) => *poisoned.into_inner() = head,
        }
    }

    /// Writes a group commit (not yet durable: see [`Store::sync`]).
    pub fn apply(&self, batch: CommitBatch) -> Result<()> {
        let mut sled_batch = batch.batch;
        // Only the writer thread appends, so this read-add-write does not race.
        let appended = self
            .appended_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            + batch.chunk_bytes;
        if batch.chunk_bytes > 0 {
            sled_batch.insert(APPENDED_BYTES_KEY, &appended.to_be_bytes()[..]);
        }
        self.log.apply_batch(sled_batch)?;
        self.appended_bytes
            .store(appended, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Cluster mode: the stream sequence of the newest applied group (0: none).
    pub fn stream_position(&self) -> Result<u64> {
        Ok(match self.log.get(STREAM_POSITION_KEY)? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("malformed stream position".into()))?,
            ),
            None => 0,
        })
    }

    /// Cluster mode: the last stream group that begins at or before `seq`, as (its first
    /// seq, its stream sequence); `None` when no recorded group does.
    pub fn group_at_or_before(&self, seq: u64) -> Result<Option<(u64, u64)>> {
        let Some(kv) = self
            .log
            .range(&block_key(GROUP_PREFIX, 0)[..]..=&block_key(GROUP_PREFIX, seq)[..])
            .next_back()
        else {
            return Ok(None);
        };
        let (k, v) = kv?;
        let stream_seq = <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt("malformed group record".into()))?;
        Ok(Some((seq_from_key(&k)?, stream_seq)))
    }

    /// The cluster stream this data directory copies (`None`: a single node's, so far).
    pub fn cluster_stream(&self) -> Result<Option<String>> {
        Ok(self
            .log
            .get(CLUSTER_STREAM_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Marks this directory as a copy of the cluster stream `stream`, durably: offline
    /// commands that would change it behind the cluster's back refuse from then on.
    pub fn set_cluster_stream(&self, stream: &str) -> Result<()> {
        self.log.insert(CLUSTER_STREAM_KEY, stream.as_bytes())?;
        self.keep_every_leaf.store(true, Ordering::Relaxed);
        self.sync()
    }

    /// Bytes the database takes on disk (0 if sled cannot tell).
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Makes everything applied so far durable.
    pub fn sync(&self) -> Result<()> {
        self.db.flush()?;
        self.log_file.sync_data().map_err(|source| StoreError::Io {
            path: PathBuf::from("log/db"),
            source,
        })?;
        self.sync_blobs()
    }

    /// fsyncs blob files sled wrote since the last sync, then their directory.
    fn sync_blobs(&self) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let entries = match std::fs::read_dir(&self.blob_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&self.blob_dir)(e)),
        };
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut any_new = false;
        let mut present = std::collections::HashSet::new();
        for entry in entries {
            let entry = entry.map_err(io(&self.blob_dir))?;
            present.insert(entry.file_name());
            if synced.contains(&entry.file_name()) {
                continue;
            }
            let path = entry.path();
            match File::open(&path) {
                Ok(f) => f.sync_data().map_err(io(&path))?,
                // sled garbage-collected it between the listing and the open.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&path)(e)),
            }
            synced.insert(entry.file_name());
            any_new = true;
        }
        synced.retain(|name| present.contains(name));
        if any_new {
            File::open(&self.blob_dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&self.blob_dir))?;
        }
        Ok(())
    }

    fn last_chunk(&self) -> Result<Option<Vec<Event>>> {
        match self
            .log
            .range(&event_key(Ulid(0))[..]..=&event_key(Ulid(u128::MAX))[..])
            .next_back()
        {
            Some(kv) => Ok(Some(decode_chunk(&kv?.1)?)),
            None => Ok(None),
        }
    }

    fn chunk(&self, key: &[u8]) -> Result<Option<Arc<Vec<Event>>>> {
        let first = ulid_from_key(key)?.0;
        if let Some(chunk) = self.chunk_cache.get(&first) {
            return Ok(Some(chunk));
        }
        match self.log.get(key)? {
            Some(bytes) => {
                let chunk = Arc::new(decode_chunk(&bytes)?);
                self.chunk_cache.insert(first, chunk.clone());
                Ok(Some(chunk))
            }
            None => Ok(None),
        }
    }

    /// Key of the chunk that holds `id` if any chunk does (the last chunk key ≤ id).
    fn chunk_key_at_or_before(&self, id: Ulid) -> Result<Option<sled::IVec>> {
        match self
            .log
            .range(&event_key(Ulid(0))[..]..=&event_key(id)[..])
            .next_back()
        {
            Some(kv) => Ok(Some(kv?.0)),
            None => Ok(None),
        }
    }

    /// The committed event with this id.
    pub fn get(&self, id: Ulid) -> Result<Option<Event>> {
        let head_seq = self.head().seq;
        let Some(key) = self.chunk_key_at_or_before(id)? else {
            return Ok(None);
        };
        let Some(chunk) = self.chunk(&key)? else {
            return Ok(None);
        };
        Ok(chunk
            .binary_search_by(|e| e.id.cmp(&id))
            .ok()
            .map(|i| chunk[i].clone())
            .filter(|e| e.seq <= head_seq))
    }

    /// The seq of the newest retained committed event with id ≤ `id`.
    pub fn last_seq_at_or_before(&self, id: Ulid) -> Result<Option<u64>> {
        let head_seq = self.head().seq;
        let Some(key) = self.chunk_key_at_or_before(id)? else {
            return Ok(None);
        };
        let Some(chunk) = self.chunk(&key)? else {
            return Ok(None);
        };
        let n = chunk.partition_point(|e| e.id <= id);
        Ok(n.checked_sub(1)
            .and_then(|i| chunk.get(i))
            .map(|e| e.seq.min(head_seq)))
    }

    /// The last seq of the oldest run of retained chunks whose compressed size reaches
    /// `bytes` (what `--retain-bytes` removes to get back under its bound).
    pub fn seq_freeing(&self, bytes: u64) -> Result<u64> {
        let first = self.horizon().first_seq();
        let mut freed = 0u64;
        let mut last = first.saturating_sub(1);
        let mut starts = self
            .log
            .range(&seq_key(first)[..]..=&seq_key(u64::MAX)[..])
            .peekable();
        while let Some(kv) = starts.next() {
            if freed >= bytes {
                break;
            }
            let (_, v) = kv?;
            let Some(next) = starts.peek() else { break };
            let next_seq = match next {
                Ok((k, _)) => seq_from_key(k)?,
                Err(e) => return Err(e.clone().into()),
            };
            let id = u128::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("malformed seq index entry".into()))?,
            );
            // The value's length is what sled returns; sizes are cheap next to a decode.
            freed += self
                .log
                .get(event_key(Ulid(id)))?
                .map_or(0, |v| v.len() as u64);
            last = next_seq - 1;
        }
        Ok(last)
    }

    /// The committed event at position `seq` (1-based).
    pub fn get_by_seq(&self, seq: u64) -> Result<Option<Event>> {
        if seq == 0 || seq > self.head().seq {
            return Ok(None);
        }
        let Some(chunk_id) = self.chunk_id_for_seq(seq)? else {
            return Ok(None);
        };
        let Some(chunk) = self.chunk(&event_key(chunk_id))? else {
            // A prune may remove the chunk between the two reads: then it is gone.
            if self.horizon_after_reads().pruned_through >= seq {
                return Ok(None);
            }
            return Err(StoreError::Corrupt(format!(
                "seq index points to a missing chunk for seq {seq}"
            )));
        };
        let first = chunk.first().map_or(0, |e| e.seq);
        Ok(seq
            .checked_sub(first)
            .and_then(|i| chunk.get(i as usize))
            .cloned())
    }

    fn chunk_id_for_seq(&self, seq: u64) -> Result<Option<Ulid>> {
        match self
            .log
            .range(&seq_key(0)[..]..=&seq_key(seq)[..])
            .next_back()
        {
            Some(kv) => {
                let (_, v) = kv?;
                let bytes: [u8; 16] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("malformed seq index entry".into()))?;
                Ok(Some(Ulid(u128::from_be_bytes(bytes))))
            }
            None => Ok(None),
        }
    }

    /// Committed events with `id > after`, oldest first, up to the head at call time.
    pub fn scan_after(&self, after: Ulid) -> Result<Scan> {
        let start = self
            .chunk_key_at_or_before(after)?
            .map_or_else(|| event_key(Ulid(0)).to_vec(), |k| k.to_vec());
        Ok(Scan::new(
            self,
            start,
            self.head().seq,
            ScanFrom::After(after),
        ))
    }

    /// Committed events with `seq >= from_seq`, oldest first, up to the head at call time.
    pub fn scan_from_seq(&self, from_seq: u64) -> Result<Scan> {
        let start = self
            .chunk_id_for_seq(from_seq.max(1))?
            .map_or_else(|| event_key(Ulid(0)).to_vec(), |id| event_key(id).to_vec());
        Ok(Scan::new(
            self,
            start,
            self.head().seq,
            ScanFrom::Seq(from_seq),
        ))
    }

    /// Committed events with `id < before`, newest first.
    pub fn scan_before(&self, before: Ulid) -> Result<ScanBack> {
        let head_seq = self.head().seq;
        let iter = self
            .log
            .range(&event_key(Ulid(0))[..]..&event_key(before)[..]);
        // The chunk starting at or after `before` holds only ids ≥ before; the one
        // before it may straddle, which the per-event filter handles.
        Ok(ScanBack {
            iter,
            current: Vec::new(),
            before,
            head_seq,
        })
    }

    /// The newest `n` committed events, oldest first (for the start-up chain check).
    pub fn tail(&self, n: usize) -> Result<Vec<Event>> {
        let head = self.head().seq;
        let from = head.saturating_sub(n as u64) + 1;
        self.scan_from_seq(from)?.collect()
    }

    /// The stored Merkle tree hash at stored-hash index `index`, written with leaf `leaf`.
    pub fn tree_hash(&self, index: u64, leaf: u64) -> Result<[u8; 32]> {
        let missing = || StoreError::Corrupt(format!("Merkle tree hash {index} is missing"));
        let (_, value) = self
            .log
            .range(&tree_key(0)[..]..=&tree_key(leaf)[..])
            .next_back()
            .ok_or_else(missing)??;
        let (pairs, _) = value.get(8..).ok_or_else(missing)?.as_chunks::<40>();
        // Pairs are in index order.
        let index_of = |pair: &[u8; 40]| u64::from_be_bytes(*pair.first_chunk().unwrap_or(&[0; 8]));
        let at = pairs
            .binary_search_by_key(&index, index_of)
            .map_err(|_| missing())?;
        Ok(*pairs[at].last_chunk().unwrap_or(&[0; 32]))
    }

    /// How many leaves the stored Merkle tree covers.
    pub fn tree_leaves(&self) -> Result<u64> {
        match self
            .log
            .range(&tree_key(0)[..]..=&tree_key(u64::MAX)[..])
            .next_back()
        {
            Some(kv) => {
                let (key, value) = kv?;
                let count = value
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| StoreError::Corrupt("malformed tree value".into()))?;
                Ok(index_from_tree_key(&key)? + count)
            }
            None => Ok(0),
        }
    }

    /// The hashes of committed events `first_seq..first_seq + count`, through the chunk
    /// cache (proofs read the same few chunks again and again).
    pub fn event_hashes(&self, first_seq: u64, count: u64) -> Result<Vec<[u8; 32]>> {
        let end = first_seq + count;
        if first_seq == 0 || end - 1 > self.head().seq {
            return Err(StoreError::Corrupt(format!(
                "events {first_seq}..{end} are not all in the log"
            )));
        }
        let mut out = Vec::with_capacity(count as usize);
        let mut seq = first_seq;
        let _shared = self.pruning.read().unwrap_or_else(|p| p.into_inner());
        let pruned_through = self.horizon().pruned_through;
        while seq < end && seq <= pruned_through {
            let hash = self.kept_leaf_hash(seq - 1)?.ok_or_else(|| {
                StoreError::Pruned(format!(
                    "event seq {seq} and the tree nodes below it were pruned"
                ))
            })?;
            out.push(hash);
            seq += 1;
        }
        while seq < end {
            let chunk = self
                .chunk_id_for_seq(seq)?
                .map(|id| self.chunk(&event_key(id)))
                .transpose()?
                .flatten()
                .ok_or_else(|| StoreError::Corrupt(format!("event seq {seq} is missing")))?;
            let first = chunk.first().map_or(0, |e| e.seq);
            let events = chunk
                .get((seq - first) as usize..)
                .filter(|events| !events.is_empty())
                .ok_or_else(|| StoreError::Corrupt(format!("event seq {seq} is missing")))?;
            for event in events.iter().take((end - seq) as usize) {
                out.push(chain::stated_hash(event.line.as_bytes()).map_err(StoreError::Corrupt)?);
            }
            seq = first_seq + out.len() as u64;
        }
        Ok(out)
    }

    pub fn idempotency(&self, token_id: &str, key: &str) -> Result<Option<IdempotencyRecord>> {
        match self.log.get(idempotency_key(token_id, key))? {
            Some(v) => bincode::serde::decode_from_slice(&v, bincode_config())
                .map(|(r, _)| Some(r))
                .map_err(|e| StoreError::Corrupt(format!("idempotency record: {e}"))),
            None => Ok(None),
        }
    }

    /// Raw keys of idempotency records created before `cutoff_unix_ms`.
    pub fn expired_idempotency_keys(&self, cutoff_unix_ms: u64) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for kv in self.log.scan_prefix([IDEMPOTENCY_PREFIX]) {
            let (k, v) = kv?;
            if let Ok((r, _)) =
                bincode::serde::decode_from_slice::<IdempotencyRecord, _>(&v, bincode_config())
                && r.created_unix_ms < cutoff_unix_ms
            {
                out.push(k.to_vec());
            }
        }
        Ok(out)
    }

    /// All stored tokens' raw records.
    pub fn token_records(&self) -> Result<Vec<Vec<u8>>> {
        self.tokens
            .iter()
            .values()
            .map(|v| Ok(v?.to_vec()))
            .collect()
    }

    /// Stores a token record and makes it durable before returning.
    pub fn put_token_record(&self, id: &str, record: &[u8]) -> Result<()> {
        self.tokens.insert(id.as_bytes(), record)?;
        self.sync()
    }

    /// Removes a token record durably; `false` if there was none.
    pub fn remove_token_record(&self, id: &str) -> Result<bool> {
        let existed = self.tokens.remove(id.as_bytes())?.is_some();
        self.sync()?;
        Ok(existed)
    }

    /// All stored webhooks' raw records.
    pub fn webhook_records(&self) -> Result<Vec<Vec<u8>>> {
        self.webhooks
            .iter()
            .values()
            .map(|v| Ok(v?.to_vec()))
            .collect()
    }

    /// Stores a webhook record; with `durable`, it is on disk before this returns.
    pub fn put_webhook_record(&self, id: &str, record: &[u8], durable: bool) -> Result<()> {
        self.webhooks.insert(id.as_bytes(), record)?;
        if durable { self.sync() } else { Ok(()) }
    }

    /// Removes a webhook record durably; `false` if there was none.
    pub fn remove_webhook_record(&self, id: &str) -> Result<bool> {
        let existed = self.webhooks.remove(id.as_bytes())?.is_some();
        self.sync()?;
        Ok(existed)
    }
}

enum ScanFrom {
    After(Ulid),
    Seq(u64),
}

/// Forward iterator over committed events; reads one chunk at a time.
fn index_from_tree_key(key: &[u8]) -> Result<u64> {
    key.get(1..9)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt("malformed tree key".into()))
}

pub struct Scan {
    iter: sled::Iter,
    current: std::vec::IntoIter<Event>,
    from: ScanFrom,
    head_seq: u64,
    done: bool,
    /// The seq the next chunk must start with: a prune that removed chunks ahead of
    /// this scan shows as a jump, which ends the scan with an error, never a silent gap.
    next_seq: Option<u64>,
}

impl Scan {
    fn new(store: &Store, start: Vec<u8>, head_seq: u64, from: ScanFrom) -> Scan {
        let end = event_key(Ulid(u128::MAX));
        Scan {
            iter: store.log.range(start..=end.to_vec()),
            current: Vec::new().into_iter(),
            from,
            head_seq,
            done: false,
            next_seq: None,
        }
    }
}

impl Iterator for Scan {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            for event in self.current.by_ref() {
                if event.seq > self.head_seq {
                    self.done = true;
                    return None;
                }
                let wanted = match self.from {
                    ScanFrom::After(after) => event.id > after,
                    ScanFrom::Seq(seq) => event.seq >= seq,
                };
                if wanted {
                    return Some(Ok(event));
                }
            }
            match self.iter.next()? {
                Ok((_, bytes)) => match decode_chunk(&bytes) {
                    Ok(chunk) => {
                        let first = chunk.first().map_or(0, |e| e.seq);
                        if self.next_seq.is_some_and(|expected| expected != first) {
                            self.done = true;
                            return Some(Err(StoreError::Pruned(format!(
                                "events from seq {} were pruned while this read was in progress",
                                self.next_seq.unwrap_or_default()
                            ))));
                        }
                        self.next_seq = chunk.last().map(|e| e.seq + 1);
                        self.current = chunk.into_iter();
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                },
                Err(e) => {
                    self.done = true;
                    return Some(Err(e.into()));
                }
            }
        }
    }
}

/// Backward iterator over committed events.
pub struct ScanBack {
    iter: sled::Iter,
    current: Vec<Event>,
    before: Ulid,
    head_seq: u64,
}

impl Iterator for ScanBack {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            while let Some(event) = self.current.pop() {
                if event.id < self.before && event.seq <= self.head_seq {
                    return Some(Ok(event));
                }
            }
            match self.iter.next_back()? {
                Ok((_, bytes)) => match decode_chunk(&bytes) {
                    Ok(chunk) => self.current = chunk,
                    Err(e) => return Some(Err(e)),
                },
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{RecordParts, seal};

    fn events(n: u64, data_bytes: usize) -> Vec<Event> {
        sealed(n, "t", "2026-01-01T00:00:00Z", |_| {
            let mut noise = vec![0u8; data_bytes / 2];
            rand::fill(&mut noise[..]);
            format!("\"{}\"", hex::encode(noise))
        })
    }

    /// `n` sealed events of one type and timestamp, `data(seq)` their JCS data.
    fn sealed(
        n: u64,
        event_type: &str,
        timestamp: &str,
        data: impl Fn(u64) -> String,
    ) -> Vec<Event> {
        let mut prev = ZERO_HASH;
        (1..=n)
            .map(|seq| {
                let data = data(seq);
                let id = Ulid::from_parts(1_000 + seq, 0);
                let (line, hash) = seal(&RecordParts {
                    data_jcs: &data,
                    id,
                    prev_hash: &prev,
                    seq,
                    source_jcs: None,
                    timestamp,
                    event_type,
                });
                prev = hash;
                Event {
                    id,
                    seq,
                    event_type: event_type.into(),
                    source: None,
                    line: line.into(),
                }
            })
            .collect()
    }

    /// Fails if chunks are cut by `CHUNK_BYTES` alone: the peers' events (lines of ~520
    /// bytes compressing ~5:1) then overflow `MAX_VALUE_BYTES` and every full chunk is
    /// compressed twice.
    #[test]
    fn chunks_are_sized_to_compress_once() {
        let all = sealed(5_000, "tool_call", "2026-03-19T10:00:00.000Z", |seq| {
            format!(
                concat!(
                    r#"{{"agent":"claude-code","cwd":"/home/dev/src/myapp","decision":"#,
                    r#"{{"action":"allow","evaluation_time_us":{},"matched_policies":"#,
                    r#"["allow-git"]}},"pad":"{}","request":{{"command":"git status"}},"#,
                    r#""seq":{},"session":"myapp/main","tool":"exec"}}"#
                ),
                seq % 97,
                "x".repeat(40),
                seq
            )
        });
        let mut splits = Vec::new();
        for group in all.chunks(1_000) {
            let mut batch = CommitBatch::default();
            batch.add_events(group);
            splits.push(batch.splits);
        }
        // The first chunk ever written has no ratio to go by.
        assert_eq!(splits[1..], [0; 4], "splits per group: {splits:?}");
    }

    /// Logs on disk and cluster messages hold chunks in this exact form: bincode of a
    /// `Vec<StoredEvent>`, LZ4 with the plain length prepended. Reusing buffers from
    /// one chunk to the next must give the same bytes for every chunk.
    #[test]
    fn chunks_keep_their_stored_form() {
        let with_source: Vec<Event> = events(40, 300)
            .into_iter()
            .map(|mut e| {
                e.source = Some(format!("{{\"host\":\"h{}\"}}", e.seq));
                e
            })
            .collect();
        for chunk in [
            events(256, 400),
            events(3, 50),
            with_source,
            events(1, 20_000),
        ] {
            let stored: Vec<StoredEvent<'_>> = chunk
                .iter()
                .map(|e| StoredEvent {
                    id: e.id.0,
                    seq: e.seq,
                    event_type: &e.event_type,
                    source: e.source.as_deref(),
                    line: &e.line,
                })
                .collect();
            let plain = bincode::serde::encode_to_vec(&stored, bincode_config()).expect("encode");
            assert_eq!(
                encode_chunk(&chunk),
                lz4_flex::compress_prepend_size(&plain)
            );
            let back = decode_chunk(&encode_chunk(&chunk)).expect("decode");
            assert_eq!(
                back.iter()
                    .map(|e| (&*e.line, e.seq, e.source.clone()))
                    .collect::<Vec<_>>(),
                chunk
                    .iter()
                    .map(|e| (&*e.line, e.seq, e.source.clone()))
                    .collect::<Vec<_>>()
            );
        }
    }

    /// The stored bytes of a two-event chunk, written out: a count, then per event
    /// the id, seq, type, source (absent, present) and line, bincode's varints and
    /// length-prefixed strings.
    #[test]
    fn a_chunk_has_a_fixed_byte_layout() {
        let event = |seq: u64, source: Option<&str>| Event {
            id: Ulid(1),
            seq,
            event_type: "t".into(),
            source: source.map(Into::into),
            line: "{}".into(),
        };
        let chunk = encode_chunk(&[event(2, None), event(3, Some("s"))]);
        let plain = lz4_flex::decompress_size_prepended(&chunk).expect("decompress");
        assert_eq!(
            plain,
            [
                2, 1, 2, 1, b't', 0, 2, b'{', b'}', 1, 3, 1, b't', 1, 1, b's', 2, b'{', b'}'
            ]
        );
        let back = decode_chunk(&chunk).expect("decode");
        assert_eq!(back[1].source.as_deref(), Some("s"));
        assert_eq!((&*back[0].line, back[0].seq), ("{}", 2));
        // A line that is not UTF-8 (a damaged chunk) is refused, not served.
        let damaged = lz4_flex::compress_prepend_size(&[1, 1, 2, 1, b't', 0, 1, 0xff]);
        let refused = decode_chunk(&damaged).map(|_| ()).expect_err("refused");
        assert!(refused.to_string().contains("not UTF-8"), "{refused}");
    }

    /// A cluster node stores a stream message's chunk as received when it fits one
    /// chunk, and packs the events itself when it does not; either way they read back.
    #[test]
    fn encoded_groups_are_stored_as_received_or_repacked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(DataDir::lock(tmp.path()).expect("lock")).expect("open");
        let all = events(900, 200);
        let (small, large) = all.split_at(30);
        let mut batch = CommitBatch::default();
        let encoded = encode_chunk(small);
        batch.add_encoded_events(small, &encoded);
        assert_eq!(
            batch.chunk_bytes,
            encoded.len() as u64,
            "stored as received"
        );
        let before = batch.chunk_bytes;
        // 870 incompressible events: over CHUNK_EVENTS and MAX_VALUE_BYTES.
        batch.add_encoded_events(large, &encode_chunk(large));
        let chunks = large.len().div_ceil(CHUNK_EVENTS);
        assert!(batch.chunk_bytes > before);
        store.apply(batch).expect("apply");
        store.sync().expect("sync");
        store.set_committed(Head::of(all.last().expect("events")).expect("head"));
        let stored_chunks = store.log.scan_prefix([EVENT_PREFIX]).count();
        assert!(
            stored_chunks > chunks,
            "the large group was repacked into chunks under the limits ({stored_chunks})"
        );
        for probe in [1, 30, 31, 500, 900] {
            let event = store.get_by_seq(probe).expect("read").expect("present");
            assert_eq!(event, all[probe as usize - 1]);
        }
    }

    #[test]
    fn incompressible_events_stay_out_of_blob_files_and_read_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(DataDir::lock(tmp.path()).expect("lock")).expect("open");
        let all = events(3_000, 2_000);
        for group in all.chunks(500) {
            let mut batch = CommitBatch::default();
            batch.add_events(group);
            store.apply(batch).expect("apply");
        }
        store.sync().expect("sync");
        store.set_committed(Head::of(all.last().expect("events")).expect("head"));

        let blobs = std::fs::read_dir(tmp.path().join("log/blobs")).map_or(0, |d| d.count());
        assert_eq!(blobs, 0, "sled wrote blob files");
        for probe in [1, 2, 255, 256, 257, 1_499, 1_500, 1_501, 3_000] {
            let by_seq = store.get_by_seq(probe).expect("read").expect("present");
            assert_eq!(by_seq, all[probe as usize - 1]);
            let by_id = store.get(by_seq.id).expect("read").expect("present");
            assert_eq!(by_id.seq, probe);
        }
        let scanned: Vec<Event> = store
            .scan_after(all[99].id)
            .expect("scan")
            .collect::<Result<_>>()
            .expect("read");
        assert_eq!(scanned, all[100..]);
        let back: Vec<u64> = store
            .scan_before(all[10].id)
            .expect("scan")
            .map(|e| e.expect("read").seq)
            .collect();
        assert_eq!(back, (1..=10).rev().collect::<Vec<_>>());
    }

    /// A store holding `all` in chunks of varying sizes (one group commit per size), with
    /// checkpoints noted at `checkpoints`.
    fn pruning_store(dir: &Path, all: &[Event], checkpoints: &[u64]) -> Store {
        let store = Store::open(DataDir::lock(dir).expect("lock")).expect("open");
        let mut rest = all;
        for size in [7usize, 50, 130, 3, 64, 1, 90].iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (group, tail) = rest.split_at((*size).min(rest.len()));
            let mut batch = CommitBatch::default();
            batch.add_events(group);
            store.apply(batch).expect("apply");
            rest = tail;
        }
        store.sync().expect("sync");
        store.set_committed(Head::of(all.last().expect("events")).expect("head"));
        for size in checkpoints {
            store.note_checkpoint(*size).expect("note");
        }
        store
    }

    /// `/v1/head` reads the first retained event while the pruner runs: it never sees
    /// none on a log that has events, and never goes back.
    #[test]
    fn the_first_retained_event_is_found_while_prunes_move_it() {
        let all = sealed(3_000, "t", "2026-01-01T00:00:00Z", |seq| format!("{seq}"));
        let dir = tempfile::tempdir().expect("tmp");
        let store = Arc::new(pruning_store(dir.path(), &all, &[]));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (store, done) = (store.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut reads, mut previous) = (0u64, 0u64);
                loop {
                    // Read once more after the last prune, so the last read sees its end.
                    let pruning_over = done.load(Ordering::Acquire);
                    let first = store.first_retained().expect("read");
                    let (seq, _) =
                        first.unwrap_or_else(|| panic!("no first event after {previous}"));
                    assert!(
                        seq >= previous,
                        "the first seq went back from {previous} to {seq}"
                    );
                    previous = seq;
                    reads += 1;
                    if pruning_over && reads >= 1_000 {
                        break;
                    }
                }
                previous
            })
        };
        for max_seq in 1..3_000 {
            let limit = PruneLimit {
                max_seq,
                max_id: Ulid(u128::MAX),
            };
            store.prune(limit, None).expect("prune");
        }
        done.store(true, Ordering::Release);
        let last_seen = reader.join().expect("the reader saw a gap");
        assert!(last_seen > 2_800, "{last_seen}");
    }

    /// A prune that decodes only the chunks it needs leaves exactly what one that decodes
    /// every chunk (archiving) leaves: the same batches, horizons and stored records;
    /// the id limit stops at the same event when it falls between two chunks' ids or
    /// inside one; the leaf hashes of checkpoint-cut blocks are kept.
    #[test]
    fn a_prune_without_archive_leaves_what_an_archiving_one_does() {
        let all = sealed(1_000, "t", "2026-01-01T00:00:00Z", |seq| format!("{seq}"));
        let (a, b) = (
            tempfile::tempdir().expect("tmp"),
            tempfile::tempdir().expect("tmp"),
        );
        let checkpoints = [100, 333, 700];
        let (archiving, plain) = (
            pruning_store(a.path(), &all, &checkpoints),
            pruning_store(b.path(), &all, &checkpoints),
        );
        let id_after = |seq: usize| Ulid(all[seq - 1].id.0 + 1);
        let id_before = |seq: usize| Ulid(all[seq - 1].id.0 - 1);
        // Chunk ends: 7, 57, 187, 190, 254, 255, 345, 352, ...
        let limits = [
            (1_000, id_after(187), Some(187)),  // in the id gap after a chunk
            (1_000, id_before(254), Some(190)), // inside a chunk: not taken
            (1_000, id_after(255), Some(255)),
            (400, Ulid(u128::MAX), Some(352)),
            (400, Ulid(u128::MAX), None),
            (1_000, Ulid(u128::MAX), None),
        ];
        let mut archived = Vec::new();
        let mut last_seq = 0;
        for (max_seq, max_id, expected) in limits {
            let limit = PruneLimit { max_seq, max_id };
            let mut write = |events: &[Event]| {
                archived.extend_from_slice(events);
                Ok(())
            };
            let with = archiving.prune(limit, Some(&mut write)).expect("prune");
            let without = plain.prune(limit, None).expect("prune");
            assert_eq!(
                with.as_ref()
                    .map(|p| (p.first_seq, p.last_seq, p.chunks, p.horizon)),
                without
                    .as_ref()
                    .map(|p| (p.first_seq, p.last_seq, p.chunks, p.horizon))
            );
            if let Some(end) = expected {
                assert_eq!(without.map(|p| p.last_seq), Some(end), "{max_seq} {max_id}");
                last_seq = end;
            } else if let Some(p) = without {
                last_seq = p.last_seq;
            }
        }
        assert!(last_seq > 900, "pruned through {last_seq}");
        assert_eq!(archived, all[..last_seq as usize]);
        let records = |store: &Store| -> Vec<(sled::IVec, sled::IVec)> {
            store.log.iter().collect::<Result<_, _>>().expect("read")
        };
        assert_eq!(records(&archiving), records(&plain));
        assert_eq!(archiving.chunk_bytes(), plain.chunk_bytes());
        // Blocks 1, 5 and 10 (sizes 100, 333, 700) keep their leaf hashes; others not.
        for (leaf, kept) in [
            (0, false),
            (64, true),
            (127, true),
            (150, false),
            (320, true),
        ]
        .into_iter()
        .chain([
            (383, true),
            (640, true),
            (700, true),
            (703, true),
            (704, false),
        ]) {
            let hash = plain.kept_leaf_hash(leaf).expect("read");
            let expected = chain::stated_hash(all[leaf as usize].line.as_bytes()).expect("hash");
            assert_eq!(hash, kept.then_some(expected), "leaf {leaf}");
        }
    }
}
