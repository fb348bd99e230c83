//! Cache hints for the hot loops: fetch a line that a later iteration will touch, so several
//! cache (and TLB) misses are in flight at once instead of one after the other.

/// Asks the CPU to bring the cache line holding `*r` into cache, without waiting for it (a
/// no-op where there is no prefetch instruction).
#[inline(always)]
pub(crate) fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, reads no value and writes nothing; `r` is a valid
    // reference anyway. SSE is part of the x86_64 baseline, so the instruction always exists.
    #[allow(unsafe_code)]
    unsafe {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((r as *const T).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}
