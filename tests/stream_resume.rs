//! Exactly-once delivery across reconnects (SPEC §2 "Cursors and filters", "Stream";
//! §4 `cairn events`), with a real SSE client (reqwest + eventsource-stream) against the
//! release binary on loopback:
//!
//! 1. every kind of start cursor while a writer appends and a proxy cuts connections at
//!    random moments; each client resumes with `Last-Event-ID`;
//! 2. a reader that stops reading while 20,000 events are appended (the broadcast ring
//!    overflows: the server must fall back to the log), with and without being cut off
//!    by `--write-timeout`;
//! 3. the server SIGKILLed and SIGTERMed under a streaming client and restarted on the
//!    same data directory;
//! 4. `cairn events --cursor-file` run repeatedly with appends in between (and while a
//!    writer appends);
//! 5. `cairn events --follow` with the server restarted underneath it on the same port;
//! 6. `cairn events --cursor-file` (backfill and `--follow`) stopped by SIGINT/SIGTERM
//!    and started again: the cursor file must make the runs add up to the log, once.
//!
//! Every check compares what a client received with `GET /v1/export` of the final log:
//! same ids and the same bytes, in order, each once.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use common::{BIN, Server, wait_until};
use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ulid::Ulid;

const ZERO_ID: &str = "00000000000000000000000000";
/// Event types used everywhere; `kind.a,kind.b*` keeps the first two.
const TYPES: [&str; 3] = ["kind.a", "kind.b.x", "other"];
const TYPE_FILTER: &str = "kind.a,kind.b*";
/// How long one stream read waits before the client re-checks whether it is done.
const POLL: Duration = Duration::from_millis(250);
/// A client that is not done yet receives no event for this long: events were lost
/// (every test keeps appending, or has appended, events that client must still get).
const STALL: Duration = Duration::from_secs(15);

fn type_matches_filter(t: &str) -> bool {
    t == "kind.a" || t.starts_with("kind.b")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Event `i` of a test: types rotate, some data holds U+2028 (JCS leaves it raw, so
/// nothing may split lines on it).
fn event(i: usize, pad: usize) -> Value {
    let mut data = json!({ "i": i, "pad": "x".repeat(pad) });
    if i.is_multiple_of(97) {
        data["note"] = json!("line\u{2028}separator\u{2029}paragraph");
    }
    json!({ "type": TYPES[i % TYPES.len()], "source": "stream-resume", "data": data })
}

fn events(range: std::ops::Range<usize>, pad: usize) -> Vec<Value> {
    range.map(|i| event(i, pad)).collect()
}

fn id_of(line: &str) -> String {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    v["id"].as_str().expect("event id").to_string()
}

fn type_of(line: &str) -> String {
    let v: Value = serde_json::from_str(line).expect("event JSON");
    v["type"].as_str().expect("event type").to_string()
}

/// The id's time part (ms since the epoch).
fn id_ms(id: &str) -> u64 {
    Ulid::from_string(id).expect("ULID").timestamp_ms()
}

/// `(id, line)` of every export line.
fn with_ids(lines: Vec<String>) -> Vec<(String, String)> {
    lines.into_iter().map(|l| (id_of(&l), l)).collect()
}

/// Panics with a precise account (duplicates, gaps, order) unless `got == expected`.
fn assert_exactly_once(label: &str, got: &[(String, String)], expected: &[(String, String)]) {
    if got == expected {
        return;
    }
    let mut seen = HashSet::new();
    let duplicates: Vec<&str> = got
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| !seen.insert(*id))
        .collect();
    let expected_ids: HashSet<&str> = expected.iter().map(|(id, _)| id.as_str()).collect();
    let missing: Vec<&str> = expected
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| !seen.contains(id))
        .collect();
    let unexpected: Vec<&str> = got
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| !expected_ids.contains(id))
        .collect();
    let out_of_order = got.windows(2).filter(|w| w[0].0 >= w[1].0).count();
    let first_diff = got
        .iter()
        .zip(expected)
        .position(|(g, e)| g != e)
        .unwrap_or(got.len().min(expected.len()));
    panic!(
        "{label}: received {} events, the log has {} for this cursor: {} duplicates (first {:?}), \
         {} missing (first {:?}), {} not in the log (first {:?}), {} out of order; first \
         difference at position {first_diff}: got {:?}, expected {:?}",
        got.len(),
        expected.len(),
        duplicates.len(),
        duplicates.first(),
        missing.len(),
        missing.first(),
        unexpected.len(),
        unexpected.first(),
        out_of_order,
        got.get(first_diff)
            .map(|(id, l)| (id, &l[..l.len().min(120)])),
        expected
            .get(first_diff)
            .map(|(id, l)| (id, &l[..l.len().min(120)])),
    );
}

// ---------------------------------------------------------------------------------------
// Appending (blocking; from plain threads, never inside the async runtime)
// ---------------------------------------------------------------------------------------

/// Appends to whatever server `base` currently names; retries a request (same
/// `Idempotency-Key`, so never twice) while the server is down or restarting.
#[derive(Clone)]
struct Appender {
    http: reqwest::blocking::Client,
    base: Arc<RwLock<String>>,
    token: String,
}

impl Appender {
    fn new(base: Arc<RwLock<String>>, token: &str) -> Appender {
        Appender {
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            base,
            token: token.to_string(),
        }
    }

    /// The ids of the appended events, in order.
    fn append(&self, events: &[Value], key: &str) -> Vec<String> {
        let body = if events.len() == 1 {
            events[0].to_string()
        } else {
            json!({ "events": events }).to_string()
        };
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut last_error = String::new();
        while Instant::now() < deadline {
            let base = self.base.read().expect("base").clone();
            let sent = self
                .http
                .post(format!("{base}/v1/events"))
                .bearer_auth(&self.token)
                .header("content-type", "application/json")
                .header("idempotency-key", key)
                .body(body.clone())
                .send();
            match sent {
                Ok(r) if r.status() == 201 => {
                    let v: Value = r.json().expect("ingest response");
                    let ids: Vec<String> = v["data"]["ids"]
                        .as_array()
                        .expect("ids")
                        .iter()
                        .map(|id| id.as_str().expect("id").to_string())
                        .collect();
                    assert_eq!(ids.len(), events.len(), "{v}");
                    return ids;
                }
                Ok(r) if r.status().is_server_error() => {
                    last_error = format!("{}: {}", r.status(), r.text().unwrap_or_default());
                }
                Ok(r) => panic!(
                    "append {key}: {} {}",
                    r.status(),
                    r.text().unwrap_or_default()
                ),
                Err(e) => last_error = e.to_string(),
            }
            // Retry pacing while the server restarts (the deadline bounds the loop).
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("append {key} kept failing for 40 s: {last_error}");
    }
}

/// `(id, line)` of the log for an export query, with the admin token.
fn export(base: &str, token: &str, query: &str) -> Vec<(String, String)> {
    let r = reqwest::blocking::Client::new()
        .get(format!("{base}/v1/export?{query}"))
        .bearer_auth(token)
        .send()
        .expect("export");
    assert_eq!(r.status(), 200);
    let text = r.text().expect("export body");
    with_ids(
        text.split('\n')
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------
// The SSE client
// ---------------------------------------------------------------------------------------

type Frames = Pin<Box<dyn Stream<Item = Result<eventsource_stream::Event, String>> + Send>>;

/// An SSE client that resumes like a browser `EventSource`: it always re-sends its
/// original query and adds `Last-Event-ID` = the last id it received (or the start
/// cursor of the `connected` frame if no event came yet).
struct Follower {
    label: String,
    http: reqwest::Client,
    token: String,
    query: Vec<(String, String)>,
    /// The `Last-Event-ID` of the next connection.
    resume: Option<String>,
    /// The cursor of the first `connected` frame, and the head it reported.
    start: Option<String>,
    start_head: Value,
    /// `(id, data line)` of every event received, in arrival order.
    events: Vec<(String, String)>,
    /// Connection attempts, connections that got their `connected` frame, and
    /// connections that ended (cut, closed or failed) after that.
    attempts: usize,
    sessions: usize,
    drops: usize,
    frames: Option<Frames>,
    /// Counters another thread can watch while the client runs.
    progress: Arc<Progress>,
}

#[derive(Default)]
struct Progress {
    events: AtomicUsize,
    /// Connections that ended with a clean end of the chunked body.
    clean_ends: AtomicUsize,
}

impl Follower {
    fn new(label: &str, token: &str, query: &[(&str, &str)], last_event_id: Option<&str>) -> Self {
        Follower {
            label: label.to_string(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .connect_timeout(Duration::from_secs(2))
                .build()
                .expect("http client"),
            token: token.to_string(),
            query: query
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            resume: last_event_id.map(str::to_string),
            start: None,
            start_head: Value::Null,
            events: Vec::new(),
            attempts: 0,
            sessions: 0,
            drops: 0,
            frames: None,
            progress: Arc::default(),
        }
    }

    /// One connection attempt; true once its `connected` frame has been read and checked.
    async fn connect(&mut self, base: &str) -> bool {
        self.attempts += 1;
        let mut request = self
            .http
            .get(format!("{base}/v1/events/stream"))
            .query(&self.query)
            .bearer_auth(&self.token);
        if let Some(id) = &self.resume {
            request = request.header("Last-Event-ID", id);
        }
        let response = match tokio::time::timeout(Duration::from_secs(5), request.send()).await {
            Ok(Ok(r)) => r,
            _ => return false,
        };
        let status = response.status();
        if status != 200 {
            let body = response.text().await.unwrap_or_default();
            panic!("{}: the stream answered {status}: {body}", self.label);
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        assert!(
            header("content-type").starts_with("text/event-stream"),
            "{}: content-type {:?}",
            self.label,
            header("content-type")
        );
        assert_eq!(header("cache-control"), "no-cache", "{}", self.label);
        let mut frames: Frames = Box::pin(
            response
                .bytes_stream()
                .eventsource()
                .map(|r| r.map_err(|e| e.to_string())),
        );
        let first = match tokio::time::timeout(Duration::from_secs(5), frames.next()).await {
            Ok(Some(Ok(frame))) => frame,
            _ => return false,
        };
        assert_eq!(
            first.event, "connected",
            "{}: first frame {first:?}",
            self.label
        );
        assert_eq!(
            first.retry,
            Some(Duration::from_millis(2000)),
            "{}",
            self.label
        );
        let v: Value = serde_json::from_str(&first.data).expect("connected data is JSON");
        assert_eq!(v["type"], "connected", "{}: {v}", self.label);
        let cursor = v["cursor"].as_str().expect("connected cursor").to_string();
        assert_eq!(
            first.id, cursor,
            "{}: the connected frame's id:",
            self.label
        );
        if let Some(sent) = &self.resume {
            assert_eq!(
                &cursor, sent,
                "{}: a stream resumed with Last-Event-ID must continue exactly after it \
                 (query {:?})",
                self.label, self.query
            );
        }
        if self.start.is_none() {
            self.start = Some(cursor.clone());
            self.start_head = v["head"].clone();
        }
        self.resume = Some(cursor);
        self.sessions += 1;
        self.frames = Some(frames);
        true
    }

    fn on_event(&mut self, frame: eventsource_stream::Event) {
        assert_ne!(
            frame.event, "connected",
            "{}: a second connected frame on one connection",
            self.label
        );
        let v: Value = serde_json::from_str(&frame.data)
            .unwrap_or_else(|e| panic!("{}: data is not JSON ({e}): {:?}", self.label, frame.data));
        assert_eq!(
            v["id"],
            frame.id.as_str(),
            "{}: id: line vs data",
            self.label
        );
        assert_eq!(
            v["type"],
            frame.event.as_str(),
            "{}: event: line vs data",
            self.label
        );
        self.resume = Some(frame.id.clone());
        self.events.push((frame.id, frame.data));
        self.progress.events.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads until `done(self)`, reconnecting to `base()` whenever the connection ends;
    /// panics at `deadline`.
    async fn run(
        &mut self,
        base: impl Fn() -> String,
        done: impl Fn(&Follower) -> bool,
        deadline: Instant,
    ) {
        let (mut seen, mut progress_at) = (self.events.len(), Instant::now());
        loop {
            if done(self) {
                self.frames = None;
                return;
            }
            if self.events.len() > seen {
                (seen, progress_at) = (self.events.len(), Instant::now());
            }
            assert!(
                progress_at.elapsed() < STALL,
                "{}: no event for {STALL:?} although not done: {} events, last {:?}, {} attempts, \
                 {} sessions (lost events?)",
                self.label,
                self.events.len(),
                self.resume,
                self.attempts,
                self.sessions
            );
            assert!(
                Instant::now() < deadline,
                "{}: not done by the deadline: {} events, last {:?}, {} attempts, {} sessions",
                self.label,
                self.events.len(),
                self.resume,
                self.attempts,
                self.sessions
            );
            assert!(self.attempts < 5_000, "{}: too many reconnects", self.label);
            let Some(frames) = self.frames.as_mut() else {
                if !self.connect(&base()).await {
                    // The server or the proxy refused or cut us before `connected`.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                continue;
            };
            match tokio::time::timeout(POLL, frames.next()).await {
                Err(_) => {}
                Ok(Some(Ok(frame))) => self.on_event(frame),
                Ok(end) => {
                    if end.is_none() {
                        self.progress.clean_ends.fetch_add(1, Ordering::Relaxed);
                    }
                    self.frames = None;
                    self.drops += 1;
                }
            }
        }
    }

    /// True once the resume cursor reached `target` (ids compare as strings).
    fn reached(&self, target: &str) -> bool {
        self.resume.as_deref().is_some_and(|c| c >= target)
    }
}

// ---------------------------------------------------------------------------------------
// A proxy that cuts connections
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct ProxyStats {
    connections: AtomicUsize,
    byte_cuts: AtomicUsize,
    time_cuts: AtomicUsize,
}

#[derive(Debug, Clone, Copy)]
enum Cut {
    Never,
    /// After this many bytes from the server (mid-frame, mid-chunk, mid-header...).
    AfterBytes(usize),
    AfterMillis(u64),
}

/// Forwards every connection to `upstream`, cutting most of them at a random moment
/// (seeded); a cut closes both sides, half of them with a reset.
async fn start_proxy(upstream: SocketAddr, seed: u64, stats: Arc<ProxyStats>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
    let addr = listener.local_addr().expect("proxy addr");
    let mut rng = StdRng::seed_from_u64(seed);
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let plan = match rng.random_range(0..100) {
                0..5 => Cut::Never,
                // Inside the response head or the `connected` frame.
                5..15 => Cut::AfterBytes(rng.random_range(1..=600)),
                15..55 => Cut::AfterBytes(rng.random_range(600..=16_000)),
                _ => Cut::AfterMillis(rng.random_range(1..=80)),
            };
            let reset = rng.random_bool(0.5);
            tokio::spawn(pipe(client, upstream, plan, reset, stats.clone()));
        }
    });
    addr
}

async fn pipe(
    mut client: TcpStream,
    upstream: SocketAddr,
    plan: Cut,
    reset: bool,
    stats: Arc<ProxyStats>,
) {
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let budget = match plan {
        Cut::AfterBytes(n) => n,
        _ => usize::MAX,
    };
    let timer = match plan {
        Cut::AfterMillis(ms) => Duration::from_millis(ms),
        _ => Duration::from_secs(3600),
    };
    let cut = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let up = tokio::io::copy(&mut client_read, &mut server_write);
        let down = async {
            let mut left = budget;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match server_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => n,
                };
                let take = n.min(left);
                if client_write.write_all(&buf[..take]).await.is_err() {
                    return None;
                }
                left -= take;
                if left == 0 {
                    return Some(&stats.byte_cuts);
                }
            }
        };
        tokio::select! {
            _ = up => None,
            cut = down => cut,
            () = tokio::time::sleep(timer) => Some(&stats.time_cuts),
        }
    };
    if let Some(counter) = cut {
        counter.fetch_add(1, Ordering::Relaxed);
        if reset {
            let _ = client.set_zero_linger();
        }
    }
}

// ---------------------------------------------------------------------------------------
// 1. Handoff under fire
// ---------------------------------------------------------------------------------------

/// How a client of test 1 starts.
struct Start {
    label: &'static str,
    query: Vec<(&'static str, String)>,
    last_event_id: Option<String>,
    /// Connects once the log holds this many events.
    after_seq: u64,
}

#[test]
fn every_cursor_kind_is_exactly_once_through_random_connection_cuts() {
    const PREFILL: usize = 600;
    const TOTAL: usize = 10_000;
    const SEED: u64 = 0x5EED_CA1B;
    let server = Server::start(&["--heartbeat", "1"]);
    let base = Arc::new(RwLock::new(server.url("")));
    let appender = Appender::new(base.clone(), &server.token);

    // History before any client: two requests, so the RFC 3339 cursor lands mid-log.
    let first = appender.append(&events(0..PREFILL / 2, 100), "prefill-1");
    let second = appender.append(&events(PREFILL / 2..PREFILL, 100), "prefill-2");
    let prefill: Vec<String> = first.iter().chain(&second).cloned().collect();
    let stored: HashSet<&str> = prefill.iter().map(String::as_str).collect();
    let not_stored = (200..PREFILL)
        .map(|k| Ulid(Ulid::from_string(&prefill[k]).expect("id").0 + 1).to_string())
        .find(|id| !stored.contains(id.as_str()))
        .expect("a ULID between two stored ids");
    let time_ms = id_ms(&second[0]);
    let time_cursor = time::OffsetDateTime::from_unix_timestamp_nanos(time_ms as i128 * 1_000_000)
        .expect("time")
        .to_offset(time::UtcOffset::from_hms(2, 0, 0).expect("offset"))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");

    let p = PREFILL as u64;
    let starts = vec![
        Start {
            label: "since=earliest",
            query: vec![("since", "earliest".into())],
            last_event_id: None,
            after_seq: p,
        },
        Start {
            label: "since=<stored ULID>",
            query: vec![("since", prefill[150].clone())],
            last_event_id: None,
            after_seq: p + 300,
        },
        Start {
            label: "since=<ULID not stored>",
            query: vec![("since", not_stored.clone())],
            last_event_id: None,
            after_seq: p + 900,
        },
        Start {
            label: "since=<RFC 3339>",
            query: vec![("since", time_cursor.clone())],
            last_event_id: None,
            after_seq: p + 1_500,
        },
        Start {
            label: "live (no since)",
            query: vec![],
            last_event_id: None,
            after_seq: p + 2_000,
        },
        Start {
            label: "Last-Event-ID (wins over since=earliest)",
            query: vec![("since", "earliest".into())],
            last_event_id: Some(second[100].clone()),
            after_seq: p + 2_600,
        },
        Start {
            label: "since=earliest&types=kind.a,kind.b*",
            query: vec![("since", "earliest".into()), ("types", TYPE_FILTER.into())],
            last_event_id: None,
            after_seq: p + 5_000,
        },
    ];

    let rt = runtime();
    let stats = Arc::new(ProxyStats::default());
    let upstream: SocketAddr = server.addr.parse().expect("server addr");
    let proxy = rt.block_on(start_proxy(upstream, SEED, stats.clone()));
    let proxy_base = format!("http://{proxy}");
    let target: Arc<OnceLock<String>> = Arc::new(OnceLock::new());
    let deadline = Instant::now() + Duration::from_secs(50);

    let mut clients = Vec::new();
    for start in &starts {
        let query: Vec<(&str, &str)> = start.query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut follower = Follower::new(
            start.label,
            &server.token,
            &query,
            start.last_event_id.as_deref(),
        );
        let (target, proxy_base, direct, after_seq, token) = (
            target.clone(),
            proxy_base.clone(),
            server.url(""),
            start.after_seq,
            server.token.clone(),
        );
        clients.push(rt.spawn(async move {
            // Join at a given point of the writer's run (the head, read directly).
            let http = reqwest::Client::new();
            loop {
                assert!(
                    Instant::now() < deadline,
                    "the log never reached {after_seq}"
                );
                let head: Value = http
                    .get(format!("{direct}/v1/head"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("head")
                    .json()
                    .await
                    .expect("head json");
                if head["data"]["seq"].as_u64().expect("seq") >= after_seq {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            follower
                .run(
                    || proxy_base.clone(),
                    |f| target.get().is_some_and(|t| f.reached(t)),
                    deadline,
                )
                .await;
            follower
        }));
    }

    // The writer: mixed batch sizes, many single events; the last event is a `kind.a`
    // so that every client (the filtered one too) ends on the final head.
    let writer = {
        let appender = appender.clone();
        std::thread::spawn(move || {
            let sizes = [1, 1, 1, 1, 1, 1, 1, 2, 3, 5, 8, 13, 40, 120];
            let mut rng = StdRng::seed_from_u64(SEED);
            let mut ids = Vec::new();
            let mut i = PREFILL;
            let mut requests = 0;
            while i < TOTAL {
                let n = sizes[rng.random_range(0..sizes.len())].min(TOTAL - i);
                let mut batch = events(i..i + n, 100);
                if i + n == TOTAL {
                    batch[n - 1]["type"] = json!("kind.a");
                }
                ids.extend(appender.append(&batch, &format!("w-{requests}")));
                i += n;
                requests += 1;
            }
            (ids, requests)
        })
    };
    let (written, requests) = writer.join().expect("writer");
    let head = server.head();
    let final_id = head["id"].as_str().expect("head id").to_string();
    assert_eq!(head["seq"], TOTAL as u64);
    assert_eq!(Some(&final_id), written.last());
    target.set(final_id.clone()).expect("target set once");

    let followers: Vec<Follower> = rt.block_on(async {
        let mut out = Vec::new();
        for handle in clients {
            match handle.await {
                Ok(f) => out.push(f),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        out
    });

    let log = export(&server.url(""), &server.token, "since=earliest");
    let log_ids: Vec<String> = log.iter().map(|(id, _)| id.clone()).collect();
    let appended: Vec<String> = prefill.iter().chain(&written).cloned().collect();
    assert_eq!(
        log_ids, appended,
        "the export is not the appended events in order"
    );

    for (f, start) in followers.iter().zip(&starts) {
        let cursor = f.start.clone().expect("a connected frame");
        let after = |c: &str| -> Vec<(String, String)> {
            log.iter()
                .filter(|(id, _)| id.as_str() > c)
                .cloned()
                .collect()
        };
        let expected = match start.label {
            "since=earliest" => {
                assert_eq!(cursor, ZERO_ID, "earliest starts at the zero ULID");
                after(ZERO_ID)
            }
            "since=<stored ULID>" => {
                assert_eq!(cursor, prefill[150]);
                after(&prefill[150])
            }
            "since=<ULID not stored>" => {
                assert_eq!(cursor, not_stored);
                after(&not_stored)
            }
            "since=<RFC 3339>" => log
                .iter()
                .filter(|(id, _)| id_ms(id) >= time_ms)
                .cloned()
                .collect(),
            "live (no since)" => {
                assert_eq!(
                    f.start_head["id"].as_str(),
                    Some(cursor.as_str()),
                    "a live stream starts at the head it reports"
                );
                after(&cursor)
            }
            "Last-Event-ID (wins over since=earliest)" => {
                assert_eq!(cursor, second[100]);
                after(&second[100])
            }
            _ => log
                .iter()
                .filter(|(_, line)| type_matches_filter(&type_of(line)))
                .cloned()
                .collect(),
        };
        assert!(!expected.is_empty(), "{}: nothing to expect", f.label);
        eprintln!(
            "{:45} {:5} events, {:3} attempts, {:3} sessions, {:3} drops",
            f.label,
            f.events.len(),
            f.attempts,
            f.sessions,
            f.drops
        );
        assert_exactly_once(f.label.as_str(), &f.events, &expected);
    }
    let byte_cuts = stats.byte_cuts.load(Ordering::Relaxed);
    let time_cuts = stats.time_cuts.load(Ordering::Relaxed);
    let drops: usize = followers.iter().map(|f| f.drops).sum();
    eprintln!(
        "{TOTAL} events ({requests} writer requests), {} proxied connections, \
         {byte_cuts} cuts by bytes, {time_cuts} cuts by time, {drops} dropped sessions",
        stats.connections.load(Ordering::Relaxed)
    );
    assert!(
        byte_cuts > 0 && time_cuts > 0,
        "the proxy never cut a connection"
    );
    assert!(
        drops >= followers.len(),
        "too few sessions were cut ({drops}) for the test to mean anything"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Slow reader
// ---------------------------------------------------------------------------------------

/// `GET /healthz` `connections` (open streams).
fn open_streams(server: &Server) -> u64 {
    let r = server
        .http()
        .get(server.url("/healthz"))
        .send()
        .expect("healthz");
    let v: Value = r.json().expect("healthz json");
    v["connections"].as_u64().expect("connections")
}

/// Two clients (since=earliest and live) read their `connected` frame, then read
/// nothing while 20,000 events of ~1 KiB are appended: first 14,000 in requests of 500
/// (more than every socket buffer on the way holds, so the server stops writing to
/// them), then 6,000 single-event requests, each its own group commit and broadcast, far
/// more than the live buffer keeps. Then they read everything.
fn slow_readers(write_timeout: Option<&str>) -> (Server, Vec<Follower>) {
    const PREFILL: usize = 500;
    const BATCHED: usize = 14_000;
    const SINGLE: usize = 6_000;
    const PAD: usize = 1_000;
    let server = match write_timeout {
        Some(t) => Server::start(&["--sync", "none", "--write-timeout", t]),
        None => Server::start(&["--sync", "none"]),
    };
    let appender = Appender::new(Arc::new(RwLock::new(server.url(""))), &server.token);
    appender.append(&events(0..PREFILL, PAD), "prefill");

    let rt = runtime();
    let base = server.url("");
    let mut followers = vec![
        Follower::new(
            "slow since=earliest",
            &server.token,
            &[("since", "earliest")],
            None,
        ),
        Follower::new("slow live", &server.token, &[], None),
    ];
    rt.block_on(async {
        for f in &mut followers {
            assert!(f.connect(&base).await, "{}: no connected frame", f.label);
        }
    });
    assert_eq!(open_streams(&server), 2);

    // Nobody polls the two streams from here on.
    let mut i = PREFILL;
    while i < PREFILL + BATCHED {
        appender.append(&events(i..i + 500, PAD), &format!("batch-{i}"));
        i += 500;
    }
    while i < PREFILL + BATCHED + SINGLE {
        appender.append(&events(i..i + 1, PAD), &format!("single-{i}"));
        i += 1;
    }
    let head = server.head();
    assert_eq!(head["seq"], i as u64);
    let final_id = head["id"].as_str().expect("head id").to_string();

    match write_timeout {
        Some("120") => assert_eq!(
            open_streams(&server),
            2,
            "a stalled stream was cut off long before --write-timeout 120"
        ),
        // SPEC: unread for longer than --write-timeout → disconnected (slot released).
        Some("1") => wait_until(
            Duration::from_secs(20),
            "the stalled streams to be disconnected by --write-timeout 1",
            || open_streams(&server) == 0,
        ),
        _ => {}
    }

    let deadline = Instant::now() + Duration::from_secs(45);
    rt.block_on(async {
        let runs = followers.iter_mut().map(|f| {
            let base = base.clone();
            let final_id = final_id.clone();
            f.run(
                move || base.clone(),
                move |f| f.reached(&final_id),
                deadline,
            )
        });
        futures_util::future::join_all(runs).await;
    });

    let log = export(&base, &server.token, "since=earliest");
    assert_eq!(log.len(), i);
    for f in &followers {
        let start = f.start.clone().expect("start cursor");
        let expected: Vec<(String, String)> = log
            .iter()
            .filter(|(id, _)| id.as_str() > start.as_str())
            .cloned()
            .collect();
        eprintln!(
            "{} (--write-timeout {}): {} events, {} sessions, {} drops",
            f.label,
            write_timeout.unwrap_or("default"),
            f.events.len(),
            f.sessions,
            f.drops
        );
        assert_exactly_once(&f.label, &f.events, &expected);
    }
    assert_eq!(followers[0].start.as_deref(), Some(ZERO_ID));
    assert_eq!(
        followers[0].events.len(),
        i,
        "since=earliest gets the whole log"
    );
    assert_eq!(
        followers[1].events.len(),
        i - PREFILL,
        "live gets everything appended after it connected"
    );
    drop(rt);
    (server, followers)
}

#[test]
fn a_stalled_reader_gets_every_event_once_without_being_cut_off() {
    let (server, followers) = slow_readers(Some("120"));
    for f in &followers {
        assert_eq!(
            (f.sessions, f.drops),
            (1, 0),
            "{}: reconnected although it never exceeded --write-timeout 120",
            f.label
        );
    }
    // The readers fell behind the live buffer and read the log instead: counted.
    assert!(
        server.metric("cairn_stream_catchup_total") >= 1.0,
        "the fallback to the log was not counted"
    );
    assert!(server.metric("cairn_events_delivered_total") >= 20_000.0);
    drop(server);
}

#[test]
fn a_stalled_reader_gets_every_event_once_with_the_default_write_timeout() {
    // Whether the stall outlasts the default 30 s depends on the machine: either way,
    // every event arrives once.
    slow_readers(None);
}

#[test]
fn a_stalled_reader_cut_off_by_write_timeout_resumes_exactly_once() {
    let (_server, followers) = slow_readers(Some("1"));
    for f in &followers {
        assert!(
            f.drops >= 1 && f.sessions >= 2,
            "{}: the server reported the stream closed, yet the client never reconnected",
            f.label
        );
    }
}

// ---------------------------------------------------------------------------------------
// 3. Server restarts under a streaming client
// ---------------------------------------------------------------------------------------

#[test]
fn a_stream_resumes_exactly_once_across_sigkill_and_sigterm_restarts() {
    /// Events the client must receive from each server before the next step.
    const STEP: usize = 600;
    const MAX_EVENTS: usize = 60_000;
    let mut first = Server::start(&[]);
    let data = first.data.clone();
    let token = first.token.clone();
    let base = Arc::new(RwLock::new(first.url("")));
    let appender = Appender::new(base.clone(), &token);
    appender.append(&events(0..300, 100), "prefill");

    let rt = runtime();
    let target: Arc<OnceLock<String>> = Arc::new(OnceLock::new());
    let mut follower = Follower::new("across restarts", &token, &[("since", "earliest")], None);
    let progress = follower.progress.clone();
    let deadline = Instant::now() + Duration::from_secs(50);
    let client = {
        let (base, target) = (base.clone(), target.clone());
        rt.spawn(async move {
            follower
                .run(
                    || base.read().expect("base").clone(),
                    |f| target.get().is_some_and(|t| f.reached(t)),
                    deadline,
                )
                .await;
            follower
        })
    };

    // The writer keeps appending through both restarts (retrying with the same
    // Idempotency-Key while the server is away) until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (appender, stop) = (appender.clone(), stop.clone());
        std::thread::spawn(move || {
            let sizes = [1, 1, 1, 2, 3, 7, 20, 60];
            let mut rng = StdRng::seed_from_u64(7);
            let (mut i, mut requests) = (300, 0);
            while !stop.load(Ordering::Relaxed) && i < MAX_EVENTS {
                let n = sizes[rng.random_range(0..sizes.len())];
                appender.append(&events(i..i + n, 100), &format!("w-{requests}"));
                i += n;
                requests += 1;
            }
            i
        })
    };
    let received = || progress.events.load(Ordering::Relaxed);
    let wait_for_more = |what: &str| {
        let mark = received();
        wait_until(Duration::from_secs(20), what, || received() >= mark + STEP);
    };

    wait_for_more("the client to stream from the first server");
    first.kill();
    let mut second = Server::start_on(&data, &[]);
    *base.write().expect("base") = second.url("");
    wait_for_more("the client to resume on the server restarted after SIGKILL");

    let clean_before = progress.clean_ends.load(Ordering::Relaxed);
    let status = second.terminate();
    assert!(
        status.success(),
        "SIGTERM with an open stream: exit {status}"
    );
    wait_until(
        Duration::from_secs(5),
        "the SIGTERM'd server's stream to end with a clean end of the body",
        || progress.clean_ends.load(Ordering::Relaxed) > clean_before,
    );
    let third = Server::start_on(&data, &[]);
    *base.write().expect("base") = third.url("");
    wait_for_more("the client to resume on the server restarted after SIGTERM");

    stop.store(true, Ordering::Relaxed);
    let appended = writer.join().expect("writer");
    let head = third.head();
    let final_id = head["id"].as_str().expect("head id").to_string();
    target.set(final_id).expect("target set once");
    let follower = match rt.block_on(client) {
        Ok(f) => f,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };

    let log = export(&third.url(""), &token, "since=earliest");
    eprintln!(
        "across restarts: {} events in the log, {} received, {} attempts, {} sessions, {} drops",
        log.len(),
        follower.events.len(),
        follower.attempts,
        follower.sessions,
        follower.drops
    );
    assert_eq!(
        log.len(),
        appended,
        "every acknowledged request once (retries carry the same Idempotency-Key)"
    );
    assert!(follower.sessions >= 3, "the client never reconnected");
    // Every event it saw (before each crash too) is in the final log, byte for byte, and
    // nothing is missing or repeated.
    assert_exactly_once(&follower.label, &follower.events, &log);
}

// ---------------------------------------------------------------------------------------
// 4. `cairn events --cursor-file`
// ---------------------------------------------------------------------------------------

/// Runs `cairn events --url URL --cursor-file F [extra]` (token from `CAIRN_TOKEN`);
/// returns its stdout lines.
fn events_run(url: &str, token: &str, file: &Path, extra: &[&str]) -> Vec<String> {
    let file = file.to_str().expect("utf-8 path");
    let mut args = vec!["events", "--url", url, "--cursor-file", file];
    args.extend_from_slice(extra);
    let (code, out, err) = common::cairn(&args, &[("CAIRN_TOKEN", token)]);
    assert_eq!(code, 0, "cairn {args:?}: {err}");
    assert!(out.is_empty() || out.ends_with('\n'), "a partial last line");
    out.split('\n')
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

fn cursor_in(file: &Path) -> String {
    std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .to_string()
}

#[test]
fn cairn_events_with_a_cursor_file_delivers_the_log_once_over_runs() {
    let server = Server::start(&[]);
    let url = server.url("");
    let token = server.token.clone();
    let appender = Appender::new(Arc::new(RwLock::new(url.clone())), &token);
    let dir = tempfile::tempdir().expect("tempdir");
    let all = dir.path().join("all.cursor");
    let typed = dir.path().join("typed.cursor");
    let typed_args = ["--types", TYPE_FILTER];
    let mut all_out: Vec<String> = Vec::new();
    let mut typed_out: Vec<String> = Vec::new();
    let head_id = || server.head()["id"].as_str().expect("head id").to_string();

    // Run 1: no cursor file yet, so from `earliest`.
    appender.append(&events(0..700, 60), "r1-a");
    appender.append(&events(700..1_000, 60), "r1-b");
    let out = events_run(&url, &token, &all, &[]);
    assert_eq!(out.len(), 1_000);
    assert_eq!(
        cursor_in(&all),
        head_id(),
        "the cursor file holds the last id"
    );
    all_out.extend(out);
    let out = events_run(&url, &token, &typed, &typed_args);
    assert_eq!(cursor_in(&typed), id_of(out.last().expect("typed events")));
    typed_out.extend(out);

    // Run 2: the file wins over --since.
    appender.append(&events(1_000..1_400, 60), "r2");
    let out = events_run(&url, &token, &all, &["--since", "earliest"]);
    assert_eq!(
        out.len(),
        400,
        "--since earliest must not win over an existing cursor file"
    );
    assert_eq!(cursor_in(&all), head_id());
    all_out.extend(out);
    typed_out.extend(events_run(&url, &token, &typed, &typed_args));

    // Run 3: nothing new prints nothing and leaves the files alone.
    let (before_all, before_typed) = (cursor_in(&all), cursor_in(&typed));
    assert!(events_run(&url, &token, &all, &[]).is_empty());
    assert!(events_run(&url, &token, &typed, &typed_args).is_empty());
    assert_eq!(
        (cursor_in(&all), cursor_in(&typed)),
        (before_all, before_typed.clone())
    );

    // Run 4: only events the type filter rejects.
    let others: Vec<Value> = (1_400..1_500)
        .map(|i| json!({ "type": "other", "data": { "i": i } }))
        .collect();
    appender.append(&others, "r4");
    let out = events_run(&url, &token, &all, &[]);
    assert_eq!(out.len(), 100);
    all_out.extend(out);
    assert!(
        events_run(&url, &token, &typed, &typed_args).is_empty(),
        "--types kind.a,kind.b* printed an `other` event"
    );

    // Runs 5..: a backfill job every few requests while a writer keeps appending.
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (appender, done) = (appender.clone(), done.clone());
        std::thread::spawn(move || {
            let mut i = 1_500;
            for k in 0..150 {
                let n = [1, 2, 9, 30][k % 4];
                appender.append(&events(i..i + n, 60), &format!("r5-{k}"));
                i += n;
            }
            done.store(true, Ordering::Relaxed);
        })
    };
    let mut runs = 0;
    loop {
        let finished = done.load(Ordering::Relaxed);
        all_out.extend(events_run(&url, &token, &all, &[]));
        typed_out.extend(events_run(&url, &token, &typed, &typed_args));
        runs += 1;
        assert!(runs < 500, "the writer never finished");
        if finished {
            break;
        }
    }
    writer.join().expect("writer");

    let log: Vec<(String, String)> = export(&url, &token, "since=earliest");
    let got = with_ids(all_out);
    assert_exactly_once("cursor-file runs", &got, &log);
    assert_eq!(cursor_in(&all), log.last().expect("log").0);
    let log_typed: Vec<(String, String)> = log
        .iter()
        .filter(|(_, line)| type_matches_filter(&type_of(line)))
        .cloned()
        .collect();
    assert_eq!(
        log_typed,
        export(&url, &token, &format!("since=earliest&types={TYPE_FILTER}")),
        "export ?types= disagrees with the filter"
    );
    let got = with_ids(typed_out);
    assert_exactly_once("cursor-file runs with --types", &got, &log_typed);
    assert_eq!(cursor_in(&typed), log_typed.last().expect("typed").0);
    eprintln!(
        "cursor file: {} events ({} typed), {} rounds of runs, most while appending",
        log.len(),
        log_typed.len(),
        runs + 4
    );
}

// ---------------------------------------------------------------------------------------
// 5. `cairn events --follow` across restarts on the same port
// ---------------------------------------------------------------------------------------

/// The `cairn events --follow` child and its stdout lines as they come.
struct EventsCli {
    child: Child,
    /// Complete lines; `Err` for bytes after the last `\n` when stdout closed.
    lines: std::sync::mpsc::Receiver<Result<String, String>>,
    stderr: Arc<Mutex<String>>,
    got: Vec<String>,
    /// Output that ended without its `\n` (a cut-off NDJSON line).
    partial: Option<String>,
}

impl EventsCli {
    /// `cairn events --url URL ARGS` with `CAIRN_TOKEN`.
    fn spawn(url: &str, token: &str, args: &[&str]) -> EventsCli {
        let mut child = Command::new(BIN)
            .args(["events", "--url", url])
            .args(args)
            .env_remove("CAIRN_URL")
            .env("CAIRN_TOKEN", token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cairn events --follow");
        // Bounded: a test that stops reading holds the CLI up (pipe full) mid-output.
        let (tx, lines) = std::sync::mpsc::sync_channel(64);
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            // Split on \n only: events may hold U+2028.
            let mut stdout = BufReader::new(stdout);
            loop {
                let mut line = Vec::new();
                match stdout.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let complete = line.last() == Some(&b'\n');
                if complete {
                    line.pop();
                }
                let line = String::from_utf8_lossy(&line).into_owned();
                let item = if complete { Ok(line) } else { Err(line) };
                if tx.send(item).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let (stderr, pipe) = (stderr.clone(), child.stderr.take().expect("stderr"));
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut s = stderr.lock().expect("stderr");
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        EventsCli {
            child,
            lines,
            stderr,
            got: Vec::new(),
            partial: None,
        }
    }

    /// Reads lines until `stop(lines so far)` or the timeout (then panics).
    fn read_until(&mut self, what: &str, timeout: Duration, stop: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !stop(&self.got) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(Ok(line)) => self.got.push(line),
                Ok(Err(partial)) => self.partial = Some(partial),
                Err(_) => panic!(
                    "timed out waiting for {what}: {} lines so far; stderr:\n{}",
                    self.got.len(),
                    self.stderr.lock().expect("stderr")
                ),
            }
        }
    }
}

impl EventsCli {
    /// Sends `kill -SIGNAL` (if any), reads everything it prints until it exits.
    fn stop(&mut self, signal: Option<&str>) -> ExitStatus {
        if let Some(signal) = signal {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &self.child.id().to_string()])
                .status();
        }
        // The reader thread ends the channel once stdout is closed.
        loop {
            match self.lines.recv_timeout(Duration::from_secs(20)) {
                Ok(Ok(line)) => self.got.push(line),
                Ok(Err(partial)) => self.partial = Some(partial),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(e) => panic!("cairn events did not end (signal {signal:?}): {e}"),
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "cairn events closed stdout but did not exit (signal {signal:?})"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for EventsCli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn cairn_events_follow_survives_restarts_on_the_same_port() {
    const STEP: usize = 400;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = common::free_port();
    let mut server = Server::start_fixed(&data, port);
    let url = server.url("");
    let token = std::fs::read_to_string(data.join("admin.token"))
        .expect("admin.token")
        .trim()
        .to_string();
    let appender = Appender::new(Arc::new(RwLock::new(url.clone())), &token);
    appender.append(&events(0..500, 60), "prefill");

    let mut cli = EventsCli::spawn(&url, &token, &["--follow", "--since", "earliest"]);
    cli.read_until("the history", Duration::from_secs(20), |l| l.len() >= 500);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (appender, stop) = (appender.clone(), stop.clone());
        std::thread::spawn(move || {
            let sizes = [1, 1, 2, 5, 13, 40];
            let (mut i, mut k) = (500, 0);
            while !stop.load(Ordering::Relaxed) && i < 60_000 {
                let n = sizes[k % sizes.len()];
                appender.append(&events(i..i + n, 60), &format!("w-{k}"));
                i += n;
                k += 1;
            }
            i
        })
    };

    let mark = cli.got.len();
    cli.read_until("live events", Duration::from_secs(20), |l| {
        l.len() >= mark + STEP
    });
    server.kill();
    server = Server::start_fixed(&data, port);
    let mark = cli.got.len();
    cli.read_until(
        "events from the server restarted after SIGKILL",
        Duration::from_secs(30),
        |l| l.len() >= mark + STEP,
    );
    let status = server.terminate();
    assert!(status.success(), "SIGTERM under --follow: exit {status}");
    server = Server::start_fixed(&data, port);
    let mark = cli.got.len();
    cli.read_until(
        "events from the server restarted after SIGTERM",
        Duration::from_secs(30),
        |l| l.len() >= mark + STEP,
    );
    stop.store(true, Ordering::Relaxed);
    let appended = writer.join().expect("writer");

    // A last event: anything repeated by a reconnect would arrive before it.
    let sentinel = appender.append(
        &[json!({ "type": "kind.a", "data": "sentinel" })],
        "sentinel",
    );
    let sentinel = sentinel[0].clone();
    cli.read_until("the last event", Duration::from_secs(30), |l| {
        l.last().is_some_and(|line| id_of(line) == sentinel)
    });

    let log = export(&url, &token, "since=earliest");
    assert_eq!(log.len(), appended + 1);
    let got = with_ids(std::mem::take(&mut cli.got));
    let reconnects = cli
        .stderr
        .lock()
        .expect("stderr")
        .matches("reconnecting")
        .count();
    eprintln!(
        "--follow: {} events across a SIGKILL and a SIGTERM restart on port {port}, {reconnects} \
         reconnect messages",
        got.len()
    );
    assert_exactly_once("cairn events --follow", &got, &log);
    assert!(reconnects >= 2, "the CLI never said it reconnected");
    drop(server);
}

#[test]
fn cairn_events_follow_with_a_cursor_file_resumes_exactly_once_after_sigint_and_sigterm() {
    const STEP: usize = 500;
    let server = Server::start(&[]);
    let url = server.url("");
    let token = server.token.clone();
    let appender = Appender::new(Arc::new(RwLock::new(url.clone())), &token);
    appender.append(&events(0..300, 60), "prefill");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("follow.cursor");
    let args = [
        "--follow",
        "--since",
        "earliest",
        "--cursor-file",
        file.to_str().expect("utf-8 path"),
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (appender, stop) = (appender.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut i, mut k) = (300, 0);
            while !stop.load(Ordering::Relaxed) && i < 60_000 {
                let n = [1, 3, 8][k % 3];
                appender.append(&events(i..i + n, 60), &format!("w-{k}"));
                i += n;
                k += 1;
            }
        })
    };

    // A service manager stops the follower (SIGINT, then SIGTERM as systemd and docker
    // do) while events flow; the next start must continue from the cursor file.
    let mut printed: Vec<String> = Vec::new();
    let mut notes = Vec::new();
    for signal in ["INT", "TERM"] {
        let mut cli = EventsCli::spawn(&url, &token, &args);
        cli.read_until(
            &format!("events before SIG{signal}"),
            Duration::from_secs(20),
            |l| l.len() >= STEP,
        );
        let status = cli.stop(Some(signal));
        if let Some(partial) = cli.partial.take() {
            notes.push(format!(
                "after SIG{signal} stdout ends in a cut-off line: {partial:.80}"
            ));
        }
        let last = id_of(cli.got.last().expect("printed events"));
        let cursor = cursor_in(&file);
        if cursor != last {
            notes.push(format!(
                "after SIG{signal} ({status}) the cursor file holds {cursor} but the last event \
                 printed was {last}"
            ));
        }
        printed.append(&mut cli.got);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let sentinel =
        appender.append(&[json!({ "type": "kind.a", "data": "sentinel" })], "last")[0].clone();
    let mut cli = EventsCli::spawn(&url, &token, &args);
    cli.read_until("the last event", Duration::from_secs(30), |l| {
        l.last().is_some_and(|line| id_of(line) == sentinel)
    });
    cli.stop(Some("INT"));
    assert_eq!(cursor_in(&file), sentinel, "the cursor after a SIGINT");
    printed.append(&mut cli.got);

    let log = export(&url, &token, "since=earliest");
    eprintln!(
        "--follow --cursor-file: {} events in the log, {} printed over 3 runs",
        log.len(),
        printed.len()
    );
    assert_exactly_once(
        &format!("three --follow --cursor-file runs ({notes:?})"),
        &with_ids(printed),
        &log,
    );
    assert!(notes.is_empty(), "{notes:?}");
}

#[test]
fn an_interrupted_cairn_events_backfill_resumes_from_its_cursor_file_exactly_once() {
    const TOTAL: usize = 30_000;
    let server = Server::start(&[]);
    let url = server.url("");
    let token = server.token.clone();
    let appender = Appender::new(Arc::new(RwLock::new(url.clone())), &token);
    for k in 0..3 {
        appender.append(&events(k * 10_000..(k + 1) * 10_000, 60), &format!("b-{k}"));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("backfill.cursor");
    let args = ["--cursor-file", file.to_str().expect("utf-8 path")];

    // A cron job cut short (Ctrl-C; `timeout`, systemd or docker send SIGTERM). The test
    // reads slowly, so the export is surely still running when the signal comes.
    let mut printed: Vec<String> = Vec::new();
    let mut notes = Vec::new();
    for signal in ["INT", "TERM"] {
        let mut cli = EventsCli::spawn(&url, &token, &args);
        cli.read_until(
            &format!("events before SIG{signal}"),
            Duration::from_secs(20),
            |l| l.len() >= 3_000,
        );
        let status = cli.stop(Some(signal));
        assert!(
            cli.got.len() < TOTAL,
            "the backfill ended before SIG{signal}"
        );
        if let Some(partial) = cli.partial.take() {
            notes.push(format!(
                "after SIG{signal} stdout ends in a cut-off line: {partial:.80}"
            ));
        }
        let last = id_of(cli.got.last().expect("printed events"));
        let cursor = std::fs::read_to_string(&file).unwrap_or_default();
        if cursor.trim() != last {
            notes.push(format!(
                "after SIG{signal} ({status}, {} events printed) the cursor file holds {:?} \
                 but the last event printed was {last}",
                cli.got.len(),
                cursor.trim()
            ));
        }
        printed.append(&mut cli.got);
    }
    let mut cli = EventsCli::spawn(&url, &token, &args);
    let status = cli.stop(None);
    assert!(status.success(), "the last backfill run: {status}");
    printed.append(&mut cli.got);

    let log = export(&url, &token, "since=earliest");
    assert_eq!(log.len(), TOTAL);
    eprintln!(
        "interrupted backfill: {TOTAL} events, {} printed over 3 runs",
        printed.len()
    );
    assert_exactly_once(
        &format!("interrupted --cursor-file backfills ({notes:?})"),
        &with_ids(printed),
        &log,
    );
    assert!(notes.is_empty(), "{notes:?}");
}
