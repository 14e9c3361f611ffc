//! The canonical record and the hash chain: defined once, used by the writer, the
//! server's `/v1/verify`, `cairn verify` and the tests.
//!
//! An event's served form is the RFC 8785 (JCS) serialization of the whole event.
//! JCS sorts members, and every member name is ASCII, so the order is fixed:
//!
//! ```text
//! {"data":…,"hash":"…","id":"…","prev_hash":"…","seq":N,"source":"…","timestamp":"…","type":"…"}
//! ```
//!
//! The hashed record is that line without its `"hash":"…",` member, and
//! `hash = SHA-256(0x00 ‖ record)` (the RFC 6962 leaf hash). Because `data` comes
//! first and every other member is fixed-shape or an escaped string, the writer can
//! assemble the line by concatenation around the JCS form of `data` (which the `canon-json`
//! crate produces), and a verifier can find the top-level `hash` member as the *last*
//! `,"hash":"` in the line: after it only `id`, `prev_hash`, `seq`, `source`, `timestamp`
//! and `type` follow, and none of them can contain an unescaped quote. Tests check the
//! assembled line against a full JCS serialization of the event.
//!
//! An export file may also hold events re-serialized by other tools (SPEC §4). A line
//! whose hash does not match its own bytes is therefore parsed and canonicalized before
//! it is judged ([`inspect_any_form`]), which is what SPEC §1's auditor does for every line.
//! A line that does match its own bytes is taken as served without being canonicalized
//! (that would cost 4× the time). The auditor would refuse such a line if its bytes were
//! not canonical, but only a forger hashing non-canonical bytes writes one, and no such
//! line can match a hash the server issued: pinning the head (`--expect-head`) refuses
//! it as it refuses every forged chain.

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use ulid::Ulid;

use crate::{event, ijson};

/// `prev_hash` of the first event, and the head hash of an empty log.
pub const ZERO_HASH: [u8; 32] = [0; 32];

const HASH_MEMBER_START: &[u8] = b",\"hash\":\"";
/// `,"hash":"` + 64 hex + `"`
const HASH_MEMBER_LEN: usize = HASH_MEMBER_START.len() + 64 + 1;

/// The parts of an event the writer knows before hashing it.
pub struct RecordParts<'a> {
    /// JCS form of `data`.
    pub data_jcs: &'a str,
    pub id: Ulid,
    pub prev_hash: &'a [u8; 32],
    pub seq: u64,
    /// JCS form of `source` (a JSON string, quotes included), if present.
    pub source_jcs: Option<&'a str>,
    /// Canonical UTC timestamp text (no characters that JSON escapes).
    pub timestamp: &'a str,
    /// Event type (restricted to `[A-Za-z0-9._:/-]`, so never escaped).
    pub event_type: &'a str,
}

/// The SHA-256 state after `0x00 ‖ {"data":<data_jcs>,`: the part of an event's record
/// known before the writer gives it an id, a seq and a `prev_hash`. Computed where the
/// event is parsed (on the request's task, in parallel), so the single writer only
/// hashes the members it assigns; [`seal_after`] continues from it.
pub fn data_prefix_hash(data_jcs: &str) -> Sha256 {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(DATA_OPEN);
    h.update(data_jcs.as_bytes());
    h.update(b",");
    h
}

const DATA_OPEN: &[u8] = b"{\"data\":";
const HASH_OPEN: &str = "\"hash\":\"";
const ID_OPEN: &str = "\"id\":\"";
const PREV_OPEN: &str = "\",\"prev_hash\":\"";
const SEQ_OPEN: &str = "\",\"seq\":";
const SOURCE_OPEN: &str = ",\"source\":";
const TIMESTAMP_OPEN: &str = ",\"timestamp\":\"";
const TYPE_OPEN: &str = "\",\"type\":\"";
const CLOSE: &str = "\"}";

/// Builds the served JCS line and its hash (see [`seal_after`]).
pub fn seal(parts: &RecordParts<'_>) -> (String, [u8; 32]) {
    seal_after(parts, data_prefix_hash(parts.data_jcs))
}

/// Builds the served JCS line and its hash, given `prefix` =
/// [`data_prefix_hash`]`(parts.data_jcs)`. The record (the line minus its hash member)
/// is written, its members after `data` hashed, and the hash member inserted before
/// them. The line's buffer is allocated once at its exact length, so turning it into
/// the event's `ByteString` does not allocate again.
pub fn seal_after(parts: &RecordParts<'_>, prefix: Sha256) -> (String, [u8; 32]) {
    let mut seq_buf = itoa::Buffer::new();
    let seq = seq_buf.format(parts.seq);
    let source_len = parts.source_jcs.map_or(0, |s| SOURCE_OPEN.len() + s.len());
    let hash_member = HASH_OPEN.len() + 64 + 2;
    let len = DATA_OPEN.len()
        + parts.data_jcs.len()
        + 1
        + hash_member
        + ID_OPEN.len()
        + ulid::ULID_LEN
        + PREV_OPEN.len()
        + 64
        + SEQ_OPEN.len()
        + seq.len()
        + source_len
        + TIMESTAMP_OPEN.len()
        + parts.timestamp.len()
        + TYPE_OPEN.len()
        + parts.event_type.len()
        + CLOSE.len();
    let mut line = String::with_capacity(len);
    line.push_str("{\"data\":");
    line.push_str(parts.data_jcs);
    line.push(',');
    let member_start = line.len();
    line.push_str(ID_OPEN);
    let mut id_buf = [0u8; ulid::ULID_LEN];
    line.push_str(parts.id.array_to_str(&mut id_buf));
    line.push_str(PREV_OPEN);
    line.push_str(&hex_str(parts.prev_hash));
    line.push_str(SEQ_OPEN);
    line.push_str(seq);
    if let Some(source) = parts.source_jcs {
        line.push_str(SOURCE_OPEN);
        line.push_str(source);
    }
    line.push_str(TIMESTAMP_OPEN);
    line.push_str(parts.timestamp);
    line.push_str(TYPE_OPEN);
    line.push_str(parts.event_type);
    line.push_str(CLOSE);

    let mut h = prefix;
    h.update(&line.as_bytes()[member_start..]);
    let hash: [u8; 32] = h.finalize().into();
    let mut member = [0u8; HASH_OPEN.len() + 64 + 2];
    member[..HASH_OPEN.len()].copy_from_slice(HASH_OPEN.as_bytes());
    // 64 bytes always hold 32 bytes of hex.
    let _ = hex::encode_to_slice(hash, &mut member[HASH_OPEN.len()..HASH_OPEN.len() + 64]);
    member[HASH_OPEN.len() + 64..].copy_from_slice(b"\",");
    line.insert_str(
        member_start,
        std::str::from_utf8(&member).unwrap_or_default(),
    );
    debug_assert_eq!(line.len(), len);
    (line, hash)
}

/// Lowercase hex of a hash, without allocating.
pub fn hex_str(hash: &[u8; 32]) -> HexHash {
    let mut out = [0u8; 64];
    // A 64-byte buffer always fits 32 bytes of hex.
    let _ = hex::encode_to_slice(hash, &mut out);
    HexHash(out)
}

/// 64 lowercase hex digits.
pub struct HexHash([u8; 64]);

impl std::ops::Deref for HexHash {
    type Target = str;
    fn deref(&self) -> &str {
        // hex digits are ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// SHA-256(0x00 ‖ parts…): the RFC 6962 leaf hash of the concatenated record.
pub fn leaf_hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8]);
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// What a verifier needs from one served line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineInfo {
    pub seq: u64,
    pub id: Ulid,
    pub prev_hash: [u8; 32],
    /// The `hash` member as written in the line.
    pub stated_hash: [u8; 32],
    /// SHA-256(0x00 ‖ line without its hash member), recomputed.
    pub computed_hash: [u8; 32],
}

#[derive(Deserialize)]
struct ChainFields<'a> {
    seq: u64,
    id: &'a str,
    prev_hash: &'a str,
    hash: &'a str,
}

fn parse_hash(hex_text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if hex_text.len() != 64 || hex_text.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode_to_slice(hex_text, &mut out).ok()?;
    Some(out)
}

#[derive(Deserialize)]
struct HashOnly<'a> {
    hash: &'a str,
}

/// The `hash` member of a stored line, without validating or re-hashing the rest (the
/// Merkle tree reads a few leaves this way; `inspect_line` is the check).
pub fn stated_hash(line: &[u8]) -> Result<[u8; 32], String> {
    let fields: HashOnly = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    parse_hash(fields.hash).ok_or_else(|| "hash is not 64 lowercase hex digits".to_string())
}

/// Parses one served line (full JSON validation) and recomputes its hash.
pub fn inspect_line(line: &[u8]) -> Result<LineInfo, String> {
    let fields: ChainFields<'_> =
        serde_json::from_slice(line).map_err(|e| format!("not a cairn event: {e}"))?;
    let stated_hash = parse_hash(fields.hash).ok_or("hash is not 64 lowercase hex digits")?;
    let prev_hash =
        parse_hash(fields.prev_hash).ok_or("prev_hash is not 64 lowercase hex digits")?;
    let id = Ulid::from_string(fields.id).map_err(|_| "id is not a ULID")?;

    let start = memchr::memmem::rfind(line, HASH_MEMBER_START)
        .ok_or("no top-level hash member where JCS puts it")?;
    let member = line
        .get(start..start + HASH_MEMBER_LEN)
        .ok_or("truncated hash member")?;
    if &member[HASH_MEMBER_START.len()..HASH_MEMBER_START.len() + 64] != fields.hash.as_bytes()
        || member[HASH_MEMBER_LEN - 1] != b'"'
        || line.get(start + HASH_MEMBER_LEN) != Some(&b',')
    {
        return Err("the hash member is not where JCS puts it (line is not canonical)".into());
    }
    // Keep the comma before the member, drop the member and the comma after it.
    let computed_hash = leaf_hash(&[&line[..start + 1], &line[start + HASH_MEMBER_LEN + 1..]]);
    Ok(LineInfo {
        seq: fields.seq,
        id,
        prev_hash,
        stated_hash,
        computed_hash,
    })
}

/// How a line of an export file was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineForm {
    /// Byte for byte what the server serves: checked on the bytes alone.
    Served,
    /// Another JSON form of an event (re-formatted by `jq`, Python's `json.dumps`, …):
    /// checked after parsing and canonicalizing.
    Reserialized,
}

/// Inspects a line in any JSON form (SPEC §4), with the outcome of SPEC §1's auditor:
/// parse the line, drop `hash`, hash the JCS form of the rest. A line in the served form
/// takes the byte-level path ([`inspect_line`]); only a line whose hash does not match its
/// own bytes is parsed (strict I-JSON, see `ijson`) and canonicalized (`event::jcs`).
pub fn inspect_any_form(line: &[u8]) -> Result<(LineInfo, LineForm), String> {
    if let Ok(info) = inspect_line(line)
        && info.computed_hash == info.stated_hash
    {
        return Ok((info, LineForm::Served));
    }
    inspect_parsed(line).map(|info| (info, LineForm::Reserialized))
}

/// Some Windows tools start a UTF-8 file with a byte order mark; Python's `json.loads`
/// skips it, so the auditor does too.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The slow path of [`inspect_any_form`]: what SPEC §1's auditor computes. A line that
/// breaks I-JSON (a duplicate member, an integer beyond ±(2^53−1), …) is refused: no
/// cairn event holds one, and JSON tools disagree on what such a line says.
fn inspect_parsed(line: &[u8]) -> Result<LineInfo, String> {
    let line = line.strip_prefix(UTF8_BOM).unwrap_or(line);
    let parsed = ijson::parse(line).map_err(|e| {
        format!(
            "not a cairn event: invalid JSON at column {}: {}",
            e.column, e.message
        )
    })?;
    if let Some(v) = parsed.violations.first() {
        return Err(format!(
            "not a cairn event: {}: {}",
            ijson::render_path(&v.path),
            v.message
        ));
    }
    let Value::Object(mut event) = parsed.value else {
        return Err("not a cairn event: not a JSON object".into());
    };
    let stated_hash = match event.remove("hash") {
        Some(Value::String(h)) => parse_hash(&h),
        _ => None,
    }
    .ok_or("hash is missing or not 64 lowercase hex digits")?;
    let prev_hash = event
        .get("prev_hash")
        .and_then(Value::as_str)
        .and_then(parse_hash)
        .ok_or("prev_hash is missing or not 64 lowercase hex digits")?;
    let id = event
        .get("id")
        .and_then(Value::as_str)
        .and_then(|id| Ulid::from_string(id).ok())
        .ok_or("id is missing or not a ULID")?;
    let seq = event
        .get("seq")
        .and_then(Value::as_number)
        .and_then(integral)
        .ok_or("seq is missing or not a non-negative integer")?;
    let record = event::jcs(&Value::Object(event));
    Ok(LineInfo {
        seq,
        id,
        prev_hash,
        stated_hash,
        computed_hash: leaf_hash(&[record.as_bytes()]),
    })
}

/// A number's value as a `u64` when it is a non-negative integer however it is written
/// (`7`, `7.0`, `7e0`): the auditor compares `seq` by value, and JCS writes all three as
/// `7`, so all three hash alike.
fn integral(n: &serde_json::Number) -> Option<u64> {
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=ijson::MAX_SAFE_INTEGER as f64).contains(f))
            .map(|f| f as u64)
    })
}

/// The first place a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chain broken at seq {seq}: {reason}")]
pub struct ChainBreak {
    pub seq: u64,
    pub reason: String,
}

/// Re-derives a chain line by line. A partial chain (not starting at seq 1) is checked
/// from its first event, whose `prev_hash` is taken on trust unless pinned.
#[derive(Debug, Default)]
pub struct Verifier {
    last: Option<(u64, Ulid, [u8; 32])>,
    expect_prev: Option<[u8; 32]>,
    checked: u64,
}

impl Verifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Pins the `prev_hash` the first event must have.
    pub fn expect_prev(mut self, prev: [u8; 32]) -> Self {
        self.expect_prev = Some(prev);
        self
    }

    /// Continues after a known event (e.g. the event before `from_seq`).
    pub fn after(seq: u64, id: Ulid, hash: [u8; 32]) -> Self {
        Self {
            last: Some((seq, id, hash)),
            ..Self::default()
        }
    }

    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// `(seq, hash)` of the last event checked.
    pub fn last(&self) -> Option<(u64, [u8; 32])> {
        self.last.map(|(seq, _, hash)| (seq, hash))
    }

    /// Checks the next line; `position` (1-based) names the line when it cannot be parsed.
    pub fn push(&mut self, line: &[u8]) -> Result<(), ChainBreak> {
        self.push_inspected(inspect_line(line))
    }

    /// Checks the result of [`inspect_line`] (which callers may run in parallel).
    pub fn push_inspected(
        &mut self,
        inspected: Result<LineInfo, String>,
    ) -> Result<(), ChainBreak> {
        match inspected {
            Ok(info) => self.push_info(&info),
            Err(reason) => Err(ChainBreak {
                seq: self.last.map_or(1, |(seq, _, _)| seq + 1),
                reason,
            }),
        }
    }

    /// Checks an already inspected line.
    pub fn push_info(&mut self, info: &LineInfo) -> Result<(), ChainBreak> {
        let broken = |reason: String| ChainBreak {
            seq: info.seq,
            reason,
        };
        match self.last {
            Some((seq, id, hash)) => {
                if info.seq != seq + 1 {
                    return Err(ChainBreak {
                        seq: seq + 1,
                        reason: format!("expected seq {}, found seq {}", seq + 1, info.seq),
                    });
                }
                if info.prev_hash != hash {
                    return Err(broken(
                        "prev_hash does not match the previous event's hash".into(),
                    ));
                }
                if info.id <= id {
                    return Err(broken("id does not increase".into()));
                }
            }
            None => {
                if let Some(prev) = self.expect_prev
                    && info.prev_hash != prev
                {
                    return Err(broken(
                        "prev_hash does not match the expected previous hash".into(),
                    ));
                }
                if info.seq == 1 && info.prev_hash != ZERO_HASH {
                    return Err(broken("the first event's prev_hash is not 64 zeros".into()));
                }
                if info.seq == 0 {
                    return Err(broken("seq 0 is not a valid position".into()));
                }
            }
        }
        if info.computed_hash != info.stated_hash {
            return Err(broken("hash does not match the event's content".into()));
        }
        self.last = Some((info.seq, info.id, info.stated_hash));
        self.checked += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(data_jcs: &str) -> (String, [u8; 32]) {
        seal(&RecordParts {
            data_jcs,
            id: Ulid::from_parts(1_700_000_000_000, 7),
            prev_hash: &ZERO_HASH,
            seq: 1,
            source_jcs: Some("\"gw\""),
            timestamp: "2026-03-19T10:00:00.250Z",
            event_type: "tool_call",
        })
    }

    fn inspect(line: &str) -> Result<(LineInfo, LineForm), String> {
        inspect_any_form(line.as_bytes())
    }

    #[test]
    fn any_form_hashes_the_canonical_record() {
        let (served, hash) = sealed("{\"a\":[1e+21,0.1],\"s\":\"é\u{2028}\"}");
        let (info, form) = inspect(&served).expect("served");
        assert_eq!((form, info.computed_hash), (LineForm::Served, hash));

        // The same event as Python's json.dumps writes it, with seq as 1.0 and a BOM.
        let value: Value = serde_json::from_str(&served).expect("JSON");
        let other = format!("\u{feff}{}", serde_json::to_string_pretty(&value).unwrap())
            .replace('\n', " ")
            .replace("\"seq\": 1", "\"seq\": 1.0")
            .replace('é', "\\u00e9")
            .replace('\u{2028}', "\\u2028");
        let (info, form) = inspect(&other).expect("re-serialized");
        assert_eq!(form, LineForm::Reserialized);
        assert_eq!(
            (info.seq, info.computed_hash, info.stated_hash),
            (1, hash, hash)
        );

        // A changed value no longer hashes alike; a duplicate member is refused.
        let (info, _) = inspect(&other.replace("0.1", "0.10001")).expect("parses");
        assert_ne!(info.computed_hash, info.stated_hash);
        let duplicate = other.replacen("\"type\"", "\"type\": \"x\", \"type\"", 1);
        assert!(
            inspect(&duplicate)
                .unwrap_err()
                .contains("duplicate member")
        );
        assert!(inspect(&other.replace("\"seq\": 1.0", "\"seq\": 1.5")).is_err());

        // Documented: a line whose non-canonical bytes were hashed as they are (only a
        // forger writes one) is taken as served; the auditor would refuse it.
        let (forged, forged_hash) = sealed(r#"{"b":1, "a":2}"#);
        let (info, form) = inspect(&forged).expect("forged");
        assert_eq!((form, info.computed_hash), (LineForm::Served, forged_hash));
        assert_ne!(
            inspect_parsed(forged.as_bytes())
                .expect("parses")
                .computed_hash,
            forged_hash
        );
    }
}
