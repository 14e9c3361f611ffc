//! Webhooks (SPEC §7) against the real server and a real HTTP receiver on 127.0.0.1
//! in this test. Every request any receiver gets is checked with an independent
//! Standard Webhooks implementation (the Python `standardwebhooks` package).

mod common;

use std::collections::HashSet;
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use common::webhooks::{Received, create, events_of, patch, read_request, send, verify_signatures};
use common::{Server, wait_until};

/// Retries start at 20 ms (the contract's 1 s would only make the tests slower), and a
/// receiver that stalls is given up on after a second.
const FAST: &[&str] = &["--webhook-retry-initial", "0.02", "--webhook-timeout", "1"];
const WAIT: Duration = Duration::from_secs(60);

/// What a receiver does with a request.
#[derive(Clone, Debug)]
enum Plan {
    Ok,
    Status(u16),
    /// 500, a dropped connection, a stall past the timeout, or a 200, at random.
    Flaky,
    /// Answers 200 after this long.
    Slow(Duration),
    /// Never answers (the connection is held until the server gives up).
    Stall,
    Redirect(String),
}

struct Receiver {
    url: String,
    plan: Arc<Mutex<Plan>>,
    got: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn start(plan: Plan) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let plan = Arc::new(Mutex::new(plan));
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, g, s) = (plan.clone(), got.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (p, g, s) = (p.clone(), g.clone(), s.clone());
                std::thread::spawn(move || serve(conn, &p, &g, &s));
            }
        });
        Receiver {
            url,
            plan,
            got,
            stop,
        }
    }

    fn set(&self, plan: Plan) {
        *self.plan.lock().unwrap() = plan;
    }

    fn requests(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Events of acknowledged requests, duplicates (by id) removed, in arrival order.
    fn acked_events(&self) -> Vec<Value> {
        let mut seen = HashSet::new();
        self.requests()
            .iter()
            .filter(|r| r.acked)
            .flat_map(events_of)
            .filter(|e| seen.insert(e["id"].as_str().unwrap().to_string()))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(
            self.url
                .trim_start_matches("http://")
                .trim_end_matches("/hook"),
        );
    }
}

/// One connection: HTTP/1.1 requests with Content-Length bodies, keep-alive.
fn serve(conn: TcpStream, plan: &Mutex<Plan>, got: &Mutex<Vec<Received>>, stop: &AtomicBool) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut writer = conn;
    loop {
        let Some((headers, body)) = read_request(&mut reader) else {
            return;
        };
        let plan = plan.lock().unwrap().clone();
        let plan = match plan {
            Plan::Flaky => match rand::random_range(0..100) {
                0..5 => Plan::Status(500),
                5..10 => Plan::Status(0),
                10..13 => Plan::Stall,
                _ => Plan::Ok,
            },
            other => other,
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
        let response = match plan {
            Plan::Ok => "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_string(),
            Plan::Slow(d) => {
                std::thread::sleep(d);
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_string()
            }
            // Status 0: drop the connection without an answer.
            Plan::Status(0) => return,
            Plan::Status(code) => {
                format!("HTTP/1.1 {code} X\r\ncontent-length: 4\r\n\r\nnope")
            }
            Plan::Stall => {
                while !stop.load(Ordering::Relaxed) {
                    // Until the server gives up on us (or the test ends).
                    std::thread::sleep(Duration::from_millis(50));
                    let mut probe = [0u8; 1];
                    writer.set_read_timeout(Some(Duration::from_millis(1))).ok();
                    if matches!(reader.get_mut().peek(&mut probe), Ok(0)) {
                        return;
                    }
                }
                return;
            }
            Plan::Redirect(to) => {
                format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nlocation: {to}\r\ncontent-length: 0\r\n\r\n"
                )
            }
            Plan::Flaky => unreachable!(),
        };
        if writer.write_all(response.as_bytes()).is_ok() && response.contains(" 200 ") {
            got.lock().unwrap()[index].acked = true;
        }
    }
}

fn webhook(s: &Server, id: &str) -> Value {
    let (status, r) = s.get(&format!("/v1/webhooks/{id}"));
    assert_eq!(status, 200, "{r}");
    r["data"].clone()
}

/// Appends `n` events of `event_type` (in requests of up to 500); returns their ids.
fn append(s: &Server, n: usize, event_type: &str, source: Option<&str>) -> Vec<String> {
    let mut ids = Vec::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(500);
        let events: Vec<Value> = (0..k)
            .map(|i| {
                let mut e = json!({"type": event_type, "data": {"i": i}});
                if let Some(src) = source {
                    e["source"] = json!(src);
                }
                e
            })
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

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn bad_bodies_list_every_problem_and_secrets_stay_hidden() {
    let s = Server::start(&[]);
    let (status, r) = send(
        &s,
        reqwest::Method::POST,
        "/v1/webhooks",
        &json!({"url": "ftp://siem.example/", "batch": 1001, "types": ["a", "bad type"],
                "since": "yesterday", "colour": "red"}),
    );
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["code"], "validation_failed");
    let fields: Vec<&str> = r["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        ["url", "types[1]", "since", "batch", "colour"],
        "{r}"
    );
    for bad in [
        json!({"batch": 0, "url": "http://h/"}),
        json!({"batch": "5", "url": "http://h/"}),
        json!({}),
        json!([1]),
    ] {
        let (status, r) = send(&s, reqwest::Method::POST, "/v1/webhooks", &bad);
        assert_eq!(status, 400, "{bad}: {r}");
    }
    let (status, r) = s.post("/v1/webhooks", "application/json", "{\"url\":");
    assert_eq!(
        (status, r["code"].as_str()),
        (400, Some("bad_request")),
        "{r}"
    );

    let (id, secret) = create(
        &s,
        json!({"url": "https://siem.example/hook", "name": "siem"}),
    );
    assert!(secret.starts_with("whsec_"), "{secret}");
    let (status, r) = send(
        &s,
        reqwest::Method::PATCH,
        &format!("/v1/webhooks/{id}"),
        &json!({"paused": "yes", "cursor": "x", "url": "http://h/"}),
    );
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["details"].as_array().unwrap().len(), 3, "{r}");
    let (status, _) = send(
        &s,
        reqwest::Method::PATCH,
        "/v1/webhooks/ffffffffffffffff",
        &json!({"paused": true}),
    );
    assert_eq!(status, 404);

    // A read token may not manage webhooks.
    let (status, t) = s.post(
        "/v1/tokens",
        "application/json",
        json!({"role": "read", "name": "r"}).to_string(),
    );
    assert_eq!(status, 201);
    let read = t["data"]["token"].as_str().unwrap();
    let r = s
        .http()
        .get(s.url("/v1/webhooks"))
        .bearer_auth(read)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // The secret is never shown again, nor logged.
    let (_, listed) = s.get("/v1/webhooks");
    let shown = webhook(&s, &id);
    assert_eq!(shown["state"], "active");
    assert_eq!(shown["skipped"], 0);
    for text in [listed.to_string(), shown.to_string(), s.log_text()] {
        assert!(!text.contains(&secret[6..]), "secret leaked: {text}");
    }
    let (status, _) = send(
        &s,
        reqwest::Method::DELETE,
        &format!("/v1/webhooks/{id}"),
        &json!({}),
    );
    assert_eq!(status, 204);
    let (status, _) = s.get(&format!("/v1/webhooks/{id}"));
    assert_eq!(status, 404);
}

#[test]
fn filters_batches_and_since_deliver_exactly_the_matching_events_signed() {
    let s = Server::start(FAST);
    let all = Receiver::start(Plan::Ok);
    let filtered = Receiver::start(Plan::Ok);
    let new_only = Receiver::start(Plan::Ok);
    let mut before = append(&s, 40, "audit", Some("gw-1"));
    before.extend(append(&s, 40, "agent.created", Some("gw-1")));
    before.extend(append(&s, 40, "agent.created", Some("gw-2")));
    let (all_id, all_secret) = create(&s, json!({"url": all.url, "since": "earliest"}));
    let (_, filtered_secret) = create(
        &s,
        json!({"url": filtered.url, "since": "earliest", "types": ["agent.*"], "source": "gw-1", "batch": 7}),
    );
    let (new_id, new_secret) = create(&s, json!({"url": new_only.url}));
    let after = append(&s, 30, "agent.created", Some("gw-1"));

    let expected_all: Vec<String> = before.iter().chain(&after).cloned().collect();
    let expected_filtered: Vec<String> = before[40..80].iter().chain(&after).cloned().collect();
    wait_until(WAIT, "every webhook's events", || {
        all.acked_events().len() == expected_all.len()
            && filtered.acked_events().len() == expected_filtered.len()
            && new_only.acked_events().len() == after.len()
    });
    assert_eq!(ids(&all.acked_events()), expected_all);
    assert_eq!(ids(&filtered.acked_events()), expected_filtered);
    assert_eq!(ids(&new_only.acked_events()), after);

    // batch 1: the body is the event's served line, byte for byte.
    let export = s.export_lines();
    for (r, line) in all.requests().iter().zip(&export) {
        assert_eq!(std::str::from_utf8(&r.body).unwrap(), line);
        assert_eq!(r.headers["content-type"], "application/json");
    }
    // batch 7: {"events": [...]}, at most 7, and webhook-id the first event's id.
    for r in filtered.requests() {
        let events = serde_json::from_slice::<Value>(&r.body).unwrap()["events"]
            .as_array()
            .unwrap()
            .len();
        assert!((1..=7).contains(&events));
        assert_eq!(
            r.headers["webhook-id"],
            events_of(&r)[0]["id"].as_str().unwrap()
        );
    }
    verify_signatures(&all_secret, &all.requests());
    verify_signatures(&filtered_secret, &filtered.requests());
    verify_signatures(&new_secret, &new_only.requests());

    let state = webhook(&s, &all_id);
    assert_eq!(state["cursor"], *expected_all.last().unwrap());
    assert_eq!(state["delivered"], expected_all.len());
    assert_eq!(state["failures"], 0);
    assert_eq!(state["state"], "active");
    assert!(webhook(&s, &new_id)["delivered"] == after.len());
    let m = s.metrics();
    assert!(
        m[r#"cairn_webhook_deliveries_total{result="ok"}"#] >= 150.0,
        "{m:?}"
    );
    assert_eq!(
        m[&format!(r#"cairn_webhook_lag_events{{webhook="{all_id}"}}"#)],
        0.0
    );
}

#[test]
fn a_flaky_receiver_gets_every_event_in_order() {
    let s = Server::start(&[
        "--webhook-retry-initial",
        "0.02",
        "--webhook-timeout",
        "0.25",
    ]);
    let one = Receiver::start(Plan::Flaky);
    let many = Receiver::start(Plan::Flaky);
    let (_, one_secret) = create(&s, json!({"url": one.url, "since": "earliest"}));
    let (_, many_secret) = create(
        &s,
        json!({"url": many.url, "since": "earliest", "batch": 50}),
    );
    let mut appended = Vec::new();
    for _ in 0..4 {
        appended.extend(append(&s, 500, "audit", None));
    }
    wait_until(
        Duration::from_secs(90),
        "the flaky receivers' events",
        || {
            one.acked_events().len() == appended.len()
                && many.acked_events().len() == appended.len()
        },
    );
    for receiver in [&one, &many] {
        assert_eq!(ids(&receiver.acked_events()), appended);
        // Never ahead of what was acknowledged: each request starts at or before the
        // first event not yet acknowledged, and its events are consecutive.
        let mut acked_through = 0u64;
        for r in receiver.requests() {
            let seqs: Vec<u64> = events_of(&r)
                .iter()
                .map(|e| e["seq"].as_u64().unwrap())
                .collect();
            assert!(
                seqs[0] <= acked_through + 1,
                "a gap: {} after {acked_through}",
                seqs[0]
            );
            assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
            assert_eq!(
                r.headers["webhook-id"],
                events_of(&r)[0]["id"].as_str().unwrap()
            );
            if r.acked {
                acked_through = acked_through.max(*seqs.last().unwrap());
            }
        }
    }
    let failed = [&one, &many]
        .iter()
        .flat_map(|r| r.requests())
        .filter(|r| !r.acked)
        .count();
    assert!(failed > 0, "the receivers never failed");
    verify_signatures(&one_secret, &one.requests());
    verify_signatures(&many_secret, &many.requests());
    let m = s.metrics();
    assert!(
        m.get(r#"cairn_webhook_deliveries_total{result="timeout"}"#)
            .copied()
            .unwrap_or(0.0)
            > 0.0,
        "{m:?}"
    );
    assert!(
        m.get(r#"cairn_webhook_deliveries_total{result="error"}"#)
            .copied()
            .unwrap_or(0.0)
            > 0.0,
        "{m:?}"
    );
}

#[test]
fn sigkill_mid_delivery_then_restart_continues_from_the_cursor() {
    let mut s = Server::start(FAST);
    let receiver = Receiver::start(Plan::Slow(Duration::from_millis(5)));
    let (_, secret) = create(&s, json!({"url": receiver.url, "since": "earliest"}));
    let appended = append(&s, 1_000, "audit", None);
    wait_until(WAIT, "some deliveries", || {
        receiver.acked_events().len() >= 200
    });
    s.kill();
    let at_kill = receiver.acked_events().len();
    assert!(
        at_kill < appended.len(),
        "everything was delivered before the kill"
    );
    let data = s.data.clone();
    let s = Server::start_on(&data, FAST);
    wait_until(WAIT, "delivery after the restart", || {
        receiver.acked_events().len() == appended.len()
    });
    assert_eq!(ids(&receiver.acked_events()), appended);
    // Duplicates only from the crash window: one request of batch 1.
    let delivered: usize = receiver.requests().iter().filter(|r| r.acked).count();
    assert!(
        delivered <= appended.len() + 1,
        "{delivered} acknowledged requests"
    );
    verify_signatures(&secret, &receiver.requests());
    drop(s);
}

#[test]
fn pause_resume_replay_and_delete() {
    let s = Server::start(FAST);
    let witness = Receiver::start(Plan::Ok);
    let target = Receiver::start(Plan::Ok);
    create(&s, json!({"url": witness.url, "since": "earliest"}));
    let (id, secret) = create(&s, json!({"url": target.url, "since": "earliest"}));
    let first = append(&s, 10, "audit", None);
    wait_until(WAIT, "the first events", || {
        target.acked_events().len() == 10
    });

    let paused = patch(&s, &id, json!({"paused": true}));
    assert_eq!(paused["state"], "paused");
    let second = append(&s, 10, "audit", None);
    wait_until(WAIT, "the witness", || witness.acked_events().len() == 20);
    assert_eq!(
        target.acked_events().len(),
        10,
        "a paused webhook delivered"
    );

    assert_eq!(patch(&s, &id, json!({"paused": false}))["state"], "active");
    wait_until(WAIT, "delivery after resume", || {
        target.acked_events().len() == 20
    });
    assert_eq!(
        ids(&target.acked_events()),
        [first.clone(), second.clone()].concat()
    );

    // Replay from the start: every event again, in order.
    let requests_before = target.requests().len();
    let moved = patch(&s, &id, json!({"cursor": "earliest"}));
    assert_eq!(moved["cursor"], "00000000000000000000000000");
    wait_until(WAIT, "the replay", || {
        target.requests().len() == requests_before + 20
    });
    let replayed: Vec<String> = target.requests()[requests_before..]
        .iter()
        .flat_map(events_of)
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(replayed, [first, second].concat());
    verify_signatures(&secret, &target.requests());

    let (status, _) = send(
        &s,
        reqwest::Method::DELETE,
        &format!("/v1/webhooks/{id}"),
        &json!({}),
    );
    assert_eq!(status, 204);
    let seen = target.requests().len();
    append(&s, 10, "audit", None);
    wait_until(WAIT, "the witness", || witness.acked_events().len() == 30);
    assert_eq!(target.requests().len(), seen, "a deleted webhook delivered");
}

#[test]
fn gone_pauses_and_redirects_are_not_followed() {
    let s = Server::start(FAST);
    let gone = Receiver::start(Plan::Status(410));
    let elsewhere = Receiver::start(Plan::Ok);
    let redirecting = Receiver::start(Plan::Redirect(elsewhere.url.clone()));
    let (gone_id, gone_secret) = create(&s, json!({"url": gone.url, "since": "earliest"}));
    let (redirect_id, _) = create(&s, json!({"url": redirecting.url, "since": "earliest"}));
    let appended = append(&s, 5, "audit", None);

    wait_until(WAIT, "the 410 to pause the webhook", || {
        webhook(&s, &gone_id)["state"] == "paused"
    });
    let state = webhook(&s, &gone_id);
    assert!(
        state["last_error"].as_str().unwrap().contains("410"),
        "{state}"
    );
    assert_eq!(state["cursor"], "00000000000000000000000000");
    assert_eq!(state["delivered"], 0);
    assert_eq!(gone.requests().len(), 1, "a paused webhook retried");

    wait_until(WAIT, "redirect retries", || {
        redirecting.requests().len() >= 3
    });
    let state = webhook(&s, &redirect_id);
    assert_eq!(state["state"], "retrying", "{state}");
    assert!(
        state["last_error"].as_str().unwrap().contains("redirect"),
        "{state}"
    );
    assert!(state["next_attempt_at"].is_string() || state["failures"].as_u64().unwrap() >= 3);
    assert_eq!(state["delivered"], 0);
    assert!(elsewhere.requests().is_empty(), "a redirect was followed");
    // Each retry resends the same first event.
    for r in redirecting.requests() {
        assert_eq!(r.headers["webhook-id"], appended[0]);
    }

    // Resumed after the receiver recovers: the same events, from the kept cursor.
    gone.set(Plan::Ok);
    patch(&s, &gone_id, json!({"paused": false}));
    wait_until(WAIT, "delivery after resume", || {
        gone.acked_events().len() == 5
    });
    assert_eq!(ids(&gone.acked_events()), appended);
    assert_eq!(webhook(&s, &gone_id)["last_error"], Value::Null);
    verify_signatures(&gone_secret, &gone.requests());
}

#[test]
fn a_stalled_receiver_blocks_neither_ingest_nor_other_webhooks() {
    // A timeout longer than the test: the stalled webhook holds its one request open
    // throughout while everything else goes on.
    let s = Server::start(&["--webhook-timeout", "120"]);
    let stalled = Receiver::start(Plan::Stall);
    let fast = Receiver::start(Plan::Ok);
    let (stalled_id, _) = create(&s, json!({"url": stalled.url, "since": "earliest"}));
    create(
        &s,
        json!({"url": fast.url, "since": "earliest", "batch": 100}),
    );
    let appended = append(&s, 2_000, "audit", None);
    wait_until(WAIT, "the fast webhook", || {
        fast.acked_events().len() == appended.len()
    });
    assert_eq!(ids(&fast.acked_events()), appended);
    wait_until(WAIT, "the stalled webhook's request", || {
        !stalled.requests().is_empty()
    });
    assert_eq!(
        stalled.requests().len(),
        1,
        "more than one request in flight"
    );
    assert_eq!(webhook(&s, &stalled_id)["delivered"], 0);
    let lag = s.metric(&format!(
        r#"cairn_webhook_lag_events{{webhook="{stalled_id}"}}"#
    ));
    assert_eq!(lag, 2_000.0);
    // Delivery yields the CPU to ingest: its threads run ten nice levels below the
    // server's writer (Linux keeps a nice value per thread; field 19 of `stat`).
    let nice_of = |name: &str| -> Vec<i64> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", s.pid())).expect("tasks");
        tasks
            .filter_map(|t| {
                let dir = t.ok()?.path();
                let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
                let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                // After the `(comm)` field, which may hold spaces: state is field 3.
                let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
                (comm.trim() == name).then(|| fields[16].parse().ok())?
            })
            .collect()
    };
    let writer = nice_of("cairn-writer");
    let delivery = nice_of("cairn-webhooks");
    assert_eq!(writer.len(), 1, "one writer thread");
    assert_eq!(
        delivery,
        vec![writer[0] + 10],
        "the delivery thread's nice value"
    );
    // A request in flight does not hold up a clean shutdown.
    let mut s = s;
    assert!(s.terminate().success());
}

#[test]
fn cli_manages_webhooks_offline_and_through_the_server() {
    let mut s = Server::start(FAST);
    let receiver = Receiver::start(Plan::Ok);
    let appended = append(&s, 3, "audit", None);
    s.terminate();
    let data = s.data.to_str().unwrap().to_string();
    let (code, secret, err) = common::cairn(
        &[
            "webhook",
            "create",
            "--url",
            &receiver.url,
            "--since",
            "earliest",
            "--data",
            &data,
            "--name",
            "cli",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(secret.trim().starts_with("whsec_"));
    let (code, listed, err) = common::cairn(&["webhook", "list", "--data", &data], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        listed.contains("cli") && listed.contains(&receiver.url),
        "{listed}"
    );
    let (code, _, err) = common::cairn(
        &[
            "webhook",
            "create",
            "--url",
            "gopher://x",
            "--batch",
            "0",
            "--data",
            &data,
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("url") && err.contains("batch"), "{err}");

    // The server starts the stored webhook's task.
    let s = Server::start_on(std::path::Path::new(&data), FAST);
    wait_until(WAIT, "delivery", || receiver.acked_events().len() == 3);
    assert_eq!(ids(&receiver.acked_events()), appended);
    let url = s.url("");
    let remote = ["--url", url.as_str(), "--token", s.token.as_str()];
    let (code, listed, err) = common::cairn(&[&["webhook", "list"][..], &remote].concat(), &[]);
    assert_eq!(code, 0, "{err}");
    let id = listed
        .lines()
        .nth(1)
        .unwrap()
        .split('\t')
        .next()
        .unwrap()
        .to_string();
    let (code, _, err) = common::cairn(&[&["webhook", "pause", &id][..], &remote].concat(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(webhook(&s, &id)["state"], "paused");
    let (code, _, err) = common::cairn(
        &[
            &["webhook", "replay", &id, "--since", "earliest"][..],
            &remote,
        ]
        .concat(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = common::cairn(&[&["webhook", "resume", &id][..], &remote].concat(), &[]);
    assert_eq!(code, 0, "{err}");
    wait_until(WAIT, "the replay", || receiver.requests().len() == 6);
    let (code, shown, err) = common::cairn(&[&["webhook", "show", &id][..], &remote].concat(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&shown).unwrap()["delivered"],
        6
    );
    let (code, _, err) = common::cairn(&[&["webhook", "delete", &id][..], &remote].concat(), &[]);
    assert_eq!(code, 0, "{err}");
    let (status, _) = s.get(&format!("/v1/webhooks/{id}"));
    assert_eq!(status, 404);
    let (code, secret, err) = common::cairn(
        &[
            "webhook",
            "create",
            "--url",
            &receiver.url,
            "--server",
            &url,
            "--token",
            &s.token,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(secret.trim().starts_with("whsec_"));
}

#[test]
fn a_cursor_newer_than_the_head_waits_for_newer_events() {
    let s = Server::start(FAST);
    let witness = Receiver::start(Plan::Ok);
    let future = Receiver::start(Plan::Ok);
    create(&s, json!({"url": witness.url, "since": "earliest"}));
    // A ULID of the year 10889: after every event this log will hold.
    let (id, _) = create(
        &s,
        json!({"url": future.url, "since": "7ZZZZZZZZZZZZZZZZZZZZZZZZZ"}),
    );
    append(&s, 20, "audit", None);
    wait_until(WAIT, "the witness", || witness.acked_events().len() == 20);
    assert!(future.requests().is_empty(), "delivered before its cursor");
    let state = webhook(&s, &id);
    assert_eq!(state["cursor"], "7ZZZZZZZZZZZZZZZZZZZZZZZZZ");
    assert_eq!(state["state"], "active");
    let lag = s.metric(&format!(r#"cairn_webhook_lag_events{{webhook="{id}"}}"#));
    assert_eq!(lag, 0.0);
}

/// SPEC §7/§8: a webhook whose cursor fell behind the retention horizon continues at
/// the horizon, and its state counts exactly what it passed over (`skipped`, said in
/// `last_error` too), stored with the cursor: a SIGKILL and restart keep both.
#[test]
fn skipped_by_retention_is_counted_and_survives_a_crash() {
    let flags = [FAST, &["--checkpoint-interval", "1"]].concat();
    let mut s = Server::start(&flags);
    let receiver = Receiver::start(Plan::Ok);
    let (id, secret) = create(
        &s,
        json!({"url": receiver.url, "since": "earliest", "batch": 50}),
    );
    let first = append(&s, 100, "audit", None);
    wait_until(WAIT, "the first events", || {
        receiver.acked_events().len() == 100
    });
    assert_eq!(patch(&s, &id, json!({"paused": true}))["state"], "paused");
    // Separate requests: separate chunks, so the prune can stop between them.
    let second: Vec<String> = (0..5)
        .flat_map(|_| append(&s, 100, "audit", None))
        .collect();
    let head = s.head()["seq"].as_u64().unwrap();
    wait_until(WAIT, "a checkpoint covering the head", || {
        s.get_text("/v1/checkpoint")
            .1
            .lines()
            .nth(1)
            .and_then(|l| l.parse::<u64>().ok())
            .is_some_and(|size| size >= head)
    });
    let (code, out, err) = s.cairn(&["prune", "--before", &second[349]]);
    assert_eq!(code, 0, "{out}{err}");
    let horizon = s.head()["first_seq"].as_u64().unwrap();
    assert!(horizon > 101 && horizon <= 501, "horizon at {horizon}");
    let expected = horizon - 101;

    assert_eq!(patch(&s, &id, json!({"paused": false}))["state"], "active");
    let last = second.last().unwrap().clone();
    wait_until(WAIT, "delivery up to the head", || {
        webhook(&s, &id)["cursor"] == last.as_str()
    });
    let retained = &second[(horizon - 101) as usize..];
    assert_eq!(
        ids(&receiver.acked_events()),
        [first.as_slice(), retained].concat(),
        "not exactly the first events, then everything from the horizon"
    );
    let shown = webhook(&s, &id);
    assert_eq!(shown["skipped"].as_u64(), Some(expected), "{shown}");
    let note = shown["last_error"].as_str().unwrap_or_default().to_string();
    assert!(
        note.contains(&format!("removed {expected} events")),
        "{shown}"
    );

    s.kill();
    let data = s.data.clone();
    let s = Server::start_on(&data, FAST);
    let shown = webhook(&s, &id);
    assert_eq!(shown["skipped"].as_u64(), Some(expected), "{shown}");
    assert_eq!(shown["cursor"], last.as_str(), "{shown}");
    assert_eq!(shown["last_error"].as_str(), Some(note.as_str()));
    // Delivery goes on after the restart without counting the skip again.
    let third = append(&s, 10, "audit", None);
    wait_until(WAIT, "delivery after the restart", || {
        webhook(&s, &id)["cursor"] == third.last().unwrap().as_str()
    });
    assert_eq!(webhook(&s, &id)["skipped"].as_u64(), Some(expected));
    verify_signatures(&secret, &receiver.requests());
}
