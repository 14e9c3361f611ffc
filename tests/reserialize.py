# Re-serializes an NDJSON export the way other tools do, for tests/verify.rs: reads the
# export on stdin (split on \n only: lines hold raw U+2028), writes one line per event.
# Usage: python3 reserialize.py MODE
#   dumps      json.dumps defaults: ", " and ": ", non-ASCII escaped as \u00e9
#   sort_keys  the same with sorted members
#   reversed   members in reverse order at every depth, compact, raw UTF-8
#   spaces     spaces and tabs around every token, a trailing \r
#   jq         what `jq -c .` (1.6) writes: compact, raw UTF-8, DEL escaped, floats in
#              their shortest form with Python's exponents (1e+21, 1e-07), integral ones
#              without ".0" (used when jq is not installed)
#   exotic     members reversed, every non-ASCII character and some ASCII letters escaped,
#              "/" as "\/", every number in exponent form (seq 5 as 5.0E0), a UTF-8 byte
#              order mark before the first line, CRLF line ends
import json
import sys


def exotic_string(s):
    out = []
    for i, ch in enumerate(s):
        code = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch == "/":
            out.append("\\/")
        elif code < 0x20 or code > 0x7E or (ch.isalpha() and i % 3 == 0):
            if code > 0xFFFF:
                code -= 0x10000
                out.append("\\u%04X\\u%04X" % (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)))
            else:
                out.append("\\u%04X" % code)
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def exotic(v):
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, int):
        return "%d.0E0" % v
    if isinstance(v, float):
        return "%.17E" % v
    if isinstance(v, str):
        return exotic_string(v)
    if isinstance(v, list):
        return "[ " + " ,\t".join(exotic(x) for x in v) + " ]"
    items = list(v.items())[::-1]
    return "{ " + " , ".join(exotic_string(k) + " :\t" + exotic(x) for k, x in items) + " }"


def reverse_members(v):
    if isinstance(v, dict):
        return {k: reverse_members(x) for k, x in list(v.items())[::-1]}
    if isinstance(v, list):
        return [reverse_members(x) for x in v]
    return v


def jq(v):
    if isinstance(v, float):
        text = repr(v)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(v, list):
        return "[" + ",".join(jq(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(jq(k) + ":" + jq(x) for k, x in v.items()) + "}"
    return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")


mode = sys.argv[1]
lines = sys.stdin.buffer.read().split(b"\n")[:-1]
out = sys.stdout.buffer
for n, line in enumerate(lines):
    event = json.loads(line)
    if mode == "dumps":
        text = json.dumps(event)
    elif mode == "sort_keys":
        text = json.dumps(event, sort_keys=True)
    elif mode == "reversed":
        text = json.dumps(reverse_members(event), ensure_ascii=False, separators=(",", ":"))
    elif mode == "spaces":
        text = "  " + json.dumps(event, ensure_ascii=False, separators=(" , ", " :\t")) + " \r"
    elif mode == "jq":
        text = jq(event)
    elif mode == "exotic":
        text = ("\ufeff" if n == 0 else "") + exotic(event) + "\r"
    else:
        sys.exit("unknown mode " + mode)
    out.write(text.encode("utf-8") + b"\n")
