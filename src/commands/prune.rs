//! `cairn prune --before CURSOR`: offline on a stopped server's data directory, or
//! through `POST /v1/admin/prune` with an admin token.

use std::process::ExitCode;

use crate::cli::PruneArgs;
use crate::client::Client;
use crate::retention;
use crate::store::{DataDir, Store};

pub fn run(args: &PruneArgs) -> Result<ExitCode, String> {
    let outcome: serde_json::Value = if let Some(dir) = &args.data {
        let store = Store::open(DataDir::lock_existing(dir).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        // Marked at a node's first start, before it has applied anything.
        if let Some(stream) = store.cluster_stream().map_err(|e| e.to_string())? {
            return Err(format!(
                "{} is a node of the cluster stream {stream}: pruning one node alone would give it a \
                 horizon of its own; in cluster mode retention is one decision for the \
                 whole cluster, taken by the sequencer from its --retain-* bounds (SPEC §8)",
                dir.display()
            ));
        }
        crate::merkle::catch_up(&store).map_err(|e| e.to_string())?;
        let covered = crate::checkpoint::latest_size_offline(dir).map_err(|e| e.to_string())?;
        let (target, max_id) = retention::before_cursor(&store, &args.before)?;
        let outcome = retention::prune_to(&store, target, max_id, covered, args.archive.as_deref())
            .map_err(|e| e.to_string())?;
        serde_json::to_value(outcome).map_err(|e| e.to_string())?
    } else if let Some(url) = &args.url {
        if args.archive.is_some() {
            return Err(
                "--archive is for --data; a running server archives with its own --archive".into(),
            );
        }
        let client = Client::new(url, args.token.clone())?;
        let query = serde_urlencoded::to_string([("before", args.before.as_str())])
            .map_err(|e| e.to_string())?;
        client.post(
            &format!("/v1/admin/prune?{query}"),
            "application/json",
            Vec::new(),
        )?["data"]
            .take()
    } else {
        return Err("give --data DIR (a stopped server) or --url URL".into());
    };
    if let Some(kept) = outcome["kept"].as_array() {
        for reason in kept {
            eprintln!("cairn: kept: {}", reason.as_str().unwrap_or_default());
        }
    }
    println!(
        "pruned {} events; the log starts at seq {} ({})",
        outcome["removed"].as_u64().unwrap_or(0),
        outcome["first_seq"].as_u64().unwrap_or(0),
        outcome["first_id"].as_str().unwrap_or("empty")
    );
    Ok(ExitCode::SUCCESS)
}
