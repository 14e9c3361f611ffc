//! Query strings as the stream, query and export routes read them: `since`, `until`,
//! `types`, `source`, and `Last-Event-ID`. Any input gives a value or an error, never a
//! panic; accepted ids print back as what was given.
#![no_main]

use std::collections::HashMap;

use cairn::cursor::{TypeFilter, parse_last_event_id, parse_since, parse_until, parse_ulid};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The query string, decoded the way axum's `Query` does.
    if let Ok(params) = serde_urlencoded::from_bytes::<HashMap<String, String>>(data) {
        if let Some(since) = params.get("since") {
            let _ = parse_since(since);
        }
        if let Some(until) = params.get("until") {
            let _ = parse_until(until);
        }
        if let Some(types) = params.get("types")
            && let Ok(filter) = TypeFilter::parse(types)
        {
            let _ = filter.matches("agent.tool_call");
        }
    }
    // The same bytes as a header value.
    if let Ok(Some(id)) = parse_last_event_id(data) {
        let text = std::str::from_utf8(data).expect("accepted as UTF-8").trim();
        assert_eq!(id.to_string(), text.to_ascii_uppercase(), "an id that does not print back");
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(id) = parse_ulid(text)
    {
        assert_eq!(parse_ulid(&id.to_string()), Some(id));
    }
});
