//! Ingest benchmarks against the real release server over loopback HTTP (workloads W1
//! and W2 of the team's peer comparison, docs/benchmarks.md: 300-byte `tool_call` events in
//! batches of 100 from 4 connections, fsync'd or buffered): prints events/s, batch latency percentiles, RSS and disk use.
//!
//! `cargo bench --bench ingest` runs all; `cargo bench --bench ingest -- w1` runs one
//! (names: w1, w2, single, rss, retention). `CAIRN_BENCH_EVENTS_RSS` overrides the
//! 1,000,000 events of the RSS run. `retention` alternates servers with and without a
//! pruner at work (`--retain-events 100000`, 2,000,000 events: the pruner removes
//! chunks every second for most of the run) and prints each pair's throughput ratio;
//! `CAIRN_BENCH_RETENTION_SYNC` (`fsync` or `none`, default both),
//! `CAIRN_BENCH_RETENTION_PAIRS` (default 4) and `CAIRN_BENCH_RETENTION_EVENTS` (default
//! 2,000,000) narrow it.

mod support;

use std::path::Path;

use support::{Server, measure};

fn dir_bytes(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn main() {
    let wanted = support::selection();
    let rt = support::runtime();
    println!(
        "cairn ingest benchmarks ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // 200,000 events take under a second here; longer runs average the machine's noise.
    let events: u64 = std::env::var("CAIRN_BENCH_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    if wanted("w1") {
        for run in 1..=2 {
            let s = Server::start("fsync", &[]);
            let name = format!("W1 fsync, 4 conns x 100/batch, run {run}");
            measure(&rt, &s, &name, 4, 100, events);
        }
    }
    if wanted("w2") {
        for run in 1..=2 {
            let s = Server::start("none", &[]);
            let name = format!("W2 --sync none, 4 conns x 100/batch, run {run}");
            measure(&rt, &s, &name, 4, 100, events);
        }
    }
    if wanted("single") {
        let s = Server::start("fsync", &[]);
        measure(&rt, &s, "fsync, 64 conns x 1 event/request", 64, 1, 64_000);
    }
    if wanted("retention") {
        let env_u64 = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let pairs = env_u64("CAIRN_BENCH_RETENTION_PAIRS", 4).max(1);
        let events = env_u64("CAIRN_BENCH_RETENTION_EVENTS", 2_000_000);
        let syncs: Vec<String> = match std::env::var("CAIRN_BENCH_RETENTION_SYNC") {
            Ok(s) => vec![s],
            Err(_) => vec!["fsync".into(), "none".into()],
        };
        for sync in syncs.iter().map(String::as_str) {
            let mut ratios = Vec::new();
            for pair in 1..=pairs {
                let mut rates = [0.0; 2];
                // Alternate which goes first, so a drift of the machine's speed within
                // a pair does not always favour the same side.
                let order = if pair % 2 == 1 { [0, 1] } else { [1, 0] };
                for i in order {
                    let extra: &[&str] = if i == 0 {
                        &[]
                    } else {
                        &["--retain-events", "100000"]
                    };
                    let s = Server::start(sync, extra);
                    let name = format!(
                        "--sync {sync}, pair {pair}, {}",
                        if i == 0 {
                            "no retention"
                        } else {
                            "pruner running"
                        }
                    );
                    rates[i] = measure(&rt, &s, &name, 4, 100, events);
                    if i == 1 {
                        let head: serde_json::Value = reqwest::blocking::Client::new()
                            .get(format!("http://{}/v1/head", s.addr))
                            .header("authorization", s.auth())
                            .send()
                            .and_then(|r| r.json())
                            .unwrap_or_default();
                        let (seq, first) = (&head["data"]["seq"], &head["data"]["first_seq"]);
                        println!("  head seq {seq}, first retained seq {first}");
                    }
                }
                ratios.push(rates[1] / rates[0]);
            }
            ratios.sort_by(f64::total_cmp);
            println!(
                "--sync {sync}: throughput with the pruner / without, per pair (sorted): {}; median {:.3}",
                ratios
                    .iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                support::median(&ratios)
            );
        }
    }
    if wanted("rss") {
        let total: u64 = std::env::var("CAIRN_BENCH_EVENTS_RSS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let s = Server::start("none", &[]);
        let before = s.status("VmRSS");
        measure(
            &rt,
            &s,
            &format!("load {total} events (--sync none)"),
            4,
            100,
            total,
        );
        let disk = dir_bytes(&s.data);
        println!(
            "RSS after {total} events: {:.1} MB (at start {:.1} MB); disk {:.1} MB = {:.0} bytes/event",
            s.status("VmRSS") as f64 / 1024.0,
            before as f64 / 1024.0,
            disk as f64 / 1e6,
            disk as f64 / total as f64
        );
    }
}
