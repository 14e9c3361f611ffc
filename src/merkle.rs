//! The Merkle tree over the log (RFC 6962 / RFC 9162), for checkpoints and proofs.
//!
//! The hash chain catches an edited event but not a cut-off tail or a log rewritten from
//! scratch; a signed tree head can. Leaf `i` is the event of seq `i + 1`, and its leaf
//! hash *is* the event's `hash`: that is already `SHA-256(0x00 ‖ canonical record)`, the
//! RFC 6962 leaf hash of the record (SPEC §1), so chain link and leaf are one value.
//!
//! The arithmetic is Go's `sumdb/tlog` (as the `tlog_tiles` crate): every complete
//! subtree has a dense *stored-hash index* (about two per leaf), and a root, an inclusion
//! proof or a consistency proof needs O(log n) of them. cairn stores those of subtrees of
//! 64 leaves and up ([`STORED_FROM_LEVEL`]), one hash per ~32 events, written by the writer
//! ([`hashes_for_leaves`]) in the same atomic batch as the events ([`crate::store`]). The
//! smaller ones are recomputed from the events' own hashes: a proof reads at most one
//! 64-event block per side, never a scan of the log. The writer keeps the tree's right
//! edge ([`Frontier`]) so appending reads nothing. A log written before the tree existed
//! gets it built once at start-up ([`catch_up`]).

use tlog_tiles::{Hash, HashReader};

use crate::store::{CommitBatch, Store, StoreError};

pub use tlog_tiles::EMPTY_HASH;

/// Subtrees of `2^STORED_FROM_LEVEL` leaves and larger have their hashes stored; smaller
/// ones are recomputed from the events' hashes (at most 63 node hashes from 64 leaves)
/// when a proof or a root needs them. Storing every level (about two hashes, 64 bytes of
/// incompressible data per event) cost ingest ~8% in sled writes; from level 6 up it is
/// about one hash per 32 events.
pub const STORED_FROM_LEVEL: u8 = 6;

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

/// Where the tree's hashes come from: the store, or memory (tests, fuzzing).
pub trait TreeStorage {
    /// The stored hash at stored-hash index `index` (level ≥ [`STORED_FROM_LEVEL`]),
    /// written with leaf `leaf`.
    fn stored_hash(&self, index: u64, leaf: u64) -> Result<[u8; 32], StoreError>;
    /// The leaf hashes of leaves `first..first + count`.
    fn leaf_hashes(&self, first: u64, count: u64) -> Result<Vec<[u8; 32]>, StoreError>;
}

impl TreeStorage for Store {
    fn stored_hash(&self, index: u64, leaf: u64) -> Result<[u8; 32], StoreError> {
        self.tree_hash(index, leaf)
    }

    fn leaf_hashes(&self, first: u64, count: u64) -> Result<Vec<[u8; 32]>, StoreError> {
        self.event_hashes(first + 1, count)
    }
}

/// A tree in memory: stored hashes by index, and the leaves.
#[derive(Default)]
pub struct MemoryTree {
    pub stored: std::collections::HashMap<u64, [u8; 32]>,
    pub leaves: Vec<[u8; 32]>,
    frontier: Frontier,
}

impl TreeStorage for MemoryTree {
    fn stored_hash(&self, index: u64, _leaf: u64) -> Result<[u8; 32], StoreError> {
        self.stored
            .get(&index)
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("Merkle tree hash {index} is missing")))
    }

    fn leaf_hashes(&self, first: u64, count: u64) -> Result<Vec<[u8; 32]>, StoreError> {
        self.leaves
            .get(first as usize..(first + count) as usize)
            .map(<[_]>::to_vec)
            .ok_or_else(|| StoreError::Corrupt(format!("leaves {first}.. are missing")))
    }
}

/// The leaf whose append writes the hash at `(level, n)`: the last leaf of that subtree.
fn writing_leaf(level: u8, n: u64) -> u64 {
    ((n + 1) << level) - 1
}

struct Reader<'a, T: ?Sized>(&'a T);

impl<T: TreeStorage + ?Sized> Reader<'_, T> {
    /// Hashes by stored-hash index: read if stored, else recomputed from their leaves,
    /// reading each block of `2^STORED_FROM_LEVEL` leaves once.
    fn hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, StoreError> {
        let block_of = |first: u64| first >> STORED_FROM_LEVEL;
        // The leaves each block must provide: from its start to the furthest one needed.
        let mut ends: std::collections::HashMap<u64, u64> = Default::default();
        for &index in indexes {
            let (level, n) = tlog_tiles::split_stored_hash_index(index);
            if level < STORED_FROM_LEVEL {
                let end = (n + 1) << level;
                let e = ends.entry(block_of(n << level)).or_default();
                *e = (*e).max(end);
            }
        }
        let mut blocks = std::collections::HashMap::new();
        for (block, end) in ends {
            let start = block << STORED_FROM_LEVEL;
            blocks.insert(block, self.0.leaf_hashes(start, end - start)?);
        }
        indexes
            .iter()
            .map(|&index| {
                let (level, n) = tlog_tiles::split_stored_hash_index(index);
                if level >= STORED_FROM_LEVEL {
                    return self.0.stored_hash(index, writing_leaf(level, n)).map(Hash);
                }
                let first = n << level;
                let offset = (first - (block_of(first) << STORED_FROM_LEVEL)) as usize;
                let leaves: Vec<Hash> = blocks
                    .get(&block_of(first))
                    .and_then(|b| b.get(offset..offset + (1 << level)))
                    .ok_or_else(|| StoreError::Corrupt(format!("leaves {first}.. are missing")))?
                    .iter()
                    .map(|h| Hash(*h))
                    .collect();
                Ok(naive::root(&leaves))
            })
            .collect()
    }
}

impl<T: TreeStorage + ?Sized> HashReader for Reader<'_, T> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        // tlog_tiles' error type has no room for an I/O error: keep its message.
        self.hashes(indexes)
            .map_err(|e| tlog_tiles::Error::InvalidInput(e.to_string()))
    }
}

/// The roots of the perfect subtrees that make up a tree of `size` leaves (one per set
/// bit of the size): all that appending to it reads. The writer keeps it between groups,
/// so an append never reads the store, which would mean decoding events for the lower
/// levels.
#[derive(Default)]
pub struct Frontier {
    size: u64,
    hashes: std::collections::HashMap<u64, [u8; 32]>,
}

impl Frontier {
    /// Stored-hash indexes of the frontier of a tree of `size` leaves.
    fn indexes(size: u64) -> impl Iterator<Item = u64> {
        (0..64u8)
            .filter(move |level| size >> level & 1 == 1)
            .map(move |level| tlog_tiles::stored_hash_index(level, (size >> level) - 1))
    }
}

/// The tree with a group's new hashes (all levels, from stored-hash index `base` on)
/// not yet in storage, and the frontier before them.
struct Pending<'a, T: ?Sized> {
    tree: &'a T,
    frontier: &'a Frontier,
    base: u64,
    new: &'a [[u8; 32]],
}

impl<T: TreeStorage + ?Sized> Pending<'_, T> {
    fn hash(&self, index: u64) -> Result<[u8; 32], tlog_tiles::Error> {
        match index.checked_sub(self.base) {
            Some(i) => self
                .new
                .get(i as usize)
                .copied()
                .ok_or(tlog_tiles::Error::IndexesNotInTree),
            None => match self.frontier.hashes.get(&index) {
                Some(hash) => Ok(*hash),
                None => Reader(self.tree)
                    .read_hashes(&[index])?
                    .first()
                    .map(|h| h.0)
                    .ok_or(tlog_tiles::Error::IndexesNotInTree),
            },
        }
    }
}

impl<T: TreeStorage + ?Sized> HashReader for Pending<'_, T> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes.iter().map(|&i| self.hash(i).map(Hash)).collect()
    }
}

/// The tree hashes to store when leaves with these hashes are appended to a tree of
/// `size` leaves: (stored-hash index, the leaf that wrote it, hash), levels ≥
/// [`STORED_FROM_LEVEL`] only, in index order. `frontier` is read (when it is of this
/// size) and left at the new size.
pub fn hashes_for_leaves<'e, T: TreeStorage + ?Sized>(
    tree: &T,
    frontier: &mut Frontier,
    size: u64,
    leaf_hashes: impl IntoIterator<Item = &'e [u8; 32]>,
) -> Result<Vec<(u64, u64, [u8; 32])>, StoreError> {
    if frontier.size != size {
        *frontier = Frontier {
            size,
            hashes: Default::default(),
        };
    }
    let base = tlog_tiles::stored_hash_count(size);
    let mut new: Vec<[u8; 32]> = Vec::new();
    let mut keep = Vec::new();
    let mut appended = 0;
    for leaf in leaf_hashes {
        let leaf_index = size + appended;
        appended += 1;
        let pending = Pending {
            tree,
            frontier,
            base,
            new: &new,
        };
        let hashes =
            tlog_tiles::stored_hashes_for_record_hash(leaf_index, leaf_hash(leaf), &pending)
                .map_err(|e| StoreError::Corrupt(format!("Merkle tree: {e}")))?;
        // hashes[level] is the subtree of 2^level leaves this leaf completes.
        for (level, hash) in hashes.iter().enumerate() {
            if level >= STORED_FROM_LEVEL as usize {
                let index = base + new.len() as u64 + level as u64;
                keep.push((index, leaf_index, hash.0));
            }
        }
        new.extend(hashes.iter().map(|h| h.0));
    }
    let new_size = size + appended;
    let pending = Pending {
        tree,
        frontier,
        base,
        new: &new,
    };
    let hashes = Frontier::indexes(new_size)
        .map(|index| pending.hash(index).map(|h| (index, h)))
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::Corrupt(format!("Merkle tree: {e}")))?;
    *frontier = Frontier {
        size: new_size,
        hashes,
    };
    Ok(keep)
}

/// Appends leaves to an in-memory tree (tests, fuzzing).
pub fn append_in_memory(tree: &mut MemoryTree, leaves: &[[u8; 32]]) -> Result<(), StoreError> {
    let size = tree.leaves.len() as u64;
    let mut frontier = std::mem::take(&mut tree.frontier);
    let stored = hashes_for_leaves(&*tree, &mut frontier, size, leaves)?;
    tree.frontier = frontier;
    tree.stored
        .extend(stored.into_iter().map(|(index, _, hash)| (index, hash)));
    tree.leaves.extend_from_slice(leaves);
    Ok(())
}

/// The root of the tree of the first `size` leaves.
pub fn root<T: TreeStorage + ?Sized>(tree: &T, size: u64) -> Result<Hash, ProofError> {
    tlog_tiles::tree_hash(size, &Reader(tree)).map_err(tree_error)
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves (RFC 6962 order:
/// the sibling nearest the leaf first).
pub fn inclusion_proof<T: TreeStorage + ?Sized>(
    tree: &T,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, ProofError> {
    if index >= size {
        return Err(ProofError::OutOfRange(format!(
            "leaf index {index} is not below tree size {size}"
        )));
    }
    tlog_tiles::prove_record(size, index, &Reader(tree)).map_err(tree_error)
}

/// The consistency proof from the tree of `from` leaves to the tree of `to` leaves.
pub fn consistency_proof<T: TreeStorage + ?Sized>(
    tree: &T,
    from: u64,
    to: u64,
) -> Result<Vec<Hash>, ProofError> {
    if from == 0 || from > to {
        return Err(ProofError::OutOfRange(format!(
            "need 1 ≤ from ≤ to, got from {from}, to {to}"
        )));
    }
    tlog_tiles::prove_tree(to, from, &Reader(tree)).map_err(tree_error)
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

/// Whether `[start, end)` is a subtree in the sense of Merkle Tree Certificates
/// (draft-davidben-tls-merkle-tree-certs): non-empty, and `start` a multiple of the
/// smallest power of two ≥ its size.
pub fn is_subtree(start: u64, end: u64) -> bool {
    start < end
        && (end - start)
            .checked_next_power_of_two()
            .is_some_and(|width| start.is_multiple_of(width))
}

/// Checks that leaf `index` (hash `leaf`) is in the subtree `[start, end)` whose hash is
/// `subtree_hash`: a subtree inclusion proof, for an auditor who holds the hash of a
/// stretch of the log (say, one day's events) rather than of a whole tree.
pub fn verify_subtree_inclusion(
    proof: &[Hash],
    index: u64,
    start: u64,
    end: u64,
    leaf: &[u8],
    subtree_hash: &[u8],
) -> Result<(), ProofError> {
    if !is_subtree(start, end) || !(start..end).contains(&index) {
        return Err(ProofError::Invalid(format!(
            "leaf {index} is not in a subtree [{start}, {end})"
        )));
    }
    let (leaf, subtree_hash) = (
        hash_of(leaf, "leaf hash")?,
        hash_of(subtree_hash, "subtree hash")?,
    );
    let offset = index - start;
    let root = evaluate_subtree_proof(proof, end - start, offset, offset + 1, &leaf.0)?;
    if root == subtree_hash.0 {
        Ok(())
    } else {
        Err(ProofError::Invalid(
            "the subtree hash does not match".into(),
        ))
    }
}

/// Checks that the subtree `[start, end)` with hash `subtree_hash` is part of the tree of
/// `size` leaves whose root is `root` (a subtree consistency proof). An empty subtree
/// is part of any tree, with the empty hash and an empty proof.
pub fn verify_subtree_consistency(
    proof: &[Hash],
    start: u64,
    end: u64,
    size: u64,
    subtree_hash: &[u8],
    root: &[u8],
) -> Result<(), ProofError> {
    if start == end && end <= size {
        return if proof.is_empty() && subtree_hash == EMPTY_HASH.0 {
            Ok(())
        } else {
            Err(ProofError::Invalid(
                "an empty subtree has the empty hash and an empty proof".into(),
            ))
        };
    }
    let computed = evaluate_subtree_proof(proof, size, start, end, subtree_hash)?;
    if computed == root {
        Ok(())
    } else {
        Err(ProofError::Invalid("the root does not match".into()))
    }
}

fn node_bytes(left: &[u8], right: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    Sha256::new()
        .chain_update([1u8])
        .chain_update(left)
        .chain_update(right)
        .finalize()
        .to_vec()
}

/// The root of a tree of `size` leaves implied by `proof` for the subtree `[start, end)`
/// with hash `node` (the draft's subtree consistency evaluation, of which RFC 9162's
/// consistency check is the `start = 0` case). `first`, `second` and `third` are the
/// paths to the subtree's first and last leaves and the tree's last leaf; each proof hash
/// moves them one level up.
fn evaluate_subtree_proof(
    proof: &[Hash],
    size: u64,
    start: u64,
    end: u64,
    node: &[u8],
) -> Result<Vec<u8>, ProofError> {
    let invalid = |m: &str| ProofError::Invalid(m.to_string());
    if !is_subtree(start, end) || size < end {
        return Err(invalid("not a subtree of this tree"));
    }
    let (mut first, mut second, mut third) = (start, end - 1, size - 1);
    let up = |first: &mut u64, second: &mut u64, third: &mut u64| {
        *first >>= 1;
        *second >>= 1;
        *third >>= 1;
    };
    // Skip to the level where the proof starts: the subtree's root when its right edge
    // is the tree's, else the largest full subtree on its right edge.
    if second == third {
        while first != second {
            up(&mut first, &mut second, &mut third);
        }
    } else {
        while first != second && second & 1 == 1 {
            up(&mut first, &mut second, &mut third);
        }
    }
    let mut hashes = proof.iter();
    let (mut subtree, mut tree) = if first == second {
        (node.to_vec(), node.to_vec())
    } else {
        let h = hashes.next().ok_or_else(|| invalid("the proof is empty"))?;
        (h.0.to_vec(), h.0.to_vec())
    };
    for p in hashes {
        if third == 0 {
            return Err(invalid("the proof is too long"));
        }
        if second & 1 == 1 || second == third {
            if first < second {
                subtree = node_bytes(&p.0, &subtree);
            }
            tree = node_bytes(&p.0, &tree);
            while second & 1 == 0 {
                up(&mut first, &mut second, &mut third);
            }
        } else {
            tree = node_bytes(&tree, &p.0);
        }
        up(&mut first, &mut second, &mut third);
    }
    if third != 0 {
        return Err(invalid("the proof is too short"));
    }
    if subtree != node {
        return Err(invalid("the proof does not lead to the subtree hash"));
    }
    Ok(tree)
}

/// Brings the tree up to the log at start-up: the stored tree must not cover more
/// leaves than the log has events, and a log written before the tree existed gets the
/// missing part built. Returns how many leaves it added.
pub fn catch_up(store: &Store) -> Result<u64, StoreError> {
    let head = store.head().seq;
    let leaves = store.tree_leaves()?;
    if leaves > head {
        return Err(StoreError::Corrupt(format!(
            "the Merkle tree has {leaves} leaves but the log only {head} events"
        )));
    }
    let mut size = leaves;
    let mut frontier = Frontier::default();
    while size < head {
        let count = (head - size).min(10_000);
        let hashes = store.event_hashes(size + 1, count)?;
        let stored = hashes_for_leaves(store, &mut frontier, size, &hashes)?;
        let mut batch = CommitBatch::default();
        batch.add_tree_hashes(size, count, &stored);
        store.apply(batch)?;
        size += count;
    }
    if size > leaves {
        store.sync()?;
    }
    Ok(size - leaves)
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

    /// MTH(D\[n\]).
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

    /// PATH(m, D\[n\]).
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

    /// PROOF(m, D\[n\]), 0 < m ≤ n.
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
    fn build(groups: &[usize]) -> (MemoryTree, Vec<Hash>) {
        let mut tree = MemoryTree::default();
        for &g in groups {
            let size = tree.leaves.len();
            let hashes: Vec<[u8; 32]> = (0..g)
                .map(|i| tlog_tiles::record_hash(&((size + i) as u64).to_be_bytes()).0)
                .collect();
            append_in_memory(&mut tree, &hashes).expect("append");
        }
        let leaves = tree.leaves.iter().map(|h| Hash(*h)).collect();
        (tree, leaves)
    }

    #[test]
    fn only_levels_from_6_up_are_stored() {
        let (tree, _) = build(&[100, 28, 1, 127]);
        assert_eq!(tree.leaves.len(), 256);
        // Subtrees of 64, 128 and 256 leaves: 4 + 2 + 1.
        assert_eq!(tree.stored.len(), 7);
        for index in tree.stored.keys() {
            assert!(tlog_tiles::split_stored_hash_index(*index).0 >= STORED_FROM_LEVEL);
        }
    }

    #[test]
    fn incremental_tree_matches_the_naive_one() {
        let (tree, leaves) = build(&[1, 2, 3, 1, 7, 16, 1, 30, 5, 64, 1, 2, 40, 70, 1, 100]);
        for size in 0..=leaves.len() {
            let size64 = size as u64;
            let expected = naive::root(&leaves[..size]);
            assert_eq!(
                root(&tree, size64).expect("root"),
                expected,
                "root of {size}"
            );
            for m in (0..size).step_by(7) {
                let proof = inclusion_proof(&tree, m as u64, size64).expect("inclusion");
                assert_eq!(proof, naive::path(m, &leaves[..size]), "PATH({m}, {size})");
                verify_inclusion(&proof, m as u64, size64, &leaves[m].0, &expected.0)
                    .expect("verifies");
            }
            for m in (1..=size).step_by(5) {
                let proof = consistency_proof(&tree, m as u64, size64).expect("consistency");
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
