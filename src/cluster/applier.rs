//! The applier: every node's second source of groups for its writer.
//!
//! It reads the stream from this node's position + 1 with a pull consumer it owns and
//! recreates itself (async-nats's ordered consumer restarts from the stream's beginning
//! when it is recreated before delivering anything, docs/cluster.md gotcha 5), and hands
//! each group to the writer, which checks the chain and stores it. Consecutive groups
//! waiting in the writer's queue are stored with one fsync, which is what makes catching
//! up fast.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::stream;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::GroupMessage;
use crate::writer::{StreamGroup, Writer};

/// Pause before a new consumer after an error (NATS down, leader election).
const RETRY: Duration = Duration::from_millis(100);

/// Silence after which the applier checks whether the stream moved on without it.
const SILENCE: Duration = Duration::from_secs(2);

/// Test hook (documented in docs/testing.md): names a file; while it exists, this node
/// applies nothing more, so a test can hold one node's copy behind the stream while its
/// HTTP side keeps answering.
const HOLD_ENV: &str = "CAIRN_TEST_HOLD_APPLIER";

pub(super) async fn run(log: stream::Stream, writer: Writer, shutdown: CancellationToken) {
    // Groups handed to the writer; it may not have stored them yet.
    let mut sent = *writer.applied_stream().borrow();
    while !shutdown.is_cancelled() {
        match follow(&log, &writer, &mut sent, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(error = %e, from = sent + 1, "stream consumer restarts");
                tokio::select! {
                    () = tokio::time::sleep(RETRY) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// Reads from `sent + 1` until an error (Err: start again) or shutdown (Ok).
async fn follow(
    log: &stream::Stream,
    writer: &Writer,
    sent: &mut u64,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let consumer = log
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: *sent + 1,
            },
            ack_policy: AckPolicy::None,
            memory_storage: true,
            num_replicas: 1,
            inactive_threshold: Duration::from_secs(5),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("creating a consumer: {e}"))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(500)
        .expires(Duration::from_secs(1))
        .heartbeat(Duration::from_millis(250))
        .messages()
        .await
        .map_err(|e| format!("reading the stream: {e}"))?;
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(SILENCE, messages.next()) => next,
            () = shutdown.cancelled() => return Ok(()),
        };
        let Ok(next) = next else {
            // Silence is normal on an idle log. But a consumer lost with its server
            // (a killed stream leader) can leave the pull stream waiting forever without
            // an error: when the stream holds more than this node has, start again.
            let mut log = log.clone();
            let last = log
                .info()
                .await
                .map_err(|e| format!("reading the stream's state: {e}"))?
                .state
                .last_sequence;
            if last > *sent {
                return Err(format!(
                    "no message for {SILENCE:?} while the stream holds {last} (sent {sent})"
                ));
            }
            continue;
        };
        let message = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(format!("reading the stream: {e}")),
            None => return Err("the consumer ended".into()),
        };
        let stream_seq = message
            .info()
            .map_err(|e| format!("a message without stream metadata: {e}"))?
            .stream_sequence;
        if stream_seq <= *sent {
            continue;
        }
        if stream_seq != *sent + 1 {
            return Err(format!(
                "expected stream sequence {}, got {stream_seq}",
                *sent + 1
            ));
        }
        hold_while_asked(shutdown).await;
        let group = GroupMessage::decode(&message.payload).and_then(|g| {
            let events = crate::store::decode_chunk(&g.events).map_err(|e| e.to_string())?;
            Ok(StreamGroup {
                stream_seq,
                events,
                chunk: g.events,
                idempotency: g.idempotency,
            })
        });
        let group = match group {
            Ok(g) => g,
            Err(reason) => {
                // Not something a retry fixes: stop this node rather than skip a group.
                writer.halt(format!(
                    "stream message {stream_seq} cannot be read ({reason}); this node stopped serving"
                ));
                return Ok(());
            }
        };
        writer
            .apply(group)
            .await
            .map_err(|e| format!("the writer stopped: {e}"))?;
        *sent = stream_seq;
    }
}

/// Waits while the file named by [`HOLD_ENV`] exists (never, when it is not set: the
/// variable is read once, not per message).
async fn hold_while_asked(shutdown: &CancellationToken) {
    static HOLD_FILE: std::sync::LazyLock<Option<std::path::PathBuf>> =
        std::sync::LazyLock::new(|| std::env::var_os(HOLD_ENV).map(Into::into));
    let Some(path) = HOLD_FILE.as_ref() else {
        return;
    };
    while path.exists() && !shutdown.is_cancelled() {
        tracing::debug!("{HOLD_ENV}: holding the applier");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
