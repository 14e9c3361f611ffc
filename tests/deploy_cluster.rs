//! The three-node example of deploy/ (nats-1.conf … nats-3.conf, cairn-cluster.env)
//! works as written: nats-server accepts each file, and the three servers, started from
//! the files with only their addresses and store directory moved to loopback ports and a
//! temporary directory, form a JetStream cluster that three cairn nodes configured from
//! the env file share (an event posted on one is served by all, from an R3 stream).
//!
//! Skipped (with a line saying so) where nats-server is not installed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::nats::{missing, nats_server_binary};
use common::{Server, free_port, wait_until};
use serde_json::json;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Replaces `from` (which must occur exactly once) by `to`.
fn replace_once(text: &str, from: &str, to: &str, file: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "{file}: expected `{from}` exactly once"
    );
    text.replace(from, to)
}

/// `nats-server -t -c FILE`: (accepted, output).
fn nats_check(config: &Path) -> (bool, String) {
    let out = Command::new(nats_server_binary().expect("nats-server"))
        .arg("-t")
        .arg("-c")
        .arg(config)
        .output()
        .expect("run nats-server -t");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The NATS servers this test started, killed by pid on drop.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn deploy_example_forms_a_three_server_cluster_for_three_nodes() {
    if missing() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");

    // Each file as written.
    for i in 1..=3 {
        let path = deploy(&format!("nats-{i}.conf"));
        let (ok, out) = nats_check(&path);
        assert!(ok, "nats-server -t refused {}: {out}", path.display());
    }
    // The commented `sync_interval: always` is what ≥ 2.10 needs; 2.9 refuses it (so the
    // file keeps it commented, saying why).
    let version = Command::new(nats_server_binary().expect("nats-server"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let first = read(&deploy("nats-1.conf"));
    let synced = tmp.path().join("synced.conf");
    std::fs::write(
        &synced,
        replace_once(
            &first,
            "# sync_interval: always",
            "sync_interval: always",
            "nats-1.conf",
        ),
    )
    .expect("write");
    let (ok, out) = nats_check(&synced);
    if version.contains("v2.9.") {
        assert!(
            !ok && out.contains("unknown field \"sync_interval\""),
            "{version}: {out}"
        );
    } else {
        assert!(ok, "{version}: {out}");
    }

    // The three servers on loopback ports, from the files.
    let client: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let route: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut servers = Servers(Vec::new());
    for i in 0..3 {
        let name = format!("nats-{}.conf", i + 1);
        let mut text = read(&deploy(&name));
        text = replace_once(
            &text,
            "listen: 0.0.0.0:4222",
            &format!("listen: 127.0.0.1:{}", client[i]),
            &name,
        );
        text = replace_once(
            &text,
            "http: 127.0.0.1:8222",
            &format!("http: 127.0.0.1:{}", free_port()),
            &name,
        );
        text = replace_once(
            &text,
            "listen: 0.0.0.0:6222",
            &format!("listen: 127.0.0.1:{}", route[i]),
            &name,
        );
        for (k, port) in route.iter().enumerate() {
            text = replace_once(
                &text,
                &format!("nats-route://nats-{}.internal:6222", k + 1),
                &format!("nats-route://127.0.0.1:{port}"),
                &name,
            );
        }
        let store = tmp.path().join(format!("store{i}"));
        text = replace_once(
            &text,
            "store_dir: \"/var/lib/nats/jetstream\"",
            &format!("store_dir: \"{}\"", store.display()),
            &name,
        );
        let config = tmp.path().join(&name);
        std::fs::write(&config, text).expect("write config");
        let child = Command::new(nats_server_binary().expect("nats-server"))
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        servers.0.push(child);
        let port = client[i];
        wait_until(Duration::from_secs(10), "nats-server to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    // Three cairn nodes from the env file, its NATS addresses moved to those ports.
    let env = read(&deploy("cairn-cluster.env"));
    let mut settings: Vec<(String, String)> = env
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let keys: Vec<&str> = settings.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["CAIRN_NATS", "CAIRN_NODE", "CAIRN_LISTEN"]);
    let mut nats = settings[0].1.clone();
    for (k, port) in client.iter().enumerate() {
        nats = replace_once(
            &nats,
            &format!("nats-{}.internal:4222", k + 1),
            &format!("127.0.0.1:{port}"),
            "cairn-cluster.env",
        );
    }
    settings[0].1 = nats;
    // The listen address is the test's own (a free loopback port per node).
    settings.pop();
    let mut nodes: Vec<Server> = Vec::new();
    let mut dirs = Vec::new();
    for i in 1..=3 {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        dirs.push(dir);
        let node_name = format!("cairn-{i}");
        let mut envs = settings.clone();
        envs[1].1 = node_name.clone();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut node = Server::launch(&data, &[], &envs)
            .unwrap_or_else(|log| panic!("{node_name} did not start:\n{log}"));
        if let Some(first) = nodes.first() {
            node.token = first.token.clone();
        }
        nodes.push(node);
    }
    assert!(
        nodes[0].log_text().contains("cluster mode"),
        "{}",
        nodes[0].log_text()
    );

    // An event posted on the second node is served by all three.
    let body = json!({"events": [{"type": "deploy.check", "data": {"n": 1}}]});
    wait_until(Duration::from_secs(20), "an ingest on cairn-2", || {
        nodes[1].post_json(&body).0 == 201
    });
    for n in &nodes {
        wait_until(Duration::from_secs(10), "every node to serve it", || {
            n.http()
                .get(n.url("/v1/head"))
                .bearer_auth(&n.token)
                .send()
                .ok()
                .and_then(|r| r.json::<serde_json::Value>().ok())
                .is_some_and(|h| h["data"]["seq"] == 1)
        });
    }

    // The stream is replicated on all three servers.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (leader, replicas) = rt.block_on(async {
        let addrs: Vec<async_nats::ServerAddr> = client
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}").parse().expect("url"))
            .collect();
        let nc = async_nats::ConnectOptions::new()
            .connect(addrs)
            .await
            .expect("connect");
        let js = async_nats::jetstream::new(nc);
        let mut stream = js.get_stream("CAIRN").await.expect("stream CAIRN");
        let info = stream.info().await.expect("stream info");
        assert_eq!(info.config.num_replicas, 3);
        let cluster = info.cluster.clone().expect("a clustered stream");
        (cluster.leader.unwrap_or_default(), cluster.replicas.len())
    });
    assert!(leader.starts_with("nats-"), "leader {leader:?}");
    assert_eq!(replicas, 2, "the leader and two replicas");
    drop(nodes);
    drop(servers);
}
