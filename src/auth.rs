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
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use tokio_util::sync::CancellationToken;

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
            let (record, _): (TokenRecord, usize) =
                bincode::serde::decode_from_slice(&raw, bincode::config::standard())
                    .map_err(|e| AuthError::Corrupt(e.to_string()))?;
            by_id.insert(record.id.clone(), entry(record));
        }
        Ok(Tokens {
            store,
            by_id: RwLock::new(by_id),
        })
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
        self.store.put_token_record(&id, &encode(&record))?;
        if let Ok(mut map) = self.by_id.write() {
            map.insert(id.clone(), entry(record.clone()));
        }
        Ok((record, format!("cairn_{id}_{secret}")))
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

    /// Creates the first admin token and writes it to `path` (mode 0600).
    pub fn create_admin_file(&self, path: &Path) -> Result<(), AuthError> {
        let (_, token) = self.create(Role::Admin, "admin", None)?;
        write_secret_file(path, &token).map_err(|source| AuthError::TokenFile {
            path: path.display().to_string(),
            source,
        })
    }
}

/// Writes `token` alone on one line, readable only by the owner, atomically.
fn write_secret_file(path: &Path, token: &str) -> std::io::Result<()> {
    crate::store::write_atomically(path, format!("{token}\n").as_bytes(), 0o600)
}
