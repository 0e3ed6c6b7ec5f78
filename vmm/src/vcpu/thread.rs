//! The vCPU thread: it owns its `VcpuFd`, runs the guest, and takes commands (pause, resume,
//! save, exit) from the controller, which kicks it out of `KVM_RUN` with a signal.
//!
//! The kick is `libc::pthread_kill`: the signal is a real-time one (`SIGRTMIN` + n, which no
//! other code uses), and nix's `Signal` has no real-time signals.

use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;

use super::cpu::Vcpu;
use crate::devices::Devices;
use crate::persist::{Persist, StateError};
use crate::state::VcpuState;

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
    /// Returns false when the thread is still there after 5 s (left running, logged).
    pub fn stop(&mut self) -> bool {
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
                return false;
            }
        }
        true
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
pub(super) fn complete_pending_io(vcpu: &mut Vcpu) {
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
