//! `GET /v1/events/stream` (SPEC §2 "Cursors and filters", "Stream", and §5) against the
//! real binary, read with a real SSE client (reqwest + eventsource-stream), or, where the
//! SSE parser hides what is checked (comments, `id:`-only frames, raw bytes), with a
//! small frame splitter over the raw body.
mod common;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Server, wait_until};
use eventsource_stream::{Event as SseEvent, EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};
use ulid::Ulid;

const ZERO_ULID: &str = "00000000000000000000000000";
const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Longest wait for one frame (the machine is shared; this is a deadline, not a pace).
const READ: Duration = Duration::from_secs(30);

type SseStream =
    Pin<Box<dyn Stream<Item = Result<SseEvent, EventStreamError<reqwest::Error>>> + Send>>;
type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// An async client for streams: no overall timeout, one connection per stream.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .expect("async http client")
}

fn stream_url(s: &Server, query: &str) -> String {
    s.url(&format!("/v1/events/stream{query}"))
}

async fn get_stream(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    last_event_id: Option<&str>,
) -> reqwest::Response {
    let mut request = http.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    tokio::time::timeout(READ, request.send())
        .await
        .expect("no response headers in time")
        .expect("GET stream")
}

fn content_type(r: &reqwest::Response) -> String {
    r.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Asserts a 200 event stream and returns it as SSE events.
async fn sse(response: reqwest::Response) -> SseStream {
    let status = response.status();
    let ctype = content_type(&response);
    if status != 200 {
        let body = response.text().await.unwrap_or_default();
        panic!("stream answered {status}: {body}");
    }
    assert!(
        ctype.starts_with("text/event-stream"),
        "content-type {ctype}"
    );
    Box::pin(response.bytes_stream().eventsource())
}

async fn next_event(es: &mut SseStream) -> SseEvent {
    match tokio::time::timeout(READ, es.next()).await {
        Err(_) => panic!("no SSE event within {READ:?}"),
        Ok(None) => panic!("the stream ended"),
        Ok(Some(Err(e))) => panic!("stream error: {e}"),
        Ok(Some(Ok(event))) => event,
    }
}

/// Checks the `connected` frame (SPEC "Frames" 1) and returns its data.
fn check_connected(event: &SseEvent) -> Value {
    assert_eq!(event.event, "connected", "first frame: {event:?}");
    assert_eq!(
        event.retry,
        Some(Duration::from_millis(2000)),
        "first frame: {event:?}"
    );
    let data: Value = serde_json::from_str(&event.data).expect("connected data is JSON");
    assert_eq!(data["type"], "connected", "{data}");
    assert_eq!(
        data["cursor"].as_str(),
        Some(event.id.as_str()),
        "the frame id is the cursor: {data}"
    );
    let head = &data["head"];
    assert!(head["seq"].is_u64(), "head.seq: {data}");
    assert!(head["hash"].is_string(), "head.hash: {data}");
    assert!(head.get("id").is_some(), "head.id: {data}");
    data
}

/// Opens a stream, reads its `connected` frame, returns the stream and that frame's data.
async fn open(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    last_event_id: Option<&str>,
) -> (SseStream, Value) {
    let mut es = sse(get_stream(http, url, Some(token), last_event_id).await).await;
    let first = next_event(&mut es).await;
    let data = check_connected(&first);
    (es, data)
}

/// The next `n` events (not `connected`), each checked against its own data line.
async fn take(es: &mut SseStream, n: usize) -> Vec<SseEvent> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let event = next_event(es).await;
        let parsed: Value = serde_json::from_str(&event.data)
            .unwrap_or_else(|e| panic!("data is not JSON ({e}): {:?}", event.data));
        assert_eq!(parsed["id"].as_str(), Some(event.id.as_str()), "{event:?}");
        assert_eq!(
            parsed["type"].as_str(),
            Some(event.event.as_str()),
            "{event:?}"
        );
        out.push(event);
    }
    out
}

fn ids(events: &[SseEvent]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

/// Runs a blocking harness call; allowed inside `Runtime::block_on` too (reqwest's
/// blocking client must not run in an async context).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Appends events in one request; returns their ids.
fn append(s: &Server, events: &[Value]) -> Vec<String> {
    let (status, body) = blocking(|| s.post_json(&json!({ "events": events })));
    assert_eq!(status, 201, "{body}");
    body["data"]["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect()
}

fn append_n(s: &Server, event_type: &str, n: usize) -> Vec<String> {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({"type": event_type, "data": {"i": i}}))
        .collect();
    append(s, &events)
}

/// Export lines by id.
fn export_by_id(s: &Server) -> HashMap<String, String> {
    blocking(|| s.export_lines())
        .into_iter()
        .map(|line| {
            let v: Value = serde_json::from_str(&line).expect("export line");
            (v["id"].as_str().expect("id").to_string(), line)
        })
        .collect()
}

fn export_ids(s: &Server) -> Vec<String> {
    blocking(|| s.export_lines())
        .iter()
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("export line");
            v["id"].as_str().expect("id").to_string()
        })
        .collect()
}

fn connections(s: &Server) -> u64 {
    let (status, body) = blocking(|| s.get("/healthz"));
    assert_eq!(status, 200, "{body}");
    body["connections"].as_u64().expect("connections")
}

fn ms_of(id: &str) -> u64 {
    Ulid::from_string(id).expect("ulid").timestamp_ms()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// An RFC 3339 time for a Unix millisecond, written with the given UTC offset.
fn rfc3339(ms: u64, offset_hours: i8) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .expect("time")
        .to_offset(time::UtcOffset::from_hms(offset_hours, 0, 0).expect("offset"));
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

/// Two groups of events whose ids lie in different milliseconds: every id of `b` has a
/// later millisecond than every id of `a`.
fn two_groups(s: &Server) -> (Vec<String>, Vec<String>) {
    let a = append_n(s, "group.a", 3);
    let last_a = ms_of(a.last().expect("a"));
    wait_until(Duration::from_secs(10), "the clock to pass group a", || {
        now_ms() > last_a + 1
    });
    let b = append_n(s, "group.b", 3);
    assert!(
        ms_of(&b[0]) > last_a,
        "ids carry the ingest time: {a:?} {b:?}"
    );
    (a, b)
}

/// SSE frames from the raw body, for what the SSE parser does not dispatch (comments,
/// `id:`-only frames). The server writes LF line ends.
struct RawFrames {
    body: ByteStream,
    buf: Vec<u8>,
    /// Every byte received so far.
    all: Vec<u8>,
}

impl RawFrames {
    fn new(response: reqwest::Response) -> RawFrames {
        assert_eq!(response.status(), 200);
        RawFrames {
            body: Box::pin(response.bytes_stream()),
            buf: Vec::new(),
            all: Vec::new(),
        }
    }

    /// The lines of the next frame; `None` at a clean end of the body.
    async fn frame(&mut self) -> Option<Vec<String>> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let text = std::str::from_utf8(&frame[..pos]).expect("UTF-8 frame");
                return Some(text.split('\n').map(str::to_string).collect());
            }
            match tokio::time::timeout(READ, self.body.next()).await {
                Err(_) => panic!("no frame within {READ:?}; pending bytes {:?}", self.buf),
                Ok(Some(Ok(chunk))) => {
                    self.all.extend_from_slice(&chunk);
                    self.buf.extend_from_slice(&chunk);
                }
                Ok(Some(Err(e))) => panic!("stream error: {e}"),
                Ok(None) => {
                    assert!(self.buf.is_empty(), "body ended mid-frame: {:?}", self.buf);
                    return None;
                }
            }
        }
    }

    async fn expect_frame(&mut self) -> Vec<String> {
        self.frame().await.expect("the stream ended")
    }
}

/// Parses an error response: status, that it is JSON (not a stream), and its body.
async fn error_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let ctype = content_type(&response);
    assert!(
        ctype.starts_with("application/json"),
        "an error is JSON, not a stream: {ctype}"
    );
    let text = tokio::time::timeout(READ, response.text())
        .await
        .expect("error body in time")
        .expect("error body");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(body["error"].is_string(), "{body}");
    (status, body)
}

// ---------------------------------------------------------------------------------------
// headers and the first frame
// ---------------------------------------------------------------------------------------

#[test]
fn response_headers_and_never_compressed() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    append_n(&s, "audit", 3);
    rt.block_on(async {
        let response = http
            .get(stream_url(&s, "?since=earliest"))
            .bearer_auth(&s.token)
            .header("Accept-Encoding", "gzip, br")
            .send()
            .await
            .expect("GET stream");
        assert_eq!(response.status(), 200);
        let h = response.headers();
        let header = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(
            header("content-type")
                .as_deref()
                .map(|c| c.split(';').next().unwrap_or("").trim()),
            Some("text/event-stream")
        );
        assert_eq!(header("cache-control").as_deref(), Some("no-cache"));
        assert_eq!(header("x-accel-buffering").as_deref(), Some("no"));
        assert_eq!(
            header("content-encoding"),
            None,
            "streams are never compressed"
        );
        // The bytes are plain SSE text.
        let mut raw = RawFrames::new(response);
        let first = raw.expect_frame().await;
        assert_eq!(first[0], "retry: 2000", "{first:?}");
        for _ in 0..3 {
            let frame = raw.expect_frame().await;
            assert!(frame[0].starts_with("id: "), "{frame:?}");
        }
    });
}

#[test]
fn connected_frame_on_an_empty_log_has_the_zero_cursor() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    rt.block_on(async {
        for query in ["", "?since=earliest"] {
            let response = get_stream(&http, &stream_url(&s, query), Some(&s.token), None).await;
            let mut raw = RawFrames::new(response);
            let lines = raw.expect_frame().await;
            assert_eq!(lines.len(), 4, "{lines:?}");
            assert_eq!(lines[0], "retry: 2000");
            assert_eq!(lines[1], format!("id: {ZERO_ULID}"));
            assert_eq!(lines[2], "event: connected");
            let data: Value =
                serde_json::from_str(lines[3].strip_prefix("data: ").expect("data line"))
                    .expect("JSON");
            assert_eq!(data["type"], "connected");
            assert_eq!(data["cursor"], ZERO_ULID, "{query}: {data}");
            assert_eq!(data["head"]["seq"], 0, "{data}");
            assert_eq!(data["head"]["id"], Value::Null, "{data}");
            assert_eq!(data["head"]["hash"], ZERO_HASH, "{data}");
        }
    });
}

#[test]
fn connected_cursor_follows_the_start_position() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    let ids = append_n(&s, "audit", 4);
    let head = s.head();
    assert_eq!(head["id"].as_str(), Some(ids[3].as_str()));
    let not_stored = Ulid::from_parts(ms_of(&ids[1]), 7).to_string();
    let cases = [
        ("?since=earliest".to_string(), ZERO_ULID.to_string()),
        (String::new(), ids[3].clone()),
        (format!("?since={}", ids[1]), ids[1].clone()),
        (format!("?since={not_stored}"), not_stored.clone()),
    ];
    rt.block_on(async {
        for (query, cursor) in cases {
            let (_es, data) = open(&http, &stream_url(&s, &query), &s.token, None).await;
            assert_eq!(data["cursor"].as_str(), Some(cursor.as_str()), "{query}");
            assert_eq!(data["head"]["seq"], head["seq"], "{query}: {data}");
            assert_eq!(data["head"]["id"], head["id"], "{query}: {data}");
            assert_eq!(data["head"]["hash"], head["hash"], "{query}: {data}");
        }
    });
}

#[test]
fn event_frames_carry_id_type_and_the_export_line() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    append(
        &s,
        &[
            json!({"type": "tool_call", "source": "db-production", "data": {"b": [1, 2.5, "x"], "a": {"z": null}}}),
            json!({"type": "agent.created", "timestamp": "2026-03-19T10:00:00.100+02:00"}),
        ],
    );
    rt.block_on(async {
        let (mut es, _) = open(&http, &stream_url(&s, "?since=earliest"), &s.token, None).await;
        let mut got = take(&mut es, 2).await;
        // And a live one, with unicode the JCS line keeps unescaped.
        append(
            &s,
            &[json!({"type": "audit", "source": "ü", "data": {"msg": "é\u{2028}ü", "n": 1e21}})],
        );
        got.extend(take(&mut es, 1).await);
        let export = export_by_id(&s);
        assert_eq!(export.len(), 3);
        for event in &got {
            let line = export.get(&event.id).expect("event is in the export");
            assert_eq!(&event.data, line, "data is exactly the export line");
            let v: Value = serde_json::from_str(line).expect("line");
            assert_eq!(v["type"].as_str(), Some(event.event.as_str()));
        }
        assert_eq!(ids(&got), export_ids(&s), "log order");
    });
}

// ---------------------------------------------------------------------------------------
// where delivery starts
// ---------------------------------------------------------------------------------------

#[test]
fn since_earliest_replays_everything_then_continues_live_without_gap_or_duplicate() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    append_n(&s, "before", 50);
    let url = stream_url(&s, "?since=earliest");
    std::thread::scope(|scope| {
        // Appends race with the switch from stored history to live events.
        let appender = scope.spawn(|| {
            for _ in 0..30 {
                append_n(&s, "during", 5);
            }
        });
        let (mut es, data) = rt.block_on(open(&http, &url, &s.token, None));
        assert_eq!(data["cursor"], ZERO_ULID);
        appender.join().expect("appender");
        let got = rt.block_on(take(&mut es, 200));
        assert_eq!(ids(&got), export_ids(&s), "every event once, in log order");
        let live = append_n(&s, "after", 3);
        let got = rt.block_on(take(&mut es, 3));
        assert_eq!(ids(&got), live);
    });
}

#[test]
fn since_ulid_is_exclusive_also_for_an_id_that_is_not_stored() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    let (a, b) = two_groups(&s);
    // Between the last id of group a and the first of group b, stored nowhere.
    let between = Ulid::from_parts(ms_of(&a[2]), (1u128 << 80) - 1).to_string();
    assert!(between.as_str() > a[2].as_str() && between.as_str() < b[0].as_str());
    rt.block_on(async {
        // A stored id: delivery starts right after it.
        let (mut es, _) = open(
            &http,
            &stream_url(&s, &format!("?since={}", a[0])),
            &s.token,
            None,
        )
        .await;
        let got = take(&mut es, 5).await;
        let expected: Vec<String> = a[1..].iter().chain(&b).cloned().collect();
        assert_eq!(ids(&got), expected);

        // An id that is not stored: the events after it.
        let (mut es2, data) = open(
            &http,
            &stream_url(&s, &format!("?since={between}")),
            &s.token,
            None,
        )
        .await;
        assert_eq!(data["cursor"].as_str(), Some(between.as_str()));
        let got = take(&mut es2, 3).await;
        assert_eq!(ids(&got), b);

        // Both continue live, with nothing in between.
        let live = append_n(&s, "live", 2);
        assert_eq!(ids(&take(&mut es, 2).await), live);
        assert_eq!(ids(&take(&mut es2, 2).await), live);
    });
}

#[test]
fn since_rfc3339_delivers_events_ingested_at_or_after_the_time() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    let (_a, b) = two_groups(&s);
    // Exactly the millisecond of the first event of group b: "at" includes it.
    let at = ms_of(&b[0]);
    let mut expected = b;
    rt.block_on(async {
        for time in [rfc3339(at, 0), rfc3339(at, 2), rfc3339(at, -5)] {
            let query = format!("?since={}", urlencode(&time));
            let (mut es, _) = open(&http, &stream_url(&s, &query), &s.token, None).await;
            let got = take(&mut es, expected.len()).await;
            assert_eq!(ids(&got), expected, "since={time}");
            // Continues live (the next round's stream replays this one too).
            let live = append_n(&s, "live", 1);
            assert_eq!(ids(&take(&mut es, 1).await), live, "since={time}");
            expected.extend(live);
        }
    });
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("x", s)]).expect("urlencode")[2..].to_string()
}

#[test]
fn without_since_the_stream_is_live_only() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    let old = append_n(&s, "old", 5);
    rt.block_on(async {
        let (mut es, data) = open(&http, &stream_url(&s, ""), &s.token, None).await;
        assert_eq!(data["cursor"].as_str(), Some(old[4].as_str()), "head id");
        let new = append_n(&s, "new", 3);
        let got = take(&mut es, 3).await;
        assert_eq!(ids(&got), new, "nothing from before the connection");
    });
}

#[test]
fn last_event_id_wins_over_since() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    let all = append_n(&s, "audit", 6);
    rt.block_on(async {
        // Earlier than since: the header decides.
        let url = stream_url(&s, &format!("?since={}", all[3]));
        let (mut es, data) = open(&http, &url, &s.token, Some(&all[1])).await;
        assert_eq!(data["cursor"].as_str(), Some(all[1].as_str()));
        assert_eq!(ids(&take(&mut es, 4).await), all[2..].to_vec());
        // Also over since=earliest (a reconnecting EventSource re-sends its URL).
        let url = stream_url(&s, "?since=earliest");
        let (mut es2, data) = open(&http, &url, &s.token, Some(&all[4])).await;
        assert_eq!(data["cursor"].as_str(), Some(all[4].as_str()));
        assert_eq!(ids(&take(&mut es2, 1).await), vec![all[5].clone()]);
        // And over "live only".
        let (mut es3, data) = open(&http, &stream_url(&s, ""), &s.token, Some(&all[0])).await;
        assert_eq!(data["cursor"].as_str(), Some(all[0].as_str()));
        assert_eq!(ids(&take(&mut es3, 5).await), all[1..].to_vec());
        let live = append_n(&s, "live", 1);
        assert_eq!(ids(&take(&mut es, 1).await), live);
        assert_eq!(ids(&take(&mut es2, 1).await), live);
        assert_eq!(ids(&take(&mut es3, 1).await), live);
    });
}

#[test]
fn empty_last_event_id_is_ignored() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    let all = append_n(&s, "audit", 3);
    rt.block_on(async {
        let (mut es, data) = open(
            &http,
            &stream_url(&s, "?since=earliest"),
            &s.token,
            Some(""),
        )
        .await;
        assert_eq!(data["cursor"], ZERO_ULID, "since applies");
        assert_eq!(ids(&take(&mut es, 3).await), all);
        // Without since: live only, from the head.
        let (mut es2, data) = open(&http, &stream_url(&s, ""), &s.token, Some("")).await;
        assert_eq!(data["cursor"].as_str(), Some(all[2].as_str()));
        let live = append_n(&s, "live", 1);
        assert_eq!(ids(&take(&mut es2, 1).await), live);
    });
}

#[test]
fn malformed_cursor_or_filter_is_a_400_naming_the_parameter() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    append_n(&s, "audit", 2);
    let cases: Vec<(String, Option<&str>, &str)> = vec![
        ("".into(), Some("not-a-ulid"), "Last-Event-ID"),
        (
            "?since=earliest".into(),
            Some("8ZZZZZZZZZZZZZZZZZZZZZZZZZ"),
            "Last-Event-ID",
        ),
        (
            "?since=earliest".into(),
            Some("01JD8X4Q1T6G5N2B3C4D5E6F7"),
            "Last-Event-ID",
        ),
        ("?since=yesterday".into(), None, "since"),
        ("?since=".into(), None, "since"),
        ("?since=2026-13-01T00:00:00Z".into(), None, "since"),
        ("?types=a,,b".into(), None, "types"),
        ("?types=bad%20type".into(), None, "types"),
        ("?types=".into(), None, "types"),
        ("?source=".into(), None, "source"),
    ];
    rt.block_on(async {
        for (query, last_event_id, param) in cases {
            let response = get_stream(
                &http,
                &stream_url(&s, &query),
                Some(&s.token),
                last_event_id,
            )
            .await;
            let (status, body) = error_json(response).await;
            assert_eq!(status, 400, "{query} {last_event_id:?}: {body}");
            let code = body["code"].as_str().unwrap_or("");
            assert!(
                code == "bad_request" || code == "validation_failed",
                "{query}: {body}"
            );
            let named = body["error"].as_str().unwrap_or("").contains(param)
                || body["details"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|p| p["field"] == param));
            assert!(
                named,
                "{query} {last_event_id:?}: {param} is not named: {body}"
            );
        }
    });
    assert_eq!(connections(&s), 0, "rejected requests hold no stream slot");
}

// ---------------------------------------------------------------------------------------
// filters
// ---------------------------------------------------------------------------------------

fn matches_types(t: &str) -> bool {
    t == "audit" || t.starts_with("agent.")
}

#[test]
fn type_and_source_filters_deliver_only_matching_events_in_order() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    let mix = |round: usize| -> Vec<Value> {
        let mut v = Vec::new();
        for t in [
            "audit",
            "auditx",
            "agent.created",
            "agent.x.y",
            "agent",
            "agentz",
            "tool_call",
        ] {
            for src in [Some("db"), Some("db2"), Some("DB"), None] {
                let mut e = json!({"type": t, "data": {"round": round}});
                if let Some(src) = src {
                    e["source"] = json!(src);
                }
                v.push(e);
            }
        }
        v
    };
    append(&s, &mix(0));
    rt.block_on(async {
        let by_types = stream_url(&s, "?since=earliest&types=audit,agent.*");
        let by_source = stream_url(&s, "?since=earliest&source=db");
        let by_both = stream_url(&s, "?since=earliest&types=agent.*&source=db");
        let (mut t_es, _) = open(&http, &by_types, &s.token, None).await;
        let (mut s_es, _) = open(&http, &by_source, &s.token, None).await;
        let (mut b_es, _) = open(&http, &by_both, &s.token, None).await;
        append(&s, &mix(1));
        // A marker every filter matches ends each stream's expected list.
        append(&s, &[json!({"type": "agent.marker", "source": "db"})]);

        let lines = blocking(|| s.export_lines());
        let events: Vec<Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).expect("line"))
            .collect();
        let expected = |f: &dyn Fn(&Value) -> bool| -> Vec<String> {
            events
                .iter()
                .filter(|e| f(e))
                .map(|e| e["id"].as_str().expect("id").to_string())
                .collect()
        };
        let want_types = expected(&|e| matches_types(e["type"].as_str().unwrap_or("")));
        let want_source = expected(&|e| e["source"] == "db");
        let want_both = expected(&|e| {
            e["source"] == "db" && e["type"].as_str().unwrap_or("").starts_with("agent.")
        });
        assert_eq!(want_types.len(), 2 * 3 * 4 + 1);
        assert_eq!(want_source.len(), 2 * 7 + 1);
        assert_eq!(want_both.len(), 2 * 2 + 1);
        for (es, want, name) in [
            (&mut t_es, want_types, "types"),
            (&mut s_es, want_source, "source"),
            (&mut b_es, want_both, "both"),
        ] {
            let got = take(es, want.len()).await;
            assert_eq!(ids(&got), want, "{name}");
        }
        // Nothing else follows: the next event each filter sees is the next match.
        append(&s, &[json!({"type": "tool_call", "source": "db2"})]);
        let next = append(&s, &[json!({"type": "agent.next", "source": "db"})]);
        for es in [&mut t_es, &mut s_es, &mut b_es] {
            assert_eq!(ids(&take(es, 1).await), next);
        }
    });
}

// ---------------------------------------------------------------------------------------
// heartbeats
// ---------------------------------------------------------------------------------------

#[test]
fn heartbeat_comment_arrives_during_silence() {
    let rt = runtime();
    let s = Server::start(&["--heartbeat", "1"]);
    let http = client();
    rt.block_on(async {
        let response = get_stream(&http, &stream_url(&s, ""), Some(&s.token), None).await;
        let mut raw = RawFrames::new(response);
        let first = raw.expect_frame().await;
        assert_eq!(first[2], "event: connected", "{first:?}");
        for _ in 0..2 {
            let frame = raw.expect_frame().await;
            assert_eq!(frame, vec![": heartbeat".to_string()]);
        }
        // The stream still delivers after heartbeats.
        let live = append_n(&s, "audit", 1);
        let frame = raw.expect_frame().await;
        assert_eq!(frame[0], format!("id: {}", live[0]), "{frame:?}");
    });
}

#[test]
fn filtered_stream_sends_an_id_only_frame_that_moves_the_cursor() {
    let rt = runtime();
    let s = Server::start(&["--heartbeat", "1"]);
    let http = client();
    append_n(&s, "old", 2);
    rt.block_on(async {
        let url = stream_url(&s, "?types=wanted");
        let response = get_stream(&http, &url, Some(&s.token), None).await;
        let mut raw = RawFrames::new(response);
        let first = raw.expect_frame().await;
        assert_eq!(first[2], "event: connected", "{first:?}");

        let skipped = append_n(&s, "unwanted", 5);
        let newest = skipped.last().expect("skipped").clone();
        let mut seen = None;
        for _ in 0..20 {
            let frame = raw.expect_frame().await;
            if frame == [": heartbeat"] {
                continue;
            }
            assert_eq!(frame.len(), 1, "only an id-only frame may come: {frame:?}");
            let id = frame[0]
                .strip_prefix("id: ")
                .expect("id-only frame")
                .to_string();
            assert!(skipped.contains(&id), "{id} was not scanned: {skipped:?}");
            if id == newest {
                seen = Some(id);
                break;
            }
        }
        let id = seen.expect("an id-only frame carrying the newest scanned id");

        // The filtered stream still delivers matches afterwards.
        let wanted = append_n(&s, "wanted", 1);
        let later = append_n(&s, "unwanted", 1);
        let mut delivered = false;
        for _ in 0..20 {
            let frame = raw.expect_frame().await;
            if frame == [": heartbeat"] || frame.len() == 1 {
                continue;
            }
            assert_eq!(frame[0], format!("id: {}", wanted[0]), "{frame:?}");
            delivered = true;
            break;
        }
        assert!(delivered, "the matching event was not delivered");

        // Resuming from the id-only frame (even without the filter) skips what it passed.
        let (mut es, data) = open(&http, &stream_url(&s, ""), &s.token, Some(&id)).await;
        assert_eq!(data["cursor"].as_str(), Some(id.as_str()));
        let got = take(&mut es, 2).await;
        assert_eq!(ids(&got), vec![wanted[0].clone(), later[0].clone()]);
    });
}

// ---------------------------------------------------------------------------------------
// resume
// ---------------------------------------------------------------------------------------

#[test]
fn live_client_dropping_before_its_first_event_resumes_without_gap() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    append_n(&s, "old", 3);
    let url = stream_url(&s, "");
    let cursor = rt.block_on(async {
        let (es, data) = open(&http, &url, &s.token, None).await;
        drop(es);
        data["cursor"].as_str().expect("cursor").to_string()
    });
    let mut missed = append_n(&s, "missed", 4);
    missed.extend(append_n(&s, "missed", 1));
    missed.extend(append_n(&s, "missed.too", 3));
    rt.block_on(async {
        let (mut es, data) = open(&http, &url, &s.token, Some(&cursor)).await;
        assert_eq!(data["cursor"].as_str(), Some(cursor.as_str()));
        assert_eq!(ids(&take(&mut es, missed.len()).await), missed);
        let live = append_n(&s, "live", 2);
        assert_eq!(ids(&take(&mut es, 2).await), live, "nothing repeated");
    });
}

// ---------------------------------------------------------------------------------------
// auth
// ---------------------------------------------------------------------------------------

#[test]
fn missing_or_bad_token_is_a_401_json_before_any_stream_bytes() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    rt.block_on(async {
        let url = stream_url(&s, "?since=earliest");
        let missing = get_stream(&http, &url, None, None).await;
        let bad = get_stream(&http, &url, Some("not-a-token"), None).await;
        let bad_query = get_stream(&http, &format!("{url}&token=not-a-token"), None, None).await;
        for response in [missing, bad, bad_query] {
            assert!(response.headers().get("retry-after").is_none());
            let (status, body) = error_json(response).await;
            assert_eq!(status, 401, "{body}");
            assert_eq!(body["code"], "unauthorized", "{body}");
        }
    });
    assert_eq!(connections(&s), 0);
}

#[test]
fn query_token_opens_a_stream() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    let all = append_n(&s, "audit", 2);
    rt.block_on(async {
        let url = stream_url(
            &s,
            &format!("?since=earliest&token={}", urlencode(&s.token)),
        );
        let mut es = sse(get_stream(&http, &url, None, None).await).await;
        check_connected(&next_event(&mut es).await);
        assert_eq!(ids(&take(&mut es, 2).await), all);
    });
}

// ---------------------------------------------------------------------------------------
// limits
// ---------------------------------------------------------------------------------------

#[test]
fn max_connections_rejects_with_503_and_frees_slots_on_close() {
    let rt = runtime();
    let s = Server::start(&["--max-connections", "2"]);
    let http = client();
    let url = stream_url(&s, "");
    assert_eq!(connections(&s), 0);
    let (first, mut second) = rt.block_on(async {
        let (a, _) = open(&http, &url, &s.token, None).await;
        let (b, _) = open(&http, &url, &s.token, None).await;
        (a, b)
    });
    assert_eq!(connections(&s), 2, "healthz counts open streams");
    rt.block_on(async {
        let third = get_stream(&http, &url, Some(&s.token), None).await;
        let retry_after = third
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .expect("503 has Retry-After");
        assert!(
            retry_after.trim().parse::<u64>().is_ok(),
            "Retry-After is seconds: {retry_after}"
        );
        let (status, body) = error_json(third).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["code"], "too_many_connections", "{body}");
    });
    assert_eq!(connections(&s), 2, "a rejected stream holds no slot");

    drop(first);
    wait_until(Duration::from_secs(30), "the closed stream's slot", || {
        connections(&s) == 1
    });
    let mut replacement = rt.block_on(async { open(&http, &url, &s.token, None).await.0 });
    assert_eq!(connections(&s), 2);
    let live = append_n(&s, "audit", 1);
    rt.block_on(async {
        assert_eq!(ids(&take(&mut second, 1).await), live);
        assert_eq!(ids(&take(&mut replacement, 1).await), live);
    });
}

#[test]
fn write_timeout_disconnects_a_client_that_never_reads() {
    let rt = runtime();
    let s = Server::start(&["--write-timeout", "1"]);
    let http = client();

    // A reading client, in the background.
    let (tx, rx) = mpsc::channel::<Result<String, String>>();
    let (mut reader, _) = rt.block_on(open(&http, &stream_url(&s, ""), &s.token, None));
    rt.spawn(async move {
        loop {
            let sent = match reader.next().await {
                Some(Ok(event)) => tx.send(Ok(event.id)),
                Some(Err(e)) => {
                    let _ = tx.send(Err(e.to_string()));
                    break;
                }
                None => {
                    let _ = tx.send(Err("the stream ended".into()));
                    break;
                }
            };
            if sent.is_err() {
                break;
            }
        }
    });

    // A client that sends its request and never reads (small receive buffer).
    let addr: std::net::SocketAddr = s.addr.parse().expect("addr");
    let request = format!(
        "GET /v1/events/stream HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\r\n",
        s.addr, s.token
    );
    let stalled = rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let mut stream = socket.connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("request");
        stream
    });
    wait_until(Duration::from_secs(30), "both streams open", || {
        connections(&s) == 2
    });

    // Large events until the stalled client's buffers are full and the write times out.
    let big = "x".repeat(256 * 1024);
    let mut appended = 0usize;
    let mut dropped = false;
    for round in 0..64 {
        let events: Vec<Value> = (0..4)
            .map(|i| json!({"type": "bulk", "data": {"round": round, "i": i, "pad": big}}))
            .collect();
        appended += append(&s, &events).len();
        if round >= 8 {
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && connections(&s) != 1 {
                std::thread::sleep(Duration::from_millis(50));
            }
            if connections(&s) == 1 {
                dropped = true;
                break;
            }
        }
    }
    if !dropped {
        wait_until(
            Duration::from_secs(60),
            "the stalled client to be cut off",
            || connections(&s) == 1,
        );
    }

    // The server keeps serving the reader (it receives everything, then a marker) ...
    let marker = append_n(&s, "marker", 1);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut received = 0usize;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(id)) if id == marker[0] => break,
            Ok(Ok(_)) => received += 1,
            Ok(Err(e)) => panic!("the reading client was cut off: {e}"),
            Err(e) => panic!("the reading client got no marker: {e}"),
        }
    }
    assert_eq!(received, appended, "the reader got every bulk event");
    assert_eq!(connections(&s), 1);
    // ... and new clients.
    rt.block_on(async {
        let (mut es, _) = open(
            &http,
            &stream_url(&s, &format!("?since={}", marker[0])),
            &s.token,
            None,
        )
        .await;
        let live = append_n(&s, "after", 1);
        assert_eq!(ids(&take(&mut es, 1).await), live);
    });
    // The stalled connection was closed by the server: reading it now reaches its end
    // (EOF or a reset) once the bytes already in flight are drained.
    let mut stalled = stalled;
    let closed = rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        loop {
            match tokio::time::timeout(READ, stalled.read(&mut buf)).await {
                Err(_) => return Err(format!("still open after {total} bytes")),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(total),
                Ok(Ok(n)) => total += n,
            }
        }
    });
    let drained = closed.expect("the server closed the stalled connection");
    assert!(
        drained < appended * 256 * 1024,
        "the stalled client was cut off before receiving every event ({drained} bytes)"
    );
}

// ---------------------------------------------------------------------------------------
// shutdown
// ---------------------------------------------------------------------------------------

#[test]
fn sigterm_ends_open_streams_cleanly_and_exits_0() {
    let rt = runtime();
    let mut s = Server::start(&[]);
    let http = client();
    let all = append_n(&s, "audit", 3);
    let mut tasks = Vec::new();
    for query in ["?since=earliest", "", "?types=audit"] {
        let (mut es, _) = rt.block_on(open(&http, &stream_url(&s, query), &s.token, None));
        if query == "?since=earliest" {
            assert_eq!(ids(&rt.block_on(take(&mut es, 3))), all);
        }
        tasks.push(rt.spawn(async move {
            for _ in 0..1000 {
                match es.next().await {
                    None => return Ok(()),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.to_string()),
                }
            }
            Err("too many frames".to_string())
        }));
    }
    assert_eq!(connections(&s), 3);
    let started = Instant::now();
    let status = s.terminate();
    let took = started.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_secs(10), "exit took {took:?}");
    rt.block_on(async {
        for task in tasks {
            let result = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the body ended")
                .expect("reader task");
            assert_eq!(result, Ok(()), "the body ends cleanly, not with an error");
        }
    });
}

// ---------------------------------------------------------------------------------------
// injection
// ---------------------------------------------------------------------------------------

#[test]
fn cr_lf_cannot_inject_sse_fields_or_frames() {
    let rt = runtime();
    let s = Server::start(&[]);
    let http = client();
    let nasty = "a\nb\rc\r\n\r\ndata: x\n\nid: 0\n\nevent: open\n\n";
    // Control characters are not allowed in a source at all (SPEC §1) ...
    for bad in ["db\n", "db\r", "db\r\n\r\ndata: x"] {
        let (status, body) = s.post_json(&json!({"type": "audit", "source": bad}));
        assert_eq!(status, 400, "{body}");
        assert!(body.to_string().contains("source"), "{body}");
    }
    assert_eq!(s.head()["seq"], 0, "nothing appended");
    // ... and in data they are escaped by JCS; sources may hold other line-ish text.
    let data = json!({
        "text": nasty,
        "\r\n\r\ndata: key": "\r\n\r\nevent: error",
        "seps": "\u{2028}\u{2029}\u{0085}",
        "list": ["\n", "\r", "\r\n\r\ndata: x"],
    });
    let source = "db data: x\u{2028}id: 1";
    let id = append(
        &s,
        &[json!({"type": "audit", "source": source, "data": data})],
    );
    let marker = append_n(&s, "marker", 1);
    let export = export_by_id(&s);
    rt.block_on(async {
        // Raw bytes: exactly one frame of three lines, then the next event.
        let response = get_stream(
            &http,
            &stream_url(&s, "?since=earliest"),
            Some(&s.token),
            None,
        )
        .await;
        let mut raw = RawFrames::new(response);
        raw.expect_frame().await;
        let frame = raw.expect_frame().await;
        assert_eq!(frame.len(), 3, "{frame:?}");
        assert_eq!(frame[0], format!("id: {}", id[0]));
        assert_eq!(frame[1], "event: audit");
        let line = frame[2].strip_prefix("data: ").expect("data line");
        assert_eq!(line, export[&id[0]]);
        let parsed: Value = serde_json::from_str(line).expect("JSON");
        assert_eq!(parsed["data"], data);
        assert_eq!(parsed["source"], source);
        let next = raw.expect_frame().await;
        assert_eq!(next[0], format!("id: {}", marker[0]), "no injected frame");
        assert!(!raw.all.contains(&b'\r'), "no CR byte on the wire");

        // A real SSE client sees the same single event.
        let (mut es, _) = open(&http, &stream_url(&s, "?since=earliest"), &s.token, None).await;
        let got = take(&mut es, 2).await;
        assert_eq!(ids(&got), vec![id[0].clone(), marker[0].clone()]);
        assert_eq!(got[0].event, "audit");
        let parsed: Value = serde_json::from_str(&got[0].data).expect("JSON");
        assert_eq!(parsed["data"], data);
        assert_eq!(parsed["source"], source);
        assert_eq!(got[0].data, export[&id[0]]);
    });
}
