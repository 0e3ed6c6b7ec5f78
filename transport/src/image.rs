//! Memory image files: a snapshot's guest memory at rest, one raw page after the other, mapped
//! read-only and read through the page cache (served by a page-server, or paged in by a local
//! restore).

use std::fs::File;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use proto::Layout;
use thiserror::Error;

/// Creates `path` for a file that holds guest memory or state (a snapshot's state or memory
/// file, a copied-in disk): a new file only (`O_CREAT | O_EXCL`, so neither an existing file
/// nor a symlink at `path`, dangling or not, is followed or overwritten), mode 0600, readable
/// and writable. An existing path is an `AlreadyExists` error that says so.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => std::io::Error::new(
                e.kind(),
                format!(
                    "{} exists (files holding guest memory or state are only ever written new: remove it first)",
                    path.display()
                ),
            ),
            _ => e,
        })
}

/// Opening a memory image failed.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The file could not be opened or measured.
    #[error("cannot open memory image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file's size is not a non-zero multiple of the page size.
    #[error(
        "memory image {path} is {len} bytes, not a non-zero multiple of the page size {page_size}"
    )]
    BadSize {
        /// The image.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The page size.
        page_size: u32,
    },
    /// mmap failed.
    #[error("cannot map memory image {path}")]
    Map {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A read-only private mapping of a whole file.
#[derive(Debug)]
pub struct FileImage {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    page_size: u32,
}

// SAFETY: the mapping is read-only and lives as long as the FileImage; sharing `&[u8]` views of
// it between threads is sound.
unsafe impl Send for FileImage {}
// SAFETY: as above: only shared reads.
unsafe impl Sync for FileImage {}

impl FileImage {
    /// Maps `path` read-only as one region at guest-physical 0.
    pub fn open(path: &Path, page_size: u32) -> Result<Self, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        if len == 0 || len % u64::from(page_size) != 0 {
            return Err(ImageError::BadSize {
                path: path.to_owned(),
                len,
                page_size,
            });
        }
        let map_len = NonZeroUsize::new(len as usize).ok_or_else(|| ImageError::BadSize {
            path: path.to_owned(),
            len,
            page_size,
        })?;
        // SAFETY: a fresh read-only shared mapping of a file we opened, placed by the kernel
        // (no address given, so nothing existing is replaced); no Rust object aliases the
        // returned range. The file may be changed by others; we only copy bytes out of it.
        // MAP_POPULATE maps every page up front, so serving a fault never takes a page fault.
        let p = unsafe {
            mmap(
                None,
                map_len,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE,
                &file,
                0,
            )
        }
        .map_err(|errno| ImageError::Map {
            path: path.to_owned(),
            source: std::io::Error::from(errno),
        })?;
        let ptr = p.cast::<u8>();
        Ok(FileImage {
            ptr,
            len: map_len.get(),
            layout: Layout::single(len),
            page_size,
        })
    }

    /// The whole image.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr/len describe our live read-only mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for FileImage {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping we created; no borrows outlive self.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

impl FileImage {
    /// Page size in bytes.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Its layout: one region at guest-physical 0.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}
