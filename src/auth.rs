//! Tokens: who may do what.
//!
//! A token reads `cairn_<id>_<secret>`. The id names the token (in lists, logs,
//! idempotency records); the secret is 24 random bytes, shown once and stored only as
//! its SHA-256, and compared in constant time. Records live in the store (so offline
//! `cairn token` commands see the same set) and in memory for lookups on every request.
//!
//! Roles nest: `read` ⊂ `ingest` ⊂ `admin`. A token may carry a `types` allow-list;
//! enforcing it on every route is the job of the API layer (see `Caller`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use tokio_util::sync::CancellationToken;

use crate::cluster::{SharedError, SharedMap, Written};
use crate::cursor::TypeFilter;
use crate::store::{Store, StoreError};

/// What a token may do: `read` (query, stream, export, verify, head, checkpoint,
/// proofs), `ingest` (append, and all read may), `admin` (everything, and tokens).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Ingest,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Ingest => "ingest",
            Role::Admin => "admin",
        }
    }
}

/// A stored token (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub types: Option<Vec<String>>,
    pub created_at: String,
    pub secret_sha256: [u8; 32],
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: String,
    pub role: Role,
    /// The token's allow-list, if it has one.
    pub allowed_types: Option<Arc<TypeFilter>>,
    /// Cancelled when the token is revoked: open streams watch it and close.
    pub revoked: CancellationToken,
}

impl Caller {
    /// The caller when authentication is off: an admin without restrictions.
    pub fn anonymous_admin() -> Caller {
        Caller {
            token_id: "-".into(),
            role: Role::Admin,
            allowed_types: None,
            revoked: CancellationToken::new(),
        }
    }
}

/// Why a token request was refused (each names the field).
#[derive(Debug, thiserror::Error)]
#[error("{field} {message}")]
pub struct InvalidToken {
    pub field: &'static str,
    pub message: String,
}

/// Checks a token's name (if given) and allow-list before it is created; every
/// problem is returned.
pub fn validate_new_token(name: Option<&str>, types: Option<&[String]>) -> Vec<InvalidToken> {
    let mut problems = Vec::new();
    if let Some(name) = name {
        let chars = name.chars().count();
        if chars == 0 || chars > 128 || name.chars().any(char::is_control) {
            problems.push(InvalidToken {
                field: "name",
                message: "must be 1–128 characters without control characters".into(),
            });
        }
    }
    match types {
        Some([]) => problems.push(InvalidToken {
            field: "types",
            message: "must not be empty (leave it out, or null, for no allow-list)".into(),
        }),
        Some(types) => {
            for t in types {
                let checked = if t.contains(',') {
                    Err("must be one type or prefix* pattern".to_string())
                } else {
                    TypeFilter::parse(t).map(|_| ())
                };
                if let Err(m) = checked {
                    problems.push(InvalidToken {
                        field: "types",
                        message: format!("entry \"{t}\": {m}"),
                    });
                }
            }
        }
        None => {}
    }
    problems
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("token record is unreadable: {0}")]
    Corrupt(String),
    #[error("cluster: {0}")]
    Shared(#[from] SharedError),
    #[error("cannot write {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
}

struct Entry {
    record: TokenRecord,
    allowed_types: Option<Arc<TypeFilter>>,
    revoked: CancellationToken,
}

pub struct Tokens {
    store: Arc<Store>,
    by_id: RwLock<HashMap<String, Entry>>,
    /// Cluster mode: the map every node's tokens are kept in ([`join_cluster`]).
    shared: OnceLock<SharedMap>,
}

fn encode(record: &TokenRecord) -> Vec<u8> {
    bincode::serde::encode_to_vec(record, bincode::config::standard()).unwrap_or_default()
}

fn entry(record: TokenRecord) -> Entry {
    let allowed_types = record
        .types
        .as_ref()
        .and_then(|t| TypeFilter::parse(&t.join(",")).ok())
        .map(Arc::new);
    Entry {
        record,
        allowed_types,
        revoked: CancellationToken::new(),
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    hex::encode(buf)
}

impl Tokens {
    pub fn load(store: Arc<Store>) -> Result<Tokens, AuthError> {
        let mut by_id = HashMap::new();
        for raw in store.token_records()? {
            let record = decode(&raw)?;
            by_id.insert(record.id.clone(), entry(record));
        }
        Ok(Tokens {
            store,
            by_id: RwLock::new(by_id),
            shared: OnceLock::new(),
        })
    }

    /// Cluster mode: where a token must be created or revoked first, so that every node
    /// sees it ([`Tokens::create_shared`], [`Tokens::revoke_shared`]).
    pub fn shared(&self) -> Option<&SharedMap> {
        self.shared.get()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.read().map(|m| m.is_empty()).unwrap_or(true)
    }

    /// Creates a token; returns its record and the full secret token (shown once).
    pub fn create(
        &self,
        role: Role,
        name: &str,
        types: Option<Vec<String>>,
    ) -> Result<(TokenRecord, String), AuthError> {
        let (record, token) = new_token(role, name, types);
        self.insert(record.clone())?;
        Ok((record, token))
    }

    /// Cluster mode: creates a token in the shared map first (so every node accepts it
    /// within moments), then here, so that it works on this node at once.
    pub async fn create_shared(
        self: &Arc<Self>,
        role: Role,
        name: &str,
        types: Option<Vec<String>>,
    ) -> Result<(TokenRecord, String), AuthError> {
        let Some(map) = self.shared() else {
            let (tokens, name) = (self.clone(), name.to_string());
            return tokio::task::spawn_blocking(move || tokens.create(role, &name, types))
                .await
                .map_err(|e| AuthError::Corrupt(e.to_string()))?;
        };
        let (record, token) = new_token(role, name, types);
        map.put(&record.id, encode(&record)).await?;
        let tokens = self.clone();
        let stored = record.clone();
        tokio::task::spawn_blocking(move || tokens.insert(stored))
            .await
            .map_err(|e| AuthError::Corrupt(e.to_string()))??;
        Ok((record, token))
    }

    /// Stores a record (created here or on another node) and makes it usable.
    fn insert(&self, record: TokenRecord) -> Result<(), AuthError> {
        let known = self
            .by_id
            .read()
            .map(|m| m.get(&record.id).is_some_and(|e| e.record == record))
            .unwrap_or(false);
        if known {
            return Ok(());
        }
        self.store.put_token_record(&record.id, &encode(&record))?;
        if let Ok(mut map) = self.by_id.write() {
            map.insert(record.id.clone(), entry(record));
        }
        Ok(())
    }

    /// The caller a presented token stands for, if it is valid.
    pub fn authenticate(&self, presented: &str) -> Option<Caller> {
        let rest = presented.strip_prefix("cairn_")?;
        let (id, secret) = rest.split_once('_')?;
        let map = self.by_id.read().ok()?;
        let entry = map.get(id)?;
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        if bool::from(digest.ct_eq(&entry.record.secret_sha256)) {
            Some(Caller {
                token_id: entry.record.id.clone(),
                role: entry.record.role,
                allowed_types: entry.allowed_types.clone(),
                revoked: entry.revoked.clone(),
            })
        } else {
            None
        }
    }

    /// Every token, oldest first.
    pub fn list(&self) -> Vec<TokenRecord> {
        let mut all: Vec<TokenRecord> = self
            .by_id
            .read()
            .map(|m| m.values().map(|e| e.record.clone()).collect())
            .unwrap_or_default();
        all.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        all
    }

    /// Revokes a token at once: it no longer authenticates, and its open streams are
    /// told to close. `false` if there is no such token.
    pub fn revoke(&self, id: &str) -> Result<bool, AuthError> {
        if !self.store.remove_token_record(id)? {
            return Ok(false);
        }
        if let Some(entry) = self.by_id.write().ok().and_then(|mut m| m.remove(id)) {
            entry.revoked.cancel();
        }
        Ok(true)
    }

    /// Cluster mode: revokes in the shared map first (every node's follower then revokes
    /// it, ending its streams there), then here at once. `false` if there is no such
    /// token.
    pub async fn revoke_shared(self: &Arc<Self>, id: &str) -> Result<bool, AuthError> {
        if let Some(map) = self.shared() {
            if !self.list().iter().any(|t| t.id == id) {
                return Ok(false);
            }
            map.delete(id).await?;
        }
        let (tokens, target) = (self.clone(), id.to_string());
        let here = tokio::task::spawn_blocking(move || tokens.revoke(&target))
            .await
            .map_err(|e| AuthError::Corrupt(e.to_string()))??;
        // In a cluster, this node's follower may have applied the deletion first.
        Ok(here || self.shared().is_some())
    }

    /// Creates the first admin token and writes it to `path` (mode 0600).
    pub fn create_admin_file(&self, path: &Path) -> Result<(), AuthError> {
        let (_, token) = self.create(Role::Admin, "admin", None)?;
        write_secret_file(path, &token).map_err(|source| AuthError::TokenFile {
            path: path.display().to_string(),
            source,
        })
    }
}

fn new_token(role: Role, name: &str, types: Option<Vec<String>>) -> (TokenRecord, String) {
    let id = random_hex(8);
    let secret = random_hex(24);
    let record = TokenRecord {
        id: id.clone(),
        name: name.to_string(),
        role,
        types,
        created_at: crate::rfc3339::format_unix_ms(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        ),
        secret_sha256: Sha256::digest(secret.as_bytes()).into(),
    };
    (record, format!("cairn_{id}_{secret}"))
}

fn decode(raw: &[u8]) -> Result<TokenRecord, AuthError> {
    bincode::serde::decode_from_slice(raw, bincode::config::standard())
        .map(|(record, _)| record)
        .map_err(|e| AuthError::Corrupt(e.to_string()))
}

/// The shared map's key that the first node of a cluster creates (not a token id: ids
/// are hex).
const FIRST_NODE_KEY: &str = "first-node";

/// Cluster mode (SPEC §6): every node's tokens are the shared map's. The node that
/// creates the map's first key is the cluster's first node: it brings its own tokens
/// (a single node turned into a cluster keeps them) and, with authentication on and no
/// token yet, creates the admin token file as a single node does. Every later node
/// takes the map's tokens as they are, dropping any of its own the map no longer holds
/// (revoked while it was down). Then a task applies every change, so a token created on
/// any node works here, and a revoked one stops working and ends its streams here, within
/// moments. Returns whether this is the first node.
pub async fn join_cluster(
    tokens: Arc<Tokens>,
    map: SharedMap,
    node: &str,
    admin_file: Option<&Path>,
    shutdown: CancellationToken,
) -> Result<bool, AuthError> {
    // A retried start (JetStream was briefly unavailable) finds its own name there.
    let first = match map.create(FIRST_NODE_KEY, node.as_bytes().to_vec()).await? {
        Written::Conflict => map
            .get(FIRST_NODE_KEY)
            .await?
            .and_then(|entry| entry.value)
            .is_some_and(|value| value.as_ref() == node.as_bytes()),
        _ => true,
    };
    if first {
        if let Some(path) = admin_file.filter(|_| tokens.is_empty()) {
            tokens.create_admin_file(path)?;
            tracing::info!(path = %path.display(), "created the cluster's first admin token");
        }
        for record in tokens.list() {
            map.put(&record.id, encode(&record)).await?;
        }
    } else {
        let mut current = std::collections::HashSet::new();
        for shared in map.all().await? {
            if let Some(value) = shared.value.filter(|_| shared.key != FIRST_NODE_KEY) {
                current.insert(shared.key);
                tokens.insert(decode(&value)?)?;
            }
        }
        for record in tokens.list() {
            if !current.contains(&record.id) {
                tokens.revoke(&record.id)?;
            }
        }
    }
    let _ = tokens.shared.set(map.clone());
    let (mut changes, _) = map.follow(shutdown);
    tokio::spawn(async move {
        while let Some(change) = changes.recv().await {
            if change.key == FIRST_NODE_KEY {
                continue;
            }
            let applied = match change.value {
                Some(value) => decode(&value).and_then(|record| tokens.insert(record)),
                None => tokens.revoke(&change.key).map(|_| ()),
            };
            if let Err(e) = applied {
                tracing::error!(error = %e, token = %change.key, "cannot apply a shared token change");
            }
        }
    });
    Ok(first)
}

/// Writes `token` alone on one line, readable only by the owner, atomically.
fn write_secret_file(path: &Path, token: &str) -> std::io::Result<()> {
    crate::store::write_atomically(path, format!("{token}\n").as_bytes(), 0o600)
}
