//! Process facts the simulator needs: the open-files limit and resident memory.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Open files (the soft limit) before and after raising it to the hard limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    pub before: Option<u64>,
    pub now: Option<u64>,
    pub hard: Option<u64>,
}

/// Raise this process's soft open-files limit to its hard limit (None: unlimited).
pub fn raise_nofile() -> NofileLimit {
    let cur = getrlimit(Resource::Nofile);
    let mut now = cur.current;
    if cur.current != cur.maximum {
        let want = Rlimit { current: cur.maximum, maximum: cur.maximum };
        if setrlimit(Resource::Nofile, want).is_ok() {
            now = cur.maximum;
        }
    }
    NofileLimit { before: cur.current, now, hard: cur.maximum }
}

/// File descriptors the simulator needs for `devices` devices: one connection each, plus HTTP
/// downloads in flight and a margin for the runtime, logs and files.
pub fn files_needed(devices: usize, downloads: usize) -> u64 {
    devices as u64 + downloads as u64 + 64
}

/// Resident set size of this process (Linux: `/proc/self/status`).
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_memory_are_readable() {
        let l = raise_nofile();
        assert!(l.now.is_none_or(|n| n >= l.before.unwrap_or(0)));
        assert!(rss_bytes().is_some_and(|b| b > 0));
    }
}
