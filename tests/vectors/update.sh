#!/usr/bin/env bash
# Re-copies the public test vectors cairn's tests use from a source directory laid out
# like the team's shared/vectors (jcs/, merkle/, tessera-log/), then rewrites SHA256SUMS.
# The vendored files are never edited by hand: tests/vectors.rs checks every one of them
# against SHA256SUMS, so a hand edit (or a lost file) fails the tests.
#
#   tests/vectors/update.sh SOURCE     # e.g. the team's shared vectors directory
#
# Provenance (upstream repository, path, commit, license) is in tests/vectors/README.md;
# the script prints each copied folder's git tree hash so it can be compared with
# `git rev-parse <commit>:<path>` in an upstream clone.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ $# -eq 1 ] || { echo "usage: tests/vectors/update.sh SOURCE_DIRECTORY" >&2; exit 2; }
source_dir="$1"
[ -d "$source_dir" ] || { echo "update.sh: no source directory $source_dir" >&2; exit 1; }
source_dir="$(cd "$source_dir" && pwd)"

# folder in SOURCE → folder here; only what the tests, benches and fuzz seeds read.
copy() {
    local from="$source_dir/$1" to="$here/$2"
    [ -d "$from" ] || { echo "update.sh: missing $from" >&2; exit 1; }
    rm -rf "$to"
    mkdir -p "$(dirname "$to")"
    cp -R "$from" "$to"
    local count
    count=$(find "$to" -type f | wc -l)
    [ "$count" -gt 0 ] || { echo "update.sh: $from is empty" >&2; exit 1; }
    echo "$2: $count files from $1 (git tree $(tree_hash "$to"))" >&2
}

# The git tree hash of a folder, as `git rev-parse COMMIT:PATH` prints it upstream.
tree_hash() {
    local git_dir
    git_dir=$(mktemp -d)
    GIT_DIR="$git_dir" git init -q --bare
    (cd "$1" && GIT_DIR="$git_dir" GIT_WORK_TREE=. git add -A . && GIT_DIR="$git_dir" git write-tree)
    rm -rf "$git_dir"
}

copy jcs/testdata jcs/testdata
copy merkle/testdata merkle/testdata
copy tessera-log tessera-log
# Each upstream's license, kept beside its files.
cp "$source_dir/jcs/LICENSE" "$here/jcs/LICENSE"
cp "$source_dir/merkle/LICENSE" "$here/merkle/LICENSE"

cd "$here"
find jcs merkle tessera-log -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum > SHA256SUMS
echo "SHA256SUMS: $(wc -l < SHA256SUMS) files" >&2
