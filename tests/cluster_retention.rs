//! Retention in cluster mode (SPEC §6 + §8) against a real three-server JetStream cluster
//! and real `cairn serve --nats` nodes: one horizon for every node, and the stream trimmed
//! only behind what every node has pruned.
//!
//! Skipped (with a line saying so) where `nats-server` is not installed.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::nats::{NatsCluster, missing};
use common::{Server, archives_then, auditor, cairn, wait_until};
use serde_json::{Value, json};

const RETAIN: &str = "200";
const SETTLE: Duration = Duration::from_secs(30);
/// The log stream's default name.
const STREAM: &str = "CAIRN";

struct Node {
    name: &'static str,
    data: PathBuf,
    extra: Vec<String>,
    server: Server,
}

fn args(nats: &NatsCluster, name: &str, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--nats",
        &nats.urls(),
        "--node",
        name,
        "--nats-lease",
        "2",
        "--retain-events",
        RETAIN,
    ]
    .map(str::to_string)
    .to_vec();
    args.extend(extra.iter().cloned());
    args
}

fn start_node(
    nats: &NatsCluster,
    name: &'static str,
    data: &Path,
    token: Option<&str>,
    extra: &[String],
) -> Node {
    let all = args(nats, name, extra);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut server = Server::start_on(data, &all);
    if let Some(token) = token {
        server.token = token.to_string();
    }
    Node {
        name,
        data: data.to_path_buf(),
        extra: extra.to_vec(),
        server,
    }
}

fn fresh_dir() -> PathBuf {
    tempfile::tempdir().expect("tempdir").keep().join("data")
}

/// Appends `n` events in one request (one stream group when nothing else is in flight).
fn append(server: &Server, tag: &str, n: usize) {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({"type": "retain.test", "source": tag, "data": {"i": i}}))
        .collect();
    let (status, body) = server.post_json(&json!({ "events": events }));
    assert_eq!(status, 201, "{body}");
}

fn head(server: &Server) -> (u64, u64, String) {
    let h = server.head();
    (
        h["seq"].as_u64().unwrap_or(0),
        h["first_seq"].as_u64().unwrap_or(0),
        h["first_id"].as_str().unwrap_or("").to_string(),
    )
}

fn checkpoint_size(note: &str) -> u64 {
    note.lines()
        .nth(1)
        .and_then(|l| l.parse().ok())
        .unwrap_or(0)
}

/// `cairn verify --checkpoint` of `saved` (a checkpoint signed earlier, written to `file`)
/// against `server`: the consistency proof to its newest checkpoint must verify with the
/// cluster's `key`. Returns the newest checkpoint, which the command leaves in `file`.
fn verify_saved_checkpoint(server: &Server, file: &Path, saved: &str, key: &str) -> String {
    std::fs::write(file, saved).expect("write");
    let (code, out, err) = server.cairn(&[
        "verify",
        "--checkpoint",
        file.to_str().expect("path"),
        "--key",
        key.trim(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    std::fs::read_to_string(file).expect("read")
}

fn wait_checkpoint_covers(server: &Server, size: u64) {
    wait_until(SETTLE, "a checkpoint covering the head", || {
        checkpoint_size(&server.get_text("/v1/checkpoint").1) >= size
    });
}

/// The stream's (first, last) message sequence, as its leader reports it (`None` while
/// no leader answers).
fn stream_range(nats: &NatsCluster) -> Option<(u64, u64)> {
    let state = nats.stream_state(STREAM)?;
    Some((state["first_seq"].as_u64()?, state["last_seq"].as_u64()?))
}

fn wait_horizon(nodes: &[&Server], head_seq: u64, first_seq: u64) {
    for n in nodes {
        wait_until(SETTLE, "every node to reach the cluster's horizon", || {
            let (seq, first, _) = head(n);
            seq == head_seq && first == first_seq
        });
    }
}

/// Byte-identical exports starting at the horizon, and a chain every node verifies.
fn assert_same_pruned_log(nodes: &[&Server], first_seq: u64, head_seq: u64) {
    let (_, _, first_id) = head(nodes[0]);
    let export = nodes[0].export_lines();
    assert_eq!(export.len() as u64, head_seq - first_seq + 1);
    let first: Value = serde_json::from_str(&export[0]).expect("event json");
    assert_eq!(first["seq"].as_u64(), Some(first_seq));
    assert_eq!(first["id"].as_str(), Some(first_id.as_str()));
    for n in nodes {
        assert_eq!(head(n).2, first_id, "one first_id everywhere");
        assert_eq!(n.export_lines(), export, "exports are byte-identical");
        let (status, verify) = n.get("/v1/verify");
        assert_eq!(status, 200, "{verify}");
        assert_eq!(verify["data"]["ok"], true, "{verify}");
        let (code, out, err) = n.cairn(&["verify"]);
        assert_eq!(code, 0, "{out}{err}");
    }
}

#[test]
fn three_nodes_prune_at_one_horizon_and_the_stream_waits_for_every_node() {
    if missing() {
        return;
    }
    let nats = NatsCluster::start(3);
    let archive = tempfile::tempdir().expect("tempdir");
    let archive_flag = vec![
        "--archive".to_string(),
        archive.path().to_str().expect("path").to_string(),
    ];
    let a = start_node(&nats, "a", &fresh_dir(), None, &archive_flag);
    let token = a.server.token.clone();
    let b = start_node(&nats, "b", &fresh_dir(), Some(&token), &[]);
    let mut c = start_node(&nats, "c", &fresh_dir(), Some(&token), &[]);

    // An auditor saves node a's checkpoint before anything is pruned.
    for r in 0..5 {
        append(&a.server, &format!("early{r}"), 20);
    }
    wait_checkpoint_covers(&a.server, 100);
    let key = a.server.get_text("/v1/checkpoint/key").1;
    let saved = a.server.get_text("/v1/checkpoint").1;
    assert_eq!(head(&a.server).1, 1, "nothing is pruned below the bound");

    // Ingest on every node at once (groups of any size), past the bound.
    std::thread::scope(|scope| {
        for (w, n) in [&a, &b, &c].into_iter().enumerate() {
            scope.spawn(move || {
                for r in 0..15 {
                    append(&n.server, &format!("w{w}r{r}"), 20);
                }
            });
        }
    });
    // Then one request at a time: one 20-event group each (seqs 1001..=1400), so the
    // horizon the bound asks for, 1400 − 200, is a group's end.
    for r in 0..20 {
        append(&b.server, &format!("seq{r}"), 20);
    }
    let nodes = [&a.server, &b.server, &c.server];
    wait_horizon(&nodes, 1400, 1201);
    assert_same_pruned_log(&nodes, 1201, 1400);

    // The stream is trimmed to the message after event 1200's, once every node has
    // pruned: the 20 one-group messages end the stream.
    let mut last = 0;
    wait_until(SETTLE, "the stream's state", || {
        stream_range(&nats).map(|(_, l)| last = l).is_some()
    });
    let trimmed = last - 10 + 1;
    wait_until(SETTLE, "the stream trimmed behind the horizon", || {
        stream_range(&nats).map(|r| r.0) == Some(trimmed)
    });

    // A consistency proof from the checkpoint node a signed before the prune verifies
    // on node b (whose own checkpoints may never have had that size).
    let files = tempfile::tempdir().expect("tempdir");
    let newest = verify_saved_checkpoint(&b.server, &files.path().join("old"), &saved, &key);
    assert!(checkpoint_size(&newest) >= 1201);

    // Manual prune stays refused on a cluster node.
    let first_id = head(&a.server).2;
    let (status, body) = a
        .server
        .post(&format!("/v1/admin/prune?before={first_id}"), "", "");
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("one decision"), "{body}");

    // Node c stops. The others move to the next horizon; the stream keeps what c needs.
    c.server.terminate();
    for r in 0..20 {
        append(&a.server, &format!("late{r}"), 20);
    }
    wait_horizon(&[&a.server, &b.server], 1800, 1601);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Some((first, _)) = stream_range(&nats) {
            assert_eq!(
                first, trimmed,
                "the stream was trimmed past what the stopped node applied"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Back, c catches up, prunes to the same horizon, and the stream is trimmed again.
    c = start_node(&nats, c.name, &c.data, Some(&token), &c.extra);
    let nodes = [&a.server, &b.server, &c.server];
    wait_horizon(&nodes, 1800, 1601);
    assert_same_pruned_log(&nodes, 1601, 1800);
    wait_until(SETTLE, "the stream trimmed once every node pruned", || {
        stream_range(&nats).map(|r| r.0) == Some(trimmed + 20)
    });

    // Node a's archives and its export verify end to end, from seq 1, for cairn and for
    // SPEC §1's auditor against a's newest checkpoint.
    wait_checkpoint_covers(&a.server, 1800);
    let all = archives_then(archive.path(), &(a.server.export_lines().join("\n") + "\n"));
    let all_file = files.path().join("all.ndjson");
    std::fs::write(&all_file, &all).expect("write");
    let (code, out, err) = cairn(&["verify", "--file", all_file.to_str().expect("path")], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1800 events verified"), "{out}");
    let newest = files.path().join("newest.checkpoint");
    std::fs::write(&newest, a.server.get_text("/v1/checkpoint").1).expect("write");
    let (ok, out) = auditor(&[
        "export",
        "--key",
        key.trim(),
        "--checkpoint",
        newest.to_str().expect("path"),
        all_file.to_str().expect("path"),
    ]);
    assert!(ok, "{out}");

    // A node started empty now starts at the cluster's horizon: the stream holds
    // nothing before it, so it takes the horizon and the leaf hashes below it
    // (`<stream>_TREE`), and then follows the stream like the others.
    let d = start_node(&nats, "d", &fresh_dir(), Some(&token), &[]);
    let nodes = [&a.server, &b.server, &c.server, &d.server];
    wait_horizon(&nodes, 1800, 1601);
    assert_same_pruned_log(&nodes, 1601, 1800);
    // Pruned events and their proofs are gone there too.
    let (status, body) = d.server.get(&format!("/v1/events/{first_id}"));
    assert_eq!(
        (status, body["code"].as_str()),
        (410, Some("gone")),
        "{body}"
    );
    let (status, body) = d.server.get("/v1/proof/inclusion?seq=1600");
    assert_eq!(
        (status, body["code"].as_str()),
        (410, Some("gone")),
        "{body}"
    );

    // It takes part in the next horizon: appends through it, prunes, and the stream is
    // trimmed behind it too.
    append(&d.server, "after-d", 20);
    wait_horizon(&nodes, 1820, 1621);
    assert_same_pruned_log(&nodes, 1621, 1820);
    wait_until(SETTLE, "the stream trimmed behind the new node too", || {
        stream_range(&nats).map(|r| r.0) == Some(trimmed + 21)
    });

    // Its Merkle tree is the cluster's: the checkpoint node a signed before any prune
    // verifies against the one node d signs, and a retained event's inclusion proof
    // verifies against it.
    wait_checkpoint_covers(&d.server, 1820);
    verify_saved_checkpoint(&d.server, &files.path().join("old-again"), &saved, &key);
    for seq in ["1621", "1700", "1820"] {
        let (code, proof, err) = d.server.cairn(&["proof", seq]);
        assert_eq!(code, 0, "{proof}{err}");
        let proof_file = files.path().join(format!("proof-{seq}.json"));
        std::fs::write(&proof_file, &proof).expect("write");
        let (code, out, err) = cairn(
            &[
                "verify",
                "--proof",
                proof_file.to_str().expect("path"),
                "--key",
                key.trim(),
            ],
            &[],
        );
        assert_eq!(code, 0, "{out}{err}");
    }

    // Without the leaf hashes below the horizon (the tree stream lost, as on a cluster
    // whose horizon has not moved since the tree stream existed), an empty node cannot
    // start there: it refuses, says how to seed it, and does not hold the trim back.
    delete_stream(&nats, &format!("{STREAM}_TREE"));
    let e_args = args(&nats, "e", &[]);
    let e_args: Vec<&str> = e_args.iter().map(String::as_str).collect();
    match Server::launch(&fresh_dir(), &e_args, &[]) {
        Ok(_) => panic!("a node started at a horizon without its leaf hashes"),
        Err(log) => assert!(
            log.contains("tree stream") && log.contains("Seed this node"),
            "{log}"
        ),
    }
    append(&a.server, "after-e", 20);
    wait_horizon(&nodes, 1840, 1641);
    wait_until(SETTLE, "the stream trimmed past the refused node", || {
        stream_range(&nats).map(|r| r.0) == Some(trimmed + 22)
    });
}

/// A node that is gone for good holds the stream's trim back until `cairn cluster
/// forget` removes its registration; then the stream is trimmed behind the others. The
/// command refuses a name without a registration, and the running sequencer.
#[test]
fn a_node_gone_for_good_is_forgotten_and_the_stream_is_trimmed_again() {
    if missing() {
        return;
    }
    let nats = NatsCluster::start(3);
    let a = start_node(&nats, "a", &fresh_dir(), None, &[]);
    let token = a.server.token.clone();
    let mut b = start_node(&nats, "b", &fresh_dir(), Some(&token), &[]);
    // One 20-event group per request: the horizon 400 − 200 ends message 10.
    for r in 0..20 {
        append(&a.server, &format!("r{r}"), 20);
    }
    wait_horizon(&[&a.server, &b.server], 400, 201);
    wait_until(SETTLE, "the stream trimmed behind both nodes", || {
        stream_range(&nats).map(|r| r.0) == Some(11)
    });

    // b is gone for good: a moves on (horizon 600, message 30), the stream does not.
    b.server.terminate();
    for r in 0..20 {
        append(&a.server, &format!("s{r}"), 20);
    }
    wait_horizon(&[&a.server], 800, 601);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Some((first, _)) = stream_range(&nats) {
            assert_eq!(first, 11, "the stream was trimmed past the stopped node");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let forget = |node: &str| {
        cairn(
            &["cluster", "forget", node, "--nats", &nats.urls()],
            &[("CAIRN_NATS_STREAM", STREAM)],
        )
    };
    // A name without a registration, and the running sequencer, are refused.
    let (code, out, err) = forget("nobody");
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("no trim registration") && err.contains("registered: "),
        "{err}"
    );
    assert!(err.contains("\"a\"") && err.contains("\"b\""), "{err}");
    // A stream no node registered for (a mistyped name) is not created, and says so.
    let (code, out, err) = cairn(
        &[
            "cluster",
            "forget",
            "b",
            "--nats",
            &nats.urls(),
            "--nats-stream",
            "OTHER",
        ],
        &[],
    );
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("no node of the stream OTHER"), "{err}");
    let (code, out, err) = forget("a");
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("sequencer lease"), "{err}");

    let (code, out, err) = forget("b");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("\"b\"") && out.contains("stream message 10") && out.contains("\"a\""),
        "{out}"
    );
    wait_until(
        SETTLE,
        "the stream trimmed behind the remaining node",
        || stream_range(&nats).map(|r| r.0) == Some(31),
    );
    let (code, _, err) = forget("b");
    assert_ne!(code, 0);
    assert!(err.contains("no trim registration"), "{err}");
}

/// Deletes a JetStream stream (with its messages) through a NATS client.
fn delete_stream(nats: &NatsCluster, name: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let urls: Vec<String> = nats.urls().split(',').map(str::to_string).collect();
        let client = async_nats::connect(urls).await.expect("connect to NATS");
        let js = async_nats::jetstream::new(client);
        js.delete_stream(name).await.expect("delete the stream");
    });
}
