//! Streaming benchmarks against the real release server over loopback HTTP (workloads
//! W3 replay, W4 fan-out and W5 idle subscriptions of the team's peer comparison,
//! docs/benchmarks.md, plus a 1,000-subscriber fan-out; W4 over SSE and
//! over WebSocket): prints replay
//! events/s and time to first event, fan-out delivery and end-to-end latency, and the
//! server's resident memory per idle stream.
//!
//! `cargo bench --bench stream` runs all; `cargo bench --bench stream -- w4` runs one
//! (names: w3, w4-sse, w4-ws, w4-mixed, fanout1000, idle-sse, idle-ws, vs-redis; `w4`
//! runs the three W4s, `idle` both idle runs).
//!
//! `vs-redis` (when `redis-server` is on the PATH) runs W1, W2, W4, W5 and single-event
//! ingest from 64 connections against Redis
//! Streams on the same machine, cairn and Redis alternating, `CAIRN_BENCH_PAIRS` pairs
//! (default 3), and prints each pair's ratio and the median.
//!
//! The client is lean on purpose (client and server share the machine's cores): hyper's
//! `client::conn::http1` with one connection per task and no pool, and a `memchr` SSE
//! parser over the decoded chunks that allocates nothing per event. The idle connections
//! of `idle` are bare TCP sockets with 4 KiB buffers, closed with SO_LINGER 0.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use support::redis::{IDLE_SETTLE, IdleMemory};
use support::{Server, TS, batch_body, event, median};

/// Most connections being opened at once: under the usual listen backlog of 128, so a
/// dropped SYN cannot add a 1 s retransmit to the opening time.
const OPEN_IN_FLIGHT: usize = 64;

/// The W4 event: the workload event with `data.sent_ns` first in `data` (about 320 B).
fn timed_event(seq: u64, sent_ns: u64) -> Bytes {
    let e = event(seq, TS);
    let at = e.find("\"data\":{").map_or(0, |i| i + 8);
    let mut s = String::with_capacity(e.len() + 32);
    s.push_str(&e[..at]);
    s.push_str("\"sent_ns\":");
    s.push_str(itoa::Buffer::new().format(sent_ns));
    s.push(',');
    s.push_str(&e[at..]);
    Bytes::from(s)
}

/// CPU seconds (user + system) this process has used so far.
fn own_cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Raises the soft open-file limit to the hard limit (children inherit it).
fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write only the struct given.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            let _ = libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
        lim.rlim_cur
    }
}

// ---------------------------------------------------------------------------------------
// HTTP client

type Conn = SendRequest<Full<Bytes>>;

async fn connect(addr: &str) -> Result<Conn, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let (send, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(send)
}

fn get(addr: &str, auth: &str, path: &str) -> hyper::Request<Full<Bytes>> {
    hyper::Request::get(path)
        .header("host", addr)
        .header("authorization", auth)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

fn post(addr: &str, auth: &str, body: Bytes) -> hyper::Request<Full<Bytes>> {
    hyper::Request::post("/v1/events")
        .header("host", addr)
        .header("authorization", auth)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("request")
}

/// GET to a whole body, on a fresh connection.
async fn get_json(addr: &str, auth: &str, path: &str) -> Result<serde_json::Value, String> {
    let mut conn = connect(addr).await?;
    let resp = conn
        .send_request(get(addr, auth, path))
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("GET {path}: {e}"))?
        .to_bytes();
    if status != 200 {
        return Err(format!("GET {path}: status {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("GET {path}: {e}"))
}

async fn healthz_connections(addr: &str) -> i64 {
    get_json(addr, "", "/healthz")
        .await
        .ok()
        .and_then(|v| v["connections"].as_i64())
        .unwrap_or(-1)
}

// ---------------------------------------------------------------------------------------
// Lean SSE parsing

/// Splits decoded body bytes into SSE frames (blocks ending in a blank line). Only a frame
/// split across two chunks is copied; everything else is handed out in place.
struct SseFrames {
    carry: Vec<u8>,
    blank: memmem::Finder<'static>,
}

impl SseFrames {
    fn new() -> SseFrames {
        SseFrames {
            carry: Vec::with_capacity(4096),
            blank: memmem::Finder::new(b"\n\n"),
        }
    }

    /// Calls `on_frame` with each complete frame (without its blank line) in `chunk`;
    /// stops early, returning false, when `on_frame` does.
    fn feed(&mut self, chunk: &[u8], mut on_frame: impl FnMut(&[u8]) -> bool) -> bool {
        let mut rest = chunk;
        if !self.carry.is_empty() {
            let end = if self.carry.last() == Some(&b'\n') && rest.first() == Some(&b'\n') {
                Some(1)
            } else {
                self.blank.find(rest).map(|i| i + 2)
            };
            let Some(end) = end else {
                self.carry.extend_from_slice(rest);
                return true;
            };
            self.carry.extend_from_slice(&rest[..end]);
            rest = &rest[end..];
            let frame = std::mem::take(&mut self.carry);
            let go_on = on_frame(&frame[..frame.len() - 2]);
            self.carry = frame;
            self.carry.clear();
            if !go_on {
                return false;
            }
        }
        while let Some(i) = self.blank.find(rest) {
            if !on_frame(&rest[..i]) {
                return false;
            }
            rest = &rest[i + 2..];
        }
        self.carry.extend_from_slice(rest);
        true
    }
}

/// The value of field `name` in an SSE frame (`name: value` or `name:value`).
fn field<'a>(frame: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut rest = frame;
    loop {
        let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        if let Some(v) = line.strip_prefix(name)
            && let Some(v) = v.strip_prefix(b":")
        {
            return Some(v.strip_prefix(b" ").unwrap_or(v));
        }
        if end >= rest.len() {
            return None;
        }
        rest = &rest[end + 1..];
    }
}

/// The top-level `seq` of an event's JSON line (the workload event also has `data.seq`).
fn top_seq(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()?
        .get("seq")?
        .as_u64()
}

/// Digits after `"key":` in `line`.
fn num_after(finder: &memmem::Finder<'_>, line: &[u8]) -> Option<u64> {
    let at = finder.find(line)? + finder.needle().len();
    let digits = &line[at..];
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 {
        return None;
    }
    digits[..n].iter().try_fold(0u64, |acc, d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

// ---------------------------------------------------------------------------------------
// Statistics

fn pct_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    sorted_us[i] as f64 / 1000.0
}

fn mark(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

// ---------------------------------------------------------------------------------------
// W3: replay of 500,000 stored events

/// Loads `total` events (4 connections × 100-event batches, like benches/ingest.rs) and
/// returns the id of the event at seq `at` from the 201 response that holds it.
async fn load(server: &Server, total: u64, at: u64) -> Result<String, String> {
    const CONNS: u64 = 4;
    const BATCH: u64 = 100;
    let per_conn = total / BATCH / CONNS;
    let bodies: Arc<Vec<Bytes>> = Arc::new((0..8).map(|i| batch_body(i * BATCH, BATCH)).collect());
    let mut tasks = Vec::new();
    for c in 0..CONNS {
        let (addr, auth, bodies) = (server.addr.clone(), server.auth(), bodies.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = connect(&addr).await?;
            let mut found = None;
            for i in 0..per_conn {
                let body = bodies[((c + i) % bodies.len() as u64) as usize].clone();
                let resp = conn
                    .send_request(post(&addr, &auth, body))
                    .await
                    .map_err(|e| format!("POST: {e}"))?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("POST body: {e}"))?
                    .to_bytes();
                if status != 201 {
                    return Err(format!(
                        "POST: status {status}: {}",
                        String::from_utf8_lossy(&body)
                    ));
                }
                if found.is_none() {
                    let v: serde_json::Value =
                        serde_json::from_slice(&body).map_err(|e| format!("201 body: {e}"))?;
                    let first = v["data"]["first_seq"].as_u64().unwrap_or(u64::MAX);
                    let last = v["data"]["last_seq"].as_u64().unwrap_or(0);
                    if (first..=last).contains(&at) {
                        found = v["data"]["ids"][(at - first) as usize]
                            .as_str()
                            .map(str::to_string);
                    }
                }
            }
            Ok::<_, String>(found)
        }));
    }
    let mut cursor = None;
    for t in tasks {
        if let Some(id) = t.await.map_err(|e| e.to_string())?? {
            cursor = Some(id);
        }
    }
    cursor.ok_or_else(|| format!("no 201 response held seq {at}"))
}

struct Replay {
    events: u64,
    secs: f64,
    connected_ms: f64,
    ttfe_ms: f64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    ordered: bool,
    cursor_ok: bool,
    bytes: u64,
}

/// `GET /v1/events/stream?since=<cursor>`, read until `target` event frames arrived.
async fn sse_replay(
    addr: &str,
    auth: &str,
    since: &str,
    target: u64,
    deadline: Duration,
) -> Result<Replay, String> {
    let mut conn = connect(addr).await?;
    let path = format!("/v1/events/stream?since={since}");
    let mut r = Replay {
        events: 0,
        secs: 0.0,
        connected_ms: f64::NAN,
        ttfe_ms: f64::NAN,
        first_seq: None,
        last_seq: None,
        ordered: true,
        cursor_ok: false,
        bytes: 0,
    };
    let start = Instant::now();
    let read = async {
        let resp = conn
            .send_request(get(addr, auth, &path))
            .await
            .map_err(|e| format!("GET stream: {e}"))?;
        if resp.status() != 200 {
            return Err(format!("GET stream: status {}", resp.status()));
        }
        let mut body = resp.into_body();
        let mut frames = SseFrames::new();
        let mut last_id = [0u8; 26];
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("stream body: {e}"))?;
            let Some(chunk) = frame.data_ref() else {
                continue;
            };
            r.bytes += chunk.len() as u64;
            let go_on = frames.feed(chunk, |f| {
                let Some(kind) = field(f, b"event") else {
                    return true; // comment or id-only frame
                };
                if kind == b"connected" {
                    r.connected_ms = start.elapsed().as_secs_f64() * 1e3;
                    r.cursor_ok = field(f, b"data")
                        .and_then(|d| serde_json::from_slice::<serde_json::Value>(d).ok())
                        .is_some_and(|v| v["cursor"].as_str() == Some(since));
                    return true;
                }
                r.events += 1;
                match field(f, b"id") {
                    Some(id) if id.len() == 26 && id > &last_id[..] => last_id.copy_from_slice(id),
                    _ => r.ordered = false,
                }
                if r.events == 1 {
                    r.ttfe_ms = start.elapsed().as_secs_f64() * 1e3;
                    r.first_seq = field(f, b"data").and_then(top_seq);
                }
                if r.events == target {
                    r.last_seq = field(f, b"data").and_then(top_seq);
                    return false;
                }
                true
            });
            if !go_on {
                break;
            }
        }
        Ok(())
    };
    match tokio::time::timeout(deadline, read).await {
        Ok(result) => result?,
        Err(_) => return Err(format!("deadline: {} events read", r.events)),
    }
    r.secs = start.elapsed().as_secs_f64();
    Ok(r)
}

/// `GET /v1/export?since=<cursor>`, NDJSON read to its end.
async fn export_replay(
    addr: &str,
    auth: &str,
    since: &str,
    deadline: Duration,
) -> Result<Replay, String> {
    let mut conn = connect(addr).await?;
    let path = format!("/v1/export?since={since}");
    let mut r = Replay {
        events: 0,
        secs: 0.0,
        connected_ms: f64::NAN,
        ttfe_ms: f64::NAN,
        first_seq: None,
        last_seq: None,
        ordered: true,
        cursor_ok: true,
        bytes: 0,
    };
    let start = Instant::now();
    // The first line, until its newline arrives; then the last 4 KiB or more of the body.
    let mut head: Vec<u8> = Vec::new();
    let mut tail: Vec<u8> = Vec::with_capacity(16 * 1024);
    let read = async {
        let resp = conn
            .send_request(get(addr, auth, &path))
            .await
            .map_err(|e| format!("GET export: {e}"))?;
        if resp.status() != 200 {
            return Err(format!("GET export: status {}", resp.status()));
        }
        let mut body = resp.into_body();
        let mut have_first = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("export body: {e}"))?;
            let Some(chunk) = frame.data_ref() else {
                continue;
            };
            if r.bytes == 0 && !chunk.is_empty() {
                r.ttfe_ms = start.elapsed().as_secs_f64() * 1e3;
            }
            r.bytes += chunk.len() as u64;
            r.events += memchr::memchr_iter(b'\n', chunk).count() as u64;
            if !have_first {
                match memchr::memchr(b'\n', chunk) {
                    Some(i) => {
                        head.extend_from_slice(&chunk[..i]);
                        have_first = true;
                    }
                    None => head.extend_from_slice(chunk),
                }
            }
            if chunk.len() >= 4096 {
                tail.clear();
                tail.extend_from_slice(&chunk[chunk.len() - 4096..]);
            } else {
                tail.extend_from_slice(chunk);
                if tail.len() > 12 * 1024 {
                    tail.drain(..tail.len() - 4096);
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(deadline, read).await {
        Ok(result) => result?,
        Err(_) => return Err(format!("deadline: {} lines read", r.events)),
    }
    r.secs = start.elapsed().as_secs_f64();
    r.first_seq = top_seq(&head);
    let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
    let last = memchr::memrchr(b'\n', body).map_or(body, |i| &body[i + 1..]);
    r.last_seq = top_seq(last);
    Ok(r)
}

fn w3(rt: &tokio::runtime::Runtime) {
    const TOTAL: u64 = 1_000_000;
    const AT: u64 = 500_000;
    const TARGET: u64 = TOTAL - AT;
    let s = Server::start("none", &[]);
    let t = Instant::now();
    let cursor = match rt.block_on(load(&s, TOTAL, AT)) {
        Ok(c) => c,
        Err(e) => {
            println!("W3: load failed: {e}");
            return;
        }
    };
    let head = rt
        .block_on(get_json(&s.addr, &s.auth(), "/v1/head"))
        .ok()
        .and_then(|v| v["data"]["seq"].as_u64().or(v["seq"].as_u64()));
    println!(
        "W3 load: {TOTAL} events in {:.1} s (untimed, --sync none, 4 conns x 100/batch); head seq {head:?}; cursor (seq {AT}) {cursor}",
        t.elapsed().as_secs_f64()
    );
    let auth = s.auth();
    for run in 1..=2 {
        let (cpu_s, cpu_c) = (s.cpu_secs(), own_cpu_secs());
        let result = rt.block_on(sse_replay(
            &s.addr,
            &auth,
            &cursor,
            TARGET,
            Duration::from_secs(120),
        ));
        let (cpu_s, cpu_c) = (s.cpu_secs() - cpu_s, own_cpu_secs() - cpu_c);
        match result {
            Ok(r) => {
                let rate = r.events as f64 / r.secs;
                let complete = r.events == TARGET
                    && r.first_seq == Some(AT + 1)
                    && r.last_seq == Some(TOTAL)
                    && r.ordered
                    && r.cursor_ok;
                println!(
                    "W3 SSE replay, run {run}: {} events in {:.3} s = {:>9.0} events/s [target >= 1,500,000: {}]  connected {:.2} ms  first event {:.2} ms [target <= 1 ms: {}]  seq {:?}..{:?}  ordered {}  cursor {}  {:.0} B/event  CPU server {:.2} s client {:.2} s  {}",
                    r.events,
                    r.secs,
                    rate,
                    mark(rate >= 1_500_000.0),
                    r.connected_ms,
                    r.ttfe_ms,
                    mark(r.ttfe_ms <= 1.0),
                    r.first_seq,
                    r.last_seq,
                    r.ordered,
                    if r.cursor_ok { "ok" } else { "WRONG" },
                    r.bytes as f64 / r.events.max(1) as f64,
                    cpu_s,
                    cpu_c,
                    if complete { "complete" } else { "INCOMPLETE" }
                );
            }
            Err(e) => println!("W3 SSE replay, run {run}: FAILED: {e}"),
        }
    }
    let (cpu_s, cpu_c) = (s.cpu_secs(), own_cpu_secs());
    let result = rt.block_on(export_replay(
        &s.addr,
        &auth,
        &cursor,
        Duration::from_secs(120),
    ));
    let (cpu_s, cpu_c) = (s.cpu_secs() - cpu_s, own_cpu_secs() - cpu_c);
    match result {
        Ok(r) => {
            let complete =
                r.events == TARGET && r.first_seq == Some(AT + 1) && r.last_seq == Some(TOTAL);
            println!(
                "W3 export (NDJSON) for comparison: {} lines in {:.3} s = {:>9.0} events/s  first bytes {:.2} ms  seq {:?}..{:?}  {:.0} B/event  CPU server {:.2} s client {:.2} s  {}",
                r.events,
                r.secs,
                r.events as f64 / r.secs,
                r.ttfe_ms,
                r.first_seq,
                r.last_seq,
                r.bytes as f64 / r.events.max(1) as f64,
                cpu_s,
                cpu_c,
                if complete { "complete" } else { "INCOMPLETE" }
            );
        }
        Err(e) => println!("W3 export: FAILED: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// W4 and fanout1000: live fan-out with end-to-end latency

#[derive(Default)]
struct SubResult {
    /// Receive latency of each event, in µs.
    lat_us: Vec<u32>,
    received: u64,
    ordered: bool,
    /// Event frames without a readable `data.sent_ns`.
    no_sent_ns: u64,
    error: Option<String>,
}

/// How a fan-out's subscribers read the live stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Sse,
    WebSocket,
    /// Half and half on the same server at the same time, with latencies reported per
    /// transport: separates what the framing costs from the machine's noise.
    Mixed,
}

impl Transport {
    /// The transport of subscriber `i`.
    fn of(self, i: usize) -> Transport {
        match self {
            Transport::Mixed if i.is_multiple_of(2) => Transport::Sse,
            Transport::Mixed => Transport::WebSocket,
            one => one,
        }
    }
}

/// Counts one subscriber's events: order by id, latency from `data.sent_ns`.
struct Tally {
    r: SubResult,
    sent_ns: memmem::Finder<'static>,
    last_id: [u8; 26],
}

impl Tally {
    fn new(expected: u64) -> Tally {
        Tally {
            r: SubResult {
                lat_us: Vec::with_capacity(expected as usize),
                ordered: true,
                ..SubResult::default()
            },
            sent_ns: memmem::Finder::new(b"\"sent_ns\":"),
            last_id: [0u8; 26],
        }
    }

    fn event(&mut self, id: Option<&[u8]>, data: Option<&[u8]>, now_ns: u64) {
        self.r.received += 1;
        match id {
            Some(id) if id.len() == 26 && id > &self.last_id[..] => {
                self.last_id.copy_from_slice(id)
            }
            _ => self.r.ordered = false,
        }
        match data.and_then(|d| num_after(&self.sent_ns, d)) {
            Some(sent) => {
                let us = now_ns.saturating_sub(sent) / 1000;
                self.r.lat_us.push(us.min(u64::from(u32::MAX)) as u32);
            }
            None => self.r.no_sent_ns += 1,
        }
    }
}

/// The top-level `id` of an event's JCS line: keys are sorted, so it follows `data`,
/// and a quote inside a string is escaped, so the last `"id":"` is the top-level one.
fn top_id(line: &[u8]) -> Option<&[u8]> {
    let at = memmem::rfind(line, b"\"id\":\"")? + 6;
    line.get(at..at + 26)
}

/// A live subscriber: reports `connected` on `ready`, then reads until `expected` events
/// arrived or `stop` fires.
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    transport: Transport,
    addr: String,
    auth: String,
    base: Instant,
    expected: u64,
    opening: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<Result<(), String>>,
    done: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> SubResult {
    let mut tally = Tally::new(expected);
    let mut is_ready = false;
    let run = async {
        let permit = opening.acquire().await.map_err(|e| e.to_string())?;
        let mut permit = Some(permit);
        let mut on_connected = || {
            if !is_ready {
                is_ready = true;
                permit.take();
                let _ = ready.send(Ok(()));
            }
        };
        match transport {
            Transport::Sse => {
                let mut conn = connect(&addr).await?;
                let resp = conn
                    .send_request(get(&addr, &auth, "/v1/events/stream"))
                    .await
                    .map_err(|e| format!("GET stream: {e}"))?;
                if resp.status() != 200 {
                    return Err(format!("status {}", resp.status()));
                }
                let mut body = resp.into_body();
                let mut frames = SseFrames::new();
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| format!("stream body: {e}"))?;
                    let Some(chunk) = frame.data_ref() else {
                        continue;
                    };
                    let now_ns = base.elapsed().as_nanos() as u64;
                    let go_on = frames.feed(chunk, |f| {
                        let Some(kind) = field(f, b"event") else {
                            return true;
                        };
                        if kind == b"connected" {
                            on_connected();
                            return true;
                        }
                        tally.event(field(f, b"id"), field(f, b"data"), now_ns);
                        tally.r.received < expected
                    });
                    if !go_on {
                        break;
                    }
                }
            }
            Transport::WebSocket | Transport::Mixed => {
                use tokio_tungstenite::tungstenite::Message;
                use tokio_tungstenite::tungstenite::client::IntoClientRequest;
                use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
                let mut request = format!("ws://{addr}/v1/events/ws")
                    .into_client_request()
                    .map_err(|e| e.to_string())?;
                let value = auth.parse().map_err(|e| format!("auth header: {e}"))?;
                request.headers_mut().insert("authorization", value);
                // tungstenite zero-fills its whole read buffer before every read: at the
                // default 128 KiB that was a fifth of the client's CPU here.
                let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
                let (mut ws, _) =
                    tokio_tungstenite::connect_async_with_config(request, Some(config), true)
                        .await
                        .map_err(|e| format!("WebSocket: {e}"))?;
                // The first message is `connected`; every later text message is an event.
                let mut first = true;
                while let Some(message) = ws.next().await {
                    let message = message.map_err(|e| format!("WebSocket: {e}"))?;
                    let Message::Text(text) = message else {
                        continue;
                    };
                    if first {
                        first = false;
                        on_connected();
                        continue;
                    }
                    let line = text.as_bytes();
                    let now_ns = base.elapsed().as_nanos() as u64;
                    tally.event(top_id(line), Some(line), now_ns);
                    if tally.r.received >= expected {
                        break;
                    }
                }
            }
        }
        Ok(())
    };
    let error = tokio::select! {
        result = run => result.err(),
        () = stop.cancelled() => None,
    };
    if let Some(e) = &error
        && !is_ready
    {
        let _ = ready.send(Err(e.clone()));
    }
    tally.r.error = error;
    done.fetch_add(1, Ordering::Relaxed);
    tally.r
}

#[derive(Default)]
struct ProducerResult {
    acked: u64,
    errors: u64,
    first_error: Option<String>,
    /// How late each request left relative to its slot, µs.
    send_lag_us: Vec<u32>,
    /// Send to the whole 201, µs.
    ack_us: Vec<u32>,
    /// Time of the last 201, ns since the shared base.
    last_ack_ns: u64,
}

/// One of the producer's keep-alive connections: POSTs the next released event whenever
/// it is free.
async fn producer_conn(
    addr: String,
    auth: String,
    base: Instant,
    slot0_ns: u64,
    interval_ns: u64,
    released: Arc<Mutex<mpsc::UnboundedReceiver<u64>>>,
) -> ProducerResult {
    let mut p = ProducerResult::default();
    let mut conn = match connect(&addr).await {
        Ok(c) => c,
        Err(e) => {
            p.errors += 1;
            p.first_error = Some(e);
            return p;
        }
    };
    loop {
        let next = released.lock().await.recv().await;
        let Some(i) = next else { break };
        let sent_ns = base.elapsed().as_nanos() as u64;
        let lag = sent_ns.saturating_sub(slot0_ns + i * interval_ns) / 1000;
        p.send_lag_us.push(lag.min(u64::from(u32::MAX)) as u32);
        let result = async {
            let resp = conn
                .send_request(post(&addr, &auth, timed_event(i, sent_ns)))
                .await
                .map_err(|e| format!("POST: {e}"))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("POST body: {e}"))?
                .to_bytes();
            if status != 201 {
                return Err(format!(
                    "POST: status {status}: {}",
                    String::from_utf8_lossy(&body)
                ));
            }
            Ok(())
        }
        .await;
        let now_ns = base.elapsed().as_nanos() as u64;
        match result {
            Ok(()) => {
                p.acked += 1;
                p.ack_us
                    .push(((now_ns - sent_ns) / 1000).min(u64::from(u32::MAX)) as u32);
                p.last_ack_ns = now_ns;
            }
            Err(e) => {
                p.errors += 1;
                if p.first_error.is_none() {
                    p.first_error = Some(e);
                }
                // The connection may be unusable: take a fresh one.
                match connect(&addr).await {
                    Ok(c) => conn = c,
                    Err(_) => break,
                }
            }
        }
    }
    p
}

struct Fanout {
    transport: Transport,
    subs: usize,
    rate: u64,
    secs: u64,
    producer_conns: usize,
}

/// Runs a fan-out and prints it; returns (e2e p99 in ms, whether it was complete).
async fn fanout(server: &Server, cfg: &Fanout, name: &str, p99_target_ms: f64) -> (f64, bool) {
    let events = cfg.rate * cfg.secs;
    let interval_ns = 1_000_000_000 / cfg.rate;
    let base = Instant::now();
    let opening = Arc::new(Semaphore::new(OPEN_IN_FLIGHT));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let auth = server.auth();

    let open_start = Instant::now();
    let subs: Vec<_> = (0..cfg.subs)
        .map(|i| {
            tokio::spawn(subscriber(
                cfg.transport.of(i),
                server.addr.clone(),
                auth.clone(),
                base,
                events,
                opening.clone(),
                ready_tx.clone(),
                done.clone(),
                stop.clone(),
            ))
        })
        .collect();
    drop(ready_tx);
    let mut ready = 0;
    let mut failed: Vec<String> = Vec::new();
    let ready_deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while ready + failed.len() < cfg.subs {
        match tokio::time::timeout_at(ready_deadline, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => ready += 1,
            Ok(Some(Err(e))) => failed.push(e),
            Ok(None) | Err(_) => break,
        }
    }
    let open_secs = open_start.elapsed().as_secs_f64();
    if ready < cfg.subs {
        println!(
            "{name}: only {ready} of {} subscribers connected in {open_secs:.1} s; first failure: {:?}",
            cfg.subs,
            failed.first()
        );
    }
    let conns_seen = healthz_connections(&server.addr).await;

    // Pacing thread: event i is released at start + i × interval.
    let (release_tx, release_rx) = mpsc::unbounded_channel();
    let released = Arc::new(Mutex::new(release_rx));
    let start = Instant::now() + Duration::from_millis(20);
    let slot0_ns = (start - base).as_nanos() as u64;
    let pacer = std::thread::spawn(move || {
        for i in 0..events {
            let at = start + Duration::from_nanos(i * interval_ns);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if release_tx.send(i).is_err() {
                break;
            }
        }
    });
    let (cpu_s, cpu_c) = (server.cpu_secs(), own_cpu_secs());
    let producers: Vec<_> = (0..cfg.producer_conns)
        .map(|_| {
            tokio::spawn(producer_conn(
                server.addr.clone(),
                auth.clone(),
                base,
                slot0_ns,
                interval_ns,
                released.clone(),
            ))
        })
        .collect();
    let mut prod = ProducerResult::default();
    let producer_deadline = Duration::from_secs(cfg.secs * 2 + 30);
    for p in producers {
        match tokio::time::timeout(producer_deadline, p).await {
            Ok(Ok(r)) => {
                prod.acked += r.acked;
                prod.errors += r.errors;
                prod.first_error = prod.first_error.or(r.first_error);
                prod.send_lag_us.extend(r.send_lag_us);
                prod.ack_us.extend(r.ack_us);
                prod.last_ack_ns = prod.last_ack_ns.max(r.last_ack_ns);
            }
            Ok(Err(e)) => prod.first_error = Some(e.to_string()),
            Err(_) => prod.first_error = Some("producer deadline".to_string()),
        }
    }
    let _ = pacer.join();
    let produce_secs = (prod.last_ack_ns.saturating_sub(slot0_ns)) as f64 / 1e9;

    // Let the subscribers drain, for at most 10 s more.
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    while done.load(Ordering::Relaxed) < cfg.subs && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_secs =
        (base.elapsed().as_nanos() as u64).saturating_sub(prod.last_ack_ns) as f64 / 1e9;
    stop.cancel();
    let (cpu_s, cpu_c) = (server.cpu_secs() - cpu_s, own_cpu_secs() - cpu_c);

    let mut lat: Vec<u32> = Vec::with_capacity(cfg.subs * events as usize);
    let (mut delivered, mut unordered, mut no_sent_ns, mut sub_errors) = (0u64, 0, 0u64, 0);
    let mut first_sub_error = None;
    let mut lat_by_transport: [Vec<u32>; 2] = Default::default();
    for (i, s) in subs.into_iter().enumerate() {
        let Ok(r) = s.await else {
            sub_errors += 1;
            continue;
        };
        delivered += r.received;
        unordered += usize::from(!r.ordered);
        no_sent_ns += r.no_sent_ns;
        if let Some(e) = r.error {
            sub_errors += 1;
            first_sub_error.get_or_insert(e);
        }
        if cfg.transport == Transport::Mixed {
            let slot = usize::from(cfg.transport.of(i) == Transport::WebSocket);
            lat_by_transport[slot].extend_from_slice(&r.lat_us);
        }
        lat.extend(r.lat_us);
    }
    lat.sort_unstable();
    prod.send_lag_us.sort_unstable();
    prod.ack_us.sort_unstable();
    // As in the peers' harness: at least 99% acked, within 1.01 × the duration, with a
    // send-lag p99 under 5 ms. Otherwise the latencies are not at the intended rate.
    let pace_held = prod.acked * 100 >= events * 99
        && produce_secs <= cfg.secs as f64 * 1.01
        && pct_ms(&prod.send_lag_us, 0.99) < 5.0;
    let expected = cfg.subs as u64 * events;
    let pct_delivered = delivered as f64 * 100.0 / expected as f64;
    let p99 = pct_ms(&lat, 0.99);
    let complete = delivered == expected
        && prod.acked == events
        && unordered == 0
        && no_sent_ns == 0
        && sub_errors == 0;
    println!(
        "{name}: delivered {delivered} / {expected} = {pct_delivered:.3}% [target 100%: {}]  e2e p50 {:.2} ms  p99 {:.2} ms [target <= {p99_target_ms} ms: {}]  p99.9 {:.2} ms  max {:.2} ms  {}",
        mark(delivered == expected),
        pct_ms(&lat, 0.5),
        p99,
        mark(p99 <= p99_target_ms),
        pct_ms(&lat, 0.999),
        pct_ms(&lat, 1.0),
        if complete { "complete" } else { "INCOMPLETE" }
    );
    println!(
        "    producer: {} acked of {events} ({} errors{}) at {:.0}/s for a pacing rate of {}/s ({}); send lag p50 {:.2} ms p99 {:.2} ms max {:.2} ms; ack p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        prod.acked,
        prod.errors,
        prod.first_error
            .as_deref()
            .map_or(String::new(), |e| format!(", first: {e}")),
        prod.acked as f64 / produce_secs.max(1e-9),
        cfg.rate,
        if pace_held {
            "pace held"
        } else {
            "PACE NOT HELD: the latencies are at a lower rate"
        },
        pct_ms(&prod.send_lag_us, 0.5),
        pct_ms(&prod.send_lag_us, 0.99),
        pct_ms(&prod.send_lag_us, 1.0),
        pct_ms(&prod.ack_us, 0.5),
        pct_ms(&prod.ack_us, 0.99),
        pct_ms(&prod.ack_us, 1.0),
    );
    println!(
        "    subscribers: {ready}/{} connected in {open_secs:.2} s (healthz connections {conns_seen}); unordered {unordered}; without sent_ns {no_sent_ns}; errors {sub_errors}{}; drained {drain_secs:.2} s after the last ack; CPU server {cpu_s:.1} s client {cpu_c:.1} s",
        cfg.subs,
        first_sub_error.map_or(String::new(), |e| format!(" (first: {e})")),
    );
    for (name, lat) in ["SSE", "WebSocket"].iter().zip(&mut lat_by_transport) {
        if lat.is_empty() {
            continue;
        }
        lat.sort_unstable();
        println!(
            "    {name} subscribers alone: e2e p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms",
            pct_ms(lat, 0.5),
            pct_ms(lat, 0.99),
            pct_ms(lat, 0.999)
        );
    }
    (p99, complete)
}

// ---------------------------------------------------------------------------------------
// idle: memory per idle live stream

/// Opens one idle live stream on a bare socket with small buffers and waits for its
/// `connected` message; the stream is then left unread.
async fn open_idle(
    addr: std::net::SocketAddr,
    transport: Transport,
    request: Arc<Vec<u8>>,
) -> Result<TcpStream, String> {
    let (status, connected): (&[u8], &[u8]) = match transport {
        Transport::Sse => (b"HTTP/1.1 200", b"event: connected"),
        // JCS-free but sorted by serde_json: `type` is the last key.
        _ => (b"HTTP/1.1 101", b"\"type\":\"connected\"}"),
    };
    let work = async {
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        let _ = socket.set_recv_buffer_size(4096);
        let _ = socket.set_send_buffer_size(4096);
        let mut stream = socket
            .connect(addr)
            .await
            .map_err(|e| format!("connect: {}", e.kind()))?;
        // Closing sends a RST instead of leaving 10,000 ports in TIME_WAIT.
        support::set_zero_linger(&stream);
        stream
            .write_all(&request)
            .await
            .map_err(|e| format!("write: {}", e.kind()))?;
        let mut got: Vec<u8> = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        loop {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("read: {}", e.kind()))?;
            if n == 0 {
                return Err("closed before connected".to_string());
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() >= 12 && !got.starts_with(status) {
                let status = String::from_utf8_lossy(&got[9..12]).into_owned();
                return Err(format!("status {status}"));
            }
            if let Some(i) = memmem::find(&got, connected)
                && (transport != Transport::Sse || memmem::find(&got[i..], b"\n\n").is_some())
            {
                return Ok(stream);
            }
            if got.len() > 16 * 1024 {
                return Err("no connected frame in 16 KiB".to_string());
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(20), work).await {
        Ok(r) => r,
        Err(_) => Err("timeout".to_string()),
    }
}

/// Opens up to `n` idle streams, `OPEN_IN_FLIGHT` at a time; stops early once 1,000 failed.
async fn open_many(
    addr: std::net::SocketAddr,
    transport: Transport,
    request: Arc<Vec<u8>>,
    n: usize,
    into: &mut Vec<TcpStream>,
    failures: &mut std::collections::BTreeMap<String, u64>,
) {
    let mut opens = futures_util::stream::iter(0..n)
        .map(|_| open_idle(addr, transport, request.clone()))
        .buffer_unordered(OPEN_IN_FLIGHT);
    while let Some(r) = opens.next().await {
        match r {
            Ok(s) => into.push(s),
            Err(e) => {
                *failures.entry(e).or_default() += 1;
                if failures.values().sum::<u64>() >= 1000 {
                    break;
                }
            }
        }
    }
}

/// Opens `total` idle streams and prints the server's memory per stream, soon after they
/// are open and after `IDLE_SETTLE` (as for Redis); NaN figures if not all of them opened.
async fn idle(server: &Server, transport: Transport, total: usize) -> IdleMemory {
    let addr: std::net::SocketAddr = server.addr.parse().expect("addr");
    let request = match transport {
        Transport::Sse => format!(
            "GET /v1/events/stream HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nAccept: text/event-stream\r\n\r\n",
            server.addr,
            server.auth()
        ),
        _ => format!(
            "GET /v1/events/ws HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            server.addr,
            server.auth()
        ),
    };
    let request = Arc::new(request.into_bytes());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss0 = server.status("VmRSS");
    let threads0 = server.status("Threads");
    let mut streams = Vec::with_capacity(total);
    let mut failures = std::collections::BTreeMap::new();
    let t = Instant::now();
    let first = 1000.min(total);
    open_many(
        addr,
        transport,
        request.clone(),
        first,
        &mut streams,
        &mut failures,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (n1, rss1, hz1) = (
        streams.len(),
        server.status("VmRSS"),
        healthz_connections(&server.addr).await,
    );
    if failures.values().sum::<u64>() < 1000 {
        open_many(
            addr,
            transport,
            request,
            total - first,
            &mut streams,
            &mut failures,
        )
        .await;
    }
    let open_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (n2, rss2, threads2, hz2) = (
        streams.len(),
        server.status("VmRSS"),
        server.status("Threads"),
        healthz_connections(&server.addr).await,
    );
    tokio::time::sleep(IDLE_SETTLE).await;
    let rss_settled = server.status("VmRSS");
    drop(streams);
    let close_deadline = Instant::now() + Duration::from_secs(15);
    let mut hz3 = healthz_connections(&server.addr).await;
    while hz3 != 0 && Instant::now() < close_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        hz3 = healthz_connections(&server.addr).await;
    }
    let rss3 = server.status("VmRSS");
    let per_conn = (rss2 as f64 - rss0 as f64) / n2.max(1) as f64;
    let settled = (rss_settled as f64 - rss0 as f64) / n2.max(1) as f64;
    let marginal = (rss2 as f64 - rss1 as f64) / (n2 - n1).max(1) as f64;
    println!(
        "W5 idle {transport:?}: {n2} of {total} idle streams open in {open_s:.2} s (healthz connections {hz2}); server VmRSS {:.1} MB -> {:.1} MB: {per_conn:.1} KB per connection [target <= 8 KB: {}]  marginal (1,000 -> {n2}) {marginal:.1} KB",
        rss0 as f64 / 1024.0,
        rss2 as f64 / 1024.0,
        mark(per_conn <= 8.0),
        open_s = open_secs,
    );
    println!(
        "    after {} s more: {settled:.1} KB per connection; at {n1} streams: VmRSS {:.1} MB (healthz connections {hz1}); threads {threads0} -> {threads2}; after closing all: VmRSS {:.1} MB, healthz connections {hz3}; failures {failures:?}",
        IDLE_SETTLE.as_secs(),
        rss1 as f64 / 1024.0,
        rss3 as f64 / 1024.0,
    );
    if n2 < total {
        return IdleMemory {
            at_open: f64::NAN,
            settled: f64::NAN,
        };
    }
    IdleMemory {
        at_open: per_conn,
        settled,
    }
}

// ---------------------------------------------------------------------------------------
// vs-redis: W1, W2, W4, W5 and single-event ingest against Redis Streams, alternating

/// W4 against Redis (`appendfsync everysec`, as the peers' harness): `subs` connections
/// each loop on `XREAD COUNT 10000 BLOCK 2000 STREAMS events <last id>`; a producer thread
/// paces `XADD`s of the same timed events as cairn's W4 on one pipelined connection, and a
/// second thread counts the replies. Latency is the subscriber's receipt of the reply minus
/// `data.sent_ns`. Returns (e2e p99 in ms, whether it was complete).
async fn redis_fanout(port: u16, cfg: &Fanout, name: &str) -> (f64, bool) {
    use support::redis::{Resp, command};
    let events = cfg.rate * cfg.secs;
    let interval_ns = 1_000_000_000 / cfg.rate;
    let base = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(cfg.secs * 2 + 60);
    let mut subs = Vec::new();
    for _ in 0..cfg.subs {
        let mut con = match Resp::connect(port).await {
            Ok(c) => c,
            Err(e) => {
                println!("{name}: subscriber: {e}");
                return (f64::NAN, false);
            }
        };
        subs.push(tokio::spawn(async move {
            let mut r = SubResult {
                lat_us: Vec::with_capacity(events as usize),
                ordered: true,
                ..SubResult::default()
            };
            let (sent_ns, seq) = (
                memmem::Finder::new(b"\"sent_ns\":"),
                memmem::Finder::new(b"\"seq\":"),
            );
            let mut last_id = b"0-0".to_vec();
            let mut next_seq = 0u64;
            while r.received < events && Instant::now() < deadline {
                let sent = con
                    .send(&[
                        b"XREAD", b"COUNT", b"10000", b"BLOCK", b"2000", b"STREAMS", b"events",
                        &last_id,
                    ])
                    .await;
                let mut now_ns = 0;
                let read = match sent {
                    Ok(()) => {
                        con.reply(|i, b| {
                            // Leaves: the key, then id, field name, value per entry.
                            if i == 0 {
                                now_ns = base.elapsed().as_nanos() as u64;
                            } else if (i - 1) % 3 == 0 {
                                last_id.clear();
                                last_id.extend_from_slice(b);
                            } else if (i - 1) % 3 == 2 {
                                r.received += 1;
                                if num_after(&seq, b) != Some(next_seq) {
                                    r.ordered = false;
                                }
                                next_seq += 1;
                                match num_after(&sent_ns, b) {
                                    Some(t) => r.lat_us.push(
                                        (now_ns.saturating_sub(t) / 1000).min(u64::from(u32::MAX))
                                            as u32,
                                    ),
                                    None => r.no_sent_ns += 1,
                                }
                            }
                        })
                        .await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = read {
                    r.error = Some(e);
                    break;
                }
            }
            r
        }));
    }
    // Every subscriber parked in XREAD BLOCK before the producer starts.
    let mut admin = match Resp::connect(port).await {
        Ok(c) => c,
        Err(e) => {
            println!("{name}: {e}");
            return (f64::NAN, false);
        }
    };
    let parked_deadline = Instant::now() + Duration::from_secs(30);
    let mut blocked = 0;
    while Instant::now() < parked_deadline {
        blocked = admin
            .info_number("clients", "blocked_clients")
            .await
            .unwrap_or(0);
        if blocked >= cfg.subs as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_c = own_cpu_secs();
    let producer = std::thread::spawn(move || -> Result<(u64, f64), String> {
        use std::io::{BufRead, Write};
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let rd = s.try_clone().map_err(|e| e.to_string())?;
        let reader = std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(rd);
            let (mut ok, mut line) = (0u64, String::new());
            while ok < events {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line.starts_with('-') {
                    break;
                }
                if line.starts_with('$') {
                    ok += 1;
                    line.clear();
                    let _ = r.read_line(&mut line);
                }
            }
            ok
        });
        let mut w = s;
        let start = Instant::now();
        let mut buf = Vec::with_capacity(512);
        for i in 0..events {
            let at = start + Duration::from_nanos(i * interval_ns);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            buf.clear();
            let e = timed_event(i, base.elapsed().as_nanos() as u64);
            command(&mut buf, &[b"XADD", b"events", b"*", b"e", &e]);
            w.write_all(&buf).map_err(|e| e.to_string())?;
        }
        let acked = reader.join().map_err(|_| "reader panicked".to_string())?;
        Ok((acked, start.elapsed().as_secs_f64()))
    });
    let (acked, produce_secs) = match tokio::task::spawn_blocking(move || producer.join()).await {
        Ok(Ok(Ok(r))) => r,
        other => {
            println!("{name}: producer failed: {:?}", other.map(|r| r.ok()));
            (0, 0.0)
        }
    };
    let mut lat: Vec<u32> = Vec::with_capacity(cfg.subs * events as usize);
    let (mut delivered, mut unordered, mut no_sent_ns, mut errors) = (0u64, 0, 0u64, 0);
    let mut first_error = None;
    for sub in subs {
        let Ok(r) = sub.await else {
            errors += 1;
            continue;
        };
        delivered += r.received;
        unordered += usize::from(!r.ordered);
        no_sent_ns += r.no_sent_ns;
        if let Some(e) = r.error {
            errors += 1;
            first_error.get_or_insert(e);
        }
        lat.extend(r.lat_us);
    }
    let cpu_c = own_cpu_secs() - cpu_c;
    lat.sort_unstable();
    let expected = cfg.subs as u64 * events;
    let p99 = pct_ms(&lat, 0.99);
    let complete = delivered == expected
        && acked == events
        && unordered == 0
        && no_sent_ns == 0
        && errors == 0;
    println!(
        "{name}: delivered {delivered} / {expected} = {:.3}%  e2e p50 {:.2} ms  p99 {p99:.2} ms  p99.9 {:.2} ms  max {:.2} ms  {}",
        delivered as f64 * 100.0 / expected as f64,
        pct_ms(&lat, 0.5),
        pct_ms(&lat, 0.999),
        pct_ms(&lat, 1.0),
        if complete { "complete" } else { "INCOMPLETE" }
    );
    println!(
        "    producer: {acked} acked of {events} in {produce_secs:.2} s; subscribers parked {blocked}/{}; unordered {unordered}; without sent_ns {no_sent_ns}; errors {errors}{}; client CPU {cpu_c:.1} s",
        cfg.subs,
        first_error.map_or(String::new(), |e| format!(" (first: {e})")),
    );
    (p99, complete)
}

/// The workloads of `vs-redis`, in the order each pair runs them.
#[derive(Clone, Copy, PartialEq)]
enum VsRedis {
    /// W1: 4 connections × 100 events, cairn `--sync fsync` vs `appendfsync always`.
    W1,
    /// W2: the same load, `--sync none` vs `everysec`.
    W2,
    /// W4: 100 SSE subscribers × 2,000 events/s vs `XREAD BLOCK` (p99).
    W4,
    /// W5: 10,000 idle SSE streams vs 10,000 clients blocked in `XREAD` (KiB each).
    W5,
    /// 64 connections × 1 event per request, fsync vs `appendfsync always`.
    Single,
}

impl VsRedis {
    const ALL: [VsRedis; 5] = [
        VsRedis::W1,
        VsRedis::W2,
        VsRedis::W4,
        VsRedis::W5,
        VsRedis::Single,
    ];

    fn label(self) -> &'static str {
        match self {
            VsRedis::W1 => "W1",
            VsRedis::W2 => "W2",
            VsRedis::W4 => "W4",
            VsRedis::W5 => "W5",
            VsRedis::Single => "single",
        }
    }

    /// What the ratio compares, and the target.
    fn what(self) -> &'static str {
        match self {
            VsRedis::W1 => "events/s, fsync vs appendfsync always [target >= 1.15]",
            VsRedis::W2 => "events/s, --sync none vs everysec [target >= 1]",
            VsRedis::W4 => "p99, SSE --sync none vs XREAD everysec [target <= 1]",
            VsRedis::W5 => {
                "KiB per idle SSE stream vs blocked XREAD client, settled [target: cairn <= 8]"
            }
            VsRedis::Single => {
                "events/s, 64 conns x 1 event, fsync vs always [target: cairn >= 40k/s]"
            }
        }
    }

    /// Whether a ratio above 1 is cairn's advantage (throughput) rather than its cost.
    fn higher_is_better(self) -> bool {
        matches!(self, VsRedis::W1 | VsRedis::W2 | VsRedis::Single)
    }
}

/// `pairs` pairs of cairn and Redis runs of each [`VsRedis`] workload, each on a fresh
/// server; which goes first alternates from pair to pair, so a drift of the machine's
/// speed does not always favour the same side. Prints every run, each pair's ratio and
/// the median ratio. W5 needs an open-file limit above 10,200 and is skipped below it.
fn vs_redis(rt: &tokio::runtime::Runtime, pairs: usize, nofile: u64) {
    use support::redis::{RedisServer, idle as redis_idle, ingest as redis_ingest};
    const IDLE: usize = 10_000;
    let (conns, batch, total) = (4, 100, 200_000);
    let workloads: Vec<VsRedis> = VsRedis::ALL
        .into_iter()
        .filter(|w| *w != VsRedis::W5 || nofile >= IDLE as u64 + 200)
        .collect();
    if workloads.len() < VsRedis::ALL.len() {
        println!(
            "vs-redis: the open-file limit {nofile} is too low for W5's {IDLE} streams; W5 skipped"
        );
    }
    // ratios[w][pair]: cairn/Redis, in the workload's own unit.
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); workloads.len()];
    // cairn's own figure per pair, for the targets that are absolute.
    let mut cairn_figures: Vec<Vec<f64>> = vec![Vec::new(); workloads.len()];
    let mut incomplete = 0;
    for pair in 1..=pairs {
        let order: [bool; 2] = if pair % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for (w, &workload) in workloads.iter().enumerate() {
            let label = workload.label();
            let mut figures = [f64::NAN; 2];
            for is_cairn in order {
                let slot = usize::from(!is_cairn);
                figures[slot] = match workload {
                    VsRedis::W1 | VsRedis::W2 | VsRedis::Single => {
                        let (cairn_sync, redis_sync) = if workload == VsRedis::W2 {
                            ("none", "everysec")
                        } else {
                            ("fsync", "always")
                        };
                        let (conns, batch, total) = if workload == VsRedis::Single {
                            (64, 1, 64_000)
                        } else {
                            (conns, batch, total)
                        };
                        if is_cairn {
                            let s = Server::start(cairn_sync, &[]);
                            let name = format!("pair {pair} {label} cairn --sync {cairn_sync}");
                            support::measure(rt, &s, &name, conns, batch, total)
                        } else {
                            let r = RedisServer::start(redis_sync);
                            let cpu0 = r.cpu_secs();
                            let (rate, lat) =
                                rt.block_on(redis_ingest(r.port, conns, batch, total));
                            let cpu = r.cpu_secs() - cpu0;
                            let name =
                                format!("pair {pair} {label} Redis appendfsync {redis_sync}");
                            support::report(&name, rate, &lat, cpu * 1e6 / total as f64);
                            rate
                        }
                    }
                    VsRedis::W4 => {
                        let cfg = Fanout {
                            transport: Transport::Sse,
                            subs: 100,
                            rate: 2_000,
                            secs: 10,
                            producer_conns: 8,
                        };
                        let (p99, complete) = if is_cairn {
                            let s = Server::start("none", &[]);
                            let name = format!("pair {pair} W4 cairn SSE --sync none");
                            rt.block_on(fanout(&s, &cfg, &name, f64::INFINITY))
                        } else {
                            let r = RedisServer::start("everysec");
                            let name = format!("pair {pair} W4 Redis XREAD, appendfsync everysec");
                            rt.block_on(redis_fanout(r.port, &cfg, &name))
                        };
                        incomplete += usize::from(!complete);
                        p99
                    }
                    VsRedis::W5 => {
                        if is_cairn {
                            let s = Server::start("none", &["--max-connections", "20000"]);
                            rt.block_on(idle(&s, Transport::Sse, IDLE)).settled
                        } else {
                            let r = RedisServer::start("everysec");
                            match rt.block_on(redis_idle(&r, IDLE)) {
                                Ok(kb) => {
                                    println!(
                                        "pair {pair} W5 Redis: {IDLE} clients blocked in XREAD: {:.1} KB per connection, {:.1} KB after {} s more",
                                        kb.at_open,
                                        kb.settled,
                                        IDLE_SETTLE.as_secs()
                                    );
                                    kb.settled
                                }
                                Err(e) => {
                                    println!("pair {pair} W5 Redis: {e}");
                                    f64::NAN
                                }
                            }
                        }
                    }
                };
            }
            let ratio = figures[0] / figures[1];
            ratios[w].push(ratio);
            cairn_figures[w].push(figures[0]);
            println!(
                "pair {pair} {label}: cairn/Redis = {ratio:.3} ({})",
                if workload.higher_is_better() {
                    "events/s; above 1 is cairn faster"
                } else {
                    "below 1 is cairn lower"
                }
            );
        }
    }
    println!("vs-redis summary ({pairs} pairs, cairn/Redis per pair, then the median):");
    for (w, workload) in workloads.iter().enumerate() {
        let failed = ratios[w].iter().filter(|r| r.is_nan()).count();
        let cairn = match workload {
            VsRedis::W5 => format!("; cairn median {:.1} KB", median(&cairn_figures[w])),
            VsRedis::Single => format!("; cairn median {:.0} events/s", median(&cairn_figures[w])),
            _ => String::new(),
        };
        println!(
            "  {} {}: {}  median {:.3}{cairn}{}",
            workload.label(),
            workload.what(),
            ratios[w]
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(" "),
            median(&ratios[w]),
            if failed > 0 {
                format!(" ({failed} failed run(s) left out)")
            } else {
                String::new()
            }
        );
    }
    if incomplete > 0 {
        println!("  {incomplete} W4 run(s) INCOMPLETE: see their lines above");
    }
}

fn main() {
    let wanted = support::selection();
    let nofile = raise_nofile();
    let rt = support::runtime();
    println!(
        "cairn stream benchmarks ({} cores, open-file limit {nofile}); client and server share the machine",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    if wanted("w3") {
        w3(&rt);
    }
    for (part, transport) in [
        ("w4-sse", Transport::Sse),
        ("w4-ws", Transport::WebSocket),
        ("w4-mixed", Transport::Mixed),
    ] {
        if !wanted(part) {
            continue;
        }
        for sync in ["none", "fsync"] {
            let cfg = Fanout {
                transport,
                subs: 100,
                rate: 2_000,
                secs: 10,
                producer_conns: 8,
            };
            let s = Server::start(sync, &[]);
            let name =
                format!("W4 {transport:?} --sync {sync}, 100 subscribers x 2,000 events/s x 10 s");
            rt.block_on(fanout(&s, &cfg, &name, 4.0));
        }
    }
    if wanted("fanout1000") {
        let cfg = Fanout {
            transport: Transport::Sse,
            subs: 1_000,
            rate: 1_000,
            secs: 5,
            // With 8 connections the producer reached only ~300/s here: each 201 waits
            // behind 1,000 subscribers' writes (ack p50 ~20 ms). 32 offer more load.
            producer_conns: 32,
        };
        let s = Server::start("none", &["--max-connections", "20000"]);
        let name = "fanout1000 --sync none, 1,000 subscribers x 1,000 events/s x 5 s";
        rt.block_on(fanout(&s, &cfg, name, 50.0));
    }
    if wanted("vs-redis") {
        if support::redis::installed() {
            let pairs = std::env::var("CAIRN_BENCH_PAIRS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(3);
            vs_redis(&rt, pairs, nofile);
        } else {
            println!("vs-redis: redis-server is not installed (PATH); skipped");
        }
    }
    for (part, transport) in [
        ("idle-sse", Transport::Sse),
        ("idle-ws", Transport::WebSocket),
    ] {
        if !wanted(part) {
            continue;
        }
        let total = 10_000;
        if nofile < total as u64 + 200 {
            println!("idle: the open-file limit {nofile} is too low for {total} connections");
        } else {
            let s = Server::start("none", &["--max-connections", "20000"]);
            rt.block_on(idle(&s, transport, total));
        }
    }
}
