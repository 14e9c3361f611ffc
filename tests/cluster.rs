//! Cluster mode (SPEC §6) against real `nats-server` processes (a three-server JetStream
//! cluster on loopback) and real `cairn serve --nats` nodes.
//!
//! Skipped (with a line saying so) where `nats-server` is not installed; `.ci/run`
//! installs Debian's package and requires them.

mod common;

use std::time::{Duration, Instant};

use common::nats::{NatsCluster, missing};
use common::{Server, wait_until};
use serde_json::{Value, json};

/// The flags of a node named `name` on `nats`.
fn node_args(nats: &NatsCluster, name: &str) -> Vec<String> {
    ["--nats", &nats.urls(), "--node", name, "--nats-lease", "2"]
        .map(str::to_string)
        .to_vec()
}

/// A cairn node on `nats`, on a fresh data directory. The cluster's first node creates
/// the admin token (its file); a later node creates none and takes the checkpoint key
/// and the tokens from the cluster, so it is driven with the first node's token.
fn node(nats: &NatsCluster, name: &str, first: Option<&Server>) -> Server {
    let data = tempfile::tempdir().expect("tempdir").keep().join("data");
    let args = node_args(nats, name);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::start_on(&data, &args);
    if let Some(first) = first {
        assert!(
            !data.join("admin.token").exists(),
            "a later node created an admin token of its own:\n{}",
            server.log_text()
        );
        server.token = first.token.clone();
    }
    server
}

fn post(server: &Server, body: &Value, key: Option<&str>) -> (u16, Value) {
    let mut request = server
        .http()
        .post(server.url("/v1/events"))
        .bearer_auth(&server.token)
        .header("Content-Type", "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        request = request.header("Idempotency-Key", k);
    }
    match request.send() {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

fn batch(tag: &str, n: usize) -> Value {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({"type": "cluster.test", "source": tag, "data": {"i": i}}))
        .collect();
    json!({ "events": events })
}

fn head_seq(server: &Server) -> u64 {
    server.head()["seq"].as_u64().unwrap_or(0)
}

/// Every node serves the same export, byte for byte, and it is a verified chain.
fn assert_same_log(nodes: &[&Server], expected_events: u64) {
    for n in nodes {
        wait_until(
            Duration::from_secs(20),
            "every node to apply the log",
            || head_seq(n) == expected_events,
        );
    }
    let first = nodes[0].export_lines();
    assert_eq!(first.len() as u64, expected_events);
    for (i, line) in first.iter().enumerate() {
        let event: Value = serde_json::from_str(line).expect("event json");
        assert_eq!(
            event["seq"].as_u64(),
            Some(i as u64 + 1),
            "seqs are contiguous"
        );
    }
    for n in &nodes[1..] {
        assert_eq!(n.export_lines(), first, "exports are byte-identical");
    }
    for n in nodes {
        let (status, verify) = n.get("/v1/verify");
        assert_eq!(status, 200, "{verify}");
        assert_eq!(verify["data"]["ok"], true, "{verify}");
    }
}

#[test]
fn three_nodes_serve_one_log_and_a_new_node_catches_up() {
    if missing() {
        return;
    }
    let nats = NatsCluster::start(3);
    let a = node(&nats, "a", None);
    let b = node(&nats, "b", Some(&a));
    let c = node(&nats, "c", Some(&a));
    let nodes = [&a, &b, &c];

    // Concurrent ingest spread over the three nodes.
    let acknowledged: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(w, n)| {
                scope.spawn(move || {
                    let mut acked = 0;
                    for r in 0..20 {
                        let (status, body) = post(n, &batch(&format!("w{w}"), 10), None);
                        assert_eq!(status, 201, "request {r} on node {w}: {body}");
                        acked += body["data"]["ingested"].as_u64().unwrap_or(0);
                    }
                    acked
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("worker")).sum()
    });
    assert_eq!(acknowledged, 600);

    // An Idempotency-Key retried on another node gets the first answer, appends nothing.
    let (status, first) = post(&a, &batch("idem", 3), Some("key-1"));
    assert_eq!(status, 201, "{first}");
    let (status, again) = post(&c, &batch("idem", 3), Some("key-1"));
    assert_eq!(status, 201, "{again}");
    assert_eq!(again["data"]["first_seq"], first["data"]["first_seq"]);
    assert_eq!(again["data"]["last_seq"], first["data"]["last_seq"]);
    let (status, reused) = post(&b, &batch("other", 1), Some("key-1"));
    assert_eq!(status, 422, "{reused}");

    // The answering node serves what it acknowledged at once.
    let (status, fresh) = post(&b, &batch("fresh", 1), None);
    assert_eq!(status, 201, "{fresh}");
    let id = fresh["data"]["ids"][0].as_str().expect("id").to_string();
    let (status, got) = b.get(&format!("/v1/events/{id}"));
    assert_eq!(status, 200, "{got}");

    let total = 604;
    assert_same_log(&nodes, total);

    // Equal checkpoints at equal sizes (one key, deterministic signatures).
    wait_until(
        Duration::from_secs(15),
        "checkpoints of the whole log",
        || {
            nodes.iter().all(|n| {
                n.get_text("/v1/checkpoint")
                    .1
                    .lines()
                    .nth(1)
                    .is_some_and(|size| size == total.to_string())
            })
        },
    );
    let checkpoint = a.get_text("/v1/checkpoint").1;
    for n in &nodes[1..] {
        assert_eq!(n.get_text("/v1/checkpoint").1, checkpoint);
    }

    // A node started empty copies the whole log from the stream.
    let d = node(&nats, "d", Some(&a));
    assert_same_log(&[&a, &d], total);

    shared_tokens(&a, &b, &c);
}

/// A token created on one node works on every node; revoked on another, it is refused
/// everywhere and its open stream on a third node ends, within SPEC §6's 2 s.
fn shared_tokens(a: &Server, b: &Server, c: &Server) {
    let (status, created) = a.post(
        "/v1/tokens",
        "application/json",
        json!({"role": "read", "name": "dashboard"}).to_string(),
    );
    assert_eq!(status, 201, "{created}");
    let token = created["data"]["token"]
        .as_str()
        .expect("token")
        .to_string();
    let id = created["data"]["id"].as_str().expect("id").to_string();
    let status_with = |n: &Server| {
        n.http()
            .get(n.url("/v1/head"))
            .bearer_auth(&token)
            .send()
            .map_or(0, |r| r.status().as_u16())
    };
    assert_eq!(status_with(a), 200, "the creating node accepts it at once");
    wait_until(
        Duration::from_secs(2),
        "the token to work on b and c",
        || status_with(b) == 200 && status_with(c) == 200,
    );

    // An open stream on b with that token.
    let (ended_tx, ended) = std::sync::mpsc::channel();
    let (opened_tx, opened) = std::sync::mpsc::channel();
    let stream_url = b.url("/v1/events/stream");
    let stream_token = token.clone();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let http = reqwest::blocking::Client::builder()
            .timeout(None)
            .build()
            .expect("client");
        let mut response = http
            .get(stream_url)
            .bearer_auth(stream_token)
            .send()
            .expect("stream");
        let _ = opened_tx.send(response.status().as_u16());
        let mut sink = Vec::new();
        let _ = response.read_to_end(&mut sink);
        let _ = ended_tx.send(());
    });
    assert_eq!(opened.recv_timeout(Duration::from_secs(10)), Ok(200));

    let r = c
        .http()
        .delete(c.url(&format!("/v1/tokens/{id}")))
        .bearer_auth(&c.token)
        .send()
        .expect("DELETE");
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(
        ended.recv_timeout(Duration::from_secs(2)),
        Ok(()),
        "the revoked token's stream on another node was still open 2 s after DELETE"
    );
    reader.join().expect("reader");
    for n in [a, b, c] {
        assert_eq!(
            status_with(n),
            401,
            "a revoked token is refused on every node"
        );
    }
}

#[test]
fn sequencer_loss_and_nats_outage_lose_nothing_acknowledged() {
    if missing() {
        return;
    }
    let nats = NatsCluster::start(3);
    let mut a = node(&nats, "a", None);
    let b = node(&nats, "b", Some(&a));
    let (status, body) = post(&b, &batch("before", 5), None);
    assert_eq!(status, 201, "{body}");
    wait_until(Duration::from_secs(10), "a to apply", || head_seq(&a) == 5);
    // `a` started first and took the lease: it is the sequencer.
    assert!(
        a.log_text().contains("took the sequencer lease"),
        "{}",
        a.log_text()
    );

    // kill -9 of the sequencer: ingest on the other node succeeds again.
    let a_newest_id = a.head()["id"].as_str().expect("head id").to_string();
    a.kill();
    let started = Instant::now();
    let mut acked = 5;
    loop {
        let (status, body) = post(&b, &batch("after-kill", 2), None);
        if status == 201 {
            acked += 2;
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "ingest never resumed"
        );
    }
    eprintln!(
        "ingest resumed {:?} after the sequencer was killed",
        started.elapsed()
    );

    // Offline changes to a cluster node's directory would reach it alone: refused.
    let dir = a.data.to_str().expect("utf-8 path");
    let newest = a_newest_id.as_str();
    for args in [
        &[
            "token", "create", "--data", dir, "--role", "read", "--name", "offline",
        ][..],
        &["prune", "--data", dir, "--before", newest][..],
    ] {
        let (code, _, stderr) = common::cairn(args, &[]);
        assert_ne!(code, 0, "{args:?}");
        assert!(
            stderr.contains("is a node of the cluster stream"),
            "{args:?}: {stderr}"
        );
    }

    // Nor does a node start on another stream's copy.
    let mut other = node_args(&nats, "a");
    other.extend(["--nats-stream".to_string(), "OTHER".to_string()]);
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    let refused = Server::launch(&a.data, &other, &[])
        .err()
        .expect("refused to start");
    assert!(
        refused.contains("holds a copy of the cluster stream CAIRN, not OTHER"),
        "{refused}"
    );

    // Total NATS outage: 503, never 201; reads keep working.
    for i in 0..nats.len() {
        nats.pause(i);
    }
    let (status, body) = post(&b, &batch("outage", 1), Some("outage-key"));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "unavailable");
    let (status, _) = b.get("/v1/events");
    assert_eq!(status, 200);
    for i in 0..nats.len() {
        nats.resume(i);
    }
    // The ambiguous request, retried with its key, is answered exactly once.
    let retried = loop {
        let (status, body) = post(&b, &batch("outage", 1), Some("outage-key"));
        if status == 201 {
            break body;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "ingest never recovered"
        );
    };
    acked += 1;
    assert_eq!(
        retried["data"]["last_seq"].as_u64(),
        Some(acked),
        "{retried}"
    );

    // The killed node comes back and catches up.
    let args = node_args(&nats, "a");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a2 = Server::start_on(&a.data, &args);
    assert_same_log(&[&a2, &b], acked);
}
