//! Strict JSON input: RFC 8259 syntax plus the I-JSON rules (RFC 7493) that
//! canonical hashing depends on.
//!
//! serde_json alone is too lenient for an audit log: it silently keeps the last of
//! two duplicate keys, and it accepts integers that JavaScript (and so JCS, RFC 8785)
//! cannot represent exactly. Two producers could then send "the same" event and get
//! different hashes. This module parses into an ordinary [`serde_json::Value`] through
//! a custom visitor that records every violation with the path of the offending member,
//! and keeps going so that one request reports all of its problems at once.
//!
//! Syntax errors, invalid UTF-8 and lone surrogates are still hard errors from
//! serde_json (they carry line and column). Nesting deeper than serde_json's recursion
//! limit (128) is rejected the same way, so hostile depth cannot exhaust the stack.

use std::cell::{Cell, RefCell};
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Largest integer every JSON implementation represents exactly: 2^53 − 1.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// One I-JSON rule broken at `path` (e.g. `events[2].data.user.id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub path: Vec<PathSeg>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// Renders a path the way a JavaScript user would write it: `data.items[3].name`.
pub fn render_path(path: &[PathSeg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            PathSeg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            PathSeg::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    out
}

/// One parsed JSON document and the I-JSON rules it breaks (every one is listed; for
/// a duplicate member the value keeps the first occurrence).
#[derive(Debug)]
pub struct Parsed {
    pub value: Value,
    pub violations: Vec<Violation>,
}

/// A syntax-level error: not JSON at all.
#[derive(Debug, thiserror::Error)]
#[error("invalid JSON at line {line}, column {column}: {message}")]
pub struct SyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parses `input` as one I-JSON document.
pub fn parse(input: &[u8]) -> Result<Parsed, SyntaxError> {
    let state = State::default();
    let mut de = serde_json::Deserializer::from_slice(input);
    let root = Path::Root;
    let value = ValueSeed {
        state: &state,
        path: &root,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v))
    .map_err(|e| syntax_error(input, &e))?;

    let mut violations = state.violations.into_inner();
    let ambiguous = state.ambiguous.into_inner();
    if !ambiguous.is_empty() {
        violations.extend(integer_literals_among(input, ambiguous));
    }
    Ok(Parsed { value, violations })
}

/// A serde_json error on `input`, placed on the byte that caused it (see [`error_position`]).
pub fn syntax_error(input: &[u8], e: &serde_json::Error) -> SyntaxError {
    let (line, column) = error_position(input, e);
    SyntaxError {
        line,
        column,
        message: strip_position(&e.to_string()),
    }
}

/// 1-based line and column (counted in bytes) of the byte that made `input` invalid.
///
/// serde_json reports where it stands after reading that byte; when the byte is a newline
/// (`tru` at the end of a line), that is column 0 of the *next* line. Here a newline is
/// placed at the end of the line it ends (column = line length + 1); a trailing comma,
/// noticed only at the `}` or `]` after it, at the comma; and an input that ends too early
/// right after its last non-whitespace byte, where something is missing. Runs only on
/// errors.
fn error_position(input: &[u8], e: &serde_json::Error) -> (usize, usize) {
    let offset = if e.classify() == serde_json::error::Category::Eof {
        last_non_whitespace(input).map_or(0, |last| last + 1)
    } else {
        let line_start = match e.line() {
            0 | 1 => 0,
            line => match memchr::memchr_iter(b'\n', input).nth(line - 2) {
                Some(newline) => newline + 1,
                None => return (e.line(), e.column()),
            },
        };
        // Column 0 (nothing read on this line) steps back onto the newline before it.
        let offset = (line_start + e.column()).saturating_sub(1);
        match (input.get(offset), last_non_whitespace(&input[..offset])) {
            (Some(b'}' | b']'), Some(before)) if input[before] == b',' => before,
            _ => offset,
        }
    };
    line_and_column(input, offset)
}

/// Offset of the last byte of `input` that is not JSON whitespace.
fn last_non_whitespace(input: &[u8]) -> Option<usize> {
    input
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// 1-based line and byte column of `offset` in `input` (`input.len()` is the end).
fn line_and_column(input: &[u8], offset: usize) -> (usize, usize) {
    let before = &input[..offset.min(input.len())];
    let line_start = memchr::memrchr(b'\n', before).map_or(0, |newline| newline + 1);
    (
        1 + memchr::memchr_iter(b'\n', before).count(),
        before.len() - line_start + 1,
    )
}

/// serde_json appends " at line L column C"; we report those separately.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(pos) => message[..pos].to_string(),
        None => message.to_string(),
    }
}

#[derive(Default)]
struct State {
    violations: RefCell<Vec<Violation>>,
    /// Count of numbers seen so far, in document order.
    numbers: Cell<usize>,
    /// Integral floats of magnitude ≥ 1e21: fine when written with an exponent or a
    /// fraction (`1e21`), a violation when written as an integer literal. serde_json
    /// does not say which, so the raw text is checked afterwards (rare path).
    ambiguous: RefCell<Vec<(usize, Vec<PathSeg>)>>,
}

impl State {
    fn violate(&self, path: &Path<'_>, message: String) {
        self.violations.borrow_mut().push(Violation {
            path: path.to_vec(),
            message,
        });
    }
}

/// The path to the value being parsed, as a stack-allocated linked list: nothing is
/// allocated unless a violation needs it.
enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl Path<'_> {
    fn to_vec(&self) -> Vec<PathSeg> {
        let mut segs = Vec::new();
        let mut cur = self;
        loop {
            match cur {
                Path::Root => break,
                Path::Key(parent, k) => {
                    segs.push(PathSeg::Key((*k).to_string()));
                    cur = parent;
                }
                Path::Index(parent, i) => {
                    segs.push(PathSeg::Index(*i));
                    cur = parent;
                }
            }
        }
        segs.reverse();
        segs
    }
}

struct ValueSeed<'s, 'p> {
    state: &'s State,
    path: &'p Path<'p>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

fn out_of_range(n: impl fmt::Display) -> String {
    format!(
        "number {n} is outside ±(2^53−1) and cannot be represented exactly; send it as a string"
    )
}

impl<'de> Visitor<'de> for ValueSeed<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        self.state.numbers.set(self.state.numbers.get() + 1);
        if v > MAX_SAFE_INTEGER {
            self.state.violate(self.path, out_of_range(v));
        }
        Ok(Value::Number(v.into()))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        self.state.numbers.set(self.state.numbers.get() + 1);
        if v.unsigned_abs() > MAX_SAFE_INTEGER {
            self.state.violate(self.path, out_of_range(v));
        }
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        let ordinal = self.state.numbers.get();
        self.state.numbers.set(ordinal + 1);
        if v.fract() == 0.0 && v.abs() > MAX_SAFE_INTEGER as f64 {
            if v.abs() < 1e21 {
                // JCS would write this as an integer literal beyond the safe range.
                self.state.violate(self.path, out_of_range(v));
            } else {
                self.state
                    .ambiguous
                    .borrow_mut()
                    .push((ordinal, self.path.to_vec()));
            }
        }
        // serde_json rejects non-finite numbers before we get here.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        loop {
            let path = Path::Index(self.path, items.len());
            let seed = ValueSeed {
                state: self.state,
                path: &path,
            };
            match seq.next_element_seed(seed)? {
                Some(v) => items.push(v),
                None => break,
            }
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<std::borrow::Cow<'de, str>>()? {
            let path = Path::Key(self.path, &key);
            let value = access.next_value_seed(ValueSeed {
                state: self.state,
                path: &path,
            })?;
            match map.entry(key.as_ref()) {
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(value);
                }
                serde_json::map::Entry::Occupied(_) => {
                    self.state
                        .violate(&path, format!("duplicate member \"{key}\""));
                }
            }
        }
        Ok(Value::Object(map))
    }
}

/// For each ambiguous number (by its ordinal among all numbers in the document),
/// reports a violation if its literal text has no fraction and no exponent.
fn integer_literals_among(input: &[u8], ambiguous: Vec<(usize, Vec<PathSeg>)>) -> Vec<Violation> {
    let literals = number_literals(input);
    ambiguous
        .into_iter()
        .filter_map(|(ordinal, path)| {
            let literal = literals.get(ordinal)?;
            let is_integer_literal = !literal.iter().any(|b| matches!(b, b'.' | b'e' | b'E'));
            is_integer_literal.then(|| Violation {
                path,
                message: out_of_range(String::from_utf8_lossy(literal)),
            })
        })
        .collect()
}

/// Number tokens of a syntactically valid JSON text, in document order. Outside
/// strings, only numbers start with `-` or a digit.
fn number_literals(input: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'"' => {
                i += 1;
                while i < input.len() && input[i] != b'"' {
                    i += if input[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < input.len()
                    && matches!(input[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                out.push(&input[start..i]);
            }
            _ => i += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn violations(s: &str) -> Vec<String> {
        parse(s.as_bytes())
            .expect("syntax ok")
            .violations
            .iter()
            .map(|v| format!("{}: {}", render_path(&v.path), v.message))
            .collect()
    }

    #[test]
    fn duplicate_keys_at_any_depth_are_named() {
        let v = violations(r#"{"a":1,"b":{"c":[{"d":1,"d":2}]},"a":3}"#);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].starts_with("b.c[0].d: duplicate"), "{v:?}");
        assert!(v[1].starts_with("a: duplicate"), "{v:?}");
    }

    #[test]
    fn integers_beyond_safe_range_are_rejected() {
        assert!(violations("9007199254740991").is_empty());
        assert!(violations("-9007199254740991").is_empty());
        assert_eq!(violations("9007199254740992").len(), 1);
        assert_eq!(violations("-9007199254740993").len(), 1);
        assert_eq!(violations(r#"{"x":1e20}"#).len(), 1);
        assert!(violations("1e21").is_empty());
        assert!(violations("1.5e300").is_empty());
        assert!(violations("12.5").is_empty());
        // A 22-digit integer literal becomes a float ≥ 1e21: still an integer literal.
        let v = violations(r#"{"s":"1e99 -5","n":[1e22, 1000000000000000000000000]}"#);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].starts_with("n[1]:"), "{v:?}");
    }

    #[test]
    fn syntax_errors_carry_position() {
        let e = parse(b"{\n  \"a\": tru }").unwrap_err();
        assert_eq!((e.line, e.column), (2, 11), "the space after tru");
        assert!(parse(br#""\ud800""#).is_err(), "lone surrogate");
        assert!(parse(b"\"\xff\"").is_err(), "invalid UTF-8");
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(parse(deep.as_bytes()).is_err(), "nesting limit");
    }

    /// The position names the byte that is wrong, on the line that holds it.
    #[test]
    fn syntax_error_positions_name_the_offending_byte() {
        let at = |input: &str| {
            let e = parse(input.as_bytes()).unwrap_err();
            (e.line, e.column)
        };
        // serde_json says line 3, column 0: it had read the newline after `tru`. Columns
        // count bytes.
        assert_eq!(at("{\n  \"a\": tru\n}"), (2, 11));
        assert_eq!(at("{\n  \"a\": tru\r\n}"), (2, 11), "CRLF");
        assert_eq!(at("{\"a\":1,\n}"), (1, 7), "the trailing comma");
        assert_eq!(at("[1,\n\n ]"), (1, 3), "the trailing comma");
        assert_eq!(
            at("{\"a\":1\n\"b\":2}"),
            (2, 1),
            "where the comma is missing"
        );
        assert_eq!(at("{\"a\":\"x\n\"}"), (1, 8), "a newline inside a string");
        assert_eq!(at("{\"a\":\"\\q\"}"), (1, 8), "the escaped character");
        assert_eq!(at("{\"a\":\"x\",\n\"é\":1"), (2, 7), "after the last byte");
        assert_eq!(at("{\"a\":1\n\n  \n"), (1, 7), "trailing blank lines");
        assert_eq!(at(""), (1, 1));
        assert_eq!(at("{\"a\":1} x"), (1, 9), "trailing characters");
    }
}
