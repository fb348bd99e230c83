//! Process metrics under the standard Prometheus names (those of the official clients'
//! process collectors), read from `/proc/self` on Linux. Elsewhere they stay absent.

/// (name, kind is counter, help) of each family this module sets.
pub(super) const FAMILIES: &[(&str, bool, &str)] = &[
    (
        "process_cpu_seconds_total",
        true,
        "User and system CPU time spent, in whole seconds.",
    ),
    (
        "process_resident_memory_bytes",
        false,
        "Resident memory size.",
    ),
    (
        "process_virtual_memory_bytes",
        false,
        "Virtual memory size.",
    ),
    ("process_open_fds", false, "Open file descriptors."),
    (
        "process_max_fds",
        false,
        "Limit of open file descriptors (RLIMIT_NOFILE).",
    ),
    ("process_threads", false, "OS threads of the process."),
    (
        "process_start_time_seconds",
        false,
        "Start time of the process, in unix seconds.",
    ),
];

pub(super) fn describe() {
    for (name, counter, help) in FAMILIES {
        if *counter {
            metrics::describe_counter!(*name, *help);
        } else {
            metrics::describe_gauge!(*name, *help);
        }
    }
}

/// What `/proc/self` says now.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Sample {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub threads: u64,
    pub start_time: f64,
}

/// Reads the sample; `None` where `/proc` is missing (not Linux).
pub(super) fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let ticks = clock_ticks();
    let page = page_size();
    let mut s = parse_stat(&stat, ticks, page)?;
    s.open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    s.max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| parse_max_fds(&l));
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    s.start_time += boot;
    Some(s)
}

/// Sets the gauges and the counter from a fresh sample.
pub(super) fn record() {
    let Some(s) = sample() else { return };
    metrics::counter!("process_cpu_seconds_total").absolute(s.cpu_seconds as u64);
    metrics::gauge!("process_resident_memory_bytes").set(s.resident_bytes as f64);
    metrics::gauge!("process_virtual_memory_bytes").set(s.virtual_bytes as f64);
    metrics::gauge!("process_open_fds").set(s.open_fds as f64);
    if let Some(m) = s.max_fds {
        metrics::gauge!("process_max_fds").set(m as f64);
    }
    metrics::gauge!("process_threads").set(s.threads as f64);
    metrics::gauge!("process_start_time_seconds").set(s.start_time);
}

// One of the workspace's two allowed unsafe calls (see Cargo.toml): libc::sysconf, a read-only
// query.
#[allow(unsafe_code)]
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

#[allow(unsafe_code)]
fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Parses `/proc/self/stat` (see proc(5)); `start_time` is relative to boot.
fn parse_stat(stat: &str, ticks: f64, page: u64) -> Option<Sample> {
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field n is fields[n - 3].
    let num = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(Sample {
        cpu_seconds: (num(14)? + num(15)?) as f64 / ticks,
        threads: num(20)?,
        start_time: num(22)? as f64 / ticks,
        virtual_bytes: num(23)?,
        resident_bytes: num(24)? * page,
        ..Sample::default()
    })
}

fn parse_max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    fn now() -> f64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }

    #[test]
    fn parses_proc_stat_with_a_strange_command_name() {
        let stat = "4242 (user seg) (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 150 0 0 20 0 7 0 12345 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(stat, 100.0, 4096).unwrap();
        assert_eq!(s.cpu_seconds, 4.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_time, 123.45);
        assert_eq!(s.virtual_bytes, 104_857_600);
        assert_eq!(s.resident_bytes, 2560 * 4096);
    }

    #[test]
    fn parses_the_open_files_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(1024));
    }

    #[test]
    fn samples_this_process() {
        let s = sample().expect("/proc/self is readable on Linux");
        // stdin, stdout, stderr and the directory being read, at least.
        assert!(s.open_fds >= 4, "{s:?}");
        assert!(s.max_fds.is_some_and(|m| m >= s.open_fds), "{s:?}");
        assert!(s.resident_bytes > 1 << 20, "{s:?}");
        assert!(s.threads >= 1);
        assert!(s.start_time > 1.0e9 && s.start_time <= now() + 1.0, "{s:?}");
    }
}
