//! The canonical-record path: any JSON that passes the I-JSON rules canonicalizes to
//! text that parses back to the same canonical text (a fixed point), and cairn's fast
//! path writes exactly what the `canon-json` crate (the RFC 8785 definition here) writes.
#![no_main]

use cairn::event::jcs;
use cairn::ijson;
use libfuzzer_sys::fuzz_target;
use serde::Serialize;

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = ijson::parse(data) else {
        return;
    };
    if !parsed.violations.is_empty() {
        return;
    }
    let canonical = jcs(&parsed.value);
    let mut reference = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut reference,
        canon_json::CanonicalFormatter::new(),
    );
    parsed.value.serialize(&mut ser).expect("serialize");
    assert_eq!(canonical.as_bytes(), &reference[..], "fast path differs from canon-json");
    let again = ijson::parse(canonical.as_bytes()).expect("canonical text parses");
    assert!(again.violations.is_empty());
    assert_eq!(jcs(&again.value), canonical, "parse → JCS → parse → JCS moved");
});
