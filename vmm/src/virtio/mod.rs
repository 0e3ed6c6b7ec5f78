//! virtio-mmio devices (virtio 1.x, "version 2" register layout): the transport with its
//! registers and split queues, a block device on a raw image file ([`blk`]) and a network
//! device on a tap ([`net`]).
//!
//! Slot `i` sits at guest-physical [`MMIO_BASE`] + `i` × [`MMIO_STRIDE`] and raises GSI
//! [`GSI_BASE`] + `i` through an irqfd (our guest polls; Linux finds them as ACPI devices
//! `LNRO0005` in the DSDT, `crate::arch::acpi`, or with `acpi=off` through `virtio_mmio.device=`). Block requests complete on the vCPU
//! thread that notifies, inside the MMIO write, so a paused VM has no request in flight; the
//! network device receives on its own thread, which delivers nothing while the VM is paused.
//! A device's complete state ([`TransportState`]) is a few registers, its queues and its
//! backend's configuration: it migrates with the vCPUs; the backend (file, tap) is re-opened on
//! the destination, never copied.

mod backend;
pub mod blk;
mod config;
mod copy;
mod error;
mod mmio;
pub mod net;
pub mod queue;
mod rx;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use crate::api::replies::DeviceStatus;
use crate::memory::GuestRam;
use crate::persist::Persist;
pub use backend::{open_offered, Backend, F_VERSION_1};
pub use config::{DeviceConfig, OfferedDevice};
use copy::copy_thread;
pub use copy::DiskCopyEvent;
pub use error::VirtioError;
use mmio::{lock, lock_by, PAUSE_WAIT, STATS_WAIT};
pub use mmio::{BackendState, Regs, Transport, TransportState, QUEUE_MAX};

/// First device's MMIO window.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Bytes per device window.
pub const MMIO_STRIDE: u64 = 0x1000;
/// Device slots.
pub const MMIO_SLOTS: u32 = 8;
/// GSI of slot 0.
pub const GSI_BASE: u32 = 5;

/// A device plugged into a slot, with its helper thread (network receive).
pub struct Slot {
    transport: Arc<Mutex<Transport>>,
    paused: Arc<AtomicBool>,
    worker: Option<rx::RxWorker>,
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
        // a state file or a migration peer may say anything: the slot cap and each slot's
        // place hold on restore as on boot (a slot past the cap is MMIO outside the window)
        if states.len() > MMIO_SLOTS as usize {
            return Err(VirtioError::Config(format!(
                "{} virtio devices in the saved state (at most {MMIO_SLOTS})",
                states.len()
            )));
        }
        for (i, s) in states.iter().enumerate() {
            if s.slot != i as u32 {
                return Err(VirtioError::Config(format!(
                    "saved device {i} claims slot {} (devices take consecutive slots from 0)",
                    s.slot
                )));
            }
        }
        let mut slots = Vec::new();
        for (s, b) in states.iter().zip(backends) {
            let t = Transport::restore((ram.clone(), irq(s.slot)?, b), s)?;
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
            .map(|s| Persist::save(&*lock(&s.transport)))
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
    pub fn stats(&self) -> Vec<DeviceStatus> {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let Some(t) = lock_by(&s.transport, Instant::now() + STATS_WAIT) else {
                    return DeviceStatus {
                        slot: i as u32,
                        device: None,
                        driver_ok: None,
                        busy: Some("an access in flight (waiting for guest memory?)".into()),
                        block: None,
                        net: None,
                    };
                };
                let (block, net) = match &t.backend {
                    Backend::Block(b) => (Some(b.stats()), None),
                    Backend::Net(n) => (None, Some(n.stats())),
                };
                DeviceStatus {
                    slot: t.slot,
                    device: Some(t.backend.config().describe()),
                    driver_ok: Some(t.driver_ok()),
                    busy: None,
                    block,
                    net,
                }
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
            Some(parts) => Some(rx::RxWorker::spawn(transport.clone(), parts)?),
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
    use std::time::Duration;

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
        assert!(devs.stats()[0].busy.is_some(), "{:?}", devs.stats());
        end_tx.send(()).unwrap();
        holder.join().unwrap();
        devs.set_paused(true).unwrap();
        assert!(devs.stats()[0].busy.is_none());
        devs.set_paused(false).unwrap();
        assert!(!devs.slots[0].paused.load(Ordering::Acquire));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
