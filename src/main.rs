use std::process::ExitCode;

use clap::Parser;

use cairn::cli::{Cli, Command, LogFormat, OnOff};
use cairn::commands;
use cairn::server::{self, ServeOptions};

// Events are allocated on request tasks and freed on the writer and syncer threads;
// glibc's allocator spent ~15% of ingest CPU on that pattern.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A command's answer is its output; the NATS client's connection notes would only
    // be noise there.
    let default_filter = match cli.command {
        Command::Cluster(_) => "warn",
        _ => "info",
    };
    init_logging(cli.log_format, default_filter);
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Append(args) => commands::append::run(&args),
        Command::Export(args) => commands::export::run(&args),
        Command::Events(args) => commands::events::run(&args),
        Command::Verify(args) => commands::verify::run(&args),
        Command::Proof(args) => commands::proof::run(&args),
        Command::Token(args) => commands::token::run(&args),
        Command::Webhook(args) => commands::webhook::run(&args),
        Command::Prune(args) => commands::prune::run(&args),
        Command::Cluster(args) => commands::cluster::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("cairn: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
}

fn serve(args: cairn::cli::ServeArgs) -> Result<ExitCode, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let opts = ServeOptions {
        data: args.data,
        listen: args.listen,
        sync: args.sync,
        auth: args.auth == OnOff::On,
        max_events_per_request: args.max_events_per_request,
        max_body_bytes: args.max_body_bytes,
        heartbeat: std::time::Duration::from_secs(args.heartbeat),
        max_connections: args.max_connections,
        write_timeout: std::time::Duration::from_secs(args.write_timeout),
        origin: args.origin,
        checkpoint_interval: std::time::Duration::from_secs(args.checkpoint_interval),
        webhook_timeout: std::time::Duration::from_secs_f64(args.webhook_timeout),
        webhook_retry_initial: std::time::Duration::from_secs_f64(args.webhook_retry_initial),
        retention: cairn::retention::Policy {
            retain_for: args.retain_for,
            retain_events: args.retain_events,
            retain_bytes: args.retain_bytes,
            archive: args.archive,
        },
        cluster: args.nats.map(|urls| cairn::cluster::ClusterOptions {
            urls,
            stream: args.nats_stream,
            replicas: usize::from(args.nats_replicas),
            node: args.node.unwrap_or_else(|| args.listen.to_string()),
            lease: std::time::Duration::from_secs(args.nats_lease),
            webhook_lease: std::time::Duration::from_secs(args.webhook_lease),
        }),
    };
    runtime
        .block_on(server::run(opts))
        .map(|()| ExitCode::SUCCESS)
        .map_err(|e| e.to_string())
}
