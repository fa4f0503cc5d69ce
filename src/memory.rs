//! What memory this process may still allocate (Linux: `/proc` and `getrlimit`), so that a batch too
//! large for the machine is refused before it starts rather than failing midway.

/// The memory this process may still allocate, and what limits it: the smaller of the memory the
/// system has available and what the address-space limit (`ulimit -v`) leaves. None where unknown.
#[cfg(all(target_os = "linux", feature = "app"))]
pub fn memory_limit() -> Option<(u64, &'static str)> {
    let kib = |text: &str, key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|k| k * 1024)
    };
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| kib(&t, "MemAvailable:"));
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } == 0;
    let address_space = if ok && limit.rlim_cur != libc::RLIM_INFINITY {
        let used = std::fs::read_to_string("/proc/self/status").ok().and_then(|t| kib(&t, "VmSize:")).unwrap_or(0);
        // rlim_t is 32 bits wide on some 32-bit targets.
        #[allow(clippy::unnecessary_cast)]
        let limit = limit.rlim_cur as u64;
        Some(limit.saturating_sub(used))
    } else {
        None
    };
    match (available, address_space) {
        (Some(a), Some(s)) if s < a => Some((s, "the address-space limit (ulimit -v)")),
        (Some(a), _) => Some((a, "the memory available")),
        (None, Some(s)) => Some((s, "the address-space limit (ulimit -v)")),
        (None, None) => None,
    }
}

#[cfg(not(all(target_os = "linux", feature = "app")))]
pub fn memory_limit() -> Option<(u64, &'static str)> {
    None
}
