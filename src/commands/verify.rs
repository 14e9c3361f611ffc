//! `cairn verify`: re-derive the chain from an export file, a server's export, or a
//! stopped server's data directory, with the same `chain::Verifier` the server uses.
//! Export lines may be in any JSON form (`chain::inspect_any_form`); a note on stderr
//! says how many were not in the served form.

use std::io::BufRead;
use std::process::ExitCode;

use super::Progress;
use crate::chain::{ChainBreak, LineForm, Verifier, inspect_any_form};
use crate::cli::VerifyArgs;
use crate::client::Client;
use crate::store::{DataDir, Store};

fn parse_hash(flag: &str, text: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).map_err(|_| format!("{flag} must be 64 hex digits"))?;
    Ok(out)
}

pub fn run(args: &VerifyArgs) -> Result<ExitCode, String> {
    if let (Some(path), Some(key)) = (&args.proof, &args.key) {
        return super::proof::verify_file(path, key);
    }
    if let (Some(path), Some(url), Some(key)) = (&args.checkpoint, &args.url, &args.key)
        && args.file.is_none()
        && args.data.is_none()
    {
        return super::proof::verify_checkpoint(url, args.token.clone(), path, key);
    }
    let mut verifier = Verifier::new();
    if let Some(prev) = &args.expect_prev {
        verifier = verifier.expect_prev(parse_hash("--expect-prev", prev)?);
    }
    let expect_head = args
        .expect_head
        .as_deref()
        .map(|h| parse_hash("--expect-head", h))
        .transpose()?;
    let mut progress = Progress::new();

    let mut reserialized = 0;
    let outcome = if let Some(path) = &args.file {
        if path.as_os_str() == "-" {
            verify_lines(
                std::io::stdin().lock(),
                &mut verifier,
                &mut reserialized,
                &mut progress,
            )?
        } else {
            let file = std::fs::File::open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            verify_lines(
                std::io::BufReader::with_capacity(1 << 20, file),
                &mut verifier,
                &mut reserialized,
                &mut progress,
            )?
        }
    } else if let Some(dir) = &args.data {
        let store = Store::open(DataDir::lock_existing(dir).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let horizon = store.horizon();
        if let Some(id) = horizon.last_pruned_id {
            // From the horizon: its prev_hash must link to the last pruned event.
            eprintln!(
                "cairn: events 1..={} were pruned; checking the chain from seq {}",
                horizon.pruned_through,
                horizon.first_seq()
            );
            if args.expect_prev.is_none() {
                verifier = Verifier::after(horizon.pruned_through, id, horizon.last_pruned_hash);
            }
        }
        verify_store(&store, &mut verifier, &mut progress)?
    } else if let Some(url) = &args.url {
        let client = Client::new(url, args.token.clone())?;
        let head: serde_json::Value = client
            .get("/v1/head")?
            .json()
            .map_err(|e| format!("/v1/head: {e}"))?;
        let first_seq = head["data"]["first_seq"].as_u64().unwrap_or(0);
        if first_seq > 1 {
            eprintln!(
                "cairn: events before seq {first_seq} were pruned; checking the chain from there"
            );
        }
        let response = client.get("/v1/export?since=earliest")?;
        verify_lines(
            std::io::BufReader::with_capacity(1 << 20, response),
            &mut verifier,
            &mut reserialized,
            &mut progress,
        )?
    } else {
        return Err("give --file, --url or --data".into());
    };
    progress.finish();
    if reserialized > 0 {
        eprintln!(
            "cairn: note: {reserialized} of {} lines were not in the served form \
             (re-serialized JSON); verified them after canonicalizing",
            verifier.checked()
        );
    }

    if let Err(b) = outcome {
        eprintln!("cairn: verification FAILED: {b}");
        return Ok(ExitCode::FAILURE);
    }
    match (verifier.last(), expect_head) {
        (Some((seq, hash)), Some(expected)) if hash != expected => {
            eprintln!(
                "cairn: verification FAILED: the last event (seq {seq}) has hash {}, expected {}",
                hex::encode(hash),
                hex::encode(expected)
            );
            Ok(ExitCode::FAILURE)
        }
        (None, Some(expected)) if expected != crate::chain::ZERO_HASH => {
            eprintln!(
                "cairn: verification FAILED: no events, but --expect-head names a non-empty log"
            );
            Ok(ExitCode::FAILURE)
        }
        (last, _) => {
            match last {
                Some((seq, hash)) => println!(
                    "ok: {} events verified, last seq {seq}, head hash {}",
                    verifier.checked(),
                    hex::encode(hash)
                ),
                None => println!("ok: no events"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Lines are read in blocks; each block's lines are parsed and hashed in parallel, then
/// linked in order. Lines split on `\n` only (JCS leaves U+2028/U+2029 raw in strings).
/// `reserialized` counts the verified lines that were not in the served form.
fn verify_lines(
    mut reader: impl BufRead,
    verifier: &mut Verifier,
    reserialized: &mut u64,
    progress: &mut Progress,
) -> Result<Result<(), ChainBreak>, String> {
    use rayon::prelude::*;
    const BLOCK_BYTES: usize = 4 << 20;
    let mut block: Vec<u8> = Vec::with_capacity(BLOCK_BYTES + 64 * 1024);
    loop {
        let mut eof = false;
        while block.len() < BLOCK_BYTES {
            let n = reader
                .read_until(b'\n', &mut block)
                .map_err(|e| format!("read failed after {} events: {e}", verifier.checked()))?;
            if n == 0 {
                eof = true;
                break;
            }
        }
        let body = block.strip_suffix(b"\n").unwrap_or(&block);
        if !block.is_empty() {
            let lines = lines_of(body);
            let inspected: Vec<_> = lines
                .par_iter()
                .map(|line| inspect_any_form(line))
                .collect();
            for result in inspected {
                let form = result.as_ref().ok().map(|(_, form)| *form);
                if let Err(b) = verifier.push_inspected(result.map(|(info, _)| info)) {
                    return Ok(Err(b));
                }
                if form == Some(LineForm::Reserialized) {
                    *reserialized += 1;
                }
            }
            progress.tick(|| format!("verified {} events", verifier.checked()));
        }
        if eof {
            return Ok(Ok(()));
        }
        block.clear();
    }
}

/// `body` split at every `\n`, as `split` would. With memchr: this runs on one thread
/// while the pool waits, and a byte-at-a-time `split` was a tenth of `verify --file`.
fn lines_of(body: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::with_capacity(body.len() / 256 + 1);
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', body) {
        lines.push(&body[start..end]);
        start = end + 1;
    }
    lines.push(&body[start..]);
    lines
}

fn verify_store(
    store: &Store,
    verifier: &mut Verifier,
    progress: &mut Progress,
) -> Result<Result<(), ChainBreak>, String> {
    for event in store.scan_from_seq(1).map_err(|e| e.to_string())? {
        let event = event.map_err(|e| e.to_string())?;
        if let Err(b) = verifier.push(event.line.as_bytes()) {
            return Ok(Err(b));
        }
        progress.tick(|| format!("verified {} events", verifier.checked()));
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::lines_of;

    #[test]
    fn lines_are_split_as_split_splits_them() {
        for body in [
            &b""[..],
            b"a",
            b"\n",
            b"a\nb",
            b"a\n\nb",
            b"\na\n",
            b"a\n\n",
            b"{\"x\":\"\xe2\x80\xa8\"}\n{}",
        ] {
            let expected: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
            assert_eq!(lines_of(body), expected, "{body:?}");
        }
    }
}
