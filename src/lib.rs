//! cairn: a durable, hash-chained event log that streams without gaps.
//!
//! # The data path
//!
//! ```text
//! POST /v1/events ─► api::ingest ─► event::parse_request ─► writer (queue)
//!                     (jcs: validate + JCS in one pass)           │
//!   writer thread: ids, seq, chain::seal (hash), merkle (tree nodes)
//!                  ─► store::apply (one sled batch)
//!                  ─► store::sync (one fsync per group) ─► committed ─► acknowledge
//!   publisher thread: merges committed groups ─► broadcast to live subscribers
//!
//! GET /v1/events, /v1/export, /v1/verify ─► api::read ─► store scans (≤ committed head)
//! GET /v1/events/stream ─► api::stream    ─┐ subscription: subscribe to the broadcast,
//! GET /v1/events/ws     ─► api::websocket ─┘ replay the store from the cursor, then
//!                                            live (lag → store; `subscribe` → reposition)
//! checkpoint task: at start-up, then every second the log grew ─► merkle root ─► sign ─► data/checkpoint
//! GET /v1/checkpoint, /v1/proof/* ─► api::proofs ─► merkle (O(log n) stored hashes)
//!
//! cluster mode (--nats): writer::append ─► cluster::forward ─► NATS ─► the sequencer
//!   (seal on the acknowledged head ─► fenced publish ─► JetStream ack ─► reply)
//! every node: cluster::applier (stream from its position) ─► writer (chain checked)
//!   ─► the same store::apply, sync, committed, broadcast as above
//! shared state (cluster::SharedMap, JetStream key-value): tokens, the signing key, the
//!   sequencer lease, retention's one horizon, webhooks and their delivery leases
//! ```
//!
//! Start at [`writer`] (who appends, and when an event counts as committed), then
//! [`store`] (the sled layout, behind a narrow interface), then [`chain`] (the one
//! definition of the hash), then [`subscription`] (how a stream resumes without a gap).
//! [`api`] is the HTTP layer; it never touches sled. [`cli`] defines every command;
//! [`commands`] runs the client-side ones.
//!
//! | module | concern |
//! |---|---|
//! | [`event`] | what producers send and the rules it must follow (SPEC §1) |
//! | [`ijson`] | strict JSON: duplicate keys, unsafe integers; every problem, with its path |
//! | [`jcs`] | the ingest hot path: strict JSON to its canonical form in one pass (accept or reject) |
//! | [`rfc3339`] | timestamps kept exactly as given, normalised to UTC |
//! | [`chain`] | canonical record, hash, chain verification |
//! | [`merkle`] | the RFC 6962 tree over the events: stored hashes, roots, proofs |
//! | [`checkpoint`] | signing key, signed checkpoints, the tlog-proof format |
//! | [`store`] | sled layout, data-directory lock, committed head |
//! | [`writer`] | single writer, group commit, publisher |
//! | [`retention`] | bounds, the pruner, archives, manual prune (SPEC §8) |
//! | [`subscription`] | replay-then-live, exactly once, for every stream |
//! | [`cursor`] | `since`/`until`/`types`/`source` |
//! | [`auth`] | tokens, roles, allow-lists, revocation |
//! | [`webhook`] | webhooks: stored definitions and cursors, one delivery task each (a subscription, signed POSTs, retries) |
//! | [`api`] | axum routes (ingest, read, SSE and WebSocket streams, proofs, tokens, ops), the error body, and the OpenAPI document built from the routes |
//! | [`cluster`] | cluster mode on NATS JetStream: the stream applier (the writer's second source of groups), the sequencer and its lease, forwarding |
//! | [`server`] | `cairn serve`: start-up checks, HTTP/1.1 serving, draining |
//! | [`half_close`] | a client that shuts down its sending side still gets its response |
//! | [`shutdown`] | SIGTERM/SIGINT |
//! | [`telemetry`] | Prometheus metrics |
//! | [`client`] | the HTTP client remote commands share |

pub mod api;
pub mod auth;
pub mod chain;
pub mod checkpoint;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod commands;
pub mod cursor;
pub mod event;
pub mod half_close;
pub mod ijson;
pub mod jcs;
pub mod merkle;
pub mod retention;
pub mod rfc3339;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod subscription;
pub mod telemetry;
pub mod webhook;
pub mod writer;
