//! Prints VmRSS (from /proc/self/status) and process CPU% every 5 s to stderr.
use std::time::{Duration, Instant};
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    }).unwrap_or(0)
}
fn cpu_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = &s[s.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}
pub fn spawn_reporter() {
    std::thread::spawn(|| {
        let mut last = (Instant::now(), cpu_ticks());
        loop {
            std::thread::sleep(Duration::from_secs(5));
            let now = (Instant::now(), cpu_ticks());
            let cpu = (now.1 - last.1) as f64 / 100.0 / (now.0 - last.0).as_secs_f64() * 100.0;
            eprintln!("STATS rss_kb={} cpu_pct={:.1}", rss_kb(), cpu);
            last = now;
        }
    });
}
