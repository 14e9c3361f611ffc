//! `cairn cluster`: the cluster's shared state in NATS (cluster mode, SPEC §6).

use std::process::ExitCode;

use crate::cli::{ClusterAction, ClusterArgs};

pub fn run(args: &ClusterArgs) -> Result<ExitCode, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    match &args.action {
        ClusterAction::Forget { node, nats } => {
            let forgotten =
                runtime.block_on(crate::cluster::forget(&nats.nats, &nats.nats_stream, node))?;
            println!(
                "removed node {node:?} from the trim registrations in {} (it had pruned through \
                 stream message {})",
                forgotten.bucket, forgotten.applied
            );
            if forgotten.remaining.is_empty() {
                println!(
                    "no node is registered now: the stream is not trimmed until one is (a node \
                     registers when it starts)"
                );
            } else {
                let nodes: Vec<String> = forgotten
                    .remaining
                    .iter()
                    .map(|(node, applied)| format!("{node:?} (through {applied})"))
                    .collect();
                println!(
                    "the stream is trimmed behind the remaining nodes: {}",
                    nodes.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
