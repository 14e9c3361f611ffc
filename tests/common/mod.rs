//! Test harness: the real `cairn` binary on a loopback port with a temporary data
//! directory, and a real HTTP client. Shared by every integration test file.
#![allow(dead_code)]

pub mod nats;
pub mod webhooks;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_cairn");

/// Waits until `cond` holds, polling every 20 ms, or panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Server {
    pub child: Option<Child>,
    pub addr: String,
    pub data: PathBuf,
    pub token: String,
    /// Everything the server wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
    _tmp: Option<tempfile::TempDir>,
    http: reqwest::blocking::Client,
}

impl Server {
    /// A fresh server on a new temporary data directory.
    pub fn start(extra: &[&str]) -> Server {
        Server::start_with_env(extra, &[])
    }

    /// A fresh server with extra environment (e.g. `RUST_LOG=debug`).
    pub fn start_with_env(extra: &[&str], envs: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let mut s = Server::launch(&data, extra, envs).unwrap_or_else(|log| {
            panic!("cairn serve did not start; its log:\n{log}");
        });
        s._tmp = Some(tmp);
        s
    }

    /// A server on an existing data directory (e.g. after a crash).
    pub fn start_on(data: &Path, extra: &[&str]) -> Server {
        Server::launch(data, extra, &[]).unwrap_or_else(|log| {
            panic!("cairn serve did not start; its log:\n{log}");
        })
    }

    /// A server on a fixed loopback port, retrying while a previous process (just killed)
    /// still holds it. Clients that reconnect by address need the same port back.
    pub fn start_fixed(data: &Path, port: u16) -> Server {
        let listen = format!("127.0.0.1:{port}");
        let mut failure = String::new();
        for _attempt in 0..50 {
            match Server::launch(data, &["--listen", &listen], &[]) {
                Ok(server) => return server,
                Err(log) => {
                    failure = log;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        panic!("cairn serve never started on {listen}; last log:\n{failure}");
    }

    /// Starts `cairn serve` (on `127.0.0.1:0` unless `extra` has a `--listen`) and waits
    /// for it to listen and answer `/healthz`. On failure (it exited, e.g. its port was
    /// still taken), returns its log.
    pub fn launch(data: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Result<Server, String> {
        Server::launch_command(Command::new(BIN), data, extra, envs)
    }

    /// A server on `data` that may write no file larger than `bytes`: once its store
    /// needs more, writes fail with EFBIG, as on a full disk (SIGXFSZ, which would kill
    /// it instead, is ignored, and that survives the exec).
    pub fn start_with_file_limit(data: &Path, extra: &[&str], bytes: u64) -> Server {
        let mut command = Command::new("sh");
        command.args(["-c", "trap '' XFSZ; exec prlimit --fsize=\"$0\" \"$@\""]);
        command.arg(bytes.to_string()).arg(BIN);
        Server::launch_command(command, data, extra, &[]).unwrap_or_else(|log| {
            panic!("cairn serve did not start; its log:\n{log}");
        })
    }

    /// `launch` with `command` (the binary, or a wrapper that execs it) as the process.
    fn launch_command(
        mut command: Command,
        data: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Server, String> {
        command.arg("serve").arg("--data").arg(data);
        if !extra.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = command
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("CAIRN_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cairn serve");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(pos) = line.find("listening addr=") {
                        let _ =
                            addr_tx.send(line[pos + "listening addr=".len()..].trim().to_string());
                    }
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let addr = match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(log.lock().unwrap().clone());
            }
        };
        let token_path = data.join("admin.token");
        let token = std::fs::read_to_string(&token_path)
            .map(|t| t.trim().to_string())
            .unwrap_or_default();
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        let s = Server {
            child: Some(child),
            addr,
            data: data.to_path_buf(),
            token,
            log,
            _tmp: None,
            http,
        };
        wait_until(Duration::from_secs(30), "/healthz", || {
            s.http
                .get(s.url("/healthz"))
                .send()
                .is_ok_and(|r| r.status() == 200)
        });
        Ok(s)
    }

    /// Everything the server logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn http(&self) -> &reqwest::blocking::Client {
        &self.http
    }

    /// GET with the admin token; returns status and JSON (Null if not JSON).
    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .expect("GET");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    /// GET with the admin token; returns status and the raw body.
    pub fn get_text(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .expect("GET");
        (r.status().as_u16(), r.text().unwrap_or_default())
    }

    /// POST a body with a content type and the admin token.
    pub fn post(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::blocking::Body>,
    ) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .expect("POST");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    pub fn post_json(&self, body: &Value) -> (u16, Value) {
        self.post("/v1/events", "application/json", body.to_string())
    }

    /// `GET /metrics` (no token), as `name{labels}` → value.
    pub fn metrics(&self) -> std::collections::HashMap<String, f64> {
        let r = self
            .http
            .get(self.url("/metrics"))
            .send()
            .expect("GET /metrics");
        assert_eq!(r.status().as_u16(), 200);
        r.text()
            .expect("metrics text")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    /// One metric's value (0 when absent: Prometheus counters start absent).
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics().get(name).copied().unwrap_or(0.0)
    }

    /// The head object of `GET /v1/head`.
    pub fn head(&self) -> Value {
        let (status, body) = self.get("/v1/head");
        assert_eq!(status, 200, "{body}");
        body["data"].clone()
    }

    /// The whole log as export lines.
    pub fn export_lines(&self) -> Vec<String> {
        let (status, text) = self.get_text("/v1/export?since=earliest");
        assert_eq!(status, 200, "{text}");
        text.split('\n')
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Runs `cairn ARGS --url <this server> --token <admin token>`: (exit code, stdout,
    /// stderr).
    pub fn cairn(&self, args: &[&str]) -> (i32, String, String) {
        let url = self.url("");
        let mut all = args.to_vec();
        all.extend(["--url", &url, "--token", &self.token]);
        cairn(&all, &[])
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe_free_sigterm(c.id());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("cairn did not exit within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn unsafe_free_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port that was free a moment ago.
/// A loopback port free now, never one this process was given before: the kernel may
/// hand a just-released port out again, and tests running in parallel (a cluster's
/// client, route and monitor ports) would then collide.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Runs the `cairn` CLI; returns (exit code, stdout, stderr).
pub fn cairn(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("CAIRN_URL")
        .env_remove("CAIRN_TOKEN")
        .envs(envs.iter().copied())
        .output()
        .expect("run cairn");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cairn` with `args`; kills it and panics if it has not exited within `timeout`.
/// Returns the exit code and stderr.
pub fn run_bounded(args: &[&std::ffi::OsStr], timeout: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("CAIRN_URL")
        .env_remove("CAIRN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cairn");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = reader.join().unwrap_or_default();
            panic!("cairn {args:?} did not exit within {timeout:?}; stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), reader.join().unwrap_or_default())
}

/// SPEC §1's independent auditor (`examples/auditor.py`; Python with `cryptography` and
/// `rfc8785`, which CI installs): (success, stdout + stderr).
pub fn auditor(args: &[&str]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/auditor.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("run python3 examples/auditor.py");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Every archive, decompressed, in name order, then `tail`: one NDJSON text.
pub fn archives_then(dir: &Path, tail: &str) -> String {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.expect("dir entry").path())
                .filter(|p| p.to_string_lossy().ends_with(".ndjson.zst"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let mut all = String::new();
    for path in names {
        let mut text = String::new();
        zstd::Decoder::new(std::fs::File::open(&path).expect("archive"))
            .expect("zstd")
            .read_to_string(&mut text)
            .expect("archive text");
        all.push_str(&text);
    }
    all.push_str(tail);
    all
}
