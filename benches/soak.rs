//! Soak: mixed ingest, replay and live streaming for a few minutes, with the server's
//! RSS sampled over time. Once warm (after the first third), RSS must not keep growing.
//!
//! `cargo bench --bench soak` (`CAIRN_SOAK_SECS`, default 180).
mod support;

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::Server;

fn main() {
    let secs: u64 = std::env::var("CAIRN_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(180);
    let s = Arc::new(Server::start("fsync", &[]));
    let stop = Arc::new(AtomicBool::new(false));
    let ingested = Arc::new(AtomicU64::new(0));
    let streamed = Arc::new(AtomicU64::new(0));
    let replayed = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();

    // Ingest: 2 writers, 100-event batches, about 4,000 events/s in all.
    for w in 0..2u64 {
        let (s, stop, ingested) = (s.clone(), stop.clone(), ingested.clone());
        threads.push(std::thread::spawn(move || {
            let http = reqwest::blocking::Client::new();
            let mut seq = w * 1_000_000_000;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = http
                    .post(format!("http://{}/v1/events", s.addr))
                    .header("authorization", s.auth())
                    .header("content-type", "application/json")
                    .body(support::batch_body(seq, 100))
                    .send();
                if r.is_ok_and(|r| r.status() == 201) {
                    ingested.fetch_add(100, Ordering::Relaxed);
                }
                seq += 100;
                std::thread::sleep(Duration::from_millis(50).saturating_sub(started.elapsed()));
            }
        }));
    }
    // Live: 20 subscribers, reading as fast as they can.
    for _ in 0..20 {
        let (s, stop, streamed) = (s.clone(), stop.clone(), streamed.clone());
        threads.push(std::thread::spawn(move || {
            let http = reqwest::blocking::Client::builder()
                .timeout(None::<Duration>)
                .build()
                .expect("client");
            let mut r = http
                .get(format!("http://{}/v1/events/stream", s.addr))
                .header("authorization", s.auth())
                .send()
                .expect("stream");
            let mut buf = vec![0u8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        streamed.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Replay: one client after another reads 50,000 events back from the start.
    {
        let (s, stop, replayed) = (s.clone(), stop.clone(), replayed.clone());
        threads.push(std::thread::spawn(move || {
            let http = reqwest::blocking::Client::builder()
                .timeout(None::<Duration>)
                .build()
                .expect("client");
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut r) = http
                    .get(format!("http://{}/v1/events/stream?since=earliest", s.addr))
                    .header("authorization", s.auth())
                    .send()
                else {
                    continue;
                };
                let mut buf = vec![0u8; 64 * 1024];
                let mut bytes = 0u64;
                // ~300 bytes an event: stop after about 50,000.
                while bytes < 50_000 * 300 && !stop.load(Ordering::Relaxed) {
                    match r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => bytes += n as u64,
                    }
                }
                replayed.fetch_add(bytes / 300, Ordering::Relaxed);
            }
        }));
    }

    println!("soak: {secs} s; RSS every {} s", (secs / 12).max(5));
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs((secs / 12).max(5)));
        let rss_mb = s.status("VmRSS") as f64 / 1024.0;
        samples.push((started.elapsed().as_secs(), rss_mb));
        println!(
            "  t={:>4} s  RSS {:>6.1} MB  ingested {:>9}  live bytes {:>6} MB  replayed {:>9}  threads {}",
            started.elapsed().as_secs(),
            rss_mb,
            ingested.load(Ordering::Relaxed),
            streamed.load(Ordering::Relaxed) >> 20,
            replayed.load(Ordering::Relaxed),
            s.status("Threads"),
        );
    }
    stop.store(true, Ordering::Relaxed);
    let warm: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= secs / 3)
        .map(|(_, r)| *r)
        .collect();
    if let (Some(first), Some(max)) = (warm.first(), warm.iter().cloned().reduce(f64::max)) {
        println!(
            "soak: RSS once warm {first:.1} MB, highest after {max:.1} MB ({:+.1} MB)",
            max - first
        );
    }
    // The streams end when the server does.
    let _ = std::process::Command::new("kill")
        .arg(s.child.id().to_string())
        .status();
    for t in threads {
        let _ = t.join();
    }
}
