//! Crash safety (SPEC §1–2): every acknowledged event survives SIGKILL and SIGTERM at
//! its acknowledged seq, requests stay atomic across a crash, the log stays a contiguous,
//! correctly hashed chain, and ids and seqs continue across restarts.
//!
//! Each SIGKILL round also streams while it ingests: everything a stream delivered before
//! the kill is in the log afterwards, with the same hash, without a gap.
//!
//! `CAIRN_CRASH_ROUNDS` sets the number of kill/restart rounds (default 20) for longer runs.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, wait_until};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const CLIENTS: usize = 5;
const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Safety bound on the requests one client sends in one round.
const MAX_REQUESTS_PER_CLIENT: u64 = 20_000;

/// One acknowledged (201) ingest request.
#[derive(Debug, Clone)]
struct Ack {
    round: u64,
    client: u64,
    n: u64,
    ids: Vec<String>,
    first_seq: u64,
    last_seq: u64,
}

/// What the client threads of one round share with the test.
#[derive(Default)]
struct Shared {
    acks: Mutex<Vec<Ack>>,
    ack_count: AtomicUsize,
    /// Set just before the server is killed or terminated: errors are expected from now on.
    stopping: AtomicBool,
    /// Set once the server is gone: clients stop.
    done: AtomicBool,
    /// Anything a client saw that a healthy server must never do.
    unexpected: Mutex<Vec<String>>,
}

/// How many events request `n` of client `c` holds: a mix of single events and ~50.
fn request_size(c: u64, n: u64) -> u64 {
    match (n + c) % 4 {
        0 | 3 => 1,
        _ => 40 + (n * 7 + c) % 21,
    }
}

const TYPES: [&str; 4] = ["crash.one", "agent.tool_call", "audit", "net/conn:open"];

fn event_value(round: u64, c: u64, n: u64, i: u64, k: u64) -> Value {
    let mut e = json!({
        "type": TYPES[((n + i) % 4) as usize],
        "data": {"r": round, "c": c, "n": n, "i": i, "k": k, "pad": "x".repeat(((n * 13 + i) % 40) as usize)},
    });
    if !i.is_multiple_of(3) {
        e["source"] = json!(format!("client-{c}"));
    }
    if (n + i).is_multiple_of(5) {
        e["timestamp"] = json!("2026-03-19T10:00:00.5+02:00");
    }
    e
}

/// The body and content type of request `n` of client `c`.
fn request_body(round: u64, c: u64, n: u64) -> (&'static str, String) {
    let k = request_size(c, n);
    let events: Vec<Value> = (0..k).map(|i| event_value(round, c, n, i, k)).collect();
    match (n + c) % 4 {
        // One event object.
        0 => ("application/json", events[0].to_string()),
        // {"events": [...]}.
        1 => ("application/json", json!({ "events": events }).to_string()),
        // NDJSON, with a blank line in the middle and at the end (ignored).
        2 | 3 => {
            let mut body = String::new();
            for (i, e) in events.iter().enumerate() {
                body.push_str(&e.to_string());
                body.push('\n');
                if i == events.len() / 2 {
                    body.push('\n');
                }
            }
            ("application/x-ndjson", body)
        }
        _ => unreachable!(),
    }
}

fn client_loop(url: String, token: String, round: u64, c: u64, shared: Arc<Shared>) {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    for n in 0..MAX_REQUESTS_PER_CLIENT {
        if shared.done.load(Ordering::SeqCst) {
            return;
        }
        let k = request_size(c, n);
        let (content_type, body) = request_body(round, c, n);
        let result = http
            .post(format!("{url}/v1/events"))
            .bearer_auth(&token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .and_then(|r| {
                let status = r.status().as_u16();
                r.text().map(|t| (status, t))
            });
        let stopping = shared.stopping.load(Ordering::SeqCst);
        match result {
            Ok((201, text)) => {
                // A 201 whose body is cut short is not an acknowledgement we can use.
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    if !stopping {
                        shared
                            .unexpected
                            .lock()
                            .unwrap()
                            .push(format!("client {c} request {n}: 201 with body {text:?}"));
                    }
                    return;
                };
                let d = &v["data"];
                let ids: Vec<String> = d["ids"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| x.as_str().unwrap_or_default().to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                let ack = Ack {
                    round,
                    client: c,
                    n,
                    ids,
                    first_seq: d["first_seq"].as_u64().unwrap_or(0),
                    last_seq: d["last_seq"].as_u64().unwrap_or(0),
                };
                if ack.ids.len() as u64 != k
                    || d["ingested"].as_u64() != Some(k)
                    || ack.last_seq + 1 != ack.first_seq + k
                    || d["head"]["seq"].as_u64().unwrap_or(0) < ack.last_seq
                {
                    shared
                        .unexpected
                        .lock()
                        .unwrap()
                        .push(format!("client {c} request {n} ({k} events): bad 201 {v}"));
                }
                shared.acks.lock().unwrap().push(ack);
                shared.ack_count.fetch_add(1, Ordering::SeqCst);
            }
            Ok((status, text)) => {
                if !stopping {
                    shared
                        .unexpected
                        .lock()
                        .unwrap()
                        .push(format!("client {c} request {n}: status {status}: {text}"));
                }
                return;
            }
            Err(e) => {
                if !stopping {
                    shared
                        .unexpected
                        .lock()
                        .unwrap()
                        .push(format!("client {c} request {n}: {e}"));
                }
                return;
            }
        }
    }
}

fn spawn_clients(s: &Server, round: u64, shared: &Arc<Shared>) -> Vec<std::thread::JoinHandle<()>> {
    (0..CLIENTS as u64)
        .map(|c| {
            let url = s.url("");
            let token = s.token.clone();
            let shared = shared.clone();
            std::thread::spawn(move || client_loop(url, token, round, c, shared))
        })
        .collect()
}

fn join_clients(handles: Vec<std::thread::JoinHandle<()>>, shared: &Shared) {
    for h in handles {
        h.join().expect("client thread panicked");
    }
    let unexpected = shared.unexpected.lock().unwrap();
    assert!(
        unexpected.is_empty(),
        "clients saw failures while the server was healthy:\n{}",
        unexpected.join("\n")
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(bytes);
    hex::encode(h.finalize())
}

/// A parsed export line.
struct Line {
    seq: u64,
    id: String,
    hash: String,
    prev_hash: String,
    data: Value,
}

/// Checks the whole log of a freshly (re)started server against everything acknowledged
/// so far, and that `previous` (the log as checked after the last restart) is an
/// unchanged prefix of it. Returns the export lines.
fn check_log(s: &Server, acks: &[Ack], previous: &[String], what: &str) -> Vec<String> {
    let lines = s.export_lines();
    let head = s.head();
    assert_eq!(
        head["seq"].as_u64(),
        Some(lines.len() as u64),
        "{what}: head {head} vs {} exported events",
        lines.len()
    );
    assert!(
        lines.len() >= previous.len(),
        "{what}: the log shrank from {} to {} events",
        previous.len(),
        lines.len()
    );
    for (i, (old, new)) in previous.iter().zip(&lines).enumerate() {
        assert_eq!(old, new, "{what}: event at seq {} changed", i + 1);
    }

    // The chain, re-derived from the bytes: seq 1..head without holes, prev_hash links,
    // hash = SHA-256(0x00 ‖ line without its hash member), ids strictly increasing.
    let mut parsed: Vec<Line> = Vec::with_capacity(lines.len());
    for (i, text) in lines.iter().enumerate() {
        let v: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{what}: export line {} is not JSON ({e}): {text}", i + 1));
        let line = Line {
            seq: v["seq"].as_u64().unwrap_or(0),
            id: v["id"].as_str().unwrap_or_default().to_string(),
            hash: v["hash"].as_str().unwrap_or_default().to_string(),
            prev_hash: v["prev_hash"].as_str().unwrap_or_default().to_string(),
            data: v["data"].clone(),
        };
        assert_eq!(
            line.seq,
            i as u64 + 1,
            "{what}: hole or reorder at line {}",
            i + 1
        );
        assert_eq!(
            line.id.len(),
            26,
            "{what}: bad id at seq {}: {text}",
            line.seq
        );
        let expected_prev = parsed.last().map_or(ZERO_HASH, |p| p.hash.as_str());
        assert_eq!(
            line.prev_hash, expected_prev,
            "{what}: prev_hash broken at seq {}",
            line.seq
        );
        if let Some(p) = parsed.last() {
            assert!(
                line.id > p.id,
                "{what}: id at seq {} ({}) is not above the previous id ({})",
                line.seq,
                line.id,
                p.id
            );
        }
        let member = format!("\"hash\":\"{}\",", line.hash);
        assert_eq!(
            text.matches(&member).count(),
            1,
            "{what}: seq {}: {text}",
            line.seq
        );
        let record = text.replacen(&member, "", 1);
        assert_eq!(
            sha256_hex(record.as_bytes()),
            line.hash,
            "{what}: hash does not match the record at seq {}",
            line.seq
        );
        parsed.push(line);
    }
    if let Some(last) = parsed.last() {
        assert_eq!(head["hash"], json!(last.hash), "{what}: head hash");
        assert_eq!(head["id"], json!(last.id), "{what}: head id");
    } else {
        assert_eq!(head["hash"], json!(ZERO_HASH), "{what}: empty head hash");
    }

    // Requests are atomic, also across a crash: the events of one request are all
    // there, contiguous and in order, or none is; no request appears twice.
    let mut i = 0;
    let mut seen: HashMap<(u64, u64, u64), u64> = HashMap::new();
    while i < parsed.len() {
        let d = &parsed[i].data;
        let key = (
            d["r"].as_u64().expect("r"),
            d["c"].as_u64().expect("c"),
            d["n"].as_u64().expect("n"),
        );
        let k = d["k"].as_u64().expect("k");
        assert_eq!(
            k,
            request_size(key.1, key.2),
            "{what}: seq {}: size of request {key:?}",
            parsed[i].seq
        );
        assert!(
            seen.insert(key, parsed[i].seq).is_none(),
            "{what}: request {key:?} appears twice (again at seq {})",
            parsed[i].seq
        );
        for j in 0..k {
            let e = parsed.get(i + j as usize).unwrap_or_else(|| {
                panic!(
                    "{what}: request {key:?} is cut short: only {j} of its {k} events are in the log"
                )
            });
            let got = (
                e.data["r"].as_u64(),
                e.data["c"].as_u64(),
                e.data["n"].as_u64(),
                e.data["i"].as_u64(),
            );
            assert_eq!(
                got,
                (Some(key.0), Some(key.1), Some(key.2), Some(j)),
                "{what}: seq {}: request {key:?} is not contiguous and complete",
                e.seq
            );
        }
        i += k as usize;
    }

    // Every acknowledged event is present, at its acknowledged seq, with its id.
    for ack in acks {
        assert!(
            ack.last_seq as usize <= parsed.len(),
            "{what}: acknowledged seqs {}..={} (round {}, client {}, request {}) are past the head {}",
            ack.first_seq,
            ack.last_seq,
            ack.round,
            ack.client,
            ack.n,
            parsed.len()
        );
        for (j, id) in ack.ids.iter().enumerate() {
            let e = &parsed[ack.first_seq as usize - 1 + j];
            assert_eq!(
                (
                    &e.id,
                    e.data["r"].as_u64(),
                    e.data["c"].as_u64(),
                    e.data["n"].as_u64(),
                    e.data["i"].as_u64()
                ),
                (
                    id,
                    Some(ack.round),
                    Some(ack.client),
                    Some(ack.n),
                    Some(j as u64)
                ),
                "{what}: acknowledged event at seq {} is not the one acknowledged",
                e.seq
            );
        }
    }
    // The point lookup serves the same bytes for acknowledged ids (first and last of
    // each acknowledged request of the latest round, one per request before).
    let latest = acks.iter().map(|a| a.round).max();
    for ack in acks {
        let mut probe = vec![0];
        if Some(ack.round) == latest && ack.ids.len() > 1 {
            probe.push(ack.ids.len() - 1);
        }
        for j in probe {
            let (status, body) = s.get_text(&format!("/v1/events/{}", ack.ids[j]));
            assert_eq!(
                status, 200,
                "{what}: GET of acknowledged {}: {body}",
                ack.ids[j]
            );
            assert_eq!(
                body,
                format!("{{\"data\":{}}}", lines[ack.first_seq as usize - 1 + j]),
                "{what}: GET /v1/events/{}",
                ack.ids[j]
            );
        }
    }

    let (status, v) = s.get("/v1/verify");
    assert_eq!(status, 200, "{what}: {v}");
    assert_eq!(v["data"]["ok"], json!(true), "{what}: server verify: {v}");
    assert_eq!(
        v["data"]["checked"].as_u64(),
        Some(lines.len() as u64),
        "{what}: {v}"
    );
    lines
}

fn crash_rounds() -> u64 {
    std::env::var("CAIRN_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(20)
}

/// Reads a stream from `since` until the server goes away; returns (seq, hash) of every
/// event it delivered.
fn stream_until_gone(url: String, token: String, since: String) -> Vec<(u64, String)> {
    use std::io::BufRead;
    let http = reqwest::blocking::Client::builder()
        .timeout(None::<Duration>)
        .build()
        .expect("client");
    let Ok(response) = http
        .get(format!("{url}/v1/events/stream?since={since}"))
        .bearer_auth(token)
        .send()
    else {
        return Vec::new();
    };
    let mut got = Vec::new();
    for line in std::io::BufReader::new(response).lines() {
        let Ok(line) = line else { break };
        if let Some(data) = line.strip_prefix("data: ")
            && let Ok(e) = serde_json::from_str::<Value>(data)
            && let (Some(seq), Some(hash)) = (e["seq"].as_u64(), e["hash"].as_str())
        {
            got.push((seq, hash.to_string()));
        }
    }
    got
}

/// `cairn verify --data` on a stopped server's directory, pinned to `head_hash`.
fn offline_verify(data: &Path, head_hash: &str) {
    let dir = data.to_str().expect("utf-8 path");
    let (code, out, err) =
        common::cairn(&["verify", "--data", dir, "--expect-head", head_hash], &[]);
    assert_eq!(code, 0, "cairn verify --data: {out}{err}");
    let wrong = if head_hash.starts_with('0') {
        head_hash.replacen('0', "1", 1)
    } else {
        format!("0{}", &head_hash[1..])
    };
    let (code, out, err) = common::cairn(&["verify", "--data", dir, "--expect-head", &wrong], &[]);
    assert_ne!(code, 0, "a wrong --expect-head must fail: {out}{err}");
}

#[test]
fn sigkill_during_concurrent_ingest_loses_no_acknowledged_event() {
    let rounds = crash_rounds();
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut acks: Vec<Ack> = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    let mut token = String::new();
    let mut streamed_per_round: Vec<(u64, Vec<(u64, String)>)> = Vec::new();

    for round in 0..rounds {
        let mut s = Server::start_on(&data, &[]);
        if round == 0 {
            token = s.token.clone();
            assert!(!token.is_empty(), "no admin token was created");
        }
        assert_eq!(s.token, token, "the admin token file changed");
        lines = check_log(&s, &acks, &lines, &format!("after restart {round}"));
        let start_head = lines.len() as u64;
        let last_id_before = lines.last().map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        });

        let since = last_id_before
            .clone()
            .unwrap_or_else(|| "00000000000000000000000000".into());
        let streamer = {
            let (url, token) = (s.url(""), s.token.clone());
            std::thread::spawn(move || stream_until_gone(url, token, since))
        };
        let shared = Arc::new(Shared::default());
        let handles = spawn_clients(&s, round, &shared);
        // Vary the moment of the kill from round to round.
        let target = 25 + (round as usize * 17) % 30;
        wait_until(
            Duration::from_secs(30),
            &format!("{target} acknowledged requests in round {round}"),
            || shared.ack_count.load(Ordering::SeqCst) >= target,
        );
        shared.stopping.store(true, Ordering::SeqCst);
        s.kill();
        shared.done.store(true, Ordering::SeqCst);
        join_clients(handles, &shared);
        let streamed = streamer.join().expect("streamer");

        let round_acks = std::mem::take(&mut *shared.acks.lock().unwrap());
        assert!(round_acks.len() >= target, "round {round}: acks");
        let mut ranges: Vec<(u64, u64)> = round_acks
            .iter()
            .map(|a| (a.first_seq, a.last_seq))
            .collect();
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            assert!(
                w[0].1 < w[1].0,
                "round {round}: acknowledged ranges overlap: {w:?}"
            );
        }
        for a in &round_acks {
            // The head continues from the previous round; ids continue above it.
            assert!(
                a.first_seq > start_head,
                "round {round}: acknowledged seq {} is not after the head {start_head} at restart",
                a.first_seq
            );
            if let Some(prev) = &last_id_before {
                assert!(
                    a.ids[0] > *prev,
                    "round {round}: id {} not above the last id {prev} before the restart",
                    a.ids[0]
                );
            }
        }
        eprintln!(
            "round {round}: {} acknowledged requests ({} events), head at restart {start_head}",
            round_acks.len(),
            round_acks.iter().map(|a| a.ids.len()).sum::<usize>()
        );
        acks.extend(round_acks);
        streamed_per_round.push((start_head, streamed));
    }

    // Recovery after the last kill, then a clean stop and the offline check.
    let mut s = Server::start_on(&data, &[]);
    lines = check_log(&s, &acks, &lines, "after the last restart");
    // What each round's stream delivered before its kill: contiguous from that round's
    // head, and in the log with the same hash (nothing served was taken back).
    let mut streamed_total = 0;
    for (round, (start_head, streamed)) in streamed_per_round.iter().enumerate() {
        for (i, (seq, hash)) in streamed.iter().enumerate() {
            assert_eq!(
                *seq,
                start_head + 1 + i as u64,
                "round {round}: stream gap or repeat"
            );
            let line: Value = serde_json::from_str(&lines[*seq as usize - 1]).expect("line");
            assert_eq!(
                line["hash"],
                hash.as_str(),
                "round {round}: seq {seq} changed after the crash"
            );
        }
        streamed_total += streamed.len();
    }
    assert!(streamed_total > 0, "the streams delivered nothing");
    let head = s.head();
    let status = s.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    offline_verify(&data, head["hash"].as_str().expect("head hash"));
    eprintln!(
        "{rounds} SIGKILL rounds: {} acknowledged requests, {} acknowledged events, {} events in the log, {streamed_total} streamed, {:?}",
        acks.len(),
        acks.iter().map(|a| a.ids.len()).sum::<usize>(),
        lines.len(),
        started.elapsed()
    );
}

#[test]
fn sigterm_during_concurrent_ingest_keeps_every_acknowledged_event() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut s = Server::start_on(&data, &[]);
    let shared = Arc::new(Shared::default());
    let handles = spawn_clients(&s, 0, &shared);
    wait_until(Duration::from_secs(30), "30 acknowledged requests", || {
        shared.ack_count.load(Ordering::SeqCst) >= 30
    });
    shared.stopping.store(true, Ordering::SeqCst);
    let status = s.terminate();
    shared.done.store(true, Ordering::SeqCst);
    join_clients(handles, &shared);
    assert!(
        status.success(),
        "exit status after SIGTERM during ingest: {status:?}\n{}",
        s.log.lock().unwrap()
    );

    let acks = std::mem::take(&mut *shared.acks.lock().unwrap());
    assert!(acks.len() >= 30);
    let mut s = Server::start_on(&data, &[]);
    let lines = check_log(&s, &acks, &[], "after SIGTERM");
    let head = s.head();
    let status = s.terminate();
    assert!(
        status.success(),
        "exit status of an idle server: {status:?}"
    );
    offline_verify(&data, head["hash"].as_str().expect("head hash"));
    eprintln!(
        "SIGTERM: {} acknowledged requests ({} events), {} events in the log",
        acks.len(),
        acks.iter().map(|a| a.ids.len()).sum::<usize>(),
        lines.len()
    );
}
