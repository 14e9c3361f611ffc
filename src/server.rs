//! `cairn serve`: open the data directory, check the chain, start the writer, serve
//! HTTP until a signal, then drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::add_extension::AddExtension;
use tower_http::map_request_body::MapRequestBody;

use crate::api::{self, ApiConfig, AppState, StreamConfig, StreamSlots};
use crate::auth::Tokens;
use crate::chain::Verifier;
use crate::checkpoint::{self, Checkpointer};
use crate::half_close::{BodyUntilPeerShutdown, HalfCloseAware, PeerShutdown};
use crate::merkle;
use crate::store::{DataDir, Store};
use crate::webhook::{DeliveryConfig, Webhooks};
use crate::writer::{SyncMode, Writer};

/// How many of the newest events are re-hashed at every start.
const STARTUP_CHECK_EVENTS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data: PathBuf,
    pub listen: SocketAddr,
    pub sync: SyncMode,
    pub auth: bool,
    pub max_events_per_request: usize,
    pub max_body_bytes: usize,
    pub heartbeat: Duration,
    pub max_connections: usize,
    pub write_timeout: Duration,
    /// Checkpoint origin; generated at first start when absent.
    pub origin: Option<String>,
    pub checkpoint_interval: Duration,
    /// `--webhook-timeout`.
    pub webhook_timeout: Duration,
    /// The first retry delay of a failed webhook delivery.
    pub webhook_retry_initial: Duration,
    pub retention: crate::retention::Policy,
    /// Cluster mode (SPEC §6): the log of record is a NATS JetStream stream.
    pub cluster: Option<crate::cluster::ClusterOptions>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(
        "refusing to start: the log in {dir} is broken at seq {seq}: {reason}. \
         Nothing was changed; inspect it with `cairn verify --data {dir}`"
    )]
    ChainBroken {
        dir: String,
        seq: u64,
        reason: String,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Metrics(String),
    #[error(transparent)]
    Webhook(#[from] crate::webhook::WebhookError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(
        "refusing to start: {dir} holds a copy of the cluster stream {stream}, not {wanted}; \
         give this node its own data directory"
    )]
    OtherCluster {
        dir: String,
        stream: String,
        wanted: String,
    },
    #[error(
        "refusing to start: {dir} holds a node's copy of the cluster stream {stream}; start \
         it with --nats as a node of that cluster. Appended to on its own, the copy would no \
         longer match the cluster's log"
    )]
    ClusterNodeAlone { dir: String, stream: String },
}

impl ServeError {
    /// A cluster call that failed on NATS's side rather than on this node's data: JetStream
    /// answers 10008 ("temporarily unavailable") for a while after an outage or a leader
    /// election, and a node started then should wait it out, not exit.
    fn is_transient(&self) -> bool {
        use crate::{auth::AuthError, checkpoint::CheckpointError, cluster::ClusterError};
        matches!(
            self,
            ServeError::Checkpoint(CheckpointError::Shared(_))
                | ServeError::Auth(AuthError::Shared(_))
                | ServeError::Webhook(crate::webhook::WebhookError::Shared(_))
                | ServeError::Cluster(ClusterError::JetStream(_))
        )
    }
}

/// Runs one cluster start-up step again while it fails for a transient reason, for up to
/// 30 s; any other error (a foreign signing key, a broken token record) ends the start at
/// once.
async fn retry_while_unavailable<T, F, Fut>(what: &str, mut step: F) -> Result<T, ServeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ServeError>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match step().await {
            Err(e) if e.is_transient() && std::time::Instant::now() < deadline => {
                tracing::info!(error = %e, "cannot read {what} yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// Re-derives the chain of the newest events; a break means the data was altered or
/// damaged outside cairn, and serving (or appending to) it would hide that.
pub fn check_tail(store: &Store, dir: &std::path::Path) -> Result<(), ServeError> {
    let broken = |seq, reason| ServeError::ChainBroken {
        dir: dir.display().to_string(),
        seq,
        reason,
    };
    let tail = store.tail(STARTUP_CHECK_EVENTS)?;
    let horizon = store.horizon();
    // Starting at the horizon, its prev_hash must link to the last pruned event.
    let mut verifier = match (tail.first(), horizon.last_pruned_id) {
        (Some(first), Some(id)) if first.seq == horizon.first_seq() => {
            Verifier::after(horizon.pruned_through, id, horizon.last_pruned_hash)
        }
        _ => Verifier::new(),
    };
    for event in &tail {
        let info =
            crate::chain::inspect_line(event.line.as_bytes()).map_err(|r| broken(event.seq, r))?;
        if info.seq != event.seq || info.id != event.id {
            return Err(broken(
                event.seq,
                "the stored index disagrees with the event".into(),
            ));
        }
        verifier
            .push_info(&info)
            .map_err(|b| broken(b.seq, b.reason))?;
    }
    let head = store.head();
    if tail.last().map_or(0, |e| e.seq) != head.seq {
        return Err(broken(head.seq, "the newest events are missing".into()));
    }
    Ok(())
}

pub async fn run(opts: ServeOptions) -> Result<(), ServeError> {
    let dir = DataDir::lock(&opts.data)?;
    let store = Arc::new(Store::open(dir)?);
    check_tail(&store, &opts.data)?;
    let head = store.head();
    tracing::info!(seq = head.seq, data = %opts.data.display(), "log opened and chain tail verified");
    let added = merkle::catch_up(&store)?;
    if added > 0 {
        tracing::info!(
            leaves = added,
            "built the Merkle tree for events logged before it existed"
        );
    }
    // Cluster mode: connected before the checkpoint key and tokens, which the cluster
    // shares.
    let connection = match &opts.cluster {
        Some(cluster_opts) => {
            match store.cluster_stream()? {
                Some(stream) if stream != cluster_opts.stream => {
                    return Err(ServeError::OtherCluster {
                        dir: opts.data.display().to_string(),
                        stream,
                        wanted: cluster_opts.stream.clone(),
                    });
                }
                Some(_) => {}
                None => store.set_cluster_stream(&cluster_opts.stream)?,
            }
            let connection = crate::cluster::connect(cluster_opts).await?;
            retry_while_unavailable("the cluster's horizon", || async {
                Ok(connection
                    .start_from_horizon(&store, &cluster_opts.node)
                    .await?)
            })
            .await?;
            retry_while_unavailable("the cluster's signing key", || async {
                let config = connection.shared.map("config").await?;
                checkpoint::share_key(&config, &opts.data, opts.origin.as_deref()).await?;
                Ok(())
            })
            .await?;
            Some(connection)
        }
        None => match store.cluster_stream()? {
            Some(stream) => {
                return Err(ServeError::ClusterNodeAlone {
                    dir: opts.data.display().to_string(),
                    stream,
                });
            }
            None => None,
        },
    };
    let checkpoints = Arc::new(Checkpointer::open(
        store.clone(),
        &opts.data,
        opts.origin.as_deref(),
        opts.sync == SyncMode::None,
    )?);
    let latest = checkpoints.latest();
    tracing::info!(origin = %latest.origin, size = latest.size, "checkpoints: signing key loaded");

    let tokens = Arc::new(Tokens::load(store.clone())?);
    let admin_file = opts.data.join("admin.token");
    if opts.auth {
        // A cluster's first node creates it once it knows it is the first.
        if tokens.is_empty() && connection.is_none() {
            tokens.create_admin_file(&admin_file)?;
            tracing::info!(path = %admin_file.display(), "created the first admin token");
        }
    } else {
        tracing::warn!(
            "authentication is OFF (--auth off): anyone who can reach the port can read and append"
        );
    }
    if opts.sync == SyncMode::None {
        tracing::warn!(
            "--sync none: acknowledged events may be lost on power loss or a kernel crash"
        );
    }

    let (mut writer, writer_thread) = Writer::start(store.clone(), opts.sync)?;
    let shutdown = CancellationToken::new();
    // Cluster tasks stop on their own token, after the HTTP server: requests in flight
    // still reach the sequencer while connections drain.
    let cluster_stop = CancellationToken::new();
    let cluster = match (connection, &opts.cluster) {
        (Some(connection), Some(cluster_opts)) => {
            let cluster = crate::cluster::start(
                connection,
                cluster_opts,
                store.clone(),
                writer.clone(),
                cluster_stop.clone(),
            )
            .await?;
            writer.forward_to(cluster.forwarder.clone());
            retry_while_unavailable("the cluster's tokens", || async {
                crate::auth::join_cluster(
                    tokens.clone(),
                    cluster.shared.map("tokens").await?,
                    &cluster_opts.node,
                    opts.auth.then_some(admin_file.as_path()),
                    cluster_stop.clone(),
                )
                .await?;
                Ok(())
            })
            .await?;
            // Retention is one decision for the cluster: every node follows it, whatever
            // its own flags (the sequencer's bounds decide; --archive is per node).
            retry_while_unavailable("the cluster's retention", || async {
                crate::cluster::start_retention(
                    cluster.status.clone(),
                    cluster.shared.map("retention").await?,
                    checkpoints.clone(),
                    opts.retention.clone(),
                    cluster_stop.clone(),
                )
                .await?;
                Ok(())
            })
            .await?;
            Some((cluster, cluster_opts))
        }
        _ => None,
    };
    let connections = TaskTracker::new();
    let webhooks = Arc::new(Webhooks::start(
        store.clone(),
        writer.clone(),
        DeliveryConfig {
            timeout: opts.webhook_timeout,
            backoff_min: opts.webhook_retry_initial,
        },
        shutdown.child_token(),
        cluster.is_some(),
    )?);
    if let Some((cluster, cluster_opts)) = &cluster {
        retry_while_unavailable("the cluster's webhooks", || async {
            let defs = cluster.shared.map("webhooks").await?;
            let leases = cluster
                .shared
                .map_with_ttl("webhook-leases", cluster_opts.webhook_lease)
                .await?;
            // The bucket's: the node that created it chose the lease time.
            let lease = Some(leases.ttl())
                .filter(|ttl| !ttl.is_zero())
                .unwrap_or(cluster_opts.webhook_lease);
            crate::webhook::join_cluster(
                &webhooks,
                defs,
                leases,
                cluster.status.clone(),
                crate::webhook::ClusterSettings {
                    node: cluster_opts.node.clone(),
                    lease,
                },
                &store,
            )
            .await?;
            Ok(())
        })
        .await?;
    }
    let cluster = cluster.map(|(cluster, _)| cluster.status);
    let state = AppState {
        store: store.clone(),
        writer,
        cluster,
        tokens,
        config: Arc::new(ApiConfig {
            auth: opts.auth,
            max_events_per_request: opts.max_events_per_request,
            max_body_bytes: opts.max_body_bytes,
            archive: opts.retention.archive.clone(),
        }),
        streams: Arc::new(StreamSlots::new(opts.max_connections)),
        stream: StreamConfig {
            heartbeat: opts.heartbeat,
            write_timeout: opts.write_timeout,
            shutdown: shutdown.clone(),
            connections: connections.clone(),
        },
        stream_stats: Default::default(),
        checkpoints: checkpoints.clone(),
        webhooks: webhooks.clone(),
        metrics: crate::telemetry::install().map_err(ServeError::Metrics)?,
    };
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: opts.listen,
            source,
        })?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "listening");
    let listener = TimeoutListener {
        inner: listener,
        write_timeout: opts.write_timeout,
    };
    // Streams never end by themselves: the signal ends them (cleanly), and only then
    // can the graceful shutdown finish their connections.
    let stop = shutdown.clone();
    tokio::spawn(async move {
        crate::shutdown::signal().await;
        stop.cancel();
    });
    // Events a crash left uncovered get their checkpoint before anything is served.
    checkpoint::sign_if_grown(&checkpoints).await;
    tokio::spawn(checkpoint::run(
        checkpoints.clone(),
        opts.checkpoint_interval,
        shutdown.clone(),
    ));
    if opts.retention.is_bounded() && opts.cluster.is_none() {
        tracing::info!(policy = ?opts.retention, "retention: the pruner is running");
        tokio::spawn(crate::retention::run(
            store.clone(),
            checkpoints.clone(),
            opts.retention.clone(),
            shutdown.clone(),
        ));
    }
    serve_http(listener, api::router(state), shutdown, connections).await;
    // Delivery tasks hold a Writer handle (to subscribe): they end before it is drained.
    webhooks.stopped().await;
    drop(webhooks);
    cluster_stop.cancel();

    // The router (and every Writer handle in it) is gone: the writer drains its queue.
    let joined = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    if joined.is_err() {
        tracing::error!("the writer thread panicked during shutdown");
    }
    if let Err(e) = store.sync() {
        tracing::error!(error = %e, "final sync failed");
    }
    // The last events get a checkpoint too (the task above has stopped).
    if let Err(e) = checkpoints.sign_if_grown() {
        tracing::error!(error = %e, "the final checkpoint failed");
    }
    tracing::info!(
        seq = store.head().seq,
        "stopped; all acknowledged events are on disk"
    );
    Ok(())
}

/// Gives up on connections still open this long after shutdown began.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);
/// A client must send its request headers within this time (slow-header attacks).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP/1.1 with hyper directly (not `axum::serve`): each idle stream then costs
/// ~6 KB less (no HTTP/2 detection layer), and the header read timeout can be set.
/// Every connection is tracked in `connections` (upgraded WebSockets add themselves), so
/// shutdown waits for them all, up to [`SHUTDOWN_GRACE`]; then the HTTP connections
/// still open are dropped, requests and all, so none can keep the writer from draining.
async fn serve_http(
    mut listener: TimeoutListener,
    router: axum::Router,
    shutdown: CancellationToken,
    connections: TaskTracker,
) {
    let force = CancellationToken::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let http = Arc::new(http);
    loop {
        let io = tokio::select! {
            io = listener.accept() => io,
            () = shutdown.cancelled() => break,
        };
        let (router, http) = (router.clone(), http.clone());
        let (stop, force) = (shutdown.clone(), force.clone());
        connections.spawn(async move {
            // Built here, not moved in: a future moved into an async block is held twice
            // (the captured value and the pinned local), and this task is a large part of
            // what an idle stream costs.
            let peer = PeerShutdown::default();
            let body_peer = peer.clone();
            let service =
                MapRequestBody::new(AddExtension::new(router, peer.clone()), move |body| {
                    BodyUntilPeerShutdown::new(body, body_peer.clone())
                });
            let service = TowerToHyperService::new(service);
            // hyper keeps a slot for the request future for the connection's whole life:
            // boxed, an idle stream holds a pointer there instead of the router's future.
            let service = hyper::service::service_fn(move |request| {
                Box::pin(hyper::service::Service::call(&service, request))
            });
            let io = HalfCloseAware::new(io, peer.clone());
            let mut connection = std::pin::pin!(
                http.serve_connection(hyper_util::rt::TokioIo::new(io), service)
                    .with_upgrades()
            );
            // Until shutdown begins, or the client has sent all it will send (half_close).
            // The client's end-of-file is seen by this connection's own reader, polled
            // inside `connection`, so a check after each poll needs no waiting future.
            let ended = {
                let mut stopped = std::pin::pin!(stop.cancelled());
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(ended) = connection.as_mut().poll(cx) {
                        return Poll::Ready(Some(ended));
                    }
                    if peer.closed().is_cancelled() || stopped.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    Poll::Pending
                })
                .await
            };
            // Then finish the request in flight (streams end on the shutdown signal, and
            // on a half-closed connection after their probes)…
            let ended = match ended {
                Some(ended) => ended,
                None => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        ended = connection.as_mut() => ended,
                        // …unless it outlasts the grace period (a body that never ends).
                        () = force.cancelled() => Ok(()),
                    }
                }
            };
            // Upgraded (a WebSocket) or done: end-of-file is the new owner's to see.
            peer.pass_through();
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open {SHUTDOWN_GRACE:?} after shutdown began; closing them"
        );
        force.cancel();
        if tokio::time::timeout(Duration::from_secs(1), connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after being closed; exiting without them");
        }
    }
}

/// Accepts connections with a write timeout: a client that leaves a response unread for
/// `--write-timeout` (its socket buffer full) is disconnected, so a stalled stream
/// cannot pin memory or a connection slot; it resumes with `Last-Event-ID`.
struct TimeoutListener {
    inner: TcpListener,
    write_timeout: Duration,
}

impl TimeoutListener {
    async fn accept(&mut self) -> std::pin::Pin<Box<TimeoutStream<TcpStream>>> {
        loop {
            match self.inner.accept().await {
                Ok((stream, _)) => {
                    // Small SSE frames must not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    let mut stream = TimeoutStream::new(stream);
                    stream.set_write_timeout(Some(self.write_timeout));
                    // Boxed: the connection task holds a pointer, which keeps it in a
                    // smaller allocation class.
                    return Box::pin(stream);
                }
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
