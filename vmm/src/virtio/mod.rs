//! virtio-mmio devices (virtio 1.x, "version 2" register layout): the transport with its
//! registers and split queues, a block device on a raw image file ([`blk`]) and a network
//! device on a tap ([`net`]).
//!
//! Slot `i` sits at guest-physical [`MMIO_BASE`] + `i` × [`MMIO_STRIDE`] and raises GSI
//! [`GSI_BASE`] + `i` through an irqfd (our guest polls; Linux finds them as ACPI devices
//! `LNRO0005` in the DSDT, `crate::acpi`, or with `acpi=off` through `virtio_mmio.device=`). Block requests complete on the vCPU
//! thread that notifies, inside the MMIO write, so a paused VM has no request in flight; the
//! network device receives on its own thread, which delivers nothing while the VM is paused.
//! A device's complete state ([`TransportState`]) is a few registers, its queues and its
//! backend's configuration: it migrates with the vCPUs; the backend (file, tap) is re-opened on
//! the destination, never copied.

pub mod blk;
mod copy;
pub mod net;
pub mod queue;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestRam;
use copy::copy_thread;
pub use copy::DiskCopyEvent;
use queue::Queue;

/// First device's MMIO window.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Bytes per device window.
pub const MMIO_STRIDE: u64 = 0x1000;
/// Device slots.
pub const MMIO_SLOTS: u32 = 8;
/// GSI of slot 0.
pub const GSI_BASE: u32 = 5;
/// Largest queue a driver may set up.
pub const QUEUE_MAX: u16 = 256;

const MAGIC: u32 = 0x7472_6976;
/// Feature bit: virtio 1.x.
pub const F_VERSION_1: u64 = 1 << 32;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;

/// A device could not be set up, or its state not applied.
#[derive(Debug, Error)]
pub enum VirtioError {
    /// The disk image.
    #[error("disk {path}: {what}")]
    Disk {
        /// The image.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The tap device.
    #[error("tap {name}: {what}")]
    Tap {
        /// Interface name.
        name: String,
        /// What is wrong.
        what: String,
    },
    /// A bad option or state.
    #[error("{0}")]
    Config(String),
    /// A device did not stop in time.
    #[error("{0}")]
    Busy(String),
}

/// What a device is attached to. It travels with the VM (in the migration offer and the state),
/// so the destination opens the same backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceConfig {
    /// virtio-blk on a raw image.
    Block(blk::BlockConfig),
    /// virtio-net on a tap.
    Net(net::NetConfig),
}

impl DeviceConfig {
    /// One line for logs and errors.
    pub fn describe(&self) -> String {
        match self {
            DeviceConfig::Block(b) => format!(
                "disk {}{}",
                b.path.display(),
                if b.readonly { " (read-only)" } else { "" }
            ),
            DeviceConfig::Net(n) => format!("net tap {} mac {}", n.tap, net::mac_string(&n.mac)),
        }
    }
}

/// A device as a migration offer names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferedDevice {
    /// Its backend at the source.
    pub config: DeviceConfig,
    /// A disk's size and inode (the destination checks it opened the same file).
    pub disk: Option<blk::DiskId>,
    /// `--copy-disk`: the page-server serving the image (the disk is not shared).
    pub copy_from: Option<String>,
}

/// Where the destination finds a disk: `map` renames source paths (`--disk-map FROM=TO`).
pub fn mapped_path(path: &std::path::Path, map: &[(PathBuf, PathBuf)]) -> PathBuf {
    map.iter()
        .find(|(from, _)| from == path)
        .map(|(_, to)| to.clone())
        .unwrap_or_else(|| path.to_owned())
}

/// Opens, on a migration destination, the backends an offer names, and checks each disk is the
/// source's file. `map` renames disk paths, `taps` tap names (`--tap-map FROM=TO`, e.g. for a
/// migration between two VMMs on one host). The error says which device and why (the offer is
/// then refused).
pub fn open_offered(
    devs: &[OfferedDevice],
    map: &[(PathBuf, PathBuf)],
    taps: &[(String, String)],
) -> Result<Vec<Backend>, VirtioError> {
    let mut out = Vec::new();
    for d in devs {
        out.push(match &d.config {
            DeviceConfig::Block(b) => {
                let cfg = blk::BlockConfig {
                    path: mapped_path(&b.path, map),
                    readonly: b.readonly,
                };
                let disk = match &d.copy_from {
                    Some(addr) => blk::Block::copy_in(&cfg, d.disk.as_ref(), addr)?,
                    None => {
                        let disk = blk::Block::open(&cfg)?;
                        if let Some(id) = &d.disk {
                            disk.check_same(id)?;
                        }
                        disk
                    }
                };
                Backend::Block(disk)
            }
            DeviceConfig::Net(n) => {
                let tap = taps
                    .iter()
                    .find(|(from, _)| *from == n.tap)
                    .map_or_else(|| n.tap.clone(), |(_, to)| to.clone());
                Backend::Net(net::Net::open(&net::NetConfig { tap, mac: n.mac })?)
            }
        });
    }
    Ok(out)
}

/// An opened backend, ready to be attached to a transport.
pub enum Backend {
    /// A disk.
    Block(blk::Block),
    /// A NIC.
    Net(net::Net),
}

impl Backend {
    /// Opens `cfg`'s backend on this host.
    pub fn open(cfg: &DeviceConfig) -> Result<Backend, VirtioError> {
        Ok(match cfg {
            DeviceConfig::Block(b) => Backend::Block(blk::Block::open(b)?),
            DeviceConfig::Net(n) => Backend::Net(net::Net::open(n)?),
        })
    }

    fn config(&self) -> DeviceConfig {
        match self {
            Backend::Block(b) => DeviceConfig::Block(b.config().clone()),
            Backend::Net(n) => DeviceConfig::Net(n.config().clone()),
        }
    }

    fn device_id(&self) -> u32 {
        match self {
            Backend::Block(_) => 2,
            Backend::Net(_) => 1,
        }
    }

    fn features(&self) -> u64 {
        F_VERSION_1
            | match self {
                Backend::Block(b) => b.features(),
                Backend::Net(_) => net::FEATURES,
            }
    }

    fn queues(&self) -> usize {
        match self {
            Backend::Block(_) => 1,
            Backend::Net(_) => 2,
        }
    }

    fn read_config(&self, off: u64, data: &mut [u8]) {
        let cfg = match self {
            Backend::Block(b) => b.config_space(),
            Backend::Net(n) => n.config_space(),
        };
        for (i, d) in data.iter_mut().enumerate() {
            *d = cfg.get(off as usize + i).copied().unwrap_or(0);
        }
    }
}

/// The transport registers a driver programs (saved and restored as they are).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    /// Device status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
}

/// A device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// MMIO slot.
    pub slot: u32,
    /// Registers.
    pub regs: Regs,
    /// Queues.
    pub queues: Vec<Queue>,
    /// The backend it was attached to.
    pub config: DeviceConfig,
    /// Backend state (disk identity after the flush, network counters).
    pub backend: BackendState,
}

/// Backend part of a device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendState {
    /// Disk: its identity once flushed (the destination checks it is the same file).
    Block(blk::DiskId),
    /// NIC: nothing beyond the configuration.
    Net,
}

/// One virtio-mmio device: registers, queues and backend.
pub struct Transport {
    slot: u32,
    ram: GuestRam,
    irq: EventFd,
    regs: Regs,
    queues: Vec<Queue>,
    backend: Backend,
    /// The VM is paused: no device activity (the network drops what arrives). Outside the
    /// lock: pausing must not wait for an access that waits for guest memory.
    paused: Arc<AtomicBool>,
}

impl Transport {
    fn new(slot: u32, ram: GuestRam, irq: EventFd, backend: Backend) -> Transport {
        let queues = vec![Queue::default(); backend.queues()];
        Transport {
            slot,
            ram,
            irq,
            regs: Regs::default(),
            queues,
            backend,
            paused: Arc::new(AtomicBool::new(false)),
        }
    }

    fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    fn driver_ok(&self) -> bool {
        self.regs.status & S_DRIVER_OK != 0 && self.regs.status & S_NEEDS_RESET == 0
    }

    fn reset(&mut self) {
        self.regs = Regs {
            config_generation: self.regs.config_generation,
            ..Regs::default()
        };
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// Raises the used-buffer interrupt.
    fn interrupt(&mut self) {
        self.regs.interrupt_status |= 1;
        if let Err(e) = self.irq.write(1) {
            log::warn!("virtio slot {}: interrupt: {e}", self.slot);
        }
    }

    /// A driver error on a queue: the device needs a reset.
    fn broken(&mut self, what: &str) {
        log::warn!(
            "virtio slot {} ({}): {what}; the device stops until the driver resets it",
            self.slot,
            self.backend.config().describe()
        );
        self.regs.status |= S_NEEDS_RESET;
        self.regs.interrupt_status |= 2;
        let _ = self.irq.write(1);
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.regs.queue_sel as usize)
    }

    fn read(&mut self, off: u64, data: &mut [u8]) {
        if off >= 0x100 {
            self.backend.read_config(off - 0x100, data);
            return;
        }
        let q = self.queues.get(self.regs.queue_sel as usize);
        let v: u32 = match off {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.backend.device_id(),
            0x00c => 0x554d_4551, // vendor "QEMU"-style id: drivers do not check it
            0x010 => {
                let f = self.backend.features();
                match self.regs.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => q.map_or(0, |_| u32::from(QUEUE_MAX)),
            0x044 => q.map_or(0, |q| u32::from(q.ready)),
            0x060 => self.regs.interrupt_status,
            0x070 => self.regs.status,
            0x0fc => self.regs.config_generation,
            _ => 0,
        };
        let b = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        if off >= 0x100 {
            return; // no writable config fields
        }
        let mut b = [0u8; 4];
        for (i, d) in data.iter().take(4).enumerate() {
            b[i] = *d;
        }
        let v = u32::from_le_bytes(b);
        let set_lo = |x: &mut u64, v: u32| *x = (*x & !0xffff_ffff) | u64::from(v);
        let set_hi = |x: &mut u64, v: u32| *x = (*x & 0xffff_ffff) | (u64::from(v) << 32);
        match off {
            0x014 => self.regs.device_features_sel = v,
            0x020 => {
                let offered = self.backend.features();
                let f = &mut self.regs.driver_features;
                match self.regs.driver_features_sel {
                    0 => set_lo(f, v & offered as u32),
                    1 => set_hi(f, v & (offered >> 32) as u32),
                    _ => {}
                }
            }
            0x024 => self.regs.driver_features_sel = v,
            0x030 => self.regs.queue_sel = v,
            0x038 => {
                if let Some(q) = self.queue() {
                    q.size = if v > 0 && v <= u32::from(QUEUE_MAX) && v.is_power_of_two() {
                        v as u16
                    } else {
                        0
                    };
                }
            }
            0x044 => {
                if let Some(q) = self.queue() {
                    q.ready = v == 1;
                }
            }
            0x050 => self.notify(v as usize),
            0x064 => self.regs.interrupt_status &= !v,
            0x070 => self.set_status(v),
            0x080 => self
                .queue()
                .into_iter()
                .for_each(|q| set_lo(&mut q.desc, v)),
            0x084 => self
                .queue()
                .into_iter()
                .for_each(|q| set_hi(&mut q.desc, v)),
            0x090 => self
                .queue()
                .into_iter()
                .for_each(|q| set_lo(&mut q.avail, v)),
            0x094 => self
                .queue()
                .into_iter()
                .for_each(|q| set_hi(&mut q.avail, v)),
            0x0a0 => self
                .queue()
                .into_iter()
                .for_each(|q| set_lo(&mut q.used, v)),
            0x0a4 => self
                .queue()
                .into_iter()
                .for_each(|q| set_hi(&mut q.used, v)),
            _ => log::debug!("virtio slot {}: write {v:#x} at +{off:#x}", self.slot),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        // FEATURES_OK sticks only for a driver that speaks virtio 1.x.
        if v & S_FEATURES_OK != 0
            && self.regs.status & S_FEATURES_OK == 0
            && self.regs.driver_features & F_VERSION_1 == 0
        {
            log::warn!(
                "virtio slot {}: driver did not accept VERSION_1; refusing FEATURES_OK",
                self.slot
            );
            v &= !S_FEATURES_OK;
        }
        self.regs.status = v | (self.regs.status & S_NEEDS_RESET);
        if v & S_ACKNOWLEDGE == 0 {
            log::debug!("virtio slot {}: status {v:#x}", self.slot);
        }
    }

    /// The driver made buffers available on queue `q`.
    fn notify(&mut self, q: usize) {
        if !self.driver_ok() || self.is_paused() {
            return;
        }
        let r = match &mut self.backend {
            Backend::Block(b) => b.process(&self.ram, &mut self.queues[..]),
            Backend::Net(n) => n.notify(q, &self.ram, &mut self.queues[..]),
        };
        match r {
            Ok(true) => self.interrupt(),
            Ok(false) => {}
            Err(e) => self.broken(&e.to_string()),
        }
    }

    /// Saves the device (the VM is paused). Flushes a disk first.
    fn save(&mut self) -> Result<TransportState, VirtioError> {
        let backend = match &mut self.backend {
            Backend::Block(b) => BackendState::Block(b.flush_and_identify()?),
            Backend::Net(_) => BackendState::Net,
        };
        Ok(TransportState {
            slot: self.slot,
            regs: self.regs.clone(),
            queues: self.queues.clone(),
            config: self.backend.config(),
            backend,
        })
    }
}

fn lock(m: &Mutex<Transport>) -> MutexGuard<'_, Transport> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// [`lock`], giving up at `deadline`: the lock's holder may be a device access waiting for a
/// page of guest memory that never comes (a migration whose source was lost).
fn lock_by(m: &Mutex<Transport>, deadline: Instant) -> Option<MutexGuard<'_, Transport>> {
    loop {
        match m.try_lock() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() >= deadline => return None,
            Err(std::sync::TryLockError::WouldBlock) => {
                std::thread::sleep(Duration::from_millis(1))
            }
        }
    }
}

/// How long a pause waits for a device's access in flight.
const PAUSE_WAIT: Duration = Duration::from_secs(5);
/// How long `status` waits for a device's counters.
const STATS_WAIT: Duration = Duration::from_millis(100);

/// A device plugged into a slot, with its helper thread (network receive).
pub struct Slot {
    transport: Arc<Mutex<Transport>>,
    paused: Arc<AtomicBool>,
    worker: Option<net::RxWorker>,
}

/// Every virtio device of a VM.
#[derive(Default)]
pub struct VirtioDevices {
    slots: Vec<Slot>,
}

impl VirtioDevices {
    /// Plugs `backends` into consecutive slots: `irq(slot)` gives each its interrupt eventfd
    /// (registered with KVM by the caller).
    pub fn new(
        ram: &GuestRam,
        backends: Vec<Backend>,
        mut irq: impl FnMut(u32) -> Result<EventFd, VirtioError>,
    ) -> Result<VirtioDevices, VirtioError> {
        if backends.len() > MMIO_SLOTS as usize {
            return Err(VirtioError::Config(format!(
                "{} virtio devices (at most {MMIO_SLOTS})",
                backends.len()
            )));
        }
        let mut slots = Vec::new();
        for (i, b) in backends.into_iter().enumerate() {
            let slot = i as u32;
            let t = Transport::new(slot, ram.clone(), irq(slot)?, b);
            slots.push(Slot::start(t)?);
        }
        Ok(VirtioDevices { slots })
    }

    /// Rebuilds devices from saved state on `backends` (opened from the states' configurations,
    /// in the same order).
    pub fn restore(
        ram: &GuestRam,
        states: &[TransportState],
        backends: Vec<Backend>,
        mut irq: impl FnMut(u32) -> Result<EventFd, VirtioError>,
    ) -> Result<VirtioDevices, VirtioError> {
        if states.len() != backends.len() {
            return Err(VirtioError::Config(format!(
                "{} device states for {} backends",
                states.len(),
                backends.len()
            )));
        }
        let mut slots = Vec::new();
        for (s, b) in states.iter().zip(backends) {
            if let (BackendState::Block(id), Backend::Block(disk)) = (&s.backend, &b) {
                // a disk being copied in gets its content from the source: nothing to compare
                if disk.copy_progress().is_none() {
                    disk.check_same(id)?;
                }
            }
            let mut t = Transport::new(s.slot, ram.clone(), irq(s.slot)?, b);
            if t.queues.len() != s.queues.len() {
                return Err(VirtioError::Config(format!(
                    "slot {}: {} queues saved, the device has {}",
                    s.slot,
                    s.queues.len(),
                    t.queues.len()
                )));
            }
            t.regs = s.regs.clone();
            t.queues = s.queues.clone();
            t.paused.store(true, Ordering::Release);
            slots.push(Slot::start(t)?);
        }
        Ok(VirtioDevices { slots })
    }

    /// Configurations of every device, in slot order.
    pub fn configs(&self) -> Vec<DeviceConfig> {
        self.slots
            .iter()
            .map(|s| lock(&s.transport).backend.config())
            .collect()
    }

    /// The devices as a migration offer names them.
    pub fn offered(&self) -> Vec<OfferedDevice> {
        self.slots
            .iter()
            .map(|s| {
                let t = lock(&s.transport);
                OfferedDevice {
                    config: t.backend.config(),
                    disk: match &t.backend {
                        Backend::Block(b) => Some(b.quick_id()),
                        Backend::Net(_) => None,
                    },
                    copy_from: None,
                }
            })
            .collect()
    }

    /// `(slot, GSI)` of every device (for a Linux command line).
    pub fn windows(&self) -> Vec<(u64, u32)> {
        self.slots
            .iter()
            .map(|s| {
                let slot = lock(&s.transport).slot;
                (MMIO_BASE + u64::from(slot) * MMIO_STRIDE, GSI_BASE + slot)
            })
            .collect()
    }

    /// An MMIO access: true if a device owns `addr`.
    pub fn mmio(&self, addr: u64, read: Option<&mut [u8]>, write: Option<&[u8]>) -> bool {
        if !(MMIO_BASE..MMIO_BASE + u64::from(MMIO_SLOTS) * MMIO_STRIDE).contains(&addr) {
            return false;
        }
        let slot = ((addr - MMIO_BASE) / MMIO_STRIDE) as usize;
        let off = (addr - MMIO_BASE) % MMIO_STRIDE;
        match self.slots.get(slot) {
            Some(s) => {
                let mut t = lock(&s.transport);
                if let Some(d) = read {
                    t.read(off, d);
                }
                if let Some(d) = write {
                    t.write(off, d);
                }
            }
            None => {
                if let Some(d) = read {
                    d.fill(0);
                }
            }
        }
        true
    }

    /// Stops (true) or restarts device activity with the vCPUs. Every device is flagged at
    /// once; then a pause waits (up to [`PAUSE_WAIT`]) for any access already in flight, and
    /// fails naming the device whose access does not end: one waiting for guest memory that
    /// never arrives would otherwise hold the VM for ever.
    pub fn set_paused(&self, paused: bool) -> Result<(), VirtioError> {
        // (a received frame waiting for a buffer is retried by its receive thread)
        for s in &self.slots {
            s.paused.store(paused, Ordering::Release);
        }
        if !paused {
            return Ok(());
        }
        let deadline = Instant::now() + PAUSE_WAIT;
        for (i, s) in self.slots.iter().enumerate() {
            if lock_by(&s.transport, deadline).is_none() {
                return Err(VirtioError::Busy(format!(
                    "virtio slot {i}: an access in flight did not end within {PAUSE_WAIT:?} \
                     (waiting for guest memory that has not arrived?)"
                )));
            }
        }
        Ok(())
    }

    /// Flushes every writable disk without stopping anything (before a pause whose save
    /// flushes again, so that flush finds little left).
    pub fn pre_flush(&self) {
        let files: Vec<_> = self
            .slots
            .iter()
            .filter_map(|s| match &lock(&s.transport).backend {
                Backend::Block(b) => b.flush_handle(),
                Backend::Net(_) => None,
            })
            .collect();
        for f in files {
            if let Err(e) = f.sync_data() {
                log::warn!("flushing a disk before the pause: {e}");
            }
        }
    }

    /// Saves every device (flushing disks).
    pub fn save(&self) -> Result<Vec<TransportState>, VirtioError> {
        self.slots
            .iter()
            .map(|s| lock(&s.transport).save())
            .collect()
    }

    /// Starts the background copy of every disk being copied in; `notify` hears how each ends.
    /// Returns how many copies started.
    pub fn start_disk_copies(
        &self,
        notify: impl Fn(DiskCopyEvent) + Clone + Send + 'static,
    ) -> usize {
        let mut started = 0;
        for s in &self.slots {
            let mut t = lock(&s.transport);
            let slot = t.slot;
            let Backend::Block(b) = &mut t.backend else {
                continue;
            };
            let Some(events) = b.start_copy() else {
                continue;
            };
            let tr = s.transport.clone();
            let n = notify.clone();
            match std::thread::Builder::new()
                .name(format!("disk-copy{slot}"))
                .spawn(move || copy_thread(slot, tr, events, n))
            {
                Ok(_) => started += 1,
                Err(e) => log::error!("disk slot {slot}: cannot start its copy thread: {e}"),
            }
        }
        started
    }

    /// Disks still being copied in.
    pub fn copies_pending(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| match &lock(&s.transport).backend {
                Backend::Block(b) => b.copy_progress().is_some(),
                Backend::Net(_) => false,
            })
            .count()
    }

    /// Announces every NIC on its network (after the VM arrived by migration).
    pub fn announce(&self) {
        for s in &self.slots {
            if let Some(w) = &s.worker {
                w.announce();
            }
        }
    }

    /// Per-device counters for `status`.
    pub fn stats(&self) -> Vec<serde_json::Value> {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let Some(t) = lock_by(&s.transport, Instant::now() + STATS_WAIT) else {
                    return serde_json::json!({
                        "slot": i,
                        "busy": "an access in flight (waiting for guest memory?)",
                    });
                };
                let mut v = serde_json::json!({
                    "slot": t.slot,
                    "device": t.backend.config().describe(),
                    "driver_ok": t.driver_ok(),
                });
                match &t.backend {
                    Backend::Block(b) => v["block"] = b.stats(),
                    Backend::Net(n) => v["net"] = n.stats(),
                }
                v
            })
            .collect()
    }
}

impl Slot {
    fn start(t: Transport) -> Result<Slot, VirtioError> {
        let rx = match &t.backend {
            Backend::Net(n) => Some(n.rx_parts()?),
            Backend::Block(_) => None,
        };
        let paused = t.paused.clone();
        let transport = Arc::new(Mutex::new(t));
        let worker = match rx {
            Some(parts) => Some(net::RxWorker::spawn(transport.clone(), parts)?),
            None => None,
        };
        Ok(Slot {
            transport,
            paused,
            worker,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device access that does not end (in the field: one waiting for guest memory whose
    /// source was lost) fails a pause after [`PAUSE_WAIT`] instead of holding it for ever, and
    /// `status` shows the device busy; once the access ends, pausing works again.
    #[test]
    fn a_stuck_device_access_fails_the_pause_instead_of_hanging_it() {
        let dir = std::env::temp_dir().join(format!("vmm-stuck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let disk = blk::Block::open(&blk::BlockConfig {
            path: path.clone(),
            readonly: false,
        })
        .unwrap();
        let ram = GuestRam::new(2 << 20).unwrap();
        let devs = VirtioDevices::new(&ram, vec![Backend::Block(disk)], |_| {
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| VirtioError::Config(format!("eventfd: {e}")))
        })
        .unwrap();
        let t = devs.slots[0].transport.clone();
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (end_tx, end_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _g = lock(&t);
            held_tx.send(()).unwrap();
            let _ = end_rx.recv();
        });
        held_rx.recv().unwrap();
        let t0 = Instant::now();
        let e = devs.set_paused(true).unwrap_err();
        let took = t0.elapsed();
        assert!(matches!(e, VirtioError::Busy(_)), "{e}");
        assert!(e.to_string().contains("slot 0"), "{e}");
        assert!(
            took >= PAUSE_WAIT && took < PAUSE_WAIT + Duration::from_secs(2),
            "{took:?}"
        );
        assert!(devs.slots[0].paused.load(Ordering::Acquire));
        assert!(devs.stats()[0]["busy"].is_string(), "{:?}", devs.stats());
        end_tx.send(()).unwrap();
        holder.join().unwrap();
        devs.set_paused(true).unwrap();
        assert!(devs.stats()[0]["busy"].is_null());
        devs.set_paused(false).unwrap();
        assert!(!devs.slots[0].paused.load(Ordering::Acquire));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
