//! Ingest (`POST /v1/events`) and the basic API surface, against the real release
//! binary: every rule of SPEC §1 and §2 that an ingest request can break, the 201
//! body, idempotency, authentication basics, error routes, head/verify/by-id, query
//! parameter validation and filters, and the data-directory lock.
mod common;

use std::time::Duration;

use common::{Server, cairn, run_bounded};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const CROCKFORD: &str = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

/// POST a raw JSON body.
fn post_raw(s: &Server, body: impl Into<reqwest::blocking::Body>) -> (u16, Value) {
    s.post("/v1/events", "application/json", body)
}

/// POST an NDJSON body.
fn post_ndjson(s: &Server, body: impl Into<reqwest::blocking::Body>) -> (u16, Value) {
    s.post("/v1/events", "application/x-ndjson", body)
}

/// The `details` array of an error body.
fn details(body: &Value) -> Vec<Value> {
    body["details"].as_array().cloned().unwrap_or_default()
}

/// The detail entries for one event index.
fn details_at(body: &Value, index: u64) -> Vec<Value> {
    details(body)
        .into_iter()
        .filter(|d| d["index"] == index)
        .collect()
}

/// True if `details` holds an entry with this index and field.
fn has_detail(body: &Value, index: u64, field: &str) -> bool {
    details(body)
        .iter()
        .any(|d| d["index"] == index && d["field"] == field)
}

/// Asserts a 400 validation_failed response for a single event naming `field` at index 0,
/// and that the log did not change.
fn assert_rejected(s: &Server, event: &Value, field: &str) -> Value {
    let before = s.head();
    let (status, body) = s.post_json(event);
    assert_eq!(status, 400, "{event} should be rejected: {body}");
    assert_eq!(body["code"], "validation_failed", "{event}: {body}");
    assert!(
        has_detail(&body, 0, field),
        "{event}: expected a detail with index 0 and field {field:?}: {body}"
    );
    assert_eq!(s.head(), before, "a rejected request changed the head");
    body
}

/// Ingests one event (201 expected) and returns it as served by `GET /v1/events/{id}`.
fn ingest_one(s: &Server, event: &Value) -> Value {
    let (status, body) = s.post_json(event);
    assert_eq!(status, 201, "{event} should be accepted: {body}");
    let id = body["data"]["ids"][0].as_str().expect("ids[0]").to_string();
    let (status, got) = s.get(&format!("/v1/events/{id}"));
    assert_eq!(status, 200, "{got}");
    got["data"].clone()
}

/// Ingests one event from a raw JSON body and returns the served event.
fn ingest_raw(s: &Server, raw: &str) -> Value {
    let (status, body) = post_raw(s, raw.to_string());
    assert_eq!(status, 201, "{raw} should be accepted: {body}");
    let id = body["data"]["ids"][0].as_str().expect("ids[0]").to_string();
    let (status, got) = s.get(&format!("/v1/events/{id}"));
    assert_eq!(status, 200, "{got}");
    got["data"].clone()
}

/// The RFC 6962 leaf hash of an exported line, derived from its bytes alone: the
/// line without its `"hash":"…",` member, prefixed with 0x00, through SHA-256.
fn leaf_hash_of_line(line: &str) -> String {
    let v: Value = serde_json::from_str(line).expect("line is JSON");
    let stated = v["hash"].as_str().expect("hash member");
    let member = format!("\"hash\":\"{stated}\",");
    assert!(line.contains(&member), "{line}");
    let record = line.replacen(&member, "", 1);
    let mut hasher = Sha256::new();
    hasher.update([0u8]);
    hasher.update(record.as_bytes());
    hex::encode(hasher.finalize())
}

fn is_ulid(s: &str) -> bool {
    s.len() == 26 && s.chars().all(|c| CROCKFORD.contains(c)) && s.as_bytes()[0] <= b'7'
}

/// Milliseconds since the epoch in a ULID's time part.
fn ulid_ms(id: &str) -> u64 {
    ulid::Ulid::from_string(id).expect("ULID").timestamp_ms()
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for Unix milliseconds (independent of the server's code).
fn format_ms(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .expect("in range");
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        ms % 1000
    )
}

/// Number of events the log holds, by export.
fn log_len(s: &Server) -> usize {
    s.export_lines().len()
}

/// Types of the events a query returns.
fn query_types(s: &Server, query: &str) -> Vec<String> {
    let (status, body) = s.get(&format!("/v1/events?{query}"));
    assert_eq!(status, 200, "{query}: {body}");
    body["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|e| e["type"].as_str().expect("type").to_string())
        .collect()
}

/// POST with an `Idempotency-Key`.
fn post_idempotent(s: &Server, key: &str, body: &Value) -> (u16, Value) {
    let r = s
        .http()
        .post(s.url("/v1/events"))
        .bearer_auth(&s.token)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(body.to_string())
        .send()
        .expect("POST");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

// ---------------------------------------------------------------------------------
// type
// ---------------------------------------------------------------------------------

#[test]
fn type_is_required_and_must_be_a_string() {
    let s = Server::start(&[]);
    for event in [
        json!({}),
        json!({"data": {"a": 1}}),
        json!({"type": null}),
        json!({"type": 5}),
        json!({"type": ["a"]}),
        json!({"type": {"a": 1}}),
        json!({"type": true}),
    ] {
        assert_rejected(&s, &event, "type");
    }
    let body = assert_rejected(&s, &json!({"source": "x"}), "type");
    let d = details_at(&body, 0);
    assert!(
        d.iter().any(|d| d["message"] == "required"),
        "a missing type should say \"required\": {body}"
    );
    assert_eq!(log_len(&s), 0);
}

#[test]
fn type_must_match_the_pattern() {
    let s = Server::start(&[]);
    for bad in [
        "",
        "has space",
        "tab\there",
        "a*b",
        "a,b",
        "é",
        "caf\u{e9}",
        "a+b",
        "semi;colon",
        "quote\"",
        "back\\slash",
        "new\nline",
        "emoji😀",
    ] {
        assert_rejected(&s, &json!({"type": bad}), "type");
    }
    // Every allowed character class.
    let all = "AZaz09._:/-";
    let e = ingest_one(&s, &json!({"type": all}));
    assert_eq!(e["type"], all);
    let e = ingest_one(&s, &json!({"type": "agent.tool_call:v1/x-y"}));
    assert_eq!(e["type"], "agent.tool_call:v1/x-y");
}

#[test]
fn type_length_limit_is_128() {
    let s = Server::start(&[]);
    let ok = "t".repeat(128);
    let e = ingest_one(&s, &json!({"type": ok}));
    assert_eq!(e["type"], ok.as_str());
    assert_rejected(&s, &json!({"type": "t".repeat(129)}), "type");
    assert_rejected(&s, &json!({"type": "t".repeat(1000)}), "type");
    assert_eq!(log_len(&s), 1);
}

#[test]
fn reserved_types_are_rejected() {
    let s = Server::start(&[]);
    for reserved in ["connected", "open", "error"] {
        assert_rejected(&s, &json!({"type": reserved}), "type");
        // Also inside an envelope, at its index.
        let (status, body) =
            s.post_json(&json!({"events": [{"type": "fine"}, {"type": reserved}]}));
        assert_eq!(status, 400, "{body}");
        assert!(has_detail(&body, 1, "type"), "{body}");
    }
    assert_eq!(log_len(&s), 0);
    // Names that merely contain a reserved word are ordinary types.
    for fine in ["connected.x", "error_count", "opened", "app.error"] {
        let e = ingest_one(&s, &json!({"type": fine}));
        assert_eq!(e["type"], fine);
    }
}

// ---------------------------------------------------------------------------------
// timestamp
// ---------------------------------------------------------------------------------

#[test]
fn timestamp_offsets_are_normalised_to_utc_keeping_fraction_digits() {
    let s = Server::start(&[]);
    for (given, served) in [
        ("2026-03-19T10:00:00.000Z", "2026-03-19T10:00:00.000Z"),
        ("2026-03-19T10:00:00Z", "2026-03-19T10:00:00Z"),
        ("2026-03-19T12:30:00.5+02:30", "2026-03-19T10:00:00.5Z"),
        ("2026-03-19T05:00:00.120-05:00", "2026-03-19T10:00:00.120Z"),
        ("2026-01-01T00:30:00+01:00", "2025-12-31T23:30:00Z"),
        ("2025-12-31T23:30:00.100-01:00", "2026-01-01T00:30:00.100Z"),
        (
            "2026-03-19T10:00:00.123456789Z",
            "2026-03-19T10:00:00.123456789Z",
        ),
        (
            "2026-03-19T10:00:00.100000000+00:00",
            "2026-03-19T10:00:00.100000000Z",
        ),
        ("2024-02-29T23:59:59.9-23:59", "2024-03-01T23:58:59.9Z"),
        ("2026-03-19T10:00:00+00:00", "2026-03-19T10:00:00Z"),
    ] {
        let e = ingest_one(&s, &json!({"type": "ts", "timestamp": given}));
        assert_eq!(e["timestamp"], served, "given {given}");
    }
}

#[test]
fn timestamp_accepts_lower_case_t_and_z_and_minus_zero_offset() {
    let s = Server::start(&[]);
    for (given, served) in [
        ("2026-03-19t10:00:00.100z", "2026-03-19T10:00:00.100Z"),
        ("2026-03-19t10:00:00Z", "2026-03-19T10:00:00Z"),
        ("2026-03-19T10:00:00z", "2026-03-19T10:00:00Z"),
        ("2026-03-19T10:00:00-00:00", "2026-03-19T10:00:00Z"),
        ("2026-03-19T10:00:00.010-00:00", "2026-03-19T10:00:00.010Z"),
    ] {
        let e = ingest_one(&s, &json!({"type": "ts", "timestamp": given}));
        assert_eq!(e["timestamp"], served, "given {given}");
    }
}

#[test]
fn timestamp_with_more_than_9_fraction_digits_is_rejected() {
    let s = Server::start(&[]);
    let e = ingest_one(
        &s,
        &json!({"type": "ts", "timestamp": "2026-03-19T10:00:00.000000001Z"}),
    );
    assert_eq!(e["timestamp"], "2026-03-19T10:00:00.000000001Z");
    for bad in [
        "2026-03-19T10:00:00.1234567890Z",
        "2026-03-19T10:00:00.0000000000Z",
        "2026-03-19T10:00:00.1234567890+01:00",
    ] {
        assert_rejected(&s, &json!({"type": "ts", "timestamp": bad}), "timestamp");
    }
    assert_eq!(log_len(&s), 1);
}

#[test]
fn timestamp_leap_second_is_rejected() {
    let s = Server::start(&[]);
    for bad in [
        "2016-12-31T23:59:60Z",
        "2016-12-31T23:59:60.5Z",
        "2016-12-31T18:59:60-05:00",
    ] {
        assert_rejected(&s, &json!({"type": "ts", "timestamp": bad}), "timestamp");
    }
    assert_eq!(log_len(&s), 0);
}

#[test]
fn timestamp_year_outside_0000_9999_in_utc_is_rejected() {
    let s = Server::start(&[]);
    for bad in [
        "0000-01-01T00:30:00+01:00",
        "0000-01-01T00:00:00.5+00:01",
        "9999-12-31T23:30:00-01:00",
        "9999-12-31T23:59:59.999-00:01",
    ] {
        assert_rejected(&s, &json!({"type": "ts", "timestamp": bad}), "timestamp");
    }
    // The edges themselves are fine, also when an offset moves them to the edge.
    for (given, served) in [
        ("0000-01-01T00:00:00Z", "0000-01-01T00:00:00Z"),
        ("0001-01-01T00:30:00+01:00", "0000-12-31T23:30:00Z"),
        (
            "9999-12-31T23:59:59.999999999Z",
            "9999-12-31T23:59:59.999999999Z",
        ),
        ("9999-12-31T22:30:00-01:00", "9999-12-31T23:30:00Z"),
    ] {
        let e = ingest_one(&s, &json!({"type": "ts", "timestamp": given}));
        assert_eq!(e["timestamp"], served, "given {given}");
    }
}

#[test]
fn malformed_timestamps_are_rejected() {
    let s = Server::start(&[]);
    for bad in [
        json!("2026-03-19T10:00:00"),
        json!("2026-03-19"),
        json!("2026-02-30T10:00:00Z"),
        json!("2026-13-01T10:00:00Z"),
        json!("2026-03-19T24:00:00Z"),
        json!("2026-03-19T10:00:00.Z"),
        json!("2026-03-19T10:00:00+24:00"),
        json!("2026-03-19T10:00:00+0100"),
        json!("yesterday"),
        json!(""),
        json!(1_773_914_400_000u64),
        json!({"t": 1}),
        json!(true),
    ] {
        assert_rejected(&s, &json!({"type": "ts", "timestamp": bad}), "timestamp");
    }
    assert_eq!(log_len(&s), 0);
}

#[test]
fn absent_or_null_timestamp_is_the_ingest_time_equal_to_the_id_time() {
    let s = Server::start(&[]);
    let (status, body) = s.post_json(&json!({"events": [
        {"type": "a"},
        {"type": "b", "timestamp": null},
        {"type": "c", "timestamp": "2020-01-01T00:00:00Z"},
    ]}));
    assert_eq!(status, 201, "{body}");
    let ids: Vec<String> = body["data"]["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    for id in &ids[..2] {
        let (status, e) = s.get(&format!("/v1/events/{id}"));
        assert_eq!(status, 200, "{e}");
        let ts = e["data"]["timestamp"].as_str().expect("timestamp");
        // Millisecond precision, UTC, upper-case Z, and equal to the id's time.
        assert_eq!(ts.len(), "2026-03-19T10:00:00.000Z".len(), "{ts}");
        assert_eq!(ts, format_ms(ulid_ms(id)), "timestamp vs id {id}");
    }
    let (_, e) = s.get(&format!("/v1/events/{}", ids[2]));
    assert_eq!(e["data"]["timestamp"], "2020-01-01T00:00:00Z");
    // The head reports the newest event's timestamp.
    assert_eq!(s.head()["timestamp"], "2020-01-01T00:00:00Z");
}

// ---------------------------------------------------------------------------------
// source
// ---------------------------------------------------------------------------------

#[test]
fn source_length_counts_unicode_scalar_values() {
    let s = Server::start(&[]);
    for ok in [
        "a".to_string(),
        "a".repeat(256),
        "é".repeat(256),
        "😀".repeat(256),
        "日本".repeat(128),
    ] {
        let e = ingest_one(&s, &json!({"type": "src", "source": ok}));
        assert_eq!(e["source"], ok.as_str());
    }
    for bad in [
        String::new(),
        "a".repeat(257),
        "é".repeat(257),
        "😀".repeat(257),
    ] {
        assert_rejected(&s, &json!({"type": "src", "source": bad}), "source");
    }
    assert_eq!(log_len(&s), 5);
}

#[test]
fn source_control_characters_are_rejected() {
    let s = Server::start(&[]);
    for bad in [
        "nul\u{0}x",
        "bell\u{7}",
        "tab\there",
        "line\nfeed",
        "cr\r",
        "esc\u{1b}[0m",
        "del\u{7f}",
        "c1-start\u{80}",
        "nel\u{85}",
        "c1-end\u{9f}",
    ] {
        assert_rejected(&s, &json!({"type": "src", "source": bad}), "source");
    }
    assert_eq!(log_len(&s), 0);
    // Not category Cc: fine.
    for ok in ["nbsp\u{a0}x", "ls\u{2028}ps\u{2029}", "zwj\u{200d}", "a b"] {
        let e = ingest_one(&s, &json!({"type": "src", "source": ok}));
        assert_eq!(e["source"], ok);
    }
}

#[test]
fn null_source_means_absent_and_is_omitted() {
    let s = Server::start(&[]);
    for event in [json!({"type": "a", "source": null}), json!({"type": "b"})] {
        let e = ingest_one(&s, &event);
        assert!(
            e.as_object().expect("object").get("source").is_none(),
            "source must be omitted, never null: {e}"
        );
    }
    for line in s.export_lines() {
        assert!(!line.contains("\"source\""), "{line}");
    }
    for bad in [json!(5), json!(["a"]), json!({"a": 1}), json!(false)] {
        assert_rejected(&s, &json!({"type": "a", "source": bad}), "source");
    }
}

// ---------------------------------------------------------------------------------
// data and members
// ---------------------------------------------------------------------------------

#[test]
fn data_defaults_to_an_empty_object_and_is_served_canonically() {
    let s = Server::start(&[]);
    let e = ingest_one(&s, &json!({"type": "d"}));
    assert_eq!(e["data"], json!({}));
    let line = &s.export_lines()[0];
    assert!(line.starts_with("{\"data\":{},"), "{line}");

    // Any JSON value; members sorted, whitespace removed, numbers canonical.
    let e = ingest_raw(
        &s,
        r#"{ "type" : "d", "data" : { "b" : [ 1.50, 2e0, -0.0 ], "a" : "x" } }"#,
    );
    assert_eq!(e["data"], json!({"a": "x", "b": [1.5, 2, 0]}));
    let line = &s.export_lines()[1];
    assert!(
        line.starts_with(r#"{"data":{"a":"x","b":[1.5,2,0]},"#),
        "{line}"
    );
    for value in [json!([1, 2]), json!("text"), json!(42), json!(null)] {
        let e = ingest_one(&s, &json!({"type": "d", "data": value}));
        assert_eq!(e["data"], value);
    }
}

#[test]
fn unknown_members_are_rejected() {
    let s = Server::start(&[]);
    for (event, field) in [
        (json!({"type": "a", "extra": 1}), "extra"),
        (
            json!({"type": "a", "id": "01JD8X4Q1T6G5N2B3C4D5E6F7G"}),
            "id",
        ),
        (json!({"type": "a", "seq": 1}), "seq"),
        (json!({"type": "a", "hash": ZERO_HASH}), "hash"),
        (json!({"type": "a", "prev_hash": ZERO_HASH}), "prev_hash"),
        (json!({"type": "a", "Type": "b"}), "Type"),
        (json!({"type": "a", "extra": null}), "extra"),
    ] {
        assert_rejected(&s, &event, field);
    }
    // In an envelope, with the index.
    let (status, body) = s.post_json(&json!({"events": [{"type": "a"}, {"type": "b", "x": 1}]}));
    assert_eq!(status, 400, "{body}");
    assert!(has_detail(&body, 1, "x"), "{body}");
    // Beside "events".
    let (status, body) = s.post_json(&json!({"events": [{"type": "a"}], "meta": 1}));
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("meta"), "{body}");
    // In NDJSON.
    let (status, body) = post_ndjson(&s, "{\"type\":\"a\"}\n{\"type\":\"a\",\"tags\":[]}\n");
    assert_eq!(status, 400, "{body}");
    assert!(has_detail(&body, 1, "tags"), "{body}");
    assert_eq!(log_len(&s), 0);
}

// ---------------------------------------------------------------------------------
// I-JSON
// ---------------------------------------------------------------------------------

#[test]
fn duplicate_keys_at_any_depth_are_rejected_naming_the_path() {
    let s = Server::start(&[]);
    let cases = [
        // (body, index, field)
        (r#"{"type":"a","type":"b"}"#, 0, "type"),
        (r#"{"type":"a","data":{"x":1,"x":2}}"#, 0, "data.x"),
        (r#"{"type":"a","data":{"x":{"y":1,"y":1}}}"#, 0, "data.x.y"),
        (
            r#"{"type":"a","data":{"k":[0,{"d":1,"d":2}]}}"#,
            0,
            "data.k[1].d",
        ),
        (
            r#"{"events":[{"type":"a"},{"type":"b","data":{"u":{"id":1,"id":2}}}]}"#,
            1,
            "data.u.id",
        ),
        (
            r#"{"events":[{"type":"a","source":"s","source":"t"}]}"#,
            0,
            "source",
        ),
    ];
    for (raw, index, field) in cases {
        let (status, body) = post_raw(&s, raw.to_string());
        assert_eq!(status, 400, "{raw}: {body}");
        assert!(
            has_detail(&body, index, field),
            "{raw}: expected index {index} field {field:?}: {body}"
        );
    }
    // NDJSON: same paths, line in the message.
    let (status, body) = post_ndjson(
        &s,
        "{\"type\":\"a\"}\n{\"type\":\"a\",\"data\":{\"p\":{\"q\":[{\"r\":1,\"r\":2}]}}}\n",
    );
    assert_eq!(status, 400, "{body}");
    assert!(has_detail(&body, 1, "data.p.q[0].r"), "{body}");
    assert!(
        details_at(&body, 1)
            .iter()
            .any(|d| d["message"].as_str().unwrap_or("").contains("line 2")),
        "{body}"
    );
    assert_eq!(log_len(&s), 0);
}

#[test]
fn integers_outside_the_safe_range_are_rejected() {
    let s = Server::start(&[]);
    for literal in [
        "9007199254740993",
        "-9007199254740993",
        "9007199254740992",
        "18446744073709551615",
        "18446744073709551616",
        "100000000000000000000",
        "9007199254740993.0",
    ] {
        let raw = format!(r#"{{"type":"n","data":{{"n":{literal}}}}}"#);
        let (status, body) = post_raw(&s, raw.clone());
        assert_eq!(status, 400, "{raw}: {body}");
        assert!(has_detail(&body, 0, "data.n"), "{raw}: {body}");
    }
    assert_eq!(log_len(&s), 0);
    // The edges of the safe range are fine and served exactly.
    let e = ingest_raw(
        &s,
        r#"{"type":"n","data":{"max":9007199254740991,"min":-9007199254740991}}"#,
    );
    assert_eq!(e["data"]["max"], json!(9_007_199_254_740_991i64));
    assert_eq!(e["data"]["min"], json!(-9_007_199_254_740_991i64));
    let line = &s.export_lines()[0];
    assert!(
        line.contains(r#""max":9007199254740991,"min":-9007199254740991"#),
        "{line}"
    );
}

#[test]
fn number_whose_canonical_form_is_an_unsafe_integer_is_rejected() {
    let s = Server::start(&[]);
    for literal in ["1e20", "1E20", "1.5e19", "-1e20", "9.999e20"] {
        let raw = format!(r#"{{"type":"n","data":{{"x":[{literal}]}}}}"#);
        let (status, body) = post_raw(&s, raw.clone());
        assert_eq!(status, 400, "{raw}: {body}");
        assert!(has_detail(&body, 0, "data.x[0]"), "{raw}: {body}");
    }
    assert_eq!(log_len(&s), 0);
    // 1e21 is written with an exponent by JCS: fine.
    let e = ingest_raw(&s, r#"{"type":"n","data":{"x":1e21,"y":1.5e300}}"#);
    assert_eq!(e["data"]["x"].as_f64(), Some(1e21));
    let line = &s.export_lines()[0];
    assert!(line.contains(r#""x":1e+21"#), "{line}");
}

#[test]
fn deep_nesting_and_huge_numbers_are_rejected_without_harm() {
    let s = Server::start(&[]);
    let depth = 100_000;
    let deep = format!(
        r#"{{"type":"deep","data":{}{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let (status, body) = post_raw(&s, deep.clone());
    assert_eq!(status, 400, "{body}");
    let ndjson = format!("{deep}\n");
    let (status, body) = post_ndjson(&s, ndjson);
    assert_eq!(status, 400, "{body}");
    for literal in ["1e400", "-1e400", &"9".repeat(500)] {
        let raw = format!(r#"{{"type":"n","data":{literal}}}"#);
        let (status, body) = post_raw(&s, raw);
        assert_eq!(status, 400, "{literal}: {body}");
    }
    assert_eq!(log_len(&s), 0);
    // The server is still fine, and ordinary nesting is accepted.
    let nested = format!(
        r#"{{"type":"nested","data":{}1{}}}"#,
        "[".repeat(50),
        "]".repeat(50)
    );
    let e = ingest_raw(&s, &nested);
    assert_eq!(e["type"], "nested");
    assert_eq!(log_len(&s), 1);
}

#[test]
fn lone_surrogate_is_rejected() {
    let s = Server::start(&[]);
    for raw in [
        r#"{"type":"a","data":{"s":"\ud800"}}"#,
        r#"{"type":"a","data":{"s":"x\udc00y"}}"#,
        r#"{"type":"a","data":{"\ud800":1}}"#,
        r#"{"type":"a","source":"\ud83d"}"#,
    ] {
        let (status, body) = post_raw(&s, raw.to_string());
        assert_eq!(status, 400, "{raw}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    let (status, body) = post_ndjson(&s, "{\"type\":\"a\",\"data\":\"\\ud800\"}\n");
    assert_eq!(status, 400, "{body}");
    assert_eq!(log_len(&s), 0);
    // A valid surrogate pair is one scalar value.
    let e = ingest_raw(&s, r#"{"type":"a","data":{"s":"\ud83d\ude00"}}"#);
    assert_eq!(e["data"]["s"], "😀");
}

#[test]
fn invalid_utf8_is_rejected() {
    let s = Server::start(&[]);
    for raw in [
        b"{\"type\":\"a\",\"data\":{\"s\":\"\xff\"}}".to_vec(),
        b"{\"type\":\"a\",\"source\":\"\xc3\x28\"}".to_vec(),
        b"{\"type\":\"a\",\"data\":{\"\xed\xa0\x80\":1}}".to_vec(),
    ] {
        let (status, body) = post_raw(&s, raw.clone());
        assert_eq!(status, 400, "{}: {body}", String::from_utf8_lossy(&raw));
        assert!(
            body.to_string().contains("column"),
            "the error should give the position: {body}"
        );
    }
    let (status, body) = post_ndjson(&s, b"{\"type\":\"a\"}\n{\"type\":\"b\xfe\"}\n".to_vec());
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("line 2"), "{body}");
    assert_eq!(log_len(&s), 0);
}

// ---------------------------------------------------------------------------------
// Error reporting
// ---------------------------------------------------------------------------------

#[test]
fn every_problem_is_listed_with_its_index_and_field() {
    let s = Server::start(&[]);
    let (status, body) = s.post_json(&json!({"events": [
        {"type": "ok"},
        {"data": {}},
        {"type": "ok2"},
        {"type": "open", "source": "", "timestamp": "2016-12-31T23:59:60Z", "zz": 1},
        {"type": "bad type"},
    ]}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "validation_failed", "{body}");
    assert_eq!(body["error"], "validation failed", "{body}");
    assert!(has_detail(&body, 1, "type"), "{body}");
    assert!(has_detail(&body, 3, "type"), "{body}");
    assert!(has_detail(&body, 3, "source"), "{body}");
    assert!(has_detail(&body, 3, "timestamp"), "{body}");
    assert!(has_detail(&body, 3, "zz"), "{body}");
    assert!(has_detail(&body, 4, "type"), "{body}");
    assert!(details_at(&body, 0).is_empty(), "{body}");
    assert!(details_at(&body, 2).is_empty(), "{body}");
    for d in details(&body) {
        assert!(
            d["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    assert_eq!(log_len(&s), 0);
}

#[test]
fn ndjson_problems_mention_the_line_number() {
    let s = Server::start(&[]);
    // Line 1 fine, line 2 blank, line 3 bad type, line 4 syntax error, line 5 bad source.
    let body = "{\"type\":\"ok\"}\n\n{\"type\":\"open\"}\n{\"type\": tru}\n{\"type\":\"x\",\"source\":\"\"}\n";
    let (status, resp) = post_ndjson(&s, body);
    assert_eq!(status, 400, "{resp}");
    let message_at = |index: u64| -> String {
        details_at(&resp, index)
            .iter()
            .map(|d| d["message"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
            .join(" | ")
    };
    // Indexes count events (blank lines are not events); messages name the line.
    assert!(has_detail(&resp, 1, "type"), "{resp}");
    assert!(message_at(1).contains("line 3"), "{resp}");
    assert!(message_at(2).contains("line 4"), "{resp}");
    assert!(message_at(2).contains("column"), "{resp}");
    assert!(has_detail(&resp, 3, "source"), "{resp}");
    assert!(message_at(3).contains("line 5"), "{resp}");
    assert!(details_at(&resp, 0).is_empty(), "{resp}");
    assert_eq!(log_len(&s), 0);
}

#[test]
fn ndjson_blank_lines_are_ignored() {
    let s = Server::start(&[]);
    let body = "\n{\"type\":\"a\"}\n\n   \n\t\r\n{\"type\":\"b\"}\r\n{\"type\":\"c\"}";
    let (status, resp) = post_ndjson(&s, body);
    assert_eq!(status, 201, "{resp}");
    assert_eq!(resp["data"]["ingested"], 3, "{resp}");
    let types: Vec<String> = s
        .export_lines()
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["type"].to_string())
        .collect();
    assert_eq!(types, ["\"a\"", "\"b\"", "\"c\""]);
}

#[test]
fn both_ndjson_content_types_are_accepted() {
    let s = Server::start(&[]);
    for ct in [
        "application/x-ndjson",
        "application/ndjson",
        "application/ndjson; charset=utf-8",
    ] {
        let (status, body) = s.post(
            "/v1/events",
            ct,
            "{\"type\":\"a\"}\n{\"type\":\"b\",\"data\":{\"k\":1}}\n",
        );
        assert_eq!(status, 201, "{ct}: {body}");
        assert_eq!(body["data"]["ingested"], 2, "{ct}: {body}");
    }
    let (status, body) = s.post(
        "/v1/events",
        "application/json; charset=utf-8",
        r#"{"type":"c"}"#,
    );
    assert_eq!(status, 201, "{body}");
    // Media types are case-insensitive (RFC 9110).
    let (status, body) = s.post("/v1/events", "Application/JSON", r#"{"type":"d"}"#);
    assert_eq!(status, 201, "{body}");
    assert_eq!(log_len(&s), 8);
}

#[test]
fn json_syntax_errors_name_line_and_column() {
    let s = Server::start(&[]);
    for (raw, line) in [
        ("{\n  \"type\": tru }", "line 2"),
        ("{\"type\":\"a\",}", "line 1"),
        (
            "{\"events\":[\n{\"type\":\"a\"},\n{\"type\":\"b\"\n]}",
            "line 4",
        ),
        ("{\"type\":\"a\"} trailing", "line 1"),
    ] {
        let (status, body) = post_raw(&s, raw.to_string());
        assert_eq!(status, 400, "{raw}: {body}");
        let text = body["error"].as_str().unwrap_or("").to_string() + &body.to_string();
        assert!(text.contains(line), "{raw}: expected {line}: {body}");
        assert!(text.contains("column"), "{raw}: {body}");
    }
    assert_eq!(log_len(&s), 0);
}

/// SPEC §5: a syntax error names the line that holds it, not the next one. serde_json
/// reports the position after the byte that revealed the error, so an error revealed by a
/// line break used to be put at column 0 of the following line. Columns count bytes.
#[test]
fn syntax_errors_name_the_line_that_holds_them() {
    let s = Server::start(&[]);
    let (status, body) = s.post_json(&json!({"events": [{"type": "a"}, {"type": "b"}]}));
    assert_eq!(status, 201, "{body}");
    let head = s.head();

    for (what, raw, position) in [
        (
            "a literal cut short before a line break",
            "{\n  \"type\": \"a\",\n  \"data\": {\n    \"x\": tru\n  }\n}",
            "line 4, column 13",
        ),
        (
            "a missing comma between members on separate lines",
            "{\n  \"type\": \"a\"\n  \"data\": {}\n}",
            "line 3, column 3",
        ),
        (
            "a string not closed before the line break",
            "{\n  \"type\": \"a\",\n  \"source\": \"gw-1\n}",
            "line 3, column 18",
        ),
        (
            "a string not closed before the end",
            "{\"type\": \"a\",\n\"source\": \"gw-1",
            "line 2, column 16",
        ),
        (
            "a trailing comma before the } on the next line",
            "{\n  \"type\": \"a\",\n  \"data\": {\"x\": 1},\n}",
            "line 3, column 19",
        ),
        (
            "an invalid escape",
            "{\n  \"type\": \"a\",\n  \"data\": {\"s\": \"C:\\qux\"}\n}",
            "line 3, column 21",
        ),
        (
            "an error on the first line",
            "{\"type\": nul,\n \"data\": {}}",
            "line 1, column 13",
        ),
        (
            "an error on the last line, without a final newline",
            "{\n  \"type\": \"a\",\n  \"data\": [1 2]}",
            "line 3, column 14",
        ),
        (
            "a batch that ends early, before trailing blank lines",
            "{\"events\": [\n  {\"type\": \"a\"},\n  {\"type\": \"b\"}\n\n  \n",
            "line 3, column 16",
        ),
    ] {
        let (status, body) = post_raw(&s, raw.to_string());
        assert_eq!(status, 400, "{what}: {body}");
        let error = body["error"].as_str().unwrap_or("");
        assert!(
            error.starts_with(&format!("invalid JSON at {position}: ")),
            "{what}: expected {position}: {body}"
        );
    }

    // NDJSON: the body's line number, and the column within that line. Line 2 is blank.
    let ndjson = "{\"type\":\"a\"}\n\n{\"type\": \"c\", \"data\": {\"x\": tru}}\n{\"type\":\"d\"";
    let (status, body) = post_ndjson(&s, ndjson);
    assert_eq!(status, 400, "{body}");
    let messages: Vec<(Value, String)> = details(&body)
        .iter()
        .map(|d| {
            (
                d["index"].clone(),
                d["message"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(messages.len(), 2, "{body}");
    assert_eq!(messages[0].0, 1, "{body}");
    assert!(
        messages[0]
            .1
            .starts_with("line 3: invalid JSON at column 32: "),
        "{body}"
    );
    assert_eq!(messages[1].0, 2, "{body}");
    assert!(
        messages[1]
            .1
            .starts_with("line 4: invalid JSON at column 12: "),
        "{body}"
    );

    // Token bodies are placed the same way.
    let (status, body) = s.post(
        "/v1/tokens",
        "application/json",
        "{\n  \"role\": \"read\",\n  \"name\": tru\n}",
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("invalid JSON at line 3, column 14: "),
        "{body}"
    );

    assert_eq!(s.head(), head, "the log is unchanged");
    assert_eq!(head["seq"], 2);
}

// ---------------------------------------------------------------------------------
// Atomicity, limits, content types
// ---------------------------------------------------------------------------------

#[test]
fn a_rejected_request_appends_nothing() {
    let s = Server::start(&[]);
    let (status, body) = s.post_json(&json!({"events": [{"type": "seed"}]}));
    assert_eq!(status, 201, "{body}");
    let head = s.head();
    let lines = s.export_lines();

    let (status, body) = s.post_json(&json!({"events": [
        {"type": "good1"}, {"type": "good2"}, {"type": "error"}, {"type": "good3"}
    ]}));
    assert_eq!(status, 400, "{body}");
    assert!(has_detail(&body, 2, "type"), "{body}");
    assert_eq!(s.head(), head);
    assert_eq!(s.export_lines(), lines);

    let (status, body) = post_ndjson(
        &s,
        "{\"type\":\"g1\"}\n{\"type\":\"g2\"}\n{\"type\":\"g3\",\"bogus\":1}\n",
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(s.head(), head);
    assert_eq!(s.export_lines(), lines);
    let (status, body) = s.get("/v1/events?types=good1,good2,g1,g2");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], json!([]), "{body}");
}

#[test]
fn too_many_events_is_413() {
    let s = Server::start(&["--max-events-per-request", "5"]);
    let five: Vec<Value> = (0..5).map(|i| json!({"type": format!("t{i}")})).collect();
    let six: Vec<Value> = (0..6).map(|i| json!({"type": format!("t{i}")})).collect();

    let (status, body) = s.post_json(&json!({"events": six}));
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "payload_too_large", "{body}");
    let ndjson6: String = six.iter().map(|e| format!("{e}\n")).collect();
    let (status, body) = post_ndjson(&s, ndjson6);
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "payload_too_large", "{body}");
    // The server closes a connection whose body it did not read; the pooled client may
    // not have seen that yet, so the log is read on a connection of its own.
    let head: Value = reqwest::blocking::Client::new()
        .get(s.url("/v1/head"))
        .bearer_auth(&s.token)
        .send()
        .expect("GET /v1/head")
        .json()
        .expect("head json");
    assert_eq!(head["data"]["seq"], 0, "{head}");

    let (status, body) = s.post_json(&json!({"events": five}));
    assert_eq!(status, 201, "{body}");
    // Blank lines do not count as events.
    let ndjson5: String = five.iter().map(|e| format!("{e}\n\n")).collect();
    let (status, body) = post_ndjson(&s, ndjson5);
    assert_eq!(status, 201, "{body}");
    assert_eq!(s.head()["seq"], 10);
}

#[test]
fn too_large_body_is_413() {
    let s = Server::start(&["--max-body-bytes", "1000"]);
    let padding = "x".repeat(1200);
    let big = json!({"type": "big", "data": padding}).to_string();
    assert!(big.len() > 1000);

    // With a Content-Length.
    let (status, body) = post_raw(&s, big.clone());
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "payload_too_large", "{body}");

    // Chunked, without a Content-Length.
    let chunked = reqwest::blocking::Body::new(std::io::Cursor::new(big.clone().into_bytes()));
    let (status, body) = post_raw(&s, chunked);
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "payload_too_large", "{body}");
    // The server closes a connection whose body it did not read; the pooled client may
    // not have seen that yet, so the log is read on a connection of its own.
    let head: Value = reqwest::blocking::Client::new()
        .get(s.url("/v1/head"))
        .bearer_auth(&s.token)
        .send()
        .expect("GET /v1/head")
        .json()
        .expect("head json");
    assert_eq!(head["data"]["seq"], 0, "{head}");

    // At the limit it is fine.
    let fill = 1000 - json!({"type": "big", "data": ""}).to_string().len();
    let exact = json!({"type": "big", "data": "y".repeat(fill)}).to_string();
    assert_eq!(exact.len(), 1000);
    let response = reqwest::blocking::Client::new()
        .post(s.url("/v1/events"))
        .bearer_auth(&s.token)
        .header("Content-Type", "application/json")
        .body(exact)
        .send()
        .expect("POST at the limit");
    assert_eq!(response.status().as_u16(), 201);
    let head: Value = reqwest::blocking::Client::new()
        .get(s.url("/v1/head"))
        .bearer_auth(&s.token)
        .send()
        .expect("GET /v1/head")
        .json()
        .expect("head json");
    assert_eq!(head["data"]["seq"], 1, "{head}");
}

#[test]
fn bodies_above_axum_default_limit_are_accepted_by_default() {
    // SPEC: the default limit is 16 MiB (and 10,000 events) per request.
    let s = Server::start(&[]);
    let pad = "p".repeat(1000);
    let body: String = (0..3000)
        .map(|i| format!("{{\"type\":\"bulk\",\"data\":{{\"i\":{i},\"pad\":\"{pad}\"}}}}\n"))
        .collect();
    assert!(body.len() > 3 * 1024 * 1024 - 100_000);
    let (status, resp) = post_ndjson(&s, body);
    assert_eq!(status, 201, "{resp}");
    assert_eq!(resp["data"]["ingested"], 3000, "{resp}");
    assert_eq!(resp["data"]["last_seq"], 3000, "{resp}");
}

#[test]
fn missing_or_other_content_type_is_415() {
    let s = Server::start(&[]);
    let event = r#"{"type":"a"}"#;
    let r = s
        .http()
        .post(s.url("/v1/events"))
        .bearer_auth(&s.token)
        .body(event)
        .send()
        .expect("POST");
    assert_eq!(r.status().as_u16(), 415);
    let body: Value = r.json().expect("JSON error body");
    assert_eq!(body["code"], "unsupported_media_type", "{body}");
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "text/json",
    ] {
        let (status, body) = s.post("/v1/events", ct, event);
        assert_eq!(status, 415, "{ct}: {body}");
        assert_eq!(body["code"], "unsupported_media_type", "{ct}: {body}");
    }
    assert_eq!(s.head()["seq"], 0);
}

#[test]
fn a_request_with_no_event_is_400() {
    let s = Server::start(&[]);
    for (ct, body) in [
        ("application/json", r#"{"events":[]}"#),
        ("application/json", ""),
        ("application/json", "   "),
        ("application/x-ndjson", ""),
        ("application/x-ndjson", "\n\n  \n"),
        ("application/ndjson", "\r\n"),
    ] {
        let (status, resp) = s.post("/v1/events", ct, body);
        assert_eq!(status, 400, "{ct} {body:?}: {resp}");
        assert!(
            resp["code"] == "validation_failed" || resp["code"] == "bad_request",
            "{resp}"
        );
    }
    // Not an event object / not an array of them.
    for body in [
        r#"[{"type":"a"}]"#,
        r#""a""#,
        "5",
        r#"{"events":{"type":"a"}}"#,
    ] {
        let (status, resp) = post_raw(&s, body.to_string());
        assert_eq!(status, 400, "{body}: {resp}");
    }
    let (status, resp) = s.post_json(&json!({"events": [{"type": "a"}, 5]}));
    assert_eq!(status, 400, "{resp}");
    assert!(
        details_at(&resp, 1).len() == 1,
        "a non-object event is a problem at its index: {resp}"
    );
    assert_eq!(s.head()["seq"], 0);
}

// ---------------------------------------------------------------------------------
// 201 body and the chain
// ---------------------------------------------------------------------------------

#[test]
fn created_response_shape_and_chain_links() {
    let s = Server::start(&[]);
    let (status, body) = s.post_json(&json!({"events": [
        {"type": "one", "data": {"n": 1}},
        {"type": "two", "source": "src"},
    ]}));
    assert_eq!(status, 201, "{body}");
    let d = &body["data"];
    assert_eq!(d["ingested"], 2, "{body}");
    assert_eq!(d["first_seq"], 1, "{body}");
    assert_eq!(d["last_seq"], 2, "{body}");
    let ids: Vec<String> = d["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    for id in &ids {
        assert!(is_ulid(id), "{id}");
    }
    assert!(ids[0] < ids[1], "{ids:?}");
    assert_eq!(d["head"]["seq"], 2, "{body}");
    assert_eq!(d["head"]["id"], ids[1].as_str(), "{body}");

    let lines = s.export_lines();
    assert_eq!(lines.len(), 2);
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["prev_hash"], ZERO_HASH);
    assert_eq!(events[1]["prev_hash"], events[0]["hash"]);
    for (line, e) in lines.iter().zip(&events) {
        assert_eq!(e["hash"], leaf_hash_of_line(line).as_str(), "{line}");
    }
    assert_eq!(events[0]["id"], ids[0].as_str());
    assert_eq!(events[1]["id"], ids[1].as_str());
    assert_eq!(events[0]["seq"], 1);
    assert_eq!(events[1]["seq"], 2);
    assert_eq!(
        d["head"]["hash"], events[1]["hash"],
        "head.hash = last hash"
    );
    let head = s.head();
    assert_eq!(head["seq"], d["head"]["seq"]);
    assert_eq!(head["id"], d["head"]["id"]);
    assert_eq!(head["hash"], d["head"]["hash"]);

    // The next request continues the chain from the previous head.
    let (status, body2) = s.post_json(&json!({"type": "three"}));
    assert_eq!(status, 201, "{body2}");
    let d2 = &body2["data"];
    assert_eq!(d2["ingested"], 1);
    assert_eq!(d2["first_seq"], 3);
    assert_eq!(d2["last_seq"], 3);
    let id3 = d2["ids"][0].as_str().expect("id").to_string();
    assert!(is_ulid(&id3) && id3 > ids[1], "{id3}");
    let (status, e3) = s.get(&format!("/v1/events/{id3}"));
    assert_eq!(status, 200, "{e3}");
    assert_eq!(e3["data"]["prev_hash"], d["head"]["hash"]);
    assert_eq!(e3["data"]["seq"], 3);
    assert_eq!(d2["head"]["hash"], e3["data"]["hash"]);
    let line3 = &s.export_lines()[2];
    assert_eq!(
        e3["data"]["hash"],
        leaf_hash_of_line(line3).as_str(),
        "{line3}"
    );
}

// ---------------------------------------------------------------------------------
// Idempotency-Key
// ---------------------------------------------------------------------------------

#[test]
fn idempotent_retry_returns_the_first_response_and_appends_nothing() {
    let s = Server::start(&[]);
    let request = json!({"events": [{"type": "a"}, {"type": "b"}]});
    let (status, first) = post_idempotent(&s, "key-1", &request);
    assert_eq!(status, 201, "{first}");
    let head = s.head();
    // Something else is appended in between: the retry still answers what it did first.
    let (status, other) = s.post_json(&json!({"type": "other"}));
    assert_eq!(status, 201, "{other}");
    let after_other = s.head();
    assert_eq!(after_other["seq"], 3);

    for _ in 0..2 {
        let (status, again) = post_idempotent(&s, "key-1", &request);
        assert_eq!(status, 201, "{again}");
        assert_eq!(again, first, "a retry must return the first response");
    }
    assert_eq!(first["data"]["head"]["hash"], head["hash"]);
    assert_eq!(s.head(), after_other, "a retry must append nothing");
    assert_eq!(log_len(&s), 3);

    // Another key with the same body is a new request.
    let (status, fresh) = post_idempotent(&s, "key-2", &request);
    assert_eq!(status, 201, "{fresh}");
    assert_eq!(fresh["data"]["first_seq"], 4);
    assert_eq!(log_len(&s), 5);
}

#[test]
fn concurrent_retries_with_one_key_append_once() {
    let s = Server::start(&[]);
    let request = json!({"events": [{"type": "x"}, {"type": "y"}, {"type": "z"}]});
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| post_idempotent(&s, "race", &request)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (status, body) in &answers {
        assert_eq!(*status, 201, "{body}");
        assert_eq!(body, &answers[0].1, "every retry gets the first response");
    }
    assert_eq!(answers[0].1["data"]["first_seq"], 1);
    assert_eq!(answers[0].1["data"]["last_seq"], 3);
    assert_eq!(log_len(&s), 3, "the key must append its events once");
    assert_eq!(s.head()["seq"], 3);
}

#[test]
fn idempotency_key_reused_with_another_body_is_422() {
    let s = Server::start(&[]);
    let (status, first) = post_idempotent(&s, "k", &json!({"type": "a"}));
    assert_eq!(status, 201, "{first}");
    let head = s.head();
    let (status, body) = post_idempotent(&s, "k", &json!({"type": "b"}));
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "idempotency_key_reused", "{body}");
    assert!(body["error"].is_string(), "{body}");
    assert_eq!(s.head(), head);
    assert_eq!(log_len(&s), 1);
    // The original body still replays.
    let (status, again) = post_idempotent(&s, "k", &json!({"type": "a"}));
    assert_eq!(status, 201, "{again}");
    assert_eq!(again, first);
}

#[test]
fn idempotency_key_survives_a_restart() {
    let mut s = Server::start(&[]);
    let request = json!({"events": [{"type": "a", "data": {"x": 1}}, {"type": "b"}]});
    let (status, first) = post_idempotent(&s, "restart-key", &request);
    assert_eq!(status, 201, "{first}");
    let status = s.terminate();
    assert!(
        status.success(),
        "graceful shutdown should exit 0: {status}"
    );

    let s2 = Server::start_on(&s.data, &[]);
    let head = s2.head();
    assert_eq!(head["seq"], 2);
    let (status, again) = post_idempotent(&s2, "restart-key", &request);
    assert_eq!(status, 201, "{again}");
    assert_eq!(again, first);
    assert_eq!(
        s2.head(),
        head,
        "the retry after a restart appended something"
    );
    let (status, body) = post_idempotent(&s2, "restart-key", &json!({"type": "c"}));
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "idempotency_key_reused", "{body}");
    assert_eq!(s2.head(), head);
}

// ---------------------------------------------------------------------------------
// Authentication basics
// ---------------------------------------------------------------------------------

#[test]
fn admin_token_file_is_private_and_holds_the_token_alone() {
    use std::os::unix::fs::PermissionsExt;
    let s = Server::start(&[]);
    let path = s.data.join("admin.token");
    let meta = std::fs::metadata(&path).expect("admin.token exists");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "admin.token mode {:o}",
        meta.permissions().mode()
    );
    let text = std::fs::read_to_string(&path).expect("read admin.token");
    let token = text.strip_suffix('\n').unwrap_or(&text);
    assert!(!token.is_empty(), "{text:?}");
    assert!(
        !token.chars().any(char::is_whitespace),
        "the token alone on one line: {text:?}"
    );
    assert!(
        text == format!("{token}\n") || text == token,
        "one line only: {text:?}"
    );
    // It works.
    let r = s
        .http()
        .get(s.url("/v1/head"))
        .bearer_auth(token)
        .send()
        .expect("GET");
    assert_eq!(r.status().as_u16(), 200);
    // The secret is never logged.
    let log = s.log.lock().unwrap().clone();
    assert!(!log.contains(token), "the token appears in the log:\n{log}");
}

#[test]
fn missing_or_unknown_token_is_401() {
    let s = Server::start(&[]);
    let http = s.http();
    let check = |r: reqwest::blocking::Response, what: &str| {
        assert_eq!(r.status().as_u16(), 401, "{what}");
        let body: Value = r.json().expect("JSON 401 body");
        assert_eq!(body["code"], "unauthorized", "{what}: {body}");
        assert!(body["error"].is_string(), "{what}: {body}");
    };
    check(http.get(s.url("/v1/head")).send().unwrap(), "no token");
    check(
        http.get(s.url("/v1/head"))
            .bearer_auth("cairn_0000000000000000_deadbeef")
            .send()
            .unwrap(),
        "unknown token",
    );
    check(
        http.get(s.url("/v1/head"))
            .bearer_auth(format!("{}x", s.token))
            .send()
            .unwrap(),
        "altered token",
    );
    check(
        http.get(s.url("/v1/head")).bearer_auth("").send().unwrap(),
        "empty token",
    );
    check(
        http.get(s.url("/v1/head?token=nope")).send().unwrap(),
        "unknown ?token=",
    );
    check(
        http.post(s.url("/v1/events"))
            .header("content-type", "application/json")
            .body(r#"{"type":"a"}"#)
            .send()
            .unwrap(),
        "ingest without token",
    );
    check(
        http.get(s.url("/v1/events")).send().unwrap(),
        "query without token",
    );
    check(
        http.get(s.url("/v1/export")).send().unwrap(),
        "export without token",
    );
    check(
        http.get(s.url("/v1/verify")).send().unwrap(),
        "verify without token",
    );
    assert_eq!(s.head()["seq"], 0, "an unauthorized append went through");
}

#[test]
fn query_string_token_is_accepted() {
    let s = Server::start(&[]);
    let http = s.http();
    let r = http
        .post(s.url(&format!("/v1/events?token={}", s.token)))
        .header("content-type", "application/json")
        .body(r#"{"type":"via-query"}"#)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = http
        .get(s.url(&format!("/v1/head?token={}", s.token)))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().unwrap();
    assert_eq!(body["data"]["seq"], 1, "{body}");
    let r = http
        .get(s.url(&format!("/v1/events?types=via-query&token={}", s.token)))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().unwrap();
    assert_eq!(body["data"][0]["type"], "via-query", "{body}");
    // A token given in the URL is never logged.
    let log = s.log.lock().unwrap().clone();
    assert!(
        !log.contains(&s.token),
        "the token appears in the log:\n{log}"
    );
}

#[test]
fn auth_off_needs_no_token() {
    let s = Server::start(&["--auth", "off"]);
    let http = s.http();
    let r = http
        .post(s.url("/v1/events"))
        .header("content-type", "application/json")
        .body(r#"{"type":"open-door"}"#)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = http.get(s.url("/v1/head")).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().unwrap();
    assert_eq!(body["data"]["seq"], 1, "{body}");
    let r = http.get(s.url("/v1/export")).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().unwrap().contains("open-door"));
    let log = s.log.lock().unwrap().clone();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.to_lowercase().contains("auth")),
        "--auth off must log a warning at start:\n{log}"
    );
}

#[test]
fn healthz_needs_no_token() {
    let s = Server::start(&[]);
    let r = s.http().get(s.url("/healthz")).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().unwrap();
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["head"]["seq"], 0, "{body}");
    assert_eq!(body["head"]["hash"], ZERO_HASH, "{body}");
    assert!(body["connections"].is_u64(), "{body}");
    assert!(
        body.get("data").is_none(),
        "healthz is a bare object: {body}"
    );

    let (status, ing) = s.post_json(&json!({"type": "a"}));
    assert_eq!(status, 201, "{ing}");
    let body: Value = s
        .http()
        .get(s.url("/healthz"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(body["head"]["seq"], 1, "{body}");
    assert_eq!(body["head"]["hash"], ing["data"]["head"]["hash"], "{body}");
}

// ---------------------------------------------------------------------------------
// Routes and errors
// ---------------------------------------------------------------------------------

#[test]
fn unknown_routes_are_404_json_with_or_without_a_token() {
    let s = Server::start(&[]);
    for path in [
        "/v1/nope",
        "/nope",
        "/v2/events",
        "/v1/events/01JD8X4Q1T6G5N2B3C4D5E6F7G/extra",
        "/v1/head/x",
    ] {
        for token in [Some(s.token.as_str()), None, Some("cairn_bogus_token")] {
            let mut req = s.http().get(s.url(path));
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            let r = req.send().unwrap();
            assert_eq!(r.status().as_u16(), 404, "{path} token={token:?}");
            let body: Value = r.json().expect("JSON 404 body");
            assert_eq!(body["code"], "not_found", "{path}: {body}");
            assert!(body["error"].is_string(), "{path}: {body}");
        }
    }
    let r = s
        .http()
        .post(s.url("/v1/nothing"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[test]
fn wrong_method_is_405_json_with_allow() {
    let s = Server::start(&[]);
    let cases: [(reqwest::Method, &str, &[&str], &[&str]); 7] = [
        (reqwest::Method::DELETE, "/v1/events", &["GET", "POST"], &[]),
        (reqwest::Method::PUT, "/v1/events", &["GET", "POST"], &[]),
        (reqwest::Method::POST, "/v1/head", &["GET"], &["POST"]),
        (reqwest::Method::DELETE, "/v1/verify", &["GET"], &["POST"]),
        (reqwest::Method::POST, "/healthz", &["GET"], &["POST"]),
        (
            reqwest::Method::PATCH,
            "/v1/tokens",
            &["GET", "POST"],
            &["PATCH"],
        ),
        (
            reqwest::Method::GET,
            "/v1/tokens/abc",
            &["DELETE"],
            &["GET"],
        ),
    ];
    for (method, path, allowed, not_allowed) in cases {
        let r = s
            .http()
            .request(method.clone(), s.url(path))
            .bearer_auth(&s.token)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 405, "{method} {path}");
        let allow = r
            .headers()
            .get("allow")
            .unwrap_or_else(|| panic!("{method} {path}: no Allow header"))
            .to_str()
            .unwrap()
            .to_string();
        let listed: Vec<String> = allow.split(',').map(|m| m.trim().to_string()).collect();
        for m in allowed {
            assert!(listed.iter().any(|l| l == m), "{method} {path}: {allow}");
        }
        for m in not_allowed {
            assert!(!listed.iter().any(|l| l == m), "{method} {path}: {allow}");
        }
        let body: Value = r.json().expect("JSON 405 body");
        assert_eq!(body["code"], "method_not_allowed", "{body}");
    }
    assert_eq!(s.head()["seq"], 0);
}

#[test]
fn event_by_id_and_404s() {
    let s = Server::start(&[]);
    let (status, body) = s.post_json(&json!({"events": [
        {"type": "a", "data": {"k": "v"}, "source": "me"},
        {"type": "b"},
    ]}));
    assert_eq!(status, 201, "{body}");
    let lines = s.export_lines();
    for (i, id) in body["data"]["ids"].as_array().unwrap().iter().enumerate() {
        let id = id.as_str().unwrap();
        let (status, text) = s.get_text(&format!("/v1/events/{id}"));
        assert_eq!(status, 200, "{text}");
        // Exactly {"data": <the event as every API serves it>}.
        assert_eq!(text, format!("{{\"data\":{}}}", lines[i]));
    }
    for missing in [
        "01JD8X4Q1T6G5N2B3C4D5E6F7G".to_string(),
        "00000000000000000000000000".to_string(),
        "7ZZZZZZZZZZZZZZZZZZZZZZZZZ".to_string(),
        "not-a-ulid".to_string(),
        "8ZZZZZZZZZZZZZZZZZZZZZZZZZ".to_string(),
        "01JD8X4Q1T6G5N2B3C4D5E6F7".to_string(),
        "01JD8X4Q1T6G5N2B3C4D5E6F7GG".to_string(),
        "01JD8X4Q1T6G5N2B3C4D5E6F7U".to_string(),
        "1".to_string(),
    ] {
        let (status, body) = s.get(&format!("/v1/events/{missing}"));
        assert_eq!(status, 404, "{missing}: {body}");
        assert_eq!(body["code"], "not_found", "{missing}: {body}");
    }
}

#[test]
fn head_of_an_empty_log() {
    let s = Server::start(&[]);
    let (status, body) = s.get("/v1/head");
    assert_eq!(status, 200, "{body}");
    let h = &body["data"];
    assert_eq!(h["seq"], 0, "{body}");
    assert!(h["id"].is_null(), "{body}");
    assert!(h["timestamp"].is_null(), "{body}");
    assert_eq!(h["hash"], ZERO_HASH, "{body}");
    let obj = h.as_object().unwrap();
    assert!(
        obj.contains_key("id") && obj.contains_key("timestamp"),
        "{body}"
    );

    let (status, ing) = s.post_json(&json!({"type": "first"}));
    assert_eq!(status, 201, "{ing}");
    let line = &s.export_lines()[0];
    let e: Value = serde_json::from_str(line).unwrap();
    assert_eq!(
        e["prev_hash"], ZERO_HASH,
        "first prev_hash = empty head hash"
    );
    let h = s.head();
    assert_eq!(h["seq"], 1);
    assert_eq!(h["id"], e["id"]);
    assert_eq!(h["hash"], e["hash"]);
    assert_eq!(h["timestamp"], e["timestamp"]);
}

#[test]
fn verify_whole_log_and_ranges() {
    let s = Server::start(&[]);
    let (status, body) = s.get("/v1/verify");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["ok"], true, "{body}");
    assert_eq!(body["data"]["checked"], 0, "{body}");

    let events: Vec<Value> = (0..5).map(|i| json!({"type": format!("v{i}")})).collect();
    let (status, ing) = s.post_json(&json!({"events": events}));
    assert_eq!(status, 201, "{ing}");
    let lines: Vec<Value> = s
        .export_lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    let (status, body) = s.get("/v1/verify");
    assert_eq!(status, 200, "{body}");
    let d = &body["data"];
    assert_eq!(d["ok"], true, "{body}");
    assert_eq!(d["checked"], 5, "{body}");
    assert_eq!(d["head"]["seq"], 5, "{body}");
    assert_eq!(d["head"]["hash"], lines[4]["hash"], "{body}");
    assert_eq!(d["head"]["id"], lines[4]["id"], "{body}");

    for (from, to, checked) in [(2, 4, 3), (1, 1, 1), (5, 5, 1), (3, 5, 3), (1, 5, 5)] {
        let (status, body) = s.get(&format!("/v1/verify?from_seq={from}&to_seq={to}"));
        assert_eq!(status, 200, "{from}..{to}: {body}");
        let d = &body["data"];
        assert_eq!(d["ok"], true, "{from}..{to}: {body}");
        assert_eq!(d["checked"], checked, "{from}..{to}: {body}");
        assert_eq!(d["head"]["seq"], to, "{from}..{to}: {body}");
        assert_eq!(
            d["head"]["hash"],
            lines[to as usize - 1]["hash"],
            "{from}..{to}: {body}"
        );
    }
    let (status, body) = s.get("/v1/verify?from_seq=3");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["checked"], 3, "{body}");
    let (status, body) = s.get("/v1/verify?to_seq=2");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["checked"], 2, "{body}");
    assert_eq!(body["data"]["head"]["seq"], 2, "{body}");
}

#[test]
fn verify_rejects_out_of_range_parameters() {
    let s = Server::start(&[]);
    let events: Vec<Value> = (0..3).map(|i| json!({"type": format!("v{i}")})).collect();
    let (status, ing) = s.post_json(&json!({"events": events}));
    assert_eq!(status, 201, "{ing}");
    for (query, param) in [
        ("to_seq=4", "to_seq"),
        ("from_seq=0", "from_seq"),
        ("from_seq=4", "from_seq"),
        ("from_seq=-1", "from_seq"),
        ("from_seq=abc", "from_seq"),
        ("from_seq=%2B1", "from_seq"),
        ("to_seq=99999999999999999999999", "to_seq"),
        ("to_seq=", "to_seq"),
        ("to_seq=0", "to_seq"),
        ("from_seq=3&to_seq=2", "from_seq"),
    ] {
        let (status, body) = s.get(&format!("/v1/verify?{query}"));
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body.to_string().contains(param),
            "{query}: the error should name {param}: {body}"
        );
    }
}

// ---------------------------------------------------------------------------------
// Query parameters
// ---------------------------------------------------------------------------------

#[test]
fn malformed_query_parameters_are_400_naming_the_parameter() {
    let s = Server::start(&[]);
    let (status, body) = s.post_json(&json!({"type": "a"}));
    assert_eq!(status, 201, "{body}");
    for (query, param) in [
        ("since=yesterday", "since"),
        ("since=", "since"),
        ("since=8ZZZZZZZZZZZZZZZZZZZZZZZZZ", "since"),
        ("since=2026-13-01T00:00:00Z", "since"),
        ("until=notatime", "until"),
        ("until=earliest", "until"),
        ("until=2026-03-19T10:00:00", "until"),
        ("types=", "types"),
        ("types=a,,b", "types"),
        ("types=bad%20type", "types"),
        ("types=a*b", "types"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("limit=%2B5", "limit"),
        ("limit=", "limit"),
        ("order=sideways", "order"),
        ("order=", "order"),
        ("order=ASCENDING", "order"),
        ("source=", "source"),
    ] {
        let (status, body) = s.get(&format!("/v1/events?{query}"));
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"].as_str().unwrap_or("").contains(param),
            "{query}: the error should name {param}: {body}"
        );
    }
    // The same cursor and filter checks on export.
    for (query, param) in [
        ("since=nope", "since"),
        ("until=nope", "until"),
        ("types=x%20y", "types"),
    ] {
        let (status, body) = s.get(&format!("/v1/export?{query}"));
        assert_eq!(status, 400, "export {query}: {body}");
        assert!(
            body["error"].as_str().unwrap_or("").contains(param),
            "export {query}: {body}"
        );
    }
    // Valid forms are fine.
    for query in [
        "limit=1",
        "limit=1000",
        "order=asc",
        "order=desc",
        "since=earliest",
        "since=2020-01-01T00:00:00Z",
        "until=9999-01-01T00:00:00Z",
        "since=00000000000000000000000000",
    ] {
        let (status, body) = s.get(&format!("/v1/events?{query}"));
        assert_eq!(status, 200, "{query}: {body}");
        assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "{query}");
    }
}

#[test]
fn types_filter_exact_and_prefix() {
    let s = Server::start(&[]);
    let types = [
        "agent.created",
        "audit",
        "agent.deleted",
        "auditx",
        "agentx",
        "agent",
        "login",
    ];
    let events: Vec<Value> = types.iter().map(|t| json!({"type": t})).collect();
    let (status, body) = s.post_json(&json!({"events": events}));
    assert_eq!(status, 201, "{body}");

    assert_eq!(query_types(&s, "types=audit"), ["audit"]);
    assert_eq!(
        query_types(&s, "types=agent.*"),
        ["agent.created", "agent.deleted"]
    );
    assert_eq!(
        query_types(&s, "types=agent*"),
        ["agent.created", "agent.deleted", "agentx", "agent"]
    );
    assert_eq!(
        query_types(&s, "types=audit,agent.*"),
        ["agent.created", "audit", "agent.deleted"]
    );
    assert_eq!(query_types(&s, "types=audit*"), ["audit", "auditx"]);
    assert_eq!(query_types(&s, "types=*"), types);
    assert!(query_types(&s, "types=nothing").is_empty());
    assert!(query_types(&s, "types=AUDIT").is_empty(), "case-sensitive");
    assert_eq!(
        query_types(&s, "types=login,agent&order=desc"),
        ["login", "agent"]
    );
    // Export uses the same filter.
    let (status, text) = s.get_text("/v1/export?types=agent.*");
    assert_eq!(status, 200, "{text}");
    let exported: Vec<String> = text
        .split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(exported, ["agent.created", "agent.deleted"]);
}

#[test]
fn source_filter_is_exact() {
    let s = Server::start(&[]);
    let (status, body) = s.post_json(&json!({"events": [
        {"type": "t1", "source": "db-1"},
        {"type": "t2", "source": "db-10"},
        {"type": "t3", "source": "db"},
        {"type": "t4"},
        {"type": "t5", "source": "DB-1"},
        {"type": "t6", "source": "db-1"},
        {"type": "t7", "source": "ü src"},
    ]}));
    assert_eq!(status, 201, "{body}");
    assert_eq!(query_types(&s, "source=db-1"), ["t1", "t6"]);
    assert_eq!(query_types(&s, "source=db"), ["t3"]);
    assert_eq!(query_types(&s, "source=DB-1"), ["t5"]);
    assert!(query_types(&s, "source=db-").is_empty());
    assert!(query_types(&s, "source=db*").is_empty(), "no patterns");
    assert_eq!(query_types(&s, "source=%C3%BC%20src"), ["t7"]);
    assert_eq!(query_types(&s, "source=db-1&types=t6"), ["t6"]);
}

// ---------------------------------------------------------------------------------
// Data directory lock
// ---------------------------------------------------------------------------------

#[test]
fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let s = Server::start(&[]);
    let (status, body) = s.post_json(&json!({"type": "a"}));
    assert_eq!(status, 201, "{body}");
    let (code, stderr) = run_bounded(
        &[
            "serve".as_ref(),
            "--data".as_ref(),
            s.data.as_os_str(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
        ],
        Duration::from_secs(30),
    );
    assert!(
        code.is_some_and(|c| c != 0),
        "second serve exited with {code:?}; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("in use"),
        "the error should say the directory is in use:\n{stderr}"
    );
    assert!(
        stderr.contains(&s.data.display().to_string()),
        "the error should name the directory:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
    // The first server is unharmed.
    assert_eq!(s.head()["seq"], 1);
    let (status, body) = s.post_json(&json!({"type": "b"}));
    assert_eq!(status, 201, "{body}");
}

#[test]
fn offline_verify_while_the_server_runs_points_to_url() {
    let s = Server::start(&[]);
    let (status, body) = s.post_json(&json!({"type": "a"}));
    assert_eq!(status, 201, "{body}");
    let data = s.data.to_str().expect("utf-8 path");
    let (code, stdout, stderr) = cairn(&["verify", "--data", data], &[]);
    assert_ne!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    assert!(stderr.contains("--url"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(s.head()["seq"], 1);
    // --url works against the running server.
    let url = format!("http://{}", s.addr);
    let (code, stdout, stderr) = cairn(&["verify", "--url", &url, "--token", &s.token], &[]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
}
