//! Start-up: the chain of the newest events is re-checked, and a log altered outside
//! cairn is refused with a clear message (never a panic), leaving the data untouched.
mod common;

use std::ffi::OsStr;
use std::process::Command;
use std::time::Duration;

use cairn::store::{CommitBatch, DataDir, Store};
use common::{BIN, Server, cairn, run_bounded};
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

/// `cairn serve` that must fail at start: returns its exit code and stderr.
fn serve_fails(data: &std::path::Path, as_nobody: bool) -> (i32, String) {
    let mut command = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    let out = command
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .output()
        .expect("run cairn serve");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// As root, permissions do not stop writes: run as `nobody` (setpriv) to meet a
/// directory it may not write, the way a misconfigured service account would.
fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[test]
fn an_unusable_data_directory_is_a_clear_start_up_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A path through a regular file cannot be created.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (code, err) = serve_fails(&file.join("data"), false);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("a-file/data") && err.contains("Not a directory"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // A directory the server may not write: one it would create, and one holding a log.
    let as_nobody = running_as_root();
    use std::os::unix::fs::PermissionsExt;
    let locked = tmp.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    let existing = locked.join("existing");
    let mut s = Server::start_on(&existing, &[]);
    assert_eq!(s.post_json(&json!({"type": "kept"})).0, 201);
    s.terminate();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o555)).unwrap();
    for data in [locked.join("new"), existing.clone()] {
        let (code, err) = serve_fails(&data, as_nobody);
        assert_eq!(code, 1, "{}: {err}", data.display());
        assert!(
            err.contains(&data.display().to_string()) && err.contains("Permission denied"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The log is untouched.
    let s = Server::start_on(&existing, &[]);
    assert_eq!(s.head()["seq"], 1);
}

#[test]
fn an_interval_of_zero_or_over_a_day_is_refused_at_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let flags = ["--heartbeat", "--write-timeout", "--checkpoint-interval"];
    for (flag, value) in flags.iter().flat_map(|f| [(*f, "0"), (*f, "86401")]) {
        let args = ["serve", "--listen", "127.0.0.1:0", flag, value, "--data"];
        let mut args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        args.push(data.as_os_str());
        // A server that accepted the flag would run until killed (and fail the test).
        let (code, stderr) = run_bounded(&args, Duration::from_secs(20));
        assert_eq!(code, Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
        assert!(!data.exists(), "{flag} {value} created the data directory");
    }
}

#[test]
fn a_request_stuck_mid_body_does_not_keep_sigterm_from_exiting() {
    let mut s = Server::start(&[]);
    let mut stuck = std::net::TcpStream::connect(&s.addr).expect("connect");
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"type\":",
        s.token
    );
    std::io::Write::write_all(&mut stuck, head.as_bytes()).expect("send");
    // Connections are accepted in order: once a later one is served, this one is in.
    assert_eq!(s.get("/healthz").0, 200);
    // The body never completes; the server waits out its grace period, then exits.
    let status = s.terminate();
    assert!(status.success(), "{status:?}");
    drop(stuck);
}

/// sled's settings file (`log/conf`) torn by a power cut, as seen in a power-loss probe:
/// the events are intact, so the server sets the file aside, rewrites it, and serves them.
#[test]
fn a_damaged_sled_settings_file_does_not_keep_intact_events_from_serving() {
    let mut s = Server::start(&[]);
    let events: Vec<_> = (0..50)
        .map(|i| json!({"type": "audit", "data": {"n": i}}))
        .collect();
    let (status, body) = s.post_json(&json!({ "events": events }));
    assert_eq!(status, 201, "{body}");
    let exported = s.export_lines();
    assert!(s.terminate().success());
    let data = s.data.clone();
    let settings = data.join("log/conf");
    let intact = std::fs::read(&settings).expect("read log/conf");
    assert!(intact.len() > 12, "sled wrote its settings file");

    let damages: [(&str, Vec<u8>); 3] = [
        ("torn (cut short)", intact[..intact.len() - 7].to_vec()),
        ("a flipped byte", {
            let mut bytes = intact.clone();
            bytes[3] ^= 0x20;
            bytes
        }),
        ("garbage", vec![0xff; 40]),
    ];
    for (damage, bytes) in damages {
        std::fs::write(&settings, &bytes).expect("damage log/conf");
        let mut s = Server::start_on(&data, &[]);
        assert_eq!(
            s.export_lines(),
            exported,
            "{damage}: every event is served"
        );
        let log = s.log_text();
        assert!(
            log.contains("settings file was damaged"),
            "{damage}: the log says what happened: {log}"
        );
        assert_eq!(
            std::fs::read(data.join("log/conf.damaged")).expect("set aside"),
            bytes,
            "{damage}: the damaged file is kept for inspection"
        );
        assert_eq!(
            std::fs::read(&settings).expect("rewritten"),
            intact,
            "{damage}: rewritten exactly as sled first wrote it"
        );
        assert!(s.terminate().success());
    }

    // An intact file is left alone and nothing is said about it.
    std::fs::remove_file(data.join("log/conf.damaged")).expect("remove");
    let mut s = Server::start_on(&data, &[]);
    assert_eq!(s.export_lines(), exported);
    assert!(!s.log_text().contains("settings file"), "{}", s.log_text());
    assert!(!data.join("log/conf.damaged").exists());
    assert!(s.terminate().success());
}
