//! The sequencer: the one node that seals groups and appends them to the stream.
//!
//! Who *should* write is a lease: the key `sequencer` in a KV bucket whose `max_age` is
//! the lease time, taken with `create` and renewed with `update` by revision. Who *can*
//! write is the stream: every append is fenced with `Nats-Expected-Last-Sequence`, so a
//! node that lost the lease without noticing (paused, partitioned) is refused (10071)
//! and steps down. A retried append carries the same `Nats-Msg-Id` (the hex of its last
//! event's hash) and the same expectation, so the stream's duplicate window absorbs it.
//!
//! Groups are sealed on the head the stream acknowledged last, kept in memory, not on
//! the store's: the sequencer does not wait for its own applier between groups (up to
//! [`MAX_AHEAD`] messages ahead of it). One fenced publish is in flight at a time;
//! requests that arrive meanwhile form the next group, as on a single node.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
/// How many acknowledged messages the sequencer may seal past before its own copy has
/// applied them: bounds the keys it remembers and how far a slow disk lets it run. It is
/// checked before each batch, and one batch may add several messages: the bound is this
/// plus one batch's messages.
const MAX_AHEAD: u64 = 64;
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
    /// Competes for the lease until shutdown; leads while it holds it. A node whose log
    /// stopped ([`Writer::failure`]) stops competing: it could only take the lease, fail
    /// to lead and keep the others waiting.
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let node = bytes::Bytes::from(self.status.node.clone());
        loop {
            if let Some(reason) = self.writer.failure() {
                tracing::warn!(%reason, "this node's log stopped; it no longer competes for the sequencer lease");
                return;
            }
            match self.lease.create(LEASE_KEY, node.clone()).await {
                Ok(revision) => {
                    let lost = CancellationToken::new();
                    let held = Arc::new(AtomicU64::new(revision));
                    let renewing = tokio::spawn(renew(
                        self.lease.clone(),
                        node.clone(),
                        held.clone(),
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
                            self.release(held.load(Ordering::Relaxed)).await;
                            return;
                        }
                        StepDown::LeaseLost => tracing::warn!("lost the sequencer lease"),
                        StepDown::Superseded => {
                            tracing::warn!("another node appended to the stream; stepping down");
                        }
                        StepDown::Failed(reason) => {
                            tracing::warn!(%reason, "stepping down as sequencer");
                            self.release(held.load(Ordering::Relaxed)).await;
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

    /// Gives the lease up at once, if this node still holds it (`revision`): only the
    /// holder's own revision is purged, never a lease another node took since.
    async fn release(&self, revision: u64) {
        if let Err(e) = self
            .lease
            .purge_expect_revision(LEASE_KEY, Some(revision))
            .await
        {
            tracing::debug!(error = %e, "releasing the sequencer lease failed; it expires");
        }
    }

    async fn lead(&self, lost: &CancellationToken, shutdown: &CancellationToken) -> StepDown {
        // Take over: the stream's last message, read from its leader, then our copy of it.
        let last = match self.log.get_info().await {
            Ok(info) => info.state.last_sequence,
            Err(e) => return StepDown::Failed(format!("cannot read the stream's head: {e}")),
        };
        if !self.wait_applied(last, TAKE_OVER_WAIT, lost).await {
            return StepDown::Failed(format!("this node has not applied stream message {last}"));
        }
        let mut ahead = Ahead::at(last, self.store.head());
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
            // Sealing runs ahead of this node's copy: once the copy stopped, so must
            // sealing, or it would go on for up to MAX_AHEAD messages.
            if let Some(reason) = self.writer.failure() {
                self.answer_retry(batch.iter().filter_map(|m| m.reply.clone()).collect())
                    .await;
                return StepDown::Failed(format!("this node's log stopped: {reason}"));
            }
            // Groups are sealed on the head the stream acknowledged, not on this node's
            // store: bounded, so that a slow copy holds the sequencer back.
            let behind_limit = ahead.last.saturating_sub(MAX_AHEAD);
            if !self.wait_applied(behind_limit, TAKE_OVER_WAIT, lost).await {
                self.answer_retry(batch.iter().filter_map(|m| m.reply.clone()).collect())
                    .await;
                return StepDown::Failed(format!(
                    "this node has not applied stream message {behind_limit}"
                ));
            }
            ahead.forget_applied(*self.writer.applied_stream().borrow());
            match self
                .append_batch(batch, &mut ahead, message_limit, lost)
                .await
            {
                Ok(Published::All) => {}
                Ok(Published::Partly) => {
                    // The in-memory head ran past what the stream holds: start again from
                    // this node's copy once it has the stream's last message.
                    if !self.wait_applied(ahead.last, TAKE_OVER_WAIT, lost).await {
                        return StepDown::Failed(format!(
                            "this node has not applied stream message {}",
                            ahead.last
                        ));
                    }
                    ahead = Ahead::at(ahead.last, self.store.head());
                }
                Err(why) => return why,
            }
        }
    }

    /// Seals the batch's requests on `ahead`'s head, appends them as one or more fenced
    /// messages, and answers each request once its message is acknowledged. Once a
    /// message cannot be appended, the requests sealed after it are answered "retry".
    async fn append_batch(
        &self,
        batch: Vec<async_nats::Message>,
        ahead: &mut Ahead,
        message_limit: usize,
        lost: &CancellationToken,
    ) -> Result<Published, StepDown> {
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
        let sealed = writer::seal_group(&mut ahead.head, &self.store, &mut ahead.keys, bodies);
        let mut messages = split_into_messages(replies, sealed, message_limit).into_iter();
        while let Some(message) = messages.next() {
            let published = self
                .publish_parts(message, ahead, message_limit, lost)
                .await;
            match published {
                Ok(true) => {}
                // The rest was sealed after events that were not published: none of it
                // may be. Nothing of it was appended; the forwarders retry it.
                Ok(false) => {
                    self.answer_retry(reply_subjects(messages)).await;
                    return Ok(Published::Partly);
                }
                Err(why) => {
                    self.answer_retry(reply_subjects(messages)).await;
                    return Err(why);
                }
            }
        }
        Ok(Published::All)
    }

    /// Appends one message (if it holds events) and answers its requests. `Ok(false)`:
    /// the message was too large to append (its requests got 413).
    async fn publish_parts(
        &self,
        parts: Parts,
        ahead: &mut Ahead,
        message_limit: usize,
        lost: &CancellationToken,
    ) -> Result<bool, StepDown> {
        let Some(newest) = parts.events.last() else {
            self.answer(parts.answers).await;
            return Ok(true);
        };
        let msg_id = match crate::chain::stated_hash(newest.line.as_bytes()) {
            Ok(h) => hex::encode(h),
            Err(e) => {
                // Nothing of it was published: its requests may go to the next sequencer.
                self.answer_retry(parts.answers.into_iter().map(|(to, _)| to).collect())
                    .await;
                return Err(StepDown::Failed(format!("a sealed event has no hash: {e}")));
            }
        };
        let key_names: Vec<(String, String)> = (parts.keys.iter())
            .map(|(token, key, _)| (token.clone(), key.clone()))
            .collect();
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
            let answers = (parts.answers.into_iter())
                .map(|(r, _)| (r, Err(AppendError::TooLarge(why.clone()))))
                .collect();
            self.answer(answers).await;
            return Ok(false);
        }
        match self
            .publish(payload.into(), &msg_id, ahead.last, lost)
            .await
        {
            Ok(seq) => {
                ahead.last = seq;
                ahead.by_message.push_back((seq, key_names));
                self.answer(parts.answers).await;
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
                for (to, _) in parts.answers {
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

/// One stream message: its events, their idempotency keys, and the answers owed once
/// the stream has it.
#[derive(Default)]
struct Parts {
    events: Vec<crate::event::Event>,
    keys: Vec<writer::SealedKey>,
    answers: Vec<(async_nats::Subject, Result<Appended, AppendError>)>,
}

/// Cuts a sealed batch into messages under `message_limit`: one per run of requests that
/// fits, a request larger than the limit alone. Requests that appended nothing (replays,
/// refusals) are answered with the message they were sealed in.
fn split_into_messages(
    replies: Vec<async_nats::Subject>,
    sealed: writer::Sealed,
    message_limit: usize,
) -> Vec<Parts> {
    let mut messages = Vec::new();
    let mut message = Parts::default();
    let mut events = sealed.events.into_iter();
    let mut keys = sealed.idempotency.into_iter().peekable();
    for (reply, outcome) in replies.into_iter().zip(sealed.outcomes) {
        if let Ok(Appended::New {
            first_seq,
            last_seq,
            ..
        }) = &outcome
        {
            let count = (last_seq - first_seq + 1) as usize;
            let request_events: Vec<_> = events.by_ref().take(count).collect();
            if !message.events.is_empty()
                && plain_bytes(&message.events) + plain_bytes(&request_events) > message_limit
            {
                messages.push(std::mem::take(&mut message));
            }
            message.events.extend(request_events);
            while keys
                .peek()
                .is_some_and(|(_, _, r)| r.first_seq == *first_seq)
            {
                message.keys.extend(keys.next());
            }
        }
        message.answers.push((reply, outcome));
        if plain_bytes(&message.events) >= message_limit {
            messages.push(std::mem::take(&mut message));
        }
    }
    if !message.answers.is_empty() {
        messages.push(message);
    }
    messages
}

fn reply_subjects(messages: impl Iterator<Item = Parts>) -> Vec<async_nats::Subject> {
    messages
        .flat_map(|m| m.answers.into_iter().map(|(to, _)| to))
        .collect()
}

/// How much of a batch reached the stream, when the sequencer goes on leading.
enum Published {
    All,
    /// A message was refused as too large: the messages sealed after it were not sent.
    Partly,
}

/// What the sequencer has sealed beyond this node's store: the stream's head as
/// acknowledged, and the idempotency keys of acknowledged messages not yet applied here
/// (so a key repeated before its first use reaches the store is still recognised).
struct Ahead {
    /// Stream sequence of the last acknowledged message.
    last: u64,
    /// The log's head after it.
    head: crate::store::Head,
    keys: writer::UnstoredKeys,
    /// The keys each acknowledged message carried, oldest first.
    by_message: std::collections::VecDeque<(u64, Vec<(String, String)>)>,
}

impl Ahead {
    fn at(last: u64, head: crate::store::Head) -> Self {
        Ahead {
            last,
            head,
            keys: writer::UnstoredKeys::new(),
            by_message: std::collections::VecDeque::new(),
        }
    }

    /// Drops the keys of messages this node has applied: the store answers for them now.
    fn forget_applied(&mut self, applied: u64) {
        while let Some((_, names)) = self.by_message.pop_front_if(|(seq, _)| *seq <= applied) {
            for name in names {
                self.keys.remove(&name);
            }
        }
    }
}

/// Events' size before compression: LZ4 shrinks event JSON well, so a message closed
/// at this size fits once compressed.
fn plain_bytes(events: &[crate::event::Event]) -> usize {
    events.iter().map(|e| e.line.len() + 64).sum()
}

/// Renews the lease every third of its time, keeping `held` at the revision this node
/// holds; cancels `lost` when it cannot.
async fn renew(
    lease: kv::Store,
    node: bytes::Bytes,
    held: Arc<AtomicU64>,
    lease_time: Duration,
    lost: CancellationToken,
) {
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(lease_time / 3).await;
        let revision = held.load(Ordering::Relaxed);
        match lease.update(LEASE_KEY, node.clone(), revision).await {
            Ok(r) => {
                held.store(r, Ordering::Relaxed);
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
