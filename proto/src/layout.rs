//! Memory layout: the regions of guest-physical memory a migration moves, and the flat page index
//! space the wire uses to name pages (regions concatenated in order).

use std::fmt;

use crate::error::HandshakeError;

/// Guest-physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestPhysAddr(pub u64);

/// Index of a page in the flat page space of a [`Layout`] (region 0's pages first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PageIndex(pub u64);

/// One contiguous region of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Guest-physical start.
    pub gpa_start: GuestPhysAddr,
    /// Length in bytes; a multiple of the page size.
    pub len_bytes: u64,
}

/// At most this many regions in a layout (caps what a peer can make us allocate).
pub const MAX_REGIONS: usize = 64;
/// At most this many bytes of memory in a layout (16 TiB).
pub const MAX_LAYOUT_BYTES: u64 = 1 << 44;

/// The memory being moved: regions in order, non-overlapping.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    /// The regions, in page-index order.
    pub regions: Vec<Region>,
}

impl Layout {
    /// A layout of one region at guest-physical 0.
    pub fn single(len_bytes: u64) -> Self {
        Layout {
            regions: vec![Region {
                gpa_start: GuestPhysAddr(0),
                len_bytes,
            }],
        }
    }

    /// Total bytes of all regions.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len_bytes).sum()
    }

    /// Total pages for `page_size`.
    pub fn total_pages(&self, page_size: u32) -> u64 {
        self.total_bytes() / u64::from(page_size)
    }

    /// Checks the layout is usable with `page_size`: non-empty, page-aligned, non-overlapping,
    /// under the caps.
    pub fn validate(&self, page_size: u32) -> Result<(), HandshakeError> {
        check_page_size(page_size)?;
        let ps = u64::from(page_size);
        if self.regions.is_empty() {
            return Err(HandshakeError::InvalidLayout("no regions".into()));
        }
        if self.regions.len() > MAX_REGIONS {
            return Err(HandshakeError::InvalidLayout(format!(
                "{} regions, cap {MAX_REGIONS}",
                self.regions.len()
            )));
        }
        let mut total: u64 = 0;
        for (i, r) in self.regions.iter().enumerate() {
            if r.len_bytes == 0 || r.len_bytes % ps != 0 || r.gpa_start.0 % ps != 0 {
                return Err(HandshakeError::InvalidLayout(format!(
                    "region {i} ({r}) is empty or not aligned to the page size {page_size}"
                )));
            }
            let Some(end) = r.gpa_start.0.checked_add(r.len_bytes) else {
                return Err(HandshakeError::InvalidLayout(format!("region {i} wraps")));
            };
            for (j, o) in self.regions.iter().enumerate().take(i) {
                if r.gpa_start.0 < o.gpa_start.0 + o.len_bytes && o.gpa_start.0 < end {
                    return Err(HandshakeError::InvalidLayout(format!(
                        "region {i} ({r}) overlaps region {j} ({o})"
                    )));
                }
            }
            total = total.saturating_add(r.len_bytes);
        }
        if total > MAX_LAYOUT_BYTES {
            return Err(HandshakeError::InvalidLayout(format!(
                "{total} bytes, cap {MAX_LAYOUT_BYTES}"
            )));
        }
        Ok(())
    }
}

/// Checks a page size: a power of two from 4 KiB to 1 GiB.
pub fn check_page_size(page_size: u32) -> Result<(), HandshakeError> {
    if page_size.is_power_of_two() && (4096..=(1 << 30)).contains(&page_size) {
        Ok(())
    } else {
        Err(HandshakeError::InvalidPageSize(page_size))
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}+{:#x}", self.gpa_start.0, self.len_bytes)
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, r) in self.regions.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{r}")?;
        }
        write!(f, "]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_bad_layouts() {
        assert!(Layout::single(1 << 20).validate(4096).is_ok());
        assert!(Layout::single(0).validate(4096).is_err());
        assert!(Layout::single(4097).validate(4096).is_err());
        assert!(Layout::single(4096).validate(4095).is_err());
        let overlap = Layout {
            regions: vec![
                Region {
                    gpa_start: GuestPhysAddr(0),
                    len_bytes: 8192,
                },
                Region {
                    gpa_start: GuestPhysAddr(4096),
                    len_bytes: 4096,
                },
            ],
        };
        assert!(matches!(
            overlap.validate(4096),
            Err(HandshakeError::InvalidLayout(_))
        ));
    }
}
