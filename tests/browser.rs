//! The dashboard (`GET /`, SPEC §2 "Operations") in a real headless Chromium.
//!
//! Each test starts the real server, opens the page in Debian's Chromium through a small
//! Playwright bridge (`tests/browser/driver.mjs`), appends events over HTTP and waits for
//! what the page shows. All assertions live here; the bridge only clicks, types, reads the
//! DOM and takes screenshots, which land in `target/tmp/dashboard-*.png`.
//!
//! Needs `/usr/bin/chromium` (or `$CHROMIUM`), Node.js and `npm ci` in `tests/browser`;
//! `.ci/run` installs them and sets `CAIRN_BROWSER_TESTS=required`, so that CI fails
//! rather than skips when they are missing. Elsewhere the tests say they skipped.
mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use common::Server;
use serde::Deserialize;
use serde_json::{Value, json};

/// How long the page gets to show something (gap fills wait up to ~2 s by design).
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// The Playwright bridge: one JSON command per line in, one JSON reply per line out.
struct Browser {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: Receiver<String>,
}

impl Browser {
    /// Starts Chromium, or returns `None` (saying why) when the tools are not installed
    /// and `CAIRN_BROWSER_TESTS` is not `required`.
    fn launch() -> Option<Browser> {
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let mut missing = Vec::new();
        if !Path::new(&chromium).exists() {
            missing.push(chromium.clone());
        }
        if !browser_dir().join("node_modules/playwright-core").exists() {
            missing.push("tests/browser/node_modules (npm ci)".to_string());
        }
        if Command::new("node")
            .arg("--version")
            .output()
            .map_or(true, |o| !o.status.success())
        {
            missing.push("node".to_string());
        }
        if !missing.is_empty() {
            let msg = format!(
                "browser tests need {}: run .ci/run, or `apt-get install chromium` and \
                 `npm ci --prefix tests/browser`",
                missing.join(", ")
            );
            if std::env::var("CAIRN_BROWSER_TESTS").as_deref() == Ok("required") {
                panic!("{msg}");
            }
            eprintln!("SKIPPED: {msg}");
            return None;
        }
        let mut child = Command::new("node")
            .arg("driver.mjs")
            .current_dir(browser_dir())
            .env("CHROMIUM", &chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node driver.mjs");
        let stdout = child.stdout.take().expect("driver stdout");
        let (tx, replies) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Some(Browser {
            child,
            stdin,
            replies,
        })
    }

    /// Sends one command and returns its value; panics with the bridge's error.
    fn call(&mut self, command: Value) -> Value {
        let stdin = self.stdin.as_mut().expect("driver stdin");
        writeln!(stdin, "{command}").expect("write to the driver");
        stdin.flush().expect("flush the driver");
        let line = self
            .replies
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no answer from the browser to {command}"));
        let reply: Value = serde_json::from_str(&line).expect("driver reply is JSON");
        assert_eq!(
            reply["ok"], true,
            "browser command {command} failed: {}",
            reply["error"]
        );
        reply["value"].clone()
    }

    fn open(&mut self, url: &str) {
        self.call(json!({"op": "open", "url": url}));
    }

    fn click(&mut self, selector: &str) {
        self.call(json!({"op": "click", "selector": selector}));
    }

    fn fill(&mut self, selector: &str, value: &str) {
        self.call(json!({"op": "fill", "selector": selector, "value": value}));
    }

    fn eval(&mut self, js: &str) -> Value {
        self.call(json!({"op": "eval", "js": js}))
    }

    /// Polls `js` until it returns something other than `null`; panics after the timeout.
    fn wait_js(&mut self, what: &str, js: &str) -> Value {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            let value = self.eval(js);
            if !value.is_null() {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {PAGE_TIMEOUT:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the page shows now.
    fn view(&mut self) -> View {
        serde_json::from_value(self.eval(VIEW_JS)).expect("view shape")
    }

    /// Polls the page until `cond` holds for what it shows; panics with the last view.
    fn wait_view(&mut self, what: &str, mut cond: impl FnMut(&View) -> bool) -> View {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            let view = self.view();
            if cond(&view) {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {PAGE_TIMEOUT:?} waiting for the page to show {what}; it shows {view:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes a PNG of the viewport to `target/tmp/` and checks it is one.
    fn screenshot(&mut self, name: &str) -> PathBuf {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        self.call(json!({"op": "screenshot", "path": path}));
        let bytes = std::fs::read(&path).expect("screenshot written");
        assert!(
            bytes.len() > 1000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{} is not a PNG",
            path.display()
        );
        eprintln!("screenshot: {}", path.display());
        path
    }

    fn assert_no_page_errors(&mut self) {
        let errors = self.call(json!({"op": "errors"}));
        assert_eq!(errors, json!([]), "the page threw");
    }
}

impl Drop for Browser {
    /// Closing stdin makes the bridge close Chromium and exit; kill it only if it hangs.
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const VIEW_JS: &str = r##"(() => {
  const $ = (id) => document.getElementById(id);
  const rows = [...document.querySelectorAll("#feed > li")];
  return {
    state: $("state").textContent,
    resume: $("resume").textContent,
    head: $("head").textContent,
    shown: $("shown").textContent,
    paused: $("paused-info").textContent,
    verify: $("verify-result").textContent,
    seqs: rows.map((li) => Number(li.dataset.seq)),
    types: rows.map((li) => li.querySelector(".t-type").textContent),
    sources: rows.map((li) => li.querySelector(".t-source").textContent),
  };
})()"##;

/// The parts of the page the tests read.
#[derive(Debug, Deserialize)]
struct View {
    state: String,
    resume: String,
    head: String,
    shown: String,
    paused: String,
    verify: String,
    /// Row seqs, top to bottom.
    seqs: Vec<u64>,
    types: Vec<String>,
    sources: Vec<String>,
}

/// A read token for the page (it never needs more).
fn read_token(s: &Server) -> String {
    let (status, body) = s.post(
        "/v1/tokens",
        "application/json",
        json!({"role": "read", "name": "dashboard"}).to_string(),
    );
    assert_eq!(status, 201, "{body}");
    body["data"]["token"].as_str().expect("token").to_string()
}

/// Appends events given as (type, source); returns their seqs.
fn append(s: &Server, events: &[(&str, &str)]) -> Vec<u64> {
    let body: String = events
        .iter()
        .enumerate()
        .map(|(i, (event_type, source))| {
            json!({"type": event_type, "source": source, "data": {"n": i, "note": "from the browser test"}})
                .to_string()
                + "\n"
        })
        .collect();
    let (status, reply) = s.post("/v1/events", "application/x-ndjson", body);
    assert_eq!(status, 201, "{reply}");
    let (first, last) = (&reply["data"]["first_seq"], &reply["data"]["last_seq"]);
    (first.as_u64().expect("first_seq")..=last.as_u64().expect("last_seq")).collect()
}

/// Seqs of the log's events whose (type, source) pass `keep`, newest first, as the
/// page lists them.
fn log_seqs(s: &Server, keep: impl Fn(&str, &str) -> bool) -> Vec<u64> {
    let mut seqs: Vec<u64> = s
        .export_lines()
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).expect("export line"))
        .filter(|e| {
            keep(
                e["type"].as_str().unwrap_or(""),
                e["source"].as_str().unwrap_or(""),
            )
        })
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    seqs.reverse();
    seqs
}

#[test]
fn page_shows_new_events_filters_pauses_and_verifies() {
    let Some(mut browser) = Browser::launch() else {
        return;
    };
    let s = Server::start(&[]);
    let token = read_token(&s);
    append(
        &s,
        &[("agent.tool_call", "agent-1"), ("net.dns", "resolver")],
    );

    browser.open(&format!("{}?token={token}", s.url("/")));
    let view = browser.wait_view("the recent history, live", |v| {
        v.state == "live" && v.seqs == [2, 1]
    });
    assert_eq!(view.types, ["net.dns", "agent.tool_call"]);
    assert_eq!(view.sources, ["resolver", "agent-1"]);
    // The token leaves the address bar for sessionStorage.
    let kept = browser.eval("[location.href, sessionStorage.getItem('cairn.token')]");
    assert!(
        !kept[0].as_str().expect("href").contains("token="),
        "{kept}"
    );
    assert_eq!(kept[1], json!(token));

    // Appended after load, including a type the page has never seen (SSE names frames by
    // type, so the page must learn it), newest first.
    append(
        &s,
        &[
            ("agent.tool_call", "agent-2"),
            ("audit.login", "sso"),
            ("audit.logout", "sso"),
            ("net.dns", "resolver"),
        ],
    );
    let all = log_seqs(&s, |_, _| true);
    assert_eq!(all, [6, 5, 4, 3, 2, 1]);
    let view = browser.wait_view("the events appended after load", |v| v.seqs == all);
    assert_eq!(
        view.types,
        [
            "net.dns",
            "audit.logout",
            "audit.login",
            "agent.tool_call",
            "net.dns",
            "agent.tool_call"
        ]
    );
    assert!(view.head.starts_with("seq 6 · "), "{}", view.head);

    // A row expands to the full event, hash and prev_hash included.
    browser.click("#feed li[data-seq='5'] summary");
    // The row fills in its JSON on the `toggle` event, which fires a moment after the click.
    let shown = browser.wait_js(
        "the expanded JSON of seq 5",
        "document.querySelector(\"#feed li[data-seq='5'] pre\")?.textContent ?? null",
    );
    let shown: Value = serde_json::from_str(shown.as_str().expect("pre text")).expect("JSON");
    let stored: Value =
        serde_json::from_str(&s.export_lines()[4]).expect("the 5th event of the export");
    assert_eq!(shown, stored, "the expanded row is the stored event");
    assert!(shown["hash"].is_string() && shown["prev_hash"].is_string());

    // Type filter, prefix and exact; source filter; both cleared.
    browser.fill("#f-types", "audit*");
    let audit = log_seqs(&s, |t, _| t.starts_with("audit"));
    browser.wait_view("only audit.* rows", |v| v.seqs == audit);
    browser.fill("#f-types", "agent.tool_call, net.dns");
    let exact = log_seqs(&s, |t, _| t == "agent.tool_call" || t == "net.dns");
    browser.wait_view("only the two exact types", |v| v.seqs == exact);
    // While filtered, new events show only if they match.
    append(&s, &[("audit.login", "sso"), ("net.dns", "resolver")]);
    let exact = log_seqs(&s, |t, _| t == "agent.tool_call" || t == "net.dns");
    assert_eq!(exact[0], 8);
    browser.wait_view("a new matching event, not the other", |v| v.seqs == exact);
    browser.fill("#f-types", "");
    browser.fill("#f-source", "resolver");
    let resolver = log_seqs(&s, |_, source| source == "resolver");
    browser.wait_view("only source resolver", |v| v.seqs == resolver);
    browser.fill("#f-source", "");
    let all = log_seqs(&s, |_, _| true);
    browser.wait_view("every row again", |v| v.seqs == all);

    // Pause holds new events back without losing them; resume shows them.
    browser.click("#pause");
    append(
        &s,
        &[("agent.tool_call", "agent-3"), ("audit.login", "sso")],
    );
    let view = browser.wait_view("two events buffered while paused", |v| {
        v.paused == "Paused: 2 new events buffered"
    });
    assert_eq!(view.seqs, all, "paused: the rows do not change");
    browser.click("#pause");
    let all = log_seqs(&s, |_, _| true);
    assert_eq!(all.len(), 10);
    browser.wait_view("the buffered events after resume", |v| {
        v.seqs == all && v.paused.is_empty()
    });

    browser.click("#verify");
    browser.wait_view("the verify result", |v| {
        v.verify == "chain ok: 10 events checked (head seq 10)"
    });

    browser.screenshot("dashboard-light.png");
    browser.call(json!({"op": "scheme", "value": "dark"}));
    browser.screenshot("dashboard-dark.png");
    browser.assert_no_page_errors();
}

#[test]
fn page_reconnects_after_restarts_and_shows_each_event_once() {
    let Some(mut browser) = Browser::launch() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = common::free_port();
    let mut server = Server::start_fixed(&data, port);
    let token = read_token(&server);
    append(&server, &[("agent.tool_call", "agent-1"); 20]);

    browser.open(&format!("{}?token={token}", server.url("/")));
    browser.wait_view("the history, live", |v| {
        v.state == "live" && v.seqs.len() == 20
    });

    // One event at a time from another thread, through the kills and restarts; only
    // acknowledged ones count. The total stays under the page's 500-row cap.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicU64::new(20));
    let appender = {
        let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
        let (url, admin) = (server.url("/v1/events"), server.token.clone());
        std::thread::spawn(move || {
            let http = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("client");
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && acknowledged.load(Ordering::Relaxed) < 400 {
                let event_type = ["agent.tool_call", "audit.login", "net.dns"][n % 3];
                n += 1;
                let sent = http
                    .post(&url)
                    .bearer_auth(&admin)
                    .json(&json!({"type": event_type, "source": "load", "data": {"n": n}}))
                    .send();
                if sent.is_ok_and(|r| r.status() == 201) {
                    acknowledged.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(15));
            }
        })
    };
    let wait_for_more = |browser: &mut Browser, what: &str| {
        let target = acknowledged.load(Ordering::Relaxed) + 20;
        common::wait_until(PAGE_TIMEOUT, "more acknowledged events", || {
            acknowledged.load(Ordering::Relaxed) >= target
        });
        browser.wait_view(what, |v| v.seqs.len() as u64 >= target);
    };
    wait_for_more(&mut browser, "live events before the first restart");

    for (round, how) in ["SIGKILL", "SIGTERM"].iter().enumerate() {
        let before = browser.view().resume;
        if *how == "SIGKILL" {
            server.kill();
        } else {
            let status = server.terminate();
            assert!(status.success(), "SIGTERM: exit {status}");
        }
        server = Server::start_fixed(&data, port);
        let view = browser.wait_view("the page resumed", |v| {
            v.state == "live" && v.resume.starts_with("resumed from ") && v.resume != before
        });
        eprintln!("after {how} (round {round}): {}", view.resume);
        wait_for_more(&mut browser, "live events after the restart");
    }
    stop.store(true, Ordering::Relaxed);
    appender.join().expect("appender");

    let all = log_seqs(&server, |_, _| true);
    let view = browser.wait_view("every logged event", |v| v.seqs.len() >= all.len());
    assert_eq!(
        view.seqs, all,
        "each logged event exactly once, newest first (duplicates or gaps otherwise)"
    );
    assert!(all.len() as u64 >= acknowledged.load(Ordering::Relaxed));
    assert_eq!(
        view.shown,
        format!("showing {0} of the {0} newest events", all.len())
    );
    browser.screenshot("dashboard-after-restarts.png");
    browser.assert_no_page_errors();
}

/// The page's JS heap after a full garbage collection, in bytes.
fn heap_after_gc(browser: &mut Browser) -> u64 {
    browser
        .eval("(gc(), gc(), performance.memory.usedJSHeapSize)")
        .as_u64()
        .expect("usedJSHeapSize")
}

#[test]
fn page_keeps_up_with_2000_events_per_second_in_bounded_memory() {
    const RATE_BATCH: usize = 100; // every 50 ms: 2,000 events/s
    const ROUNDS: usize = 100; // 10,000 events per phase
    let Some(mut browser) = Browser::launch() else {
        return;
    };
    let s = Server::start(&[]);
    let token = read_token(&s);
    browser.open(&format!("{}?token={token}", s.url("/")));
    browser.wait_view("live", |v| v.state == "live");
    // Long main-thread tasks, for the figure printed at the end.
    browser.eval(
        "window.longest = 0; new PerformanceObserver((l) => { for (const e of l.getEntries()) \
         window.longest = Math.max(window.longest, e.duration); }).observe({ type: 'longtask' })",
    );
    let types = ["agent.tool_call", "audit.login", "net.dns", "agent.reply"];
    let flood = |phase: usize| -> u64 {
        let mut last = 0;
        for round in 0..ROUNDS {
            let started = Instant::now();
            let batch: Vec<(&str, &str)> = (0..RATE_BATCH)
                .map(|i| (types[(phase + round + i) % types.len()], "flood"))
                .collect();
            last = *append(&s, &batch).last().expect("appended");
            std::thread::sleep(Duration::from_millis(50).saturating_sub(started.elapsed()));
        }
        last
    };

    let last = flood(0);
    let view = browser.wait_view("the newest event of the first 10,000", |v| {
        v.seqs.first() == Some(&last)
    });
    assert_eq!(view.seqs.len(), 500, "the rendered rows are capped");
    let longest_first = browser.eval("window.longest").as_f64().unwrap_or(0.0);
    let warm = heap_after_gc(&mut browser);
    browser.eval("window.longest = 0"); // gc() itself is a long task

    let last = flood(1);
    let view = browser.wait_view("the newest event of the next 10,000", |v| {
        v.seqs.first() == Some(&last)
    });
    let expected: Vec<u64> = (last - 499..=last).rev().collect();
    assert_eq!(view.seqs, expected, "the 500 newest, in order, once each");
    assert_eq!(
        view.shown,
        "showing 500 of the 5000 newest events (at most 500 rows)"
    );
    let after = heap_after_gc(&mut browser);
    let longest = browser.eval("window.longest").as_f64().unwrap_or(0.0);
    eprintln!(
        "JS heap after GC: {:.1} MB after 10,000 events, {:.1} MB after 20,000; \
         longest main-thread task {longest_first:.0} ms in the first 10,000, {longest:.0} ms in the next",
        warm as f64 / 1e6,
        after as f64 / 1e6
    );
    // Another 10,000 events through a warm page must not cost memory: everything it
    // keeps is capped (rows, kept events, buffers).
    assert!(
        after < warm + 2_000_000,
        "the page's heap grew from {warm} to {after} bytes over 10,000 more events"
    );
    browser.assert_no_page_errors();
}

/// The header shows one line per webhook, its state and lag, to a token that may list
/// webhooks (admin), and nothing to a read token.
#[test]
fn page_shows_each_webhook_state_and_lag_to_an_admin() {
    let Some(mut browser) = Browser::launch() else {
        return;
    };
    let s = Server::start(&["--webhook-retry-initial", "0.05"]);
    // Nothing listens here: every delivery fails, so the webhook keeps retrying.
    let closed = format!("http://127.0.0.1:{}/hook", common::free_port());
    for name in ["siem", "pipeline"] {
        let (status, body) = s.post(
            "/v1/webhooks",
            "application/json",
            json!({"url": closed, "name": name, "since": "earliest"}).to_string(),
        );
        assert_eq!(status, 201, "{body}");
        if name == "pipeline" {
            let id = body["data"]["id"].as_str().expect("id");
            let paused = s
                .http()
                .patch(s.url(&format!("/v1/webhooks/{id}")))
                .bearer_auth(&s.token)
                .header("content-type", "application/json")
                .body(r##"{"paused":true}"##)
                .send()
                .expect("patch");
            assert_eq!(paused.status(), 200);
        }
    }
    append(
        &s,
        &[
            ("audit.login", "sso"),
            ("audit.logout", "sso"),
            ("net.dns", "resolver"),
        ],
    );

    browser.open(&format!("{}?token={}", s.url("/"), s.token));
    let lines = browser.wait_js(
        "a line per webhook with its state and lag",
        r##"(() => {
            if (document.getElementById("hooks").hidden) return null;
            const lines = [...document.querySelectorAll("#hooks .hook")].map((d) => d.textContent).sort();
            return lines.length === 2 && lines.every((l) => l.includes("lag 3")) && lines.some((l) => l.includes("retrying")) ? lines : null;
        })()"##,
    );
    assert_eq!(
        lines,
        json!([
            "Webhook pipeline: paused, lag 3",
            "Webhook siem: retrying, lag 3"
        ])
    );
    browser.screenshot("dashboard-webhooks.png");

    // A read token may not list webhooks: after the page has polled, the panel is hidden.
    let token = read_token(&s);
    browser.open(&format!("{}?token={token}", s.url("/")));
    let hidden = browser.wait_js(
        "the page to poll the webhooks",
        r##"(() => { const h = document.getElementById("hooks"); return h.dataset.polls ? h.hidden : null; })()"##,
    );
    assert_eq!(hidden, json!(true));
    assert_eq!(
        browser.eval("document.querySelectorAll('#hooks .hook').length"),
        json!(0)
    );
}
