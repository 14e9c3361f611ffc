//! The sequencer: the one node that seals groups and appends them to the stream.
//!
//! Who *should* write is a lease: the key `sequencer` in a KV bucket whose `max_age` is
//! the lease time, taken with `create` and renewed with `update` by revision. Who *can*
//! write is the stream: every append is fenced with `Nats-Expected-Last-Sequence`, so a
//! node that lost the lease without noticing (paused, partitioned) is refused (10071)
//! and steps down. A retried append carries the same `Nats-Msg-Id` (the hex of its last
//! event's hash) and the same expectation, so the stream's duplicate window absorbs it.
//!
//! A group is sealed only on the store's head when the store has applied the stream's
//! last message: the sequencer waits for its own applier between groups. Requests that
//! arrive meanwhile form the next group, as on a single node.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, kv, stream};
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::forward::{WireReply, WireRequest};
use super::shared::SharedMap;
use super::{ClusterError, GroupMessage, Names, Status};
use crate::store::Store;
use crate::store::bincode_config;
use crate::writer::{self, AppendError, Appended, Writer};

pub(super) const LEASE_KEY: &str = "sequencer";
/// Most forwarded requests sealed into one group.
const MAX_GROUP_REQUESTS: usize = 1024;
/// Room for headers and the message's framing under the servers' `max_payload`.
const MESSAGE_OVERHEAD: usize = 4096;
/// How long a new sequencer waits for its copy to reach the stream's head.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(10);

/// The lease bucket: one key, expiring `lease` after its holder's last renewal.
pub(super) async fn lease_bucket(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
    lease: Duration,
) -> Result<SharedMap, ClusterError> {
    super::shared::open(js, &names.lease_bucket, replicas, lease).await
}

pub(super) struct Sequencer {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub log: stream::Stream,
    pub lease: kv::Store,
    pub lease_time: Duration,
    pub names: Names,
    pub store: Arc<Store>,
    pub writer: Writer,
    pub status: Arc<Status>,
}

/// Why a leading sequencer stopped.
enum StepDown {
    Shutdown,
    LeaseLost,
    /// Another node appended: this node's head is stale.
    Superseded,
    Failed(String),
}

impl Sequencer {
    /// Competes for the lease until shutdown; leads while it holds it.
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let node = bytes::Bytes::from(self.status.node.clone());
        loop {
            match self.lease.create(LEASE_KEY, node.clone()).await {
                Ok(revision) => {
                    let lost = CancellationToken::new();
                    let renewing = tokio::spawn(renew(
                        self.lease.clone(),
                        node.clone(),
                        revision,
                        self.lease_time,
                        lost.clone(),
                    ));
                    self.status.sequencer.store(true, Ordering::Relaxed);
                    tracing::info!(node = %self.status.node, "took the sequencer lease");
                    let why = self.lead(&lost, &shutdown).await;
                    self.status.sequencer.store(false, Ordering::Relaxed);
                    renewing.abort();
                    match why {
                        StepDown::Shutdown => {
                            // Let another node take over at once, not after the lease time.
                            let _ = self.lease.purge(LEASE_KEY).await;
                            return;
                        }
                        StepDown::LeaseLost => tracing::warn!("lost the sequencer lease"),
                        StepDown::Superseded => {
                            tracing::warn!("another node appended to the stream; stepping down");
                        }
                        StepDown::Failed(reason) => {
                            tracing::warn!(%reason, "stepping down as sequencer");
                        }
                    }
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => tracing::debug!(error = %e, "cannot reach the lease bucket"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.lease_time / 3) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn lead(&self, lost: &CancellationToken, shutdown: &CancellationToken) -> StepDown {
        // Take over: the stream's last message, read from its leader, then our copy of it.
        let mut last = match self.log.get_info().await {
            Ok(info) => info.state.last_sequence,
            Err(e) => return StepDown::Failed(format!("cannot read the stream's head: {e}")),
        };
        if !self.wait_applied(last, TAKE_OVER_WAIT, lost).await {
            return StepDown::Failed(format!("this node has not applied stream message {last}"));
        }
        let mut requests = match self
            .client
            .queue_subscribe(self.names.ingest_for(&self.status.node), "sequencer".into())
            .await
        {
            Ok(s) => s,
            Err(e) => return StepDown::Failed(format!("cannot subscribe to ingest: {e}")),
        };
        let message_limit = (self.client.server_info().max_payload)
            .saturating_sub(MESSAGE_OVERHEAD)
            .max(64 * 1024);
        loop {
            let first = tokio::select! {
                m = requests.next() => match m {
                    Some(m) => m,
                    None => return StepDown::Failed("the ingest subscription ended".into()),
                },
                () = lost.cancelled() => return StepDown::LeaseLost,
                () = shutdown.cancelled() => return StepDown::Shutdown,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_GROUP_REQUESTS {
                match requests.next().now_or_never() {
                    Some(Some(m)) => batch.push(m),
                    _ => break,
                }
            }
            // Seal only on a head the store has applied: the stream's last message.
            if !self.wait_applied(last, TAKE_OVER_WAIT, lost).await {
                self.answer_retry(batch.iter().filter_map(|m| m.reply.clone()).collect())
                    .await;
                return StepDown::Failed(format!(
                    "this node has not applied stream message {last}"
                ));
            }
            match self
                .append_batch(batch, &mut last, message_limit, lost)
                .await
            {
                Ok(()) => {}
                Err(why) => return why,
            }
        }
    }

    /// Seals the batch's requests, appends them as one or more fenced messages, and
    /// answers each request once its message is acknowledged.
    async fn append_batch(
        &self,
        batch: Vec<async_nats::Message>,
        last: &mut u64,
        message_limit: usize,
        lost: &CancellationToken,
    ) -> Result<(), StepDown> {
        let mut replies = Vec::new();
        let mut bodies = Vec::new();
        for message in batch {
            let Some(reply) = message.reply.clone() else {
                continue;
            };
            match bincode::serde::decode_from_slice::<WireRequest, _>(
                &message.payload,
                bincode_config(),
            ) {
                Ok((request, _)) => {
                    replies.push(reply);
                    bodies.push((request.events, request.idempotency));
                }
                Err(e) => {
                    let answer = WireReply::Unavailable(format!("a malformed forward: {e}"));
                    let _ = self.client.publish(reply, answer.encode()).await;
                }
            }
        }
        let mut head = self.store.head();
        let sealed = writer::seal_group(&mut head, &self.store, bodies);
        let mut events = sealed.events.into_iter();
        let mut keys = sealed.idempotency.into_iter().peekable();
        // One message per run of requests that fits under the payload limit; a request
        // larger than the limit goes alone.
        let mut pending: Vec<(async_nats::Subject, Result<Appended, AppendError>)> = Vec::new();
        let mut message = Parts::default();
        let mut outcomes = replies.into_iter().zip(sealed.outcomes).peekable();
        while let Some((reply, outcome)) = outcomes.next() {
            if let Ok(Appended::New {
                first_seq,
                last_seq,
                ..
            }) = &outcome
            {
                let count = (last_seq - first_seq + 1) as usize;
                let request_events: Vec<_> = events.by_ref().take(count).collect();
                let request_bytes = plain_bytes(&request_events);
                if !message.events.is_empty()
                    && plain_bytes(&message.events) + request_bytes > message_limit
                {
                    let parts = std::mem::take(&mut message);
                    let answers = std::mem::take(&mut pending);
                    if let Err(why) = self
                        .publish_parts(parts, answers, last, message_limit, lost)
                        .await
                    {
                        self.answer_retry(
                            std::iter::once(reply)
                                .chain(outcomes.map(|(to, _)| to))
                                .collect(),
                        )
                        .await;
                        return Err(why);
                    }
                }
                message.events.extend(request_events);
                while keys
                    .peek()
                    .is_some_and(|(_, _, r)| r.first_seq == *first_seq)
                {
                    message.keys.extend(keys.next());
                }
            }
            pending.push((reply, outcome));
            if plain_bytes(&message.events) >= message_limit || outcomes.peek().is_none() {
                let parts = std::mem::take(&mut message);
                let answers = std::mem::take(&mut pending);
                match self
                    .publish_parts(parts, answers, last, message_limit, lost)
                    .await
                {
                    Ok(true) => {}
                    // The rest was sealed after events that were not published: none of
                    // it may be. Nothing of it was appended; the forwarders retry it.
                    Ok(false) => {
                        self.answer_retry(outcomes.map(|(to, _)| to).collect())
                            .await;
                        return Ok(());
                    }
                    Err(why) => {
                        self.answer_retry(outcomes.map(|(to, _)| to).collect())
                            .await;
                        return Err(why);
                    }
                }
            }
        }
        Ok(())
    }

    /// Appends one message (if it holds events) and answers its requests. `Ok(false)`:
    /// the message was too large to append (its requests got 413).
    async fn publish_parts(
        &self,
        parts: Parts,
        answers: Vec<(async_nats::Subject, Result<Appended, AppendError>)>,
        last: &mut u64,
        message_limit: usize,
        lost: &CancellationToken,
    ) -> Result<bool, StepDown> {
        let Some(newest) = parts.events.last() else {
            self.answer(answers).await;
            return Ok(true);
        };
        let msg_id = match crate::chain::stated_hash(newest.line.as_bytes()) {
            Ok(h) => hex::encode(h),
            Err(e) => return Err(StepDown::Failed(format!("a sealed event has no hash: {e}"))),
        };
        let payload = GroupMessage {
            events: crate::store::encode_chunk(&parts.events),
            idempotency: parts.keys,
        }
        .encode();
        if payload.len() > message_limit {
            // Sealed on the head but never published: nothing to undo in the stream.
            let why = format!(
                "the request's events take {} bytes in one stream message; the NATS servers \
                 take {message_limit}",
                payload.len()
            );
            let answers = answers
                .into_iter()
                .map(|(r, _)| (r, Err(AppendError::TooLarge(why.clone()))))
                .collect();
            self.answer(answers).await;
            return Ok(false);
        }
        match self.publish(payload.into(), &msg_id, *last, lost).await {
            Ok(seq) => {
                *last = seq;
                self.answer(answers).await;
                Ok(true)
            }
            Err(why) => {
                let reply = match &why {
                    StepDown::Superseded => WireReply::Retry,
                    _ => WireReply::Unavailable(
                        "the log of record could not be reached; the events may or may not \
                         have been appended (retry with the same Idempotency-Key to find out)"
                            .into(),
                    ),
                };
                for (to, _) in answers {
                    let _ = self.client.publish(to, reply.encode()).await;
                }
                Err(why)
            }
        }
    }

    async fn answer(&self, answers: Vec<(async_nats::Subject, Result<Appended, AppendError>)>) {
        for (to, outcome) in answers {
            let reply = WireReply::from_outcome(outcome);
            if let Err(e) = self.client.publish(to, reply.encode()).await {
                tracing::debug!(error = %e, "a forwarded request's reply was not sent");
            }
        }
    }

    /// Publishes one group fenced on `expected`; retries the same message until it is
    /// acknowledged, refused, or the lease is gone. Returns its stream sequence.
    async fn publish(
        &self,
        payload: bytes::Bytes,
        msg_id: &str,
        expected: u64,
        lost: &CancellationToken,
    ) -> Result<u64, StepDown> {
        loop {
            let sent = self
                .js
                .send_publish(
                    self.names.log.clone(),
                    jetstream::message::PublishMessage::build()
                        .payload(payload.clone())
                        .message_id(msg_id)
                        .expected_last_sequence(expected),
                )
                .await;
            let acked = match sent {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(ack) => return Ok(ack.sequence),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    // Another message took `expected + 1`: ours can never land after it.
                    return match self.stored_at(expected + 1, msg_id).await {
                        Some(true) => Ok(expected + 1),
                        Some(false) => Err(StepDown::Superseded),
                        None => Err(StepDown::Failed(
                            "cannot tell whether a refused append landed".into(),
                        )),
                    };
                }
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    return Err(StepDown::Failed(format!(
                        "a group message is too large: {e}"
                    )));
                }
                Err(e) => {
                    // No stream leader (during an election), a timeout, a broken
                    // connection: the same message again is the only safe retry.
                    tracing::debug!(error = %e, "appending to the stream: retrying");
                    if lost.is_cancelled() {
                        return match self.stored_at(expected + 1, msg_id).await {
                            Some(true) => Ok(expected + 1),
                            Some(false) => Err(StepDown::Superseded),
                            None => Err(StepDown::LeaseLost),
                        };
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Whether the stream holds the message `msg_id` at `seq` (None: cannot tell).
    async fn stored_at(&self, seq: u64, msg_id: &str) -> Option<bool> {
        use async_nats::jetstream::stream::RawMessageErrorKind;
        match self.log.get_raw_message(seq).await {
            Ok(m) => Some(
                m.headers
                    .get("Nats-Msg-Id")
                    .is_some_and(|v| v.as_str() == msg_id),
            ),
            // Nothing there yet: nobody else appended, so ours did not land either
            // (and, fenced on `seq - 1`, it still could: the caller treats this as unknown).
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => None,
            Err(_) => None,
        }
    }

    async fn wait_applied(
        &self,
        stream_seq: u64,
        limit: Duration,
        lost: &CancellationToken,
    ) -> bool {
        let mut applied = self.writer.applied_stream();
        tokio::select! {
            reached = tokio::time::timeout(limit, applied.wait_for(|&p| p >= stream_seq)) => {
                matches!(reached, Ok(Ok(_)))
            }
            () = lost.cancelled() => false,
        }
    }

    /// Answers "nothing appended, retry" to each of `requests`: the forwarders send
    /// them again, to whichever node then holds the lease.
    async fn answer_retry(&self, requests: Vec<async_nats::Subject>) {
        for to in requests {
            let _ = self.client.publish(to, WireReply::Retry.encode()).await;
        }
    }
}

/// One stream message being assembled.
#[derive(Default)]
struct Parts {
    events: Vec<crate::event::Event>,
    keys: Vec<writer::SealedKey>,
}

/// Events' size before compression: LZ4 shrinks event JSON well, so a message closed
/// at this size fits once compressed.
fn plain_bytes(events: &[crate::event::Event]) -> usize {
    events.iter().map(|e| e.line.len() + 64).sum()
}

/// Renews the lease every third of its time; cancels `lost` when it cannot.
async fn renew(
    lease: kv::Store,
    node: bytes::Bytes,
    mut revision: u64,
    lease_time: Duration,
    lost: CancellationToken,
) {
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(lease_time / 3).await;
        match lease.update(LEASE_KEY, node.clone(), revision).await {
            Ok(r) => {
                revision = r;
                renewed = Instant::now();
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                lost.cancel();
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "renewing the sequencer lease failed");
                // Stop before the lease can have expired for the others.
                if renewed.elapsed() + lease_time / 3 >= lease_time {
                    lost.cancel();
                    return;
                }
            }
        }
    }
}
