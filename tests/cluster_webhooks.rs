//! Webhooks in cluster mode (SPEC §6/§7) against three real `nats-server` processes,
//! three real `cairn serve --nats` nodes and a real HTTP receiver on 127.0.0.1 in this
//! test: one node delivers each webhook, another takes over from the durable cursor when
//! it is lost, and a change made on any node reaches the one delivering. Every request is
//! checked with an independent Standard Webhooks implementation (the Python
//! `standardwebhooks` package).
//!
//! Skipped (with a line saying so) where `nats-server` is not installed.

mod common;

use std::collections::HashSet;
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use common::nats::{NatsCluster, missing};
use common::webhooks::{Received, create, events_of, patch, read_request, send, verify_signatures};
use common::{Server, wait_until};

const WAIT: Duration = Duration::from_secs(30);
const OK_DELIVERIES: &str = r#"cairn_webhook_deliveries_total{result="ok"}"#;

/// Answers every request 200 after `delay` (so that a kill lands mid-delivery), or 500
/// while `failing`.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    failing: Arc<AtomicBool>,
}

impl Receiver {
    fn start(delay: Duration) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let failing = Arc::new(AtomicBool::new(false));
        let (g, s, f) = (got.clone(), stop.clone(), failing.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (g, f) = (g.clone(), f.clone());
                std::thread::spawn(move || serve(conn, delay, &g, &f));
            }
        });
        Receiver {
            url,
            got,
            stop,
            failing,
        }
    }

    fn requests(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Events of acknowledged requests, duplicates (by id) removed, in arrival order.
    fn acked_events(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.requests()
            .iter()
            .filter(|r| r.acked)
            .flat_map(events_of)
            .map(|e| e["id"].as_str().unwrap().to_string())
            .filter(|id| seen.insert(id.clone()))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(
            self.url
                .trim_start_matches("http://")
                .trim_end_matches("/hook"),
        );
    }
}

/// One connection: HTTP/1.1 requests with Content-Length bodies, keep-alive.
fn serve(conn: TcpStream, delay: Duration, got: &Mutex<Vec<Received>>, failing: &AtomicBool) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut writer = conn;
    loop {
        let Some((headers, body)) = read_request(&mut reader) else {
            return;
        };
        let index = {
            let mut g = got.lock().unwrap();
            g.push(Received {
                headers,
                body,
                acked: false,
            });
            g.len() - 1
        };
        std::thread::sleep(delay);
        if failing.load(Ordering::Relaxed) {
            let response = "HTTP/1.1 500 X\r\ncontent-length: 4\r\n\r\nnope";
            if writer.write_all(response.as_bytes()).is_err() {
                return;
            }
            continue;
        }
        let response = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
        got.lock().unwrap()[index].acked = true;
    }
}

/// A cairn node on `nats`; later nodes are driven with the first node's admin token.
fn node(nats: &NatsCluster, name: &str, first: Option<&Server>, lease: &str) -> Server {
    let data = tempfile::tempdir().expect("tempdir").keep().join("data");
    let urls = nats.urls();
    let args = [
        "--nats",
        &urls,
        "--node",
        name,
        "--nats-lease",
        "2",
        "--webhook-lease",
        lease,
        "--webhook-retry-initial",
        "0.02",
        "--webhook-timeout",
        "2",
    ];
    let mut server = Server::start_on(&data, &args);
    if let Some(first) = first {
        server.token = first.token.clone();
    }
    server
}

/// Three nodes, each waited for until ready (caught up: only a ready node delivers).
fn three_nodes(nats: &NatsCluster, lease: &str) -> Vec<Server> {
    let a = node(nats, "a", None, lease);
    let b = node(nats, "b", Some(&a), lease);
    let c = node(nats, "c", Some(&a), lease);
    let nodes = vec![a, b, c];
    for n in &nodes {
        wait_until(WAIT, "every node ready", || {
            n.get("/healthz").1["cluster"]["ready"] == true
        });
    }
    nodes
}

/// Appends `n` events (in requests of up to 50); returns their ids.
fn append(s: &Server, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(50);
        let events: Vec<Value> = (0..k)
            .map(|i| json!({"type": "hook.test", "data": {"i": i}}))
            .collect();
        let (status, r) = s.post_json(&json!({ "events": events }));
        assert_eq!(status, 201, "{r}");
        ids.extend(
            r["data"]["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string()),
        );
        left -= k;
    }
    ids
}

/// The nodes (indexes) delivering `id` now, by their logs: a lease taken and not yet
/// given up.
fn holders(nodes: &[&Server], id: &str) -> Vec<usize> {
    let field = format!("webhook={id}");
    nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            let log = n.log_text();
            let lines = || log.lines().filter(|l| l.contains(&field));
            let taken = lines()
                .filter(|l| l.contains("delivering this webhook (lease taken)"))
                .count();
            let ended = lines()
                .filter(|l| l.contains("stopped delivering this webhook"))
                .count();
            taken > ended
        })
        .map(|(i, _)| i)
        .collect()
}

/// How many requests repeated a `webhook-id` already received.
fn repeated_requests(requests: &[Received]) -> usize {
    let distinct: HashSet<&String> = requests.iter().map(|r| &r.headers["webhook-id"]).collect();
    requests.len() - distinct.len()
}

#[test]
fn one_node_delivers_and_another_continues_from_the_cursor_after_a_kill() {
    if missing() {
        return;
    }
    let nats = NatsCluster::start(3);
    let mut nodes = three_nodes(&nats, "3");
    let receiver = Receiver::start(Duration::from_millis(3));
    let (id, secret) = create(&nodes[0], json!({"url": receiver.url}));

    // Created on a, appended on b: delivered once, in order, by exactly one node.
    let mut appended = append(&nodes[1], 100);
    wait_until(WAIT, "the first events", || {
        receiver.acked_events().len() == appended.len()
    });
    assert_eq!(receiver.acked_events(), appended);
    assert_eq!(repeated_requests(&receiver.requests()), 0);
    let all: Vec<&Server> = nodes.iter().collect();
    let delivering: Vec<usize> = (0..3)
        .filter(|&i| all[i].metric(OK_DELIVERIES) > 0.0)
        .collect();
    assert_eq!(delivering.len(), 1, "more than one node delivered");
    assert_eq!(holders(&all, &id), delivering);
    let h = delivering[0];
    // Every node shows the holder's cursor (read from the shared record).
    let last = appended.last().unwrap().clone();
    for n in &all {
        wait_until(WAIT, "the cursor on every node", || {
            n.get(&format!("/v1/webhooks/{id}")).1["data"]["cursor"] == last.as_str()
        });
    }

    // SIGKILL the holder mid-delivery: another node continues from the stored cursor.
    let more = append(&nodes[(h + 1) % 3], 400);
    appended.extend(more);
    wait_until(WAIT, "delivery under way", || {
        receiver.acked_events().len() >= 130
    });
    let mut holder = nodes.remove(h);
    holder.kill();
    assert!(
        receiver.acked_events().len() < appended.len(),
        "delivery ended before the kill; nothing was taken over"
    );
    let survivors: Vec<&Server> = nodes.iter().collect();
    wait_until(WAIT, "every event, after the takeover", || {
        receiver.acked_events().len() == appended.len()
    });
    assert_eq!(receiver.acked_events(), appended, "order or completeness");
    // Duplicates only from the request in flight at the kill (batch 1: one event).
    let requests = receiver.requests();
    assert!(
        repeated_requests(&requests) <= 1,
        "{} requests repeated an earlier webhook-id",
        repeated_requests(&requests)
    );
    let after: Vec<usize> = (0..2)
        .filter(|&i| survivors[i].metric(OK_DELIVERIES) > 0.0)
        .collect();
    assert_eq!(after.len(), 1, "more than one node took over");
    assert_eq!(holders(&survivors, &id), after);

    // The holder's failures are shown by the other node too (from the holder's lease).
    receiver.failing.store(true, Ordering::Relaxed);
    appended.extend(append(survivors[0], 1));
    let path = format!("/v1/webhooks/{id}");
    wait_until(WAIT, "the holder's failures on the other node", || {
        let shown = survivors[1 - after[0]].get(&path).1["data"].clone();
        shown["state"] == "retrying"
            && shown["failures"].as_u64().unwrap_or(0) > 0
            && shown["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("500"))
    });
    receiver.failing.store(false, Ordering::Relaxed);
    wait_until(
        WAIT,
        "the failed event, once the receiver recovered",
        || receiver.acked_events().len() == appended.len(),
    );
    assert_eq!(receiver.acked_events(), appended);
    verify_signatures(&secret, &receiver.requests());
}

#[test]
fn pause_resume_shutdown_and_delete_from_any_node() {
    if missing() {
        return;
    }
    let nats = NatsCluster::start(3);
    // A lease of 30 s: every hand-over below must come from a release, not an expiry.
    let mut nodes = three_nodes(&nats, "30");
    let witness = Receiver::start(Duration::ZERO);
    let target = Receiver::start(Duration::ZERO);
    create(&nodes[1], json!({"url": witness.url}));
    let (id, secret) = create(&nodes[0], json!({"url": target.url}));
    let path = format!("/v1/webhooks/{id}");
    let mut sent = append(&nodes[2], 10);
    wait_until(WAIT, "the first events", || {
        target.acked_events().len() == 10 && witness.acked_events().len() == 10
    });
    let h = {
        let all: Vec<&Server> = nodes.iter().collect();
        let h = holders(&all, &id);
        assert_eq!(h.len(), 1, "holders: {h:?}");
        h[0]
    };

    // Paused on a node that does not deliver it: delivery stops everywhere.
    let seen = target.requests().len();
    let paused = patch(&nodes[(h + 1) % 3], &id, json!({"paused": true}));
    assert_eq!(paused["state"], "paused");
    for n in &nodes {
        wait_until(WAIT, "the pause on every node", || {
            n.get(&path).1["data"]["state"] == "paused"
        });
    }
    let held_back = append(&nodes[2], 10);
    wait_until(WAIT, "the witness", || witness.acked_events().len() == 20);
    assert_eq!(target.requests().len(), seen, "a paused webhook delivered");

    // Resumed on the other one: the held-back events arrive, in order.
    assert_eq!(
        patch(&nodes[(h + 2) % 3], &id, json!({"paused": false}))["state"],
        "active"
    );
    sent.extend(held_back);
    wait_until(WAIT, "delivery after resume", || {
        target.acked_events().len() == 20
    });
    assert_eq!(target.acked_events(), sent);

    // SIGTERM the holder: it releases the lease, and another node takes over at once
    // (the lease would otherwise last 30 s, beyond this wait).
    let h = {
        let all: Vec<&Server> = nodes.iter().collect();
        let h = holders(&all, &id);
        assert_eq!(h.len(), 1, "holders: {h:?}");
        h[0]
    };
    let mut stopped = nodes.remove(h);
    assert!(stopped.terminate().success());
    assert!(
        stopped
            .log_text()
            .contains("stopped delivering this webhook (lease released)"),
        "{}",
        stopped.log_text()
    );
    sent.extend(append(&nodes[0], 10));
    wait_until(
        Duration::from_secs(20),
        "delivery after the holder stopped",
        || target.acked_events().len() == 30,
    );
    assert_eq!(target.acked_events(), sent);
    let survivors: Vec<&Server> = nodes.iter().collect();
    let h = holders(&survivors, &id);
    assert_eq!(h.len(), 1, "holders: {h:?}");
    verify_signatures(&secret, &target.requests());

    // Deleted on the survivor that does not deliver it: gone everywhere, nothing sent.
    let other = 1 - h[0];
    let (status, _) = send(survivors[other], reqwest::Method::DELETE, &path, &json!({}));
    assert_eq!(status, 204);
    for n in &survivors {
        wait_until(WAIT, "the deletion on every node", || n.get(&path).0 == 404);
    }
    let seen = target.requests().len();
    append(survivors[0], 10);
    wait_until(WAIT, "the witness", || witness.acked_events().len() == 40);
    assert_eq!(target.requests().len(), seen, "a deleted webhook delivered");

    // Offline `cairn webhook` on a cluster node's data directory is refused.
    let data = stopped.data.to_string_lossy().to_string();
    let (code, _, err) = common::cairn(&["webhook", "list", "--data", &data], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("cluster"), "{err}");
}
