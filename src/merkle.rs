//! The Merkle tree over the log (RFC 6962 / RFC 9162), for checkpoints and proofs.
//!
//! The hash chain catches an edited event but not a cut-off tail or a log rewritten from
//! scratch; a signed tree head can. Leaf `i` is the event of seq `i + 1`, and its leaf
//! hash *is* the event's `hash`: that is already `SHA-256(0x00 ‖ canonical record)`, the
//! RFC 6962 leaf hash of the record (SPEC §1), so chain link and leaf are one value.
//!
//! The arithmetic is Go's `sumdb/tlog` (as the `tlog_tiles` crate): every complete
//! subtree's hash is stored once, at a dense *stored-hash index*, so appending leaf `n`
//! stores `1 + trailing ones of n` hashes (just under two per event on average), and a
//! root, an inclusion proof or a consistency proof reads O(log n) stored hashes. The
//! writer computes the new hashes of a group ([`hashes_for_leaves`]) and stores them in the
//! same atomic batch as the events ([`crate::store`]); nothing is ever rescanned, except
//! once at start-up for a log written before the tree existed ([`catch_up`]).

use tlog_tiles::{Hash, HashReader};

use crate::store::{CommitBatch, Store, StoreError};

pub use tlog_tiles::EMPTY_HASH;

/// A proof that cannot be made or does not verify.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("{0}")]
    OutOfRange(String),
    #[error("the proof does not verify: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The RFC 6962 leaf hash of an event: its chain hash, as is.
pub fn leaf_hash(event_hash: &[u8; 32]) -> Hash {
    Hash(*event_hash)
}

/// Where stored hashes are read from: the store, or memory (tests, fuzzing).
pub trait TreeHashes {
    fn tree_hashes(&self, indexes: &[u64]) -> Result<Vec<[u8; 32]>, StoreError>;
}

impl TreeHashes for Store {
    fn tree_hashes(&self, indexes: &[u64]) -> Result<Vec<[u8; 32]>, StoreError> {
        Store::tree_hashes(self, indexes)
    }
}

/// Stored hashes in memory, by stored-hash index.
impl TreeHashes for Vec<[u8; 32]> {
    fn tree_hashes(&self, indexes: &[u64]) -> Result<Vec<[u8; 32]>, StoreError> {
        indexes
            .iter()
            .map(|&i| {
                self.get(i as usize)
                    .copied()
                    .ok_or_else(|| StoreError::Corrupt(format!("Merkle tree hash {i} is missing")))
            })
            .collect()
    }
}

struct StoredTree<'a, T: ?Sized>(&'a T);

impl<T: TreeHashes + ?Sized> HashReader for StoredTree<'_, T> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        // tlog_tiles' error type has no room for an I/O error: keep its message.
        self.0
            .tree_hashes(indexes)
            .map(|hashes| hashes.into_iter().map(Hash).collect())
            .map_err(|e| tlog_tiles::Error::InvalidInput(e.to_string()))
    }
}

/// Stored hashes, with a group's new ones (from `base` on) not yet in the store.
struct Pending<'a, T: ?Sized> {
    store: &'a T,
    base: u64,
    new: &'a [[u8; 32]],
}

impl<T: TreeHashes + ?Sized> HashReader for Pending<'_, T> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        let mut out = Vec::with_capacity(indexes.len());
        for &index in indexes {
            match index.checked_sub(self.base) {
                Some(i) => out.push(Hash(
                    *self
                        .new
                        .get(i as usize)
                        .ok_or(tlog_tiles::Error::IndexesNotInTree)?,
                )),
                None => out.extend(StoredTree(self.store).read_hashes(&[index])?),
            }
        }
        Ok(out)
    }
}

/// The stored hashes to add when leaves with these event hashes are appended to a tree
/// of `size` leaves; they go at stored-hash index [`first_index`]`(size)` on.
pub fn hashes_for_leaves<'e, T: TreeHashes + ?Sized>(
    store: &T,
    size: u64,
    event_hashes: impl IntoIterator<Item = &'e [u8; 32]>,
) -> Result<Vec<[u8; 32]>, StoreError> {
    let base = first_index(size);
    let mut new: Vec<[u8; 32]> = Vec::new();
    for (i, event_hash) in event_hashes.into_iter().enumerate() {
        let reader = Pending {
            store,
            base,
            new: &new,
        };
        let hashes = tlog_tiles::stored_hashes_for_record_hash(
            size + i as u64,
            leaf_hash(event_hash),
            &reader,
        )
        .map_err(|e| StoreError::Corrupt(format!("Merkle tree: {e}")))?;
        new.extend(hashes.into_iter().map(|h| h.0));
    }
    Ok(new)
}

/// Where the stored hashes of leaf `size` (the next one) start.
pub fn first_index(size: u64) -> u64 {
    tlog_tiles::stored_hash_count(size)
}

/// The root of the tree of the first `size` leaves.
pub fn root<T: TreeHashes + ?Sized>(store: &T, size: u64) -> Result<Hash, ProofError> {
    tlog_tiles::tree_hash(size, &StoredTree(store)).map_err(tree_error)
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves (RFC 6962 order:
/// the sibling nearest the leaf first).
pub fn inclusion_proof<T: TreeHashes + ?Sized>(
    store: &T,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, ProofError> {
    if index >= size {
        return Err(ProofError::OutOfRange(format!(
            "leaf index {index} is not below tree size {size}"
        )));
    }
    tlog_tiles::prove_record(size, index, &StoredTree(store)).map_err(tree_error)
}

/// The consistency proof from the tree of `from` leaves to the tree of `to` leaves.
pub fn consistency_proof<T: TreeHashes + ?Sized>(
    store: &T,
    from: u64,
    to: u64,
) -> Result<Vec<Hash>, ProofError> {
    if from == 0 || from > to {
        return Err(ProofError::OutOfRange(format!(
            "need 1 ≤ from ≤ to, got from {from}, to {to}"
        )));
    }
    tlog_tiles::prove_tree(to, from, &StoredTree(store)).map_err(tree_error)
}

fn tree_error(e: tlog_tiles::Error) -> ProofError {
    ProofError::Store(StoreError::Corrupt(format!("Merkle tree: {e}")))
}

/// A 32-byte hash, or why not.
fn hash_of(bytes: &[u8], what: &str) -> Result<Hash, ProofError> {
    <[u8; 32]>::try_from(bytes)
        .map(Hash)
        .map_err(|_| ProofError::Invalid(format!("the {what} is {} bytes, not 32", bytes.len())))
}

/// Checks that `proof` shows leaf `index` (with hash `leaf`) in the tree of `size`
/// leaves whose root is `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    proof: &[Hash],
    index: u64,
    size: u64,
    leaf: &[u8],
    root: &[u8],
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::Invalid(format!(
            "leaf index {index} is not below tree size {size}"
        )));
    }
    if proof.len() > 64 {
        return Err(ProofError::Invalid("the proof is too long".into()));
    }
    let (leaf, root) = (hash_of(leaf, "leaf hash")?, hash_of(root, "root")?);
    tlog_tiles::check_record(&proof.to_vec(), size, root, index, leaf)
        .map_err(|e| ProofError::Invalid(e.to_string()))
}

/// Checks that `proof` shows the tree of `from` leaves (root `old`) is a prefix of the
/// tree of `to` leaves (root `new`) (RFC 9162 §2.1.4.2). Equal sizes need equal roots
/// and an empty proof; a size-0 tree has the empty root, and from it only an empty proof.
pub fn verify_consistency(
    proof: &[Hash],
    from: u64,
    to: u64,
    old: &[u8],
    new: &[u8],
) -> Result<(), ProofError> {
    let invalid = |m: &str| Err(ProofError::Invalid(m.to_string()));
    if from > to {
        return Err(ProofError::Invalid(format!(
            "the old tree ({from}) is larger than the new one ({to})"
        )));
    }
    if from == to || from == 0 {
        if !proof.is_empty() {
            return invalid("the proof must be empty");
        }
        if from == 0 && old != EMPTY_HASH.0 {
            return invalid("a size-0 tree has the empty root");
        }
        if from == to {
            return if old == new {
                Ok(())
            } else {
                invalid("equal sizes with different roots")
            };
        }
        return hash_of(new, "new root").map(|_| ());
    }
    if proof.len() > 128 {
        return invalid("the proof is too long");
    }
    let (old, new) = (hash_of(old, "old root")?, hash_of(new, "new root")?);
    tlog_tiles::check_tree(&proof.to_vec(), to, new, from, old)
        .map_err(|e| ProofError::Invalid(e.to_string()))
}

/// Brings the tree up to the log at start-up: checks that the stored tree ends at the
/// log's head (the newest leaf is the head's hash), and builds the missing part for a log
/// written before the tree existed. Returns how many leaves it added.
pub fn catch_up(store: &Store) -> Result<u64, StoreError> {
    let head = store.head();
    let stored = store.tree_hash_count()?;
    let leaves = leaves_for_hash_count(stored).ok_or_else(|| {
        StoreError::Corrupt(format!("{stored} Merkle hashes do not end a whole leaf"))
    })?;
    if leaves > head.seq {
        return Err(StoreError::Corrupt(format!(
            "the Merkle tree has {leaves} leaves but the log only {} events",
            head.seq
        )));
    }
    if leaves > 0 {
        // The newest stored leaf must be the hash of the event at that seq.
        let stored_leaf = store.tree_hashes(&[tlog_tiles::stored_hash_index(0, leaves - 1)])?;
        let event = store
            .get_by_seq(leaves)?
            .ok_or_else(|| StoreError::Corrupt(format!("event seq {leaves} is missing")))?;
        let hash = crate::chain::inspect_line(event.line.as_bytes())
            .map_err(StoreError::Corrupt)?
            .stated_hash;
        if stored_leaf.first() != Some(&leaf_hash(&hash).0) {
            return Err(StoreError::Corrupt(format!(
                "the Merkle leaf of seq {leaves} does not match the event's hash"
            )));
        }
    }
    let mut size = leaves;
    let mut scan = store.scan_from_seq(leaves + 1)?.peekable();
    while scan.peek().is_some() {
        let mut hashes = Vec::new();
        for event in scan.by_ref().take(10_000) {
            let event = event?;
            hashes.push(
                crate::chain::inspect_line(event.line.as_bytes())
                    .map_err(StoreError::Corrupt)?
                    .stated_hash,
            );
        }
        let new = hashes_for_leaves(store, size, &hashes)?;
        let mut batch = CommitBatch::default();
        batch.add_tree_hashes(first_index(size), &new);
        store.apply(batch)?;
        size += hashes.len() as u64;
    }
    if size > leaves {
        store.sync()?;
    }
    Ok(size - leaves)
}

/// The number of leaves whose tree has exactly `count` stored hashes, if any.
fn leaves_for_hash_count(count: u64) -> Option<u64> {
    // stored_hash_count is increasing; it is about 2n, so n is at most count.
    let (mut lo, mut hi) = (0u64, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if tlog_tiles::stored_hash_count(mid) < count {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    (tlog_tiles::stored_hash_count(lo) == count).then_some(lo)
}

/// RFC 6962 §2.1 as written: recursive, slow, obviously right. The reference the
/// incremental tree is checked against (unit tests, `fuzz/`).
pub mod naive {
    use tlog_tiles::{Hash, node_hash};

    use super::EMPTY_HASH;

    /// The largest power of two below `n` (n ≥ 2).
    fn split(n: usize) -> usize {
        1 << (n - 1).ilog2()
    }

    /// MTH(D[n]).
    pub fn root(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => EMPTY_HASH,
            1 => leaves[0],
            n => {
                let k = split(n);
                node_hash(root(&leaves[..k]), root(&leaves[k..]))
            }
        }
    }

    /// PATH(m, D[n]).
    pub fn path(m: usize, leaves: &[Hash]) -> Vec<Hash> {
        let n = leaves.len();
        if n <= 1 {
            return Vec::new();
        }
        let k = split(n);
        let (mut p, sibling) = if m < k {
            (path(m, &leaves[..k]), root(&leaves[k..]))
        } else {
            (path(m - k, &leaves[k..]), root(&leaves[..k]))
        };
        p.push(sibling);
        p
    }

    /// PROOF(m, D[n]), 0 < m ≤ n.
    pub fn consistency(m: usize, leaves: &[Hash]) -> Vec<Hash> {
        subproof(m, leaves, true)
    }

    fn subproof(m: usize, leaves: &[Hash], complete: bool) -> Vec<Hash> {
        let n = leaves.len();
        if m == n {
            return if complete {
                Vec::new()
            } else {
                vec![root(leaves)]
            };
        }
        let k = split(n);
        if m <= k {
            let mut p = subproof(m, &leaves[..k], complete);
            p.push(root(&leaves[k..]));
            p
        } else {
            let mut p = subproof(m - k, &leaves[k..], false);
            p.push(root(&leaves[..k]));
            p
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Groups of these sizes (a writer's group commits), leaf hashes from a counter.
    fn build(groups: &[usize]) -> (Vec<[u8; 32]>, Vec<Hash>) {
        let mut stored: Vec<[u8; 32]> = Vec::new();
        let mut leaves: Vec<Hash> = Vec::new();
        for &g in groups {
            let hashes: Vec<[u8; 32]> = (0..g)
                .map(|i| tlog_tiles::record_hash(&((leaves.len() + i) as u64).to_be_bytes()).0)
                .collect();
            let new = hashes_for_leaves(&stored, leaves.len() as u64, &hashes).expect("append");
            assert_eq!(stored.len() as u64, first_index(leaves.len() as u64));
            stored.extend(new);
            leaves.extend(hashes.iter().map(|h| Hash(*h)));
        }
        (stored, leaves)
    }

    #[test]
    fn incremental_tree_matches_the_naive_one() {
        let (stored, leaves) = build(&[1, 2, 3, 1, 7, 16, 1, 30, 5, 64, 1, 2, 40]);
        for size in 0..=leaves.len() {
            let size64 = size as u64;
            let expected = naive::root(&leaves[..size]);
            assert_eq!(
                root(&stored, size64).expect("root"),
                expected,
                "root of {size}"
            );
            for m in 0..size {
                let proof = inclusion_proof(&stored, m as u64, size64).expect("inclusion");
                assert_eq!(proof, naive::path(m, &leaves[..size]), "PATH({m}, {size})");
                verify_inclusion(&proof, m as u64, size64, &leaves[m].0, &expected.0)
                    .expect("verifies");
            }
            for m in 1..=size {
                let proof = consistency_proof(&stored, m as u64, size64).expect("consistency");
                assert_eq!(
                    proof,
                    naive::consistency(m, &leaves[..size]),
                    "PROOF({m}, {size})"
                );
                let old = naive::root(&leaves[..m]);
                verify_consistency(&proof, m as u64, size64, &old.0, &expected.0)
                    .expect("verifies");
            }
        }
    }

    #[test]
    fn hash_counts_map_back_to_leaves() {
        for n in 0..2000 {
            assert_eq!(
                leaves_for_hash_count(tlog_tiles::stored_hash_count(n)),
                Some(n)
            );
        }
        assert_eq!(
            leaves_for_hash_count(2),
            None,
            "1 leaf = 1 hash, 2 leaves = 3"
        );
    }

    #[test]
    fn naive_root_has_rfc6962_shapes() {
        let l: Vec<Hash> = (0u8..5).map(|i| tlog_tiles::record_hash(&[i])).collect();
        let n = tlog_tiles::node_hash;
        assert_eq!(naive::root(&l[..1]), l[0]);
        assert_eq!(naive::root(&l[..3]), n(n(l[0], l[1]), l[2]));
        assert_eq!(
            naive::root(&l[..5]),
            n(n(n(l[0], l[1]), n(l[2], l[3])), l[4])
        );
    }
}
