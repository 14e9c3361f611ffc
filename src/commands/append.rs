//! `cairn append`: one event from flags, or NDJSON from stdin sent in requests of at
//! most `--batch` events (each request atomic). Prints the new ids on stdout.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use crate::cli::AppendArgs;
use crate::client::Client;

/// Keeps each request well under the server's default 16 MiB body limit.
const MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;

pub fn run(args: &AppendArgs) -> Result<ExitCode, String> {
    let client = Client::new(&args.remote.url, args.remote.token.clone())?;
    let mut out = std::io::stdout().lock();
    if let Some(event_type) = &args.event_type {
        let mut event = serde_json::Map::new();
        event.insert("type".into(), event_type.clone().into());
        if let Some(data) = &args.data {
            let data: serde_json::Value =
                serde_json::from_str(data).map_err(|e| format!("--data is not valid JSON: {e}"))?;
            event.insert("data".into(), data);
        }
        if let Some(source) = &args.source {
            event.insert("source".into(), source.clone().into());
        }
        if let Some(ts) = &args.timestamp {
            event.insert("timestamp".into(), ts.clone().into());
        }
        let body = serde_json::to_vec(&event).map_err(|e| e.to_string())?;
        let response = client.post("/v1/events", "application/json", body)?;
        print_ids(&mut out, &response)?;
        return Ok(ExitCode::SUCCESS);
    }

    let stdin = std::io::stdin().lock();
    let mut batch = Vec::new();
    let mut batch_events = 0usize;
    let mut first_line = 1usize;
    let mut appended = 0u64;
    for (i, line) in stdin.split(b'\n').enumerate() {
        let line = line.map_err(|e| format!("cannot read stdin: {e}"))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if batch_events == args.batch.max(1) || batch.len() + line.len() > MAX_REQUEST_BYTES {
            appended += send(&client, &mut out, &mut batch, first_line, i, appended)?;
            batch_events = 0;
            first_line = i + 1;
        }
        batch.extend_from_slice(&line);
        batch.push(b'\n');
        batch_events += 1;
    }
    if batch_events > 0 {
        appended += send(
            &client,
            &mut out,
            &mut batch,
            first_line,
            usize::MAX,
            appended,
        )?;
    }
    eprintln!("appended {appended} events");
    Ok(ExitCode::SUCCESS)
}

fn send(
    client: &Client,
    out: &mut impl Write,
    batch: &mut Vec<u8>,
    first_line: usize,
    last_line: usize,
    appended_before: u64,
) -> Result<u64, String> {
    let body = std::mem::take(batch);
    let response = client.post("/v1/events", "application/x-ndjson", body).map_err(|e| {
        let lines = if last_line == usize::MAX {
            format!("lines {first_line}–end")
        } else {
            format!("lines {first_line}–{last_line}")
        };
        format!("{appended_before} events were appended before the request with stdin {lines} failed:\n{e}")
    })?;
    print_ids(out, &response)
}

fn print_ids(out: &mut impl Write, response: &serde_json::Value) -> Result<u64, String> {
    let ids = response["data"]["ids"]
        .as_array()
        .ok_or("the server's response has no ids")?;
    for id in ids {
        writeln!(out, "{}", id.as_str().unwrap_or_default()).map_err(|e| e.to_string())?;
    }
    Ok(ids.len() as u64)
}
