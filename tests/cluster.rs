//! Cluster mode (SPEC §6) against real `nats-server` processes (a three-server JetStream
//! cluster on loopback) and real `cairn serve --nats` nodes.
//!
//! Skipped (with a line saying so) where `nats-server` is not installed; `.ci/run`
//! installs Debian's package and requires them.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    node_with(nats, name, first, &[])
}

fn node_with(nats: &NatsCluster, name: &str, first: Option<&Server>, extra: &[&str]) -> Server {
    let data = tempfile::tempdir().expect("tempdir").keep().join("data");
    let mut args = node_args(nats, name);
    args.extend(extra.iter().map(|a| a.to_string()));
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
    let head = nodes[0].head();
    let newest: Value = serde_json::from_str(first.last().expect("events")).expect("json");
    for member in ["seq", "id", "hash", "timestamp"] {
        assert_eq!(
            head[member], newest[member],
            "the head is the newest event's"
        );
    }
    for n in &nodes[1..] {
        assert_eq!(n.export_lines(), first, "exports are byte-identical");
        assert_eq!(
            n.head(),
            head,
            "heads (seq, id, hash, timestamp) are the same"
        );
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

    // The same key sent to two nodes at once: the sequencer seals groups ahead of its
    // own copy, so the second request may come in the group after the first, before
    // that one is stored anywhere. Either way the key appends once.
    for round in 0..30 {
        let key = format!("race-{round}");
        let (from_a, from_c) = std::thread::scope(|scope| {
            let a_post = scope.spawn(|| post(&a, &batch("race", 1), Some(&key)));
            let c_post = scope.spawn(|| post(&c, &batch("race", 1), Some(&key)));
            (
                a_post.join().expect("post on a"),
                c_post.join().expect("post on c"),
            )
        });
        assert_eq!(from_a.0, 201, "{}", from_a.1);
        assert_eq!(from_c.0, 201, "{}", from_c.1);
        assert_eq!(
            from_a.1["data"]["first_seq"], from_c.1["data"]["first_seq"],
            "round {round}: one key, two appends"
        );
    }

    // The answering node serves what it acknowledged at once.
    let (status, fresh) = post(&b, &batch("fresh", 1), None);
    assert_eq!(status, 201, "{fresh}");
    let id = fresh["data"]["ids"][0].as_str().expect("id").to_string();
    let (status, got) = b.get(&format!("/v1/events/{id}"));
    assert_eq!(status, 200, "{got}");

    let total = 634;
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

    // A node started empty copies the whole log from the stream; `/healthz` reports it
    // ready only once it has.
    let d = node(&nats, "d", Some(&a));
    assert_same_log(&[&a, &d], total);
    for (n, name) in [(&a, "a"), (&b, "b"), (&c, "c"), (&d, "d")] {
        let (status, health) = n.get("/healthz");
        assert_eq!(status, 200, "{health}");
        assert_eq!(health["status"], "ok");
        let view = &health["cluster"];
        assert_eq!(view["node"], name, "{health}");
        assert_eq!(view["ready"], true, "{health}");
        assert_eq!(view["applied_seq"], total, "{health}");
    }
    let sequencers = [&a, &b, &c, &d]
        .iter()
        .filter(|n| n.get("/healthz").1["cluster"]["role"] == "sequencer")
        .count();
    assert_eq!(sequencers, 1);
    // `/metrics` says the same (its gauges are refreshed with the head, every second).
    wait_until(Duration::from_secs(5), "the cluster gauges", || {
        let nodes = [&a, &b, &c, &d];
        nodes
            .iter()
            .all(|n| n.metric("cairn_cluster_applied_seq") == total as f64)
            && nodes
                .iter()
                .map(|n| n.metric("cairn_cluster_sequencer"))
                .sum::<f64>()
                == 1.0
    });

    // A stream resumed on a node whose copy is behind the cursor waits for it (SPEC §6).
    let behind = signal_guard(&c);
    let (status, appended) = post(&a, &batch("while-c-paused", 50), None);
    assert_eq!(status, 201, "{appended}");
    let ids: Vec<&str> = appended["data"]["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    drop(behind);
    let (connected, first) = first_frames(&c, ids[24]);
    assert_eq!(connected["cursor"], ids[24], "{connected}");
    assert!(
        connected["head"]["seq"].as_u64() >= Some(total + 25),
        "the connected frame's head does not cover the cursor: {connected}"
    );
    assert_eq!(first["id"], ids[25], "{first}");
    let total = total + 50;
    assert_same_log(&[&a, &c], total);

    shared_tokens(&a, &b, &c);
}

/// SIGSTOPs `server` until dropped (SIGCONT).
fn signal_guard(server: &Server) -> impl Drop + '_ {
    struct Paused<'a>(&'a Server);
    impl Drop for Paused<'_> {
        fn drop(&mut self) {
            signal(self.0, "-CONT");
        }
    }
    signal(server, "-STOP");
    Paused(server)
}

/// Opens an SSE stream on `server` resuming after `last_event_id`: its `connected` data
/// and its first event.
fn first_frames(server: &Server, last_event_id: &str) -> (Value, Value) {
    use std::io::BufRead;
    let response = server
        .http()
        .get(server.url("/v1/events/stream"))
        .bearer_auth(&server.token)
        .header("Last-Event-ID", last_event_id)
        .send()
        .expect("stream");
    assert_eq!(response.status().as_u16(), 200);
    let mut connected = None;
    let mut event = String::new();
    for line in std::io::BufReader::new(response).lines() {
        let line = line.expect("stream line");
        if let Some(name) = line.strip_prefix("event: ") {
            event = name.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            let data: Value = serde_json::from_str(data).expect("data json");
            if event != "connected" {
                return (connected.expect("connected before events"), data);
            }
            connected = Some(data);
        }
    }
    panic!("the stream ended before an event");
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

    // Nor with a signing key other than the cluster's, nor on other stream settings.
    let foreign = tempfile::tempdir().expect("tempdir").keep();
    let mut standalone = Server::start_on(&foreign.join("single"), &[]);
    standalone.kill();
    let stranger = foreign.join("stranger");
    std::fs::create_dir_all(&stranger).expect("dir");
    std::fs::copy(
        foreign.join("single").join("checkpoint.key"),
        stranger.join("checkpoint.key"),
    )
    .expect("copy the key");
    let args = node_args(&nats, "stranger");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let refused = Server::launch(&stranger, &args, &[])
        .err()
        .expect("refused to start");
    assert!(
        refused.contains("holds another signing key than the cluster's"),
        "{refused}"
    );
    let mut one_replica = node_args(&nats, "d");
    one_replica.extend(["--nats-replicas".to_string(), "1".to_string()]);
    let one_replica: Vec<&str> = one_replica.iter().map(String::as_str).collect();
    let refused = Server::launch(&foreign.join("d"), &one_replica, &[])
        .err()
        .expect("refused to start");
    assert!(
        refused.contains("exists with other settings (3 replicas)"),
        "{refused}"
    );

    // A request larger than a NATS message: 413, and nothing appended.
    let big: Vec<Value> = (0..600)
        .map(|i| json!({"type": "cluster.big", "data": {"i": i, "pad": "x".repeat(2000)}}))
        .collect();
    let (status, body) = post(&b, &json!({ "events": big }), None);
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "payload_too_large", "{body}");
    assert_eq!(head_seq(&b), acked);

    // Total NATS outage: 503 with Retry-After, never 201; reads keep working.
    for i in 0..nats.len() {
        nats.pause(i);
    }
    let outage = b
        .http()
        .post(b.url("/v1/events"))
        .bearer_auth(&b.token)
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", "outage-key")
        .body(batch("outage", 1).to_string())
        .send()
        .expect("POST during the outage");
    assert_eq!(outage.status().as_u16(), 503);
    assert!(outage.headers().contains_key("retry-after"));
    let body: Value = outage.json().expect("error body");
    assert_eq!(body["code"], "unavailable", "{body}");
    let (status, _) = b.get("/v1/events");
    assert_eq!(status, 200);
    // Tokens are shared state: not created where the cluster cannot hear of it.
    let (status, body) = b.post(
        "/v1/tokens",
        "application/json",
        json!({"role": "read", "name": "during-outage"}).to_string(),
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "unavailable", "{body}");
    // `/healthz` says so (503 `unavailable`) while the node keeps serving what it has.
    wait_until(
        Duration::from_secs(10),
        "/healthz to report the outage",
        || {
            let (status, health) = b.get("/healthz");
            status == 503
                && health["status"] == "unavailable"
                && health["cluster"]["ready"] == false
        },
    );
    for i in 0..nats.len() {
        nats.resume(i);
    }
    wait_until(Duration::from_secs(30), "/healthz to recover", || {
        b.get("/healthz").0 == 200
    });
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

/// Ingest from `workers` threads until stopped: each request a batch of [`PER_REQUEST`]
/// events carrying its own Idempotency-Key, sent to the nodes in turn, and retried with
/// the same key (on the next node) until acknowledged, as a careful client does.
struct Ingest {
    stop: Arc<AtomicBool>,
    workers: Vec<std::thread::JoinHandle<Result<Vec<String>, String>>>,
}

const PER_REQUEST: usize = 5;

impl Ingest {
    fn start(bases: &[String], token: &str, workers: usize) -> Ingest {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|w| {
                let bases = bases.to_vec();
                let token = token.to_string();
                let stop = stop.clone();
                std::thread::spawn(move || ingest_worker(w, &bases, &token, &stop))
            })
            .collect();
        Ingest { stop, workers }
    }

    /// Stops after the requests in flight are acknowledged; every acknowledged key.
    fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut keys = Vec::new();
        for w in self.workers {
            match w.join().expect("ingest worker") {
                Ok(k) => keys.extend(k),
                Err(e) => panic!("{e}"),
            }
        }
        keys
    }
}

fn ingest_worker(
    w: usize,
    bases: &[String],
    token: &str,
    stop: &AtomicBool,
) -> Result<Vec<String>, String> {
    // Short enough that a frozen node costs a retry elsewhere, not the test.
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let mut acked = Vec::new();
    let mut next_node = w;
    for r in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let key = format!("w{w}-{r}");
        let events: Vec<Value> = (0..PER_REQUEST)
            .map(|i| json!({"type": "cluster.ingest", "source": "writer", "data": {"key": key, "i": i}}))
            .collect();
        let body = json!({ "events": events }).to_string();
        let started = Instant::now();
        loop {
            let base = &bases[next_node % bases.len()];
            next_node += 1;
            let answer = http
                .post(format!("{base}/v1/events"))
                .bearer_auth(token)
                .header("Content-Type", "application/json")
                .header("Idempotency-Key", &key)
                .body(body.clone())
                .send();
            match answer.map(|a| a.status().as_u16()) {
                Ok(201) => break,
                Ok(503) | Err(_) => {}
                Ok(other) => return Err(format!("{key} on {base}: HTTP {other}")),
            }
            if started.elapsed() > Duration::from_secs(90) {
                return Err(format!("{key} was never acknowledged"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        acked.push(key);
    }
    Ok(acked)
}

/// Posts one event with `key` to `server` until acknowledged, as a client that gives a
/// request 3 s before retrying it (with the same key); how long that took.
fn time_until_ingest(server: &Server, key: &str) -> Duration {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("client");
    let started = Instant::now();
    loop {
        let answer = http
            .post(server.url("/v1/events"))
            .bearer_auth(&server.token)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", key)
            .body(batch(key, 1).to_string())
            .send()
            .map(|r| (r.status().as_u16(), r.text().unwrap_or_default()));
        match answer {
            Ok((201, _)) => return started.elapsed(),
            Ok((503, _)) | Err(_) => {}
            Ok((other, body)) => panic!(
                "{key}: HTTP {other}: {body}\nthe node's log:\n{}",
                server.log_text()
            ),
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{key}: ingest did not resume within 60 s; the node's log:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A stream client that follows one node, and when that node dies resumes on the next
/// with the last id it received, until it has received `target`. Returns every event
/// line received, in order. `sse` picks the transport (else WebSocket).
fn follower(
    sse: bool,
    bases: Vec<String>,
    token: String,
    target: Arc<std::sync::Mutex<Option<String>>>,
    connected: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<Result<Vec<String>, String>> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async move {
            let mut lines: Vec<String> = Vec::new();
            let mut node = 0;
            let started = Instant::now();
            let mut connected = Some(connected);
            loop {
                if started.elapsed() > Duration::from_secs(180) {
                    return Err(format!("never reached the target; got {}", lines.len()));
                }
                let last = lines.last().map(|l| event_id(l));
                let outcome = if sse {
                    follow_sse(
                        &bases[node],
                        &token,
                        last.as_deref(),
                        &mut lines,
                        &target,
                        &mut connected,
                    )
                    .await
                } else {
                    follow_ws(
                        &bases[node],
                        &token,
                        last.as_deref(),
                        &mut lines,
                        &target,
                        &mut connected,
                    )
                    .await
                };
                match outcome {
                    Followed::Done => return Ok(lines),
                    // The node is gone: the next one. Ended or refused (503): again.
                    Followed::Refused if node + 1 < bases.len() => node += 1,
                    Followed::Refused | Followed::Ended => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        })
    })
}

enum Followed {
    /// Received `target`.
    Done,
    /// The connection was refused (the node is down).
    Refused,
    /// The stream ended, or was answered with an error such as 503.
    Ended,
}

fn event_id(line: &str) -> String {
    let event: Value = serde_json::from_str(line).expect("event line");
    event["id"].as_str().expect("id").to_string()
}

fn reached(lines: &[String], target: &std::sync::Mutex<Option<String>>) -> bool {
    let target = target.lock().expect("target").clone();
    target.is_some() && lines.last().map(|l| event_id(l)) == target
}

async fn follow_sse(
    base: &str,
    token: &str,
    last: Option<&str>,
    lines: &mut Vec<String>,
    target: &std::sync::Mutex<Option<String>>,
    connected: &mut Option<std::sync::mpsc::Sender<()>>,
) -> Followed {
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;
    let http = reqwest::Client::new();
    let mut request = http
        .get(format!("{base}/v1/events/stream"))
        .bearer_auth(token);
    if let Some(id) = last {
        request = request.header("Last-Event-ID", id);
    }
    let response = match request.send().await {
        Ok(r) if r.status() == 200 => r,
        Ok(_) => return Followed::Ended,
        Err(e) if e.is_connect() => return Followed::Refused,
        Err(_) => return Followed::Ended,
    };
    let mut frames = response.bytes_stream().eventsource();
    loop {
        // Heartbeats (`--heartbeat 1`) bound the wait, so the target is checked often.
        let frame = tokio::time::timeout(Duration::from_secs(5), frames.next()).await;
        match frame {
            Ok(Some(Ok(frame))) if frame.event == "connected" => {
                if let Some(tx) = connected.take() {
                    let _ = tx.send(());
                }
            }
            Ok(Some(Ok(frame))) => lines.push(frame.data),
            Ok(Some(Err(_)) | None) => return Followed::Ended,
            Err(_) => {}
        }
        if reached(lines, target) {
            return Followed::Done;
        }
    }
}

async fn follow_ws(
    base: &str,
    token: &str,
    last: Option<&str>,
    lines: &mut Vec<String>,
    target: &std::sync::Mutex<Option<String>>,
    connected: &mut Option<std::sync::mpsc::Sender<()>>,
) -> Followed {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let addr = base.trim_start_matches("http://");
    let mut url = format!("ws://{addr}/v1/events/ws?token={token}");
    if let Some(id) = last {
        url.push_str(&format!("&since={id}"));
    }
    let mut ws = match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => ws,
        Err(tokio_tungstenite::tungstenite::Error::Io(_)) => return Followed::Refused,
        Err(_) => return Followed::Ended,
    };
    loop {
        let message = tokio::time::timeout(Duration::from_secs(1), ws.next()).await;
        match message {
            Ok(Some(Ok(Message::Text(text)))) => {
                let value: Value = serde_json::from_str(&text).expect("JSON message");
                match (value["type"].as_str(), value.get("seq")) {
                    (Some("connected"), None) => {
                        if let Some(tx) = connected.take() {
                            let _ = tx.send(());
                        }
                    }
                    (Some("error"), None) => panic!("WebSocket error message: {value}"),
                    _ => lines.push(text.to_string()),
                }
            }
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(Some(Err(_)) | None) => return Followed::Ended,
        }
        if reached(lines, target) {
            return Followed::Done;
        }
    }
}

fn role(server: &Server) -> String {
    let (_, health) = server.get("/healthz");
    health["cluster"]["role"].as_str().unwrap_or("").to_string()
}

fn signal(server: &Server, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(signal)
        .arg(server.pid().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

/// SPEC §6's failures under concurrent ingest, with clients streaming: kill -9 of the
/// node they stream from (they resume on another), rounds of kill -9 of the NATS stream
/// leader, and SIGSTOP of the sequencer past its lease. Every acknowledged event is in
/// the log exactly once on every node, nothing forks, and each client ends with exactly
/// the log.
#[test]
fn failovers_under_ingest_lose_nothing_and_streams_resume_elsewhere() {
    if missing() {
        return;
    }
    let mut nats = NatsCluster::start(3);
    let heartbeat = ["--heartbeat", "1"];
    let a = node_with(&nats, "a", None, &heartbeat);
    let b = node_with(&nats, "b", Some(&a), &heartbeat);
    let mut c = node_with(&nats, "c", Some(&a), &heartbeat);
    let token = a.token.clone();
    let base = |s: &Server| s.url("");

    // Clients streaming from c, which resume on b when c dies.
    let target = Arc::new(std::sync::Mutex::new(None));
    let (connected_tx, connected) = std::sync::mpsc::channel();
    let followers: Vec<_> = [true, false]
        .into_iter()
        .map(|sse| {
            follower(
                sse,
                vec![base(&c), base(&b)],
                token.clone(),
                target.clone(),
                connected_tx.clone(),
            )
        })
        .collect();
    for _ in 0..2 {
        connected
            .recv_timeout(Duration::from_secs(10))
            .expect("both streams connected");
    }

    let ingest = Ingest::start(&[base(&a), base(&b)], &token, 3);
    wait_until(Duration::from_secs(20), "c to apply some ingest", || {
        head_seq(&c) >= 100
    });
    c.kill();

    // The NATS stream leader, killed under ingest, several rounds.
    for round in 0..3 {
        wait_until(
            Duration::from_secs(30),
            "every replica of the stream to be current",
            || nats.stream_current("CAIRN"),
        );
        let leader = nats.stream_leader("CAIRN").expect("a stream leader");
        nats.kill(leader);
        let took = time_until_ingest(&b, &format!("leader-kill-{round}"));
        eprintln!(
            "round {round}: ingest resumed {took:?} after kill -9 of the stream leader n{leader}"
        );
        nats.restart(leader);
    }

    // The sequencer frozen past its lease: another node takes over; once thawed, the old
    // one must not append on its stale head (the stream refuses it), so nothing forks.
    let (sequencer, other) = if role(&a) == "sequencer" {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(role(sequencer), "sequencer");
    signal(sequencer, "-STOP");
    let took = time_until_ingest(other, "sequencer-frozen");
    eprintln!("ingest resumed {took:?} after SIGSTOP of the sequencer");
    signal(sequencer, "-CONT");
    time_until_ingest(sequencer, "after-thaw");

    let acked = ingest.finish();
    let probes = 5;
    let total = (acked.len() * PER_REQUEST + probes) as u64;
    assert_same_log(&[&a, &b], total);

    // Every acknowledged request is in the log exactly once.
    let mut per_key = std::collections::HashMap::<String, usize>::new();
    for line in b.export_lines() {
        let event: Value = serde_json::from_str(&line).expect("event");
        if let Some(key) = event["data"]["key"].as_str() {
            *per_key.entry(key.to_string()).or_default() += 1;
        }
    }
    assert_eq!(
        per_key.len(),
        acked.len(),
        "requests in the log vs acknowledged"
    );
    for key in &acked {
        assert_eq!(per_key.get(key), Some(&PER_REQUEST), "{key}");
    }

    // One sequencer, every node ready and caught up.
    let views: Vec<Value> = [&a, &b]
        .iter()
        .map(|n| n.get("/healthz").1["cluster"].clone())
        .collect();
    assert_eq!(
        views.iter().filter(|v| v["role"] == "sequencer").count(),
        1,
        "{views:?}"
    );
    for v in &views {
        assert_eq!(v["applied_seq"], total, "{v}");
    }
    // Readiness also needs the last head read (every second) to have reached NATS,
    // which a loaded machine can miss once after the failovers.
    wait_until(Duration::from_secs(15), "both nodes ready", || {
        [&a, &b]
            .iter()
            .all(|n| n.get("/healthz").1["cluster"]["ready"] == true)
    });

    // The clients that followed c, then b, hold exactly b's log.
    *target.lock().expect("target") = Some(b.head()["id"].as_str().expect("head id").to_string());
    let expected = b.export_lines();
    for (f, sse) in followers.into_iter().zip(["SSE", "WebSocket"]) {
        let lines = f
            .join()
            .expect("follower")
            .unwrap_or_else(|e| panic!("{sse}: {e}"));
        assert_eq!(lines.len(), expected.len(), "{sse}: events received");
        assert!(
            lines == expected,
            "{sse}: the events received differ from the log"
        );
    }
}

/// A sequencer whose disk fails (its writes get EFBIG, as on a full disk) stops sealing,
/// gives the lease up at once rather than letting it run out, and never competes for it
/// again: another node takes over, and no acknowledged event is lost.
#[test]
fn a_sequencer_whose_disk_fails_hands_the_lease_over_and_stops_competing() {
    if missing() {
        return;
    }
    let nats = NatsCluster::start(3);
    // A lease longer than the take-over wait below: a lease left to expire fails the test.
    const LEASE_SECS: u64 = 45;
    let args = |name: &str| -> Vec<String> {
        let lease = LEASE_SECS.to_string();
        let mut args = vec!["--nats".to_string(), nats.urls()];
        args.extend(["--nats-lease", &lease, "--node", name].map(str::to_string));
        args
    };
    let b_args = args("b");
    let b_data = tempfile::tempdir().expect("tempdir").keep().join("data");
    let b_refs: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let b = Server::start_with_file_limit(&b_data, &b_refs, 3 << 20);
    wait_until(Duration::from_secs(10), "b to take the lease", || {
        role(&b) == "sequencer"
    });
    let a_args = args("a");
    let a_refs: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let a_data = tempfile::tempdir().expect("tempdir").keep().join("data");
    let mut a = Server::start_on(&a_data, &a_refs);
    a.token = b.token.clone();

    // Large events through a, sealed by b, until b's copy cannot be stored.
    let padding = "p".repeat(2000);
    let big = |round: usize| {
        let events: Vec<Value> = (0..200)
            .map(|i| json!({"type": "disk.fill", "data": {"round": round, "i": i, "pad": padding}}))
            .collect();
        json!({ "events": events })
    };
    let mut acknowledged = Vec::new();
    let mut round = 0;
    wait_until(Duration::from_secs(30), "b's log to stop", || {
        round += 1;
        let (status, body) = post(&a, &big(round), None);
        if status == 201 {
            acknowledged.extend(body["data"]["ids"].as_array().cloned().unwrap_or_default());
        }
        b.get("/healthz").1["status"] == "unavailable"
    });
    // a takes over well within the lease time, so b released it, and ingest goes on.
    wait_until(Duration::from_secs(30), "a to seal and acknowledge", || {
        round += 1;
        let (status, body) = post(&a, &big(round), None);
        if status == 201 {
            acknowledged.extend(body["data"]["ids"].as_array().cloned().unwrap_or_default());
        }
        status == 201 && role(&a) == "sequencer"
    });
    wait_until(Duration::from_secs(10), "b to stop competing", || {
        b.log_text()
            .contains("no longer competes for the sequencer lease")
    });
    assert_ne!(role(&b), "sequencer");

    // a's graceful stop frees the lease. b, the only node left, tries for it every third
    // of the lease time if it still competes: watch it for longer than that.
    assert!(a.terminate().success());
    let watch_until = Instant::now() + Duration::from_secs(LEASE_SECS / 3 + 3);
    while Instant::now() < watch_until {
        assert_ne!(
            role(&b),
            "sequencer",
            "a node whose log stopped took the lease"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut a = Server::start_on(&a_data, &a_refs);
    a.token = b.token.clone();
    wait_until(Duration::from_secs(30), "a restarted to seal", || {
        round += 1;
        let (status, body) = post(&a, &big(round), None);
        if status == 201 {
            acknowledged.extend(body["data"]["ids"].as_array().cloned().unwrap_or_default());
        }
        status == 201
    });
    assert_eq!(b.log_text().matches("took the sequencer lease").count(), 1);

    // Every acknowledged event is in a's log, once, and the chain verifies.
    let ids: std::collections::HashSet<String> =
        a.export_lines().iter().map(|line| event_id(line)).collect();
    assert!(!acknowledged.is_empty());
    for id in &acknowledged {
        assert!(
            ids.contains(id.as_str().unwrap_or("")),
            "acknowledged {id} is lost"
        );
    }
    let (status, verify) = a.get("/v1/verify");
    assert_eq!(
        (status, &verify["data"]["ok"]),
        (200, &json!(true)),
        "{verify}"
    );
}

/// A node's copy that no longer matches the stream would, as sequencer, seal on events no
/// other node has and stop them all. Its directory is refused by a single-node `serve`
/// (which could append to it alone), and by `serve --nats` when its head is not the end of
/// the stream message it applied last: here the stream was deleted and made again, as a
/// copy brought to another cluster of the same name would find it.
#[test]
fn a_copy_that_does_not_match_the_stream_is_refused() {
    if missing() {
        return;
    }
    let nats = NatsCluster::start(3);
    let mut a = node(&nats, "a", None);
    let a_data = a.data.clone();
    let a_args = node_args(&nats, "a");
    let a_refs: Vec<&str> = a_args.iter().map(String::as_str).collect();
    for round in 0..3 {
        assert_eq!(post(&a, &batch(&format!("a{round}"), 5), None).0, 201);
    }
    let a_messages = nats.stream_state("CAIRN").expect("stream")["last_seq"]
        .as_u64()
        .unwrap_or(0);
    assert!(a_messages >= 3, "one message per request: {a_messages}");
    a.terminate();

    let alone = Server::launch(&a_data, &[], &[]).map(|mut s| s.terminate());
    let log = alone.expect_err("a single-node serve took a cluster node's directory");
    assert!(
        log.contains("holds a node's copy of the cluster stream CAIRN"),
        "{log}"
    );

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let addrs: Vec<async_nats::ServerAddr> = nats
            .urls()
            .split(',')
            .map(|u| u.parse().expect("url"))
            .collect();
        let client = async_nats::connect(addrs).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        js.delete_stream("CAIRN").await.expect("delete the stream");
    });
    // A new log on the stream of the same name, shorter than a's copy.
    // (b, the first sequencer of an empty stream, may create an admin token; a's, in
    // the cluster's tokens, works too.)
    let mut b = node(&nats, "b", None);
    if b.token.is_empty() {
        b.token = a.token.clone();
    }
    assert_eq!(post(&b, &batch("b0", 2), None).0, 201);
    let refused = |what: &str| {
        let started = Server::launch(&a_data, &a_refs, &[]).map(|mut s| s.terminate());
        let log = started.expect_err(&format!("a started on a copy that {what}"));
        assert!(
            log.contains("this node's copy does not match the stream CAIRN"),
            "{log}"
        );
        log
    };
    let log = refused("is ahead of the stream");
    assert!(log.contains("but the stream ends at"), "{log}");

    // Longer than a's copy: the message a applied last exists, with other events.
    for round in 1..=a_messages {
        assert_eq!(post(&b, &batch(&format!("b{round}"), 2), None).0, 201);
    }
    let log = refused("differs from the stream");
    assert!(
        log.contains(&format!("stream message {a_messages}")),
        "{log}"
    );

    // Nothing reached the cluster's log: b's is exactly what b acknowledged.
    assert_same_log(&[&b], 2 * (a_messages + 1));
}

/// The lease expires after the lease bucket's own time, which the node that created the
/// bucket chose: a node started with a longer `--nats-lease` must still renew within
/// the bucket's time, or another node would take the lease while it still seals.
#[test]
fn the_lease_is_renewed_within_the_buckets_time_whatever_the_holders_flag() {
    if missing() {
        return;
    }
    let nats = NatsCluster::start(3);
    // a creates the lease bucket with a 2 s lease.
    let mut a = node(&nats, "a", None);
    wait_until(Duration::from_secs(10), "a to take the lease", || {
        role(&a) == "sequencer"
    });
    let mut b_args = node_args(&nats, "b");
    let lease_flag = b_args
        .iter()
        .position(|a| a == "--nats-lease")
        .expect("flag");
    b_args[lease_flag + 1] = "60".into();
    let b_data = tempfile::tempdir().expect("tempdir").keep().join("data");
    let b_refs: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let mut b = Server::start_on(&b_data, &b_refs);
    b.token = a.token.clone();
    a.terminate();
    wait_until(Duration::from_secs(10), "b to take the lease", || {
        role(&b) == "sequencer"
    });
    let c = node(&nats, "c", Some(&a));
    // Several times the bucket's 2 s: b, renewing every third of its own 60 s, would
    // lose the lease to c within about 2 s.
    let watched = Instant::now();
    let mut round = 0;
    while watched.elapsed() < Duration::from_secs(8) {
        assert_eq!(role(&c), "follower", "c took the lease b still held");
        assert_eq!(role(&b), "sequencer");
        round += 1;
        assert_eq!(post(&c, &batch(&format!("c{round}"), 1), None).0, 201);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!c.log_text().contains("took the sequencer lease"));
    assert_same_log(&[&b, &c], round);
}

/// A key replayed on a node whose copy has not applied the key's events: the answer is
/// read from that copy, so the node says "retry" (503) rather than failing on events
/// it does not hold (a 500); once its copy catches up, the same key gets the first
/// answer there. b's applier is held with the `CAIRN_TEST_HOLD_APPLIER` hook
/// (docs/testing.md) while its HTTP side and forwarding keep working.
#[test]
fn a_replayed_key_on_a_node_whose_copy_is_behind_answers_retry() {
    if missing() {
        return;
    }
    let nats = NatsCluster::start(3);
    let a = node(&nats, "a", None);
    wait_until(Duration::from_secs(10), "a to take the lease", || {
        role(&a) == "sequencer"
    });
    let hold = tempfile::tempdir().expect("tempdir");
    let hold_file = hold.path().join("hold");
    let b_args = node_args(&nats, "b");
    let b_refs: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let b_data = tempfile::tempdir().expect("tempdir").keep().join("data");
    let hold_path = hold_file.to_string_lossy().into_owned();
    let mut b = Server::launch(
        &b_data,
        &b_refs,
        &[("CAIRN_TEST_HOLD_APPLIER", hold_path.as_str())],
    )
    .unwrap_or_else(|log| panic!("b did not start; its log:\n{log}"));
    b.token = a.token.clone();
    assert_eq!(post(&a, &batch("before", 2), None).0, 201);
    wait_until(
        Duration::from_secs(10),
        "b to apply the first events",
        || head_seq(&b) == 2,
    );

    std::fs::write(&hold_file, b"").expect("hold file");
    let (status, first) = post(&a, &batch("held", 3), Some("held-key"));
    assert_eq!(status, 201, "{first}");
    // b forwards the retry; the sequencer knows the key, b's copy lacks its events.
    let (status, retry) = post(&b, &batch("held", 3), Some("held-key"));
    assert_eq!(status, 503, "{retry}\nb's log:\n{}", b.log_text());
    assert!(
        retry.to_string().contains("retry with the same key"),
        "{retry}"
    );
    assert_eq!(head_seq(&b), 2, "b's copy was held");

    std::fs::remove_file(&hold_file).expect("release b");
    wait_until(Duration::from_secs(20), "b to catch up", || {
        head_seq(&b) == 5
    });
    let (status, again) = post(&b, &batch("held", 3), Some("held-key"));
    assert_eq!(status, 201, "{again}");
    assert_eq!(again["data"]["first_seq"], first["data"]["first_seq"]);
    assert_eq!(again["data"]["last_seq"], first["data"]["last_seq"]);
    assert_same_log(&[&a, &b], 5);
}
