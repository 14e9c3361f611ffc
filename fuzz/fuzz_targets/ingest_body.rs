//! The ingest body parser, JSON and NDJSON: any bytes give events or a list of
//! problems, never a panic; and every accepted event's canonical data is a fixed point
//! (parse → JCS → parse → JCS gives the same text).
#![no_main]

use cairn::event::{BodyFormat, jcs, parse_request};
use cairn::ijson;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for format in [BodyFormat::Json, BodyFormat::Ndjson] {
        let Ok(events) = parse_request(data, format, 10_000) else {
            continue;
        };
        for event in events {
            let parsed = ijson::parse(event.data_jcs.as_bytes()).expect("canonical data parses");
            assert!(parsed.violations.is_empty(), "canonical data breaks I-JSON");
            assert_eq!(jcs(&parsed.value), event.data_jcs, "JCS is not a fixed point");
            if let Some(source) = &event.source_jcs {
                assert!(ijson::parse(source.as_bytes()).is_ok());
            }
        }
    }
});
