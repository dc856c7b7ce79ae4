//! What `/proc` says about a process under test: open file descriptors and memory.

/// Open file descriptors of process `pid`; panics if `/proc/PID/fd` cannot be read.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

/// The value of `field` (such as `"Threads:"`) in `/proc/PID/status`, trimmed; `None` if absent.
pub fn status_field(pid: u32, field: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
}

/// Resident memory of process `pid` in bytes (`VmRSS`); `None` if unknown.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}
