//! Guest RAM: its layout around the PCI hole, the host mappings (vm-memory,
//! private anonymous, MAP_NORESERVE, so the pager can register them with
//! userfaultfd), and whole-RAM operations (checksum, save, load).
//!
//! The memory file of a snapshot is the RAM regions concatenated in
//! guest-physical order; the flat page index of `proto` (regions
//! concatenated) therefore addresses it directly, which is how
//! `page-server --serve FILE` can serve it without knowing the hole.
//!
//! `madvise` goes through `nix::sys::mman`; `mincore` (resident bytes) stays on `libc`, which
//! nix does not wrap.

use std::ffi::c_void;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::ptr::NonNull;

use nix::sys::mman::{madvise, MmapAdvise};
use proto::{GuestPhysAddr, Layout, Region};
use thiserror::Error;

use crate::persist::Persist;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Start of the PCI hole (MMIO: IOAPIC, LAPIC, ...): RAM beyond 3 GiB moves above 4 GiB.
pub const PCI_HOLE_START: u64 = 3 << 30;
/// End of the PCI hole.
pub const PCI_HOLE_END: u64 = 4 << 30;
/// Page size of guest RAM.
pub const PAGE_SIZE: u32 = 4096;

/// Guest RAM failed.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The size is not a positive multiple of 2 MiB.
    #[error("guest memory size {bytes} bytes is not a positive multiple of 2 MiB")]
    BadSize {
        /// Requested bytes.
        bytes: u64,
    },
    /// vm-memory could not map it.
    #[error("cannot map {bytes} bytes of guest memory")]
    Map {
        /// Requested bytes.
        bytes: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// Reading or writing a memory file.
    #[error("{what} memory file {path}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The memory file is not the size of guest RAM.
    #[error("memory file {path} has {file_bytes} bytes, guest RAM has {ram_bytes}")]
    FileSize {
        /// The file.
        path: String,
        /// Its size.
        file_bytes: u64,
        /// RAM size.
        ram_bytes: u64,
    },
    /// A saved layout this VMM would not build for the same size.
    #[error("invalid state: RAM layout {saved:?} differs from this vmm's {here:?}")]
    LayoutDiffers {
        /// Saved `(gpa, bytes)` ranges.
        saved: Vec<(u64, u64)>,
        /// This VMM's for the same size.
        here: Vec<(u64, u64)>,
    },
    /// A guest-physical range outside RAM.
    #[error("{len} bytes at guest-physical {gpa:#x} are not (all) in guest RAM")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: usize,
    },
}

/// Guest-physical RAM ranges `(gpa, bytes)` for `bytes` of RAM.
pub fn ram_ranges(bytes: u64) -> Result<Vec<(u64, u64)>, MemoryError> {
    if bytes == 0 || !bytes.is_multiple_of(2 << 20) {
        return Err(MemoryError::BadSize { bytes });
    }
    if bytes <= PCI_HOLE_START {
        Ok(vec![(0, bytes)])
    } else {
        Ok(vec![
            (0, PCI_HOLE_START),
            (PCI_HOLE_END, bytes - PCI_HOLE_START),
        ])
    }
}

/// What a snapshot keeps of guest RAM is its layout, the `(gpa, bytes)` ranges (its contents go
/// to the memory file, or are served by the page-server); restoring maps zeroed RAM of the
/// same size and refuses a layout this VMM would not build for it.
impl Persist for GuestRam {
    type State = Vec<(u64, u64)>;
    /// RAM bytes.
    type Args = u64;
    type Error = MemoryError;

    fn save(&self) -> Result<Vec<(u64, u64)>, MemoryError> {
        Ok(self.ranges.clone())
    }

    fn restore(bytes: u64, saved: &Vec<(u64, u64)>) -> Result<GuestRam, MemoryError> {
        let here = ram_ranges(bytes)?;
        if &here != saved {
            return Err(MemoryError::LayoutDiffers {
                saved: saved.clone(),
                here,
            });
        }
        GuestRam::new(bytes)
    }
}

/// The guest's RAM. Clones share the mapping (unmapped with the last clone) and the record of
/// VMM writes: device emulation holds one.
#[derive(Debug, Clone)]
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    ranges: Vec<(u64, u64)>,
    /// Pages this VMM wrote through [`GuestRam::write_bytes`] (device emulation): KVM's dirty
    /// log does not see them, so dirty tracking adds them.
    vmm_dirty: std::sync::Arc<proto::bitmap::AtomicBitmap>,
}

impl GuestRam {
    /// Maps `bytes` of zeroed RAM split around the PCI hole.
    pub fn new(bytes: u64) -> Result<GuestRam, MemoryError> {
        let ranges = ram_ranges(bytes)?;
        let vm_ranges: Vec<(GuestAddress, usize)> = ranges
            .iter()
            .map(|&(g, l)| (GuestAddress(g), l as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&vm_ranges)
            .map_err(|source| MemoryError::Map { bytes, source })?;
        Ok(GuestRam {
            mem,
            ranges,
            vmm_dirty: std::sync::Arc::new(proto::bitmap::AtomicBitmap::new(
                bytes / u64::from(PAGE_SIZE),
            )),
        })
    }

    /// The flat page index (regions in guest-physical order) of guest-physical `gpa`.
    pub fn page_index(&self, gpa: u64) -> Option<u64> {
        let ps = u64::from(PAGE_SIZE);
        let mut first = 0;
        for &(g, l) in &self.ranges {
            if gpa >= g && gpa < g + l {
                return Some(first + (gpa - g) / ps);
            }
            first += l / ps;
        }
        None
    }

    /// Writes `data` at guest-physical `gpa` on the VMM's behalf (device emulation, DMA) and
    /// records the pages for dirty tracking.
    pub fn write_bytes(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        use vm_memory::Bytes;
        let range = MemoryError::OutOfRange {
            gpa,
            len: data.len(),
        };
        let last = gpa.checked_add(data.len().max(1) as u64 - 1).ok_or(range)?;
        let (Some(a), Some(b)) = (self.page_index(gpa), self.page_index(last)) else {
            return Err(MemoryError::OutOfRange {
                gpa,
                len: data.len(),
            });
        };
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: data.len(),
            })?;
        self.vmm_dirty.set_range(a, b - a + 1);
        Ok(())
    }

    /// Fills `buf` from guest-physical `gpa` (device emulation).
    pub fn read_into(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        use vm_memory::Bytes;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: buf.len(),
            })
    }

    /// Reads `len` bytes at guest-physical `gpa`.
    pub fn read_bytes(&self, gpa: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
        use vm_memory::Bytes;
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange { gpa, len })?;
        Ok(v)
    }

    /// Takes (and clears) the pages written through [`GuestRam::write_bytes`] since the last
    /// call, as bitmap bytes (one bit per flat page).
    pub fn take_vmm_dirty(&self) -> Vec<u8> {
        let b = self.vmm_dirty.to_bytes();
        self.vmm_dirty.clear_bytes(&b);
        b
    }

    /// The vm-memory view.
    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// Guest-physical ranges `(gpa, bytes)`.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// `(gpa, host address, bytes)` of each region, in guest-physical order.
    pub fn host_regions(&self) -> Vec<(u64, u64, u64)> {
        self.mem
            .iter()
            .map(|r| {
                let host = r.as_ptr() as u64;
                (r.start_addr().0, host, r.len())
            })
            .collect()
    }

    /// The layout in `proto` terms.
    pub fn layout(&self) -> Layout {
        Layout {
            regions: self
                .ranges
                .iter()
                .map(|&(g, l)| Region {
                    gpa_start: GuestPhysAddr(g),
                    len_bytes: l,
                })
                .collect(),
        }
    }

    /// Each region as a byte slice.
    fn slices(&self) -> Vec<&[u8]> {
        self.host_regions()
            .into_iter()
            .map(|(_, host, len)| {
                // SAFETY: vm-memory keeps the mapping alive as long as self; the guest may write
                // concurrently (callers pause it first when they need a stable view), and u8
                // reads of shared memory have no invalid values.
                unsafe { std::slice::from_raw_parts(host as *const u8, len as usize) }
            })
            .collect()
    }

    /// Checksum of all RAM (u64 little-endian words, the guest's own function).
    pub fn checksum(&self) -> u64 {
        let mut h = guest::CHECKSUM_INIT;
        for s in self.slices() {
            h = guest::checksum_words(
                s.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))),
                h,
            );
        }
        h
    }

    /// Like [`GuestRam::checksum`], with the pages at guest-physical `skip` (page aligned)
    /// read as zeros: for comparing RAM across hosts without the pages KVM itself rewrites
    /// (kvmclock, steal time), see [`crate::state::kvm_owned_pages`].
    pub fn checksum_except(&self, skip: &[u64]) -> u64 {
        let ps = u64::from(PAGE_SIZE);
        let mut h = guest::CHECKSUM_INIT;
        for ((gpa, _), s) in self.ranges.iter().zip(self.slices()) {
            for (i, page) in s.chunks_exact(ps as usize).enumerate() {
                let at = gpa + i as u64 * ps;
                let words = page
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
                h = if skip.contains(&at) {
                    guest::checksum_words(words.map(|_| 0), h)
                } else {
                    guest::checksum_words(words, h)
                };
            }
        }
        h
    }

    /// Writes all RAM to `path` (regions concatenated).
    pub fn write_file(&self, path: &Path) -> Result<(), MemoryError> {
        let err = |source| MemoryError::File {
            what: "writing",
            path: path.display().to_string(),
            source,
        };
        let mut f = transport::create_private(path).map_err(err)?;
        let written = self
            .slices()
            .into_iter()
            .try_for_each(|s| f.write_all(s))
            .and_then(|()| f.sync_all());
        if let Err(e) = written {
            // ours (created new): a partial image (ENOSPC, say) is not left to be restored
            let _ = std::fs::remove_file(path);
            return Err(err(e));
        }
        Ok(())
    }

    /// Reads all RAM from `path` (eager restore).
    pub fn read_file(&self, path: &Path) -> Result<(), MemoryError> {
        let err = |source| MemoryError::File {
            what: "reading",
            path: path.display().to_string(),
            source,
        };
        let mut f = File::open(path).map_err(err)?;
        let file_bytes = f.metadata().map_err(err)?.len();
        if file_bytes != self.bytes() {
            return Err(MemoryError::FileSize {
                path: path.display().to_string(),
                file_bytes,
                ram_bytes: self.bytes(),
            });
        }
        for (_, host, len) in self.host_regions() {
            // SAFETY: our own live mapping; the guest is not running during a restore.
            let s = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, len as usize) };
            f.read_exact(s).map_err(err)?;
        }
        Ok(())
    }

    /// Releases all RAM back to the host (MADV_DONTNEED), e.g. after it was migrated.
    pub fn discard(&self) {
        for (_, host, len) in self.host_regions() {
            let Some(addr) = NonNull::new(host as *mut c_void) else {
                continue;
            };
            // SAFETY: our own private anonymous mapping; it stays mapped and reads as zero.
            let _ = unsafe { madvise(addr, len as usize, MmapAdvise::MADV_DONTNEED) };
        }
    }

    /// Resident bytes of guest RAM (mincore).
    pub fn resident_bytes(&self) -> u64 {
        let mut total = 0;
        for (_, host, len) in self.host_regions() {
            let pages = (len / u64::from(PAGE_SIZE)) as usize;
            let mut vec = vec![0u8; pages];
            // SAFETY: vec has one byte per page of our live mapping.
            let rc =
                unsafe { libc::mincore(host as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
            if rc == 0 {
                total += vec.iter().filter(|b| **b & 1 != 0).count() as u64 * u64::from(PAGE_SIZE);
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(1 << 30).unwrap(), vec![(0, 1 << 30)]);
        assert_eq!(
            ram_ranges(4 << 30).unwrap(),
            vec![(0, 3 << 30), (4 << 30, 1 << 30)]
        );
        assert!(matches!(ram_ranges(0), Err(MemoryError::BadSize { .. })));
        assert!(matches!(ram_ranges(4097), Err(MemoryError::BadSize { .. })));
    }

    #[test]
    fn the_layout_round_trips_and_a_foreign_one_is_refused() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let saved = ram.save().unwrap();
        assert_eq!(saved, vec![(0, 64 << 20)]);
        let back = GuestRam::restore(64 << 20, &saved).unwrap();
        assert_eq!(back.ranges(), ram.ranges());
        assert_eq!(back.bytes(), 64 << 20);
        // a layout this VMM would not build for the size (another VMM's, or a crafted file)
        let e = GuestRam::restore(64 << 20, &vec![(0x1000, 64 << 20)])
            .expect_err("a foreign layout is refused");
        assert!(e.to_string().contains("RAM layout"), "{e}");
        assert!(matches!(
            GuestRam::restore(4097, &saved),
            Err(MemoryError::BadSize { .. })
        ));
    }
}
