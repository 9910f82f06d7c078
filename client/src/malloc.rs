//! Process-wide tuning of glibc's malloc for training, called first thing by the binaries, and the
//! process's peak resident memory ([`peak_rss_mib`]) that the binaries and benchmarks report.
//!
//! A training step frees and reallocates ~100 activation tensors of up to 12 MB. glibc serves
//! blocks above its (adaptive) mmap threshold with fresh `mmap`s and returns freed heap to the
//! system past its trim threshold, so every step page-faults its activations in again: on the dev
//! machine `time` of the step bench's breakdown table showed 13 s of system time in 40 s. Keeping freed memory in the heap costs no
//! peak memory (the peak is the same blocks): the system time of a process training 6 LoRA steps
//! fell from 2.2–2.5 s to 0.6–1.0 s in alternating runs (`FEDPOOL_BENCH_CHILD=lora:Fused
//! FEDPOOL_BENCH_ITERS=4` on the step bench's binary, `FEDPOOL_BENCH_GLIBC_DEFAULTS=1` for the
//! defaults; README). Elsewhere (musl, macOS) this does nothing.

/// Blocks up to this size come from the heap (32 MiB: glibc's largest mmap threshold).
pub const MMAP_THRESHOLD: i32 = 32 << 20;

/// Keeps freed heap memory for reuse instead of returning it to the system after each step, and
/// serves blocks of up to [`MMAP_THRESHOLD`] from the heap. Returns false where it does not apply.
pub fn tune_for_training() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters (glibc takes its own lock); no pointers.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The peak resident set of this process (Linux's `VmHWM`), in MiB; `None` where
/// `/proc/self/status` does not say (other systems).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_accepts_the_settings() {
        let applied = super::tune_for_training();
        assert_eq!(applied, cfg!(all(target_os = "linux", target_env = "gnu")));
    }

    #[test]
    fn the_peak_covers_what_was_touched() {
        if !cfg!(target_os = "linux") {
            return assert!(super::peak_rss_mib().is_none());
        }
        let before = super::peak_rss_mib().expect("VmHWM on Linux");
        let block = vec![1u8; 64 << 20];
        let after = super::peak_rss_mib().expect("VmHWM on Linux");
        // Other tests share the process, so only bounds hold: never lower, at least the block.
        assert!(after >= before && after >= 64.0 && block.iter().all(|&b| b == 1), "{before} → {after}");
    }
}
