//! The client-side commands: each returns the exit code, or a message for stderr.

pub mod append;
pub mod events;
pub mod export;
pub mod token;
pub mod verify;

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
