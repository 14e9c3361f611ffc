//! Signed checkpoints: the Merkle tree's head, signed, so an auditor can prove later
//! that the log only grew (SPEC §3).
//!
//! A checkpoint is a C2SP `tlog-checkpoint` (origin, tree size, base64 root) in a C2SP
//! `signed-note` with one Ed25519 signature; the `signed_note` and `tlog_tiles` crates
//! (ports of Go's `note` and `sumdb/tlog`) do the formats.
//!
//! - **Key**: `<data>/checkpoint.key` (mode 0600) holds the signed-note private key
//!   `PRIVATE+KEY+<origin>+<key id>+<key>`, created at first start. The key's name is the
//!   origin, so the origin is kept for life with it; `--origin` must match it later.
//! - **The newest checkpoint** is `<data>/checkpoint`, replaced atomically (write, fsync,
//!   rename, fsync the directory) each time one is signed, before it is served and
//!   before the next is signed.
//! - **Never two inconsistent checkpoints**: one signer task signs, only committed
//!   (durable) events, and only after a consistency proof from the previous checkpoint
//!   checks out against the stored tree. At start, the stored tree must reproduce the
//!   last checkpoint's root; a log that lost its tail or was replaced refuses to start
//!   rather than sign a second history.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use signed_note::{Note, Signer, StandardSigner, StandardVerifier, VerifierList};
use tlog_tiles::Hash;
use tokio_util::sync::CancellationToken;

use crate::merkle::{self, ProofError};
use crate::store::{Store, StoreError};

const KEY_FILE: &str = "checkpoint.key";
const CHECKPOINT_FILE: &str = "checkpoint";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Key(String),
    #[error(
        "refusing to start: --origin {given:?} differs from this log's origin {kept:?} \
         (the origin is kept for life in checkpoint.key)"
    )]
    OriginChanged { given: String, kept: String },
    #[error("refusing to start: {0}")]
    Diverged(String),
    #[error("invalid checkpoint: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Proof(#[from] ProofError),
    #[error("{0}")]
    Shared(#[from] crate::cluster::SharedError),
}

/// A checkpoint whose signature has been checked (or that we signed).
#[derive(Debug, Clone)]
pub struct Signed {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    /// The whole signed note, as served.
    pub note: String,
}

/// Parses a signed checkpoint and checks its signature against a verifier key
/// (`name+id+key`); the checkpoint's origin must be the key's name.
pub fn open(note: &str, vkey: &str) -> Result<Signed, CheckpointError> {
    let verifier = StandardVerifier::new(vkey.trim())
        .map_err(|e| CheckpointError::Invalid(format!("verifier key: {e}")))?;
    let key_name = signed_note::Verifier::name(&verifier).to_string();
    let parsed = Note::from_bytes(note.as_bytes())
        .map_err(|e| CheckpointError::Invalid(format!("not a signed note: {e}")))?;
    parsed
        .verify(&VerifierList::new(vec![Box::new(verifier)]))
        .map_err(|e| CheckpointError::Invalid(format!("signature: {e}")))?;
    let checkpoint = tlog_tiles::Checkpoint::from_bytes(parsed.text())
        .map_err(|_| CheckpointError::Invalid("not a tlog-checkpoint".into()))?;
    if checkpoint.origin() != key_name {
        return Err(CheckpointError::Invalid(format!(
            "origin {:?} is not the key's name {key_name:?}",
            checkpoint.origin()
        )));
    }
    Ok(Signed {
        origin: checkpoint.origin().to_string(),
        size: checkpoint.size(),
        root: *checkpoint.hash(),
        note: note.to_string(),
    })
}

/// Signs checkpoints of one log.
pub struct Checkpointer {
    store: Arc<Store>,
    signer: StandardSigner,
    vkey: String,
    path: PathBuf,
    latest: RwLock<Arc<Signed>>,
    /// One signer at a time (the periodic task and the one at shutdown), so the newest
    /// checkpoint on disk never goes back.
    signing: std::sync::Mutex<()>,
    /// With `--sync none`, events are flushed before a checkpoint covers them.
    flush_first: bool,
}

impl Checkpointer {
    /// Loads (or creates) the key, and the newest checkpoint (or signs the size-0 one),
    /// after checking that the stored tree still extends it.
    pub fn open(
        store: Arc<Store>,
        data: &Path,
        origin: Option<&str>,
        flush_first: bool,
    ) -> Result<Checkpointer, CheckpointError> {
        let (signer, vkey) = load_or_create_key(&data.join(KEY_FILE), origin)?;
        let path = data.join(CHECKPOINT_FILE);
        let previous = match std::fs::read_to_string(&path) {
            Ok(note) => Some(open(&note, &vkey)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(CheckpointError::Io { path, source }),
        };
        let checkpointer = Checkpointer {
            store,
            signer,
            vkey,
            path,
            latest: RwLock::new(Arc::new(Signed {
                origin: String::new(),
                size: 0,
                root: merkle::EMPTY_HASH,
                note: String::new(),
            })),
            signing: std::sync::Mutex::new(()),
            flush_first,
        };
        match previous {
            Some(previous) => {
                let head = checkpointer.store.head().seq;
                if previous.size > head {
                    return Err(CheckpointError::Diverged(format!(
                        "the last signed checkpoint covers {} events but the log has {head}: \
                         its tail was lost or the log was replaced",
                        previous.size
                    )));
                }
                if merkle::root(&*checkpointer.store, previous.size)? != previous.root {
                    return Err(CheckpointError::Diverged(format!(
                        "the log's first {} events no longer match the last signed checkpoint",
                        previous.size
                    )));
                }
                checkpointer.set_latest(previous);
            }
            None => {
                let signed = checkpointer.sign(0, merkle::EMPTY_HASH)?;
                checkpointer.persist(&signed)?;
                checkpointer.set_latest(signed);
            }
        }
        Ok(checkpointer)
    }

    /// The newest signed checkpoint.
    pub fn latest(&self) -> Arc<Signed> {
        match self.latest.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The verifier key, `origin+id+key`.
    pub fn verifier_key(&self) -> &str {
        &self.vkey
    }

    /// Signs, persists and publishes a checkpoint of the committed log if it has grown
    /// since the last one.
    pub fn sign_if_grown(&self) -> Result<Option<Arc<Signed>>, CheckpointError> {
        let _one_signer = self
            .signing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let previous = self.latest();
        let size = self.store.head().seq;
        if size <= previous.size {
            return Ok(None);
        }
        if self.flush_first {
            self.store.sync()?;
        }
        let root = merkle::root(&*self.store, size)?;
        if previous.size > 0 {
            let proof = merkle::consistency_proof(&*self.store, previous.size, size)?;
            merkle::verify_consistency(&proof, previous.size, size, &previous.root.0, &root.0)?;
        }
        // Retention keeps the tree nodes this checkpoint's proofs need only if it knows
        // the size, so the size is on disk before the checkpoint exists.
        self.store.note_checkpoint(size)?;
        let signed = self.sign(size, root)?;
        self.persist(&signed)?;
        self.set_latest(signed);
        Ok(Some(self.latest()))
    }

    fn set_latest(&self, signed: Signed) {
        let signed = Arc::new(signed);
        match self.latest.write() {
            Ok(mut l) => *l = signed,
            Err(poisoned) => *poisoned.into_inner() = signed,
        }
    }

    fn sign(&self, size: u64, root: Hash) -> Result<Signed, CheckpointError> {
        let origin = self.signer.name().to_string();
        let body = tlog_tiles::Checkpoint::new(&origin, size, root, "")
            .map_err(|_| {
                CheckpointError::Key(format!("origin {origin:?} cannot name a checkpoint"))
            })?
            .to_bytes();
        let mut note = Note::new(&body, &[]).map_err(|e| CheckpointError::Key(e.to_string()))?;
        note.add_sigs(&[&self.signer])
            .map_err(|e| CheckpointError::Key(e.to_string()))?;
        let note =
            String::from_utf8(note.to_bytes()).map_err(|e| CheckpointError::Key(e.to_string()))?;
        Ok(Signed {
            origin,
            size,
            root,
            note,
        })
    }

    fn persist(&self, signed: &Signed) -> Result<(), CheckpointError> {
        write_atomically(&self.path, signed.note.as_bytes(), 0o644)
    }
}

/// The size of the newest checkpoint signed for the log in `data` (a stopped server's
/// directory), its signature checked with the key kept there: what an offline prune may
/// remove up to.
pub fn latest_size_offline(data: &Path) -> Result<u64, CheckpointError> {
    let key_path = data.join(KEY_FILE);
    let skey = std::fs::read_to_string(&key_path).map_err(|source| CheckpointError::Io {
        path: key_path.clone(),
        source,
    })?;
    let vkey = verifier_key_of(skey.trim())?;
    let path = data.join(CHECKPOINT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(note) => Ok(open(&note, &vkey)?.size),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(CheckpointError::Io { path, source }),
    }
}

/// Signs a checkpoint whenever the log has grown, at most every `interval`; the first
/// tick is one interval after start-up, which signs before it serves (as shutdown signs
/// after the writer drains), so on a single node what a restart covers never races the
/// first appends (a cluster node's applier may already be copying events in).
pub async fn run(checkpointer: Arc<Checkpointer>, interval: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        sign_if_grown(&checkpointer).await;
    }
}

/// [`Checkpointer::sign_if_grown`] off the async workers; a failure is logged (the next
/// attempt signs what this one did not).
pub async fn sign_if_grown(checkpointer: &Arc<Checkpointer>) {
    let c = checkpointer.clone();
    match tokio::task::spawn_blocking(move || c.sign_if_grown()).await {
        Ok(Ok(Some(signed))) => tracing::debug!(size = signed.size, "signed a checkpoint"),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "signing a checkpoint failed"),
        Err(e) => tracing::error!(error = %e, "the checkpoint task failed"),
    }
}

/// The shared map's key holding the cluster's signing key.
const SHARED_KEY: &str = "checkpoint-key";

/// Cluster mode (SPEC §6): every node signs with one key, so a checkpoint of a given
/// size is the same on every node. Before [`Checkpointer::open`]: a node without a key
/// file takes the cluster's; the first node publishes its own (created as a single node
/// does); a node whose key file differs from the cluster's refuses to start rather than
/// sign a second origin. The map holds the secret key: NATS's own access control guards
/// it (README, cluster mode).
pub async fn share_key(
    map: &crate::cluster::SharedMap,
    data: &Path,
    origin: Option<&str>,
) -> Result<(), CheckpointError> {
    let path = data.join(KEY_FILE);
    let local = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(CheckpointError::Io { path, source }),
    };
    let cluster = match map.get(SHARED_KEY).await? {
        Some(entry) => entry.value,
        None => {
            load_or_create_key(&path, origin)?;
            let created = std::fs::read_to_string(&path)
                .map_err(|source| CheckpointError::Io {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_string();
            let published = map.create(SHARED_KEY, created.clone().into_bytes()).await;
            if published.is_err() && local.is_none() {
                // Made here and never used: a retried start must not mistake it for a
                // key of its own that differs from the one another node published since.
                let _ = std::fs::remove_file(&path);
            }
            match published? {
                crate::cluster::Written::Done(_) => return Ok(()),
                // Another node published first: take its key if this one was just made.
                crate::cluster::Written::Conflict => {
                    map.get(SHARED_KEY).await?.and_then(|e| e.value)
                }
            }
        }
    };
    let Some(cluster) = cluster else {
        return Err(CheckpointError::Key(
            "the cluster's signing key vanished; retry".into(),
        ));
    };
    let cluster = String::from_utf8_lossy(&cluster).trim().to_string();
    match local {
        Some(local) if local == cluster => Ok(()),
        Some(_) => Err(CheckpointError::Key(format!(
            "refusing to start: {} holds another signing key than the cluster's (every node \
             signs with one key); remove it to take the cluster's, or give every node the \
             same file",
            path.display()
        ))),
        None => {
            write_atomically(&path, format!("{cluster}\n").as_bytes(), 0o600)?;
            tracing::info!(path = %path.display(), "took the cluster's checkpoint signing key");
            Ok(())
        }
    }
}

/// The signer and verifier key in `path`, created (for `origin`, or a generated name)
/// when missing.
fn load_or_create_key(
    path: &Path,
    origin: Option<&str>,
) -> Result<(StandardSigner, String), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let skey = match std::fs::read_to_string(path) {
        Ok(text) => text.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let name = match origin {
                Some(name) => name.to_string(),
                None => format!("cairn.local/{:016x}", rand::random::<u64>()),
            };
            if !signed_note::is_key_name_valid(&name) {
                return Err(CheckpointError::Key(format!(
                    "--origin {name:?} is not a valid key name (no spaces or '+')"
                )));
            }
            let (skey, _) = signed_note::generate_key(&mut rand_core::OsRng, &name);
            write_atomically(path, format!("{skey}\n").as_bytes(), 0o600)?;
            tracing::info!(origin = %name, path = %path.display(), "created the checkpoint signing key");
            skey
        }
        Err(e) => return Err(io(e)),
    };
    let signer = StandardSigner::new(&skey)
        .map_err(|e| CheckpointError::Key(format!("{}: {e}", path.display())))?;
    if let Some(given) = origin
        && given != signer.name()
    {
        return Err(CheckpointError::OriginChanged {
            given: given.to_string(),
            kept: signer.name().to_string(),
        });
    }
    let vkey = verifier_key_of(&skey)?;
    Ok((signer, vkey))
}

/// The verifier key of a signed-note private key.
fn verifier_key_of(skey: &str) -> Result<String, CheckpointError> {
    let bad = || CheckpointError::Key("malformed checkpoint.key".into());
    let mut parts = skey.splitn(5, '+');
    let (name, key) = match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("PRIVATE"), Some("KEY"), Some(name), Some(_id), Some(key)) => (name, key),
        _ => return Err(bad()),
    };
    let key = BASE64.decode(key).map_err(|_| bad())?;
    let seed: [u8; 32] = key
        .get(1..)
        .and_then(|k| k.try_into().ok())
        .ok_or_else(bad)?;
    let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
    Ok(signed_note::new_ed25519_verifier_key(
        name,
        &signing.verifying_key(),
    ))
}

/// [`crate::store::write_atomically`], with the error naming the file.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CheckpointError> {
    crate::store::write_atomically(path, bytes, mode).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A C2SP `tlog-proof`: an offline-verifiable proof that one event is in the log.
/// `extra` carries the event's line, so the proof stands alone.
#[derive(Debug, Clone)]
pub struct TlogProof {
    pub extra: Option<Vec<u8>>,
    pub index: u64,
    pub hashes: Vec<Hash>,
    /// The signed checkpoint the proof is against.
    pub checkpoint: String,
}

const TLOG_PROOF_HEADER: &str = "c2sp.org/tlog-proof@v1";

impl TlogProof {
    pub fn render(&self) -> String {
        let mut out = format!("{TLOG_PROOF_HEADER}\n");
        if let Some(extra) = &self.extra {
            out.push_str(&format!("extra {}\n", BASE64.encode(extra)));
        }
        out.push_str(&format!("index {}\n", self.index));
        for hash in &self.hashes {
            out.push_str(&format!("{}\n", BASE64.encode(hash.0)));
        }
        out.push('\n');
        out.push_str(&self.checkpoint);
        out
    }

    pub fn parse(text: &str) -> Result<TlogProof, CheckpointError> {
        let bad = |m: &str| CheckpointError::Invalid(format!("tlog-proof: {m}"));
        let (head, checkpoint) = text
            .split_once("\n\n")
            .ok_or_else(|| bad("no empty line before the checkpoint"))?;
        let mut lines = head.split('\n');
        if lines.next() != Some(TLOG_PROOF_HEADER) {
            return Err(bad("the first line must be c2sp.org/tlog-proof@v1"));
        }
        let mut line = lines.next().ok_or_else(|| bad("no index line"))?;
        let mut extra = None;
        if let Some(b64) = line.strip_prefix("extra ") {
            extra = Some(
                BASE64
                    .decode(b64)
                    .map_err(|_| bad("the extra line is not base64"))?,
            );
            line = lines.next().ok_or_else(|| bad("no index line"))?;
        }
        let index = line
            .strip_prefix("index ")
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| bad("expected `index N`"))?;
        let hashes = lines
            .map(|l| {
                BASE64
                    .decode(l)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .map(Hash)
                    .ok_or_else(|| bad("a proof line is not a base64 32-byte hash"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TlogProof {
            extra,
            index,
            hashes,
            checkpoint: checkpoint.to_string(),
        })
    }
}
