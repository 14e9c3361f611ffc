//! The one-pass parser (`cairn::jcs`, what ingest runs) against the reference path it
//! replaced (a `serde_json::Value` through cairn's strict `ijson`, written by
//! `canon-json`): the same accept/reject decision on every input and byte-identical
//! canonical output; and for whole ingest bodies (JSON and NDJSON), the one-pass events
//! exactly when the reference path accepts, equal to its events.
#![no_main]

use cairn::event::{BodyFormat, parse_request_reference, parse_valid};
use cairn::{ijson, jcs};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;

fn reference(input: &[u8]) -> Option<String> {
    let parsed = ijson::parse(input).ok()?;
    if !parsed.violations.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    let mut ser =
        serde_json::Serializer::with_formatter(&mut out, canon_json::CanonicalFormatter::new());
    parsed.value.serialize(&mut ser).expect("canon-json writes any parsed value");
    Some(String::from_utf8(out).expect("canon-json writes UTF-8"))
}

fuzz_target!(|data: &[u8]| {
    let expected = reference(data);
    let got = std::str::from_utf8(data)
        .ok()
        .and_then(|text| jcs::canonicalize(text).ok());
    assert_eq!(got, expected, "decision or canonical form differs");

    for format in [BodyFormat::Json, BodyFormat::Ndjson] {
        let expected = parse_request_reference(data, format, 10_000).ok();
        assert_eq!(parse_valid(data, format, 10_000), expected, "{format:?} body");
    }
});
