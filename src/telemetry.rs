//! Prometheus metrics (`GET /metrics`, SPEC §2 "Operations"), through the `metrics`
//! facade and `metrics-exporter-prometheus`.
//!
//! Counters and histograms are recorded where things happen (the writer counts ingested
//! events and times its fsyncs, the ingest route times requests, every error response
//! counts itself by code). Values that already live elsewhere (open streams, deliveries,
//! catch-ups, the log's size) are read at scrape time rather than mirrored.

use std::sync::atomic::Ordering;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::Store;
use crate::subscription::StreamStats;

pub const EVENTS_INGESTED: &str = "cairn_events_ingested_total";
pub const INGEST_DURATION: &str = "cairn_ingest_duration_seconds";
pub const FSYNC_DURATION: &str = "cairn_fsync_duration_seconds";
pub const REQUESTS_REJECTED: &str = "cairn_requests_rejected_total";
const STREAMS_OPEN: &str = "cairn_streams_open";
const EVENTS_DELIVERED: &str = "cairn_events_delivered_total";
const STREAM_CATCHUP: &str = "cairn_stream_catchup_total";
const LOG_EVENTS: &str = "cairn_log_events";
const LOG_BYTES: &str = "cairn_log_bytes";
pub const WEBHOOK_DELIVERIES: &str = "cairn_webhook_deliveries_total";
const WEBHOOK_LAG: &str = "cairn_webhook_lag_events";
/// sled's file size: what the disk holds (it does not shrink when chunks are pruned;
/// freed space is reused). `cairn_log_bytes` is the stored log itself (SPEC §8).
const DISK_BYTES: &str = "cairn_disk_bytes";
const LOG_FIRST_SEQ: &str = "cairn_log_first_seq";

/// Seconds: 50 µs to 5 s, about three buckets per decade.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// Installs the process-wide recorder; returns the handle that renders it.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(INGEST_DURATION.into()), LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(FSYNC_DURATION.into()), LATENCY_BUCKETS)
        })
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        EVENTS_INGESTED,
        "Events appended to the log (acknowledged)."
    );
    describe_histogram!(
        INGEST_DURATION,
        Unit::Seconds,
        "Ingest requests, from handler start to response."
    );
    describe_histogram!(
        FSYNC_DURATION,
        Unit::Seconds,
        "Flushes of a group commit to disk."
    );
    describe_counter!(REQUESTS_REJECTED, "Error responses, by error code.");
    describe_gauge!(STREAMS_OPEN, "Open event streams.");
    describe_counter!(EVENTS_DELIVERED, "Events sent on streams.");
    describe_counter!(
        STREAM_CATCHUP,
        "Times a slow stream fell behind the live buffer and read the log instead."
    );
    describe_counter!(
        WEBHOOK_DELIVERIES,
        "Webhook requests, by result: ok (2xx), error (other status, refused connection, redirect, 410), timeout."
    );
    describe_gauge!(
        WEBHOOK_LAG,
        "Committed events after a webhook's cursor (not yet delivered or passed over)."
    );
    describe_gauge!(LOG_EVENTS, "Events in the log (the committed head's seq).");
    describe_gauge!(
        LOG_BYTES,
        Unit::Bytes,
        "The stored log's size: compressed bytes of the retained events (what --retain-bytes bounds)."
    );
    describe_gauge!(
        DISK_BYTES,
        Unit::Bytes,
        "Bytes the log's database takes on disk (it does not shrink; pruned space is reused)."
    );
    describe_gauge!(
        LOG_FIRST_SEQ,
        "The first retained seq (retention's horizon)."
    );
}

/// Sets a webhook's lag gauge (at scrape time, and to 0 when it is deleted).
pub fn set_webhook_lag(webhook: &str, lag: u64) {
    metrics::gauge!(WEBHOOK_LAG, "webhook" => webhook.to_string()).set(lag as f64);
}

/// The scrape: values kept elsewhere are read now, then everything is rendered.
pub fn render(
    handle: &PrometheusHandle,
    store: &Store,
    streams_open: usize,
    stream_stats: &StreamStats,
    webhook_lags: Vec<(String, u64)>,
) -> String {
    // A deleted webhook's series stays at its last value until the process restarts
    // (the exporter has no removal); `Webhooks::delete` sets it to 0.
    for (webhook, lag) in webhook_lags {
        set_webhook_lag(&webhook, lag);
    }
    metrics::gauge!(STREAMS_OPEN).set(streams_open as f64);
    metrics::counter!(EVENTS_DELIVERED).absolute(stream_stats.delivered.load(Ordering::Relaxed));
    metrics::counter!(STREAM_CATCHUP).absolute(stream_stats.catchups.load(Ordering::Relaxed));
    metrics::gauge!(LOG_EVENTS).set(store.head().seq as f64);
    metrics::gauge!(LOG_BYTES).set(store.chunk_bytes() as f64);
    metrics::gauge!(DISK_BYTES).set(store.size_on_disk() as f64);
    metrics::gauge!(LOG_FIRST_SEQ).set(store.horizon().first_seq() as f64);
    handle.run_upkeep();
    handle.render()
}

/// Cluster mode (SPEC §6): this node's applied seq, its lag behind the stream, its role.
pub fn record_cluster(view: &crate::cluster::ClusterView) {
    metrics::gauge!("cairn_cluster_applied_seq").set(view.applied_seq as f64);
    metrics::gauge!("cairn_cluster_lag_events")
        .set(view.stream_seq.saturating_sub(view.applied_seq) as f64);
    let sequencer = matches!(view.role, crate::cluster::Role::Sequencer);
    metrics::gauge!("cairn_cluster_sequencer").set(if sequencer { 1.0 } else { 0.0 });
}
