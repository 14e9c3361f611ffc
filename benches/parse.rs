//! `parse_request` per event, in process: the one-pass path (`jcs::Reader`) against the
//! reference path (a `serde_json` tree, then `canon-json`) it replaced, on W1/W2's
//! request (100 of the peers' 300-byte events) and on NDJSON and single-event bodies.
//! Rounds alternate the two paths; the best round of each is printed, with the ratio.
//!
//! `cargo bench --bench parse` (`CAIRN_BENCH_ROUNDS` for more than 15 rounds).
mod support;

use std::hint::black_box;
use std::time::Instant;

use cairn::event::{BodyFormat, NewEvent, RequestError, parse_request, parse_request_reference};

// The server's allocator: allocation is part of what is compared.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Parse = fn(&[u8], BodyFormat, usize) -> Result<Vec<NewEvent>, RequestError>;

/// Nanoseconds per event of one round: `body` parsed `reps` times.
fn round(parse: Parse, body: &[u8], format: BodyFormat, events: usize, reps: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..reps {
        let parsed = parse(black_box(body), format, 10_000).expect("valid body");
        assert_eq!(parsed.len(), events);
        black_box(parsed);
    }
    start.elapsed().as_nanos() as f64 / (reps * events) as f64
}

fn main() {
    let rounds: usize = std::env::var("CAIRN_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let batch = support::batch_body(0, 100);
    let ndjson: String = (0..100)
        .map(|i| support::event(i, support::TS) + "\n")
        .collect();
    let single = support::batch_body(7, 1);
    let cases: [(&str, &[u8], BodyFormat, usize, usize); 3] = [
        (
            "JSON {\"events\":[100]}",
            &batch,
            BodyFormat::Json,
            100,
            200,
        ),
        (
            "NDJSON, 100 lines",
            ndjson.as_bytes(),
            BodyFormat::Ndjson,
            100,
            200,
        ),
        ("one event", &single, BodyFormat::Json, 1, 20_000),
    ];
    // Both paths must give the same events before either is timed.
    for (name, body, format, _, _) in cases {
        assert_eq!(
            parse_request(body, format, 10_000),
            parse_request_reference(body, format, 10_000),
            "{name}"
        );
    }
    println!("parse_request, ns per event (best of {rounds} alternating rounds)");
    for (name, body, format, events, reps) in cases {
        let (mut new, mut old) = (f64::MAX, f64::MAX);
        for _ in 0..rounds {
            new = new.min(round(parse_request, body, format, events, reps));
            old = old.min(round(parse_request_reference, body, format, events, reps));
        }
        println!(
            "{name:<24} one-pass {new:>7.0}  reference {old:>7.0}  ratio {:.2}",
            new / old
        );
    }
}
