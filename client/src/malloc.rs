//! Process-wide tuning of glibc's malloc for training, called first thing by the binaries.
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

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_accepts_the_settings() {
        let applied = super::tune_for_training();
        assert_eq!(applied, cfg!(all(target_os = "linux", target_env = "gnu")));
    }
}
