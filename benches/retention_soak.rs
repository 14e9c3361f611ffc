//! Retention soak: constant ingest with `--retain-events`, printing the data
//! directory's disk use, sled's file size, the retained events and the server's RSS every
//! `CAIRN_SOAK_SAMPLE_SECS` (default 30) for `CAIRN_SOAK_SECS` (default 600). With
//! retention the disk series should level off once the first prunes have happened.
//!
//! `cargo bench --bench retention_soak` (`CAIRN_SOAK_RETAIN_EVENTS`, default 200000).
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::Server;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            // Allocated blocks, not apparent length: what the disk really holds.
            Ok(m) => std::os::unix::fs::MetadataExt::blocks(&m) * 512,
            Err(_) => 0,
        })
        .sum()
}

fn main() {
    let secs = env_u64("CAIRN_SOAK_SECS", 600);
    let sample = env_u64("CAIRN_SOAK_SAMPLE_SECS", 30);
    let retain = env_u64("CAIRN_SOAK_RETAIN_EVENTS", 200_000).to_string();
    let s = Arc::new(Server::start("fsync", &["--retain-events", &retain]));
    let stop = Arc::new(AtomicBool::new(false));
    let ingested = Arc::new(AtomicU64::new(0));
    let writer = {
        let (s, stop, ingested) = (s.clone(), stop.clone(), ingested.clone());
        std::thread::spawn(move || {
            let http = reqwest::blocking::Client::new();
            let mut seq = 0;
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
                // About 2,000 events/s.
                if let Some(rest) = Duration::from_millis(50).checked_sub(started.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        })
    };
    let http = reqwest::blocking::Client::new();
    println!("retention soak: --retain-events {retain}, {secs} s, ~2000 events/s");
    println!("t_s\tingested\tretained\tdata_dir_MiB\tsled_db_MiB\trss_MiB");
    let start = Instant::now();
    while start.elapsed().as_secs() < secs {
        std::thread::sleep(Duration::from_secs(sample));
        let head: serde_json::Value = http
            .get(format!("http://{}/v1/head", s.addr))
            .header("authorization", s.auth())
            .send()
            .and_then(|r| r.json())
            .unwrap_or_default();
        let retained = head["data"]["seq"].as_u64().unwrap_or(0) + 1
            - head["data"]["first_seq"].as_u64().unwrap_or(1);
        let db = std::fs::metadata(s.data.join("log/db")).map_or(0, |m| m.len());
        println!(
            "{}\t{}\t{}\t{:.1}\t{:.1}\t{:.1}",
            start.elapsed().as_secs(),
            ingested.load(Ordering::Relaxed),
            retained,
            dir_bytes(&s.data) as f64 / 1048576.0,
            db as f64 / 1048576.0,
            s.status("VmRSS") as f64 / 1024.0
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
}
