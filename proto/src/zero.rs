//! Zero-page detection: a page that is all zero travels as a `Zero` frame, not as data.

/// Whether a page is all zero. Data pages usually differ in their first bytes and return at
/// once; zero pages are scanned 64 bytes per step with no branch inside a step (vectorizes).
#[inline]
pub fn is_zero_page(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to handles the unaligned ends.
    let (pre, mid, post) = unsafe { page.align_to::<u64>() };
    if pre.iter().chain(post).any(|&b| b != 0) {
        return false;
    }
    let mut chunks = mid.chunks_exact(8);
    for c in &mut chunks {
        if c.iter().fold(0u64, |a, &w| a | w) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&w| w == 0)
}
