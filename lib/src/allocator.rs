//! glibc's malloc set for libtorch on a CPU. A training step or a decode step frees
//! and allocates the same few hundred megabytes of tensors every time; by default
//! glibc returns freed memory at the top of its heaps to the system, and serves
//! large blocks straight from `mmap`, so each step faults in fresh pages that the
//! kernel must zero first (13% of an f32 fit step under `perf`, in `clear_page`).
//! Kept instead, the pages are reused. Only glibc on Linux; a user's own `MALLOC_*`
//! or `GLIBC_TUNABLES` settings win.

/// The settings, as glibc's environment variables name them: blocks up to 32 MiB
/// (glibc's ceiling for this threshold) come from the heap, a heap keeps up to
/// 1 GiB free at its top, and grows 256 MiB at a time. The benchmarks give their
/// peers the same environment.
pub const ENV: [(&str, &str); 3] = [
    ("MALLOC_MMAP_THRESHOLD_", "33554432"),
    ("MALLOC_TRIM_THRESHOLD_", "1073741824"),
    ("MALLOC_TOP_PAD_", "268435456"),
];

/// Whether [`tune`] applies [`ENV`]: unless the environment sets glibc's malloc
/// itself (one of ENV's variables, or a `glibc.malloc.` tunable).
pub fn applies() -> bool {
    let own = |name: &str| std::env::var_os(name).is_some();
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    !tunables.contains("glibc.malloc.") && !ENV.iter().any(|(name, _)| own(name))
}

/// Applies [`ENV`] to this process where [`applies`] says so. Call it before the
/// first model loads.
pub fn tune() {
    if !applies() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::apply();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::ffi::c_int;

    // malloc.h
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_TOP_PAD: c_int = -2;
    const M_MMAP_THRESHOLD: c_int = -3;

    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }

    pub fn apply() {
        for (param, (_, value)) in [M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD]
            .into_iter()
            .zip(super::ENV)
        {
            let value: c_int = value.parse().expect("ENV holds numbers that fit an int");
            // SAFETY: mallopt takes any parameter and value and reports failure by
            // returning 0; it only changes the allocator's thresholds.
            unsafe { mallopt(param, value) };
        }
    }
}
