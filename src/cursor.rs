//! Cursors and filters shared by query, export and the streams (SPEC §2).
//!
//! Every cursor is normalised to an exclusive ULID bound, so the store only ever
//! answers "ids after X" or "ids before Y":
//! - `since=<ULID>` → after that id (it need not exist);
//! - `since=<RFC 3339>` → after the largest id of the millisecond before, so every
//!   event *ingested at or after* the time is included (ids carry their ingest time);
//! - `since=earliest` → after the zero ULID;
//! - `until=<ULID | RFC 3339>` → before that id / before the first id of that time.

use std::collections::HashSet;

use ulid::Ulid;

use crate::event::{Event, check_type};
use crate::rfc3339;

/// The zero ULID: the cursor before every event.
pub const ZERO: Ulid = Ulid(0);
const MAX_RANDOM: u128 = (1 << 80) - 1;

/// Parses `since` (ULID, RFC 3339 or `earliest`) to the id delivery continues after.
pub fn parse_since(s: &str) -> Result<Ulid, String> {
    if s == "earliest" {
        return Ok(ZERO);
    }
    if let Some(id) = parse_ulid(s) {
        return Ok(id);
    }
    match rfc3339::parse(s) {
        Ok(t) if t.unix_ms_ceil <= 0 => Ok(ZERO),
        Ok(t) => Ok(Ulid::from_parts(t.unix_ms_ceil as u64 - 1, MAX_RANDOM)),
        Err(_) => Err("must be a ULID, an RFC 3339 time or \"earliest\"".into()),
    }
}

/// Parses `until` (ULID or RFC 3339) to the exclusive upper id bound.
pub fn parse_until(s: &str) -> Result<Ulid, String> {
    if let Some(id) = parse_ulid(s) {
        return Ok(id);
    }
    match rfc3339::parse(s) {
        Ok(t) if t.unix_ms_ceil <= 0 => Ok(ZERO),
        Ok(t) => Ok(Ulid::from_parts(t.unix_ms_ceil as u64, 0)),
        Err(_) => Err("must be a ULID or an RFC 3339 time".into()),
    }
}

/// A `Last-Event-ID` header value: empty (after trimming) means none was given; else it
/// must be an event id.
pub fn parse_last_event_id(value: &[u8]) -> Result<Option<Ulid>, &'static str> {
    let text = std::str::from_utf8(value)
        .map_err(|_| "must be a ULID (an event id)")?
        .trim();
    if text.is_empty() {
        return Ok(None);
    }
    parse_ulid(text)
        .map(Some)
        .ok_or("must be a ULID (an event id)")
}

/// A 26-character Crockford base32 ULID (either case). The first character carries
/// only 3 bits, so anything above `7` would overflow 128 bits (the ulid crate wraps it).
pub fn parse_ulid(s: &str) -> Option<Ulid> {
    if s.len() != 26 || !matches!(s.as_bytes()[0], b'0'..=b'7') {
        return None;
    }
    Ulid::from_string(s).ok()
}

/// Most entries in a type filter.
pub const MAX_TYPE_FILTER_ENTRIES: usize = 256;

/// `types=a,b.*`: exact names and prefixes ending in `*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeFilter {
    exact: HashSet<String>,
    prefixes: Vec<String>,
}

impl TypeFilter {
    /// A comma-separated list, as in `types=`.
    pub fn parse(list: &str) -> Result<TypeFilter, String> {
        TypeFilter::from_entries(list.split(','))
    }

    /// Entries one by one, as in a WebSocket `subscribe` message's `event_types`.
    pub fn from_entries<'a>(
        entries: impl IntoIterator<Item = &'a str>,
    ) -> Result<TypeFilter, String> {
        let mut filter = TypeFilter::default();
        for (n, item) in entries.into_iter().enumerate() {
            // Prefixes are tried one by one for every event scanned.
            if n == MAX_TYPE_FILTER_ENTRIES {
                return Err(format!("has more than {MAX_TYPE_FILTER_ENTRIES} entries"));
            }
            let item = item.trim();
            if item.is_empty() {
                return Err("has an empty entry".into());
            }
            match item.strip_suffix('*') {
                Some(prefix) => {
                    if !prefix.is_empty() {
                        check_pattern(prefix).map_err(|m| format!("entry \"{item}\" {m}"))?;
                    }
                    filter.prefixes.push(prefix.to_string());
                }
                None => {
                    check_pattern(item).map_err(|m| format!("entry \"{item}\" {m}"))?;
                    filter.exact.insert(item.to_string());
                }
            }
        }
        Ok(filter)
    }

    pub fn matches(&self, event_type: &str) -> bool {
        self.exact.contains(event_type)
            || self
                .prefixes
                .iter()
                .any(|p| event_type.starts_with(p.as_str()))
    }
}

/// A type pattern uses the characters of a type name (reserved names are fine here).
fn check_pattern(s: &str) -> Result<(), String> {
    match check_type(s) {
        Err(m) if m.contains("reserved") => Ok(()),
        other => other,
    }
}

/// Which events a reader wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub types: Option<TypeFilter>,
    pub source: Option<String>,
}

impl Filter {
    pub fn matches(&self, event: &Event) -> bool {
        self.types
            .as_ref()
            .is_none_or(|t| t.matches(&event.event_type))
            && self
                .source
                .as_ref()
                .is_none_or(|s| event.source.as_deref() == Some(s.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_forms() {
        assert_eq!(parse_since("earliest").unwrap(), ZERO);
        let id = Ulid::from_parts(1_000, 42);
        assert_eq!(parse_since(&id.to_string()).unwrap(), id);
        assert_eq!(parse_since(&id.to_string().to_lowercase()).unwrap(), id);
        let after = parse_since("1970-01-01T00:00:01Z").unwrap();
        assert!(Ulid::from_parts(1_000, 0) > after);
        assert!(Ulid::from_parts(999, MAX_RANDOM) <= after);
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("").is_err());
        assert!(
            parse_since("8ZZZZZZZZZZZZZZZZZZZZZZZZZ").is_err(),
            "overflowing ULID"
        );
    }

    #[test]
    fn until_is_exclusive_at_the_millisecond() {
        let before = parse_until("1970-01-01T00:00:01Z").unwrap();
        assert!(Ulid::from_parts(999, MAX_RANDOM) < before);
        assert!(Ulid::from_parts(1_000, 0) >= before);
    }

    #[test]
    fn type_patterns() {
        let f = TypeFilter::parse("audit,agent.*").unwrap();
        assert!(f.matches("audit") && f.matches("agent.created") && !f.matches("auditx"));
        assert!(TypeFilter::parse("*").unwrap().matches("anything"));
        assert!(TypeFilter::parse("a,,b").is_err());
        assert!(TypeFilter::parse("bad type").is_err());
        let many = |n: usize| {
            (0..n)
                .map(|i| format!("t{i}*"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert!(TypeFilter::parse(&many(MAX_TYPE_FILTER_ENTRIES)).is_ok());
        assert!(TypeFilter::parse(&many(MAX_TYPE_FILTER_ENTRIES + 1)).is_err());
    }
}
