//! Redis, the peer of the `vs-redis` comparison: a `redis-server` on a loopback port with a
//! temporary directory (killed on drop), a minimal RESP2 client (no `redis` crate: the
//! client's CPU is the server's on this 2-core machine, and the peers' harness reads the
//! same way), the W1/W2 ingest of the peers' workload (pipelines of 100 `XADD`; also
//! single-event requests) and W5's idle clients blocked in `XREAD`.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::{TS, cpu_secs, event, free_port, proc_status, set_zero_linger};

/// Whether `redis-server` is on the PATH.
pub fn installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `redis-server` with AOF on and `appendfsync` as given (`always` for W1, `everysec` for
/// W2 and W4), no RDB snapshots and no AOF rewrite (a rewrite forks inside a run): the
/// peers' `run_redis.sh` settings.
pub struct RedisServer {
    pub child: Child,
    pub port: u16,
    _tmp: tempfile::TempDir,
}

impl RedisServer {
    pub fn start(appendfsync: &str) -> RedisServer {
        let tmp = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = tmp.path().join("redis.conf");
        std::fs::write(
            &conf,
            format!(
                "bind 127.0.0.1\nport {port}\ndir {}\ndaemonize no\nsave \"\"\nappendonly yes\n\
                 appendfsync {appendfsync}\nauto-aof-rewrite-percentage 0\nmaxclients 20000\n\
                 logfile {}/redis.log\n",
                tmp.path().display(),
                tmp.path().display()
            ),
        )
        .expect("redis.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn redis-server");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer {
            child,
            port,
            _tmp: tmp,
        }
    }

    pub fn cpu_secs(&self) -> f64 {
        cpu_secs(self.child.id())
    }

    /// The server's resident memory, KiB.
    pub fn rss_kb(&self) -> u64 {
        proc_status(self.child.id(), "VmRSS")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A RESP2 connection: commands are written as arrays of bulk strings, replies read
/// without an allocation per element.
pub struct Resp {
    r: BufReader<OwnedReadHalf>,
    pub w: OwnedWriteHalf,
    line: Vec<u8>,
    bulk: Vec<u8>,
}

/// Appends one command (an array of bulk strings) to `out`.
pub fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    let mut n = itoa::Buffer::new();
    out.push(b'*');
    out.extend_from_slice(n.format(args.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.push(b'$');
        out.extend_from_slice(n.format(a.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

impl Resp {
    pub async fn connect(port: u16) -> Result<Resp, String> {
        let s = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        let (r, w) = s.into_split();
        Ok(Resp {
            r: BufReader::with_capacity(256 * 1024, r),
            w,
            line: Vec::with_capacity(64),
            bulk: Vec::with_capacity(1024),
        })
    }

    pub async fn send(&mut self, args: &[&[u8]]) -> Result<(), String> {
        let mut out = Vec::with_capacity(128);
        command(&mut out, args);
        self.w
            .write_all(&out)
            .await
            .map_err(|e| format!("write: {e}"))
    }

    /// Reads one whole reply and calls `leaf(i, bytes)` for each of its strings and numbers
    /// in order (`i` counts them from 0); a nil reply has none. A Redis error is an `Err`.
    pub async fn reply(&mut self, mut leaf: impl FnMut(usize, &[u8])) -> Result<usize, String> {
        let (mut pending, mut leaves) = (1i64, 0usize);
        while pending > 0 {
            self.line.clear();
            let n = self
                .r
                .read_until(b'\n', &mut self.line)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n < 3 || !self.line.ends_with(b"\r\n") {
                return Err("connection closed inside a reply".to_string());
            }
            let body = &self.line[1..self.line.len() - 2];
            let num = || {
                std::str::from_utf8(body)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .ok_or_else(|| format!("bad RESP length {:?}", String::from_utf8_lossy(body)))
            };
            pending -= 1;
            match self.line[0] {
                b'*' => pending += num()?.max(0),
                b'$' => {
                    let len = num()?;
                    if len >= 0 {
                        self.bulk.resize(len as usize + 2, 0);
                        self.r
                            .read_exact(&mut self.bulk)
                            .await
                            .map_err(|e| format!("read: {e}"))?;
                        leaf(leaves, &self.bulk[..len as usize]);
                        leaves += 1;
                    }
                }
                b'+' | b':' => {
                    leaf(leaves, body);
                    leaves += 1;
                }
                b'-' => return Err(format!("redis: {}", String::from_utf8_lossy(body))),
                other => return Err(format!("unexpected RESP type {:?}", other as char)),
            }
        }
        Ok(leaves)
    }

    /// `INFO <section>` field `name` as a number.
    pub async fn info_number(&mut self, section: &str, name: &str) -> Result<i64, String> {
        self.send(&[b"INFO", section.as_bytes()]).await?;
        let mut text = String::new();
        self.reply(|_, b| text.push_str(&String::from_utf8_lossy(b)))
            .await?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("INFO {section}: no {name}"))
    }
}

/// W1/W2 against Redis: `conns` connections each send `total / batch / conns` pipelines of
/// `batch` `XADD events * e <event>` and wait for all their replies (under `appendfsync
/// always` Redis writes and fsyncs the AOF before it replies). Returns (events/s, sorted
/// pipeline latencies in µs); the count is checked with `XLEN`.
pub async fn ingest(port: u16, conns: usize, batch: u64, total: u64) -> (f64, Vec<u64>) {
    let per_conn = total / batch / conns as u64;
    // The same 300-byte events as cairn's runs, encoded before the clock starts.
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..8)
            .map(|i| {
                let mut out = Vec::new();
                for s in i * batch..(i + 1) * batch {
                    command(
                        &mut out,
                        &[b"XADD", b"events", b"*", b"e", event(s, TS).as_bytes()],
                    );
                }
                out
            })
            .collect(),
    );
    let acked = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (bodies, acked) = (bodies.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut con = Resp::connect(port).await.expect("connect to redis");
            let mut lat = Vec::with_capacity(per_conn as usize);
            for i in 0..per_conn {
                let t = Instant::now();
                con.w
                    .write_all(&bodies[(c + i as usize) % bodies.len()])
                    .await
                    .expect("write");
                for _ in 0..batch {
                    con.reply(|_, _| {}).await.expect("XADD");
                }
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
    let mut con = Resp::connect(port).await.expect("connect to redis");
    con.send(&[b"XLEN", b"events"]).await.expect("XLEN");
    let mut stored = 0u64;
    con.reply(|_, b| {
        stored = std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    })
    .await
    .expect("XLEN");
    assert_eq!(stored, acked.load(Ordering::Relaxed), "XLEN after ingest");
    lat.sort_unstable();
    (stored as f64 / secs, lat)
}

/// How long idle connections are left before the settled memory reading: Redis frees an
/// idle client's query buffer after 2 s (`clientsCronResizeQueryBuffer`) and its
/// allocator returns the pages later still, so a reading taken at once overstates it
/// (6.0 KB a client at 0.5 s, 2.0 KB from ~15 s on, measured here).
pub const IDLE_SETTLE: Duration = Duration::from_secs(15);

/// The server's VmRSS growth per idle connection, KiB: soon after they are all open, and
/// after [`IDLE_SETTLE`].
#[derive(Clone, Copy)]
pub struct IdleMemory {
    pub at_open: f64,
    pub settled: f64,
}

/// W5 against Redis (the peers' harness's method): `total` idle connections, each blocked
/// in `XREAD BLOCK 0 STREAMS idle $`, opened 64 at a time; waits until `INFO clients`
/// counts them all blocked, then reads the server's memory per connection (as cairn's
/// `idle` figure). An `Err` says why the run is not comparable.
pub async fn idle(server: &RedisServer, total: usize) -> Result<IdleMemory, String> {
    use futures_util::StreamExt;
    let mut admin = Resp::connect(server.port).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss0 = server.rss_kb();
    let port = server.port;
    let mut xread = Vec::new();
    command(
        &mut xread,
        &[b"XREAD", b"BLOCK", b"0", b"STREAMS", b"idle", b"$"],
    );
    let xread = &xread;
    // Bare sockets: nothing is read from them, so no reader buffer per connection.
    let mut opens = futures_util::stream::iter(0..total)
        .map(|_| async move {
            let open = async {
                let con = TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                // Closing sends a RST instead of leaving 10,000 ports in TIME_WAIT.
                set_zero_linger(&con);
                Ok::<TcpStream, String>(con)
            };
            let mut con = tokio::time::timeout(Duration::from_secs(20), open)
                .await
                .map_err(|_| "connect: timeout".to_string())??;
            con.write_all(xread)
                .await
                .map_err(|e| format!("write: {e}"))?;
            Ok::<TcpStream, String>(con)
        })
        .buffer_unordered(64);
    let mut held = Vec::with_capacity(total);
    while let Some(con) = opens.next().await {
        held.push(con?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let blocked = admin.info_number("clients", "blocked_clients").await?;
        if blocked as usize >= total {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {blocked} of {total} clients blocked after 60 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let per_conn = |rss: u64| (rss as f64 - rss0 as f64) / total as f64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_open = per_conn(server.rss_kb());
    tokio::time::sleep(IDLE_SETTLE).await;
    let settled = per_conn(server.rss_kb());
    drop(held);
    Ok(IdleMemory { at_open, settled })
}
