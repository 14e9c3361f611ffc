//! Start-up: the chain of the newest events is re-checked, and a log altered outside
//! cairn is refused with a clear message (never a panic), leaving the data untouched.
mod common;

use std::process::Command;

use cairn::store::{CommitBatch, DataDir, Store};
use common::{BIN, Server, cairn};
use serde_json::json;

/// Rewrites event `seq` of the first chunk with `edit` applied to its line, the way a
/// tamperer with write access to the data directory could.
fn tamper(data: &std::path::Path, seq: u64, edit: impl Fn(&str) -> String) {
    let store = Store::open(DataDir::lock(data).expect("lock")).expect("open");
    let mut events: Vec<_> = store
        .scan_from_seq(1)
        .expect("scan")
        .collect::<Result<_, _>>()
        .expect("read");
    let target = events.iter_mut().find(|e| e.seq == seq).expect("event");
    target.line = edit(&target.line).into();
    // A small first request of a fresh log is stored as one chunk keyed by its first id,
    // so writing the events again replaces it.
    let mut batch = CommitBatch::default();
    batch.add_events(&events);
    store.apply(batch).expect("apply");
    store.sync().expect("sync");
}

#[test]
fn an_edited_event_stops_the_server_from_starting() {
    let mut s = Server::start(&[]);
    let events: Vec<_> = (0..20)
        .map(|i| json!({"type": "audit", "data": {"n": i}}))
        .collect();
    let (status, body) = s.post_json(&json!({ "events": events }));
    assert_eq!(status, 201, "{body}");
    assert!(s.terminate().success());
    let data = s.data.clone();

    tamper(&data, 7, |line| line.replace(r#""n":6"#, r#""n":66"#));

    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .output()
        .expect("run serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a broken log must not be served: {stderr}"
    );
    assert!(stderr.contains("broken at seq 7"), "{stderr}");
    assert!(stderr.contains("cairn verify --data"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Offline verify names the same seq; the data is left as it was.
    let (code, _, err) = cairn(&["verify", "--data", data.to_str().expect("utf-8")], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("seq 7"), "{err}");
}

#[test]
fn a_relinked_event_is_caught_too() {
    // Recomputing an edited event's own hash is not enough: the next prev_hash breaks.
    let mut s = Server::start(&[]);
    let events: Vec<_> = (0..5)
        .map(|i| json!({"type": "audit", "data": {"n": i}}))
        .collect();
    assert_eq!(s.post_json(&json!({ "events": events })).0, 201);
    assert!(s.terminate().success());
    let data = s.data.clone();

    tamper(&data, 3, |line| {
        let edited = line.replace(r#""n":2"#, r#""n":22"#);
        let info = cairn::chain::inspect_line(edited.as_bytes()).expect("parse");
        let old = cairn::chain::hex_str(&info.stated_hash).to_string();
        let new = cairn::chain::hex_str(&info.computed_hash).to_string();
        edited.replace(&old, &new)
    });

    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .output()
        .expect("run serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("broken at seq 4"), "{stderr}");
}

#[test]
fn restart_keeps_the_head_and_ids_keep_increasing() {
    let mut s = Server::start(&[]);
    let (_, first) = s.post_json(&json!({"type": "a"}));
    let head_before = s.head();
    assert!(s.terminate().success());
    let data = s.data.clone();
    let s2 = Server::start_on(&data, &[]);
    assert_eq!(s2.head(), head_before);
    let (status, second) = s2.post_json(&json!({"type": "b"}));
    assert_eq!(status, 201);
    assert_eq!(second["data"]["first_seq"], 2);
    assert!(second["data"]["ids"][0].as_str() > first["data"]["ids"][0].as_str());
    let (_, page) = s2.get("/v1/events?limit=2");
    assert_eq!(page["data"][1]["prev_hash"], head_before["hash"]);
}

#[test]
fn sync_none_still_flushes_on_graceful_shutdown() {
    let mut s = Server::start(&["--sync", "none"]);
    let events: Vec<_> = (0..500)
        .map(|i| json!({"type": "audit", "data": {"n": i}}))
        .collect();
    assert_eq!(s.post_json(&json!({ "events": events })).0, 201);
    let head = s.head();
    assert!(s.terminate().success());
    let data = s.data.clone();
    let s2 = Server::start_on(&data, &[]);
    assert_eq!(
        s2.head(),
        head,
        "acknowledged events are on disk after SIGTERM"
    );
}
