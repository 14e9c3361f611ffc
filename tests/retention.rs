//! Retention (SPEC §8) against the real server: bounds settle at chunk granularity, the
//! horizon is reported everywhere, proofs outlive pruned events, reads from before the
//! horizon say so, archives plus an export verify, a kill between archive and removal
//! loses nothing, and the manual prune works offline and remotely.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{Server, archives_then, auditor, cairn, wait_until};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(20);

/// Appends `n` events in requests of `per` (each request becomes its own chunks).
fn append(server: &Server, n: usize, per: usize) {
    let mut left = n;
    while left > 0 {
        let k = left.min(per);
        let events: Vec<Value> = (0..k)
            .map(|i| json!({"type": "t", "data": {"i": i, "pad": "x".repeat(64)}}))
            .collect();
        let (status, body) = server.post_json(&json!({ "events": events }));
        assert_eq!(status, 201, "{body}");
        left -= k;
    }
}

/// Appends `requests` requests of `per` events padded with `pad` bytes; their ids.
fn append_padded(server: &Server, requests: usize, per: usize, pad: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..requests {
        let events: Vec<Value> = (0..per)
            .map(|i| json!({"type": "t", "data": {"i": i, "pad": "x".repeat(pad)}}))
            .collect();
        let (status, body) = server.post_json(&json!({ "events": events }));
        assert_eq!(status, 201, "{body}");
        ids.extend(
            body["data"]["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string()),
        );
    }
    ids
}

/// Waits until a checkpoint covers the head.
fn wait_checkpoint_covers_head(server: &Server) {
    let head = server.head()["seq"].as_u64().unwrap();
    wait_until(SETTLE, "a checkpoint covering the head", || {
        checkpoint_size(&server.get_text("/v1/checkpoint").1) >= head
    });
}

fn checkpoint_size(note: &str) -> u64 {
    note.lines()
        .nth(1)
        .and_then(|l| l.parse().ok())
        .unwrap_or(0)
}

fn verify_file(text: &str) -> (i32, String, String) {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), text).unwrap();
    cairn(&["verify", "--file", tmp.path().to_str().unwrap()], &[])
}

#[test]
fn retain_events_settles_and_everything_still_proves_itself() {
    let archive = tempfile::tempdir().unwrap();
    let dir = archive.path().join("archive");
    let server = Server::start(&["--retain-events", "500", "--archive", dir.to_str().unwrap()]);
    // A checkpoint an auditor saved before anything was pruned.
    append(&server, 150, 50);
    wait_checkpoint_covers_head(&server);
    let key = server.get_text("/v1/checkpoint/key").1;
    let saved = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(saved.path(), server.get_text("/v1/checkpoint").1).unwrap();
    let first_id = server.head()["first_id"].as_str().unwrap().to_string();
    assert_eq!(server.head()["first_seq"], 1);

    append(&server, 2_850, 50);
    wait_checkpoint_covers_head(&server);
    wait_until(SETTLE, "the log to settle at the bound", || {
        let h = server.head();
        let retained = h["seq"].as_u64().unwrap() + 1 - h["first_seq"].as_u64().unwrap();
        retained <= 500 + 50
    });
    let head = server.head();
    let first_seq = head["first_seq"].as_u64().unwrap();
    let retained = head["seq"].as_u64().unwrap() + 1 - first_seq;
    assert!(retained >= 500, "pruned below the bound: {retained}");

    // Verification starts at the horizon.
    let (status, v) = server.get("/v1/verify");
    assert_eq!(status, 200);
    assert_eq!(v["data"]["ok"], true, "{v}");
    assert_eq!(v["data"]["checked"].as_u64().unwrap(), retained);
    let (status, v) = server.get("/v1/verify?from_seq=1");
    assert_eq!((status, v["code"].as_str()), (410, Some("gone")), "{v}");
    let url = format!("http://{}", server.addr);
    let (code, out, err) = cairn(&["verify", "--url", &url, "--token", &server.token], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("pruned"), "{err}");

    // Pruned event and its proof: 410; retained: proofs verify.
    let (status, body) = server.get(&format!("/v1/events/{first_id}"));
    assert_eq!(
        (status, body["code"].as_str()),
        (410, Some("gone")),
        "{body}"
    );
    let (status, body) = server.get("/v1/proof/inclusion?seq=1");
    assert_eq!(
        (status, body["code"].as_str()),
        (410, Some("gone")),
        "{body}"
    );
    let (code, out, err) = server.cairn(&["proof", &first_seq.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let proof = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(proof.path(), &out).unwrap();
    let (code, out, err) = cairn(
        &[
            "verify",
            "--proof",
            proof.path().to_str().unwrap(),
            "--key",
            key.trim(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");

    // The checkpoint saved before pruning is consistent with the newest: for SPEC §1's
    // independent auditor (examples/auditor.py) first, then for `cairn verify`, which
    // replaces the saved file on success.
    let newest = server.get_text("/v1/checkpoint").1;
    let (old_size, new_size) = (
        checkpoint_size(&std::fs::read_to_string(saved.path()).unwrap()),
        checkpoint_size(&newest),
    );
    assert!(
        old_size < first_seq && new_size >= first_seq,
        "{old_size} {new_size}"
    );
    let files = tempfile::tempdir().unwrap();
    let put = |name: &str, text: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (old_cp, new_cp) = (
        put("old", &std::fs::read_to_string(saved.path()).unwrap()),
        put("new", &newest),
    );
    let consistency = server
        .get_text(&format!(
            "/v1/proof/consistency?from={old_size}&to={new_size}"
        ))
        .1;
    let proof_file = put("consistency.json", &consistency);
    let (ok, out) = auditor(&[
        "consistency",
        "--key",
        key.trim(),
        "--old",
        &old_cp,
        "--new",
        &new_cp,
        &proof_file,
    ]);
    assert!(ok, "{out}");
    // A proof from the saved size that does not lead to the newest root is refused.
    let mut bad: Value = serde_json::from_str(&consistency).unwrap();
    bad["data"]["hashes"][0] = json!("0".repeat(64));
    let bad = bad.to_string();
    let (ok, _) = auditor(&[
        "consistency",
        "--key",
        key.trim(),
        "--old",
        &old_cp,
        "--new",
        &new_cp,
        &put("bad.json", &bad),
    ]);
    assert!(!ok, "the auditor accepted a tampered proof: {bad}");
    // A retained event's inclusion proof in the newest checkpoint.
    let (_, event) = server.get("/v1/events?limit=1");
    let event_file = put("event.json", &event["data"][0].to_string());
    let inclusion = server
        .get_text(&format!(
            "/v1/proof/inclusion?seq={first_seq}&size={new_size}"
        ))
        .1;
    let (ok, out) = auditor(&[
        "inclusion",
        "--key",
        key.trim(),
        "--checkpoint",
        &new_cp,
        &event_file,
        &put("inclusion.json", &inclusion),
    ]);
    assert!(ok, "{out}");

    let (code, out, err) = server.cairn(&[
        "verify",
        "--checkpoint",
        saved.path().to_str().unwrap(),
        "--key",
        key.trim(),
    ]);
    assert_eq!(code, 0, "{out}{err}");

    // Reads from before the horizon start at it and say so.
    let horizon_id = head["first_id"].as_str().unwrap().to_string();
    let (status, page) = server.get("/v1/events?limit=1");
    assert_eq!(status, 200);
    assert_eq!(page["pruned_before"], horizon_id.as_str(), "{page}");
    assert_eq!(page["data"][0]["seq"].as_u64(), Some(first_seq));
    let (_, page) = server.get(&format!("/v1/events?limit=1&since={horizon_id}"));
    assert!(page.get("pruned_before").is_none(), "{page}");
    let r = server
        .http()
        .get(server.url("/v1/export?since=earliest"))
        .bearer_auth(&server.token)
        .send()
        .unwrap();
    assert_eq!(
        r.headers()["cairn-pruned-before"].to_str().unwrap(),
        horizon_id
    );
    let (code, _, err) = cairn(&["export", "--url", &url, "--token", &server.token], &[]);
    assert_eq!(code, 0);
    assert!(
        err.contains("warning") && err.contains(&horizon_id),
        "{err}"
    );
    let (code, _, err) = cairn(&["events", "--url", &url, "--token", &server.token], &[]);
    assert_eq!(code, 0);
    assert!(
        err.contains("warning") && err.contains(&horizon_id),
        "{err}"
    );

    // SSE from before the horizon: the connected frame says so, the first event is it.
    let mut sse = server
        .http()
        .get(server.url(&format!("/v1/events/stream?since={first_id}")))
        .bearer_auth(&server.token)
        .timeout(Duration::from_secs(10))
        .send()
        .unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while text.matches("\n\n").count() < 2 {
        let n = sse.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let connected: Value = serde_json::from_str(
        text.lines()
            .find(|l| l.starts_with("data: ") && l.contains("\"type\":\"connected\""))
            .unwrap()
            .trim_start_matches("data: "),
    )
    .unwrap();
    assert_eq!(connected["pruned_before"], horizon_id.as_str(), "{text}");
    assert!(
        text.contains(&format!("id: {horizon_id}\nevent: t")),
        "{text}"
    );
    drop(sse);

    // WebSocket: the same.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use futures_util::StreamExt;
        let ws_url = format!(
            "ws://{}/v1/events/ws?since={first_id}&token={}",
            server.addr, server.token
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
        let first: Value =
            serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
        assert_eq!(first["type"], "connected");
        assert_eq!(first["pruned_before"], horizon_id.as_str());
        let event: Value =
            serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
        assert_eq!(event["seq"].as_u64(), Some(first_seq));
    });

    // Archives + the current export verify end to end, from seq 1.
    let export = server.export_lines().join("\n") + "\n";
    let all = archives_then(&dir, &export);
    assert!(all.starts_with("{") && all.contains("\"seq\":1,"));
    let (code, out, err) = verify_file(&all);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("{} events verified", head["seq"])),
        "{out}"
    );
    // And for the auditor, against the newest checkpoint: chain from seq 1 and the
    // Merkle root of everything ever appended, pruned part included.
    let (ok, out) = auditor(&[
        "export",
        "--key",
        key.trim(),
        "--checkpoint",
        &new_cp,
        &put("all.ndjson", &all),
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("{} events, chain intact", head["seq"])),
        "{out}"
    );
}

#[test]
fn prune_offline_and_remote_never_take_the_last_or_uncovered_events() {
    let server = Server::start(&["--checkpoint-interval", "1"]);
    append(&server, 600, 100);
    wait_checkpoint_covers_head(&server);
    let head = server.head();
    let last_id = head["id"].as_str().unwrap().to_string();

    // Remote: a cursor past everything prunes all but the last chunk, and says so.
    let (code, out, err) = server.cairn(&["prune", "--before", &last_id]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("the last event"), "{err}");
    let h = server.head();
    assert_eq!(h["seq"], head["seq"]);
    assert_eq!(h["first_seq"].as_u64(), Some(501), "{h}");
    let (status, v) = server.get("/v1/verify");
    assert_eq!(
        (status, v["data"]["ok"].as_bool()),
        (200, Some(true)),
        "{v}"
    );
    let (code, _, err) = server.cairn(&["prune", "--before", "earliest"]);
    assert_ne!(code, 0);
    assert!(err.contains("earliest"), "{err}");

    // Events not yet covered by a checkpoint stay (a long interval keeps them uncovered).
    let mut server = server;
    let data = server.data.clone();
    server.terminate();
    let server = Server::start_on(&data, &["--checkpoint-interval", "3600"]);
    append(&server, 300, 100);
    let last_id = server.head()["id"].as_str().unwrap().to_string();
    let (code, out, err) = server.cairn(&["prune", "--before", &last_id]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("not yet covered"), "{err}");
    // Only the chunk the old checkpoint covered went.
    assert_eq!(server.head()["first_seq"].as_u64(), Some(601));

    // Offline on the stopped server's directory (the shutdown signed a checkpoint).
    let mut server = server;
    server.terminate();
    let archive = tempfile::tempdir().unwrap();
    let (code, out, err) = cairn(
        &[
            "prune",
            "--before",
            &last_id,
            "--data",
            data.to_str().unwrap(),
            "--archive",
            archive.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("starts at seq 801"), "{out}");
    let (code, out, err) = cairn(&["verify", "--data", data.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("100 events verified"), "{out}");
    // The server starts on the pruned log (its start-up check runs from the horizon).
    let server = Server::start_on(&data, &[]);
    assert_eq!(server.head()["first_seq"].as_u64(), Some(801));
}

/// SIGKILL after an archive is durable but before its events are removed: nothing is
/// lost, and the re-run replaces the stale archive so archives + export still verify.
/// Uses the `CAIRN_TEST_STALL_AFTER_ARCHIVE` hook (docs/retention.md).
#[test]
fn a_kill_between_archive_and_removal_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dir = tmp.path().join("archive");
    let mut server = Server::start_on(&data, &[]);
    append(&server, 1_000, 100);
    wait_checkpoint_covers_head(&server);
    server.terminate();

    let mut stalled = common::Server::launch(
        &data,
        &["--retain-events", "300", "--archive", dir.to_str().unwrap()],
        &[("CAIRN_TEST_STALL_AFTER_ARCHIVE", "1")],
    )
    .unwrap();
    wait_until(SETTLE, "an archive to be written", || {
        std::fs::read_dir(&dir).is_ok_and(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().ends_with(".ndjson.zst"))
        })
    });
    stalled.kill();
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "one archive, no temporary file"
    );

    let server = Server::start_on(
        &data,
        &["--retain-events", "300", "--archive", dir.to_str().unwrap()],
    );
    assert_eq!(server.head()["seq"].as_u64(), Some(1_000));
    wait_until(SETTLE, "the prune to complete", || {
        server.head()["first_seq"].as_u64().unwrap() > 1
    });
    let export = server.export_lines().join("\n") + "\n";
    let (code, out, err) = verify_file(&archives_then(&dir, &export));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1000 events verified"), "{out}");
}

#[test]
fn retain_for_and_retain_bytes_settle_at_their_bounds() {
    // Age: everything older than 2 s goes, except the last chunk.
    let server = Server::start(&["--retain-for", "2s"]);
    append(&server, 500, 100);
    wait_checkpoint_covers_head(&server);
    wait_until(SETTLE, "events older than 2 s to be pruned", || {
        server.head()["first_seq"].as_u64() == Some(401)
    });
    let (status, v) = server.get("/v1/verify");
    assert_eq!(
        (status, v["data"]["checked"].as_u64()),
        (200, Some(100)),
        "{v}"
    );
    assert_eq!(server.metric("cairn_log_first_seq"), 401.0);

    // Size: the stored (compressed) events stay under the bound, a chunk or so below.
    let bound = 40_000.0;
    let server = Server::start(&["--retain-bytes", "40000"]);
    append(&server, 3_000, 100);
    wait_checkpoint_covers_head(&server);
    wait_until(SETTLE, "the stored bytes to come under the bound", || {
        server.metric("cairn_log_bytes") <= bound
    });
    let stored = server.metric("cairn_log_bytes");
    let h = server.head();
    let first = h["first_seq"].as_u64().unwrap();
    assert!(first > 1, "{h}");
    let per_event = stored / (3_001 - first) as f64;
    assert!(
        stored > bound - 100.0 * per_event * 2.0,
        "pruned far below the bound: {stored} bytes"
    );
    let (status, v) = server.get("/v1/verify");
    assert_eq!(
        (status, v["data"]["ok"].as_bool()),
        (200, Some(true)),
        "{v}"
    );
    // The size is kept in the store: a restart reports the same, and the file sled
    // holds is a separate gauge, larger (it does not shrink).
    assert!(server.metric("cairn_disk_bytes") > stored);
    let mut server = server;
    let data = server.data.clone();
    server.terminate();
    let server = Server::start_on(&data, &["--retain-bytes", "40000"]);
    assert_eq!(server.metric("cairn_log_bytes"), stored);
}

/// Reads SSE frames (blank-line separated) from `reader` until `stop` says so; returns
/// each frame's `id`, `event` and `data` lines.
fn read_sse_frames(
    reader: &mut impl Read,
    buffer: &mut String,
    mut stop: impl FnMut(&(String, String, String)) -> bool,
) -> Vec<(String, String, String)> {
    let mut frames = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let text: String = buffer.drain(..end + 2).collect();
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or_default()
                    .to_string()
            };
            let frame = (field("id: "), field("event: "), field("data: "));
            let done = stop(&frame);
            frames.push(frame);
            if done {
                return frames;
            }
        }
        let n = reader.read(&mut chunk).expect("read the stream");
        assert!(n > 0, "the stream ended");
        buffer.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
}

/// Checks one stream's delivery across a prune that overtook it: events contiguous from
/// seq 1, then one `connected` frame naming the horizon, then events from the horizon
/// on, contiguous, to the head. `frames`: (event type or "connected", data).
fn assert_overtaken_in_band(
    frames: &[(String, String)],
    horizon_id: &str,
    horizon_seq: u64,
    head: u64,
) {
    let mut expected = 1;
    let mut announced = 0;
    for (kind, data) in frames {
        let value: Value = serde_json::from_str(data).unwrap();
        if kind == "connected" {
            announced += 1;
            assert_eq!(value["pruned_before"], horizon_id, "{value}");
            assert!(
                expected < horizon_seq,
                "announced after the horizon: {value}"
            );
            expected = horizon_seq;
            continue;
        }
        assert_eq!(value["seq"].as_u64(), Some(expected), "a silent gap");
        expected += 1;
    }
    assert_eq!(announced, 1, "the jump is announced exactly once");
    assert_eq!(expected, head + 1, "delivered to the head");
}

/// A subscriber that is connected but behind, overtaken by a prune: its stream goes on
/// at the horizon and says so in band with a `connected` frame carrying
/// `pruned_before` (SSE and WebSocket), never skipping silently.
#[test]
fn a_stream_overtaken_by_the_pruner_says_so_in_band() {
    let server = Server::start(&[]);
    // 24 MB of events: far more than socket buffers and the stream's read-ahead hold,
    // so a subscriber that stops reading near the start stays there.
    let ids = append_padded(&server, 30, 200, 4_000);
    wait_checkpoint_covers_head(&server);
    let head = server.head()["seq"].as_u64().unwrap();

    // Both subscribers take the connected frame and one event, then stop reading.
    let mut sse = server
        .http()
        .get(server.url("/v1/events/stream?since=earliest"))
        .bearer_auth(&server.token)
        .timeout(Duration::from_secs(60))
        .send()
        .unwrap();
    let mut sse_buffer = String::new();
    let mut sse_frames = read_sse_frames(&mut sse, &mut sse_buffer, |f| f.1 == "t");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    use futures_util::StreamExt;
    let ws_url = format!(
        "ws://{}/v1/events/ws?since=earliest&token={}",
        server.addr, server.token
    );
    let (mut ws, _) = rt
        .block_on(tokio_tungstenite::connect_async(ws_url))
        .unwrap();
    let mut ws_frames = Vec::new();
    for _ in 0..2 {
        let message = rt.block_on(ws.next()).unwrap().unwrap();
        ws_frames.push(message.into_text().unwrap().to_string());
    }

    // Prune far past both.
    let url = format!("http://{}", server.addr);
    let (code, out, err) = cairn(
        &[
            "prune",
            "--before",
            &ids[5_400],
            "--url",
            &url,
            "--token",
            &server.token,
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let h = server.head();
    let horizon_seq = h["first_seq"].as_u64().unwrap();
    let horizon_id = h["first_id"].as_str().unwrap().to_string();
    assert!(horizon_seq > 5_000, "{h}");

    // SSE: drain to the head.
    sse_frames.extend(read_sse_frames(&mut sse, &mut sse_buffer, |f| {
        f.1 == "t" && f.0 == ids[ids.len() - 1]
    }));
    let in_band = sse_frames
        .iter()
        .skip(1)
        .find(|f| f.1 == "connected")
        .unwrap();
    assert_eq!(
        in_band.0,
        ids[horizon_seq as usize - 2],
        "the frame's id is the last pruned id"
    );
    let sse_frames: Vec<(String, String)> = sse_frames
        .into_iter()
        .skip(1)
        .map(|(_, kind, data)| (kind, data))
        .collect();
    assert_overtaken_in_band(&sse_frames, &horizon_id, horizon_seq, head);

    // WebSocket: the same.
    let seq_of = |text: &str| serde_json::from_str::<Value>(text).unwrap()["seq"].as_u64();
    while seq_of(ws_frames.last().unwrap()) != Some(head) {
        let message = rt.block_on(ws.next()).unwrap().unwrap();
        ws_frames.push(message.into_text().unwrap().to_string());
    }
    let ws_frames: Vec<(String, String)> = ws_frames
        .into_iter()
        .skip(1)
        .map(|text| {
            let kind = if text.contains("\"type\":\"connected\"") {
                "connected"
            } else {
                "t"
            };
            (kind.to_string(), text)
        })
        .collect();
    assert_overtaken_in_band(&ws_frames, &horizon_id, horizon_seq, head);

    // A resume from before the horizon still says so in its first frame (and only there).
    let mut resumed = server
        .http()
        .get(server.url(&format!("/v1/events/stream?since={}", ids[0])))
        .bearer_auth(&server.token)
        .timeout(Duration::from_secs(60))
        .send()
        .unwrap();
    let frames = read_sse_frames(&mut resumed, &mut String::new(), |f| f.1 == "t");
    let connected: Value = serde_json::from_str(&frames[0].2).unwrap();
    assert_eq!(connected["pruned_before"], horizon_id.as_str());
    let first: Value = serde_json::from_str(&frames[1].2).unwrap();
    assert_eq!(first["seq"].as_u64(), Some(horizon_seq));
}

/// In cluster mode retention is one decision for the cluster (SPEC §8;
/// tests/cluster_retention.rs): a node accepts the bounds (here it gets as far as
/// connecting), but a cluster node's data directory is never pruned alone by hand.
#[test]
fn a_cluster_node_takes_retention_flags_but_is_never_pruned_alone() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("data");
    let archive = data.path().join("archive");
    let args = [
        "serve",
        "--data",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--nats",
        "nats://127.0.0.1:9",
        "--retain-events",
        "10",
        "--archive",
        archive.to_str().unwrap(),
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let (code, err) = common::run_bounded(&args, Duration::from_secs(30));
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("cannot reach NATS"), "{err}");
    // The directory is a cluster node's now: an offline prune refuses it.
    let (code, out, err) = cairn(
        &[
            "prune",
            "--data",
            dir.to_str().unwrap(),
            "--before",
            "2100-01-01T00:00:00Z",
        ],
        &[],
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("one decision for the whole cluster"), "{err}");
}

/// A signed checkpoint whose size cuts a 64-leaf block in the middle of a prune batch
/// (neither the batch's last chunk nor the block the new horizon falls in), no archive:
/// the prune keeps that block's leaf hashes, so the consistency proof from the
/// checkpoint to the newest still verifies. Guards a prune that reads only the chunks
/// it needs (docs/retention.md, "Pruner cost under --sync none").
#[test]
fn a_checkpoint_cutting_a_block_mid_batch_still_proves_after_a_prune() {
    let server = Server::start(&[]);
    let key = server.get_text("/v1/checkpoint/key").1;
    // Requests of 50 events: chunks end at multiples of 50.
    append(&server, 100, 50);
    wait_checkpoint_covers_head(&server);
    let saved_note = server.get_text("/v1/checkpoint").1;
    // 100 cuts block 1 (leaves 64..128, seqs 65..128), which lies in the chunks of seqs
    // 51..100 and 101..150: the 2nd and 3rd of the batch below.
    assert_eq!(checkpoint_size(&saved_note), 100);
    let saved = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(saved.path(), &saved_note).unwrap();

    let ids = append_padded(&server, 18, 50, 64);
    wait_checkpoint_covers_head(&server);
    assert_eq!(server.head()["seq"].as_u64(), Some(1_000));

    // One batch of 16 chunks, seqs 1..800; the horizon falls in block 12.
    let (code, out, err) = server.cairn(&["prune", "--before", &ids[700]]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(server.head()["first_seq"].as_u64(), Some(801));

    let newest = checkpoint_size(&server.get_text("/v1/checkpoint").1);
    let (status, body) = server.get(&format!("/v1/proof/consistency?from=100&to={newest}"));
    assert_eq!(status, 200, "{body}");
    let (code, out, err) = server.cairn(&[
        "verify",
        "--checkpoint",
        saved.path().to_str().unwrap(),
        "--key",
        key.trim(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    // A retained event's inclusion proof still verifies too (the horizon's block).
    let (status, body) = server.get(&format!("/v1/proof/inclusion?seq=801&size={newest}"));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_retried_key_whose_events_were_pruned_is_gone_and_appends_nothing() {
    let server = Server::start(&["--checkpoint-interval", "1"]);
    let keyed = |key: &str| {
        let r = server
            .http()
            .post(server.url("/v1/events"))
            .bearer_auth(&server.token)
            .header("content-type", "application/json")
            .header("Idempotency-Key", key)
            .body(json!({"type": "keyed", "data": {"key": key}}).to_string())
            .send()
            .expect("POST");
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap_or(Value::Null))
    };
    let (status, first) = keyed("old");
    assert_eq!(status, 201, "{first}");
    append(&server, 300, 100);
    wait_checkpoint_covers_head(&server);
    let last_id = server.head()["id"].as_str().unwrap().to_string();
    let (code, out, err) = server.cairn(&["prune", "--before", &last_id]);
    assert_eq!(code, 0, "{out}{err}");
    let head = server.head();
    assert!(head["first_seq"].as_u64().unwrap() > 2, "{head}");

    // The retry finds its key but not its events: 410, and nothing is appended.
    let (status, reply) = keyed("old");
    assert_eq!((status, &reply["code"]), (410, &json!("gone")), "{reply}");
    assert!(
        reply["error"].as_str().unwrap_or("").contains("seq 1..=1"),
        "{reply}"
    );
    assert_eq!(server.head()["seq"], head["seq"], "the retry appended");
    // A key of a request whose events remain still replays its first answer.
    let (status, kept) = keyed("kept");
    assert_eq!(status, 201, "{kept}");
    let last = server.head()["seq"].as_u64().unwrap();
    let (status, again) = keyed("kept");
    assert_eq!(status, 201, "{again}");
    assert_eq!(again["data"]["first_seq"], kept["data"]["first_seq"]);
    assert_eq!(server.head()["seq"].as_u64(), Some(last));
}
