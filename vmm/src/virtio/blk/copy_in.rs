//! `--copy-disk` on the destination: a disk copied in from the source like memory — its blocks
//! in a pager's staging mapping (the guest's reads fault them in, the stream brings the rest),
//! written back to the new local image chunk by chunk as they are complete.

use std::os::unix::fs::FileExt;

use super::{disk_err, Block, BlockConfig, Counters, DiskId, Staging, WriteBack, WRITE_BACK_CHUNK};
use crate::virtio::error::VirtioError;

impl Block {
    /// `--copy-disk` on the destination: a new local image at `cfg.path` (it must not exist),
    /// filled from the source's page-server at `addr` through a pager over an anonymous staging
    /// mapping — blocks the guest reads come on demand, the rest streams once the VM runs
    /// here ([`Block::start_copy`]) — and written to the file when every block is present.
    pub fn copy_in(
        cfg: &BlockConfig,
        id: Option<&DiskId>,
        addr: &str,
        security: &transport::Security,
    ) -> Result<Block, VirtioError> {
        let size = id
            .map(|i| i.size)
            .ok_or_else(|| disk_err(cfg, "the offer does not give the disk's size"))?;
        let a: transport::Addr = addr
            .parse()
            .map_err(|e| disk_err(cfg, format!("disk page-server {addr:?}: {e}")))?;
        let file = transport::create_private(&cfg.path).map_err(|e| {
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
                security: security.clone(),
                // the source lets go of the disk only once the local image is synced
                hold_done: true,
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
                started: false,
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
    pub(in crate::virtio) fn start_copy(
        &mut self,
    ) -> Option<std::sync::mpsc::Receiver<pager::PagerEvent>> {
        let s = self.staging.as_mut()?;
        s.since = std::time::Instant::now();
        s.started = true;
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
    pub(in crate::virtio) fn write_back_step(&mut self) -> Result<WriteBack, VirtioError> {
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
    pub(in crate::virtio) fn finish_copy(&mut self) -> Result<(f64, f64), VirtioError> {
        self.file
            .sync_all()
            .map_err(|e| disk_err(&self.cfg, format!("flushing the local copy: {e}")))?;
        // every block is on stable storage here: now the source may let go of its disk
        if let Some(s) = &self.staging {
            if let Err(e) = s.pager.release_done() {
                log::warn!(
                    "disk {}: telling the source the copy is safe: {e}",
                    self.cfg.path.display()
                );
            }
        }
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

    pub(super) fn staged_read(&mut self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
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

    pub(super) fn staged_write(&mut self, data: &[u8], off: u64) -> std::io::Result<()> {
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
}
