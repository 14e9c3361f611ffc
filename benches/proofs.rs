//! Checkpoints and proofs at scale (issue 6): a log of 1,000,000 events, then inclusion
//! and consistency proofs for random positions over HTTP (one keep-alive connection),
//! and the time from the last append to a checkpoint covering it.
//!
//! `cargo bench --bench proofs` (`CAIRN_BENCH_EVENTS` for another log size). The ingest
//! cost of the tree is measured by `cargo bench --bench ingest` against a build without
//! it (`CAIRN_BENCH_BIN=…`), see docs/benchmarks.md.
mod support;

use std::time::{Duration, Instant};

use support::Server;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, mut times: Vec<Duration>) {
    times.sort();
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    println!(
        "{name}: {} requests, mean {:.3} ms, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        times.len(),
        mean.as_secs_f64() * 1e3,
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
    );
}

fn main() {
    let total: u64 = std::env::var("CAIRN_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let s = Server::start("none", &[]);
    let http = reqwest::blocking::Client::new();
    let url = |path: &str| format!("http://{}{path}", s.addr);

    // Load: 4 writers, 1,000 events per request.
    let started = Instant::now();
    std::thread::scope(|scope| {
        for w in 0..4u64 {
            let (http, s) = (&http, &s);
            scope.spawn(move || {
                let mut seq = w * 1000;
                while seq < total {
                    let n = 1000.min(total - seq);
                    let r = http
                        .post(format!("http://{}/v1/events", s.addr))
                        .header("authorization", s.auth())
                        .header("content-type", "application/json")
                        .body(support::batch_body(seq, n))
                        .send()
                        .expect("append");
                    assert_eq!(r.status(), 201);
                    seq += 4000;
                }
            });
        }
    });
    let loaded = Instant::now();
    println!(
        "loaded {total} events in {:.1} s",
        (loaded - started).as_secs_f64()
    );
    // The first checkpoint of the whole log (signed at most 1 s after the last append).
    loop {
        let note = http
            .get(url("/v1/checkpoint"))
            .header("authorization", s.auth())
            .send()
            .and_then(|r| r.text())
            .expect("checkpoint");
        if note.lines().nth(1) == Some(&total.to_string()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "checkpoint of all {total} events signed {:.0} ms after the last append (interval 1 s)",
        loaded.elapsed().as_secs_f64() * 1e3
    );

    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut random = move |below: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % below
    };
    let get = |path: String| {
        let t = Instant::now();
        let r = http
            .get(url(&path))
            .header("authorization", s.auth())
            .send()
            .expect("proof");
        assert_eq!(r.status(), 200, "{path}");
        r.bytes().expect("body");
        t.elapsed()
    };
    for _ in 0..200 {
        get(format!("/v1/proof/inclusion?seq={}", random(total) + 1)); // warm up
    }
    let times = (0..2000)
        .map(|_| {
            get(format!(
                "/v1/proof/inclusion?seq={}&size={total}",
                random(total) + 1
            ))
        })
        .collect();
    report(&format!("inclusion proof in {total}, over HTTP"), times);
    let times = (0..2000)
        .map(|_| {
            get(format!(
                "/v1/proof/consistency?from={}&to={total}",
                random(total - 1) + 1
            ))
        })
        .collect();
    report(&format!("consistency proof to {total}, over HTTP"), times);
    let times = (0..2000).map(|_| get("/v1/head".to_string())).collect();
    report("for scale: GET /v1/head, over HTTP", times);
}
