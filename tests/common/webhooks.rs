//! Webhook receivers' shared pieces: a received request, its events, the signature
//! check with an independent Standard Webhooks implementation, and the API calls the
//! webhook tests make.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, Write};

use base64::Engine;
use serde_json::{Value, json};

use super::Server;

#[derive(Clone, Debug)]
pub struct Received {
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// A 2xx was written in full.
    pub acked: bool,
}

/// Reads one HTTP/1.1 request with a Content-Length body (keep-alive connections):
/// its headers, lower-cased, and its body; `None` once the connection ends.
pub fn read_request(reader: &mut impl BufRead) -> Option<(HashMap<String, String>, Vec<u8>)> {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((headers, body))
}

/// The events in a delivered body (one event, or `{"events": [...]}`).
pub fn events_of(r: &Received) -> Vec<Value> {
    let v: Value = serde_json::from_slice(&r.body).expect("a JSON body");
    match v.get("events") {
        Some(Value::Array(events)) => events.clone(),
        _ => vec![v],
    }
}

/// Verifies every request's signature with the Python `standardwebhooks` package.
pub fn verify_signatures(secret: &str, requests: &[Received]) {
    assert!(!requests.is_empty(), "no request to verify");
    let lines: Vec<String> = requests
        .iter()
        .map(|r| {
            json!({
                "headers": r.headers,
                "body": base64::engine::general_purpose::STANDARD.encode(&r.body),
            })
            .to_string()
        })
        .collect();
    let script = r#"
import base64, json, sys
from standardwebhooks.webhooks import Webhook
wh = Webhook(sys.argv[1])
n = 0
for line in sys.stdin:
    r = json.loads(line)
    wh.verify(base64.b64decode(r["body"]), r["headers"])
    n += 1
print(n, "verified")
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, secret])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{}\n", lines.join("\n")).as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "a signature did not verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{} verified", requests.len())
    );
}

pub fn send(s: &Server, method: reqwest::Method, path: &str, body: &Value) -> (u16, Value) {
    let r = s
        .http()
        .request(method, s.url(path))
        .bearer_auth(&s.token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .expect("request");
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

/// Creates a webhook; returns (id, secret).
pub fn create(s: &Server, body: Value) -> (String, String) {
    let (status, created) = send(s, reqwest::Method::POST, "/v1/webhooks", &body);
    assert_eq!(status, 201, "{created}");
    let d = &created["data"];
    (
        d["id"].as_str().unwrap().to_string(),
        d["secret"].as_str().unwrap().to_string(),
    )
}

pub fn patch(s: &Server, id: &str, body: Value) -> Value {
    let (status, r) = send(
        s,
        reqwest::Method::PATCH,
        &format!("/v1/webhooks/{id}"),
        &body,
    );
    assert_eq!(status, 200, "{r}");
    r["data"].clone()
}
