//! `cairn events`: events as NDJSON on stdout, from a cursor.
//!
//! Without `--follow` it reads `/v1/export` to the end. With `--follow` it reads the SSE
//! stream and reconnects by itself with `Last-Event-ID` (backoff with jitter), so a
//! dropped connection never loses or repeats an event. With `--cursor-file`, stdout is
//! flushed and then the last delivered id is written back atomically (temp file +
//! rename) after each batch and when SIGINT/SIGTERM stops the run, so a cron job picks
//! up exactly where the last run ended.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;

use crate::cli::EventsArgs;
use crate::cursor;

const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub fn run(args: &EventsArgs) -> Result<ExitCode, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(run_async(args))
}

fn read_cursor_file(path: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let id = text.trim();
            if id.is_empty() {
                return Ok(None);
            }
            cursor::parse_ulid(id)
                .map(|_| Some(id.to_string()))
                .ok_or_else(|| format!("{} does not hold an event id: {id:?}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes `id` to `path` atomically: a reader sees the old or the new id, never half.
fn write_cursor_file(path: &Path, id: &str) -> Result<(), String> {
    let tmp: PathBuf = {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        path.with_file_name(name)
    };
    std::fs::write(&tmp, format!("{id}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The start position as a `since` value, or `None` for "the current head".
fn start(args: &EventsArgs) -> Result<Option<String>, String> {
    if let Some(path) = &args.cursor_file
        && let Some(id) = read_cursor_file(path)?
    {
        return Ok(Some(id));
    }
    match args.filter.since.as_deref() {
        None if args.follow => Ok(None),
        None => Ok(Some("earliest".into())),
        Some(s) => Ok(Some(super::resolve_since(s))),
    }
}

#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow)]
    id: &'a str,
}

/// Delivered events go to stdout; the cursor follows them.
struct Output {
    out: std::io::BufWriter<std::io::Stdout>,
    cursor_file: Option<PathBuf>,
    /// The id delivery continues after (the last event, or the stream's start cursor).
    last_id: Option<String>,
    written_id: Option<String>,
    delivered: u64,
}

impl Output {
    fn event(&mut self, id: &str, line: &[u8]) -> Result<(), String> {
        self.out
            .write_all(line)
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(|e| format!("cannot write stdout: {e}"))?;
        self.delivered += 1;
        self.last_id = Some(id.to_string());
        Ok(())
    }

    /// Ends a batch: flush stdout, then write the cursor back (so the file never runs
    /// ahead of what was printed).
    fn batch_done(&mut self) -> Result<(), String> {
        self.out
            .flush()
            .map_err(|e| format!("cannot write stdout: {e}"))?;
        if let (Some(path), Some(id)) = (&self.cursor_file, &self.last_id)
            && self.written_id.as_ref() != Some(id)
        {
            write_cursor_file(path, id)?;
            self.written_id = Some(id.clone());
        }
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM: the run then stops between two complete events and
/// still flushes stdout and writes the cursor.
async fn stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

async fn run_async(args: &EventsArgs) -> Result<ExitCode, String> {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("cannot create an HTTP client: {e}"))?;
    let base = args.remote.url.trim_end_matches('/').to_string();
    let mut output = Output {
        out: std::io::BufWriter::with_capacity(256 * 1024, std::io::stdout()),
        cursor_file: args.cursor_file.clone(),
        last_id: None,
        written_id: None,
        delivered: 0,
    };
    let since = start(args)?;
    // Output::event never awaits, so a signal only ever lands between complete events.
    let result = tokio::select! {
        r = async {
            if args.follow {
                follow(&http, &base, args, since, &mut output).await
            } else {
                backfill(&http, &base, args, since.as_deref(), &mut output).await
            }
        } => r,
        () = stop_signal() => Ok(()),
    };
    let flushed = output.batch_done();
    eprintln!("{} events", output.delivered);
    result.and(flushed).map(|()| ExitCode::SUCCESS)
}

fn authorized(args: &EventsArgs, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match &args.remote.token {
        Some(t) => r.bearer_auth(t),
        None => r,
    }
}

async fn error_of(response: reqwest::Response, url: &str) -> String {
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    format!(
        "{url}: {status}: {}",
        body["error"].as_str().unwrap_or("(no error message)")
    )
}

/// Reads `/v1/export` to its end.
async fn backfill(
    http: &reqwest::Client,
    base: &str,
    args: &EventsArgs,
    since: Option<&str>,
    output: &mut Output,
) -> Result<(), String> {
    let url = format!(
        "{base}/v1/export?{}",
        super::filter_query(&args.filter, since, true)
    );
    let response = authorized(args, http.get(&url))
        .send()
        .await
        .map_err(|e| format!("cannot reach {base}: {e}"))?;
    if !response.status().is_success() {
        return Err(error_of(response, &url).await);
    }
    super::warn_pruned_before(
        response
            .headers()
            .get(crate::api::PRUNED_BEFORE_HEADER)
            .and_then(|v| v.to_str().ok()),
    );
    let mut body = response.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| {
            format!(
                "the export broke off after {} events: {e}",
                output.delivered
            )
        })?;
        pending.extend_from_slice(&piece);
        let complete = match memchr::memrchr(b'\n', &pending) {
            Some(end) => end + 1,
            None => continue,
        };
        for line in pending[..complete].split(|&b| b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let id = serde_json::from_slice::<IdOnly<'_>>(line)
                .map_err(|e| format!("the server sent a line that is not an event: {e}"))?
                .id
                .to_string();
            output.event(&id, line)?;
        }
        pending.drain(..complete);
        output.batch_done()?;
    }
    if !pending.is_empty() {
        return Err("the export ended in the middle of a line".into());
    }
    Ok(())
}

/// Streams forever, reconnecting from the last id.
async fn follow(
    http: &reqwest::Client,
    base: &str,
    args: &EventsArgs,
    since: Option<String>,
    output: &mut Output,
) -> Result<(), String> {
    let until = args
        .filter
        .until
        .as_deref()
        .map(|u| cursor::parse_until(u).map_err(|m| format!("--until {m}")))
        .transpose()?;
    let mut backoff = Duration::from_millis(250);
    loop {
        let url = format!(
            "{base}/v1/events/stream?{}",
            super::filter_query(&args.filter, since.as_deref(), false)
        );
        let mut request = authorized(args, http.get(&url));
        if let Some(id) = &output.last_id {
            request = request.header("Last-Event-ID", id);
        }
        let outcome = match request.send().await {
            Ok(r) if r.status().is_success() => read_stream(r, output, until, &mut backoff).await,
            Ok(r) if r.status().is_client_error() => {
                // Bad token, bad filter: retrying cannot help.
                return Err(error_of(r, &url).await);
            }
            Ok(r) => Err(error_of(r, &url).await),
            Err(e) => Err(format!("cannot reach {base}: {e}")),
        };
        match outcome {
            Ok(true) => return Ok(()), // reached --until
            Ok(false) => eprintln!("stream ended; reconnecting"),
            Err(e) => eprintln!("{e}; reconnecting in {backoff:?}"),
        }
        output.batch_done()?;
        let jitter = backoff.mul_f64(rand::random::<f64>() * 0.5);
        tokio::time::sleep(backoff / 2 + jitter).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Reads one connection's frames; `Ok(true)` once an event at or past `until` arrives.
async fn read_stream(
    response: reqwest::Response,
    output: &mut Output,
    until: Option<ulid::Ulid>,
    backoff: &mut Duration,
) -> Result<bool, String> {
    use eventsource_stream::Eventsource;
    let mut frames = response.bytes_stream().eventsource();
    loop {
        // Flush when no more frames are buffered: that is the end of a batch.
        let frame = match futures_util::FutureExt::now_or_never(frames.next()) {
            Some(frame) => frame,
            None => {
                output.batch_done()?;
                frames.next().await
            }
        };
        let Some(frame) = frame else {
            return Ok(false);
        };
        let frame = frame.map_err(|e| format!("stream error: {e}"))?;
        *backoff = Duration::from_millis(250);
        if frame.event == "connected" {
            if let Ok(connected) = serde_json::from_str::<serde_json::Value>(&frame.data) {
                super::warn_pruned_before(connected["pruned_before"].as_str());
            }
            // The start cursor: resuming from it loses nothing even before any event.
            // (`id:`-only frames are not dispatched by SSE parsers; without them a
            // reconnect merely rescans events the filter passed over.)
            output.last_id = Some(frame.id);
            continue;
        }
        if let (Some(until), Some(id)) = (until, cursor::parse_ulid(&frame.id))
            && id >= until
        {
            return Ok(true);
        }
        output.event(&frame.id, frame.data.as_bytes())?;
    }
}
