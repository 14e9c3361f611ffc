//! The incremental Merkle tree (upper levels stored group by group, as the writer does;
//! lower ones recomputed from the leaves) against RFC 6962's recursive definitions: the
//! root, inclusion proofs and a consistency proof must be the same, and must verify.
#![no_main]

use cairn::merkle::{self, naive};
use libfuzzer_sys::fuzz_target;
use tlog_tiles::Hash;

fuzz_target!(|data: &[u8]| {
    // Each input byte is one group commit of 1..=128 events; at most 64 groups.
    let mut tree = merkle::MemoryTree::default();
    for &b in data.iter().take(64) {
        let size = tree.leaves.len();
        let group: Vec<[u8; 32]> = (0..(b % 128) as usize + 1)
            .map(|i| tlog_tiles::record_hash(&(size + i).to_be_bytes()).0)
            .collect();
        merkle::append_in_memory(&mut tree, &group).expect("append");
    }
    let leaves: Vec<Hash> = tree.leaves.iter().map(|h| Hash(*h)).collect();
    let n = leaves.len();
    let root = naive::root(&leaves);
    assert_eq!(merkle::root(&tree, n as u64).expect("root"), root);
    // Proofs against the whole tree (about 50 leaves, and the last) and one earlier size:
    // the naive proofs cost O(n) each.
    let earlier = data.last().map_or(0, |&b| b as usize % (n + 1));
    for m in (0..n).step_by(n / 50 + 1).chain(n.checked_sub(1)) {
        let proof = merkle::inclusion_proof(&tree, m as u64, n as u64).expect("inclusion");
        assert_eq!(proof, naive::path(m, &leaves));
        merkle::verify_inclusion(&proof, m as u64, n as u64, &leaves[m].0, &root.0)
            .expect("inclusion verifies");
    }
    if earlier > 0 {
        let proof =
            merkle::consistency_proof(&tree, earlier as u64, n as u64).expect("consistency");
        assert_eq!(proof, naive::consistency(earlier, &leaves));
        let old = naive::root(&leaves[..earlier]);
        merkle::verify_consistency(&proof, earlier as u64, n as u64, &old.0, &root.0)
            .expect("consistency verifies");
    }
});
