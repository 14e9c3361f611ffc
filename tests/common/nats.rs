//! Real `nats-server` processes on loopback ports, clustered with JetStream, for the
//! cluster-mode tests: started, killed, paused and resumed by pid.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, wait_until};

pub struct NatsCluster {
    servers: Vec<NatsServer>,
    _tmp: tempfile::TempDir,
}

struct NatsServer {
    child: Option<Child>,
    config: PathBuf,
    client_port: u16,
    /// The monitoring port (`/jsz`: who leads each stream).
    http_port: u16,
}

/// True (after a line saying so) when nats-server is not installed, unless
/// `CAIRN_CLUSTER_TESTS=required` (set by `.ci/run`, which installs it): then CI fails
/// rather than passing without having run these tests.
pub fn missing() -> bool {
    if nats_server_binary().is_some() {
        return false;
    }
    assert!(
        std::env::var("CAIRN_CLUSTER_TESTS").as_deref() != Ok("required"),
        "nats-server is not installed and CAIRN_CLUSTER_TESTS=required"
    );
    eprintln!("SKIPPED: nats-server is not installed");
    true
}

/// The `nats-server` binary, if installed (Debian's package puts it in /usr/sbin).
pub fn nats_server_binary() -> Option<PathBuf> {
    [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

impl NatsCluster {
    /// Starts `n` JetStream servers routed to each other, and waits until each accepts
    /// client connections.
    pub fn start(n: usize) -> NatsCluster {
        let tmp = tempfile::tempdir().expect("tempdir");
        let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let http_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut servers = Vec::new();
        for i in 0..n {
            let dir = tmp.path().join(format!("n{i}"));
            std::fs::create_dir_all(&dir).expect("nats dir");
            let config = tmp.path().join(format!("n{i}.conf"));
            std::fs::write(
                &config,
                format!(
                    "listen: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\nserver_name: n{i}\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{ name: cairn_test, listen: 127.0.0.1:{}, routes: [{routes}] }}\n",
                    client_ports[i],
                    http_ports[i],
                    dir.display(),
                    route_ports[i]
                ),
            )
            .expect("nats config");
            servers.push(NatsServer {
                child: None,
                config,
                client_port: client_ports[i],
                http_port: http_ports[i],
            });
        }
        let mut cluster = NatsCluster { servers, _tmp: tmp };
        for i in 0..n {
            cluster.restart(i);
        }
        cluster
    }

    /// `--nats` for cairn: every server's URL.
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// SIGKILL server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.servers[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts server `i` (again) on its ports and data, and waits until it listens.
    pub fn restart(&mut self, i: usize) {
        let binary = nats_server_binary().expect("nats-server is installed");
        let server = &mut self.servers[i];
        let log_path = server.config.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("nats-server log file");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&server.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        server.child = Some(child);
        let port = server.client_port;
        // A server recovering its JetStream data on a loaded 2-core machine can take a
        // while; one that exited (a port taken meanwhile) says why in its log.
        wait_until(Duration::from_secs(30), "nats-server to listen", || {
            if let Some(Ok(Some(status))) = server.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "nats-server n{i} exited ({status}):\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// The index of the server leading `stream`, as a running server reports it.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        let cluster = self.stream_cluster(stream)?;
        let name = cluster["leader"].as_str()?;
        name.strip_prefix('n')?.parse().ok()
    }

    /// Every replica of `stream` is current, as its leader reports (a restarted server
    /// has caught up).
    pub fn stream_current(&self, stream: &str) -> bool {
        let Some(leader) = self.stream_leader(stream) else {
            return false;
        };
        let Some(cluster) = self.jsz_stream_cluster(leader, stream) else {
            return false;
        };
        let replicas = cluster["replicas"].as_array().cloned().unwrap_or_default();
        replicas.len() + 1 == self.servers.len() && replicas.iter().all(|r| r["current"] == true)
    }

    /// The `cluster` member of `stream` in the first running server's `/jsz`.
    fn stream_cluster(&self, stream: &str) -> Option<serde_json::Value> {
        (0..self.servers.len())
            .filter(|&i| self.servers[i].child.is_some())
            .find_map(|i| self.jsz_stream_cluster(i, stream))
    }

    /// `stream`'s state (`first_seq`, `last_seq`, …) as its leader reports it.
    pub fn stream_state(&self, stream: &str) -> Option<serde_json::Value> {
        let leader = self.stream_leader(stream)?;
        self.jsz_stream(leader, stream).map(|s| s["state"].clone())
    }

    fn jsz_stream_cluster(&self, i: usize, stream: &str) -> Option<serde_json::Value> {
        self.jsz_stream(i, stream).map(|s| s["cluster"].clone())
    }

    /// `stream`'s entry in server `i`'s `/jsz`.
    fn jsz_stream(&self, i: usize, stream: &str) -> Option<serde_json::Value> {
        let url = format!(
            "http://127.0.0.1:{}/jsz?accounts=true&streams=true",
            self.servers[i].http_port
        );
        let jsz: serde_json::Value = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .ok()?
            .get(url)
            .send()
            .ok()?
            .json()
            .ok()?;
        jsz["account_details"]
            .as_array()?
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
            .find(|s| s["name"] == stream)
    }

    fn signal(&self, i: usize, signal: &str) {
        if let Some(c) = &self.servers[i].child {
            let _ = Command::new("kill")
                .arg(signal)
                .arg(c.id().to_string())
                .status();
        }
    }

    /// SIGSTOP: the process stays, silent (a hung or partitioned server).
    pub fn pause(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.resume(i);
            self.kill(i);
        }
    }
}
