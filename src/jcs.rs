//! Strict JSON straight to its RFC 8785 (JCS) form, in one pass over borrowed input.
//!
//! The ingest hot path. [`Reader`] walks the text once and writes the canonical form as
//! it goes: strings without escapes are copied as they are, numbers that are already
//! canonical (safe integers) too, and an object's members, written one after another,
//! are put in JCS order (UTF-16 code units of their names) when the object ends, which
//! is also where duplicate names show up (as neighbours). Nothing is allocated per
//! value; the buffers are reused.
//!
//! It only *decides*: any input that is not JSON, breaks an I-JSON rule (duplicate
//! member, integer beyond ±(2^53−1), lone surrogate) or nests 128 deep is
//! [`Rejected`] without a reason. Explaining a rejection is the reference path's job
//! ([`crate::ijson`] + [`crate::event::validate_event`]), which lists every problem with
//! its path and position; running it only on bad input keeps one definition of every
//! message. The two paths must agree on every input: `fuzz/fuzz_targets/jcs_differential.rs`
//! compares the decision and the bytes against serde_json + `canon-json`.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt::Write as _;

use crate::ijson::MAX_SAFE_INTEGER;

/// The input is not strict I-JSON; the reference path says why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected;

pub type Result<T> = std::result::Result<T, Rejected>;

/// serde_json's recursion limit: a document that opens this many arrays or objects
/// inside each other is refused (127 is the deepest accepted).
const MAX_DEPTH: u32 = 128;

/// The canonical form of one whole JSON document, or `Rejected`.
pub fn canonicalize(input: &str) -> Result<String> {
    let mut reader = Reader::new(input);
    let mut out = String::with_capacity(input.len());
    reader.value(&mut out)?;
    reader.finish()?;
    Ok(out)
}

/// A member name: a slice of the input (no escapes) or of `Reader::keys` (decoded).
#[derive(Clone, Copy)]
enum Name {
    Input(usize, usize),
    Decoded(usize, usize),
}

/// One member of an open object: its name, and where `"name":value` sits in the output.
#[derive(Clone, Copy)]
struct Member {
    name: Name,
    start: usize,
    end: usize,
}

/// A cursor over one JSON text. Callers that interpret the outer levels themselves (an
/// ingest envelope) use [`Reader::begin_object`], [`Reader::next_member`] and friends,
/// and [`Reader::value`] for the parts they keep as canonical text.
pub struct Reader<'a> {
    text: &'a str,
    pos: usize,
    depth: u32,
    /// Members of every open object, innermost last.
    members: Vec<Member>,
    /// Decoded names that had escapes, innermost last.
    keys: String,
    /// Where an object's members are moved while they are put in order.
    scratch: String,
    /// Decoded text of a string value with escapes.
    unescaped: String,
}

impl<'a> Reader<'a> {
    pub fn new(text: &'a str) -> Self {
        Reader {
            text,
            pos: 0,
            depth: 0,
            members: Vec::new(),
            keys: String::new(),
            scratch: String::new(),
            unescaped: String::new(),
        }
    }

    /// Starts over on `text`, keeping the buffers.
    pub fn reset(&mut self, text: &'a str) {
        self.text = text;
        self.pos = 0;
        self.depth = 0;
        self.members.clear();
        self.keys.clear();
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes().get(self.pos) {
            self.pos += 1;
        }
    }

    /// The next byte after whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        self.skip_whitespace();
        self.bytes().get(self.pos).copied()
    }

    fn expect(&mut self, byte: u8) -> Result<()> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(Rejected)
        }
    }

    fn enter(&mut self) -> Result<()> {
        self.depth += 1;
        if self.depth >= MAX_DEPTH {
            return Err(Rejected);
        }
        Ok(())
    }

    /// Only whitespace is left.
    pub fn finish(&mut self) -> Result<()> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(Rejected),
        }
    }

    /// Consumes `{`.
    pub fn begin_object(&mut self) -> Result<()> {
        self.expect(b'{')?;
        self.enter()
    }

    /// The next member's name (the reader then stands at its value), or `None` at the
    /// closing `}` (consumed). `first` is true for the call right after `begin_object`.
    pub fn next_member(&mut self, first: bool) -> Result<Option<Cow<'a, str>>> {
        match self.peek() {
            Some(b'}') => {
                self.pos += 1;
                self.depth -= 1;
                return Ok(None);
            }
            Some(b',') if !first => self.pos += 1,
            _ if first => {}
            _ => return Err(Rejected),
        }
        self.expect(b'"')?;
        let name = self.string_contents()?;
        self.expect(b':')?;
        Ok(Some(name))
    }

    /// Consumes `[`.
    pub fn begin_array(&mut self) -> Result<()> {
        self.expect(b'[')?;
        self.enter()
    }

    /// True if another element follows (the reader then stands at it); false at the
    /// closing `]` (consumed).
    pub fn next_element(&mut self, first: bool) -> Result<bool> {
        match self.peek() {
            Some(b']') => {
                self.pos += 1;
                self.depth -= 1;
                Ok(false)
            }
            Some(b',') if !first => {
                self.pos += 1;
                Ok(true)
            }
            Some(_) if first => Ok(true),
            _ => Err(Rejected),
        }
    }

    /// A string value, decoded; or `None` for `null`. Anything else is rejected.
    pub fn string_or_null(&mut self) -> Result<Option<Cow<'a, str>>> {
        match self.peek() {
            Some(b'"') => {
                self.pos += 1;
                self.string_contents().map(Some)
            }
            Some(b'n') => self.literal("null").map(|()| None),
            _ => Err(Rejected),
        }
    }

    fn literal(&mut self, word: &str) -> Result<()> {
        if self.bytes()[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(Rejected)
        }
    }

    /// Appends the canonical form of the next value to `out`.
    pub fn value(&mut self, out: &mut String) -> Result<()> {
        match self.peek().ok_or(Rejected)? {
            b'{' => self.object(out),
            b'[' => self.array(out),
            b'"' => {
                self.pos += 1;
                self.string_value(out)
            }
            b't' => self.literal("true").map(|()| out.push_str("true")),
            b'f' => self.literal("false").map(|()| out.push_str("false")),
            b'n' => self.literal("null").map(|()| out.push_str("null")),
            b'-' | b'0'..=b'9' => self.number(out),
            _ => Err(Rejected),
        }
    }

    fn array(&mut self, out: &mut String) -> Result<()> {
        self.begin_array()?;
        out.push('[');
        let mut first = true;
        while self.next_element(first)? {
            if !first {
                out.push(',');
            }
            first = false;
            self.value(out)?;
        }
        out.push(']');
        Ok(())
    }

    fn object(&mut self, out: &mut String) -> Result<()> {
        self.begin_object()?;
        out.push('{');
        let base = self.members.len();
        let keys_base = self.keys.len();
        let mut first = true;
        loop {
            match self.peek() {
                Some(b'}') => {
                    self.pos += 1;
                    self.depth -= 1;
                    break;
                }
                Some(b',') if !first => {
                    self.pos += 1;
                    out.push(',');
                }
                _ if first => {}
                _ => return Err(Rejected),
            }
            first = false;
            self.expect(b'"')?;
            let start = out.len();
            let name = self.member_name(out)?;
            self.expect(b':')?;
            out.push(':');
            self.value(out)?;
            self.members.push(Member {
                name,
                start,
                end: out.len(),
            });
        }
        self.put_in_order(out, base)?;
        out.push('}');
        self.members.truncate(base);
        self.keys.truncate(keys_base);
        Ok(())
    }

    /// Puts the members from `base` on (written to the end of `out`, comma-separated) in
    /// JCS order; a name that occurs twice rejects the document.
    fn put_in_order(&mut self, out: &mut String, base: usize) -> Result<()> {
        let (text, keys) = (self.text, &self.keys);
        let name = |n: Name| -> &[u8] {
            match n {
                Name::Input(a, b) => &text.as_bytes()[a..b],
                Name::Decoded(a, b) => &keys.as_bytes()[a..b],
            }
        };
        let members = &mut self.members[base..];
        let Some(first) = members.first().map(|m| m.start) else {
            return Ok(());
        };
        let mut sorted = true;
        for pair in members.windows(2) {
            match jcs_order(name(pair[0].name), name(pair[1].name)) {
                Ordering::Less => {}
                Ordering::Equal => return Err(Rejected),
                Ordering::Greater => sorted = false,
            }
        }
        if sorted {
            return Ok(());
        }
        members.sort_unstable_by(|a, b| jcs_order(name(a.name), name(b.name)));
        if members
            .windows(2)
            .any(|pair| name(pair[0].name) == name(pair[1].name))
        {
            return Err(Rejected);
        }
        self.scratch.clear();
        self.scratch.push_str(&out[first..]);
        out.truncate(first);
        for (i, m) in members.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&self.scratch[m.start - first..m.end - first]);
        }
        Ok(())
    }

    /// Reads a member name (after its `"`), writes it to `out` in canonical form and
    /// returns where its decoded text is.
    fn member_name(&mut self, out: &mut String) -> Result<Name> {
        let start = self.pos;
        let escaped = self.scan_string()?;
        let raw = &self.text[start..self.pos - 1];
        if !escaped {
            out.push('"');
            out.push_str(raw);
            out.push('"');
            return Ok(Name::Input(start, self.pos - 1));
        }
        let from = self.keys.len();
        unescape(raw, &mut self.keys);
        write_string(out, &self.keys[from..]);
        Ok(Name::Decoded(from, self.keys.len()))
    }

    /// A string value (after its `"`), written in canonical form.
    fn string_value(&mut self, out: &mut String) -> Result<()> {
        let start = self.pos;
        let escaped = self.scan_string()?;
        let raw = &self.text[start..self.pos - 1];
        if escaped {
            self.unescaped.clear();
            unescape(raw, &mut self.unescaped);
            write_string(out, &self.unescaped);
        } else {
            out.push('"');
            out.push_str(raw);
            out.push('"');
        }
        Ok(())
    }

    /// A string's decoded text (after its `"`).
    fn string_contents(&mut self) -> Result<Cow<'a, str>> {
        let start = self.pos;
        let escaped = self.scan_string()?;
        let raw = &self.text[start..self.pos - 1];
        if escaped {
            let mut decoded = String::with_capacity(raw.len());
            unescape(raw, &mut decoded);
            Ok(Cow::Owned(decoded))
        } else {
            Ok(Cow::Borrowed(raw))
        }
    }

    /// Moves past the closing quote of the string whose contents start here, checking
    /// its escapes (surrogates must pair up) and that it holds no control character.
    /// Returns whether it has escapes.
    fn scan_string(&mut self) -> Result<bool> {
        let bytes = self.bytes();
        let mut escaped = false;
        loop {
            let at = self.pos;
            let b = *bytes.get(at).ok_or(Rejected)?;
            match b {
                b'"' => {
                    self.pos += 1;
                    return Ok(escaped);
                }
                b'\\' => {
                    escaped = true;
                    self.pos = at + 2;
                    match bytes.get(at + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {}
                        Some(b'u') => {
                            let unit = hex4(bytes, at + 2)?;
                            self.pos = at + 6;
                            match unit {
                                0xD800..=0xDBFF => {
                                    if bytes.get(self.pos..self.pos + 2) != Some(b"\\u") {
                                        return Err(Rejected);
                                    }
                                    let low = hex4(bytes, self.pos + 2)?;
                                    if !(0xDC00..=0xDFFF).contains(&low) {
                                        return Err(Rejected);
                                    }
                                    self.pos += 6;
                                }
                                0xDC00..=0xDFFF => return Err(Rejected),
                                _ => {}
                            }
                        }
                        _ => return Err(Rejected),
                    }
                }
                0..=0x1F => return Err(Rejected),
                _ => self.pos += 1,
            }
        }
    }

    fn number(&mut self, out: &mut String) -> Result<()> {
        let bytes = self.bytes();
        let start = self.pos;
        let mut i = start;
        if bytes[i] == b'-' {
            i += 1;
        }
        let int_start = i;
        match bytes.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                while let Some(b'0'..=b'9') = bytes.get(i) {
                    i += 1;
                }
            }
            _ => return Err(Rejected),
        }
        let int_digits = i - int_start;
        let mut integer = true;
        if bytes.get(i) == Some(&b'.') {
            integer = false;
            i = one_or_more_digits(bytes, i + 1)?;
        }
        if let Some(b'e' | b'E') = bytes.get(i) {
            integer = false;
            i += 1;
            if let Some(b'+' | b'-') = bytes.get(i) {
                i += 1;
            }
            i = one_or_more_digits(bytes, i)?;
        }
        self.pos = i;
        let literal = &self.text[start..i];
        if integer {
            // Integer literals are canonical as written (JSON has no leading zeros or
            // plus sign), except `-0`; beyond ±(2^53−1) they break I-JSON. 15 digits
            // always fit.
            let safe = int_digits <= 15
                || (int_digits == 16
                    && literal[int_start - start..]
                        .parse::<u64>()
                        .is_ok_and(|n| n <= MAX_SAFE_INTEGER));
            if !safe {
                return Err(Rejected);
            }
            out.push_str(if literal == "-0" { "0" } else { literal });
            return Ok(());
        }
        let value: f64 = literal.parse().map_err(|_| Rejected)?;
        if !value.is_finite() {
            return Err(Rejected);
        }
        // An integral value in (2^53−1, 1e21) would be written by JCS as an integer
        // literal beyond the safe range (from 1e21 on, JCS uses an exponent).
        if value.fract() == 0.0 && value.abs() > MAX_SAFE_INTEGER as f64 && value.abs() < 1e21 {
            return Err(Rejected);
        }
        write_number(out, value);
        Ok(())
    }
}

/// The end of the run of digits starting at `at`, which must not be empty.
fn one_or_more_digits(bytes: &[u8], at: usize) -> Result<usize> {
    let end = at
        + bytes[at.min(bytes.len())..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
    if end == at { Err(Rejected) } else { Ok(end) }
}

/// Four hex digits at `at`.
fn hex4(bytes: &[u8], at: usize) -> Result<u16> {
    let digits = bytes.get(at..at + 4).ok_or(Rejected)?;
    let mut unit = 0u16;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return Err(Rejected),
        };
        unit = unit << 4 | u16::from(v);
    }
    Ok(unit)
}

/// Decodes the contents of a string already checked by `scan_string`.
fn unescape(raw: &str, out: &mut String) {
    let bytes = raw.as_bytes();
    let mut rest = 0;
    let mut i = 0;
    while let Some(offset) = memchr::memchr(b'\\', &bytes[i..]) {
        let at = i + offset;
        out.push_str(&raw[rest..at]);
        let (c, len) = match bytes.get(at + 1) {
            Some(b'b') => ('\u{8}', 2),
            Some(b'f') => ('\u{c}', 2),
            Some(b'n') => ('\n', 2),
            Some(b'r') => ('\r', 2),
            Some(b't') => ('\t', 2),
            Some(b'u') => {
                let unit = hex4(bytes, at + 2).unwrap_or(0xFFFD);
                if (0xD800..=0xDBFF).contains(&unit) {
                    let low = hex4(bytes, at + 8).unwrap_or(0xDC00);
                    let code =
                        0x10000 + ((u32::from(unit) - 0xD800) << 10) + (u32::from(low) - 0xDC00);
                    (char::from_u32(code).unwrap_or('\u{FFFD}'), 12)
                } else {
                    (char::from_u32(u32::from(unit)).unwrap_or('\u{FFFD}'), 6)
                }
            }
            // `"`, `\` and `/` stand for themselves.
            Some(&other) => (char::from(other), 2),
            None => break,
        };
        out.push(c);
        i = at + len;
        rest = i;
    }
    out.push_str(&raw[rest..]);
}

/// Writes `s` as a JCS string: `"` and `\` escaped, control characters as `\b \t \n \f
/// \r` or `\u00xx`, everything else as it is.
pub fn write_string(out: &mut String, s: &str) {
    out.push('"');
    let mut rest = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x09 => "\\t",
            0x0A => "\\n",
            0x0C => "\\f",
            0x0D => "\\r",
            0..=0x1F => "",
            _ => continue,
        };
        out.push_str(&s[rest..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        rest = i + 1;
    }
    out.push_str(&s[rest..]);
    out.push('"');
}

/// ECMAScript's Number-to-String (RFC 8785 §3.2.2.3), as `canon-json` writes it: `0`
/// for ±0, fixed notation in [1e-6, 1e21), else an exponent with its sign.
fn write_number(out: &mut String, value: f64) {
    if value == 0.0 {
        out.push('0');
        return;
    }
    if value < 0.0 {
        out.push('-');
    }
    let magnitude = value.abs();
    // Writing to a String cannot fail.
    if (1e-6..1e21).contains(&magnitude) {
        let _ = write!(out, "{magnitude}");
    } else {
        let from = out.len();
        let _ = write!(out, "{magnitude:e}");
        if let Some(e) = out[from..].find('e')
            && out.as_bytes().get(from + e + 1) != Some(&b'-')
        {
            out.insert(from + e + 1, '+');
        }
    }
}

/// JCS member order: by UTF-16 code units. UTF-8 byte order is code point order, which
/// differs only where a character beyond U+FFFF (a surrogate pair, 0xD800…) meets one
/// in U+E000–U+FFFF; at the first differing byte those are lead bytes F0–F4 and EE–EF.
fn jcs_order(a: &[u8], b: &[u8]) -> Ordering {
    let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) else {
        return a.len().cmp(&b.len());
    };
    match (a[i], b[i]) {
        (0xF0..=0xF4, 0xEE..=0xEF) => Ordering::Less,
        (0xEE..=0xEF, 0xF0..=0xF4) => Ordering::Greater,
        (x, y) => x.cmp(&y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde::Serialize;

    /// serde_json + canon-json, on input the strict reference parser accepts.
    fn reference(input: &str) -> Option<String> {
        let parsed = crate::ijson::parse(input.as_bytes()).ok()?;
        if !parsed.violations.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        let mut ser =
            serde_json::Serializer::with_formatter(&mut out, canon_json::CanonicalFormatter::new());
        parsed.value.serialize(&mut ser).ok()?;
        String::from_utf8(out).ok()
    }

    fn same(input: &str) {
        assert_eq!(canonicalize(input).ok(), reference(input), "{input:?}");
    }

    #[test]
    fn agrees_with_the_reference() {
        for input in [
            r#"{"b":1,"a":[true,false,null],"c":{"z":"\u0041\n\"","y":-0}}"#,
            r#"{"\u00e9":1,"e":2,"\ud83d\ude00":3,"\ue000":4}"#,
            r#"[1.0, 1e21, 1E-7, 123.456e2, -0.0, 5e-324, 0.1, 1e400]"#,
            r#"[9007199254740991, -9007199254740991, 9007199254740992]"#,
            r#"[1e20]"#,
            r#"[100000000000000000000000]"#,
            r#"[1e-400, 0e99999999999999999999]"#,
            r#"{"a":1,"a":2}"#,
            r#"{"a":1,"b":{"c":1,"c":1}}"#,
            r#"{"x":"a","\u0078":"b"}"#,
            r#""\ud800""#,
            r#""\udc00""#,
            r#""\ud800\u0041""#,
            r#""tab	inside""#,
            r#""\/\b\f\r\t\u001f\u007f""#,
            " [1 , 2 ]\n",
            "[1,]",
            "{\"a\":1,}",
            "[01]",
            "[-]",
            "[1.]",
            "[1e]",
            "[.5]",
            "tru",
            "nul",
            "\"abc",
            "{} x",
            "",
            "{\"a\" 1}",
            "{1:2}",
            "[1 2]",
        ] {
            same(input);
        }
    }

    #[test]
    fn nesting_limit_matches_serde_json() {
        for depth in [126, 127, 128, 129] {
            let arrays = "[".repeat(depth) + &"]".repeat(depth);
            same(&arrays);
            let objects = "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth);
            same(&objects);
        }
    }

    /// Random JSON text: members in any order (sometimes repeated), escapes, surrogate
    /// pairs and lone halves, numbers of every shape, whitespace.
    fn random_text(rng: &mut StdRng, depth: u32, out: &mut String) {
        const STRINGS: &[&str] = &[
            "",
            "a",
            "b",
            "ab",
            "é",
            "\\u00e9",
            "\\\\",
            "\\\\u0041",
            "\\\"",
            "\\/",
            "\\n",
            "\\u001f",
            "\\u2028",
            "\\ud83d\\ude00",
            "😀",
            "\\ue000",
            "\u{e000}",
            "\u{ffff}",
            "\\ud800",
            "\\udc00",
            "x\\u0000y",
            "\\uD83D\\uDE00",
            "\\ud83d",
            "\u{7f}",
            "\t",
        ];
        const NUMBERS: &[&str] = &[
            "0",
            "-0",
            "1",
            "-1",
            "0.0",
            "-0.0",
            "1.5",
            "1e2",
            "1E+2",
            "1e-7",
            "1e21",
            "1e20",
            "12345678901234567890",
            "9007199254740991",
            "9007199254740992",
            "-9007199254740993",
            "123.456e-300",
            "5e-324",
            "1e400",
            "0.1",
            "1.0e0",
            "100000000000000000000000",
            "9007199254740993.0",
            "4.5e15",
            "01",
            "1.",
            "-",
        ];
        let ws = |rng: &mut StdRng, out: &mut String| {
            if rng.random_range(0..4) == 0 {
                out.push_str([" ", "\n", "\t", "\r\n "][rng.random_range(0..4)]);
            }
        };
        ws(rng, out);
        match rng.random_range(0..if depth > 3 { 5 } else { 7 }) {
            0 => out.push_str(["null", "true", "false"][rng.random_range(0..3)]),
            1 | 2 => out.push_str(NUMBERS[rng.random_range(0..NUMBERS.len())]),
            3 | 4 => {
                out.push('"');
                out.push_str(STRINGS[rng.random_range(0..STRINGS.len())]);
                out.push('"');
            }
            5 => {
                out.push('[');
                for i in 0..rng.random_range(0..4) {
                    if i > 0 {
                        out.push(',');
                    }
                    random_text(rng, depth + 1, out);
                }
                out.push(']');
            }
            _ => {
                out.push('{');
                for i in 0..rng.random_range(0..5) {
                    if i > 0 {
                        out.push(',');
                    }
                    ws(rng, out);
                    out.push('"');
                    out.push_str(STRINGS[rng.random_range(0..STRINGS.len())]);
                    out.push('"');
                    ws(rng, out);
                    out.push(':');
                    random_text(rng, depth + 1, out);
                }
                out.push('}');
            }
        }
        ws(rng, out);
    }

    /// Fails if any rule of the reference (duplicates after unescaping, UTF-16 order,
    /// number shapes, surrogates, control characters) is dropped from the one-pass parser.
    #[test]
    fn random_documents_agree_with_the_reference() {
        let mut rng = StdRng::seed_from_u64(8785);
        let (mut accepted, mut rejected) = (0, 0);
        for _ in 0..20_000 {
            let mut text = String::new();
            random_text(&mut rng, 0, &mut text);
            let got = canonicalize(&text).ok();
            assert_eq!(got, reference(&text), "{text:?}");
            if got.is_some() {
                accepted += 1;
            } else {
                rejected += 1;
            }
        }
        assert!(
            accepted > 5_000 && rejected > 2_000,
            "{accepted} accepted, {rejected} rejected"
        );
    }

    #[test]
    fn members_are_sorted_by_utf16_units() {
        let got = canonicalize("{\"\u{e000}\":1,\"\u{1f600}\":2,\"z\":3,\"\":4}").unwrap();
        assert_eq!(got, "{\"\":4,\"z\":3,\"\u{1f600}\":2,\"\u{e000}\":1}");
    }
}
