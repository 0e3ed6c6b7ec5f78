//! What the control socket asks of a running VM: status, snapshot, memory reads and writes,
//! checksums, the dirty rate, and the dispatch of every request ([`Vm::handle_request`]).

use std::path::Path;
use std::time::{Duration, Instant};

use transport::error_chain;

use super::Vm;
use crate::api::replies::{
    Checksum, DirtyRate, MemoryRead, Queued, Snapshot, SourceLost, StateNow, Status, Written,
};
use crate::api::{self, Reply, Request};
use crate::config::Exit;
use crate::error::VmError;
use crate::state;

impl Vm {
    /// Pauses, then writes the state and memory files. Stays paused.
    pub fn snapshot(&mut self, state_path: &Path, memory_path: &Path) -> Result<Reply, VmError> {
        let t0 = Instant::now();
        let snap = self.save()?;
        let state_bytes = state::write_file(&snap, state_path)?;
        if let Err(e) = self.ram.write_file(memory_path) {
            // the state file is ours (written new): no half snapshot is left behind
            let _ = std::fs::remove_file(state_path);
            return Err(e.into());
        }
        let checksum = self.ram.checksum();
        Ok(Reply::ok(&Snapshot {
            state_bytes,
            memory_bytes: self.ram.bytes(),
            ram_checksum: format!("{checksum:016x}"),
            ms: t0.elapsed().as_secs_f64() * 1e3,
            paused: true,
        }))
    }

    /// Pages the guest writes in `ms` milliseconds (with `backend`'s dirty tracking), and the
    /// rate.
    pub(super) fn dirty_rate(&mut self, ms: u64, backend: Option<&str>) -> Result<Reply, VmError> {
        let ms = ms.clamp(10, 10_000);
        let b = crate::dirty::Backend::parse(backend).map_err(VmError::Config)?;
        if self.dirty_log.is_some() {
            return Err(VmError::Config(
                "dirty tracking is in use by a migration".into(),
            ));
        }
        let t = crate::dirty::Tracker::start(b, &self.fd, &self.ram).map_err(VmError::Config)?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(ms));
        let set = t.collect(&self.fd, &self.ram);
        let took = t0.elapsed().as_secs_f64();
        t.stop(&self.fd).map_err(VmError::Config)?;
        let set = set.map_err(VmError::Config)?;
        let n = set.count();
        Ok(Reply::ok(&DirtyRate {
            backend: b.name().into(),
            ms: took * 1e3,
            dirty_pages: n,
            total_pages: set.len(),
            pages_per_s: n as f64 / took,
            mib_per_s: (n * u64::from(crate::memory::PAGE_SIZE)) as f64 / took / (1 << 20) as f64,
            paused: self.paused,
        }))
    }

    pub(super) fn write_memory(&mut self, gpa: u64, hex: &str) -> Result<Reply, VmError> {
        let bytes = decode_hex(hex).ok_or_else(|| {
            VmError::Config(format!("{} bytes of hex that do not decode", hex.len()))
        })?;
        if bytes.len() > 64 << 10 {
            return Err(VmError::Config("at most 64 KiB per write".into()));
        }
        self.ram.write_bytes(gpa, &bytes)?;
        Ok(Reply::ok(&Written {
            written: bytes.len(),
        }))
    }

    pub(super) fn read_memory(&mut self, gpa: u64, len: usize) -> Result<Reply, VmError> {
        if len > 64 << 10 {
            return Err(VmError::Config("at most 64 KiB per read".into()));
        }
        let b = self.ram.read_bytes(gpa, len)?;
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        Ok(Reply::ok(&MemoryRead { hex }))
    }

    /// RAM checksums: of all of it, and without the pages KVM rewrites (when paused).
    pub(super) fn checksums(&mut self) -> Result<Reply, VmError> {
        let mut r = Checksum {
            ram_checksum: format!("{:016x}", self.ram.checksum()),
            paused: self.paused,
            ram_checksum_except_kvm: None,
            kvm_pages: None,
        };
        if self.paused {
            let snap = self.save()?;
            let skip = state::kvm_owned_pages(&snap);
            r.ram_checksum_except_kvm = Some(format!("{:016x}", self.ram.checksum_except(&skip)));
            r.kvm_pages = Some(skip.iter().map(|p| format!("{p:#x}")).collect());
        }
        Ok(Reply::ok(&r))
    }

    pub(super) fn status(&self) -> Reply {
        let (present, total) = match &self.pager {
            Some(p) => (p.present_pages(), p.total_pages()),
            None => (0, 0),
        };
        let state = match (&self.source, self.kept_server.is_empty(), self.paused) {
            _ if self.lost.is_some() => "source_lost (paused, never run again)",
            (Some(_), _, true) => "migrating (paused here)",
            (Some(_), _, false) => "migrating",
            (None, false, _) => "paused after a migration of unknown outcome",
            (None, true, true) => "paused",
            (None, true, false) => "running",
        };
        Reply::ok(&Status {
            api_version: api::VERSION,
            state: state.into(),
            incoming_migration_open: self.dest.is_some(),
            vcpus: self.config.vcpus,
            mem_bytes: self.config.mem_bytes,
            boot: self.config.boot.clone(),
            uptime_ms: self.created.elapsed().as_millis() as u64,
            running_after_start_ms: self.times.running_after.as_secs_f64() * 1e3,
            state_load_ms: self.times.state_load.as_secs_f64() * 1e3,
            memory_load_ms: self.times.memory_load.as_secs_f64() * 1e3,
            lazy: self.pager.is_some(),
            pages_present: present,
            pages_total: total,
            memory_complete_ms: self.memory_complete_after.map(|d| d.as_secs_f64() * 1e3),
            pager: self.pager.as_ref().map(|p| p.report()),
            devices: self.devices.virtio.stats(),
            source_lost: self.lost.as_ref().map(|(why, since)| SourceLost {
                reason: why.clone(),
                since_ms: since.elapsed().as_millis() as u64,
                pages_missing: total - present,
            }),
        })
    }

    pub(super) fn handle_request(&mut self, req: Request) -> (Reply, Option<Exit>) {
        if let Some(refused) = self.refuse_while_lost(&req) {
            return (refused, None);
        }
        let r = match req {
            Request::Status {} => Ok(self.status()),
            Request::Pause {} => self.pause().map(|_| now("paused")),
            Request::Resume {} => {
                self.resume();
                Ok(now("running"))
            }
            Request::Snapshot { state, memory } => self.snapshot(&state, &memory),
            Request::Shutdown {} => return (now("shutdown"), Some(self.exit_now())),
            Request::SerialInput { data } => {
                let n = self
                    .devices
                    .console
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .input(data.as_bytes());
                Ok(Reply::ok(&Queued { queued: n }))
            }
            Request::MigrateSwitchover {} => Ok(self.force_switchover()),
            Request::WriteMemory { gpa, hex } => self.write_memory(gpa, &hex),
            Request::ReadMemory { gpa, len } => self.read_memory(gpa, len),
            Request::Migrate { .. } => Ok(Reply::err(
                "internal",
                "migrate is handled by the controller loop",
            )),
            Request::Checksum {} => self.checksums(),
            Request::DirtyRate { ms, backend } => self.dirty_rate(ms, backend.as_deref()),
        };
        match r {
            Ok(reply) => (reply, None),
            Err(e) => {
                let kind = match &e {
                    VmError::State(_) => "state",
                    VmError::Memory(_) => "memory",
                    VmError::PauseTimeout(_)
                    | VmError::Device(crate::virtio::VirtioError::Busy(_)) => "busy",
                    _ => "internal",
                };
                (Reply::err(kind, error_chain(&e)), None)
            }
        }
    }
}

/// The reply to `pause`, `resume`, `shutdown`.
fn now(state: &str) -> Reply {
    Reply::ok(&StateNow {
        state: state.into(),
    })
}

/// Bytes from hex digits (None if not an even number of hex digits).
fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
