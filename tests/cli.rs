//! `cairn append` and `cairn export` against the real server.
mod common;

use common::{Server, cairn};

/// `cairn append --batch N` against `s`, with `input` on stdin.
fn append_stdin(s: &Server, batch: &str, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(common::BIN)
        .args([
            "append",
            "--url",
            &s.url(""),
            "--token",
            &s.token,
            "--batch",
            batch,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write");
    child.wait_with_output().expect("wait")
}

#[test]
fn append_from_flags_prints_the_new_id() {
    let s = Server::start(&[]);
    let url = s.url("");
    let (code, out, err) = cairn(
        &[
            "append",
            "--url",
            &url,
            "--type",
            "login",
            "--source",
            "sshd",
            "--data",
            r#"{"user":"root"}"#,
        ],
        &[("CAIRN_TOKEN", &s.token)],
    );
    assert_eq!(code, 0, "{err}");
    let id = out.trim();
    assert_eq!(id.len(), 26, "{out}");
    let (status, event) = s.get(&format!("/v1/events/{id}"));
    assert_eq!(status, 200);
    assert_eq!(event["data"]["type"], "login");
    assert_eq!(event["data"]["source"], "sshd");
    assert_eq!(event["data"]["data"]["user"], "root");
}

#[test]
fn append_from_stdin_splits_into_atomic_requests() {
    let s = Server::start(&[]);
    let mut input = String::new();
    for i in 0..25 {
        input.push_str(&format!(
            "{{\"type\":\"t{}\",\"data\":{{\"i\":{i}}}}}\n",
            i % 3
        ));
        if i % 10 == 0 {
            input.push('\n'); // blank lines are skipped
        }
    }
    let out = append_stdin(&s, "10", input.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<_> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(ids.len(), 25);
    assert_eq!(s.head()["seq"], 25);
    let lines = s.export_lines();
    for (i, line) in lines.iter().enumerate() {
        let e: serde_json::Value = serde_json::from_str(line).expect("json");
        assert_eq!(e["id"], ids[i].as_str());
        assert_eq!(e["data"]["i"], i);
    }
}

#[test]
fn append_reports_a_rejected_batch_and_what_went_in_before() {
    let s = Server::start(&[]);
    let input = "{\"type\":\"ok\"}\n{\"type\":\"ok\"}\n{\"type\":\"bad type\"}\n";
    let out = append_stdin(&s, "2", input.as_bytes());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("2 events were appended"), "{err}");
    assert!(err.contains("type"), "{err}");
    assert_eq!(s.head()["seq"], 2);
}

#[test]
fn export_streams_the_selection_as_ndjson() {
    let s = Server::start(&[]);
    for i in 0..30 {
        let t = if i % 2 == 0 { "agent.start" } else { "audit" };
        let (status, _) = s.post_json(
            &serde_json::json!({"type": t, "source": format!("s{}", i % 3), "data": {"i": i}}),
        );
        assert_eq!(status, 201);
    }
    let url = s.url("");
    let env = [("CAIRN_TOKEN", s.token.as_str())];
    let (code, all, err) = cairn(&["export", "--url", &url], &env);
    assert_eq!(code, 0, "{err}");
    assert_eq!(all, s.export_lines().join("\n") + "\n");

    let (code, agents, _) = cairn(
        &[
            "export", "--url", &url, "--types", "agent.*", "--source", "s0",
        ],
        &env,
    );
    assert_eq!(code, 0);
    let agents: Vec<serde_json::Value> = agents
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(agents.len(), 5, "i in 0, 6, 12, 18, 24");
    assert!(
        agents
            .iter()
            .all(|e| e["type"] == "agent.start" && e["source"] == "s0")
    );

    let tenth: serde_json::Value = serde_json::from_str(&s.export_lines()[9]).expect("json");
    let since = tenth["id"].as_str().expect("id");
    let (_, rest, _) = cairn(&["export", "--url", &url, "--since", since], &env);
    assert_eq!(rest.lines().count(), 20);

    let (code, _, err) = cairn(&["export", "--url", &url, "--since", "nonsense"], &env);
    assert_ne!(code, 0);
    assert!(err.contains("since"), "{err}");
    let (code, _, err) = cairn(&["export", "--url", &url], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("401"), "{err}");
}

#[test]
fn export_since_takes_a_duration() {
    let s = Server::start(&[]);
    for i in 0..3 {
        assert_eq!(
            s.post_json(&serde_json::json!({"type": "t", "data": {"i": i}}))
                .0,
            201
        );
    }
    let url = s.url("");
    let env = [("CAIRN_TOKEN", s.token.as_str())];
    let (code, recent, err) = cairn(&["export", "--url", &url, "--since", "1h"], &env);
    assert_eq!(code, 0, "{err}");
    assert_eq!(recent.lines().count(), 3, "events of the last hour");
    // A duration reaching before the epoch still means "everything".
    let (code, all, _) = cairn(&["export", "--url", &url, "--since", "100000d"], &env);
    assert_eq!(code, 0);
    assert_eq!(all.lines().count(), 3);
}
