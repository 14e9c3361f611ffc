//! What the benchmarks share: the peers' workload event and the release server run on a
//! loopback port with a temporary data directory.
#![allow(dead_code)]

pub mod redis;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

pub const EVENT_SIZE: usize = 300;
pub const TS: &str = "2026-03-19T10:00:00.000Z";

/// The peers' 300-byte workload event in cairn's input shape.
pub fn event(seq: u64, ts: &str) -> String {
    let mut s = format!(
        concat!(
            r#"{{"type":"tool_call","timestamp":"{}","data":{{"agent":"claude-code","#,
            r#""session":"myapp/main","tool":"exec","request":{{"command":"git status","#,
            r#""cwd":"/home/dev/src/myapp"}},"decision":{{"action":"allow","#,
            r#""matched_policies":["allow-git"],"evaluation_time_us":{}}},"seq":{},"pad":""}}}}"#
        ),
        ts,
        seq % 97,
        seq
    );
    if s.len() < EVENT_SIZE {
        let at = s.len() - 3;
        s.insert_str(at, &"x".repeat(EVENT_SIZE - s.len()));
    }
    s
}

/// `n` events from counter `seq0`: one event object for `n == 1`, else `{"events":[…]}`.
pub fn batch_body(seq0: u64, n: u64) -> Bytes {
    let events: Vec<String> = (seq0..seq0 + n).map(|s| event(s, TS)).collect();
    if n == 1 {
        return Bytes::from(events.into_iter().next().unwrap_or_default());
    }
    Bytes::from(format!("{{\"events\":[{}]}}", events.join(",")))
}

/// The parts named on the command line (`cargo bench --bench x -- w1 w2`): a part runs
/// when no name is given or its name contains one of them.
pub fn selection() -> impl Fn(&str) -> bool {
    let names: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    move |part: &str| names.is_empty() || names.iter().any(|n| part.contains(n.as_str()))
}

/// The client's runtime: two workers, like the machine's two cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The server binary: this build, or `CAIRN_BENCH_BIN` (another build, for A/B runs).
pub fn binary() -> PathBuf {
    std::env::var_os("CAIRN_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cairn")))
}

/// `cairn serve` on a free loopback port and a fresh data directory, killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub token: String,
    pub data: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Server {
    pub fn start(sync: &str, extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(binary())
            .args(["serve", "--listen", &addr, "--sync", sync])
            .args(extra)
            .arg("--data")
            .arg(&data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn cairn");
        let token_path = data.join("admin.token");
        let deadline = Instant::now() + Duration::from_secs(30);
        let token = loop {
            if let Ok(t) = std::fs::read_to_string(&token_path)
                && std::net::TcpStream::connect(&addr).is_ok()
            {
                break t.trim().to_string();
            }
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        Server {
            child,
            addr,
            token,
            data,
            _tmp: tmp,
        }
    }

    pub fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// CPU seconds (user + system) the server has used so far.
    pub fn cpu_secs(&self) -> f64 {
        cpu_secs(self.child.id())
    }

    /// fsyncs (group commits made durable) so far, from `/metrics`.
    pub fn fsyncs(&self) -> u64 {
        reqwest::blocking::get(format!("http://{}/metrics", self.addr))
            .and_then(|r| r.text())
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("cairn_fsync_duration_seconds_count"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// A numeric line of /proc/<pid>/status (`VmRSS` in kB, `Threads`).
    pub fn status(&self, key: &str) -> u64 {
        proc_status(self.child.id(), key)
    }
}

/// A numeric line of process `pid`'s /proc/<pid>/status (`VmRSS` in kB, `Threads`); 0 if
/// it cannot be read.
pub fn proc_status(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user + system) process `pid` has used so far.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    parse_stat(&stat).map_or(0.0, |(_, secs)| secs)
}

/// CPU seconds (user + system) of each of process `pid`'s threads so far, summed by
/// thread name (tokio's workers share one name, so do the blocking pool's threads).
pub fn thread_cpu_secs(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut by_name = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        if let Some((name, secs)) = parse_stat(&stat) {
            *by_name.entry(name.to_string()).or_insert(0.0) += secs;
        }
    }
    by_name
}

/// A `/proc/…/stat` line's command name and CPU seconds (user + system).
fn parse_stat(stat: &str) -> Option<(&str, f64)> {
    let open = stat.find('(')?;
    let (name_part, after) = stat.rsplit_once(')')?;
    // After the command name (in parentheses): utime is the 12th field, stime the 13th.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Some((&name_part[open + 1..], (ticks(11) + ticks(12)) / 100.0))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// An HTTP/1.1 client connection to `addr` (Nagle off), driven on the current runtime.
pub async fn connect(
    addr: &str,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

/// `conns` connections each send `total / batch / conns` requests of `batch` events, one
/// at a time; connection `c` goes to `addrs[c % addrs.len()]`. Returns (events/s, sorted
/// request latencies in µs).
pub async fn ingest(
    addrs: &[String],
    auth: &str,
    conns: usize,
    batch: u64,
    total: u64,
) -> (f64, Vec<u64>) {
    let per_conn = total / batch / conns as u64;
    // A few distinct bodies, built before the clock starts: the client's CPU is the
    // server's CPU on a 2-core machine.
    let bodies: Arc<Vec<Bytes>> = Arc::new((0..8).map(|i| batch_body(i * batch, batch)).collect());
    let acked = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (addr, auth, bodies, acked) = (
            addrs[c % addrs.len()].clone(),
            auth.to_string(),
            bodies.clone(),
            acked.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut send = connect(&addr).await;
            let mut lat = Vec::with_capacity(per_conn as usize);
            for i in 0..per_conn {
                let body = bodies[(c + i as usize) % bodies.len()].clone();
                let req = hyper::Request::post("/v1/events")
                    .header("host", &addr)
                    .header("authorization", &auth)
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .expect("request");
                let t = Instant::now();
                let resp = send.send_request(req).await.expect("send");
                let status = resp.status();
                let body = resp.into_body().collect().await.expect("body").to_bytes();
                assert_eq!(
                    status,
                    201,
                    "ingest failed: {}",
                    String::from_utf8_lossy(&body)
                );
                lat.push(t.elapsed().as_micros() as u64);
                acked.fetch_add(batch, Ordering::Relaxed);
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("task"));
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    (acked.load(Ordering::Relaxed) as f64 / secs, lat)
}

/// Percentile `p` of sorted µs values, in ms.
pub fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

pub fn report(name: &str, rate: f64, lat: &[u64], server_cpu_us_per_event: f64) {
    println!(
        "{name:<44} {:>8.0} events/s  request p50 {:>5.2} ms  p99 {:>5.2} ms  max {:>6.2} ms  server CPU {:>5.2} us/event",
        rate,
        pct(lat, 0.5),
        pct(lat, 0.99),
        pct(lat, 1.0),
        server_cpu_us_per_event
    );
}

/// Runs `ingest` and reports it with the server's CPU cost per event; returns events/s.
pub fn measure(
    rt: &tokio::runtime::Runtime,
    s: &Server,
    name: &str,
    conns: usize,
    batch: u64,
    total: u64,
) -> f64 {
    let (cpu0, syncs0) = (s.cpu_secs(), s.fsyncs());
    let (rate, lat) = rt.block_on(ingest(
        std::slice::from_ref(&s.addr),
        &s.auth(),
        conns,
        batch,
        total,
    ));
    let (cpu, syncs) = (s.cpu_secs() - cpu0, s.fsyncs() - syncs0);
    report(name, rate, &lat, cpu * 1e6 / total as f64);
    if syncs > 0 {
        println!(
            "    {syncs} fsyncs: {:.1} events, {:.1} requests per fsync",
            total as f64 / syncs as f64,
            (total / batch) as f64 / syncs as f64
        );
    }
    rate
}

/// Median of the figures that are numbers (a failed run's is NaN); NaN if there are none.
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// SO_LINGER 0 on a socket: closing it sends a RST and leaves no TIME_WAIT behind (10,000
/// idle connections closed at once would otherwise hold as many ports).
pub fn set_zero_linger(socket: &impl std::os::fd::AsRawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a valid linger struct of the size given.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
