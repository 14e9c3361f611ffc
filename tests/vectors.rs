//! The vendored test vectors (tests/vectors/) are complete and unedited: every file listed
//! in SHA256SUMS (written by tests/vectors/update.sh) exists with that digest, no folder is
//! empty, and no file was added beside them by hand. Without this, a lost or emptied folder
//! would let the vector tests pass on zero files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors");
const VENDORED: [&str; 3] = ["jcs", "merkle", "tessera-log"];

fn files_under(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path: PathBuf = entry.expect("dir entry").path();
        if path.is_dir() {
            files_under(&path, root, out);
        } else {
            let relative = path.strip_prefix(root).expect("under root");
            out.insert(relative.to_string_lossy().into_owned());
        }
    }
}

#[test]
fn vendored_vectors_match_their_checksums() {
    let root = Path::new(VECTORS);
    let sums = std::fs::read_to_string(root.join("SHA256SUMS")).expect("tests/vectors/SHA256SUMS");
    let mut listed = BTreeSet::new();
    for line in sums.lines() {
        let (digest, name) = line
            .split_once("  ")
            .unwrap_or_else(|| panic!("malformed SHA256SUMS line: {line:?}"));
        let bytes = std::fs::read(root.join(name))
            .unwrap_or_else(|e| panic!("{name} is listed in SHA256SUMS but cannot be read: {e}"));
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            digest,
            "{name} differs from what tests/vectors/update.sh copied; re-run the script \
             instead of editing vectors by hand"
        );
        listed.insert(name.to_string());
    }

    let mut present = BTreeSet::new();
    for folder in VENDORED {
        let before = present.len();
        files_under(&root.join(folder), root, &mut present);
        assert!(present.len() > before, "tests/vectors/{folder} is empty");
        assert!(
            listed
                .iter()
                .any(|name| name.starts_with(&format!("{folder}/"))),
            "SHA256SUMS lists nothing under {folder}/"
        );
    }
    let unlisted: Vec<_> = present.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "files not copied by update.sh: {unlisted:?}"
    );
    // Counts as of the vendored commits (tests/vectors/README.md): a refresh that loses
    // most of a folder should be noticed, not pass on a handful of files.
    for (prefix, at_least) in [
        ("jcs/testdata/input/", 6),
        ("merkle/testdata/", 500),
        ("tessera-log/checkpoint", 16),
    ] {
        let count = listed.iter().filter(|n| n.starts_with(prefix)).count();
        assert!(
            count >= at_least,
            "{prefix}: {count} files, expected at least {at_least}"
        );
    }
}
