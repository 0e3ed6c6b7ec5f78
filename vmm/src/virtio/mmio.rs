//! The virtio-mmio transport: a device's registers and queues, its opened backend, and the
//! register accesses a driver makes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{Backend, F_VERSION_1};
use super::blk;
use super::config::DeviceConfig;
use super::error::VirtioError;
use super::queue::Queue;
use crate::memory::GuestRam;
use crate::persist::Persist;

const MAGIC: u32 = 0x7472_6976;
const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;
/// Largest queue a driver may set up.
pub const QUEUE_MAX: u16 = 256;

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
    pub(super) slot: u32,
    pub(super) ram: GuestRam,
    pub(super) irq: EventFd,
    pub(super) regs: Regs,
    pub(super) queues: Vec<Queue>,
    pub(super) backend: Backend,
    /// The VM is paused: no device activity (the network drops what arrives). Outside the
    /// lock: pausing must not wait for an access that waits for guest memory.
    pub(super) paused: Arc<AtomicBool>,
}

impl Transport {
    pub(super) fn new(slot: u32, ram: GuestRam, irq: EventFd, backend: Backend) -> Transport {
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

    pub(super) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    pub(super) fn driver_ok(&self) -> bool {
        self.regs.status & S_DRIVER_OK != 0 && self.regs.status & S_NEEDS_RESET == 0
    }

    pub(super) fn reset(&mut self) {
        self.regs = Regs {
            config_generation: self.regs.config_generation,
            ..Regs::default()
        };
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// Raises the used-buffer interrupt.
    pub(super) fn interrupt(&mut self) {
        self.regs.interrupt_status |= 1;
        if let Err(e) = self.irq.write(1) {
            log::warn!("virtio slot {}: interrupt: {e}", self.slot);
        }
    }

    /// A driver error on a queue: the device needs a reset.
    pub(super) fn broken(&mut self, what: &str) {
        log::warn!(
            "virtio slot {} ({}): {what}; the device stops until the driver resets it",
            self.slot,
            self.backend.config().describe()
        );
        self.regs.status |= S_NEEDS_RESET;
        self.regs.interrupt_status |= 2;
        let _ = self.irq.write(1);
    }

    pub(super) fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.regs.queue_sel as usize)
    }

    pub(super) fn read(&mut self, off: u64, data: &mut [u8]) {
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

    pub(super) fn write(&mut self, off: u64, data: &[u8]) {
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

    pub(super) fn set_status(&mut self, v: u32) {
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
    pub(super) fn notify(&mut self, q: usize) {
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
}

impl Persist for Transport {
    type State = TransportState;
    /// Guest RAM, the device's interrupt (for the state's slot) and its backend, opened from
    /// the state's configuration.
    type Args = (GuestRam, EventFd, Backend);
    type Error = VirtioError;

    /// Saves the device (the VM is paused). Flushes a disk first.
    fn save(&self) -> Result<TransportState, VirtioError> {
        let backend = match &self.backend {
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

    /// Rebuilds the device, paused, refusing a disk that is not the one saved (unless it is
    /// being copied in) and a queue count that is not the device's.
    fn restore((ram, irq, b): Self::Args, s: &TransportState) -> Result<Transport, VirtioError> {
        if let (BackendState::Block(id), Backend::Block(disk)) = (&s.backend, &b) {
            // a disk being copied in gets its content from the source: nothing to compare
            if disk.copy_progress().is_none() {
                disk.check_same(id)?;
            }
        }
        let mut t = Transport::new(s.slot, ram, irq, b);
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
        Ok(t)
    }
}

pub(super) fn lock(m: &Mutex<Transport>) -> MutexGuard<'_, Transport> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// [`lock`], giving up at `deadline`: the lock's holder may be a device access waiting for a
/// page of guest memory that never comes (a migration whose source was lost).
pub(super) fn lock_by(
    m: &Mutex<Transport>,
    deadline: Instant,
) -> Option<MutexGuard<'_, Transport>> {
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
pub(super) const PAUSE_WAIT: Duration = Duration::from_secs(5);
/// How long `status` waits for a device's counters.
pub(super) const STATS_WAIT: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    fn eventfd() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    fn disk(path: &std::path::Path) -> Backend {
        Backend::Block(
            blk::Block::open(&blk::BlockConfig {
                path: path.to_path_buf(),
                readonly: false,
            })
            .unwrap(),
        )
    }

    /// A device as a driver left it (registers, queue addresses and positions) comes back the
    /// same from its saved state, paused; a different disk or queue count is refused.
    #[test]
    fn a_device_round_trips_through_its_state() {
        let dir = std::env::temp_dir().join(format!("vmm-transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.img"), dir.join("b.img"));
        std::fs::write(&a, vec![1u8; 1 << 20]).unwrap();
        std::fs::write(&b, vec![2u8; 2 << 20]).unwrap();
        let ram = GuestRam::new(2 << 20).unwrap();
        let mut t = Transport::new(3, ram.clone(), eventfd(), disk(&a));
        t.regs = Regs {
            status: S_ACKNOWLEDGE | S_FEATURES_OK | S_DRIVER_OK,
            driver_features: 1 << 32,
            queue_sel: 0,
            interrupt_status: 1,
            config_generation: 2,
            ..Regs::default()
        };
        t.queues[0] = Queue {
            size: 128,
            ready: true,
            desc: 0x10_0000,
            avail: 0x10_1000,
            used: 0x10_2000,
            next_avail: 77,
            next_used: 75,
        };
        let saved = t.save().unwrap();
        assert_eq!(saved.slot, 3);
        assert!(matches!(saved.backend, BackendState::Block(_)));
        let back = Transport::restore((ram.clone(), eventfd(), disk(&a)), &saved).unwrap();
        assert!(back.is_paused());
        assert!(back.driver_ok());
        assert_eq!(back.save().unwrap(), saved);
        // another file where the disk was: refused
        let e = Transport::restore((ram.clone(), eventfd(), disk(&b)), &saved)
            .err()
            .expect("another disk is refused");
        assert!(e.to_string().contains("not the source's disk"), "{e}");
        // a state with a queue the device does not have: refused
        let mut odd = saved.clone();
        odd.queues.push(Queue::default());
        let e = Transport::restore((ram, eventfd(), disk(&a)), &odd)
            .err()
            .expect("a queue count that does not fit is refused");
        assert!(e.to_string().contains("2 queues saved"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
