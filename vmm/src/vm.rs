//! The VM: KVM objects, guest RAM, devices and vCPU threads, built fresh
//! (boot) or from a snapshot (eager or lazy restore), and the controller loop
//! that serves the control socket and reacts to vCPUs, devices and the pager.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};

use pager::{Pager, PagerEvent};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{Exit, SerialOut};
use crate::error::{kvm_err, VmError};

mod launch;
mod migrate;
mod requests;
pub mod restore;
mod roles;
use crate::api::server::Incoming;
use crate::api::Request;
use crate::chips::Chips;
use crate::devices::{ConsoleOut, DeviceEvent, Devices, COM1_GSI};
use crate::memory::GuestRam;
use crate::persist::Persist;
use crate::state::{MachineConfig, Snapshot, MAX_VCPUS};
use crate::vcpu::{self, Command, Vcpu, VcpuHandle, VcpuReport};
use crate::virtio::VirtioError;

/// Set as early as possible in `main`: restore timings count from here.
pub static PROCESS_START: OnceLock<Instant> = OnceLock::new();

fn since_start() -> Duration {
    PROCESS_START.get_or_init(Instant::now).elapsed()
}

/// Everything the controller reacts to.
pub enum Event {
    /// From a vCPU thread.
    Vcpu(VcpuReport),
    /// From a device.
    Device(DeviceEvent),
    /// From the control socket.
    Control(Incoming),
    /// Console input from stdin.
    Input(Vec<u8>),
    /// From the pager (lazy restore).
    Pager(PagerEvent),
    /// SIGINT / SIGTERM.
    Signal(i32),
    /// From the migration thread (source side).
    Migration(crate::migration::controller::MigEvent),
    /// A disk copy-in ended (destination of `migrate --copy-disk`).
    DiskCopy(crate::virtio::DiskCopyEvent),
}

/// The guest's CPU as a migration destination must provide it.
#[derive(Debug, Clone, Default)]
pub struct GuestCpu {
    /// CPUID of vCPU 0.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs saved per vCPU.
    pub msrs: Vec<u32>,
    /// Guest TSC frequency.
    pub tsc_khz: u32,
}

impl GuestCpu {
    fn from_snapshot(s: &Snapshot) -> GuestCpu {
        s.vcpus
            .first()
            .map(|v| GuestCpu {
                cpuid: v.cpuid.clone(),
                msrs: v.msrs.iter().map(|&(i, _)| i).collect(),
                tsc_khz: v.tsc_khz,
            })
            .unwrap_or_default()
    }
}

/// Timings of how the VM came up.
#[derive(Debug, Clone, Default)]
pub struct StartTimes {
    /// Process start → vCPUs running.
    pub running_after: Duration,
    /// Reading / applying the state file.
    pub state_load: Duration,
    /// Loading memory (eager) or connecting the pager (lazy).
    pub memory_load: Duration,
}

/// A VM.
pub struct Vm {
    _kvm: Kvm,
    fd: VmFd,
    ram: GuestRam,
    devices: Arc<Devices>,
    vcpus: Vec<VcpuHandle>,
    events: Receiver<Event>,
    tx: Sender<Event>,
    stash: VecDeque<Event>,
    config: MachineConfig,
    paused: bool,
    /// kvmclock when the vCPUs stopped: set again on resume, so guest time does not advance
    /// while the VM is paused (or saved).
    paused_clock: Option<kvm_bindings::kvm_clock_data>,
    pager: Option<Pager>,
    memory_complete_after: Option<Duration>,
    /// The memory source (or a disk's) is gone for good: why, and since when. The VM stays
    /// paused and is never run again; see `on_source_lost`.
    lost: Option<(String, Instant)>,
    times: StartTimes,
    created: Instant,
    guest: GuestCpu,
    /// Migrating away.
    source: Option<roles::Source>,
    /// Arrived by migration, still paging in.
    dest: Option<roles::Dest>,
    /// Serves guest RAM after a migration whose outcome is unknown.
    kept_server: Vec<page_server::ServerHandle>,
    /// Pages KVM owned when the migration paused the VM (left out of RAM comparisons).
    kvm_pages_at_pause: Vec<u64>,
    /// Dirty tracking, on during a migration's pre-copy.
    dirty_log: Option<crate::dirty::Tracker>,
    /// Announce the NICs (RARP) at the next resume: the VM just arrived.
    announce_pending: bool,
    /// Disk copy-ins started when the VM arrived (`migrate --copy-disk`).
    disk_copies_started: usize,
    /// How a migration away is authenticated and encrypted.
    security: transport::Security,
    /// A vCPU thread did not stop when asked (see `Drop`).
    vcpu_stuck: bool,
}

fn console_out(s: &SerialOut) -> Result<ConsoleOut, VmError> {
    Ok(match s {
        SerialOut::Stdout => Box::new(std::io::stdout()),
        SerialOut::File(p) => Box::new(crate::devices::Capped::new(
            std::fs::File::create(p).map_err(|source| VmError::Os {
                what: "creating the serial output file",
                source,
            })?,
            crate::devices::SERIAL_FILE_CAP,
        )),
    })
}

struct Shell {
    kvm: Kvm,
    fd: VmFd,
    ram: GuestRam,
    irq: EventFd,
}

/// /dev/kvm, the VM, in-kernel irqchip + PIT, guest RAM in memory slots.
fn shell(ram: GuestRam) -> Result<Shell, VmError> {
    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    fd.set_tss_address(0xfffb_d000)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    fd.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    if let Err(e) = crate::arch::cpuid::deny_pmu_msrs(&fd) {
        log::info!("KVM_X86_SET_MSR_FILTER: {e}; the guest's performance-counter MSRs are left to this host's KVM");
    }
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Os {
        what: "eventfd for the serial IRQ",
        source,
    })?;
    fd.register_irqfd(&irq, COM1_GSI)
        .map_err(kvm_err("KVM_IRQFD"))?;
    Ok(Shell { kvm, fd, ram, irq })
}

/// Puts guest RAM into KVM memory slots. The first slot of a VM costs a few ms on some hosts
/// (5-10 ms on the nested development host) whatever its size: restore overlaps it with other
/// work.
fn set_memslots(fd: &VmFd, ram: &GuestRam) -> Result<(), VmError> {
    let t = Instant::now();
    for (slot, (gpa, host, len)) in ram.host_regions().into_iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host,
            flags: 0,
        };
        // SAFETY: the region is our live mapping of `len` bytes, owned by `ram`, which the Vm
        // keeps until after the VM fd is closed (field order in Vm: fd drops before ram).
        unsafe { fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    log::debug!("memory slots set in {:?}", t.elapsed());
    Ok(())
}

fn check_shape(mem_bytes: u64, vcpus: u32) -> Result<(), VmError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(VmError::Config(format!(
            "{vcpus} vCPUs (1 to {MAX_VCPUS} supported)"
        )));
    }
    if mem_bytes < (32 << 20) {
        return Err(VmError::Config(format!(
            "{mem_bytes} bytes of memory (at least 32 MiB)"
        )));
    }
    Ok(())
}

impl Vm {
    fn assemble(
        sh: Shell,
        devices: Arc<Devices>,
        vcpus: Vec<Vcpu>,
        tx: Sender<Event>,
        rx: Receiver<Event>,
        config: MachineConfig,
    ) -> Result<Vm, VmError> {
        vcpu::install_kick_handler().map_err(|source| VmError::Os {
            what: "installing the vCPU kick signal handler",
            source,
        })?;
        let mut handles = Vec::new();
        // One thread forwards every vCPU's reports (they name their vCPU) into the
        // controller's queue: a thread spawn is downtime on a migration's destination.
        let (rtx, rrx) = std::sync::mpsc::channel();
        for v in vcpus {
            let h = VcpuHandle::spawn(v, devices.clone(), rtx.clone()).map_err(|source| {
                VmError::Os {
                    what: "spawning a vCPU thread",
                    source,
                }
            })?;
            handles.push(h);
        }
        drop(rtx);
        let reports = tx.clone();
        let _ = std::thread::Builder::new()
            .name("vcpu-reports".into())
            .spawn(move || {
                for r in rrx {
                    if reports.send(Event::Vcpu(r)).is_err() {
                        return;
                    }
                }
            });
        Ok(Vm {
            _kvm: sh.kvm,
            fd: sh.fd,
            ram: sh.ram,
            devices,
            vcpus: handles,
            events: rx,
            tx,
            stash: VecDeque::new(),
            config,
            paused: true,
            paused_clock: None,
            pager: None,
            memory_complete_after: None,
            lost: None,
            times: StartTimes::default(),
            created: Instant::now(),
            guest: GuestCpu::default(),
            source: None,
            dest: None,
            kept_server: Vec::new(),
            kvm_pages_at_pause: Vec::new(),
            dirty_log: None,
            announce_pending: false,
            disk_copies_started: 0,
            security: transport::Security::default(),
            vcpu_stuck: false,
        })
    }

    /// A sender for events (signals, tests).
    pub fn sender(&self) -> Sender<Event> {
        self.tx.clone()
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// How the VM came up.
    pub fn times(&self) -> &StartTimes {
        &self.times
    }

    /// Starts the pager's background stream (a VM whose pager was connected with the stream
    /// deferred).
    pub fn start_stream(&self) -> Result<(), pager::PagerError> {
        match &self.pager {
            Some(p) => p.start_stream(),
            None => Ok(()),
        }
    }

    /// Runs every vCPU.
    pub fn resume(&mut self) {
        if let Some(mut clock) = self.paused_clock.take() {
            clock.flags = 0;
            if let Err(e) = self.fd.set_clock(&clock) {
                log::warn!("KVM_SET_CLOCK on resume: {e}; guest time includes the pause");
            }
        }
        // (un-pausing waits for nothing and cannot fail)
        let _ = self.devices.virtio.set_paused(false);
        for v in &self.vcpus {
            v.send(Command::Resume);
        }
        self.paused = false;
        if std::mem::take(&mut self.announce_pending) {
            self.devices.virtio.announce();
        }
    }

    /// The NICs are announced on their networks when the VM next resumes (it arrived by
    /// migration: bridges still send its frames to the old host).
    pub fn announce_on_resume(&mut self) {
        self.announce_pending = true;
    }

    /// Stops every vCPU and waits until each has left the guest.
    pub fn pause(&mut self) -> Result<(), VmError> {
        if self.paused {
            return Ok(());
        }
        for v in &self.vcpus {
            v.send(Command::Pause);
        }
        let timeout = Duration::from_secs(5);
        let deadline = Instant::now() + timeout;
        let mut waiting: Vec<u32> = self.vcpus.iter().map(|v| v.index).collect();
        while !waiting.is_empty() {
            if Instant::now() > deadline {
                return Err(VmError::PauseTimeout(timeout));
            }
            match self.events.recv_timeout(Duration::from_millis(1)) {
                Ok(Event::Vcpu(VcpuReport::Paused(i))) => waiting.retain(|&w| w != i),
                Ok(Event::Vcpu(VcpuReport::Running(_))) => {}
                Ok(other) => self.stash.push_back(other),
                Err(_) => {
                    for v in self.vcpus.iter().filter(|v| waiting.contains(&v.index)) {
                        v.kick();
                    }
                }
            }
        }
        self.paused = true;
        // the vCPUs are paused; a device access still in flight that does not end (one
        // waiting for guest memory that never comes) fails the pause instead of holding it
        let devices = self.devices.virtio.set_paused(true);
        match self.fd.get_clock() {
            Ok(c) => self.paused_clock = Some(c),
            Err(e) => log::warn!("KVM_GET_CLOCK on pause: {e}; guest time will include the pause"),
        }
        devices?;
        Ok(())
    }

    /// Captures the complete non-memory state (pauses first).
    pub fn save(&mut self) -> Result<Snapshot, VmError> {
        let t0 = Instant::now();
        self.pause()?;
        let t_pause = t0.elapsed();
        // Every vCPU thread saves its own state, all at once (a vCPU is ~a dozen ioctls).
        let replies: Vec<_> = self
            .vcpus
            .iter()
            .map(|v| {
                let (tx, rx) = std::sync::mpsc::channel();
                v.send(Command::Save(tx));
                rx
            })
            .collect();
        let mut vcpus = Vec::new();
        for rx in replies {
            let s = rx
                .recv_timeout(Duration::from_secs(5))
                .map_err(|_| VmError::PauseTimeout(Duration::from_secs(5)))??;
            vcpus.push(s);
        }
        let t_vcpus = t0.elapsed();
        let mut vm = Chips(&self.fd).save()?;
        // Guest time stopped when the vCPUs did.
        if let Some(c) = self.paused_clock {
            vm.clock = c;
        }
        let t_vm = t0.elapsed();
        let devices = self.devices.save()?;
        log::debug!(
            "state saved in {:?}: pause (devices flushed) {t_pause:?}, vCPUs {:?}, VM {:?}, devices {:?}",
            t0.elapsed(),
            t_vcpus - t_pause,
            t_vm - t_vcpus,
            t0.elapsed() - t_vm
        );
        Ok(Snapshot {
            config: self.config.clone(),
            vm,
            vcpus,
            devices,
        })
    }

    /// Serves events until the VM ends.
    pub fn run(&mut self) -> Exit {
        loop {
            let ev = match self.stash.pop_front() {
                Some(e) => e,
                None => match self.dest_tick() {
                    None => match self.events.recv() {
                        Ok(e) => e,
                        Err(_) => return Exit::Fatal("event channel closed".into()),
                    },
                    Some(wait) => match self.events.recv_timeout(wait) {
                        Ok(e) => e,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(_) => return Exit::Fatal("event channel closed".into()),
                    },
                },
            };
            match ev {
                Event::Control((
                    Request::Migrate {
                        to,
                        mode,
                        verify,
                        max_passes,
                        threshold_pages,
                        max_downtime_ms,
                        dirty_tracking,
                        copy_disk,
                        recover_timeout_s,
                    },
                    reply,
                )) => {
                    let mut plan = crate::migration::Plan::parse(
                        mode.as_deref(),
                        max_passes,
                        threshold_pages,
                        max_downtime_ms,
                        verify,
                    );
                    plan.dirty_tracking = dirty_tracking;
                    plan.copy_disk = copy_disk;
                    if let Some(s) = recover_timeout_s {
                        plan.recover_timeout = Duration::from_secs(s);
                    }
                    self.start_migration(to, plan, reply);
                }
                Event::Migration(m) => {
                    if let Some(exit) = self.on_migration(m) {
                        return exit;
                    }
                }
                Event::DiskCopy(d) => {
                    if let Some(exit) = self.on_disk_copy(d) {
                        return exit;
                    }
                }
                Event::Control((req, reply)) => {
                    let (r, exit) = self.handle_request(req);
                    let _ = reply.send(r);
                    if let Some(e) = exit {
                        return e;
                    }
                }
                Event::Vcpu(VcpuReport::Reset(i)) => {
                    log::info!("vcpu{i}: guest reset / triple fault; the VM ends");
                    return Exit::GuestReset;
                }
                Event::Device(DeviceEvent::Reset) => {
                    log::info!("guest reset through the i8042; the VM ends");
                    return Exit::GuestReset;
                }
                Event::Vcpu(VcpuReport::Fatal(i, what)) => {
                    let _ = self.pause();
                    return Exit::Fatal(format!("vcpu{i}: {what}"));
                }
                Event::Vcpu(_) => {}
                Event::Input(bytes) => {
                    self.devices
                        .console
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .input(&bytes);
                }
                Event::Pager(PagerEvent::Complete) => {
                    self.dest_complete();
                    let d = self.created.elapsed();
                    self.memory_complete_after = Some(d);
                    if let Some(p) = &self.pager {
                        log::info!(
                            "all guest memory present {:.1} ms after resume\n{}",
                            d.as_secs_f64() * 1e3,
                            p.report()
                        );
                    }
                }
                Event::Pager(PagerEvent::SourceLost { cause: why }) => {
                    log::warn!("memory source lost ({why}); faulting vCPUs wait while the pager reconnects");
                }
                Event::Pager(PagerEvent::Reconnected { count }) => {
                    log::info!("memory source reconnected ({count} so far)")
                }
                Event::Pager(PagerEvent::Failed { reason: why }) => self.on_source_lost(why),
                Event::Signal(s) => {
                    log::info!("signal {s}: shutting down");
                    return self.exit_now();
                }
            }
        }
    }

    /// Stops every vCPU thread.
    /// Stops every vCPU thread; false when one did not stop (see [`VcpuHandle::stop`]).
    pub fn stop(&mut self) -> bool {
        let mut all = true;
        for v in &mut self.vcpus {
            all &= v.stop();
        }
        self.vcpu_stuck |= !all;
        all
    }
}

impl Vm {
    /// How a migration away from this VM is secured (see [`transport::Security`]).
    pub fn set_security(&mut self, s: transport::Security) {
        self.security = s;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The migration thread and any page-server read guest RAM: they go first.
        self.source = None;
        self.kept_server.clear();
        if !self.stop() || self.vcpu_stuck {
            // A vCPU still running (blocked on a page that never came) would see every
            // missing page as zeros once the userfaultfd closes, and could write them to a
            // disk: the pager is kept (leaked) instead, so such a vCPU stays blocked.
            if let Some(p) = self.pager.take() {
                log::error!(
                    "a vCPU did not stop: keeping the pager open so that it never reads missing memory as zeros"
                );
                std::mem::forget(p);
            }
        }
        // The pager goes before the RAM it pages.
        self.pager = None;
    }
}

/// Interrupt eventfds for virtio slots, each registered as the slot's GSI.
pub(crate) fn virtio_irq(fd: &VmFd) -> impl FnMut(u32) -> Result<EventFd, VirtioError> + '_ {
    move |slot| {
        let e = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VirtioError::Config(format!("eventfd: {e}")))?;
        fd.register_irqfd(&e, crate::virtio::GSI_BASE + slot)
            .map_err(|e| VirtioError::Config(format!("KVM_IRQFD for virtio slot {slot}: {e}")))?;
        Ok(e)
    }
}

fn clone_fd(e: &EventFd) -> Result<EventFd, VmError> {
    e.try_clone().map_err(|source| VmError::Os {
        what: "duplicating an eventfd",
        source,
    })
}

fn device_sender(tx: &Sender<Event>) -> Sender<DeviceEvent> {
    let (dtx, drx) = std::sync::mpsc::channel();
    let tx = tx.clone();
    let _ = std::thread::Builder::new()
        .name("device-events".into())
        .spawn(move || {
            for e in drx {
                if tx.send(Event::Device(e)).is_err() {
                    return;
                }
            }
        });
    dtx
}

fn forward_stdin(tx: Sender<Event>) {
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || tx.send(Event::Input(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        });
}
