//! virtio-blk on a raw image file. Requests run to completion inside the driver's notify, so
//! nothing is ever in flight when the vCPUs are paused; saving the device flushes the file and
//! records its identity ([`DiskId`]), which the destination checks before it uses the file it
//! opened at the same path (shared storage: no disk byte crosses the migration link).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::VirtioError;
use super::queue::{gather, scatter, Queue, QueueError};
use crate::api::replies::BlockStats;
use crate::memory::GuestRam;

mod copy_in;

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Feature: the device is read-only.
const F_RO: u64 = 1 << 5;
/// Feature: FLUSH is supported.
const F_FLUSH: u64 = 1 << 9;
/// Largest request (data bytes) served.
const MAX_REQUEST: usize = 4 << 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// `--disk PATH[,readonly]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// The raw image (a file or a block device) — the same path on every host.
    pub path: PathBuf,
    /// Guest may not write.
    pub readonly: bool,
}

impl BlockConfig {
    /// Parses `PATH[,readonly]`.
    pub fn parse(s: &str) -> Result<BlockConfig, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("empty disk path")?;
        let mut readonly = false;
        for p in parts {
            match p {
                "readonly" | "ro" => readonly = true,
                other => return Err(format!("unknown disk option {other:?} (known: readonly)")),
            }
        }
        Ok(BlockConfig {
            path: path.into(),
            readonly,
        })
    }
}

/// What makes a disk image "the same file" on another host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskId {
    /// Bytes.
    pub size: u64,
    /// Inode number (shared file systems keep it across hosts); 0 for block devices.
    pub ino: u64,
    /// Hash of 16 sampled 4 KiB blocks (first, last, evenly spread), taken after the flush.
    pub sample: u64,
}

/// Counters.
#[derive(Debug, Default, Clone)]
struct Counters {
    reads: u64,
    writes: u64,
    flushes: u64,
    read_bytes: u64,
    written_bytes: u64,
    errors: u64,
}

/// An opened disk.
pub struct Block {
    cfg: BlockConfig,
    file: File,
    size: u64,
    block_device: bool,
    counters: Counters,
    /// `--copy-disk` in progress on the destination.
    staging: Option<Staging>,
}

impl Drop for Block {
    fn drop(&mut self) {
        match &self.staging {
            // a copy-in whose VM never ran here leaves no half-written image behind
            Some(s) if !s.started => {
                log::warn!(
                    "disk {}: copy from the source incomplete; removing the local image",
                    self.cfg.path.display()
                );
                let _ = std::fs::remove_file(&self.cfg.path);
            }
            // once the guest ran here the image is kept, whatever happened: it holds what was
            // written back (the source still has the disk: it was never told Done)
            Some(s) => log::warn!(
                "disk {}: copy from the source incomplete ({} of {} chunks written back); the local image is kept, and the source keeps its disk",
                self.cfg.path.display(),
                s.chunks_done,
                s.written.len()
            ),
            None => {}
        }
    }
}

/// A disk being copied in: its blocks live in the pager's anonymous mapping until all are here.
struct Staging {
    /// The VM has run here (the copy's stream was started): the guest may have written.
    started: bool,
    pager: pager::Pager,
    /// Host address of the staging mapping.
    base: u64,
    /// Per write-back chunk: already in the file (guest writes to it then go to both).
    written: Vec<bool>,
    /// Where the next scan for a chunk ready to write back starts.
    cursor: usize,
    /// Chunks written back.
    chunks_done: usize,
    since: std::time::Instant,
    /// Time spent writing back.
    write_back: std::time::Duration,
}

/// Bytes written back to the local file per step (the guest's disk I/O waits at most one step).
pub const WRITE_BACK_CHUNK: u64 = 1 << 20;

/// What one write-back step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteBack {
    /// A chunk went to the file.
    Wrote,
    /// No chunk not yet written has all its blocks here yet.
    NothingReady,
    /// Every chunk is in the file.
    AllDone,
}

fn disk_err(cfg: &BlockConfig, what: impl Into<String>) -> VirtioError {
    VirtioError::Disk {
        path: cfg.path.display().to_string(),
        what: what.into(),
    }
}

impl Block {
    /// Opens the image (read-write unless read-only).
    /// Never blocks on the open itself (O_NONBLOCK, cleared after: a FIFO would wait for a
    /// writer); anything but a regular file or a block device is then refused.
    pub fn open(cfg: &BlockConfig) -> Result<Block, VirtioError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.readonly)
            .custom_flags(libc::O_NONBLOCK)
            .open(&cfg.path)
            .map_err(|e| disk_err(cfg, format!("cannot open: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| disk_err(cfg, format!("stat: {e}")))?;
        // back to blocking I/O (O_NONBLOCK was for the open only)
        nix::fcntl::fcntl(
            &file,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .map_err(|e| disk_err(cfg, format!("fcntl: {e}")))?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            use std::io::{Seek, SeekFrom};
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(|e| disk_err(cfg, format!("size: {e}")))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(disk_err(cfg, "neither a regular file nor a block device"));
        };
        if size < SECTOR || !size.is_multiple_of(SECTOR) {
            return Err(disk_err(
                cfg,
                format!("{size} bytes is not a positive multiple of {SECTOR}"),
            ));
        }
        Ok(Block {
            cfg: cfg.clone(),
            file,
            size,
            block_device,
            counters: Counters::default(),
            staging: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BlockConfig {
        &self.cfg
    }

    /// Image bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// A second handle for flushing outside the device lock (None: read-only or being copied
    /// in).
    pub(super) fn flush_handle(&self) -> Option<File> {
        if self.cfg.readonly || self.staging.is_some() {
            return None;
        }
        self.file.try_clone().ok()
    }

    pub(super) fn features(&self) -> u64 {
        F_FLUSH | if self.cfg.readonly { F_RO } else { 0 }
    }

    pub(super) fn config_space(&self) -> Vec<u8> {
        // capacity (sectors), size_max, seg_max: only capacity is offered.
        let mut c = (self.size / SECTOR).to_le_bytes().to_vec();
        c.resize(0x40, 0);
        c
    }

    /// The identity the destination compares with (size and inode, without the sample).
    pub fn quick_id(&self) -> DiskId {
        DiskId {
            size: self.size,
            ino: self.ino(),
            sample: 0,
        }
    }

    fn ino(&self) -> u64 {
        if self.block_device {
            0
        } else {
            self.file.metadata().map(|m| m.ino()).unwrap_or(0)
        }
    }

    fn sample(&self) -> Result<u64, VirtioError> {
        const B: u64 = 4096;
        let blocks = self.size.div_ceil(B);
        let mut h = guest::CHECKSUM_INIT;
        let mut buf = vec![0u8; B as usize];
        for k in 0..16u64 {
            let blk = if blocks <= 1 {
                0
            } else {
                k * (blocks - 1) / 15
            };
            let off = blk * B;
            let n = B.min(self.size - off) as usize;
            self.file
                .read_exact_at(&mut buf[..n], off)
                .map_err(|e| disk_err(&self.cfg, format!("read at {off}: {e}")))?;
            buf[n..].fill(0);
            h = guest::checksum_words(
                buf.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())),
                h,
            );
        }
        Ok(h)
    }

    /// Flushes to stable storage, then identifies the image (the VM is paused).
    pub(super) fn flush_and_identify(&self) -> Result<DiskId, VirtioError> {
        if !self.cfg.readonly {
            self.file
                .sync_data()
                .map_err(|e| disk_err(&self.cfg, format!("flush: {e}")))?;
        }
        Ok(DiskId {
            sample: self.sample()?,
            ..self.quick_id()
        })
    }

    /// Refuses an image that is not `id` (size, inode where both are files, and — when `id`
    /// carries one — the sampled content).
    pub fn check_same(&self, id: &DiskId) -> Result<(), VirtioError> {
        let here = self.quick_id();
        if here.size != id.size {
            return Err(disk_err(
                &self.cfg,
                format!(
                    "not the source's disk: {} bytes here, {} at the source",
                    here.size, id.size
                ),
            ));
        }
        if here.ino != 0 && id.ino != 0 && here.ino != id.ino {
            return Err(disk_err(
                &self.cfg,
                format!(
                    "not the source's disk: inode {} here, {} at the source (is the storage shared?)",
                    here.ino, id.ino
                ),
            ));
        }
        if id.sample != 0 {
            // Nothing of the file was read here before (the offer check reads no data), so
            // these reads see what the source flushed.
            let s = self.sample()?;
            if s != id.sample {
                return Err(disk_err(
                    &self.cfg,
                    format!(
                        "content differs from the source's flushed disk (sample {s:016x}, source {:016x})",
                        id.sample
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn stats(&self) -> BlockStats {
        let c = &self.counters;
        BlockStats {
            path: self.cfg.path.clone(),
            bytes: self.size,
            reads: c.reads,
            writes: c.writes,
            flushes: c.flushes,
            read_bytes: c.read_bytes,
            written_bytes: c.written_bytes,
            errors: c.errors,
        }
    }

    /// Serves every available request; true if any completed.
    pub(super) fn process(
        &mut self,
        ram: &GuestRam,
        queues: &mut [Queue],
    ) -> Result<bool, QueueError> {
        let q = &mut queues[0];
        let mut any = false;
        while let Some(chain) = q.pop(ram)? {
            let (status, written) = self.request(ram, &chain.descs)?;
            if status != S_OK {
                self.counters.errors += 1;
            }
            q.push_used(ram, chain.head, written)?;
            any = true;
        }
        Ok(any)
    }

    /// One request: returns its status and the bytes written into the chain.
    fn request(
        &mut self,
        ram: &GuestRam,
        descs: &[super::queue::Desc],
    ) -> Result<(u8, u32), QueueError> {
        let out = gather(ram, descs, MAX_REQUEST + 16)?;
        let Some(status_desc) = descs.iter().rev().find(|d| d.write && d.len > 0) else {
            return Err(QueueError("block request without a status byte".into()));
        };
        let status_at = status_desc.addr + u64::from(status_desc.len) - 1;
        if out.len() < 16 {
            return Err(QueueError(format!(
                "block request header of {} bytes",
                out.len()
            )));
        }
        let ty = u32::from_le_bytes(out[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(out[8..16].try_into().unwrap_or_default());
        let writable: u64 = descs
            .iter()
            .filter(|d| d.write)
            .map(|d| u64::from(d.len))
            .sum();
        let in_len = writable.saturating_sub(1) as usize;
        let off = sector.checked_mul(SECTOR);
        let fits = |len: usize| {
            off.and_then(|o| o.checked_add(len as u64))
                .is_some_and(|e| e <= self.size)
        };
        let (status, data): (u8, Vec<u8>) = match ty {
            T_IN if in_len > MAX_REQUEST => (S_IOERR, Vec::new()),
            T_IN if !fits(in_len) => (S_IOERR, Vec::new()),
            T_IN => {
                let mut buf = vec![0u8; in_len];
                match self.staged_read(&mut buf, off.unwrap_or(0)) {
                    Ok(()) => {
                        self.counters.reads += 1;
                        self.counters.read_bytes += in_len as u64;
                        (S_OK, buf)
                    }
                    Err(e) => {
                        log::warn!("disk {}: read: {e}", self.cfg.path.display());
                        (S_IOERR, Vec::new())
                    }
                }
            }
            T_OUT if self.cfg.readonly => (S_IOERR, Vec::new()),
            T_OUT if !fits(out.len() - 16) => (S_IOERR, Vec::new()),
            T_OUT => match self.staged_write(&out[16..], off.unwrap_or(0)) {
                Ok(()) => {
                    self.counters.writes += 1;
                    self.counters.written_bytes += (out.len() - 16) as u64;
                    (S_OK, Vec::new())
                }
                Err(e) => {
                    log::warn!("disk {}: write: {e}", self.cfg.path.display());
                    (S_IOERR, Vec::new())
                }
            },
            T_FLUSH => {
                self.counters.flushes += 1;
                match self.file.sync_data() {
                    Ok(()) => (S_OK, Vec::new()),
                    Err(_) => (S_IOERR, Vec::new()),
                }
            }
            T_GET_ID => {
                let name = self
                    .cfg
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let mut id = name.into_bytes();
                id.truncate(20);
                id.resize(in_len.min(20), 0);
                (S_OK, id)
            }
            _ => (S_UNSUPP, Vec::new()),
        };
        let mut written = 0;
        if status == S_OK && !data.is_empty() {
            let data_descs: Vec<_> = descs.iter().copied().filter(|d| d.write).collect();
            written = scatter(ram, &data_descs, &data)?;
        }
        ram.write_bytes(status_at, &[status])
            .map_err(|e| QueueError(e.to_string()))?;
        Ok((status, written + 1))
    }
}
