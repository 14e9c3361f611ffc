//! `cairn export`: the server's `/v1/export`, streamed to stdout.

use std::io::{Read, Write};
use std::process::ExitCode;

use super::Progress;
use crate::cli::ExportArgs;
use crate::client::Client;

pub fn run(args: &ExportArgs) -> Result<ExitCode, String> {
    let client = Client::new(&args.remote.url, args.remote.token.clone())?;
    let since = super::resolve_since(args.filter.since.as_deref().unwrap_or("earliest"));
    let query = super::filter_query(&args.filter, Some(&since), true);
    let mut response = client.get(&format!("/v1/export?{query}"))?;
    super::warn_pruned_before(
        response
            .headers()
            .get(crate::api::PRUNED_BEFORE_HEADER)
            .and_then(|v| v.to_str().ok()),
    );
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, std::io::stdout().lock());
    let mut progress = Progress::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut lines = 0u64;
    loop {
        let n = response
            .read(&mut buf)
            .map_err(|e| format!("the export stream broke off after {lines} events: {e}"))?;
        if n == 0 {
            break;
        }
        lines += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
        out.write_all(&buf[..n])
            .map_err(|e| format!("cannot write stdout: {e}"))?;
        progress.tick(|| format!("exported {lines} events"));
    }
    out.flush()
        .map_err(|e| format!("cannot write stdout: {e}"))?;
    progress.finish();
    eprintln!("exported {lines} events");
    Ok(ExitCode::SUCCESS)
}
