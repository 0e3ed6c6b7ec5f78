//! vCPUs: initial setup, complete state save / restore, and the vCPU thread.
//!
//! Each vCPU has its own thread that owns the `VcpuFd`. The controller talks
//! to it through a command channel and "kicks" it out of `KVM_RUN` with a
//! signal (re-sent until the thread answers, which closes the race between
//! checking the channel and entering the guest).

use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::Devices;
use crate::state::{Persist, StateError, VcpuState};

/// MSRs never saved: KVM lists them, but hosts refuse them (arch capabilities
/// on nested hosts) or they are read-only views.
const SKIPPED_MSRS: &[u32] = &[0x10a];
/// Restored last: the TSC deadline is relative to the TSC, restored first; and once more after
/// the LAPIC (see `Persist::restore`).
const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// IA32_TSC.
const MSR_TSC: u32 = 0x10;

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { op, source }
}

/// Orders the saveable MSR list: TSC first, TSC deadline last, skipped ones out.
pub fn order_msrs(list: &[u32]) -> Vec<u32> {
    let mut v: Vec<u32> = list
        .iter()
        .copied()
        .filter(|i| !SKIPPED_MSRS.contains(i))
        .collect();
    v.sort_by_key(|&i| match i {
        MSR_TSC => 0,
        MSR_TSC_DEADLINE => 2,
        _ => 1,
    });
    v
}

/// Keeps the MSRs of `list` this vCPU can read (KVM may list MSRs the host
/// CPU or a nested hypervisor does not support).
pub fn readable_msrs(fd: &VcpuFd, list: &[u32]) -> Vec<u32> {
    list.iter()
        .copied()
        .filter(|&index| {
            let mut one = match Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }]) {
                Ok(m) => m,
                Err(_) => return false,
            };
            matches!(fd.get_msrs(&mut one), Ok(1))
        })
        .collect()
}

fn msrs_of(entries: &[(u32, u64)]) -> Result<Msrs, StateError> {
    let e: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&e).map_err(|e| StateError::Invalid(format!("MSR list: {e:?}")))
}

/// KVM_SET_MSRS one MSR at a time, each timed: a diagnosis of a slow restore (`RUST_LOG=trace`)
/// that names the MSRs that cost more than 100 µs. Returns how many were set, like the ioctl.
fn set_msrs_one_by_one(index: u32, fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<usize, StateError> {
    let mut slow = Vec::new();
    for (n, &m) in msrs.iter().enumerate() {
        let t = Instant::now();
        if fd.set_msrs(&msrs_of(&[m])?).map_err(kvm("KVM_SET_MSRS"))? != 1 {
            return Ok(n);
        }
        let took = t.elapsed();
        if took.as_micros() > 100 {
            slow.push(format!("{:#x}={:#x}: {took:?}", m.0, m.1));
        }
    }
    log::trace!(
        "vcpu{index}: MSRs over 100 us to set: [{}]",
        slow.join(", ")
    );
    Ok(msrs.len())
}

/// A vCPU and the MSR list it saves.
pub struct Vcpu {
    /// vCPU index (= APIC id).
    pub index: u32,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// MSRs saved for this vCPU, in restore order.
    pub msr_list: Vec<u32>,
    /// The CPUID this vCPU was given. Saved as is: KVM_GET_CPUID2 may not return what was set
    /// (under PVM it reports the host's full feature set), and a migration destination checks
    /// what the guest really saw.
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
}

impl Vcpu {
    /// Initial state for a fresh boot (any vCPU): CPUID, FPU defaults, LAPIC
    /// LINT0 = ExtINT / LINT1 = NMI, a few MSRs firmware would set.
    pub fn init_fresh(&mut self, cpuid: &CpuId) -> Result<(), StateError> {
        self.fd.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        self.cpuid = cpuid.as_slice().to_vec();
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
        // IA32_MISC_ENABLE: fast strings; MTRR default type: write-back, enabled.
        let m = msrs_of(&[(0x1a0, 1), (0x2ff, (1 << 11) | 6)])?;
        self.fd.set_msrs(&m).map_err(kvm("KVM_SET_MSRS"))?;
        let mut lapic = self.fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        set_lapic_reg(&mut lapic, 0x350, 0x700); // LINT0: ExtINT
        set_lapic_reg(&mut lapic, 0x360, 0x400); // LINT1: NMI
        self.fd.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        Ok(())
    }

    /// Sets the boot registers (the BSP of a fresh boot).
    pub fn set_boot_regs(&self, regs: &kvm_regs, sregs: &kvm_sregs) -> Result<(), StateError> {
        self.fd.set_sregs(sregs).map_err(kvm("KVM_SET_SREGS"))?;
        self.fd.set_regs(regs).map_err(kvm("KVM_SET_REGS"))?;
        Ok(())
    }
}

fn set_lapic_reg(l: &mut kvm_bindings::kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

impl Persist for Vcpu {
    type State = VcpuState;
    type Args = (u32, VcpuFd);

    fn save(&self) -> Result<VcpuState, StateError> {
        let fd = &self.fd;
        // mp_state first: KVM folds pending events into it.
        let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
        let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        let vcpu_events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        let debugregs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
        let tsc_khz = fd.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?;
        let cpuid = self.cpuid.clone();
        let mut msrs = msrs_of(&self.msr_list.iter().map(|&i| (i, 0)).collect::<Vec<_>>())?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if n != self.msr_list.len() {
            return Err(StateError::Msrs {
                op: "KVM_GET_MSRS",
                done: n,
                want: self.msr_list.len(),
                index: self.msr_list[n],
            });
        }
        Ok(VcpuState {
            index: self.index,
            cpuid,
            regs,
            sregs,
            xsave,
            xcrs,
            msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
            lapic,
            vcpu_events,
            mp_state,
            debugregs,
            tsc_khz,
        })
    }

    fn restore((index, fd): Self::Args, s: &VcpuState) -> Result<Vcpu, StateError> {
        if s.index != index {
            return Err(StateError::Invalid(format!(
                "vCPU {index} given the state of vCPU {}",
                s.index
            )));
        }
        let t0 = Instant::now();
        let cpuid = CpuId::from_entries(&s.cpuid)
            .map_err(|e| StateError::Invalid(format!("CPUID: {e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        let t_cpuid = t0.elapsed();
        if let Err(e) = fd.set_tsc_khz(s.tsc_khz) {
            // Same-host restores keep the frequency; a host that cannot scale is an error only
            // when the frequency differs.
            let here = fd.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?;
            if here != s.tsc_khz {
                return Err(StateError::Kvm {
                    op: "KVM_SET_TSC_KHZ",
                    source: e,
                });
            }
        }
        let t_tsc = t0.elapsed();
        fd.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
        // SAFETY: s.xsave is a kvm_xsave of the size KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        let t_regs = t0.elapsed();
        let n = if log::log_enabled!(log::Level::Trace) {
            set_msrs_one_by_one(index, &fd, &s.msrs)?
        } else {
            fd.set_msrs(&msrs_of(&s.msrs)?)
                .map_err(kvm("KVM_SET_MSRS"))?
        };
        let t_msrs = t0.elapsed();
        if n != s.msrs.len() {
            return Err(StateError::Msrs {
                op: "KVM_SET_MSRS",
                done: n,
                want: s.msrs.len(),
                index: s.msrs[n].0,
            });
        }
        fd.set_debug_regs(&s.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        // The TSC deadline once more, now that the LAPIC is in TSC-deadline mode: KVM ignores
        // the MSR while LVTT is in another mode (a fresh vCPU's) and KVM_SET_LAPIC clears it
        // when the mode changes, so the guest's armed timer (Linux's next tick) would be lost
        // and a tickless CPU would wait for any other interrupt to wake it.
        if let Some(&d) = s.msrs.iter().find(|m| m.0 == MSR_TSC_DEADLINE) {
            let n = fd
                .set_msrs(&msrs_of(&[d])?)
                .map_err(kvm("KVM_SET_MSRS (TSC deadline)"))?;
            if n != 1 {
                return Err(StateError::Msrs {
                    op: "KVM_SET_MSRS (TSC deadline)",
                    done: n,
                    want: 1,
                    index: d.0,
                });
            }
        }
        fd.set_mp_state(s.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_vcpu_events(&s.vcpu_events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        log::debug!(
            "vcpu{index} restored in {:?}: CPUID {t_cpuid:?}, TSC kHz {:?}, registers and XSAVE {:?}, {} MSRs {:?}, the rest (debug regs, LAPIC, TSC deadline, MP state, events) {:?}",
            t0.elapsed(),
            t_tsc - t_cpuid,
            t_regs - t_tsc,
            s.msrs.len(),
            t_msrs - t_regs,
            t0.elapsed() - t_msrs
        );
        Ok(Vcpu {
            index,
            fd,
            msr_list: s.msrs.iter().map(|m| m.0).collect(),
            cpuid: s.cpuid.clone(),
        })
    }
}

/// A command for a vCPU thread.
pub enum Command {
    /// Leave the guest and wait.
    Pause,
    /// Run the guest again.
    Resume,
    /// Save the state (only while paused).
    Save(Sender<Result<VcpuState, StateError>>),
    /// End the thread.
    Exit,
}

/// What a vCPU thread reports.
#[derive(Debug)]
pub enum VcpuReport {
    /// Now paused.
    Paused(u32),
    /// Running (again).
    Running(u32),
    /// The guest triple-faulted or asked for a reset.
    Reset(u32),
    /// KVM could not run the guest any further.
    Fatal(u32, String),
}

/// The controller's handle on a vCPU thread.
pub struct VcpuHandle {
    /// vCPU index.
    pub index: u32,
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the (empty) kick handler; once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl VcpuHandle {
    /// Starts the thread for `vcpu`, paused; `reports` receives its reports.
    pub fn spawn(
        vcpu: Vcpu,
        devices: Arc<Devices>,
        reports: Sender<VcpuReport>,
    ) -> std::io::Result<VcpuHandle> {
        let (tx, rx) = std::sync::mpsc::channel();
        let index = vcpu.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu_thread(vcpu, devices, rx, reports))?;
        Ok(VcpuHandle {
            index,
            commands: tx,
            thread: Some(thread),
        })
    }

    /// Sends a command and kicks the thread.
    pub fn send(&self, c: Command) {
        let _ = self.commands.send(c);
        self.kick();
    }

    /// Interrupts KVM_RUN on the thread.
    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: pthread_kill on a thread we own and have not joined; the signal has a
            // handler (installed before any vCPU thread starts) that does nothing.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Ends the thread and waits for it.
    pub fn stop(&mut self) {
        let _ = self.commands.send(Command::Exit);
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !t.is_finished() && Instant::now() < deadline {
                // SAFETY: as in kick: our live thread, a no-op handler.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                log::error!("vcpu{} did not stop", self.index);
            }
        }
    }
}

/// The CPUs every vCPU thread of this process may run on (`--vcpu-cpus`); unset: any.
pub static VCPU_CPUS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();

fn vcpu_thread(
    mut vcpu: Vcpu,
    devices: Arc<Devices>,
    commands: Receiver<Command>,
    reports: Sender<VcpuReport>,
) {
    let index = vcpu.index;
    if let Some(cpus) = VCPU_CPUS.get() {
        if !transport::sched::pin_current_thread_to(cpus) {
            log::warn!("vcpu{index}: cannot pin to CPUs {cpus:?}; it runs on any CPU");
        }
    }
    let mut running = false;
    // The last exit was port or MMIO I/O that KVM completes only on the next KVM_RUN (the
    // value of an IN or MMIO read goes into a register, RIP moves past the instruction).
    let mut io_pending = false;
    loop {
        // Commands first; block only while paused.
        let cmd = if running {
            match commands.try_recv() {
                Ok(c) => Some(c),
                Err(std::sync::mpsc::TryRecvError::Empty) => None,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
            }
        } else {
            match commands.recv_timeout(Duration::from_secs(1)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        if let Some(c) = cmd {
            match c {
                Command::Pause => {
                    running = false;
                    if std::mem::take(&mut io_pending) {
                        complete_pending_io(&mut vcpu);
                    }
                    let _ = reports.send(VcpuReport::Paused(index));
                }
                Command::Resume => {
                    // Tell the guest's kvmclock it was stopped (PVCLOCK_GUEST_STOPPED), so that
                    // its watchdogs do not take a pause or a migration for a soft lockup, as
                    // QEMU does. EINVAL: the guest has no kvmclock (yet).
                    if let Err(e) = vcpu.fd.kvmclock_ctrl() {
                        if e.errno() != libc::EINVAL {
                            log::debug!("vcpu{index}: KVM_KVMCLOCK_CTRL: {e}");
                        }
                    }
                    running = true;
                    let _ = reports.send(VcpuReport::Running(index));
                }
                Command::Save(reply) => {
                    let r = if running {
                        Err(StateError::Invalid(format!("vcpu{index} is running")))
                    } else {
                        vcpu.save()
                    };
                    let _ = reply.send(r);
                }
                Command::Exit => return,
            }
            continue;
        }
        let exit = vcpu.fd.run();
        io_pending = matches!(
            exit,
            Ok(VcpuExit::IoOut(..)
                | VcpuExit::IoIn(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..))
        );
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => devices.pio_write(port, data),
            Ok(VcpuExit::IoIn(port, data)) => devices.pio_read(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !devices.mmio_read(addr, data) {
                    log::debug!("vcpu{index}: MMIO read of unbacked {addr:#x}");
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !devices.mmio_write(addr, data) {
                    log::debug!("vcpu{index}: MMIO write to unbacked {addr:#x}");
                }
            }
            Ok(VcpuExit::Hlt) => std::thread::yield_now(),
            Ok(VcpuExit::Shutdown) => {
                if let (Ok(r), Ok(sr)) = (vcpu.fd.get_regs(), vcpu.fd.get_sregs()) {
                    log::info!(
                        "vcpu{index}: shutdown at rip={:#x} rsp={:#x} cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                        r.rip, r.rsp, sr.cs.selector, sr.cr0, sr.cr3, sr.cr4, sr.efer
                    );
                }
                running = false;
                let _ = reports.send(VcpuReport::Reset(index));
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                let what = format!("{other:?}");
                let regs = vcpu.fd.get_regs().ok();
                let sregs = vcpu.fd.get_sregs().ok();
                running = false;
                let _ = reports.send(VcpuReport::Fatal(
                    index,
                    format!(
                        "unhandled exit {what}; rip={:#x} cs={:#x} cr0={:#x} cr4={:#x}",
                        regs.map(|r| r.rip).unwrap_or(0),
                        sregs.map(|s| s.cs.selector).unwrap_or(0),
                        sregs.map(|s| s.cr0).unwrap_or(0),
                        sregs.map(|s| s.cr4).unwrap_or(0),
                    ),
                ));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                running = false;
                let _ = reports.send(VcpuReport::Fatal(index, format!("KVM_RUN: {e}")));
            }
        }
    }
}

/// Lets KVM finish the I/O instruction of the last exit without running any further guest
/// code: `KVM_RUN` with `immediate_exit` set completes a pending port or MMIO access (the value
/// read lands in its register, RIP moves on) and returns EINTR. Until then the vCPU's registers
/// show the instruction not yet done, and that is not state to save: a destination would run
/// the access again (a second device read or write) or, for a read, lose its value.
fn complete_pending_io(vcpu: &mut Vcpu) {
    vcpu.fd.set_kvm_immediate_exit(1);
    match vcpu.fd.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        Ok(exit) => log::warn!(
            "vcpu{}: completing I/O before a pause: unexpected exit {exit:?}",
            vcpu.index
        ),
        Err(e) => log::warn!("vcpu{}: completing I/O before a pause: {e}", vcpu.index),
    }
    vcpu.fd.set_kvm_immediate_exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    /// A vCPU as `Vm` makes one, on a fresh VM with an in-kernel irqchip (None: no /dev/kvm).
    fn fresh_vcpu(kvm: &Kvm) -> Option<(kvm_ioctls::VmFd, Vcpu)> {
        let vm = kvm.create_vm().ok()?;
        vm.create_irq_chip().ok()?;
        let fd = vm.create_vcpu(0).ok()?;
        let mut cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .ok()?;
        crate::cpuid::apply(&mut cpuid, 0, 1);
        let list = kvm.get_msr_index_list().ok()?;
        let mut v = Vcpu {
            index: 0,
            fd,
            msr_list: Vec::new(),
            cpuid: Vec::new(),
        };
        v.init_fresh(&cpuid).ok()?;
        v.msr_list = readable_msrs(&v.fd, &order_msrs(list.as_slice()));
        Some((vm, v))
    }

    /// /dev/kvm, a VM and a fresh vCPU for `test`, or None after printing and logging a skip.
    fn vcpu_or_skip(test: &str) -> Option<(Kvm, kvm_ioctls::VmFd, Vcpu)> {
        let Ok(kvm) = Kvm::new() else {
            skip(test, "no /dev/kvm");
            return None;
        };
        let Some((vm, v)) = fresh_vcpu(&kvm) else {
            skip(test, "cannot make a vCPU");
            return None;
        };
        Some((kvm, vm, v))
    }

    /// A skip, where `.ci/run` sees it: printed and appended to `$SKIP_LOG` (default the
    /// workspace's `target/test-skips.log`, which `scripts/check-skips.sh` checks).
    fn skip(test: &str, why: &str) {
        use std::io::Write;
        let line = format!("SKIPPED: vcpu::tests::{test}: {why}");
        println!("{line}");
        let path = std::env::var_os("SKIP_LOG")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-skips.log")
            });
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }

    /// Puts `ram` at guest address 0 and starts `v` in real mode at 0x1000 with RAX = `rax`.
    fn real_mode_at(vm: &kvm_ioctls::VmFd, v: &Vcpu, ram: &crate::memory::GuestRam, rax: u64) {
        let (gpa, host, len) = ram.host_regions()[0];
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host,
            flags: 0,
        };
        // SAFETY: `ram` is mapped for `len` bytes at `host`, and every caller declares it
        // before the VM, so it outlives the VM.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        let mut sregs = v.fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        v.fd.set_sregs(&sregs).unwrap();
        let regs = kvm_regs {
            rip: 0x1000,
            rflags: 2,
            rax,
            ..Default::default()
        };
        v.fd.set_regs(&regs).unwrap();
    }

    /// The first port a guest writes to (`out imm8, al`), or None when it stops otherwise.
    fn first_port_out(v: &mut Vcpu) -> Result<u16, String> {
        for _ in 0..100 {
            match v.fd.run() {
                Ok(VcpuExit::IoOut(port, _)) => return Ok(port),
                Ok(VcpuExit::Intr) => continue,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                other => return Err(format!("{other:?}")),
            }
        }
        Err("no exit in 100 runs".into())
    }

    /// A guest's RDMSR or WRMSR of a performance counter (the legacy AMD counter Linux probes,
    /// and an Intel one) raises #GP: the VMM offers no PMU on any host.
    #[test]
    fn the_guest_gets_gp_on_performance_counter_msrs() {
        const TEST: &str = "the_guest_gets_gp_on_performance_counter_msrs";
        // rdmsr (0f 32) / wrmsr (0f 30) of ECX, then `out 0x10, al; hlt`; the #GP handler
        // (real-mode IVT vector 13 -> 0:0x2000) does `out 0x11, al; hlt`
        for (msr, op) in [(0xc001_0007u32, 0x30u8), (0xc001_0004, 0x32), (0xc1, 0x32)] {
            let ram = crate::memory::GuestRam::new(2 << 20).unwrap();
            let mut code = vec![0x66, 0xb9];
            code.extend_from_slice(&msr.to_le_bytes());
            code.extend_from_slice(&[0x66, 0x31, 0xd2, 0x0f, op, 0xe6, 0x10, 0xf4]);
            ram.write_bytes(0x1000, &code).unwrap();
            ram.write_bytes(0x2000, &[0xe6, 0x11, 0xf4]).unwrap();
            ram.write_bytes(13 * 4, &[0x00, 0x20, 0x00, 0x00]).unwrap();
            let Some((_kvm, vm, mut v)) = vcpu_or_skip(TEST) else {
                return;
            };
            if let Err(e) = crate::cpuid::deny_pmu_msrs(&vm) {
                skip(TEST, &format!("KVM_X86_SET_MSR_FILTER: {e}"));
                return;
            }
            real_mode_at(&vm, &v, &ram, 0xffff);
            let port = match first_port_out(&mut v) {
                Ok(p) => p,
                Err(e) => {
                    skip(
                        TEST,
                        &format!("this KVM does not run the real-mode probe: {e}"),
                    );
                    return;
                }
            };
            assert_eq!(
                port, 0x11,
                "MSR {msr:#x} (op 0f {op:02x}) did not raise #GP"
            );
        }
    }

    fn msr(fd: &VcpuFd, index: u32) -> u64 {
        let mut m = msrs_of(&[(index, 0)]).unwrap();
        assert_eq!(fd.get_msrs(&mut m).unwrap(), 1);
        m.as_slice()[0].data
    }

    /// Linux arms its next tick in IA32_TSC_DEADLINE; a restored vCPU must still have it armed
    /// (KVM ignores the MSR until the LAPIC is in TSC-deadline mode).
    #[test]
    fn an_armed_tsc_deadline_survives_save_and_restore() {
        let Some((kvm, _vm, v)) = vcpu_or_skip("an_armed_tsc_deadline_survives_save_and_restore")
        else {
            return;
        };
        if !v.msr_list.contains(&MSR_TSC_DEADLINE) {
            skip(
                "an_armed_tsc_deadline_survives_save_and_restore",
                "KVM lists no TSC deadline MSR",
            );
            return;
        }
        // LAPIC software-enabled, LVTT in TSC-deadline mode (vector 0xec), deadline far ahead
        let mut lapic = v.fd.get_lapic().unwrap();
        set_lapic_reg(&mut lapic, 0xf0, 0x1ff);
        set_lapic_reg(&mut lapic, 0x320, (2 << 17) | 0xec);
        v.fd.set_lapic(&lapic).unwrap();
        let deadline = msr(&v.fd, MSR_TSC) + (1 << 40);
        v.fd.set_msrs(&msrs_of(&[(MSR_TSC_DEADLINE, deadline)]).unwrap())
            .unwrap();
        assert_eq!(
            msr(&v.fd, MSR_TSC_DEADLINE),
            deadline,
            "armed before the save"
        );
        let state = v.save().unwrap();
        let vm2 = kvm.create_vm().unwrap();
        vm2.create_irq_chip().unwrap();
        let fd2 = vm2.create_vcpu(0).unwrap();
        let restored = Vcpu::restore((0, fd2), &state).unwrap();
        assert_eq!(
            msr(&restored.fd, MSR_TSC_DEADLINE),
            deadline,
            "the restored vCPU lost its armed TSC deadline"
        );
    }

    /// A pause right after a port read must not leave the read half done: the saved registers
    /// must hold the value read and RIP past the `IN` (KVM finishes it on the next KVM_RUN).
    #[test]
    fn a_pause_after_a_port_read_completes_it_before_the_state_is_saved() {
        const TEST: &str = "a_pause_after_a_port_read_completes_it_before_the_state_is_saved";
        // 2 MiB of guest RAM at 0 (declared first: it outlives the VM); real-mode code at
        // 0x1000: `in al, 0x10; hlt`.
        let ram = crate::memory::GuestRam::new(2 << 20).unwrap();
        ram.write_bytes(0x1000, &[0xe4, 0x10, 0xf4]).unwrap();
        let Some((_kvm, vm, mut v)) = vcpu_or_skip(TEST) else {
            return;
        };
        real_mode_at(&vm, &v, &ram, 0x1234_5600);
        let mut exit = None;
        for _ in 0..100 {
            match v.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    data[0] = 0xab;
                    exit = Some(port);
                    break;
                }
                Ok(VcpuExit::Intr) => continue,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                other => {
                    skip(
                        TEST,
                        &format!("this KVM does not run the real-mode probe: {other:?}"),
                    );
                    return;
                }
            }
        }
        assert_eq!(exit, Some(0x10), "the guest's IN did not exit to us");
        let before = v.fd.get_regs().unwrap();
        assert_eq!(
            before.rip, 0x1000,
            "KVM moved RIP before the read completed"
        );
        complete_pending_io(&mut v);
        let after = v.fd.get_regs().unwrap();
        assert_eq!(after.rax, 0x1234_56ab, "the value read is not in AL");
        assert_eq!(
            after.rip, 0x1002,
            "RIP is not past the IN (and not past the HLT)"
        );
    }
}
