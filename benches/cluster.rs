//! Cluster-mode benchmarks (SPEC §6, issue 14): real `nats-server` processes (three, a
//! JetStream cluster on loopback, started by the tests' harness `tests/common/nats.rs`)
//! and real `cairn serve --nats` nodes (the tests' `tests/common` server), all on this
//! machine's cores, so the absolute figures are pessimistic. Prints:
//!
//! - `w1`: durable ingest (4 connections × 100-event batches) spread over three nodes,
//!   against one single node, alternating (`CAIRN_BENCH_PAIRS` pairs, default 3), and
//!   against NATS JetStream alone on the same kind of three-server cluster (R3): the
//!   peers' method (100 messages per batch, then their 100 acks) and cairn's shape (one
//!   message per 100-event batch). Target: cluster ≥ 50% of the single node.
//! - `w4`: 100 SSE subscribers spread over the three nodes, 2,000 events/s for 10 s,
//!   posted one event per request to the three nodes in turn: % delivered and p99.
//! - `catchup`: an empty node copying a stream of `CAIRN_BENCH_CATCHUP_EVENTS` events
//!   (default 1,000,000): events/s. Target ≥ 200,000/s.
//! - `failover`: under concurrent ingest on every node, kill -9 of the NATS stream
//!   leader, and of the sequencer node: the time until every surviving node acknowledges
//!   a request sent after the kill (`CAIRN_BENCH_FAILOVER_ROUNDS` rounds each, default 5;
//!   median). Target ≤ 10 s. Then the same for a node that is not the sequencer.
//!
//! `cargo bench --bench cluster` runs all; `cargo bench --bench cluster -- w1` runs one.
//! Prints a line and runs nothing where nats-server is not installed.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Server as Node;
use common::nats::NatsCluster;
use common::wait_until;
use support::{batch_body, ingest, pct};

/// The stream cairn uses by default (`--nats-stream`).
const STREAM: &str = "CAIRN";
/// Events sent before a W1 measurement starts, to every side alike.
const WARMUP: u64 = 2_000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mark(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

// ---------------------------------------------------------------------------------------
// A cluster: three NATS servers and cairn nodes on them

struct Cluster {
    /// Dropped (killed) before the data directories below are removed.
    nodes: Vec<Option<Node>>,
    names: Vec<String>,
    token: String,
    nats: NatsCluster,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    /// Three NATS servers and `n` nodes (`a`, `b`, …), every node answering the first
    /// node's admin token.
    fn start(n: usize, extra: &[&str]) -> Cluster {
        let nats = NatsCluster::start(3);
        let mut cluster = Cluster {
            nodes: Vec::new(),
            names: Vec::new(),
            token: String::new(),
            nats,
            _dirs: Vec::new(),
        };
        for i in 0..n {
            cluster.add(&((b'a' + i as u8) as char).to_string(), extra);
        }
        cluster
    }

    fn args(&self, name: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["--nats", &self.nats.urls(), "--node", name]
            .map(str::to_string)
            .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// A node on a fresh data directory; returns its index.
    fn add(&mut self, name: &str, extra: &[&str]) -> usize {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        self._dirs.push(dir);
        let args = self.args(name, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut node = Node::start_on(&data, &args);
        if self.nodes.is_empty() {
            self.token = node.token.clone();
        } else {
            node.token = self.token.clone();
            // Tokens reach later nodes through the cluster.
            wait_until(
                Duration::from_secs(10),
                "the admin token on a new node",
                || {
                    node.http()
                        .get(node.url("/v1/head"))
                        .bearer_auth(&node.token)
                        .send()
                        .is_ok_and(|r| r.status() == 200)
                },
            );
        }
        self.nodes.push(Some(node));
        self.names.push(name.to_string());
        self.nodes.len() - 1
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("node running")
    }

    /// The addresses of the running nodes.
    fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .flatten()
            .map(|n| n.addr.clone())
            .collect()
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    fn node_cpu_secs(&self) -> Vec<f64> {
        self.nodes
            .iter()
            .flatten()
            .map(|n| support::cpu_secs(n.pid()))
            .collect()
    }

    /// The running node that holds the sequencer lease now, from its log: the last
    /// "took the sequencer lease" not followed by a step-down.
    fn sequencer(&self) -> Option<usize> {
        self.nodes.iter().enumerate().find_map(|(i, n)| {
            let log = n.as_ref()?.log_text();
            let took = log.rfind("took the sequencer lease")?;
            let left = ["lost the sequencer lease", "stepping down"]
                .iter()
                .filter_map(|s| log.rfind(s))
                .max();
            (left.is_none_or(|l| l < took)).then_some(i)
        })
    }

    /// kill -9 of node `i`.
    fn kill(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].as_mut() {
            n.kill();
        }
    }

    /// Starts node `i` again on its data directory (after `kill`).
    fn restart(&mut self, i: usize) {
        let data = self.nodes[i].as_ref().expect("node").data.clone();
        let args = self.args(&self.names[i].clone(), &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut node = Node::start_on(&data, &args);
        node.token = self.token.clone();
        self.nodes[i] = Some(node);
    }

    fn head_seq(&self, i: usize) -> u64 {
        head_seq(&self.node(i).addr, &self.token)
    }
}

fn head_seq(addr: &str, token: &str) -> u64 {
    reqwest::blocking::Client::new()
        .get(format!("http://{addr}/v1/head"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(5))
        .send()
        .and_then(|r| r.json::<serde_json::Value>())
        .ok()
        .and_then(|v| v["data"]["seq"].as_u64())
        .unwrap_or(0)
}

/// CPU seconds of every nats-server this process started (its children by that name).
fn nats_cpu_secs() -> f64 {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            stat.contains("(nats-server)") && ppid == Some(me.as_str())
        })
        .map(support::cpu_secs)
        .sum()
}

/// How many messages the log stream holds.
async fn stream_messages(nats: &NatsCluster) -> u64 {
    let js = async_nats::jetstream::new(nats_client(nats).await);
    let mut s = js.get_stream(STREAM).await.expect("stream");
    s.info().await.expect("stream info").state.messages
}

/// A NATS client connected to every server of `nats`.
async fn nats_client(nats: &NatsCluster) -> async_nats::Client {
    let addrs: Vec<async_nats::ServerAddr> = nats
        .urls()
        .split(',')
        .map(|u| u.parse().expect("nats url"))
        .collect();
    async_nats::ConnectOptions::new()
        .connect(addrs)
        .await
        .expect("connect to NATS")
}

// ---------------------------------------------------------------------------------------
// W1

fn report(name: &str, rate: f64, lat: &[u64], cpu_us_per_event: f64) {
    println!(
        "{name:<52} {rate:>8.0} events/s  request p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms  cairn CPU {cpu_us_per_event:>5.2} us/event",
        pct(lat, 0.5),
        pct(lat, 0.99),
        pct(lat, 1.0),
    );
}

fn w1(rt: &tokio::runtime::Runtime) {
    let total = env_u64("CAIRN_BENCH_W1_EVENTS", 200_000);
    let pairs = env_u64("CAIRN_BENCH_PAIRS", 3);
    // Knobs for finding where the time goes: connections, and the cluster nodes' flags.
    let conns = env_u64("CAIRN_BENCH_W1_CONNS", 4) as usize;
    let node_args = std::env::var("CAIRN_BENCH_NODE_ARGS").unwrap_or_default();
    let node_args: Vec<&str> = node_args.split_whitespace().collect();
    let mut ratios = Vec::new();
    for pair in 1..=pairs {
        let mut rates = [0.0; 2];
        // Alternate which goes first, so a drift of the machine's speed within a pair
        // does not always favour the same side.
        let order = if pair % 2 == 1 { [0, 1] } else { [1, 0] };
        for side in order {
            if side == 0 {
                let s = Node::start(&[]);
                let cpu0 = support::cpu_secs(s.pid());
                let auth = format!("Bearer {}", s.token);
                rt.block_on(ingest(
                    std::slice::from_ref(&s.addr),
                    &auth,
                    conns,
                    100,
                    WARMUP,
                ));
                let (rate, lat) = rt.block_on(ingest(
                    std::slice::from_ref(&s.addr),
                    &auth,
                    conns,
                    100,
                    total,
                ));
                let cpu = support::cpu_secs(s.pid()) - cpu0;
                let name = format!("W1 single node, pair {pair}");
                report(&name, rate, &lat, cpu * 1e6 / total as f64);
                rates[0] = rate;
            } else {
                let c = Cluster::start(3, &node_args);
                rt.block_on(ingest(&c.addrs(), &c.auth(), conns, 100, WARMUP));
                let (cpu0, nats0) = (c.node_cpu_secs(), nats_cpu_secs());
                let (rate, lat) = rt.block_on(ingest(&c.addrs(), &c.auth(), conns, 100, total));
                let cpu: Vec<f64> = c
                    .node_cpu_secs()
                    .iter()
                    .zip(&cpu0)
                    .map(|(b, a)| b - a)
                    .collect();
                let nats = nats_cpu_secs() - nats0;
                let name = format!("W1 cluster, 3 nodes (3 NATS, R3), pair {pair}");
                report(
                    &name,
                    rate,
                    &lat,
                    cpu.iter().sum::<f64>() * 1e6 / total as f64,
                );
                println!(
                    "    CPU us/event: per node {} (sequencer: {:?}); the three nats-servers {:.2}",
                    cpu.iter()
                        .map(|c| format!("{:.2}", c * 1e6 / total as f64))
                        .collect::<Vec<_>>()
                        .join(" "),
                    c.sequencer().map(|i| &c.names[i]),
                    nats * 1e6 / total as f64
                );
                let messages = rt.block_on(stream_messages(&c.nats));
                println!(
                    "    stream: {messages} messages, {:.0} events per message",
                    (total + WARMUP) as f64 / messages.max(1) as f64
                );
                rates[1] = rate;
            }
        }
        ratios.push(rates[1] / rates[0]);
    }
    let m = support::median(&ratios);
    println!(
        "W1 cluster / single node per pair: {}; median {m:.3} [target >= 0.50: {}]",
        ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" "),
        mark(m >= 0.5)
    );
    for run in 1..=2 {
        let nats = NatsCluster::start(3);
        let (rate, lat) = rt.block_on(nats_alone(&nats, total, 100, run));
        report(
            &format!("NATS alone R3, 100 msgs then 100 acks, run {run}"),
            rate,
            &lat,
            0.0,
        );
        let (rate, lat) = rt.block_on(nats_alone(&nats, total, 1, run));
        report(
            &format!("NATS alone R3, 1 msg of 100 events, run {run}"),
            rate,
            &lat,
            0.0,
        );
    }
}

/// JetStream alone, as the peers measure it (`/work/shared/peers`, `nats-ingest`): 4
/// connections, each batch of 100 events published as `per_batch` messages (100: one per
/// event; 1: the whole batch as one message, as cairn does), then their acks awaited.
async fn nats_alone(nats: &NatsCluster, total: u64, per_batch: u64, run: u64) -> (f64, Vec<u64>) {
    use async_nats::jetstream::stream;
    let name = format!("BENCH{run}_{per_batch}");
    let subject = format!("bench.{name}");
    let js = async_nats::jetstream::new(nats_client(nats).await);
    // Until the servers have elected a JetStream meta leader, creating times out.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let created = js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![subject.clone()],
                storage: stream::StorageType::File,
                num_replicas: 3,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "create stream: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Warm up as the cairn runs do (their nodes have created the stream and appended).
    for _ in 0..WARMUP / 100 {
        js.publish(subject.clone(), batch_body(0, 100))
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    let conns = 4;
    let per_conn = total / 100 / conns;
    let payloads: Arc<Vec<Bytes>> = Arc::new(if per_batch == 1 {
        (0..8).map(|i| batch_body(i * 100, 100)).collect()
    } else {
        (0..100)
            .map(|i| Bytes::from(support::event(i, support::TS)))
            .collect()
    });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let js = async_nats::jetstream::new(nats_client(nats).await);
        let (subject, payloads) = (subject.clone(), payloads.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for i in 0..per_conn {
                let t = Instant::now();
                let mut acks = Vec::with_capacity(per_batch as usize);
                for m in 0..per_batch {
                    let p = payloads[((c + i + m) % payloads.len() as u64) as usize].clone();
                    acks.push(js.publish(subject.clone(), p).await.expect("publish"));
                }
                for a in acks {
                    a.await.expect("ack");
                }
                lat.push(t.elapsed().as_micros() as u64);
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
    ((per_conn * conns * 100) as f64 / secs, lat)
}

// ---------------------------------------------------------------------------------------
// W4

/// Digits after `"sent_ns":` in an event line.
fn sent_ns(line: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(line, b"\"sent_ns\":")? + 10;
    let digits = &line[at..];
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..n]).ok()?.parse().ok()
}

/// One live SSE subscriber: sends on `ready` once connected, then counts events (with
/// their latency from `data.sent_ns`) until `expected` arrived or `stop` fires.
async fn sse_subscriber(
    addr: String,
    auth: String,
    base: Instant,
    expected: u64,
    ready: tokio::sync::mpsc::UnboundedSender<()>,
    stop: tokio_util::sync::CancellationToken,
) -> (u64, Vec<u32>, Option<String>) {
    use http_body_util::BodyExt;
    let mut lat = Vec::with_capacity(expected as usize);
    let mut received = 0u64;
    let run = async {
        let mut send = support::connect(&addr).await;
        let req = hyper::Request::get("/v1/events/stream")
            .header("host", &addr)
            .header("authorization", &auth)
            .body(http_body_util::Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            return Err(format!("status {}", resp.status()));
        }
        let mut body = resp.into_body();
        let mut carry: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            let Some(chunk) = frame.data_ref() else {
                continue;
            };
            let now = base.elapsed().as_nanos() as u64;
            carry.extend_from_slice(chunk);
            let end = carry.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            for line in carry[..end].split(|&b| b == b'\n') {
                if line == b"event: connected" || line == b"event:connected" {
                    let _ = ready.send(());
                } else if line.starts_with(b"data:")
                    && let Some(sent) = sent_ns(line)
                {
                    received += 1;
                    lat.push((now.saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32);
                }
            }
            carry.drain(..end);
            if received >= expected {
                break;
            }
        }
        Ok(())
    };
    let error = tokio::select! {
        r = run => r.err(),
        () = stop.cancelled() => None,
    };
    (received, lat, error)
}

/// 100 SSE subscribers spread over three nodes; one producer posts 2,000 events/s for
/// 10 s (one event per request, paced 500 µs apart and not waiting for each answer:
/// `PRODUCER_CONNS` keep-alive connections spread over the nodes).
fn w4(rt: &tokio::runtime::Runtime) {
    const SUBS: usize = 100;
    const RATE: u64 = 2_000;
    const SECS: u64 = 10;
    const PRODUCER_CONNS: usize = 48;
    let events = RATE * SECS;
    let c = Cluster::start(3, &[]);
    let addrs = c.addrs();
    let auth = c.auth();
    let base = Instant::now();
    let stop = tokio_util::sync::CancellationToken::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let subs: Vec<_> = (0..SUBS)
        .map(|i| {
            rt.spawn(sse_subscriber(
                addrs[i % addrs.len()].clone(),
                auth.clone(),
                base,
                events,
                ready_tx.clone(),
                stop.clone(),
            ))
        })
        .collect();
    drop(ready_tx);
    let ready = rt.block_on(async {
        let mut n = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while n < SUBS {
            match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
                Ok(Some(())) => n += 1,
                _ => break,
            }
        }
        n
    });

    let (release_tx, release_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let released = Arc::new(tokio::sync::Mutex::new(release_rx));
    let start = Instant::now() + Duration::from_millis(20);
    let interval = Duration::from_nanos(1_000_000_000 / RATE);
    let pacer = std::thread::spawn(move || {
        for i in 0..events {
            let at = start + interval * i as u32;
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if release_tx.send(i).is_err() {
                break;
            }
        }
    });
    let cpu0 = c.node_cpu_secs().iter().sum::<f64>();
    let producers: Vec<_> = (0..PRODUCER_CONNS)
        .map(|j| {
            let (addr, auth, released) = (
                addrs[j % addrs.len()].clone(),
                auth.clone(),
                released.clone(),
            );
            rt.spawn(async move {
                use http_body_util::BodyExt;
                let mut send = support::connect(&addr).await;
                let (mut acked, mut failed, mut last_ack) = (0u64, 0u64, Duration::ZERO);
                let mut ack_us = Vec::new();
                loop {
                    let next = released.lock().await.recv().await;
                    let Some(i) = next else { break };
                    let sent = base.elapsed();
                    let e = support::event(i, support::TS);
                    let body = e.replacen(
                        "\"data\":{",
                        &format!("\"data\":{{\"sent_ns\":{},", sent.as_nanos()),
                        1,
                    );
                    let req = hyper::Request::post("/v1/events")
                        .header("host", &addr)
                        .header("authorization", &auth)
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(Bytes::from(body)))
                        .expect("request");
                    let ok = match send.send_request(req).await {
                        Ok(r) => {
                            let status = r.status();
                            r.into_body().collect().await.is_ok() && status == 201
                        }
                        Err(_) => false,
                    };
                    if ok {
                        acked += 1;
                        last_ack = base.elapsed();
                        ack_us.push((last_ack - sent).as_micros() as u64);
                    } else {
                        failed += 1;
                        send = support::connect(&addr).await;
                    }
                }
                (acked, failed, last_ack, ack_us)
            })
        })
        .collect();
    let (mut acked, mut failed, mut last_ack, mut ack_us) = (0, 0, Duration::ZERO, Vec::new());
    for p in producers {
        if let Ok((a, f, l, us)) = rt.block_on(p) {
            acked += a;
            failed += f;
            last_ack = last_ack.max(l);
            ack_us.extend(us);
        }
    }
    let _ = pacer.join();
    let produce_secs = (last_ack - (start - base)).as_secs_f64();
    // Let the subscribers drain, for at most 10 s more.
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    while subs.iter().any(|s| !s.is_finished()) && Instant::now() < drain_deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.cancel();
    let cpu = c.node_cpu_secs().iter().sum::<f64>() - cpu0;
    let (mut delivered, mut lat, mut errors) = (0u64, Vec::new(), Vec::new());
    for s in subs {
        if let Ok((n, l, e)) = rt.block_on(s) {
            delivered += n;
            lat.extend(l);
            errors.extend(e);
        }
    }
    lat.sort_unstable();
    ack_us.sort_unstable();
    let lat: Vec<u64> = lat.into_iter().map(u64::from).collect();
    let expected = SUBS as u64 * acked;
    println!(
        "W4 cluster, {SUBS} SSE subscribers over 3 nodes ({ready} connected), {RATE} events/s for {SECS} s: delivered {delivered} / {expected} = {:.3}% of the acknowledged events [target 100%: {}]; e2e p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        delivered as f64 * 100.0 / expected.max(1) as f64,
        mark(delivered == expected && acked == events),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
    );
    println!(
        "    producer: {acked} of {events} acknowledged ({failed} failed) at {:.0}/s; ack p50 {:.2} ms p99 {:.2} ms; subscriber errors {} {:?}; cairn CPU {:.1} s",
        acked as f64 / produce_secs.max(1e-9),
        pct(&ack_us, 0.5),
        pct(&ack_us, 0.99),
        errors.len(),
        errors.first(),
        cpu
    );
}

// ---------------------------------------------------------------------------------------
// Catch-up

fn catchup(rt: &tokio::runtime::Runtime) {
    let total = env_u64("CAIRN_BENCH_CATCHUP_EVENTS", 1_000_000);
    let mut c = Cluster::start(1, &[]);
    let load = Instant::now();
    let (rate, _) = rt.block_on(ingest(&c.addrs(), &c.auth(), 4, 100, total));
    println!(
        "catch-up: loaded {total} events through one node in {:.1} s ({rate:.0} events/s)",
        load.elapsed().as_secs_f64()
    );
    let messages = rt.block_on(stream_messages(&c.nats));
    for sync in ["fsync", "none"] {
        // Spawned here, not through `Node::start_on`: a node that is catching up may not
        // answer /healthz with 200 before it has caught up.
        let dir = tempfile::tempdir().expect("tempdir");
        let port = support::free_port();
        let addr = format!("127.0.0.1:{port}");
        let name = format!("empty-{sync}");
        let mut args = c.args(&name, &["--sync", sync, "--listen", &addr]);
        args.extend([
            "--data".to_string(),
            dir.path().join("data").display().to_string(),
        ]);
        let started = Instant::now();
        let mut child = std::process::Command::new(common::BIN)
            .arg("serve")
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn cairn");
        let mut first_answer = None;
        let deadline = started + Duration::from_secs(600);
        let caught_up = loop {
            let seq = head_seq(&addr, &c.token);
            if seq > 0 && first_answer.is_none() {
                first_answer = Some((started.elapsed(), seq));
            }
            if seq >= total {
                break Some(started.elapsed());
            }
            if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = child.kill();
        let _ = child.wait();
        match caught_up {
            Some(t) => {
                let rate = total as f64 / t.as_secs_f64();
                let after_first = first_answer
                    .map(|(at, seq)| (total - seq) as f64 / (t - at).as_secs_f64().max(1e-9));
                println!(
                    "catch-up of an empty node (--sync {sync}) from {total} events in {messages} stream messages: {:.2} s from spawn = {rate:.0} events/s [target >= 200000: {}]; {:.0} events/s after its first answer",
                    t.as_secs_f64(),
                    mark(rate >= 200_000.0),
                    after_first.unwrap_or(f64::NAN)
                );
            }
            None => println!("catch-up (--sync {sync}): NOT caught up within 600 s"),
        }
    }
    c.kill(0);
}

// ---------------------------------------------------------------------------------------
// Failover

/// One node's probes: (sent, answered, status), as offsets from [`Load`]'s `base`.
type Probes = Arc<std::sync::Mutex<Vec<(Duration, Duration, u16)>>>;

/// Ingest on every node while a round runs: a loader per node posting 100-event batches
/// back to back, and a probe per node posting one event every 100 ms, each probe on its
/// own request so a stalled one does not delay the next.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    /// Per node.
    probes: Vec<Probes>,
    base: Instant,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(rt: &tokio::runtime::Runtime, addrs: &[String], auth: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let base = Instant::now();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let mut tasks = Vec::new();
        let mut probes = Vec::new();
        for addr in addrs {
            let url = format!("http://{addr}/v1/events");
            let (stop2, acked2, http2, url2, auth2) = (
                stop.clone(),
                acked.clone(),
                http.clone(),
                url.clone(),
                auth.to_string(),
            );
            tasks.push(rt.spawn(async move {
                let mut i = 0;
                while !stop2.load(Ordering::Relaxed) {
                    i += 1;
                    let r = http2
                        .post(&url2)
                        .header("authorization", &auth2)
                        .header("content-type", "application/json")
                        .body(batch_body(i * 100, 100))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 201 => {
                            acked2.fetch_add(100, Ordering::Relaxed);
                        }
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }));
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            probes.push(seen.clone());
            let (stop2, acked2, http2, auth2) =
                (stop.clone(), acked.clone(), http.clone(), auth.to_string());
            tasks.push(rt.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                let mut i = 0;
                while !stop2.load(Ordering::Relaxed) {
                    tick.tick().await;
                    i += 1;
                    let (http3, url3, auth3, seen3, acked3) = (
                        http2.clone(),
                        url.clone(),
                        auth2.clone(),
                        seen.clone(),
                        acked2.clone(),
                    );
                    tokio::spawn(async move {
                        let sent = base.elapsed();
                        let status = http3
                            .post(&url3)
                            .header("authorization", &auth3)
                            .header("content-type", "application/json")
                            .body(batch_body(i, 1))
                            .send()
                            .await
                            .map_or(0, |r| r.status().as_u16());
                        if status == 201 {
                            acked3.fetch_add(1, Ordering::Relaxed);
                        }
                        let answered = base.elapsed();
                        if let Ok(mut s) = seen3.lock() {
                            s.push((sent, answered, status));
                        }
                    });
                }
            }));
        }
        Load {
            stop,
            acked,
            probes,
            base,
            tasks,
        }
    }

    /// Per node, the time from `at` until a probe sent after `at` got a 201, if any yet.
    fn resumed_after(&self, at: Instant) -> Vec<Option<Duration>> {
        let at = at - self.base;
        self.probes
            .iter()
            .map(|p| {
                p.lock()
                    .ok()?
                    .iter()
                    .filter(|(sent, _, status)| *sent >= at && *status == 201)
                    .map(|(_, answered, _)| *answered - at)
                    .min()
            })
            .collect()
    }

    /// Statuses other than 201 that probes got, with their counts.
    fn failures(&self) -> std::collections::BTreeMap<u16, usize> {
        let mut m = std::collections::BTreeMap::new();
        for p in &self.probes {
            if let Ok(p) = p.lock() {
                for (_, _, s) in p.iter().filter(|(_, _, s)| *s != 201) {
                    *m.entry(*s).or_insert(0) += 1;
                }
            }
        }
        m
    }

    fn stop(self, rt: &tokio::runtime::Runtime) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = rt.block_on(t);
        }
        self.acked.load(Ordering::Relaxed)
    }
}

/// Waits until every surviving node has a 201 for a probe sent after `killed` (at most
/// 60 s); returns the slowest node's time, or None.
fn wait_resumed(load: &Load, killed: Instant, skip: Option<usize>) -> Option<Duration> {
    let deadline = killed + Duration::from_secs(60);
    loop {
        let per_node = load.resumed_after(killed);
        let waiting: Vec<_> = per_node
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != skip)
            .map(|(_, t)| *t)
            .collect();
        if waiting.iter().all(Option::is_some) {
            return waiting.into_iter().flatten().max();
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Per node, seconds from the kill to its first 201 ("-": none, or not running).
fn per_node(load: &Load, killed: Instant, c: &Cluster) -> String {
    load.resumed_after(killed)
        .iter()
        .zip(&c.names)
        .map(|(t, n)| {
            format!(
                "{n} {}",
                t.map_or("-".into(), |t| format!("{:.2}", t.as_secs_f64()))
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A slow round: what each node logged since `marks` (log lengths before the kill).
fn print_logs_since(c: &Cluster, marks: &[usize]) {
    for ((n, name), mark) in c.nodes.iter().zip(&c.names).zip(marks) {
        let Some(n) = n else { continue };
        let log = n.log_text();
        let new = log.get(*mark..).unwrap_or("");
        let lines: Vec<&str> = new.lines().filter(|l| !l.contains(" DEBUG ")).collect();
        println!(
            "    log of {name} since the kill ({} lines, last 15):",
            lines.len()
        );
        for l in lines.iter().rev().take(15).rev() {
            println!("      {}", l.chars().take(300).collect::<String>());
        }
    }
}

fn log_marks(c: &Cluster) -> Vec<usize> {
    c.nodes
        .iter()
        .map(|n| n.as_ref().map_or(0, |n| n.log_text().len()))
        .collect()
}

/// The stream's leader and whether every replica is current.
async fn stream_state(client: &async_nats::Client) -> Option<(String, bool)> {
    let js = async_nats::jetstream::new(client.clone());
    let mut s = js.get_stream(STREAM).await.ok()?;
    let info = s.info().await.ok()?;
    let cluster = info.cluster.as_ref()?;
    let current = cluster.replicas.len() == 2 && cluster.replicas.iter().all(|r| r.current);
    Some((cluster.leader.clone()?, current))
}

fn failover(rt: &tokio::runtime::Runtime) {
    let rounds = env_u64("CAIRN_BENCH_FAILOVER_ROUNDS", 5);
    let mut c = Cluster::start(3, &[]);
    let client = rt.block_on(nats_client(&c.nats));

    // kill -9 of the NATS stream leader.
    let mut times = Vec::new();
    for round in 1..=rounds {
        let load = Load::start(rt, &c.addrs(), &c.auth());
        wait_resumed(&load, Instant::now(), None).expect("ingest runs before the kill");
        let leader = rt
            .block_on(stream_state(&client))
            .map(|(l, _)| l)
            .expect("stream leader");
        let i: usize = leader
            .strip_prefix('n')
            .and_then(|n| n.parse().ok())
            .expect("server name n<i>");
        let marks = log_marks(&c);
        c.nats.kill(i);
        let killed = Instant::now();
        let resumed = wait_resumed(&load, killed, None);
        let failures = load.failures();
        let nodes = per_node(&load, killed, &c);
        let acked = load.stop(rt);
        match resumed {
            Some(t) => times.push(t.as_secs_f64()),
            None => times.push(f64::INFINITY),
        }
        println!(
            "failover, NATS stream leader ({leader}) kill -9, round {round}: ingest acknowledged on every node {} after the kill (per node: {nodes}); probe failures by status {failures:?}; {acked} events acknowledged in the round",
            resumed.map_or("NOT within 60 s".to_string(), |t| format!(
                "{:.2} s",
                t.as_secs_f64()
            ))
        );
        if resumed.is_none_or(|t| t > Duration::from_secs(10)) {
            print_logs_since(&c, &marks);
        }
        c.nats.restart(i);
        // The restarted server catches up before the next round kills a leader.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !rt
            .block_on(stream_state(&client))
            .is_some_and(|(_, current)| current)
        {
            assert!(Instant::now() < deadline, "replicas never current again");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let m = support::median(&times);
    println!(
        "failover, NATS stream leader kill -9: median {m:.2} s over {rounds} rounds (max {:.2} s) [target <= 10 s: {}]",
        times.iter().copied().fold(0.0, f64::max),
        mark(m <= 10.0)
    );

    // kill -9 of the sequencer node.
    let mut times = Vec::new();
    for round in 1..=rounds {
        let load = Load::start(rt, &c.addrs(), &c.auth());
        wait_resumed(&load, Instant::now(), None).expect("ingest runs before the kill");
        let seq = c.sequencer().expect("a sequencer");
        let marks = log_marks(&c);
        c.kill(seq);
        let killed = Instant::now();
        let resumed = wait_resumed(&load, killed, Some(seq));
        let failures = load.failures();
        let nodes = per_node(&load, killed, &c);
        let acked = load.stop(rt);
        times.push(resumed.map_or(f64::INFINITY, |t| t.as_secs_f64()));
        println!(
            "failover, sequencer node {} kill -9, round {round}: ingest acknowledged on both other nodes {} after the kill (per node: {nodes}); probe failures by status {failures:?} (those of the killed node included); {acked} events acknowledged in the round",
            c.names[seq],
            resumed.map_or("NOT within 60 s".to_string(), |t| format!(
                "{:.2} s",
                t.as_secs_f64()
            ))
        );
        if resumed.is_none_or(|t| t > Duration::from_secs(10)) {
            print_logs_since(&c, &marks);
        }
        c.restart(seq);
        let live = (0..c.nodes.len())
            .find(|&i| i != seq)
            .expect("another node");
        let target = c.head_seq(live);
        wait_until(
            Duration::from_secs(60),
            "the restarted node to catch up",
            || c.head_seq(seq) >= target,
        );
    }
    let m = support::median(&times);
    println!(
        "failover, sequencer node kill -9: median {m:.2} s over {rounds} rounds (max {:.2} s) [target <= 10 s: {}]",
        times.iter().copied().fold(0.0, f64::max),
        mark(m <= 10.0)
    );
    follower_kill(rt, &mut c, rounds);
}

/// kill -9 of a node that is not the sequencer: the time until the two others
/// acknowledge a request sent after the kill.
fn follower_kill(rt: &tokio::runtime::Runtime, c: &mut Cluster, rounds: u64) {
    let mut times = Vec::new();
    for round in 1..=rounds {
        let load = Load::start(rt, &c.addrs(), &c.auth());
        wait_resumed(&load, Instant::now(), None).expect("ingest runs before the kill");
        let seq = c.sequencer().expect("a sequencer");
        let victim = (0..c.nodes.len()).find(|&i| i != seq).expect("a follower");
        c.kill(victim);
        let killed = Instant::now();
        let resumed = wait_resumed(&load, killed, Some(victim));
        let nodes = per_node(&load, killed, c);
        load.stop(rt);
        times.push(resumed.map_or(f64::INFINITY, |t| t.as_secs_f64()));
        println!(
            "failover, follower node {} kill -9, round {round}: ingest acknowledged on both other nodes {} after the kill (per node: {nodes})",
            c.names[victim],
            resumed.map_or("NOT within 60 s".to_string(), |t| format!(
                "{:.2} s",
                t.as_secs_f64()
            ))
        );
        c.restart(victim);
        let target = c.head_seq(seq);
        wait_until(
            Duration::from_secs(60),
            "the restarted node to catch up",
            || c.head_seq(victim) >= target,
        );
    }
    println!(
        "failover, follower node kill -9: median {:.2} s over {rounds} rounds (max {:.2} s)",
        support::median(&times),
        times.iter().copied().fold(0.0, f64::max)
    );
}

fn main() {
    if common::nats::missing() {
        return;
    }
    let wanted = support::selection();
    let rt = support::runtime();
    println!(
        "cairn cluster benchmarks ({} cores; nats-server {})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        nats_version()
    );
    if wanted("w1") {
        w1(&rt);
    }
    if wanted("w4") {
        w4(&rt);
    }
    if wanted("catchup") {
        catchup(&rt);
    }
    if wanted("failover") {
        failover(&rt);
    }
}

fn nats_version() -> String {
    common::nats::nats_server_binary()
        .and_then(|b| std::process::Command::new(b).arg("--version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
