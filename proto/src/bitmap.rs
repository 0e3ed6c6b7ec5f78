//! A fixed-size bitmap over page indices, safe to share between threads (one bit per page), with
//! conversion to and from the LSB-first bytes of a `Bitmap` message.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page; set/test/claim are lock-free.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    len: u64,
}

impl AtomicBitmap {
    /// All clear, `len` bits.
    pub fn new(len: u64) -> Self {
        let n = len.div_ceil(64) as usize;
        AtomicBitmap {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether bit `i` is set (false past the end).
    #[inline]
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was already set.
    #[inline]
    pub fn set(&self, i: u64) -> bool {
        debug_assert!(i < self.len);
        let m = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(m, Ordering::AcqRel) & m != 0
    }

    /// Clears bit `i`; returns whether it was set.
    #[inline]
    pub fn clear(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let m = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!m, Ordering::AcqRel) & m != 0
    }

    /// Clears every bit set in `bits` (little-endian bytes, bit `i % 8` of byte `i / 8` for bit
    /// `i`; bits past the end ignored); returns how many were set before.
    pub fn clear_bytes(&self, bits: &[u8]) -> u64 {
        let mut cleared = 0;
        for (w, chunk) in bits.chunks(8).enumerate() {
            if w as u64 * 64 >= self.len {
                break;
            }
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            let m = u64::from_le_bytes(b);
            if m == 0 {
                continue;
            }
            let old = self.words[w].fetch_and(!m, Ordering::AcqRel);
            cleared += u64::from((old & m).count_ones());
        }
        cleared
    }

    /// Sets bits `[first, first + count)`; returns how many were newly set.
    pub fn set_range(&self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.len);
        let mut i = first;
        let mut newly = 0;
        while i < end {
            let w = i / 64;
            let lo = i % 64;
            let hi = ((w + 1) * 64).min(end) - w * 64;
            let m = mask(lo, hi);
            let old = self.words[w as usize].fetch_or(m, Ordering::AcqRel);
            newly += u64::from((m & !old).count_ones());
            i = w * 64 + hi;
        }
        newly
    }

    /// Claims up to the clear bits of `[first, first + count)`: sets them and returns, for the
    /// word holding `first`, the mask of bits this call set (bits of the same 64-page word only).
    /// Callers walk a range word by word.
    pub fn claim_word(&self, first: u64, count: u64) -> (u64, u64) {
        let end = first.saturating_add(count).min(self.len);
        if first >= end {
            return (first, 0);
        }
        let w = first / 64;
        let lo = first % 64;
        let hi = ((w + 1) * 64).min(end) - w * 64;
        let m = mask(lo, hi);
        let old = self.words[w as usize].fetch_or(m, Ordering::AcqRel);
        (w * 64, m & !old)
    }

    /// Index of the first clear bit at or after `from`, if any.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let w = self.words[(i / 64) as usize].load(Ordering::Acquire) | mask(0, i % 64);
            if w != u64::MAX {
                let bit = (i / 64) * 64 + u64::from((!w).trailing_zeros());
                return (bit < self.len).then_some(bit);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// The bits as LSB-first bytes (the `Bitmap` message's encoding), `ceil(len / 8)` bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len.div_ceil(8) as usize);
        for w in self.words.iter() {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        out.truncate(self.len.div_ceil(8) as usize);
        out
    }

    /// Sets every bit that is set in `bits` (LSB-first bytes) at offset `first`; bits past the
    /// end are ignored. Returns how many were newly set.
    pub fn merge_bytes(&self, first: u64, bits: &[u8], count: u64) -> u64 {
        let mut newly = 0;
        for (bi, byte) in bits.iter().enumerate() {
            if *byte == 0 {
                continue;
            }
            for b in 0..8u64 {
                let i = bi as u64 * 8 + b;
                if i < count && byte & (1 << b) != 0 {
                    let page = first.saturating_add(i);
                    if page < self.len && !self.set(page) {
                        newly += 1;
                    }
                }
            }
        }
        newly
    }
}

/// Bits `[lo, hi)` of a word.
#[inline]
fn mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_claim_scan() {
        let b = AtomicBitmap::new(200);
        assert!(!b.set(3));
        assert!(b.set(3));
        assert_eq!(b.set_range(60, 10), 10);
        assert_eq!(b.set_range(0, 200), 200 - 11);
        assert_eq!(b.count_ones(), 200);
        assert_eq!(b.next_clear(0), None);
        let b = AtomicBitmap::new(130);
        b.set_range(0, 129);
        assert_eq!(b.next_clear(5), Some(129));
        let (base, m) = b.claim_word(128, 10);
        assert_eq!((base, m), (128, 0b10));
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), 17);
        let c = AtomicBitmap::new(130);
        assert_eq!(c.merge_bytes(0, &bytes, 130), 130);
    }
}
