//! Operations (SPEC §2): `/metrics` in Prometheus text, counting what happened, and
//! `--log-format json`.
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, Server, wait_until};
use serde_json::{Value, json};

#[test]
fn metrics_count_ingest_rejections_streams_and_the_log() {
    let s = Server::start(&[]);
    let r = s
        .http()
        .get(s.url("/metrics"))
        .send()
        .expect("GET /metrics");
    assert_eq!(r.status().as_u16(), 200, "no token needed");
    let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");

    // A stream open while events arrive.
    let mut stream = s
        .http()
        .get(s.url("/v1/events/stream?since=earliest"))
        .bearer_auth(&s.token)
        .send()
        .expect("stream");
    assert_eq!(stream.status().as_u16(), 200);
    wait_until(Duration::from_secs(10), "the stream to be counted", || {
        s.metric("cairn_streams_open") == 1.0
    });

    let batch: String = (0..5)
        .map(|i| json!({"type": "a", "data": {"i": i}}).to_string() + "\n")
        .collect();
    assert_eq!(s.post("/v1/events", "application/x-ndjson", batch).0, 201);
    for i in 0..3 {
        assert_eq!(s.post_json(&json!({"type": "b", "data": {"i": i}})).0, 201);
    }
    // Rejected: invalid (twice), unauthorized, unknown route.
    assert_eq!(s.post_json(&json!({"data": {}})).0, 400);
    assert_eq!(s.post_json(&json!({"type": ""})).0, 400);
    let r = s.http().get(s.url("/v1/head")).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(s.get("/v1/nope").0, 404);

    // The stream delivers all 8 (read them, so delivery is done).
    let mut got = 0;
    let mut reader = BufReader::new(&mut stream);
    let mut line = String::new();
    while got < 8 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended");
        if line.starts_with("data: {") && line.contains("\"seq\"") {
            got += 1;
        }
    }
    wait_until(Duration::from_secs(10), "8 deliveries counted", || {
        s.metric("cairn_events_delivered_total") >= 8.0
    });

    let text = s
        .http()
        .get(s.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        text.contains("# TYPE cairn_ingest_duration_seconds histogram"),
        "{text}"
    );
    let m = s.metrics();
    let value = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("{k} missing from /metrics"))
    };
    assert_eq!(value("cairn_events_ingested_total"), 8.0);
    assert_eq!(value("cairn_log_events"), 8.0);
    assert!(value("cairn_log_bytes") > 0.0);
    assert_eq!(value("cairn_streams_open"), 1.0);
    assert_eq!(value("cairn_stream_catchup_total"), 0.0);
    assert_eq!(
        value(r#"cairn_requests_rejected_total{code="validation_failed"}"#),
        2.0
    );
    assert_eq!(
        value(r#"cairn_requests_rejected_total{code="unauthorized"}"#),
        1.0
    );
    assert_eq!(
        value(r#"cairn_requests_rejected_total{code="not_found"}"#),
        1.0
    );
    // 4 accepted and 2 refused ingest requests were timed; each accepted one waited for
    // one or more fsyncs.
    assert_eq!(value("cairn_ingest_duration_seconds_count"), 6.0);
    assert!(value("cairn_ingest_duration_seconds_sum") > 0.0);
    assert!(value(r#"cairn_ingest_duration_seconds_bucket{le="+Inf"}"#) == 6.0);
    let fsyncs = value("cairn_fsync_duration_seconds_count");
    assert!(
        (1.0..=4.0).contains(&fsyncs),
        "{fsyncs} fsyncs for 4 appends"
    );

    drop(reader);
    drop(stream);
    wait_until(
        Duration::from_secs(10),
        "the closed stream to be uncounted",
        || s.metric("cairn_streams_open") == 0.0,
    );
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(BIN)
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(tmp.path().join("data"))
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let listening = loop {
        let line = lines
            .next()
            .expect("a log line before listening")
            .expect("utf-8");
        let entry: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_eq!(entry["level"], "INFO", "{line}");
        assert!(entry["timestamp"].is_string(), "{line}");
        seen.push(
            entry["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
        if entry["fields"]["message"] == "listening" {
            break entry;
        }
    };
    assert!(
        listening["fields"]["addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(
        seen.iter().any(|m| m == "created the first admin token"),
        "{seen:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
