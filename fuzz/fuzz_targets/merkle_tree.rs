//! The incremental Merkle tree (stored hashes appended group by group, as the writer
//! does) against RFC 6962's recursive definitions: every root, every inclusion proof and
//! every consistency proof must be the same, and must verify.
#![no_main]

use cairn::merkle::{self, naive};
use libfuzzer_sys::fuzz_target;
use tlog_tiles::Hash;

fuzz_target!(|data: &[u8]| {
    // Each input byte is one group commit of 1..=32 events; at most 64 groups.
    let mut stored: Vec<[u8; 32]> = Vec::new();
    let mut leaves: Vec<Hash> = Vec::new();
    for &b in data.iter().take(64) {
        let group: Vec<[u8; 32]> = (0..(b % 32) as usize + 1)
            .map(|i| tlog_tiles::record_hash(&[b, i as u8, leaves.len() as u8]).0)
            .collect();
        let size = leaves.len() as u64;
        assert_eq!(stored.len() as u64, merkle::first_index(size));
        stored.extend(merkle::hashes_for_leaves(&stored, size, &group).expect("append"));
        leaves.extend(group.iter().map(|h| Hash(*h)));
    }
    let n = leaves.len();
    let root = naive::root(&leaves);
    assert_eq!(merkle::root(&stored, n as u64).expect("root"), root);
    // Proofs against the whole tree and one earlier size (all pairs would be quadratic).
    let earlier = data.last().map_or(0, |&b| b as usize % (n + 1));
    for m in 0..n {
        let proof = merkle::inclusion_proof(&stored, m as u64, n as u64).expect("inclusion");
        assert_eq!(proof, naive::path(m, &leaves));
        merkle::verify_inclusion(&proof, m as u64, n as u64, &leaves[m].0, &root.0)
            .expect("inclusion verifies");
    }
    if earlier > 0 {
        let proof =
            merkle::consistency_proof(&stored, earlier as u64, n as u64).expect("consistency");
        assert_eq!(proof, naive::consistency(earlier, &leaves));
        let old = naive::root(&leaves[..earlier]);
        merkle::verify_consistency(&proof, earlier as u64, n as u64, &old.0, &root.0)
            .expect("consistency verifies");
    }
});
