//! Checkpoints and Merkle proofs (SPEC §3): the public test vectors, the signed
//! checkpoints of another implementation, and a running server's checkpoints and proofs
//! checked by an independent verifier (`examples/auditor.py`, Python with `cryptography`
//! and `rfc8785` only) and by `cairn verify`.
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cairn::checkpoint;
use cairn::merkle::{self, naive};
use common::{Server, auditor, cairn, wait_until};
use serde_json::{Value, json};
use tlog_tiles::Hash;

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            json_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
}

fn b64(v: &Value) -> Vec<u8> {
    BASE64.decode(v.as_str().unwrap_or("")).expect("base64")
}

/// Proof hashes as our parsers take them: anything not 32 bytes is refused there.
fn proof_hashes(v: &Value) -> Option<Vec<Hash>> {
    v.as_array()
        .map(|a| a.iter().map(b64).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|b| <[u8; 32]>::try_from(b).ok().map(Hash))
        .collect()
}

/// One vector through the verifier for its kind.
fn check_vector(kind: &str, v: &Value) -> Result<(), String> {
    let u = |k: &str| v[k].as_u64().expect(k);
    let proof = proof_hashes(&v["proof"]).ok_or("a proof hash is not 32 bytes")?;
    let outcome = match kind {
        "inclusion" => merkle::verify_inclusion(
            &proof,
            u("leafIdx"),
            u("treeSize"),
            &b64(&v["leafHash"]),
            &b64(&v["root"]),
        ),
        "consistency" => merkle::verify_consistency(
            &proof,
            u("size1"),
            u("size2"),
            &b64(&v["root1"]),
            &b64(&v["root2"]),
        ),
        "subtreeinclusion" => merkle::verify_subtree_inclusion(
            &proof,
            u("leafIdx"),
            u("start"),
            u("end"),
            &b64(&v["leafHash"]),
            &b64(&v["root"]),
        ),
        _ => merkle::verify_subtree_consistency(
            &proof,
            u("start"),
            u("end"),
            u("size"),
            &b64(&v["root1"]),
            &b64(&v["root2"]),
        ),
    };
    outcome.map_err(|e| e.to_string())
}

/// Every vector of transparency-dev/merkle: RFC 6962 inclusion and consistency, and the
/// subtree proofs of Merkle Tree Certificates.
#[test]
fn every_merkle_proof_vector() {
    for kind in [
        "inclusion",
        "consistency",
        "subtreeinclusion",
        "subtreeconsistency",
    ] {
        let mut files = Vec::new();
        json_files(&vectors().join("merkle/testdata").join(kind), &mut files);
        assert!(
            files.len() > 50,
            "{kind}: only {} vectors found",
            files.len()
        );
        for file in &files {
            let v: Value =
                serde_json::from_slice(&std::fs::read(file).expect("read")).expect("JSON");
            let outcome = check_vector(kind, &v);
            assert_eq!(
                outcome.is_err(),
                v["wantErr"].as_bool().expect("wantErr"),
                "{} ({}): {outcome:?}",
                file.display(),
                v["desc"]
            );
        }
        eprintln!("{kind}: {} vectors", files.len());
    }
}

/// transparency-dev/tessera's test log: 15 entries, a signed checkpoint at every size.
#[test]
fn tessera_checkpoints_verify_with_their_key() {
    let dir = vectors().join("tessera-log");
    let readme = std::fs::read_to_string(dir.join("README.md")).expect("README");
    let vkey = readme
        .lines()
        .find_map(|l| l.strip_prefix("Verifier key (C2SP signed-note vkey): "))
        .expect("vkey line")
        .trim();
    let entries = readme
        .lines()
        .find_map(|l| l.strip_prefix("Entry i (1-based) is the ASCII string from: "))
        .expect("entries line");
    let leaves: Vec<Hash> = entries
        .split_whitespace()
        .map(|e| tlog_tiles::record_hash(e.as_bytes()))
        .collect();
    assert_eq!(leaves.len(), 15);
    let mut seen = 0;
    for size in 0..=15usize {
        let note = std::fs::read_to_string(dir.join(format!("checkpoint.{size}")));
        let Ok(note) = note else { continue };
        let signed = checkpoint::open(&note, vkey).expect("a valid checkpoint");
        assert_eq!(signed.size, size as u64);
        assert_eq!(signed.origin, "example.com/log/testdata");
        assert_eq!(signed.root, naive::root(&leaves[..size]), "root at {size}");
        // Any changed byte (outside the trailing newline) is refused.
        for i in (0..note.len() - 1).step_by(7) {
            let mut bytes = note.clone().into_bytes();
            bytes[i] ^= 0x01;
            if let Ok(changed) = String::from_utf8(bytes) {
                assert!(
                    checkpoint::open(&changed, vkey).is_err(),
                    "checkpoint.{size} with byte {i} changed was accepted"
                );
            }
        }
        seen += 1;
    }
    assert!(seen >= 15, "only {seen} checkpoints found");
    let latest = std::fs::read_to_string(dir.join("checkpoint")).expect("checkpoint");
    assert_eq!(checkpoint::open(&latest, vkey).expect("valid").size, 15);
    // Another key (same name, other id) verifies none of them.
    let other = "example.com/log/testdata+00000000+AeHTu4Q3hEIMHNqc6fASMsq3rKNx280NI+oO5xCFkkSx";
    assert!(checkpoint::open(&latest, other).is_err());
}

fn text(s: &Server, path: &str) -> String {
    let (status, body) = s.get_text(path);
    assert_eq!(status, 200, "{path}: {body}");
    body
}

fn append(s: &Server, n: usize, event_type: &str) {
    let body: String = (0..n)
        .map(|i| json!({"type": event_type, "data": {"i": i}}).to_string() + "\n")
        .collect();
    let (status, reply) = s.post("/v1/events", "application/x-ndjson", body);
    assert_eq!(status, 201, "{reply}");
}

/// Waits for a signed checkpoint of exactly the log's head; returns its text.
fn checkpoint_at_head(s: &Server) -> String {
    let head = s.head()["seq"].as_u64().expect("seq");
    let mut note = String::new();
    wait_until(Duration::from_secs(15), "a checkpoint of the head", || {
        note = text(s, "/v1/checkpoint");
        note.lines().nth(1) == Some(&head.to_string())
    });
    note
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write");
    path.display().to_string()
}

#[test]
fn server_checkpoints_and_proofs_check_out_independently() {
    let s = Server::start(&[]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let key = text(&s, "/v1/checkpoint/key").trim().to_string();

    // First start: the size-0 checkpoint, root SHA-256("").
    let first = text(&s, "/v1/checkpoint");
    let signed = checkpoint::open(&first, &key).expect("signed by the served key");
    assert_eq!((signed.size, signed.root), (0, merkle::EMPTY_HASH));
    assert!(key.starts_with(&format!("{}+", signed.origin)));
    assert!(signed.origin.starts_with("cairn.local/"));

    append(&s, 5, "audit");
    let cp5 = write(tmp.path(), "cp5", &checkpoint_at_head(&s));
    append(&s, 1, "audit");
    append(&s, 17, "agent.tool_call");
    let cp23 = write(tmp.path(), "cp23", &checkpoint_at_head(&s));

    // The export re-derived from scratch: chain, and Merkle root of the checkpoint.
    let export = s.export_lines();
    assert_eq!(export.len(), 23);
    let exported = write(tmp.path(), "export.ndjson", &(export.join("\n") + "\n"));
    let (ok, out) = auditor(&["export", "--key", &key, "--checkpoint", &cp23, &exported]);
    assert!(ok, "{out}");
    let (ok, out) = auditor(&["export", "--key", &key, "--checkpoint", &cp5, &exported]);
    assert!(
        ok,
        "an export longer than the checkpoint covers it too: {out}"
    );
    // ...and in Rust, from the event hashes alone.
    let leaves: Vec<Hash> = export
        .iter()
        .map(|l| {
            let e: Value = serde_json::from_str(l).expect("line");
            let mut h = [0u8; 32];
            hex::decode_to_slice(e["hash"].as_str().expect("hash"), &mut h).expect("hex");
            Hash(h)
        })
        .collect();
    let signed23 = checkpoint::open(&std::fs::read_to_string(&cp23).unwrap(), &key).unwrap();
    assert_eq!(signed23.root, naive::root(&leaves));

    // Consistency 5 → 23, checked by the Python verifier.
    let (_, proof) = s.get("/v1/proof/consistency?from=5&to=23");
    let proof_file = write(tmp.path(), "consistency.json", &proof.to_string());
    let (ok, out) = auditor(&[
        "consistency",
        "--key",
        &key,
        "--old",
        &cp5,
        "--new",
        &cp23,
        &proof_file,
    ]);
    assert!(ok, "{out}");
    // Swapped checkpoints are refused.
    let (ok, _) = auditor(&[
        "consistency",
        "--key",
        &key,
        "--old",
        &cp23,
        "--new",
        &cp5,
        &proof_file,
    ]);
    assert!(!ok);

    // Inclusion of every event in the tree of 23, by the Python verifier; and the server's
    // proofs equal RFC 6962's PATH.
    for seq in 1..=23usize {
        let (status, proof) = s.get(&format!("/v1/proof/inclusion?seq={seq}&size=23"));
        assert_eq!(status, 200, "{proof}");
        assert_eq!(proof["data"]["leaf_index"], seq - 1);
        assert_eq!(proof["data"]["tree_size"], 23);
        let expected: Vec<String> = naive::path(seq - 1, &leaves)
            .iter()
            .map(|h| hex::encode(h.0))
            .collect();
        assert_eq!(
            proof["data"]["hashes"],
            json!(expected),
            "PATH({}, 23)",
            seq - 1
        );
        let event = write(tmp.path(), "event.json", &export[seq - 1]);
        let proof_file = write(tmp.path(), "inclusion.json", &proof.to_string());
        let (ok, out) = auditor(&[
            "inclusion",
            "--key",
            &key,
            "--checkpoint",
            &cp23,
            &event,
            &proof_file,
        ]);
        assert!(ok, "seq {seq}: {out}");
    }
    // Default size: the newest checkpoint's.
    let (_, proof) = s.get("/v1/proof/inclusion?seq=3");
    assert_eq!(proof["data"]["tree_size"], 23);

    // `cairn proof`: a tlog-proof that stands alone, for `cairn verify` and the auditor.
    let url = s.url("");
    let env = [
        ("CAIRN_URL", url.as_str()),
        ("CAIRN_TOKEN", s.token.as_str()),
    ];
    let (code, tlog_proof, err) = cairn(&["proof", "7"], &env);
    assert_eq!(code, 0, "{err}");
    assert!(
        tlog_proof.starts_with("c2sp.org/tlog-proof@v1\nextra "),
        "{tlog_proof}"
    );
    assert!(tlog_proof.contains("\nindex 6\n"));
    let proof_path = write(tmp.path(), "seven.tlog-proof", &tlog_proof);
    let (code, out, err) = cairn(&["verify", "--proof", &proof_path, "--key", &key], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ok: event seq 7 ("), "{out}");
    let (ok, out) = auditor(&["proof", "--key", &key, &proof_path]);
    assert!(ok, "{out}");
    // By id too.
    let id = serde_json::from_str::<Value>(&export[6]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, by_id, err) = cairn(&["proof", &id], &env);
    assert_eq!(code, 0, "{err}");
    assert_eq!(by_id, tlog_proof);
    // A tampered proof (other index, edited event, other key) is refused by both.
    let edited = tlog_proof.replace("\nindex 6\n", "\nindex 5\n");
    let extra = tlog_proof
        .lines()
        .nth(1)
        .unwrap()
        .strip_prefix("extra ")
        .unwrap();
    let line = String::from_utf8(BASE64.decode(extra).unwrap()).unwrap();
    let forged_line = line.replacen("\"data\":{", "\"data\":{\"x\":1,", 1);
    assert_ne!(forged_line, line);
    let forged = tlog_proof.replace(extra, &BASE64.encode(forged_line));
    // A proof hash of the wrong length.
    let short = tlog_proof.replacen("\nindex 6\n", "\nindex 6\nAAAA\n", 1);
    for (what, bad) in [("index", edited), ("event", forged), ("hash length", short)] {
        let path = write(tmp.path(), "bad.tlog-proof", &bad);
        let (code, _, err) = cairn(&["verify", "--proof", &path, "--key", &key], &[]);
        assert_eq!(code, 1, "{what}: {err}");
        assert!(err.contains("FAILED"), "{err}");
        let (ok, _) = auditor(&["proof", "--key", &key, &path]);
        assert!(!ok, "the auditor accepted a proof with a bad {what}");
    }
    let other_key = key.replacen('+', "+0", 1);
    let (code, _, _) = cairn(
        &["verify", "--proof", &proof_path, "--key", &other_key],
        &[],
    );
    assert_eq!(code, 1);
}

#[test]
fn proof_parameters_out_of_range_are_400() {
    let s = Server::start(&[]);
    append(&s, 4, "audit");
    checkpoint_at_head(&s);
    for path in [
        "/v1/proof/inclusion",
        "/v1/proof/inclusion?seq=0",
        "/v1/proof/inclusion?seq=5",
        "/v1/proof/inclusion?seq=2&size=5",
        "/v1/proof/inclusion?seq=3&size=2",
        "/v1/proof/inclusion?seq=-1",
        "/v1/proof/inclusion?seq=1x",
        "/v1/proof/inclusion?seq=99999999999999999999999",
        "/v1/proof/consistency?from=1",
        "/v1/proof/consistency?to=1",
        "/v1/proof/consistency?from=0&to=4",
        "/v1/proof/consistency?from=3&to=2",
        "/v1/proof/consistency?from=1&to=5",
        "/v1/proof/consistency?from=+1&to=4",
    ] {
        let (status, body) = s.get(path);
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], "bad_request", "{path}: {body}");
        assert!(body["details"][0]["field"].is_string() || body["error"].is_string());
    }
    let (status, body) = s.get("/v1/proof/consistency?from=4&to=4");
    assert_eq!(status, 200);
    assert_eq!(body["data"], json!({"from": 4, "to": 4, "hashes": []}));
    let (status, body) = s.get("/v1/proof/inclusion?seq=1&size=1");
    assert_eq!(status, 200);
    assert_eq!(body["data"]["hashes"], json!([]));
    // Without a token: 401, like every /v1 route.
    for path in [
        "/v1/checkpoint",
        "/v1/checkpoint/key",
        "/v1/proof/inclusion?seq=1",
    ] {
        let r = s.http().get(s.url(path)).send().expect("GET");
        assert_eq!(r.status().as_u16(), 401, "{path}");
    }
}

#[test]
fn an_allow_listed_token_proves_its_own_events_only() {
    let s = Server::start(&[]);
    append(&s, 2, "audit");
    append(&s, 2, "agent.tool_call");
    checkpoint_at_head(&s);
    let (status, body) = s.post(
        "/v1/tokens",
        "application/json",
        json!({"role": "read", "name": "agents", "types": ["agent.*"]}).to_string(),
    );
    assert_eq!(status, 201, "{body}");
    let token = body["data"]["token"].as_str().unwrap().to_string();
    let get = |path: &str| {
        let r = s
            .http()
            .get(s.url(path))
            .bearer_auth(&token)
            .send()
            .expect("GET");
        r.status().as_u16()
    };
    assert_eq!(get("/v1/proof/inclusion?seq=3"), 200);
    assert_eq!(
        get("/v1/proof/inclusion?seq=1"),
        404,
        "another type's event"
    );
    assert_eq!(get("/v1/checkpoint"), 200);
    assert_eq!(get("/v1/proof/consistency?from=1&to=4"), 200);
}

#[test]
fn cairn_verify_checkpoint_proves_growth_and_catches_a_rewritten_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut s = Server::start_on(&data, &["--origin", "audit.example/cairn"]);
    let key = text(&s, "/v1/checkpoint/key").trim().to_string();
    assert!(key.starts_with("audit.example/cairn+"), "{key}");
    let saved = tmp.path().join("saved.checkpoint");
    let saved_arg = saved.display().to_string();
    let url = s.url("");
    let verify = |url: &str| {
        cairn(
            &[
                "verify",
                "--url",
                url,
                "--checkpoint",
                &saved_arg,
                "--key",
                &key,
            ],
            &[("CAIRN_TOKEN", s.token.as_str())],
        )
    };
    let (code, out, err) = verify(&url);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("trust on first use"), "{out}");
    append(&s, 3, "audit");
    checkpoint_at_head(&s);
    let (code, out, err) = verify(&url);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "ok: audit.example/cairn grew from 0 to 3 events, consistently"
    );
    append(&s, 9, "audit");
    checkpoint_at_head(&s);
    let (code, out, _) = verify(&url);
    assert_eq!(code, 0);
    assert!(out.contains("grew from 3 to 12"), "{out}");
    let (code, out, _) = verify(&url);
    assert_eq!(code, 0);
    assert!(out.contains("unchanged at 12"), "{out}");
    let at12 = std::fs::read_to_string(&saved).expect("saved");
    assert_eq!(checkpoint::open(&at12, &key).expect("valid").size, 12);

    // The key file is private; the origin is kept for life.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("checkpoint.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    s.terminate();
    let refused = Server::launch(&data, &["--origin", "other.example/log"], &[]);
    let log = refused
        .err()
        .expect("a different --origin must refuse to start");
    assert!(log.contains("origin"), "{log}");

    // The same key over a different history (the log rewritten from scratch): the
    // server's checkpoint cannot be proved consistent, and the saved one stays.
    let rewritten = tmp.path().join("rewritten");
    std::fs::create_dir_all(&rewritten).unwrap();
    std::fs::copy(
        data.join("checkpoint.key"),
        rewritten.join("checkpoint.key"),
    )
    .unwrap();
    let r = Server::start_on(&rewritten, &[]);
    append(&r, 13, "audit.rewritten");
    checkpoint_at_head(&r);
    let (code, _, err) = cairn(
        &[
            "verify",
            "--url",
            &r.url(""),
            "--checkpoint",
            &saved_arg,
            "--key",
            &key,
        ],
        &[("CAIRN_TOKEN", r.token.as_str())],
    );
    assert_eq!(code, 1, "a rewritten log passed: {err}");
    assert!(err.contains("not consistent"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&saved).unwrap(),
        at12,
        "the saved checkpoint is left alone"
    );
}

/// SPEC §4: every serve flag also reads a `CAIRN_*` variable.
#[test]
fn origin_and_checkpoint_interval_come_from_the_environment_too() {
    let s = Server::start_with_env(
        &[],
        &[
            ("CAIRN_ORIGIN", "env.example/log"),
            ("CAIRN_CHECKPOINT_INTERVAL", "1"),
        ],
    );
    let key = text(&s, "/v1/checkpoint/key");
    assert!(key.starts_with("env.example/log+"), "{key}");
    append(&s, 2, "audit");
    let note = checkpoint_at_head(&s);
    assert!(note.starts_with("env.example/log\n2\n"), "{note}");
}

#[test]
fn a_log_that_lost_its_signed_tail_refuses_to_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut s = Server::start_on(&data, &[]);
    append(&s, 6, "audit");
    checkpoint_at_head(&s);
    s.terminate();
    // The log is gone, the signed checkpoint of 6 events remains.
    std::fs::remove_dir_all(data.join("log")).unwrap();
    let log = Server::launch(&data, &[], &[])
        .err()
        .expect("must refuse to start");
    assert!(
        log.contains("the last signed checkpoint covers 6 events but the log has 0"),
        "{log}"
    );
}

/// SIGKILL leaves the last events without a checkpoint; the restarted server signs them
/// before it serves, not an interval later.
#[test]
fn a_restart_after_sigkill_serves_a_checkpoint_of_every_event_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let hour = ["--checkpoint-interval", "3600"];
    let mut s = Server::start_on(&data, &hour);
    append(&s, 40, "audit");
    s.kill();
    let s = Server::start_on(&data, &hour);
    let note = text(&s, "/v1/checkpoint");
    assert_eq!(note.lines().nth(1), Some("40"), "{note}");
}

#[test]
fn checkpoints_survive_sigkill_and_stay_consistent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut s = Server::start_on(&data, &[]);
    let key = text(&s, "/v1/checkpoint/key").trim().to_string();
    append(&s, 40, "audit");
    let before = checkpoint_at_head(&s);
    append(&s, 7, "audit");
    s.kill();
    let s = Server::start_on(&data, &[]);
    assert_eq!(
        text(&s, "/v1/checkpoint/key").trim(),
        key,
        "the same key after restart"
    );
    append(&s, 3, "audit");
    let after = checkpoint_at_head(&s);
    let (old, new) = (
        checkpoint::open(&before, &key).unwrap(),
        checkpoint::open(&after, &key).unwrap(),
    );
    assert_eq!(new.size, 50);
    let (_, proof) = s.get(&format!("/v1/proof/consistency?from={}&to=50", old.size));
    let hashes: Vec<Hash> = proof["data"]["hashes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let mut b = [0u8; 32];
            hex::decode_to_slice(h.as_str().unwrap(), &mut b).unwrap();
            Hash(b)
        })
        .collect();
    merkle::verify_consistency(&hashes, old.size, 50, &old.root.0, &new.root.0)
        .expect("consistent across the crash");
}

/// Leaf hashes of the whole log, from its export.
fn leaves_of(s: &Server) -> Vec<Hash> {
    s.export_lines()
        .iter()
        .map(|l| {
            let e: Value = serde_json::from_str(l).expect("line");
            let mut h = [0u8; 32];
            hex::decode_to_slice(e["hash"].as_str().expect("hash"), &mut h).expect("hex");
            Hash(h)
        })
        .collect()
}

fn hex_list(hashes: &[Hash]) -> Value {
    json!(hashes.iter().map(|h| hex::encode(h.0)).collect::<Vec<_>>())
}

/// Many group commits of uneven sizes, across a restart: every root and every proof the
/// server gives is RFC 6962's, computed from the exported event hashes alone.
#[test]
fn proofs_over_many_groups_and_a_restart_match_rfc6962() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut s = Server::start_on(&data, &[]);
    let sizes = [1usize, 63, 1, 64, 2, 127, 97, 5, 200, 33, 1, 70];
    for (i, n) in sizes.iter().enumerate() {
        append(&s, *n, if i % 2 == 0 { "audit" } else { "agent.call" });
    }
    s.terminate();
    let s = Server::start_on(&data, &[]);
    for n in [3usize, 129, 64] {
        append(&s, n, "after.restart");
    }
    let note = checkpoint_at_head(&s);
    let key = text(&s, "/v1/checkpoint/key").trim().to_string();
    let signed = checkpoint::open(&note, &key).expect("valid");
    let leaves = leaves_of(&s);
    let total = leaves.len();
    assert_eq!(total, sizes.iter().sum::<usize>() + 196);
    assert_eq!(signed.size as usize, total);
    assert_eq!(signed.root, naive::root(&leaves));
    for seq in (1..=total).step_by(13).chain([total]) {
        let (status, proof) = s.get(&format!("/v1/proof/inclusion?seq={seq}&size={total}"));
        assert_eq!(status, 200, "{proof}");
        assert_eq!(
            proof["data"]["hashes"],
            hex_list(&naive::path(seq - 1, &leaves)),
            "PATH({}, {total})",
            seq - 1
        );
    }
    for size in (1..=total).step_by(29).chain([64, 128, 512, total]) {
        let (status, proof) = s.get(&format!("/v1/proof/consistency?from={size}&to={total}"));
        assert_eq!(status, 200, "{proof}");
        assert_eq!(
            proof["data"]["hashes"],
            hex_list(&naive::consistency(size, &leaves)),
            "PROOF({size}, {total})"
        );
        // And proofs within the log's past: inclusion in an earlier tree.
        let (_, proof) = s.get(&format!("/v1/proof/inclusion?seq=1&size={size}"));
        assert_eq!(
            proof["data"]["hashes"],
            hex_list(&naive::path(0, &leaves[..size]))
        );
    }
}
