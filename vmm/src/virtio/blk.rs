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
        // A copy-in that never finished leaves no half-written image behind.
        if self.staging.as_ref().is_some() {
            log::warn!(
                "disk {}: copy from the source incomplete; removing the local image",
                self.cfg.path.display()
            );
            let _ = std::fs::remove_file(&self.cfg.path);
        }
    }
}

/// A disk being copied in: its blocks live in the pager's anonymous mapping until all are here.
struct Staging {
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
    pub fn open(cfg: &BlockConfig) -> Result<Block, VirtioError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.readonly)
            .open(&cfg.path)
            .map_err(|e| disk_err(cfg, format!("cannot open: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| disk_err(cfg, format!("stat: {e}")))?;
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

    /// `--copy-disk` on the destination: a new local image at `cfg.path` (it must not exist),
    /// filled from the source's page-server at `addr` through a pager over an anonymous staging
    /// mapping — blocks the guest reads come on demand, the rest streams once the VM runs
    /// here ([`Block::start_copy`]) — and written to the file when every block is present.
    pub fn copy_in(
        cfg: &BlockConfig,
        id: Option<&DiskId>,
        addr: &str,
    ) -> Result<Block, VirtioError> {
        let size = id
            .map(|i| i.size)
            .ok_or_else(|| disk_err(cfg, "the offer does not give the disk's size"))?;
        let a: transport::Addr = addr
            .parse()
            .map_err(|e| disk_err(cfg, format!("disk page-server {addr:?}: {e}")))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&cfg.path)
            .map_err(|e| {
                disk_err(
                    cfg,
                    format!("cannot create the local copy (copy-disk writes a new image): {e}"),
                )
            })?;
        let cleanup = |e: VirtioError| {
            let _ = std::fs::remove_file(&cfg.path);
            e
        };
        file.set_len(size)
            .map_err(|e| cleanup(disk_err(cfg, format!("set size {size}: {e}"))))?;
        let pager = pager::Pager::connect(
            &a,
            pager::PagerConfig {
                stream_deferred: true,
                ..pager::PagerConfig::default()
            },
        )
        .map_err(|e| cleanup(disk_err(cfg, format!("disk page-server {addr}: {e}"))))?;
        if pager.total_pages() * 4096 != size {
            return Err(cleanup(disk_err(
                cfg,
                format!(
                    "the disk page-server serves {} pages for a {size}-byte disk",
                    pager.total_pages()
                ),
            )));
        }
        let base = pager.memory().regions()[0].0;
        Ok(Block {
            cfg: cfg.clone(),
            file,
            size,
            block_device: false,
            counters: Counters::default(),
            staging: Some(Staging {
                pager,
                base,
                written: vec![false; size.div_ceil(WRITE_BACK_CHUNK) as usize],
                cursor: 0,
                chunks_done: 0,
                since: std::time::Instant::now(),
                write_back: std::time::Duration::ZERO,
            }),
        })
    }

    /// Starts a copy-in's background stream; returns its pager's events (None when this disk
    /// is not being copied).
    pub(super) fn start_copy(&mut self) -> Option<std::sync::mpsc::Receiver<pager::PagerEvent>> {
        let s = self.staging.as_mut()?;
        s.since = std::time::Instant::now();
        if let Err(e) = s.pager.start_stream() {
            log::warn!("disk {}: starting the copy: {e}", self.cfg.path.display());
        }
        s.pager.events()
    }

    /// Copy-in progress: (present pages, total pages).
    pub fn copy_progress(&self) -> Option<(u64, u64)> {
        self.staging
            .as_ref()
            .map(|s| (s.pager.present_pages(), s.pager.total_pages()))
    }

    /// Writes the next chunk whose blocks are all here to the local file (copy-in write-back,
    /// while the copy goes on). Guest writes to a chunk already written go to both.
    pub(super) fn write_back_step(&mut self) -> Result<WriteBack, VirtioError> {
        let Some(s) = self.staging.as_mut() else {
            return Ok(WriteBack::AllDone);
        };
        let n = s.written.len();
        if s.chunks_done == n {
            return Ok(WriteBack::AllDone);
        }
        let pages_per_chunk = WRITE_BACK_CHUNK / 4096;
        let total_pages = s.pager.total_pages();
        for k in 0..n {
            let c = (s.cursor + k) % n;
            if s.written[c] {
                continue;
            }
            let first = c as u64 * pages_per_chunk;
            let last = (first + pages_per_chunk).min(total_pages);
            if !(first..last).all(|p| s.pager.is_present(p)) {
                continue;
            }
            let t = std::time::Instant::now();
            let off = c as u64 * WRITE_BACK_CHUNK;
            let len = WRITE_BACK_CHUNK.min(self.size - off);
            // SAFETY: [off, off + len) lies in the staging mapping of `size` bytes, owned by the
            // pager we hold, and every page of it is present: reading does not fault.
            let data =
                unsafe { std::slice::from_raw_parts((s.base + off) as *const u8, len as usize) };
            self.file.write_all_at(data, off).map_err(|e| {
                disk_err(&self.cfg, format!("writing the local copy at {off}: {e}"))
            })?;
            s.written[c] = true;
            s.chunks_done += 1;
            s.cursor = (c + 1) % n;
            s.write_back += t.elapsed();
            return Ok(WriteBack::Wrote);
        }
        Ok(WriteBack::NothingReady)
    }

    /// Ends a copy-in: the file holds every block; the staging memory goes. Returns (copy ms,
    /// write-back ms).
    pub(super) fn finish_copy(&mut self) -> Result<(f64, f64), VirtioError> {
        self.file
            .sync_all()
            .map_err(|e| disk_err(&self.cfg, format!("flushing the local copy: {e}")))?;
        Ok(self.staging.take().map_or((0.0, 0.0), |s| {
            (
                s.since.elapsed().as_secs_f64() * 1e3,
                s.write_back.as_secs_f64() * 1e3,
            )
        }))
    }

    /// Copy-in pager report (for the migration report).
    pub fn copy_report(&self) -> Option<pager::Report> {
        self.staging.as_ref().map(|s| s.pager.report())
    }

    fn staged_read(&mut self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        match &self.staging {
            Some(s) => {
                // SAFETY: the range was checked against `size`, the staging mapping's length;
                // a missing page faults and the pager fills it from the source before the copy
                // goes on.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (s.base + off) as *const u8,
                        buf.as_mut_ptr(),
                        buf.len(),
                    )
                };
                Ok(())
            }
            None => self.file.read_exact_at(buf, off),
        }
    }

    fn staged_write(&mut self, data: &[u8], off: u64) -> std::io::Result<()> {
        match &self.staging {
            Some(s) => {
                // SAFETY: as in staged_read; the page is fetched first, then overwritten here.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr(),
                        (s.base + off) as *mut u8,
                        data.len(),
                    )
                };
                // chunks already written back get the write too
                let first = (off / WRITE_BACK_CHUNK) as usize;
                let last = ((off + data.len().max(1) as u64 - 1) / WRITE_BACK_CHUNK) as usize;
                if (first..=last).any(|c| s.written.get(c).copied().unwrap_or(false)) {
                    self.file.write_all_at(data, off)?;
                }
                Ok(())
            }
            None => self.file.write_all_at(data, off),
        }
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
