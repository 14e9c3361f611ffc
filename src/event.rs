//! Events: what producers send, what the log stores, and the rules between them
//! (SPEC §1).
//!
//! [`parse_request`] turns an ingest body (JSON object, `{"events":[…]}` or NDJSON) into
//! [`NewEvent`]s, or into the complete list of problems, each with its event index and
//! field (a valid body takes one pass through [`jcs`]; only a refused one is parsed
//! again, into a `serde_json` tree, to name its problems). A `NewEvent` already holds
//! the canonical (JCS) form of its `data`, so the
//! single writer only concatenates and hashes (see `chain`). The work that costs
//! CPU happens here, in parallel on the request tasks.

use serde::Serialize;
use serde_json::{Map, Value};
use ulid::Ulid;

use crate::ijson::{self, PathSeg};
use crate::{jcs, rfc3339};

/// An event as stored and served. `line` is the JCS form of the whole event (the bytes
/// every API emits), shared rather than copied: events read from the log are views into
/// their decompressed chunk, and cloning one for each subscriber costs a reference
/// count. The other fields are kept beside it so that filters and cursors never parse
/// JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: Ulid,
    pub seq: u64,
    pub event_type: String,
    pub source: Option<String>,
    pub line: bytestring::ByteString,
}

/// A validated event waiting for the writer to give it an id, a seq and a hash (sent as
/// it is to the cluster's sequencer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct NewEvent {
    pub event_type: String,
    /// JCS form of `source` (a JSON string), if present.
    pub source_jcs: Option<String>,
    pub source: Option<String>,
    /// Canonical UTC text; `None` means "use the ingest time".
    pub timestamp: Option<String>,
    /// JCS form of `data`.
    pub data_jcs: String,
    /// The record's hash state after `data` (`chain::data_prefix_hash`), computed on
    /// the request's task; the writer computes it when absent (forwarded events).
    #[serde(skip)]
    pub data_prefix: DataPrefix,
}

/// A cached hash state: not part of the event's value (equal always, never sent).
#[derive(Clone, Default)]
pub struct DataPrefix(pub Option<sha2::Sha256>);

impl DataPrefix {
    pub fn of(data_jcs: &str) -> DataPrefix {
        DataPrefix(Some(crate::chain::data_prefix_hash(data_jcs)))
    }
}

impl PartialEq for DataPrefix {
    fn eq(&self, _: &DataPrefix) -> bool {
        true
    }
}

impl Eq for DataPrefix {}

impl std::fmt::Debug for DataPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataPrefix")
    }
}

/// One problem in a request: an invalid event member, a malformed parameter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Problem {
    /// 0-based position of the event in the request; absent for request-level problems.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub index: Option<usize>,
    /// The member or parameter at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub field: Option<String>,
    pub message: String,
}

impl Problem {
    fn at(index: usize, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            index: Some(index),
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

/// Why an ingest body was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestError {
    /// Not JSON: one message naming line and column.
    Syntax(String),
    /// Well-formed, but events (or the envelope) break the rules.
    Invalid(Vec<Problem>),
    /// More events than one request may hold.
    TooMany { count: usize, max: usize },
}

/// Body formats accepted by `POST /v1/events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Json,
    Ndjson,
}

const RESERVED_TYPES: [&str; 3] = ["connected", "open", "error"];
const MAX_TYPE_LEN: usize = 128;
const MAX_SOURCE_CHARS: usize = 256;

/// Checks an event type against `^[A-Za-z0-9._:/-]{1,128}$` and the reserved names.
pub fn check_type(t: &str) -> Result<(), String> {
    if t.is_empty() || t.len() > MAX_TYPE_LEN {
        return Err(format!("must be 1–{MAX_TYPE_LEN} characters"));
    }
    if !t
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'))
    {
        return Err("may contain only A–Z, a–z, 0–9 and . _ : / -".into());
    }
    if RESERVED_TYPES.contains(&t) {
        return Err(format!("\"{t}\" is reserved for stream control frames"));
    }
    Ok(())
}

/// Parses a whole ingest body. `max_events` is the per-request limit.
///
/// A valid body takes one pass ([`jcs::Reader`]: validation and canonical form at
/// once). Anything that pass refuses is parsed again by the reference path (a
/// `serde_json` tree, [`ijson`] and [`validate_event`]), which lists every problem with
/// its position: one definition of each message, and no cost on valid input.
pub fn parse_request(
    body: &[u8],
    format: BodyFormat,
    max_events: usize,
) -> Result<Vec<NewEvent>, RequestError> {
    if let Some(events) = parse_valid(body, format, max_events) {
        return Ok(events);
    }
    parse_request_reference(body, format, max_events)
}

/// The reference path alone: what [`parse_request`] answers for any body its one-pass
/// parser refuses (public for the differential fuzz target).
pub fn parse_request_reference(
    body: &[u8],
    format: BodyFormat,
    max_events: usize,
) -> Result<Vec<NewEvent>, RequestError> {
    match format {
        BodyFormat::Json => parse_json_body(body, max_events),
        BodyFormat::Ndjson => parse_ndjson_body(body, max_events),
    }
}

/// The events of a body with no problem at all, in one pass; `None` if there is any
/// problem (which the reference path then describes).
pub fn parse_valid(body: &[u8], format: BodyFormat, max_events: usize) -> Option<Vec<NewEvent>> {
    let text = std::str::from_utf8(body).ok()?;
    let mut events = Vec::new();
    let mut data = String::new();
    match format {
        BodyFormat::Json => {
            let mut reader = jcs::Reader::new(text);
            reader.begin_object().ok()?;
            let first = reader.next_member(true).ok()??;
            if first == "events" {
                reader.begin_array().ok()?;
                let mut first = true;
                while reader.next_element(first).ok()? {
                    first = false;
                    if events.len() == max_events {
                        return None;
                    }
                    reader.begin_object().ok()?;
                    events.push(valid_event(&mut reader, None, &mut data)?);
                }
                // Nothing may stand beside "events".
                if reader.next_member(false).ok()?.is_some() {
                    return None;
                }
            } else {
                events.push(valid_event(&mut reader, Some(first), &mut data)?);
            }
            reader.finish().ok()?;
        }
        BodyFormat::Ndjson => {
            let mut reader = jcs::Reader::new("");
            for line in text.split('\n') {
                let line = line.strip_suffix('\r').unwrap_or(line);
                if line.bytes().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                if events.len() == max_events {
                    return None;
                }
                reader.reset(line);
                reader.begin_object().ok()?;
                events.push(valid_event(&mut reader, None, &mut data)?);
                reader.finish().ok()?;
            }
        }
    }
    (!events.is_empty()).then_some(events)
}

/// The members of one event object (its `{` read, and `first` its first member's name
/// if that was read too), if they are all valid. `data` is a reused buffer.
fn valid_event<'a>(
    reader: &mut jcs::Reader<'a>,
    first: Option<std::borrow::Cow<'a, str>>,
    data: &mut String,
) -> Option<NewEvent> {
    let mut event_type = None;
    let (mut timestamp, mut source) = (None, None);
    let (mut seen_timestamp, mut seen_source, mut seen_data) = (false, false, false);
    data.clear();
    let mut next = match first {
        Some(name) => Some(name),
        None => reader.next_member(true).ok()?,
    };
    while let Some(name) = next {
        match &*name {
            "type" if event_type.is_none() => {
                let t = reader.string_or_null().ok()??;
                check_type(&t).ok()?;
                event_type = Some(t.into_owned());
            }
            "timestamp" if !seen_timestamp => {
                seen_timestamp = true;
                if let Some(t) = reader.string_or_null().ok()? {
                    timestamp = Some(rfc3339::parse(&t).ok()?.text);
                }
            }
            "source" if !seen_source => {
                seen_source = true;
                if let Some(s) = reader.string_or_null().ok()? {
                    check_source(&s).ok()?;
                    source = Some(s.into_owned());
                }
            }
            "data" if !seen_data => {
                seen_data = true;
                reader.value(data).ok()?;
            }
            // Unknown or repeated.
            _ => return None,
        }
        next = reader.next_member(false).ok()?;
    }
    let source_jcs = source.as_deref().map(|s| {
        let mut jcs = String::with_capacity(s.len() + 2);
        jcs::write_string(&mut jcs, s);
        jcs
    });
    let data_jcs = if seen_data {
        data.as_str().to_owned()
    } else {
        "{}".to_owned()
    };
    Some(NewEvent {
        event_type: event_type?,
        source_jcs,
        source,
        timestamp,
        data_prefix: DataPrefix::of(&data_jcs),
        data_jcs,
    })
}

fn parse_json_body(body: &[u8], max_events: usize) -> Result<Vec<NewEvent>, RequestError> {
    let parsed = ijson::parse(body).map_err(|e| RequestError::Syntax(e.to_string()))?;
    let violations: Vec<Problem> = parsed
        .violations
        .into_iter()
        .map(envelope_violation)
        .collect();
    let Value::Object(mut object) = parsed.value else {
        return Err(RequestError::Invalid(vec![Problem {
            index: None,
            field: None,
            message: "body must be an event object or {\"events\": [...]}".into(),
        }]));
    };
    let items = match object.remove("events") {
        None => vec![Value::Object(object)],
        Some(Value::Array(items)) => {
            if let Some(extra) = object.keys().next() {
                return Err(RequestError::Invalid(vec![Problem {
                    index: None,
                    field: Some(extra.clone()),
                    message: "unknown member beside \"events\"".into(),
                }]));
            }
            items
        }
        Some(_) => {
            return Err(RequestError::Invalid(vec![Problem {
                index: None,
                field: Some("events".into()),
                message: "must be an array of event objects".into(),
            }]));
        }
    };
    if items.len() > max_events {
        return Err(RequestError::TooMany {
            count: items.len(),
            max: max_events,
        });
    }
    validate_all(items, violations)
}

/// Maps a violation found while parsing the whole body (path `events[i].data.x` or
/// `data.x` for a single object) to a problem with an index and a field.
fn envelope_violation(v: ijson::Violation) -> Problem {
    let (index, rest) = match v.path.as_slice() {
        [PathSeg::Key(k), PathSeg::Index(i), rest @ ..] if k == "events" => (Some(*i), rest),
        rest => (Some(0), rest),
    };
    Problem {
        index,
        field: Some(ijson::render_path(rest)).filter(|f| !f.is_empty()),
        message: v.message,
    }
}

fn parse_ndjson_body(body: &[u8], max_events: usize) -> Result<Vec<NewEvent>, RequestError> {
    let lines: Vec<(usize, &[u8])> = body
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| (i + 1, line.strip_suffix(b"\r").unwrap_or(line)))
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .collect();
    if lines.len() > max_events {
        return Err(RequestError::TooMany {
            count: lines.len(),
            max: max_events,
        });
    }
    // Each line is its own document, so a syntax error on one line does not hide the
    // problems of the others: all are listed.
    let mut events = Vec::with_capacity(lines.len());
    let mut problems = Vec::new();
    for (index, (line_no, line)) in lines.into_iter().enumerate() {
        let problem = |field: Option<String>, message: String| Problem {
            index: Some(index),
            field,
            message: format!("line {line_no}: {message}"),
        };
        let parsed = match ijson::parse(line) {
            Ok(parsed) => parsed,
            Err(e) => {
                problems.push(problem(
                    None,
                    format!("invalid JSON at column {}: {}", e.column, e.message),
                ));
                continue;
            }
        };
        problems.extend(parsed.violations.into_iter().map(|v| {
            problem(
                Some(ijson::render_path(&v.path)).filter(|f| !f.is_empty()),
                v.message,
            )
        }));
        match validate_event(index, parsed.value) {
            Ok(event) => events.push(event),
            Err(found) => problems.extend(found.into_iter().map(|p| problem(p.field, p.message))),
        }
    }
    finish(events, problems)
}

/// Validates every event; `problems` already holds what parsing found.
fn validate_all(
    items: Vec<Value>,
    mut problems: Vec<Problem>,
) -> Result<Vec<NewEvent>, RequestError> {
    let mut events = Vec::with_capacity(items.len());
    for (index, value) in items.into_iter().enumerate() {
        match validate_event(index, value) {
            Ok(e) => events.push(e),
            Err(p) => problems.extend(p),
        }
    }
    finish(events, problems)
}

fn finish(
    events: Vec<NewEvent>,
    mut problems: Vec<Problem>,
) -> Result<Vec<NewEvent>, RequestError> {
    if !problems.is_empty() {
        problems.sort_by_key(|p| p.index);
        Err(RequestError::Invalid(problems))
    } else if events.is_empty() {
        Err(RequestError::Invalid(vec![Problem {
            index: None,
            field: None,
            message: "the request holds no event".into(),
        }]))
    } else {
        Ok(events)
    }
}

/// Validates one event object; returns every problem it has.
pub fn validate_event(index: usize, value: Value) -> Result<NewEvent, Vec<Problem>> {
    let Value::Object(mut object) = value else {
        return Err(vec![Problem {
            index: Some(index),
            field: None,
            message: "an event must be a JSON object".into(),
        }]);
    };
    let mut problems = Vec::new();

    let event_type = match object.remove("type") {
        Some(Value::String(t)) => match check_type(&t) {
            Ok(()) => Some(t),
            Err(m) => {
                problems.push(Problem::at(index, "type", m));
                None
            }
        },
        None | Some(Value::Null) => {
            problems.push(Problem::at(index, "type", "required"));
            None
        }
        Some(_) => {
            problems.push(Problem::at(index, "type", "must be a string"));
            None
        }
    };

    let timestamp = match object.remove("timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => match rfc3339::parse(&t) {
            Ok(ts) => Some(ts.text),
            Err(m) => {
                problems.push(Problem::at(index, "timestamp", m));
                None
            }
        },
        Some(_) => {
            problems.push(Problem::at(
                index,
                "timestamp",
                "must be an RFC 3339 string",
            ));
            None
        }
    };

    let source = match object.remove("source") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match check_source(&s) {
            Ok(()) => Some(s),
            Err(m) => {
                problems.push(Problem::at(index, "source", m));
                None
            }
        },
        Some(_) => {
            problems.push(Problem::at(index, "source", "must be a string"));
            None
        }
    };

    let data = object
        .remove("data")
        .unwrap_or_else(|| Value::Object(Map::new()));

    for unknown in object.keys() {
        problems.push(Problem::at(
            index,
            unknown.clone(),
            "unknown member (allowed: type, timestamp, source, data)",
        ));
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    let (Some(event_type), data_jcs) = (event_type, jcs(&data)) else {
        return Err(vec![Problem::at(index, "type", "required")]);
    };
    let source_jcs = source.as_ref().map(|s| jcs(&Value::String(s.clone())));
    Ok(NewEvent {
        event_type,
        source_jcs,
        source,
        timestamp,
        data_prefix: DataPrefix::of(&data_jcs),
        data_jcs,
    })
}

pub fn check_source(s: &str) -> Result<(), String> {
    let chars = s.chars().count();
    if chars == 0 || chars > MAX_SOURCE_CHARS {
        return Err(format!("must be 1–{MAX_SOURCE_CHARS} characters"));
    }
    if s.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// RFC 8785 canonical form of a parsed (already I-JSON-checked) value.
///
/// The `canon-json` crate is the definition. For the common case it is also what
/// serde_json writes on its own: serde_json's maps are sorted by UTF-8 bytes, which is
/// the UTF-16 order JCS wants unless a key holds a character ≥ U+E000, and integers and
/// string escapes print identically; only non-integer numbers differ. Such values take
/// serde_json's path, ~8× faster; tests compare both paths on generated values.
pub fn jcs(value: &Value) -> String {
    let mut out = Vec::with_capacity(256);
    let written = if serde_json_writes_jcs(value) {
        serde_json::to_writer(&mut out, value).is_ok()
    } else {
        let mut ser =
            serde_json::Serializer::with_formatter(&mut out, canon_json::CanonicalFormatter::new());
        value.serialize(&mut ser).is_ok()
    };
    // Serializing a Value into memory cannot fail: keys are strings and numbers finite.
    if !written {
        out.clear();
        out.extend_from_slice(b"null");
    }
    // Both serializers write UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// True when plain serde_json output equals JCS for `value` (see [`jcs`]).
fn serde_json_writes_jcs(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(_) | Value::String(_) => true,
        Value::Number(n) => n.is_i64() || n.is_u64(),
        Value::Array(items) => items.iter().all(serde_json_writes_jcs),
        Value::Object(map) => map
            .iter()
            .all(|(k, v)| !k.chars().any(|c| c >= '\u{E000}') && serde_json_writes_jcs(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn reference(value: &Value) -> String {
        let mut out = Vec::new();
        let mut ser =
            serde_json::Serializer::with_formatter(&mut out, canon_json::CanonicalFormatter::new());
        value.serialize(&mut ser).expect("serialize");
        String::from_utf8(out).expect("utf-8")
    }

    fn random_string(rng: &mut StdRng) -> String {
        // ASCII, escapes, controls, BMP below and above U+E000, and astral characters:
        // the last two are where UTF-8 and UTF-16 key orders differ.
        const POOL: &[char] = &[
            'a',
            'b',
            'Z',
            '0',
            ' ',
            '"',
            '\\',
            '/',
            '\n',
            '\u{1}',
            '\u{1f}',
            '\u{7f}',
            'é',
            '\u{2028}',
            '\u{d7ff}',
            '\u{e000}',
            '\u{fb01}',
            '\u{ffff}',
            '\u{10000}',
            '😀',
        ];
        (0..rng.random_range(0..6))
            .map(|_| POOL[rng.random_range(0..POOL.len())])
            .collect()
    }

    fn random_value(rng: &mut StdRng, depth: u32) -> Value {
        match rng.random_range(0..if depth > 3 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.random()),
            2 => Value::from(rng.random_range(-(1i64 << 53) + 1..1i64 << 53)),
            3 => Value::from([0.5, -0.0, 1e21, 1e-7, 123.456, 5e-324][rng.random_range(0..6)]),
            4 => Value::String(random_string(rng)),
            5 => Value::Array(
                (0..rng.random_range(0..4))
                    .map(|_| random_value(rng, depth + 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..rng.random_range(0..5))
                    .map(|_| (random_string(rng), random_value(rng, depth + 1)))
                    .collect(),
            ),
        }
    }

    /// The fast path (plain serde_json) must write exactly what the JCS crate writes;
    /// it fails if the U+E000 key check in `serde_json_writes_jcs` is removed.
    #[test]
    fn fast_path_equals_canon_json() {
        let mut rng = StdRng::seed_from_u64(8785);
        let mut fast = 0;
        for _ in 0..20_000 {
            let value = random_value(&mut rng, 0);
            fast += usize::from(serde_json_writes_jcs(&value));
            assert_eq!(jcs(&value), reference(&value), "{value:?}");
        }
        assert!(fast > 5_000, "only {fast} values took the fast path");
    }

    /// The one-pass path accepts exactly the bodies the reference path accepts, with the
    /// same events; a refused body gets the reference path's answer.
    #[test]
    fn one_pass_agrees_with_the_reference_path() {
        let ok = r#"{"type":"a","data":{"b":1,"a":[1.0,"\u00e9"]},"source":"s\"\u00e9","timestamp":"2026-03-19T10:00:00+01:00"}"#;
        let cases: &[(&str, BodyFormat)] = &[
            (ok, BodyFormat::Json),
            (
                r#"{"events":[{"type":"a"},{"type":"b","data":null,"source":null,"timestamp":null}]}"#,
                BodyFormat::Json,
            ),
            (r#"{"typ\u0065":"a"}"#, BodyFormat::Json),
            (
                "{\"type\":\"a\"}\r\n\n  \n{\"type\":\"b\",\"data\":[]}\n",
                BodyFormat::Ndjson,
            ),
            (ok, BodyFormat::Ndjson),
            // Each is refused by both paths.
            (r#"{"events":[]}"#, BodyFormat::Json),
            (r#"{}"#, BodyFormat::Json),
            (r#"[]"#, BodyFormat::Json),
            (r#"{"events":[{"type":"a"}],"x":1}"#, BodyFormat::Json),
            (r#"{"type":"a","events":[]}"#, BodyFormat::Json),
            (r#"{"events":{}}"#, BodyFormat::Json),
            (r#"{"events":[1]}"#, BodyFormat::Json),
            (r#"{"type":"a","type":"a"}"#, BodyFormat::Json),
            (r#"{"type":"a","data":1,"data":1}"#, BodyFormat::Json),
            (
                r#"{"type":"a","timestamp":null,"timestamp":null}"#,
                BodyFormat::Json,
            ),
            (r#"{"type":null}"#, BodyFormat::Json),
            (r#"{"type":"open"}"#, BodyFormat::Json),
            (r#"{"type":"a","source":""}"#, BodyFormat::Json),
            (r#"{"type":"a","timestamp":"yesterday"}"#, BodyFormat::Json),
            (r#"{"type":"a","extra":1}"#, BodyFormat::Json),
            (r#"{"type":"a","data":{"x":1e20}}"#, BodyFormat::Json),
            (r#"{"type":"a"} x"#, BodyFormat::Json),
            ("{\"type\":\"a\"}\n{\"type\":\"b\"", BodyFormat::Ndjson),
            (
                "{\"type\":\"a\"}\n{\"type\":\"a\"}\n{\"type\":\"a\"}",
                BodyFormat::Ndjson,
            ),
            ("\n \n", BodyFormat::Ndjson),
        ];
        for &(body, format) in cases {
            let reference = parse_request_reference(body.as_bytes(), format, 2);
            let one_pass = parse_valid(body.as_bytes(), format, 2);
            assert_eq!(one_pass, reference.as_ref().ok().cloned(), "{body}");
            assert_eq!(
                parse_request(body.as_bytes(), format, 2),
                reference,
                "{body}"
            );
        }
    }
}
