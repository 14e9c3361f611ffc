#!/usr/bin/env python3
"""Independent auditor for a cairn event log (an example; see SPEC.md sections 1 and 3).

It trusts nothing but the log's verifier key and re-derives every claim itself, with the
standard library plus `cryptography` (Ed25519) and `rfc8785` (JCS):

  export       hash chain of an NDJSON export, and its Merkle root against a signed checkpoint
  proof        a C2SP tlog-proof file written by `cairn proof SEQ`
  consistency  a newer signed checkpoint extends an older one (the log only grew)
  inclusion    one event is in a signed checkpoint (answer of GET /v1/proof/inclusion)

Each command prints one line "ok: ..." and exits 0, or prints "FAIL: <reason>" on stderr and
exits 1 (2 for usage errors).    Install: python3 -m pip install cryptography rfc8785
"""
import argparse, base64, binascii, hashlib, json, re, sys

import rfc8785  # RFC 8785 JSON Canonicalization Scheme: what an event's hash is taken over
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

EMPTY_ROOT = hashlib.sha256(b"").digest()  # RFC 9162: root of the tree with no leaves
HEX64 = re.compile(r"[0-9a-f]{64}")  # cairn writes hashes as lowercase hex only
DECIMAL = re.compile(r"0|[1-9][0-9]*")  # C2SP numbers: no sign, no leading zeros
SIG_PREFIX = "\u2014 "  # signed-note signature lines start with an em dash and a space


class Fail(Exception):
    """Verification failure or malformed input, reported as one FAIL line."""


def check(ok, reason):
    if not ok:
        raise Fail(reason)


def sha256(*parts):
    return hashlib.sha256(b"".join(parts)).digest()


def node(left, right):
    # Interior node; the 0x01 prefix keeps nodes and leaves (0x00) from being confused.
    return sha256(b"\x01", left, right)


def b64(text, what):
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = None
    # Canonical form only, so that no byte of a signed or proven text can change unnoticed.
    check(raw is not None and base64.b64encode(raw).decode() == text, f"{what}: not valid base64")
    return raw


def check_hash(h, what):
    check(len(h) == 32, f"{what}: a hash must be 32 bytes, got {len(h)}")
    return h


def read(path):
    with open(path, "rb") as f:
        return f.read()


def utf8(data, what):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Fail(f"{what}: not UTF-8")


# --- Merkle tree, RFC 9162 section 2.1 ------------------------------------------------------

class Tree:
    """Root of the tree over leaf hashes appended one by one, in O(log n) memory: a stack of
    complete subtrees, sizes decreasing left to right, as the RFC splits at powers of two."""

    def __init__(self):
        self.stack = []  # (size, hash)

    def append(self, leaf):
        size, h = 1, leaf
        while self.stack and self.stack[-1][0] == size:
            size, h = 2 * size, node(self.stack.pop()[1], h)
        self.stack.append((size, h))

    def root(self):
        if not self.stack:
            return EMPTY_ROOT
        h = self.stack[-1][1]
        for _, left in reversed(self.stack[:-1]):  # fold the ragged right edge into the root
            h = node(left, h)
        return h


def verify_inclusion(index, size, leaf, proof, root):
    """RFC 9162 section 2.1.3.2: is `leaf` the leaf at `index` of the tree (`size`, `root`)?"""
    check(size > 0, "inclusion: an empty tree has no leaves")
    check(index < size, f"inclusion: leaf index {index} is not below tree size {size}")
    check_hash(leaf, "inclusion: leaf hash")
    check_hash(root, "inclusion: root")
    for p in proof:
        check_hash(p, "inclusion: proof hash")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        check(sn > 0, "inclusion: proof is too long")
        if fn & 1 or fn == sn:
            r = node(p, r)
            while not fn & 1 and fn != 0:  # skip levels where our node has no sibling
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node(r, p)
        fn, sn = fn >> 1, sn >> 1
    check(sn == 0, "inclusion: proof is too short")
    check(r == root, "inclusion: proof does not lead to the root")


def verify_consistency(size1, size2, proof, root1, root2):
    """RFC 9162 section 2.1.4.2: is the tree (size1, root1) a prefix of (size2, root2)?"""
    check(size1 <= size2, f"consistency: old size {size1} is larger than new size {size2}")
    for p in proof:
        check_hash(p, "consistency: proof hash")
    empty_ok = size1 > 0 or root1 == EMPTY_ROOT
    if size1 == size2:  # same tree: nothing to prove, the roots must simply agree
        check(not proof, "consistency: proof must be empty for equal sizes")
        check(root1 == root2, "consistency: same size but different roots")
        check(empty_ok, "consistency: a size-0 root must be SHA-256 of the empty string")
        return
    check_hash(root1, "consistency: old root")
    check_hash(root2, "consistency: new root")
    if size1 == 0:  # every tree extends the empty one; a proof would have nothing to say
        check(not proof, "consistency: proof from size 0 must be empty")
        check(empty_ok, "consistency: a size-0 root must be SHA-256 of the empty string")
        return
    check(proof, "consistency: proof is empty")
    if size1 & (size1 - 1) == 0:  # old tree is a complete subtree: its root is the first node
        proof = [root1] + list(proof)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:  # climb to the old tree's rightmost complete subtree
        fn, sn = fn >> 1, sn >> 1
    fr = sr = proof[0]
    for c in proof[1:]:
        check(sn > 0, "consistency: proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node(c, fr), node(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node(sr, c)  # nodes right of the old tree only count for the new root
        fn, sn = fn >> 1, sn >> 1
    check(sn == 0, "consistency: proof is too short")
    check(fr == root1, "consistency: proof does not lead to the old root")
    check(sr == root2, "consistency: proof does not lead to the new root")


# --- Signed notes and checkpoints (c2sp.org/signed-note, c2sp.org/tlog-checkpoint) -----------

def parse_vkey(vkey):
    """'<name>+<8 hex key id>+<base64(0x01 || Ed25519 public key)>' -> (name, id, key)."""
    parts = vkey.strip().split("+", 2)  # base64 may contain '+', names may not
    check(len(parts) == 3 and parts[0] and re.fullmatch(r"[0-9a-fA-F]{8}", parts[1]),
          "key: expected <name>+<8 hex digits>+<base64>")
    name, key_id, raw = parts[0], bytes.fromhex(parts[1]), b64(parts[2], "key")
    check(len(raw) == 33 and raw[0] == 1, "key: not an Ed25519 verifier key (0x01 + 32 bytes)")
    # The id commits to name and key, so a key presented under another name is refused.
    check(sha256(name.encode(), b"\n", raw)[:4] == key_id,
          "key: key id does not match its name and public key")
    return name, key_id, Ed25519PublicKey.from_public_bytes(raw[1:])


def open_checkpoint(data, vkey, what):
    """Verify a signed checkpoint note with vkey; return (origin, size, root)."""
    name, key_id, pub = vkey
    note = utf8(data, what)
    check(all(c >= " " or c == "\n" for c in note), f"{what}: control character in note")
    cut = note.rfind("\n\n")  # the last blank line separates text from signatures
    check(cut >= 0 and note.endswith("\n") and cut + 2 < len(note),
          f"{what}: not a signed note (text, blank line, signature lines)")
    text, good = note[:cut + 1], False
    for line in note[cut + 2:-1].split("\n"):
        fields = line[len(SIG_PREFIX):].split(" ")
        check(line.startswith(SIG_PREFIX) and len(fields) == 2 and fields[0],
              f"{what}: malformed signature line {line!r}")
        sig = b64(fields[1], f"{what}: signature")
        check(len(sig) > 4, f"{what}: signature too short")
        if fields[0] != name or sig[:4] != key_id:
            continue  # another key's (co)signature: not ours to judge
        try:
            if len(sig) != 4 + 64:
                raise InvalidSignature
            pub.verify(sig[4:], text.encode("utf-8"))
        except InvalidSignature:
            raise Fail(f"{what}: bad signature by {name}")
        good = True
    check(good, f"{what}: no signature by key {name}")
    lines = text[:-1].split("\n")  # origin, size, root, then optional extension lines
    check(len(lines) >= 3, f"{what}: checkpoint needs origin, size and root lines")
    # The key name is the origin, so a key cannot vouch for a checkpoint of another log.
    check(lines[0] == name, f"{what}: origin {lines[0]!r} is not the key name {name!r}")
    check(DECIMAL.fullmatch(lines[1]), f"{what}: bad tree size {lines[1]!r}")
    root = check_hash(b64(lines[2], f"{what}: root"), f"{what}: root")
    return lines[0], int(lines[1]), root


# --- Events (SPEC section 1) -------------------------------------------------------------------

def load_json(data, what):
    def no_duplicates(pairs):  # I-JSON: a duplicate key would make the hashed record ambiguous
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("duplicate key")
        return dict(pairs)

    try:
        return json.loads(data, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:
        raise Fail(f"{what}: invalid JSON ({e})")


def parse_event(line, what):
    """Parse one export line and check its `hash` against its own content."""
    e = load_json(line, what)
    check(isinstance(e, dict), f"{what}: not a JSON object")
    for k in ("hash", "prev_hash"):
        check(isinstance(e.get(k), str) and HEX64.fullmatch(e[k]),
              f"{what}: `{k}` is not 64 lowercase hex digits")
    check(type(e.get("seq")) is int and e["seq"] >= 1, f"{what}: `seq` is not a positive integer")
    body = {k: v for k, v in e.items() if k != "hash"}  # the hash covers all but itself
    try:
        digest = sha256(b"\x00", rfc8785.dumps(body)).hex()
    except rfc8785.CanonicalizationError as x:
        raise Fail(f"{what}: cannot canonicalize ({x})")
    check(digest == e["hash"], f"{what}: `hash` does not match the event's content")
    return e


def event_leaf(e):
    # The event's `hash` is already SHA-256(0x00 || JCS(record)), the RFC 6962 leaf hash
    # of its canonical record (SPEC §1): the chain link and the Merkle leaf are one value.
    return bytes.fromhex(e["hash"])


def read_export(path):
    """Yield the events of an NDJSON export, checking the hash chain from seq 1."""
    prev = "0" * 64  # seq 1 links to 64 zeros
    with open(path, "rb") as f:
        for seq, line in enumerate(f, start=1):  # binary mode splits on b"\n" only (U+2028)
            check(line.endswith(b"\n"), f"line {seq}: no final newline (truncated export?)")
            e = parse_event(line[:-1], f"line {seq}")
            check(e["seq"] == seq, f"line {seq}: seq is {e['seq']}, expected {seq}")
            check(e["prev_hash"] == prev, f"seq {seq}: prev_hash does not link to seq {seq - 1}")
            prev = e["hash"]
            yield e


def load_proof_json(path, int_fields):
    """Read a {"data": {...}} proof answer: the named integers, then the hex `hashes`."""
    doc = load_json(read(path), path)
    data = doc.get("data") if isinstance(doc, dict) else None
    check(isinstance(data, dict), f'{path}: expected {{"data": {{...}}}}')
    for k in int_fields:  # bool is an int in Python, but not in JSON
        check(type(data.get(k)) is int and data[k] >= 0,
              f"{path}: `{k}` is not a non-negative integer")
    hashes = data.get("hashes")
    check(isinstance(hashes, list), f"{path}: `hashes` is not a list")
    for i, h in enumerate(hashes):
        check(isinstance(h, str) and HEX64.fullmatch(h),
              f"{path}: hashes[{i}] is not 64 lowercase hex digits")
    return [data[k] for k in int_fields] + [[bytes.fromhex(h) for h in hashes]]


def check_event_in(e, index, size, proof, origin, cp_size, root):
    """Shared end of `proof` and `inclusion`: the event is leaf `index` of the checkpoint."""
    check(e["seq"] - 1 == index, f"proof is for leaf index {index}, the event has seq {e['seq']}")
    check(size == cp_size, f"proof is for tree size {size}, the checkpoint has size {cp_size}")
    verify_inclusion(index, size, event_leaf(e), proof, root)
    return f"event seq {e['seq']} ({e.get('id')}) is in {origin} at tree size {size}"


# --- Commands ----------------------------------------------------------------------------------

def cmd_export(args):
    origin, size, root = open_checkpoint(read(args.checkpoint), parse_vkey(args.key), "checkpoint")
    tree, count = Tree(), 0
    for count, e in enumerate(read_export(args.export), start=1):
        if count <= size:  # the checkpoint covers a prefix; the rest only extends the chain
            tree.append(event_leaf(e))
    check(count >= size, f"export has {count} events, checkpoint {origin} covers {size}")
    check(tree.root() == root, f"Merkle root of the first {size} events differs from {origin}")
    return f"{count} events, chain intact; checkpoint {origin} size {size} root matches"


def cmd_proof(args):
    # Proof lines (magic, extra, index, hashes), a blank line, then the signed checkpoint note.
    head, sep, note = utf8(read(args.file), args.file).partition("\n\n")
    lines = head.split("\n")
    check(sep and lines[0] == "c2sp.org/tlog-proof@v1",
          f"{args.file}: not a c2sp.org/tlog-proof@v1 file")
    check(len(lines) >= 3 and lines[1].startswith("extra "),
          f"{args.file}: missing `extra` line (the event)")
    index = lines[2].removeprefix("index ")
    check(lines[2].startswith("index ") and DECIMAL.fullmatch(index),
          f"{args.file}: missing or bad `index` line")
    proof = [check_hash(b64(h, "proof hash"), "proof hash") for h in lines[3:]]
    origin, size, root = open_checkpoint(note.encode("utf-8"), parse_vkey(args.key), "checkpoint")
    e = parse_event(b64(lines[1][len("extra "):], "extra"), "event")
    return check_event_in(e, int(index), size, proof, origin, size, root)


def cmd_consistency(args):
    vkey = parse_vkey(args.key)
    origin1, size1, root1 = open_checkpoint(read(args.old), vkey, "old checkpoint")
    origin2, size2, root2 = open_checkpoint(read(args.new), vkey, "new checkpoint")
    check(origin1 == origin2, f"checkpoints are from different logs: {origin1}, {origin2}")
    first, second, proof = load_proof_json(args.proof, ("from", "to"))
    check((first, second) == (size1, size2),
          f"proof is from {first} to {second}, the checkpoints are {size1} and {size2}")
    verify_consistency(size1, size2, proof, root1, root2)
    return f"{origin1} at size {size2} is consistent with size {size1} (the log only grew)"


def cmd_inclusion(args):
    vkey = parse_vkey(args.key)
    origin, cp_size, root = open_checkpoint(read(args.checkpoint), vkey, "checkpoint")
    e = parse_event(read(args.event), "event")  # JSON ignores the line's trailing newline
    index, size, proof = load_proof_json(args.proof, ("leaf_index", "tree_size"))
    return check_event_in(e, index, size, proof, origin, cp_size, root)


def main(argv=None):
    p = argparse.ArgumentParser(description="Independent auditor for a cairn event log.")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, run, help, files, **options):
        c = sub.add_parser(name, help=help)
        c.add_argument("--key", required=True, help="verifier key: <name>+<key id>+<base64>")
        for option, text in options.items():
            c.add_argument(f"--{option}", required=True, help=text)
        for file, text in files:
            c.add_argument(file, help=text)
        c.set_defaults(run=run)

    command("export", cmd_export, "verify an NDJSON export against a signed checkpoint",
            [("export", "NDJSON export (GET /v1/export) starting at seq 1")],
            checkpoint="signed checkpoint (GET /v1/checkpoint)")
    command("proof", cmd_proof, "verify a tlog-proof file written by `cairn proof SEQ`",
            [("file", "c2sp.org/tlog-proof@v1 file")])
    command("consistency", cmd_consistency, "verify that checkpoint NEW extends checkpoint OLD",
            [("proof", "JSON answer of GET /v1/proof/consistency")],
            old="older signed checkpoint", new="newer signed checkpoint")
    command("inclusion", cmd_inclusion, "verify one event against a signed checkpoint",
            [("event", "file holding one export line"),
             ("proof", "JSON answer of GET /v1/proof/inclusion")],
            checkpoint="signed checkpoint whose size is the proof's tree_size")
    args = p.parse_args(argv)
    try:
        print(f"ok: {args.run(args)}")
        return 0
    except Fail as e:
        reason = str(e)
    except OSError as e:
        reason = f"{e.filename}: {e.strerror}"
    except Exception as e:  # an auditor reports, it does not crash: no traceback for bad input
        reason = f"unexpected {type(e).__name__}: {e}"
    print(f"FAIL: {reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
