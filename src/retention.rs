//! Retention (SPEC §8): bounds by age, count and size, the background pruner, archives
//! of what is pruned, and the manual prune. The store does the removal itself
//! ([`Store::prune`]: whole chunks, oldest first, one batch with the new horizon); this
//! module decides how far, and writes archives. Decisions: `docs/retention.md`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use ulid::Ulid;

use crate::checkpoint::Checkpointer;
use crate::event::Event;
use crate::store::{Horizon, PruneLimit, Store, StoreError};

/// How often the pruner checks the bounds (checking is a few index lookups).
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Test hook (documented in docs/retention.md): when set, a prune stops for good right
/// after its archive is durable and before the events are removed, so a test can kill
/// the process exactly there.
const STALL_AFTER_ARCHIVE_ENV: &str = "CAIRN_TEST_STALL_AFTER_ARCHIVE";

/// `--retain-for`, `--retain-events`, `--retain-bytes`, `--archive`.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub retain_for: Option<Duration>,
    pub retain_events: Option<u64>,
    pub retain_bytes: Option<u64>,
    pub archive: Option<PathBuf>,
}

impl Policy {
    /// Whether any bound is set (else nothing is ever pruned automatically).
    pub fn is_bounded(&self) -> bool {
        self.retain_for.is_some() || self.retain_events.is_some() || self.retain_bytes.is_some()
    }

    /// The last seq the bounds would remove now (0: none). An event goes once it is
    /// beyond any bound, so this is the largest of the three.
    pub(crate) fn target_seq(&self, store: &Store, now_ms: u64) -> Result<u64, StoreError> {
        let head = store.head().seq;
        let mut target = 0;
        if let Some(n) = self.retain_events {
            target = target.max(head.saturating_sub(n));
        }
        if let Some(age) = self.retain_for {
            let cutoff = now_ms.saturating_sub(age.as_millis() as u64);
            if cutoff > 0 {
                // Ids below the cutoff's first ULID were ingested before it.
                let before = Ulid::from_parts(cutoff, 0).0 - 1;
                if let Some(seq) = store.last_seq_at_or_before(Ulid(before))? {
                    target = target.max(seq);
                }
            }
        }
        if let Some(bytes) = self.retain_bytes {
            let excess = store.chunk_bytes().saturating_sub(bytes);
            if excess > 0 {
                target = target.max(store.seq_freeing(excess)?);
            }
        }
        Ok(target)
    }
}

/// What a prune did, and why it removed less than asked (SPEC §8: it names what the
/// rules kept).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Outcome {
    /// Events removed.
    pub removed: u64,
    /// The first retained seq after the prune.
    pub first_seq: u64,
    /// The first retained id after the prune.
    #[schema(value_type = Option<String>)]
    pub first_id: Option<String>,
    /// What the rules kept of the requested range, one sentence each.
    pub kept: Vec<String>,
}

/// Removes every whole chunk up to `target_seq` (and with ids ≤ `max_id`) that the rules
/// allow: covered by the signed checkpoint of `covered` leaves, and not the last event.
/// Archives each batch first when `archive` is given.
pub fn prune_to(
    store: &Store,
    target_seq: u64,
    max_id: Ulid,
    covered: u64,
    archive: Option<&Path>,
) -> Result<Outcome, StoreError> {
    let limit = PruneLimit {
        max_seq: target_seq.min(covered),
        max_id,
    };
    let mut removed = 0;
    // Without an archive the prune decodes only the chunks it needs.
    let mut write = archive.map(|dir| move |events: &[Event]| write_archive(dir, events));
    loop {
        let writer = write.as_mut().map(|w| w as crate::store::Archiver<'_>);
        let Some(pruned) = store.prune(limit, writer)? else {
            break;
        };
        removed += pruned.last_seq + 1 - pruned.first_seq;
        tracing::info!(
            first_seq = pruned.first_seq,
            last_seq = pruned.last_seq,
            chunks = pruned.chunks,
            "pruned"
        );
    }
    // One flush for every batch of this call, not one each: each flush is sled's whole
    // log, which the writer's group commits are waiting on too.
    if removed > 0 {
        store.sync()?;
    }
    let horizon = store.horizon();
    let head = store.head().seq;
    let mut kept = Vec::new();
    if target_seq > horizon.pruned_through {
        if target_seq > covered {
            kept.push(format!(
                "events {}..={target_seq} are not yet covered by a signed checkpoint (it covers {covered})",
                covered.max(horizon.pruned_through) + 1
            ));
        }
        if target_seq >= head {
            kept.push(format!("the last event (seq {head}) is always kept"));
        }
        let cut = target_seq.min(covered).min(head.saturating_sub(1));
        if cut > horizon.pruned_through {
            kept.push(format!(
                "events {}..={cut} share a storage chunk with newer events (whole chunks are removed)",
                horizon.pruned_through + 1
            ));
        }
    }
    let first = store.first_retained()?;
    Ok(Outcome {
        removed,
        first_seq: first.map_or(0, |(seq, _)| seq),
        first_id: first.map(|(_, id)| id.to_string()),
        kept,
    })
}

/// The manual prune's range: what `since=cursor` excludes. `earliest` excludes nothing
/// and is refused.
pub fn before_cursor(store: &Store, cursor: &str) -> Result<(u64, Ulid), String> {
    if cursor == "earliest" {
        return Err("--before earliest names no event; give a ULID or an RFC 3339 time".into());
    }
    let max_id = crate::cursor::parse_since(cursor).map_err(|m| format!("--before {m}"))?;
    let target = store
        .last_seq_at_or_before(max_id)
        .map_err(|e| e.to_string())?
        .unwrap_or(0);
    Ok((target, max_id))
}

/// Writes `events` (consecutive, in log order) to `dir` as
/// `cairn-<first seq>-<last seq>.ndjson.zst`, and makes file and name durable. Archives
/// left by a prune that crashed before its removal (first seq ≥ this one's: their events
/// are still in the log) are deleted first, so name order never repeats an event.
pub fn write_archive(dir: &Path, events: &[Event]) -> Result<(), StoreError> {
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return Ok(());
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut removed_any = false;
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale = name.ends_with(".tmp")
            || archive_range(&name).is_some_and(|(from, _)| from >= first.seq);
        if stale && name.starts_with("cairn-") {
            std::fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
            tracing::warn!(file = %name, "removed an archive of events still in the log (a prune was interrupted)");
            removed_any = true;
        }
    }
    if removed_any {
        sync_dir(dir)?;
    }
    let name = archive_name(first.seq, last.seq);
    let path = dir.join(&name);
    let tmp = dir.join(format!("{name}.tmp"));
    let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut encoder = zstd::Encoder::new(file, 3).map_err(io(&tmp))?;
    for event in events {
        encoder.write_all(event.line.as_bytes()).map_err(io(&tmp))?;
        encoder.write_all(b"\n").map_err(io(&tmp))?;
    }
    let file = encoder.finish().map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir)?;
    tracing::info!(file = %path.display(), events = events.len(), "archived");
    if std::env::var_os(STALL_AFTER_ARCHIVE_ENV).is_some() {
        tracing::warn!("{STALL_AFTER_ARCHIVE_ENV} is set: stalling before the removal");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// `cairn-<first>-<last>.ndjson.zst`, both seqs zero-padded to 20 digits (name order is
/// log order).
pub fn archive_name(first: u64, last: u64) -> String {
    format!("cairn-{first:020}-{last:020}.ndjson.zst")
}

/// The seq range an archive's name states.
pub fn archive_range(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("cairn-")?.strip_suffix(".ndjson.zst")?;
    let (first, last) = rest.split_once('-')?;
    Some((first.parse().ok()?, last.parse().ok()?))
}

/// Checks the bounds every [`CHECK_INTERVAL`] and prunes what passed them, until
/// shutdown.
pub async fn run(
    store: Arc<Store>,
    checkpoints: Arc<Checkpointer>,
    policy: Policy,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let policy = Arc::new(policy);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let (store, checkpoints, policy) = (store.clone(), checkpoints.clone(), policy.clone());
        let result = tokio::task::spawn_blocking(move || {
            let target = policy.target_seq(&store, now_ms())?;
            if target <= store.horizon().pruned_through {
                return Ok(None);
            }
            let covered = checkpoints.latest().size;
            prune_to(
                &store,
                target,
                Ulid(u128::MAX),
                covered,
                policy.archive.as_deref(),
            )
            .map(Some)
        })
        .await;
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "pruning failed"),
            Err(e) => tracing::error!(error = %e, "the pruner task failed"),
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `90d`, `12h`, `30m`, `45s`, `2w`: a whole number and one unit.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} needs a unit (s, m, h, d or w), e.g. 90d"))?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} must start with a whole number, e.g. 90d"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        "w" => n.checked_mul(7 * 86_400),
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use s, m, h, d or w)"
            ));
        }
    }
    .ok_or_else(|| format!("{text:?} is too long"))?;
    if secs == 0 {
        return Err("a retention duration must be more than zero".into());
    }
    Ok(Duration::from_secs(secs))
}

/// `50GiB`, `500MB`, `1048576`: a whole number and an optional unit (KB/MB/GB/TB are
/// powers of 1000, KiB/MiB/GiB/TiB of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} must start with a whole number, e.g. 50GiB"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ));
        }
    };
    let bytes = n
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes == 0 {
        return Err("a retention size must be more than zero".into());
    }
    Ok(bytes)
}

/// The horizon as `/v1/head` and the stream frames report it.
pub fn pruned_before(horizon: &Horizon, store: &Store, cursor: Ulid) -> Option<String> {
    if !horizon.cuts(cursor) {
        return None;
    }
    match store.first_retained() {
        Ok(Some((_, id))) => Some(id.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_and_bad_ones_say_why() {
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert!(parse_duration("12").unwrap_err().contains("unit"));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
        assert_eq!(parse_size("50GiB"), Ok(50 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("5XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn archive_names_sort_in_log_order_and_parse_back() {
        let a = archive_name(9, 99);
        let b = archive_name(100, 1000);
        assert!(a < b);
        assert_eq!(archive_range(&a), Some((9, 99)));
        assert_eq!(archive_range("other.txt"), None);
    }
}
