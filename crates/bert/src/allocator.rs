//! Allocator settings for processes that run the model on the CPU.
//!
//! A BERT forward and backward pass allocates and frees tensors of many megabytes hundreds of
//! times. glibc's malloc serves blocks above its mmap threshold with fresh `mmap`s and returns
//! them with `munmap`, so every such tensor costs page faults, page zeroing and, with worker
//! threads, TLB shootdowns: a fifth of a MiniLM training step in `perf`. Raising the threshold
//! to glibc's maximum and keeping freed memory in the heap lets those blocks be reused.
//! This is process-wide, so the library never does it on its own: binaries opt in.

/// Keeps large freed blocks for reuse (glibc on Linux; a no-op elsewhere). Call once, early in
/// `main`, before threads start. Environment settings (`MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TRIM_THRESHOLD_`) take precedence, so users can still override it.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let overridden = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
            .iter()
            .any(|k| std::env::var_os(k).is_some());
        if !overridden {
            // SAFETY: mallopt only changes malloc's tuning parameters; called before any other
            // thread allocates.
            unsafe {
                // 32 MiB, the most glibc accepts on 64-bit; trimming only past 1 GiB of free heap.
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        }
    }
}
