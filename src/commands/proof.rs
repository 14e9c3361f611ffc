//! `cairn proof` and the checkpoint side of `cairn verify`: what an auditor runs to show,
//! without reading the log again, that it only grew (`--checkpoint`) and that one event
//! is in it (`--proof`).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tlog_tiles::Hash;

use crate::checkpoint::{self, Signed, TlogProof};
use crate::cli::ProofArgs;
use crate::client::Client;
use crate::merkle;

#[derive(Deserialize)]
struct Envelope<T> {
    data: T,
}

#[derive(Deserialize)]
struct InclusionJson {
    hashes: Vec<String>,
}

#[derive(Deserialize)]
struct ConsistencyJson {
    hashes: Vec<String>,
}

#[derive(Deserialize)]
struct VerifyJson {
    head: Option<HeadJson>,
}

#[derive(Deserialize)]
struct HeadJson {
    id: Option<String>,
}

fn hashes_from_hex(hexes: &[String]) -> Result<Vec<Hash>, String> {
    hexes
        .iter()
        .map(|h| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h, &mut out)
                .map(|()| Hash(out))
                .map_err(|_| format!("the server sent a malformed proof hash {h:?}"))
        })
        .collect()
}

fn get_text(client: &Client, path: &str) -> Result<String, String> {
    client
        .get(path)?
        .text()
        .map_err(|e| format!("reading {path}: {e}"))
}

fn get_json<T: serde::de::DeserializeOwned>(client: &Client, path: &str) -> Result<T, String> {
    client
        .get(path)?
        .json::<Envelope<T>>()
        .map(|e| e.data)
        .map_err(|e| format!("reading {path}: {e}"))
}

/// The signed checkpoint's size, read without its key (the proof's reader checks it).
fn unverified_size(note: &str) -> Result<u64, String> {
    let text = signed_note::Note::from_bytes(note.as_bytes())
        .map_err(|e| format!("the server's checkpoint is not a signed note: {e}"))?;
    tlog_tiles::Checkpoint::from_bytes(text.text())
        .map(|c| c.size())
        .map_err(|_| "the server's checkpoint is malformed".to_string())
}

pub fn run(args: &ProofArgs) -> Result<ExitCode, String> {
    let client = Client::new(&args.remote.url, args.remote.token.clone())?;
    let id = if crate::cursor::parse_ulid(&args.event).is_some() {
        args.event.clone()
    } else {
        let seq: u64 = args
            .event
            .parse()
            .ok()
            .filter(|s| *s > 0)
            .ok_or("give the event's seq (1, 2, …) or its id")?;
        // /v1/verify over one event answers with that event's id.
        let verified: VerifyJson =
            get_json(&client, &format!("/v1/verify?from_seq={seq}&to_seq={seq}"))?;
        verified
            .head
            .and_then(|h| h.id)
            .ok_or_else(|| format!("no event with seq {seq}"))?
    };
    let line = get_text(&client, &format!("/v1/events/{id}"))?;
    let event: Envelope<Box<serde_json::value::RawValue>> =
        serde_json::from_str(&line).map_err(|e| format!("reading event {id}: {e}"))?;
    let line = event.data.get().to_string();
    let seq = crate::chain::inspect_line(line.as_bytes())?.seq;

    // The newest checkpoint, once one covers the event.
    let deadline = Instant::now() + Duration::from_secs(args.wait);
    let note = loop {
        let note = get_text(&client, "/v1/checkpoint")?;
        if unverified_size(&note)? >= seq {
            break note;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no checkpoint covers seq {seq} yet (waited {} s)",
                args.wait
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let size = unverified_size(&note)?;
    let proof: InclusionJson = get_json(
        &client,
        &format!("/v1/proof/inclusion?seq={seq}&size={size}"),
    )?;
    let proof = TlogProof {
        extra: Some(line.into_bytes()),
        index: seq - 1,
        hashes: hashes_from_hex(&proof.hashes)?,
        checkpoint: note,
    };
    print!("{}", proof.render());
    Ok(ExitCode::SUCCESS)
}

/// `cairn verify --proof FILE --key VKEY`: offline.
pub fn verify_file(path: &Path, vkey: &str) -> Result<ExitCode, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match check_proof(&text, vkey) {
        Ok((seq, id, signed)) => {
            println!(
                "ok: event seq {seq} ({id}) is in {} at tree size {}",
                signed.origin, signed.size
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(reason) => {
            eprintln!("cairn: verification FAILED: {reason}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn check_proof(text: &str, vkey: &str) -> Result<(u64, String, Signed), String> {
    let proof = TlogProof::parse(text).map_err(|e| e.to_string())?;
    let signed = checkpoint::open(&proof.checkpoint, vkey).map_err(|e| e.to_string())?;
    let line = proof
        .extra
        .as_deref()
        .ok_or("the proof carries no event (no extra line)")?;
    let info = crate::chain::inspect_line(line).map_err(|e| format!("the event: {e}"))?;
    if info.computed_hash != info.stated_hash {
        return Err(format!(
            "the event (seq {}) does not match its own hash",
            info.seq
        ));
    }
    if info.seq.checked_sub(1) != Some(proof.index) {
        return Err(format!(
            "the proof is for index {}, the event has seq {}",
            proof.index, info.seq
        ));
    }
    merkle::verify_inclusion(
        &proof.hashes,
        proof.index,
        signed.size,
        &merkle::leaf_hash(&info.stated_hash).0,
        &signed.root.0,
    )
    .map_err(|e| e.to_string())?;
    Ok((info.seq, info.id.to_string(), signed))
}

/// `cairn verify --url URL --checkpoint OLD --key VKEY`.
pub fn verify_checkpoint(
    url: &str,
    token: Option<String>,
    path: &Path,
    vkey: &str,
) -> Result<ExitCode, String> {
    let client = Client::new(url, token)?;
    let new_note = get_text(&client, "/v1/checkpoint")?;
    let fail = |reason: String| {
        eprintln!("cairn: verification FAILED: {reason}");
        Ok(ExitCode::FAILURE)
    };
    let new = match checkpoint::open(&new_note, vkey) {
        Ok(n) => n,
        Err(e) => return fail(format!("the server's checkpoint: {e}")),
    };
    let old = match std::fs::read_to_string(path) {
        Ok(text) => match checkpoint::open(&text, vkey) {
            Ok(old) => Some(old),
            Err(e) => return fail(format!("{}: {e}", path.display())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let message = match &old {
        None => format!(
            "ok: no checkpoint at {} yet; saved {}'s checkpoint at size {} (trust on first use)",
            path.display(),
            new.origin,
            new.size
        ),
        Some(old) => {
            if old.origin != new.origin {
                return fail(format!(
                    "the origin changed from {} to {}",
                    old.origin, new.origin
                ));
            }
            if new.size < old.size {
                return fail(format!(
                    "the log shrank: the saved checkpoint has {} events, the server's {}",
                    old.size, new.size
                ));
            }
            let proof = if old.size == 0 || old.size == new.size {
                Vec::new()
            } else {
                let json: ConsistencyJson = get_json(
                    &client,
                    &format!("/v1/proof/consistency?from={}&to={}", old.size, new.size),
                )?;
                hashes_from_hex(&json.hashes)?
            };
            if old.size == new.size && old.root != new.root {
                return fail(format!(
                    "two different roots for size {}: the log was rewritten",
                    new.size
                ));
            }
            if let Err(e) =
                merkle::verify_consistency(&proof, old.size, new.size, &old.root.0, &new.root.0)
            {
                return fail(format!(
                    "the server's checkpoint (size {}) is not consistent with the saved one (size {}): {e}",
                    new.size, old.size
                ));
            }
            if old.size == new.size {
                format!("ok: {} unchanged at {} events", new.origin, new.size)
            } else {
                format!(
                    "ok: {} grew from {} to {} events, consistently",
                    new.origin, old.size, new.size
                )
            }
        }
    };
    checkpoint::write_atomically(path, new.note.as_bytes(), 0o644).map_err(|e| e.to_string())?;
    println!("{message}");
    Ok(ExitCode::SUCCESS)
}
