//! Webhook benchmarks against the real release server over loopback (SPEC §7): delivery
//! throughput to a local receiver that answers at once (batch 1 and batch 100, events
//! already in the log, `since=earliest`), and W1 ingest (fsync, 4 connections x 100
//! events per request) with 10 active webhooks vs none, alternating runs.
//!
//! `cargo bench --bench webhooks` runs all; `-- delivery` or `-- ingest` runs one part;
//! `CAIRN_BENCH_PAIRS=N` sets the number of with/without pairs (default 3),
//! `CAIRN_BENCH_EVENTS=N` the events per ingest run (default 200,000; runs under a
//! second are noisy on a shared machine, 1,000,000 steadies the ratio).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;

use support::{Server, batch_body, connect};

/// A receiver that answers 204 at once and counts the events it was sent. It runs on
/// its own thread at a lower CPU priority (nice 10), standing in for a receiver on
/// another machine: on 2 shared cores it would otherwise take CPU from ingest that a
/// real deployment's receiver does not.
fn receiver() -> (String, Arc<AtomicU64>) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: a plain system call without pointers (this thread only).
        let _ = unsafe { libc::nice(10) };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (url, events) = serve_receiver().await;
            tx.send((url, events)).expect("send");
            std::future::pending::<()>().await;
        });
    });
    rx.recv().expect("receiver")
}

async fn serve_receiver() -> (String, Arc<AtomicU64>) {
    let events = Arc::new(AtomicU64::new(0));
    let counted = events.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: Bytes| {
            let counted = counted.clone();
            async move {
                let n = memchr::memmem::find_iter(&body, b"\"prev_hash\":").count();
                counted.fetch_add(n as u64, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, events)
}

async fn request(
    send: &mut SendRequest<Full<Bytes>>,
    s: &Server,
    path: &str,
    body: Bytes,
) -> (u16, Bytes) {
    let req = hyper::Request::post(path)
        .header("host", &s.addr)
        .header("authorization", s.auth())
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("request");
    let resp = send.send_request(req).await.expect("send");
    let status = resp.status().as_u16();
    (
        status,
        resp.into_body().collect().await.expect("body").to_bytes(),
    )
}

async fn create_webhook(s: &Server, url: &str, batch: u64, since: &str) {
    let mut send = connect(&s.addr).await;
    let body = format!(r#"{{"url":"{url}","batch":{batch},"since":"{since}"}}"#);
    let (status, answer) = request(&mut send, s, "/v1/webhooks", Bytes::from(body)).await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&answer));
}

/// W1: 4 connections send `total` events in requests of 100; returns events/s.
async fn ingest(s: &Server, total: u64) -> f64 {
    let (conns, batch) = (4u64, 100u64);
    let bodies: Arc<Vec<Bytes>> = Arc::new((0..8).map(|i| batch_body(i * batch, batch)).collect());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (bodies, addr) = (bodies.clone(), s.addr.clone());
        let auth = s.auth();
        tasks.push(tokio::spawn(async move {
            let mut send = connect(&addr).await;
            for i in 0..total / batch / conns {
                let req = hyper::Request::post("/v1/events")
                    .header("host", &addr)
                    .header("authorization", &auth)
                    .header("content-type", "application/json")
                    .body(Full::new(bodies[((c + i) % 8) as usize].clone()))
                    .expect("request");
                let resp = send.send_request(req).await.expect("send");
                assert_eq!(resp.status(), 201);
                let _ = resp.into_body().collect().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

async fn wait_for(count: &AtomicU64, n: u64, limit: Duration) -> Duration {
    let start = Instant::now();
    while count.load(Ordering::Relaxed) < n {
        assert!(
            start.elapsed() < limit,
            "receiver got {} of {n}",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    start.elapsed()
}

fn main() {
    let wanted = support::selection();
    let rt = support::runtime();
    println!(
        "cairn webhook benchmarks ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if wanted("delivery") {
        for (batch, total) in [(1u64, 20_000u64), (100, 200_000)] {
            let s = Server::start("fsync", &[]);
            rt.block_on(async {
                ingest(&s, total).await;
                let (url, got) = receiver();
                create_webhook(&s, &url, batch, "earliest").await;
                let took = wait_for(&got, total, Duration::from_secs(600)).await;
                println!(
                    "delivery, batch {batch:>3}: {total} events in {:.2} s = {:>8.0} events/s ({:.0} requests/s)",
                    took.as_secs_f64(),
                    total as f64 / took.as_secs_f64(),
                    total as f64 / batch as f64 / took.as_secs_f64()
                );
            });
        }
    }
    if wanted("ingest") {
        let total: u64 = std::env::var("CAIRN_BENCH_EVENTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(200_000);
        // Pairs alternate with and without, so drift of a shared machine hits both.
        let pairs: usize = std::env::var("CAIRN_BENCH_PAIRS")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(3);
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for run in 1..=pairs {
            for hooks in [0, 10] {
                let s = Server::start("fsync", &[]);
                let (rate, behind, threads) = rt.block_on(async {
                    let (url, got) = receiver();
                    for _ in 0..hooks {
                        create_webhook(&s, &url, 100, "earliest").await;
                    }
                    let before = support::thread_cpu_secs(s.child.id());
                    let rate = ingest(&s, total).await;
                    let mut threads = support::thread_cpu_secs(s.child.id());
                    for (name, secs) in &mut threads {
                        *secs -= before.get(name).copied().unwrap_or(0.0);
                    }
                    // How far the webhooks trailed ingest when it ended (0: kept up).
                    let behind = (total * hooks).saturating_sub(got.load(Ordering::Relaxed));
                    wait_for(&got, total * hooks, Duration::from_secs(600)).await;
                    (rate, behind, threads)
                });
                // Server CPU during ingest per event, by thread (name: µs/event).
                let per_event = |secs: f64| secs * 1e6 / total as f64;
                let all: f64 = threads.values().sum();
                let split: Vec<String> = threads
                    .iter()
                    .filter(|(_, secs)| per_event(**secs) >= 0.05)
                    .map(|(name, secs)| format!("{name} {:.2}", per_event(*secs)))
                    .collect();
                println!(
                    "W1 fsync, 4 conns x 100/batch, {hooks:>2} webhooks (batch 100), run {run}: {rate:>8.0} events/s; \
                     server CPU {:.2} µs/event ({}); deliveries behind at the end {behind}",
                    per_event(all),
                    split.join(", ")
                );
                if hooks == 0 { &mut without } else { &mut with }.push(rate);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let mut ratios: Vec<f64> = with.iter().zip(&without).map(|(w, o)| w / o).collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "W1 with 10 webhooks / without: {:.3} ({:.0} vs {:.0} events/s, means of {pairs}); pair ratios {:?}, median {:.3}",
            mean(&with) / mean(&without),
            mean(&with),
            mean(&without),
            ratios
                .iter()
                .map(|r| (r * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>(),
            support::median(&ratios)
        );
    }
}
