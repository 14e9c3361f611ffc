//! Forwarding: every node accepts `POST /v1/events` and sends the parsed request to
//! the sequencer over NATS request/reply, so only one node ever seals. The sequencer's
//! own requests take the same path (one code path; the hop is local to its NATS server).
//!
//! A 201 is answered only after the group is in the stream (the sequencer replies after
//! JetStream's ack) and after this node has applied it, so the answering node serves
//! the events as soon as it has answered (SPEC §6).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::client::RequestErrorKind;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Names;
use super::sequencer::LEASE_KEY;
use super::shared::SharedMap;

use crate::event::NewEvent;
use crate::store::Head;
use crate::store::bincode_config;
use crate::writer::{AppendError, Appended, IdempotencyKey, Writer};

/// How long one forwarded request waits for the sequencer's reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(12);
/// How long a request keeps looking for a sequencer (a lease expiry plus a take-over).
const FIND_SEQUENCER: Duration = Duration::from_secs(15);
/// How long the answering node waits for its own copy to hold the new events.
const LOCAL_APPLY_WAIT: Duration = Duration::from_secs(10);

/// A forwarded ingest request.
#[derive(Serialize, Deserialize)]
pub(super) struct WireRequest {
    pub events: Vec<NewEvent>,
    pub idempotency: Option<IdempotencyKey>,
}

/// The sequencer's answer.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum WireReply {
    New {
        first_seq: u64,
        last_seq: u64,
        ids: Vec<[u8; 16]>,
        head_hash: [u8; 32],
        head_timestamp: Option<String>,
    },
    Replayed {
        first_seq: u64,
        last_seq: u64,
    },
    KeyReused,
    /// Nothing was appended; the request may go to the next sequencer.
    Retry,
    /// The outcome is unknown or the log cannot take appends (503).
    Unavailable(String),
    TooLarge(String),
}

impl WireReply {
    pub fn from_outcome(outcome: Result<Appended, AppendError>) -> WireReply {
        match outcome {
            Ok(Appended::New {
                first_seq,
                last_seq,
                ids,
                head,
            }) => WireReply::New {
                first_seq,
                last_seq,
                ids: ids.iter().map(|id| id.0.to_be_bytes()).collect(),
                head_hash: head.hash,
                head_timestamp: head.timestamp,
            },
            Ok(Appended::Replayed {
                first_seq,
                last_seq,
            }) => WireReply::Replayed {
                first_seq,
                last_seq,
            },
            Err(AppendError::KeyReused) => WireReply::KeyReused,
            Err(AppendError::TooLarge(m)) => WireReply::TooLarge(m),
            Err(e) => WireReply::Unavailable(e.to_string()),
        }
    }

    pub fn encode(&self) -> bytes::Bytes {
        bincode::serde::encode_to_vec(self, bincode_config())
            .unwrap_or_default()
            .into()
    }
}

/// Sends appends to the sequencer (see the module docs).
pub struct Forwarder {
    client: async_nats::Client,
    names: Names,
    holder: Arc<LeaseHolder>,
    writer: Writer,
}

/// The node holding the sequencer lease: followed in the lease bucket, and read from the
/// bucket again when a request finds nobody on the holder's subject (a change the watch
/// has not brought yet). An expired lease sends no change (JetStream drops it silently);
/// the next holder's write does.
pub(super) struct LeaseHolder {
    current: Mutex<Option<String>>,
    lease: SharedMap,
}

impl LeaseHolder {
    pub(super) fn follow(lease: SharedMap, shutdown: CancellationToken) -> Arc<LeaseHolder> {
        let holder = Arc::new(LeaseHolder {
            current: Mutex::new(None),
            lease,
        });
        let (mut changes, _) = holder.lease.follow(shutdown);
        let following = holder.clone();
        tokio::spawn(async move {
            while let Some(change) = changes.recv().await {
                if change.key == LEASE_KEY {
                    following.set(change.value);
                }
            }
        });
        holder
    }

    fn current(&self) -> Option<String> {
        self.current.lock().map(|h| h.clone()).unwrap_or(None)
    }

    fn set(&self, value: Option<bytes::Bytes>) {
        if let Ok(mut current) = self.current.lock() {
            *current = value.map(|v| String::from_utf8_lossy(&v).into_owned());
        }
    }

    async fn refresh(&self) {
        match self.lease.get(LEASE_KEY).await {
            Ok(entry) => self.set(entry.and_then(|e| e.value)),
            Err(e) => tracing::debug!(error = %e, "cannot read the sequencer lease"),
        }
    }
}

impl Forwarder {
    pub(super) fn new(
        client: async_nats::Client,
        names: Names,
        holder: Arc<LeaseHolder>,
        writer: Writer,
    ) -> Forwarder {
        Forwarder {
            client,
            names,
            holder,
            writer,
        }
    }

    pub async fn append(
        &self,
        events: Vec<NewEvent>,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<Appended, AppendError> {
        let request = WireRequest {
            events,
            idempotency,
        };
        let payload: bytes::Bytes = bincode::serde::encode_to_vec(&request, bincode_config())
            .unwrap_or_default()
            .into();
        let started = Instant::now();
        loop {
            // Sent to the lease holder's own subject, not to a subject every sequencer
            // shares: a holder that froze (SIGSTOP, a stalled VM) keeps its NATS
            // subscription for minutes, and must stop receiving requests as soon as
            // another node holds the lease.
            let Some(holder) = self.holder.current() else {
                if started.elapsed() >= FIND_SEQUENCER {
                    return Err(no_sequencer());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                self.holder.refresh().await;
                continue;
            };
            let sent = self
                .client
                .send_request(
                    self.names.ingest_for(&holder),
                    async_nats::Request::new()
                        .payload(payload.clone())
                        .timeout(Some(REQUEST_TIMEOUT)),
                )
                .await;
            let retry = match sent {
                Ok(message) => {
                    let reply: WireReply =
                        bincode::serde::decode_from_slice(&message.payload, bincode_config())
                            .map(|(r, _)| r)
                            .map_err(|e| {
                                AppendError::ClusterUnavailable(format!(
                                    "the sequencer's reply does not decode: {e}"
                                ))
                            })?;
                    match reply {
                        WireReply::Retry => true,
                        reply => return self.answer(reply).await,
                    }
                }
                Err(e) => match e.kind() {
                    // Nobody holds the lease right now: a take-over is under way.
                    RequestErrorKind::NoResponders => {
                        self.holder.refresh().await;
                        true
                    }
                    RequestErrorKind::TimedOut => {
                        // A frozen holder: the next request goes to whoever holds now.
                        self.holder.refresh().await;
                        return Err(AppendError::ClusterUnavailable(
                            "the cluster's sequencer did not answer in time; the events may or \
                             may not have been appended (retry with the same Idempotency-Key to \
                             find out)"
                                .into(),
                        ));
                    }
                    RequestErrorKind::MaxPayloadExceeded => {
                        return Err(AppendError::TooLarge(
                            "the request is larger than the NATS servers' max_payload".into(),
                        ));
                    }
                    _ => true,
                },
            };
            if retry && started.elapsed() >= FIND_SEQUENCER {
                return Err(no_sequencer());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Turns the sequencer's reply into the answer, once this node serves the events.
    async fn answer(&self, reply: WireReply) -> Result<Appended, AppendError> {
        let appended = match reply {
            WireReply::New {
                first_seq,
                last_seq,
                ids,
                head_hash,
                head_timestamp,
            } => {
                let ids: Vec<ulid::Ulid> = ids
                    .into_iter()
                    .map(|b| ulid::Ulid(u128::from_be_bytes(b)))
                    .collect();
                Appended::New {
                    first_seq,
                    last_seq,
                    head: Head {
                        seq: last_seq,
                        id: ids.last().copied(),
                        hash: head_hash,
                        timestamp: head_timestamp,
                    },
                    ids,
                }
            }
            WireReply::Replayed {
                first_seq,
                last_seq,
            } => Appended::Replayed {
                first_seq,
                last_seq,
            },
            WireReply::KeyReused => return Err(AppendError::KeyReused),
            WireReply::TooLarge(m) => return Err(AppendError::TooLarge(m)),
            WireReply::Unavailable(m) => return Err(AppendError::ClusterUnavailable(m)),
            WireReply::Retry => {
                return Err(AppendError::ClusterUnavailable(
                    "nothing was appended; retry".into(),
                ));
            }
        };
        let last_seq = match &appended {
            Appended::New { last_seq, .. } | Appended::Replayed { last_seq, .. } => *last_seq,
        };
        if !self.writer.wait_for_seq(last_seq, LOCAL_APPLY_WAIT).await {
            if let Appended::Replayed { .. } = appended {
                // The answer to a replayed key is read from this node's copy, which does
                // not hold the events yet: the client retries with the same key (503),
                // instead of an error about events missing from the log (500).
                return Err(AppendError::ClusterUnavailable(
                    "this Idempotency-Key's events are in the log, but this node's copy has \
                     not applied them yet; retry with the same key"
                        .into(),
                ));
            }
            // In the stream, so acknowledged; this node's copy is only late.
            tracing::warn!(
                last_seq,
                "answering before this node applied the events (its copy is behind)"
            );
        }
        Ok(appended)
    }
}

fn no_sequencer() -> AppendError {
    AppendError::ClusterUnavailable(
        "the cluster has no sequencer right now (NATS unreachable or a take-over under \
         way); nothing was appended"
            .into(),
    )
}
