//! A set of guest pages (flat page indices), as every dirty-tracking backend returns it.

/// A set of guest pages, one bit each (flat page indices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    pages: u64,
}

impl PageSet {
    /// An empty set over `pages` pages.
    pub fn new(pages: u64) -> PageSet {
        PageSet {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// Adds page `i` (ignored past the end).
    pub fn insert(&mut self, i: u64) {
        if i < self.pages {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Whether page `i` is in the set.
    pub fn contains(&self, i: u64) -> bool {
        i < self.pages && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Pages the set ranges over.
    pub fn len(&self) -> u64 {
        self.pages
    }

    /// Whether the set ranges over no pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Little-endian bytes, bit `i % 8` of byte `i / 8` for page `i` (`proto` bitmap order).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        b.truncate(self.pages.div_ceil(8) as usize);
        b
    }

    /// Adds every page of `slot_bits` (one bit per page of a slot, KVM's layout), the slot's
    /// first page being flat page `first`.
    pub(super) fn merge_slot(&mut self, first: u64, slot_bits: &[u64]) {
        for (wi, &w) in slot_bits.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = u64::from(w.trailing_zeros());
                self.insert(first + wi as u64 * 64 + b);
                w &= w - 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sets_merge_slots_at_any_offset_and_encode_like_proto_bitmaps() {
        let mut s = PageSet::new(200);
        // a slot starting at flat page 70 (not a multiple of 64) with its pages 0, 63, 64 dirty
        s.merge_slot(70, &[1 | (1 << 63), 1]);
        assert!(s.contains(70) && s.contains(133) && s.contains(134));
        assert_eq!(s.count(), 3);
        s.insert(500); // past the end: ignored
        assert_eq!(s.count(), 3);
        let b = s.to_bytes();
        assert_eq!(b.len(), 25);
        assert_eq!(b[70 / 8], 1 << (70 % 8));
        assert!(proto::bit(&b, 133) && proto::bit(&b, 134) && !proto::bit(&b, 135));
    }
}
