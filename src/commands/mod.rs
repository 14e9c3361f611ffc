//! The client-side commands: each returns the exit code, or a message for stderr.

pub mod append;
pub mod cluster;
pub mod events;
pub mod export;
pub mod proof;
pub mod prune;
pub mod token;
pub mod verify;
pub mod webhook;

/// A `--since` value for the API: durations (`30s`, `15m`, `2h`, `7d`) become the
/// RFC 3339 time that long before now; anything else is passed on as given.
pub fn resolve_since(text: &str) -> String {
    since_duration(text).unwrap_or_else(|| text.to_string())
}

fn since_duration(text: &str) -> Option<String> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .ok()?
        .as_millis() as u64;
    Some(crate::rfc3339::format_unix_ms(
        now_ms.saturating_sub(secs.saturating_mul(1000)),
    ))
}

/// `since=…&until=…&types=…&source=…` for the API (`since` only when given).
pub fn filter_query(
    filter: &crate::cli::FilterArgs,
    since: Option<&str>,
    with_until: bool,
) -> String {
    let mut pairs = Vec::new();
    if let Some(s) = since {
        pairs.push(("since", s));
    }
    let until = filter.until.as_ref().filter(|_| with_until);
    for (name, value) in [
        ("until", until),
        ("types", filter.types.as_ref()),
        ("source", filter.source.as_ref()),
    ] {
        if let Some(v) = value {
            pairs.push((name, v.as_str()));
        }
    }
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

/// Warns on stderr when a read started before the retention horizon (`id`, the first
/// retained event, from an export's header or a stream's `connected` frame).
pub fn warn_pruned_before(id: Option<&str>) {
    if let Some(id) = id {
        eprintln!(
            "cairn: warning: events before {id} were pruned by retention; continuing from there"
        );
    }
}

/// Reports progress on stderr at most once a second, and only to a terminal.
pub struct Progress {
    enabled: bool,
    last: std::time::Instant,
}

impl Progress {
    pub fn new() -> Progress {
        use std::io::IsTerminal;
        Progress {
            enabled: std::io::stderr().is_terminal(),
            last: std::time::Instant::now(),
        }
    }

    pub fn tick(&mut self, what: impl FnOnce() -> String) {
        if self.enabled && self.last.elapsed().as_secs() >= 1 {
            self.last = std::time::Instant::now();
            eprint!("\r{}", what());
        }
    }

    pub fn finish(&self) {
        if self.enabled {
            eprint!("\r\x1b[K");
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}
