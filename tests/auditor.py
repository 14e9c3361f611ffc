# The auditor's script from SPEC §1, verbatim, run by tests/verify.rs in a directory that
# holds export.ndjson (a full export). Needs `pip install rfc8785`.
# Prints "ok <events> <head hash>" when the whole chain re-derives; fails otherwise.
import hashlib, json, rfc8785
prev = "0" * 64
for seq, line in enumerate(open("export.ndjson", "rb").read().split(b"\n")[:-1], start=1):
    e = json.loads(line)                                  # a full export, split on \n only
    body = {k: v for k, v in e.items() if k != "hash"}
    digest = hashlib.sha256(b"\x00" + rfc8785.dumps(body)).hexdigest()
    assert e["seq"] == seq and e["prev_hash"] == prev and e["hash"] == digest, f"broken at seq {seq}"
    prev = e["hash"]
print(f"ok {seq} {prev}")
