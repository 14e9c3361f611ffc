//! Webhooks in cluster mode (SPEC §6/§7): every node knows every webhook, one node at a
//! time delivers each, and another takes over from the durable cursor when it is lost.
//!
//! - Records (definition, secret, cursor) live in the shared map `webhooks`. Every node
//!   follows it; `POST`/`PATCH`/`DELETE` on any node write it (create if absent,
//!   compare-and-set, delete). A cluster node keeps no webhook in its own store.
//! - A webhook is delivered by the holder of its key in `webhook-leases`, a map whose
//!   entries expire the lease time after their last write (the bucket's max age:
//!   nats-server 2.9 has no per-key TTL). Only a ready node (it has applied the log as
//!   it was at start) asks for a lease, after a random delay, so webhooks spread over
//!   the nodes. The holder renews every third of the lease time and stops delivering
//!   when a renewal fails or is not made within half of it, before the key can expire
//!   and another node take it: two nodes never deliver a webhook together for longer
//!   than one request in flight.
//! - The holder's task stores its record after each 2xx at the revision it last wrote
//!   ([`Held`]). A change by anyone else (a `PATCH`, a node that took the lease over)
//!   makes that write fail: the task stops and its lease task reloads the record.
//!   A `PATCH` or `DELETE` also reaches the holder through the map at once, and its lease
//!   task stops (and restarts, unless paused) the delivery.
//! - On shutdown a holder releases its leases once its tasks stopped, so another node
//!   takes over at once instead of after the lease time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    Keeper, Patch, STOP_GRACE, View, WebhookError, WebhookRecord, Webhooks, apply_patch, decode,
    encode, load_all,
};
use crate::cluster::{Readiness, SharedMap, Status, Written};
use crate::store::Store;

/// How often a `PATCH` re-reads and retries when the holder stored a cursor meanwhile.
const PATCH_ATTEMPTS: usize = 20;
/// How long releasing a lease may take at shutdown (it expires by itself otherwise).
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// What a node needs to take part.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// This node's name (the value of the leases it holds).
    pub node: String,
    /// How long a lease lasts without renewal (the lease bucket's max age).
    pub lease: Duration,
}

/// A lease's value: who holds it, and its delivery state as of the last renewal (shown
/// by `GET` on the other nodes, which do not have it in memory).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct LeaseValue {
    node: String,
    failures: u32,
    last_error: Option<String>,
    next_attempt_at: Option<String>,
}

impl LeaseValue {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A record as the shared map holds it.
#[derive(Clone)]
struct Versioned {
    record: WebhookRecord,
    revision: u64,
}

/// A delivery task's hold on its record: the revision this node last wrote.
pub(super) struct Held {
    map: SharedMap,
    id: String,
    /// Locked for the whole of a write, so that whoever compares a change's revision
    /// with it sees the write either done or not begun.
    revision: tokio::sync::Mutex<u64>,
}

impl Held {
    /// Stores the record if nobody else wrote it since; false if someone did (the task
    /// stops). A write that fails otherwise (NATS unreachable) is logged and delivery
    /// goes on: the events may be sent again by the next holder (at least once).
    pub(super) async fn write(&self, record: &WebhookRecord) -> bool {
        let mut revision = self.revision.lock().await;
        match self.map.update(&self.id, encode(record), *revision).await {
            Ok(Written::Done(next)) => {
                *revision = next;
                true
            }
            Ok(Written::Conflict) => {
                tracing::info!(webhook = %self.id, "the webhook changed elsewhere; its delivery here stops and reloads");
                false
            }
            Err(e) => {
                tracing::error!(webhook = %self.id, error = %e, "storing a webhook cursor failed");
                true
            }
        }
    }

    async fn revision(&self) -> u64 {
        *self.revision.lock().await
    }
}

/// A cluster node's webhooks: the shared records, the leases, one lease task per webhook.
pub(super) struct ClusterHooks {
    defs: SharedMap,
    leases: SharedMap,
    settings: ClusterSettings,
    status: Arc<Status>,
    hooks: Weak<Webhooks>,
    /// The latest record of each webhook, watched by its lease task.
    watchers: Mutex<HashMap<String, watch::Sender<Option<Versioned>>>>,
    /// Deleted ids (never reused): a late copy of an older write must not revive one.
    gone: Mutex<HashSet<String>>,
    stop: CancellationToken,
    lease_tasks: TaskTracker,
}

/// Why a wait ended.
enum Woken {
    Stop,
    Changed,
    Elapsed,
}

/// How holding a lease ended.
enum Ended {
    /// Shutdown.
    Stop,
    /// The webhook was deleted.
    Gone,
    /// Not delivering here any more (lost, released, paused): back to waiting.
    Again,
}

/// Cluster mode: this node's webhooks become the cluster's. A node that was a single
/// node brings its stored webhooks (moved into the map, unless already there); then it
/// follows the map (without waiting: webhooks appear here as they are read, within
/// moments normally). Call again on a 10008 ("temporarily unavailable") error: every
/// step before the follow can be repeated.
pub async fn join_cluster(
    hooks: &Arc<Webhooks>,
    defs: SharedMap,
    leases: SharedMap,
    status: Arc<Status>,
    settings: ClusterSettings,
    store: &Store,
) -> Result<(), WebhookError> {
    for record in load_all(store)? {
        if let Written::Done(_) = defs.create(&record.id, encode(&record)).await? {
            tracing::info!(webhook = %record.id, "moved a stored webhook into the cluster");
        }
        store.remove_webhook_record(&record.id)?;
    }
    let cluster = Arc::new(ClusterHooks {
        defs: defs.clone(),
        leases,
        settings,
        status,
        hooks: Arc::downgrade(hooks),
        watchers: Mutex::new(HashMap::new()),
        gone: Mutex::new(HashSet::new()),
        stop: hooks.shutdown.clone(),
        lease_tasks: TaskTracker::new(),
    });
    if hooks.cluster.set(cluster.clone()).is_err() {
        return Ok(());
    }
    let (mut changes, mut synced) = defs.follow(hooks.shutdown.clone());
    let follower = cluster.clone();
    tokio::spawn(async move {
        while let Some(change) = changes.recv().await {
            match change.value {
                Some(value) => match decode(&value) {
                    Ok(record) => follower.apply(
                        &change.key,
                        Some(Versioned {
                            record,
                            revision: change.revision,
                        }),
                    ),
                    Err(e) => {
                        tracing::error!(webhook = %change.key, error = %e, "a shared webhook record does not decode");
                        None
                    }
                },
                None => follower.apply(&change.key, None),
            };
        }
    });
    // Not awaited: right after a NATS outage the bucket may take seconds to answer, and a
    // start must not wait for it (the webhooks appear as they are read).
    tokio::spawn(async move {
        if synced.wait_for(|s| *s).await.is_ok() {
            tracing::info!("read every webhook of the cluster");
        }
    });
    Ok(())
}

impl ClusterHooks {
    fn watchers(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<Option<Versioned>>>> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gone(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.gone.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a change (from the map, or written here): newer records reach the
    /// webhook's lease task (started for a new webhook); a deletion ends it. Returns the
    /// deleted webhook's channel, closed once its lease task has stopped.
    fn apply(
        self: &Arc<Self>,
        id: &str,
        change: Option<Versioned>,
    ) -> Option<watch::Sender<Option<Versioned>>> {
        let hooks = self.hooks.upgrade()?;
        let Some(change) = change else {
            self.gone().insert(id.to_string());
            let sender = self.watchers().remove(id)?;
            sender.send_replace(None);
            return Some(sender);
        };
        if self.gone().contains(id) {
            return None;
        }
        let mut watchers = self.watchers();
        match watchers.get(id) {
            Some(sender) => {
                let newer = sender.send_if_modified(|current| match current {
                    Some(c) if c.revision >= change.revision => false,
                    _ => {
                        *current = Some(change.clone());
                        true
                    }
                });
                if newer {
                    hooks.show(change.record);
                }
            }
            None => {
                hooks.show(change.record.clone());
                let (sender, latest) = watch::channel(Some(change));
                watchers.insert(id.to_string(), sender);
                self.lease_tasks
                    .spawn(self.clone().lease(hooks, id.to_string(), latest));
            }
        }
        None
    }

    fn ready(&self) -> bool {
        self.status.readiness() == Readiness::Ready
    }

    async fn wait(&self, latest: &mut watch::Receiver<Option<Versioned>>, d: Duration) -> Woken {
        tokio::select! {
            () = self.stop.cancelled() => Woken::Stop,
            _ = latest.changed() => Woken::Changed,
            () = tokio::time::sleep(d) => Woken::Elapsed,
        }
    }

    /// One webhook on this node, from its creation (or this node's start) to its
    /// deletion: asks for the lease while the webhook is not paused and this node is
    /// ready, and delivers while it holds it.
    async fn lease(
        self: Arc<Self>,
        hooks: Arc<Webhooks>,
        id: String,
        mut latest: watch::Receiver<Option<Versioned>>,
    ) {
        let third = self.settings.lease / 3;
        loop {
            let Some(current) = latest.borrow_and_update().clone() else {
                break;
            };
            hooks.show(current.record.clone());
            if !current.record.paused && self.ready() {
                // Spread: a random share of the period, so that the first node to ask
                // is a different one for each webhook.
                match self
                    .wait(&mut latest, third.mul_f64(rand::random::<f64>()))
                    .await
                {
                    Woken::Stop => return,
                    Woken::Changed => continue,
                    Woken::Elapsed => {}
                }
                let asked = Instant::now();
                let value = LeaseValue {
                    node: self.settings.node.clone(),
                    ..LeaseValue::default()
                };
                match self.leases.create(&id, value.encode()).await {
                    Ok(Written::Done(revision)) => {
                        match self.hold(&hooks, &id, &mut latest, revision, asked).await {
                            Ended::Stop => return,
                            Ended::Gone => break,
                            Ended::Again => continue,
                        }
                    }
                    // Another node delivers it.
                    Ok(Written::Conflict) => {}
                    Err(e) => {
                        tracing::debug!(webhook = %id, error = %e, "cannot ask for a webhook lease");
                    }
                }
            }
            if let Woken::Stop = self.wait(&mut latest, third).await {
                return;
            }
        }
        // Deleted.
        hooks.halt(&id).await;
        crate::telemetry::set_webhook_lag(&id, 0);
    }

    /// Delivers `id` while this node holds its lease (taken at `revision`, asked for at
    /// `renewed`); releases it at the end unless it was lost.
    async fn hold(
        &self,
        hooks: &Arc<Webhooks>,
        id: &str,
        latest: &mut watch::Receiver<Option<Versioned>>,
        mut lease: u64,
        mut renewed: Instant,
    ) -> Ended {
        let third = self.settings.lease / 3;
        // Continue from the durable cursor, read fresh from the map's leader.
        let mut held = match self.load(id).await {
            Ok(Some(current)) if !current.record.paused => {
                tracing::info!(webhook = %id, node = %self.settings.node, cursor = %current.record.cursor(), "delivering this webhook (lease taken)");
                self.start(hooks, current).await
            }
            Ok(Some(_)) => return self.release(hooks, id, lease, Ended::Again).await,
            Ok(None) => return self.release(hooks, id, lease, Ended::Gone).await,
            Err(e) => {
                tracing::warn!(webhook = %id, error = %e, "cannot read a webhook's record");
                return self.release(hooks, id, lease, Ended::Again).await;
            }
        };
        let ended = loop {
            tokio::select! {
                () = self.stop.cancelled() => break Ended::Stop,
                _ = latest.changed() => {
                    let Some(change) = latest.borrow_and_update().clone() else {
                        break Ended::Gone;
                    };
                    // A write not this node's (a PATCH): deliver from it, unless paused.
                    if change.revision > held.revision().await {
                        if change.record.paused {
                            break Ended::Again;
                        }
                        held = self.start(hooks, change).await;
                    }
                }
                () = tokio::time::sleep_until(renewed + third) => {
                    let asked = Instant::now();
                    let value = hooks.lease_value(id, &self.settings.node).encode();
                    let renewal = self.leases.update(id, value, lease);
                    match tokio::time::timeout_at(renewed + self.settings.lease / 2, renewal).await {
                        Ok(Ok(Written::Done(next))) => {
                            lease = next;
                            renewed = asked;
                        }
                        failed => {
                            let why = match failed {
                                Ok(Ok(_)) => "another node holds it".to_string(),
                                Ok(Err(e)) => e.to_string(),
                                Err(_) => "no answer within half the lease time".to_string(),
                            };
                            tracing::warn!(webhook = %id, reason = %why, "stopped delivering this webhook (lease lost)");
                            hooks.stop_task(id).await;
                            return Ended::Again;
                        }
                    }
                    // A task that ended by itself was fenced (someone else wrote the
                    // record) or paused by a 410: continue from the stored record.
                    if hooks.task_finished(id) {
                        match self.load(id).await {
                            Ok(Some(current)) if !current.record.paused => {
                                held = self.start(hooks, current).await;
                            }
                            Ok(Some(_)) => break Ended::Again,
                            Ok(None) => break Ended::Gone,
                            Err(e) => {
                                tracing::warn!(webhook = %id, error = %e, "cannot read a webhook's record");
                                break Ended::Again;
                            }
                        }
                    }
                }
            }
        };
        self.release(hooks, id, lease, ended).await
    }

    /// Stops this node's delivery of `id` and frees the lease (at the revision this node
    /// wrote: if another node holds it meanwhile, it stays).
    async fn release(&self, hooks: &Webhooks, id: &str, lease: u64, ended: Ended) -> Ended {
        hooks.stop_task(id).await;
        match tokio::time::timeout(RELEASE_WAIT, self.leases.delete_at(id, lease)).await {
            Ok(Ok(())) => {
                tracing::info!(webhook = %id, "stopped delivering this webhook (lease released)");
            }
            Ok(Err(e)) => {
                tracing::info!(webhook = %id, error = %e, "stopped delivering this webhook (lease left to expire)");
            }
            Err(_) => {
                tracing::info!(webhook = %id, "stopped delivering this webhook (lease left to expire: no answer)");
            }
        }
        ended
    }

    /// (Re)starts the delivery task from `current`.
    async fn start(&self, hooks: &Webhooks, current: Versioned) -> Arc<Held> {
        let id = current.record.id.clone();
        hooks.halt(&id).await;
        let held = Arc::new(Held {
            map: self.defs.clone(),
            id,
            revision: tokio::sync::Mutex::new(current.revision),
        });
        hooks.install(current.record, Some(Keeper::Shared(held.clone())));
        held
    }

    async fn load(&self, id: &str) -> Result<Option<Versioned>, WebhookError> {
        let Some(entry) = self.defs.get(id).await? else {
            return Ok(None);
        };
        let Some(value) = entry.value else {
            return Ok(None);
        };
        Ok(Some(Versioned {
            record: decode(&value)?,
            revision: entry.revision,
        }))
    }

    pub(super) async fn create(
        self: &Arc<Self>,
        record: WebhookRecord,
    ) -> Result<WebhookRecord, WebhookError> {
        match self.defs.create(&record.id, encode(&record)).await? {
            Written::Done(revision) => {
                tracing::info!(id = %record.id, cursor = %record.cursor(), "webhook created");
                self.apply(
                    &record.id,
                    Some(Versioned {
                        record: record.clone(),
                        revision,
                    }),
                );
                Ok(record)
            }
            Written::Conflict => Err(WebhookError::Task(
                "a webhook with this id exists; retry".into(),
            )),
        }
    }

    /// A compare-and-set on the shared record, retried on the holder's cursor writes
    /// (whose next write then fails: it reloads the patched record).
    pub(super) async fn patch(
        self: &Arc<Self>,
        id: &str,
        patch: &Patch,
    ) -> Result<Option<View>, WebhookError> {
        for _ in 0..PATCH_ATTEMPTS {
            let Some(current) = self.load(id).await? else {
                return Ok(None);
            };
            let mut record = current.record;
            apply_patch(&mut record, patch);
            if let Written::Done(revision) = self
                .defs
                .update(id, encode(&record), current.revision)
                .await?
            {
                tracing::info!(%id, paused = ?patch.paused, cursor = ?patch.cursor.map(|c| c.to_string()), "webhook changed");
                self.apply(
                    id,
                    Some(Versioned {
                        record: record.clone(),
                        revision,
                    }),
                );
                return Ok(Some(View::of_record(record)));
            }
        }
        Err(WebhookError::Task(
            "the webhook kept changing while being patched; retry".into(),
        ))
    }

    /// Deletes the shared record; every node's lease task stops its delivery. Waits
    /// (briefly) for this node's.
    pub(super) async fn delete(self: &Arc<Self>, id: &str) -> Result<bool, WebhookError> {
        if self.load(id).await?.is_none() {
            return Ok(false);
        }
        self.defs.delete(id).await?;
        tracing::info!(%id, "webhook deleted");
        if let Some(sender) = self.apply(id, None) {
            let _ = tokio::time::timeout(STOP_GRACE, sender.closed()).await;
        }
        Ok(true)
    }

    /// `GET` of a webhook another node delivers: the shared record, with the holder's
    /// failures, last error and next attempt from its lease (as of its last renewal).
    pub(super) async fn show_remote(&self, mut view: View) -> View {
        let read = tokio::time::timeout(Duration::from_secs(1), self.leases.get(&view.record.id));
        let Ok(Ok(Some(entry))) = read.await else {
            return view;
        };
        let Some(lease) = entry
            .value
            .and_then(|v| serde_json::from_slice::<LeaseValue>(&v).ok())
        else {
            return view;
        };
        if !view.record.paused && lease.failures > 0 {
            view.state = super::DeliveryState::Retrying;
            view.failures = lease.failures;
            view.last_error = lease.last_error.or(view.last_error);
            view.next_attempt_at = lease.next_attempt_at;
        }
        view
    }

    /// At shutdown (the token cancelled): waits for the lease tasks, which stop their
    /// deliveries and release their leases.
    pub(super) async fn stopped(&self) {
        self.lease_tasks.close();
        if tokio::time::timeout(STOP_GRACE + RELEASE_WAIT, self.lease_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("webhook leases still held after shutdown began; they expire");
        }
    }
}

impl Webhooks {
    /// Shows `record` (a webhook this node does not deliver) unless a task runs for it.
    fn show(&self, record: WebhookRecord) {
        let running = self
            .hooks()
            .get(&record.id)
            .is_some_and(|r| r.task.is_some());
        if !running {
            self.install(record, None);
        }
    }

    /// Stops the delivery task of `id`, if any, and keeps showing its record.
    async fn stop_task(&self, id: &str) {
        if let Some(record) = self.halt(id).await {
            self.show(record);
        }
    }

    /// The lease value the holder of `id` renews with: its delivery state now.
    fn lease_value(&self, id: &str, node: &str) -> LeaseValue {
        let view = self.get(id);
        LeaseValue {
            node: node.to_string(),
            failures: view.as_ref().map_or(0, |v| v.failures),
            // The record's own notes (pause reason, skip) are in the record already.
            last_error: view
                .as_ref()
                .filter(|v| v.failures > 0)
                .and_then(|v| v.last_error.clone()),
            next_attempt_at: view.and_then(|v| v.next_attempt_at),
        }
    }

    fn task_finished(&self, id: &str) -> bool {
        self.hooks()
            .get(id)
            .and_then(|r| r.task.as_ref())
            .is_some_and(|t| t.is_finished())
    }
}
