//! Every command and flag, in one place (clap). Each `serve` flag also reads a
//! `CAIRN_*` environment variable; remote commands read `CAIRN_URL` and `CAIRN_TOKEN`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::writer::SyncMode;

/// A whole number of seconds from 1 to a day: a zero period spins, and a huge one
/// overflows the clock.
fn seconds() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..=86_400)
}

#[derive(Debug, Parser)]
#[command(
    name = "cairn",
    version,
    about = "A durable, hash-chained event log with gap-free streaming"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines on stderr as text or as JSON objects (one per line); `RUST_LOG` filters.
    #[arg(
        long,
        global = true,
        env = "CAIRN_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Append events: from flags, or NDJSON on stdin.
    Append(AppendArgs),
    /// Write events as NDJSON to stdout.
    Export(ExportArgs),
    /// Print events as NDJSON; `--follow` keeps streaming, `--cursor-file` resumes.
    Events(EventsArgs),
    /// Re-derive the hash chain of an export file, a server or a data directory; or
    /// check a checkpoint (--checkpoint) or an inclusion proof (--proof).
    Verify(VerifyArgs),
    /// Print an offline-verifiable inclusion proof (C2SP tlog-proof) for one event.
    Proof(ProofArgs),
    /// Remove old events by hand (retention): offline on a stopped server's data
    /// directory, or with --url and an admin token.
    Prune(PruneArgs),
    /// Create, list or revoke tokens: on a stopped server's data directory, or with
    /// --url and an admin token on a running one.
    Token(TokenArgs),
    /// Manage webhooks (SPEC §7): offline on a stopped server's data directory (--data),
    /// or through a running server (--url, with an admin token).
    Webhook(WebhookArgs),
    /// Cluster mode: look after the cluster's shared state in NATS.
    Cluster(ClusterArgs),
}

#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub action: ClusterAction,
}

#[derive(Debug, Subcommand)]
pub enum ClusterAction {
    /// Remove a node that is gone for good from retention's trim registrations, so the
    /// JetStream stream is trimmed behind the remaining nodes again. A node started
    /// again later under that name registers again (and refuses to start if the stream
    /// was trimmed past its copy).
    Forget {
        /// The node's name (its --node; by default its listen address).
        node: String,
        #[command(flatten)]
        nats: NatsPlace,
    },
}

/// The cluster a `cairn cluster` command works on: the same flags as `serve`'s.
#[derive(Debug, Args, Clone)]
pub struct NatsPlace {
    /// The NATS servers (comma list of URLs) whose JetStream holds the log.
    #[arg(long, env = "CAIRN_NATS", value_delimiter = ',', required = true)]
    pub nats: Vec<String>,
    /// The JetStream stream that holds the log.
    #[arg(long, env = "CAIRN_NATS_STREAM", default_value = "CAIRN", value_parser = stream_name)]
    pub nats_stream: String,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub action: TokenAction,
    /// Data directory to work on offline (the server must be stopped); default `data`.
    /// Given explicitly, it wins over CAIRN_URL.
    #[arg(long, global = true)]
    pub data: Option<PathBuf>,
    /// A running server: work through its API instead (needs an admin token).
    #[arg(long, global = true, env = "CAIRN_URL")]
    pub url: Option<String>,
    /// Admin token for --url.
    #[arg(long, global = true, env = "CAIRN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Create a token and print its secret (shown only this once) alone on stdout.
    Create {
        #[arg(long, value_enum)]
        role: crate::auth::Role,
        #[arg(long)]
        name: String,
        /// Allow-list: comma list of types and `prefix*` patterns.
        #[arg(long, value_delimiter = ',')]
        types: Option<Vec<String>>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token at once; its open streams close.
    Revoke { id: String },
}

#[derive(Debug, Args)]
pub struct WebhookArgs {
    #[command(subcommand)]
    pub action: WebhookAction,
}

/// Where `cairn webhook` works: a stopped server's data directory, or a running server.
#[derive(Debug, Args, Clone)]
pub struct WebhookPlace {
    /// Data directory of a stopped server (the default when no server URL is given: ./data).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A running server's URL (needs an admin --token).
    #[arg(long, env = "CAIRN_URL")]
    pub url: Option<String>,
    #[arg(long, env = "CAIRN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum WebhookAction {
    /// Create a webhook; prints its secret alone on stdout (shown only once). Here
    /// `--url` is the receiver's URL, so a running server is named with `--server`.
    Create {
        /// The receiver's URL (http or https).
        #[arg(long)]
        url: String,
        #[arg(long)]
        name: Option<String>,
        /// Comma list of exact types and prefix* patterns (default: every type).
        #[arg(long, value_delimiter = ',')]
        types: Option<Vec<String>>,
        /// Only events with exactly this source.
        #[arg(long)]
        source: Option<String>,
        /// Where delivery starts: a ULID, an RFC 3339 time, a duration (15m, 2h, 7d) or
        /// `earliest` (default: the head now, only new events).
        #[arg(long)]
        since: Option<String>,
        /// Most events per request (1–1000).
        #[arg(long, default_value_t = 1)]
        batch: u64,
        /// Data directory of a stopped server (default ./data without --server).
        #[arg(long)]
        data: Option<PathBuf>,
        /// A running server's URL (needs an admin --token).
        #[arg(long, env = "CAIRN_URL")]
        server: Option<String>,
        #[arg(long, env = "CAIRN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// List webhooks and their state.
    List {
        #[command(flatten)]
        place: WebhookPlace,
    },
    /// Show one webhook (JSON, as GET /v1/webhooks/{id}).
    Show {
        id: String,
        #[command(flatten)]
        place: WebhookPlace,
    },
    /// Stop delivering (the cursor is kept).
    Pause {
        id: String,
        #[command(flatten)]
        place: WebhookPlace,
    },
    /// Deliver again, from the cursor.
    Resume {
        id: String,
        #[command(flatten)]
        place: WebhookPlace,
    },
    /// Move the cursor: delivery continues after it (earlier: events are sent again).
    Replay {
        id: String,
        /// A ULID, an RFC 3339 time, a duration (15m, 2h, 7d) or `earliest`.
        #[arg(long)]
        since: String,
        #[command(flatten)]
        place: WebhookPlace,
    },
    /// Delete a webhook.
    Delete {
        id: String,
        #[command(flatten)]
        place: WebhookPlace,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory (created if missing).
    #[arg(long, env = "CAIRN_DATA", default_value = "data")]
    pub data: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "CAIRN_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// fsync before acknowledging, or not (`none` can lose acknowledged events on power loss).
    #[arg(long, env = "CAIRN_SYNC", value_enum, default_value = "fsync")]
    pub sync: SyncMode,
    /// Seconds of silence before a stream heartbeat.
    #[arg(long, env = "CAIRN_HEARTBEAT", default_value_t = 15, value_parser = seconds())]
    pub heartbeat: u64,
    /// Most open streams (SSE and WebSocket together).
    #[arg(long, env = "CAIRN_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Seconds a stream client may leave data unread before it is disconnected.
    #[arg(long, env = "CAIRN_WRITE_TIMEOUT", default_value_t = 30, value_parser = seconds())]
    pub write_timeout: u64,
    /// Require tokens (`off` lets anyone who reaches the port read and append).
    #[arg(long, env = "CAIRN_AUTH", value_enum, default_value = "on")]
    pub auth: OnOff,
    /// Checkpoint origin name (kept for life once chosen).
    #[arg(long, env = "CAIRN_ORIGIN")]
    pub origin: Option<String>,
    /// Seconds between signed checkpoints while the log grows.
    #[arg(long, env = "CAIRN_CHECKPOINT_INTERVAL", default_value_t = 1, value_parser = seconds())]
    pub checkpoint_interval: u64,
    /// Most events in one ingest request.
    #[arg(long, env = "CAIRN_MAX_EVENTS_PER_REQUEST", default_value_t = 10_000)]
    pub max_events_per_request: usize,
    /// Largest ingest body, in bytes.
    #[arg(long, env = "CAIRN_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Seconds a webhook receiver has to answer a delivery (fractions allowed).
    #[arg(long, env = "CAIRN_WEBHOOK_TIMEOUT", default_value_t = 10.0, value_parser = fractional_seconds)]
    pub webhook_timeout: f64,
    /// Seconds before the first retry of a failed webhook delivery; it doubles per
    /// consecutive failure up to 5 minutes. For tests; the contract says 1.
    #[arg(long, env = "CAIRN_WEBHOOK_RETRY_INITIAL", default_value_t = 1.0, value_parser = fractional_seconds, hide = true)]
    pub webhook_retry_initial: f64,
    /// Remove events older than this (by their id's time): `90d`, `12h`, `30m`.
    #[arg(long, env = "CAIRN_RETAIN_FOR", value_parser = crate::retention::parse_duration)]
    pub retain_for: Option<std::time::Duration>,
    /// Keep (about) the newest N events.
    #[arg(long, env = "CAIRN_RETAIN_EVENTS", value_parser = clap::value_parser!(u64).range(1..))]
    pub retain_events: Option<u64>,
    /// Keep the stored events under this size (compressed): `50GiB`, `500MB`.
    #[arg(long, env = "CAIRN_RETAIN_BYTES", value_parser = crate::retention::parse_size)]
    pub retain_bytes: Option<u64>,
    /// Write pruned events here first, as cairn-<first>-<last>.ndjson.zst.
    #[arg(long, env = "CAIRN_ARCHIVE")]
    pub archive: Option<PathBuf>,
    /// Cluster mode: the NATS servers (comma list of URLs) whose JetStream holds the log.
    #[arg(long, env = "CAIRN_NATS", value_delimiter = ',')]
    pub nats: Option<Vec<String>>,
    /// Cluster mode: the JetStream stream that holds the log.
    #[arg(long, env = "CAIRN_NATS_STREAM", default_value = "CAIRN", value_parser = stream_name)]
    pub nats_stream: String,
    /// Cluster mode: replicas of the stream when this node creates it.
    #[arg(long, env = "CAIRN_NATS_REPLICAS", default_value_t = 3,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: u8,
    /// Cluster mode: this node's name (default: the listen address).
    #[arg(long, env = "CAIRN_NODE")]
    pub node: Option<String>,
    /// Cluster mode: seconds a silent sequencer keeps its lease.
    #[arg(long, env = "CAIRN_NATS_LEASE", default_value_t = 3, value_parser = seconds(), hide = true)]
    pub nats_lease: u64,
    /// Cluster mode: seconds a node that stopped renewing keeps a webhook's lease (the
    /// node that creates the lease bucket sets it for the cluster).
    #[arg(long, env = "CAIRN_WEBHOOK_LEASE", default_value_t = 10, value_parser = seconds(), hide = true)]
    pub webhook_lease: u64,
}

fn fractional_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err("must be a number of seconds above 0 and at most 86400".into()),
    }
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Remove what `since=CURSOR` excludes: a ULID (ids up to and including it) or an
    /// RFC 3339 time (events ingested before it).
    #[arg(long)]
    pub before: String,
    /// A stopped server's data directory (offline). Given explicitly, it wins over CAIRN_URL.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A running server (needs an admin token; it archives with its own --archive).
    #[arg(long, env = "CAIRN_URL")]
    pub url: Option<String>,
    /// Admin token for --url.
    #[arg(long, env = "CAIRN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Offline: write pruned events here first.
    #[arg(long)]
    pub archive: Option<PathBuf>,
}

/// A JetStream stream name that also works inside subjects and bucket names.
fn stream_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(s.to_string())
    } else {
        Err("use 1 to 32 letters, digits, '_' or '-'".into())
    }
}

/// Where a remote command finds the server.
#[derive(Debug, Args, Clone)]
pub struct Remote {
    /// Server URL.
    #[arg(long, env = "CAIRN_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Bearer token (an `ingest` token to append, `read` to export).
    #[arg(long, env = "CAIRN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Args)]
pub struct AppendArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// Event type; without it, NDJSON events are read from stdin.
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// Event data (JSON).
    #[arg(long, requires = "event_type")]
    pub data: Option<String>,
    /// Event source.
    #[arg(long, requires = "event_type")]
    pub source: Option<String>,
    /// When the event happened (RFC 3339); default: ingest time.
    #[arg(long, requires = "event_type")]
    pub timestamp: Option<String>,
    /// Most events per request when reading stdin.
    #[arg(long, default_value_t = 10_000)]
    pub batch: usize,
}

/// `since`/`until`/`types`/`source`, as for the HTTP API.
#[derive(Debug, Args, Clone, Default)]
pub struct FilterArgs {
    /// ULID, RFC 3339 time, a duration back from now (`30s`, `15m`, `2h`, `7d`) or
    /// `earliest` (the default; `cairn events --follow` starts at the head instead).
    #[arg(long)]
    pub since: Option<String>,
    /// ULID or RFC 3339 time (exclusive).
    #[arg(long)]
    pub until: Option<String>,
    /// Comma list of types and `prefix*` patterns.
    #[arg(long)]
    pub types: Option<String>,
    /// Exact source.
    #[arg(long)]
    pub source: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub remote: Remote,
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub remote: Remote,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Keep streaming new events; reconnect by itself from the last id.
    #[arg(long)]
    pub follow: bool,
    /// File holding the id to resume after; it wins over --since when it exists, and
    /// the last delivered id is written back (atomically) after each batch.
    #[arg(long)]
    pub cursor_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
// Several may be present (CAIRN_URL comes from the environment): --proof, then --file,
// then --data win over --url.
#[command(group(clap::ArgGroup::new("input").required(true).multiple(true).args(["file", "url", "data", "proof"])))]
pub struct VerifyArgs {
    /// An NDJSON export ("-" for stdin); lines may be in any JSON form of the events
    /// (re-formatted by jq, Python's json.dumps, …).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// A running server (reads its export).
    #[arg(long, env = "CAIRN_URL")]
    pub url: Option<String>,
    /// A data directory (the server must be stopped).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Bearer token for --url.
    #[arg(long, env = "CAIRN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The hash the first event's prev_hash must equal (pins a partial export's start).
    #[arg(long)]
    pub expect_prev: Option<String>,
    /// The hash the last event must have (pins the end).
    #[arg(long)]
    pub expect_head: Option<String>,
    /// With --url: a saved checkpoint. Checks the server's newest checkpoint and a
    /// consistency proof from this one (the log only grew), then replaces the file.
    #[arg(long, requires_all = ["url", "key"], conflicts_with_all = ["expect_prev", "expect_head"])]
    pub checkpoint: Option<PathBuf>,
    /// The log's verifier key (`origin+id+key`, from /v1/checkpoint/key).
    #[arg(long)]
    pub key: Option<String>,
    /// A `cairn proof` file (C2SP tlog-proof), checked offline with --key.
    #[arg(long, requires = "key", conflicts_with_all = ["expect_prev", "expect_head"])]
    pub proof: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ProofArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// The event: its seq, or its id (an allow-listed token needs the id).
    pub event: String,
    /// Seconds to wait for a checkpoint that covers the event.
    #[arg(long, default_value_t = 10)]
    pub wait: u64,
}
